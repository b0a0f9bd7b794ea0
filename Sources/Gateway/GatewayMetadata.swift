import Metadata
import StageFSCore
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// The metadata engine of a client that reaches its volume through a gateway: every operation
/// is one request, and the gateway runs the POSIX rules as the caller the kernel names. The
/// tags the gateway hands out with what it answers (`Grants`) are kept here and sent back with
/// the requests that need them; the caller's credential is not sent (the gateway would ignore it).
package final class GatewayMetadata: MetadataEngine, CloneAdmin, TrashAdmin, QuotaAdmin {
    package let client: GatewayClient
    let tags: GatewayTags
    /// Whether the volume has quotas, and when the gateway said so (`hasQuotas`).
    private let quotaFlag = QuotaFlag()

    private let ownUID = geteuid()
    private let recentDirs = PerThread<RecentDirs>()
    private let actsForOthers = geteuid() == 0

    /// Last closes of open files, sent a moment late, many at once.
    let closer: GatewayCloser

    package init(client: GatewayClient) {
        self.client = client
        self.tags = GatewayTags()
        self.closer = GatewayCloser(client: client, tags: tags)
    }

    package var displayName: String { client.description }

    /// Whom a request is for. A root client (a root mount with `allow_other`, serving every user
    /// of the node) names its caller, which the gateway honours from root. A user's client acts
    /// as that user, and root through `allow_root` with the user's rights; any other caller is
    /// refused here, since the gateway would take it for the mount's user.
    private func who(_ cred: Credential) throws(FSError) -> Credential? {
        if actsForOthers { return cred }
        if cred.uid == ownUID || cred.uid == 0 { return nil }
        throw FSError(EACCES, "this mount reaches its volume through a gateway as uid \(ownUID): uid \(cred.uid) mounts the volume itself")
    }

    // MARK: volume

    package func loadFormat() throws(FSError) -> VolumeFormat? {
        var r = try client.call(.loadFormat)
        return try VolumeFormat.decode(try r.string(max: 1 << 16))
    }

    package func initialize(_ format: VolumeFormat, force: Bool, rootMode: UInt16) throws(FSError) {
        throw FSError(EPERM, "a volume is formatted through its own META-URL, not through a gateway")
    }

    package func statfs() throws(FSError) -> StatFS { try statfs(rootIno) }

    package func statfs(_ ino: Ino) throws(FSError) -> StatFS {
        var r = try client.call(.statfs) { [tags] in tags.ref(&$0, ino) }
        return try r.statfs()
    }

    // MARK: quotas

    package func hasQuotas() throws(FSError) -> Bool { try quotaFlag.answer { () throws(FSError) in try quotasExist() } }

    package func reserveSpace(_ ino: Ino, sid: UInt64, bytes: Int64) throws(FSError) -> Bool {
        var r = try client.call(.reserveSpace) { [tags] in
            tags.ref(&$0, ino)
            $0.i64(bytes)
            $0.u64(tags.writes.withLock { $0[ino] } ?? 0)
            tags.currentSession(&$0)
        }
        return try r.bool()
    }

    package func releaseSpace(_ ino: Ino, sid: UInt64) throws(FSError) {
        _ = try client.call(.releaseSpace) { [tags] in
            tags.ref(&$0, ino)
            $0.u64(tags.writes.withLock { $0[ino] } ?? 0)
            tags.currentSession(&$0)
        }
    }

    // MARK: sessions

    package func newSession(_ info: SessionInfo) throws(FSError) -> UInt64 {
        var r = try client.call(.newSession) { $0.session(info) }
        let sid = try r.u64()
        let tag = try r.u64()
        tags.sessions.withLock { $0[sid] = tag }
        tags.current.withLock { $0 = sid }
        // The mount's changes now carry ids kept in its session's records.
        client.session.withLock { $0 = (sid, tag) }
        return sid
    }

    package func heartbeat(_ sid: UInt64) throws(FSError) {
        _ = try client.call(.heartbeat) { [tags] in tags.session(&$0, sid) }
    }

    package func closeSession(_ sid: UInt64) throws(FSError) {
        // The session's files are closed first (a closed session's opens go with it anyway).
        closer.drain()
        client.session.withLock { if $0?.sid == sid { $0 = nil } }
        _ = try client.call(.closeSession) { [tags] in tags.session(&$0, sid) }
    }

    package func listSessions() throws(FSError) -> [SessionInfo] {
        var r = try client.call(.listSessions)
        let n = try r.count(max: 1 << 20, itemSize: 8)
        var out: [SessionInfo] = []
        for _ in 0..<n { out.append(try r.session()) }
        return out
    }

    /// The gateway ends stale sessions itself.
    package func cleanStaleSessions(age: Int64) throws(FSError) -> Int { 0 }

    // MARK: namespace

    package func lookup(_ cred: Credential, _ parent: Ino, _ name: [UInt8]) throws(FSError) -> (Ino, Attr) {
        var r = try client.call(.lookup, onBehalf: try who(cred)) { [tags] in
            tags.ref(&$0, parent)
            $0.data(name)
        }
        return try tags.entry(&r)
    }

    package func getattr(_ ino: Ino) throws(FSError) -> Attr {
        var r = try client.call(.getattr) { [tags] in tags.ref(&$0, ino) }
        return try r.attr()
    }

    /// The directories' attributes the last change of this thread left (the gateway sends them
    /// with the change's reply), for the kernel's next question.
    package func recentAttr(_ ino: Ino) -> Attr? { recentDirs.value?.attrs[ino] }

    /// Reads the changed directories' attributes that end a change's reply, for `recentAttr`.
    private func noteDirs(_ r: inout WireReader) throws(FSError) {
        let n = try r.u8()
        var attrs: [Ino: Attr] = [:]
        for _ in 0..<n { attrs[try r.u64()] = try r.attr() }
        recentDirs.value = RecentDirs(attrs)
    }

    /// Runs a change of directories: what an earlier change of this thread left is forgotten
    /// first (a change that fails leaves nothing).
    private func changing<T>(_ body: () throws(FSError) -> T) throws(FSError) -> T {
        recentDirs.value = nil
        return try body()
    }

    package func setattr(_ cred: Credential, _ ino: Ino, _ req: SetAttrRequest) throws(FSError) -> Attr {
        var r = try client.call(.setattr, onBehalf: try who(cred)) { [tags] in
            tags.ref(&$0, ino)
            $0.setattr(req)
            $0.u64(tags.writes.withLock { $0[ino] } ?? 0)
            tags.currentSession(&$0)
        }
        return try r.attr()
    }

    package func access(_ cred: Credential, _ ino: Ino, _ mask: AccessMask) throws(FSError) {
        _ = try client.call(.access, onBehalf: try who(cred)) { [tags] in
            tags.ref(&$0, ino)
            $0.u32(mask.rawValue)
        }
    }

    package func mknod(
        _ cred: Credential, _ parent: Ino, _ name: [UInt8], _ type: FileType, _ mode: UInt16, rdev: UInt32, target: [UInt8]?
    ) throws(FSError) -> (Ino, Attr) {
        try changing { () throws(FSError) in
            var r = try client.call(.mknod, onBehalf: try who(cred)) { [tags] in
                tags.ref(&$0, parent)
                $0.data(name)
                $0.u8(type.rawValue)
                $0.u16(mode)
                $0.u32(rdev)
                $0.bool(target != nil)
                if let target { $0.data(target) }
            }
            let e = try tags.entry(&r)
            try noteDirs(&r)
            return e
        }
    }

    package func create(_ cred: Credential, _ parent: Ino, _ name: [UInt8], _ mode: UInt16, sid: UInt64) throws(FSError) -> (Ino, Attr) {
        try changing { () throws(FSError) in
            var r = try client.call(.create, onBehalf: try who(cred)) { [tags] in
                tags.ref(&$0, parent)
                $0.data(name)
                $0.u16(mode)
                tags.session(&$0, sid)
            }
            let (ino, a) = try tags.entry(&r)
            try tags.opened(&r, ino)
            try noteDirs(&r)
            return (ino, a)
        }
    }

    package func unlink(_ cred: Credential, _ parent: Ino, _ name: [UInt8]) throws(FSError) -> RemovedName {
        try removing(.unlink, cred, parent, name)
    }

    package func rmdir(_ cred: Credential, _ parent: Ino, _ name: [UInt8]) throws(FSError) -> RemovedName {
        try removing(.rmdir, cred, parent, name)
    }

    private func removing(_ op: Op, _ cred: Credential, _ parent: Ino, _ name: [UInt8]) throws(FSError) -> RemovedName {
        try changing { () throws(FSError) in
            var r = try client.call(op, onBehalf: try who(cred)) { [tags] in
                tags.ref(&$0, parent)
                $0.data(name)
            }
            let removed = try r.removed()
            try noteDirs(&r)
            return removed
        }
    }

    package func rename(
        _ cred: Credential, _ srcParent: Ino, _ srcName: [UInt8], _ dstParent: Ino, _ dstName: [UInt8], _ flags: RenameFlags
    ) throws(FSError) -> RenameResult {
        try changing { () throws(FSError) in
            var r = try client.call(.rename, onBehalf: try who(cred)) { [tags] in
                tags.ref(&$0, srcParent)
                $0.data(srcName)
                tags.ref(&$0, dstParent)
                $0.data(dstName)
                $0.u32(flags.rawValue)
            }
            let moved = try r.u64()
            let other = try r.u64()
            let otherTag = try r.u64()
            if other != 0 { tags.inodes.withLock { $0[other] = otherTag } }
            let removed = try r.bool() ? try r.removed() : nil
            try noteDirs(&r)
            return RenameResult(moved: moved, other: other, removed: removed)
        }
    }

    package func link(_ cred: Credential, _ ino: Ino, _ parent: Ino, _ name: [UInt8]) throws(FSError) -> Attr {
        try changing { () throws(FSError) in
            var r = try client.call(.link, onBehalf: try who(cred)) { [tags] in
                tags.ref(&$0, ino)
                tags.ref(&$0, parent)
                $0.data(name)
            }
            let a = try r.attr()
            try noteDirs(&r)
            return a
        }
    }

    package func readlink(_ ino: Ino) throws(FSError) -> [UInt8] {
        var r = try client.call(.readlink) { [tags] in tags.ref(&$0, ino) }
        return try r.data(max: 4096)
    }

    /// (The gateway does not say which entries have extended attributes: `xattrs` is not used.)
    package func readdir(_ ino: Ino, after cookie: UInt64, limit: Int, plus: Bool, xattrs: Bool) throws(FSError) -> [DirEntry] {
        var r = try client.call(.readdir) { [tags] in
            tags.ref(&$0, ino)
            $0.u64(cookie)
            $0.u32(UInt32(min(max(limit, 1), Wire.maxBatch)))
            $0.bool(plus)
        }
        let n = try r.count(max: Wire.maxBatch, itemSize: 30)
        var out: [DirEntry] = []
        out.reserveCapacity(n)
        var found: [(Ino, UInt64)] = []
        found.reserveCapacity(n)
        for _ in 0..<n {
            let name = try r.name()
            let child = try r.u64()
            found.append((child, try r.u64()))
            guard let type = FileType(rawValue: try r.u8()) else { throw Wire.malformed("an unknown file type") }
            let pos = try r.u64()
            let a = try r.bool() ? try r.attr() : nil
            out.append(DirEntry(name: name, ino: child, type: type, cookie: pos, attr: a))
        }
        tags.inodes.withLock { t in
            for (i, tag) in found { t[i] = tag }
        }
        return out
    }

    // MARK: extended attributes

    package func getxattr(_ cred: Credential, _ ino: Ino, _ name: [UInt8]) throws(FSError) -> [UInt8] {
        var r = try client.call(.getxattr, onBehalf: try who(cred)) { [tags] in
            tags.ref(&$0, ino)
            $0.data(name)
        }
        return try r.data(max: 65536)
    }

    package func listxattr(_ cred: Credential, _ ino: Ino) throws(FSError) -> [[UInt8]] {
        var r = try client.call(.listxattr, onBehalf: try who(cred)) { [tags] in tags.ref(&$0, ino) }
        let n = try r.count(max: 1 << 16, itemSize: 4)
        var out: [[UInt8]] = []
        for _ in 0..<n { out.append(try r.data(max: 256)) }
        return out
    }

    package func setxattr(_ cred: Credential, _ ino: Ino, _ name: [UInt8], _ value: [UInt8], _ flag: XattrFlag) throws(FSError) {
        _ = try client.call(.setxattr, onBehalf: try who(cred)) { [tags] in
            tags.ref(&$0, ino)
            $0.data(name)
            $0.data(value)
            $0.u32(flag.rawValue)
        }
    }

    package func removexattr(_ cred: Credential, _ ino: Ino, _ name: [UInt8]) throws(FSError) {
        _ = try client.call(.removexattr, onBehalf: try who(cred)) { [tags] in
            tags.ref(&$0, ino)
            $0.data(name)
        }
    }

    // MARK: file data

    package func open(_ cred: Credential, _ ino: Ino, flags: Int32, sid: UInt64) throws(FSError) -> (Attr, [Slice]?) {
        var (r, fd) = try client.callTakingDescriptor(.open, onBehalf: try who(cred)) { [tags] in
            tags.ref(&$0, ino)
            $0.i32(flags)
            tags.session(&$0, sid)
        }
        do throws(FSError) {
            let a = try r.attr()
            try tags.opened(&r, ino)
            let slices = try r.bool() ? try tags.chunk(&r) : nil
            if r.remaining > 0, try r.bool() {
                let key = try r.string(max: 1024)
                if fd >= 0 { tags.stash(key, fd) }
                fd = -1
            }
            if fd >= 0 { Sys.close(fd) }
            return (a, slices)
        } catch {
            if fd >= 0 { Sys.close(fd) }
            throw error
        }
    }

    /// The last close of an open file goes a moment later with others (`GatewayCloser`); the
    /// gateway, which deletes what an unlinked file leaves, sees whether it freed one.
    package func close(_ ino: Ino, sid: UInt64) throws(FSError) -> Bool {
        closer.add(ino, sid)
        return false
    }

    package func readChunk(_ ino: Ino, _ index: UInt32) throws(FSError) -> [Slice] {
        try readChunks([(ino, index)])[0]
    }

    package func readChunks(_ chunks: [(Ino, UInt32)]) throws(FSError) -> [[Slice]] {
        var out: [[Slice]] = []
        out.reserveCapacity(chunks.count)
        var start = 0
        while start < chunks.count {
            let part = chunks[start..<min(chunks.count, start + 512)]
            var r = try client.call(.readChunks) { [tags] in
                tags.currentSession(&$0)
                $0.u32(UInt32(part.count))
                for (ino, index) in part {
                    tags.ref(&$0, ino)
                    $0.u32(index)
                    $0.u64(tags.reads.withLock { $0[ino] } ?? 0)
                }
            }
            // The gateway answers as many as fit in one reply (at least one).
            let answered = Int(try r.u32())
            guard answered >= 1 && answered <= part.count else { throw Wire.malformed("\(answered) chunks answered of \(part.count)") }
            for _ in 0..<answered { out.append(try tags.chunk(&r)) }
            start += answered
        }
        return out
    }

    package func getattrs(_ inos: [Ino]) throws(FSError) -> [Attr?] {
        var out: [Attr?] = []
        out.reserveCapacity(inos.count)
        var start = 0
        while start < inos.count {
            let part = inos[start..<min(inos.count, start + Wire.maxBatch)]
            var r = try client.call(.getattrs) { [tags] in
                $0.u32(UInt32(part.count))
                for ino in part { tags.ref(&$0, ino) }
            }
            for _ in part { out.append(try r.bool() ? try r.attr() : nil) }
            start += part.count
        }
        return out
    }

    package func writeSlice(_ ino: Ino, _ index: UInt32, _ slice: Slice, minSize: UInt64, mtime: Timespec, sid: UInt64) throws(FSError) -> Attr {
        // (The gateway takes the session from the connection.)
        guard let range = tags.range(of: slice.id) else { throw FSError(EIO, "slice \(slice.id) was not allocated by this client's gateway") }
        let pending = tags.takePending(slice.id)
        var r = try client.call(.writeSlice) { [tags] in
            tags.ref(&$0, ino)
            $0.u32(index)
            var w = ByteWriter(capacity: Slice.encodedSize)
            slice.encode(into: &w)
            $0.w.raw(w.bytes)
            $0.u64(minSize)
            $0.time(mtime)
            $0.u64(tags.writes.withLock { $0[ino] } ?? 0)
            $0.u64(range.first)
            $0.u64(range.count)
            $0.u64(range.tag)
            tags.currentSession(&$0)
            $0.u32(UInt32(pending.count))
            for p in pending {
                $0.string(p.key)
                $0.data(p.data)
            }
        }
        return try r.attr()
    }

    // MARK: the trash

    private func trash(_ what: TrashOp, _ fields: (inout WireWriter) -> Void = { _ in }) throws(FSError) -> WireReader {
        try client.call(.trash) {
            $0.u8(what.rawValue)
            fields(&$0)
        }
    }

    package func trashUsage() throws(FSError) -> (inodes: Int64, bytes: Int64) {
        var r = try trash(.usage)
        return (try r.i64(), try r.i64())
    }

    package func trashHours(limit: Int) throws(FSError) -> [(Ino, Int64)] {
        var r = try trash(.hours)
        var out: [(Ino, Int64)] = []
        for _ in 0..<(try r.count(max: 100_000, itemSize: 16)) { out.append((try r.u64(), try r.i64())) }
        return Array(out.prefix(limit))
    }

    package func trashOwnerDirs(_ hourDir: Ino, limit: Int) throws(FSError) -> [(Ino, UInt32)] {
        var r = try trash(.ownerDirs) { $0.u64(hourDir) }
        var out: [(Ino, UInt32)] = []
        for _ in 0..<(try r.count(max: 100_000, itemSize: 12)) { out.append((try r.u64(), try r.u32())) }
        return Array(out.prefix(limit))
    }

    package func trashEntries(in ownerDir: Ino, after: UInt64, limit: Int) throws(FSError) -> (entries: [TrashEntry], next: UInt64?) {
        var r = try trash(.entries) {
            $0.u64(ownerDir)
            $0.u64(after)
            $0.u32(UInt32(min(max(limit, 1), 1000)))
        }
        var out: [TrashEntry] = []
        for _ in 0..<(try r.count(max: 1000, itemSize: 16)) {
            let ino = try r.u64()
            let dir = try r.u64()
            let name = try r.data(max: 4096)
            let a = try r.attr()
            let origin = try r.bool() ? Trash.Origin.decode(try r.data(max: 1 << 16)) : nil
            out.append(TrashEntry(ino: ino, dir: dir, entryName: name, attr: a, origin: origin))
        }
        let more = try r.bool()
        let next = try r.u64()
        return (out, more ? next : nil)
    }

    package func purgeTrashed(_ cred: Credential, _ ino: Ino, ownerMayPurge: Bool) throws(FSError) -> Bool {
        var r = try trash(.purge) { $0.u64(ino) }
        return try r.bool()
    }

    package func restoreTrashed(_ cred: Credential, _ ino: Ino, to: Ino?, ownerMayRestore: Bool) throws(FSError) -> (Ino, [UInt8]) {
        var r = try trash(.restore) { [tags] in
            $0.u64(ino)
            $0.bool(to != nil)
            if let to { tags.ref(&$0, to) }
        }
        return (try r.u64(), try r.data(max: 4096))
    }

    package func removeEmptyTrashDir(_ dir: Ino) throws(FSError) {
        _ = try trash(.removeEmptyDir) { $0.u64(dir) }
    }

    // MARK: quotas (reading)

    package func quota(_ target: QuotaTarget) throws(FSError) -> QuotaInfo? {
        var r = try client.call(.quota) {
            $0.u8(0)
            $0.string(target.key)
        }
        return try r.count(max: 1, itemSize: 8) == 1 ? try r.quota() : nil
    }

    package func quotas() throws(FSError) -> [QuotaInfo] {
        var r = try client.call(.quota) { $0.u8(1) }
        var out: [QuotaInfo] = []
        for _ in 0..<(try r.count(max: 1 << 20, itemSize: 8)) { out.append(try r.quota()) }
        return out
    }

    package func quotasExist() throws(FSError) -> Bool {
        var r = try client.call(.hasQuotas)
        return try r.bool()
    }

    package func setQuota(_ target: QuotaTarget, _ limits: QuotaLimits) throws(FSError) -> QuotaInfo { throw Self.quotaAdmin }
    package func deleteQuota(_ target: QuotaTarget) throws(FSError) { throw Self.quotaAdmin }
    package func checkQuota(_ target: QuotaTarget, repair: Bool, progress: (Int) -> Void) throws(FSError) -> QuotaCheck { throw Self.quotaAdmin }

    static var quotaAdmin: FSError {
        FSError(EPERM, "quotas are set, deleted and checked with the volume's META-URL (an admin's), not through a gateway")
    }

    // MARK: clones

    package func cloneFile(
        _ cred: Credential, src: Ino, parent: Ino, name: [UInt8], preserve: Bool, umask: UInt16
    ) throws(FSError) -> (ino: Ino, attr: Attr, next: UInt32?) {
        var r = try client.call(.cloneFile, onBehalf: try who(cred)) { [tags] in
            tags.ref(&$0, src)
            tags.ref(&$0, parent)
            $0.data(name)
            $0.bool(preserve)
            $0.u16(umask)
        }
        let (ino, a) = try tags.entry(&r)
        let more = try r.bool()
        let next = try r.u32()
        return (ino, a, more ? next : nil)
    }

    package func cloneChunks(_ cred: Credential, src: Ino, dst: Ino, from: UInt32) throws(FSError) -> UInt32? {
        var r = try client.call(.cloneChunks, onBehalf: try who(cred)) { [tags] in
            tags.ref(&$0, src)
            tags.ref(&$0, dst)
            $0.u32(from)
        }
        let more = try r.bool()
        let next = try r.u32()
        return more ? next : nil
    }

    package func cloneFinish(_ cred: Credential, src: Ino, dst: Ino, preserve: Bool, umask: UInt16) throws(FSError) -> Attr {
        var r = try client.call(.cloneFinish, onBehalf: try who(cred)) { [tags] in
            tags.ref(&$0, src)
            tags.ref(&$0, dst)
            $0.bool(preserve)
            $0.u16(umask)
        }
        return try r.attr()
    }

    package func copyRange(_ cred: Credential, src: Ino, srcOff: UInt64, dst: Ino, dstOff: UInt64, length: UInt64) throws(FSError) -> (UInt64, Attr) {
        var r = try client.call(.copyRange, onBehalf: try who(cred)) { [tags] in
            tags.ref(&$0, src)
            $0.u64(srcOff)
            $0.u64(tags.reads.withLock { $0[src] } ?? 0)
            tags.ref(&$0, dst)
            $0.u64(dstOff)
            $0.u64(length)
            $0.u64(tags.writes.withLock { $0[dst] } ?? 0)
            tags.currentSession(&$0)
        }
        return (try r.u64(), try r.attr())
    }

    package func fallocate(_ cred: Credential, _ ino: Ino, zero: Bool, keepSize: Bool, offset: UInt64, length: UInt64) throws(FSError) -> Attr {
        var r = try client.call(.fallocate, onBehalf: try who(cred)) { [tags] in
            tags.ref(&$0, ino)
            $0.u8((zero ? 1 : 0) | (keepSize ? 2 : 0))
            $0.u64(offset)
            $0.u64(length)
            $0.u64(tags.writes.withLock { $0[ino] } ?? 0)
            tags.currentSession(&$0)
        }
        return try r.attr()
    }

    package func newSliceIDs(_ count: Int) throws(FSError) -> UInt64 {
        var r = try client.call(.newSliceIDs) { $0.u32(UInt32(count)) }
        let first = try r.u64()
        tags.addRange(SliceRange(first: first, count: UInt64(count), tag: try r.u64()))
        return first
    }

    /// The gateway deletes unreferenced data itself: a client has nothing to do.
    package func pendingDeletes(limit: Int) throws(FSError) -> [PendingDelete] { [] }
    package func finishDelete(_ pending: PendingDelete) throws(FSError) -> (slices: [Slice], done: Bool) { ([], true) }
    package func finishDeletes(limit: Int) throws(FSError) -> (slices: [Slice], more: Bool) { ([], false) }
    package func takeDroppedSlices(limit: Int) throws(FSError) -> [Slice] { [] }

    // MARK: locks

    package func updateLocks(_ ino: Ino, kind: UInt8, sid: UInt64, _ body: ([UInt8]) throws(FSError) -> [UInt8]?) throws(FSError) {
        throw FSError(ENOSYS, "lock tables are changed by the gateway")
    }

    package func getlk(_ ino: Ino, sid: UInt64, owner: UInt64, type: LockType, start: UInt64, end: UInt64) throws(FSError) -> LockRange? {
        var r = try lock(.getlk, ino, sid, owner, 0, type, start, end)
        return try r.lockRange()
    }

    package func setlk(_ ino: Ino, sid: UInt64, owner: UInt64, pid: UInt32, type: LockType, start: UInt64, end: UInt64) throws(FSError) {
        _ = try lock(.setlk, ino, sid, owner, pid, type, start, end)
    }

    package func flock(_ ino: Ino, sid: UInt64, owner: UInt64, pid: UInt32, type: LockType) throws(FSError) {
        _ = try lock(.flock, ino, sid, owner, pid, type, 0, UInt64.max)
    }

    private func lock(
        _ op: Op, _ ino: Ino, _ sid: UInt64, _ owner: UInt64, _ pid: UInt32, _ type: LockType, _ start: UInt64, _ end: UInt64
    ) throws(FSError) -> WireReader {
        try client.call(op) { [tags] in
            tags.ref(&$0, ino)
            tags.session(&$0, sid)
            $0.u64(owner)
            $0.u32(pid)
            $0.u32(type.rawValue)
            $0.u64(start)
            $0.u64(end)
            $0.u64(tags.reads.withLock { $0[ino] } ?? 0)
            $0.u64(tags.writes.withLock { $0[ino] } ?? 0)
        }
    }
}

