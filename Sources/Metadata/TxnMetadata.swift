import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// Storage primitives of a transactional metadata store. `TxnMetadata` runs all POSIX logic
/// over them inside `transaction`, so a store only says how rows are kept and how a
/// transaction is made atomic: SQLite takes a lock (`SQLiteStore`); Redis reads optimistically
/// and commits with one check-and-apply step, running the body again when something it read
/// changed meanwhile (`RedisTxnStore`). So a body may run more than once: it must change nothing
/// but the store. And a write transaction never decides anything from a directory's atime, mtime
/// or ctime (it may set them): a store may check a directory's record without them and write
/// only the times a transaction changed, so that clients creating files in one directory do not
/// conflict over its times.
package protocol TxnStore: AnyObject, Sendable {
    var displayName: String { get }
    /// Whether one read transaction sees one consistent state however long it runs (SQLite's
    /// snapshot in WAL mode, which writers do not wait for): a dump reads everything in one.
    var snapshotReads: Bool { get }
    /// One transaction, as a value: the body of `transaction` is given it, and every call that
    /// is part of it is passed it (nothing about a transaction is found through the thread, so
    /// any thread can run one).
    associatedtype Txn
    /// Runs `body` in one transaction, handing it the transaction. A call inside `body` that is
    /// to be part of it is passed that value; `body` must not start another transaction of the
    /// same store (it would be a separate one, and SQLite's would wait for this one to end).
    func transaction<T>(write: Bool, _ body: (Txn) throws(FSError) -> T) throws(FSError) -> T
    /// Says what the transaction is about to read, so that a store with round trips fetches it
    /// all at once. Only a hint: reads not named still work, names not read cost nothing more.
    func prefetch(_ tx: Txn, _ reads: [TxnRead]) throws(FSError)
    /// Reads chunk `index` of `ino` as it is once this transaction has committed, unchecked (a
    /// snapshot for the caller, as a read just after the transaction would give), and hands
    /// the record to `got` before the transaction returns. A store with round trips sends the
    /// read together with the commit.
    func chunkAfterCommit(_ tx: Txn, _ ino: Ino, _ index: UInt32, _ got: @escaping ([UInt8]) -> Void) throws(FSError)
    /// `MetadataEngine.recentAttr`, outside any transaction.
    func recentAttr(_ ino: Ino) -> Attr?

    func setting(_ tx: Txn, _ key: String) throws(FSError) -> String?
    func setSetting(_ tx: Txn, _ key: String, _ value: String) throws(FSError)
    /// The value of a named counter (0 when missing).
    func counter(_ tx: Txn, _ name: String) throws(FSError) -> Int64
    /// Adds `delta` to a named counter without reading it, so that transactions adding to the
    /// same counter do not conflict.
    func add(_ tx: Txn, _ counter: String, _ delta: Int64) throws(FSError)
    /// Whether a named counter is at most `max` (missing: 0), as a read the commit checks as
    /// that comparison alone: transactions that add to the counter while it stays true do not
    /// conflict (quotas: writers into one quota). Asked before the transaction adds to it.
    func atMost(_ tx: Txn, _ counter: String, _ max: Int64) throws(FSError) -> Bool
    /// Reserves `count` consecutive ids of `counter` and returns the first. Not part of any
    /// transaction: ids are never given back. `tx` is the transaction the call is made in, if
    /// any (a store that takes the ids inside it must not start another).
    func reserveIDs(_ tx: Txn?, _ counter: String, _ count: Int) throws(FSError) -> UInt64
    /// A new inode number (a store with round trips hands them out from batches it reserved).
    func newInode(_ tx: Txn) throws(FSError) -> Ino

    func attr(_ tx: Txn, _ ino: Ino) throws(FSError) -> Attr?
    func putAttr(_ tx: Txn, _ ino: Ino, _ attr: Attr) throws(FSError)
    /// Removes an inode's attributes, symlink target and extended attributes.
    func deleteInode(_ tx: Txn, _ ino: Ino) throws(FSError)

    func entry(_ tx: Txn, _ parent: Ino, _ name: [UInt8]) throws(FSError) -> (Ino, FileType)?
    /// Adds or replaces an entry; it gets a new readdir position after all existing ones.
    func putEntry(_ tx: Txn, _ parent: Ino, _ name: [UInt8], _ ino: Ino, _ type: FileType) throws(FSError)
    func deleteEntry(_ tx: Txn, _ parent: Ino, _ name: [UInt8]) throws(FSError)
    func hasEntries(_ tx: Txn, _ parent: Ino) throws(FSError) -> Bool
    func entries(_ tx: Txn, _ parent: Ino, after cookie: UInt64, limit: Int) throws(FSError) -> [DirEntry]

    func symlinkTarget(_ tx: Txn, _ ino: Ino) throws(FSError) -> [UInt8]?
    func putSymlinkTarget(_ tx: Txn, _ ino: Ino, _ target: [UInt8]) throws(FSError)

    func xattr(_ tx: Txn, _ ino: Ino, _ name: [UInt8]) throws(FSError) -> [UInt8]?
    func putXattr(_ tx: Txn, _ ino: Ino, _ name: [UInt8], _ value: [UInt8]) throws(FSError)
    func deleteXattr(_ tx: Txn, _ ino: Ino, _ name: [UInt8]) throws(FSError)
    func xattrNames(_ tx: Txn, _ ino: Ino) throws(FSError) -> [[UInt8]]
    /// Bytes of names and values of `ino`'s extended attributes as last stored with
    /// `putXattrBytes`; nil when never stored (an inode without attributes, or one whose
    /// attributes were set before the total was kept).
    func xattrBytes(_ tx: Txn, _ ino: Ino) throws(FSError) -> Int?
    /// Stores that total (nil removes it). `deleteInode` removes it too.
    func putXattrBytes(_ tx: Txn, _ ino: Ino, _ bytes: Int?) throws(FSError)
    /// The same total summed from the attributes themselves, without reading their values
    /// (at most `maxXattrsPerInode` of them): for an inode whose total was never stored.
    func sumXattrBytes(_ tx: Txn, _ ino: Ino) throws(FSError) -> Int

    func chunk(_ tx: Txn, _ ino: Ino, _ index: UInt32) throws(FSError) -> [UInt8]
    func appendChunk(_ tx: Txn, _ ino: Ino, _ index: UInt32, _ record: [UInt8]) throws(FSError)
    /// Removes a chunk's records, returning them.
    func deleteChunk(_ tx: Txn, _ ino: Ino, _ index: UInt32) throws(FSError) -> [UInt8]
    /// Indexes of the chunks of `ino` that have records, from `index` on, at most `limit`,
    /// highest first when `descending`. Its cost follows the chunks it returns, never the size.
    func chunkIndexes(_ tx: Txn, _ ino: Ino, from index: UInt32, limit: Int, descending: Bool) throws(FSError) -> [UInt32]
    /// The volume's format record, read or written (a layout may follow from its version).
    func formatLoaded(_ format: VolumeFormat)

    /// Whether any session has `ino` open.
    func isOpen(_ tx: Txn, _ ino: Ino) throws(FSError) -> Bool
    /// How many opens of `ino` session `sid` holds.
    func openCount(_ tx: Txn, _ sid: UInt64, _ ino: Ino) throws(FSError) -> Int
    /// Records one more open of `ino` by `sid` (without reading the count).
    func addOpen(_ tx: Txn, _ sid: UInt64, _ ino: Ino) throws(FSError)
    /// Drops `count` opens of `ino` by `sid` (at most all it has); returns how many it keeps.
    func dropOpens(_ tx: Txn, _ sid: UInt64, _ ino: Ino, _ count: Int) throws(FSError) -> Int
    /// Inodes `sid` has open, with counts (at most `limit`).
    func sessionOpens(_ tx: Txn, _ sid: UInt64, limit: Int) throws(FSError) -> [(Ino, Int)]

    func addPendingDelete(_ tx: Txn, _ ino: Ino, _ size: UInt64) throws(FSError)
    func pendingDeletes(_ tx: Txn, limit: Int) throws(FSError) -> [PendingDelete]
    func removePendingDelete(_ tx: Txn, _ pending: PendingDelete) throws(FSError)
    func pushDroppedSlices(_ tx: Txn, _ records: [UInt8]) throws(FSError)
    /// References of slice `id` beyond the first record that names it (clones, copied ranges):
    /// 0 when none (most slices: no record is kept for them).
    func sliceRefs(_ tx: Txn, _ id: UInt64) throws(FSError) -> Int64
    /// Adds to them (without reading: more references); a count that reaches 0 is removed.
    func addSliceRefs(_ tx: Txn, _ id: UInt64, _ delta: Int64) throws(FSError)
    func takeDroppedSlices(_ tx: Txn, limit: Int) throws(FSError) -> [UInt8]

    func session(_ tx: Txn, _ sid: UInt64) throws(FSError) -> SessionInfo?
    func putSession(_ tx: Txn, _ info: SessionInfo) throws(FSError)
    func deleteSession(_ tx: Txn, _ sid: UInt64) throws(FSError)
    func sessions(_ tx: Txn) throws(FSError) -> [SessionInfo]

    func locks(_ tx: Txn, _ ino: Ino, _ kind: UInt8) throws(FSError) -> [UInt8]
    /// Stores a lock table (empty removes it) and notes that `sid` has locks on `ino`.
    func putLocks(_ tx: Txn, _ ino: Ino, _ kind: UInt8, _ table: [UInt8], sid: UInt64) throws(FSError)
    /// Lock tables `sid` has entries in (at most `limit`).
    func sessionLocks(_ tx: Txn, _ sid: UInt64, limit: Int) throws(FSError) -> [(Ino, UInt8)]
    /// Forgets that `sid` has entries in a lock table.
    func forgetSessionLock(_ tx: Txn, _ sid: UInt64, _ ino: Ino, _ kind: UInt8) throws(FSError)
    /// How many extended attributes `ino` has.
    func xattrCount(_ tx: Txn, _ ino: Ino) throws(FSError) -> Int
    /// Every inode with attributes, a page (about `limit`) at a time: `cursor` 0 to start, the
    /// `next` of the page before to go on, nil at the end. Unchecked reads outside the
    /// transaction's view (fsck and gc take what they find as a hint and confirm): an inode
    /// present throughout is returned at least once (Redis's SCAN may return one twice), one
    /// made or removed meanwhile may be or not.
    func scanInodes(_ tx: Txn, cursor: UInt64, limit: Int) throws(FSError) -> (inodes: [(Ino, Attr)], next: UInt64?)
    /// Notes slices recorded again elsewhere while gc `holder` scans (`gcRunning`): it keeps them.
    func keepForGC(_ tx: Txn, holder: String, _ ids: [UInt64]) throws(FSError)
    func keptForGC(_ tx: Txn, holder: String, _ id: UInt64) throws(FSError) -> Bool
    /// Forgets what was noted for `holder` (its end, or a crashed one's), outside any transaction.
    func clearKeptForGC(holder: String) throws(FSError)
    /// Removes every record of the volume (`stagefs destroy`), in bounded steps, outside any
    /// transaction.
    func wipe() throws(FSError)
}

