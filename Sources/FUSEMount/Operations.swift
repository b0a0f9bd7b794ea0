import CFuse3
import CoreMetrics
import StageFSCore
import VFS

#if canImport(Glibc)
    import Glibc
#endif

// The FUSE low-level callbacks. Each is a global function (no captures): it finds the server
// through fuse_req_userdata, turns arguments into Swift values, calls the VFS, and replies.
// Swift errors never cross into C: every FSError becomes fuse_reply_err(errno).

@inline(__always)
private func server(_ req: fuse_req_t?) -> FuseServer {
    Unmanaged<FuseServer>.fromOpaque(fuse_req_userdata(req)!).takeUnretainedValue()
}

/// Supplementary groups by process, kept for a second: reading them costs a /proc read
/// (fuse_req_getgroups) and a process's groups rarely change.
private final class GroupCache: @unchecked Sendable {
    private let lock = ConditionLock()
    private var entries: [pid_t: (groups: [UInt32], uid: UInt32, at: UInt64)] = [:]

    func groups(_ req: fuse_req_t?, pid: pid_t, uid: UInt32) -> [UInt32] {
        let now = Sys.monotonicNanos()
        if let e = lock.withLock({ entries[pid] }), e.uid == uid, now - e.at < 1_000_000_000 { return e.groups }
        var list = [gid_t](repeating: 0, count: 64)
        var n = fuse_req_getgroups(req, 64, &list)
        if n > 64 {
            list = [gid_t](repeating: 0, count: Int(n))
            n = fuse_req_getgroups(req, n, &list)
        }
        let groups = n > 0 ? Array(list.prefix(Int(n))) : []
        lock.withLock {
            if entries.count > 4096 { entries.removeAll() }
            entries[pid] = (groups, uid, now)
        }
        return groups
    }
}

private let groupCache = GroupCache()

/// The caller's uid, gid, supplementary groups and pid.
private func credential(_ req: fuse_req_t?) -> Credential {
    let c = fuse_req_ctx(req)!.pointee
    var cred = Credential(uid: c.uid, gid: c.gid, pid: UInt32(bitPattern: c.pid))
    if c.uid != 0 { cred.groups = groupCache.groups(req, pid: c.pid, uid: c.uid) }
    return cred
}

private func name(_ p: UnsafePointer<CChar>?) -> [UInt8] {
    guard let p else { return [] }
    return Array(UnsafeRawBufferPointer(start: p, count: strlen(p)))
}

private func fill(_ st: inout stat, _ ino: Ino, _ a: Attr) {
    st = stat()
    st.st_ino = UInt(ino)
    st.st_mode = a.fullMode
    st.st_nlink = UInt(a.nlink)
    st.st_uid = a.uid
    st.st_gid = a.gid
    st.st_rdev = UInt(a.rdev)
    st.st_size = Int(a.size)
    st.st_blksize = 65536
    st.st_blocks = Int(a.blocks)
    st.st_atim = timespec(tv_sec: Int(a.atime.sec), tv_nsec: Int(a.atime.nsec))
    st.st_mtim = timespec(tv_sec: Int(a.mtime.sec), tv_nsec: Int(a.mtime.nsec))
    st.st_ctim = timespec(tv_sec: Int(a.ctime.sec), tv_nsec: Int(a.ctime.nsec))
}

/// A directory entry reply with the mount's cache timeouts.
private func entryParam(_ s: FuseServer, _ ino: Ino, _ a: Attr) -> fuse_entry_param {
    var e = fuse_entry_param()
    e.ino = ino
    e.generation = 1
    e.attr_timeout = s.config.attrTimeout
    e.entry_timeout = a.type == .directory ? s.config.dirEntryTimeout : s.config.entryTimeout
    fill(&e.attr, ino, a)
    return e
}

/// Replies with an entry; when the kernel accepts it, it holds one more lookup of `ino`.
private func replyEntry(_ req: fuse_req_t?, _ ino: Ino, _ a: Attr) {
    let s = server(req)
    var e = entryParam(s, ino, a)
    if fuse_reply_entry(req, &e) == 0 { s.vfs.remember(ino) }
}

