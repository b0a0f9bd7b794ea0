import ArgumentParser
import DataPath
import Metadata
import ObjectStorage
import StageFSCore
import Staging

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif
#if canImport(Glibc)
    import Glibc
#endif

struct Stage: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Fill the node-local cache with datasets before they are read (or check, evict, release them).",
        discussion: """
            Two ways to name what to stage:
              stagefs stage /mnt/data/datasets/imagenet          paths inside a StageFS mount of this node
                                                                  (the mount's cache is filled)
              stagefs stage --meta META-URL --cache-dir DIR /datasets/imagenet
                                                                  paths inside the volume, no mount needed
                                                                  (what a Slurm prolog uses)

            Paths are resolved with the caller's uid, gid and groups: nobody stages what they may not
            read. Directory trees are listed in parallel, chunk records read in batches, and blocks
            downloaded by --threads workers. Blocks already cached are skipped, so running again
            resumes. With --job, every block of the paths is pinned for that job: eviction leaves
            it alone until 'stagefs stage --release JOB'.

            The result is what is in the cache at the end, not what went through it. When the set
            does not fit (--cache-size, the file system's --free-space-ratio, or other jobs' pins),
            staging fetches what fits and stops there instead of evicting its own blocks; it then
            says why and what fits, and exits 3.

            A progress line (files, bytes, rate, ETA) is shown on a terminal; a summary line
            otherwise. Ctrl-C stops cleanly.

            Exit status:
              0    every block of every path is in the cache (with --check: the same)
              3    partial: part of it is in the cache, not all (a path failed, the cache
                   had no room for the rest, or the run was stopped; the messages say why)
              4    failed: none of it is in the cache (every path failed, or no room at all)
              1    a runtime failure before staging could start (metadata or store unreachable)
              2    a usage error
              130  interrupted (Ctrl-C, SIGTERM)
            """
    )

    @Argument(help: "Files or directories to stage: inside a StageFS mount, or inside the volume with --meta.")
    var paths: [String] = []

    @Option(
        help:
            "Metadata store of the volume (paths are then volume paths such as /datasets/x); paths outside any mount use $STAGEFS_VOLUME when it is set."
    )
    var meta: String?

    @Option(help: "Cache directories, colon-separated (default: the mount's, or ~/.stagefs/cache; /var/cache/stagefs for root).")
    var cacheDir: String?

    @Option(help: "MiB the cache may hold (default: the mount's, or 102400).")
    var cacheSize: Int?

    @Option(help: "Fraction of the cache file system to keep free.")
    var freeSpaceRatio: Double?

    @Option(help: "Root only: resolve paths and permissions as this user and fill that user's cache.")
    var asUser: String?

    @Option(help: "A file with one path per line (blank lines and lines starting with # are skipped).")
    var manifest: String?

    @Option(help: "Parallel downloads.")
    var threads = 32

    @Option(help: "Pin the staged blocks for this job (released with --release).")
    var job: String?

    @Option(help: "Release the pins of this job and exit.")
    var release: String?

    @Flag(help: "Only report how much of each path is cached (files, bytes, percent).")
    var check = false

    @Flag(help: "Drop the paths' blocks from the cache (blocks pinned by a job stay).")
    var evict = false

    @Option(help: "Write a JSON report (files, bytes, blocks fetched and already cached, duration, errors per path).")
    var report: String?

    @Flag(name: .shortAndLong, help: "No progress display.")
    var quiet = false

    @Option(
        help: ArgumentHelp(
            "While staging, serve Prometheus metrics on this address (HOST:PORT, or PORT for 127.0.0.1:PORT): files and bytes asked for, staged and fetched, and the object requests ('stagefs stats HOST:PORT' shows them).",
            valueName: "address"))
    var metrics: String?

    @OptionGroup var io: IOOptions

    func validate() throws {
        if check && evict { throw ValidationError("--check and --evict cannot go together") }
        if release != nil && (!paths.isEmpty || manifest != nil || check || evict || job != nil) {
            throw ValidationError("--release JOB takes no paths and no other mode")
        }
        if release == nil && paths.isEmpty && manifest == nil {
            throw ValidationError("name at least one path (or --manifest FILE, or --release JOB)")
        }
        if threads < 1 || threads > 1024 { throw ValidationError("--threads must be from 1 to 1024") }
        if let j = job ?? release, let why = JobID.problem(j) { throw ValidationError("--\(job != nil ? "job" : "release") takes a job id: \(why)") }
        if meta != nil {
            for p in paths where !p.hasPrefix("/") { throw ValidationError("with --meta, paths are absolute paths inside the volume: '\(p)'") }
        }
        if let s = cacheSize, s < 0 { throw ValidationError("--cache-size cannot be negative") }
        if asUser != nil && cacheDir == nil {
            throw ValidationError("--as-user needs --cache-dir: the site's cache root (root-owned), never a path the user controls")
        }
    }

    func run() throws {
        // Before anything counts: a metric made before this would stay silent.
        let (metricsServer, _, metricsWarning) = try startMetrics(try metricsAddress(metrics))
        if let metricsWarning { printError("stagefs: warning: \(metricsWarning)") }
        metricsServer.start()
        defer { metricsServer.stop() }
        if let asUser {
            // As root: make the user's cache directories (owned by the user), then become the user.
            try becomeUser(asUser) { (uid, gid, home) throws(FSError) in
                let dirs = cacheDir != nil ? cacheDirectories(cacheDir) : ["\(home)/.stagefs/cache"]
                for d in dirs { try DiskCache.prepareUserDir(root: d, uid: uid, gid: gid) }
            }
        }
        if let release {
            let cache = try DiskCache(
                config: DiskCacheConfig(dirs: cacheDirectories(cacheDir), capacity: (cacheSize ?? 102400) << 20), volumeUUID: nil)
            let n = try cache.release(job: release)
            print("stagefs: released \(n) pinned block(s) of job \(release)")
            return
        }
        var all = paths
        if let manifest {
            guard let bytes = Sys.readFile(manifest) else { throw FSError(ENOENT, "cannot read manifest \(manifest)") }
            for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") {
                let t = String(line).trimmed
                if !t.isEmpty && !t.hasPrefix("#") { all.append(t) }
            }
        }
        if all.isEmpty { throw FSError.usage("the manifest \(manifest ?? "") names no paths") }

        // Where the volume and the cache are: from --meta, or from the mount the paths are in.
        var volumePaths = all
        var record: MountRecord?
        let metaURL: MetaURL
        // Paths outside any mount are volume paths of $STAGEFS_VOLUME when it is set.
        let meta = self.meta ?? (all.contains { MountTable.containing(absolutePath($0)) != nil } ? nil : defaultVolume())
        if let meta {
            metaURL = try metaURLArgument(meta)
        } else {
            let r: MountRecord
            (r, volumePaths) = try mountPaths(all)
            record = r
            metaURL = try r.metadataURL()
        }
        if meta != nil, let bad = all.first(where: { !$0.hasPrefix("/") }) {
            throw FSError.usage("with --meta, paths are absolute paths inside the volume: '\(bad)'")
        }
        let dirs = cacheDir != nil ? cacheDirectories(cacheDir) : (record?.cacheDirs ?? cacheDirectories(nil))
        let size = cacheSize ?? (cacheDir == nil ? record?.cacheSize : nil) ?? 102400
        if size == 0 { throw FSError.usage("the cache size is 0: there is no cache to stage into") }
        let mode: StageMode = check ? .check : (evict ? .evict : .stage)
        // Found now, not after everything was fetched.
        if let report, let problem = unwritable(report) { throw FSError(EACCES, "cannot write the report to \(report): \(problem)") }
        let result = try runStaging(
            metaURL: metaURL, paths: volumePaths, mode: mode,
            cache: DiskCacheConfig(dirs: dirs, capacity: size << 20, freeSpaceRatio: freeSpaceRatio ?? record?.freeSpaceRatio ?? 0.1),
            threads: threads, job: job, io: io, progress: !quiet && isatty(2) == 1)
        printSummary(result, shown: all)
        if let report { try writeReport(result, to: report) }
        let code = StageExit.of(result)
        if code != StageExit.ok { throw ExitCode(code) }
    }

    /// Maps paths inside one StageFS mount of this node to volume paths.
    private func mountPaths(_ all: [String]) throws(FSError) -> (MountRecord, [String]) {
        var record: MountRecord?
        var out: [String] = []
        for p in all {
            let abs = absolutePath(p)
            guard let m = MountTable.containing(abs) else {
                throw FSError(EINVAL, "\(abs) is not inside a StageFS mount of this node (use --meta META-URL to name volume paths)")
            }
            guard let r = Runtime.load(m.mountPoint) else {
                throw FSError(ENOENT, "no record of the mount at \(m.mountPoint) for uid \(getuid()) (use --meta META-URL)")
            }
            if let prev = record, prev.mountPoint != r.mountPoint {
                throw FSError.usage("the paths are in two mounts (\(prev.mountPoint), \(r.mountPoint)); stage them separately")
            }
            record = r
            out.append(r.volumePath(abs))
        }
        return (record!, out)
    }

    private func printSummary(_ r: StageReport, shown: [String]) {
        for (i, p) in r.paths.enumerated() {
            // Name paths as the user typed them (a mount path, not the volume path).
            let name = i < shown.count ? shown[i] : p.path
            for e in p.errors { printError("stagefs: \(e.hasPrefix(p.path) ? name + e.dropFirst(p.path.count) : e)") }
            let pct = (p.percentCached * 10).rounded() / 10
            switch r.mode {
            case .check:
                print(
                    "\(name): \(pct)% cached, \(p.filesFullyCached) of \(p.files) files, \(humanBytes(p.bytesKept)) of \(humanBytes(p.blockBytes))"
                )
            case .evict:
                print("\(name): evicted \(p.blocksEvicted) block(s)\(p.blocksPinnedKept > 0 ? ", kept \(p.blocksPinnedKept) pinned by a job" : "")")
            case .stage:
                if r.paths.count > 1 {
                    print(
                        "\(name): \(p.filesFullyCached) of \(p.files) files, \(humanBytes(p.bytesKept)) of \(humanBytes(p.blockBytes)) in the cache (\(pct)%), \(p.blocksFetched) blocks fetched, \(p.blocksCached) already cached"
                    )
                }
            }
        }
        for e in r.errors { printError("stagefs: \(e)") }
        if r.mode == .stage {
            let rate = r.durationSeconds > 0 ? Double(r.bytesFetched) / r.durationSeconds : 0
            let secs = Double(Int(r.durationSeconds * 10)) / 10
            let pct = r.blockBytes == 0 ? 100 : (Double(r.bytesKept) * 1000 / Double(r.blockBytes)).rounded() / 10
            print(
                "staged \(r.filesKept) of \(r.files) files, \(humanBytes(r.bytesKept)) of \(humanBytes(r.blockBytes)) in the cache\(r.blockBytes > 0 ? " (\(pct)%)" : ""), in \(secs) s: \(r.blocksFetched) blocks fetched (\(humanBytes(r.bytesFetched)), \(humanBytes(Int(rate)))/s), \(r.blocksCached) already cached\(r.job.map { ", pinned for job \($0)" } ?? ""); status \(r.status)"
            )
        }
    }
}

