import CHiredis
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// A reply from Redis, copied out of hiredis' `redisReply`.
enum RedisReply: Equatable {
    case string([UInt8])
    case integer(Int64)
    case array([RedisReply])
    case null
    case status(String)
    case error(String)

    var bytes: [UInt8]? {
        switch self {
        case .string(let b): return b
        case .status(let s): return Array(s.utf8)
        case .integer(let i): return Array(String(i).utf8)
        default: return nil
        }
    }

    var int: Int64? {
        switch self {
        case .integer(let i): return i
        case .string(let b): return Int64(String(decoding: b, as: UTF8.self))
        default: return nil
        }
    }

    var array: [RedisReply] {
        if case .array(let a) = self { return a }
        return []
    }

    var text: String? { bytes.map { String(decoding: $0, as: UTF8.self) } }
}

/// Something that can be sent as one argument of a Redis command.
protocol RedisArg {
    var redisBytes: [UInt8] { get }
}

extension String: RedisArg { var redisBytes: [UInt8] { Array(utf8) } }
extension Array: RedisArg where Element == UInt8 { var redisBytes: [UInt8] { self } }
extension Int: RedisArg { var redisBytes: [UInt8] { Array(String(self).utf8) } }
extension Int64: RedisArg { var redisBytes: [UInt8] { Array(String(self).utf8) } }
extension UInt64: RedisArg { var redisBytes: [UInt8] { Array(String(self).utf8) } }
extension UInt32: RedisArg { var redisBytes: [UInt8] { Array(String(self).utf8) } }
extension UInt16: RedisArg { var redisBytes: [UInt8] { Array(String(self).utf8) } }
extension UInt8: RedisArg { var redisBytes: [UInt8] { Array(String(self).utf8) } }

/// One hiredis connection (`redisContext`), used by one thread at a time.
final class RedisConnection {
    private var ctx: UnsafeMutablePointer<redisContext>?
    let where_: String

    /// Connects (`redisConnectWithTimeout`), authenticates and selects the database.
    init(host: String, port: Int, db: Int, user: String?, password: String?, timeoutMillis: Int) throws(FSError) {
        where_ = "Redis at \(host):\(port)"
        guard let c = chiredis_connect(host, Int32(port), timeoutMillis) else {
            throw FSError(ENOMEM, "cannot reach \(where_): out of memory")
        }
        if c.pointee.err != 0 {
            let msg = withUnsafeBytes(of: c.pointee.errstr) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            redisFree(c)
            throw FSError(ECONNREFUSED, "cannot reach \(where_): \(msg.lowercased())")
        }
        ctx = c
        _ = chiredis_set_timeout(c, 30_000)
        if let password {
            let args: [any RedisArg] = user.map { ["AUTH", $0, password] } ?? ["AUTH", password]
            if case .error(let e) = try command(args) { throw FSError(EACCES, "\(where_) refused the password: \(e)") }
        }
        if db != 0 {
            if case .error(let e) = try command(["SELECT", db]) { throw FSError(EINVAL, "\(where_) has no database \(db): \(e)") }
        }
    }

    deinit {
        if let ctx { redisFree(ctx) }
    }

    private func lostError() -> FSError {
        guard let c = ctx else { return FSError(EIO, "\(where_): connection closed") }
        let msg = withUnsafeBytes(of: c.pointee.errstr) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        return FSError(EIO, "lost connection to \(where_): \(msg.isEmpty ? "connection closed" : msg.lowercased())")
    }

    /// Whether the connection broke (it must then be discarded).
    var broken: Bool { ctx == nil || ctx!.pointee.err != 0 }