private func replyAttr(_ req: fuse_req_t?, _ ino: Ino, _ a: Attr) {
    var st = stat()
    fill(&st, ino, a)
    fuse_reply_attr(req, &st, server(req).config.attrTimeout)
}

/// The operations timed, by the name the metrics give them (`method`).
enum FuseOp: Int, CaseIterable {
    case lookup, getattr, setattr, readlink, mknod, mkdir, unlink, rmdir, symlink, rename, link, open, create, read, write
    case fallocate, copy_file_range, flush, fsync, opendir, readdir, readdirplus, statfs, setxattr, getxattr, listxattr
    case removexattr, access, getlk, setlk, flock
}

/// The FUSE layer's metrics (names as JuiceFS's, `juicefs_` becoming `stagefs_`): each
/// operation's latency by kind, errors answered, and the sizes of reads and writes.
enum FuseMetrics {
    static let ops: [CoreMetrics.Timer] = FuseOp.allCases.map {
        CoreMetrics.Timer(label: "stagefs_fuse_ops_durations_histogram_seconds", dimensions: [("method", "\($0)")])
    }
    static let errors: [CoreMetrics.Counter] = FuseOp.allCases.map {
        CoreMetrics.Counter(label: "stagefs_fuse_errors", dimensions: [("method", "\($0)")])
    }
    static let readSizes = Recorder(label: "stagefs_fuse_read_size_bytes")
    static let writeSizes = Recorder(label: "stagefs_fuse_written_size_bytes")
}

/// Runs `body`, replying with its errno when it throws, and times it as an `op`. An `EIO`, or
/// an error marked `logged`, is also logged with its reason (the application sees only the
/// errno).
@inline(__always)
private func serve(_ req: fuse_req_t?, _ op: FuseOp, _ body: () throws(FSError) -> Void) {
    let start = Sys.monotonicNanos()
    defer { FuseMetrics.ops[op.rawValue].recordNanoseconds(Int64(Sys.monotonicNanos() &- start)) }
    do {
        try body()
    } catch {
        if error.code == EIO {
            ioErrorLog.note("I/O error: \(error.message)")
        } else if error.logged {
            ioErrorLog.note("\(String(cString: strerror(error.code))): \(error.message)")
        }
        // (Expected answers are not errors here: a lookup of a name that is not there.)
        if error.code != ENOENT && error.code != ENODATA && error.code != EAGAIN && error.code != EOPNOTSUPP {
            FuseMetrics.errors[op.rawValue].increment()
        }
        fuse_reply_err(req, error.code)
    }
}

/// Logs the reasons of I/O (and `logged`) errors, each the same text at most once a second.
private final class IOErrorLog: @unchecked Sendable {
    private let lock = ConditionLock()
    private var last = ""
    private var at: UInt64 = 0

    func note(_ message: String) {
        let now = Sys.monotonicNanos()
        let show = lock.withLock { () -> Bool in
            if message == last && now - at < 1_000_000_000 { return false }
            last = message
            at = now
            return true
        }
        if show { Log.error(message) }
    }
}

private let ioErrorLog = IOErrorLog()

// ATOMIC_O_TRUNC: open(O_TRUNC) reaches `open`, which truncates (VFS.open).
// HANDLE_KILLPRIV: the kernel leaves clearing set-user-ID/set-group-ID bits to us (a write,
// truncate or chown does it, SetAttrRules); without it the kernel sends that mode change with
// the writer's credential, which a non-owner may not make.
private func ll_init(_ userdata: UnsafeMutableRawPointer?, _ conn: UnsafeMutablePointer<fuse_conn_info>?) {
    guard let conn else { return }
    cfuse3_conn_want(
        conn,
        UInt32(
            FUSE_CAP_ASYNC_READ | FUSE_CAP_POSIX_LOCKS | FUSE_CAP_FLOCK_LOCKS | FUSE_CAP_READDIRPLUS | FUSE_CAP_READDIRPLUS_AUTO
                | FUSE_CAP_PARALLEL_DIROPS | FUSE_CAP_ASYNC_DIO | FUSE_CAP_ATOMIC_O_TRUNC | FUSE_CAP_HANDLE_KILLPRIV))
    cfuse3_conn_unwant(conn, UInt32(FUSE_CAP_WRITEBACK_CACHE | FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE))
    conn.pointee.max_write = 1 << 20
    conn.pointee.max_readahead = 1 << 20
    conn.pointee.max_background = 64
    conn.pointee.congestion_threshold = 48
}