/// Last closes of open files, sent a moment late and many at once. Nothing waits for a close
/// (the kernel answers a release without waiting, and a close has nothing to tell), and sent one
/// by one, each wakes the gateway and its Redis while the next operations need them: a close
/// waits at most `delay` (or until `batch` wait), then the waiting ones go in one request
/// (`closes`), which the gateway carries out in one commit.
/// Ending a session sends its waiting closes first.
///
/// A delayed close gives a client nothing it could not take anyway (it may keep a file open as
/// long as it likes): the rights the open gave end, and an unlinked file is freed, `delay` later.
/// The close of a file opened again meanwhile still balances its open (opens are counted).
final class GatewayCloser: @unchecked Sendable {
    // @unchecked: every mutable field is guarded by `lock` (a ConditionLock, on which the sending
    // thread waits for closes and for their time).
    private let client: GatewayClient
    private let tags: GatewayTags
    private let lock = ConditionLock()
    private var waiting: [(ino: Ino, sid: UInt64)] = []
    /// When the oldest waiting close came.
    private var since: UInt64 = 0
    /// Whether the sending thread runs (it ends after a second with nothing to send).
    private var running = false
    /// Batches taken and not yet answered.
    private var sending = 0
    static let delay = 0.005
    static let batch = 64

    init(client: GatewayClient, tags: GatewayTags) {
        self.client = client
        self.tags = tags
    }

