import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// Settings of the node-local block cache.
public struct DiskCacheConfig: Sendable {
    /// Cache roots; blocks are spread across them by key.
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

/// Blocks on node-local disk, under `<root>/<uid>/<volume uuid>/`, named like their object keys.
/// Files are written to a temporary name and renamed, so a reader never sees a torn block, and
/// a block whose size differs from its name is dropped, never served. Least recently used blocks
/// are evicted to honour the size limit and the free-space ratio.
public final class DiskCache: @unchecked Sendable {
    private struct Entry {
        var size: Int
        var stamp: UInt64
    }

    public let config: DiskCacheConfig
    /// One directory per cache root: `<root>/<uid>/<uuid>`.
    public let roots: [String]
    private let lock = ConditionLock()
    private var index: [String: Entry] = [:]
    private var used = 0
    private var clock: UInt64 = 0
    private var putsSinceSpaceCheck = 0

    /// Prepares the directories (per-user, mode 0700) and indexes blocks already there.
    public init(config: DiskCacheConfig, volumeUUID: String) throws(FSError) {
        self.config = config
        var roots: [String] = []
        for dir in config.dirs {
            let userDir = "\(dir)/\(getuid())"
            do {
                try Sys.mkdirs(dir, 0o755)
                try Sys.mkdirs(userDir, 0o700)
                _ = chmod(userDir, 0o700)
                try Sys.mkdirs("\(userDir)/\(volumeUUID)", 0o700)
            } catch {
                throw error.context("cannot use cache directory \(dir)")
            }
            roots.append("\(userDir)/\(volumeUUID)")
        }
        self.roots = roots
        for r in roots { scan(r, rel: "") }
    }

    private func root(for key: String) -> String {
        if roots.count == 1 { return roots[0] }
        var h: UInt64 = 1469598103934665603
        for b in key.utf8 { h = (h ^ UInt64(b)) &* 1099511628211 }
        return roots[Int(h % UInt64(roots.count))]
    }

    private func path(_ key: String) -> String { "\(root(for: key))/\(key)" }

    /// Indexes the blocks found under `dir` (oldest modification first, so they go first).
    private func scan(_ dir: String, rel: String) {
        guard let d = opendir(rel.isEmpty ? dir : "\(dir)/\(rel)") else { return }
        var found: [(String, Int, Int)] = []
        var subdirs: [String] = []
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name == "." || name == ".." { continue }
            let relName = rel.isEmpty ? name : "\(rel)/\(name)"
            let full = "\(dir)/\(relName)"
            guard let st = Sys.stat(full) else { continue }
            if st.st_mode & S_IFMT == S_IFDIR {
                subdirs.append(relName)
            } else if name.contains(".tmp") {
                unlink(full)
            } else {
                found.append((relName, Int(st.st_size), st.st_mtim.tv_sec))
            }
        }
        closedir(d)
        for (k, size, _) in found.sorted(by: { $0.2 < $1.2 }) {
            clock += 1
            index[k] = Entry(size: size, stamp: clock)
            used += size
        }
        for s in subdirs { scan(dir, rel: s) }
    }

    /// Bytes held.
    public var bytesUsed: Int { lock.withLock { used } }
    public var blockCount: Int { lock.withLock { index.count } }

    public func contains(_ key: String) -> Bool { lock.withLock { index[key] != nil } }

    /// Opens the cache file of `key` if it is indexed and has exactly `length` bytes; a file of
    /// another size is damaged (torn or truncated) and is dropped.
    private func openChecked(_ key: String, length: Int) -> (fd: Int32, path: String)? {
        guard lock.withLock({ index[key] != nil }) else { return nil }
        let p = path(key)
        let fd = Glibc.open(p, O_RDONLY | O_CLOEXEC)
        if fd < 0 {
            forget(key)
            return nil
        }
        var st = Glibc.stat()
        if fstat(fd, &st) != 0 || Int(st.st_size) != length {
            Log.warning("cache file \(p) has \(st.st_size) bytes, expected \(length); dropping it")
            Sys.close(fd)
            remove(key)
            return nil
        }
        return (fd, p)
    }