private func ll_destroy(_ userdata: UnsafeMutableRawPointer?) {
    let s = Unmanaged<FuseServer>.fromOpaque(userdata!).takeUnretainedValue()
    do { try s.vfs.data.flushAll() } catch { Log.error("flush at unmount: \(error.message)") }
}

private func ll_lookup(_ req: fuse_req_t?, _ parent: fuse_ino_t, _ n: UnsafePointer<CChar>?) {
    serve(req, .lookup) { () throws(FSError) in
        let (ino, a) = try server(req).vfs.lookup(credential(req), parent, name(n))
        replyEntry(req, ino, a)
    }
}

private func ll_forget(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ nlookup: UInt64) {
    server(req).vfs.forget(ino, nlookup)
    fuse_reply_none(req)
}

private func ll_forget_multi(_ req: fuse_req_t?, _ count: Int, _ forgets: UnsafeMutablePointer<fuse_forget_data>?) {
    if let forgets {
        let vfs = server(req).vfs
        for i in 0..<count { vfs.forget(forgets[i].ino, forgets[i].nlookup) }
    }
    fuse_reply_none(req)
}

private func ll_getattr(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    serve(req, .getattr) { () throws(FSError) in
        replyAttr(req, ino, try server(req).vfs.getattr(ino))
    }
}

private func ll_setattr(
    _ req: fuse_req_t?, _ ino: fuse_ino_t, _ attr: UnsafeMutablePointer<stat>?, _ toSet: Int32, _ fi: UnsafeMutablePointer<fuse_file_info>?
) {
    serve(req, .setattr) { () throws(FSError) in
        guard let st = attr?.pointee else { throw FSError.invalid }
        var r = SetAttrRequest(mask: SetAttrMask(rawValue: UInt32(bitPattern: toSet)))
        r.mode = UInt16(st.st_mode & 0o7777)
        r.uid = st.st_uid
        r.gid = st.st_gid
        r.size = UInt64(max(0, st.st_size))
        r.atime = Timespec(sec: Int64(st.st_atim.tv_sec), nsec: UInt32(st.st_atim.tv_nsec))
        r.mtime = Timespec(sec: Int64(st.st_mtim.tv_sec), nsec: UInt32(st.st_mtim.tv_nsec))
        r.ctime = Timespec(sec: Int64(st.st_ctim.tv_sec), nsec: UInt32(st.st_ctim.tv_nsec))
        let a = try server(req).vfs.setattr(credential(req), ino, r, fh: fi?.pointee.fh)
        replyAttr(req, ino, a)
    }
}

private func ll_readlink(_ req: fuse_req_t?, _ ino: fuse_ino_t) {
    serve(req, .readlink) { () throws(FSError) in
        let t = try server(req).vfs.readlink(ino)
        var z = t.map { CChar(bitPattern: $0) }
        z.append(0)
        fuse_reply_readlink(req, z)
    }
}

private func ll_mknod(_ req: fuse_req_t?, _ parent: fuse_ino_t, _ n: UnsafePointer<CChar>?, _ mode: mode_t, _ rdev: dev_t) {
    serve(req, .mknod) { () throws(FSError) in
        guard let type = FileType(mode: mode), type != .directory, type != .symlink else { throw FSError.invalid }
        let (ino, a) = try server(req).vfs.mknod(
            credential(req), parent, name(n), type, UInt16(mode & 0o7777), rdev: UInt32(truncatingIfNeeded: rdev))
        replyEntry(req, ino, a)
    }
}

private func ll_mkdir(_ req: fuse_req_t?, _ parent: fuse_ino_t, _ n: UnsafePointer<CChar>?, _ mode: mode_t) {
    serve(req, .mkdir) { () throws(FSError) in
        let (ino, a) = try server(req).vfs.mkdir(credential(req), parent, name(n), UInt16(mode & 0o7777))
        replyEntry(req, ino, a)
    }
}

private func ll_unlink(_ req: fuse_req_t?, _ parent: fuse_ino_t, _ n: UnsafePointer<CChar>?) {
    serve(req, .unlink) { () throws(FSError) in
        try server(req).vfs.unlink(credential(req), parent, name(n))
        fuse_reply_err(req, 0)
    }
}

