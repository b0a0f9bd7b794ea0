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
        stderr: Stdio = .inherit, newSession: Bool = false, newProcessGroup: Bool = false, keepFDs: [Int32] = []
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
        if newSession {
            flags |= 0x80  // POSIX_SPAWN_SETSID (a _GNU_SOURCE name)
        } else if newProcessGroup {
            // Its own process group (pgid = its pid), so that a deadline ends whatever it started.
            flags |= Int16(POSIX_SPAWN_SETPGROUP)
            posix_spawnattr_setpgroup(&attr, 0)
        }
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

    /// Runs a program to completion, capturing its standard output and error (together, at most
    /// `outputLimit` bytes: the rest is read and dropped). With `timeout` (seconds), the program
    /// runs in its own process group, which is killed (SIGKILL) at the deadline: then this
    /// throws `ETIMEDOUT` naming the program.
    public static func run(
        _ path: String, _ args: [String], env: [String]? = nil, timeout: Double? = nil, outputLimit: Int = 1 << 20
    ) throws(FSError) -> (status: Int32, output: String) {
        var outcome = Outcome()
        runMany(
            [Command(path, args, env: env)], parallel: 1, timeout: timeout, outputLimit: outputLimit, separateErrors: false,
            newProcessGroup: timeout != nil
        ) { _, o in
            outcome = o
            return nil
        }
        if let failure = outcome.failure { throw failure }
        guard let status = outcome.status else {
            let name = path.split(separator: "/").last.map(String.init) ?? path
            throw FSError(
                ETIMEDOUT,
                "\(name) did not finish within \(Int(timeout ?? 0)) s: killed\(outcome.abandoned ? " (it did not exit even then: left behind)" : "")")
        }
        return (status, String(decoding: outcome.output, as: UTF8.self))
    }

    /// A program for `runMany`.
    public struct Command: Sendable {
        public var path: String
        public var args: [String]
        public var env: [String]?

        public init(_ path: String, _ args: [String], env: [String]? = nil) {
            self.path = path
            self.args = args
            self.env = env
        }
    }

    /// How a program started by `runMany` ended.
    public struct Outcome: Sendable {
        /// Its exit status (128+signal when a signal ended it); nil when it could not be started
        /// or was killed at its deadline.
        public var status: Int32?
        /// Its standard output (and error, unless separate): at most the output limit.
        public var output: [UInt8] = []
        /// Its standard error when separate: at most the output limit.
        public var errors: [UInt8] = []
        /// It wrote more than the limit to one of them (the rest was dropped).
        public var overflowed = false
        /// It was still running at its deadline and was killed.
        public var timedOut = false
        /// Killed at its deadline, it had still not exited a few seconds later (a process blocked
        /// in the kernel, such as on a stopped FUSE mount, dies only once that returns): it was
        /// left behind, never waited for.
        public var abandoned = false
        /// Why it could not be started.
        public var failure: FSError?

        public init() {}
    }

    /// Runs programs, up to `parallel` at a time, each in its own process group (with
    /// `newProcessGroup`) and each with its own `timeout` (seconds; nil: none), after which its
    /// process group is killed (SIGKILL) and it is waited for at most 2 s more. Every program's
    /// standard output (and error, separately with `separateErrors`) is read up to
    /// `outputLimit` bytes each, the rest dropped. `commands[i]` starts chain `i`; when a
    /// program ends, `next(i, outcome)` is called with its outcome and may return the chain's next
    /// program. Nothing a program does can make this wait past its deadline (plus the grace),
    /// except a `next` that does. Runs on the calling thread (poll on the pipes).
    public static func runMany(
        _ commands: [Command?], parallel: Int, timeout: Double?, outputLimit: Int, separateErrors: Bool, newProcessGroup: Bool = true,
        next: (Int, Outcome) -> Command?
    ) {
        final class Child {
            let chain: Int
            let pid: pid_t
            var fds: [Int32]  // [output, errors]; -1 once closed
            var outcome = Outcome()
            let deadline: UInt64
            var killedAt: UInt64?
            init(chain: Int, pid: pid_t, fds: [Int32], deadline: UInt64) {
                self.chain = chain
                self.pid = pid
                self.fds = fds
                self.deadline = deadline
            }
        }
        var queue: [(Int, Command)] = commands.enumerated().compactMap { i, c in c.map { (i, $0) } }
        var running: [Child] = []
        let limitNanos = timeout.map { UInt64(max($0, 0) * 1e9) }
        var buf = [UInt8](repeating: 0, count: 65536)

        func finish(_ chain: Int, _ outcome: Outcome) {
            if let c = next(chain, outcome) { queue.insert((chain, c), at: 0) }
        }
        func read(_ child: Child, _ k: Int) {
            let fd = child.fds[k]
            while true {
                let n = buf.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
                if n < 0 && errno == EINTR { continue }
                if n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) { return }
                if n <= 0 {
                    Glibc.close(fd)
                    child.fds[k] = -1
                    return
                }
                let have = k == 0 ? child.outcome.output.count : child.outcome.errors.count
                let keep = max(0, min(n, outputLimit - have))
                if keep < n { child.outcome.overflowed = true }
                if keep > 0 {
                    if k == 0 { child.outcome.output += buf[0..<keep] } else { child.outcome.errors += buf[0..<keep] }
                }
            }
        }

        while !queue.isEmpty || !running.isEmpty {
            while running.count < max(parallel, 1) && !queue.isEmpty {
                let (chain, cmd) = queue.removeFirst()
                var pipes: [[Int32]] = []
                var failure: FSError?
                for _ in 0..<(separateErrors ? 2 : 1) {
                    var p: [Int32] = [0, 0]
                    if pipe(&p) != 0 {
                        failure = FSError.errno(errno, "cannot make a pipe for \(cmd.path)")
                        break
                    }
                    // Single-threaded callers only spawn here; close-on-exec right away keeps the
                    // ends out of other children (the child gets its end through dup2).
                    _ = fcntl(p[0], F_SETFD, FD_CLOEXEC)
                    _ = fcntl(p[1], F_SETFD, FD_CLOEXEC)
                    _ = fcntl(p[0], F_SETFL, fcntl(p[0], F_GETFL) | O_NONBLOCK)
                    pipes.append(p)
                }
                var pid: pid_t = -1
                if failure == nil {
                    do {
                        pid = try start(
                            cmd.path, cmd.args, env: cmd.env, stdout: .fd(pipes[0][1]), stderr: .fd(pipes[separateErrors ? 1 : 0][1]),
                            newProcessGroup: newProcessGroup)
                    } catch {
                        failure = error
                    }
                }
                for p in pipes { Glibc.close(p[1]) }
                if let failure {
                    for p in pipes { Glibc.close(p[0]) }
                    var o = Outcome()
                    o.failure = failure
                    finish(chain, o)
                    continue
                }
                let deadline = limitNanos.map { Sys.monotonicNanos() &+ $0 } ?? UInt64.max
                running.append(Child(chain: chain, pid: pid, fds: pipes.map { $0[0] }, deadline: deadline))
            }
            if running.isEmpty { continue }
            // Wait for output, at most 50 ms (exits and deadlines are checked between).
            var pfds: [pollfd] = []
            var owners: [(Child, Int)] = []
            for c in running {
                for (k, fd) in c.fds.enumerated() where fd >= 0 {
                    pfds.append(pollfd(fd: fd, events: Int16(POLLIN), revents: 0))
                    owners.append((c, k))
                }
            }
            if pfds.isEmpty {
                Sys.sleep(seconds: 0.01)
            } else if Glibc.poll(&pfds, nfds_t(pfds.count), 50) > 0 {
                for (i, p) in pfds.enumerated() where p.revents != 0 { read(owners[i].0, owners[i].1) }
            }
            let now = Sys.monotonicNanos()
            var still: [Child] = []
            for c in running {
                if let status = Spawn.poll(c.pid) {
                    // Exited: what is left in its pipes now, then done (a process it left behind
                    // holding them is not waited for).
                    for k in c.fds.indices where c.fds[k] >= 0 {
                        read(c, k)
                        if c.fds[k] >= 0 {
                            Glibc.close(c.fds[k])
                            c.fds[k] = -1
                        }
                    }
                    if c.killedAt == nil { c.outcome.status = status }
                    finish(c.chain, c.outcome)
                    continue
                }
                if c.killedAt == nil && now >= c.deadline {
                    c.outcome.timedOut = true
                    c.killedAt = now
                    if newProcessGroup { kill(-c.pid, SIGKILL) }
                    kill(c.pid, SIGKILL)
                } else if let k = c.killedAt, now - k > 2_000_000_000 {
                    // Killed and still there: blocked in the kernel. Left behind, never waited for.
                    c.outcome.abandoned = true
                    for fd in c.fds where fd >= 0 { Glibc.close(fd) }
                    finish(c.chain, c.outcome)
                    continue
                }
                still.append(c)
            }
            running = still
        }
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