/// What a transaction is about to read (`TxnStore.prefetch`).
package enum TxnRead: Sendable {
    case attr(Ino)
    /// An entry and, when it exists, what the inode it names holds: attributes, opens, entries.
    case entry(Ino, [UInt8])
    case chunk(Ino, UInt32)
    /// The indexes of a file's chunks from `from` on (at most `limit`, the lowest first) and
    /// their records.
    case chunkList(Ino, from: UInt32, limit: Int)
    /// The first `limit` pending deletes and, for the files in order, their chunk indexes with
    /// the records, `chunks` in all.
    case pendingDeletes(limit: Int, chunks: Int)
    /// The opens of `ino` by session `sid`.
    case opens(sid: UInt64, Ino)
    case isOpen(Ino)
    case hasEntries(Ino)
    case xattr(Ino, [UInt8])
    case xattrCount(Ino)
    case xattrBytes(Ino)
    case locks(Ino, UInt8)
    case symlink(Ino)
    /// A page of a directory (`TxnStore.entries`); `plus`: with the attributes of its inodes,
    /// and with `xattrs` the count of each one's extended attributes.
    case entries(Ino, after: UInt64, limit: Int, plus: Bool, xattrs: Bool)
    case counter(String)
    case setting(String)
    case sliceRefs(UInt64)
}

extension TxnStore {
    package var snapshotReads: Bool { false }
    package func prefetch(_ tx: Txn, _ reads: [TxnRead]) throws(FSError) {}
    package func chunkAfterCommit(_ tx: Txn, _ ino: Ino, _ index: UInt32, _ got: @escaping ([UInt8]) -> Void) throws(FSError) {
        got(try chunk(tx, ino, index))
    }
    package func recentAttr(_ ino: Ino) -> Attr? { nil }
    package func formatLoaded(_ format: VolumeFormat) {}
}

/// Attributes loaded in one transaction, changed in place and written back once
/// (so a rename within one directory updates that directory once).
struct AttrSet {
    var attrs: [Ino: Attr] = [:]
    var dirty: Set<Ino> = []

    /// A new inode's attributes (or all of them replaced).
    mutating func put(_ ino: Ino, _ a: Attr) {
        attrs[ino] = a
        dirty.insert(ino)
    }

    mutating func load<S: TxnStore>(_ s: S, _ tx: S.Txn, _ ino: Ino) throws(FSError) -> Attr {
        if let a = attrs[ino] { return a }
        guard let a = try s.attr(tx, ino) else { throw FSError.notFound }
        attrs[ino] = a
        return a
    }

    mutating func update<S: TxnStore>(_ s: S, _ tx: S.Txn, _ ino: Ino, _ body: (inout Attr) -> Void) throws(FSError) {
        var a = try load(s, tx, ino)
        body(&a)
        attrs[ino] = a
        dirty.insert(ino)
    }

    mutating func forget(_ ino: Ino) {
        attrs[ino] = nil
        dirty.remove(ino)
    }

    func flush<S: TxnStore>(_ s: S, _ tx: S.Txn) throws(FSError) {
        for ino in dirty { try s.putAttr(tx, ino, attrs[ino]!) }
    }
}