private func ll_rmdir(_ req: fuse_req_t?, _ parent: fuse_ino_t, _ n: UnsafePointer<CChar>?) {
    serve(req, .rmdir) { () throws(FSError) in
        try server(req).vfs.rmdir(credential(req), parent, name(n))
        fuse_reply_err(req, 0)
    }
}

private func ll_symlink(_ req: fuse_req_t?, _ link: UnsafePointer<CChar>?, _ parent: fuse_ino_t, _ n: UnsafePointer<CChar>?) {
    serve(req, .symlink) { () throws(FSError) in
        let (ino, a) = try server(req).vfs.symlink(credential(req), parent, name(n), target: name(link))
        replyEntry(req, ino, a)
    }
}

private func ll_rename(
    _ req: fuse_req_t?, _ parent: fuse_ino_t, _ n: UnsafePointer<CChar>?, _ newParent: fuse_ino_t, _ newName: UnsafePointer<CChar>?, _ flags: UInt32
) {
    serve(req, .rename) { () throws(FSError) in
        try server(req).vfs.rename(credential(req), parent, name(n), newParent, name(newName), flags: RenameFlags(rawValue: flags))
        fuse_reply_err(req, 0)
    }
}

private func ll_link(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ newParent: fuse_ino_t, _ newName: UnsafePointer<CChar>?) {
    serve(req, .link) { () throws(FSError) in
        let a = try server(req).vfs.link(credential(req), ino, newParent, name(newName))
        replyEntry(req, ino, a)
    }
}

private func ll_open(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    serve(req, .open) { () throws(FSError) in
        guard let fi else { throw FSError.invalid }
        let (fh, _, keep) = try server(req).vfs.open(credential(req), ino, flags: fi.pointee.flags)
        fi.pointee.fh = fh
        fi.pointee.keep_cache = keep ? 1 : 0
        if fuse_reply_open(req, fi) != 0 { server(req).vfs.release(fh) }
    }
}

private func ll_create(
    _ req: fuse_req_t?, _ parent: fuse_ino_t, _ n: UnsafePointer<CChar>?, _ mode: mode_t, _ fi: UnsafeMutablePointer<fuse_file_info>?
) {
    serve(req, .create) { () throws(FSError) in
        guard let fi else { throw FSError.invalid }
        let s = server(req)
        let (ino, a, fh) = try s.vfs.create(credential(req), parent, name(n), UInt16(mode & 0o7777), flags: fi.pointee.flags)
        fi.pointee.fh = fh
        var e = entryParam(s, ino, a)
        if fuse_reply_create(req, &e, fi) != 0 { s.vfs.release(fh) } else { s.vfs.remember(ino) }
    }
}

/// Reply buffers for reads, reused so that a read does not map and unmap fresh memory.
private final class ReadBuffers: @unchecked Sendable {
    private let lock = ConditionLock()
    private var free: [UnsafeMutableRawBufferPointer] = []
    static let size = 1 << 20

    func take(_ n: Int) -> UnsafeMutableRawBufferPointer {
        if n <= ReadBuffers.size, let b = lock.withLock({ free.popLast() }) { return b }
        return UnsafeMutableRawBufferPointer.allocate(byteCount: max(n, ReadBuffers.size), alignment: 64)
    }

    func give(_ b: UnsafeMutableRawBufferPointer) {
        let kept = lock.withLock { () -> Bool in
            guard b.count == ReadBuffers.size, free.count < 32 else { return false }
            free.append(b)
            return true
        }
        if !kept { b.deallocate() }
    }
}

private let readBuffers = ReadBuffers()

private func ll_read(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ size: Int, _ off: off_t, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    serve(req, .read) { () throws(FSError) in
        guard let fi else { throw FSError.badF }
        let buf = readBuffers.take(size)
        defer { readBuffers.give(buf) }
        let n = try server(req).vfs.read(fi.pointee.fh, at: UInt64(off), into: UnsafeMutableRawBufferPointer(rebasing: buf[0..<size]))
        FuseMetrics.readSizes.record(n)
        fuse_reply_buf(req, buf.baseAddress!.assumingMemoryBound(to: CChar.self), n)
    }
}

