import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// What a client tells the metadata engine about itself when it starts a session.
public struct SessionInfo: Sendable, Codable, Equatable {
    public var sid: UInt64
    public var hostname: String
    public var pid: Int32
    public var mountPoint: String
    public var version: String
    /// Seconds since the epoch of the session start and of its last heartbeat.
    public var started: Int64
    public var heartbeat: Int64
    /// Whose session it is, as a gateway authenticated it (nil: a direct client, unchecked).
    public var uid: UInt32?

    public init(sid: UInt64 = 0, hostname: String, pid: Int32, mountPoint: String, version: String, started: Int64 = 0, heartbeat: Int64 = 0) {
        self.sid = sid
        self.hostname = hostname
        self.pid = pid
        self.mountPoint = mountPoint
        self.version = version
        self.started = started
        self.heartbeat = heartbeat
    }
}

/// What a rename did: the inode it moved, the inode the destination named before (replaced
/// or exchanged; 0 when there was none), and what a replaced inode lost.
public struct RenameResult: Sendable, Equatable {
    public var moved: Ino
    public var other: Ino
    public var removed: RemovedName?

    package init(moved: Ino, other: Ino, removed: RemovedName?) {
        self.moved = moved
        self.other = other
        self.removed = removed
    }
}

/// What an unlink (or a rename that replaced a file) did to the inode it removed a name of.
public struct RemovedName: Sendable, Equatable {
    public var ino: Ino
    public var attr: Attr
    /// The inode has no links left and nobody has it open: its data is queued for deletion.
    public var freed: Bool

    package init(ino: Ino, attr: Attr, freed: Bool) {
        self.ino = ino
        self.attr = attr
        self.freed = freed
    }
}

/// The metadata engine: an atomic, permission-checking POSIX namespace plus the chunk records
/// of files, sessions and locks. `SQLiteMetadata` and `RedisTxnMetadata` (both `TxnMetadata`)
/// implement it; the conformance suite runs against both.
///
/// Methods block (they run on FUSE or worker threads, never on the Swift concurrency pool).
/// Every method throws `FSError` with the errno ext4 would give.
public protocol MetadataEngine: AnyObject, Sendable {
    /// "SQLite database /path" or "Redis at host:port/db", for messages.
    var displayName: String { get }

    // MARK: volume
    /// The format record, or nil when the metadata store was never formatted.
    func loadFormat() throws(FSError) -> VolumeFormat?
    /// Writes the format record and creates the root directory (mode `rootMode`, owned by
    /// root) when it is missing. An existing record with other settings is refused unless `force`.
    func initialize(_ format: VolumeFormat, force: Bool, rootMode: UInt16) throws(FSError)
    /// Space and inode usage.
    func statfs() throws(FSError) -> StatFS
    /// As `df` in directory `ino` shows them: the innermost directory quota's with a limit that
    /// counts it, else the volume's.
    func statfs(_ ino: Ino) throws(FSError) -> StatFS

    // MARK: quotas
    /// Whether the volume has quotas (read again at most every `quotaInterval` seconds): a
    /// client reserves space ahead of its writes only then.
    func hasQuotas() throws(FSError) -> Bool
    /// Charges `bytes` to the quotas of `ino` ahead of writes that session `sid` buffers
    /// (`EDQUOT` when they do not fit); the session's commits of `ino` use it up, the rest goes
    /// back with `releaseSpace` or when the session ends. False: no quota counts the file.
    func reserveSpace(_ ino: Ino, sid: UInt64, bytes: Int64) throws(FSError) -> Bool
    func releaseSpace(_ ino: Ino, sid: UInt64) throws(FSError)

