import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// The shared engine: `redis://host:port/db` (or a master found through Sentinels). Each
/// operation is one Lua script run with `EVALSHA` (one round trip, atomic on the server); see
/// `RedisScripts`. Calls that meet a broken connection, a restarting or failing-over server are
/// retried (`RedisPool`); scripts that change anything carry a request id so that a retry after
/// a lost reply answers the first outcome and is never applied twice.
package final class RedisMetadata: MetadataEngine, @unchecked Sendable {
    private let pool: RedisPool
    package let displayName: String
    private var shas: [String: String] = [:]
    /// This client's request-id hash (`rq<random>`), request numbers, and slots (one request each).
    private let requestKey: String
    private let requestNumbers = Counter()
    private let slots = RequestSlots()
    private let waitReplicas: Int
    private let waitTimeoutMillis: Int

    package init(location: RedisLocation, retryTimeout: Double = 60) throws(FSError) {
        pool = try RedisPool(location)
        pool.retryTimeout = retryTimeout
        displayName = pool.displayName
        waitReplicas = location.waitReplicas
        waitTimeoutMillis = location.waitTimeoutMillis
        requestKey = "rq" + Sys.randomBytes(8).map { String($0, radix: 16) }.joined()
        // Connect now (no retry) so an unreachable server is reported at once, and load the scripts.
        var loaded: [String: String] = [:]
        try pool.once { (c) throws(FSError) in
            for (name, _) in RedisScripts.all {
                let reply = try c.command(["SCRIPT", "LOAD", RedisScripts.text(name)])
                guard let sha = reply.text, case .string = reply else {
                    if case .error(let e) = reply, e.contains("NOAUTH") || e.contains("WRONGPASS") {
                        throw FSError(EACCES, "\(displayName) wants a password: \(e)")
                    }
                    throw FSError(EIO, "\(displayName) refused StageFS's Lua script '\(name)': \(reply)")
                }
                loaded[name] = sha
            }
        }
        shas = loaded
    }

    // MARK: plumbing

    private func credArgs(_ cred: Credential) -> [any RedisArg] {
        let now = Timespec.now()
        let groups = cred.groups.map(String.init).joined(separator: ",")
        return [cred.uid, cred.gid, groups, now.sec, now.nsec]
    }

    /// Runs script `name` with the caller's credential and `args`; returns the reply after the
    /// status element, or throws the errno the script gave. Retries are safe: the arguments
    /// (times included) are fixed once, and a changing script carries its request id.
    private func run(_ name: String, _ cred: Credential, _ args: [any RedisArg]) throws(FSError) -> [RedisReply] {
        var argv = credArgs(cred) + args
        var keys: [any RedisArg] = [0]
        let mutating = RedisScripts.mutating.contains(name)
        var slot: Int?
        if mutating {
            let s = slots.take()
            slot = s
            argv.append("\(s):\(requestNumbers.next())")
            keys = [1, requestKey]
        }
        defer { if let slot { slots.give(slot) } }
        let wait: [[any RedisArg]] = mutating && waitReplicas > 0 ? [["WAIT", waitReplicas, waitTimeoutMillis]] : []
        let reply = try pool.with { (c) throws(FSError) -> RedisReply in
            var r = try c.pipeline([["EVALSHA", shas[name]!] + keys + argv] + wait)
            if case .error(let e) = r[0], e.hasPrefix("NOSCRIPT") {
                // A restarted or promoted server has no scripts loaded: send the text (it stays cached).
                r = try c.pipeline([["EVAL", RedisScripts.text(name)] + keys + argv] + wait)
            }
            if !wait.isEmpty, let acked = r[1].int, acked < waitReplicas {
                throw FSError(
                    EIO,
                    "\(displayName): a metadata change reached \(acked) of the \(waitReplicas) replica(s) asked for (wait-replicas) within \(waitTimeoutMillis) ms"
                )
            }
            return r[0]
        }
        if case .error(let e) = reply { throw FSError(EIO, "\(displayName): script \(name) failed: \(e)") }
        let items = reply.array
        guard let status = items.first?.int else { throw FSError(EIO, "\(displayName): script \(name) gave no status") }
        if status != 0 { throw errnoError(Int32(status)) }
        return Array(items.dropFirst())
    }

    private func errnoError(_ code: Int32) -> FSError {
        switch code {
        case ENOENT: return .notFound
        case EEXIST: return .exists
        case ENOTDIR: return .notDir
        case EISDIR: return .isDir
        case ENOTEMPTY: return .notEmpty
        case EACCES: return .access
        case EPERM: return .perm
        case ENODATA: return .noAttr
        case EINVAL: return .invalid
        case ENAMETOOLONG: return .nameTooLong
        case EIO: return .damagedEntry
        default: return FSError.errno(code)
        }
    }

    private func cmd(_ args: [any RedisArg]) throws(FSError) -> RedisReply {
        let r = try pool.with { (c) throws(FSError) -> RedisReply in try c.command(args) }
        if case .error(let e) = r { throw FSError(EIO, "\(displayName): \(e)") }
        return r
    }

    private func decodeAttr(_ r: RedisReply?) throws(FSError) -> Attr {
        guard let b = r?.bytes, let a = Attr(decoding: b) else { throw FSError(EIO, "\(displayName): corrupt inode record") }
        return a
    }

    private func inoOf(_ r: RedisReply?) -> Ino { Ino(r?.int ?? 0) }

    // MARK: volume

    package func loadFormat() throws(FSError) -> VolumeFormat? {
        guard let text = try cmd(["GET", "setting"]).text else {
            let tagged = "{\(pool.location.db)}setting"
            if try cmd(["EXISTS", tagged]).int == 1 {
                throw FSError(
                    EINVAL,
                    "\(displayName) holds a volume of the transactional Redis engine (its keys start with the hash tag {\(pool.location.db)}): open it with engine=txn in the META-URL or \(RedisEngineKind.environmentVariable)=txn"
                )
            }
            return nil
        }
        return try VolumeFormat.decode(text)
    }

    package func initialize(_ format: VolumeFormat, force: Bool, rootMode: UInt16) throws(FSError) {
        // Check and write as one step: the script refuses when the record changed after it was
        // read (another format at the same time), and the check runs again.
        for _ in 0..<20 {
            let text = try cmd(["GET", "setting"]).text
            var record = format
            if let text {
                let old = try VolumeFormat.decode(text)
                if !force && !format.differences(from: old).isEmpty {
                    throw format.reformatRefused(existing: old, in: displayName)
                }
                record.uuid = old.uuid
                record.createdAt = old.createdAt
            }
            do {
                _ = try run("initialize", .root, [record.encoded(), rootMode & 0o7777, text ?? ""])
                return
            } catch {
                if error.code != EAGAIN { throw error }
            }
        }
        throw FSError(EAGAIN, "\(displayName) is being formatted by another client at the same time; try again")
    }

    package func statfs() throws(FSError) -> StatFS {
        let r = try cmd(["MGET", "usedSpace", "usedInodes"]).array
        let used = UInt64(max(0, r.first?.int ?? 0))
        let inodes = UInt64(max(0, r.dropFirst().first?.int ?? 0))
        return makeStatFS(usedSpace: used, usedInodes: inodes)
    }

    // MARK: sessions

    package func newSession(_ info: SessionInfo) throws(FSError) -> UInt64 {
        var info = info
        info.started = Timespec.now().sec
        info.heartbeat = info.started
        // The session id is the hash field; the record's own sid is filled in when read.
        guard let sid = try run("newSession", .root, [encodeSession(info)]).first?.int else {
            throw FSError(EIO, "\(displayName): no session id")
        }
        return UInt64(sid)
    }

    package func heartbeat(_ sid: UInt64) throws(FSError) {
        let now = Timespec.now().sec
        let r = try cmd(["ZADD", "sessions", "XX", "CH", now, sid])
        if r.int == 0, try cmd(["ZSCORE", "sessions", sid]) == .null {
            throw FSError(ENOENT, "session \(sid) is gone (cleaned up as stale)")
        }
    }

    package func closeSession(_ sid: UInt64) throws(FSError) {
        // Bounded steps: a session may hold very many open files and locks.
        var cursor = "0"
        while cursor != "done" {
            cursor = try run("closeSession", .root, [sid, cursor]).first?.text ?? "done"
        }
    }

    package func listSessions() throws(FSError) -> [SessionInfo] {
        let r = try pool.with { (c) throws(FSError) in
            try c.pipeline([["ZRANGE", "sessions", 0, -1, "WITHSCORES"], ["HGETALL", "sessionInfos"]])
        }
        var beats: [UInt64: Int64] = [:]
        let z = r[0].array
        for i in stride(from: 0, to: z.count - 1, by: 2) {
            if let sid = z[i].int, let t = z[i + 1].text.flatMap({ Double($0) }) { beats[UInt64(sid)] = Int64(t) }
        }
        var out: [SessionInfo] = []
        let h = r[1].array
        for i in stride(from: 0, to: h.count - 1, by: 2) {
            guard let text = h[i + 1].text, var info = decodeSession(text), let sid = h[i].int else { continue }
            info.sid = UInt64(sid)
            if let b = beats[info.sid] { info.heartbeat = b }
            out.append(info)
        }
        return out.sorted { $0.sid < $1.sid }
    }

    package func cleanStaleSessions(age: Int64) throws(FSError) -> Int {
        let limit = Timespec.now().sec - age
        let stale = try cmd(["ZRANGEBYSCORE", "sessions", "-inf", "(\(limit)"]).array.compactMap { $0.int }
        for sid in stale { try closeSession(UInt64(sid)) }
        return stale.count
    }

    // MARK: namespace

    package func lookup(_ cred: Credential, _ parent: Ino, _ name: [UInt8]) throws(FSError) -> (Ino, Attr) {
        let r = try run("lookup", cred, [parent, name])
        return (inoOf(r.first), try decodeAttr(r.dropFirst().first))
    }

    package func getattr(_ ino: Ino) throws(FSError) -> Attr {
        let r = try cmd(["GET", "i\(ino)"])
        if r == .null { throw FSError.notFound }
        return try decodeAttr(r)
    }

    package func setattr(_ cred: Credential, _ ino: Ino, _ req: SetAttrRequest) throws(FSError) -> Attr {
        if req.mask.contains(.size) && req.size > maxFileSize { throw FSError(EFBIG, "file too large (the largest is 1 PiB)") }
        // A cut that drops many chunks takes several bounded steps (see the script).
        while true {
            let r = try run(
                "setattr", cred,
                [
                    ino, req.mask.rawValue, req.mode, req.uid, req.gid, req.size,
                    req.atime.sec, req.atime.nsec, req.mtime.sec, req.mtime.nsec, req.ctime.sec, req.ctime.nsec,
                    req.viaHandle ? 1 : 0, chunkSize,
                ])
            if r.dropFirst().first?.int != 1 { return try decodeAttr(r.first) }
        }
    }

    package func access(_ cred: Credential, _ ino: Ino, _ mask: AccessMask) throws(FSError) {
        _ = try run("access", cred, [ino, mask.rawValue])
    }

    package func mknod(
        _ cred: Credential, _ parent: Ino, _ name: [UInt8], _ type: FileType, _ mode: UInt16, rdev: UInt32, target: [UInt8]?
    )
        throws(FSError) -> (Ino, Attr)
    {
        try validateName(name)
        if type == .symlink && (target == nil || target!.isEmpty || target!.count > 4095) { throw FSError.invalid }
        let r = try run("mknod", cred, [parent, name, type.rawValue, mode, rdev, target ?? [], 0])
        return (inoOf(r.first), try decodeAttr(r.dropFirst().first))
    }

    package func create(_ cred: Credential, _ parent: Ino, _ name: [UInt8], _ mode: UInt16, sid: UInt64) throws(FSError) -> (Ino, Attr) {
        try validateName(name)
        let r = try run("mknod", cred, [parent, name, FileType.regular.rawValue, mode, 0, [], sid])
        return (inoOf(r.first), try decodeAttr(r.dropFirst().first))
    }

    private func removed(_ r: [RedisReply]) throws(FSError) -> RemovedName? {
        let ino = inoOf(r.first)
        if ino == 0 { return nil }
        return RemovedName(ino: ino, attr: try decodeAttr(r.dropFirst().first), freed: r.dropFirst(2).first?.int == 1)
    }

    package func unlink(_ cred: Credential, _ parent: Ino, _ name: [UInt8]) throws(FSError) -> RemovedName {
        guard let r = try removed(try run("unlink", cred, [parent, name])) else { throw FSError.notFound }
        return r
    }

    package func rmdir(_ cred: Credential, _ parent: Ino, _ name: [UInt8]) throws(FSError) -> RemovedName {
        if name == [UInt8(ascii: ".")] { throw FSError.invalid }
        if name == [UInt8(ascii: "."), UInt8(ascii: ".")] { throw FSError.notEmpty }
        let r = try run("rmdir", cred, [parent, name])
        return RemovedName(ino: inoOf(r.first), attr: try decodeAttr(r.dropFirst().first), freed: true)
    }

    package func rename(_ cred: Credential, _ sp: Ino, _ sn: [UInt8], _ dp: Ino, _ dn: [UInt8], _ flags: RenameFlags) throws(FSError) -> RenameResult
    {
        if flags.contains(.whiteout) { throw FSError.notSupported }
        if flags.contains(.exchange) && flags.contains(.noReplace) { throw FSError.invalid }
        try validateName(dn)
        if sn.isEmpty || sn.count > maxNameLength { throw FSError.notFound }
        let r = try run("rename", cred, [sp, sn, dp, dn, flags.rawValue])
        return RenameResult(moved: inoOf(r.dropFirst(3).first), other: inoOf(r.dropFirst(4).first), removed: try removed(r))
    }

    package func link(_ cred: Credential, _ ino: Ino, _ parent: Ino, _ name: [UInt8]) throws(FSError) -> Attr {
        try validateName(name)
        return try decodeAttr(try run("link", cred, [ino, parent, name]).first)
    }

    package func readlink(_ ino: Ino) throws(FSError) -> [UInt8] {
        let r = try cmd(["MGET", "i\(ino)", "s\(ino)"]).array
        guard r.count == 2, r[0] != .null else { throw FSError.notFound }
        guard let t = r[1].bytes, !t.isEmpty else { throw FSError.invalid }
        return t
    }

    package func readdir(_ ino: Ino, after cookie: UInt64, limit: Int, plus: Bool) throws(FSError) -> [DirEntry] {
        let r = try run("readdir", .root, [ino, cookie, limit, plus ? 1 : 0])
        var out: [DirEntry] = []
        out.reserveCapacity(r.count / 4)
        var i = 0
        while i + 3 < r.count {
            defer { i += 4 }
            guard let name = r[i].bytes, let cookieText = r[i + 1].text, let ent = r[i + 2].bytes else { continue }
            var rd = ByteReader(ent)
            let cino = rd.u64()
            let type = FileType(rawValue: rd.u8()) ?? .regular
            let c = UInt64(Double(cookieText) ?? 0)
            var e = DirEntry(name: name, ino: cino, type: type, cookie: c)
            if plus { e.attr = Attr(decoding: r[i + 3].bytes ?? []) }
            out.append(e)
        }
        return out
    }

    // MARK: extended attributes

    package func getxattr(_ cred: Credential, _ ino: Ino, _ name: [UInt8]) throws(FSError) -> [UInt8] {
        try run("getxattr", cred, [ino, name]).first?.bytes ?? []
    }

    package func listxattr(_ cred: Credential, _ ino: Ino) throws(FSError) -> [[UInt8]] {
        try run("listxattr", cred, [ino]).compactMap { $0.bytes }
    }

    package func setxattr(_ cred: Credential, _ ino: Ino, _ name: [UInt8], _ value: [UInt8], _ flag: XattrFlag) throws(FSError) {
        if value.count > 65536 { throw FSError(E2BIG, "attribute value too large") }
        _ = try run("setxattr", cred, [ino, name, value, flag.rawValue])
    }

    package func removexattr(_ cred: Credential, _ ino: Ino, _ name: [UInt8]) throws(FSError) {
        _ = try run("removexattr", cred, [ino, name])
    }

    // MARK: file data

    package func open(_ cred: Credential, _ ino: Ino, flags: Int32, sid: UInt64) throws(FSError) -> (Attr, [Slice]?) {
        let r = try run("open", cred, [ino, accessMask(openFlags: flags).rawValue, sid])
        let a = try decodeAttr(r.first)
        return (a, r.count > 1 ? Slice.decodeAll(r[1].bytes ?? []) : nil)
    }

    @discardableResult package func close(_ ino: Ino, sid: UInt64) throws(FSError) -> Bool {
        _ = try run("close", .root, [ino, sid])
        return true
    }

    package func readChunk(_ ino: Ino, _ index: UInt32) throws(FSError) -> [Slice] {
        Slice.decodeAll(try cmd(["GET", "c\(ino)_\(index)"]).bytes ?? [])
    }

    package func readChunks(_ chunks: [(Ino, UInt32)]) throws(FSError) -> [[Slice]] {
        if chunks.isEmpty { return [] }
        var out: [[Slice]] = []
        out.reserveCapacity(chunks.count)
        for start in stride(from: 0, to: chunks.count, by: 1000) {
            let part = chunks[start..<min(chunks.count, start + 1000)]
            let r = try cmd(["MGET"] + part.map { "c\($0.0)_\($0.1)" as any RedisArg })
            out += r.array.map { Slice.decodeAll($0.bytes ?? []) }
        }
        return out
    }

    package func getattrs(_ inos: [Ino]) throws(FSError) -> [Attr?] {
        if inos.isEmpty { return [] }
        var out: [Attr?] = []
        out.reserveCapacity(inos.count)
        for start in stride(from: 0, to: inos.count, by: 1000) {
            let part = inos[start..<min(inos.count, start + 1000)]
            let r = try cmd(["MGET"] + part.map { "i\($0)" as any RedisArg })
            out += r.array.map { $0 == .null ? nil : Attr(decoding: $0.bytes ?? []) }
        }
        return out
    }

    package func writeSlice(_ ino: Ino, _ index: UInt32, _ slice: Slice, minSize: UInt64, mtime: Timespec) throws(FSError) -> Attr {
        try decodeAttr(try run("writeSlice", .root, [ino, index, slice.encoded(), minSize, mtime.sec, mtime.nsec]).first)
    }

    package func newSliceIDs(_ count: Int) throws(FSError) -> UInt64 {
        guard let last = try cmd(["INCRBY", "nextSlice", count]).int else { throw FSError(EIO, "\(displayName): no slice id") }
        return UInt64(last - Int64(count) + 1)
    }

    package func pendingDeletes(limit: Int) throws(FSError) -> [PendingDelete] {
        try cmd(["ZRANGE", "delfiles", 0, limit - 1]).array.compactMap { r -> PendingDelete? in
            guard let t = r.text else { return nil }
            let parts = t.split(separator: ":")
            guard parts.count == 2, let ino = UInt64(parts[0]), let size = UInt64(parts[1]) else { return nil }
            return PendingDelete(ino: ino, size: size)
        }
    }

    package func finishDelete(_ pending: PendingDelete) throws(FSError) -> (slices: [Slice], done: Bool) {
        let r = try run("finishDelete", .root, [pending.ino, pending.size])
        return (Slice.decodeAll(r.first?.bytes ?? []), r.dropFirst().first?.int == 1)
    }

    package func takeDroppedSlices(limit: Int) throws(FSError) -> [Slice] {
        Slice.decodeAll(try run("takeDropped", .root, [limit]).first?.bytes ?? [])
    }

    // MARK: locks

    package func updateLocks(_ ino: Ino, kind: UInt8, sid: UInt64, _ body: ([UInt8]) throws(FSError) -> [UInt8]?) throws(FSError) {
        let key: [UInt8] = Array("lk".utf8) + [kind] + Array(String(ino).utf8)
        // Locks are not on the small-file path: an optimistic WATCH/MULTI transaction is enough.
        for _ in 0..<100 {
            let done = try pool.with { (c) throws(FSError) -> Bool in
                _ = try c.command(["WATCH", key, "i\(ino)"])
                let cur = try c.pipeline([["GET", key], ["EXISTS", "i\(ino)"]])
                if cur[1].int != 1 {
                    _ = try c.command(["UNWATCH"])
                    throw FSError.notFound
                }
                let table: [UInt8]?
                do throws(FSError) {
                    table = try body(cur[0].bytes ?? [])
                } catch {
                    _ = try c.command(["UNWATCH"])
                    throw error
                }
                guard let table else {
                    _ = try c.command(["UNWATCH"])
                    return true
                }
                var cmds: [[any RedisArg]] = [["MULTI"]]
                cmds.append(table.isEmpty ? ["DEL", key] : ["SET", key, table])
                if sid != 0 { cmds.append(["SADD", "sl\(sid)", "\(ino):\(kind)"]) }
                cmds.append(["EXEC"])
                let replies = try c.pipeline(cmds)
                return replies.last != .null
            }
            if done { return }
        }
        throw FSError(EAGAIN, "\(displayName): lock table of inode \(ino) kept changing")
    }
}

/// Hands out request numbers, unique within this client.
final class Counter: @unchecked Sendable {
    private let lock = ConditionLock()
    private var value: UInt64 = 0

    func next() -> UInt64 {
        lock.withLock {
            value += 1
            return value
        }
    }
}

/// Small integers, each held by one request (with its retries) at a time: the field of the
/// request-id hash, so the hash holds as many entries as requests ever ran at once.
final class RequestSlots: @unchecked Sendable {
    private let lock = ConditionLock()
    private var free: [Int] = []
    private var count = 0

    func take() -> Int {
        lock.withLock {
            if let s = free.popLast() { return s }
            count += 1
            return count
        }
    }

    func give(_ s: Int) { lock.withLock { free.append(s) } }
}