    /// Queues a command without waiting (`redisAppendCommandArgv`).
    func append(_ args: [any RedisArg]) throws(FSError) {
        guard let c = ctx else { throw lostError() }
        let parts = args.map { $0.redisBytes }
        var ptrs: [UnsafePointer<CChar>?] = []
        var lens: [Int] = []
        var storage: [UnsafeMutableRawPointer] = []
        defer { storage.forEach { $0.deallocate() } }
        for p in parts {
            let m = UnsafeMutableRawPointer.allocate(byteCount: max(1, p.count), alignment: 1)
            p.withUnsafeBytes { if let b = $0.baseAddress { m.copyMemory(from: b, byteCount: p.count) } }
            storage.append(m)
            ptrs.append(UnsafePointer(m.assumingMemoryBound(to: CChar.self)))
            lens.append(p.count)
        }
        let rc = ptrs.withUnsafeMutableBufferPointer { pp in
            lens.withUnsafeBufferPointer { lp in
                redisAppendCommandArgv(c, Int32(parts.count), pp.baseAddress, lp.baseAddress)
            }
        }
        if rc != REDIS_OK { throw lostError() }
    }

    /// Reads the next reply (`redisGetReply`).
    func reply() throws(FSError) -> RedisReply {
        guard let c = ctx else { throw lostError() }
        var raw: UnsafeMutableRawPointer?
        if redisGetReply(c, &raw) != REDIS_OK || raw == nil { throw lostError() }
        let r = raw!.assumingMemoryBound(to: redisReply.self)
        defer { freeReplyObject(raw) }
        return RedisConnection.convert(r)
    }

    private static func convert(_ r: UnsafeMutablePointer<redisReply>) -> RedisReply {
        let v = r.pointee
        switch v.type {
        case REDIS_REPLY_STRING:
            return .string(v.str == nil ? [] : Array(UnsafeRawBufferPointer(start: v.str, count: Int(v.len))))
        case REDIS_REPLY_INTEGER: return .integer(Int64(v.integer))
        case REDIS_REPLY_NIL: return .null
        case REDIS_REPLY_STATUS: return .status(v.str == nil ? "" : String(cString: v.str))
        case REDIS_REPLY_ERROR: return .error(v.str == nil ? "" : String(cString: v.str))
        case REDIS_REPLY_ARRAY:
            var out: [RedisReply] = []
            out.reserveCapacity(Int(v.elements))
            for i in 0..<Int(v.elements) { out.append(convert(v.element[i]!)) }
            return .array(out)
        default: return .null
        }
    }

    /// Sends one command and waits for its reply.
    func command(_ args: [any RedisArg]) throws(FSError) -> RedisReply {
        try append(args)
        return try reply()
    }

    /// Sends several commands in one round trip and returns their replies in order.
    func pipeline(_ commands: [[any RedisArg]]) throws(FSError) -> [RedisReply] {
        for c in commands { try append(c) }
        var out: [RedisReply] = []
        out.reserveCapacity(commands.count)
        for _ in commands { out.append(try reply()) }
        return out
    }
}

/// Connections to one Redis server, handed to one thread at a time.
final class RedisPool: @unchecked Sendable {
    let host: String
    let port: Int
    let db: Int
    let user: String?
    let password: String?
    private let lock = ConditionLock()
    private var idle: [RedisConnection] = []

    init(host: String, port: Int, db: Int, user: String?, password: String?) {
        self.host = host
        self.port = port
        self.db = db
        self.user = user
        self.password = password
    }

    /// Runs `body` with a connection; a connection that broke is dropped, and the call retried
    /// once on a fresh one when `idempotent`.
    func with<T>(idempotent: Bool = true, _ body: (RedisConnection) throws(FSError) -> T) throws(FSError) -> T {
        var attempts = 0
        while true {
            let conn: RedisConnection
            if let c = lock.withLock({ idle.popLast() }) {
                conn = c
            } else {
                conn = try RedisConnection(host: host, port: port, db: db, user: user, password: password, timeoutMillis: 5000)
            }
            do {
                let r = try body(conn)
                if !conn.broken { lock.withLock { idle.append(conn) } }
                return r
            } catch {
                if !conn.broken {
                    lock.withLock { idle.append(conn) }
                    throw error
                }
                attempts += 1
                if !idempotent || attempts > 1 { throw error }
            }
        }
    }
}