    /// The whole block, if cached with the expected length.
    public func get(_ key: String, length: Int) -> Buffer? {
        guard let (fd, p) = openChecked(key, length: length) else { return nil }
        defer { Sys.close(fd) }
        let buf = Buffer(capacity: length)
        guard let n = try? Sys.pread(fd, buf.base, length, 0, path: p), n == length else {
            remove(key)
            return nil
        }
        buf.count = n
        touch(key)
        return buf
    }

    /// Part of a cached block into `dest`; false when it is not cached.
    public func read(_ key: String, length: Int, offset: Int, into dest: UnsafeMutableRawBufferPointer) -> Bool {
        guard let (fd, p) = openChecked(key, length: length) else { return false }
        defer { Sys.close(fd) }
        guard let n = try? Sys.pread(fd, dest.baseAddress!, dest.count, Int64(offset), path: p), n == dest.count else {
            remove(key)
            return false
        }
        touch(key)
        return true
    }

    /// Stores a block (temporary name, then rename), evicting old blocks if needed.
    public func put(_ key: String, _ data: UnsafeRawBufferPointer) {
        guard config.capacity > 0, data.count <= config.capacity else { return }
        if lock.withLock({ index[key] != nil }) { return touch(key) }
        let final = path(key)
        let tmp = "\(final).tmp\(getpid())-\(Sys.monotonicNanos() % 1_000_000_007)"
        var fd = Glibc.open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        if fd < 0 && errno == ENOENT {
            try? Sys.mkdirs(Sys.dirname(of: final), 0o700)
            fd = Glibc.open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        }
        guard fd >= 0 else { return }
        do {
            if data.count > 0 { try Sys.pwrite(fd, data.baseAddress!, data.count, 0, path: tmp) }
            Sys.close(fd)
            try Sys.rename(tmp, final)
        } catch {
            Sys.close(fd)
            unlink(tmp)
            Log.warning("cannot write cache file \(final): \(error.message)")
            return
        }
        let check = lock.withLock { () -> Bool in
            clock += 1
            if let old = index[key] { used -= old.size }
            index[key] = Entry(size: data.count, stamp: clock)
            used += data.count
            putsSinceSpaceCheck += 1
            if putsSinceSpaceCheck >= 64 {
                putsSinceSpaceCheck = 0
                return true
            }
            return false
        }
        evict(checkSpace: check)
    }

    public func remove(_ key: String) {
        forget(key)
        unlink(path(key))
    }

    private func forget(_ key: String) {
        lock.withLock {
            if let e = index.removeValue(forKey: key) { used -= e.size }
        }
    }

    private func touch(_ key: String) {
        lock.withLock {
            clock += 1
            index[key]?.stamp = clock
        }
    }

    /// Whether a cache file system has less free space than the configured ratio.
    private func lowOnSpace() -> Bool {
        for r in roots {
            var s = statvfs()
            if statvfs(r, &s) == 0, s.f_blocks > 0, Double(s.f_bavail) / Double(s.f_blocks) < config.freeSpaceRatio { return true }
        }
        return false
    }

    /// Drops least recently used blocks until under the size limit (and, when asked, until the
    /// file systems have their free-space ratio, at most a tenth of the cache at a time).
    private func evict(checkSpace: Bool) {
        var spaceTarget = 0
        if checkSpace && lowOnSpace() { spaceTarget = max(1, lock.withLock { index.count } / 10) }
        let victims: [String] = lock.withLock {
            guard used > config.capacity || spaceTarget > 0 else { return [] }
            var out: [String] = []
            var freed = 0
            let over = used - config.capacity
            for (k, e) in index.sorted(by: { $0.value.stamp < $1.value.stamp }) {
                if freed >= over && out.count >= spaceTarget { break }
                out.append(k)
                freed += e.size
            }
            for k in out { if let e = index.removeValue(forKey: k) { used -= e.size } }
            return out
        }
        for k in victims { unlink(path(k)) }
    }
}
