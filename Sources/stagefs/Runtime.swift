import ArgumentParser
import ObjectStorage
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif
#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// What a running mount records about itself, so `umount` and `info` can find it.
struct MountRecord: Codable {
    var mountPoint: String
    var metaURL: String
    var pid: Int32
    var volume: String
    var volumeUUID: String?
    /// The mount's disk cache settings, so `stage` fills the cache the mount reads.
    var cacheDirs: [String]?
    var cacheSize: Int?
    var freeSpaceRatio: Double?
}

/// Per-user runtime records of this node's mounts: `$XDG_RUNTIME_DIR/stagefs` or
/// `/tmp/stagefs-<uid>` (mode 0700).
enum Runtime {
    static var dir: String {
        if let x = getenv("XDG_RUNTIME_DIR").map({ String(cString: $0) }), !x.isEmpty, access(x, W_OK) == 0 {
            return "\(x)/stagefs"
        }
        return "/tmp/stagefs-\(getuid())"
    }

    static func recordPath(_ mountPoint: String) -> String {
        var name = ""
        for c in mountPoint.utf8 {
            if (c >= 48 && c <= 57) || (c >= 65 && c <= 90) || (c >= 97 && c <= 122) || c == 45 || c == 46 {
                name.unicodeScalars.append(Unicode.Scalar(c))
            } else {
                name += "_"
            }
        }
        return "\(dir)/\(name).json"
    }

    static func save(_ r: MountRecord) {
        do {
            try Sys.mkdirs(dir, 0o700)
            _ = chmod(dir, 0o700)
            let data = try JSONEncoder().encode(r)
            let path = recordPath(r.mountPoint)
            let fd = try Sys.open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
            defer { Sys.close(fd) }
            let bytes = [UInt8](data)
            try fsTyped { try bytes.withUnsafeBytes { try Sys.pwrite(fd, $0.baseAddress!, $0.count, 0) } }
        } catch {
            Log.warning("cannot record the mount in \(dir): \(error)")
        }
    }

    static func load(_ mountPoint: String) -> MountRecord? {
        guard let bytes = Sys.readFile(recordPath(mountPoint)) else { return nil }
        return try? JSONDecoder().decode(MountRecord.self, from: Data(bytes))
    }

    static func remove(_ mountPoint: String) {
        try? Sys.unlinkIfPresent(recordPath(mountPoint))
    }
}

/// One line of /proc/self/mountinfo.
struct MountInfo {
    var device: String
    var mountPoint: String
    var fsType: String
    var source: String
}

enum MountTable {
    /// Mounts of this process's namespace.
    static func all() -> [MountInfo] {
        guard let bytes = Sys.readFile("/proc/self/mountinfo") else { return [] }
        var out: [MountInfo] = []
        for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") {
            let parts = line.split(separator: " ", omittingEmptySubsequences: false)
            guard let dash = parts.firstIndex(of: "-"), parts.count > dash + 2, parts.count > 4 else { continue }
            out.append(
                MountInfo(
                    device: String(parts[2]), mountPoint: unescape(String(parts[4])), fsType: String(parts[dash + 1]),
                    source: unescape(String(parts[dash + 2]))))
        }
        return out
    }

    /// The StageFS mount at exactly `path`.
    static func stagefs(at path: String) -> MountInfo? {
        all().last { $0.mountPoint == path && $0.fsType == "fuse.stagefs" }
    }

    /// The StageFS mount that contains `path` (longest match).
    static func containing(_ path: String) -> MountInfo? {
        all().filter { $0.fsType == "fuse.stagefs" && (path == $0.mountPoint || path.hasPrefix($0.mountPoint == "/" ? "/" : $0.mountPoint + "/")) }
            .max { $0.mountPoint.count < $1.mountPoint.count }
    }

    /// This user's processes serving a mount at `path`: `stagefs ... mount ... <path> ...` (the
    /// arguments after "mount" name it), found through /proc.
    static func processes(serving path: String) -> [pid_t] {
        guard let d = opendir("/proc") else { return [] }
        defer { closedir(d) }
        var out: [pid_t] = []
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            guard let pid = pid_t(name), pid != getpid() else { continue }
            if serves(pid, path) { out.append(pid) }
        }
        return out
    }

    /// Whether `pid` is a live process of this user serving a mount at `path` (false once it
    /// has exited, also while it is a zombie: its command line is then empty).
    static func serves(_ pid: pid_t, _ path: String) -> Bool {
        guard let st = Sys.stat("/proc/\(pid)"), st.st_uid == getuid(), let cmd = Sys.readFile("/proc/\(pid)/cmdline") else { return false }
        let args = cmd.split(separator: 0, omittingEmptySubsequences: false).map { String(decoding: $0, as: UTF8.self) }
        guard let m = args.firstIndex(of: "mount") else { return false }
        return args[(m + 1)...].contains(path)
    }

    /// Users with a StageFS mount in this namespace (FUSE records the mounting user as user_id=).
    static func stagefsUsers() -> Set<uid_t> {
        guard let bytes = Sys.readFile("/proc/self/mountinfo") else { return [] }
        var out: Set<uid_t> = []
        for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") {
            let parts = line.split(separator: " ")
            guard let dash = parts.firstIndex(of: "-"), parts.count > dash + 3, parts[dash + 1] == "fuse.stagefs" else { continue }
            for o in parts[dash + 3].split(separator: ",") where o.hasPrefix("user_id=") {
                if let u = uid_t(o.dropFirst(8)) { out.insert(u) }
            }
        }
        return out
    }

    /// mountinfo escapes space, tab, newline and backslash as octal.
    static func unescape(_ s: String) -> String {
        guard s.contains("\\") else { return s }
        var out: [UInt8] = []
        let b = Array(s.utf8)
        var i = 0
        while i < b.count {
            if b[i] == 92, i + 3 < b.count, let v = UInt8(String(decoding: b[(i + 1)...(i + 3)], as: UTF8.self), radix: 8) {
                out.append(v)
                i += 4
            } else {
                out.append(b[i])
                i += 1
            }
        }
        return String(decoding: out, as: UTF8.self)
    }
}

