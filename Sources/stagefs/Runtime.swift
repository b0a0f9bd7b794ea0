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

/// What a running mount records about itself, so `umount`, `info`, `stage` and `bind-config`
/// can find it. It holds no secret: the META-URL is kept without its password.
struct MountRecord: Codable {
    var mountPoint: String
    /// The META-URL without its password (`MetaURL.withoutPassword`).
    var metaURL: String
    var pid: Int32
    var volume: String
    var volumeUUID: String?
    /// The mount's disk cache settings, so `stage` fills the cache the mount reads.
    var cacheDirs: [String]?
    var cacheSize: Int?
    var freeSpaceRatio: Double?
    /// Whether the mount was given a password, which is not kept here.
    var passwordNeeded: Bool?
    /// When the mount process started (`ProcFacts.startTime`): with `pid`, names it for good.
    var startTime: UInt64?
    /// The directory of the volume the mount shows (`--subdir`); nil: the whole volume.
    var subdir: String?
    /// The mount's metrics socket (`stagefs stats`), a name in the record's directory.
    var metricsSocket: String?
    /// The metrics port the mount serves (`--metrics`), `HOST:PORT`.
    var metricsAddress: String?

    /// The volume path of `path`, a path inside this mount.
    func volumePath(_ path: String) -> String {
        let rel = path == mountPoint ? "" : String(path.dropFirst(mountPoint == "/" ? 0 : mountPoint.count))
        let top = subdir.map { $0 == "/" ? "" : $0 } ?? ""
        let joined = top + rel
        return joined.isEmpty ? "/" : joined
    }

    /// The mount's META-URL, with the password from `META_PASSWORD`/`META_PASSWORD_FILE` when
    /// the mount had one.
    func metadataURL() throws(FSError) -> MetaURL {
        // The environment's password only for a mount that had one (a server without a
        // password refuses AUTH).
        guard passwordNeeded == true else { return try MetaURL.parse(metaURL) }
        let url = try metaURLArgument(metaURL)
        if !url.hasPassword {
            throw FSError(
                EACCES,
                "the mount at \(mountPoint) was given a metadata password, which mount records do not keep: set META_PASSWORD (or META_PASSWORD_FILE) for this command, or give --meta META-URL"
            )
        }
        return url
    }
}

/// A META-URL given on the command line: its password, when it has none, from `META_PASSWORD`
/// or `META_PASSWORD_FILE` (the way to pass one: a password in the URL shows in `ps` until
/// `Secrets.blankArguments` hides it).
func metaURLArgument(_ text: String) throws(FSError) -> MetaURL {
    let url = try MetaURL.parse(text)
    guard case .redis = url, !url.hasPassword, let password = try environmentPassword() else { return url }
    return url.with(password: password)
}

/// The command line's secrets: passwords of META-URLs in the process's arguments.
enum Secrets {
    /// Overwrites, in place, the password of every redis:// or rediss:// URL among this
    /// process's arguments, and the value of `--secret-key`, with `*`, so that `ps` and /proc/PID/cmdline (which read the process's
    /// own argument memory) no longer show it. Call once at start, after `CommandLine.arguments`
    /// was read: it keeps the arguments as they were given.
    static func blankArguments() {
        var secretNext = false
        // (A process started with an empty argv has argc 0.)
        for i in 1..<max(1, Int(CommandLine.argc)) {
            guard let arg = CommandLine.unsafeArgv[i] else { continue }
            let n = strlen(arg)
            let bytes = UnsafeMutableBufferPointer(start: UnsafeMutableRawPointer(arg).assumingMemoryBound(to: UInt8.self), count: n)
            let text = Array(bytes)
            var hide: Range<Int>?
            if secretNext {
                hide = 0..<n
            } else if text.starts(with: Array("--secret-key=".utf8)) {
                hide = 13..<n
            } else {
                hide = passwordRange(text)
            }
            secretNext = text == Array("--secret-key".utf8)
            if let hide { for j in hide { bytes[j] = UInt8(ascii: "*") } }
        }
    }

    /// Where the password of a Redis URL in `arg` is (the URL may follow `NAME=` or `--meta=`),
    /// as `MetaURL.parse` finds it: between the first ':' and the last '@' of the part before
    /// the first '/' or '?' after "://".
    static func passwordRange(_ arg: [UInt8]) -> Range<Int>? {
        let sep = Array("://".utf8)
        guard let s = (0...max(arg.count - sep.count, 0)).first(where: { arg.count >= sep.count && Array(arg[$0..<$0 + sep.count]) == sep }) else {
            return nil
        }
        let scheme = String(decoding: arg[..<s], as: UTF8.self).lowercased()
        guard scheme.hasSuffix("redis") || scheme.hasSuffix("rediss") else { return nil }
        let start = s + sep.count
        let end = arg[start...].firstIndex { $0 == UInt8(ascii: "/") || $0 == UInt8(ascii: "?") } ?? arg.count
        guard let at = arg[start..<end].lastIndex(of: UInt8(ascii: "@")) else { return nil }
        let from = arg[start..<at].firstIndex(of: UInt8(ascii: ":")).map { $0 + 1 } ?? start
        return from < at ? from..<at : nil
    }

