#if canImport(Glibc)
    import Glibc
#endif
#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// The volume's format record, written once by `stagefs format` and read by every client.
public struct VolumeFormat: Codable, Sendable, Equatable {
    /// Format version of this record and the layouts it implies.
    public var version: Int
    public var uuid: String
    public var name: String
    /// `file` or `s3`.
    public var storage: String
    /// A directory (`file`) or `http(s)://host:port/bucket` (`s3`).
    public var bucket: String
    public var accessKey: String?
    public var secretKey: String?
    /// Block size in KiB (default 4096).
    public var blockSizeKiB: Int
    public var trashDays: Int
    /// The volume's capacity in bytes and its inode limit (nil or 0: none): a change past them
    /// fails with `ENOSPC`, and `df` shows them.
    public var capacity: UInt64?
    public var inodes: UInt64?
    /// Seconds since the epoch.
    public var createdAt: Int64
    /// How blocks are compressed: `lz4`, `zstd`, or none (nil or `none`). Fixed at format.
    public var compression: String?

    public init(
        name: String, storage: String, bucket: String, accessKey: String? = nil, secretKey: String? = nil,
        blockSizeKiB: Int = 4096, trashDays: Int = 1, capacity: UInt64? = nil, inodes: UInt64? = nil, uuid: String = randomUUID(),
        createdAt: Int64 = Timespec.now().sec, compression: String? = nil
    ) {
        let compressed = compression != nil && compression != "none"
        self.version = VolumeFormat.currentVersion
        self.compression = compressed ? compression : nil
        self.uuid = uuid
        self.name = name
        self.storage = storage
        self.bucket = bucket
        self.accessKey = accessKey
        self.secretKey = secretKey
        self.blockSizeKiB = blockSizeKiB
        self.trashDays = trashDays
        self.capacity = capacity == 0 ? nil : capacity
        self.inodes = inodes == 0 ? nil : inodes
        self.createdAt = createdAt
    }

    /// The newest format version this StageFS writes. 2: the Redis engine keeps an index of
    /// each file's chunks (truncation and deletion in bounded steps). 3: blocks may be
    /// compressed (`compression`). 5: the Redis engine's chunk index names the chunks from 1 on,
    /// the attributes of files are kept in a short encoding (`Attr.encodeCompact`) with chunk 0
    /// after them while it has one record. (4 was that layout in development builds, with
    /// another short encoding: `requireFormat` refuses it.) A volume keeps the version it was
    /// formatted with.
    public static let currentVersion = 5

    /// The compression named, `none` when there is none.
    public var compressionName: String { compression ?? "none" }

    /// Block size in bytes.
    public var blockSize: Int { blockSizeKiB * 1024 }

    /// JSON text of the record.
    public func encoded() -> String {
        let enc = JSONEncoder()
        enc.outputFormatting = [.sortedKeys]
        let data = (try? enc.encode(self)) ?? Data()
        return String(decoding: data, as: UTF8.self)
    }

    /// Parses the JSON text written by `encoded()`.
    public static func decode(_ text: String) throws(FSError) -> VolumeFormat {
        do {
            return try JSONDecoder().decode(VolumeFormat.self, from: Data(text.utf8))
        } catch {
            throw FSError(EINVAL, "the volume's format record is unreadable (\(error))")
        }
    }

    /// Which settings differ from `other`, as "name: a -> b" lines (empty when compatible).
    public func differences(from other: VolumeFormat) -> [String] {
        var out: [String] = []
        if name != other.name { out.append("name \(other.name) -> \(name)") }
        if storage != other.storage { out.append("storage \(other.storage) -> \(storage)") }
        if bucket != other.bucket { out.append("bucket \(other.bucket) -> \(bucket)") }
        if blockSizeKiB != other.blockSizeKiB { out.append("block size \(other.blockSizeKiB) KiB -> \(blockSizeKiB) KiB") }
        if trashDays != other.trashDays { out.append("trash days \(other.trashDays) -> \(trashDays)") }
        if (capacity ?? 0) != (other.capacity ?? 0) { out.append("capacity \(other.capacity ?? 0) -> \(capacity ?? 0) bytes") }
        if (inodes ?? 0) != (other.inodes ?? 0) { out.append("inodes \(other.inodes ?? 0) -> \(inodes ?? 0)") }
        if compressionName != other.compressionName { out.append("compression \(other.compressionName) -> \(compressionName)") }
        return out
    }

