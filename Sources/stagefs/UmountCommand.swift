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
        // The mount process, held before the unmount so that its exit can be awaited: the
        // record's pid only when it is shown to be this user's mount process for the path.
        let process = MountProcess.find(serving: path, record: Runtime.load(path))
        guard let fusermount = Spawn.which("fusermount3") ?? Spawn.which("/bin/fusermount3") else {
            throw FSError(ENOENT, "fusermount3 is not installed (Debian package fuse3)")
        }
        let (status, output) = try Spawn.run(fusermount, force ? ["-u", "-z", path] : ["-u", path], timeout: 60)
        if status != 0 {
            let why = output.trimmed
            if why.contains("busy") {
                if let (pid, name, how) = Umount.holder(of: path) {
                    throw FSError(
                        EBUSY,
                        "cannot unmount \(path): \(how) of process \(pid) (\(name)) is inside it: \(how.hasPrefix("the working") ? "leave it (cd elsewhere) or end that process" : "close it or end that process") (or use --force for a lazy unmount)"
                    )
                }
                throw FSError(
                    EBUSY,
                    "cannot unmount \(path): it is in use (an open file or a working directory inside; close them, or use --force for a lazy unmount)"
                )
            }
            throw FSError(EIO, "cannot unmount \(path): \(why.isEmpty ? "fusermount3 failed" : why)")
        }
        if force {
            abortConnection(device: info.device)
            process?.signal(SIGTERM)
        }
        if let process, !process.waitExit(seconds: wait) {
            if force {
                process.signal(SIGKILL)
            } else {
                throw FSError(ETIMEDOUT, "\(path) is unmounted but its process \(process.pid) is still flushing after \(Int(wait)) s")
            }
        }
        Runtime.remove(path)
    }

    /// A process of this node keeping `path` busy (its working directory, root or an open file
    /// inside), among those whose /proc entries this user may read.
    static func holder(of path: String) -> (pid_t, String, String)? {
        let inside = { (p: String) in p == path || p.hasPrefix(path + "/") }
        let link = { (p: String) -> String? in
            var buf = [UInt8](repeating: 0, count: Int(PATH_MAX))
            let n = buf.withUnsafeMutableBytes { readlink(p, $0.baseAddress!.assumingMemoryBound(to: CChar.self), $0.count) }
            return n > 0 ? String(decoding: buf[0..<n], as: UTF8.self) : nil
        }
        guard let d = opendir("/proc") else { return nil }
        defer { closedir(d) }
        var found: (pid_t, String, String)?
        while found == nil, let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            guard let pid = pid_t(name), pid != getpid() else { continue }
            let comm = Sys.readFile("/proc/\(pid)/comm").map { String(decoding: $0, as: UTF8.self).trimmed } ?? "?"
            if let cwd = link("/proc/\(pid)/cwd"), inside(cwd) {
                found = (pid, comm, "the working directory \(cwd)")
            } else if let root = link("/proc/\(pid)/root"), root != "/", inside(root) {
                found = (pid, comm, "the root directory \(root)")
            } else if let fds = opendir("/proc/\(pid)/fd") {
                while let f = readdir(fds) {
                    let fd = withUnsafeBytes(of: f.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                    if let target = link("/proc/\(pid)/fd/\(fd)"), inside(target) {
                        found = (pid, comm, "the open file \(target)")
                        break
                    }
                }
                closedir(fds)
            }
        }
        return found
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