private func ll_write(
    _ req: fuse_req_t?, _ ino: fuse_ino_t, _ data: UnsafePointer<CChar>?, _ size: Int, _ off: off_t, _ fi: UnsafeMutablePointer<fuse_file_info>?
) {
    serve(req, .write) { () throws(FSError) in
        guard let fi, let data else { throw FSError.badF }
        let n = try server(req).vfs.write(
            fi.pointee.fh, at: UInt64(off), UnsafeRawBufferPointer(start: data, count: size), uid: fuse_req_ctx(req)!.pointee.uid,
            caller: { credential(req) })
        FuseMetrics.writeSizes.record(n)
        fuse_reply_write(req, n)
    }
}

private func ll_fallocate(
    _ req: fuse_req_t?, _ ino: fuse_ino_t, _ mode: Int32, _ offset: off_t, _ length: off_t, _ fi: UnsafeMutablePointer<fuse_file_info>?
) {
    serve(req, .fallocate) { () throws(FSError) in
        guard let fi else { throw FSError.badF }
        guard offset >= 0, length > 0 else { throw FSError.invalid }
        _ = try server(req).vfs.fallocate(credential(req), fi.pointee.fh, mode: mode, offset: UInt64(offset), length: UInt64(length))
        fuse_reply_err(req, 0)
    }
}

private func ll_copy_file_range(
    _ req: fuse_req_t?, _ inoIn: fuse_ino_t, _ offIn: off_t, _ fiIn: UnsafeMutablePointer<fuse_file_info>?, _ inoOut: fuse_ino_t,
    _ offOut: off_t, _ fiOut: UnsafeMutablePointer<fuse_file_info>?, _ len: Int, _ flags: Int32
) {
    serve(req, .copy_file_range) { () throws(FSError) in
        guard let fiIn, let fiOut else { throw FSError.badF }
        guard offIn >= 0, offOut >= 0 else { throw FSError.invalid }
        let n = try server(req).vfs.copyFileRange(
            credential(req), fiIn.pointee.fh, offIn: UInt64(offIn), fiOut.pointee.fh, offOut: UInt64(offOut), length: UInt64(len), flags: flags)
        fuse_reply_write(req, n)
    }
}

private func ll_flush(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    serve(req, .flush) { () throws(FSError) in
        guard let fi else { throw FSError.badF }
        try server(req).vfs.flush(fi.pointee.fh, owner: fi.pointee.lock_owner)
        fuse_reply_err(req, 0)
    }
}

private func ll_release(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    if let fi { server(req).vfs.release(fi.pointee.fh) }
    fuse_reply_err(req, 0)
}

private func ll_fsync(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ datasync: Int32, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    serve(req, .fsync) { () throws(FSError) in
        guard let fi else { throw FSError.badF }
        try server(req).vfs.fsync(fi.pointee.fh)
        fuse_reply_err(req, 0)
    }
}

private func ll_opendir(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    serve(req, .opendir) { () throws(FSError) in
        try server(req).vfs.opendir(credential(req), ino)
        fi?.pointee.fh = 0
        fuse_reply_open(req, fi)
    }
}

private func readdirCommon(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ size: Int, _ off: off_t, plus: Bool) {
    serve(req, plus ? .readdirplus : .readdir) { () throws(FSError) in
        let s = server(req)
        // Roughly how many entries fit: about 32 bytes each (plus ~128 for attributes).
        let limit = max(1, min(1000, size / (plus ? 160 : 32)))
        let entries = try s.vfs.readdir(ino, offset: UInt64(off), limit: limit, plus: plus)
        let buf = UnsafeMutablePointer<CChar>.allocate(capacity: max(size, 1))
        defer { buf.deallocate() }
        var used = 0
        for e in entries {
            var z = e.name.map { CChar(bitPattern: $0) }
            z.append(0)
            let n: Int
            if plus {
                var ep = fuse_entry_param()
                let isDot = e.name == [46] || e.name == [46, 46]
                if let a = e.attr, !isDot {
                    ep = entryParam(s, e.ino, a)
                } else {
                    ep.attr.st_ino = UInt(e.ino)
                    ep.attr.st_mode = e.type.modeBits
                }
                n = fuse_add_direntry_plus(req, buf + used, size - used, z, &ep, off_t(e.cookie))
                if n <= size - used && ep.ino != 0 { s.vfs.remember(e.ino) }
            } else {
                var st = stat()
                st.st_ino = UInt(e.ino)
                st.st_mode = e.type.modeBits
                n = fuse_add_direntry(req, buf + used, size - used, z, &st, off_t(e.cookie))
            }
            if n > size - used { break }
            used += n
        }
        fuse_reply_buf(req, buf, used)
    }
}