    /// The refusal to format `store`, which holds `old`, again with these other settings: what
    /// differs, and what `stagefs format --force` would do about it.
    public func reformatRefused(existing old: VolumeFormat, in store: String) -> FSError {
        let diff = differences(from: old).joined(separator: ", ")
        // Object keys start with the name, live in the bucket, and are cut at the block size.
        let movesData =
            name != old.name || storage != old.storage || bucket != old.bucket || blockSizeKiB != old.blockSizeKiB
            || compressionName != old.compressionName
        let force =
            movesData
            ? "; --force keeps the directory tree and the uuid but moves no data, so the contents of files already written become unreadable"
            : " (files and data stay as they are)"
        return FSError(
            EEXIST,
            "\(store) already holds volume '\(old.name)' with other settings (\(diff)): format it with the same settings, or add --force to overwrite them\(force)"
        )
    }

    /// The record as shown to users: secrets masked.
    public var masked: VolumeFormat {
        var copy = self
        if copy.secretKey != nil { copy.secretKey = "removed" }
        return copy
    }
}

/// A random RFC 4122 version 4 UUID string.
public func randomUUID() -> String {
    UUID().uuidString.lowercased()
}

/// One Redis server or Sentinel address.
public struct RedisHost: Sendable, Equatable {
    public var host: String
    public var port: Int

    public init(_ host: String, _ port: Int) {
        self.host = host
        self.port = port
    }

    public var text: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}

/// Where a Redis metadata store is: one server, or a master found through Sentinels.
public struct RedisLocation: Sendable, Equatable {
    /// The server (one), or the Sentinels when `masterName` is set.
    public var hosts: [RedisHost]
    /// Sentinel mode: the name the Sentinels know the master by.
    public var masterName: String?
    public var db: Int
    public var user: String?
    public var password: String?
    /// `rediss://`: TLS to the server (and the Sentinels).
    public var tls = false
    /// `tls-ca-cert-file=`: the CA that signed the server's certificate (default: the system's).
    public var tlsCACert: String?
    /// `tls-cert-file=`, `tls-key-file=`: a client certificate, when the server asks for one.
    public var tlsCert: String?
    public var tlsKey: String?
    /// `insecure-skip-verify=true`: accept any server certificate (testing only).
    public var tlsInsecure = false
    /// `wait-replicas=N`: every metadata commit waits until N replicas have it (Redis WAIT).
    public var waitReplicas = 0
    /// `wait-timeout=MS`: how long a commit waits for them (default 5000).
    public var waitTimeoutMillis = 5000

    public init(hosts: [RedisHost], masterName: String? = nil, db: Int = 0, user: String? = nil, password: String? = nil) {
        self.hosts = hosts
        self.masterName = masterName
        self.db = db
        self.user = user
        self.password = password
    }
}

/// A parsed META-URL: where the metadata lives.
/// Where a gateway listens.
public enum GatewayAddress: Sendable, Equatable {
    case unix(path: String)
    case tcp(host: String, port: Int)
}

public enum MetaURL: Sendable, Equatable, CustomStringConvertible {
    /// `sqlite3:///abs/path.db`
    case sqlite(path: String)
    /// `redis[s]://[[user]:password@]host[:port][/db][?options]`, or with Sentinels
    /// `redis[s]://[[user]:password@]MASTER_NAME,HOST1[:PORT],HOST2[:PORT][/db]` (port 26379).
    case redis(RedisLocation)
    /// A volume served by a `stagefs gateway`: `stagefs+unix:///run/stagefs/NAME.sock` (its
    /// Unix socket on this node) or `stagefs://HOST:PORT` (over TCP, with MUNGE). No secret in
    /// either: the gateway knows who calls from the kernel or from MUNGE.
    case gateway(GatewayAddress)