    func add(_ ino: Ino, _ sid: UInt64) {
        let start = lock.withLock { () -> Bool in
            if waiting.isEmpty {
                since = Sys.monotonicNanos()
                lock.signal()
            }
            waiting.append((ino, sid))
            if waiting.count >= Self.batch { lock.signal() }
            if running { return false }
            running = true
            return true
        }
        if start && !DetachedThread.start({ [self] in run() }) {
            lock.withLock { running = false }
            drain()
        }
    }

    private func run() {
        while let batch = next() {
            send(batch)
            lock.withLock {
                sending -= 1
                lock.broadcast()
            }
        }
    }

    /// The next batch once it is due; nil (and the thread ends) after a second with none.
    private func next() -> [(ino: Ino, sid: UInt64)]? {
        lock.withLock {
            let idle = Sys.monotonicNanos()
            while true {
                if waiting.isEmpty {
                    if Sys.monotonicNanos() - idle > 1_000_000_000 {
                        running = false
                        return nil
                    }
                    lock.wait(seconds: 1)
                    continue
                }
                let age = Double(Sys.monotonicNanos() - since) / 1e9
                if waiting.count >= Self.batch || age >= Self.delay { break }
                lock.wait(seconds: Self.delay - age)
            }
            let batch = Array(waiting.prefix(Self.batch))
            waiting.removeFirst(batch.count)
            sending += 1
            return batch
        }
    }

