import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// One change a load makes, gathered into batches (one transaction each).
enum LoadChange {
    case inode(Ino, Attr, xattrs: [([UInt8], [UInt8])], target: [UInt8]?, chunks: [(UInt32, [UInt8])])
    case chunks(Ino, [(UInt32, [UInt8])])
    case entries(Ino, [([UInt8], Ino, FileType)])
    /// A directory's link count from the subdirectories the dump found in it.
    case dirLinks(Ino, UInt32)
    /// A file's link count from the names the dump found for it.
    case fileLinks(Ino, UInt32)
    case sliceRefs(UInt64, Int64)

    var weight: Int {
        switch self {
        case .inode(_, _, let x, _, let c): return 2 + x.count + c.count
        case .chunks(_, let c): return c.count
        case .entries(_, let e): return 1 + e.count
        case .dirLinks, .fileLinks, .sliceRefs: return 1
        }
    }
}

/// Changes one load transaction takes at most (records, chunks and names, about one key of
/// the store each): no commit's work grows with the dump.
let loadBatch = 2000

/// What a load takes from the dump as it reads it, beside the changes (`TxnMetadata.load`).
struct LoadState {
    var stats = DumpStats()
    /// Inodes with a record, and directories among them.
    var recorded = SparseBitmap()
    var directories = SparseBitmap()
    /// Names of each non-directory outside the trash, and the link counts their records say
    /// where that is not 1.
    var names = MultiCounter()
    var recordedLinks: [Ino: UInt32] = [:]
    /// Directories named so far (each has one name).
    var named = SparseBitmap()
    /// Records of each slice id (more than one: shared by a clone or a copied range).
    var slices = MultiCounter()
    var usedSpace: Int64 = 0
    var usedInodes: Int64 = 0
    var trashSpace: Int64 = 0
    var trashInodes: Int64 = 0
    var maxInode: UInt64 = 0
    var maxTrashInode: UInt64 = 0
    var maxSlice: UInt64 = 0
    var pending: [LoadChange] = []
    var weight = 0

    mutating func add(_ c: LoadChange) {
        weight += c.weight
        pending.append(c)
    }
}

extension TxnMetadata {
    /// Loads a dump (`dump`'s format) into this engine, which must hold no volume, in batches
    /// of `loadBatch` changes: link counts, usage, the trash's counters and slice references
    /// are counted from what the dump holds (a dump of a live volume is made consistent), the
    /// id counters set past every number it uses, quotas set again (and counted). The format
    /// record is written last: a load that fails leaves no volume to mount (empty the engine
    /// before trying again). `secretKey` is stored when the dump has none.
    package func load(
        from reader: JSONReader, secretKey: String? = nil, progress: @escaping (DumpStats) -> Void = { _ in }
    ) throws(FSError)
        -> DumpStats
    {
        try requireEmptyForLoad()
        try reader.beginObject()
        guard try reader.nextKey() == "stagefs_dump" else { throw FSError(EINVAL, "not a StageFS dump (it does not start with \"stagefs_dump\")") }
        let head = try reader.value()
        guard let version = head["version"]?.int64 else { throw FSError(EINVAL, "not a StageFS dump (no version)") }
        if version > Int64(dumpVersion) {
            throw FSError(EINVAL, "the dump has format version \(version), newer than this StageFS reads (\(dumpVersion)): upgrade stagefs")
        }
        var format: VolumeFormat?
        var gatewaySecret: String?
        var quotas: [(QuotaTarget, QuotaLimits)] = []
        var counters: [String: Int64] = [:]
        var summary: JSONValue?
        var state = LoadState()
        var lastProgress: UInt64 = 0
        while let key = try reader.nextKey() {
            switch key {
            case "format":
                var text: [UInt8] = []
                JSONText.value(try reader.value(), into: &text)
                format = try VolumeFormat.decode(String(decoding: text, as: UTF8.self))
                // (The records that follow are written in the layout of its version.)
                if let format { store.formatLoaded(format) }
            case "gateway_secret":
                gatewaySecret = try reader.value().string
            case "records":
                try reader.beginArray()
                while try reader.nextElement() {
                    try take(try reader.value(), &state)
                    if state.weight >= loadBatch { try apply(&state) }
                    let now = Sys.monotonicNanos()
                    if now - lastProgress > 500_000_000 {
                        lastProgress = now
                        progress(state.stats)
                    }
                }
            case "quotas":
                for q in try reader.value().array ?? [] {
                    guard let k = q["key"]?.string, let target = QuotaTarget(key: k), let cap = q["capacity"]?.uint64, let ino = q["inodes"]?.uint64
                    else {
                        throw FSError(EINVAL, "the dump has a malformed quota")
                    }
                    quotas.append((target, QuotaLimits(capacity: cap, inodes: ino)))
                }
            case "counters":
                guard case .object(let members) = try reader.value() else { throw FSError(EINVAL, "the dump's counters are malformed") }
                for (k, v) in members { counters[k] = v.int64 ?? 0 }
            case "summary":
                summary = try reader.value()
            default:
                _ = try reader.value()
            }
        }
        guard try reader.atEnd() else { throw FSError(EINVAL, "the dump has text after its end") }
        guard let f = format else { throw FSError(EINVAL, "the dump has no format record") }
        guard let summary, summary["inodes"]?.int64 == Int64(state.stats.inodes), summary["entries"]?.int64 == Int64(state.stats.entries) else {
            throw FSError(
                EINVAL, "the dump is incomplete: its summary does not match the \(state.stats.inodes) records read (a dump that was cut short)")
        }
        try finishLoad(&state, format: f, counters: counters, quotas: quotas, gatewaySecret: gatewaySecret, secretKey: secretKey)
        progress(state.stats)
        return state.stats
    }

