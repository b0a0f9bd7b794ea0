import DataPath
import Metadata
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// Settings of one client of a volume.
public struct VFSConfig: Sendable {
    public var readOnly = false
    /// Seconds between session heartbeats.
    public var heartbeat: Double = 10
    /// Sessions silent for longer than this many seconds are cleaned up (their open files and locks released).
    public var sessionTimeout: Int64 = 60
    public var mountPoint = ""
    public var version = "0"
    /// Seconds attributes, file entries and directory entries are remembered in the client.
    public var attrCache: Double = 1
    public var entryCache: Double = 1
    public var dirEntryCache: Double = 1
    /// The directory the mount shows as its root (`mount --subdir`): the volume's root by default.
    public var top: Ino = rootIno
    /// Whether extended attributes are served (`mount --no-xattr` turns them off): when they
    /// are, a listing asks whether each entry has any, so that lookups of absent ones need no
    /// round trip.
    public var xattrs = true

    public init() {}
}

/// POSIX semantics for one client: metadata operations with the caller's credential, open
/// files with write buffers and read-ahead, sessions with heartbeats, locks, and background
/// flushing and deletion. The FUSE adapter and (later) staging call it.
public final class VFS: Sendable {
    public let meta: any MetadataEngine
    public let data: DataStore
    public let config: VFSConfig
    private let session: SessionKeeper
    /// This client's session id (it changes if the session had to be registered again).
    public var sid: UInt64 { session.sid }
    private let files = OpenFiles()
    private let kernel = KernelInodes()
    private let reservations = Reservations()
    private let xattrs: XattrAbsence
    /// Lock waiters of this client, woken by its releases.
    private let lockWaits = LockWaits()
    private let background: Background
    private let cache: MetaCache
    /// The next page of the directories being listed, read ahead (with the client cache only).
    private let listings: DirReadahead
    /// Compacts chunks fragmented by many writes (nil: read-only, or through a gateway).
    private let compactor: Compactor?

    // The kernel's root inode (1) is the mount's top directory: the volume's root, or with
    // `--subdir` that directory, whose ".." is itself. Nothing outside it is ever named to the
    // kernel (no hard links of directories; "." and ".." are mapped here).

    //
    // A file in the trash is named to the kernel through the trash by another number, its
    // inode plus 2^62 (inodes stay below 2^53): the kernel keeps one inode per number, and a
    // name another client removed, still in this kernel's entry cache, must not reach the
    // trashed file as if it were still named (`named`), while the trash's own entry must.

    static let trashAlias: Ino = 1 << 62

    /// The volume's inode for an inode number the kernel sent.
    private func inVolume(_ ino: Ino) -> Ino { ino == rootIno ? config.top : ino & ~Self.trashAlias }

    /// The number the kernel knows a volume inode by (`inTrash`: named by an entry of the trash).
    private func forKernel(_ ino: Ino, inTrash: Bool = false) -> Ino { ino == config.top ? rootIno : (inTrash ? ino | Self.trashAlias : ino) }

    /// Whether the kernel named a file through the trash (`forKernel(_:inTrash:)`).
    private func viaTrash(_ kernelIno: Ino) -> Bool { kernelIno != rootIno && kernelIno & Self.trashAlias != 0 }

    public init(meta: any MetadataEngine, data: DataStore, config: VFSConfig) {
        self.meta = meta
        self.data = data
        self.config = config
        cache = MetaCache(
            attrTTL: config.attrCache, entryTTL: config.entryCache, dirEntryTTL: config.dirEntryCache,
            clock: { [data] in data.changeClockNow }, changed: { [data] in data.changeStamp($0) })
        xattrs = XattrAbsence(ttl: cache.attrTTL)
        // (A page read ahead is served for a fifth of the attribute cache's time: the kernel
        // keeps what it is given for that time again, so another client's change shows in a
        // listing at most that much later than without read-ahead.)
        listings = DirReadahead(ttl: cache.attrTTL / 5)
        session = SessionKeeper(meta: meta, timeout: config.sessionTimeout) { [config] in
            SessionInfo(hostname: Sys.hostname(), pid: getpid(), mountPoint: config.mountPoint, version: config.version)
        }
        background = Background(
            meta: meta, data: data, session: session, heartbeat: config.heartbeat, readOnly: config.readOnly
        ) { [files] in files.all.map { ($0.ino, $0.flags & O_ACCMODE) } }
        (data.ledger as? MetadataLedger)?.bind { [session] in session.sid }
        if !config.readOnly, let admin = meta as? any CompactAdmin {
            let c = Compactor(admin: admin, meta: meta, data: data) { [background] in background.wake(.slices) }
            compactor = c
            data.watchFragments { [c] ino, index, n in c.hint(ino, index, records: n) }
            (data.ledger as? MetadataLedger)?.onCommit { [c] ino, index in c.noteCommit(ino, index) }
        } else {
            compactor = nil
        }
    }

