import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// Objects as files under a directory (`--storage file`). Writes go to a temporary name, are
/// flushed to disk (`fdatasync`) and renamed into place, so a reader never sees a torn object and
/// a block reported written survives a crash of the node.
///
/// **Deferred flushes** (`deferSync`, what a mount uses). A put starts the object's way to
/// disk and returns; `sync` waits until every object put before it is on disk (with the new
/// directories on its path). A mount syncs the blocks of each slice before the commit that names them
/// (so no record names a block the disk may not hold: data is durable when `close` and `fsync`
/// return, and an object replaced by new data is deleted only after that data's commit), and
/// every second.
///
/// **Past the page cache.** An object of whole pages (a full block) from a page-aligned buffer
/// is written with `O_DIRECT`: from the writer's memory to the device, with no copy into the
/// page cache (which cost a mount most of its CPU when writing checkpoints) and no page cache
/// filled with data nobody reads soon. Where the bucket's file system refuses it, objects are
/// written through the page cache as before.
///
/// **Shared buckets.** A bucket directory that has the set-group-ID bit and is group-writable
/// (what `format --bucket-group GROUP` makes: `root:GROUP 2770`) is shared by the members of its
/// group: every directory made in it gets the bucket's mode (group-writable, set-group-ID, so the
/// group is inherited) and every object is made group-readable, whatever the writer's umask. Any
/// member can then write new objects and delete old ones, which a volume written by several users
/// needs (one user's file is rewritten, truncated or deleted by another).
public final class LocalObjectStore: ObjectStore, @unchecked Sendable {
    public let root: String
    public var description: String { "directory \(root)" }
    /// Modes for what this store creates in a shared bucket; nil for a private one.
    private let shared: (dir: mode_t, file: mode_t)?
    /// Whether puts leave their flush to disk to `sync`.
    public let deferSync: Bool
    /// Objects put and not yet flushed (`deferSync`), and whether a `sync` is under way.
    private let pending = ConditionLock()
    // (@unchecked: `unsynced`, `syncing`, `failed`, `madeIn` and `lostFailures` are guarded by `pending`.)
    private var unsynced: [String] = []
    private var syncing = false
    /// Objects whose flush failed, until a `sync` that names them reports it.
    private var failed: [String: FSError] = [:]
    /// Directories in which a put made a directory since the last `sync`.
    private var madeIn: Set<String> = []
    /// Failures were dropped for want of room in `failed`.
    private var lostFailures = false
    /// Objects put unflushed after which a put syncs them itself.
    public static let unsyncedLimit = 512
    /// Blocks written past the page cache.
    private let direct = DirectWrites()

    public init(root: String, deferSync: Bool = false) throws(FSError) {
        self.deferSync = deferSync
        guard root.hasPrefix("/") else { throw FSError.usage("the bucket of --storage file must be an absolute directory, not '\(root)'") }
        var r = root
        while r.count > 1 && r.hasSuffix("/") { r.removeLast() }
        self.root = r
        shared = Sys.stat(r).flatMap { LocalObjectStore.sharedModes($0.st_mode) }
    }

    public func isOnFileSystem(of paths: [String]) -> Bool {
        guard !paths.isEmpty, let me = Sys.stat(root) else { return false }
        return paths.allSatisfy { Sys.stat($0)?.st_dev == me.st_dev }
    }

    /// The modes of directories and objects in a bucket of mode `mode`, if it is shared.
    static func sharedModes(_ mode: mode_t) -> (dir: mode_t, file: mode_t)? {
        guard mode & S_ISGID != 0, mode & 0o070 == 0o070 else { return nil }
        return (mode & 0o0777 | 0o2700, 0o640 | mode & 0o004)
    }

    /// Whether this bucket is shared by its group.
    public var isShared: Bool { shared != nil }