    /// Refuses an engine that holds a volume (a load makes one from nothing).
    func requireEmptyForLoad() throws(FSError) {
        let occupied = try store.transaction(write: false) { (tx) throws(FSError) -> Bool in
            if try store.setting(tx, "format") != nil { return true }
            return try store.attr(tx, rootIno) != nil
        }
        if occupied {
            throw FSError(
                EEXIST,
                "\(displayName) is not empty: a dump loads only into an engine that holds no volume (a new SQLite file, an empty Redis database)")
        }
    }

    /// What every load does once its records are in: link counts from the names found, slice
    /// references, counters past every number used, the format record (last but for quotas),
    /// then the quotas (each counts what it holds).
    func finishLoad(
        _ state: inout LoadState, format: VolumeFormat, counters: [String: Int64], quotas: [(QuotaTarget, QuotaLimits)], gatewaySecret: String?,
        secretKey: String?
    ) throws(FSError) {
        var f = format
        guard state.recorded.contains(rootIno) else { throw FSError(EINVAL, "the dump has no root directory") }
        try apply(&state)
        // Link counts the names found say, where they differ from the records'.
        for (ino, n) in state.recordedLinks where state.names.count(ino) != n && state.names.count(ino) > 0 {
            state.add(.fileLinks(ino, state.names.count(ino)))
            if state.weight >= loadBatch { try apply(&state) }
        }
        for (ino, n) in state.names.more where state.recordedLinks[ino] == nil {
            state.add(.fileLinks(ino, n))
            if state.weight >= loadBatch { try apply(&state) }
        }
        for (id, n) in state.slices.more {
            state.add(.sliceRefs(id, Int64(n) - 1))
            if state.weight >= loadBatch { try apply(&state) }
        }
        try apply(&state)

        if f.secretKey == nil, let s = secretKey { f.secretKey = s }
        let shared = !state.slices.more.isEmpty
        let st = state
        try store.transaction(write: true) { (tx) throws(FSError) in
            // Past every number in use, whatever the counters said when they were read.
            // (Inode numbers stay below the trash's, 2^52; slice ids below 2^62.)
            let nextInode = max(counters["nextInode"] ?? 0, Int64(st.maxInode))
            let nextSlice = max(counters["nextSlice"] ?? 0, Int64(st.maxSlice))
            guard nextInode < Int64(Trash.base) - 1_000_000, nextSlice < Int64(1) << 62 else {
                throw FSError(EINVAL, "the dump's counters are out of range (next inode \(nextInode), next slice \(nextSlice))")
            }
            try store.add(tx, "nextInode", nextInode)
            try store.add(tx, "nextSlice", nextSlice)
            let trashIDs = st.maxTrashInode > Trash.base ? Int64(st.maxTrashInode - Trash.base - 1) : 0
            try store.add(tx, "nextTrashInode", min(max(counters["nextTrashInode"] ?? 0, trashIDs), Int64(Trash.base) - 1))
            try store.add(tx, "usedSpace", st.usedSpace)
            try store.add(tx, "usedInodes", st.usedInodes)
            try store.add(tx, "trashSpace", st.trashSpace)
            try store.add(tx, "trashInodes", st.trashInodes)
            // What the bucket held when the dump was taken (a restore over the same bucket).
            if (counters["storedCounted"] ?? 0) > 0 {
                for name in Self.storedCounters { try store.add(tx, name, counters[name] ?? 0) }
            }
            if shared { try store.setSetting(tx, "slicesShared", "1") }
            if let s = gatewaySecret { try store.setSetting(tx, "secret_gateway", s) }
            try store.setSetting(tx, "format", f.encoded())
        }
        formatSetting.withLock { $0 = (f, Sys.monotonicNanos()) }
        // Quotas last: setting one counts what it holds (`checkQuota`).
        for (target, limits) in quotas {
            if case .dir(let ino) = target, !state.directories.contains(ino) { continue }
            _ = try setQuota(target, limits)
        }
    }