    /// Sends every waiting close now and waits for those under way.
    func drain() {
        let all = lock.withLock { () -> [(ino: Ino, sid: UInt64)] in
            let all = waiting
            waiting = []
            sending += 1
            return all
        }
        for start in stride(from: 0, to: all.count, by: Self.batch) {
            send(Array(all[start..<min(all.count, start + Self.batch)]))
        }
        lock.withLock {
            sending -= 1
            lock.broadcast()
            while sending > 0 { lock.wait() }
        }
    }

    private func send(_ batch: [(ino: Ino, sid: UInt64)]) {
        let tags = tags
        do throws(FSError) {
            var r = try client.call(.closes) {
                $0.u32(UInt32(batch.count))
                for c in batch {
                    tags.ref(&$0, c.ino)
                    tags.session(&$0, c.sid)
                }
            }
            for _ in batch { _ = try r.bool() }
        } catch {
            // A batch refused whole (one of its files, say) goes again one by one, so that the
            // others are closed still; one the gateway could not be asked is lost for all.
            guard batch.count > 1 && error.code != EIO else {
                Log.warning("closing \(batch.count) file(s) (inode \(batch[0].ino)\(batch.count > 1 ? " and others" : "")): \(error.message)")
                return
            }
            for c in batch {
                do throws(FSError) {
                    _ = try client.call(.close) {
                        tags.ref(&$0, c.ino)
                        tags.session(&$0, c.sid)
                    }
                } catch {
                    Log.warning("closing inode \(c.ino): \(error.message)")
                }
            }
        }
    }
}