/// The POSIX semantics of StageFS over any `TxnStore` (`SQLiteStore`, `RedisTxnStore`): the one
/// place the file-system rules live; the conformance suite holds every engine to them.
package final class TxnMetadata<S: TxnStore>: MetadataEngine {
    package let store: S
    /// The format record (nil: none) and when it was read (`recentFormat()`).
    let formatSetting = Locked<(VolumeFormat?, UInt64)?>(nil)
    /// Space reserved for buffered writes, by session and file (`reserveSpace`).
    let reservations = Locked<[ReservationKey: Reservation]>([:])
    /// Whether the volume has quotas and when that was read (`hasQuotas`).
    let quotaSetting = QuotaFlag()

    package init(store: S) { self.store = store }

    package var displayName: String { store.displayName }

    // MARK: volume

    package func loadFormat() throws(FSError) -> VolumeFormat? {
        guard let text = try store.transaction(write: false, { (tx) throws(FSError) in try store.setting(tx, "format") }) else { return nil }
        let f = try VolumeFormat.decode(text)
        store.formatLoaded(f)
        // (Every client reads it at its start: the trash's setting comes with it.)
        formatSetting.withLock { $0 = (f, Sys.monotonicNanos()) }
        return f
    }

    package func initialize(_ format: VolumeFormat, force: Bool, rootMode: UInt16) throws(FSError) {
        let written = try store.transaction(write: true) { (tx) throws(FSError) -> VolumeFormat in
            var kept = format
            if let text = try store.setting(tx, "format") {
                let old = try VolumeFormat.decode(text)
                if !force && !format.differences(from: old).isEmpty {
                    throw format.reformatRefused(existing: old, in: displayName)
                }
                kept.uuid = old.uuid
                kept.createdAt = old.createdAt
                // The layouts stay those of the volume's records (an older StageFS may have it
                // mounted): the version rises only as far as compression needs.
                kept.version = max(old.version, format.compression == nil ? 2 : 3)
            }
            try store.setSetting(tx, "format", kept.encoded())
            if try store.attr(tx, rootIno) == nil {
                let now = Timespec.now()
                let root = Attr(
                    type: .directory, mode: rootMode & 0o7777, uid: 0, gid: 0, nlink: 2, size: 4096, atime: now, mtime: now, ctime: now,
                    parent: rootIno)
                try store.putAttr(tx, rootIno, root)
                if try store.counter(tx, "nextInode") < Int64(rootIno) { try store.add(tx, "nextInode", Int64(rootIno)) }
                try store.add(tx, "usedInodes", 1)
                try store.add(tx, "usedSpace", 4096)
                // A new volume's bytes in the bucket are counted from its first block.
                if try store.counter(tx, "storedCounted") == 0 { try store.add(tx, "storedCounted", 1) }
            }
            return kept
        }
        store.formatLoaded(written)
        formatSetting.withLock { $0 = (written, Sys.monotonicNanos()) }
    }

    package func statfs() throws(FSError) -> StatFS {
        try store.transaction(write: false) { (tx) throws(FSError) in
            try store.prefetch(tx, [.counter("usedSpace"), .counter("usedInodes")])
            let used = UInt64(max(0, try store.counter(tx, "usedSpace")))
            let inodes = UInt64(max(0, try store.counter(tx, "usedInodes")))
            let f = try recentFormat(tx)
            return makeStatFS(usedSpace: used, usedInodes: inodes, capacity: f?.capacity ?? 0, inodeLimit: f?.inodes ?? 0)
        }
    }

    // MARK: sessions

    package func newSession(_ info: SessionInfo) throws(FSError) -> UInt64 {
        try store.transaction(write: true) { (tx) throws(FSError) in
            var info = info
            info.sid = try store.reserveIDs(tx, "nextSession", 1)
            let now = Timespec.now().sec
            info.started = now
            info.heartbeat = now
            try store.putSession(tx, info)
            return info.sid
        }
    }

    @_specialize(where S == RedisTxnStore)
    package func heartbeat(_ sid: UInt64) throws(FSError) {
        try store.transaction(write: true) { (tx) throws(FSError) in
            guard var info = try store.session(tx, sid) else { throw FSError(ENOENT, "session \(sid) is gone (cleaned up as stale)") }
            info.heartbeat = Timespec.now().sec
            try store.putSession(tx, info)
        }
    }

    package func closeSession(_ sid: UInt64) throws(FSError) {
        try releaseSpace(sid: sid)
        // In bounded steps: a session may hold very many open files and locks.
        while true {
            let done = try store.transaction(write: true) { (tx) throws(FSError) -> Bool in
                let opens = try store.sessionOpens(tx, sid, limit: chunkBatch)
                try store.prefetch(tx, opens.flatMap { (ino, _) in [.opens(sid: sid, ino), .attr(ino), .isOpen(ino)] })
                for (ino, count) in opens {
                    _ = try store.dropOpens(tx, sid, ino, count)
                    try freeIfUnused(tx, ino)
                }
                let locks = try store.sessionLocks(tx, sid, limit: chunkBatch)
                try store.prefetch(tx, locks.map { .locks($0.0, $0.1) })
                for (ino, kind) in locks {
                    if let kept = strippingSession(sid, from: try store.locks(tx, ino, kind)) {
                        try store.putLocks(tx, ino, kind, kept, sid: 0)
                    }
                    try store.forgetSessionLock(tx, sid, ino, kind)
                }
                if opens.count == chunkBatch || locks.count == chunkBatch { return false }
                try store.deleteSession(tx, sid)
                return true
            }
            if done { return }
        }
    }

    package func listSessions() throws(FSError) -> [SessionInfo] {
        try store.transaction(write: false) { (tx) throws(FSError) in try store.sessions(tx) }
    }

    package func cleanStaleSessions(age: Int64) throws(FSError) -> Int {
        let limit = Timespec.now().sec - age
        var n = 0
        for s in try listSessions() where s.heartbeat < limit {
            try closeSession(s.sid)
            n += 1
        }
        return n
    }

    // MARK: namespace

    @_specialize(where S == RedisTxnStore)
    package func lookup(_ cred: Credential, _ parent: Ino, _ name: [UInt8]) throws(FSError) -> (Ino, Attr) {
        try store.transaction(write: false) { (tx) throws(FSError) in
            try store.prefetch(tx, [.attr(parent), .entry(parent, name)])
            guard let pa = try store.attr(tx, parent) else { throw FSError.notFound }
            guard pa.type == .directory else { throw FSError.notDir }
            try Posix.check(pa, cred, .execute)
            if name == [UInt8(ascii: ".")] { return (parent, pa) }
            if name == [UInt8(ascii: "."), UInt8(ascii: ".")] {
                let p = pa.parent == 0 ? rootIno : pa.parent
                guard let ppa = try store.attr(tx, p) else { throw FSError.notFound }
                return (p, ppa)
            }
            if name.count > maxNameLength { throw FSError.nameTooLong }
            guard let (ino, _) = try store.entry(tx, parent, name), let a = try store.attr(tx, ino) else { throw FSError.notFound }
            return (ino, a)
        }
    }

    package func recentAttr(_ ino: Ino) -> Attr? { store.recentAttr(ino) }

    @_specialize(where S == RedisTxnStore)
    package func getattr(_ ino: Ino) throws(FSError) -> Attr {
        try store.transaction(write: false) { (tx) throws(FSError) in
            guard let a = try store.attr(tx, ino) else { throw FSError.notFound }
            return a
        }
    }

    @_specialize(where S == RedisTxnStore)
    package func access(_ cred: Credential, _ ino: Ino, _ mask: AccessMask) throws(FSError) {
        try Posix.check(try getattr(ino), cred, mask)
    }

    @_specialize(where S == RedisTxnStore)
    package func setattr(_ cred: Credential, _ ino: Ino, _ req: SetAttrRequest) throws(FSError) -> Attr {
        if req.mask.contains(.size) && req.size > maxFileSize { throw FSError(EFBIG, "file too large (the largest is 1 PiB)") }
        // A cut that drops many chunks takes several bounded steps; each step is one
        // transaction that leaves a valid, shorter file, and repeating the request is harmless.
        // A cut to zero of a file with data, while the volume keeps a trash, moves its chunks
        // to a copy in the trash instead (`trashContentStep`), made by the first step.
        let trash = req.mask.contains(.size) && req.size == 0 ? try trashDays() > 0 : false
        var copy: Ino? = nil
        while true {
            let (a, done, made) = try store.transaction(write: true) { (tx) throws(FSError) -> (Attr, Bool, Ino?) in
                try store.prefetch(tx, [.attr(ino), quotaKindsRead])
                guard var a = try store.attr(tx, ino) else { throw FSError.notFound }
                if Trash.isTrash(ino) && !cred.isRoot { throw Self.trashIsRoots }
                let before = a
                let now = Timespec.now()
                let touch = try SetAttrRules.apply(req, to: &a, cred, now: now)
                let kinds = try quotaKinds(tx)
                if !kinds.isEmpty && (a.uid != before.uid || a.gid != before.gid) {
                    // A new owner's quotas take it (checked but for root, as ext4 lets root).
                    try moveUsage(
                        tx, from: try quotaKeys(tx, ino, before, kinds: kinds), to: try quotaKeys(tx, ino, a, kinds: kinds),
                        space: align4K(a.size), inodes: 1, enforce: !cred.isRoot)
                }
                var done = true
                var made = copy
                if req.mask.contains(.size) && req.size != a.size {
                    let keys = try quotaKeys(tx, ino, a, kinds: kinds)
                    if trash && req.size == 0 && a.type == .regular && a.nlink > 0 && !Trash.isTrash(a.parent) {
                        (made, done) = try trashContentStep(tx, ino, &a, copy: copy, by: cred, now: now, keys: keys)
                    } else {
                        done = try truncateStep(tx, ino, &a, to: req.size, keys: keys)
                    }
                }
                SetAttrRules.finish(req, &a, before, cred, now: now, touch: touch)
                if a != before { try store.putAttr(tx, ino, a) }
                return (a, done, made)
            }
            // (Only once its transaction committed: a retried one made nothing.)
            copy = made
            if done { return a }
        }
    }

    /// One step of cutting regular file `ino` (`a`, with data) to zero while the volume keeps a
    /// trash: the first step makes a copy in the trash (a new inode with the file's attributes,
    /// size and times, named `<copy>-<ino>.before-truncate` there); each step moves at most
    /// `chunkBatch` of the file's chunks to it, the highest first, leaving the file shorter;
    /// the last leaves it empty. Nothing is queued for deletion: the data moved. Returns the
    /// copy and whether the file is empty. (No trash there, a user's `.trash` at the root: an
    /// ordinary cut.)
    private func trashContentStep(
        _ tx: S.Txn, _ ino: Ino, _ a: inout Attr, copy: Ino?, by cred: Credential, now: Timespec, keys: [String]
    ) throws(FSError) -> (Ino?, Bool) {
        var target = copy
        if target == nil {
            let t = try store.newInode(tx)
            var ta = a
            ta.nlink = 0
            ta.ctime = now
            var attrs = AttrSet()
            // (Where the file's names are is not known here: restored into a directory given.)
            guard try putInTrash(tx, t, &ta, &attrs, from: 0, name: Array("\(ino).before-truncate".utf8), by: cred, now: now, keys: keys) else {
                return (nil, try truncateStep(tx, ino, &a, to: 0, keys: keys))
            }
            attrs.put(t, ta)
            try attrs.flush(store, tx)
            // (Counted where the file counts: the space moves to it below, step by step.)
            try account(tx, keys, space: align4K(ta.size), inodes: 1, enforce: false)
            target = t
        }
        let gone = try store.chunkIndexes(tx, ino, from: 0, limit: chunkBatch, descending: true)
        try store.prefetch(tx, gone.map { .chunk(ino, $0) })
        for idx in gone {
            let blob = try store.deleteChunk(tx, ino, idx)
            if !blob.isEmpty {
                try store.appendChunk(tx, target!, idx, blob)
                try keepIfGC(tx, Slice.decodeAll(blob).map(\.id))
            }
        }
        // More below the lowest moved: the file ends there until the next step.
        var size: UInt64 = 0
        if gone.count == chunkBatch, let lowest = gone.last { size = min(a.size, UInt64(lowest) * chunkSize) }
        try account(tx, keys, space: align4K(size) - align4K(a.size), inodes: 0, enforce: false)
        a.size = size
        return (target, size == 0)
    }

    /// fallocate(2) on a regular file open for writing. Nothing is reserved in an object store,
    /// so allocating (mode 0) only grows the size, and `keepSize` allocates nothing; `zero`
    /// (`FALLOC_FL_PUNCH_HOLE`, `FALLOC_FL_ZERO_RANGE`) makes `offset..<offset+length` read
    /// zeros: one zero slice in each chunk of the range that holds data (beyond the size
    /// nothing needs it). The size grows to the range's end unless `keepSize`; mtime and ctime
    /// become now, and privilege bits go as a write drops them. A range over many chunks takes
    /// several bounded steps (each zeroes at most `chunkBatch` chunks; the last one changes the
    /// size and times), so repeating the call is harmless.
    @_specialize(where S == RedisTxnStore)
    package func fallocate(_ cred: Credential, _ ino: Ino, zero: Bool, keepSize: Bool, offset: UInt64, length: UInt64) throws(FSError) -> Attr {
        guard length > 0 else { throw FSError.invalid }
        let (end, over) = offset.addingReportingOverflow(length)
        if over || (!keepSize && end > maxFileSize) { throw FSError(EFBIG, "file too large (the largest is 1 PiB)") }
        var next = UInt32(offset / chunkSize)
        while true {
            let (a, done) = try store.transaction(write: true) { (tx) throws(FSError) -> (Attr, Bool) in
                try store.prefetch(tx, [.attr(ino), quotaKindsRead])
                guard var a = try store.attr(tx, ino) else { throw FSError.notFound }
                guard a.type == .regular else { throw a.type == .directory ? FSError.isDir : FSError(ENODEV, "fallocate needs a regular file") }
                let zeroEnd = min(end, a.size)
                if zero && offset < zeroEnd {
                    let last = UInt32((zeroEnd - 1) / chunkSize)
                    let held = try store.chunkIndexes(tx, ino, from: next, limit: chunkBatch, descending: false)
                    for idx in held where idx <= last {
                        let start = max(offset, UInt64(idx) * chunkSize) - UInt64(idx) * chunkSize
                        let stop = min(zeroEnd, UInt64(idx + 1) * chunkSize) - UInt64(idx) * chunkSize
                        let hole = Slice(pos: UInt32(start), id: 0, size: 0, off: 0, len: UInt32(stop - start))
                        try store.appendChunk(tx, ino, idx, hole.encoded())
                    }
                    if held.count == chunkBatch, let high = held.last, high < last {
                        next = high + 1
                        return (a, false)
                    }
                }
                try wrote(tx, ino, &a, upTo: keepSize ? nil : end, by: cred)
                return (a, true)
            }
            if done { return a }
        }
    }

    /// What a change of a file's bytes ending at `end` (nil: the size stays) does to its record:
    /// it grows to `end` (counted, and checked against quotas and the volume's limits), loses
    /// privilege bits as a write by `cred` does, gets mtime and ctime now, and is written.
    func wrote(_ tx: S.Txn, _ ino: Ino, _ a: inout Attr, upTo end: UInt64?, by cred: Credential) throws(FSError) {
        if let end, end > a.size {
            try account(tx, try quotaKeys(tx, ino, a), space: align4K(end) - align4K(a.size), inodes: 0, enforce: true)
            a.size = end
        }
        let now = Timespec.now()
        a.mode = Posix.modeAfterWrite(a, cred)
        a.mtime = now
        a.ctime = now
        try store.putAttr(tx, ino, a)
    }

    /// Cuts or extends a regular file inside a transaction (records only; objects of dropped
    /// slices are queued for deletion). Drops at most `chunkBatch` chunks, the highest first;
    /// when more remain it stops with the size at the start of the lowest chunk it dropped and
    /// returns false.
    /// `keys`: the quotas the file counts in (a growth is checked against them).
    private func truncateStep(_ tx: S.Txn, _ ino: Ino, _ a: inout Attr, to newSize: UInt64, keys: [String]) throws(FSError) -> Bool {
        let old = a.size
        var size = newSize
        if newSize < old {
            let firstGone = UInt32((newSize + chunkSize - 1) / chunkSize)
            let gone = try store.chunkIndexes(tx, ino, from: firstGone, limit: chunkBatch, descending: true)
            try store.prefetch(tx, gone.map { .chunk(ino, $0) })
            for idx in gone {
                let blob = try store.deleteChunk(tx, ino, idx)
                if !blob.isEmpty { try store.pushDroppedSlices(tx, blob) }
            }
            if gone.count == chunkBatch, let lowest = gone.last {
                size = max(newSize, UInt64(lowest) * chunkSize)
            }
            let pos = newSize % chunkSize
            if size == newSize && pos != 0 {
                let hole = Slice(pos: UInt32(pos), id: 0, size: 0, off: 0, len: UInt32(chunkSize - pos))
                try store.appendChunk(tx, ino, UInt32(newSize / chunkSize), hole.encoded())
            }
        }
        let delta = align4K(size) - align4K(old)
        try account(tx, keys, space: delta, inodes: 0, enforce: delta > 0)
        a.size = size
        return size == newSize
    }

    @_specialize(where S == RedisTxnStore)
    package func create(_ cred: Credential, _ parent: Ino, _ name: [UInt8], _ mode: UInt16, sid: UInt64) throws(FSError) -> (Ino, Attr) {
        try store.transaction(write: true) { (tx) throws(FSError) in
            try validateName(name)
            let (ino, a) = try makeNode(tx, cred, parent, name, .regular, mode, rdev: 0, target: nil)
            try store.addOpen(tx, sid, ino)
            return (ino, a)
        }
    }

    @_specialize(where S == RedisTxnStore)
    package func mknod(
        _ cred: Credential, _ parent: Ino, _ name: [UInt8], _ type: FileType, _ mode: UInt16, rdev: UInt32, target: [UInt8]?
    )
        throws(FSError) -> (Ino, Attr)
    {
        try validateName(name)
        if type == .symlink && (target == nil || target!.isEmpty || target!.count > 4095) { throw FSError.invalid }
        return try store.transaction(write: true) { (tx) throws(FSError) in
            try makeNode(tx, cred, parent, name, type, mode, rdev: rdev, target: target)
        }
    }

    /// mknod(2) in the transaction `tx`, its name and target already checked.
    private func makeNode(
        _ tx: S.Txn, _ cred: Credential, _ parent: Ino, _ name: [UInt8], _ type: FileType, _ mode: UInt16, rdev: UInt32, target: [UInt8]?
    )
        throws(FSError) -> (Ino, Attr)
    {
        try reserved(parent, name)
        if Trash.isTrash(parent) { throw Self.trashIsClosed }
        try store.prefetch(tx, [.attr(parent), .entry(parent, name), quotaKindsRead])
        guard var pa = try store.attr(tx, parent) else { throw FSError.notFound }
        guard pa.type == .directory else { throw FSError.notDir }
        try Posix.check(pa, cred, [.write, .execute])
        if pa.nlink == 0 { throw FSError.notFound }
        if try store.entry(tx, parent, name) != nil { throw FSError.exists }
        let ino = try store.newInode(tx)
        let now = Timespec.now()
        var perm = mode & 0o7777
        var gid = cred.gid
        if pa.mode & 0o2000 != 0 {
            gid = pa.gid
            if type == .directory {
                perm |= 0o2000
            } else if perm & 0o2010 == 0o2010 && !cred.isRoot && !cred.inGroup(gid) {
                perm &= ~0o2000
            }
        }
        let size: UInt64 = type == .directory ? 4096 : (type == .symlink ? UInt64(target!.count) : 0)
        let a = Attr(
            type: type, mode: perm, uid: cred.uid, gid: gid, nlink: type == .directory ? 2 : 1, size: size,
            atime: now, mtime: now, ctime: now, rdev: type == .blockDevice || type == .charDevice ? rdev : 0,
            parent: parent)
        try store.putAttr(tx, ino, a)
        if type == .symlink { try store.putSymlinkTarget(tx, ino, target!) }
        try store.putEntry(tx, parent, name, ino, type)
        pa.mtime = now
        pa.ctime = now
        if type == .directory { pa.nlink += 1 }
        try store.putAttr(tx, parent, pa)
        try account(tx, try quotaKeys(tx, ino, a), space: align4K(size), inodes: 1, enforce: true)
        return (ino, a)
    }

    /// Names nobody makes: `.trash` at the volume's root (the trash's), anything in the trash.
    func reserved(_ parent: Ino, _ name: [UInt8]) throws(FSError) {
        if parent == rootIno && name == Trash.name { throw FSError(EPERM, "'.trash' at the volume's root is the trash's") }
    }

    static var trashIsClosed: FSError { FSError(EPERM, "nothing is made in or moved into the trash but by deleting") }
    static var trashIsRoots: FSError { FSError(EPERM, "only root changes the trash ('stagefs trash' restores and purges)") }

    /// Frees an inode that has no links and no opens left (and is not in the trash); returns
    /// whether it did.
    @discardableResult
    func freeIfUnused(_ tx: S.Txn, _ ino: Ino) throws(FSError) -> Bool {
        guard let a = try store.attr(tx, ino), a.nlink == 0, !Trash.isTrash(a.parent), try !store.isOpen(tx, ino) else { return false }
        try freeInode(tx, ino, a)
        return true
    }

    private func freeInode(_ tx: S.Txn, _ ino: Ino, _ a: Attr) throws(FSError) {
        // (Its quotas are found before its records go: a trashed file's origin is one.)
        let keys = try quotaKeys(tx, ino, a)
        try store.deleteInode(tx, ino)
        if a.type == .regular && a.size > 0 { try store.addPendingDelete(tx, ino, a.size) }
        try account(tx, keys, space: -align4K(a.size), inodes: -1, enforce: false)
    }

    /// Drops one link of a non-directory inside a transaction: the name `name` of `parent`.
    /// `trash`: the volume keeps a trash, where a regular file whose last link this is goes
    /// (`putInTrash`) instead of being freed.
    private func dropLink(
        _ tx: S.Txn, _ ino: Ino, _ attrs: inout AttrSet, now: Timespec, parent: Ino, name: [UInt8], trash: Bool, by cred: Credential
    )
        throws(FSError) -> RemovedName
    {
        var a = try attrs.load(store, tx, ino)
        if Trash.isTrash(parent) && a.nlink == 0 {
            // A file of the trash deleted there (by root): for good.
            try leftTrash(tx, ino, a, to: rootIno)
            a.parent = rootIno
            a.ctime = now
            if try !store.isOpen(tx, ino) {
                attrs.forget(ino)
                try freeInode(tx, ino, a)
                return RemovedName(ino: ino, attr: a, freed: true)
            }
            try attrs.update(store, tx, ino) { $0 = a }
            return RemovedName(ino: ino, attr: a, freed: false)
        }
        a.nlink -= 1
        a.ctime = now
        if a.nlink == 0 && trash && a.type == .regular && !Trash.isTrash(parent),
            try putInTrash(tx, ino, &a, &attrs, from: parent, name: name, by: cred, now: now, keys: try quotaKeys(tx, ino, a))
        {
            try attrs.update(store, tx, ino) { $0 = a }
            return RemovedName(ino: ino, attr: a, freed: false)
        }
        if a.nlink > 0 && a.parent == parent {
            // The name it was made with goes: its home becomes the innermost quota directory
            // there, where its other names are too (see `Quota.swift`).
            let kinds = try quotaKinds(tx)
            let inner = kinds.contains("d") ? try dirQuotas(tx, from: parent).first.flatMap { Ino($0.dropFirst()) } : nil
            a.parent = inner ?? rootIno
        }
        if a.nlink == 0, try !store.isOpen(tx, ino) {
            attrs.forget(ino)
            try freeInode(tx, ino, a)
            return RemovedName(ino: ino, attr: a, freed: true)
        }
        try attrs.update(store, tx, ino) { $0 = a }
        return RemovedName(ino: ino, attr: a, freed: false)
    }

    @_specialize(where S == RedisTxnStore)
    package func unlink(_ cred: Credential, _ parent: Ino, _ name: [UInt8]) throws(FSError) -> RemovedName {
        let trash = try trashDays() > 0
        return try store.transaction(write: true) { (tx) throws(FSError) in
            try store.prefetch(tx, [.attr(parent), .entry(parent, name), quotaKindsRead])
            var attrs = AttrSet()
            let pa = try attrs.load(store, tx, parent)
            guard pa.type == .directory else { throw FSError.notDir }
            try Posix.check(pa, cred, [.write, .execute])
            if name.count > maxNameLength { throw FSError.nameTooLong }
            guard let (ino, type) = try store.entry(tx, parent, name) else { throw FSError.notFound }
            let a = try attrs.load(store, tx, ino)
            if (type == .directory) != (a.type == .directory) { throw FSError.damagedEntry }
            if type == .directory { throw FSError.isDir }
            if Trash.isTrash(parent) && !cred.isRoot { throw Self.trashIsRoots }
            if !Posix.stickyAllows(dir: pa, child: a, cred) { throw FSError.perm }
            let now = Timespec.now()
            try store.deleteEntry(tx, parent, name)
            try attrs.update(store, tx, parent) {
                $0.mtime = now
                $0.ctime = now
            }
            let removed = try dropLink(tx, ino, &attrs, now: now, parent: parent, name: name, trash: trash, by: cred)
            try attrs.flush(store, tx)
            return removed
        }
    }

    @_specialize(where S == RedisTxnStore)
    package func rmdir(_ cred: Credential, _ parent: Ino, _ name: [UInt8]) throws(FSError) -> RemovedName {
        if name == [UInt8(ascii: ".")] { throw FSError.invalid }
        if name == [UInt8(ascii: "."), UInt8(ascii: ".")] { throw FSError.notEmpty }
        return try store.transaction(write: true) { (tx) throws(FSError) in
            try store.prefetch(tx, [.attr(parent), .entry(parent, name), quotaKindsRead])
            guard var pa = try store.attr(tx, parent) else { throw FSError.notFound }
            guard pa.type == .directory else { throw FSError.notDir }
            try Posix.check(pa, cred, [.write, .execute])
            if name.count > maxNameLength { throw FSError.nameTooLong }
            guard let (ino, type) = try store.entry(tx, parent, name) else { throw FSError.notFound }
            guard let a = try store.attr(tx, ino) else { throw FSError.notFound }
            if (type == .directory) != (a.type == .directory) { throw FSError.damagedEntry }
            if type != .directory { throw FSError.notDir }
            if !Posix.stickyAllows(dir: pa, child: a, cred) { throw FSError.perm }
            if try store.hasEntries(tx, ino) { throw FSError.notEmpty }
            let now = Timespec.now()
            try store.deleteEntry(tx, parent, name)
            try removeDirectory(tx, ino, a)
            pa.nlink -= 1
            pa.mtime = now
            pa.ctime = now
            try store.putAttr(tx, parent, pa)
            var gone = a
            gone.nlink = 0
            gone.ctime = now
            return RemovedName(ino: ino, attr: gone, freed: true)
        }
    }

    /// Removes empty directory `ino`'s records (its entry is gone), its quota with it.
    private func removeDirectory(_ tx: S.Txn, _ ino: Ino, _ a: Attr) throws(FSError) {
        let keys = try quotaKeys(tx, ino, a)
        try store.deleteInode(tx, ino)
        try account(tx, keys, space: -align4K(a.size), inodes: -1, enforce: false)
        if keys.contains("d\(ino)") { try dropQuota(tx, "d\(ino)") }
    }

    /// Whether `ino` is `ancestor` or lies below it. The walk up is bounded: a directory
    /// nested deeper than `maxRenameDepth` levels cannot be a rename's destination parent
    /// across directories (`ELOOP`).
    func isWithin(_ tx: S.Txn, _ ino: Ino, _ ancestor: Ino) throws(FSError) -> Bool {
        var cur = ino
        for _ in 0...maxRenameDepth {
            if cur == ancestor { return true }
            if cur == rootIno { return false }
            guard let a = try store.attr(tx, cur) else { return false }
            cur = a.parent
        }
        throw FSError(ELOOP, "directory nested deeper than \(maxRenameDepth) levels")
    }

    @_specialize(where S == RedisTxnStore)
    package func rename(_ cred: Credential, _ sp: Ino, _ sn: [UInt8], _ dp: Ino, _ dn: [UInt8], _ flags: RenameFlags) throws(FSError) -> RenameResult
    {
        if flags.contains(.whiteout) { throw FSError.notSupported }
        if flags.contains(.exchange) && flags.contains(.noReplace) { throw FSError.invalid }
        try validateName(dn)
        if sn.isEmpty || sn.count > maxNameLength { throw FSError.notFound }
        try reserved(dp, dn)
        if Trash.isTrash(dp) && !(Trash.isTrash(sp) && sp == dp) { throw Self.trashIsClosed }
        if Trash.isTrash(sp) && !cred.isRoot { throw Self.trashIsRoots }
        let trash = try trashDays() > 0
        return try store.transaction(write: true) { (tx) throws(FSError) -> RenameResult in
            try store.prefetch(tx, [.attr(sp), .attr(dp), .entry(sp, sn), .entry(dp, dn), quotaKindsRead])
            var attrs = AttrSet()
            let spa = try attrs.load(store, tx, sp)
            let dpa = try attrs.load(store, tx, dp)
            guard spa.type == .directory, dpa.type == .directory else { throw FSError.notDir }
            try Posix.check(spa, cred, [.write, .execute])
            try Posix.check(dpa, cred, [.write, .execute])
            guard let (sino, st) = try store.entry(tx, sp, sn) else { throw FSError.notFound }
            let sa = try attrs.load(store, tx, sino)
            if !Posix.stickyAllows(dir: spa, child: sa, cred) { throw FSError.perm }
            let dst = try store.entry(tx, dp, dn)
            let exchange = flags.contains(.exchange)
            // The trash's directories stay where they are; a trashed file leaves only by a
            // rename out of it (a restore) or within its own directory.
            if Trash.isTrash(sino) || (exchange && (Trash.isTrash(sp) || Trash.isTrash(dp))) { throw Self.trashIsClosed }
            if let (dino, dt) = dst {
                if dino == sino { return RenameResult(moved: sino, other: sino, removed: nil) }
                if flags.contains(.noReplace) { throw FSError.exists }
                let da = try attrs.load(store, tx, dino)
                if !Posix.stickyAllows(dir: dpa, child: da, cred) { throw FSError.perm }
                if !exchange {
                    if st == .directory && dt != .directory { throw FSError.notDir }
                    if st != .directory && dt == .directory { throw FSError.isDir }
                    if dt == .directory, try store.hasEntries(tx, dino) { throw FSError.notEmpty }
                } else if dt == .directory && sp != dp {
                    try Posix.check(da, cred, .write)
                    if try isWithin(tx, sp, dino) { throw FSError.invalid }
                }
            } else if exchange {
                throw FSError.notFound
            }
            if st == .directory && sp != dp {
                try Posix.check(sa, cred, .write)
                if try isWithin(tx, dp, sino) { throw FSError.invalid }
            }
            // Usage moves with what changes directory quotas (or the rename is refused).
            let kinds = sp != dp && !Trash.isTrash(sp) ? try quotaKinds(tx) : ""
            if kinds.contains("d") {
                let from = try dirQuotas(tx, from: sp)
                let to = try dirQuotas(tx, from: dp)
                try moveAcrossQuotas(tx, sino, sa, from: from, to: to)
                if exchange, let (dino, _) = dst { try moveAcrossQuotas(tx, dino, try attrs.load(store, tx, dino), from: to, to: from) }
            }
            let now = Timespec.now()
            var removed: RemovedName?
            if exchange, let (dino, dt) = dst {
                try store.putEntry(tx, sp, sn, dino, dt)
                try store.putEntry(tx, dp, dn, sino, st)
                if sp != dp {
                    if st == .directory {
                        try attrs.update(store, tx, sino) { $0.parent = dp }
                        try attrs.update(store, tx, sp) { $0.nlink -= 1 }
                        try attrs.update(store, tx, dp) { $0.nlink += 1 }
                    } else if sa.nlink == 1 {
                        try attrs.update(store, tx, sino) { $0.parent = dp }
                    }
                    if dt == .directory {
                        try attrs.update(store, tx, dino) { $0.parent = sp }
                        try attrs.update(store, tx, dp) { $0.nlink -= 1 }
                        try attrs.update(store, tx, sp) { $0.nlink += 1 }
                    } else if try attrs.load(store, tx, dino).nlink == 1 {
                        try attrs.update(store, tx, dino) { $0.parent = sp }
                    }
                }
                try attrs.update(store, tx, dino) { $0.ctime = now }
            } else {
                if let (dino, dt) = dst {
                    if dt == .directory {
                        let da = try attrs.load(store, tx, dino)
                        attrs.forget(dino)
                        try removeDirectory(tx, dino, da)
                        try attrs.update(store, tx, dp) { $0.nlink -= 1 }
                        removed = RemovedName(ino: dino, attr: da, freed: true)
                    } else {
                        removed = try dropLink(tx, dino, &attrs, now: now, parent: dp, name: dn, trash: trash, by: cred)
                    }
                }
                try store.deleteEntry(tx, sp, sn)
                try store.putEntry(tx, dp, dn, sino, st)
                if Trash.isTrash(sp) && sp != dp && sa.nlink == 0 {
                    // Restored by hand (root's mv out of the trash): a link again.
                    try leftTrash(tx, sino, sa, to: dp)
                    try attrs.update(store, tx, sino) {
                        $0.nlink = 1
                        $0.parent = dp
                    }
                }
                if st == .directory && sp != dp {
                    try attrs.update(store, tx, sino) { $0.parent = dp }
                    try attrs.update(store, tx, sp) { $0.nlink -= 1 }
                    try attrs.update(store, tx, dp) { $0.nlink += 1 }
                } else if st != .directory && sp != dp && sa.nlink == 1 {
                    try attrs.update(store, tx, sino) { $0.parent = dp }
                }
            }
            try attrs.update(store, tx, sino) { $0.ctime = now }
            try attrs.update(store, tx, sp) {
                $0.mtime = now
                $0.ctime = now
            }
            try attrs.update(store, tx, dp) {
                $0.mtime = now
                $0.ctime = now
            }
            try attrs.flush(store, tx)
            return RenameResult(moved: sino, other: dst?.0 ?? 0, removed: removed)
        }
    }

    @_specialize(where S == RedisTxnStore)
    package func link(_ cred: Credential, _ ino: Ino, _ parent: Ino, _ name: [UInt8]) throws(FSError) -> Attr {
        try validateName(name)
        try reserved(parent, name)
        if Trash.isTrash(parent) { throw Self.trashIsClosed }
        return try store.transaction(write: true) { (tx) throws(FSError) in
            try store.prefetch(tx, [.attr(parent), .attr(ino), .entry(parent, name), quotaKindsRead])
            guard var pa = try store.attr(tx, parent) else { throw FSError.notFound }
            guard pa.type == .directory else { throw FSError.notDir }
            try Posix.check(pa, cred, [.write, .execute])
            guard var a = try store.attr(tx, ino) else { throw FSError.notFound }
            if a.type == .directory { throw FSError.perm }
            if a.nlink == 0 { throw FSError.notFound }
            if a.nlink >= 65000 { throw FSError.mlink }
            if try store.entry(tx, parent, name) != nil { throw FSError.exists }
            if try quotaKinds(tx).contains("d"), try dirQuotas(tx, from: home(a)) != dirQuotas(tx, from: parent) {
                throw FSError(EXDEV, "a hard link stays within the directory quotas of its file")
            }
            let now = Timespec.now()
            try store.putEntry(tx, parent, name, ino, a.type)
            a.nlink += 1
            a.ctime = now
            try store.putAttr(tx, ino, a)
            pa.mtime = now
            pa.ctime = now
            try store.putAttr(tx, parent, pa)
            return a
        }
    }

    package func readlink(_ ino: Ino) throws(FSError) -> [UInt8] {
        try store.transaction(write: false) { (tx) throws(FSError) in
            try store.prefetch(tx, [.attr(ino), .symlink(ino)])
            guard let a = try store.attr(tx, ino) else { throw FSError.notFound }
            guard a.type == .symlink, let t = try store.symlinkTarget(tx, ino) else { throw FSError.invalid }
            return t
        }
    }

    @_specialize(where S == RedisTxnStore)
    package func readdir(_ ino: Ino, after cookie: UInt64, limit: Int, plus: Bool, xattrs: Bool) throws(FSError) -> [DirEntry] {
        try store.transaction(write: false) { (tx) throws(FSError) in
            try store.prefetch(tx, [.attr(ino), .entries(ino, after: cookie, limit: limit, plus: plus, xattrs: xattrs)])
            guard let a = try store.attr(tx, ino) else { throw FSError.notFound }
            guard a.type == .directory else { throw FSError.notDir }
            var out = try store.entries(tx, ino, after: cookie, limit: limit)
            if plus {
                // (Whether each has extended attributes too: a client answers `ls -l`'s
                // security.selinux of each without a round trip when it has none.)
                try store.prefetch(tx, out.flatMap { xattrs ? [TxnRead.attr($0.ino), .xattrCount($0.ino)] : [TxnRead.attr($0.ino)] })
                for i in out.indices {
                    out[i].attr = try store.attr(tx, out[i].ino)
                    if xattrs { out[i].hasXattrs = try store.xattrCount(tx, out[i].ino) > 0 }
                }
                out.removeAll { $0.attr == nil }
            }
            return out
        }
    }

    // MARK: extended attributes

    @_specialize(where S == RedisTxnStore)
    package func getxattr(_ cred: Credential, _ ino: Ino, _ name: [UInt8]) throws(FSError) -> [UInt8] {
        try store.transaction(write: false) { (tx) throws(FSError) in
            try store.prefetch(tx, [.attr(ino), .xattr(ino, name)])
            guard let a = try store.attr(tx, ino) else { throw FSError.notFound }
            try xattrReadCheck(a, cred, name)
            guard let v = try store.xattr(tx, ino, name) else { throw FSError.noAttr }
            return v
        }
    }

    package func listxattr(_ cred: Credential, _ ino: Ino) throws(FSError) -> [[UInt8]] {
        try store.transaction(write: false) { (tx) throws(FSError) in
            guard try store.attr(tx, ino) != nil else { throw FSError.notFound }
            return try store.xattrNames(tx, ino).filter { cred.isRoot || !$0.starts(with: trustedPrefix) }
        }
    }

    /// setxattr(2). Past `maxXattrsPerInode` attributes or `maxXattrBytesPerInode` bytes of
    /// names and values an inode's attributes cannot grow (`ENOSPC`); replacing a value with
    /// one no larger, and removing, always work. The total is kept beside the attributes, so
    /// the check reads no other attribute.
    package func setxattr(_ cred: Credential, _ ino: Ino, _ name: [UInt8], _ value: [UInt8], _ flag: XattrFlag) throws(FSError) {
        if value.count > 65536 { throw FSError(E2BIG, "attribute value too large") }
        try store.transaction(write: true) { (tx) throws(FSError) in
            try store.prefetch(tx, [.attr(ino), .xattr(ino, name), .xattrCount(ino), .xattrBytes(ino)])
            guard var a = try store.attr(tx, ino) else { throw FSError.notFound }
            try xattrWriteCheck(a, cred, name)
            let old = try store.xattr(tx, ino, name)
            if flag == .create && old != nil { throw FSError.exists }
            if flag == .replace && old == nil { throw FSError.noAttr }
            if old == nil, try store.xattrCount(tx, ino) >= maxXattrsPerInode {
                throw FSError(ENOSPC, "inode \(ino) has \(maxXattrsPerInode) extended attributes, the most one may have")
            }
            let stored = try store.xattrBytes(tx, ino)
            var total = 0
            if let stored { total = stored } else if try store.xattrCount(tx, ino) > 0 { total = try store.sumXattrBytes(tx, ino) }
            let next = total - (old.map { name.count + $0.count } ?? 0) + name.count + value.count
            if next > maxXattrBytesPerInode && next > total {
                throw FSError(
                    ENOSPC,
                    "extended attributes of inode \(ino) would take \(next) bytes, more than the \(maxXattrBytesPerInode) one inode may hold")
            }
            // Quotas (not built yet) charge `next - total` bytes to the owner (`a.uid`, `a.gid`)
            // here, as `create` and `mkdir` will charge an inode: a bound per user, beside this
            // bound per inode.
            try store.putXattr(tx, ino, name, value)
            if next != stored { try store.putXattrBytes(tx, ino, next) }
            a.ctime = Timespec.now()
            try store.putAttr(tx, ino, a)
        }
    }

    package func removexattr(_ cred: Credential, _ ino: Ino, _ name: [UInt8]) throws(FSError) {
        try store.transaction(write: true) { (tx) throws(FSError) in
            try store.prefetch(tx, [.attr(ino), .xattr(ino, name), .xattrBytes(ino)])
            guard var a = try store.attr(tx, ino) else { throw FSError.notFound }
            try xattrWriteCheck(a, cred, name, removing: true)
            guard let old = try store.xattr(tx, ino, name) else { throw FSError.noAttr }
            try store.deleteXattr(tx, ino, name)
            // (A total never stored stays so: the next setxattr sums it. Names are never empty,
            // so 0 means no attribute is left.)
            if let total = try store.xattrBytes(tx, ino) {
                let next = total - name.count - old.count
                try store.putXattrBytes(tx, ino, next > 0 ? next : nil)
            }
            a.ctime = Timespec.now()
            try store.putAttr(tx, ino, a)
        }
    }

    // MARK: file data

    @_specialize(where S == RedisTxnStore)
    package func open(_ cred: Credential, _ ino: Ino, flags: Int32, sid: UInt64) throws(FSError) -> (Attr, [Slice]?) {
        var first: [Slice]?
        let a = try store.transaction(write: true) { (tx) throws(FSError) -> Attr in
            try store.prefetch(tx, [.attr(ino)])
            guard let a = try store.attr(tx, ino) else { throw FSError.notFound }
            let mask = accessMask(openFlags: flags)
            if a.type == .directory && mask.contains(.write) { throw FSError.isDir }
            try Posix.check(a, cred, mask)
            try store.addOpen(tx, sid, ino)
            // The first chunk's slices come with the commit: reading a small file needs no
            // further round trip.
            if a.type == .regular { try store.chunkAfterCommit(tx, ino, 0) { first = Slice.decodeAll($0) } }
            return a
        }
        // nil (not delivered: no commit was sent) leaves the first chunk to be read.
        return (a, a.type == .regular ? first : nil)
    }

    @_specialize(where S == RedisTxnStore)
    @discardableResult package func close(_ ino: Ino, sid: UInt64) throws(FSError) -> Bool {
        var last = false
        let freed = try store.transaction(write: true) { (tx) throws(FSError) -> Bool in
            try store.prefetch(tx, [.opens(sid: sid, ino), .attr(ino), .isOpen(ino)])
            last = try store.dropOpens(tx, sid, ino, 1) == 0
            if !last { return false }
            return try freeIfUnused(tx, ino)
        }
        // (The session's last open of it: what it reserved for its writes goes back.)
        if last { try? releaseSpace(ino, sid: sid) }
        return freed
    }

    /// One transaction for them all: the closes of one file by one session are counted
    /// together, and a file is freed (once) when the last of them leaves it unlinked and closed.
    @_specialize(where S == RedisTxnStore)
    package func close(_ closes: [(ino: Ino, sid: UInt64)]) throws(FSError) -> [Bool] {
        if closes.isEmpty { return [] }
        var counts: [(ino: Ino, sid: UInt64, n: Int)] = []
        for c in closes {
            if let i = counts.firstIndex(where: { $0.ino == c.ino && $0.sid == c.sid }) {
                counts[i].n += 1
            } else {
                counts.append((c.ino, c.sid, 1))
            }
        }
        // (The sessions' last opens of files, as the committed run found them.)
        var lastCloses: [(Ino, UInt64)] = []
        // (The transaction's result is the answer: a gateway saves it with the request's id.)
        let result = try store.transaction(write: true) { (tx) throws(FSError) -> [Bool] in
            try store.prefetch(tx, counts.flatMap { c -> [TxnRead] in [.opens(sid: c.sid, c.ino), .attr(c.ino), .isOpen(c.ino)] })
            var closed: [Ino] = []
            lastCloses = []
            for c in counts where try store.dropOpens(tx, c.sid, c.ino, c.n) == 0 {
                lastCloses.append((c.ino, c.sid))
                if !closed.contains(c.ino) { closed.append(c.ino) }
            }
            var freed = Set<Ino>()
            for ino in closed where try freeIfUnused(tx, ino) { freed.insert(ino) }
            return closes.map { freed.contains($0.ino) }
        }
        // (A session's last open of a file: what it reserved for its writes goes back.)
        if !reservations.withLock({ $0.isEmpty }) {
            for (ino, sid) in lastCloses { try? releaseSpace(ino, sid: sid) }
        }
        return result
    }

    @_specialize(where S == RedisTxnStore)
    package func readChunk(_ ino: Ino, _ index: UInt32) throws(FSError) -> [Slice] {
        try store.transaction(write: false) { (tx) throws(FSError) in Slice.decodeAll(try store.chunk(tx, ino, index)) }
    }

    @_specialize(where S == RedisTxnStore)
    package func readChunks(_ chunks: [(Ino, UInt32)]) throws(FSError) -> [[Slice]] {
        try store.transaction(write: false) { (tx) throws(FSError) in
            var out: [[Slice]] = []
            out.reserveCapacity(chunks.count)
            for start in stride(from: 0, to: chunks.count, by: chunkBatch) {
                let part = chunks[start..<min(chunks.count, start + chunkBatch)]
                try store.prefetch(tx, part.map { .chunk($0.0, $0.1) })
                for (ino, idx) in part { out.append(Slice.decodeAll(try store.chunk(tx, ino, idx))) }
            }
            return out
        }
    }

    @_specialize(where S == RedisTxnStore)
    package func getattrs(_ inos: [Ino]) throws(FSError) -> [Attr?] {
        try store.transaction(write: false) { (tx) throws(FSError) in
            var out: [Attr?] = []
            out.reserveCapacity(inos.count)
            for start in stride(from: 0, to: inos.count, by: chunkBatch) {
                let part = inos[start..<min(inos.count, start + chunkBatch)]
                try store.prefetch(tx, part.map { .attr($0) })
                for ino in part { out.append(try store.attr(tx, ino)) }
            }
            return out
        }
    }

    /// A growth of the file uses what session `sid` reserved for it (`reserveSpace`) first;
    /// the rest is checked against its quotas.
    @_specialize(where S == RedisTxnStore)
    package func writeSlice(_ ino: Ino, _ index: UInt32, _ slice: Slice, minSize: UInt64, mtime: Timespec, sid: UInt64) throws(FSError) -> Attr {
        let claimed = claimReservation(sid, ino)
        // (What a run of the body used: the committed run's is the last. The transaction's
        // result is the attributes alone: a gateway saves them with the request's id.)
        var used: Int64 = 0
        do {
            let a = try store.transaction(write: true) { (tx) throws(FSError) -> Attr in
                // (Whether chunk 0 has records decides where a store keeps its first one.)
                try store.prefetch(tx, index == 0 ? [.attr(ino), .chunk(ino, 0), quotaKindsRead] : [.attr(ino), quotaKindsRead])
                guard var a = try store.attr(tx, ino) else { throw FSError.notFound }
                guard a.type == .regular else { throw FSError.invalid }
                try store.appendChunk(tx, ino, index, slice.encoded())
                used = 0
                if minSize > a.size {
                    let growth = align4K(minSize) - align4K(a.size)
                    let keys = try quotaKeys(tx, ino, a)
                    try addToVolume(tx, space: growth, inodes: 0, enforce: true)
                    if let claimed { used = min(growth, claimed.bytes) }
                    if !keys.isEmpty || used > 0 {
                        try addToQuotas(tx, keys.map { ($0, growth, 0) } + (claimed?.keys ?? []).map { ($0, -used, 0) }, enforce: true)
                    }
                    a.size = minSize
                }
                a.mtime = mtime
                a.ctime = max(a.ctime, mtime)
                try store.putAttr(tx, ino, a)
                return a
            }
            if var claimed {
                claimed.bytes -= used
                returnReservation(sid, ino, claimed)
            }
            return a
        } catch {
            if let claimed { returnReservation(sid, ino, claimed) }
            throw error
        }
    }

    package func newSliceIDs(_ count: Int) throws(FSError) -> UInt64 {
        try store.reserveIDs(nil, "nextSlice", count)
    }

    package func pendingDeletes(limit: Int) throws(FSError) -> [PendingDelete] {
        try store.transaction(write: false) { (tx) throws(FSError) in try store.pendingDeletes(tx, limit: limit) }
    }

    package func finishDelete(_ pending: PendingDelete) throws(FSError) -> (slices: [Slice], done: Bool) {
        try store.transaction(write: true) { (tx) throws(FSError) in
            var out: [Slice] = []
            try store.prefetch(tx, [.chunkList(pending.ino, from: 0, limit: chunkBatch), .setting("slicesShared")])
            let idxs = try store.chunkIndexes(tx, pending.ino, from: 0, limit: chunkBatch, descending: false)
            try store.prefetch(tx, idxs.map { .chunk(pending.ino, $0) })
            for idx in idxs { out += Slice.decodeAll(try store.deleteChunk(tx, pending.ino, idx)) }
            out = try unreferenced(tx, out)
            if idxs.count == chunkBatch { return (out, false) }
            try store.removePendingDelete(tx, pending)
            return (out, true)
        }
    }

    @_specialize(where S == RedisTxnStore)
    package func finishDeletes(limit: Int) throws(FSError) -> (slices: [Slice], more: Bool) {
        try store.transaction(write: true) { (tx) throws(FSError) -> ([Slice], Bool) in
            try store.prefetch(tx, [.pendingDeletes(limit: limit, chunks: chunkBatch), .setting("slicesShared")])
            let pending = try store.pendingDeletes(tx, limit: limit)
            var out: [Slice] = []
            var budget = chunkBatch
            for p in pending {
                // The files share the budget in order (what the prefetch read).
                let idxs = try store.chunkIndexes(tx, p.ino, from: 0, limit: budget, descending: false)
                try store.prefetch(tx, idxs.map { .chunk(p.ino, $0) })
                for idx in idxs { out += Slice.decodeAll(try store.deleteChunk(tx, p.ino, idx)) }
                if idxs.count == budget { return (try unreferenced(tx, out), true) }
                budget -= idxs.count
                try store.removePendingDelete(tx, p)
            }
            return (try unreferenced(tx, out), pending.count == limit)
        }
    }

    @_specialize(where S == RedisTxnStore)
    package func takeDroppedSlices(limit: Int) throws(FSError) -> [Slice] {
        try store.transaction(write: true) { (tx) throws(FSError) in
            try unreferenced(tx, Slice.decodeAll(try store.takeDroppedSlices(tx, limit: limit)))
        }
    }

    // MARK: locks

    package func updateLocks(_ ino: Ino, kind: UInt8, sid: UInt64, _ body: ([UInt8]) throws(FSError) -> [UInt8]?) throws(FSError) {
        try store.transaction(write: true) { (tx) throws(FSError) in
            try store.prefetch(tx, [.attr(ino), .locks(ino, kind)])
            guard try store.attr(tx, ino) != nil else { throw FSError.notFound }
            if let table = try body(try store.locks(tx, ino, kind)) { try store.putLocks(tx, ino, kind, table, sid: sid) }
        }
    }
}

