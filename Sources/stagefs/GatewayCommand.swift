import ArgumentParser
import Gateway
import Metadata
import ObjectStorage
import StageFSCore
import Telemetry

#if canImport(Glibc)
    import Glibc
#endif

struct GatewayCmd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "gateway",
        abstract: "Serve a volume to the users of this node without giving them its secrets.",
        discussion: """
            Runs in the foreground as root or a service account (systemd: stagefs-gateway@NAME). It alone holds the
            Redis password and the bucket's keys, read from --config (KEY=VALUE lines: META_URL=redis://:PASSWORD@host:6379/1,
            optionally META_PASSWORD=, ACCESS_KEY=, SECRET_KEY=; the file must be the gateway user's and not readable by
            others) or from the environment (META_URL, META_PASSWORD, META_PASSWORD_FILE), never from arguments.

            Users mount, stage and ask status with the URL stagefs+unix:///path/to/NAME.sock; the gateway knows each caller from the
            kernel (SO_PEERCRED) and its groups from this node's NSS, and runs every operation with that credential.
            Users never delete objects: the gateway deletes what nothing references.

            With --listen HOST:PORT it also serves other nodes over TCP (stagefs://HOST:PORT): each connection proves its
            user with a MUNGE credential made for that connection (munged on both nodes, with the site's key); groups come
            from this node's NSS. Root over TCP acts as nobody (uid and gid 65534, no groups) unless --trust-root. A
            connection that has not authenticated within --auth-timeout seconds is closed. Given --listen alone, the
            gateway serves TCP only; add --socket to serve the Unix socket as well. Clients reach munged at libmunge's
            default socket, or at STAGEFS_MUNGE_SOCKET.

            Like a mount, the gateway backs the volume's metadata up into its bucket every --backup-meta (1h; 0 never; one
            gateway or mount at a time): users mounting through it take none (see 'stagefs backup --help').
            """
    )

    @Option(help: ArgumentHelp("Settings file (KEY=VALUE lines) with the volume's META-URL and secrets.", valueName: "FILE"))
    var config: String?

    @Option(
        help: ArgumentHelp(
            "Unix socket to serve (mode 0666) [default: /run/stagefs/VOLUME.sock, unless only --listen is given].", valueName: "PATH"))
    var socket: String?

    @Option(
        help: ArgumentHelp(
            "Serve TCP on HOST:PORT too ([IPv6]:PORT; 0.0.0.0:PORT for every IPv4 address); clients authenticate with MUNGE. May be repeated.",
            valueName: "HOST:PORT"))
    var listen: [String] = []

    @Flag(help: "Over TCP, let a root credential act as root and for its callers (a root mount with allow_other) instead of as nobody.")
    var trustRoot = false

    @Option(help: ArgumentHelp("munged's socket, to check TCP clients' credentials [default: libmunge's].", valueName: "PATH"))
    var mungeSocket: String?

    @Option(
        help: ArgumentHelp(
            "Serve Prometheus metrics on this address: HOST:PORT, or PORT for 127.0.0.1:PORT (none when not given): requests by operation and their latency, connections, metadata transactions, object requests.",
            valueName: "address"))
    var metrics: String?

    @Option(help: "Connections at once, in all.")
    var maxConnections = 1024

    @Option(help: "Connections at once of one user.")
    var maxConnectionsPerUser = 128

    @Option(help: ArgumentHelp("Seconds a TCP connection has to authenticate before it is closed.", valueName: "SECONDS"))
    var authTimeout: Double = 10

    @Option(help: "TCP connections at once that have not authenticated yet (counted apart from the limits above).")
    var maxUnauthenticated = 64

    @Flag(
        inversion: .prefixedNo,
        help: ArgumentHelp(
            "Answer lookups and stats of what the gateway read or wrote before from its cache, kept coherent by Redis's client tracking (another client's change is seen once Redis's invalidation arrives; not on a Redis Cluster)."
        ))
    var trackedCache = true

    @Option(help: ArgumentHelp("Back up the volume's metadata into its bucket this often (1h when not given; 0: never).", valueName: "duration"))
    var backupMeta: DurationArg?

    @OptionGroup var io: IOOptions

    @Flag(name: .shortAndLong, help: "Log each refused request and more (repeat for debug).")
    var verbose: Int

    func validate() throws {
        if maxConnections < 1 || maxConnectionsPerUser < 1 {
            throw ValidationError("--max-connections and --max-connections-per-user must be at least 1")
        }
        if authTimeout <= 0 || maxUnauthenticated < 1 {
            throw ValidationError("--auth-timeout must be positive and --max-unauthenticated at least 1")
        }
        for l in listen { _ = try TCPAddress.parse(l) }
    }

    func run() throws {
        Log.level = verbose >= 2 ? .debug : (verbose == 1 ? .info : .warning)
        // Before anything counts: a metric made before this would stay silent.
        Telemetry.start()
        let metricsAt = try metricsAddress(metrics)
        let settings = try config.map { (path) throws(FSError) in try GatewaySettings.read(path) } ?? [:]
        func value(_ key: String) -> String? {
            if let v = settings[key], !v.isEmpty { return v }
            return getenv(key).map { String(cString: $0) }.flatMap { $0.isEmpty ? nil : $0 }
        }
        guard let text = value("META_URL") else {
            throw FSError.usage("no META-URL: put META_URL=redis://... in the --config file (or set META_URL in the gateway's environment)")
        }
        var url = try MetaURL.parse(text)
        if case .gateway = url { throw FSError.usage("META_URL names a gateway; a gateway needs the volume's own META-URL") }
        if !url.hasPassword, let p = settings["META_PASSWORD"], !p.isEmpty {
            url = url.with(password: p)
        } else if !url.hasPassword, case .redis = url, let p = try environmentPassword() {
            url = url.with(password: p)
        }
        let meta = try openMetadata(url, retryTimeout: io.metaTimeout, tracking: trackedCache)
        warnIfVolatile(meta)
        let format = try meta.requireFormat()
        let storeConfig = io.storeConfig(format, accessKey: value("ACCESS_KEY"), secretKey: value("SECRET_KEY"))
        let store = try openObjectStore(storeConfig)
        // Users read S3 blocks from URLs the gateway signs for them.
        let presigner = storeConfig.storage == "s3" ? try S3Presigner(storeConfig) : nil
        if let local = store as? LocalObjectStore {
            // Users reach blocks only through the gateway: the directory must be closed to them.
            guard let st = Sys.stat(local.root), st.st_uid == geteuid(), st.st_mode & 0o077 == 0 else {
                throw FSError(
                    EACCES,
                    "the bucket \(local.root) must belong to the gateway's user (uid \(geteuid())) with mode 0700, or users could read every block without the gateway: chown \(geteuid()) \(local.root) && chmod 700 \(local.root)"
                )
            }
        }
        try store.check(prefix: format.name)
        var limits = GatewayLimits()
        limits.connections = maxConnections
        limits.connectionsPerUser = maxConnectionsPerUser
        limits.authSeconds = authTimeout
        limits.unauthenticated = maxUnauthenticated
        let tcp = GatewayTCPOptions(mungeSocket: mungeSocket, trustRoot: trustRoot)
        let server = try GatewayServer(meta: meta, store: store, format: format, limits: limits, tcp: tcp, presigner: presigner)
        let addresses = try listen.map { (l) throws(FSError) in try TCPAddress.parse(l) }
        let (metricsServer, metricsLabels, metricsWarning) = try startMetrics(metricsAt)
        if let metricsWarning { printError("stagefs: warning: \(metricsWarning)") }
        metricsServer.start()
        defer { metricsServer.stop() }
        let path = socket ?? (addresses.isEmpty ? "/run/stagefs/\(format.name).sock" : nil)
        if let path { try Sys.mkdirs(Sys.dirname(of: path), 0o755) }
        let urls = (path.map { ["stagefs+unix://\($0)"] } ?? []) + addresses.map { "\(MetaURL.gateway(.tcp(host: $0.host, port: $0.port)))" }
        let root = addresses.isEmpty ? "" : trustRoot ? " (root over TCP trusted)" : " (root over TCP acts as nobody)"
        printError("stagefs: gateway for volume '\(format.name)' (\(url)) serving \(urls.joined(separator: " and "))\(root)")
        if !metricsLabels.isEmpty { printError("stagefs: gateway metrics on http://\(metricsLabels.joined(separator: ", http://"))/metrics") }
        signal(SIGTERM, gatewaySignal)
        signal(SIGINT, gatewaySignal)
        // (Its lease holder: a number of its own, as a mount's is its session.)
        let holder = UInt64.random(in: 1 << 62..<UInt64.max)
        let backups = startBackups(
            url: url, meta: meta, store: store, volume: format.name, every: backupMeta?.seconds ?? 3600, explicit: backupMeta != nil,
            holder: { holder })
        defer { backups?.stop() }
        try server.serve(unixSocket: path, tcp: addresses)
        printError("stagefs: gateway for volume '\(format.name)' stopped")
    }
}

/// SIGTERM, SIGINT: stop after answering what has arrived (`GatewayServer.stopRequested`).
private func gatewaySignal(_ sig: Int32) {
    GatewayServer.stopRequested.store(true, ordering: .relaxed)
}

/// The gateway's settings file: `KEY=VALUE` lines (`#` comments, blank lines, optional quotes),
/// refused unless it is a regular file of the gateway's user that no one else may read or write.
enum GatewaySettings {
    static func read(_ path: String) throws(FSError) -> [String: String] {
        let fd = open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC)
        if fd < 0 { throw FSError.errno(errno, "cannot read the gateway's settings \(path)") }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0, st.st_mode & S_IFMT == S_IFREG, st.st_size <= 65536 else {
            throw FSError(EINVAL, "\(path) is not a regular file of at most 64 KiB")
        }
        guard st.st_uid == geteuid() else {
            throw FSError(EACCES, "\(path) belongs to uid \(st.st_uid), not to the gateway's user (uid \(geteuid())): it holds the volume's secrets")
        }
        guard st.st_mode & 0o077 == 0 else {
            throw FSError(
                EACCES,
                "\(path) has mode 0\(String(st.st_mode & 0o777, radix: 8)): it holds the volume's secrets, so others must have no access (chmod 600 \(path))"
            )
        }
        var buf = [UInt8](repeating: 0, count: Int(st.st_size))
        let n = try Sys.pread(fd, &buf, buf.count, 0, path: path)
        var out: [String: String] = [:]
        for raw in buf[0..<n].split(separator: 10) {
            let line = String(decoding: raw, as: UTF8.self).trimmed
            if line.isEmpty || line.hasPrefix("#") { continue }
            guard let eq = line.firstIndex(of: "=") else { throw FSError(EINVAL, "\(path): a line without '=' (KEY=VALUE lines)") }
            let key = String(line[..<eq]).trimmed.replacingPrefix("export ", with: "")
            var value = String(line[line.index(after: eq)...]).trimmed
            if value.count >= 2, let f = value.first, f == "\"" || f == "'", value.last == f { value = String(value.dropFirst().dropLast()) }
            out[key] = value
        }
        return out
    }
}

extension String {
    fileprivate func replacingPrefix(_ prefix: String, with other: String) -> String {
        hasPrefix(prefix) ? other + dropFirst(prefix.count) : self
    }
}