private func stageSignal(_ sig: Int32) {
    stagingStopRequested.store(true, ordering: .relaxed)
}

/// The exit statuses of `stage` and `job prolog` (documented in their --help and the README).
enum StageExit {
    static let ok: Int32 = 0
    static let partial: Int32 = 3
    static let failed: Int32 = 4
    static let interrupted: Int32 = 130

    static func of(_ r: StageReport) -> Int32 {
        if r.interrupted { return interrupted }
        switch r.status {
        case "ok": return ok
        case "partial": return partial
        default: return failed
        }
    }
}

/// Stages (checks, evicts) volume paths of one volume into a disk cache, with the caller's
/// credential; SIGINT and SIGTERM stop it cleanly.
func runStaging(
    metaURL url: MetaURL, paths: [String], mode: StageMode, cache config: DiskCacheConfig, threads: Int, job: String?, io: IOOptions,
    progress: Bool
) throws(FSError) -> StageReport {
    let metaEngine = try openEngine(url, retryTimeout: io.metaTimeout)
    let format = try metaEngine.requireFormat()
    let cache = try DiskCache(config: config, volumeUUID: format.uuid)
    var store: (any ObjectStore)?
    if mode == .stage {
        store = try openStore(metaEngine, io.storeConfig(format))
        // One line up front, not one per file, when this user cannot read the bucket at all.
        if let local = store as? LocalObjectStore, let problem = local.accessProblem(volume: format.name, write: false) {
            throw FSError(
                EACCES,
                "\(problem): this user cannot read the volume's data, so nothing can be staged; a bucket that several users read belongs to a group of theirs (stagefs format --bucket-group GROUP): ask to be added"
            )
        }
    }
    let stager = Stager(meta: metaEngine, store: store, cache: cache, format: format, cred: processCredential(), threads: threads, job: job)
    signal(SIGINT, stageSignal)
    signal(SIGTERM, stageSignal)
    let display = ProgressDisplay(progress: stager.progress, enabled: progress)
    display.start()
    let result = stager.run(paths, mode: mode)
    display.stop()
    return result
}

