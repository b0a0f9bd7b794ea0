#if canImport(Glibc)
    import Glibc
#endif

/// Starts programs with `posix_spawn`: empty signal mask and default signal actions in the
/// child (threads of this process may block signals a child must receive), optionally in a new
/// session. StageFS never forks a threaded Swift process.
public enum Spawn {
    /// What to connect a child's standard descriptor to.
    public enum Stdio: Sendable {
        case inherit
        case null
        case fd(Int32)
        case file(String)
    }

    /// Starts `path` with `args` (argv[0] excluded); returns the child's pid.
    public static func start(
        _ path: String, _ args: [String], env: [String]? = nil, stdin: Stdio = .null, stdout: Stdio = .inherit,
        stderr: Stdio = .inherit, newSession: Bool = false, keepFDs: [Int32] = []
    ) throws(FSError) -> pid_t {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        for (target, io) in [(Int32(0), stdin), (1, stdout), (2, stderr)] {
            switch io {
            case .inherit: break
            case .null: posix_spawn_file_actions_addopen(&actions, target, "/dev/null", target == 0 ? O_RDONLY : O_WRONLY, 0)
            case .fd(let fd): posix_spawn_file_actions_adddup2(&actions, fd, target)
            case .file(let p): posix_spawn_file_actions_addopen(&actions, target, p, O_WRONLY | O_CREAT | O_APPEND, 0o644)
            }
        }
        for fd in keepFDs {
            // dup2 onto itself clears FD_CLOEXEC in the child.
            posix_spawn_file_actions_adddup2(&actions, fd, fd)
        }
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigmask(&attr, &empty)
        var defaults = sigset_t()
        sigfillset(&defaults)
        sigdelset(&defaults, SIGKILL)
        sigdelset(&defaults, SIGSTOP)
        posix_spawnattr_setsigdefault(&attr, &defaults)
        var flags = Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF)
        if newSession { flags |= 0x80 }  // POSIX_SPAWN_SETSID (a _GNU_SOURCE name)
        posix_spawnattr_setflags(&attr, flags)

        let argv = [path] + args
        let environment = env ?? currentEnvironment()
        var cArgs = argv.map { strdup($0) } + [nil]
        var cEnv = environment.map { strdup($0) } + [nil]
        defer {
            cArgs.forEach { free($0) }
            cEnv.forEach { free($0) }
        }
        var pid = pid_t()
        let rc = posix_spawn(&pid, path, &actions, &attr, &cArgs, &cEnv)
        if rc != 0 { throw FSError.errno(rc, "cannot start \(path)") }
        return pid
    }

    /// Waits for `pid`; returns its exit status (128+signal when killed).
    @discardableResult
    public static func wait(_ pid: pid_t) -> Int32 {
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 {
            if errno != EINTR { return -1 }
        }
        return exitCode(status)
    }

    /// Non-blocking wait: the exit status, or nil while it runs.
    public static func poll(_ pid: pid_t) -> Int32? {
        var status: Int32 = 0
        let r = waitpid(pid, &status, WNOHANG)
        if r == pid { return exitCode(status) }
        if r < 0 { return -1 }
        return nil
    }

    private static func exitCode(_ status: Int32) -> Int32 {
        if status & 0x7f == 0 { return (status >> 8) & 0xff }
        return 128 + (status & 0x7f)
    }

    /// Runs a program to completion, capturing its standard output and error.
    public static func run(_ path: String, _ args: [String], env: [String]? = nil) throws(FSError) -> (status: Int32, output: String) {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw FSError.errno(errno, "pipe") }
        _ = fcntl(fds[0], F_SETFD, FD_CLOEXEC)
        _ = fcntl(fds[1], F_SETFD, FD_CLOEXEC)
        let pid: pid_t
        do {
            pid = try start(path, args, env: env, stdout: .fd(fds[1]), stderr: .fd(fds[1]))
        } catch {
            Glibc.close(fds[0])
            Glibc.close(fds[1])
            throw error
        }
        Glibc.close(fds[1])
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = buf.withUnsafeMutableBytes { Glibc.read(fds[0], $0.baseAddress, 4096) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            out += buf[0..<n]
        }
        Glibc.close(fds[0])
        return (wait(pid), String(decoding: out, as: UTF8.self))
    }

    /// The process's environment as `NAME=value` strings.
    public static func currentEnvironment() -> [String] {
        var out: [String] = []
        var p = environ
        while let s = p.pointee {
            out.append(String(cString: s))
            p += 1
        }
        return out
    }

    /// Finds `name` in the directories of `PATH` (or returns it when it holds a slash).
    public static func which(_ name: String) -> String? {
        if name.contains("/") { return access(name, X_OK) == 0 ? name : nil }
        let path = getenv("PATH").map { String(cString: $0) } ?? "/usr/bin:/bin"
        for dir in path.split(separator: ":") {
            let candidate = "\(dir)/\(name)"
            if access(candidate, X_OK) == 0 { return candidate }
        }
        return nil
    }
}
