import SQLiteKit
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// Settings of the node-local block cache.
public struct DiskCacheConfig: Sendable {
    /// Cache roots; blocks are spread across them by key. Every process sharing a cache must
    /// name the same roots in the same order.
    public var dirs: [String]
    /// Bytes the cache may hold (0 disables it).
    public var capacity: Int
    /// Fraction of each cache file system kept free; blocks are evicted to keep it.
    public var freeSpaceRatio: Double

    public init(dirs: [String], capacity: Int, freeSpaceRatio: Double = 0.1) {
        self.dirs = dirs
        self.capacity = capacity
        self.freeSpaceRatio = freeSpaceRatio
    }
}

/// How much of the cache is in use.
public struct CacheUsage: Sendable, Equatable {
    public var bytes: Int
    public var blocks: Int
    public var pinnedBytes: Int
}

/// How much of a cache a set of blocks can have (bytes as stored: blocks with their checksums).
public struct CacheRoom: Sendable, Equatable {
    /// The size limit (--cache-size).
    public var capacity: Int
    /// A lower limit set by the free-space ratio of the cache's file systems, if there is one.
    public var fileSystemLimit: Int?
    /// Bytes pinned by jobs in blocks outside the set.
    public var pinnedOutside: Int
    /// Jobs holding pins in this user's cache (at most 20).
    public var pinningJobs: [String]

    /// Bytes the set can have.
    public var available: Int { max(0, min(capacity, fileSystemLimit ?? capacity) - pinnedOutside) }
}

/// Blocks on node-local disk, shared safely by every process of one user on the node (a mount,
/// `stagefs stage`, a second job).
///
/// Layout: `<root>/<uid>/` (mode 0700, owned by the user) holds `index.db` (in the first root) and
/// per volume `<volume uuid>/`. A block larger than 64 KiB is a file named like its object key:
/// the block, then a trailer of CRC-32C checksums (one per 64 KiB), written under a temporary
/// name and renamed. Smaller blocks are appended to **pack files** (`<volume uuid>/packs/<id>`,
/// one being written per process), each followed by its CRC-32C: millions of 4 KiB files cost a
/// few large files instead of millions of inodes and file creations. Every read verifies the
/// checksums of what it returns, so a torn or corrupted block is dropped and fetched again,
/// never served.
///
/// The index (SQLite, WAL) records each block's size, location and last use, survives restarts
/// (no scan of the files), and records pins: blocks staged for a job are not evicted until the
/// job releases them. Least recently used unpinned blocks are evicted to honour the size limit
/// and the free-space ratio; a pack file is deleted once none of its blocks is left. New entries
/// and access times are written in batches.
public final class DiskCache: @unchecked Sendable {
    public static let pieceSize = 64 << 10
    /// Blocks up to this size go to pack files.
    public static let packedLimit = 64 << 10
    /// A pack file is closed for writing at this size.
    static let packSize = 64 << 20
    static let magic: UInt32 = 0x3143_4653  // "SFC1" little-endian

    /// Where a block is: its own file (pack 0) or at `off` in pack `pack`.
    struct Location: Equatable {
        var pack: Int64
        var off: Int64
        /// The bytes of the block (as stored).
        var length: Int = 0
    }

    struct Pending {
        var indexKey: String
        var size: Int
        var job: String?
        var file: String?
        var location: Location
    }

    public let config: DiskCacheConfig
    /// `<root>/<uid>` for each root.
    public let userDirs: [String]
    let volume: String
    let index: SQLiteConnection
    let lock = ConditionLock()
    var accessed: [String: Int64] = [:]
    var lastFlush = Sys.monotonicNanos()
    var putsSinceSpaceCheck = 0
    /// Blocks written but not yet in the index.
    var pending: [Pending] = []
    var pendingLocations: [String: Location] = [:]
    var pendingBytes = 0
    var lastIndexFlush = Sys.monotonicNanos()
    /// The pack file this process appends to: (id, descriptor, next offset).
    var writing: (id: Int64, fd: Int32, end: Int64)?
    let packLock = ConditionLock()
    var readFDs: [Int64: Int32] = [:]
    /// Block files written past the page cache (`writeFile`).
    let direct = DirectWrites()

