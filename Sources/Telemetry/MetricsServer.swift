import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// Serves `Telemetry.exposition()` over HTTP (`GET /metrics`): on TCP addresses (a
/// `--metrics` port, for Prometheus) and on a Unix socket in the user's mount-record directory
/// (for `stagefs stats`). Each connection is bounded in time as a whole, however slowly its
/// client reads or writes: its request head (at most 8 KiB) must arrive within 2 s, the answer
/// goes out within 10 s, and what follows the head is read and dropped for at most 1 s. At most
/// `maxConnections` TCP connections and `maxUnixConnections` on the socket are answered at
/// once (apart, so that clients of the port cannot keep the mount's user out); the rest wait
/// their turn in the kernel's backlog. Nothing a client sends is kept. Sends never raise
/// SIGPIPE.
///
/// `@unchecked Sendable`: `listeners`, `active` and `stopped` are read and written under `lock`.
package final class MetricsServer: @unchecked Sendable {
    private struct Listener {
        var fd: Int32
        var label: String
        var unix: Bool
    }

    private let lock = ConditionLock()
    private var listeners: [Listener] = []
    /// Connections being answered: TCP, then Unix.
    private var active = [0, 0]
    private var started = false
    private var stopped = false
    package static let maxConnections = 16
    package static let maxUnixConnections = 4
    static let maxRequestHead = 8192

    package init() {}

    /// Listens on `address` (each address it resolves to); returns the `HOST:PORT` labels.
    /// A port taken is an error that names it.
    @discardableResult
    package func listen(_ address: TCPAddress, option: String) throws(FSError) -> [String] {
        let made = try TCP.listen(address, option: option)
        add(made.map { Listener(fd: $0.fd, label: $0.label, unix: false) })
        return made.map(\.label)
    }

    /// `listen`, but a port another process holds is not fatal: the reason is returned, and
    /// the port is tried again every `retrySeconds` until it is had or the server stops (so
    /// that a user who takes the port first cannot keep a gateway or a mount from starting).
    package func listenOrRetry(
        _ address: TCPAddress, option: String, retrySeconds: Double = 10
    ) throws(FSError) -> (
        labels: [String], deferred: String?
    ) {
        do {
            return (try listen(address, option: option), nil)
        } catch {
            guard error.code == EADDRINUSE else { throw error }
            DetachedThread.start(stackSize: 256 << 10) { [self] in
                while !lock.withLock({ () -> Bool in
                    if !stopped { _ = lock.wait(seconds: retrySeconds) }
                    return stopped
                }) {
                    if let labels = try? listen(address, option: option) {
                        Log.warning("metrics: now serving http://\(labels.joined(separator: ", http://"))/metrics")
                        return
                    }
                }
            }
            return ([], "\(error.message); metrics will be served there once it is free (tried every \(Int(retrySeconds)) s)")
        }
    }

    /// Listens on a Unix socket `name` in the directory open as `dir` (only its owner can reach
    /// it: the directory is theirs, mode 0700). A socket of that name that nothing answers (left
    /// by a mount that died) is replaced; one that answers (a mount of the same path in another
    /// mount namespace) or anything else of that name is an error.
    package func listenUnix(dir: Int32, name: String, label: String) throws(FSError) {
        var st = stat()
        let path = "/proc/self/fd/\(dir)/\(name)"
        if fstatat(dir, name, &st, AT_SYMLINK_NOFOLLOW) == 0 {
            guard st.st_mode & S_IFMT == S_IFSOCK else { throw FSError(EEXIST, "\(label) exists and is not a socket") }
            if Self.answers(path) { throw FSError(EADDRINUSE, "\(label) is served by another process (a mount of the same path elsewhere)") }
            unlinkat(dir, name, 0)
        }
        // Through the directory's descriptor: the path to it may be longer than a socket's
        // address holds.
        var addr = try UnixSocket.address(path)
        let fd = try UnixSocket.make()
        let rc = withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0, Glibc.listen(fd, 16) == 0 else {
            let e = errno
            close(fd)
            throw FSError.errno(e, "listening on \(label)")
        }
        add([Listener(fd: fd, label: label, unix: true)])
    }

    /// Whether something accepts connections on the Unix socket at `path`.
    private static func answers(_ path: String) -> Bool {
        guard var addr = try? UnixSocket.address(path), let fd = try? UnixSocket.make() else { return false }
        defer { close(fd) }
        var err: Int32 = 0
        return withUnsafeMutablePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                Sys.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size), seconds: 1, err: &err)
            }
        }
    }

    /// Starts a thread accepting on each listening socket (and on each added later).
    package func start() {
        let all = lock.withLock { () -> [Listener] in
            started = true
            return listeners
        }
        for l in all { acceptOn(l) }
    }

    private func add(_ made: [Listener]) {
        let now = lock.withLock { () -> Bool in
            listeners += made
            return started && !stopped
        }
        if now { for l in made { acceptOn(l) } }
    }

    private func acceptOn(_ l: Listener) {
        DetachedThread.start(stackSize: 256 << 10) { [self] in acceptLoop(l) }
    }

    /// Stops accepting (connections being answered finish within their own limits).
    package func stop() {
        let all = lock.withLock { () -> [Listener] in
            stopped = true
            lock.broadcast()
            defer { listeners = [] }
            return listeners
        }
        // (shutdown wakes a thread blocked in accept; it closes the socket.)
        for l in all { shutdown(l.fd, Int32(SHUT_RDWR)) }
    }

    private func acceptLoop(_ l: Listener) {
        let kind = l.unix ? 1 : 0
        let limit = l.unix ? Self.maxUnixConnections : Self.maxConnections
        while true {
            let c = Sys.acceptCloexec(l.fd)
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
                Log.warning("metrics: accept on \(l.label): \(String(cString: strerror(errno)))")
                break
            }
            // At most `limit` at once: the next waits for a turn (each is over within its
            // time limits), and meanwhile the kernel's backlog holds further ones.
            let admitted = lock.withLock { () -> Bool in
                while active[kind] >= limit && !stopped { _ = lock.wait(seconds: 1) }
                if stopped { return false }
                active[kind] += 1
                return true
            }
            guard admitted else {
                close(c)
                break
            }
            let running = DetachedThread.start(stackSize: 256 << 10) { [self] in
                answer(c)
                close(c)
                done(kind)
            }
            if !running {
                close(c)
                done(kind)
            }
        }
        close(l.fd)
    }

    private func done(_ kind: Int) {
        lock.withLock {
            active[kind] -= 1
            lock.broadcast()
        }
    }

    private func answer(_ c: Int32) {
        let now = Sys.monotonicNanos()
        let head = Self.readHead(c, deadline: now + 2_000_000_000)
        let route: Route
        switch head {
        case .none: return  // nothing whole in time, or the client went: no answer
        case .some(let h): route = Self.endOfHead(h) ? Self.route(h) : h.count >= Self.maxRequestHead ? .tooLong : .bad
        }
        let (status, body): (String, [UInt8])
        switch route {
        case .metrics: (status, body) = ("200 OK", Telemetry.exposition())
        case .notFound: (status, body) = ("404 Not Found", Array("only /metrics is served here\n".utf8))
        case .badMethod: (status, body) = ("405 Method Not Allowed", Array("only GET is served here\n".utf8))
        case .bad: (status, body) = ("400 Bad Request", Array("not an HTTP request\n".utf8))
        case .tooLong: (status, body) = ("431 Request Header Fields Too Large", Array("a request head is at most 8 KiB\n".utf8))
        }
        let header = Array(
            "HTTP/1.1 \(status)\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: \(body.count)\r\nConnection: close\r\n\r\n"
                .utf8)
        let isHead = head.map { $0.starts(with: Array("HEAD ".utf8)) } ?? false
        let sendDeadline = Sys.monotonicNanos() + 10_000_000_000
        guard Self.send(c, header, deadline: sendDeadline), isHead || Self.send(c, body, deadline: sendDeadline) else { return }
        // What the client sent beyond the head is read and dropped (at most 64 KiB, for at most
        // 1 s), so that closing does not reset the connection before it read the answer.
        shutdown(c, Int32(SHUT_WR))
        Self.drain(c, deadline: Sys.monotonicNanos() + 1_000_000_000)
    }

    /// Waits until `fd` is ready for `events` or `deadline` passes; whether it is ready.
    private static func ready(_ fd: Int32, _ events: Int32, deadline: UInt64) -> Bool {
        while true {
            let now = Sys.monotonicNanos()
            if now >= deadline { return false }
            var p = pollfd(fd: fd, events: Int16(events), revents: 0)
            let r = poll(&p, 1, Int32(min((deadline - now) / 1_000_000 + 1, 10_000)))
            if r > 0 { return true }
            if r < 0 && errno != EINTR { return false }
        }
    }

    /// The request head (up to its blank line, or the first 8 KiB, or what came before the
    /// client stopped sending); nil when nothing whole came by `deadline` or the read failed.
    private static func readHead(_ c: Int32, deadline: UInt64) -> [UInt8]? {
        var head: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 2048)
        while head.count < maxRequestHead {
            guard ready(c, Int32(POLLIN), deadline: deadline) else { return nil }
            let n = buf.withUnsafeMutableBytes { Glibc.recv(c, $0.baseAddress, min($0.count, maxRequestHead - head.count), Int32(MSG_DONTWAIT)) }
            if n < 0 && (errno == EINTR || errno == EAGAIN) { continue }
            if n < 0 { return nil }
            if n == 0 { return head.isEmpty ? nil : head }
            head += buf[0..<n]
            if endOfHead(head) { return head }
        }
        return head
    }

    /// Sends all of `bytes` by `deadline` (never raising SIGPIPE); whether it did.
    private static func send(_ c: Int32, _ bytes: [UInt8], deadline: UInt64) -> Bool {
        var at = 0
        while at < bytes.count {
            guard ready(c, Int32(POLLOUT), deadline: deadline) else { return false }
            let n = bytes.withUnsafeBytes { b in
                Glibc.send(c, b.baseAddress! + at, b.count - at, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT))
            }
            if n < 0 && (errno == EINTR || errno == EAGAIN) { continue }
            if n <= 0 { return false }
            at += n
        }
        return true
    }

    private static func drain(_ c: Int32, deadline: UInt64) {
        var sink = [UInt8](repeating: 0, count: 4096)
        var drained = 0
        while drained < 65536 && ready(c, Int32(POLLIN), deadline: deadline) {
            let n = sink.withUnsafeMutableBytes { Glibc.recv(c, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            if n < 0 && (errno == EINTR || errno == EAGAIN) { continue }
            if n <= 0 { return }
            drained += n
        }
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
        // One deadline for the whole exchange, however slowly the other end answers.
        let deadline = Sys.monotonicNanos() + 10_000_000_000
        let request = Array("GET /metrics HTTP/1.0\r\n\r\n".utf8)
        let sent = request.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        if sent != request.count { throw FSError.errno(sent < 0 ? errno : EPIPE, "writing to \(label)") }
        var reply: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let now = Sys.monotonicNanos()
            guard now < deadline else { throw FSError(ETIMEDOUT, "\(label) did not answer within 10 s") }
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let r = poll(&p, 1, Int32((deadline - now) / 1_000_000 + 1))
            if r < 0 && errno == EINTR { continue }
            if r <= 0 { continue }
            let n = buf.withUnsafeMutableBytes { Glibc.recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            if n < 0 && (errno == EINTR || errno == EAGAIN) { continue }
            if n < 0 { throw FSError.errno(errno, "reading \(label)") }
            if n == 0 { break }
            reply += buf[0..<n]
            if reply.count > limit { throw FSError(EFBIG, "\(label) answered more than \(limit) bytes") }
        }
        let sep: [UInt8] = [13, 10, 13, 10]
        guard let at = (0..<max(0, reply.count - 3)).first(where: { Array(reply[$0..<$0 + 4]) == sep }) else {
            throw FSError(EPROTO, "\(label) did not answer HTTP")
        }
        let statusLine = reply[..<(reply.firstIndex(of: 13) ?? at)].prefix(80).map { $0 >= 32 && $0 < 127 ? $0 : UInt8(ascii: "?") }
        let status = String(decoding: statusLine, as: UTF8.self)
        guard status.split(separator: " ").dropFirst().first == "200" else { throw FSError(EPROTO, "\(label) answered '\(status)'") }
        return Array(reply[(at + 4)...])
    }
}