let trustedPrefix = Array("trusted.".utf8)
let userPrefix = Array("user.".utf8)
let systemPrefix = Array("system.".utf8)

/// The statfs figures of a volume: its capacity and inode limit, or without them 1 PiB and 10
/// billion inodes (like JuiceFS).
func makeStatFS(usedSpace: UInt64, usedInodes: UInt64, capacity: UInt64 = 0, inodeLimit: UInt64 = 0) -> StatFS {
    let total = max(capacity > 0 ? capacity : UInt64(1) << 50, usedSpace)
    let inodeTotal = max(inodeLimit > 0 ? inodeLimit : UInt64(10_000_000_000), usedInodes)
    return StatFS(
        totalSpace: total, availSpace: total - usedSpace, usedSpace: usedSpace, usedInodes: usedInodes, availInodes: inodeTotal - usedInodes)
}

/// The namespace an extended attribute name falls in.
enum XattrNamespace {
    case user, trusted, security, system, unknown

    init(_ name: [UInt8]) {
        if name.starts(with: userPrefix) {
            self = .user
        } else if name.starts(with: trustedPrefix) {
            self = .trusted
        } else if name.starts(with: securityPrefix) {
            self = .security
        } else if name.starts(with: systemPrefix) {
            self = .system
        } else {
            self = .unknown
        }
    }