    // MARK: sessions
    /// Registers a client; returns its session id.
    func newSession(_ info: SessionInfo) throws(FSError) -> UInt64
    /// Marks the session alive now.
    func heartbeat(_ sid: UInt64) throws(FSError)
    /// Ends a session: its opens and locks are dropped, unlinked files it held are freed.
    func closeSession(_ sid: UInt64) throws(FSError)
    /// Live and stale sessions.
    func listSessions() throws(FSError) -> [SessionInfo]
    /// Ends sessions whose heartbeat is older than `age` seconds; returns how many.
    func cleanStaleSessions(age: Int64) throws(FSError) -> Int

    // MARK: namespace
    func lookup(_ cred: Credential, _ parent: Ino, _ name: [UInt8]) throws(FSError) -> (Ino, Attr)
    func getattr(_ ino: Ino) throws(FSError) -> Attr
    /// What this client last knew of `ino`'s attributes, without asking the server: right
    /// after its own change, exactly what that change committed. nil when it knows nothing
    /// (or keeps nothing: SQLite). For a cache that accepts other clients' changes showing late.
    func recentAttr(_ ino: Ino) -> Attr?
    /// Changes attributes with the ownership and permission rules of ext4; a size change truncates.
    func setattr(_ cred: Credential, _ ino: Ino, _ req: SetAttrRequest) throws(FSError) -> Attr
    /// Checks access(2)-style permission for `mask`.
    func access(_ cred: Credential, _ ino: Ino, _ mask: AccessMask) throws(FSError)
    /// Creates a regular file, fifo, socket, device node, directory or symlink (`target` set).
    /// `mode` holds the permission bits after the umask.
    func mknod(
        _ cred: Credential, _ parent: Ino, _ name: [UInt8], _ type: FileType, _ mode: UInt16, rdev: UInt32, target: [UInt8]?
    )
        throws(FSError) -> (Ino, Attr)
    /// Creates a regular file and records it open by session `sid`, in one operation.
    func create(_ cred: Credential, _ parent: Ino, _ name: [UInt8], _ mode: UInt16, sid: UInt64) throws(FSError) -> (Ino, Attr)
    func unlink(_ cred: Credential, _ parent: Ino, _ name: [UInt8]) throws(FSError) -> RemovedName
    /// Removes an empty directory; returns it as it was left (no links, ctime now).
    func rmdir(_ cred: Credential, _ parent: Ino, _ name: [UInt8]) throws(FSError) -> RemovedName
    /// rename/renameat2: which inodes it touched and what a replaced destination lost.
    func rename(
        _ cred: Credential, _ srcParent: Ino, _ srcName: [UInt8], _ dstParent: Ino, _ dstName: [UInt8], _ flags: RenameFlags
    )
        throws(FSError) -> RenameResult
    func link(_ cred: Credential, _ ino: Ino, _ parent: Ino, _ name: [UInt8]) throws(FSError) -> Attr
    func readlink(_ ino: Ino) throws(FSError) -> [UInt8]
    /// Entries after position `cookie` (0 for the start), at most `limit`, with attributes when
    /// `plus`, and with `xattrs` too whether each has extended attributes (`DirEntry.hasXattrs`;
    /// an engine that cannot tell cheaply leaves it nil). Positions stay valid while the
    /// directory changes.
    func readdir(_ ino: Ino, after cookie: UInt64, limit: Int, plus: Bool, xattrs: Bool) throws(FSError) -> [DirEntry]

    // MARK: extended attributes
    func getxattr(_ cred: Credential, _ ino: Ino, _ name: [UInt8]) throws(FSError) -> [UInt8]
    func listxattr(_ cred: Credential, _ ino: Ino) throws(FSError) -> [[UInt8]]
    func setxattr(_ cred: Credential, _ ino: Ino, _ name: [UInt8], _ value: [UInt8], _ flag: XattrFlag) throws(FSError)
    func removexattr(_ cred: Credential, _ ino: Ino, _ name: [UInt8]) throws(FSError)