/// A range of slice ids the gateway allocated to this client, with its tag.
struct SliceRange: Sendable {
    let first: UInt64
    let count: UInt64
    let tag: UInt64
}

/// The tags a client holds (its own process's memory: what it reached).
final class GatewayTags: Sendable {
    let inodes = Mutex<[Ino: UInt64]>([:])
    let reads = Mutex<[Ino: UInt64]>([:])
    let writes = Mutex<[Ino: UInt64]>([:])
    let sessions = Mutex<[UInt64: UInt64]>([:])
    /// The session this client registered last (the mount's), named with the requests whose
    /// rights come from its opens.
    let current = Mutex<UInt64>(0)

    func currentSession(_ w: inout WireWriter) {
        session(&w, current.withLock { $0 })
    }
    /// Slice id → tag, in two generations: a lookup moves a tag to the newer one, and when the
    /// newer one is full the older is dropped, so tags in use stay and the table stays bounded.
    private let blocks = Mutex<(new: [UInt64: UInt64], old: [UInt64: UInt64])>(([:], [:]))
    private let ranges = Mutex<[SliceRange]>([])
    static let blockGeneration = 1 << 20

    func ref(_ w: inout WireWriter, _ ino: Ino) {
        w.ref(ino, ino == rootIno ? 0 : inodes.withLock { $0[ino] } ?? 0)
    }