    /// Takes one record of the dump: checks it and adds its changes to the batch.
    func take(_ v: JSONValue, _ s: inout LoadState) throws(FSError) {
        if let ino = v["i"]?.uint64 {
            try takeInode(ino, v, &s)
        } else if let dir = v["e"]?.uint64 {
            guard s.directories.contains(dir) else { throw FSError(EINVAL, "the dump names entries of inode \(dir) before a directory record of it") }
            var list: [([UInt8], Ino, FileType)] = []
            for e in v["n"]?.array ?? [] {
                guard let name = e[0]?.bytes, let ino = e[1]?.uint64, let t = e[2]?.string.flatMap(FileType.init(dumpLetter:)) else {
                    throw FSError(EINVAL, "the dump has a malformed entry in directory inode \(dir)")
                }
                do { try validateName(name) } catch {
                    throw FSError(EINVAL, "the dump has an invalid name in directory inode \(dir): \(String(decoding: name, as: UTF8.self))")
                }
                guard s.recorded.contains(ino) else { throw FSError(EINVAL, "the dump names inode \(ino) before its record") }
                guard (t == .directory) == s.directories.contains(ino) else {
                    throw FSError(EINVAL, "the dump names inode \(ino) as a \(t) in directory inode \(dir), but its record says otherwise")
                }
                if t == .directory {
                    // A directory has one name (and the root none).
                    guard ino != rootIno, try s.named.insert(ino) else { throw FSError(EINVAL, "the dump names directory inode \(ino) twice") }
                } else if !Trash.isTrash(dir) {
                    try s.names.add(ino)
                }
                list.append((name, ino, t))
            }
            s.stats.entries += list.count
            s.add(.entries(dir, list))
        } else if let ino = v["c"]?.uint64 {
            guard s.recorded.contains(ino) else { throw FSError(EINVAL, "the dump has chunks of inode \(ino) before its record") }
            s.add(.chunks(ino, try chunks(v["k"], of: ino, &s)))
        } else if let dir = v["z"]?.uint64, let k = v["k"]?.uint64 {
            guard s.directories.contains(dir), k < UInt64(UInt32.max - 2) else {
                throw FSError(EINVAL, "the dump ends directory inode \(dir) that it has no record of")
            }
            s.stats.directories += 1
            s.add(.dirLinks(dir, UInt32(k) + 2))
        } else {
            throw FSError(EINVAL, "the dump has a record of an unknown kind")
        }
    }