private func ll_readdir(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ size: Int, _ off: off_t, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    readdirCommon(req, ino, size, off, plus: false)
}

private func ll_readdirplus(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ size: Int, _ off: off_t, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    readdirCommon(req, ino, size, off, plus: true)
}

private func ll_releasedir(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    fuse_reply_err(req, 0)
}

private func ll_fsyncdir(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ datasync: Int32, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    fuse_reply_err(req, 0)
}

private func ll_statfs(_ req: fuse_req_t?, _ ino: fuse_ino_t) {
    serve(req, .statfs) { () throws(FSError) in
        let f = try server(req).vfs.statfs(Ino(ino))
        var st = statvfs()
        st.f_bsize = 4096
        st.f_frsize = 4096
        st.f_blocks = UInt(f.totalSpace / 4096)
        st.f_bfree = UInt(f.availSpace / 4096)
        st.f_bavail = UInt(f.availSpace / 4096)
        st.f_files = UInt(f.usedInodes + f.availInodes)
        st.f_ffree = UInt(f.availInodes)
        st.f_favail = UInt(f.availInodes)
        st.f_namemax = UInt(maxNameLength)
        fuse_reply_statfs(req, &st)
    }
}

private func ll_setxattr(
    _ req: fuse_req_t?, _ ino: fuse_ino_t, _ n: UnsafePointer<CChar>?, _ value: UnsafePointer<CChar>?, _ size: Int, _ flags: Int32
) {
    serve(req, .setxattr) { () throws(FSError) in
        let v = value.map { Array(UnsafeRawBufferPointer(start: $0, count: size)) } ?? []
        let flag: XattrFlag = flags & 1 != 0 ? .create : (flags & 2 != 0 ? .replace : .any)
        try server(req).vfs.setxattr(credential(req), ino, name(n), v, flag)
        fuse_reply_err(req, 0)
    }
}

private func replyXattr(_ req: fuse_req_t?, _ value: [UInt8], _ size: Int) {
    if size == 0 {
        fuse_reply_xattr(req, value.count)
    } else if value.count > size {
        fuse_reply_err(req, ERANGE)
    } else {
        _ = value.withUnsafeBytes { fuse_reply_buf(req, $0.baseAddress?.assumingMemoryBound(to: CChar.self), value.count) }
    }
}

private func ll_getxattr(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ n: UnsafePointer<CChar>?, _ size: Int) {
    serve(req, .getxattr) { () throws(FSError) in
        replyXattr(req, try server(req).vfs.getxattr(credential(req), ino, name(n)), size)
    }
}

private func ll_listxattr(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ size: Int) {
    serve(req, .listxattr) { () throws(FSError) in
        var out: [UInt8] = []
        for n in try server(req).vfs.listxattr(credential(req), ino) { out += n + [0] }
        replyXattr(req, out, size)
    }
}

private func ll_removexattr(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ n: UnsafePointer<CChar>?) {
    serve(req, .removexattr) { () throws(FSError) in
        try server(req).vfs.removexattr(credential(req), ino, name(n))
        fuse_reply_err(req, 0)
    }
}

private func ll_access(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ mask: Int32) {
    serve(req, .access) { () throws(FSError) in
        try server(req).vfs.access(credential(req), ino, AccessMask(rawValue: UInt32(mask & 7)))
        fuse_reply_err(req, 0)
    }
}

private func lockType(_ t: Int16) -> LockType {
    switch Int32(t) {
    case F_RDLCK: return .read
    case F_WRLCK: return .write
    default: return .unlock
    }
}

private func lockRange(_ l: flock) -> (UInt64, UInt64) {
    let start = UInt64(max(0, l.l_start))
    let end = l.l_len == 0 ? UInt64.max : start + UInt64(l.l_len) - 1
    return (start, end)
}

