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
    private static let magic: UInt32 = 0x3143_4653  // "SFC1" little-endian

    /// Where a block is: its own file (pack 0) or at `off` in pack `pack`.
    struct Location: Equatable {
        var pack: Int64
        var off: Int64
    }

    private struct Pending {
        var indexKey: String
        var size: Int
        var job: String?
        var file: String?
        var location: Location
    }

    public let config: DiskCacheConfig
    /// `<root>/<uid>` for each root.
    public let userDirs: [String]
    private let volume: String
    private let index: SQLiteConnection
    private let lock = ConditionLock()
    private var accessed: [String: Int64] = [:]
    private var lastFlush = Sys.monotonicNanos()
    private var putsSinceSpaceCheck = 0
    /// Blocks written but not yet in the index.
    private var pending: [Pending] = []
    private var pendingLocations: [String: Location] = [:]
    private var pendingBytes = 0
    private var lastIndexFlush = Sys.monotonicNanos()
    /// The pack file this process appends to: (id, descriptor, next offset).
    private var writing: (id: Int64, fd: Int32, end: Int64)?
    private let packLock = ConditionLock()
    private var readFDs: [Int64: Int32] = [:]

    /// The cache of one volume (`volumeUUID`) in the given roots, for the calling user. Without a
    /// volume only the index is usable (job pins, usage).
    public init(config: DiskCacheConfig, volumeUUID: String?) throws(FSError) {
        guard !config.dirs.isEmpty else { throw FSError.usage("no cache directory given") }
        self.config = config
        volume = volumeUUID ?? "-"
        var dirs: [String] = []
        for root in config.dirs {
            let dir = try DiskCache.prepareUserDir(root: root, uid: getuid(), gid: getgid())
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

    /// Makes `<root>/<uid>` exist with mode 0700 and owner `uid`; refuses one owned by someone
    /// else. As root (preparing a cache for a user), creates and hands it over.
    @discardableResult
    public static func prepareUserDir(root: String, uid: uid_t, gid: gid_t) throws(FSError) -> String {
        let dir = "\(root)/\(uid)"
        if getuid() == 0 && uid != 0 {
            // Root working for a user (stage --as-user): never create or change the cache root
            // by path (a user may control a path); it must already be a site directory.
            let fd = try SafeDir.ownedDirectory(in: root, "\(uid)", uid: uid, gid: gid, mode: 0o700)
            close(fd)
            return dir
        }
        if Sys.stat(root) == nil {
            do {
                try Sys.mkdirs(root, 0o755)
                // A root-made shared cache root lets each user make their own directory, like /tmp.
                if getuid() == 0 { _ = chmod(root, 0o1777) }
            } catch {
                throw error.context("cannot create cache directory \(root)")
            }
        }
        if Sys.stat(dir) == nil {
            if mkdir(dir, 0o700) != 0 && errno != EEXIST {
                throw FSError.errno(errno, "cannot create cache directory \(dir)")
            }
        }
        guard let st = Sys.stat(dir), st.st_mode & S_IFMT == S_IFDIR else {
            throw FSError(ENOTDIR, "cache directory \(dir) is not a directory")
        }
        if st.st_uid != uid {
            throw FSError(EPERM, "cache directory \(dir) belongs to uid \(st.st_uid), not \(uid); remove it or pick another --cache-dir")
        }
        if st.st_mode & 0o077 != 0 { _ = chmod(dir, 0o700) }
        return dir
    }

    // MARK: names

    private func dir(for key: String) -> String {
        if userDirs.count == 1 { return userDirs[0] }
        var h: UInt64 = 1_469_598_103_934_665_603
        for b in key.utf8 { h = (h ^ UInt64(b)) &* 1_099_511_628_211 }
        return userDirs[Int(h % UInt64(userDirs.count))]
    }

    /// The index key of an object key: `<volume uuid>/<object key>`.
    private func indexKey(_ key: String) -> String { "\(volume)/\(key)" }

    /// The cache file of an object key (blocks over 64 KiB).
    public func path(_ key: String) -> String { "\(dir(for: key))/\(volume)/\(key)" }

    /// The pack file `id` of `vol`.
    private func packPath(_ id: Int64, volume vol: String) -> String {
        "\(userDirs[Int(id % Int64(userDirs.count))])/\(vol)/packs/\(id)"
    }

    static func pieces(_ length: Int) -> Int { (length + pieceSize - 1) / pieceSize }

    static func packed(_ length: Int) -> Bool { length <= packedLimit }

    /// Bytes a block of `length` takes on disk: with its checksum trailer in a file, or with its
    /// checksum in a pack.
    public static func fileSize(_ length: Int) -> Int { packed(length) ? length + 4 : length + 4 * pieces(length) + 8 }

    // MARK: lookups

    /// Where the index (or this process's pending writes) puts a packed block.
    private func location(_ key: String) -> Location? {
        let ik = indexKey(key)
        return lock.withLock { () -> Location? in
            if let l = pendingLocations[ik] { return l }
            var loc: Location?
            try? index.query("SELECT pack, off FROM blocks WHERE key=?", [.text(ik)]) { loc = Location(pack: Col.int($0, 0), off: Col.int($0, 1)) }
            return loc
        }
    }

    private func readFD(_ pack: Int64) -> Int32? {
        packLock.withLock { () -> Int32? in
            if let fd = readFDs[pack] { return fd }
            let fd = Glibc.open(packPath(pack, volume: volume), O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { return nil }
            if readFDs.count >= 256 {
                for (_, f) in readFDs { Sys.close(f) }
                readFDs.removeAll()
            }
            readFDs[pack] = fd
            return fd
        }
    }

    /// Whether a block is cached (packed blocks: indexed; others: a complete file exists).
    public func contains(_ key: String, length: Int) -> Bool {
        if DiskCache.packed(length) { return location(key) != nil }
        guard let st = Sys.stat(path(key)) else { return false }
        return Int(st.st_size) == DiskCache.fileSize(length)
    }

    /// Which of `blocks` (key, length) are cached, with one index query per 500 packed blocks.
    public func cached(_ blocks: [(String, Int)]) -> [Bool] {
        var out = [Bool](repeating: false, count: blocks.count)
        var packedAt: [String: [Int]] = [:]
        for (i, (key, length)) in blocks.enumerated() {
            if DiskCache.packed(length) {
                packedAt[indexKey(key), default: []].append(i)
            } else {
                out[i] = contains(key, length: length)
            }
        }
        let keys = Array(packedAt.keys)
        lock.withLock {
            for k in keys where pendingLocations[k] != nil { for i in packedAt[k]! { out[i] = true } }
            for start in stride(from: 0, to: keys.count, by: 500) {
                let part = Array(keys[start..<min(keys.count, start + 500)])
                let sql = "SELECT key FROM blocks WHERE key IN (\(Array(repeating: "?", count: part.count).joined(separator: ",")))"
                try? index.query(sql, part.map { .text($0) }) { row in
                    for i in packedAt[Col.text(row, 0)] ?? [] { out[i] = true }
                }
            }
        }
        return out
    }

    // MARK: reads

    /// Opens the cache file of `key` if it has the size a block of `length` gives.
    private func openChecked(_ key: String, length: Int) -> Int32? {
        let fd = Glibc.open(path(key), O_RDONLY | O_CLOEXEC)
        if fd < 0 { return nil }
        var st = Glibc.stat()
        if fstat(fd, &st) != 0 || Int(st.st_size) != DiskCache.fileSize(length) {
            Log.warning("cache file \(path(key)) has \(st.st_size) bytes, expected \(DiskCache.fileSize(length)); dropping it")
            Sys.close(fd)
            remove(key)
            return nil
        }
        return fd
    }

    /// Reads the checksums of pieces `first...last` from a block file's trailer.
    private func checksums(_ fd: Int32, length: Int, first: Int, last: Int) -> [UInt32]? {
        var sums = [UInt32](repeating: 0, count: last - first + 1)
        let want = sums.count * 4
        let n = sums.withUnsafeMutableBytes { b in try? Sys.pread(fd, b.baseAddress!, want, Int64(length + 4 * first)) }
        guard n == want else { return nil }
        return sums.map { UInt32(littleEndian: $0) }
    }

    /// A packed block with its checksum verified, into `dest` (which holds `length` bytes).
    private func readPacked(_ key: String, length: Int, into dest: UnsafeMutableRawPointer) -> Bool {
        guard let loc = location(key), let fd = readFD(loc.pack) else { return false }
        let tmp = UnsafeMutableRawPointer.allocate(byteCount: length + 4, alignment: 16)
        defer { tmp.deallocate() }
        guard let n = try? Sys.pread(fd, tmp, length + 4, loc.off), n == length + 4 else {
            Log.warning("cache pack \(loc.pack) is shorter than its index says; dropping \(key)")
            remove(key)
            return false
        }
        let want = UInt32(littleEndian: tmp.loadUnaligned(fromByteOffset: length, as: UInt32.self))
        if CRC32C.checksum(tmp, length) != want {
            Log.warning("cached block \(key) in pack \(loc.pack) fails its checksum; dropping it")
            remove(key)
            return false
        }
        dest.copyMemory(from: tmp, byteCount: length)
        return true
    }

    /// The whole block, verified, or nil (missing or damaged; a damaged block is removed).
    public func get(_ key: String, length: Int) -> Buffer? {
        let buf = Buffer(capacity: max(length, 1))
        if DiskCache.packed(length) {
            guard readPacked(key, length: length, into: buf.base) else { return nil }
            buf.count = length
            touch(key)
            return buf
        }
        guard let fd = openChecked(key, length: length) else { return nil }
        defer { Sys.close(fd) }
        guard let n = try? Sys.pread(fd, buf.base, length, 0), n == length,
            let sums = checksums(fd, length: length, first: 0, last: DiskCache.pieces(length) - 1),
            verify(buf.base, length: length, firstPiece: 0, sums: sums, key: key)
        else { return nil }
        buf.count = length
        touch(key)
        return buf
    }

    /// Bytes `offset..<offset+dest.count` of a cached block into `dest`, verified; false when
    /// the block is not cached (or was damaged and has been removed).
    public func read(_ key: String, length: Int, offset: Int, into dest: UnsafeMutableRawBufferPointer) -> Bool {
        guard dest.count > 0 else { return true }
        if DiskCache.packed(length) {
            guard let b = get(key, length: length) else { return false }
            dest.baseAddress!.copyMemory(from: b.base + offset, byteCount: dest.count)
            return true
        }
        guard let fd = openChecked(key, length: length) else { return false }
        defer { Sys.close(fd) }
        let first = offset / DiskCache.pieceSize
        let last = (offset + dest.count - 1) / DiskCache.pieceSize
        let start = first * DiskCache.pieceSize
        let end = min(length, (last + 1) * DiskCache.pieceSize)
        let span = UnsafeMutableRawPointer.allocate(byteCount: end - start, alignment: 64)
        defer { span.deallocate() }
        guard let n = try? Sys.pread(fd, span, end - start, Int64(start)), n == end - start,
            let sums = checksums(fd, length: length, first: first, last: last),
            verify(span, length: end - start, firstPiece: first, sums: sums, key: key)
        else { return false }
        dest.baseAddress!.copyMemory(from: span + (offset - start), byteCount: dest.count)
        touch(key)
        return true
    }

    private func verify(_ p: UnsafeRawPointer, length: Int, firstPiece: Int, sums: [UInt32], key: String) -> Bool {
        for (i, want) in sums.enumerated() {
            let off = i * DiskCache.pieceSize
            let n = min(DiskCache.pieceSize, length - off)
            if CRC32C.checksum(p + off, n) != want {
                Log.warning("cache file \(path(key)) is corrupted (piece \(firstPiece + i) fails its checksum); dropping it")
                remove(key)
                return false
            }
        }
        return true
    }

    // MARK: writes

    /// Stores a block, pinned for `job` if given: blocks over 64 KiB as files (temporary name,
    /// checksums, rename), smaller ones appended to this process's pack file. Index entries are
    /// written in batches (`flushIndex`), and older blocks evicted then. Throws `ENOSPC` when
    /// pinned blocks alone leave no room (the batch is then not kept).
    public func put(_ key: String, _ data: UnsafeRawBufferPointer, pin job: String? = nil) throws(FSError) {
        guard config.capacity > 0 else { return }
        let size = DiskCache.fileSize(data.count)
        if size > config.capacity { throw FSError(ENOSPC, "a block of \(data.count) bytes does not fit a cache of \(config.capacity) bytes") }
        var file: String?
        var loc = Location(pack: 0, off: 0)
        if DiskCache.packed(data.count) {
            loc = try append(data)
        } else {
            // Callers put blocks they found missing; a racing writer's copy is replaced whole.
            file = path(key)
            try writeFile(file!, data)
        }
        let ik = indexKey(key)
        let flushNow = lock.withLock { () -> Bool in
            pending.append(Pending(indexKey: ik, size: size, job: job, file: file, location: loc))
            if loc.pack != 0 { pendingLocations[ik] = loc }
            pendingBytes += size
            return pending.count >= 512 || pendingBytes >= min(64 << 20, max(config.capacity / 8, 1))
                || Sys.monotonicNanos() - lastIndexFlush > 1_000_000_000
        }
        if flushNow { try flushIndex() }
    }

    /// Appends a small block and its checksum to the pack file being written; returns where.
    /// Appends are serialized (they are small), so a pack is never closed under a writer.
    private func append(_ data: UnsafeRawBufferPointer) throws(FSError) -> Location {
        let need = Int64(data.count + 4)
        var crc = CRC32C.checksum(data.baseAddress ?? UnsafeRawPointer(bitPattern: 1)!, data.count).littleEndian
        return try packLock.withLock { () throws(FSError) -> Location in
            if writing == nil || writing!.end + need > Int64(DiskCache.packSize) {
                if let w = writing {
                    Sys.close(w.fd)
                    writing = nil
                    try indexTransaction { () throws(FSError) in try index.query("UPDATE packs SET writer=0 WHERE id=?", [.int(w.id)]) }
                }
                var id: Int64 = 0
                try indexTransaction { () throws(FSError) in
                    try index.query("INSERT INTO packs(volume, live, writer) VALUES(?, 0, ?) RETURNING id", [.text(volume), .int(Int64(Sys.pid))]) {
                        id = Col.int($0, 0)
                    }
                }
                let p = packPath(id, volume: volume)
                try? Sys.mkdirs(Sys.dirname(of: p), 0o700)
                let fd = Glibc.open(p, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
                if fd < 0 { throw FSError.errno(errno, "cannot create cache pack \(p)") }
                writing = (id, fd, 0)
            }
            let w = writing!
            try withUnsafeBytes(of: &crc) { (c) throws(FSError) in
                var iov = [
                    iovec(iov_base: UnsafeMutableRawPointer(mutating: data.baseAddress), iov_len: data.count),
                    iovec(iov_base: UnsafeMutableRawPointer(mutating: c.baseAddress), iov_len: 4),
                ]
                let n = iov.withUnsafeMutableBufferPointer { pwritev(w.fd, $0.baseAddress, 2, off_t(w.end)) }
                if n != Int(need) { throw FSError.errno(n < 0 ? errno : EIO, "cannot write cache pack \(w.id)") }
            }
            writing!.end += need
            return Location(pack: w.id, off: w.end)
        }
    }

    private func writeFile(_ final: String, _ data: UnsafeRawBufferPointer) throws(FSError) {
        let tmp = "\(final).tmp\(Sys.pid)-\(Sys.monotonicNanos() % 1_000_000_007)"
        var fd = Glibc.open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        if fd < 0 && errno == ENOENT {
            try? Sys.mkdirs(Sys.dirname(of: final), 0o700)
            fd = Glibc.open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        }
        if fd < 0 { throw FSError.errno(errno, "cannot write cache file \(final)") }
        let n = DiskCache.pieces(data.count)
        var trailer = ByteWriter(capacity: 4 * n + 8)
        for i in 0..<n {
            let off = i * DiskCache.pieceSize
            let sum = CRC32C.checksum(data.baseAddress! + off, min(DiskCache.pieceSize, data.count - off))
            withUnsafeBytes(of: sum.littleEndian) { trailer.raw($0) }
        }
        withUnsafeBytes(of: UInt32(n).littleEndian) { trailer.raw($0) }
        withUnsafeBytes(of: DiskCache.magic.littleEndian) { trailer.raw($0) }
        do {
            let t = trailer.bytes
            try fsTyped {
                try t.withUnsafeBytes { tb in
                    try Sys.writeAll(fd, [UnsafeRawBufferPointer(start: data.baseAddress, count: data.count), tb], path: tmp)
                }
            }
            Sys.close(fd)
            try Sys.rename(tmp, final)
        } catch {
            Sys.close(fd)
            unlink(tmp)
            throw error.context("cannot write cache file \(final)")
        }
    }

    // MARK: index

    /// Writes pending blocks to the index in one transaction and evicts what the limits ask.
    /// Throws `ENOSPC` when pinned blocks alone leave no room; the pending blocks written since
    /// the last flush are then dropped.
    public func flushIndex() throws(FSError) {
        let batch = lock.withLock { () -> [Pending] in
            defer {
                pending.removeAll(keepingCapacity: true)
                pendingBytes = 0
                lastIndexFlush = Sys.monotonicNanos()
            }
            return pending
        }
        if batch.isEmpty { return }
        let checkSpace = lock.withLock { () -> Bool in
            putsSinceSpaceCheck += batch.count
            if putsSinceSpaceCheck >= 32 {
                putsSinceSpaceCheck = 0
                return true
            }
            return false
        }
        let spaceLow = checkSpace && lowOnSpace()
        var gone: ([String], [(Int64, String)]) = ([], [])
        do {
            gone = try indexTransaction { () throws(FSError) -> ([String], [(Int64, String)]) in
                var deadPacks: [(Int64, String)] = []
                for p in batch {
                    deadPacks += try setRow(p.indexKey, size: p.size, location: p.location)
                    if let job = p.job { try index.query("INSERT OR IGNORE INTO pins(job, key) VALUES(?, ?)", [.text(job), .text(p.indexKey)]) }
                }
                let (files, packs) = try evictLocked(spaceLow: spaceLow)
                return (files, deadPacks + packs)
            }
        } catch {
            // Pinned data fills the cache: the blocks of this batch are not kept.
            for p in batch { if let f = p.file { unlink(f) } }
            lock.withLock { for p in batch { pendingLocations[p.indexKey] = nil } }
            throw error
        }
        lock.withLock { for p in batch { pendingLocations[p.indexKey] = nil } }
        unlinkGone(gone)
    }

    /// Flushes pending index entries that have waited over a second (called periodically).
    public func flushIndexIfStale() {
        let stale = lock.withLock { !pending.isEmpty && Sys.monotonicNanos() - lastIndexFlush > 1_000_000_000 }
        if stale {
            do { try flushIndex() } catch { Log.warning("cache index: \(error.message)") }
        }
    }

    /// Adds or replaces the row of `ik`; keeps the used-bytes total and the packs' live bytes.
    /// Returns packs left empty by the replacement (in a transaction).
    private func setRow(_ ik: String, size: Int, location: Location) throws(FSError) -> [(Int64, String)] {
        let dead = try deleteRow(ik)
        try index.query(
            "INSERT INTO blocks(key, size, atime, pack, off) VALUES(?, ?, ?, ?, ?)",
            [.text(ik), .int(Int64(size)), .int(Timespec.now().sec), .int(location.pack), .int(location.off)])
        try addUsed(size)
        if location.pack != 0 { try index.query("UPDATE packs SET live=live+? WHERE id=?", [.int(Int64(size)), .int(location.pack)]) }
        return dead
    }

    /// Deletes the row of `ik` (in a transaction); returns packs it left empty and finished.
    @discardableResult
    private func deleteRow(_ ik: String) throws(FSError) -> [(Int64, String)] {
        var old: (Int, Int64)?
        try index.query("SELECT size, pack FROM blocks WHERE key=?", [.text(ik)]) { old = (Int(Col.int($0, 0)), Col.int($0, 1)) }
        guard let (size, pack) = old else { return [] }
        try index.query("DELETE FROM blocks WHERE key=?", [.text(ik)])
        try addUsed(-size)
        guard pack != 0 else { return [] }
        try index.query("UPDATE packs SET live=live-? WHERE id=?", [.int(Int64(size)), .int(pack)])
        return try deadPacks([pack])
    }

    /// Of `ids`, the packs with no live block whose writer is done (or dead): their rows go.
    private func deadPacks(_ ids: [Int64]) throws(FSError) -> [(Int64, String)] {
        var out: [(Int64, String)] = []
        for id in Set(ids) {
            var row: (Int64, Int64, String)?
            try index.query("SELECT live, writer, volume FROM packs WHERE id=?", [.int(id)]) {
                row = (Col.int($0, 0), Col.int($0, 1), Col.text($0, 2))
            }
            guard let (live, writer, vol) = row, live <= 0 else { continue }
            if writer != 0 && (writer == Int64(Sys.pid) || kill(pid_t(writer), 0) == 0) { continue }
            try index.query("DELETE FROM packs WHERE id=?", [.int(id)])
            out.append((id, vol))
        }
        return out
    }

    private func addUsed(_ delta: Int) throws(FSError) {
        if delta != 0 { try index.query("UPDATE stats SET v=v+? WHERE k='used'", [.int(Int64(delta))]) }
    }

    private func usedBytes() throws(FSError) -> Int {
        var used = 0
        try index.query("SELECT v FROM stats WHERE k='used'", []) { used = Int(Col.int($0, 0)) }
        return used
    }

    private func indexTransaction<T>(_ body: () throws(FSError) -> T) throws(FSError) -> T {
        try lock.withLock { () throws(FSError) -> T in try index.transaction(write: true, body) }
    }

    /// Removes files of evicted blocks and files of emptied packs.
    private func unlinkGone(_ gone: ([String], [(Int64, String)])) {
        for ik in gone.0 {
            let objectKey = String(ik.drop { $0 != "/" }.dropFirst())
            let vol = String(ik.prefix { $0 != "/" })
            unlink("\(dir(for: objectKey))/\(vol)/\(objectKey)")
        }
        for (id, vol) in gone.1 {
            packLock.withLock {
                if let fd = readFDs.removeValue(forKey: id) { Sys.close(fd) }
            }
            unlink(packPath(id, volume: vol))
        }
    }

    /// Drops a block from the cache (its pins too).
    public func remove(_ key: String) {
        let ik = indexKey(key)
        var file: String?
        if let l = location(key), l.pack == 0 { file = path(key) } else if location(key) == nil { file = path(key) }
        if let file { unlink(file) }
        lock.withLock {
            pending.removeAll { $0.indexKey == ik }
            pendingLocations[ik] = nil
        }
        if let packs = try? indexTransaction({ () throws(FSError) -> [(Int64, String)] in
            let dead = try deleteRow(ik)
            try index.query("DELETE FROM pins WHERE key=?", [.text(ik)])
            return dead
        }) {
            unlinkGone(([], packs))
        }
    }

    /// Drops a block unless a job pinned it; returns whether it was dropped.
    @discardableResult
    public func evictOne(_ key: String) throws(FSError) -> Bool {
        try flushIndex()
        let ik = indexKey(key)
        let (pinned, packed, packs) = try indexTransaction { () throws(FSError) -> (Bool, Bool, [(Int64, String)]) in
            var pinned = false
            var packed = false
            try index.query("SELECT 1 FROM pins WHERE key=? LIMIT 1", [.text(ik)]) { _ in pinned = true }
            try index.query("SELECT pack FROM blocks WHERE key=?", [.text(ik)]) { packed = Col.int($0, 0) != 0 }
            let dead = pinned ? [] : try deleteRow(ik)
            return (pinned, packed, dead)
        }
        if !pinned {
            if !packed { unlink(path(key)) }
            unlinkGone(([], packs))
        }
        return !pinned
    }

    // MARK: pins

    /// Pins already cached blocks for `job`, then evicts unpinned blocks to stay within the
    /// size limit. Throws `ENOSPC` when pinned blocks alone exceed it (the pins stay recorded
    /// until the job releases them).
    public func pin(_ keys: [String], job: String) throws(FSError) {
        for batch in stride(from: 0, to: keys.count, by: 500) {
            try indexTransaction { () throws(FSError) in
                for k in keys[batch..<min(keys.count, batch + 500)] {
                    try index.query("INSERT OR IGNORE INTO pins(job, key) VALUES(?, ?)", [.text(job), .text(indexKey(k))])
                }
            }
        }
        try evict(checkSpace: false)
    }

    /// Releases every pin of `job` (all volumes); returns how many blocks it had pinned.
    public func release(job: String) throws(FSError) -> Int {
        try indexTransaction { () throws(FSError) -> Int in
            try index.query("DELETE FROM pins WHERE job=?", [.text(job)])
            return index.changes
        }
    }

    /// Jobs holding pins, with their pinned block counts.
    public func jobs() throws(FSError) -> [(String, Int)] {
        var out: [(String, Int)] = []
        try lock.withLock { () throws(FSError) in
            try index.query("SELECT job, COUNT(*) FROM pins GROUP BY job ORDER BY job", []) { out.append((Col.text($0, 0), Int(Col.int($0, 1)))) }
        }
        return out
    }

    // MARK: usage and eviction

    /// Notes a use of `key`; uses are written to the index in batches.
    private func touch(_ key: String) {
        let now = Timespec.now().sec
        let flush = lock.withLock { () -> [String: Int64]? in
            accessed[indexKey(key)] = now
            if Sys.monotonicNanos() - lastFlush < 2_000_000_000 && accessed.count < 1000 { return nil }
            lastFlush = Sys.monotonicNanos()
            defer { accessed.removeAll() }
            return accessed
        }
        if let flush {
            try? indexTransaction { () throws(FSError) in
                for (k, t) in flush { try index.query("UPDATE blocks SET atime=? WHERE key=?", [.int(t), .text(k)]) }
            }
        }
    }

    /// Bytes and blocks in use (all volumes of this user's cache), and the pinned part.
    public func usage() throws(FSError) -> CacheUsage {
        try flushIndex()
        return try lock.withLock { () throws(FSError) -> CacheUsage in
            var u = CacheUsage(bytes: 0, blocks: 0, pinnedBytes: 0)
            u.bytes = try usedBytes()
            try index.query("SELECT COUNT(*) FROM blocks", []) { u.blocks = Int(Col.int($0, 0)) }
            try index.query("SELECT COALESCE(SUM(size), 0) FROM blocks WHERE key IN (SELECT key FROM pins)", []) {
                u.pinnedBytes = Int(Col.int($0, 0))
            }
            return u
        }
    }

    /// Marks blocks as just used, so eviction takes other blocks first (staging calls it for the
    /// blocks of a set that are cached already before fetching the rest).
    public func markUsed(_ keys: [String]) {
        let now = Timespec.now().sec
        for start in stride(from: 0, to: keys.count, by: 500) {
            try? indexTransaction { () throws(FSError) in
                for k in keys[start..<min(keys.count, start + 500)] { try index.query("UPDATE blocks SET atime=? WHERE key=?", [.int(now), .text(indexKey(k))]) }
            }
        }
    }

    /// How much of the cache a set of blocks (key, length) can have: the limit from --cache-size
    /// and from the free-space ratio of the file systems, and what pins of blocks outside the set
    /// hold.
    public func room(for blocks: [(String, Int)]) throws(FSError) -> CacheRoom {
        try flushIndex()
        var r = CacheRoom(capacity: config.capacity, fileSystemLimit: nil, pinnedOutside: 0, pinningJobs: [])
        var pinnedTotal = 0
        var pinnedInSet = 0
        var used = 0
        try lock.withLock { () throws(FSError) in
            used = try usedBytes()
            try index.query("SELECT COALESCE(SUM(size), 0) FROM blocks WHERE key IN (SELECT key FROM pins)", []) { pinnedTotal = Int(Col.int($0, 0)) }
            let keys = Array(Set(blocks.map { indexKey($0.0) }))
            for start in stride(from: 0, to: keys.count, by: 500) {
                let part = Array(keys[start..<min(keys.count, start + 500)])
                let sql =
                    "SELECT COALESCE(SUM(size), 0) FROM blocks WHERE key IN (\(Array(repeating: "?", count: part.count).joined(separator: ","))) AND EXISTS (SELECT 1 FROM pins WHERE pins.key = blocks.key)"
                try index.query(sql, part.map { .text($0) }) { pinnedInSet += Int(Col.int($0, 0)) }
            }
            try index.query("SELECT DISTINCT job FROM pins ORDER BY job LIMIT 20", []) { r.pinningJobs.append(Col.text($0, 0)) }
        }
        r.pinnedOutside = max(0, pinnedTotal - pinnedInSet)
        // Space the file systems can give beyond their free-space ratio, plus what this cache
        // holds there already (it can evict its own unpinned blocks).
        var seen = Set<UInt>()
        var extra = 0
        for d in userDirs {
            var s = statvfs()
            guard statvfs(d, &s) == 0, s.f_blocks > 0, seen.insert(s.f_fsid).inserted else { continue }
            let keep = Double(s.f_blocks) * config.freeSpaceRatio
            extra += max(0, Int((Double(s.f_bavail) - keep) * Double(s.f_frsize)))
        }
        if used + extra < config.capacity { r.fileSystemLimit = used + extra }
        return r
    }

    private func lowOnSpace() -> Bool {
        for d in userDirs {
            var s = statvfs()
            if statvfs(d, &s) == 0, s.f_blocks > 0, Double(s.f_bavail) / Double(s.f_blocks) < config.freeSpaceRatio { return true }
        }
        return false
    }

    /// Evicts least recently used unpinned blocks until under the size limit (and, when the
    /// file systems are short of their free-space ratio, a tenth of the cache more).
    /// Throws `ENOSPC` when pinned blocks alone exceed the limit.
    public func evict(checkSpace: Bool = true) throws(FSError) {
        try flushIndex()
        let spaceLow = checkSpace && lowOnSpace()
        unlinkGone(try indexTransaction { () throws(FSError) in try evictLocked(spaceLow: spaceLow) })
    }

    /// The eviction step inside an index transaction; returns index keys of evicted block files
    /// and packs left empty.
    private func evictLocked(spaceLow: Bool) throws(FSError) -> ([String], [(Int64, String)]) {
        let used = try usedBytes()
        let over = used - config.capacity
        let need = spaceLow ? max(over, used / 10) : over
        guard need > 0 else { return ([], []) }
        var victims: [(String, Int, Int64)] = []
        var freed = 0
        try index.query(
            "SELECT key, size, pack FROM blocks WHERE NOT EXISTS (SELECT 1 FROM pins WHERE pins.key = blocks.key) ORDER BY atime LIMIT 5000", []
        ) { row in
            if freed < need {
                victims.append((Col.text(row, 0), Int(Col.int(row, 1)), Col.int(row, 2)))
                freed += Int(Col.int(row, 1))
            }
        }
        var packLive: [Int64: Int] = [:]
        for (k, size, pack) in victims {
            try index.query("DELETE FROM blocks WHERE key=?", [.text(k)])
            if pack != 0 { packLive[pack, default: 0] += size }
        }
        for (pack, size) in packLive { try index.query("UPDATE packs SET live=live-? WHERE id=?", [.int(Int64(size)), .int(pack)]) }
        try addUsed(-freed)
        if freed < over {
            throw FSError(
                ENOSPC,
                "the cache in \(config.dirs.joined(separator: ":")) is full of pinned blocks: \(used - freed) bytes held by jobs' pins exceed --cache-size \(config.capacity) bytes; release a job (stagefs stage --release JOB) or raise --cache-size"
            )
        }
        return (victims.filter { $0.2 == 0 }.map { $0.0 }, try deadPacks(Array(packLive.keys)))
    }

    // MARK: garbage collection (stagefs cache gc)

    /// Bytes of unpinned blocks by last use, in buckets of `bucket` seconds, oldest first: what
    /// eviction in least-recently-used order frees, and when those blocks were last used.
    public func unpinnedByLastUse(bucket: Int64) throws(FSError) -> [(since: Int64, bytes: Int)] {
        try flushIndex()
        var out: [(since: Int64, bytes: Int)] = []
        try lock.withLock { () throws(FSError) in
            try index.query(
                """
                SELECT atime / ?1 * ?1 AS b, SUM(size) FROM blocks
                WHERE NOT EXISTS (SELECT 1 FROM pins WHERE pins.key = blocks.key) GROUP BY b ORDER BY b
                """, [.int(bucket)]
            ) { out.append((Col.int($0, 0), Int(Col.int($0, 1)))) }
        }
        return out
    }

    /// The last use of any block (seconds since the epoch); 0 for an empty cache.
    public func lastUse() throws(FSError) -> Int64 {
        try flushIndex()
        var t: Int64 = 0
        try lock.withLock { () throws(FSError) in
            try index.query("SELECT COALESCE(MAX(atime), 0) FROM blocks", []) { t = Col.int($0, 0) }
        }
        return t
    }

    /// Evicts unpinned blocks last used before `before` (seconds since the epoch), least
    /// recently used first, until `limit` bytes are freed; pinned blocks are never touched. With
    /// `dryRun` only counts. Returns the bytes and blocks (as the index counts them; a pack file
    /// goes once none of its blocks is left).
    public func evict(usedBefore before: Int64, limit: Int, dryRun: Bool) throws(FSError) -> (bytes: Int, blocks: Int) {
        try flushIndex()
        let unpinnedBefore = """
            SELECT key, size, pack FROM blocks WHERE atime < ?
            AND NOT EXISTS (SELECT 1 FROM pins WHERE pins.key = blocks.key) ORDER BY atime
            """
        var bytes = 0
        var blocks = 0
        if dryRun {
            try lock.withLock { () throws(FSError) in
                try index.query(unpinnedBefore, [.int(before)]) { row in
                    if bytes < limit {
                        bytes += Int(Col.int(row, 1))
                        blocks += 1
                    }
                }
            }
            return (bytes, blocks)
        }
        while bytes < limit {
            let (gone, n, freed) = try indexTransaction { () throws(FSError) -> (([String], [(Int64, String)]), Int, Int) in
                var victims: [(String, Int, Int64)] = []
                var freed = 0
                try index.query(unpinnedBefore + " LIMIT 5000", [.int(before)]) { row in
                    if bytes + freed < limit {
                        victims.append((Col.text(row, 0), Int(Col.int(row, 1)), Col.int(row, 2)))
                        freed += Int(Col.int(row, 1))
                    }
                }
                var packLive: [Int64: Int] = [:]
                for (k, size, pack) in victims {
                    try index.query("DELETE FROM blocks WHERE key=?", [.text(k)])
                    if pack != 0 { packLive[pack, default: 0] += size }
                }
                for (pack, size) in packLive { try index.query("UPDATE packs SET live=live-? WHERE id=?", [.int(Int64(size)), .int(pack)]) }
                try addUsed(-freed)
                let files = victims.filter { $0.2 == 0 }.map { $0.0 }
                return ((files, try deadPacks(Array(packLive.keys))), victims.count, freed)
            }
            if n == 0 { break }
            unlinkGone(gone)
            bytes += freed
            blocks += n
        }
        return (bytes, blocks)
    }

    /// Indexes block files found on disk (first use of a cache directory with blocks in it);
    /// pack files without an index are unreadable and removed.
    private func rebuildIndex() throws(FSError) {
        var found: [(String, Int, Int64)] = []
        for d in userDirs { scan(d, rel: "", into: &found) }
        if found.isEmpty { return }
        try indexTransaction { () throws(FSError) in
            for (k, size, t) in found {
                try index.query("INSERT OR IGNORE INTO blocks(key, size, atime) VALUES(?, ?, ?)", [.text(k), .int(Int64(size)), .int(t)])
            }
            try index.query("UPDATE stats SET v=(SELECT COALESCE(SUM(size), 0) FROM blocks) WHERE k='used'", [])
        }
        Log.info("indexed \(found.count) cached blocks found in \(userDirs.joined(separator: ":"))")
    }

    private func scan(_ dir: String, rel: String, into found: inout [(String, Int, Int64)]) {
        guard let d = opendir(rel.isEmpty ? dir : "\(dir)/\(rel)") else { return }
        var subdirs: [String] = []
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name == "." || name == ".." || (rel.isEmpty && name.hasPrefix("index.db")) { continue }
            let relName = rel.isEmpty ? name : "\(rel)/\(name)"
            guard let st = Sys.stat("\(dir)/\(relName)") else { continue }
            if st.st_mode & S_IFMT == S_IFDIR {
                subdirs.append(relName)
            } else if name.contains(".tmp") || rel.hasSuffix("/packs") {
                unlink("\(dir)/\(relName)")
            } else {
                found.append((relName, Int(st.st_size), Int64(st.st_mtim.tv_sec)))
            }
        }
        closedir(d)
        for s in subdirs { scan(dir, rel: s, into: &found) }
    }
}
