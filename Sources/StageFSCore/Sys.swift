import CLinux

#if canImport(Glibc)
    import Glibc
#endif

/// Every system call of the data path goes through here: retried on `EINTR`, errno turned
/// into an `FSError` naming the file, nothing else between the call and reading errno.
public enum Sys {
    @inline(__always)
    static func retrying<T: BinaryInteger>(_ what: @autoclosure () -> String, _ body: () -> T) throws(FSError) -> T {
        while true {
            let r = body()
            if r >= 0 { return r }
            let e = errno
            if e == EINTR { continue }
            throw FSError.errno(e, what())
        }
    }

    /// `open(2)`
    public static func open(_ path: String, _ flags: Int32, _ mode: mode_t = 0o644) throws(FSError) -> Int32 {
        try retrying(path) { Glibc.open(path, flags | O_CLOEXEC, mode) }
    }

    /// `close(2)`; errors are ignored (the descriptor is gone either way).
    public static func close(_ fd: Int32) {
        _ = Glibc.close(fd)
    }

    /// `pread(2)` until `count` bytes or end of file; returns bytes read.
    public static func pread(_ fd: Int32, _ buf: UnsafeMutableRawPointer, _ count: Int, _ offset: Int64, path: String = "file") throws(FSError) -> Int
    {
        var done = 0
        while done < count {
            let n = try retrying("read \(path)") { Glibc.pread(fd, buf + done, count - done, off_t(offset) + off_t(done)) }
            if n == 0 { break }
            done += n
        }
        return done
    }

    /// `read(2)` at the file's current offset: the bytes read, 0 at its end.
    public static func read(_ fd: Int32, _ buf: UnsafeMutableRawBufferPointer, path: String = "file") throws(FSError) -> Int {
        try retrying("read \(path)") { Glibc.read(fd, buf.baseAddress, buf.count) }
    }

    /// `pwrite(2)` of all `count` bytes.
    public static func pwrite(_ fd: Int32, _ buf: UnsafeRawPointer, _ count: Int, _ offset: Int64, path: String = "file") throws(FSError) {
        var done = 0
        while done < count {
            let n = try retrying("write \(path)") { Glibc.pwrite(fd, buf + done, count - done, off_t(offset) + off_t(done)) }
            done += n
        }
    }

