import COpenSSL
import CoreMetrics
import StageFSCore
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// A reply from Redis (RESP2).
package enum RedisReply: Equatable {
    case string([UInt8])
    case integer(Int64)
    case array([RedisReply])
    case null
    case status(String)
    case error(String)

    package var bytes: [UInt8]? {
        switch self {
        case .string(let b): return b
        case .status(let s): return Array(s.utf8)
        case .integer(let i): return Array(String(i).utf8)
        default: return nil
        }
    }

    package var int: Int64? {
        switch self {
        case .integer(let i): return i
        case .string(let b): return Int64(String(decoding: b, as: UTF8.self))
        default: return nil
        }
    }

    package var array: [RedisReply] {
        if case .array(let a) = self { return a }
        return []
    }

    package var text: String? { bytes.map { String(decoding: $0, as: UTF8.self) } }
}

/// Something that can be sent as one argument of a Redis command.
package protocol RedisArg {
    /// Appends the argument as a RESP bulk string (`$<length>\r\n<bytes>\r\n`).
    func appendBulk(to out: inout [UInt8])
}

/// RESP encoding without intermediate strings: the commit of a transaction sends many small
/// arguments, and formatting each number through `String` cost more than the rest of the
/// encoding (measured with perf on the engine bench).
package enum RESP {
    /// How many decimal digits `v` has.
    @inline(__always)
    package static func digits(_ v: UInt64) -> Int {
        var n = 1
        var t = v
        while t >= 10 {
            t /= 10
            n += 1
        }
        return n
    }

    package static func appendDecimal(_ v: UInt64, to out: inout [UInt8]) {
        let n = digits(v)
        let end = out.count + n
        out.append(contentsOf: repeatElement(48, count: n))
        var x = v
        var i = end - 1
        while x > 0 {
            out[i] = 48 + UInt8(x % 10)
            x /= 10
            i -= 1
        }
    }

    @inline(__always)
    package static func crlf(_ out: inout [UInt8]) {
        out.append(13)
        out.append(10)
    }

    static func appendBulk<C: Collection<UInt8>>(_ bytes: C, count: Int, to out: inout [UInt8]) {
        out.append(36)
        appendDecimal(UInt64(count), to: &out)
        crlf(&out)
        out.append(contentsOf: bytes)
        crlf(&out)
    }

    static func appendBulk(_ v: Int64, to out: inout [UInt8]) {
        out.append(36)
        appendDecimal(UInt64(digits(v.magnitude) + (v < 0 ? 1 : 0)), to: &out)
        crlf(&out)
        if v < 0 { out.append(45) }
        appendDecimal(v.magnitude, to: &out)
        crlf(&out)
    }

    static func appendBulk(_ v: UInt64, to out: inout [UInt8]) {
        out.append(36)
        appendDecimal(UInt64(digits(v)), to: &out)
        crlf(&out)
        appendDecimal(v, to: &out)
        crlf(&out)
    }
}

/// A command encoded while it is built, without an array of arguments in between (for the
/// commits and read batches of `RedisTxnStore`, which have many arguments).
package struct RedisCommand {
    package private(set) var body: [UInt8] = []
    package private(set) var count = 0

    package init(capacity: Int = 256) { body.reserveCapacity(capacity) }

    package init(_ args: [any RedisArg]) {
        body.reserveCapacity(args.count * 16)
        for a in args { add(a) }
    }

    package mutating func add<A: RedisArg>(_ a: A) {
        a.appendBulk(to: &body)
        count += 1
    }

    package mutating func add(contentsOf other: RedisCommand) {
        body += other.body
        count += other.count
    }
}

extension String: RedisArg {
    package func appendBulk(to out: inout [UInt8]) { RESP.appendBulk(utf8, count: utf8.count, to: &out) }
}
extension Array: RedisArg where Element == UInt8 {
    package func appendBulk(to out: inout [UInt8]) { RESP.appendBulk(self, count: count, to: &out) }
}
extension Int: RedisArg { package func appendBulk(to out: inout [UInt8]) { RESP.appendBulk(Int64(self), to: &out) } }
extension Int64: RedisArg { package func appendBulk(to out: inout [UInt8]) { RESP.appendBulk(self, to: &out) } }
extension UInt64: RedisArg { package func appendBulk(to out: inout [UInt8]) { RESP.appendBulk(self, to: &out) } }
extension UInt32: RedisArg { package func appendBulk(to out: inout [UInt8]) { RESP.appendBulk(UInt64(self), to: &out) } }
extension UInt16: RedisArg { package func appendBulk(to out: inout [UInt8]) { RESP.appendBulk(UInt64(self), to: &out) } }
extension UInt8: RedisArg { package func appendBulk(to out: inout [UInt8]) { RESP.appendBulk(UInt64(self), to: &out) } }

