import ArgumentParser
import DataPath
import StageFSCore
import Staging

#if canImport(Glibc)
    import Glibc
#endif

/// The per-job file work of the Slurm hooks. The SPANK plugin and `slurm/prolog.d`/`epilog.d`
/// run as root; everything they do in the user's directories happens here, in a process that
/// already has the job user's uid, gid and groups, so a link the user planted can only lead
/// where the user could go anyway.
struct Job: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Per-job work of the Slurm hooks, run as the job's user (the SPANK plugin and the shell prolog/epilog run it).",
        discussion: """
            The hooks run as root: they prepare <cache-dir>/<uid> and the job's mount directory
            without following links, switch to the job's user, and run these commands. Their
            outcome is the exit status; the messages on standard error say why.
            """,
        subcommands: [JobProlog.self, JobEpilog.self]
    )
}

struct JobProlog: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "prolog",
        abstract: "Stage a job's datasets into this node's cache (pinned for the job) and mount the volume for it.",
        discussion: """
            Writes the staging report(s) into <log-dir>/<uid>/jobs/<job>/ (report.json
            for the default volume, report-NAME.json for a named one) with the
            mount's log beside them; --log-dir is the cache root unless the site
            set log_root=. The job's staging and mount use --cache-size and
            --free-space-ratio; the mount gets --mount-options. Logs of this user's
            jobs that ended more than --keep-logs ago are removed.

            Exit status:
              0  every dataset staged (and the volume mounted, when asked)
              3  partial: some staged, or the mount failed
              4  failed: nothing staged (the messages say why: a missing path, no
                 permission, a timeout, a directory that cannot be used, a mount
                 option that is not allowed)
              1  a runtime failure; 2 a usage error
            """
    )

    @Option(help: "The Slurm job id.")
    var job: String

    @Option(help: "The node's cache root (the user's cache is <cache-dir>/<uid>).")
    var cacheDir: String

    @Option(help: "A volume: META-URL for the default one, NAME=META-URL for a named one. Repeatable.")
    var volume: [String] = []

    @Option(help: "What the job asked for: PATH or VOLUME:PATH, comma-separated (the value of --storage-stage). Repeatable.")
    var spec: [String] = []

    @Option(help: "Mount the default volume (or, without one, the volume of the first dataset) at this directory, prepared by root.")
    var mountDir: String?

    @Option(
        help: ArgumentHelp(
            "FUSE options of the job's mount, comma-separated: \(Setting.jobMountOptions.joined(separator: ", ")) (the plugin's mount_options=).",
            discussion:
                "allow_root lets a setuid-mode container runtime enter the mount; both need user_allow_other in /etc/fuse.conf. Any other option is refused."
        ))
    var mountOptions = ""

    @Option(help: "MiB of this node's cache the job's user may fill: staging and the job's mount (the plugin's cache_size=).")
    var cacheSize = 102400

    @Option(help: "Fraction of the cache file system kept free; least recently used unpinned blocks are evicted to keep it (free_space_ratio=).")
    var freeSpaceRatio = 0.1

    @Option(help: "Where the job's reports and logs go: <log-dir>/<uid>/jobs/<job>/ (default: --cache-dir; the plugin's log_root=).")
    var logDir: String?

    @Option(help: "How long the logs of ended jobs are kept: expired ones of this user are removed here (7d, 12h, 0 keeps none; keep_logs=).")
    var keepLogs = DurationArg(seconds: 7 * 86400)

    @Option(help: "Seconds staging may take; then it stops and the job fails.")
    var timeout = 3600

    @Option(help: "Parallel downloads.")
    var threads = 32

    @OptionGroup var io: IOOptions

    func validate() throws {
        if let why = JobCommandRules.jobProblem(job) { throw ValidationError(why) }
        if timeout <= 0 { throw ValidationError("--timeout must be positive") }
        if cacheSize <= 0 { throw ValidationError("--cache-size must be positive (MiB): a job's datasets are staged into the cache") }
        if freeSpaceRatio < 0 || freeSpaceRatio >= 1 { throw ValidationError("--free-space-ratio must be from 0 to below 1") }
    }

    func run() throws {
        var volumes: [String: String] = [:]
        for v in volume {
            let (name, url) = splitVolume(v)
            volumes[name] = url
        }
        let fuseOptions: [String]
        do {
            fuseOptions = try Setting.jobMountOptions(mountOptions)
        } catch {
            printError("stagefs: \(error.message)")
            throw ExitCode(StageExit.failed)
        }
        let cache = DiskCacheConfig(dirs: [cacheDir], capacity: cacheSize << 20, freeSpaceRatio: freeSpaceRatio)
        let logRoot = logDir ?? cacheDir
        let dir: String
        do {
            dir = try jobDirectory(root: logRoot, job: job, create: true)
        } catch {
            printError("stagefs: \(error.message)")
            throw ExitCode(StageExit.failed)
        }
        // Logs of this user's jobs that ended more than --keep-logs ago.
        JobLogs.expire(jobsDir: Sys.dirname(of: dir), keep: keepLogs.seconds)
        var wanted: [(name: String, path: String)] = []
        var reasons: [String] = []
        for s in spec {
            for item in s.split(separator: ",", omittingEmptySubsequences: false).map(String.init) {
                switch parseSpecItem(item, volumes: volumes) {
                case .success(let w): wanted.append(w)
                case .failure(let why): reasons.append(why.text)
                }
            }
        }
        if !reasons.isEmpty {
            reasons.forEach { printError("stagefs: \($0)") }
            throw ExitCode(StageExit.failed)
        }
        // Staging stops at the deadline (the hook's own limit is later, as a last resort).
        let deadline = Watchdog(seconds: timeout)
        var staged = 0
        var incomplete = 0
        var order: [String] = []
        for w in wanted where !order.contains(w.name) { order.append(w.name) }
        for name in order {
            let paths = wanted.filter { $0.name == name }.map(\.path)
            let report = "\(dir)/report\(name.isEmpty ? "" : "-" + name).json"
            let result: StageReport
            do {
                result = try runStaging(
                    metaURL: try metaURLArgument(volumes[name]!), paths: paths, mode: .stage, cache: cache, threads: threads, job: job, io: io,
                    progress: false)
            } catch {
                printError("stagefs: \(name.isEmpty ? "" : "volume \(name): ")\(error.message)")
                incomplete += 1
                continue
            }
            for p in result.paths { for e in p.errors { printError("stagefs: \(e)") } }
            for e in result.errors { printError("stagefs: \(e)") }
            if result.interrupted && deadline.fired { printError("stagefs: staging timed out after \(timeout) s") }
            do {
                try writeReport(result, to: report, followLinks: false)
            } catch {
                printError("stagefs: cannot write the report: \(error.message)")
                incomplete += 1
                continue
            }
            switch StageExit.of(result) {
            case StageExit.ok: staged += 1
            case StageExit.partial:
                staged += 1
                incomplete += 1
            default: incomplete += 1
            }
        }
        deadline.cancel()
        var mountFailed = false
        if let mountDir {
            let name = volumes[""] != nil ? "" : (order.first ?? "")
            if let url = volumes[name] {
                // The password reaches the mount through its environment, never its arguments.
                let parsed = try? metaURLArgument(url)
                var args = [
                    "mount", "-d", parsed?.withoutPassword ?? url, mountDir, "--cache-dir", cacheDir, "--cache-size", "\(cacheSize)",
                    "--free-space-ratio", "\(freeSpaceRatio)", "--log", "\(dir)/mount.log",
                ]
                if !fuseOptions.isEmpty { args += ["-o", fuseOptions.joined(separator: ",")] }
                // A mount that is not ready in 5 minutes is killed (the hook must not wait forever).
                let rc: Int32
                let out: String
                do {
                    (rc, out) = try Spawn.run(selfExecutable(), args, env: parsed.flatMap { Secrets.childEnvironment(for: $0) }, timeout: 300)
                } catch {
                    (rc, out) = (1, "stagefs: the job's mount at \(mountDir): \(error.message)")
                }
                if rc != 0 {
                    mountFailed = true
                    let lines = out.split(separator: "\n").filter { $0.hasPrefix("stagefs: ") }
                    if lines.isEmpty { printError("stagefs: the job's mount at \(mountDir) failed (exit \(rc))") }
                    lines.forEach { printError(String($0)) }
                }
            }
        }
        if incomplete == 0 && !mountFailed { return }
        throw ExitCode(staged > 0 || (incomplete == 0 && mountFailed) ? StageExit.partial : StageExit.failed)
    }
}