    /// The cache of one volume (`volumeUUID`) in the given roots, for the calling user. Without a
    /// volume only the index is usable (job pins, usage).
    public init(config: DiskCacheConfig, volumeUUID: String?) throws(FSError) {
        guard !config.dirs.isEmpty else { throw FSError.usage("no cache directory given") }
        self.config = config
        volume = volumeUUID ?? "-"
        var dirs: [String] = []
        for root in config.dirs {
            let dir = try DiskCache.prepareUserDir(root: root, uid: getuid(), gid: getgid())
            // Paths below `dir` are safe to use as they are: it is checked to be this user's
            // own 0700 directory in a root that no other user can rename it out of.
            if let volumeUUID { try Sys.mkdirs("\(dir)/\(volumeUUID)/packs", 0o700) }
            dirs.append(dir)
        }
        userDirs = dirs
        let indexPath = "\(dirs[0])/index.db"
        let fresh = Sys.stat(indexPath) == nil
        do {
            index = try SQLiteConnection(path: indexPath, create: true)
            try index.exec("PRAGMA journal_mode=WAL")
            try index.exec("PRAGMA synchronous=NORMAL")
            try index.exec(
                """
                CREATE TABLE IF NOT EXISTS blocks(key TEXT PRIMARY KEY, size INTEGER NOT NULL, atime INTEGER NOT NULL,
                    pack INTEGER NOT NULL DEFAULT 0, off INTEGER NOT NULL DEFAULT 0);
                CREATE INDEX IF NOT EXISTS blocks_atime ON blocks(atime);
                CREATE TABLE IF NOT EXISTS packs(id INTEGER PRIMARY KEY AUTOINCREMENT, volume TEXT NOT NULL,
                    live INTEGER NOT NULL, writer INTEGER NOT NULL);
                CREATE TABLE IF NOT EXISTS pins(job TEXT NOT NULL, key TEXT NOT NULL, PRIMARY KEY(job, key)) WITHOUT ROWID;
                CREATE INDEX IF NOT EXISTS pins_key ON pins(key);
                CREATE TABLE IF NOT EXISTS stats(k TEXT PRIMARY KEY, v INTEGER NOT NULL);
                INSERT OR IGNORE INTO stats(k, v) VALUES('used', 0);
                """)
        } catch {
            throw error.context("cannot open the cache index of \(dirs[0])")
        }
        if fresh { try rebuildIndex() }
    }

    deinit {
        try? flushIndex()
        packLock.withLock {
            if let w = writing {
                Sys.close(w.fd)
                try? indexTransaction { () throws(FSError) in try index.query("UPDATE packs SET writer=0 WHERE id=?", [.int(w.id)]) }
            }
            for (_, fd) in readFDs { Sys.close(fd) }
        }
    }

    /// Makes `<root>/<uid>` a real directory owned by `uid` with mode 0700, by a walk on
    /// descriptors (`SafeDir.ownedDirectory`): a link there is never followed, and nothing is
    /// created, chowned or chmodded by path. The cache root must be owned by root (or by the
    /// caller) and sticky if others may write it, so once `<root>/<uid>` is checked nobody but
    /// its user and root can rename or replace it: that is why the rest of the cache (volume
    /// directories, `index.db`, temporary, block and pack files) uses plain paths below it.
    ///
    /// As root, another user's entry under that name (a directory made first, a planted link,
    /// a file) is moved aside and a fresh directory made in its place; an ordinary user cannot
    /// move it out of a sticky root, so that gets an error naming the entry's owner. A missing
    /// cache root is created, by root with mode 1777 (each user can make their own directory
    /// in it, like /tmp); root preparing another user's cache never creates the root.
    @discardableResult
    public static func prepareUserDir(root: String, uid: uid_t, gid: gid_t) throws(FSError) -> String {
        let dir = "\(root)/\(uid)"
        if getuid() != 0 || uid == 0 { try makeRoot(root) }
        let fd = try SafeDir.ownedDirectory(in: trustedRoot(root), "\(uid)", uid: uid, gid: gid, mode: 0o700)
        close(fd)
        return dir
    }