    // MARK: file data
    /// Checks permission for the open flags and records that session `sid` holds the file open.
    /// Also returns the slice records of the first chunk of a regular file (nil otherwise), so
    /// reading a small file needs no further metadata round trip.
    func open(_ cred: Credential, _ ino: Ino, flags: Int32, sid: UInt64) throws(FSError) -> (Attr, [Slice]?)
    /// Drops one open of `ino` by `sid`; a file unlinked meanwhile is freed at its last close.
    /// Returns whether it freed the file (its data then waits in `pendingDeletes`).
    @discardableResult func close(_ ino: Ino, sid: UInt64) throws(FSError) -> Bool
    /// Many closes at once (one commit on the transactional engines), each as `close`: whether
    /// each freed its file, in the order given.
    func close(_ closes: [(ino: Ino, sid: UInt64)]) throws(FSError) -> [Bool]
    /// The slice records of chunk `index`, oldest first.
    func readChunk(_ ino: Ino, _ index: UInt32) throws(FSError) -> [Slice]
    /// Many chunks at once (one pipelined round trip on Redis), in the order asked.
    func readChunks(_ chunks: [(Ino, UInt32)]) throws(FSError) -> [[Slice]]
    /// Many inodes' attributes at once (nil for a missing inode), in the order asked.
    func getattrs(_ inos: [Ino]) throws(FSError) -> [Attr?]
    /// Appends a slice to chunk `index`, extends the size to at least `minSize`, sets mtime to
    /// `mtime` (when the data was written) and moves ctime forward to it. A growth uses what
    /// session `sid` reserved for the file first; the rest is checked against its quotas.
    func writeSlice(_ ino: Ino, _ index: UInt32, _ slice: Slice, minSize: UInt64, mtime: Timespec, sid: UInt64) throws(FSError) -> Attr
    /// fallocate(2) of a file open for writing (`TxnMetadata.fallocate`): `zero` for
    /// `FALLOC_FL_PUNCH_HOLE` and `FALLOC_FL_ZERO_RANGE`, `keepSize` for `FALLOC_FL_KEEP_SIZE`.
    func fallocate(_ cred: Credential, _ ino: Ino, zero: Bool, keepSize: Bool, offset: UInt64, length: UInt64) throws(FSError) -> Attr
    /// copy_file_range(2) between files of the volume, one bounded step, sharing the source's
    /// slices instead of copying bytes (`TxnMetadata.copyRange`): the bytes copied (0 at the
    /// source's end) and the destination's attributes.
    func copyRange(_ cred: Credential, src: Ino, srcOff: UInt64, dst: Ino, dstOff: UInt64, length: UInt64) throws(FSError) -> (UInt64, Attr)
    /// One bounded step of purging expired trash by the client holding the trash lease
    /// (`TxnMetadata.purgeExpiredTrash`); 0 where another does it (a gateway's clients).
    func purgeExpiredTrash(holder: UInt64, limit: Int) throws(FSError) -> Int
    /// Reserves `count` consecutive slice ids; returns the first.
    func newSliceIDs(_ count: Int) throws(FSError) -> UInt64
    /// Files waiting for their data to be deleted.
    func pendingDeletes(limit: Int) throws(FSError) -> [PendingDelete]
    /// Removes the chunk records of a pending delete, at most `chunkBatch` chunks per call,
    /// returning the slices they held; `done` once nothing is left (the entry is gone then).
    func finishDelete(_ pending: PendingDelete) throws(FSError) -> (slices: [Slice], done: Bool)
    /// Removes the chunk records of up to `limit` pending deletes in one step (at most
    /// `chunkBatch` chunks in all), returning the slices they held; `more` when files may be
    /// left. What a deleter runs: on Redis one read and one commit for a batch of small files.
    func finishDeletes(limit: Int) throws(FSError) -> (slices: [Slice], more: Bool)
    /// Slices dropped by truncation whose objects wait to be deleted (removed from the queue).
    func takeDroppedSlices(limit: Int) throws(FSError) -> [Slice]

