import Foundation
import Metadata
import SQLiteKit
import StageFSCore
import Testing

/// A real `redis-server` on a free loopback port, stopped when the value is released.
final class RedisServer: @unchecked Sendable {
    let port: Int
    let pid: pid_t
    let dir: String

    init() throws {
        dir = try makeTempDir("redis")
        for _ in 0..<10 {
            let port = freePort()
            let pid = try Spawn.start(
                "/usr/bin/redis-server",
                ["--port", "\(port)", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir, "--daemonize", "no"],
                stdout: .null, stderr: .null)
            if waitForPort(port, seconds: 5) {
                self.port = port
                self.pid = pid
                return
            }
            kill(pid, SIGKILL)
            Spawn.wait(pid)
        }
        throw TestFailure("redis-server did not start")
    }

    var url: String { "redis://127.0.0.1:\(port)/0" }

    deinit {
        kill(pid, SIGKILL)
        Spawn.wait(pid)
        try? FileManager.default.removeItem(atPath: dir)
    }
}

struct TestFailure: Error, CustomStringConvertible {
    var description: String
    init(_ d: String) { description = d }
}

/// A loopback TCP port nobody listens on right now.
func freePort() -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    addr.sin_port = 0
    _ = withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
    return Int(UInt16(bigEndian: addr.sin_port))
}

/// Waits until something accepts connections on the loopback port.
func waitForPort(_ port: Int, seconds: Double) -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        close(fd)
        if rc == 0 { return true }
        usleep(50_000)
    }
    return false
}

/// A fresh directory; metadata databases go to tmpfs when there is one (SQLite's fsync per
/// transaction on a disk would make the thousands of steps the bound tests take slow).
func makeTempDir(_ tag: String) throws -> String {
    let base = tag == "meta" && access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp"
    var template = Array("\(base)/stagefs-test-\(tag)-XXXXXX".utf8CString)
    guard let p = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else { throw TestFailure("mkdtemp failed") }
    return String(cString: p)
}

/// The engines the conformance suite runs against.
enum EngineKind: String, CaseIterable, CustomTestStringConvertible, Sendable {
    case sqlite, redis
    /// Redis with the client cache kept by client tracking (the gateway's).
    case redisTracked
    var testDescription: String { rawValue }
}

/// A formatted, empty volume on a fresh engine; keeps its server or files alive until released.
final class EngineFixture: @unchecked Sendable {
    let kind: EngineKind
    let engine: any MetadataEngine
    let url: String
    let redis: RedisServer?
    private let dir: String

    /// `trash`: days the volume keeps deleted files (0, no trash, unless a test is about it).
    init(_ kind: EngineKind, trash: Int = 0) throws {
        self.kind = kind
        dir = try makeTempDir("meta")
        switch kind {
        case .sqlite:
            redis = nil
            url = "sqlite3://\(dir)/meta.db"
        case .redis, .redisTracked:
            redis = try RedisServer()
            url = redis!.url
        }
        engine = try openMetadata(try MetaURL.parse(url), create: true, tracking: kind == .redisTracked)
        try engine.initialize(VolumeFormat(name: "test", storage: "file", bucket: dir + "/data", trashDays: trash), force: false, rootMode: 0o777)
    }

    /// Damages an entry on purpose: records `type` for `name` in `parent` whatever its inode is.
    func corruptEntryType(_ parent: Ino, _ name: String, _ type: FileType) throws {
        switch kind {
        case .sqlite:
            let db = try SQLiteConnection(path: "\(dir)/meta.db", create: false)
            try db.query("UPDATE edge SET type=? WHERE parent=? AND name=?", [.int(Int64(type.rawValue)), .int(Int64(parent)), .blob(Array(name.utf8))])
        case .redis, .redisTracked:
            // A volume's keys are behind the hash tag {<db>}.
            let key = "{0}d\(parent)"
            let script = "local ino = struct.unpack('>I8B', redis.call('HGET', KEYS[1], ARGV[1])) redis.call('HSET', KEYS[1], ARGV[1], struct.pack('>I8B', ino, tonumber(ARGV[2])))"
            let (rc, out) = try Spawn.run("/usr/bin/redis-cli", ["-p", "\(redis!.port)", "EVAL", script, "1", key, name, "\(type.rawValue)"])
            if rc != 0 || out.contains("ERR") { throw TestFailure("redis-cli: \(out)") }
        }
    }

    /// Stores extended attributes of `ino` (name, value size) as a volume formatted before the
    /// per-inode total was kept did: the attributes alone, no total.
    func putXattrsWithoutTotal(_ ino: Ino, _ attrs: [(String, Int)]) throws {
        switch kind {
        case .sqlite:
            let db = try SQLiteConnection(path: "\(dir)/meta.db", create: false)
            for (name, size) in attrs {
                try db.query(
                    "INSERT OR REPLACE INTO xattr(ino, name, value) VALUES(?, ?, ?)",
                    [.int(Int64(ino)), .blob(Array(name.utf8)), .blob([UInt8](repeating: 118, count: size))])
            }
        case .redis, .redisTracked:
            let script = "return redis.call('HSET', KEYS[1], ARGV[1], string.rep('v', tonumber(ARGV[2])))"
            for (name, size) in attrs {
                let (rc, out) = try Spawn.run("/usr/bin/redis-cli", ["-p", "\(redis!.port)", "EVAL", script, "1", "{0}x\(ino)", name, "\(size)"])
                if rc != 0 || out.contains("ERR") { throw TestFailure("redis-cli: \(out)") }
            }
        }
    }