/// Writes a staging report as JSON (the caller's permissions apply); without `followLinks`, a
/// symbolic link at `path` is refused.
func writeReport(_ result: StageReport, to path: String, followLinks: Bool = true) throws(FSError) {
    let enc = JSONEncoder()
    enc.outputFormatting = [.prettyPrinted, .sortedKeys]
    let data = (try? enc.encode(result)) ?? Data()
    let fd: Int32
    do {
        fd = try Sys.open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | (followLinks ? 0 : O_NOFOLLOW), 0o644)
    } catch {
        if error.code == ELOOP { throw FSError(ELOOP, "\(path) is a symbolic link: remove it") }
        throw error
    }
    defer { Sys.close(fd) }
    let bytes = [UInt8](data)
    try fsTyped { try bytes.withUnsafeBytes { try Sys.pwrite(fd, $0.baseAddress!, $0.count, 0, path: path) } }
    if ftruncate(fd, off_t(bytes.count)) != 0 { throw FSError.errno(errno, "cannot write \(path)") }
}

/// Why this process could not write a file at `path` (nil: it could): an existing file must be
/// writable, a new one needs a writable directory.
func unwritable(_ path: String) -> String? {
    if let st = Sys.stat(path) {
        if st.st_mode & S_IFMT == S_IFDIR { return "it is a directory" }
        return access(path, W_OK) == 0 ? nil : String(cString: strerror(errno))
    }
    let dir = Sys.dirname(of: absolutePath(path))
    guard Sys.stat(dir) != nil else { return "its directory \(dir) does not exist" }
    return access(dir, W_OK | X_OK) == 0 ? nil : "its directory \(dir) is not writable by uid \(getuid())"
}

