import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// The version of the dump format `dump` writes and `load` reads.
package let dumpVersion = 1

/// What a dump or a load has done so far (its progress, and its summary at the end).
package struct DumpStats: Sendable, Equatable {
    package var inodes = 0
    package var entries = 0
    package var directories = 0
    package var chunks = 0
    package var slices = 0
    /// Sum of the sizes of the regular files.
    package var bytes: UInt64 = 0
    /// What a load left out or changed, for the admin to hear.
    package var notes: [String] = []
    package init() {}
}

/// A set of numbers (inode numbers, slice ids) in pages of bits: numbers handed out from a
/// counter fill pages densely, so a volume's worth takes its counter's value / 8 bytes.
package struct SparseBitmap {
    static let pageBits: UInt64 = 1 << 15
    var pages: [UInt64: [UInt64]] = [:]
    /// Pages it may take before `insert` fails (a hostile or damaged input of scattered
    /// numbers): 262,144 pages of 4 KiB, 1 GiB.
    var maxPages = 1 << 18

    package init() {}

    /// Adds `n`; returns whether it was new.
    package mutating func insert(_ n: UInt64) throws(FSError) -> Bool {
        let p = n / SparseBitmap.pageBits
        let bit = n % SparseBitmap.pageBits
        if pages[p] == nil {
            if pages.count >= maxPages { throw FSError(EFBIG, "more than \(maxPages) pages of numbers: the numbers are too scattered") }
            pages[p] = [UInt64](repeating: 0, count: Int(SparseBitmap.pageBits / 64))
        }
        let w = Int(bit / 64)
        let mask: UInt64 = 1 << (bit % 64)
        let had = pages[p]![w] & mask != 0
        if !had { pages[p]![w] |= mask }
        return !had
    }

    package func contains(_ n: UInt64) -> Bool {
        guard let page = pages[n / SparseBitmap.pageBits] else { return false }
        let bit = n % SparseBitmap.pageBits
        return page[Int(bit / 64)] & (1 << (bit % 64)) != 0
    }
}

/// How many times each number was counted: a bit for once, a table for more (most inodes have
/// one name, most slices one record).
package struct MultiCounter {
    var once = SparseBitmap()
    package private(set) var more: [UInt64: UInt32] = [:]

    package init() {}

    package mutating func add(_ n: UInt64) throws(FSError) {
        if try once.insert(n) { return }
        more[n, default: 1] += 1
    }

    package func count(_ n: UInt64) -> UInt32 {
        if let m = more[n] { return m }
        return once.contains(n) ? 1 : 0
    }
}

/// The letters of the dump format's inode types.
extension FileType {
    var dumpLetter: StaticString {
        switch self {
        case .regular: "f"
        case .directory: "d"
        case .symlink: "l"
        case .fifo: "p"
        case .blockDevice: "b"
        case .charDevice: "c"
        case .socket: "s"
        }
    }

    init?(dumpLetter: String) {
        switch dumpLetter {
        case "f": self = .regular
        case "d": self = .directory
        case "l": self = .symlink
        case "p": self = .fifo
        case "b": self = .blockDevice
        case "c": self = .charDevice
        case "s": self = .socket
        default: return nil
        }
    }
}

/// Entries of a directory read in one step of a dump.
let dumpPage = 500
/// Chunks of one file read with its record; a longer file goes on in steps of `chunkBatch`.
let dumpFirstChunks = 16

extension TxnMetadata {
    /// Writes the whole volume to `sink` as the dump format (README "Dump and load"): the
    /// format record (the secret key and the volume's own secrets only with `keepSecrets`),
    /// every inode reachable from the root and the trash once (attributes, extended
    /// attributes, link targets, chunks and slices), directory entries (hard links as further
    /// names), quotas and counters. Sessions, open files, locks, reservations and deletions
    /// waiting are not part of it.
    /// A store that can (`TxnStore.snapshotReads`: SQLite) reads everything in one read
    /// transaction, a consistent snapshot; others read in bounded steps (a page of a directory
    /// with its inodes each), so a dump of a live volume shows each directory page as it was at
    /// one moment; an inode is written once even when a rename moves it during the dump.
    /// Memory: the directories waiting to be read, one page, and a bit per inode number.
    package func dump(into sink: ByteSink, keepSecrets: Bool, progress: @escaping (DumpStats) -> Void = { _ in }) throws(FSError) -> DumpStats {
        var walk = DumpWalk(meta: self, sink: sink, keepSecrets: keepSecrets, progress: progress)
        if store.snapshotReads {
            try store.transaction(write: false) { (tx) throws(FSError) -> Void in
                try walk.run { (body) throws(FSError) in try body(tx) }
            }
        } else {
            try walk.run { (body) throws(FSError) in try store.transaction(write: false, body) }
        }
        return walk.stats
    }
}

