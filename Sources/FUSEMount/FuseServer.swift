import CFuse3
import StageFSCore
import Synchronization
import VFS

#if canImport(Glibc)
    import Glibc
#endif

/// Mount settings of the FUSE adapter.
public struct FuseConfig: Sendable {
    /// Seconds the kernel may cache attributes and directory entries.
    public var attrTimeout: Double = 1
    public var entryTimeout: Double = 1
    /// Seconds the kernel caches entries that name directories.
    public var dirEntryTimeout: Double = 1
    /// Options passed to the kernel/fusermount3 (`allow_other`, `allow_root`, `ro`, ...).
    public var options: [String] = []
    public var fsName = "stagefs"
    public var maxIdleThreads: UInt32 = 16
    public var debug = false
    /// Whether extended attributes are served. When off, their operations are left unanswered
    /// (`ENOSYS`), so the kernel stops asking and applications get `EOPNOTSUPP`.
    public var xattrs = true

    public init() {}
}

/// The libfuse3 low-level adapter: one `fuse_session` whose callbacks (capture-free global
/// functions) reach this object through the session's userdata, an unretained pointer kept
/// valid because `run` holds a strong reference until the loop ends.
public final class FuseServer: @unchecked Sendable {
    private var attached: VFS?
    let config: FuseConfig
    private var session: OpaquePointer?
    public let mountPoint: String

    /// The mount is made before the VFS starts its threads (libfuse forks fusermount3), so the
    /// VFS is attached afterwards, before `run`.
    public init(mountPoint: String, config: FuseConfig) {
        self.mountPoint = mountPoint
        self.config = config
    }

    /// Gives the server the file system to serve; call between `mount` and `run`.
    public func attach(_ vfs: VFS) { attached = vfs }

    var vfs: VFS { attached! }

    /// Creates the session and mounts it (through fusermount3 when not root). The mount is live
    /// when this returns; failures name the reason libfuse or the kernel gave.
    public func mount() throws(FSError) {
        FuseLog.install()
        var ops = fuse_lowlevel_ops()
        fillOperations(&ops)
        if !config.xattrs {
            ops.setxattr = nil
            ops.getxattr = nil
            ops.listxattr = nil
            ops.removexattr = nil
        }
        var opts = ["default_permissions", "fsname=\(config.fsName)", "subtype=stagefs"]
        opts += config.options
        let args = cfuse3_args_new()
        defer { cfuse3_args_free(args) }
        _ = cfuse3_args_add(args, "stagefs")
        _ = cfuse3_args_add(args, "-o")
        _ = cfuse3_args_add(args, opts.joined(separator: ","))
        if config.debug { _ = cfuse3_args_add(args, "-d") }
        FuseLog.reset()
        let ctx = Unmanaged.passUnretained(self).toOpaque()
        guard let se = fuse_session_new(args, &ops, MemoryLayout<fuse_lowlevel_ops>.size, ctx) else {
            throw FSError(EINVAL, "cannot mount: \(FuseLog.last ?? "invalid mount options \(opts.joined(separator: ","))")")
        }
        if fuse_session_mount(se, mountPoint) != 0 {
            fuse_session_destroy(se)
            throw FSError(EIO, "cannot mount \(mountPoint): \(FuseLog.last ?? "fuse_session_mount failed")")
        }
        session = se
    }

    /// Notes SIGTERM, SIGINT and SIGHUP from now until `run` installs the loop's own handlers:
    /// one that comes meanwhile (an epilog ending a job the moment its mount was ready) ends the
    /// loop at once, with the unmount and flush that follow, instead of killing the process.
    /// (Only signals left to their default action: libfuse installs its handlers only over
    /// those, and `run` hands them back to it.)
    public static func noteStopSignals() {
        notedSignals.withLock { noted in
            for s in [SIGTERM, SIGINT, SIGHUP] where !noted.contains(s) {
                var old = sigaction()
                guard sigaction(s, nil, &old) == 0, old.__sigaction_handler.sa_handler == nil, old.sa_flags & SA_SIGINFO == 0 else { continue }
                signal(s) { _ in stopSignalled.store(true, ordering: .relaxed) }
                noted.append(s)
            }
        }
    }