    // MARK: life cycle

    /// Registers the session and starts the background thread (heartbeats, flushes, deletions).
    public func start() throws(FSError) {
        try session.register()
        background.start()
        compactor?.start()
    }

    /// Flushes all buffered writes, ends the session and stops the background thread.
    public func stop() {
        compactor?.stop()
        do { try data.flushAll() } catch { Log.error("flushing buffered writes at unmount: \(error.message)") }
        background.stop()
        listings.shutdown()
        let open = files.all.map(\.ino)
        if !open.isEmpty { _ = try? meta.close(open.map { ($0, sid) }) }
        background.cleanDeleted()
        background.recordStored()
        if sid != 0 {
            do { try meta.closeSession(sid) } catch { Log.warning("closing session \(sid): \(error.message)") }
        }
        data.shutdown()
    }

    /// Deletes the objects of files whose last link went away and of slices cut off by
    /// truncation (in bounded steps). Returns how many objects were deleted.
    @discardableResult
    public func cleanDeleted(_ what: Deletions = .all, limit: Int = 1000) -> Int { background.cleanDeleted(what, limit: limit) }

    private func wakeDeleter(_ what: Deletions) { background.wake(what) }

    private func writable() throws(FSError) {
        if config.readOnly { throw FSError.readOnly }
    }

    // MARK: kernel references

    /// The kernel took a reference to `ino` (an entry reply it accepted).
    public func remember(_ ino: Ino) { kernel.remember(inVolume(ino)) }

    /// FORGET: the kernel dropped `count` references to `ino`.
    public func forget(_ ino: Ino, _ count: UInt64) { kernel.forget(inVolume(ino), count) }

    private func bury(_ r: RemovedName?) { kernel.bury(r) }

    private func ghost(_ ino: Ino) -> Attr? { kernel.ghost(ino) }

    // MARK: attributes

    /// Attributes with the size and modification time of writes still buffered in this client.
    private func overlay(_ ino: Ino, _ a: Attr) -> Attr {
        guard a.type == .regular, let w = data.writer(ino), let (end, written) = w.pending else { return a }
        var a = a
        if end > a.size { a.size = end }
        a.mtime = written
        if written > a.ctime { a.ctime = written }
        return a
    }

    /// This client changed the attributes of `ino` to `a`: records the mode in its open
    /// handles, and the change for what was read before (`MetaCache.changes`).
    private func noteMode(_ ino: Ino, _ a: Attr) {
        files.noteMode(ino, a)
        cache.noteChange()
    }

    public func lookup(_ cred: Credential, _ parent: Ino, _ name: [UInt8]) throws(FSError) -> (Ino, Attr) {
        let parent = inVolume(parent)
        let dots = name == [UInt8(ascii: ".")] || name == [UInt8(ascii: "."), UInt8(ascii: ".")]
        // ".." of the mount's top is the top itself (the kernel resolves ".." itself; this is
        // for a lookup it sends anyway).
        if dots && parent == config.top {
            try Posix.check(try getattr(rootIno), cred, .execute)
            return (rootIno, try getattr(rootIno))
        }
        let inTrash = Trash.isTrash(parent)
        let known = cache.entry(parent, name)
        if let ino = known, let a = cache.attr(ino) {
            try Posix.check(try getattr(parent), cred, .execute)
            return (forKernel(ino, inTrash: inTrash && a.type == .regular), overlay(ino, a))
        }
        // (Only for an entry expired: one whose attributes alone are not good any more, after a
        // write here, is looked up alone.)
        if !dots, known == nil, let pos = cache.listedPosition(parent, name), let (ino, a) = try lookupListed(cred, parent, name, at: pos) {
            return (forKernel(ino, inTrash: inTrash && a.type == .regular), overlay(ino, a))
        }
        let t = cache.stamp()
        let (ino, a) = try meta.lookup(cred, parent, name)
        if !dots { cache.putEntry(parent, name, ino, a, asOf: t) }
        return (forKernel(ino, inTrash: inTrash && a.type == .regular), overlay(ino, a))
    }

    /// Entries (with attributes) to read at once from where a lookup missed in a directory
    /// listed here before.
    static let lookupPage = 128