    func session(_ w: inout WireWriter, _ sid: UInt64) {
        w.u64(sid)
        w.u64(sessions.withLock { $0[sid] } ?? 0)
    }

    /// An inode, its tag and attributes.
    func entry(_ r: inout WireReader) throws(FSError) -> (Ino, Attr) {
        let ino = try r.u64()
        let tag = try r.u64()
        inodes.withLock { $0[ino] = tag }
        return (ino, try r.attr())
    }

    /// The read and write tags of a file just opened (0: not granted).
    func opened(_ r: inout WireReader, _ ino: Ino) throws(FSError) {
        let read = try r.u64()
        let write = try r.u64()
        if read != 0 { reads.withLock { $0[ino] = read } }
        if write != 0 { writes.withLock { $0[ino] = write } }
    }

    /// A chunk's slices and their block tags.
    func chunk(_ r: inout WireReader) throws(FSError) -> [Slice] {
        let slices = try r.slices()
        var got: [(UInt64, UInt64)] = []
        got.reserveCapacity(slices.count)
        for s in slices { got.append((s.id, try r.u64())) }
        blocks.withLock { b in
            for (id, tag) in got where id != 0 {
                if b.new.count >= Self.blockGeneration {
                    b.old = b.new
                    b.new = [:]
                }
                b.new[id] = tag
            }
        }
        return slices
    }