    var prefixLength: Int {
        switch self {
        case .user: return userPrefix.count
        case .trusted: return trustedPrefix.count
        case .security: return securityPrefix.count
        case .system: return systemPrefix.count
        case .unknown: return 0
        }
    }
}

let securityPrefix = Array("security.".utf8)

/// Rules for reading an extended attribute, in the order Linux applies them to ext4: the
/// name's length (the syscall), `xattr_permission` (security and system names unchecked,
/// trusted only for root, user only on files and directories, then read permission), then the
/// handler (an unknown namespace is unsupported, an empty name after the prefix invalid).
func xattrReadCheck(_ a: Attr, _ cred: Credential, _ name: [UInt8]) throws(FSError) {
    if name.isEmpty || name.count > 255 { throw FSError.range }
    let ns = XattrNamespace(name)
    switch ns {
    case .security, .system: break
    case .trusted: if !cred.isRoot { throw FSError.noAttr }
    case .user:
        if a.type != .regular && a.type != .directory { throw FSError.noAttr }
        try Posix.check(a, cred, .read)
    case .unknown: try Posix.check(a, cred, .read)
    }
    try xattrHandlerCheck(ns, name)
}

/// Rules for setting or removing an extended attribute (as `xattrReadCheck`, plus the
/// capability module's refusal of security names to non-root callers, and sticky directories
/// whose user attributes only their owner changes).
///
/// One exception: the owner or a writer of a file may remove its security.capability. The
/// kernel does that itself, with the writer's credentials, when a file with a capability is
/// written, truncated or given away (ext4 drops it then); a removexattr call of a process
/// without CAP_SETFCAP is refused by the kernel before it reaches a file system.
func xattrWriteCheck(_ a: Attr, _ cred: Credential, _ name: [UInt8], removing: Bool = false) throws(FSError) {
    if name.isEmpty || name.count > 255 { throw FSError.range }
    let ns = XattrNamespace(name)
    switch ns {
    case .security, .system: break
    case .trusted: if !cred.isRoot { throw FSError.perm }
    case .user:
        if a.type != .regular && a.type != .directory { throw FSError.perm }
        if a.type == .directory && a.mode & 0o1000 != 0 && !cred.isRoot && cred.uid != a.uid { throw FSError.perm }
        try Posix.check(a, cred, .write)
    case .unknown: try Posix.check(a, cred, .write)
    }
    if ns == .security && !cred.isRoot {
        let killpriv = removing && name == capabilityXattr && a.type == .regular && (cred.uid == a.uid || Posix.mayAccess(a, cred, .write))
        if !killpriv { throw FSError.perm }
    }
    try xattrHandlerCheck(ns, name)
}

