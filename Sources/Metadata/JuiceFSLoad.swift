import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// JuiceFS's trash directory inode (its `TrashInode`): the trash's own numbers are not kept.
let juiceFSTrashInode: UInt64 = 0x7FFF_FFFF_1000_0000

extension TxnMetadata {
    /// Makes a StageFS volume from the JSON output of `juicefs dump` (1.4), over the same bucket
    /// and objects: JuiceFS and StageFS name blocks alike (`<volume>/chunks/<id/10^6>/<id/10^3>/
    /// <id>_<index>_<length>`), so slices are carried over as they are. Read in one pass in
    /// bounded memory (a directory's tree is walked as it comes, each file whole), checked and
    /// written by the same code as `load`; compressed volumes (lz4, zstd) stay compressed.
    /// Refused with the reason: encryption, a hash prefix or shards in the object keys, POSIX
    /// ACLs, a storage StageFS does not speak.
    /// Files in JuiceFS's trash come into StageFS's (as deleted by their owner); directories
    /// there are left out (`DumpStats.notes` says how many).
    package func loadJuiceFS(
        from r: JSONReader, secretKey: String? = nil, progress: @escaping (DumpStats) -> Void = { _ in }
    ) throws(FSError)
        -> DumpStats
    {
        try requireEmptyForLoad()
        var c = JuiceFSConverter(meta: self, progress: progress)
        var format: VolumeFormat?
        var counters: [String: Int64] = [:]
        var quotas: [(QuotaTarget, QuotaLimits)] = []
        try r.beginObject()
        while let key = try r.nextKey() {
            switch key {
            case "Setting":
                format = try juiceFSFormat(try r.value(), secretKey: secretKey)
                if let format { store.formatLoaded(format) }
            case "Counters":
                let v = try r.value()
                counters["nextInode"] = v["nextInodes"]?.int64 ?? 0
                counters["nextSlice"] = v["nextChunk"]?.int64 ?? 0
            case "Quotas", "UserQuotas", "GroupQuotas":
                guard case .object(let members) = try r.value() else { throw FSError(EINVAL, "the JuiceFS dump's \(key) are malformed") }
                for (id, q) in members {
                    let limits = QuotaLimits(capacity: UInt64(max(0, q["maxSpace"]?.int64 ?? 0)), inodes: UInt64(max(0, q["maxInodes"]?.int64 ?? 0)))
                    let target: QuotaTarget? =
                        key == "Quotas"
                        ? Ino(id).map { .dir($0) } : key == "UserQuotas" ? UInt32(id).map { .user($0) } : UInt32(id).map { .group($0) }
                    guard let target else { throw FSError(EINVAL, "the JuiceFS dump has a quota of '\(id)'") }
                    if limits.capacity > 0 || limits.inodes > 0 { quotas.append((target, limits)) }
                }
            case "FSTree":
                guard format != nil else { throw FSError(EINVAL, "the JuiceFS dump has its tree before its Setting") }
                try c.tree(r)
            case "Trash":
                guard c.rootDone else { throw FSError(EINVAL, "the JuiceFS dump has its trash before its tree") }
                try c.trash(r)
            default:
                try r.skipValue()
            }
        }
        guard try r.atEnd() else { throw FSError(EINVAL, "the JuiceFS dump has text after its end") }
        guard let f = format else { throw FSError(EINVAL, "not a JuiceFS dump: it has no Setting") }
        guard c.rootDone else { throw FSError(EINVAL, "the JuiceFS dump has no tree (FSTree)") }
        try c.closeRoot()
        var state = c.state
        try finishLoad(&state, format: f, counters: counters, quotas: quotas, gatewaySecret: nil, secretKey: secretKey)
        progress(state.stats)
        return state.stats
    }