struct JobEpilog: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "epilog",
        abstract: "End a job on this node: flush and stop its mount, release its pins, keep its logs for a while.",
        discussion: """
            With --mount-dir, the job's mount is detached (lazily: a process left
            behind may still hold a file) and its mount process is asked to flush
            buffered writes and exit (SIGTERM); it gets --flush-timeout seconds,
            then it is killed. What happened goes to standard error and to
            epilog.log in the job's directory, which is kept with the reports and
            the mount log for --keep-logs (0: removed now); logs of this user's
            jobs that ended longer ago are removed. Idempotent: nothing to do is
            not an error. Exit status 0, or 1 when something could not be done.
            """
    )

    @Option(help: "The Slurm job id.")
    var job: String

    @Option(help: "The node's cache root.")
    var cacheDir: String

    @Option(help: "The job's mount directory: unmounted, its mount process given --flush-timeout to flush and exit.")
    var mountDir: String?

    @Option(help: "Seconds the job's mount process may take to flush buffered writes and exit before it is killed (flush_timeout=).")
    var flushTimeout = DurationArg(seconds: 60)

    @Option(help: "Where the job's reports and logs are: <log-dir>/<uid>/jobs/<job>/ (default: --cache-dir).")
    var logDir: String?

    @Option(help: "How long the job's reports and logs are kept (7d, 12h, 0 removes them now; keep_logs=).")
    var keepLogs = DurationArg(seconds: 7 * 86400)

    func validate() throws {
        if let why = JobCommandRules.jobProblem(job) { throw ValidationError(why) }
        if flushTimeout.seconds <= 0 { throw ValidationError("--flush-timeout must be positive") }
    }

    func run() throws {
        let userLogs = "\(logDir ?? cacheDir)/\(getuid())"
        let dir = "\(userLogs)/jobs/\(job)"
        var failed = false
        var said: [String] = []
        if let mountDir {
            said = stopJobMount(mountDir, job: job, timeout: flushTimeout.seconds)
            said.forEach { printError("stagefs: \($0)") }
        }
        let user = "\(cacheDir)/\(getuid())"
        if Sys.stat("\(user)/index.db") != nil {
            do {
                let cache = try DiskCache(config: DiskCacheConfig(dirs: [cacheDir], capacity: 102400 << 20), volumeUUID: nil)
                let n = try cache.release(job: job)
                if n > 0 { said.append("job \(job): released \(n) pinned block(s)") }
            } catch {
                printError("stagefs: job \(job): cannot release the pins: \(error.message)")
                failed = true
            }
        }
        do {
            if keepLogs.seconds == 0 {
                try SafeDir.removeTree(dir)
            } else if try JobLogs.markEnded(dir: dir, log: said, keep: keepLogs.seconds) == false {
                // Not a directory of this user (a link the job put there): removed, not followed.
                try SafeDir.removeTree(dir)
            }
        } catch {
            printError("stagefs: job \(job): \(error.message)")
            failed = true
        }
        JobLogs.expire(jobsDir: "\(userLogs)/jobs", keep: keepLogs.seconds)
        if failed { throw ExitCode(1) }
    }
}