/// One dump in progress (`TxnMetadata.dump`).
struct DumpWalk<S: TxnStore> {
    let meta: TxnMetadata<S>
    let sink: ByteSink
    let keepSecrets: Bool
    let progress: (DumpStats) -> Void
    var stats = DumpStats()
    /// Inodes whose record was written.
    var written = SparseBitmap()
    /// Directories whose entries are still to be read.
    var waiting: [Ino] = []
    var firstRecord = true
    var lastProgress: UInt64 = 0

    init(meta: TxnMetadata<S>, sink: ByteSink, keepSecrets: Bool, progress: @escaping (DumpStats) -> Void) {
        self.meta = meta
        self.sink = sink
        self.keepSecrets = keepSecrets
        self.progress = progress
    }

    var store: S { meta.store }

    typealias Step = ((S.Txn) throws(FSError) -> Void) throws(FSError) -> Void

    mutating func run(_ step: Step) throws(FSError) {
        let started = Timespec.now()
        // The head: the format record, as the volume's settings.
        var head: [UInt8] = []
        var format: VolumeFormat?
        var secret: String?
        var rootAttr: Attr?
        try step { (tx) throws(FSError) in
            format = try store.setting(tx, "format").map { (t) throws(FSError) in try VolumeFormat.decode(t) }
            secret = try store.setting(tx, "secret_gateway")
            rootAttr = try store.attr(tx, rootIno)
        }
        guard var f = format, let root = rootAttr else { throw FSError(EINVAL, "\(store.displayName) holds no StageFS volume") }
        if !keepSecrets { f.secretKey = nil }
        JSONText.raw("{\"stagefs_dump\":{\"version\":", into: &head)
        JSONText.number(dumpVersion, into: &head)
        JSONText.raw(",\"volume\":", into: &head)
        JSONText.string(f.name, into: &head)
        JSONText.raw(",\"uuid\":", into: &head)
        JSONText.string(f.uuid, into: &head)
        JSONText.raw(",\"engine\":", into: &head)
        JSONText.string(store.displayName, into: &head)
        JSONText.raw(",\"started\":", into: &head)
        JSONText.number(started.sec, into: &head)
        JSONText.raw(",\"snapshot\":", into: &head)
        JSONText.raw(store.snapshotReads ? "true" : "false", into: &head)
        JSONText.raw(",\"secrets\":", into: &head)
        JSONText.raw(keepSecrets ? "true" : "false", into: &head)
        JSONText.raw("},\n\"format\":", into: &head)
        head.append(contentsOf: Array(f.encoded().utf8))
        if keepSecrets, let s = secret {
            JSONText.raw(",\n\"gateway_secret\":", into: &head)
            JSONText.string(s, into: &head)
        }
        JSONText.raw(",\n\"records\":[\n", into: &head)
        try sink.write(head)

        var out: [UInt8] = []
        try record(rootIno, root, parent: rootIno, xattrs: try xattrsOf([rootIno], step)[rootIno] ?? [], target: nil, chunks: [], into: &out)
        _ = try written.insert(rootIno)
        try sink.write(out)
        waiting.append(rootIno)
        while let dir = waiting.popLast() {
            try directory(dir, step)
        }

        // The tail: quotas and counters, read after the walk (every id the records hold is
        // below the counters then).
        var tail: [UInt8] = []
        JSONText.raw("\n],\n\"quotas\":[", into: &tail)
        var counters: [(String, Int64)] = []
        var quotas: [(String, QuotaLimits)] = []
        try step { (tx) throws(FSError) in
            counters = []
            quotas = []
            for name in ["nextInode", "nextSlice", "nextTrashInode", "usedSpace", "usedInodes", "trashSpace", "trashInodes"]
                + TxnMetadata<S>.storedCounters
            {
                counters.append((name, try store.counter(tx, name)))
            }
            for key in try meta.quotaList(tx) {
                if let l = try meta.quotaLimits(tx, key) { quotas.append((key, l)) }
            }
        }
        for (i, (key, l)) in quotas.enumerated() {
            if i > 0 { tail.append(UInt8(ascii: ",")) }
            JSONText.raw("\n{\"key\":", into: &tail)
            JSONText.string(key, into: &tail)
            JSONText.raw(",\"capacity\":", into: &tail)
            JSONText.number(l.capacity, into: &tail)
            JSONText.raw(",\"inodes\":", into: &tail)
            JSONText.number(l.inodes, into: &tail)
            tail.append(UInt8(ascii: "}"))
        }
        JSONText.raw("],\n\"counters\":{", into: &tail)
        for (i, (name, v)) in counters.enumerated() {
            if i > 0 { tail.append(UInt8(ascii: ",")) }
            JSONText.string(name, into: &tail)
            tail.append(UInt8(ascii: ":"))
            JSONText.number(v, into: &tail)
        }
        JSONText.raw("},\n\"summary\":{\"inodes\":", into: &tail)
        JSONText.number(stats.inodes, into: &tail)
        JSONText.raw(",\"entries\":", into: &tail)
        JSONText.number(stats.entries, into: &tail)
        JSONText.raw(",\"chunks\":", into: &tail)
        JSONText.number(stats.chunks, into: &tail)
        JSONText.raw(",\"slices\":", into: &tail)
        JSONText.number(stats.slices, into: &tail)
        JSONText.raw(",\"bytes\":", into: &tail)
        JSONText.number(stats.bytes, into: &tail)
        JSONText.raw(",\"finished\":", into: &tail)
        JSONText.number(Timespec.now().sec, into: &tail)
        JSONText.raw("}}\n", into: &tail)
        try sink.write(tail)
        try sink.finish()
        progress(stats)
    }

