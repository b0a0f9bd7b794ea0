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
            Writes the staging report(s) into <cache-dir>/<uid>/jobs/<job>/ (report.json for the
            default volume, report-NAME.json for a named one) with the mount's log beside them.

            Exit status:
              0  every dataset staged (and the volume mounted, when asked)
              3  partial: some staged, or the mount failed
              4  failed: nothing staged (the messages say why: a missing path, no permission,
                 a timeout, a directory that cannot be used)
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

    @Option(help: "Seconds staging may take; then it stops and the job fails.")
    var timeout = 3600

    @Option(help: "Parallel downloads.")
    var threads = 32

    @OptionGroup var io: IOOptions

    func validate() throws {
        if job.isEmpty || !job.utf8.allSatisfy({ $0 >= 48 && $0 <= 57 }) { throw ValidationError("--job takes a numeric job id, not '\(job)'") }
        if timeout <= 0 { throw ValidationError("--timeout must be positive") }
    }

    func run() throws {
        var volumes: [String: String] = [:]
        for v in volume {
            let (name, url) = splitVolume(v)
            volumes[name] = url
        }
        let dir: String
        do {
            dir = try jobDirectory(cacheDir: cacheDir, job: job, create: true)
        } catch {
            printError("stagefs: \(error.message)")
            throw ExitCode(StageExit.failed)
        }
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
                    metaURL: volumes[name]!, paths: paths, mode: .stage, cache: DiskCacheConfig(dirs: [cacheDir], capacity: 102400 << 20),
                    threads: threads, job: job, io: io, progress: false)
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
                let (rc, out) = try Spawn.run(
                    selfExecutable(), ["mount", "-d", url, mountDir, "--cache-dir", cacheDir, "--log", "\(dir)/mount.log"])
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
        abstract: "Release a job's pins on this node and remove its per-job files.",
        discussion: "Idempotent: nothing to do is not an error. Exit status 0, or 1 when something could not be removed."
    )

    @Option(help: "The Slurm job id.")
    var job: String

    @Option(help: "The node's cache root.")
    var cacheDir: String

    func validate() throws {
        if job.isEmpty || !job.utf8.allSatisfy({ $0 >= 48 && $0 <= 57 }) { throw ValidationError("--job takes a numeric job id, not '\(job)'") }
    }

    func run() throws {
        let user = "\(cacheDir)/\(getuid())"
        if Sys.stat("\(user)/index.db") != nil {
            let cache = try DiskCache(config: DiskCacheConfig(dirs: [cacheDir], capacity: 102400 << 20), volumeUUID: nil)
            _ = try cache.release(job: job)
        }
        try SafeDir.removeTree("\(user)/jobs/\(job)")
    }
}

/// `<cache-dir>/<uid>/jobs/<job>` of the calling user; with `create`, made (0700) when missing.
/// `<cache-dir>/<uid>` must exist and be the caller's (root made it, or an earlier job did).
func jobDirectory(cacheDir: String, job: String, create: Bool) throws(FSError) -> String {
    let user = "\(cacheDir)/\(getuid())"
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