enum JobCommandRules {
    /// Why `job` cannot be the hooks' job id: a Slurm job id is numeric, and it names the job's
    /// directory; like every job id, at most `JobID.maxLength` characters.
    static func jobProblem(_ job: String) -> String? {
        if let why = JobID.problem(job) { return "--job takes a numeric job id: \(why)" }
        if !job.utf8.allSatisfy({ $0 >= 48 && $0 <= 57 }) { return "--job takes a numeric job id, not \(JobID.escaped(job))" }
        return nil
    }
}

/// Stops a job's mount at its end, giving it time to flush: a lazy unmount (the job is over;
/// a process it left behind may still hold a file open), then SIGTERM to its mount processes
/// (each flushes buffered writes and exits; a process already on its way out ignores it), up
/// to `timeout` seconds for them to exit, then SIGKILL. Returns lines saying what happened.
/// Runs as the job's user: only that user's processes are signalled.
func stopJobMount(_ mnt: String, job: String, timeout: Int) -> [String] {
    var said: [String] = []
    let processes = MountProcess.all(serving: mnt)
    if MountTable.stagefs(at: mnt) != nil {
        if let fusermount = Spawn.which("fusermount3") ?? Spawn.which("/bin/fusermount3"),
            case let (rc, out) = (try? Spawn.run(fusermount, ["-u", "-z", mnt], timeout: 60)) ?? (1, "fusermount3 did not finish within 60 s"),
            rc != 0
        {
            said.append("job \(job): cannot unmount \(mnt): \(out.trimmed.isEmpty ? "fusermount3 failed" : out.trimmed)")
        }
    }
    if processes.isEmpty {
        if !said.isEmpty { said.append("job \(job): no mount process serves \(mnt)") }
        return said
    }
    let started = Sys.monotonicNanos()
    for p in processes { p.signal(SIGTERM) }
    let deadline = started + UInt64(timeout) * 1_000_000_000
    var left = processes
    while true {
        left = left.filter { !$0.exited }
        let now = Sys.monotonicNanos()
        if left.isEmpty || now >= deadline { break }
        _ = left[0].waitExit(seconds: min(Double(deadline - now) / 1e9, 0.05))
    }
    let secs = Double((Sys.monotonicNanos() - started) / 1_000_000) / 1000
    let names = processes.map { String($0.pid) }.joined(separator: ", ")
    if left.isEmpty {
        said.append(
            "job \(job): unmounted \(mnt); its mount process flushed and exited in \(secs) s (pid \(names); write errors, if any, are in its log)")
    } else {
        for p in left { p.signal(SIGKILL) }
        said.append(
            "job \(job): the mount at \(mnt) did not finish flushing within \(timeout) s (flush_timeout): killed pid \(left.map { String($0.pid) }.joined(separator: ", ")); writes it still buffered are lost"
        )
    }
    return said
}

