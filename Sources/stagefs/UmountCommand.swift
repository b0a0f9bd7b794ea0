import ArgumentParser
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

struct Umount: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Unmount a StageFS mount and wait for its process to flush and exit.",
        discussion: """
            A busy mount (files still open) is not unmounted unless --force: then it is detached \
            lazily, its FUSE connection aborted when root, and its mount process stopped.
            """
    )

    @Argument(help: "The mountpoint.")
    var mountPoint: String

    @Flag(help: "Detach even if busy or dead (lazy unmount, abort the connection).")
    var force = false

    @Option(help: "Seconds to wait for the mount process to exit.")
    var wait: Double = 60

    func run() throws {
        var path = mountPoint
        if !path.hasPrefix("/") { path = absolutePath(path) }
        while path.count > 1 && path.hasSuffix("/") { path.removeLast() }
        if Sys.stat(path) != nil { path = absolutePath(path) }
        guard let info = MountTable.stagefs(at: path) else {
            throw FSError(EINVAL, "\(path) is not a StageFS mount")
        }
        let record = Runtime.load(path)
        guard let fusermount = Spawn.which("fusermount3") ?? Spawn.which("/bin/fusermount3") else {
            throw FSError(ENOENT, "fusermount3 is not installed (Debian package fuse3)")
        }
        let (status, output) = try Spawn.run(fusermount, force ? ["-u", "-z", path] : ["-u", path])
        if status != 0 {
            let why = output.trimmed
            if why.contains("busy") {
                throw FSError(EBUSY, "cannot unmount \(path): files are still open (close them, or use --force for a lazy unmount)")
            }
            throw FSError(EIO, "cannot unmount \(path): \(why.isEmpty ? "fusermount3 failed" : why)")
        }
        if force {
            abortConnection(device: info.device)
            if let pid = record?.pid, kill(pid, 0) == 0 { kill(pid, SIGTERM) }
        }
        if let pid = record?.pid {
            let deadline = Sys.monotonicNanos() + UInt64(wait * 1e9)
            while kill(pid, 0) == 0 && Sys.monotonicNanos() < deadline { Sys.sleep(seconds: 0.05) }
            if kill(pid, 0) == 0 {
                if force {
                    kill(pid, SIGKILL)
                } else {
                    throw FSError(ETIMEDOUT, "\(path) is unmounted but its process \(pid) is still flushing after \(Int(wait)) s")
                }
            }
        }
        Runtime.remove(path)
    }

    /// Writes to /sys/fs/fuse/connections/<minor>/abort (root only; harmless otherwise).
    private func abortConnection(device: String) {
        guard getuid() == 0, let minor = device.split(separator: ":").last else { return }
        let fd = open("/sys/fs/fuse/connections/\(minor)/abort", O_WRONLY)
        if fd >= 0 {
            _ = write(fd, "1", 1)
            close(fd)
        }
    }
}