    /// The StageFS format record of a JuiceFS volume's `Setting`, or the reason it cannot be
    /// read as it is.
    func juiceFSFormat(_ s: JSONValue, secretKey: String?) throws(FSError) -> VolumeFormat {
        guard let name = s["Name"]?.string, let uuid = s["UUID"]?.string, let storage = s["Storage"]?.string, var bucket = s["Bucket"]?.string,
            let blockSize = s["BlockSize"]?.int64
        else { throw FSError(EINVAL, "not a JuiceFS dump: its Setting lacks Name, UUID, Storage, Bucket or BlockSize") }
        func refuse(_ why: String) -> FSError {
            FSError(EOPNOTSUPP, "JuiceFS volume '\(name)' cannot be taken over without copying its data: \(why)")
        }
        // JuiceFS compresses each block whole as StageFS does: an LZ4 block, or a zstd frame.
        let comp = (s["Compression"]?.string ?? "").lowercased()
        guard ["", "none", "lz4", "zstd"].contains(comp) else {
            throw refuse(
                "its blocks are compressed with '\(comp.prefix(40))', which StageFS does not read; copy it instead (juicefs sync, or cp through both mounts)"
            )
        }
        if let key = s["EncryptKey"]?.string, !key.isEmpty { throw refuse("its blocks are encrypted") }
        if s["HashPrefix"]?.bool == true { throw refuse("its object keys have a hash prefix (format --hash-prefix)") }
        if let shards = s["Shards"]?.int64, shards > 0 { throw refuse("its objects are spread over \(shards) shard buckets") }
        if s["EnableACL"]?.bool == true { throw refuse("it keeps POSIX ACLs, which StageFS does not") }
        guard (64...65536).contains(blockSize) else { throw refuse("its block size (\(blockSize) KiB) is out of range") }
        let ours: String
        switch storage {
        case "file":
            ours = "file"
            while bucket.count > 1 && bucket.hasSuffix("/") { bucket.removeLast() }
            guard bucket.hasPrefix("/") else { throw refuse("its file bucket '\(bucket)' is not an absolute directory") }
        case "s3", "minio":
            ours = "s3"
            guard (try? S3BucketURLCheck.pathStyle(bucket)) != nil else {
                throw refuse("its bucket '\(bucket)' is not an http(s)://host[:port]/bucket URL (path style), the form StageFS takes")
            }
        default:
            throw refuse("its storage is '\(storage)'; StageFS speaks 'file' and S3")
        }
        var secret = s["SecretKey"]?.string
        if secret == "removed" || secret == "" { secret = nil }
        let access = s["AccessKey"]?.string.flatMap { $0.isEmpty ? nil : $0 }
        return VolumeFormat(
            name: name, storage: ours, bucket: bucket, accessKey: ours == "s3" ? access : nil, secretKey: ours == "s3" ? (secret ?? secretKey) : nil,
            blockSizeKiB: Int(blockSize), trashDays: Int(s["TrashDays"]?.int64 ?? 1), capacity: s["Capacity"]?.uint64, inodes: s["Inodes"]?.uint64,
            uuid: uuid, compression: comp.isEmpty ? nil : comp)
    }
}

/// What a path-style S3 bucket URL is (the check `juiceFSFormat` makes; the object store parses
/// it again when it opens).
enum S3BucketURLCheck {
    static func pathStyle(_ url: String) throws -> Bool {
        guard url.hasPrefix("http://") || url.hasPrefix("https://") else { throw FSError(EINVAL, "") }
        let rest = url.drop(while: { $0 != "/" }).dropFirst(2)
        let parts = rest.split(separator: "/", omittingEmptySubsequences: true)
        // host[:port], then the bucket.
        guard parts.count == 2, !rest.hasPrefix("/") else { throw FSError(EINVAL, "") }
        return true
    }
}

/// One pass over a JuiceFS dump's tree, turned into the records `load` takes (`LoadState`).
struct JuiceFSConverter<S: TxnStore> {
    let meta: TxnMetadata<S>
    let progress: (DumpStats) -> Void
    var state = LoadState()
    var rootDone = false
    var rootSubdirs: UInt32 = 0
    var trashDirs: UInt64 = 0
    var skipped = 0
    var lastProgress: UInt64 = 0

    init(meta: TxnMetadata<S>, progress: @escaping (DumpStats) -> Void) {
        self.meta = meta
        self.progress = progress
    }

    /// A record in `load`'s form, taken at once.
    mutating func take(_ members: [(String, JSONValue)]) throws(FSError) {
        try meta.take(.object(members), &state)
        if state.weight >= loadBatch { try meta.apply(&state) }
        let now = Sys.monotonicNanos()
        if now - lastProgress > 500_000_000 {
            lastProgress = now
            progress(state.stats)
        }
    }