    private func takeInode(_ ino: Ino, _ v: JSONValue, _ s: inout LoadState) throws(FSError) {
        func num(_ key: String) throws(FSError) -> UInt64 {
            guard let n = v[key]?.uint64 else { throw FSError(EINVAL, "the record of inode \(ino) has no valid '\(key)'") }
            return n
        }
        func time(_ key: String) throws(FSError) -> Timespec {
            guard let sec = v[key]?[0]?.int64, let nsec = v[key]?[1]?.uint64, nsec < 1_000_000_000 else {
                throw FSError(EINVAL, "the record of inode \(ino) has no valid '\(key)'")
            }
            return Timespec(sec: sec, nsec: UInt32(nsec))
        }
        guard ino > 0, ino < Trash.base << 1, let t = v["t"]?.string.flatMap(FileType.init(dumpLetter:)) else {
            throw FSError(EINVAL, "the dump has a malformed record of inode \(ino)")
        }
        let mode = try num("m")
        let uid = try num("u")
        let gid = try num("g")
        let nlink = try num("n")
        let size = try num("s")
        let rdev = v["r"]?.uint64 ?? 0
        let parent = try num("p")
        guard mode <= 0o7777, uid <= UInt64(UInt32.max), gid <= UInt64(UInt32.max), nlink <= UInt64(UInt32.max), size <= maxFileSize,
            rdev <= UInt64(UInt32.max)
        else { throw FSError(EINVAL, "the record of inode \(ino) has a value out of range") }
        let a = Attr(
            type: t, mode: UInt16(mode), uid: UInt32(uid), gid: UInt32(gid), nlink: UInt32(nlink), size: size, atime: try time("a"),
            mtime: try time("mt"), ctime: try time("ct"), rdev: UInt32(rdev), parent: parent)
        guard try s.recorded.insert(ino) else { throw FSError(EINVAL, "the dump has two records of inode \(ino)") }
        if t == .directory { _ = try s.directories.insert(ino) }
        var xattrs: [([UInt8], [UInt8])] = []
        var xattrBytes = 0
        for x in v["x"]?.array ?? [] {
            guard let n = x[0]?.bytes, let val = x[1]?.bytes, !n.isEmpty, n.count <= 255, val.count <= 65536 else {
                throw FSError(EINVAL, "the record of inode \(ino) has a malformed extended attribute")
            }
            xattrBytes += n.count + val.count
            xattrs.append((n, val))
        }
        if xattrs.count > maxXattrsPerInode || xattrBytes > maxXattrBytesPerInode {
            throw FSError(EINVAL, "the record of inode \(ino) has more extended attributes than an inode holds")
        }
        let target = v["l"]?.bytes
        if let target, target.count > 65536 { throw FSError(EINVAL, "the record of inode \(ino) has a link target too long") }
        let list = try chunks(v["k"], of: ino, &s)
        if Trash.isTrash(ino) {
            s.maxTrashInode = max(s.maxTrashInode, ino)
        } else {
            s.maxInode = max(s.maxInode, ino)
        }
        s.usedInodes += 1
        s.usedSpace += align4K(size)
        if t == .regular && Trash.isTrash(parent) {
            s.trashInodes += 1
            s.trashSpace += target.flatMap(Trash.Origin.decode)?.counted ?? 0
        } else if t != .directory && nlink != 1 {
            s.recordedLinks[ino] = UInt32(nlink)
        }
        s.stats.inodes += 1
        if t == .regular { s.stats.bytes += size }
        s.add(.inode(ino, a, xattrs: xattrs, target: target, chunks: list))
    }