/// What a job leaves for people to read after it ended (its reports, the mount log, the
/// epilog's log) in `<log root>/<uid>/jobs/<job>/`, kept for a while and then removed by the
/// user's next job prolog or epilog on the node, or by `stagefs cache gc`.
enum JobLogs {
    /// A file in the job's directory holding the time the job ended (seconds since the epoch).
    static let endedMark = "ended"

    /// Writes `lines` to the job's epilog.log and marks the job ended now. Returns false when
    /// `dir` is not a real directory of the caller (a link is never followed into).
    static func markEnded(dir: String, log lines: [String], keep: Int) throws(FSError) -> Bool {
        let parent = Glibc.open(Sys.dirname(of: dir), O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if parent < 0 {
            if errno == ENOENT { return true }
            throw FSError.errno(errno, "cannot open \(Sys.dirname(of: dir))")
        }
        defer { close(parent) }
        let name = String(dir.split(separator: "/").last ?? "")
        var st = Glibc.stat()
        if fstatat(parent, name, &st, AT_SYMLINK_NOFOLLOW) != 0 { return true }
        guard st.st_mode & S_IFMT == S_IFDIR, st.st_uid == getuid() else { return false }
        let fd = SafeDir.open(parent, name)
        if fd < 0 { return false }
        defer { close(fd) }
        let now = Timespec.now().sec
        var text = lines.map { "\(timeText(now)) \($0)\n" }.joined()
        text += "\(timeText(now)) job ended; this directory is kept until \(timeText(now + Int64(keep))) (keep_logs=\(Setting.durationText(keep)))\n"
        try writeAt(fd, "epilog.log", text, append: true, path: "\(dir)/epilog.log")
        try writeAt(fd, endedMark, "\(now)\n", append: false, path: "\(dir)/\(endedMark)")
        return true
    }

    /// Removes this user's job directories in `jobsDir` whose job ended more than `keep`
    /// seconds ago (and, with `unmarked`, those never marked ended whose directory has not
    /// changed for that long: jobs of a node that went down before their epilog). Links are
    /// removed, never followed. Returns the names removed (or, with `dryRun`, to remove).
    @discardableResult
    static func expire(jobsDir: String, keep: Int, unmarked: Bool = false, dryRun: Bool = false) -> [String] {
        let jobs = Glibc.open(jobsDir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        if jobs < 0 { return [] }
        defer { close(jobs) }
        let now = Timespec.now().sec
        var removed: [String] = []
        for name in SafeDir.names(jobs) where name.utf8.allSatisfy({ $0 >= 48 && $0 <= 57 }) {
            var st = Glibc.stat()
            guard fstatat(jobs, name, &st, AT_SYMLINK_NOFOLLOW) == 0, st.st_mode & S_IFMT == S_IFDIR else { continue }
            let fd = SafeDir.open(jobs, name)
            if fd < 0 { continue }
            let ended = readNumber(fd, endedMark)
            close(fd)
            let since = ended ?? (unmarked ? Int64(st.st_mtim.tv_sec) : nil)
            guard let since, since + Int64(keep) <= now else { continue }
            if !dryRun {
                do { try SafeDir.removeTree(in: jobs, name, path: "\(jobsDir)/\(name)") } catch {
                    printError("stagefs: cannot remove expired job logs \(jobsDir)/\(name): \(error.message)")
                    continue
                }
            }
            removed.append(name)
        }
        return removed
    }

    /// The number in the small regular file `name` of the open directory `dir` (not following a
    /// link, never waiting on a FIFO).
    private static func readNumber(_ dir: Int32, _ name: String) -> Int64? {
        // Non-blocking: a FIFO planted there must not make this wait for a writer.
        let fd = openat(dir, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
        if fd < 0 { return nil }
        defer { close(fd) }
        var st = Glibc.stat()
        guard fstat(fd, &st) == 0, st.st_mode & S_IFMT == S_IFREG else { return nil }
        var buf = [UInt8](repeating: 0, count: 32)
        let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, 31) }
        guard n > 0 else { return nil }
        return Int64(String(decoding: buf[0..<n], as: UTF8.self).trimmed)
    }

    /// Writes `text` to `name` in the open directory `dir`, refusing a link there.
    private static func writeAt(_ dir: Int32, _ name: String, _ text: String, append: Bool, path: String) throws(FSError) {
        let fd = openat(dir, name, O_WRONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC | (append ? O_APPEND : O_TRUNC), 0o644)
        if fd < 0 {
            if errno == ELOOP { throw FSError(ELOOP, "\(path) is a symbolic link: remove it") }
            throw FSError.errno(errno, "cannot write \(path)")
        }
        defer { close(fd) }
        let bytes = Array(text.utf8)
        try fsTyped { try bytes.withUnsafeBytes { try Sys.writeAll(fd, [$0], path: path) } }
    }
}

/// `<root>/<uid>/jobs/<job>` of the calling user (`root`: the log root, by default the cache
/// root); with `create`, made (0700) when missing. `<root>/<uid>` must exist and be the
/// caller's (root made it, or an earlier job did).
func jobDirectory(root: String, job: String, create: Bool) throws(FSError) -> String {
    let user = "\(root)/\(getuid())"
    guard let st = Sys.stat(user), st.st_mode & S_IFMT == S_IFDIR, st.st_uid == getuid() else {
        throw FSError(EPERM, "\(user) is not a directory of yours: the prolog prepares it; remove whatever is there")
    }
    let dir = "\(user)/jobs/\(job)"
    if create {
        for d in ["\(user)/jobs", dir] {
            if mkdir(d, 0o700) != 0 && errno != EEXIST { throw FSError.errno(errno, "cannot create \(d)") }
            var st = Glibc.stat()
            guard lstat(d, &st) == 0, st.st_mode & S_IFMT == S_IFDIR, st.st_uid == getuid() else {
                throw FSError(EPERM, "\(d) is a symbolic link, not a directory, or not yours: remove it")
            }
        }
    }
    return dir
}

/// `NAME=URL` or just `URL` (the default volume, named ""). A URL's own `=` comes after `://`.
func splitVolume(_ v: String) -> (String, String) {
    if let eq = v.firstIndex(of: "="), !v[..<eq].contains(":") { return (String(v[..<eq]), String(v[v.index(after: eq)...])) }
    return ("", v)
}

/// One item of a `--storage-stage` value: `/path` (default volume) or `NAME:/path`.
func parseSpecItem(_ item: String, volumes: [String: String]) -> Result<(name: String, path: String), SpecError> {
    if item.isEmpty { return .failure(SpecError("empty item in --storage-stage")) }
    var name = ""
    var path = item
    if !item.hasPrefix("/") {
        guard let colon = item.firstIndex(of: ":") else {
            return .failure(SpecError("'\(item)' is not an absolute path in the volume (or VOLUME:/path)"))
        }
        name = String(item[..<colon])
        path = String(item[item.index(after: colon)...])
        if name.isEmpty || volumes[name] == nil {
            let known = volumes.keys.filter { !$0.isEmpty }.sorted().joined(separator: ", ")
            return .failure(SpecError("unknown volume '\(name)' in --storage-stage (configured: \(known.isEmpty ? "none" : known))"))
        }
        if !path.hasPrefix("/") { return .failure(SpecError("'\(path)' is not an absolute path in volume \(name)")) }
    }
    if volumes[name] == nil { return .failure(SpecError("no default volume is configured: name one as VOLUME:\(path)")) }
    return .success((name, path))
}

struct SpecError: Error {
    let text: String
    init(_ text: String) { self.text = text }
}

/// The path of this program (to run its own subcommands).
func selfExecutable() -> String {
    var buf = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
    let n = readlink("/proc/self/exe", &buf, Int(PATH_MAX))
    return n > 0 ? String(decoding: buf.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self) : CommandLine.arguments[0]
}

/// Stops staging after `seconds` (a thread that sleeps, then raises the stop flag).
final class Watchdog: @unchecked Sendable {
    private let lock = ConditionLock()
    private var cancelled = false
    private var didFire = false

    /// Whether the deadline passed before `cancel`.
    var fired: Bool { lock.withLock { didFire } }

    init(seconds: Int) {
        deadline = Sys.monotonicNanos() + UInt64(seconds) * 1_000_000_000
        let ctx = Unmanaged.passRetained(self).toOpaque()
        var tid = pthread_t()
        if pthread_create(&tid, nil, watchdogMain, ctx) == 0 {
            pthread_detach(tid)
        } else {
            Unmanaged<Watchdog>.fromOpaque(ctx).release()
        }
    }

    private let deadline: UInt64

    func cancel() {
        lock.withLock {
            cancelled = true
            lock.broadcast()
        }
    }

    fileprivate func wait() {
        lock.withLock {
            while !cancelled {
                let now = Sys.monotonicNanos()
                if now >= deadline {
                    didFire = true
                    stagingStopRequested.store(true, ordering: .relaxed)
                    return
                }
                lock.wait(seconds: min(1, Double(deadline - now) / 1e9))
            }
        }
    }
}

private func watchdogMain(_ ctx: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? {
    let w = Unmanaged<Watchdog>.fromOpaque(ctx!).takeRetainedValue()
    w.wait()
    return nil
}