    /// The environment for a child that gets `url`'s password through it (`META_PASSWORD`)
    /// rather than its arguments; nil (inherit) when the URL has none.
    static func childEnvironment(for url: MetaURL) -> [String]? {
        guard case .redis(let r) = url, let password = r.password else { return nil }
        return environment(Spawn.currentEnvironment(), setting: "META_PASSWORD", to: password, dropping: ["META_PASSWORD_FILE"])
    }

    /// `env` with `name` set to `value` (any earlier value, and the variables `dropping`, taken out).
    static func environment(_ env: [String], setting name: String, to value: String, dropping: [String] = []) -> [String] {
        let gone = ([name] + dropping).map { $0 + "=" }
        return env.filter { v in !gone.contains { v.hasPrefix($0) } } + ["\(name)=\(value)"]
    }
}

/// A password from `META_PASSWORD`, or from the file `META_PASSWORD_FILE` names (its first
/// line); nil when neither is set.
func environmentPassword() throws(FSError) -> String? {
    if let p = getenv("META_PASSWORD").map({ String(cString: $0) }), !p.isEmpty { return p }
    guard let file = getenv("META_PASSWORD_FILE").map({ String(cString: $0) }), !file.isEmpty else { return nil }
    let fd = Glibc.open(file, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC)
    if fd < 0 { throw FSError.errno(errno, "cannot read META_PASSWORD_FILE \(file)") }
    defer { Glibc.close(fd) }
    var st = stat()
    guard fstat(fd, &st) == 0, st.st_mode & S_IFMT == S_IFREG, st.st_size <= 4096 else {
        throw FSError(EINVAL, "META_PASSWORD_FILE \(file) is not a regular file of at most 4 KiB")
    }
    var buf = [UInt8](repeating: 0, count: 4096)
    let n = try Sys.pread(fd, &buf, buf.count, 0, path: file)
    let line = buf[0..<n].split(separator: 10, omittingEmptySubsequences: false).first ?? []
    let password = String(decoding: line, as: UTF8.self).trimmed
    return password.isEmpty ? nil : password
}

/// Per-user records of this node's mounts, one file per mountpoint, in a directory only the
/// user can write: `$XDG_RUNTIME_DIR/stagefs`, else `/run/stagefs` for root and
/// `/run/user/<uid>/stagefs` for others, else `~/.stagefs/run/<host>`. Each base must be the
/// user's own (root's `/run`) and not writable by others; every directory below it is made or
/// opened without following a link and taken only when `fstat` shows it is the user's (the
/// last one mode 0700). Records are written under a new name (`O_EXCL`) and renamed into place,
/// and read only when they are regular files of the user, so nothing another user made (a link,
/// a FIFO, a file of theirs) is ever written through or trusted. Never a name in /tmp that
/// another user could make first.
enum Runtime {
    /// The largest record read (one is a few hundred bytes).
    static let maxRecordBytes = 65536

    /// The candidate directories, as (base, components below it), in order.
    private static var candidates: [(base: String, names: [String])] {
        let uid = getuid()
        var out: [(String, [String])] = []
        if let x = getenv("XDG_RUNTIME_DIR").map({ String(cString: $0) }), x.hasPrefix("/") { out.append((x, ["stagefs"])) }
        if uid == 0 {
            out.append(("/run", ["stagefs"]))
        } else {
            out.append(("/run/user/\(uid)", ["stagefs"]))
            let home = getpwuid(uid).map { String(cString: $0.pointee.pw_dir) } ?? homeDirectory()
            if home.hasPrefix("/") {
                var host = ""
                for c in Sys.hostname().utf8.prefix(64) {
                    host.unicodeScalars.append(Unicode.Scalar(isNameByte(c) ? c : 95))
                }
                out.append((home, [".stagefs", "run", host.isEmpty || host.hasPrefix(".") ? "node" : host]))
            }
        }
        return out
    }

    private static func isNameByte(_ c: UInt8) -> Bool {
        (c >= 48 && c <= 57) || (c >= 65 && c <= 90) || (c >= 97 && c <= 122) || c == 45 || c == 46
    }

    /// Opens (with `create`, makes) the first usable record directory; its descriptor and path.
    static func directory(create: Bool) -> (fd: Int32, path: String)? {
        for c in candidates {
            if let d = open(c, create: create) { return d }
        }
        return nil
    }

