import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// What `fsck` is to do.
package struct FsckOptions {
    /// Repair what can be repaired (else only report).
    package var repair = false
    /// Check only this directory's tree (nil: the whole volume, with the scans of every inode,
    /// the counters, quotas and sessions).
    package var top: Ino?
    /// Sessions silent longer than this are stale (their client is gone).
    package var staleAge: Int64 = 300
    /// The object keys of `slice` that are missing from the bucket (nil: not checked).
    package var missingObjects: ((Slice) throws(FSError) -> [String])?
    /// Check one slice in `sampleEvery` (1: every slice).
    package var sampleEvery = 100
    package var progress: (FsckReport) -> Void = { _ in }

    package init() {}
}

/// What `fsck` found and did.
package struct FsckReport: Sendable {
    /// One line per problem (the first 10,000; `count` counts them all).
    package var problems: [String] = []
    package var count = 0
    package var repaired = 0
    /// Problems left unrepaired because clients were connected (repairs that count what may
    /// change while it is counted: link counts, usage, quotas, references going down).
    package var deferred = 0
    package var directories = 0
    package var inodes = 0
    package var slicesChecked = 0
    package init() {}

    mutating func problem(_ s: String) {
        count += 1
        if problems.count < 10_000 { problems.append(s) }
    }
}

/// A repair fsck makes, each checked again in its own transaction (the volume may be live).
enum FsckRepair {
    /// An entry naming an inode that does not exist.
    case dropEntry(dir: Ino, name: [UInt8], ino: Ino)
    case entryType(dir: Ino, name: [UInt8], ino: Ino, type: FileType)
    case parent(ino: Ino, dir: Ino)
    case links(ino: Ino, nlink: UInt32)
    /// A file with no link, no open and not in the trash: freed.
    case free(ino: Ino)
    /// An inode with links that no directory names: given a name in `/lost+found`.
    case lostFound(ino: Ino)
}