    /// `writev(2)` of all the buffers at the file's current offset (a new file: from 0).
    public static func writeAll(_ fd: Int32, _ parts: [UnsafeRawBufferPointer], path: String = "file") throws(FSError) {
        var iov = parts.filter { $0.count > 0 }.map { iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress), iov_len: $0.count) }
        var i = 0
        while i < iov.count {
            let n = try iov.withUnsafeMutableBufferPointer { (b) throws(FSError) -> Int in
                try retrying("write \(path)") { Glibc.writev(fd, b.baseAddress! + i, Int32(b.count - i)) }
            }
            var left = n
            while i < iov.count && left >= iov[i].iov_len {
                left -= iov[i].iov_len
                i += 1
            }
            if i < iov.count && left > 0 {
                iov[i].iov_base += left
                iov[i].iov_len -= left
            }
        }
    }

    /// `fsync(2)`
    public static func fsync(_ fd: Int32, path: String = "file") throws(FSError) {
        _ = try retrying("fsync \(path)") { Glibc.fsync(fd) }
    }

    /// `fdatasync(2)`: the data and the size, not the times.
    public static func fdatasync(_ fd: Int32, path: String = "file") throws(FSError) {
        _ = try retrying("fdatasync \(path)") { Glibc.fdatasync(fd) }
    }

    /// Starts writing the file's dirty pages to disk without waiting (`sync_file_range` with
    /// `SYNC_FILE_RANGE_WRITE`): a later `fdatasync` finds them written or on their way.
    public static func startWriteback(_ fd: Int32) { _ = clinux_start_writeback(fd) }

    /// `rename(2)`
    public static func rename(_ from: String, _ to: String) throws(FSError) {
        _ = try retrying("rename \(from) to \(to)") { Glibc.rename(from, to) }
    }

    /// `unlink(2)`; a missing file is not an error.
    public static func unlinkIfPresent(_ path: String) throws(FSError) {
        if Glibc.unlink(path) != 0 && errno != ENOENT { throw FSError.errno(errno, "remove \(path)") }
    }

    /// `mkdir -p` with `mode` for the directories it creates.
    public static func mkdirs(_ path: String, _ mode: mode_t = 0o755) throws(FSError) {
        if path.isEmpty || path == "/" { return }
        var st = Glibc.stat()
        if statPath(path, &st) == 0 {
            if st.st_mode & S_IFMT == S_IFDIR { return }
            throw FSError(ENOTDIR, "\(path) exists and is not a directory")
        }
        let parent = dirname(of: path)
        if parent != path { try mkdirs(parent, mode) }
        if Glibc.mkdir(path, mode) != 0 && errno != EEXIST { throw FSError.errno(errno, "create directory \(path)") }
    }

    /// `connect(2)` bounded by `seconds`: non-blocking, waited for with `poll`, its outcome from
    /// `SO_ERROR`; the socket is back in blocking mode afterwards. False with `err` set on failure
    /// (`ETIMEDOUT` when the time ran out).
    public static func connect(
        _ s: Int32, _ addr: UnsafeMutablePointer<sockaddr>?, _ len: socklen_t, seconds: Double, err: inout Int32
    ) -> Bool {
        let flags = fcntl(s, F_GETFL)
        _ = fcntl(s, F_SETFL, flags | O_NONBLOCK)
        defer { _ = fcntl(s, F_SETFL, flags) }
        if Glibc.connect(s, addr, len) == 0 { return true }
        if errno != EINPROGRESS {
            err = errno
            return false
        }
        var p = pollfd(fd: s, events: Int16(POLLOUT), revents: 0)
        let deadline = monotonicNanos() + UInt64(max(0.001, seconds) * 1e9)
        while true {
            let now = monotonicNanos()
            if now >= deadline {
                err = ETIMEDOUT
                return false
            }
            let r = poll(&p, 1, Int32(min((deadline - now) / 1_000_000 + 1, 60_000)))
            if r > 0 { break }
            if r < 0 && errno != EINTR {
                err = errno
                return false
            }
        }
        var soErr: Int32 = 0
        var l = socklen_t(MemoryLayout<Int32>.size)
        getsockopt(s, SOL_SOCKET, SO_ERROR, &soErr, &l)
        if soErr != 0 {
            err = soErr
            return false
        }
        return true
    }

    /// `accept4(fd, NULL, NULL, SOCK_CLOEXEC)`: -1 and errno on failure.
    public static func acceptCloexec(_ fd: Int32) -> Int32 { clinux_accept_cloexec(fd) }

    /// `SO_PEERCRED`: who the kernel says is at the other end of a Unix socket (as it was at
    /// connect time), or nil with errno set.
    public static func peerCredential(_ fd: Int32) -> (pid: pid_t, uid: uid_t, gid: gid_t)? {
        var pid: pid_t = 0
        var uid: uid_t = 0
        var gid: gid_t = 0
        guard clinux_peer_credential(fd, &pid, &uid, &gid) == 0 else { return nil }
        return (pid, uid, gid)
    }

    /// `sendmsg` of `buffer` with descriptor `passing` attached (`SCM_RIGHTS`): the bytes sent,
    /// or -1 and errno.
    public static func send(_ sock: Int32, _ buffer: UnsafeRawBufferPointer, passing fd: Int32) -> Int {
        clinux_send_fd(sock, buffer.baseAddress, UInt(buffer.count), fd)
    }

    /// `recvmsg` into `buffer`, taking a descriptor passed with the bytes (`SCM_RIGHTS`,
    /// close-on-exec) into `fd` (-1 when none): the bytes received, 0 at the end, or -1 and errno.
    public static func receive(_ sock: Int32, _ buffer: UnsafeMutableRawBufferPointer, passed fd: inout Int32) -> Int {
        clinux_recv_fd(sock, buffer.baseAddress, UInt(buffer.count), &fd)
    }

    /// `renameat2(RENAME_NOREPLACE)`: 0, or -1 with errno (`EEXIST` when `new` exists; `EINVAL`
    /// or `ENOSYS` where it is not supported).
    public static func renameNoReplace(_ oldDir: Int32, _ old: String, _ newDir: Int32, _ new: String) -> Int32 {
        clinux_rename_noreplace(oldDir, old, newDir, new)
    }

    /// `POLLRDHUP`: the other end of a stream shut down its writing.
    public static let POLLRDHUP = clinux_pollrdhup()

    /// `O_PATH`: a descriptor naming a directory for the `*at` calls, without read permission.
    public static let O_PATH = clinux_o_path()
    /// `O_DIRECT`: writes go from the caller's memory to the device, past the page cache (set
    /// with `fcntl(F_SETFL)`; the buffer, offset and length must be aligned to the device).
    public static let O_DIRECT = clinux_o_direct()

    /// `openat2(2)` of the relative `path` below the open directory `dir`, never following a
    /// symbolic link in any of its components nor leaving `dir` (through `..` or an absolute
    /// path): what is opened is really there, whoever else may write in the tree. Returns the
    /// descriptor, or -1 with errno (`ELOOP` for a link, `EXDEV` for an escape); `EAGAIN` (a
    /// lease on the file, with `O_NONBLOCK`) is returned, never retried in a loop. Before Linux
    /// 5.6 (no openat2), or where a seccomp filter refuses it, the same by a walk of
    /// `O_NOFOLLOW` opens.
    public static func openBeneath(_ dir: Int32, _ path: String, _ flags: Int32, _ mode: mode_t = 0o644) -> Int32 {
        while true {
            let fd = clinux_open_beneath(dir, path, flags | O_CLOEXEC, UInt32(mode))
            if fd >= 0 { return fd }
            if errno == EINTR { continue }
            // ENOSYS before Linux 5.6; EPERM where a seccomp filter refuses the call.
            if errno != ENOSYS && errno != EPERM { return -1 }
            break
        }
        let parts = path.split(separator: "/").map(String.init)
        if path.hasPrefix("/") || parts.contains("..") {
            errno = EXDEV
            return -1
        }
        var cur = dir
        for (i, part) in parts.enumerated() {
            let last = i == parts.count - 1
            let fd = Glibc.openat(cur, part, last ? flags | O_NOFOLLOW | O_CLOEXEC : Sys.O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC, mode)
            let e = errno
            if cur != dir { Glibc.close(cur) }
            if fd < 0 {
                errno = e == ENOTDIR && !last ? ELOOP : e
                return -1
            }
            cur = fd
        }
        return cur == dir ? Glibc.openat(dir, ".", flags | O_CLOEXEC, mode) : cur
    }

    /// `stat(2)`, nil when the path does not exist.
    public static func stat(_ path: String) -> Glibc.stat? {
        var st = Glibc.stat()
        return statPath(path, &st) == 0 ? st : nil
    }

    /// The directory part of `path`.
    public static func dirname(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        if slash == path.startIndex { return "/" }
        return String(path[..<slash])
    }

    /// The last part of `path` (after its last slash).
    public static func basename(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return path }
        return String(path[path.index(after: slash)...])
    }

    /// Reads a whole small file (nil when it cannot be read).
    public static func readFile(_ path: String) -> [UInt8]? {
        guard let fd = try? open(path, O_RDONLY) else { return nil }
        defer { close(fd) }
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buf.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            out.append(contentsOf: buf[0..<n])
        }
        return out
    }

    /// Anonymous memory straight from the kernel (`mmap`), for block buffers: it goes back to
    /// the kernel on `unmap` instead of lingering in malloc arenas.
    public static func map(_ bytes: Int) -> UnsafeMutableRawPointer {
        let p = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        guard let p, p != MAP_FAILED else { fatalError("out of memory: mmap of \(bytes) bytes failed") }
        return p
    }

    /// Grows memory from `map` to `bytes`, keeping its contents: the kernel moves its pages
    /// (no copy) when it cannot grow it in place.
    public static func remap(_ p: UnsafeMutableRawPointer, from old: Int, to bytes: Int) -> UnsafeMutableRawPointer {
        let q = clinux_mremap_grow(p, old, bytes)
        guard let q, q != MAP_FAILED else { fatalError("out of memory: mremap to \(bytes) bytes failed") }
        return q
    }

    /// Returns memory from `map`.
    public static func unmap(_ p: UnsafeMutableRawPointer, _ bytes: Int) {
        munmap(p, bytes)
    }

    /// This process's id (read once).
    public static let pid = getpid()

    /// Monotonic clock in nanoseconds.
    public static func monotonicNanos() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    /// Sleeps for `seconds` (fractions allowed).
    public static func sleep(seconds: Double) {
        var ts = timespec(tv_sec: Int(seconds), tv_nsec: Int((seconds - Double(Int(seconds))) * 1e9))
        var left = timespec()
        while nanosleep(&ts, &left) != 0 && errno == EINTR { ts = left }
    }

    /// The host name, for session records.
    public static func hostname() -> String {
        var buf = [UInt8](repeating: 0, count: 256)
        buf.withUnsafeMutableBytes { _ = gethostname($0.baseAddress!.assumingMemoryBound(to: CChar.self), 255) }
        return String(decoding: buf.prefix { $0 != 0 }, as: UTF8.self)
    }

    /// Random bytes from the kernel.
    public static func randomBytes(_ n: Int) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: n)
        let fd = Glibc.open("/dev/urandom", O_RDONLY | O_CLOEXEC)
        if fd >= 0 {
            out.withUnsafeMutableBytes { _ = Glibc.read(fd, $0.baseAddress, n) }
            Glibc.close(fd)
        }
        return out
    }

    /// `getrandom(2)`: `n` bytes from the kernel's pool, or an error (never zeros, unlike
    /// `randomBytes`): for secrets such as a connection's nonce. Blocks only until the pool is
    /// first seeded at boot.
    public static func secureRandom(_ n: Int) throws(FSError) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: n)
        var done = 0
        while done < n {
            done += try retrying("getrandom") { out.withUnsafeMutableBytes { clinux_getrandom($0.baseAddress! + done, UInt(n - done)) } }
        }
        return out
    }
}

/// `stat(2)`, outside `Sys` where the name is taken.
private func statPath(_ path: String, _ st: inout Glibc.stat) -> Int32 {
    stat(path, &st)
}

/// `p` as an absolute path: resolved when it exists, else joined to the working directory.
public func absolutePath(_ p: String) -> String {
    if let r = realpath(p, nil) {
        defer { free(r) }
        return String(cString: r)
    }
    if p.hasPrefix("/") { return p }
    var buf = [CChar](repeating: 0, count: Int(PATH_MAX))
    guard getcwd(&buf, buf.count) != nil else { return p }
    let cwd = String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    return cwd == "/" ? "/\(p)" : "\(cwd)/\(p)"
}
