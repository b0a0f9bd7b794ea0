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
    /// without following a link or changing anything by path. `parentPath` must be a directory
    /// (not a link) owned by root (or, for an ordinary caller, by the caller) and, when others
    /// may write it, sticky: checked on its descriptor, so nobody else can rename or replace the
    /// entry afterwards. `name` must be one path component.
    ///
    /// Another user's entry under that name (a directory, a link, a file) is, for root, moved
    /// aside and replaced; an ordinary caller cannot move another user's entry out of a sticky
    /// directory, so it gets an error naming the entry's owner and what to do. A link or file of
    /// `uid`'s own (or root's) is refused, never followed. A new directory is created with
    /// `mkdirat` and checked on its `O_NOFOLLOW` descriptor; as root it is created owned by root
    /// and then handed over with `fchown`; an existing one is accepted only when it is a real
    /// directory owned by `uid` (or, for root, still by root). The mode is set with `fchmod` on
    /// that descriptor, never by path. Returns the descriptor.
    public static func ownedDirectory(in parentPath: String, _ name: String, uid: uid_t, gid: gid_t, mode: mode_t) throws(FSError) -> Int32 {
        precondition(!name.contains("/") && name != "." && name != "..")
        let me = geteuid()
        let parent = Glibc.open(parentPath, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        if parent < 0 {
            if errno == ELOOP || errno == ENOTDIR { throw FSError(EPERM, "\(parentPath) is a symbolic link or not a directory") }
            throw FSError.errno(errno, "cannot open \(parentPath)")
        }
        defer { Glibc.close(parent) }
        var pst = Glibc.stat()
        guard fstat(parent, &pst) == 0, pst.st_uid == 0 || pst.st_uid == me, pst.st_mode & 0o022 == 0 || pst.st_mode & 0o1000 != 0 else {
            let owner = me == 0 ? "root" : "root or by you"
            throw FSError(EPERM, "\(parentPath) must be owned by \(owner) and, if others may write it, sticky (chmod 1777)")
        }
        let path = "\(parentPath)/\(name)"
        var lst = Glibc.stat()
        if fstatat(parent, name, &lst, AT_SYMLINK_NOFOLLOW) == 0 && lst.st_uid != uid && lst.st_uid != 0 {
            let what = lst.st_mode & S_IFMT == S_IFLNK ? "a symbolic link" : lst.st_mode & S_IFMT == S_IFDIR ? "a directory" : "a file"
            guard me == 0 else {
                // An ordinary user cannot move another user's entry out of a sticky directory.
                throw FSError(
                    EPERM,
                    "\(path) is \(what) of \(userText(lst.st_uid)), not yours (uid \(uid)): someone else made it in this shared directory; ask them or root to remove it, or use another directory"
                )
            }
            // Another user's entry under this user's name: moved aside, never followed.
            let aside = ".stagefs-moved-\(name)-\(Timespec.now().sec)-uid\(lst.st_uid)"
            if renameat(parent, name, parent, aside) != 0 { throw FSError.errno(errno, "cannot move \(path) (\(userText(lst.st_uid))'s) aside") }
            Log.warning("moved \(path) (\(what) of \(userText(lst.st_uid))) aside to \(parentPath)/\(aside)")
        }
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
        if fstat(fd, &st) != 0 || (st.st_uid != uid && !(me == 0 && st.st_uid == 0)) {
            Glibc.close(fd)
            throw FSError(EPERM, "\(path) belongs to \(userText(st.st_uid)), not to uid \(uid): \(me == 0 ? "remove it" : "ask root to remove it")")
        }
        if (st.st_uid != uid || st.st_gid != gid) && fchown(fd, uid, gid) != 0
            || st.st_mode & 0o7777 != mode && fchmod(fd, mode) != 0
        {
            let e = errno
            Glibc.close(fd)
            throw FSError.errno(e, "cannot hand \(path) to uid \(uid)")
        }
        return fd
    }

    /// `uid N (name)`, or `uid N` when the user database has no name for it.
    public static func userText(_ uid: uid_t) -> String {
        var pw = passwd()
        var result: UnsafeMutablePointer<passwd>?
        var buf = [CChar](repeating: 0, count: 4096)
        return buf.withUnsafeMutableBufferPointer { b in
            guard let base = b.baseAddress, getpwuid_r(uid, &pw, base, b.count, &result) == 0, let entry = result,
                let name = entry.pointee.pw_name
            else {
                return "uid \(uid)"
            }
            return "uid \(uid) (\(String(cString: name)))"
        }
    }

    /// Removes `path` and everything below it; a symbolic link anywhere in it is removed, never
    /// followed. A missing path is not an error. Returns the bytes of the regular files removed.
    @discardableResult
    public static func removeTree(_ path: String) throws(FSError) -> Int {
        let parentPath = Sys.dirname(of: path)
        let name = String(path.split(separator: "/").last ?? "")
        if name.isEmpty { return 0 }
        let parent = Glibc.open(parentPath, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if parent < 0 {
            if errno == ENOENT { return 0 }
            throw FSError.errno(errno, "cannot open \(parentPath)")
        }
        defer { Glibc.close(parent) }
        var bytes = 0
        try removeEntry(parent, name, path, &bytes)
        return bytes
    }

    /// Removes the entry `name` of the open directory `dir` and everything below it, as
    /// `removeTree` does; returns the bytes of the regular files removed.
    @discardableResult
    public static func removeTree(in dir: Int32, _ name: String, path: String) throws(FSError) -> Int {
        var bytes = 0
        try removeEntry(dir, name, path, &bytes)
        return bytes
    }

    /// The names in an open directory (without `.` and `..`); `dir` stays open.
    public static func names(_ dir: Int32) -> [String] {
        let fd = dup(dir)
        guard fd >= 0, let d = fdopendir(fd) else {
            if fd >= 0 { Glibc.close(fd) }
            return []
        }
        defer { closedir(d) }
        rewinddir(d)
        var names: [String] = []
        while let e = readdir(d) {
            let n = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if n != "." && n != ".." { names.append(n) }
        }
        return names
    }

    private static func removeEntry(_ dir: Int32, _ name: String, _ path: String, _ bytes: inout Int) throws(FSError) {
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
                do { try removeEntry(dirfd(d), n, "\(path)/\(n)", &bytes) } catch { first = first ?? error }
            }
            closedir(d)
            if let first { throw first }
            if unlinkat(dir, name, AT_REMOVEDIR) != 0 && errno != ENOENT { throw FSError.errno(errno, "cannot remove \(path)") }
        } else if unlinkat(dir, name, 0) != 0 {
            if errno != ENOENT { throw FSError.errno(errno, "cannot remove \(path)") }
        } else if st.st_mode & S_IFMT == S_IFREG {
            bytes += Int(st.st_size)
        }
    }

    /// Gives `path` and everything below it to group `gid`, group-writable (directories also
    /// set-group-ID, so what is created in them keeps the group): what `format --bucket-group`
    /// does to a `file` bucket. Links are skipped, never followed; every change is made on a
    /// descriptor opened with `O_NOFOLLOW`. Returns how many entries changed.
    public static func shareTree(_ path: String, gid: gid_t) throws(FSError) -> Int {
        let fd = Glibc.open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        if fd < 0 { throw FSError.errno(errno, "cannot open \(path)") }
        return try shareDirectory(fd, path, gid: gid)
    }

    /// Shares the open directory `fd` (closed here) and its tree with `gid`.
    private static func shareDirectory(_ fd: Int32, _ path: String, gid: gid_t) throws(FSError) -> Int {
        var changed = try share(fd, path, gid: gid, mode: { $0 | 0o2070 })
        guard let d = fdopendir(fd) else {
            Glibc.close(fd)
            throw FSError.errno(errno, "cannot read \(path)")
        }
        defer { closedir(d) }
        var names: [String] = []
        while let e = readdir(d) {
            let n = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if n != "." && n != ".." { names.append(n) }
        }
        for n in names {
            let child = openat(dirfd(d), n, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC)
            if child < 0 { continue }  // a link (ELOOP), gone, or not ours to open: left alone
            var st = Glibc.stat()
            guard fstat(child, &st) == 0 else {
                Glibc.close(child)
                continue
            }
            switch st.st_mode & S_IFMT {
            case S_IFDIR:
                changed += try shareDirectory(child, "\(path)/\(n)", gid: gid)
            case S_IFREG:
                defer { Glibc.close(child) }
                changed += try share(child, "\(path)/\(n)", gid: gid, mode: { $0 | 0o040 })
            default:
                Glibc.close(child)
            }
        }
        return changed
    }

    /// Sets the group and mode of one open file; returns 1 when something changed.
    private static func share(_ fd: Int32, _ path: String, gid: gid_t, mode: (mode_t) -> mode_t) throws(FSError) -> Int {
        var st = Glibc.stat()
        guard fstat(fd, &st) == 0 else { throw FSError.errno(errno, "cannot stat \(path)") }
        var changed = 0
        if st.st_gid != gid {
            if fchown(fd, uid_t.max, gid) != 0 { throw FSError.errno(errno, "cannot change the group of \(path)") }
            changed = 1
        }
        let want = mode(st.st_mode & 0o7777)
        // chown clears the set-group-ID bit of directories for non-root callers: set it after.
        if want != st.st_mode & 0o7777 || changed == 1 {
            if fchmod(fd, want) != 0 { throw FSError.errno(errno, "cannot change the mode of \(path)") }
            changed = 1
        }
        return changed
    }
}