/// An absolute, normalized form of a path (symlinks resolved when it exists).
func absolutePath(_ p: String) -> String {
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

extension String {
    /// Without leading and trailing white space.
    var trimmed: String {
        let ws: (Character) -> Bool = { $0 == " " || $0 == "\n" || $0 == "\t" || $0 == "\r" }
        guard let first = firstIndex(where: { !ws($0) }), let last = lastIndex(where: { !ws($0) }) else { return "" }
        return String(self[first...last])
    }
}

/// "2026-11-22 20:31:05 UTC" for seconds since the epoch.
func timeText(_ secs: Int64, nanos: UInt32? = nil) -> String {
    var t = tm()
    var s = Int(secs)
    gmtime_r(&s, &t)
    func p(_ v: Int32) -> String { v < 10 ? "0\(v)" : "\(v)" }
    var frac = ""
    if let nanos {
        let digits = String(nanos)
        frac = "." + String(repeating: "0", count: 9 - digits.count) + digits
    }
    return "\(t.tm_year + 1900)-\(p(t.tm_mon + 1))-\(p(t.tm_mday)) \(p(t.tm_hour)):\(p(t.tm_min)):\(p(t.tm_sec))\(frac) UTC"
}

/// Writes a line to standard error (write(2), no stdio state).
func printError(_ s: String, newline: Bool = true) {
    let line = !newline || s.hasSuffix("\n") ? s : s + "\n"
    _ = line.withCString { write(2, $0, strlen($0)) }
}

/// This program's own path (readlink of /proc/self/exe), so `ps` shows a real name.
func executablePath() -> String {
    var buf = [UInt8](repeating: 0, count: Int(PATH_MAX))
    let n = buf.withUnsafeMutableBytes { readlink("/proc/self/exe", $0.baseAddress!.assumingMemoryBound(to: CChar.self), $0.count) }
    return n > 0 ? String(decoding: buf[0..<n], as: UTF8.self) : "/proc/self/exe"
}

/// Cache directories from a colon-separated option, `~` expanded, or the default:
/// `$STAGEFS_CACHE_ROOT` (set by `module load fs-client`), else `~/.stagefs/cache`, or
/// `/var/cache/stagefs` for root.
func cacheDirectories(_ option: String?) -> [String] {
    let home = getenv("HOME").map { String(cString: $0) } ?? "/tmp"
    let site = getenv("STAGEFS_CACHE_ROOT").map { String(cString: $0) }.flatMap { $0.isEmpty ? nil : $0 }
    guard let option = option ?? site else { return [getuid() == 0 ? "/var/cache/stagefs" : "\(home)/.stagefs/cache"] }
    return option.split(separator: ":").map { $0.hasPrefix("~") ? home + $0.dropFirst() : String($0) }
}

/// Object-store request options shared by the commands that read or write blocks.
struct IOOptions: ParsableArguments {
    @Option(help: "Seconds one object-store request may take before it is retried.")
    var ioTimeout: Double = 60

    @Option(help: "Attempts per object-store request (5xx, throttling and connection errors are retried with back-off).")
    var ioRetries = 6

    @Option(
        help: ArgumentHelp(
            "Seconds a Redis metadata operation keeps retrying while the server cannot be reached (a restart, a failover); then it fails with EIO.",
            discussion: "The mount keeps running meanwhile; a first contact that fails is reported at once."))
    var metaTimeout: Double = 60

    func validate() throws {
        if ioTimeout <= 0 || ioRetries < 1 { throw ValidationError("--io-timeout must be positive and --io-retries at least 1") }
        if metaTimeout <= 0 { throw ValidationError("--meta-timeout must be positive") }
    }

    /// The store settings of a volume with these limits (and keys, when given, instead of the recorded ones).
    func storeConfig(_ f: VolumeFormat, accessKey: String? = nil, secretKey: String? = nil) -> StoreConfig {
        var c = StoreConfig(storage: f.storage, bucket: f.bucket, accessKey: accessKey ?? f.accessKey, secretKey: secretKey ?? f.secretKey)
        c.timeout = ioTimeout
        c.maxAttempts = ioRetries
        return c
    }
}