    /// Serves requests until unmounted or signalled (SIGTERM, SIGINT, SIGHUP), then unmounts;
    /// from then on those signals are ignored, so the flush that follows runs to its end.
    public func run() -> Int32 {
        guard let se = session, attached != nil else { return -1 }
        let rc = withExtendedLifetime(self) { () -> Int32 in
            // The signals noted since the mount was ready go back to libfuse's handlers (a
            // signal after this reaches them, and they end the loop).
            notedSignals.withLock { noted in
                for s in noted { signal(s, SIG_DFL) }
                noted.removeAll()
            }
            _ = fuse_set_signal_handlers(se)
            let rc = stopSignalled.load(ordering: .relaxed) ? 0 : cfuse3_session_loop_mt(se, config.maxIdleThreads)
            fuse_remove_signal_handlers(se)
            // The loop has ended and buffered writes are flushed next: a further SIGTERM (an
            // epilog that asks every mount process of a job to finish) must not cut that short.
            // SIGKILL still stops the process at once.
            signal(SIGTERM, SIG_IGN)
            signal(SIGINT, SIG_IGN)
            signal(SIGHUP, SIG_IGN)
            return rc
        }
        fuse_session_unmount(se)
        fuse_session_destroy(se)
        session = nil
        return rc
    }

    /// Drops what the kernel keeps of `ino` (its attributes and every cached page), so the next
    /// read and stat ask the mount. Called from a request's handler, while the loop runs.
    func forgetKernelCache(_ ino: Ino) {
        if let se = session { _ = fuse_lowlevel_notify_inval_inode(se, ino, 0, 0) }
    }

    /// Asks the loop to stop (from another thread).
    public func exit() {
        if let se = session { fuse_session_exit(se) }
    }

    /// Unmounts and frees a session that was mounted but will not run.
    public func abandon() {
        guard let se = session else { return }
        fuse_session_unmount(se)
        fuse_session_destroy(se)
        session = nil
    }
}

/// Captures libfuse's log lines so that mount failures can be reported in one clear line.
enum FuseLog {
    nonisolated(unsafe) private static var lastMessage: String?
    /// A line libfuse is still writing in pieces (it logs some messages a word at a time).
    nonisolated(unsafe) private static var partial = ""
    private static let lock = ConditionLock()

    static func install() {
        fuse_set_log_func(fuseLogLine)
    }

    static func reset() {
        lock.withLock {
            lastMessage = nil
            partial = ""
        }
    }

    /// The last whole line libfuse logged (or what it has written of one).
    static var last: String? { lock.withLock { lastMessage ?? (partial.isEmpty ? nil : Self.readable(partial)) } }

    fileprivate static func record(_ piece: String) {
        let line = lock.withLock { () -> String? in
            partial += piece
            guard partial.hasSuffix("\n") else { return nil }
            var s = partial
            partial = ""
            while s.hasSuffix("\n") { s.removeLast() }
            s = readable(s)
            lastMessage = s
            return s
        }
        if let line { Log.info("libfuse: \(line)") }
    }

    /// libfuse's wording, made to name what the user typed.
    static func readable(_ line: String) -> String {
        var s = line
        if s.hasPrefix("fuse: ") { s.removeFirst(6) }
        // "unknown option(s): `-o bogusopt'"
        let unknown = "unknown option(s): `"
        if s.hasPrefix(unknown) {
            var opts = String(s.dropFirst(unknown.count))
            if opts.hasSuffix("'") { opts.removeLast() }
            let names = opts.split(separator: " ").filter { $0 != "-o" }.flatMap { $0.split(separator: ",") }.map(String.init)
            return
                "unknown mount option\(names.count == 1 ? "" : "s") \(names.map { "'\($0)'" }.joined(separator: ", ")) (see 'stagefs mount --help' and mount.fuse3(8) for the options)"
        }
        return s
    }
}

private func fuseLogLine(_ level: fuse_log_level, _ fmt: UnsafePointer<CChar>?, _ ap: CVaListPointer?) {
    guard let fmt, let ap else { return }
    var buf = [CChar](repeating: 0, count: 1024)
    _ = vsnprintf(&buf, 1024, fmt, ap)
    FuseLog.record(String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))
}

/// Whether a stop signal came before the loop's handlers were installed (`noteStopSignals`),
/// and which signals it noted.
private let stopSignalled = Atomic<Bool>(false)
private let notedSignals = Mutex<[Int32]>([])