extension TxnMetadata {
    /// Checks the volume (README "fsck"): directory entries against the inodes they name,
    /// link counts, directories' parents; then, for the whole volume, every inode (leaked ones:
    /// no name, no open; slices past the id counter; objects of sampled slices missing), the
    /// usage counters, the trash's counters, shared slices' references, quotas and stale
    /// sessions. With `repair`, fixes each in a transaction that checks it again first. In
    /// bounded steps: a page of a directory or of the inode scan at a time.
    package func fsck(_ o: FsckOptions) throws(FSError) -> FsckReport {
        var r = FsckReport()
        var names = MultiCounter()
        var reached = SparseBitmap()
        let now = Timespec.now().sec
        let whole = o.top == nil
        var live = 0
        if whole {
            // Stale sessions first: ending them frees what they held open after its unlink.
            for s in try listSessions() {
                guard s.heartbeat < now - o.staleAge else {
                    live += 1
                    continue
                }
                r.problem(
                    "session \(s.sid) (\(s.hostname), pid \(s.pid), \(s.mountPoint)) has been silent for \(now - s.heartbeat) s: its client is gone")
                if o.repair {
                    try closeSession(s.sid)
                    r.repaired += 1
                }
            }
        } else {
            live = try listSessions().filter { $0.heartbeat >= now - o.staleAge }.count
        }
        // What is counted across many steps changes under connected clients: such repairs wait
        // for a quiet volume.
        let quiet = live == 0
        // The tree.
        let top = o.top ?? rootIno
        _ = try reached.insert(top)
        var waiting: [(Ino, String)] = [(top, "/")]
        while let (dir, path) = waiting.popLast() {
            var cookie: UInt64 = 0
            var subdirs: UInt32 = 0
            var dirAttr: Attr?
            while true {
                var page: [DirEntry] = []
                try store.transaction(write: false) { (tx) throws(FSError) in
                    try store.prefetch(tx, [.attr(dir), .entries(dir, after: cookie, limit: dumpPage, plus: true, xattrs: false)])
                    if cookie == 0 { dirAttr = try store.attr(tx, dir) }
                    page = try store.entries(tx, dir, after: cookie, limit: dumpPage)
                    try store.prefetch(tx, page.map { .attr($0.ino) })
                    for i in page.indices { page[i].attr = try store.attr(tx, page[i].ino) }
                }
                if dirAttr == nil { break }
                var repairs: [FsckRepair] = []
                for e in page {
                    let p = (path == "/" ? "/" : path + "/") + String(decoding: e.name, as: UTF8.self)
                    guard let a = e.attr else {
                        r.problem("\(p) names inode \(e.ino), which does not exist")
                        repairs.append(.dropEntry(dir: dir, name: e.name, ino: e.ino))
                        continue
                    }
                    if a.type != e.type {
                        r.problem("\(p) says inode \(e.ino) is a \(e.type), but it is a \(a.type)")
                        repairs.append(.entryType(dir: dir, name: e.name, ino: e.ino, type: a.type))
                    }
                    if a.type == .directory {
                        guard try reached.insert(e.ino) else {
                            r.problem("\(p) is another name of directory inode \(e.ino)")
                            continue
                        }
                        subdirs += 1
                        if a.parent != dir {
                            r.problem("directory \(p) (inode \(e.ino)) records parent \(a.parent), but is in inode \(dir)")
                            repairs.append(.parent(ino: e.ino, dir: dir))
                        }
                        waiting.append((e.ino, p))
                    } else {
                        _ = try reached.insert(e.ino)
                        if !Trash.isTrash(dir) { try names.add(e.ino) }
                    }
                }
                if o.repair { try apply(repairs, &r, quiet: quiet) }
                r.inodes += page.count
                o.progress(r)
                guard let last = page.last, page.count == dumpPage else { break }
                cookie = last.cookie
            }
            r.directories += 1
            if let a = dirAttr, a.nlink != 2 + subdirs {
                r.problem("directory \(path) (inode \(dir)) has link count \(a.nlink), but \(2 + subdirs) by its subdirectories")
                if o.repair { try apply([.links(ino: dir, nlink: 2 + subdirs)], &r, quiet: quiet) }
            }
        }
        guard whole else { return r }

        // Every inode.
        var space: Int64 = 0
        var inodes: Int64 = 0
        var trashSpace: Int64 = 0
        var trashInodes: Int64 = 0
        var records = MultiCounter()
        var scanned = SparseBitmap()
        var maxSlice: UInt64 = 0
        var maxInode: Ino = 0
        var sampler = UInt64(truncatingIfNeeded: Timespec.now().nsec) | 1
        var cursor: UInt64 = 0
        while true {
            var origins: [Ino: Trash.Origin] = [:]
            var open = Set<Ino>()
            let page = try inodePage(
                cursor: cursor,
                extra: { ino, a in
                    a.type != .regular ? [] : (Trash.isTrash(a.parent) ? [.symlink(ino)] : []) + (a.nlink == 0 ? [.isOpen(ino)] : [])
                },
                more: { (tx, ino, a) throws(FSError) in
                    guard a.type == .regular else { return }
                    if Trash.isTrash(a.parent), let t = try store.symlinkTarget(tx, ino), let origin = Trash.Origin.decode(t) {
                        origins[ino] = origin
                    }
                    if a.nlink == 0, try store.isOpen(tx, ino) { open.insert(ino) }
                })
            let chunks = page.slices
            var repairs: [FsckRepair] = []
            for (ino, a) in page.inodes {
                // (Redis's SCAN may return an inode twice.)
                guard try scanned.insert(ino) else { continue }
                if !Trash.isTrash(ino) { maxInode = max(maxInode, ino) }
                inodes += 1
                space += align4K(a.size)
                let inTrash = a.type == .regular && Trash.isTrash(a.parent)
                if inTrash {
                    trashInodes += 1
                    trashSpace += origins[ino]?.counted ?? 0
                }
                if reached.contains(ino) {
                    if a.type != .directory && !inTrash && names.count(ino) != a.nlink {
                        r.problem("inode \(ino) has link count \(a.nlink), but \(names.count(ino)) name(s)")
                        repairs.append(.links(ino: ino, nlink: names.count(ino)))
                    }
                } else if a.type == .regular && a.nlink == 0 && !inTrash {
                    if !open.contains(ino) {
                        r.problem("inode \(ino) has no link, is open nowhere and is not in the trash: its space (\(humanBytes(a.size))) leaked")
                        repairs.append(.free(ino: ino))
                    }
                } else if try !namedIn(a.parent == 0 ? rootIno : a.parent, ino) {
                    r.problem("inode \(ino) (a \(a.type), \(a.nlink) link(s)) is named by no directory")
                    repairs.append(.lostFound(ino: ino))
                }
                for s in chunks[ino] ?? [] where s.id != 0 {
                    try records.add(s.id)
                    maxSlice = max(maxSlice, s.id)
                    if let check = o.missingObjects {
                        sampler = sampler &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
                        if o.sampleEvery <= 1 || (sampler >> 33) % UInt64(o.sampleEvery) == 0 {
                            r.slicesChecked += 1
                            for key in try check(s) { r.problem("inode \(ino): object \(key) of slice \(s.id) is missing from the bucket") }
                        }
                    }
                }
            }
            if o.repair { try apply(repairs, &r, quiet: quiet) }
            o.progress(r)
            guard let n = page.next else { break }
            cursor = n
        }

        // The id counters must stay ahead of every number in use (a new write would reuse it).
        for (name, highest) in [("nextSlice", maxSlice), ("nextInode", maxInode)] {
            let counter = try store.transaction(write: false) { (tx) throws(FSError) in try store.counter(tx, name) }
            if Int64(clamping: highest) > counter {
                r.problem("numbers up to \(highest) are in use, past the counter \(name) (\(counter)): new ones would reuse them")
                if o.repair {
                    try store.transaction(write: true) { (tx) throws(FSError) in
                        let now = try store.counter(tx, name)
                        if Int64(clamping: highest) > now { try store.add(tx, name, Int64(clamping: highest) - now) }
                    }
                    r.repaired += 1
                }
            }
        }

        // Shared slices' references: records beyond the first.
        // (Read 1,000 a step: one round trip each on Redis, not one a slice.)
        let shared = Array(records.more)
        for start in stride(from: 0, to: shared.count, by: 1000) {
            let part = shared[start..<min(start + 1000, shared.count)]
            let counted = try store.transaction(write: false) { (tx) throws(FSError) -> [Int64] in
                try store.prefetch(tx, part.map { .sliceRefs($0.key) })
                var out: [Int64] = []
                for (id, _) in part { out.append(try store.sliceRefs(tx, id)) }
                return out
            }
            for ((id, n), refs) in zip(part, counted) where refs != Int64(n) - 1 {
                r.problem("slice \(id) has \(n) records but \(refs) reference(s) counted beyond the first")
                // (Fewer references than records would let its objects go while a record is
                // left: raised at once; lowered only on a quiet volume.)
                if o.repair && !quiet && refs > Int64(n) - 1 {
                    r.deferred += 1
                } else if o.repair {
                    try store.transaction(write: true) { (tx) throws(FSError) in
                        try store.addSliceRefs(tx, id, Int64(n) - 1 - (try store.sliceRefs(tx, id)))
                    }
                    r.repaired += 1
                }
            }
        }

        // The usage counters (exact on a quiet volume; changes during the check show here).
        let totals: [(String, Int64)] = [("usedSpace", space), ("usedInodes", inodes), ("trashSpace", trashSpace), ("trashInodes", trashInodes)]
        for (name, value) in totals {
            let recorded = try store.transaction(write: false) { (tx) throws(FSError) in try store.counter(tx, name) }
            if recorded != value {
                r.problem("the counter \(name) says \(recorded), the inodes add up to \(value)")
                if o.repair && !quiet {
                    r.deferred += 1
                } else if o.repair {
                    try store.transaction(write: true) { (tx) throws(FSError) in try store.add(tx, name, value - recorded) }
                    r.repaired += 1
                }
            }
        }

        // Quotas.
        for q in try quotas() {
            let c = try checkQuota(q.target, repair: o.repair && quiet)
            if c.recorded != c.counted {
                r.problem(
                    "\(q.target) records \(c.recorded.space) bytes and \(c.recorded.inodes) inodes, its tree holds \(c.counted.space) bytes and \(c.counted.inodes) inodes"
                )
                if o.repair && quiet { r.repaired += 1 } else if o.repair { r.deferred += 1 }
            }
        }
        return r
    }