    /// Opens (with `create`, makes) one candidate directory, or nil when it is not usable (why
    /// goes to the log).
    private static func open(_ c: (base: String, names: [String]), create: Bool) -> (fd: Int32, path: String)? {
        let uid = getuid()
        let base = Glibc.open(c.base, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if base < 0 { return nil }
        var st = stat()
        // The base: the user's own (root's for root), and nobody else may write it.
        guard fstat(base, &st) == 0, st.st_uid == uid, st.st_mode & 0o022 == 0 else {
            Log.debug("mount records: \(c.base) is not uid \(uid)'s alone; not used")
            Glibc.close(base)
            return nil
        }
        var fd = base
        var path = c.base
        for (i, name) in c.names.enumerated() {
            path += "/\(name)"
            if create && mkdirat(fd, name, 0o700) != 0 && errno != EEXIST {
                Log.debug("mount records: cannot create \(path): \(String(cString: strerror(errno)))")
            }
            let next = SafeDir.open(fd, name)
            Glibc.close(fd)
            if next < 0 { return nil }
            fd = next
            guard fstat(fd, &st) == 0, st.st_uid == uid else {
                Log.warning("mount records: \(path) belongs to uid \(st.st_uid), not \(uid): not used (remove it)")
                Glibc.close(fd)
                return nil
            }
            if i == c.names.count - 1 && st.st_mode & 0o077 != 0 && fchmod(fd, 0o700) != 0 {
                Glibc.close(fd)
                return nil
            }
        }
        return (fd, path)
    }

    /// The record's file name for a mountpoint: its readable part and a hash of the whole path
    /// (FNV-1a, 64 bits), so that `/a/b_c` and `/a/b/c` get records of their own.
    static func recordName(_ mountPoint: String) -> String {
        var name = ""
        for c in mountPoint.utf8 {
            if isNameByte(c) { name.unicodeScalars.append(Unicode.Scalar(c)) } else { name += "_" }
        }
        return "\(name.suffix(180))-\(hash(mountPoint)).json"
    }

    /// The name of the metrics socket of the mount at `mountPoint` (beside its record; short,
    /// as a socket's address is at most 107 bytes).
    static func socketName(_ mountPoint: String) -> String { "metrics-\(hash(mountPoint)).sock" }

    /// FNV-1a, 64 bits, of the path, as 16 hex digits.
    private static func hash(_ path: String) -> String {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for c in path.utf8 { hash = (hash ^ UInt64(c)) &* 0x100_0000_01b3 }
        let hex = String(hash, radix: 16)
        return String(repeating: "0", count: 16 - hex.count) + hex
    }

    static func save(_ r: MountRecord) {
        guard let (dir, path) = directory(create: true) else {
            Log.warning("cannot record the mount at \(r.mountPoint): no directory of uid \(getuid()) alone to keep it in (set XDG_RUNTIME_DIR)")
            return
        }
        defer { Glibc.close(dir) }
        let name = recordName(r.mountPoint)
        let tmp = ".\(name).\(getpid()).tmp"
        guard let bytes = try? JSONEncoder().encode(r) else { return }
        _ = unlinkat(dir, tmp, 0)
        let fd = openat(dir, tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
        if fd < 0 {
            Log.warning("cannot record the mount in \(path): \(String(cString: strerror(errno)))")
            return
        }
        let written = bytes.withUnsafeBytes { b in (try? Sys.pwrite(fd, b.baseAddress!, b.count, 0, path: "\(path)/\(tmp)")) != nil }
        Glibc.close(fd)
        if !written || renameat(dir, tmp, dir, name) != 0 {
            Log.warning("cannot record the mount in \(path): \(String(cString: strerror(errno)))")
            _ = unlinkat(dir, tmp, 0)
        }
    }

    /// The record of the mount at `mountPoint`: a regular file of this user, at most
    /// `maxRecordBytes`, naming that mountpoint, in the first record directory that has one.
    static func load(_ mountPoint: String) -> MountRecord? {
        for dir in directories() {
            defer { Glibc.close(dir) }
            if let r = read(dir, mountPoint) { return r }
        }
        return nil
    }

    /// Removes the record of the mount at `mountPoint` (only of the mount process `pid`, when
    /// given), wherever it is.
    static func remove(_ mountPoint: String, pid: pid_t? = nil) {
        for dir in directories() {
            defer { Glibc.close(dir) }
            if let r = read(dir, mountPoint), pid == nil || r.pid == pid {
                _ = unlinkat(dir, recordName(mountPoint), 0)
                if let s = r.metricsSocket, s == socketName(mountPoint) { _ = unlinkat(dir, s, 0) }
            }
        }
    }

    /// The record of the mount at `mountPoint` with its directory, open (the caller closes it):
    /// where its metrics socket is.
    static func loadWithDirectory(_ mountPoint: String) -> (record: MountRecord, dir: Int32, path: String)? {
        for c in candidates {
            guard let (dir, path) = open(c, create: false) else { continue }
            if let r = read(dir, mountPoint) { return (r, dir, path) }
            Glibc.close(dir)
        }
        return nil
    }

    /// Every existing record directory, opened with the checks of `directory`.
    private static func directories() -> [Int32] {
        candidates.compactMap { open($0, create: false)?.fd }
    }

    private static func read(_ dir: Int32, _ mountPoint: String) -> MountRecord? {
        let fd = openat(dir, recordName(mountPoint), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC)
        if fd < 0 { return nil }
        defer { Glibc.close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0, st.st_mode & S_IFMT == S_IFREG, st.st_uid == getuid(), st.st_size <= maxRecordBytes else { return nil }
        var bytes = [UInt8](repeating: 0, count: Int(st.st_size))
        guard let n = try? Sys.pread(fd, &bytes, bytes.count, 0), n == bytes.count,
            let r = try? JSONDecoder().decode(MountRecord.self, from: Data(bytes)), r.mountPoint == mountPoint
        else { return nil }
        return r
    }
}

/// The process serving a StageFS mount, held by a pidfd once it is shown to be one: all its
/// uids are the caller's, it runs a program named `stagefs`, and its arguments are `mount ...`
/// naming the mountpoint. Only such a process is ever signalled.
enum MountProcess {
    /// `pid` held, when it is this user's mount process for `path` in this mount namespace:
    /// with `started` (from the mount's own record), the process that started then; without, one
    /// whose arguments name `path`.
    static func verified(_ pid: pid_t, serving path: String, started: UInt64? = nil) -> ProcessHandle? {
        guard let p = ProcessHandle(pid) else { return nil }
        let uid = getuid()
        let namespace = ProcFacts.mountNamespace(getpid())
        let ok = p.check { pid in
            guard let ids = ProcFacts.uids(pid), ids.allSatisfy({ $0 == uid }),
                let exe = ProcFacts.executable(pid), exe.split(separator: "/").last == "stagefs",
                namespace != nil, ProcFacts.mountNamespace(pid) == namespace
            else { return false }
            if let started { return ProcFacts.startTime(pid) == started }
            return MountTable.argumentsServe(ProcFacts.arguments(pid), cwd: ProcFacts.workingDirectory(pid), path)
        }
        return ok ? p : nil
    }

    /// This user's processes serving a mount at `path`, held; found through /proc.
    static func all(serving path: String) -> [ProcessHandle] {
        guard let d = opendir("/proc") else { return [] }
        defer { closedir(d) }
        var out: [ProcessHandle] = []
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            guard let pid = pid_t(name), pid != getpid(), let p = verified(pid, serving: path) else { continue }
            out.append(p)
        }
        return out
    }

    /// The mount process for `path`: the one its record names (pid and start time), else one
    /// found in /proc.
    static func find(serving path: String, record: MountRecord?) -> ProcessHandle? {
        if let r = record, let started = r.startTime, let p = verified(r.pid, serving: path, started: started) { return p }
        return all(serving: path).first
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

    /// Whether a command line is `... mount ... PATH ...` for `path`; a relative argument counts
    /// from the process's working directory `cwd`.
    static func argumentsServe(_ args: [String], cwd: String?, _ path: String) -> Bool {
        guard let m = args.firstIndex(of: "mount") else { return false }
        return args[(m + 1)...].contains { a in
            if a == path { return true }
            if a.hasPrefix("/") { return normalized(a) == path }
            guard !a.hasPrefix("-"), let cwd else { return false }
            return normalized("\(cwd)/\(a)") == path
        }
    }

    /// `path` with `.`, `..`, empty components and a trailing slash taken out (no links resolved).
    static func normalized(_ path: String) -> String {
        var parts: [Substring] = []
        for c in path.split(separator: "/") {
            if c == "." { continue }
            if c == ".." { _ = parts.popLast() } else { parts.append(c) }
        }
        return "/" + parts.joined(separator: "/")
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

/// The user's home directory: `$HOME`, else the password database's (under `env -i`), else
/// `/nonexistent`. Never a directory in /tmp, where another user could have made the names
/// that follow (`.stagefs/cache`, `.stagefs/stagefs.log`) first.
func homeDirectory() -> String {
    if let h = getenv("HOME").map({ String(cString: $0) }), h.hasPrefix("/") { return h }
    if let pw = getpwuid(getuid()), let dir = Optional(String(cString: pw.pointee.pw_dir)), dir.hasPrefix("/") { return dir }
    return "/nonexistent"
}

/// Cache directories from a colon-separated option, `~` expanded, or the default:
/// `$STAGEFS_CACHE_ROOT` (set by `module load fs-client`), else `~/.stagefs/cache`, or
/// `/var/cache/stagefs` for root.
func cacheDirectories(_ option: String?) -> [String] {
    let home = homeDirectory()
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