    /// Creates a missing cache root (and its parents) as the caller; one root creates is made
    /// mode 1777 through its descriptor, after checking it is root's directory.
    private static func makeRoot(_ root: String) throws(FSError) {
        var st = Glibc.stat()
        if lstat(root, &st) == 0 { return }
        if errno != ENOENT { throw FSError.errno(errno, "cannot use cache directory \(root)") }
        do {
            try Sys.mkdirs(Sys.dirname(of: root), 0o755)
        } catch {
            throw error.context("cannot create cache directory \(root)")
        }
        if mkdir(root, 0o755) != 0 {
            if errno == EEXIST { return }
            throw FSError.errno(errno, "cannot create cache directory \(root)")
        }
        guard getuid() == 0 else { return }
        let fd = Glibc.open(root, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        if fd < 0 { throw FSError.errno(errno, "cannot open cache directory \(root)") }
        defer { close(fd) }
        if fstat(fd, &st) == 0 && st.st_uid == 0 && fchmod(fd, 0o1777) != 0 {
            throw FSError.errno(errno, "cannot make cache directory \(root) mode 1777")
        }
    }

    /// The cache root to open: itself, or where it points when it is a symbolic link made by
    /// root or by the caller (a site's `/var/cache/stagefs` on another disk, a user's cache
    /// moved out of a small home). A link anyone else made is left for `SafeDir` to refuse.
    private static func trustedRoot(_ root: String) -> String {
        var st = Glibc.stat()
        guard lstat(root, &st) == 0, st.st_mode & S_IFMT == S_IFLNK, st.st_uid == 0 || st.st_uid == geteuid(),
            let real = realpath(root, nil)
        else { return root }
        defer { free(real) }
        return String(cString: real)
    }

    // MARK: names

    func dir(for key: String) -> String {
        if userDirs.count == 1 { return userDirs[0] }
        var h: UInt64 = 1_469_598_103_934_665_603
        for b in key.utf8 { h = (h ^ UInt64(b)) &* 1_099_511_628_211 }
        return userDirs[Int(h % UInt64(userDirs.count))]
    }

    /// The index key of an object key: `<volume uuid>/<object key>`.
    func indexKey(_ key: String) -> String { "\(volume)/\(key)" }

    /// The cache file of an object key (blocks over 64 KiB).
    public func path(_ key: String) -> String { "\(dir(for: key))/\(volume)/\(key)" }

    /// The pack file `id` of `vol`.
    func packPath(_ id: Int64, volume vol: String) -> String {
        "\(userDirs[Int(id % Int64(userDirs.count))])/\(vol)/packs/\(id)"
    }

    static func pieces(_ length: Int) -> Int { (length + pieceSize - 1) / pieceSize }

    static func packed(_ length: Int) -> Bool { length <= packedLimit }

    /// Bytes a block of `length` takes on disk: with its checksum trailer in a file, or with its
    /// checksum in a pack.
    public static func fileSize(_ length: Int) -> Int { packed(length) ? length + 4 : length + 4 * pieces(length) + 8 }

    /// The block length a block file of `size` bytes holds (its data, a checksum per piece, the
    /// count and the magic number), or nil when no length gives that size.
    static func blockLength(fileSize size: Int) -> Int? {
        guard size > packedLimit + 12 else { return nil }
        let n = (size - 8 + pieceSize + 3) / (pieceSize + 4)
        let length = size - 8 - 4 * n
        return length > packedLimit && pieces(length) == n ? length : nil
    }
}