    /// Writes the entries of directory `dir` (whose record is written) page by page, each page
    /// with the records of the inodes it names that were not written yet.
    mutating func directory(_ dir: Ino, _ step: Step) throws(FSError) {
        var cookie: UInt64 = 0
        var subdirs = 0
        while true {
            var page: [DirEntry] = []
            var news: [(Ino, Attr)] = []
            var xattrs: [Ino: [([UInt8], [UInt8])]] = [:]
            var targets: [Ino: [UInt8]] = [:]
            var chunks: [Ino: [(UInt32, [UInt8])]] = [:]
            let written = self.written
            try step { (tx) throws(FSError) in
                (page, news, xattrs, targets, chunks) = ([], [], [:], [:], [:])
                try store.prefetch(tx, [.entries(dir, after: cookie, limit: dumpPage, plus: true, xattrs: true)])
                page = try store.entries(tx, dir, after: cookie, limit: dumpPage)
                try store.prefetch(tx, page.map { .attr($0.ino) })
                var seenHere = Set<Ino>()
                for i in page.indices {
                    page[i].attr = try store.attr(tx, page[i].ino)
                    if let a = page[i].attr, !written.contains(page[i].ino), seenHere.insert(page[i].ino).inserted {
                        news.append((page[i].ino, a))
                    }
                }
                var reads: [TxnRead] = []
                for (ino, a) in news {
                    reads.append(.xattrCount(ino))
                    if a.type == .regular { reads.append(.chunkList(ino, from: 0, limit: dumpFirstChunks)) }
                    if a.type == .symlink || (a.type == .regular && Trash.isTrash(a.parent)) { reads.append(.symlink(ino)) }
                }
                try store.prefetch(tx, reads)
                var withXattrs: [Ino] = []
                for (ino, a) in news {
                    if try store.xattrCount(tx, ino) > 0 { withXattrs.append(ino) }
                    if a.type == .symlink || (a.type == .regular && Trash.isTrash(a.parent)) {
                        if let t = try store.symlinkTarget(tx, ino) { targets[ino] = t }
                    }
                    if a.type == .regular {
                        var list: [(UInt32, [UInt8])] = []
                        for idx in try store.chunkIndexes(tx, ino, from: 0, limit: dumpFirstChunks, descending: false) {
                            list.append((idx, try store.chunk(tx, ino, idx)))
                        }
                        chunks[ino] = list
                    }
                }
                xattrs = try readXattrs(tx, withXattrs)
            }
            var out: [UInt8] = []
            var names: [DirEntry] = []
            // (A long file goes on after the last of its first chunks: indexes may be sparse.)
            var longFiles: [(Ino, UInt32)] = []
            for (ino, a) in news {
                var a = a
                // A directory's parent is the directory the dump found it in.
                if a.type == .directory { a.parent = dir }
                let list = chunks[ino] ?? []
                try record(ino, a, parent: a.parent, xattrs: xattrs[ino] ?? [], target: targets[ino], chunks: list, into: &out)
                _ = try self.written.insert(ino)
                if a.type == .directory { waiting.append(ino) }
                if list.count == dumpFirstChunks, let last = list.last?.0, last < UInt32.max { longFiles.append((ino, last + 1)) }
            }
            let newInodes = Set(news.map { $0.0 })
            var named = Set<Ino>()
            for e in page {
                guard let a = e.attr else { continue }
                let firstName = newInodes.contains(e.ino) && named.insert(e.ino).inserted
                // Another name of an inode with one link, or of a directory, is what a rename
                // during the dump left: the inode was written under its first.
                if !firstName && (a.type == .directory || a.nlink <= 1) { continue }
                names.append(e)
                if a.type == .directory { subdirs += 1 }
            }
            if !names.isEmpty { entriesLine(dir, names, into: &out) }
            try sink.write(out)
            for (ino, next) in longFiles { try moreChunks(ino, from: next, step) }
            tick()
            guard let last = page.last, page.count == dumpPage else { break }
            cookie = last.cookie
        }
        var out: [UInt8] = []
        JSONText.raw(",\n{\"z\":", into: &out)
        JSONText.number(dir, into: &out)
        JSONText.raw(",\"k\":", into: &out)
        JSONText.number(subdirs, into: &out)
        out.append(UInt8(ascii: "}"))
        try sink.write(out)
        stats.directories += 1
    }