    /// A lookup of a name that a listing here gave at position `pos`, whose record expired:
    /// `find` and `ls -l` of a large directory read all of it first and then look each name
    /// up in order, after the cache's time. The entries from that position on are read in one
    /// round trip and kept, so the next lookups are answered from the cache. Nil when the name
    /// is not at that position any more (the caller looks it up alone).
    private func lookupListed(_ cred: Credential, _ parent: Ino, _ name: [UInt8], at pos: UInt64) throws(FSError) -> (Ino, Attr)? {
        try Posix.check(try getattr(parent), cred, .execute)
        let changes = cache.changes
        let t = cache.stamp()
        // (Any failure — through a gateway a listing needs read permission, a lookup only
        // search — leaves the name to the lookup alone; so does a name not found where it was,
        // whose position is forgotten, and a change here meanwhile, which the page may predate.)
        guard let page = try? meta.readdir(parent, after: pos - 1, limit: Self.lookupPage, plus: true, xattrs: false),
            cache.changes == changes
        else {
            cache.forgetPosition(parent, name)
            return nil
        }
        for e in page {
            if let a = e.attr { cache.putEntry(parent, e.name, e.ino, a, asOf: t, position: e.cookie) }
        }
        guard let first = page.first, first.cookie == pos, first.name == name, let a = first.attr else {
            cache.forgetPosition(parent, name)
            return nil
        }
        return (first.ino, a)
    }

    /// Runs an operation on inode `ino`, which the kernel named by a handle it holds: when the
    /// inode is gone (another client removed it), the answer is `ESTALE`, and nothing cached
    /// of it is kept. The kernel then looks the path up again and retries (open, stat and the
    /// other calls on a path do, once), where `ENOENT` would end an `open(O_CREAT)` of a name
    /// that exists again, made anew by another client.
    private func current<T>(_ ino: Ino, _ body: () throws(FSError) -> T) throws(FSError) -> T {
        do {
            return try body()
        } catch {
            guard error.code == ENOENT else { throw error }
            cache.drop(ino)
            throw FSError(ESTALE, "inode \(ino) is gone (removed by another client)")
        }
    }

    /// A file the kernel named by a name it keeps (its entry cache) that has no name left: the
    /// last one went on another client (the file waits in the trash, or another client holds
    /// it open). The kernel's entry is stale: `ESTALE` makes it look the path up again, so
    /// another client's new file of that name is found. A file this client holds open answers
    /// on (a descriptor of a deleted file reads on, and fstat says link count 0, as on ext4).
    private func named(_ ino: Ino, _ a: Attr) throws(FSError) {
        guard a.nlink == 0, a.type != .directory, !files.holds(ino), !kernel.unnamedHere(ino) else { return }
        cache.drop(ino)
        throw FSError(ESTALE, "inode \(ino) has no name left (removed by another client)")
    }

    public func getattr(_ ino: Ino) throws(FSError) -> Attr {
        let trashed = viaTrash(ino)
        let ino = inVolume(ino)
        // (The trash's number stands only while the file is there: after a restore it is named.)
        if let a = cache.attr(ino) {
            if !trashed || !Trash.isTrash(a.parent) { try named(ino, a) }
            return overlay(ino, a)
        }
        if let g = ghost(ino) { return g }
        let t = cache.stamp()
        let a = try current(ino) { () throws(FSError) in try meta.getattr(ino) }
        if !trashed || !Trash.isTrash(a.parent) { try named(ino, a) }
        cache.put(ino, a, asOf: t)
        return overlay(ino, a)
    }

    public func setattr(_ cred: Credential, _ ino: Ino, _ req: SetAttrRequest, fh: UInt64?) throws(FSError) -> Attr {
        let ino = inVolume(ino)
        try writable()
        if ghost(ino) != nil { return try kernel.setattr(cred, ino, req) }
        var req = req
        let times: SetAttrMask = [.atime, .mtime, .atimeNow, .mtimeNow]
        if req.mask.contains(.size) || !req.mask.isDisjoint(with: times) {
            // Buffered writes land before the size changes, and before times set explicitly
            // (`cp -p` sets them on the open file): the later change wins, as on ext4.
            try data.flush(ino)
        }
        if req.mask.contains(.size), let fh, let h = handle(fh), h.ino == ino, h.writable { req.viaHandle = true }
        let a = try current(ino) { () throws(FSError) in try meta.setattr(cred, ino, req) }
        if req.mask.contains(.size) {
            data.invalidate(ino)
            wakeDeleter(.slices)
            // (What was reserved ahead counted from the old size: the next write reserves anew.)
            reservations.release(meta, sid: sid, ino)
        }
        cache.put(ino, a, asOf: cache.stamp())
        noteMode(ino, a)
        return overlay(ino, a)
    }

    public func access(_ cred: Credential, _ ino: Ino, _ mask: AccessMask) throws(FSError) {
        let ino = inVolume(ino)
        if mask.contains(.write) { try writable() }
        if let g = ghost(ino) { return try Posix.check(g, cred, mask) }
        try current(ino) { () throws(FSError) in try meta.access(cred, ino, mask) }
    }

    // MARK: namespace

    public func mknod(
        _ cred: Credential, _ parent: Ino, _ name: [UInt8], _ type: FileType, _ mode: UInt16, rdev: UInt32
    ) throws(FSError) -> (Ino, Attr) {
        let parent = inVolume(parent)
        try writable()
        return created(
            parent, name, try changing([parent]) { () throws(FSError) in try meta.mknod(cred, parent, name, type, mode, rdev: rdev, target: nil) })
    }