/// The calling process's credential (uid, gid, supplementary groups).
func processCredential() -> Credential {
    var groups = [gid_t](repeating: 0, count: 256)
    let n = getgroups(256, &groups)
    return Credential(uid: getuid(), gid: getgid(), groups: n > 0 ? Array(groups.prefix(Int(n))) : [], pid: UInt32(getpid()))
}

/// Root only: runs `prepare(uid, gid, home)` as root, then switches this process to `name`'s uid,
/// gid and groups (before any thread starts), so everything after runs as that user.
func becomeUser(_ name: String, prepare: (uid_t, gid_t, String) throws(FSError) -> Void) throws(FSError) {
    guard getuid() == 0 else { throw FSError.usage("--as-user needs root (it switches to that user)") }
    guard let pw = getpwnam(name) else { throw FSError(ENOENT, "no such user '\(name)'") }
    let uid = pw.pointee.pw_uid
    let gid = pw.pointee.pw_gid
    let home = String(cString: pw.pointee.pw_dir)
    try prepare(uid, gid, home)
    if initgroups(name, gid) != 0 { throw FSError.errno(errno, "cannot set the groups of \(name)") }
    if setgid(gid) != 0 { throw FSError.errno(errno, "cannot switch to gid \(gid)") }
    if setuid(uid) != 0 { throw FSError.errno(errno, "cannot switch to uid \(uid)") }
    setenv("HOME", home, 1)
    setenv("USER", name, 1)
}

/// A one-line progress display on standard error, redrawn twice a second.
final class ProgressDisplay: @unchecked Sendable {
    let progress: StageProgress
    let enabled: Bool
    private let lock = ConditionLock()
    private var done = false
    private var running = false

    init(progress: StageProgress, enabled: Bool) {
        self.progress = progress
        self.enabled = enabled
    }

    func start() {
        guard enabled else { return }
        running = true
        let ctx = Unmanaged.passRetained(self).toOpaque()
        var tid = pthread_t()
        if pthread_create(&tid, nil, progressMain, ctx) == 0 {
            pthread_detach(tid)
        } else {
            Unmanaged<ProgressDisplay>.fromOpaque(ctx).release()
            running = false
        }
    }

    func stop() {
        guard enabled else { return }
        lock.withLock {
            done = true
            lock.broadcast()
            while running { lock.wait(seconds: 1) }
        }
        draw()
        printError("")
    }

    fileprivate func loop() {
        while true {
            draw()
            let stop = lock.withLock { () -> Bool in
                if !done { lock.wait(seconds: 0.5) }
                return done
            }
            if stop { break }
        }
        lock.withLock {
            running = false
            lock.broadcast()
        }
    }

    /// Redraws the progress line.
    private func draw() {
        do {
            let (fd, ft, bd, bt, fetched, secs, phase) = progress.snapshot
            let rate = secs > 0 ? Double(fetched) / secs : 0
            let left = bt - bd
            let eta = rate > 0 && fetched > 0 ? Int(Double(left) / rate) : -1
            let etaText = eta < 0 ? "--:--" : "\(eta / 60):\(eta % 60 < 10 ? "0" : "")\(eta % 60)"
            let pct = bt > 0 ? Int(Double(bd) * 100 / Double(bt)) : 0
            printError(
                "\r\u{1B}[K\(phase) \(pct)%  files \(fd)/\(ft)  \(humanBytes(UInt64(bd)))/\(humanBytes(UInt64(bt)))  \(humanBytes(UInt64(rate)))/s  ETA \(etaText)",
                newline: false)
        }
    }
}

private func progressMain(_ ctx: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? {
    let d = Unmanaged<ProgressDisplay>.fromOpaque(ctx!).takeRetainedValue()
    d.loop()
    return nil
}