    /// JuiceFS's escaping of names, link targets and values: `%XX` (upper-case hex) for bytes
    /// that are not UTF-8, control characters, '%', '"' and '\'.
    static func unescape(_ s: String) -> [UInt8] {
        let b = Array(s.utf8)
        guard b.contains(UInt8(ascii: "%")) else { return b }
        func hex(_ c: UInt8) -> UInt8? {
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - 48
            case UInt8(ascii: "A")...UInt8(ascii: "F"): return c - 55
            default: return nil
            }
        }
        var out: [UInt8] = []
        var i = 0
        while i < b.count {
            if b[i] == UInt8(ascii: "%"), i + 2 < b.count, let h = hex(b[i + 1]), let l = hex(b[i + 2]) {
                out.append(h << 4 | l)
                i += 3
            } else {
                out.append(b[i])
                i += 1
            }
        }
        return out
    }

    static func bytesValue(_ b: [UInt8]) -> JSONValue {
        if JSONText.validUTF8(b) { return .string(String(decoding: b, as: UTF8.self)) }
        return .object([("b64", .string(String(decoding: Base64.encode(b), as: UTF8.self)))])
    }

    static func fileType(_ t: String?) throws(FSError) -> FileType {
        switch t {
        case "regular": return .regular
        case "directory": return .directory
        case "symlink": return .symlink
        case "fifo": return .fifo
        case "blockdev": return .blockDevice
        case "chardev": return .charDevice
        case "socket": return .socket
        default: throw FSError(EINVAL, "the JuiceFS dump has an inode of unknown type '\(t ?? "")'")
        }
    }

    /// An inode record from a JuiceFS entry's parts.
    mutating func record(
        _ attr: JSONValue, ino: Ino, type: FileType, parent: Ino, xattrs: JSONValue?, symlink: String?, chunks: JSONValue?, nlink: UInt64? = nil,
        target: [UInt8]? = nil
    ) throws(FSError) {
        func n(_ k: String) -> Int64 { attr[k]?.int64 ?? 0 }
        var m: [(String, JSONValue)] = [("i", .uint(ino)), ("t", .string(String(describing: type.dumpLetter)))]
        m.append(("m", .int(n("mode") & 0o7777)))
        m.append(("u", .int(n("uid"))))
        m.append(("g", .int(n("gid"))))
        m.append(("n", .int(nlink.map { Int64($0) } ?? n("nlink"))))
        let link = symlink.map(Self.unescape)
        let size: Int64 = type == .directory ? 4096 : type == .symlink ? Int64(link?.count ?? 0) : n("length")
        m.append(("s", .int(size)))
        m.append(("a", .array([.int(n("atime")), .int(n("atimensec"))])))
        m.append(("mt", .array([.int(n("mtime")), .int(n("mtimensec"))])))
        m.append(("ct", .array([.int(n("ctime")), .int(n("ctimensec"))])))
        if n("rdev") != 0 { m.append(("r", .int(n("rdev")))) }
        m.append(("p", .uint(parent)))
        if let xs = xattrs?.array, !xs.isEmpty {
            m.append(
                (
                    "x",
                    .array(
                        xs.map { x in
                            .array([
                                Self.bytesValue(Self.unescape(x["name"]?.string ?? "")), Self.bytesValue(Self.unescape(x["value"]?.string ?? "")),
                            ])
                        })
                ))
        }
        if let t = target ?? link { m.append(("l", Self.bytesValue(t))) }
        if let cs = chunks?.array, !cs.isEmpty {
            var list: [JSONValue] = []
            for c in cs {
                guard let idx = c["index"]?.uint64, let slices = c["slices"]?.array else {
                    throw FSError(EINVAL, "inode \(ino) has a malformed chunk in the JuiceFS dump")
                }
                list.append(
                    .array([
                        .uint(idx),
                        .array(
                            slices.map { s in
                                let id = s["id"]?.uint64 ?? 0
                                return .array([
                                    .uint(s["pos"]?.uint64 ?? 0), .uint(id != 0 ? id : s["chunkid"]?.uint64 ?? 0), .uint(s["size"]?.uint64 ?? 0),
                                    .uint(s["off"]?.uint64 ?? 0), .uint(s["len"]?.uint64 ?? 0),
                                ])
                            }),
                    ]))
            }
            m.append(("k", .array(list)))
        }
        try take(m)
    }

    /// One entry object (after its name): its attributes first, as JuiceFS writes them.
    /// Returns the inode and type; a directory's tree is walked before it returns.
    mutating func entry(_ r: JSONReader, parent: Ino, depth: Int) throws(FSError) -> (Ino, FileType) {
        if depth > maxRenameDepth { throw FSError(EINVAL, "the JuiceFS dump nests directories deeper than \(maxRenameDepth)") }
        try r.beginObject()
        guard try r.nextKey() == "attr" else { throw FSError(EINVAL, "the JuiceFS dump has an entry whose attributes do not come first") }
        let attr = try r.value()
        guard let ino = attr["inode"]?.uint64, ino > 0 else { throw FSError(EINVAL, "the JuiceFS dump has an entry without an inode number") }
        let type = try Self.fileType(attr["type"]?.string)
        let isRoot = depth == 0
        if !isRoot && ino >= Trash.base { throw FSError(EINVAL, "JuiceFS inode \(ino) is past 2^52, where StageFS's trash numbers begin") }
        var xattrs: JSONValue?
        var symlink: String?
        var chunks: JSONValue?
        var recorded = state.recorded.contains(ino)
        while let k = try r.nextKey() {
            switch k {
            case "xattrs": xattrs = try r.value()
            case "symlink": symlink = try r.value().string
            case "chunks": chunks = try r.value()
            case "posix_acl_access", "posix_acl_default":
                throw FSError(EOPNOTSUPP, "JuiceFS inode \(ino) has a POSIX ACL, which StageFS does not keep")
            case "entries":
                guard type == .directory, !recorded else {
                    throw FSError(EINVAL, "the JuiceFS dump has entries under inode \(ino), not a new directory")
                }
                try record(attr, ino: ino, type: type, parent: isRoot ? rootIno : parent, xattrs: xattrs, symlink: nil, chunks: nil)
                recorded = true
                try directory(r, ino, depth: depth)
            default:
                try r.skipValue()
            }
        }
        if !recorded {
            try record(attr, ino: ino, type: type, parent: isRoot ? rootIno : parent, xattrs: xattrs, symlink: symlink, chunks: chunks)
            if type == .directory && !isRoot { try take([("z", .uint(ino)), ("k", .int(0))]) }
        }
        return (ino, type)
    }

    /// A directory's `entries` object: each child, then its names (500 a record), then its end.
    mutating func directory(_ r: JSONReader, _ dir: Ino, depth: Int) throws(FSError) {
        try r.beginObject()
        var names: [JSONValue] = []
        var subdirs: UInt32 = 0
        while let name = try r.nextKey() {
            let (ino, type) = try entry(r, parent: dir, depth: depth + 1)
            if type == .directory { subdirs += 1 }
            names.append(.array([Self.bytesValue(Self.unescape(name)), .uint(ino), .string(String(describing: type.dumpLetter))]))
            if names.count == dumpPage {
                try take([("e", .uint(dir)), ("n", .array(names))])
                names = []
            }
        }
        if !names.isEmpty { try take([("e", .uint(dir)), ("n", .array(names))]) }
        if dir == rootIno {
            rootSubdirs = subdirs
        } else {
            try take([("z", .uint(dir)), ("k", .uint(UInt64(subdirs)))])
        }
    }

    /// `FSTree`: the root's entry (its end waits for the trash, which adds `.trash` to it).
    mutating func tree(_ r: JSONReader) throws(FSError) {
        let (ino, type) = try entry(r, parent: rootIno, depth: 0)
        guard ino == rootIno, type == .directory else { throw FSError(EINVAL, "the JuiceFS dump's tree does not start at the root directory") }
        rootDone = true
    }

    mutating func newTrashDir() -> Ino {
        trashDirs += 1
        return Trash.base + trashDirs
    }

    func trashDir(_ ino: Ino, parent: Ino, mode: Int64, uid: Int64 = 0, gid: Int64 = 0, at t: Int64) -> [(String, JSONValue)] {
        [
            ("i", .uint(ino)), ("t", .string("d")), ("m", .int(mode)), ("u", .int(uid)), ("g", .int(gid)), ("n", .int(2)), ("s", .int(4096)),
            ("a", .array([.int(t), .int(0)])), ("mt", .array([.int(t), .int(0)])), ("ct", .array([.int(t), .int(0)])), ("p", .uint(parent)),
        ]
    }

    /// `Trash`: JuiceFS's `<hour>/<parent>-<inode>-<name>` files become StageFS's
    /// `/.trash/<hour>/<owner uid>/<inode>-<name>`, deleted at that hour; directories there are
    /// left out.
    mutating func trash(_ r: JSONReader) throws(FSError) {
        try r.beginObject()
        let now = Timespec.now().sec
        var made = false
        while let k = try r.nextKey() {
            guard k == "entries" else {
                try r.skipValue()
                continue
            }
            try r.beginObject()
            var hours: [JSONValue] = []
            while let hour = try r.nextKey() {
                guard let hourNumber = Trash.hour(named: Array(hour.utf8)) else {
                    try r.skipValue()
                    skipped += 1
                    continue
                }
                if !made {
                    try take(trashDir(Trash.root, parent: rootIno, mode: 0o555, at: now))
                    made = true
                }
                let hourIno = newTrashDir()
                try take(trashDir(hourIno, parent: Trash.root, mode: 0o555, at: hourNumber * 3600))
                hours.append(.array([.string(hour), .uint(hourIno), .string("d")]))
                try hourDir(r, hourIno, deleted: hourNumber * 3600)
            }
            if made {
                try take([("e", .uint(Trash.root)), ("n", .array(hours))])
                try take([("z", .uint(Trash.root)), ("k", .uint(UInt64(hours.count)))])
            }
        }
        if made {
            try take([("e", .uint(rootIno)), ("n", .array([.array([.string(".trash"), .uint(Trash.root), .string("d")])]))])
            rootSubdirs += 1
        }
    }

    /// One hour of JuiceFS's trash: each file under a directory of its owner.
    mutating func hourDir(_ r: JSONReader, _ hourIno: Ino, deleted: Int64) throws(FSError) {
        guard try r.nextIsObject() else { throw FSError(EINVAL, "the JuiceFS dump's trash is malformed") }
        try r.beginObject()
        var owners: [UInt32: (ino: Ino, names: [JSONValue])] = [:]
        while let k = try r.nextKey() {
            guard k == "entries" else {
                try r.skipValue()
                continue
            }
            try r.beginObject()
            while let name = try r.nextKey() {
                try r.beginObject()
                guard try r.nextKey() == "attr" else {
                    throw FSError(EINVAL, "the JuiceFS dump has a trash entry whose attributes do not come first")
                }
                let attr = try r.value()
                guard let ino = attr["inode"]?.uint64, ino > 0, ino < Trash.base, attr["type"]?.string == "regular", !state.recorded.contains(ino)
                else {
                    while try r.nextKey() != nil { try r.skipValue() }
                    skipped += 1
                    continue
                }
                var xattrs: JSONValue?
                var chunks: JSONValue?
                while let f = try r.nextKey() {
                    switch f {
                    case "xattrs": xattrs = try r.value()
                    case "chunks": chunks = try r.value()
                    case "posix_acl_access", "posix_acl_default":
                        throw FSError(EOPNOTSUPP, "JuiceFS inode \(ino) has a POSIX ACL, which StageFS does not keep")
                    default: try r.skipValue()
                    }
                }
                // `<parent>-<inode>-<name>`
                let raw = Self.unescape(name)
                let parts = raw.split(separator: UInt8(ascii: "-"), maxSplits: 2, omittingEmptySubsequences: false)
                let origParent = parts.count == 3 ? Ino(String(decoding: parts[0], as: UTF8.self)) ?? rootIno : rootIno
                let origName = parts.count == 3 ? Array(parts[2]) : raw
                let uid = UInt32(clamping: attr["uid"]?.int64 ?? 0)
                if owners[uid] == nil {
                    let d = newTrashDir()
                    try take(trashDir(d, parent: hourIno, mode: 0o500, uid: Int64(uid), gid: attr["gid"]?.int64 ?? 0, at: deleted))
                    owners[uid] = (d, [])
                }
                let home = owners[uid]!.ino
                let size = attr["length"]?.uint64 ?? 0
                let origin = Trash.Origin(parent: origParent, deleted: deleted, name: origName, counted: align4K(size))
                try record(
                    attr, ino: ino, type: .regular, parent: home, xattrs: xattrs, symlink: nil, chunks: chunks, nlink: 0, target: origin.encoded())
                owners[uid]!.names.append(.array([Self.bytesValue(Trash.entryName(ino, origName)), .uint(ino), .string("f")]))
                if owners[uid]!.names.count == dumpPage {
                    try take([("e", .uint(home)), ("n", .array(owners[uid]!.names))])
                    owners[uid]!.names = []
                }
            }
        }
        var dirs: [JSONValue] = []
        for (uid, o) in owners.sorted(by: { $0.key < $1.key }) {
            if !o.names.isEmpty { try take([("e", .uint(o.ino)), ("n", .array(o.names))]) }
            try take([("z", .uint(o.ino)), ("k", .int(0))])
            dirs.append(.array([.string(String(uid)), .uint(o.ino), .string("d")]))
        }
        if !dirs.isEmpty { try take([("e", .uint(hourIno)), ("n", .array(dirs))]) }
        try take([("z", .uint(hourIno)), ("k", .uint(UInt64(dirs.count)))])
    }

    /// The root's end, once the trash is known.
    mutating func closeRoot() throws(FSError) {
        try take([("z", .uint(rootIno)), ("k", .uint(UInt64(rootSubdirs)))])
        if skipped > 0 { state.stats.notes.append("\(skipped) entries of JuiceFS's trash (directories, or not files) were left out") }
    }
}

/// What `stagefs load --from-juicefs` asks of an engine.
package protocol JuiceFSLoadAdmin: AnyObject, Sendable {
    func loadJuiceFS(from r: JSONReader, secretKey: String?, progress: @escaping (DumpStats) -> Void) throws(FSError) -> DumpStats
}

extension TxnMetadata: JuiceFSLoadAdmin {}