    /// Records a new entry in the client cache.
    private func created(_ parent: Ino, _ name: [UInt8], _ r: (Ino, Attr)) -> (Ino, Attr) {
        cache.putEntry(parent, name, r.0, r.1, asOf: cache.stamp())
        xattrs.absent(r.0, all: true)
        return r
    }

    /// Runs a change of directories `dirs` by this client (entries come or go). Then the kernel
    /// asks for their attributes: they are kept as the change's own commit left them when the
    /// engine knows that without a round trip and no other change of theirs by this client
    /// overlapped (`MetaCache.endChange`), else read again.
    private func changing<T>(_ dirs: [Ino], _ body: () throws(FSError) -> T) throws(FSError) -> T {
        let unique = dirs.count > 1 && dirs[0] == dirs[1] ? [dirs[0]] : dirs
        let tokens = unique.map { cache.beginChange($0) }
        do {
            let r = try body()
            for (d, t) in zip(unique, tokens) {
                let a = meta.recentAttr(d)
                cache.endChange(d, t, after: a?.type == .directory ? a : nil)
            }
            return r
        } catch {
            for (d, t) in zip(unique, tokens) { cache.endChange(d, t, after: nil) }
            throw error
        }
    }

    public func mkdir(_ cred: Credential, _ parent: Ino, _ name: [UInt8], _ mode: UInt16) throws(FSError) -> (Ino, Attr) {
        let parent = inVolume(parent)
        try writable()
        return created(
            parent, name, try changing([parent]) { () throws(FSError) in try meta.mknod(cred, parent, name, .directory, mode, rdev: 0, target: nil) })
    }

    public func symlink(_ cred: Credential, _ parent: Ino, _ name: [UInt8], target: [UInt8]) throws(FSError) -> (Ino, Attr) {
        let parent = inVolume(parent)
        try writable()
        return created(
            parent, name,
            try changing([parent]) { () throws(FSError) in try meta.mknod(cred, parent, name, .symlink, 0o777, rdev: 0, target: target) })
    }

    public func readlink(_ ino: Ino) throws(FSError) -> [UInt8] {
        let ino = inVolume(ino)
        return try current(ino) { () throws(FSError) in try meta.readlink(ino) }
    }

    public func unlink(_ cred: Credential, _ parent: Ino, _ name: [UInt8]) throws(FSError) {
        let parent = inVolume(parent)
        try writable()
        cache.dropEntry(parent, name)
        let r = try changing([parent]) { () throws(FSError) in try meta.unlink(cred, parent, name) }
        cache.drop(r.ino)
        bury(r)
        if r.freed { wakeDeleter(.files) }
    }

    public func rmdir(_ cred: Credential, _ parent: Ino, _ name: [UInt8]) throws(FSError) {
        let parent = inVolume(parent)
        try writable()
        cache.dropEntry(parent, name)
        let r = try changing([parent]) { () throws(FSError) in try meta.rmdir(cred, parent, name) }
        cache.drop(r.ino)
        bury(r)
    }

    public func rename(_ cred: Credential, _ sp: Ino, _ sn: [UInt8], _ dp: Ino, _ dn: [UInt8], flags: RenameFlags) throws(FSError) {
        let sp = inVolume(sp)
        let dp = inVolume(dp)
        try writable()
        cache.dropEntry(sp, sn)
        cache.dropEntry(dp, dn)
        let r = try changing([sp, dp]) { () throws(FSError) in try meta.rename(cred, sp, sn, dp, dn, flags) }
        // Both inodes' ctime changed.
        cache.drop(r.moved, r.other)
        bury(r.removed)
        if r.removed?.freed == true { wakeDeleter(.files) }
    }

    public func link(_ cred: Credential, _ ino: Ino, _ parent: Ino, _ name: [UInt8]) throws(FSError) -> Attr {
        let ino = inVolume(ino)
        let parent = inVolume(parent)
        try writable()
        let t = cache.stamp()
        let a = try changing([parent]) { () throws(FSError) in try meta.link(cred, ino, parent, name) }
        cache.putEntry(parent, name, ino, a, asOf: t)
        return overlay(ino, a)
    }

    /// `df` of the file system, as seen from directory `ino`: a directory quota's figures there.
    public func statfs(_ ino: Ino) throws(FSError) -> StatFS {
        try meta.statfs(inVolume(ino))
    }

    // MARK: directories

    /// Checks that `cred` may list `ino`.
    public func opendir(_ cred: Credential, _ ino: Ino) throws(FSError) {
        let ino = inVolume(ino)
        if let g = ghost(ino) {
            guard g.type == .directory else { throw FSError.notDir }
            return try Posix.check(g, cred, .read)
        }
        let t = cache.stamp()
        let a = try current(ino) { () throws(FSError) in try meta.getattr(ino) }
        cache.put(ino, a, asOf: t)
        guard a.type == .directory else { throw FSError.notDir }
        try Posix.check(a, cred, .read)
    }

