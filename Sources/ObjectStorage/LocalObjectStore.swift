import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// Objects as files under a directory (`--storage file`). Writes go to a temporary name, are
/// flushed to disk (`fdatasync`) and renamed into place, so a reader never sees a torn object and
/// a block reported written survives a crash of the node.
public final class LocalObjectStore: ObjectStore {
    public let root: String
    public var description: String { "directory \(root)" }

    public init(root: String) throws(FSError) {
        guard root.hasPrefix("/") else { throw FSError.usage("the bucket of --storage file must be an absolute directory, not '\(root)'") }
        var r = root
        while r.count > 1 && r.hasSuffix("/") { r.removeLast() }
        self.root = r
    }

    private func path(_ key: String) -> String { "\(root)/\(key)" }

    public func create() throws(FSError) {
        try Sys.mkdirs(root)
    }

    public func put(_ key: String, _ data: UnsafeRawBufferPointer) throws(FSError) {
        let final = path(key)
        let tmp = "\(final).tmp\(Sys.pid)-\(Sys.monotonicNanos() % 1_000_000_007)"
        var fd = Glibc.open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        if fd < 0 && errno == ENOENT {
            // Subdirectories are made as needed, the bucket directory itself never: a missing
            // one is more likely an unmounted shared file system than an empty bucket.
            guard Sys.stat(root) != nil else {
                throw FSError(EIO, "\(description) is missing (is its file system mounted?)")
            }
            try Sys.mkdirs(Sys.dirname(of: final))
            fd = Glibc.open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        }
        if fd < 0 { throw FSError.errno(errno, "cannot write object \(key) in \(description)") }
        do {
            if let base = data.baseAddress, data.count > 0 { try Sys.pwrite(fd, base, data.count, 0, path: tmp) }
            try Sys.fdatasync(fd, path: tmp)
            Sys.close(fd)
            try Sys.rename(tmp, final)
        } catch {
            Sys.close(fd)
            try? Sys.unlinkIfPresent(tmp)
            throw error.context("cannot write object \(key) in \(description)")
        }
    }

    public func get(_ key: String, offset: Int, into buffer: UnsafeMutableRawBufferPointer) throws(FSError) -> Int {
        let fd = Glibc.open(path(key), O_RDONLY | O_CLOEXEC)
        if fd < 0 {
            let e = errno
            if e == ENOENT && Sys.stat(root) == nil { throw FSError(EIO, "\(description) is missing (is its file system mounted?)") }
            throw FSError(e == ENOENT ? ENOENT : EIO, "object \(key) in \(description): \(String(cString: strerror(e)))")
        }
        defer { Sys.close(fd) }
        guard let base = buffer.baseAddress, buffer.count > 0 else { return 0 }
        return try Sys.pread(fd, base, buffer.count, Int64(offset), path: path(key))
    }

    public func delete(_ key: String) throws(FSError) {
        try Sys.unlinkIfPresent(path(key))
    }

    public func head(_ key: String) throws(FSError) -> Int? {
        guard let st = Sys.stat(path(key)) else { return nil }
        return Int(st.st_size)
    }

    public func list(prefix: String, limit: Int) throws(FSError) -> [ObjectInfo] {
        var out: [ObjectInfo] = []
        walk(root, rel: "", prefix: prefix, limit: limit, into: &out)
        return out.sorted { $0.key < $1.key }.prefix(limit).map { $0 }
    }

    private func walk(_ dir: String, rel: String, prefix: String, limit: Int, into out: inout [ObjectInfo]) {
        guard let d = opendir(dir) else { return }
        defer { closedir(d) }
        var names: [String] = []
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name == "." || name == ".." || name.contains(".tmp") { continue }
            names.append(name)
        }
        for name in names.sorted() {
            let key = rel.isEmpty ? name : "\(rel)/\(name)"
            // Descend only where the prefix can still match.
            if !(key.hasPrefix(prefix) || prefix.hasPrefix(key)) { continue }
            let full = "\(dir)/\(name)"
            guard let st = Sys.stat(full) else { continue }
            if st.st_mode & S_IFMT == S_IFDIR {
                walk(full, rel: key, prefix: prefix, limit: limit, into: &out)
            } else if key.hasPrefix(prefix) {
                out.append(ObjectInfo(key: key, size: Int(st.st_size)))
            }
        }
    }
}