/// Error codes of the Redis transport: `transient` ones (the connection broke, the server is
/// loading, failing over, or read-only) are retried on a new connection within the pool's
/// deadline; the request may or may not have been carried out, which the engine's request ids
/// make harmless.
extension FSError {
    package static func redisTransient(_ message: String) -> FSError { FSError(ECONNRESET, message) }
    package var isRedisTransient: Bool { code == ECONNRESET }
}

/// The TLS settings of a pool (`rediss://`): one OpenSSL context for all its connections.
///
/// `@unchecked Sendable` because it holds an OpenSSL pointer, which the compiler cannot check.
/// Safe: the context is configured in `init` only; after that its threads only make `SSL`
/// objects from it (`SSL_new`), which OpenSSL allows concurrently, and each of those holds a
/// reference of its own, so `SSL_CTX_free` in `deinit` never frees a context still in use.
final class RedisTLS: @unchecked Sendable {
    let ctx: OpaquePointer
    let verify: Bool

    init(_ loc: RedisLocation) throws(FSError) {
        OPENSSL_init_ssl(0, nil)
        guard let c = SSL_CTX_new(TLS_client_method()) else { throw FSError(EIO, "cannot set up TLS: \(RedisTLS.lastError())") }
        ctx = c
        verify = !loc.tlsInsecure
        _ = copenssl_min_tls12(c)
        if let ca = loc.tlsCACert {
            if SSL_CTX_load_verify_locations(c, ca, nil) != 1 {
                throw FSError(EINVAL, "cannot use the CA certificate \(ca): \(RedisTLS.lastError())")
            }
        } else if SSL_CTX_set_default_verify_paths(c) != 1 {
            throw FSError(EIO, "cannot load the system's CA certificates: \(RedisTLS.lastError())")
        }
        if let cert = loc.tlsCert, let key = loc.tlsKey {
            if SSL_CTX_use_certificate_chain_file(c, cert) != 1 {
                throw FSError(EINVAL, "cannot use the client certificate \(cert): \(RedisTLS.lastError())")
            }
            if SSL_CTX_use_PrivateKey_file(c, key, SSL_FILETYPE_PEM) != 1 {
                throw FSError(EINVAL, "cannot use the client key \(key): \(RedisTLS.lastError())")
            }
        }
        SSL_CTX_set_verify(c, verify ? SSL_VERIFY_PEER : SSL_VERIFY_NONE, nil)
    }

    deinit { SSL_CTX_free(ctx) }