    /// A record's chunk list, checked, as the store's records.
    private func chunks(_ v: JSONValue?, of ino: Ino, _ s: inout LoadState) throws(FSError) -> [(UInt32, [UInt8])] {
        var out: [(UInt32, [UInt8])] = []
        for c in v?.array ?? [] {
            guard let idx = c[0]?.uint64, idx < maxFileSize / chunkSize, let slices = c[1]?.array else {
                throw FSError(EINVAL, "inode \(ino) has a malformed chunk in the dump")
            }
            var w = ByteWriter(capacity: slices.count * Slice.encodedSize)
            for sl in slices {
                guard let pos = sl[0]?.uint64, let id = sl[1]?.uint64, let size = sl[2]?.uint64, let off = sl[3]?.uint64, let len = sl[4]?.uint64,
                    pos <= chunkSize, size <= chunkSize, off <= chunkSize, len <= chunkSize, id < 1 << 62,
                    pos + len <= chunkSize, off + len <= size || (id == 0 && size == 0)
                else { throw FSError(EINVAL, "inode \(ino) has a malformed slice in chunk \(idx) of the dump") }
                Slice(pos: UInt32(pos), id: id, size: UInt32(size), off: UInt32(off), len: UInt32(len)).encode(into: &w)
                if id != 0 {
                    try s.slices.add(id)
                    s.maxSlice = max(s.maxSlice, id)
                }
                s.stats.slices += 1
            }
            s.stats.chunks += 1
            out.append((UInt32(idx), w.bytes))
        }
        return out
    }

    /// Writes the batch in one transaction.
    func apply(_ s: inout LoadState) throws(FSError) {
        if s.pending.isEmpty { return }
        let batch = s.pending
        try store.transaction(write: true) { (tx) throws(FSError) in
            var reads: [TxnRead] = []
            for c in batch {
                switch c {
                case .dirLinks(let ino, _), .fileLinks(let ino, _): reads.append(.attr(ino))
                // (What a store keeps of a file's chunk 0 with its attributes is read with them.)
                case .inode(let ino, _, _, _, let chunks): reads.append(chunks.first?.0 == 0 ? .chunk(ino, 0) : .attr(ino))
                default: break
                }
            }
            if !reads.isEmpty { try store.prefetch(tx, reads) }
            for c in batch {
                switch c {
                case .inode(let ino, let a, let xattrs, let target, let chunks):
                    try store.putAttr(tx, ino, a)
                    if !xattrs.isEmpty {
                        for (n, v) in xattrs { try store.putXattr(tx, ino, n, v) }
                        try store.putXattrBytes(tx, ino, xattrs.reduce(0) { $0 + $1.0.count + $1.1.count })
                    }
                    if let t = target { try store.putSymlinkTarget(tx, ino, t) }
                    for (idx, rec) in chunks { try store.appendChunk(tx, ino, idx, rec) }
                case .chunks(let ino, let chunks):
                    for (idx, rec) in chunks { try store.appendChunk(tx, ino, idx, rec) }
                case .entries(let dir, let list):
                    for (name, ino, t) in list { try store.putEntry(tx, dir, name, ino, t) }
                case .dirLinks(let ino, let n), .fileLinks(let ino, let n):
                    if var a = try store.attr(tx, ino), a.nlink != n {
                        a.nlink = n
                        try store.putAttr(tx, ino, a)
                    }
                case .sliceRefs(let id, let n):
                    try store.addSliceRefs(tx, id, n)
                }
            }
        }
        s.pending.removeAll(keepingCapacity: true)
        s.weight = 0
    }
}

/// What `stagefs dump` and `load` ask of an engine: the volume's own (never a gateway's
/// client: a dump holds every user's names and the volume's settings).
package protocol DumpAdmin: AnyObject, Sendable {
    func dump(into sink: ByteSink, keepSecrets: Bool, progress: @escaping (DumpStats) -> Void) throws(FSError) -> DumpStats
    func load(from reader: JSONReader, secretKey: String?, progress: @escaping (DumpStats) -> Void) throws(FSError) -> DumpStats
    func takeBackupLease(holder: UInt64, interval: Int64, seconds: Int64) throws(FSError) -> Bool
    func finishBackup(holder: UInt64, at: Int64?) throws(FSError)
}

extension TxnMetadata: DumpAdmin {}