    /// Small blocks written but not yet sent: each goes with its slice's commit (`writeSlice`),
    /// one request for both. At most 16 MiB wait; past that a block is sent at once.
    private let pending = Mutex<(blocks: [UInt64: [(key: String, data: [UInt8])]], bytes: Int)>(([:], 0))
    static let pendingBlockMax = 256 << 10
    static let pendingBytesMax = 16 << 20

    /// Keeps a small block of slice `id` for its commit; false when it must be sent now.
    func holdForCommit(_ id: UInt64, _ key: String, _ data: UnsafeRawBufferPointer) -> Bool {
        guard data.count <= Self.pendingBlockMax else { return false }
        return pending.withLock { p in
            guard p.bytes + data.count <= Self.pendingBytesMax, p.blocks[id, default: []].count < 4 else { return false }
            p.blocks[id, default: []].append((key, Array(data)))
            p.bytes += data.count
            return true
        }
    }

    func takePending(_ id: UInt64) -> [(key: String, data: [UInt8])] {
        pending.withLock { p in
            guard let list = p.blocks.removeValue(forKey: id) else { return [] }
            p.bytes -= list.reduce(0) { $0 + $1.data.count }
            return list
        }
    }

    /// Descriptors of blocks that came with an open, until read (at most 64: the oldest go).
    private let stashed = Mutex<[(key: String, fd: Int32)]>([])