    /// Entries from FUSE offset `offset`: 0 starts with ".", 1 with "..", then the engine's
    /// positions shifted by 2. Each entry's `cookie` is the offset to continue after it.
    public func readdir(_ ino: Ino, offset: UInt64, limit: Int, plus: Bool) throws(FSError) -> [DirEntry] {
        let ino = inVolume(ino)
        if ghost(ino) != nil { return [] }  // a removed directory lists nothing, as on ext4
        var out: [DirEntry] = []
        if offset < 2 {
            let a = try current(ino) { () throws(FSError) in try meta.getattr(ino) }
            if offset == 0 { out.append(DirEntry(name: [UInt8(ascii: ".")], ino: forKernel(ino), type: .directory, cookie: 1, attr: plus ? a : nil)) }
            // (The mount's top is its own parent.)
            let parent = ino == config.top ? ino : (a.parent == 0 ? rootIno : a.parent)
            let pa = plus ? try? meta.getattr(parent) : nil
            out.append(DirEntry(name: [UInt8(ascii: "."), UInt8(ascii: ".")], ino: forKernel(parent), type: .directory, cookie: 2, attr: pa))
        }
        let after = offset < 2 ? 0 : offset - 2
        // With the client cache a listing goes on from the pages read ahead while the kernel
        // took the ones before (`DirReadahead`); a listing from its start reads afresh.
        let ahead =
            cache.enabled && offset >= 2
            ? listings.take(ino, after: after, limit: limit) { [cache, data] p in
                p.changes == cache.changes && (p.entries ?? []).allSatisfy { data.changeStamp($0.ino) <= p.stamp }
            } : nil
        let served: DirReadahead.Served
        if let ahead {
            served = ahead
        } else {
            let page = try readPage(ino, after: after, limit: limit, plus: plus)
            served = DirReadahead.Served(entries: page.entries ?? [], stamp: page.stamp, epoch: page.epoch)
            if cache.enabled { listings.keep(ino, page) }
        }
        if cache.enabled {
            listings.readAhead(ino, changes: cache.changes) { [self] (after, limit) throws(FSError) in
                try readPage(ino, after: after, limit: limit, plus: true)
            }
        }
        let t = served.stamp
        let epoch = served.epoch
        var entries = served.entries
        let inTrash = Trash.isTrash(ino)
        for i in entries.indices {
            entries[i].cookie += 2
            let real = entries[i].ino
            if entries[i].hasXattrs == false { xattrs.absent(real, all: true, ifUnchangedSince: epoch) }
            if inTrash && entries[i].type == .regular { entries[i].ino = forKernel(real, inTrash: true) }
            if let a = entries[i].attr {
                // (A listing with attributes gives the kernel the entries and attributes to keep
                // as long as the client cache would: only a plain one is kept here, for the
                // lookups and stats that follow it.)
                if !plus { cache.putEntry(ino, entries[i].name, real, a, asOf: t, position: entries[i].cookie - 2) }
                entries[i].attr = overlay(real, a)
            }
        }
        return out + entries
    }

    /// A page of directory `ino` read from the engine, with the client cache's clocks as they
    /// stood before. Attributes come in the same round trip: with the cache they are read
    /// always, so the lookups and stats that usually follow a listing are answered from it.
    private func readPage(_ ino: Ino, after: UInt64, limit: Int, plus: Bool) throws(FSError) -> DirReadahead.Page {
        let changes = cache.changes
        let t = cache.stamp()
        let epoch = xattrs.epoch
        let entries = try meta.readdir(ino, after: after, limit: limit, plus: plus || cache.enabled, xattrs: config.xattrs)
        let page = DirReadahead.Page(after: after, limit: limit)
        page.fill(entries, stamp: t, epoch: epoch, changes: changes)
        return page
    }

    // MARK: files

    private func handle(_ fh: UInt64) -> FileHandle? { files.get(fh) }

    private func register(_ h: FileHandle) -> UInt64 { files.add(h) }