    // MARK: locks
    /// Atomically reads and replaces the lock table of `ino` (`kind` 'p' for POSIX record locks,
    /// 'f' for flock). `body` gets the current encoded table and returns the new one (nil: unchanged)
    /// and a result; `sid` is recorded so a dead session's locks can be dropped.
    func updateLocks(_ ino: Ino, kind: UInt8, sid: UInt64, _ body: ([UInt8]) throws(FSError) -> [UInt8]?) throws(FSError)
    /// `F_GETLK`: the first lock of another owner that conflicts with `type` on `start...end`.
    /// (The engines share one implementation over `updateLocks`; a gateway's client asks its gateway.)
    func getlk(_ ino: Ino, sid: UInt64, owner: UInt64, type: LockType, start: UInt64, end: UInt64) throws(FSError) -> LockRange?
    /// `F_SETLK`: takes, changes or releases (`.unlock`) a record lock; `EAGAIN` on conflict.
    func setlk(_ ino: Ino, sid: UInt64, owner: UInt64, pid: UInt32, type: LockType, start: UInt64, end: UInt64) throws(FSError)
    /// `flock(2)`: shared (`.read`), exclusive (`.write`) or unlock; `EAGAIN` on conflict.
    func flock(_ ino: Ino, sid: UInt64, owner: UInt64, pid: UInt32, type: LockType) throws(FSError)
}

/// What waits for deletion: files whose last link and open went away, slices cut off by truncation.
public struct Deletions: OptionSet, Sendable {
    public let rawValue: Int
    public init(rawValue: Int) { self.rawValue = rawValue }
    public static let files = Deletions(rawValue: 1)
    public static let slices = Deletions(rawValue: 2)
    public static let all: Deletions = [.files, .slices]
}

extension MetadataEngine {
    /// `readdir` without asking whether each entry has extended attributes.
    public func readdir(_ ino: Ino, after cookie: UInt64, limit: Int, plus: Bool) throws(FSError) -> [DirEntry] {
        try readdir(ino, after: cookie, limit: limit, plus: plus, xattrs: false)
    }

    /// Takes what nothing references any more off the deletion queues, in bounded steps, and
    /// hands each slice whose objects are to go to `delete`: files (`what` has `.files`) up to
    /// 100 per step, at most `limit` steps and about `seconds`; then up to `limit` slices cut off
    /// by truncation. Returns what was left for a later round (files, when time ran out).
    package func collectDeleted(
        _ what: Deletions = .all, limit: Int = 1000, seconds: Double = 2, _ delete: (Slice) -> Void
    ) throws(FSError) -> Deletions {
        var left: Deletions = []
        if what.contains(.files) {
            let start = Sys.monotonicNanos()
            for _ in 0..<limit {
                let (slices, more) = try finishDeletes(limit: min(limit, 100))
                for s in slices { delete(s) }
                if !more { break }
                if Double(Sys.monotonicNanos() - start) / 1e9 > seconds {
                    left.insert(.files)
                    break
                }
            }
        }
        if what.contains(.slices) {
            for s in try takeDroppedSlices(limit: limit) { delete(s) }
        }
        return left
    }

    package func purgeExpiredTrash(holder: UInt64, limit: Int) throws(FSError) -> Int { 0 }

    public func statfs(_ ino: Ino) throws(FSError) -> StatFS { try statfs() }
    public func hasQuotas() throws(FSError) -> Bool { false }
    public func reserveSpace(_ ino: Ino, sid: UInt64, bytes: Int64) throws(FSError) -> Bool { false }
    public func releaseSpace(_ ino: Ino, sid: UInt64) throws(FSError) {}

    package func close(_ closes: [(ino: Ino, sid: UInt64)]) throws(FSError) -> [Bool] {
        var freed: [Bool] = []
        for c in closes { freed.append(try close(c.ino, sid: c.sid)) }
        return freed
    }