let capabilityXattr = Array("security.capability".utf8)

/// What ext4's handler lookup refuses: namespaces it has no handler for (`system.` holds only
/// POSIX ACLs, which StageFS does not support) and an empty name after the prefix.
private func xattrHandlerCheck(_ ns: XattrNamespace, _ name: [UInt8]) throws(FSError) {
    if ns == .unknown || ns == .system { throw FSError.notSupported }
    if name.count == ns.prefixLength { throw FSError.invalid }
}

/// The volume's own secrets that only servers of the volume (gateways) read: they live in the
/// metadata store, which in a multi-tenant set-up no user reaches.
package protocol VolumeSecrets: AnyObject, Sendable {
    /// The secret `name` (`bytes` random bytes), created by the first caller when missing; every
    /// later caller, of any process, gets the same bytes.
    func volumeSecret(_ name: String, bytes: Int) throws(FSError) -> [UInt8]
}

/// What a gateway asks of an engine beyond `MetadataEngine`.
extension TxnMetadata: OpenChecks {
    package func openState(_ sid: UInt64, _ ino: Ino) throws(FSError) -> (opens: Int, attr: Attr?) {
        try store.transaction(write: false) { (tx) throws(FSError) in
            try store.prefetch(tx, [.attr(ino)])
            return (try store.openCount(tx, sid, ino), try store.attr(tx, ino))
        }
    }
}