private func ll_getlk(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ fi: UnsafeMutablePointer<fuse_file_info>?, _ lock: UnsafeMutablePointer<flock>?) {
    serve(req, .getlk) { () throws(FSError) in
        guard let fi, let lock else { throw FSError.invalid }
        let (start, end) = lockRange(lock.pointee)
        var out = lock.pointee
        if let c = try server(req).vfs.getlk(fi.pointee.fh, owner: fi.pointee.lock_owner, type: lockType(lock.pointee.l_type), start: start, end: end)
        {
            out.l_type = Int16(c.type == .write ? F_WRLCK : F_RDLCK)
            out.l_start = Int(c.start)
            out.l_len = c.end == UInt64.max ? 0 : Int(c.end - c.start + 1)
            out.l_pid = Int32(bitPattern: c.pid)
        } else {
            out.l_type = Int16(F_UNLCK)
        }
        fuse_reply_lock(req, &out)
    }
}

private func ll_setlk(
    _ req: fuse_req_t?, _ ino: fuse_ino_t, _ fi: UnsafeMutablePointer<fuse_file_info>?, _ lock: UnsafeMutablePointer<flock>?, _ sleep: Int32
) {
    serve(req, .setlk) { () throws(FSError) in
        guard let fi, let lock else { throw FSError.invalid }
        let (start, end) = lockRange(lock.pointee)
        try server(req).vfs.setlk(
            fi.pointee.fh, owner: fi.pointee.lock_owner, pid: UInt32(bitPattern: lock.pointee.l_pid), type: lockType(lock.pointee.l_type),
            start: start, end: end, wait: sleep != 0, interrupted: { fuse_req_interrupted(req) != 0 })
        if lockType(lock.pointee.l_type) != .unlock { server(req).forgetKernelCache(ino) }
        fuse_reply_err(req, 0)
    }
}

private func ll_flock(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ fi: UnsafeMutablePointer<fuse_file_info>?, _ op: Int32) {
    serve(req, .flock) { () throws(FSError) in
        guard let fi else { throw FSError.invalid }
        let type: LockType = op & LOCK_UN != 0 ? .unlock : (op & LOCK_EX != 0 ? .write : .read)
        try server(req).vfs.flock(
            fi.pointee.fh, owner: fi.pointee.lock_owner, pid: UInt32(bitPattern: fuse_req_ctx(req)!.pointee.pid), type: type,
            wait: op & LOCK_NB == 0, interrupted: { fuse_req_interrupted(req) != 0 })
        if type != .unlock { server(req).forgetKernelCache(ino) }
        fuse_reply_err(req, 0)
    }
}

/// Points the low-level operations table at the functions above.
func fillOperations(_ ops: inout fuse_lowlevel_ops) {
    ops.`init` = ll_init
    ops.destroy = ll_destroy
    ops.lookup = ll_lookup
    ops.forget = ll_forget
    ops.forget_multi = ll_forget_multi
    ops.getattr = ll_getattr
    ops.setattr = ll_setattr
    ops.readlink = ll_readlink
    ops.mknod = ll_mknod
    ops.mkdir = ll_mkdir
    ops.unlink = ll_unlink
    ops.rmdir = ll_rmdir
    ops.symlink = ll_symlink
    ops.rename = ll_rename
    ops.link = ll_link
    ops.open = ll_open
    ops.create = ll_create
    ops.read = ll_read
    ops.write = ll_write
    ops.flush = ll_flush
    ops.fallocate = ll_fallocate
    ops.copy_file_range = ll_copy_file_range
    ops.release = ll_release
    ops.fsync = ll_fsync
    ops.opendir = ll_opendir
    ops.readdir = ll_readdir
    ops.readdirplus = ll_readdirplus
    ops.releasedir = ll_releasedir
    ops.fsyncdir = ll_fsyncdir
    ops.statfs = ll_statfs
    ops.setxattr = ll_setxattr
    ops.getxattr = ll_getxattr
    ops.listxattr = ll_listxattr
    ops.removexattr = ll_removexattr
    ops.access = ll_access
    ops.getlk = ll_getlk
    ops.setlk = ll_setlk
    ops.flock = ll_flock
}