    /// The accepted forms, as a malformed META-URL's message lists them.
    package static let forms =
        "sqlite3:///abs/path.db, redis://[[user]:password@]host[:port][/db], rediss://... (TLS), redis://[[user]:password@]MASTER,SENTINEL[:PORT][,...][/db] (Sentinels), stagefs+unix:///path/to/gateway.sock or stagefs://HOST:PORT (a gateway)"

    /// Longest first, so "rediss:/x" is not read as "redis" and "s:/x".
    private static let schemes = ["stagefs+unix", "stagefs", "sqlite3", "sqlite", "rediss", "redis"]

    /// Parses a META-URL; a malformed one is a usage error naming what is wrong, what was
    /// probably meant, and the accepted forms.
    public static func parse(_ text: String) throws(FSError) -> MetaURL {
        func bad(_ why: String, meant: String? = nil) -> FSError {
            let guess = meant.map { " (did you mean '\(masked($0))'?)" } ?? ""
            return FSError.usage("malformed META-URL '\(masked(text))': \(why)\(guess). Accepted forms: \(forms)")
        }
        let parts = text.split(separator: "://", maxSplits: 1, omittingEmptySubsequences: false)
        guard parts.count == 2 else {
            // "redis:/host", "redis//host", "redis:host", "sqlite3:/abs/x.db": the separator is off.
            let lower = text.lowercased()
            for s in schemes where lower.hasPrefix(s) {
                let tail = text.dropFirst(s.count)
                guard tail.first == ":" || tail.first == "/" else { continue }
                let body = String((tail.first == ":" ? tail.dropFirst() : tail).drop { $0 == "/" })
                if s.hasPrefix("sqlite") || s == "stagefs+unix" {
                    let why = "'://' and an absolute path must follow '\(s)'"
                    throw bad(why, meant: tail.contains("/") ? "\(s):///\(body)" : nil)
                }
                guard !body.isEmpty else { throw bad("no host") }
                // A gateway over TCP is always HOST:PORT.
                let port = s == "stagefs" && !body.contains(":") ? ":PORT" : ""
                throw bad("'://' must follow '\(s)'", meant: "\(s)://\(body)\(port)")
            }
            if text.hasPrefix("/") { throw bad("no scheme", meant: "sqlite3://\(text)") }
            if let c = text.firstIndex(of: ":"), !text[..<c].isEmpty, !text[..<c].contains("/"),
                Int(text[text.index(after: c)...].prefix { $0 != "/" }) != nil
            {
                throw bad("no scheme", meant: "redis://\(text)")
            }
            throw bad("no scheme")
        }
        let scheme = parts[0].lowercased()
        var rest = String(parts[1])
        switch scheme {
        case "sqlite3", "sqlite":
            guard rest.hasPrefix("/") else {
                throw bad("the database path must be absolute, three slashes in all", meant: rest.isEmpty ? nil : "\(scheme)://\(meantPath(rest))")
            }
            var path = rest
            if let q = path.firstIndex(of: "?") { path = String(path[..<q]) }
            guard path.count > 1, !path.hasSuffix("/") else { throw bad("no database file named") }
            return .sqlite(path: path)
        case "stagefs+unix":
            guard rest.hasPrefix("/") else {
                throw bad(
                    "the gateway's socket path must be absolute, three slashes in all", meant: rest.isEmpty ? nil : "\(scheme)://\(meantPath(rest))")
            }
            guard rest.count > 1, !rest.hasSuffix("/"), !rest.contains("?"), !rest.contains("@") else { throw bad("no socket file named") }
            return .gateway(.unix(path: rest))
        case "stagefs":
            if rest.contains("@") { throw bad("a gateway URL holds no user or password: the gateway knows who calls") }
            let hp = rest.hasSuffix("/") ? String(rest.dropLast()) : rest
            guard let colon = hp.lastIndex(of: ":"), let port = Int(hp[hp.index(after: colon)...]), port > 0, port < 65536 else {
                throw bad("a gateway over TCP is HOST:PORT", meant: rest.hasPrefix("/") ? "stagefs+unix://\(rest)" : nil)
            }
            var host = String(hp[..<colon])
            if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
            guard !host.isEmpty, !host.contains("/") else { throw bad("no host") }
            return .gateway(.tcp(host: host, port: port))
        case "redis", "rediss":
            var query = ""
            if let q = rest.firstIndex(of: "?") {
                query = String(rest[rest.index(after: q)...])
                rest = String(rest[..<q])
            }
            var hostPart = rest
            var db = 0
            if let slash = rest.firstIndex(of: "/") {
                hostPart = String(rest[..<slash])
                let dbText = rest[rest.index(after: slash)...]
                if !dbText.isEmpty {
                    guard let n = Int(dbText), n >= 0, n < 16384 else { throw bad("database '\(dbText)' is not a number") }
                    db = n
                }
            }
            var user: String?
            var password: String?
            if let at = hostPart.lastIndex(of: "@") {
                let auth = hostPart[..<at]
                hostPart = String(hostPart[hostPart.index(after: at)...])
                if let colon = auth.firstIndex(of: ":") {
                    let u = String(auth[..<colon])
                    user = u.isEmpty ? nil : u
                    password = String(auth[auth.index(after: colon)...])
                } else {
                    password = String(auth)
                }
                // `user:@host` (how a mount record names a URL whose password it does not keep).
                if password?.isEmpty == true { password = nil }
            }
            func hostPort(_ item: Substring, defaultPort: Int) throws(FSError) -> RedisHost {
                var host = String(item)
                var port = defaultPort
                if let colon = item.lastIndex(of: ":"), !item.hasSuffix("]") {
                    host = String(item[..<colon])
                    let portText = item[item.index(after: colon)...]
                    guard let p = Int(portText), p > 0, p < 65536 else { throw bad("port '\(portText)' is not a number from 1 to 65535") }
                    port = p
                }
                if host.hasPrefix("[") && host.hasSuffix("]") {
                    host = String(host.dropFirst().dropLast())
                } else if host.contains(":") {
                    throw bad("'\(item)' has more than one ':' (host:port/db; an IPv6 address goes in brackets: [::1]:6379)")
                }
                guard !host.isEmpty else { throw bad("no host") }
                return RedisHost(host, port)
            }
            var loc: RedisLocation
            let items = hostPart.split(separator: ",", omittingEmptySubsequences: false)
            if items.count > 1 {
                let name = String(items[0])
                guard !name.isEmpty, !name.contains(":") else { throw bad("the first item of a Sentinel URL is the master's name") }
                var sentinels: [RedisHost] = []
                for item in items.dropFirst() { sentinels.append(try hostPort(item, defaultPort: 26379)) }
                loc = RedisLocation(hosts: sentinels, masterName: name, db: db, user: user, password: password)
            } else {
                loc = RedisLocation(hosts: [try hostPort(items[0], defaultPort: 6379)], db: db, user: user, password: password)
            }
            loc.tls = scheme == "rediss"
            for pair in query.split(separator: "&") where !pair.isEmpty {
                let kv = pair.split(separator: "=", maxSplits: 1)
                let key = String(kv[0])
                let value = kv.count > 1 ? String(kv[1]) : ""
                switch key {
                case "tls-ca-cert-file": loc.tlsCACert = value
                case "tls-cert-file": loc.tlsCert = value
                case "tls-key-file": loc.tlsKey = value
                case "insecure-skip-verify": loc.tlsInsecure = value == "true" || value == "1"
                case "wait-replicas":
                    guard let n = Int(value), n >= 0 else { throw bad("wait-replicas '\(value)' is not a number") }
                    loc.waitReplicas = n
                case "wait-timeout":
                    guard let n = Int(value), n > 0 else { throw bad("wait-timeout '\(value)' is not a number of milliseconds") }
                    loc.waitTimeoutMillis = n
                case "engine":
                    // `engine=txn` (which picked this engine while there were two) still reads.
                    guard value == "txn" else {
                        throw bad("engine '\(value)': there is one Redis engine now (the transactional one); leave engine= out")
                    }
                default:
                    throw bad(
                        "unknown option '\(key)' (known: tls-ca-cert-file, tls-cert-file, tls-key-file, insecure-skip-verify, wait-replicas, wait-timeout)"
                    )
                }
            }
            if (loc.tlsCACert != nil || loc.tlsCert != nil || loc.tlsKey != nil || loc.tlsInsecure) && !loc.tls {
                throw bad("TLS options need the rediss:// scheme")
            }
            if (loc.tlsCert == nil) != (loc.tlsKey == nil) { throw bad("tls-cert-file and tls-key-file go together") }
            return .redis(loc)
        default:
            let meant = closestMatches(to: scheme, in: ["sqlite3", "redis", "rediss", "stagefs", "stagefs+unix"]).first.map { "\($0)://\(rest)" }
            throw bad("unknown scheme '\(scheme)'", meant: meant)
        }
    }