    /// The newest OpenSSL error, as text.
    static func lastError() -> String {
        let e = ERR_get_error()
        if e == 0 { return "unknown error" }
        var buf = [CChar](repeating: 0, count: 256)
        ERR_error_string_n(e, &buf, 256)
        return String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

/// One connection to a Redis server (or Sentinel), used by one thread at a time: a socket,
/// optionally TLS, and a RESP2 reader over a reused buffer.
package final class RedisConnection {
    private var fd: Int32 = -1
    private var ssl: OpaquePointer?
    /// Received bytes not yet parsed are `buf[start..<end]`.
    private var buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 << 10, alignment: 16)
    private var start = 0
    private var end = 0
    private var out: [UInt8] = []
    let where_: String
    /// `host:port` and what should answer there ("a Redis server", "a Redis Sentinel").
    private let address: String
    private let kind: String
    /// Set once an I/O error or a protocol error left the connection unusable.
    private(set) var broken = false
    /// Whether a reply has come back yet: until then, bytes that are not RESP, or a close
    /// without a word, mean something else listens on the port.
    private var answered = false
    /// Set when the peer closed the connection.
    private var peerClosed = false
    /// The client-tracking generation this connection's reads are tracked in (`RedisPool`), nil
    /// when they are not.
    package internal(set) var trackingGeneration: UInt64?
    /// The socket, for `RedisPool`'s listener to be woken from another thread.
    var socketNumber: Int32 { fd }

    /// Connects within `timeoutMillis` (TCP, then the TLS handshake); replies may take up to
    /// `replyTimeoutMillis`.
    init(_ host: RedisHost, tls: RedisTLS?, timeoutMillis: Int, replyTimeoutMillis: Int, label: String) throws(FSError) {
        where_ = "\(label) at \(host.text)"
        address = host.text
        kind = label == "Redis" ? "a Redis server" : "a \(label)"
        out.reserveCapacity(4096)
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var res: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host.host, String(host.port), &hints, &res)
        if rc != 0 {
            throw FSError(EHOSTUNREACH, "cannot reach \(where_): \(String(cString: gai_strerror(rc)).lowercased())")
        }
        defer { freeaddrinfo(res) }
        var lastErr: Int32 = ECONNREFUSED
        var ai = res
        while let a = ai {
            let s = socket(a.pointee.ai_family, a.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), a.pointee.ai_protocol)
            if s >= 0 {
                if Sys.connect(s, a.pointee.ai_addr, a.pointee.ai_addrlen, seconds: Double(timeoutMillis) / 1000, err: &lastErr) {
                    fd = s
                    break
                }
                Glibc.close(s)
            } else {
                lastErr = errno
            }
            ai = a.pointee.ai_next
        }
        if fd < 0 {
            let why: String
            switch lastErr {
            case ETIMEDOUT: why = "timed out"
            case ECONNREFUSED:
                why = "connection refused (nothing listens there: is \(label == "Redis" ? "redis-server" : "the Sentinel") running, on that port?)"
            default: why = String(cString: strerror(lastErr)).lowercased()
            }
            throw FSError(lastErr == ETIMEDOUT ? ETIMEDOUT : ECONNREFUSED, "cannot reach \(where_): \(why)")
        }
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, socklen_t(MemoryLayout<Int32>.size))
        var tv = timeval(tv_sec: replyTimeoutMillis / 1000, tv_usec: (replyTimeoutMillis % 1000) * 1000)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        if let tls {
            guard let s = SSL_new(tls.ctx) else { throw FSError(EIO, "cannot set up TLS to \(where_): \(RedisTLS.lastError())") }
            ssl = s
            SSL_set_fd(s, fd)
            _ = copenssl_set_sni(s, host.host)
            if tls.verify { _ = copenssl_expect_peer(s, host.host) }
            ERR_clear_error()
            if SSL_connect(s) != 1 {
                let verify = SSL_get_verify_result(s)
                let why =
                    verify != X509_V_OK
                    ? "the server's certificate is not trusted (\(String(cString: X509_verify_cert_error_string(verify))))"
                    : "\(RedisTLS.lastError()) (is it a TLS port? a plain one takes redis://)"
                throw FSError(EACCES, "TLS handshake with \(where_) failed: \(why)")
            }
        }
    }

    deinit {
        buf.deallocate()
        if let ssl {
            SSL_shutdown(ssl)
            SSL_free(ssl)
        }
        if fd >= 0 { Glibc.close(fd) }
    }

    private func lost(_ why: String) -> FSError {
        broken = true
        return .redisTransient("lost connection to \(where_): \(why)")
    }

    /// Before the first reply is parsed: RESP replies start with one of `+ - : $ *`. An HTTP,
    /// SSH or TLS port answers otherwise or closes at once, and waiting for a RESP line there
    /// would end in a puzzling "connection closed".
    private func checkFirstReply() throws(FSError) {
        if start == end {
            do throws(FSError) {
                try fill()
            } catch {
                guard peerClosed else { throw error }
                // Transient all the same: a Redis server shutting down may close a new connection.
                throw .redisTransient(
                    "\(address) closed the connection without answering: it is not \(kind), or one that wants TLS (use rediss://)")
            }
        }
        if [43, 45, 58, 36, 42].contains(buf[start]) { return }
        broken = true
        if end - start >= 2 && (buf[start] == 0x15 || buf[start] == 0x16) && buf[start + 1] == 3 {
            throw FSError(EPROTO, "\(address) answered in TLS: use rediss:// for it")
        }
        let head = UnsafeRawBufferPointer(rebasing: buf[start..<min(end, start + 60)])
        let line = head.prefix { $0 != 13 && $0 != 10 }
        let printable = line.allSatisfy { $0 >= 32 && $0 < 127 }
        let shown =
            printable && !line.isEmpty
            ? "'\(String(decoding: line.prefix(40), as: UTF8.self))\(line.count > 40 ? "..." : "")'"
            : "bytes \(head.prefix(8).map { String($0, radix: 16) }.joined(separator: " "))"
        throw FSError(EPROTO, "\(address) is not \(kind) (it answered \(shown)): check the host and port in the META-URL")
    }

    private func ioError(_ n: Int) -> FSError {
        if let ssl {
            let e = SSL_get_error(ssl, Int32(n))
            if e == SSL_ERROR_ZERO_RETURN || n == 0 {
                peerClosed = true
                return lost("connection closed")
            }
            if e == SSL_ERROR_SYSCALL && (errno == EAGAIN || errno == EWOULDBLOCK) { return lost("no reply in time") }
            return lost(e == SSL_ERROR_SYSCALL ? String(cString: strerror(errno)).lowercased() : RedisTLS.lastError())
        }
        if n == 0 || errno == ECONNRESET {
            peerClosed = true
            return lost(n == 0 ? "connection closed" : "connection reset by peer")
        }
        if errno == EAGAIN || errno == EWOULDBLOCK { return lost("no reply in time") }
        return lost(String(cString: strerror(errno)).lowercased())
    }

    private func sendAll() throws(FSError) {
        var done = 0
        while done < out.count {
            let n = out.withUnsafeBytes { b -> Int in
                if let ssl { return Int(SSL_write(ssl, b.baseAddress! + done, Int32(b.count - done))) }
                return Glibc.send(fd, b.baseAddress! + done, b.count - done, Int32(MSG_NOSIGNAL))
            }
            if n <= 0 {
                if n < 0 && ssl == nil && errno == EINTR { continue }
                throw ioError(n)
            }
            done += n
        }
        out.removeAll(keepingCapacity: true)
    }

    /// Reads more bytes into the buffer (at least one), making room first.
    private func fill() throws(FSError) {
        if start == end {
            start = 0
            end = 0
        } else if start > 0 && end == buf.count {
            (buf.baseAddress!).copyMemory(from: buf.baseAddress! + start, byteCount: end - start)
            end -= start
            start = 0
        }
        if end == buf.count {
            let bigger = UnsafeMutableRawBufferPointer.allocate(byteCount: buf.count * 2, alignment: 16)
            bigger.baseAddress!.copyMemory(from: buf.baseAddress!, byteCount: end)
            buf.deallocate()
            buf = bigger
        }
        while true {
            let room = buf.count - end
            let n: Int
            if let ssl {
                n = Int(SSL_read(ssl, buf.baseAddress! + end, Int32(room)))
            } else {
                n = Glibc.recv(fd, buf.baseAddress! + end, room, 0)
            }
            if n > 0 {
                end += n
                return
            }
            if n < 0 && ssl == nil && errno == EINTR { continue }
            throw ioError(n)
        }
    }

    /// The next line (without CRLF) as a range of the buffer.
    private func line() throws(FSError) -> Range<Int> {
        var from = start
        while true {
            if end - from >= 2, let cr = memchr(buf.baseAddress! + from, 13, end - from - 1) {
                let i = buf.baseAddress!.distance(to: cr)
                if buf[i + 1] == 10 {
                    let r = start..<i
                    start = i + 2
                    return r
                }
                from = i + 1
                continue
            }
            let consumed = from - start
            try fill()
            from = start + consumed
        }
    }

    private func number(_ r: Range<Int>) throws(FSError) -> Int64 {
        var v: Int64 = 0
        var neg = false
        for i in r {
            let c = buf[i]
            if c == 45 && i == r.lowerBound {
                neg = true
            } else if c >= 48 && c <= 57 {
                v = v * 10 + Int64(c - 48)
            } else {
                throw lost("malformed reply (is this a Redis server?)")
            }
        }
        return neg ? -v : v
    }

    private func text(_ r: Range<Int>) -> String {
        String(decoding: UnsafeRawBufferPointer(rebasing: buf[r]), as: UTF8.self)
    }

    private func parse() throws(FSError) -> RedisReply {
        let l = try line()
        guard !l.isEmpty else { throw lost("malformed reply (is this a Redis server?)") }
        let kind = buf[l.lowerBound]
        let body = (l.lowerBound + 1)..<l.upperBound
        switch kind {
        case 43:  // +
            return .status(text(body))
        case 45:  // -
            return .error(text(body))
        case 58:  // :
            return .integer(try number(body))
        case 36:  // $
            let n = try number(body)
            if n < 0 { return .null }
            let need = Int(n) + 2
            while end - start < need { try fill() }
            let bytes = [UInt8](UnsafeRawBufferPointer(rebasing: buf[start..<(start + Int(n))]))
            start += need
            return .string(bytes)
        case 42:  // *
            let n = try number(body)
            if n < 0 { return .null }
            var items: [RedisReply] = []
            items.reserveCapacity(Int(n))
            for _ in 0..<n { items.append(try parse()) }
            return .array(items)
        default:
            throw lost("malformed reply (is this a Redis server? it sent '\(text(l.lowerBound..<min(l.upperBound, l.lowerBound + 40))))')")
        }
    }

    /// Replies that mean "not now, not here": loading, read-only (a demoted master), failing
    /// over, and a cluster whose slot moved or is moving (the pool asks again where it is).
    private static let busy = ["LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "MOVED", "ASK", "CLUSTERDOWN"]

    private func encode(_ c: RedisCommand) {
        out.append(42)
        RESP.appendDecimal(UInt64(c.count), to: &out)
        RESP.crlf(&out)
        out += c.body
    }

    /// Marks the connection unusable, so the pool drops it instead of using it again.
    package func abandon() { broken = true }

    /// Sends commands without waiting for replies (on a subscribed connection).
    func send(_ commands: [RedisCommand]) throws(FSError) {
        if broken { throw lost("connection closed") }
        for c in commands { encode(c) }
        try sendAll()
    }

    /// Whether a reply is there to read, or arrives within `millis` milliseconds.
    func waitReadable(millis: Int32) -> Bool {
        if start < end { return true }
        if let ssl, SSL_pending(ssl) > 0 { return true }
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        return Glibc.poll(&p, 1, millis) > 0
    }

    /// The next reply that arrives (a subscribed connection's messages).
    func nextReply() throws(FSError) -> RedisReply {
        if broken { throw lost("connection closed") }
        let r = try parse()
        answered = true
        return r
    }

    /// Sends one command and waits for its reply.
    package func command(_ args: [any RedisArg]) throws(FSError) -> RedisReply {
        try pipeline([args])[0]
    }

    /// Sends several commands in one round trip and returns their replies in order.
    func pipeline(_ commands: [[any RedisArg]]) throws(FSError) -> [RedisReply] {
        try pipeline(commands.map { RedisCommand($0) })
    }

    /// Sends encoded commands in one round trip and returns their replies in order.
    package func pipeline(_ commands: [RedisCommand]) throws(FSError) -> [RedisReply] {
        if broken { throw lost("connection closed") }
        let start = Sys.monotonicNanos()
        defer { RedisMetrics.roundTrips.recordNanoseconds(Int64(Sys.monotonicNanos() &- start)) }
        for c in commands { encode(c) }
        try sendAll()
        var replies: [RedisReply] = []
        replies.reserveCapacity(commands.count)
        if !answered { try checkFirstReply() }
        for _ in commands { replies.append(try parse()) }
        answered = true
        // A server that is loading, read-only (a demoted master) or failing over: try again later.
        for r in replies {
            // (A read script following a key whose slot moves mid-resharding is refused too.)
            if case .error(let text) = r, RedisConnection.busy.contains(where: { text.hasPrefix($0) }) || text.contains("non local key") {
                throw FSError.redisTransient("\(where_) answered: \(text)")
            }
        }
        return replies
    }
}