    /// The chunks of a long file after the first `dumpFirstChunks`, `chunkBatch` a step.
    mutating func moreChunks(_ ino: Ino, from start: UInt32, _ step: Step) throws(FSError) {
        var from = start
        while true {
            var list: [(UInt32, [UInt8])] = []
            try step { (tx) throws(FSError) in
                list = []
                try store.prefetch(tx, [.chunkList(ino, from: from, limit: chunkBatch)])
                for idx in try store.chunkIndexes(tx, ino, from: from, limit: chunkBatch, descending: false) {
                    list.append((idx, try store.chunk(tx, ino, idx)))
                }
            }
            if list.isEmpty { return }
            var out: [UInt8] = []
            JSONText.raw(",\n{\"c\":", into: &out)
            JSONText.number(ino, into: &out)
            JSONText.raw(",\"k\":", into: &out)
            chunkList(list, into: &out)
            out.append(UInt8(ascii: "}"))
            try sink.write(out)
            if list.count < chunkBatch || list.last!.0 == UInt32.max { return }
            from = list.last!.0 + 1
        }
    }

    func readXattrs(_ tx: S.Txn, _ inos: [Ino]) throws(FSError) -> [Ino: [([UInt8], [UInt8])]] {
        var out: [Ino: [([UInt8], [UInt8])]] = [:]
        for ino in inos {
            let names = try store.xattrNames(tx, ino)
            try store.prefetch(tx, names.map { .xattr(ino, $0) })
            var list: [([UInt8], [UInt8])] = []
            for n in names {
                if let v = try store.xattr(tx, ino, n) { list.append((n, v)) }
            }
            out[ino] = list
        }
        return out
    }

    func xattrsOf(_ inos: [Ino], _ step: Step) throws(FSError) -> [Ino: [([UInt8], [UInt8])]] {
        var out: [Ino: [([UInt8], [UInt8])]] = [:]
        try step { (tx) throws(FSError) in out = try readXattrs(tx, inos) }
        return out
    }

    mutating func tick() {
        let now = Sys.monotonicNanos()
        if now - lastProgress > 500_000_000 {
            lastProgress = now
            progress(stats)
        }
    }