    /// `text` with the password of its `[user]:password@` part replaced by `****` (for messages
    /// about a URL that may not parse).
    package static func masked(_ text: String) -> String {
        guard let at = text.lastIndex(of: "@"), let colon = text.firstIndex(of: ":"), colon < at else { return text }
        let authStart = text[text.index(after: colon)...].firstIndex { $0 != ":" && $0 != "/" } ?? at
        guard authStart < at else { return text }
        let auth = text[authStart..<at]
        let user = auth.firstIndex(of: ":").map { String(auth[..<$0]) + ":" } ?? ""
        return String(text[..<authStart]) + user + "****" + String(text[at...])
    }

    /// The URL with any password removed, for messages and `status`.
    public var description: String { text(auth: { r in r.password == nil ? "" : "\(r.user ?? ""):****@" }) }

    /// The URL without its password, parseable again (a user name stays, as `user:@`): what a
    /// mount record keeps. The password then comes from `META_PASSWORD` or `META_PASSWORD_FILE`.
    public var withoutPassword: String { text(auth: { r in r.user.map { "\($0):@" } ?? "" }) }

    /// Whether the URL carries a password.
    public var hasPassword: Bool {
        if case .redis(let r) = self { return r.password != nil }
        return false
    }

    /// This URL with `password` in place of the one it has (or has not).
    public func with(password: String) -> MetaURL {
        guard case .redis(var r) = self else { return self }
        r.password = password
        return .redis(r)
    }