    /// Opens `ino`; close-to-open: cached chunk views are dropped so other clients' writes show.
    /// `keepCache` says the file is unchanged since this client last opened it, so the kernel
    /// may keep the pages it has.
    public func open(_ cred: Credential, _ ino: Ino, flags: Int32) throws(FSError) -> (UInt64, Attr, keepCache: Bool) {
        let trashed = viaTrash(ino)
        let ino = inVolume(ino)
        let wantsWrite = flags & O_ACCMODE != O_RDONLY || flags & O_TRUNC != 0
        if wantsWrite { try writable() }
        let stampBefore = data.changeStamp(ino)
        var (a, first) = try current(ino) { () throws(FSError) in try meta.open(cred, ino, flags: flags, sid: sid) }
        if (!trashed || !Trash.isTrash(a.parent)) && a.nlink == 0 && a.type != .directory && !files.holds(ino) && !kernel.unnamedHere(ino) {
            _ = try? meta.close(ino, sid: sid)
            try named(ino, a)
        }
        if flags & O_TRUNC != 0 && a.type == .regular {
            // open(O_TRUNC) (the kernel hands it to us: atomic_o_trunc) empties the file and
            // updates mtime and ctime, even when it was empty already.
            do {
                try data.flush(ino)
                var req = SetAttrRequest(mask: .size)
                req.viaHandle = true
                a = try meta.setattr(cred, ino, req)
                first = []
                wakeDeleter(.slices)
            } catch {
                _ = try? meta.close(ino, sid: sid)
                throw error
            }
            noteMode(ino, a)
        }
        let keep = files.unchanged(ino, a, stamp: stampBefore) && !wantsWrite && a.type == .regular && data.writer(ino) == nil
        data.invalidate(ino)
        cache.put(ino, a, asOf: cache.stamp())
        if let first { data.prime(ino, 0, first) }
        files.opened(ino, a, stamp: data.changeStamp(ino))
        let w = wantsWrite && a.type == .regular ? data.openWriter(ino) : nil
        let h = FileHandle(ino: ino, flags: flags, writer: w, size: a.size, stamp: data.changeStamp(ino), mode: a.mode)
        return (register(h), overlay(ino, a), keep)
    }

    /// Creates and opens a regular file.
    public func create(_ cred: Credential, _ parent: Ino, _ name: [UInt8], _ mode: UInt16, flags: Int32) throws(FSError) -> (Ino, Attr, UInt64) {
        let parent = inVolume(parent)
        try writable()
        let (ino, a) = created(parent, name, try changing([parent]) { () throws(FSError) in try meta.create(cred, parent, name, mode, sid: sid) })
        let w = data.openWriter(ino)
        return (ino, a, register(FileHandle(ino: ino, flags: flags, writer: w, size: 0, stamp: data.changeStamp(ino), mode: a.mode)))
    }

