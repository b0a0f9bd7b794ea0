import CLinux

#if canImport(Glibc)
    import Glibc
#endif

/// A process held by a pidfd (`pidfd_open(2)`), so that what is checked about a pid read from a
/// file or from /proc and the signal sent afterwards reach the same process. A pid number can be
/// reused once its process is gone; the descriptor cannot: a signal through it reaches that
/// process or nobody. `check` confirms that facts read from `/proc/<pid>` were the held
/// process's own (it was still running after they were read).
public final class ProcessHandle {
    public let pid: pid_t
    private let fd: Int32

    /// Holds `pid`; nil when there is no such process (or `pid` is not a positive number).
    public init?(_ pid: pid_t) {
        guard pid > 0 else { return nil }
        let fd = clinux_pidfd_open(pid)
        if fd < 0 { return nil }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        self.pid = pid
        self.fd = fd
    }

    deinit { Glibc.close(fd) }

    /// Whether the process has exited (a zombie has).
    public var exited: Bool { waitExit(seconds: 0) }

    /// Runs `test` on the process's /proc entries; true when it holds and the process had not
    /// exited once `test` was done (so no other process could have had the number meanwhile).
    public func check(_ test: (pid_t) -> Bool) -> Bool {
        test(pid) && !exited
    }

    /// Sends `sig` to the held process (nothing when it is gone); true when it was sent.
    @discardableResult
    public func signal(_ sig: Int32) -> Bool {
        clinux_pidfd_send_signal(fd, sig) == 0
    }

    /// Waits up to `seconds` for the process to exit; true when it has.
    public func waitExit(seconds: Double) -> Bool {
        let deadline = Sys.monotonicNanos() + UInt64(max(seconds, 0) * 1e9)
        while true {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let now = Sys.monotonicNanos()
            let ms = now >= deadline ? 0 : Int32(min((deadline - now) / 1_000_000 + 1, 1_000_000))
            let r = poll(&p, 1, ms)
            if r > 0 { return true }
            if r < 0 && errno == EINTR { continue }
            if r < 0 || Sys.monotonicNanos() >= deadline { return false }
        }
    }
}

/// Facts about a process read from `/proc/<pid>`, as the caller may see them. Read them through
/// `ProcessHandle.check`, which confirms they were the held process's.
public enum ProcFacts {
    /// The real, effective, saved and file-system uids (the `Uid:` line of `status`).
    public static func uids(_ pid: pid_t) -> [uid_t]? {
        guard let bytes = Sys.readFile("/proc/\(pid)/status") else { return nil }
        for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") where line.hasPrefix("Uid:") {
            let ids = line.dropFirst(4).split(whereSeparator: { $0 == " " || $0 == "\t" }).compactMap { uid_t($0) }
            return ids.count == 4 ? ids : nil
        }
        return nil
    }

    /// The program it runs (the target of `exe`, without the " (deleted)" of a replaced file).
    public static func executable(_ pid: pid_t) -> String? {
        guard var path = readLink("/proc/\(pid)/exe") else { return nil }
        if path.hasSuffix(" (deleted)") { path.removeLast(10) }
        return path
    }

    /// Its arguments (empty once it has exited, also while it is a zombie).
    public static func arguments(_ pid: pid_t) -> [String] {
        guard let cmd = Sys.readFile("/proc/\(pid)/cmdline"), !cmd.isEmpty else { return [] }
        var args = cmd.split(separator: 0, omittingEmptySubsequences: false).map { String(decoding: $0, as: UTF8.self) }
        if args.last == "" { args.removeLast() }
        return args
    }

    /// When it started, in clock ticks since boot (field 22 of `stat`): with the pid, what names
    /// one process for good.
    public static func startTime(_ pid: pid_t) -> UInt64? {
        guard let bytes = Sys.readFile("/proc/\(pid)/stat"), let close = bytes.lastIndex(of: UInt8(ascii: ")")) else { return nil }
        // After "pid (comm)": state is field 3, so start time is the 20th field after the ')'.
        let fields = bytes[(close + 1)...].split(separator: UInt8(ascii: " "))
        return fields.count > 19 ? UInt64(String(decoding: fields[19], as: UTF8.self)) : nil
    }

    /// The inode of its mount namespace (`ns/mnt`): processes of one namespace see one mount table.
    public static func mountNamespace(_ pid: pid_t) -> UInt64? {
        var st = stat()
        return stat("/proc/\(pid)/ns/mnt", &st) == 0 ? UInt64(st.st_ino) : nil
    }

    /// Its working directory.
    public static func workingDirectory(_ pid: pid_t) -> String? { readLink("/proc/\(pid)/cwd") }

    private static func readLink(_ path: String) -> String? {
        var buf = [UInt8](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = buf.withUnsafeMutableBytes { readlink(path, $0.baseAddress!.assumingMemoryBound(to: CChar.self), $0.count) }
        return n > 0 && n < buf.count ? String(decoding: buf[0..<n], as: UTF8.self) : nil
    }
}