    /// The volume's format record; a clear error when the store was never formatted.
    public func requireFormat() throws(FSError) -> VolumeFormat {
        guard let f = try loadFormat() else {
            throw FSError(EINVAL, "\(displayName) holds no StageFS volume: run 'stagefs format' first")
        }
        if f.version > VolumeFormat.currentVersion {
            throw FSError(
                EINVAL,
                "volume '\(f.name)' has format version \(f.version), newer than this StageFS knows (\(VolumeFormat.currentVersion)): upgrade stagefs")
        }
        if f.version == 4 {
            throw FSError(
                EINVAL,
                "volume '\(f.name)' has format version 4, the layout of a development build of StageFS that this one does not read: dump it with that build and load the dump into a volume formatted by this one"
            )
        }
        if !["none", "lz4", "zstd"].contains(f.compressionName) {
            throw FSError(
                EINVAL,
                "volume '\(f.name)' stores its blocks compressed with '\(f.compressionName.prefix(40))', which this StageFS does not know: upgrade stagefs"
            )
        }
        if f.version < 2 && displayName.hasPrefix("Redis") {
            throw FSError(
                EINVAL,
                "volume '\(f.name)' was formatted by StageFS 0.1, whose Redis layout has no chunk index (format version 1): format a new volume and copy the data over"
            )
        }
        return f
    }
}

/// Opens the engine a META-URL names.
/// `create` allows a new SQLite database file (formatting); otherwise a missing one is an error.
/// `retryTimeout`: seconds a Redis call keeps retrying while the server cannot be reached (a
/// restart, a failover) before it fails with `EIO`; the first contact is not retried.
/// `tracking` (Redis): a client cache kept coherent by Redis's client tracking answers lookups
/// and getattr (`RedisTxnCache`).
public func openMetadata(
    _ url: MetaURL, create: Bool = false, retryTimeout: Double = 60, tracking: Bool = false
) throws(FSError) -> any MetadataEngine {
    switch url {
    case .sqlite(let path): return try SQLiteMetadata(path: path, create: create)
    case .redis(let location): return try RedisTxnMetadata(location: location, retryTimeout: retryTimeout, tracking: tracking)
    case .gateway: throw FSError.usage("\(url) names a gateway: this command needs the volume's own META-URL (an admin's)")
    }
}

/// The most chunks one metadata step drops (a truncate or the deletion of a file's records
/// goes on in further steps): no step's work grows with a file's size.
package let chunkBatch = 1000

/// How many ancestors a cross-directory rename of a directory checks at most (the walk that
/// refuses moving a directory into itself).
package let maxRenameDepth = 4096

/// Extended attributes one inode may have (ext4 fits its attributes in one block; a new
/// attribute beyond this fails with `ENOSPC` as it does there).
package let maxXattrsPerInode = 1024

/// Bytes of names and values all extended attributes of one inode may take together: a
/// setxattr that would grow them past it fails with `ENOSPC`, as on ext4 once an inode's
/// attributes no longer fit its 4 KiB block. It bounds what one inode costs the shared metadata
/// store (a value of the largest size the syscall allows, 64 KiB, does not fit with its name).
package let maxXattrBytesPerInode = 65536

/// Checks a name for create-like operations.
func validateName(_ name: [UInt8]) throws(FSError) {
    if name.isEmpty || name.contains(0) || name.contains(UInt8(ascii: "/")) { throw FSError.invalid }
    if name.count > maxNameLength { throw FSError.nameTooLong }
    if name == [UInt8(ascii: ".")] || name == [UInt8(ascii: "."), UInt8(ascii: ".")] { throw FSError.exists }
}

/// Space an inode's size accounts for in statfs (4 KiB granules).
@inline(__always)
package func align4K(_ size: UInt64) -> Int64 { Int64((size + 4095) & ~4095) }

/// Which access the open flags ask for.
package func accessMask(openFlags flags: Int32) -> AccessMask {
    var mask: AccessMask = []
    switch flags & O_ACCMODE {
    case O_RDONLY: mask = .read
    case O_WRONLY: mask = .write
    default: mask = [.read, .write]
    }
    if flags & O_TRUNC != 0 { mask.insert(.write) }
    return mask
}
