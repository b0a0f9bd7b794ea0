#if canImport(Glibc)
    import Glibc
#endif

/// Directory work that never follows a symbolic link: what root does in places users can write
/// (a shared cache root, a user's cache directory), and removals of trees a user may have
/// changed. Each step works on a descriptor of the directory opened with `O_NOFOLLOW`, so a link
/// planted in the path is refused or removed, never what it points to.
public enum SafeDir {
    /// Opens the directory `name` inside the open directory `parent` without following a link.
    public static func open(_ parent: Int32, _ name: String) -> Int32 {
        openat(parent, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
    }

    /// Makes (or accepts) `<parentPath>/<name>` as a directory owned by `uid`:`gid` with `mode`,
    /// as root. `parentPath` is the site's own setting (a root-owned directory, sticky when users
    /// may write it); `name` must be one path component. A new directory is created owned by root
    /// and then handed over through its descriptor; an existing one is accepted only when it is
    /// a real directory (not a link) owned by `uid` or still by root. Returns its descriptor.
    public static func ownedDirectory(in parentPath: String, _ name: String, uid: uid_t, gid: gid_t, mode: mode_t) throws(FSError) -> Int32 {
        precondition(!name.contains("/") && name != "." && name != "..")
        let parent = Glibc.open(parentPath, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if parent < 0 { throw FSError.errno(errno, "cannot open \(parentPath)") }
        defer { Glibc.close(parent) }
        let path = "\(parentPath)/\(name)"
        if mkdirat(parent, name, 0o700) != 0 && errno != EEXIST { throw FSError.errno(errno, "cannot create \(path)") }
        let fd = open(parent, name)
        if fd < 0 {
            let e = errno
            if e == ELOOP || e == ENOTDIR {
                throw FSError(EPERM, "\(path) is a symbolic link or not a directory: remove it")
            }
            throw FSError.errno(e, "cannot open \(path)")
        }
        var st = Glibc.stat()
        if fstat(fd, &st) != 0 || (st.st_uid != uid && st.st_uid != 0) {
            Glibc.close(fd)
            throw FSError(EPERM, "\(path) belongs to uid \(st.st_uid), not \(uid): remove it")
        }
        if st.st_uid != uid || st.st_gid != gid { _ = fchown(fd, uid, gid) }
        if st.st_mode & 0o7777 != mode { _ = fchmod(fd, mode) }
        return fd
    }

    /// Removes `path` and everything below it; a symbolic link anywhere in it is removed, never
    /// followed. A missing path is not an error.
    public static func removeTree(_ path: String) throws(FSError) {
        let parentPath = Sys.dirname(of: path)
        let name = String(path.split(separator: "/").last ?? "")
        if name.isEmpty { return }
        let parent = Glibc.open(parentPath, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if parent < 0 {
            if errno == ENOENT { return }
            throw FSError.errno(errno, "cannot open \(parentPath)")
        }
        defer { Glibc.close(parent) }
        try removeEntry(parent, name, path)
    }

    private static func removeEntry(_ dir: Int32, _ name: String, _ path: String) throws(FSError) {
        var st = Glibc.stat()
        if fstatat(dir, name, &st, AT_SYMLINK_NOFOLLOW) != 0 {
            if errno == ENOENT { return }
            throw FSError.errno(errno, "cannot remove \(path)")
        }
        if st.st_mode & S_IFMT == S_IFDIR {
            let fd = open(dir, name)
            if fd < 0 { throw FSError.errno(errno, "cannot remove \(path)") }
            guard let d = fdopendir(fd) else {
                Glibc.close(fd)
                throw FSError.errno(errno, "cannot remove \(path)")
            }
            var names: [String] = []
            while let e = readdir(d) {
                let n = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                if n != "." && n != ".." { names.append(n) }
            }
            var first: FSError?
            for n in names {
                do { try removeEntry(dirfd(d), n, "\(path)/\(n)") } catch { first = first ?? error }
            }
            closedir(d)
            if let first { throw first }
            if unlinkat(dir, name, AT_REMOVEDIR) != 0 && errno != ENOENT { throw FSError.errno(errno, "cannot remove \(path)") }
        } else if unlinkat(dir, name, 0) != 0 && errno != ENOENT {
            throw FSError.errno(errno, "cannot remove \(path)")
        }
    }
}