    /// How many inodes have an extended-attribute total stored.
    func storedXattrTotals() throws -> Int {
        switch kind {
        case .sqlite:
            let db = try SQLiteConnection(path: "\(dir)/meta.db", create: false)
            var n = 0
            try db.query("SELECT COUNT(*) FROM xattrbytes", []) { n = Int(Col.int($0, 0)) }
            return n
        case .redis, .redisTracked:
            let (rc, out) = try Spawn.run("/usr/bin/redis-cli", ["-p", "\(redis!.port)", "EVAL", "return #redis.call('KEYS', '{0}xb*')", "0"])
            guard rc == 0, let n = Int(out.trimmingCharacters(in: .whitespacesAndNewlines)) else { throw TestFailure("redis-cli: \(out)") }
            return n
        }
    }

    /// Another, unformatted database of the same kind (its own file, or another Redis db).
    func freshURL(_ n: Int) -> String {
        switch kind {
        case .sqlite: return "sqlite3://\(dir)/fresh\(n).db"
        case .redis, .redisTracked: return "redis://127.0.0.1:\(redis!.port)/\(n + 1)"
        }
    }

    /// A second, independent client of the same metadata.
    func reopen() throws -> any MetadataEngine {
        try openMetadata(try MetaURL.parse(url))
    }

    deinit {
        try? FileManager.default.removeItem(atPath: dir)
    }
}

extension Array where Element == UInt8 {
    init(_ s: String) { self = Array(s.utf8) }
}

/// Asserts that `body` throws an FSError with `code`.
func expectErrno(_ code: Int32, _ comment: Comment? = nil, sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws -> Void) {
    do {
        try body()
        Issue.record("expected errno \(code), got success \(comment.map { "(\($0))" } ?? "")", sourceLocation: sourceLocation)
    } catch let e as FSError {
        #expect(
            e.code == code, "expected errno \(code), got \(e.code) (\(e.message)) \(comment.map { "(\($0))" } ?? "")", sourceLocation: sourceLocation)
    } catch {
        Issue.record("unexpected error \(error)", sourceLocation: sourceLocation)
    }
}

/// A real `moto_server` (S3 endpoint) on a free loopback port, stopped when released.
/// With `auth`, moto checks signatures: an IAM user with an `s3:*` policy is created and its
/// keys returned in `accessKey`/`secretKey`.
final class MotoServer: @unchecked Sendable {
    let port: Int
    let pid: pid_t
    var accessKey = "testing"
    var secretKey = "testing"

    init(auth: Bool = false) throws {
        guard let moto = Spawn.which("moto_server") else { throw TestFailure("moto_server is not installed (pip install 'moto[server]')") }
        var env = Spawn.currentEnvironment().filter { !$0.hasPrefix("AWS_") }
        if auth { env.append("INITIAL_NO_AUTH_ACTION_COUNT=4") }
        var started: (Int, pid_t)?
        for _ in 0..<5 {
            let port = freePort()
            let pid = try Spawn.start(moto, ["-H", "127.0.0.1", "-p", "\(port)"], env: env, stdout: .null, stderr: .null)
            if waitForPort(port, seconds: 30) {
                started = (port, pid)
                break
            }
            kill(pid, SIGKILL)
            Spawn.wait(pid)
        }
        guard let (port, pid) = started else { throw TestFailure("moto_server did not start") }
        self.port = port
        self.pid = pid
        if auth {
            let script = """
                import boto3, json
                iam = boto3.client('iam', endpoint_url='http://127.0.0.1:\(port)', region_name='us-east-1',
                                   aws_access_key_id='x', aws_secret_access_key='x')
                iam.create_user(UserName='stagefs')
                iam.put_user_policy(UserName='stagefs', PolicyName='s3', PolicyDocument=json.dumps(
                    {'Version': '2012-10-17', 'Statement': [{'Effect': 'Allow', 'Action': 's3:*', 'Resource': '*'}]}))
                k = iam.create_access_key(UserName='stagefs')['AccessKey']
                print(k['AccessKeyId'], k['SecretAccessKey'])
                """
            let (status, out) = try Spawn.run("/usr/bin/env", ["python3", "-c", script])
            let parts = out.split(whereSeparator: { $0 == " " || $0 == "\n" })
            guard status == 0, parts.count >= 2 else {
                kill(pid, SIGKILL)
                Spawn.wait(pid)
                throw TestFailure("could not create moto IAM keys: \(out)")
            }
            accessKey = String(parts[parts.count - 2])
            secretKey = String(parts[parts.count - 1])
        }
    }

    func bucketURL(_ name: String) -> String { "http://127.0.0.1:\(port)/\(name)" }

    deinit {
        kill(pid, SIGKILL)
        Spawn.wait(pid)
    }
}
