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
    /// Seconds since the epoch.
    public var createdAt: Int64

    public init(
        name: String, storage: String, bucket: String, accessKey: String? = nil, secretKey: String? = nil,
        blockSizeKiB: Int = 4096, trashDays: Int = 1, uuid: String = randomUUID(), createdAt: Int64 = Timespec.now().sec
    ) {
        self.version = VolumeFormat.currentVersion
        self.uuid = uuid
        self.name = name
        self.storage = storage
        self.bucket = bucket
        self.accessKey = accessKey
        self.secretKey = secretKey
        self.blockSizeKiB = blockSizeKiB
        self.trashDays = trashDays
        self.createdAt = createdAt
    }

    /// The format version this StageFS writes. 2: the Redis engine keeps an index of each
    /// file's chunks (truncation and deletion in bounded steps).
    public static let currentVersion = 2

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
        return out
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

/// A parsed META-URL: where the metadata lives.
public enum MetaURL: Sendable, Equatable, CustomStringConvertible {
    /// `sqlite3:///abs/path.db`
    case sqlite(path: String)
    /// `redis://[user:pass@]host:port/db`
    case redis(host: String, port: Int, db: Int, user: String?, password: String?)

    /// Parses a META-URL; a malformed one is a usage error naming what is wrong.
    public static func parse(_ text: String) throws(FSError) -> MetaURL {
        func bad(_ why: String) -> FSError {
            FSError.usage("malformed META-URL '\(text)': \(why) (expected sqlite3:///abs/path.db or redis://host:port/db)")
        }
        let parts = text.split(separator: "://", maxSplits: 1, omittingEmptySubsequences: false)
        guard parts.count == 2 else { throw bad("no scheme") }
        let scheme = parts[0].lowercased()
        let rest = String(parts[1])
        switch scheme {
        case "sqlite3", "sqlite":
            guard rest.hasPrefix("/") else { throw bad("the database path must be absolute") }
            var path = rest
            if let q = path.firstIndex(of: "?") { path = String(path[..<q]) }
            guard path.count > 1, !path.hasSuffix("/") else { throw bad("no database file named") }
            return .sqlite(path: path)
        case "redis":
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
            }
            var host = hostPart
            var port = 6379
            if let colon = hostPart.lastIndex(of: ":"), !hostPart.hasSuffix("]") {
                host = String(hostPart[..<colon])
                let portText = hostPart[hostPart.index(after: colon)...]
                guard let p = Int(portText), p > 0, p < 65536 else { throw bad("port '\(portText)' is not a number from 1 to 65535") }
                port = p
            }
            if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
            guard !host.isEmpty else { throw bad("no host") }
            return .redis(host: host, port: port, db: db, user: user, password: password)
        default:
            throw bad("unknown scheme '\(scheme)'")
        }
    }

    /// The URL with any password removed, for messages and `status`.
    public var description: String {
        switch self {
        case .sqlite(let path): return "sqlite3://\(path)"
        case .redis(let host, let port, let db, let user, let password):
            let auth = password == nil ? "" : "\(user ?? ""):****@"
            let h = host.contains(":") ? "[\(host)]" : host
            return "redis://\(auth)\(h):\(port)/\(db)"
        }
    }
}