    /// Whether directory `dir` has an entry naming `ino` (read a page at a time).
    private func namedIn(_ dir: Ino, _ ino: Ino) throws(FSError) -> Bool {
        var cookie: UInt64 = 0
        while true {
            let page = try store.transaction(write: false) { (tx) throws(FSError) in try store.entries(tx, dir, after: cookie, limit: 1000) }
            if page.contains(where: { $0.ino == ino }) { return true }
            guard let last = page.last, page.count == 1000 else { return false }
            cookie = last.cookie
        }
    }

    private func apply(_ repairs: [FsckRepair], _ r: inout FsckReport, quiet: Bool) throws(FSError) {
        for rep in repairs {
            switch rep {
            case .links, .parent, .lostFound:
                if !quiet {
                    r.deferred += 1
                    continue
                }
            default: break
            }
            let done = try store.transaction(write: true) { (tx) throws(FSError) -> Bool in
                switch rep {
                case .dropEntry(let dir, let name, let ino):
                    guard let (i, _) = try store.entry(tx, dir, name), i == ino, try store.attr(tx, ino) == nil else { return false }
                    try store.deleteEntry(tx, dir, name)
                    return true
                case .entryType(let dir, let name, let ino, let type):
                    guard let (i, t) = try store.entry(tx, dir, name), i == ino, t != type, try store.attr(tx, ino)?.type == type else {
                        return false
                    }
                    try store.putEntry(tx, dir, name, ino, type)
                    return true
                case .parent(let ino, let dir):
                    guard var a = try store.attr(tx, ino), a.parent != dir else { return false }
                    a.parent = dir
                    try store.putAttr(tx, ino, a)
                    return true
                case .links(let ino, let n):
                    guard var a = try store.attr(tx, ino), a.nlink != n else { return false }
                    a.nlink = n
                    try store.putAttr(tx, ino, a)
                    return true
                case .free(let ino):
                    return try freeIfUnused(tx, ino)
                case .lostFound(let ino):
                    guard var a = try store.attr(tx, ino) else { return false }
                    let lf = try lostAndFound(tx)
                    let name = Array("#\(ino)".utf8)
                    if try store.entry(tx, lf, name) != nil { return false }
                    try store.putEntry(tx, lf, name, ino, a.type)
                    var la = try store.attr(tx, lf)!
                    if a.type == .directory {
                        a.parent = lf
                        la.nlink += 1
                    } else if a.nlink == 0 {
                        a.nlink = 1
                    }
                    try store.putAttr(tx, ino, a)
                    try store.putAttr(tx, lf, la)
                    return true
                }
            }
            if done { r.repaired += 1 }
        }
    }

    /// `/lost+found` (root's, mode 0700), made when missing.
    private func lostAndFound(_ tx: S.Txn) throws(FSError) -> Ino {
        let name = Array("lost+found".utf8)
        if let (ino, t) = try store.entry(tx, rootIno, name), t == .directory { return ino }
        let ino = try store.newInode(tx)
        let now = Timespec.now()
        try store.putAttr(
            tx, ino, Attr(type: .directory, mode: 0o700, uid: 0, gid: 0, nlink: 2, size: 4096, atime: now, mtime: now, ctime: now, parent: rootIno))
        try store.putEntry(tx, rootIno, name, ino, .directory)
        guard var root = try store.attr(tx, rootIno) else { throw FSError.notFound }
        root.nlink += 1
        try store.putAttr(tx, rootIno, root)
        try store.add(tx, "usedInodes", 1)
        try store.add(tx, "usedSpace", 4096)
        return ino
    }
}

/// What `stagefs fsck` asks of an engine (the volume's own).
package protocol FsckAdmin: AnyObject, Sendable {
    func fsck(_ o: FsckOptions) throws(FSError) -> FsckReport
}

extension TxnMetadata: FsckAdmin {}
