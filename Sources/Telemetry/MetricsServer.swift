import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// Serves `Telemetry.exposition()` over HTTP (`GET /metrics`): on TCP addresses (a
/// `--metrics` port, for Prometheus) and on a Unix socket in the user's mount-record directory
/// (for `stagefs stats`). Each request is bounded: a request head of at most 8 KiB, read
/// within 2 s, the answer sent within 10 s; at most `maxConnections` answered at once, the rest
/// wait their turn. Nothing a client sends is kept.
///
/// `@unchecked Sendable`: `listeners`, `active` and `stopped` are read and written under `lock`.
package final class MetricsServer: @unchecked Sendable {
    private let lock = ConditionLock()
    private var listeners: [(fd: Int32, label: String)] = []
    private var active = 0
    private var stopped = false
    /// Connections served at once.
    package static let maxConnections = 16
    static let maxRequestHead = 8192

    package init() {}

    /// Listens on `address` (each address it resolves to); returns the `HOST:PORT` labels.
    /// A port taken is an error that names it.
    @discardableResult
    package func listen(_ address: TCPAddress, option: String) throws(FSError) -> [String] {
        let made = try TCP.listen(address, option: option)
        lock.withLock { listeners += made }
        return made.map(\.label)
    }

    /// Listens on a Unix socket `name` in the directory open as `dir` (only its owner can reach
    /// it: the directory is theirs, mode 0700). A socket left there by a mount that died is
    /// replaced; anything else of that name is an error.
    package func listenUnix(dir: Int32, name: String, label: String) throws(FSError) {
        var st = stat()
        if fstatat(dir, name, &st, AT_SYMLINK_NOFOLLOW) == 0 {
            guard st.st_mode & S_IFMT == S_IFSOCK else { throw FSError(EEXIST, "\(label) exists and is not a socket") }
            unlinkat(dir, name, 0)
        }
        // Through the directory's descriptor: the path to it may be longer than a socket's
        // address holds.
        var addr = try UnixSocket.address("/proc/self/fd/\(dir)/\(name)")
        let fd = try UnixSocket.make()
        let rc = withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0, Glibc.listen(fd, 16) == 0 else {
            let e = errno
            close(fd)
            throw FSError.errno(e, "listening on \(label)")
        }
        lock.withLock { listeners.append((fd, label)) }
    }

    /// Starts a thread accepting on each listening socket.
    package func start() {
        for l in lock.withLock({ listeners }) {
            DetachedThread.start(stackSize: 256 << 10) { [self] in acceptLoop(l.fd) }
        }
    }

    /// Stops accepting (connections being answered finish on their own).
    package func stop() {
        let all = lock.withLock { () -> [(fd: Int32, label: String)] in
            stopped = true
            lock.broadcast()
            defer { listeners = [] }
            return listeners
        }
        // (shutdown wakes a thread blocked in accept; it closes the socket.)
        for l in all { shutdown(l.fd, Int32(SHUT_RDWR)) }
    }

    private func acceptLoop(_ fd: Int32) {
        while true {
            let c = Sys.acceptCloexec(fd)
            if lock.withLock({ stopped }) {
                if c >= 0 { close(c) }
                break
            }
            if c < 0 {
                if errno == EINTR || errno == ECONNABORTED { continue }
                if errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM {
                    Sys.sleep(seconds: 0.1)
                    continue
                }
                Log.warning("metrics: accept: \(String(cString: strerror(errno)))")
                break
            }
            // At most `maxConnections` at once: the next waits for a turn (each is over within
            // its time limits), and meanwhile the kernel's backlog holds further ones.
            let admitted = lock.withLock { () -> Bool in
                while active >= Self.maxConnections && !stopped { _ = lock.wait(seconds: 1) }
                if stopped { return false }
                active += 1
                return true
            }
            guard admitted else {
                close(c)
                break
            }
            let started = DetachedThread.start(stackSize: 256 << 10) { [self] in
                answer(c)
                close(c)
                lock.withLock {
                    active -= 1
                    lock.broadcast()
                }
            }
            if !started {
                close(c)
                lock.withLock { active -= 1 }
            }
        }
        close(fd)
    }

    private func answer(_ c: Int32) {
        var tv = timeval(tv_sec: 2, tv_usec: 0)
        setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        tv.tv_sec = 10
        setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        guard let head = readHead(c) else { return }
        let (status, body): (String, [UInt8])
        switch Self.endOfHead(head) ? Self.route(head) : .tooLong {
        case .tooLong: (status, body) = ("431 Request Header Fields Too Large", Array("a request head is at most 8 KiB\n".utf8))
        case .metrics: (status, body) = ("200 OK", Telemetry.exposition())
        case .notFound: (status, body) = ("404 Not Found", Array("only /metrics is served here\n".utf8))
        case .badMethod: (status, body) = ("405 Method Not Allowed", Array("only GET is served here\n".utf8))
        case .bad: (status, body) = ("400 Bad Request", Array("not an HTTP request\n".utf8))
        }
        let header = Array(
            "HTTP/1.1 \(status)\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: \(body.count)\r\nConnection: close\r\n\r\n"
                .utf8)
        try? fsTyped {
            try header.withUnsafeBytes { h in try body.withUnsafeBytes { b in try Sys.writeAll(c, [h, b], path: "metrics connection") } }
        }
        // What the client sent beyond the head is read and dropped (at most 64 KiB, within the
        // read timeout), so that closing does not reset the connection before it read the answer.
        shutdown(c, Int32(SHUT_WR))
        var sink = [UInt8](repeating: 0, count: 4096)
        var drained = 0
        while drained < 65536 {
            let n = sink.withUnsafeMutableBytes { Glibc.read(c, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            drained += n
        }
    }

    /// The request head (up to its blank line), or nil when none came in time or it is too long.
    private func readHead(_ c: Int32) -> [UInt8]? {
        var head: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 2048)
        while head.count < Self.maxRequestHead {
            let n = buf.withUnsafeMutableBytes { Glibc.read(c, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return head.isEmpty ? nil : head }
            head += buf[0..<n]
            if Self.endOfHead(head) { return head }
        }
        return head
    }

    /// Whether `h` holds a whole request head (a blank line: CRLF CRLF, or LF LF).
    package static func endOfHead(_ h: [UInt8]) -> Bool {
        for i in h.indices where h[i] == 10 {
            if i >= 1 && h[i - 1] == 10 { return true }
            if i >= 3 && h[i - 1] == 13 && h[i - 2] == 10 && h[i - 3] == 13 { return true }
        }
        return false
    }

    package enum Route: Equatable { case metrics, notFound, badMethod, bad, tooLong }

    /// What a request head asks: `GET /metrics` (with or without a query) is the one answer.
    package static func route(_ head: [UInt8]) -> Route {
        guard let eol = head.firstIndex(of: 10) else { return .bad }
        let line = head[..<eol].split(separator: 32, omittingEmptySubsequences: true)
        guard line.count >= 2, line.count <= 3 else { return .bad }
        guard Array(line[0]) == Array("GET".utf8) || Array(line[0]) == Array("HEAD".utf8) else { return .badMethod }
        var path = Array(line[1])
        if let q = path.firstIndex(of: UInt8(ascii: "?")) { path = Array(path[..<q]) }
        return path == Array("/metrics".utf8) || path == Array("/".utf8) ? .metrics : .notFound
    }
}

/// A client of a metrics socket: the exposition's text, read whole (at most `limit` bytes).
package enum MetricsClient {
    package static let limit = 16 << 20

    /// `GET /metrics` on the Unix socket `name` in the directory open as `dir`.
    package static func fetch(dir: Int32, name: String, label: String) throws(FSError) -> [UInt8] {
        var addr = try UnixSocket.address("/proc/self/fd/\(dir)/\(name)")
        let fd = try UnixSocket.make()
        defer { close(fd) }
        var err: Int32 = 0
        let ok = withUnsafeMutablePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                Sys.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size), seconds: 5, err: &err)
            }
        }
        guard ok else { throw FSError(err, "cannot reach \(label): \(String(cString: strerror(err)))") }
        return try exchange(fd, label)
    }

    /// `GET /metrics` at `HOST:PORT`.
    package static func fetch(_ address: TCPAddress) throws(FSError) -> [UInt8] {
        let fd = try TCP.connect(host: address.host, port: address.port, timeout: 5, what: "the metrics port \(address)")
        defer { close(fd) }
        return try exchange(fd, "the metrics port \(address)")
    }

    private static func exchange(_ fd: Int32, _ label: String) throws(FSError) -> [UInt8] {
        var tv = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        let request = Array("GET /metrics HTTP/1.0\r\n\r\n".utf8)
        try fsTyped { try request.withUnsafeBytes { try Sys.writeAll(fd, [$0], path: label) } }
        var reply: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buf.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n < 0 { throw FSError.errno(errno, "reading \(label)") }
            if n == 0 { break }
            reply += buf[0..<n]
            if reply.count > limit { throw FSError(EFBIG, "\(label) answered more than \(limit) bytes") }
        }
        let sep: [UInt8] = [13, 10, 13, 10]
        guard let at = (0..<max(0, reply.count - 3)).first(where: { Array(reply[$0..<$0 + 4]) == sep }) else {
            throw FSError(EPROTO, "\(label) did not answer HTTP")
        }
        let status = String(decoding: reply[..<(reply.firstIndex(of: 13) ?? at)], as: UTF8.self)
        guard status.split(separator: " ").dropFirst().first == "200" else { throw FSError(EPROTO, "\(label) answered '\(status)'") }
        return Array(reply[(at + 4)...])
    }
}