    private func text(auth: (RedisLocation) -> String) -> String {
        switch self {
        case .sqlite(let path): return "sqlite3://\(path)"
        case .gateway(.unix(let path)): return "stagefs+unix://\(path)"
        case .gateway(.tcp(let host, let port)): return "stagefs://\(host.contains(":") ? "[\(host)]" : host):\(port)"
        case .redis(let r):
            let auth = auth(r)
            let hosts = ((r.masterName.map { [$0] } ?? []) + r.hosts.map(\.text)).joined(separator: ",")
            var q: [String] = []
            if let f = r.tlsCACert { q.append("tls-ca-cert-file=\(f)") }
            if let f = r.tlsCert { q.append("tls-cert-file=\(f)") }
            if let f = r.tlsKey { q.append("tls-key-file=\(f)") }
            if r.tlsInsecure { q.append("insecure-skip-verify=true") }
            if r.waitReplicas > 0 { q.append("wait-replicas=\(r.waitReplicas)") }
            if r.waitTimeoutMillis != RedisLocation(hosts: []).waitTimeoutMillis { q.append("wait-timeout=\(r.waitTimeoutMillis)") }
            return "\(r.tls ? "rediss" : "redis")://\(auth)\(hosts)/\(r.db)" + (q.isEmpty ? "" : "?" + q.joined(separator: "&"))
        }
    }
}

/// The absolute path a relative one in a URL most likely meant: a slash forgotten before a
/// directory that exists at the root (`var/lib/x.db`), else a file of the working directory
/// (`relative.db`).
private func meantPath(_ rest: String) -> String {
    if let first = rest.split(separator: "/").first, rest.contains("/"), Sys.stat("/" + first) != nil { return "/" + rest }
    return absolutePath(rest)
}