    func stash(_ key: String, _ fd: Int32) {
        let old = stashed.withLock { list -> [Int32] in
            list.append((key, fd))
            guard list.count > 64 else { return [] }
            let gone = list.prefix(list.count - 64).map(\.fd)
            list.removeFirst(list.count - 64)
            return gone
        }
        for f in old { Sys.close(f) }
    }

    /// The stashed descriptor of `key`, taken (the caller closes it).
    func takeStashed(_ key: String) -> Int32? {
        stashed.withLock { list in
            guard let i = list.lastIndex(where: { $0.key == key }) else { return nil }
            return list.remove(at: i).fd
        }
    }

    func blockTag(_ id: UInt64) -> UInt64? {
        blocks.withLock { b in
            if let t = b.new[id] { return t }
            guard let t = b.old[id] else { return nil }
            b.new[id] = t
            return t
        }
    }

    func addRange(_ r: SliceRange) {
        ranges.withLock { list in
            list.append(r)
            if list.count > 4096 { list.removeFirst(list.count - 4096) }
        }
    }

    func range(of id: UInt64) -> SliceRange? {
        ranges.withLock { list in list.last { id >= $0.first && id - $0.first < $0.count } }
    }
}

/// What a change left of its directories' attributes, kept per thread (`GatewayMetadata.recentAttr`).
final class RecentDirs {
    let attrs: [Ino: Attr]
    init(_ attrs: [Ino: Attr]) { self.attrs = attrs }
}