    /// One inode's record line.
    mutating func record(
        _ ino: Ino, _ a: Attr, parent: Ino, xattrs: [([UInt8], [UInt8])], target: [UInt8]?, chunks: [(UInt32, [UInt8])], into out: inout [UInt8]
    ) throws(FSError) {
        if !firstRecord { out.append(UInt8(ascii: ",")) }
        if !firstRecord { out.append(10) }
        firstRecord = false
        JSONText.raw("{\"i\":", into: &out)
        JSONText.number(ino, into: &out)
        JSONText.raw(",\"t\":\"", into: &out)
        JSONText.raw(a.type.dumpLetter, into: &out)
        JSONText.raw("\",\"m\":", into: &out)
        JSONText.number(a.mode, into: &out)
        JSONText.raw(",\"u\":", into: &out)
        JSONText.number(a.uid, into: &out)
        JSONText.raw(",\"g\":", into: &out)
        JSONText.number(a.gid, into: &out)
        JSONText.raw(",\"n\":", into: &out)
        JSONText.number(a.nlink, into: &out)
        JSONText.raw(",\"s\":", into: &out)
        JSONText.number(a.size, into: &out)
        for (key, t) in [(",\"a\":[", a.atime), (",\"mt\":[", a.mtime), (",\"ct\":[", a.ctime)] as [(StaticString, Timespec)] {
            JSONText.raw(key, into: &out)
            JSONText.number(t.sec, into: &out)
            out.append(UInt8(ascii: ","))
            JSONText.number(t.nsec, into: &out)
            out.append(UInt8(ascii: "]"))
        }
        if a.rdev != 0 {
            JSONText.raw(",\"r\":", into: &out)
            JSONText.number(a.rdev, into: &out)
        }
        JSONText.raw(",\"p\":", into: &out)
        JSONText.number(parent, into: &out)
        if !xattrs.isEmpty {
            JSONText.raw(",\"x\":[", into: &out)
            for (i, (n, v)) in xattrs.enumerated() {
                if i > 0 { out.append(UInt8(ascii: ",")) }
                out.append(UInt8(ascii: "["))
                JSONText.bytes(n, into: &out)
                out.append(UInt8(ascii: ","))
                JSONText.bytes(v, into: &out)
                out.append(UInt8(ascii: "]"))
            }
            out.append(UInt8(ascii: "]"))
        }
        if let t = target {
            JSONText.raw(",\"l\":", into: &out)
            JSONText.bytes(t, into: &out)
        }
        if !chunks.isEmpty {
            JSONText.raw(",\"k\":", into: &out)
            chunkList(chunks, into: &out)
        }
        out.append(UInt8(ascii: "}"))
        stats.inodes += 1
        if a.type == .regular { stats.bytes += a.size }
    }

    /// `[[index,[[pos,id,size,off,len],...]],...]`, oldest slice first.
    mutating func chunkList(_ chunks: [(UInt32, [UInt8])], into out: inout [UInt8]) {
        out.append(UInt8(ascii: "["))
        for (i, (idx, recs)) in chunks.enumerated() {
            if i > 0 { out.append(UInt8(ascii: ",")) }
            out.append(UInt8(ascii: "["))
            JSONText.number(idx, into: &out)
            JSONText.raw(",[", into: &out)
            for (j, s) in Slice.decodeAll(recs).enumerated() {
                if j > 0 { out.append(UInt8(ascii: ",")) }
                out.append(UInt8(ascii: "["))
                for (k, v) in [UInt64(s.pos), s.id, UInt64(s.size), UInt64(s.off), UInt64(s.len)].enumerated() {
                    if k > 0 { out.append(UInt8(ascii: ",")) }
                    JSONText.number(v, into: &out)
                }
                out.append(UInt8(ascii: "]"))
                stats.slices += 1
            }
            JSONText.raw("]]", into: &out)
            stats.chunks += 1
        }
        out.append(UInt8(ascii: "]"))
    }

    /// `{"e":dir,"n":[[name,ino,type],...]}`
    mutating func entriesLine(_ dir: Ino, _ names: [DirEntry], into out: inout [UInt8]) {
        JSONText.raw(",\n{\"e\":", into: &out)
        JSONText.number(dir, into: &out)
        JSONText.raw(",\"n\":[", into: &out)
        for (i, e) in names.enumerated() {
            if i > 0 { out.append(UInt8(ascii: ",")) }
            out.append(UInt8(ascii: "["))
            JSONText.bytes(e.name, into: &out)
            out.append(UInt8(ascii: ","))
            JSONText.number(e.ino, into: &out)
            JSONText.raw(",\"", into: &out)
            JSONText.raw(e.type.dumpLetter, into: &out)
            JSONText.raw("\"]", into: &out)
        }
        JSONText.raw("]}", into: &out)
        stats.entries += names.count
    }
}