    /// What keeps this user from writing (or, with `write: false`, reading) everywhere in the
    /// volume's part of the bucket, if anything: the bucket, the volume's directories and the
    /// newest chunk directories (at most about a thousand are looked at). Nil when all are fine.
    public func accessProblem(volume: String, write: Bool = true) -> String? {
        var dirs = [root, "\(root)/\(volume)", "\(root)/\(volume)/chunks"]
        let tops = entries("\(root)/\(volume)/chunks").compactMap { UInt64($0) }.sorted()
        dirs += tops.suffix(500).map { "\(root)/\(volume)/chunks/\($0)" }
        if let last = tops.last {
            dirs += entries("\(root)/\(volume)/chunks/\(last)").compactMap { UInt64($0) }.sorted().suffix(500).map {
                "\(root)/\(volume)/chunks/\(last)/\($0)"
            }
        }
        for d in dirs {
            guard let st = Sys.stat(d) else { continue }
            if access(d, (write ? W_OK : R_OK) | X_OK) != 0 {
                let owner = getpwuid(st.st_uid).map { String(cString: $0.pointee.pw_name) } ?? "uid \(st.st_uid)"
                let group = getgrgid(st.st_gid).map { String(cString: $0.pointee.gr_name) } ?? "gid \(st.st_gid)"
                return
                    "\(d) is not \(write ? "writable" : "readable") by uid \(getuid()) (owner \(owner), group \(group), mode 0\(String(st.st_mode & 0o7777, radix: 8)))"
            }
        }
        return nil
    }

