import ArgumentParser
import DataPath
import FUSEMount
import Metadata
import ObjectStorage
import StageFSCore
import Telemetry
import VFS

#if canImport(Glibc)
    import Glibc
#endif

struct Mount: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Mount a volume with FUSE (as an ordinary user through fusermount3, no root needed).",
        discussion: """
            Without -d the command serves the mount until it is unmounted (stagefs umount, or
            fusermount3 -u) or receives SIGTERM/SIGINT; buffered data is flushed first either way.
            With -d it returns once the mount is ready, or fails with the reason; the mount then
            runs in the background and logs to --log. While it flushes at the end, further
            SIGTERM/SIGINT are ignored (SIGKILL stops it at once, losing what was not flushed).

            -o takes FUSE mount options: allow_other (other users may enter the mount; needs
            user_allow_other in /etc/fuse.conf unless root), allow_root (root may enter it, as a
            setuid container runtime must), ro (read-only), and other options fusermount3 accepts.
            The kernel checks permissions (default_permissions) and StageFS checks them again with
            the caller's uid, gid and groups. A mountpoint with files in it is refused (they would
            be hidden while mounted) unless -o nonempty.

            A mount made by root gets allow_other unless -o noallow_other: a root mount (a
            systemd unit, /etc/fstab) is the node's mount for every user, and each user still
            gets only what the permissions give them (both checks above use the caller's own
            identity). Without it only root could enter it.

            The mountpoint may be /dev/fd/N: a /dev/fuse descriptor mounted by a supervisor and
            passed to this process, as Apptainer's --fusemount does.

            Examples:
              stagefs mount -d sqlite3:///var/lib/stagefs/demo.db /mnt/demo
              stagefs mount -d redis://10.0.0.5:6379/1 $HOME/data -o allow_root
            """
    )

    @Argument(help: volumeOrFirstHelp)
    var volumeArgument: String

    @Argument(
        help: ArgumentHelp(
            "An existing, empty directory to mount on (-o nonempty allows one with files), or /dev/fd/N.",
            discussion:
                "/dev/fd/N: a /dev/fuse descriptor this process inherited, already mounted by a supervisor (Apptainer's --fusemount, a root helper); the supervisor chose the mount options and unmounts it.",
            valueName: "mountpoint"
        ))
    var mountPointArgument: String?

    /// The META-URL: the first argument, or `STAGEFS_VOLUME` when only the mountpoint is given.
    var metaURL: String { mountPointArgument == nil ? defaultVolume() ?? "" : volumeArgument }
    var mountPoint: String { mountPointArgument ?? volumeArgument }

    @Flag(name: [.customShort("d"), .customLong("background")], help: "Run in the background; return once the mount is ready.")
    var background = false

    @Option(name: .customShort("o"), help: "FUSE mount options, comma-separated (allow_other, allow_root, ro, ...). May be repeated.")
    var options: [String] = []

    @Flag(help: "Mount read-only (same as -o ro).")
    var readOnly = false

    @Option(help: "Log file when running in the background (default ~/.stagefs/stagefs.log, /var/log/stagefs.log for root).")
    var log: String?

    @Option(help: "S3 access key to use instead of the one recorded at format time.")
    var accessKey: String?

    @Option(help: "S3 secret key to use instead of the one recorded at format time.")
    var secretKey: String?

    @Option(help: "Seconds attributes are cached (in the kernel and in the client).")
    var attrCache: Double = 1

    @Option(help: "Seconds entries naming files are cached (in the kernel and in the client).")
    var entryCache: Double = 1

    @Option(help: "Seconds entries naming directories are cached (in the kernel and in the client).")
    var dirEntryCache: Double = 1

    @Option(
        help:
            "Node-local cache directories, colon-separated; blocks go to <dir>/<uid>/<volume uuid>/ (default ~/.stagefs/cache, /var/cache/stagefs for root)."
    )
    var cacheDir: String?

    @Option(help: "MiB of blocks the disk cache may hold (0 disables it).")
    var cacheSize = 102400

    @Option(help: "Fraction of the cache file system to keep free (blocks are evicted to keep it).")
    var freeSpaceRatio = 0.1

    @Option(help: "MiB of written data buffered in memory before writers wait.")
    var bufferSize = 300

    @Option(help: "MiB of blocks kept in memory for reads.")
    var memoryCacheSize = 64

    @Flag(
        help:
            "Keep the full blocks this mount writes in the disk cache too. By default only smaller ones are kept (a small file's, a file's last block): a big write, a checkpoint, would otherwise push out of the cache the data jobs are reading (JuiceFS's --cache-large-write)."
    )
    var cacheLargeWrite = false

    @Flag(
        help:
            "Turn extended attributes off on this mount: their calls fail with EOPNOTSUPP and the kernel stops asking (JuiceFS's default). `ls -l` asks every file's security.selinux, one trip to the mount each when they are on; with them off it asks nothing."
    )
    var noXattr = false

    @OptionGroup var io: IOOptions

    @Flag(
        help: ArgumentHelp(
            "Redis volumes: answer lookups and stats of what the mount read or wrote before from its cache, kept coherent by Redis's client tracking (Redis keeps a record of the keys each such mount read; what a gateway does by default)."
        ))
    var trackedCache = false

    @Option(
        help: ArgumentHelp(
            "Show only this directory of the volume (a path inside it, such as /team-a): the mount's root is that directory, and its '..' is itself.",
            discussion:
                "A view, not a wall: what a user may read and change is decided by permissions (and, through a gateway, by the gateway), as in the whole volume.",
            valueName: "dir"))
    var subdir: String?

    @Option(help: "Seconds between session heartbeats.")
    var heartbeat: Double = 10

    @Option(
        help: ArgumentHelp(
            "Back up the volume's metadata into its bucket this often (1h when not given; 0: never).",
            discussion:
                "One mount of the volume at a time takes the backup (a lease in the metadata); see 'stagefs backup --help'. Without this option a volume whose dump would take more than a quarter of the hour is skipped, with a line in the log; given, it is backed up whatever its size. Mounts through a gateway and read-only mounts take none.",
            valueName: "duration"))
    var backupMeta: DurationArg?

    @Option(
        help: ArgumentHelp(
            "Serve Prometheus metrics on this address: HOST:PORT, or PORT for 127.0.0.1:PORT (none when not given).",
            discussion:
                "Anyone on the node who can reach the address can read the metrics (counts and latencies, no names or data). Without it, 'stagefs stats MOUNTPOINT' still shows them to the mount's user, through a socket only that user can open.",
            valueName: "address"))
    var metrics: String?

    @Flag(name: .shortAndLong, help: "Log more (info level); twice for debug.")
    var verbose: Int

    @Option(help: .hidden)
    var readyFD: Int32?

    /// Set by `-d` for the process it starts: the `--secret-key` is in its environment
    /// (`Mount.secretKeyVariable`), not its arguments.
    @Flag(help: .hidden)
    var secretKeyInEnvironment = false

    static let secretKeyVariable = "STAGEFS_MOUNT_SECRET_KEY"

    /// The S3 secret key given to this mount, if any.
    private var givenSecretKey: String? {
        if secretKeyInEnvironment { return getenv(Mount.secretKeyVariable).map { String(cString: $0) } }
        return secretKey
    }

    func validate() throws {
        if mountPointArgument == nil && defaultVolume() == nil {
            throw ValidationError("give the volume's META-URL before the mountpoint, or set STAGEFS_VOLUME ('module load fs-client' sets it)")
        }
        if attrCache < 0 || entryCache < 0 || dirEntryCache < 0 { throw ValidationError("cache timeouts cannot be negative") }
        if bufferSize < 16 { throw ValidationError("--buffer-size must be at least 16 (MiB)") }
        if heartbeat <= 0 { throw ValidationError("--heartbeat must be positive") }
        if cacheSize < 0 { throw ValidationError("--cache-size cannot be negative") }
        if freeSpaceRatio < 0 || freeSpaceRatio >= 1 { throw ValidationError("--free-space-ratio must be from 0 to below 1") }
        if let d = cacheDir, d.split(separator: ":").contains(where: { !$0.hasPrefix("/") && !$0.hasPrefix("~") }) {
            throw ValidationError("--cache-dir takes absolute directories, colon-separated")
        }
    }

    private var cacheDirs: [String] { cacheDirectories(cacheDir) }

    /// Mount options split into kernel options and the ones StageFS handles itself.
    private var parsedOptions: (fuse: [String], readOnly: Bool, debug: Bool, nonempty: Bool) {
        var fuse: [String] = []
        var ro = readOnly
        var debug = false
        var nonempty = false
        var othersAllowed = getuid() == 0 && premountedFD == nil
        for group in options {
            for o in group.split(separator: ",").map(String.init) where !o.isEmpty {
                switch o {
                case "ro": ro = true
                case "rw": ro = false
                case "debug": debug = true
                case "nonempty": nonempty = true
                case "noallow_other": othersAllowed = false
                case "allow_other", "allow_root":
                    othersAllowed = false
                    fuse.append(o)
                case "_netdev", "defaults", "auto", "noauto", "user", "nouser", "nofail": continue
                default: fuse.append(o)
                }
            }
        }
        // A root mount is the node's mount for every user (see the help).
        if othersAllowed { fuse.append("allow_other") }
        if ro { fuse.append("ro") }
        return (fuse, ro, debug, nonempty)
    }

    /// N of a `/dev/fd/N` mountpoint.
    private var premountedFD: Int32? {
        guard mountPoint.hasPrefix("/dev/fd/"), let n = Int32(mountPoint.dropFirst(8)), n >= 0 else { return nil }
        return n
    }

    /// The mountpoint as an absolute path (a `/dev/fd/N` stays as given).
    private var resolvedMountPoint: String { premountedFD != nil ? mountPoint : absolutePath(mountPoint) }

    /// Checks a `/dev/fd/N` mountpoint: an open descriptor of /dev/fuse.
    private func checkPremounted(_ fd: Int32) throws(FSError) {
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            throw FSError(
                EBADF,
                "\(mountPoint): descriptor \(fd) is not open in this process: /dev/fd/N must be a /dev/fuse descriptor passed by the program that mounted it"
            )
        }
        guard st.st_mode & S_IFMT == S_IFCHR, let fuse = Sys.stat("/dev/fuse"), st.st_rdev == fuse.st_rdev else {
            throw FSError(EINVAL, "\(mountPoint): descriptor \(fd) is not /dev/fuse: the program that mounted it must pass its /dev/fuse descriptor")
        }
    }

    /// Whether a directory has entries other than . and .. (unreadable ones count as empty:
    /// fusermount3 decides then).
    private static func hasEntries(_ path: String) -> String? {
        guard let d = opendir(path) else { return nil }
        defer { closedir(d) }
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name != "." && name != ".." { return name }
        }
        return nil
    }

    func run() throws {
        if let second = mountPointArgument, second.contains("://") && !volumeArgument.contains("://") {
            throw FSError.usage("the META-URL comes first, then the mountpoint: stagefs mount \(second) \(volumeArgument)")
        }
        Log.level = verbose >= 2 ? .debug : (verbose == 1 ? .info : .warning)
        // Before anything counts: a metric made before this would stay silent.
        Telemetry.start()
        _ = try metricsAddress(metrics)
        let path = resolvedMountPoint
        if let fd = premountedFD {
            try checkPremounted(fd)
        } else {
            guard let st = Sys.stat(path) else {
                throw FSError(ENOENT, "mountpoint \(path) does not exist: create the directory first")
            }
            guard st.st_mode & S_IFMT == S_IFDIR else { throw FSError(ENOTDIR, "mountpoint \(path) is not a directory") }
            if MountTable.stagefs(at: path) != nil { throw FSError(EBUSY, "\(path) is already a StageFS mount") }
            if access(path, W_OK) != 0 && getuid() != 0 {
                throw FSError(EACCES, "mountpoint \(path) is not writable by uid \(getuid()): fusermount3 refuses to mount there")
            }
            if !parsedOptions.nonempty, let name = Mount.hasEntries(path) {
                throw FSError(
                    ENOTEMPTY,
                    "mountpoint \(path) is not empty (it holds '\(name)'): its files would be hidden while mounted; use an empty directory, or -o nonempty to mount over them"
                )
            }
        }

        // Check everything that can be checked before going to the background.
        let url = try metaURLArgument(metaURL)
        let meta = try openEngine(url, retryTimeout: io.metaTimeout, tracking: trackedCache)
        warnIfVolatile(meta)
        let format = try meta.requireFormat()
        let top = try subdirTop(meta)
        var storeConfig = io.storeConfig(format, accessKey: accessKey, secretKey: givenSecretKey)
        // (Blocks of a directory bucket reach its disk at fsync and every second, not each at once.)
        storeConfig.deferSync = true
        let store = try openStore(meta, storeConfig)
        if let local = store as? LocalObjectStore {
            let ro = parsedOptions.readOnly
            if let problem = local.accessProblem(volume: format.name, write: false) {
                throw FSError(EACCES, "\(problem): this user cannot read the volume's data; \(sharingHint(local, format, readable: false))")
            }
            if !ro, let problem = local.accessProblem(volume: format.name) {
                throw FSError(EACCES, "\(problem): this user's writes to the volume would fail; \(sharingHint(local, format, readable: true))")
            }
        }
        // Through a gateway the gateway checked its bucket; the user has nothing to probe with.
        if !throughGateway(meta) {
            try probe(store, format)
        }

        try finishMount(url: url, meta: meta, format: format, store: store, top: top)
    }

    /// The inode of `--subdir` (a directory this user may enter), or the volume's root.
    private func subdirTop(_ meta: any MetadataEngine) throws(FSError) -> Ino {
        guard let subdir else { return rootIno }
        guard subdir.hasPrefix("/") else { throw FSError.usage("--subdir takes a path inside the volume from its root, such as /\(subdir)") }
        let (ino, a) = try lookupPath(meta, subdir, processCredential(), what: "--subdir \(subdir)")
        guard a.type == .directory else { throw FSError(ENOTDIR, "--subdir \(subdir) is not a directory") }
        try Posix.check(a, processCredential(), .execute)
        return ino
    }

    /// Proves the bucket works for this user before going to the background.
    private func probe(_ store: any ObjectStore, _ format: VolumeFormat) throws(FSError) {
        do {
            if parsedOptions.readOnly {
                _ = try store.list(prefix: format.name + "/", limit: 1)
            } else {
                try store.check(prefix: format.name)
            }
        } catch {
            if error.code == EACCES, let local = store as? LocalObjectStore {
                throw FSError(EACCES, "\(error.message); \(sharingHint(local, format, readable: true))")
            }
            // Wrong credentials or a missing bucket are the user's to fix; an unreachable store may
            // come back, and data staged in the cache can be read meanwhile.
            if error.code != EIO { throw error }
            // Once: on the terminal, and (in the background) in the mount's log, which is its stderr.
            printError("stagefs: warning: \(error.message); only cached data is readable until it is back")
        }
    }

    /// What to do about a `file` bucket this user cannot write.
    private func sharingHint(_ local: LocalObjectStore, _ format: VolumeFormat, readable: Bool) -> String {
        let redacted = (try? MetaURL.parse(metaURL)).map { "\($0)" } ?? "META-URL"
        let bucketGroup = Sys.stat(local.root).flatMap { getgrgid($0.st_gid) }.map { String(cString: $0.pointee.gr_name) }
        let group = local.isShared ? bucketGroup ?? "GROUP" : "GROUP"
        let readOnly = readable ? "; or mount with -o ro to only read" : ""
        if local.isShared, let st = Sys.stat(local.root), !processCredential().groups.contains(st.st_gid) && getgid() != st.st_gid {
            return "uid \(getuid()) is not in the bucket's group \(group): ask to be added (then log in again)\(readOnly)"
        }
        return
            "for a bucket that several users use, root runs 'stagefs format \(redacted) \(format.name) --bucket \(local.root) --bucket-group \(group)' (it also repairs what was written before)\(readOnly)"
    }

    /// Goes to the background (with -d) or serves the mount here.
    private func finishMount(url: MetaURL, meta: any MetadataEngine, format: VolumeFormat, store: any ObjectStore, top: Ino) throws {
        let path = resolvedMountPoint
        if background && readyFD == nil {
            try spawnBackground(path, url)
            return
        }
        try serve(path: path, url: url, meta: meta, format: format, store: store, top: top)
    }

    /// Starts this command again in its own session without -d and waits for its readiness line.
    private func spawnBackground(_ path: String, _ url: MetaURL) throws {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw FSError.errno(errno, "pipe") }
        _ = fcntl(fds[0], F_SETFD, FD_CLOEXEC)
        let logPath = log ?? (getuid() == 0 ? "/var/log/stagefs.log" : "\(homeDirectory())/.stagefs/stagefs.log")
        try Sys.mkdirs(Sys.dirname(of: logPath), 0o755)
        var args = Array(CommandLine.arguments.dropFirst()).filter { $0 != "-d" && $0 != "--background" }
        // Secrets go to the mount process through its environment, never its arguments (which
        // every user of the node can read): the META-URL without its password, the password as
        // META_PASSWORD, a --secret-key as Mount.secretKeyVariable.
        var env = Secrets.childEnvironment(for: url)
        if url.hasPassword, let i = args.firstIndex(of: metaURL) { args[i] = url.withoutPassword }
        if let key = secretKey {
            var kept: [String] = []
            var skip = false
            for a in args {
                if skip {
                    skip = false
                } else if a == "--secret-key" {
                    skip = true
                } else if !a.hasPrefix("--secret-key=") {
                    kept.append(a)
                }
            }
            args = kept + ["--secret-key-in-environment"]
            env = Secrets.environment(env ?? Spawn.currentEnvironment(), setting: Mount.secretKeyVariable, to: key)
        }
        args += ["--ready-fd", "\(fds[1])"]
        if verbose == 0 { args.append("--verbose") }
        // The log is opened here, so that one this user cannot write is named as the cause.
        let logFD = open(logPath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        if logFD < 0 {
            let e = errno
            close(fds[0])
            close(fds[1])
            throw FSError(e, "cannot open the log file \(logPath): \(String(cString: strerror(e))) (give --log FILE where uid \(getuid()) can write)")
        }
        defer { close(logFD) }
        let pid: pid_t
        do {
            pid = try Spawn.start(
                executablePath(), args, env: env, stdin: .null, stdout: .fd(logFD), stderr: .fd(logFD), newSession: true,
                keepFDs: [fds[1]] + (premountedFD.map { [$0] } ?? []))
        } catch {
            close(fds[0])
            close(fds[1])
            throw error
        }
        close(fds[1])
        var got: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = buf.withUnsafeMutableBytes { read(fds[0], $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            got += buf[0..<n]
        }
        close(fds[0])
        // Warnings of the mount process (one a line), then "ok" or "error: REASON".
        var lines = String(decoding: got, as: UTF8.self).split(separator: "\n").map { String($0).trimmed }
        while let w = lines.first, w.hasPrefix("warning: ") {
            printError("stagefs: \(w)")
            lines.removeFirst()
        }
        let line = lines.joined(separator: " ")
        if line.hasPrefix("ok") {
            print("stagefs: mounted at \(path) (pid \(pid), log \(logPath))")
            return
        }
        _ = Spawn.poll(pid)
        if line.hasPrefix("error: ") { throw FSError(EIO, String(line.dropFirst(7))) }
        throw FSError(EIO, "the mount process exited before the mount was ready; see \(logPath)")
    }

    private func ready(_ message: String) {
        guard let fd = readyFD else { return }
        let line = message + "\n"
        _ = line.withCString { write(fd, $0, strlen($0)) }
        close(fd)
    }

    private func serve(path: String, url: MetaURL, meta: any MetadataEngine, format: VolumeFormat, store: any ObjectStore, top: Ino) throws {
        let opts = parsedOptions
        // The metrics port first: one that cannot be had fails the mount before it is made.
        let metricsServer: MetricsServer
        let metricsLabels: [String]
        let metricsWarning: String?
        do {
            (metricsServer, metricsLabels, metricsWarning) = try startMetrics(try metricsAddress(metrics))
        } catch {
            ready("error: \(error.message)")
            throw error
        }
        var fc = FuseConfig()
        fc.attrTimeout = attrCache
        fc.entryTimeout = entryCache
        fc.dirEntryTimeout = dirEntryCache
        fc.options = opts.fuse
        fc.debug = opts.debug
        fc.fsName = "stagefs:\(format.name)"
        fc.xattrs = !noXattr
        let server = FuseServer(mountPoint: path, config: fc)
        do {
            try server.mount()
        } catch {
            ready("error: \(error.message)")
            throw error
        }
        var dc = DataConfig()
        dc.bufferSize = bufferSize << 20
        dc.memoryCacheSize = memoryCacheSize << 20
        dc.cacheLargeWrites = cacheLargeWrite
        var disk: DiskCache?
        var warnings: [String] = []
        if let metricsWarning {
            Log.warning(metricsWarning)
            warnings.append(metricsWarning)
        }
        if cacheSize > 0 {
            do {
                disk = try DiskCache(
                    config: DiskCacheConfig(dirs: cacheDirs, capacity: cacheSize << 20, freeSpaceRatio: freeSpaceRatio), volumeUUID: format.uuid)
            } catch {
                if cacheDir != nil {
                    server.abandon()
                    ready("error: \(error.message)")
                    throw error
                }
                // The default location is a convenience: without it the mount still works, and
                // the user hears of it on the terminal (not only in the log).
                let why =
                    "\(error.message); running without a disk cache (blocks are kept in memory only): give --cache-dir DIR, or --cache-size 0 to mean it"
                Log.warning(why)
                warnings.append(why)
            }
        }
        let data = DataStore(ledger: MetadataLedger(meta), store: store, format: format, config: dc, disk: disk)
        var vc = VFSConfig()
        vc.readOnly = opts.readOnly
        vc.heartbeat = heartbeat
        vc.attrCache = attrCache
        vc.entryCache = entryCache
        vc.dirEntryCache = dirEntryCache
        vc.mountPoint = path
        vc.version = stageFSVersion
        vc.top = top
        vc.xattrs = !noXattr
        let vfs = VFS(meta: meta, data: data, config: vc)
        do {
            try vfs.start()
        } catch {
            server.abandon()
            ready("error: \(error.message)")
            throw error
        }
        server.attach(vfs)
        // From here a stop signal ends the mount cleanly, also before the loop runs.
        FuseServer.noteStopSignals()
        registerMountGauges(vfs)
        var socket: String?
        if premountedFD == nil, let (dir, dirPath) = Runtime.directory(create: true) {
            let name = Runtime.socketName(path)
            do {
                try metricsServer.listenUnix(dir: dir, name: name, label: "\(dirPath)/\(name)")
                socket = name
            } catch {
                Log.warning("no metrics socket for 'stagefs stats': \(error.message)")
            }
            close(dir)
        }
        metricsServer.start()
        if !metricsLabels.isEmpty { Log.info("metrics on http://\(metricsLabels.joined(separator: ", http://"))/metrics") }
        if premountedFD == nil {
            Runtime.save(
                MountRecord(
                    mountPoint: path, metaURL: url.withoutPassword, pid: getpid(), volume: format.name, volumeUUID: format.uuid,
                    cacheDirs: disk == nil ? nil : cacheDirs, cacheSize: disk == nil ? 0 : cacheSize, freeSpaceRatio: freeSpaceRatio,
                    passwordNeeded: url.hasPassword, startTime: ProcFacts.startTime(getpid()), subdir: subdir, metricsSocket: socket,
                    metricsAddress: metricsLabels.first))
        }
        Log.info("volume '\(format.name)' mounted at \(path) (session \(vfs.sid))")
        if readyFD == nil {
            for w in warnings { printError("stagefs: warning: \(w)") }
        }
        ready((warnings.map { "warning: " + $0.split(separator: "\n").joined(separator: " ") } + ["ok"]).joined(separator: "\n"))
        let backups =
            opts.readOnly
            ? nil
            : startBackups(
                url: url, meta: meta, store: store, volume: format.name, every: backupMeta?.seconds ?? 3600, explicit: backupMeta != nil,
                holder: { vfs.sid })
        let rc = server.run()
        let started = Sys.monotonicNanos()
        Log.info("unmounting \(path) (loop ended with \(rc)): flushing buffered writes")
        backups?.stop()
        metricsServer.stop()
        vfs.stop()
        Runtime.remove(path, pid: getpid())
        Log.info(
            "unmounted \(path): buffered writes flushed and the session closed in \(Double((Sys.monotonicNanos() - started) / 1_000_000) / 1000) s")
    }
}