/// Whether a session holds a file open, as the engine records it (which does not say for what:
/// reading, writing), and the file's attributes, in one read.
package protocol OpenChecks: AnyObject, Sendable {
    func openState(_ sid: UInt64, _ ino: Ino) throws(FSError) -> (opens: Int, attr: Attr?)
}

extension TxnMetadata: VolumeSecrets {
    package func volumeSecret(_ name: String, bytes: Int) throws(FSError) -> [UInt8] {
        let fresh = Sys.randomBytes(bytes).map { String($0, radix: 16).leftPadded(2) }.joined()
        let text = try store.transaction(write: true) { (tx) throws(FSError) -> String in
            if let t = try store.setting(tx, "secret_" + name) { return t }
            try store.setSetting(tx, "secret_" + name, fresh)
            return fresh
        }
        var out: [UInt8] = []
        var i = text.startIndex
        while i < text.endIndex, let j = text.index(i, offsetBy: 2, limitedBy: text.endIndex), let b = UInt8(text[i..<j], radix: 16) {
            out.append(b)
            i = j
        }
        guard out.count == bytes else { throw FSError(EIO, "damaged metadata: the volume's secret '\(name)' is not \(bytes) hex bytes") }
        return out
    }
}

extension String {
    fileprivate func leftPadded(_ n: Int) -> String { count >= n ? self : String(repeating: "0", count: n - count) + self }
}