    private func entries(_ dir: String) -> [String] {
        guard let d = opendir(dir) else { return [] }
        defer { closedir(d) }
        var out: [String] = []
        while let e = readdir(d) {
            out.append(withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) })
        }
        return out
    }

    public func create() throws(FSError) {
        try Sys.mkdirs(root)
    }

    /// Makes the bucket directory shared by group `gid` (mode 2770, or 2775 with `othersRead`),
    /// and gives what is already in it to the group (links are never followed). Returns how many
    /// entries changed.
    public static func share(root: String, gid: gid_t, othersRead: Bool = false) throws(FSError) -> Int {
        try Sys.mkdirs(root)
        let fd = Glibc.open(root, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        if fd < 0 { throw FSError.errno(errno, "cannot open \(root)") }
        defer { Glibc.close(fd) }
        let mode: mode_t = othersRead ? 0o2775 : 0o2770
        if fchown(fd, uid_t.max, gid) != 0 { throw FSError.errno(errno, "cannot give \(root) to gid \(gid)") }
        if fchmod(fd, mode) != 0 { throw FSError.errno(errno, "cannot change the mode of \(root)") }
        return try SafeDir.shareTree(root, gid: gid)
    }

    // Every object and directory is reached from a descriptor of the bucket directory without
    // following a symbolic link (`Sys.openBeneath`, `O_NOFOLLOW`) and checked to be a regular file
    // before it is read: in a shared bucket every member of the group can write, and a link or
    // a FIFO one of them planted under a block's name must not make another user's (or root's)
    // mount read, create, change or delete anything outside the bucket, nor hang on a read.

    /// The bucket directory, opened (a link to it is followed: the admin chose it).
    private func openRoot() throws(FSError) -> Int32 {
        let fd = Glibc.open(root, Sys.O_PATH | O_DIRECTORY | O_CLOEXEC)
        if fd < 0 {
            if errno == ENOENT { throw FSError(EIO, "\(description) is missing (is its file system mounted?)") }
            throw FSError.errno(errno, "cannot open \(description)")
        }
        return fd
    }

    /// A key's directory part and name.
    private static func split(_ key: String) -> (dir: String, name: String) {
        guard let slash = key.lastIndex(of: "/") else { return ("", key) }
        return (String(key[..<slash]), String(key[key.index(after: slash)...]))
    }

    /// What an open below the bucket that failed with `e` means.
    private func failure(_ e: Int32, _ what: String) -> FSError {
        if e == ELOOP || e == EXDEV || e == ENOTDIR {
            return FSError(EIO, "\(what) in \(description): a symbolic link or another file is in its place (refused; remove it)")
        }
        return FSError(e == ENOENT ? ENOENT : (e == EACCES ? EACCES : EIO), "\(what) in \(description): \(String(cString: strerror(e)))")
    }

    /// The directory `dir` below the bucket (a descriptor for the `*at` calls), made when
    /// missing with `create`: each new directory gets the bucket's shared mode through its own
    /// descriptor. A directory that cannot be opened or made is `-errno` (`-ENOENT` when
    /// missing, `-ELOOP` for a link in the way).
    private func openDirectory(_ rootFD: Int32, _ dir: String, create: Bool) -> Int32 {
        let fd =
            dir.isEmpty ? Glibc.openat(rootFD, ".", Sys.O_PATH | O_DIRECTORY | O_CLOEXEC) : Sys.openBeneath(rootFD, dir, Sys.O_PATH | O_DIRECTORY)
        if fd >= 0 { return fd }
        if errno != ENOENT || !create { return -errno }
        let parts = dir.split(separator: "/").map(String.init)
        if parts.contains(where: { $0 == "." || $0 == ".." }) { return -EXDEV }
        var cur = Glibc.openat(rootFD, ".", Sys.O_PATH | O_DIRECTORY | O_CLOEXEC)
        if cur < 0 { return -errno }
        var path = ""
        for part in parts {
            // (The new entry reaches the disk at the next `sync`: noted before it is made, so a
            // sync that flushes an object put into the new directory flushes the entry too.)
            if deferSync { pending.withLock { _ = madeIn.insert(path) } }
            let made = mkdirat(cur, part, shared?.dir ?? 0o755) == 0
            path = path.isEmpty ? part : "\(path)/\(part)"
            if !made && errno != EEXIST {
                let e = errno
                Glibc.close(cur)
                return -e
            }
            // A directory made here is opened to set its mode; one that was there only to be
            // walked through (which needs no read permission).
            let next = Glibc.openat(cur, part, (made ? O_RDONLY : Sys.O_PATH) | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
            let e = errno
            Glibc.close(cur)
            if next < 0 { return -(e == ENOTDIR ? ELOOP : e) }
            // The umask may have taken bits away from a directory made here.
            if made, let shared, fchmod(next, shared.dir) != 0 {
                let e = errno
                Glibc.close(next)
                return -e
            }
            cur = next
        }
        return cur
    }

    public func put(_ key: String, _ data: UnsafeRawBufferPointer) throws(FSError) {
        try put(key, data, exclusive: false)
    }

    /// Stores `key` only when it does not exist (`EEXIST` otherwise, and nothing changes): the
    /// existence check and the rename into place are one step (`RENAME_NOREPLACE`; where the
    /// file system lacks it, a check just before the rename), and take no second walk to the
    /// key's directory.
    package func putNew(_ key: String, _ data: UnsafeRawBufferPointer) throws(FSError) {
        try put(key, data, exclusive: true)
    }

    private func put(_ key: String, _ data: UnsafeRawBufferPointer, exclusive: Bool) throws(FSError) {
        let rootFD = try openRoot()
        defer { Glibc.close(rootFD) }
        let (dir, name) = LocalObjectStore.split(key)
        let tmp = "\(name).tmp\(Sys.pid)-\(Sys.monotonicNanos() % 1_000_000_007)"
        let flags = O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC
        // Subdirectories are made as needed, the bucket directory itself never (a missing one is
        // more likely an unmounted shared file system than an empty bucket). In a shared bucket
        // another member may have just made a directory on the way and not yet opened it up to
        // the group: a moment later it is.
        var dirFD: Int32 = -1
        var fd: Int32 = -1
        var e: Int32 = 0
        for attempt in 0...50 {
            if attempt > 0 { Sys.sleep(seconds: 0.01) }
            dirFD = openDirectory(rootFD, dir, create: true)
            if dirFD >= 0 {
                fd = Glibc.openat(dirFD, tmp, flags, 0o644)
                if fd >= 0 { break }
                e = errno
                Glibc.close(dirFD)
                dirFD = -1
            } else {
                e = -dirFD
            }
            if e != EACCES || shared == nil { break }
        }
        if fd < 0 { throw failure(e, "cannot write object \(key)") }
        defer { Glibc.close(dirFD) }
        if exclusive {
            // Refused before anything is written when it exists already (the rename below
            // refuses it again, in one step with the rename, should it appear meanwhile).
            var st = stat()
            let found = fstatat(dirFD, name, &st, AT_SYMLINK_NOFOLLOW) == 0
            let e = errno
            if found || e != ENOENT {
                Sys.close(fd)
                _ = unlinkat(dirFD, tmp, 0)
                if found { throw FSError(EEXIST, "object \(key) exists in \(description)") }
                throw failure(e, "object \(key)")
            }
        }
        if let shared { _ = fchmod(fd, shared.file) }
        do throws(FSError) {
            defer { Sys.close(fd) }
            if let base = data.baseAddress, data.count > 0, !direct.write(fd, base, data.count) {
                try Sys.pwrite(fd, base, data.count, 0, path: "\(root)/\(dir)/\(tmp)")
            }
            if deferSync {
                Sys.startWriteback(fd)
            } else {
                try Sys.fdatasync(fd, path: "\(root)/\(dir)/\(tmp)")
            }
        } catch {
            _ = unlinkat(dirFD, tmp, 0)
            throw error.context("cannot write object \(key) in \(description)")
        }
        if exclusive {
            var rc = Sys.renameNoReplace(dirFD, tmp, dirFD, name)
            if rc != 0 && (errno == EINVAL || errno == ENOSYS) {
                var st = stat()
                if fstatat(dirFD, name, &st, AT_SYMLINK_NOFOLLOW) == 0 {
                    errno = EEXIST
                } else {
                    rc = renameat(dirFD, tmp, dirFD, name)
                }
            }
            if rc != 0 {
                let e = errno
                _ = unlinkat(dirFD, tmp, 0)
                if e == EEXIST { throw FSError(EEXIST, "object \(key) exists in \(description)") }
                throw FSError.errno(e, "rename \(tmp) to \(name)").context("cannot write object \(key) in \(description)")
            }
        } else if renameat(dirFD, tmp, dirFD, name) != 0 {
            let e = FSError.errno(errno, "rename \(tmp) to \(name)")
            _ = unlinkat(dirFD, tmp, 0)
            throw e.context("cannot write object \(key) in \(description)")
        }
        if deferSync {
            let count = pending.withLock {
                unsynced.append(key)
                return unsynced.count
            }
            if count >= Self.unsyncedLimit {
                // (A failure is kept for the callers whose objects it was; this one's is stored.)
                do { try sync() } catch { Log.error(error.message) }
            }
        }
    }

    /// Objects put and not flushed yet.
    public var unsyncedCount: Int { pending.withLock { unsynced.count } }

    /// Waits until every object put before the call has been flushed, with the directory
    /// entries made for it. Objects put by others are flushed in the same batch; a failure is
    /// thrown to a caller that names the object (`keys`: the objects a commit is about to
    /// name) even when another caller's batch met it; a caller that names none gets the
    /// failures of the batch it flushed itself.
    public func sync(_ keys: [String]) throws(FSError) {
        guard deferSync else { return }
        let (batch, dirs) = pending.withLock { () -> ([String], Set<String>) in
            while syncing { pending.wait() }
            let batch = unsynced
            unsynced = []
            syncing = !batch.isEmpty
            if batch.isEmpty { return ([], []) }
            let dirs = madeIn
            madeIn = []
            return (batch, dirs)
        }
        var batchError: FSError?
        if !batch.isEmpty {
            let failures = flush(batch, dirs: dirs)
            batchError = failures.first?.1
            pending.withLock {
                // (Bounded: past it a failure is not kept by key, and every later sync that names
                // an object it cannot vouch for fails.)
                for (k, e) in failures {
                    if failed.count < 100_000 { failed[k] = e } else { lostFailures = true }
                }
                syncing = false
                pending.broadcast()
            }
        }
        if keys.isEmpty {
            if let batchError { throw batchError }
            return
        }
        let (mine, lost) = pending.withLock { (keys.compactMap { failed.removeValue(forKey: $0) }, lostFailures) }
        if let e = mine.first { throw e }
        if lost { throw FSError(EIO, "\(description): more flushes failed than are kept; objects may not be on disk") }
    }

    /// Flushes the objects `keys` and the directories `dirs` (where directories were made);
    /// what failed, by key. (An object's entry in a directory that was there is not flushed
    /// apart: it was renamed into place before its data was flushed, and a journaling file
    /// system (ext4, XFS) commits the rename with that flush; the put before deferred flushes
    /// did not flush it at all.)
    private func flush(_ keys: [String], dirs made: Set<String>) -> [(String, FSError)] {
        let rootFD: Int32
        do { rootFD = try openRoot() } catch { return keys.map { ($0, error) } }
        defer { Glibc.close(rootFD) }
        var failures: [(String, FSError)] = []
        var dirs: [String: [String]] = Dictionary(uniqueKeysWithValues: made.map { ($0, []) })
        for key in keys {
            let fd = Sys.openBeneath(rootFD, key, O_RDONLY | O_NOCTTY | O_NONBLOCK)
            if fd < 0 {
                // (Deleted since: nothing to flush.)
                if errno != ENOENT { failures.append((key, failure(errno, "cannot flush object \(key)"))) }
                continue
            }
            var st = stat()
            if fstat(fd, &st) != 0 || st.st_mode & S_IFMT != S_IFREG {
                failures.append((key, failure(ELOOP, "cannot flush object \(key)")))
            } else {
                do { try Sys.fdatasync(fd, path: "\(root)/\(key)") } catch {
                    failures.append((key, error.context("cannot flush object \(key) in \(description)")))
                }
            }
            Sys.close(fd)
            // (Each made directory on the path.)
            var dir = LocalObjectStore.split(key).dir
            while !made.isEmpty {
                if made.contains(dir) { dirs[dir]?.append(key) }
                if dir.isEmpty { break }
                dir = LocalObjectStore.split(dir).dir
            }
        }
        for (dir, under) in dirs {
            let fd =
                dir.isEmpty ? Glibc.openat(rootFD, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC) : Sys.openBeneath(rootFD, dir, O_RDONLY | O_DIRECTORY)
            var e: FSError?
            if fd < 0 {
                e = failure(errno, "cannot flush directory \(dir)")
            } else {
                if Glibc.fsync(fd) != 0 { e = failure(errno, "cannot flush directory \(dir)") }
                Glibc.close(fd)
            }
            if let e {
                failures += under.map { ($0, e) }
                // (Tried again at the next sync, for objects that come later.)
                pending.withLock { _ = madeIn.insert(dir) }
            }
        }
        return failures
    }

    public func get(_ key: String, offset: Int, into buffer: UnsafeMutableRawBufferPointer) throws(FSError) -> Int {
        let fd = try openForReading(key)
        defer { Sys.close(fd) }
        guard let base = buffer.baseAddress, buffer.count > 0 else { return 0 }
        return try Sys.pread(fd, base, buffer.count, Int64(offset), path: "\(root)/\(key)")
    }

    /// A read-only, close-on-exec descriptor of the object's file (a regular file beneath the
    /// root, reached through no link), for the caller to read or to pass on; the caller closes it.
    package func openForReading(_ key: String) throws(FSError) -> Int32 {
        let rootFD = try openRoot()
        defer { Glibc.close(rootFD) }
        let fd = Sys.openBeneath(rootFD, key, O_RDONLY | O_NONBLOCK | O_NOCTTY)
        if fd < 0 { throw failure(errno, "object \(key)") }
        var st = stat()
        guard fstat(fd, &st) == 0, st.st_mode & S_IFMT == S_IFREG else {
            Sys.close(fd)
            throw failure(ELOOP, "object \(key)")
        }
        return fd
    }

    /// The open directory of `key` (to close) and its name there; nil when that directory is missing.
    private func parent(of key: String, _ what: String) throws(FSError) -> (fd: Int32, name: String)? {
        let rootFD = try openRoot()
        defer { Glibc.close(rootFD) }
        let (dir, name) = LocalObjectStore.split(key)
        let fd = openDirectory(rootFD, dir, create: false)
        if fd < 0 {
            if -fd == ENOENT { return nil }
            throw failure(-fd, what)
        }
        return (fd, name)
    }

    public func delete(_ key: String) throws(FSError) {
        guard let (dirFD, name) = try parent(of: key, "cannot delete object \(key)") else { return }
        defer { Glibc.close(dirFD) }
        if unlinkat(dirFD, name, 0) != 0 && errno != ENOENT { throw FSError.errno(errno, "cannot delete object \(key) in \(description)") }
    }

    public func head(_ key: String) throws(FSError) -> Int? {
        guard let (dirFD, name) = try parent(of: key, "object \(key)") else { return nil }
        defer { Glibc.close(dirFD) }
        var st = stat()
        if fstatat(dirFD, name, &st, AT_SYMLINK_NOFOLLOW) != 0 {
            if errno == ENOENT { return nil }
            throw failure(errno, "object \(key)")
        }
        guard st.st_mode & S_IFMT == S_IFREG else { throw failure(ELOOP, "object \(key)") }
        return Int(st.st_size)
    }

    /// Whether a file name is `put`'s temporary one (`<name>.tmp<pid>-<n>`).
    static func isTemporary(_ name: String) -> Bool {
        guard let r = name.ranges(of: ".tmp").last else { return false }
        let parts = name[r.upperBound...].split(separator: "-", omittingEmptySubsequences: false)
        return parts.count == 2 && parts.allSatisfy { !$0.isEmpty && $0.utf8.allSatisfy { $0 >= 48 && $0 <= 57 } }
    }

    public func list(prefix: String, after: String?, limit: Int) throws(FSError) -> [ObjectInfo] {
        var out: [ObjectInfo] = []
        walk(root, rel: "", prefix: prefix, after: after, limit: limit, into: &out)
        return out
    }

    /// Collects objects in key order (a directory's names sorted as their keys sort: a
    /// directory as its name and "/"), stopping at `limit`; subtrees wholly at or before
    /// `after` are not entered.
    private func walk(_ dir: String, rel: String, prefix: String, after: String?, limit: Int, into out: inout [ObjectInfo]) {
        guard out.count < limit, let d = opendir(dir) else { return }
        defer { closedir(d) }
        var items: [(sortKey: String, name: String, st: stat)] = []
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name == "." || name == ".." { continue }
            let key = rel.isEmpty ? name : "\(rel)/\(name)"
            // Descend only where the prefix can still match.
            if !(key.hasPrefix(prefix) || prefix.hasPrefix(key)) { continue }
            var st = stat()
            // Links are not objects, and a linked directory is not walked into.
            guard lstat("\(dir)/\(name)", &st) == 0 else { continue }
            let isDir = st.st_mode & S_IFMT == S_IFDIR
            // An object being written (`put`'s "<name>.tmp<pid>-<n>") is not one yet.
            if !isDir && LocalObjectStore.isTemporary(name) { continue }
            if let after, !after.hasPrefix(key + "/"), (isDir ? key + "/" : key) <= after { continue }
            items.append((isDir ? name + "/" : name, name, st))
        }
        for (_, name, st) in items.sorted(by: { Array($0.sortKey.utf8).lexicographicallyPrecedes(Array($1.sortKey.utf8)) }) {
            if out.count >= limit { return }
            let key = rel.isEmpty ? name : "\(rel)/\(name)"
            if st.st_mode & S_IFMT == S_IFDIR {
                walk("\(dir)/\(name)", rel: key, prefix: prefix, after: after, limit: limit, into: &out)
            } else if st.st_mode & S_IFMT == S_IFREG && key.hasPrefix(prefix) {
                out.append(ObjectInfo(key: key, size: Int(st.st_size), modified: Int64(st.st_mtim.tv_sec)))
            }
        }
    }
}