    public func read(_ fh: UInt64, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(FSError) -> Int {
        guard let h = handle(fh) else { throw FSError.badF }
        // A reader sees what this client wrote: buffered writes are committed first.
        if let w = data.writer(h.ino), w.hasPending { try w.flush() }
        // The size from open holds until this client changes the file (close-to-open for others).
        let stamp = data.changeStamp(h.ino)
        let known: UInt64? = h.state.withLock { $0.stamp == stamp ? $0.size : nil }
        let size: UInt64
        if let known {
            size = known
        } else {
            size = try meta.getattr(h.ino).size
            h.state.withLock {
                $0.size = size
                $0.stamp = stamp
            }
        }
        return try data.read(h.ino, at: offset, into: buffer, fileSize: size, hint: h.readAhead)
    }

    /// Buffers a write. `caller` gives the writer's credential, asked for only when the file
    /// has set-user-ID or set-group-ID bits, which a write by anyone but root clears.
    public func write(
        _ fh: UInt64, at offset: UInt64, _ buffer: UnsafeRawBufferPointer, uid: UInt32, caller: () -> Credential
    ) throws(FSError) -> Int {
        guard let h = handle(fh) else { throw FSError.badF }
        guard let w = h.writer else { throw FSError.badF }
        if offset + UInt64(buffer.count) > maxFileSize { throw FSError(EFBIG, "file too large (the largest is 1 PiB)") }
        if uid != 0 && h.state.withLock({ $0.mode & 0o6000 != 0 }) {
            let a = try meta.setattr(caller(), h.ino, SetAttrRequest(mask: .killPriv))
            cache.put(h.ino, a, asOf: cache.stamp())
            noteMode(h.ino, a)
        }
        try reservations.beforeWrite(meta, sid: sid, h.ino, end: offset + UInt64(buffer.count)) { () throws(FSError) in
            try meta.getattr(h.ino).size
        }
        try w.write(buffer, at: offset)
        cache.drop(h.ino)
        return buffer.count
    }

    /// fallocate(2) through an open file: modes 0, `FALLOC_FL_KEEP_SIZE`, `FALLOC_FL_PUNCH_HOLE`
    /// (with `KEEP_SIZE`, as the kernel requires) and `FALLOC_FL_ZERO_RANGE`, each with or without
    /// `KEEP_SIZE` (`TxnMetadata.fallocate`); others `EOPNOTSUPP`. Buffered writes land first.
    public func fallocate(_ cred: Credential, _ fh: UInt64, mode: Int32, offset: UInt64, length: UInt64) throws(FSError) -> Attr {
        guard let h = handle(fh) else { throw FSError.badF }
        guard h.writer != nil else { throw FSError.badF }
        let keep = mode & Falloc.keepSize != 0
        let punch = mode & Falloc.punchHole != 0
        let zero = mode & Falloc.zeroRange != 0
        guard mode & ~(Falloc.keepSize | Falloc.punchHole | Falloc.zeroRange) == 0, !(punch && zero), !punch || keep else {
            throw FSError(EOPNOTSUPP, "fallocate mode \(mode) is not supported (0, KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE and ZERO_RANGE are)")
        }
        try writable()
        try data.flush(h.ino)
        let a = try current(h.ino) { () throws(FSError) in
            try meta.fallocate(cred, h.ino, zero: punch || zero, keepSize: keep, offset: offset, length: length)
        }
        data.invalidate(h.ino)
        reservations.release(meta, sid: sid, h.ino)
        cache.put(h.ino, a, asOf: cache.stamp())
        noteMode(h.ino, a)
        return a
    }

    /// copy_file_range(2) between two open files of this mount: the source's slices are recorded
    /// in the destination (`MetadataEngine.copyRange`), no byte is read or stored; buffered
    /// writes of both land first. One bounded step: a long copy returns a short count and the
    /// caller (the kernel's, `cp`'s loop) goes on.
    public func copyFileRange(
        _ cred: Credential, _ fhIn: UInt64, offIn: UInt64, _ fhOut: UInt64, offOut: UInt64, length: UInt64, flags: Int32
    ) throws(FSError) -> Int {
        guard flags == 0 else { throw FSError.invalid }
        guard let hi = handle(fhIn), let ho = handle(fhOut) else { throw FSError.badF }
        guard hi.flags & O_ACCMODE != O_WRONLY, ho.writable, ho.flags & O_APPEND == 0 else { throw FSError.badF }
        try writable()
        try data.flush(hi.ino)
        if ho.ino != hi.ino { try data.flush(ho.ino) }
        let (n, a) = try meta.copyRange(cred, src: hi.ino, srcOff: offIn, dst: ho.ino, dstOff: offOut, length: min(length, UInt64(Int.max)))
        data.invalidate(ho.ino)
        reservations.release(meta, sid: sid, ho.ino)
        cache.put(ho.ino, a, asOf: cache.stamp())
        noteMode(ho.ino, a)
        return Int(n)
    }

    /// close(2) of one descriptor: data is durable when this returns; POSIX locks of `owner` go.
    public func flush(_ fh: UInt64, owner: UInt64) throws(FSError) {
        guard let h = handle(fh) else { throw FSError.badF }
        var err: FSError?
        if let w = h.writer {
            do { try w.flush() } catch { err = error }
        }
        let owned = h.state.withLock { $0.posixOwners.remove(owner) != nil }
        if owned {
            try? meta.setlk(h.ino, sid: sid, owner: owner, pid: 0, type: .unlock, start: 0, end: .max)
            lockWaits.released(h.ino)
        }
        if let err { throw err }
    }

    public func fsync(_ fh: UInt64) throws(FSError) {
        guard let h = handle(fh) else { throw FSError.badF }
        try h.writer?.flush()
    }

    /// The last close of an open file description.
    public func release(_ fh: UInt64) {
        guard let h = files.remove(fh) else { return }
        if let w = h.writer {
            do { try w.flush() } catch { Log.error("writing inode \(h.ino) at close: \(error.message)") }
            data.releaseWriter(w)
            if data.writer(h.ino) == nil { reservations.release(meta, sid: sid, h.ino) }
        }
        if let owner = h.state.withLock({ $0.flockOwner }) {
            try? meta.flock(h.ino, sid: sid, owner: owner, pid: 0, type: .unlock)
            lockWaits.released(h.ino)
        }
        do {
            if try meta.close(h.ino, sid: sid) { wakeDeleter(.files) }
        } catch {
            Log.warning("closing inode \(h.ino): \(error.message)")
        }
    }

    // MARK: extended attributes

    public func getxattr(_ cred: Credential, _ ino: Ino, _ name: [UInt8]) throws(FSError) -> [UInt8] {
        let ino = inVolume(ino)
        // That a security. name is absent is remembered like an attribute (no permission
        // decides it): the kernel asks for security.capability before every write, ls -l for
        // security.selinux of every file.
        if XattrAbsence.answerable(name) && xattrs.isAbsent(ino, name) { throw FSError.noAttr }
        let epoch = xattrs.epoch
        do {
            return try current(ino) { () throws(FSError) in try meta.getxattr(cred, ino, name) }
        } catch {
            if name == XattrAbsence.capability && error.code == ENODATA { xattrs.absent(ino, all: false, ifUnchangedSince: epoch) }
            throw error
        }
    }

    public func listxattr(_ cred: Credential, _ ino: Ino) throws(FSError) -> [[UInt8]] {
        let ino = inVolume(ino)
        if xattrs.isAbsent(ino, nil) { return [] }
        return try current(ino) { () throws(FSError) in try meta.listxattr(cred, ino) }
    }

    public func setxattr(_ cred: Credential, _ ino: Ino, _ name: [UInt8], _ value: [UInt8], _ flag: XattrFlag) throws(FSError) {
        let ino = inVolume(ino)
        try writable()
        xattrs.forget(ino)
        defer { xattrs.forget(ino) }
        try current(ino) { () throws(FSError) in try meta.setxattr(cred, ino, name, value, flag) }
        cache.drop(ino)
    }

    public func removexattr(_ cred: Credential, _ ino: Ino, _ name: [UInt8]) throws(FSError) {
        let ino = inVolume(ino)
        try writable()
        xattrs.forget(ino)
        defer { xattrs.forget(ino) }
        try current(ino) { () throws(FSError) in try meta.removexattr(cred, ino, name) }
        cache.drop(ino)
    }

    // MARK: locks

    public func getlk(_ fh: UInt64, owner: UInt64, type: LockType, start: UInt64, end: UInt64) throws(FSError) -> LockRange? {
        guard let h = handle(fh) else { throw FSError.badF }
        return try meta.getlk(h.ino, sid: sid, owner: owner, type: type, start: start, end: end)
    }

    /// `F_SETLK` / `F_SETLKW`: with `wait`, retries until granted or `interrupted()` says stop.
    /// Locks order writers on several clients, as NFS clients make them: this client's buffered
    /// writes are committed before it lets a lock go, and what it keeps of the file goes when
    /// it takes one (the caller drops the kernel's pages and attributes too).
    public func setlk(
        _ fh: UInt64, owner: UInt64, pid: UInt32, type: LockType, start: UInt64, end: UInt64, wait: Bool, interrupted: () -> Bool
    ) throws(FSError) {
        guard let h = handle(fh) else { throw FSError.badF }
        // (A flush that fails still lets the lock go; its error is the answer.)
        let unflushed = type == .unlock ? flushed(h.ino) : nil
        if type != .unlock { h.state.withLock { _ = $0.posixOwners.insert(owner) } }
        try retrying(h.ino, wait: wait, interrupted: interrupted) { () throws(FSError) in
            try meta.setlk(h.ino, sid: sid, owner: owner, pid: pid, type: type, start: start, end: end)
        }
        // (An unlock, or a write lock made a read lock, may let a waiter in.)
        if type != .write { lockWaits.released(h.ino) }
        if type != .unlock { lockTaken(h.ino) }
        if let unflushed { throw unflushed }
    }

    /// `flock(2)`; with `wait`, retries until granted or interrupted. Writes and caches as for `setlk`.
    public func flock(_ fh: UInt64, owner: UInt64, pid: UInt32, type: LockType, wait: Bool, interrupted: () -> Bool) throws(FSError) {
        guard let h = handle(fh) else { throw FSError.badF }
        let unflushed = type == .unlock ? flushed(h.ino) : nil
        h.state.withLock { $0.flockOwner = type == .unlock ? nil : owner }
        try retrying(h.ino, wait: wait, interrupted: interrupted) { () throws(FSError) in
            try meta.flock(h.ino, sid: sid, owner: owner, pid: pid, type: type)
        }
        if type != .write { lockWaits.released(h.ino) }
        if type != .unlock { lockTaken(h.ino) }
        if let unflushed { throw unflushed }
    }

    /// Commits the buffered writes of `ino`; the error, if that failed.
    private func flushed(_ ino: Ino) -> FSError? {
        do {
            try data.flush(ino)
            return nil
        } catch {
            return error
        }
    }

    /// A lock was taken on `ino`: another client may have written the file under it before, so
    /// nothing this client remembers of its data, size or attributes is used again (SQLite
    /// reads its database's first page right after taking its lock).
    private func lockTaken(_ ino: Ino) {
        cache.drop(ino)
        data.invalidate(ino)
    }

    /// Runs `body` (a lock request of `ino`) until it is granted; with `wait`, a conflict
    /// (`EAGAIN`) is tried again as soon as this client lets a lock of `ino` go, and otherwise
    /// (a holder on another client) after a pause that grows from 2 ms to 200 ms.
    private func retrying(_ ino: Ino, wait: Bool, interrupted: () -> Bool, _ body: () throws(FSError) -> Void) throws(FSError) {
        var delay = 0.002
        if wait { lockWaits.enter(ino) }
        defer { if wait { lockWaits.leave(ino) } }
        while true {
            let seen = lockWaits.releases(ino)
            do {
                try body()
                return
            } catch {
                if error.code != EAGAIN || !wait { throw error }
                if interrupted() { throw FSError(EINTR, "interrupted") }
                lockWaits.wait(ino, after: seen, seconds: delay)
                delay = min(delay * 2, 0.2)
            }
        }
    }
}

/// fallocate(2)'s mode bits (linux/falloc.h).
public enum Falloc {
    public static let keepSize: Int32 = 0x01
    public static let punchHole: Int32 = 0x02
    public static let zeroRange: Int32 = 0x10
}