/// Connections to the Redis master of a volume, handed to one thread at a time. A direct URL
/// names the server; a Sentinel URL names the master, found through the Sentinels and found
/// again after a failover. A call whose connection breaks, or that meets a server that is
/// loading, read-only or failing over, is retried on a new connection with back-off until
/// `retryTimeout` seconds have passed (then `EIO`): Redis restarts and failovers cost time, not
/// failed operations. Every idle connection is dropped at such a failure, so none broken by
/// the same event is used again.
///
/// `@unchecked Sendable` because of its mutable state, which the compiler cannot check: `idle`,
/// `master`, `cluster` and `outage` are read and written under `lock` only, and the rest is
/// `let`. A connection (not `Sendable`) is out of `idle` while one call uses it, so no two
/// threads use one at a time.
package final class RedisPool: @unchecked Sendable {
    let location: RedisLocation
    package let displayName: String
    /// Seconds a call keeps trying while Redis cannot be reached.
    let retryTimeout: Double
    private let tls: RedisTLS?
    let lock = ConditionLock()
    private var idle: [RedisConnection] = []
    // Client tracking (RedisTracking.swift), all under `lock`.
    weak var trackingSink: (any RedisInvalidationSink)?
    /// The listening connection while it listens.
    var trackingListener: TrackingListener?
    var trackingGeneration: UInt64 = 0
    /// The one tracked connection (reads and commits that want tracking take it when it is
    /// free; the others use untracked connections), and whether a call has it.
    var trackedConnection: RedisConnection?
    var trackedInUse = false
    /// The listener was woken on purpose (`wakeListener`).
    var listenerWoken = false
    /// Tracking was refused: no tracked connection is made before then (`pauseTracking`).
    var trackingPausedUntil: UInt64 = 0
    var trackingPauseSaid = false
    var trackingStopped = false
    /// Set while the listener reads and applies what arrived (`invalidationsArriving`).
    let listenerBusy = Atomic<Bool>(false)
    /// The server to talk to once found: the master a Sentinel named, or the Redis Cluster node
    /// serving the volume's slot.
    private var master: RedisHost?
    /// Whether the server is a Redis Cluster node (learned at the first connection).
    private var cluster: Bool?
    private var outage: UInt64?

    /// A pool for `location`; a call keeps trying for `retryTimeout` seconds while Redis cannot
    /// be reached.
    package init(_ location: RedisLocation, retryTimeout: Double = 60) throws(FSError) {
        self.location = location
        self.retryTimeout = retryTimeout
        tls = location.tls ? try RedisTLS(location) : nil
        if let name = location.masterName {
            displayName = "Redis master '\(name)' (Sentinels \(location.hosts.map(\.text).joined(separator: ","))) db \(location.db)"
        } else {
            displayName = "Redis at \(location.hosts[0].text)/\(location.db)"
        }
    }

    /// The master's address: what a Sentinel says now, the cluster node found serving the
    /// volume's slot, or the URL's server.
    private func resolveMaster() throws(FSError) -> RedisHost {
        guard let name = location.masterName else { return lock.withLock { master } ?? location.hosts[0] }
        if let m = lock.withLock({ master }) { return m }
        var why: [String] = []
        let password = getenv("SENTINEL_PASSWORD").map { String(cString: $0) }
        for s in location.hosts {
            do throws(FSError) {
                let c = try RedisConnection(s, tls: tls, timeoutMillis: 2000, replyTimeoutMillis: 2000, label: "Redis Sentinel")
                if let password, !password.isEmpty {
                    if case .error(let e) = try c.command(["AUTH", password]) {
                        throw FSError(EACCES, "Redis Sentinel at \(s.text) refused SENTINEL_PASSWORD: \(e)")
                    }
                }
                let r = try c.command(["SENTINEL", "get-master-addr-by-name", name])
                let a = r.array
                guard a.count == 2, let host = a[0].text, let port = a[1].text.flatMap({ Int($0) }) else {
                    why.append("\(s.text) knows no master '\(name)'")
                    continue
                }
                let m = RedisHost(host, port)
                lock.withLock { master = m }
                return m
            } catch {
                if error.code == EACCES { throw error }
                why.append(error.message)
            }
        }
        throw .redisTransient("no Sentinel gave the address of master '\(name)': \(why.joined(separator: "; "))")
    }

    /// A new connection to the master, authenticated, with the database selected (on a Redis
    /// Cluster: to the node serving the volume's slot; the database number is then only the
    /// volume's hash tag, as a cluster has database 0 alone).
    func connect() throws(FSError) -> RedisConnection {
        var m = try resolveMaster()
        for _ in 0..<3 {
            let c = try open(m)
            guard try learnCluster(c) else { return try prepare(c) }
            let owner = try slotOwner(c, asked: m)
            if owner == m { return c }
            lock.withLock { master = owner }
            m = owner
        }
        throw .redisTransient("\(displayName): the cluster's slot \(volumeSlot) keeps moving")
    }

    /// Whether the server is a Redis Cluster node (known after the first connection).
    package var isCluster: Bool { lock.withLock { cluster ?? false } }

    /// The slot of the volume's hash tag `{DB}` in a Redis Cluster (CRC-16/XMODEM of the tag's
    /// content, modulo 16384).
    var volumeSlot: Int {
        var crc: UInt16 = 0
        for b in String(location.db).utf8 {
            crc ^= UInt16(b) << 8
            for _ in 0..<8 { crc = crc & 0x8000 != 0 ? (crc << 1) ^ 0x1021 : crc << 1 }
        }
        return Int(crc & 0x3FFF)
    }

    /// Whether `c`'s server is a cluster node (asked once).
    private func learnCluster(_ c: RedisConnection) throws(FSError) -> Bool {
        if let known = lock.withLock({ cluster }) { return known }
        let info = try c.command(["INFO", "cluster"]).text ?? ""
        let yes = info.contains("cluster_enabled:1")
        if yes && location.masterName != nil {
            throw FSError(EINVAL, "\(c.where_) is a Redis Cluster node: name a node of it (redis://HOST:PORT/N), not Sentinels")
        }
        lock.withLock { cluster = yes }
        return yes
    }

    /// The cluster node serving the volume's slot, as `CLUSTER SLOTS` on `c` says.
    private func slotOwner(_ c: RedisConnection, asked: RedisHost) throws(FSError) -> RedisHost {
        let slot = volumeSlot
        for range in try c.command(["CLUSTER", "SLOTS"]).array {
            let r = range.array
            guard r.count >= 3, let lo = r[0].int, let hi = r[1].int, lo <= slot, slot <= hi else { continue }
            let node = r[2].array
            guard node.count >= 2, let port = node[1].int else { break }
            let host = node[0].text ?? ""
            return RedisHost(host.isEmpty || host == "?" ? asked.host : host, Int(port))
        }
        throw .redisTransient("\(c.where_): no cluster node serves slot \(slot) (the volume's) yet")
    }

    private func open(_ m: RedisHost) throws(FSError) -> RedisConnection {
        let c: RedisConnection
        do throws(FSError) {
            c = try RedisConnection(m, tls: tls, timeoutMillis: 5000, replyTimeoutMillis: 30_000, label: "Redis")
        } catch {
            forgetMaster()
            throw error
        }
        if let password = location.password {
            let args: [any RedisArg] = location.user.map { ["AUTH", $0, password] } ?? ["AUTH", password]
            if case .error(let e) = try c.command(args) { throw FSError(EACCES, "\(c.where_) refused the password: \(e)") }
        }
        if location.password == nil, case .error(let e) = try c.command(["PING"]), e.hasPrefix("NOAUTH") {
            throw FSError(
                EACCES,
                "\(c.where_) wants a password: set META_PASSWORD (or META_PASSWORD_FILE, a file holding it) for this command, or give it in the META-URL (redis://:PASSWORD@host:port/db, which ps shows until it is hidden)"
            )
        }
        return c
    }

    /// A connection to a server that is no cluster node: the database selected, and for a
    /// Sentinel URL the role checked.
    private func prepare(_ c: RedisConnection) throws(FSError) -> RedisConnection {
        if location.db != 0 {
            if case .error(let e) = try c.command(["SELECT", location.db]) {
                throw FSError(EINVAL, "\(c.where_) has no database \(location.db): \(e)")
            }
        }
        if location.masterName != nil {
            // A Sentinel's answer can be stale for a moment: talk only to a master.
            let role = try c.command(["ROLE"]).array.first?.text
            if role != "master" {
                forgetMaster()
                throw .redisTransient("\(c.where_) is a \(role ?? "server of unknown role"), not the master (failover in progress)")
            }
        }
        return c
    }

    private func forgetMaster() { lock.withLock { master = nil } }

    private func idleOrNew() throws(FSError) -> RedisConnection {
        if let c = lock.withLock({ idle.popLast() }) { return c }
        return try connect()
    }

    /// A connection for a call that wants tracking: the tracked one when no other call has it
    /// (made when missing), else an untracked one.
    private func trackedOrOther() throws(FSError) -> RedisConnection {
        enum Take {
            case tracked(RedisConnection)
            case make(TrackingListener)
            case other
        }
        let take = lock.withLock { () -> Take in
            guard let l = trackingListener, !trackedInUse, Sys.monotonicNanos() >= trackingPausedUntil else { return .other }
            trackedInUse = true
            if let t = trackedConnection, t.trackingGeneration == l.generation { return .tracked(t) }
            trackedConnection = nil
            return .make(l)
        }
        switch take {
        case .tracked(let c): return c
        case .other: return try idleOrNew()
        case .make(let l):
            let c: RedisConnection
            do throws(FSError) {
                c = try connect()
                try track(c, l)
            } catch {
                lock.withLock { trackedInUse = false }
                throw error
            }
            let kept = lock.withLock { () -> Bool in
                guard c.trackingGeneration != nil, trackingListener?.generation == c.trackingGeneration else {
                    trackedInUse = false
                    return false
                }
                trackedConnection = c
                return true
            }
            if kept { return c }
            // (Tracking was refused or its generation ended: closed, and an untracked one used.)
            return try idleOrNew()
        }
    }

    /// Gives a connection back after a call.
    private func release(_ c: RedisConnection) {
        let isTracked = lock.withLock { () -> Bool in
            guard c === trackedConnection else { return false }
            trackedInUse = false
            if c.broken { trackedConnection = nil }
            return true
        }
        if c.broken {
            dropped(c)
        } else if !isTracked {
            lock.withLock { idle.append(c) }
        }
    }

    /// A connection that will not be used again: what it tracked is tracked no longer.
    private func dropped(_ c: RedisConnection) {
        if let g = c.trackingGeneration { trackingLost(g, "a tracked connection broke") }
    }

    /// Runs `body` once with a connection (no retry): the first contact of a command, so
    /// that an unreachable server is reported at once.
    package func once<T>(_ body: (RedisConnection) throws(FSError) -> T) throws(FSError) -> T {
        let conn = try idleOrNew()
        defer { release(conn) }
        return try body(conn)
    }

    /// Runs `body` with a connection, retrying transient failures until the deadline.
    /// `tracking`: with the tracked connection when tracking listens and no other call has it
    /// (`RedisConnection.trackingGeneration` says which the body got).
    package func with<T>(tracking: Bool = false, _ body: (RedisConnection) throws(FSError) -> T) throws(FSError) -> T {
        let start = Sys.monotonicNanos()
        var delay = 0.05
        var attempt = 0
        while true {
            attempt += 1
            var conn: RedisConnection?
            do throws(FSError) {
                let c = try tracking ? trackedOrOther() : idleOrNew()
                conn = c
                let r = try body(c)
                release(c)
                if attempt > 1 { recovered() }
                return r
            } catch {
                let transient =
                    error.isRedisTransient || (conn == nil && (error.code == ECONNREFUSED || error.code == ETIMEDOUT || error.code == EHOSTUNREACH))
                if !transient {
                    if let conn { release(conn) }
                    throw error
                }
                // Whatever broke this connection (a restart, a failover) broke the idle ones too,
                // and the listener's (it connects again, to the master found again).
                if let conn {
                    conn.abandon()
                    release(conn)
                }
                // (Idle connections are never tracked: the tracked one stays out of `idle`.)
                lock.withLock { idle.removeAll() }
                forgetMaster()
                wakeListener()
                let waited = Double(Sys.monotonicNanos() - start) / 1e9
                noteOutage(error)
                if waited + delay > retryTimeout {
                    throw FSError(EIO, "\(displayName) unreachable for \(Int(waited.rounded())) s: \(error.message)")
                }
                Sys.sleep(seconds: delay)
                delay = min(delay * 2, 1)
            }
        }
    }

    private func noteOutage(_ e: FSError) {
        let first = lock.withLock { () -> Bool in
            if outage != nil { return false }
            outage = Sys.monotonicNanos()
            return true
        }
        if first { Log.warning("\(e.message); retrying for up to \(Int(retryTimeout)) s") }
    }

    private func recovered() {
        if let since = lock.withLock({ () -> UInt64? in
            defer { outage = nil }
            return outage
        }) {
            Log.info("\(displayName) answers again after \(Double(Int(Double(Sys.monotonicNanos() - since) / 1e8)) / 10) s")
        }
    }
}

/// Round trips to Redis (a pipeline of commands is one), with their latency: what each
/// metadata operation costs on the network.
enum RedisMetrics {
    static let roundTrips = CoreMetrics.Timer(label: "stagefs_redis_round_trip_durations_histogram_seconds")
}
