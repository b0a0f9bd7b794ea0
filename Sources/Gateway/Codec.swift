import Metadata
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

// The fields of the values both sides send, in one place (see README.md for the layouts).

extension WireWriter {
    /// An inode a request names, with the tag that proves the caller reached it.
    package mutating func ref(_ ino: Ino, _ tag: UInt64) {
        u64(ino)
        u64(tag)
    }

    /// The caller a root client acts for: `u8 present`, then `u32 uid, u32 gid, u32 pid,
    /// u16 count` and that many `u32` groups.
    package mutating func credential(_ c: Credential?) {
        bool(c != nil)
        guard let c else { return }
        u32(c.uid)
        u32(c.gid)
        u32(c.pid)
        let groups = c.groups.prefix(Wire.maxGroups)
        u16(UInt16(groups.count))
        for g in groups { u32(g) }
    }

    package mutating func session(_ s: SessionInfo) {
        u64(s.sid)
        string(s.hostname)
        i32(s.pid)
        string(s.mountPoint)
        string(s.version)
        i64(s.started)
        i64(s.heartbeat)
        u32(s.uid ?? UInt32.max)
    }

    package mutating func setattr(_ r: SetAttrRequest) {
        u32(r.mask.rawValue)
        u16(r.mode)
        u32(r.uid)
        u32(r.gid)
        u64(r.size)
        time(r.atime)
        time(r.mtime)
        time(r.ctime)
        bool(r.viaHandle)
    }

    package mutating func removed(_ r: RemovedName) {
        u64(r.ino)
        attr(r.attr)
        bool(r.freed)
    }

    package mutating func statfs(_ s: StatFS) {
        u64(s.totalSpace)
        u64(s.availSpace)
        u64(s.usedSpace)
        u64(s.usedInodes)
        u64(s.availInodes)
    }

    package mutating func lockRange(_ r: LockRange?) {
        bool(r != nil)
        guard let r else { return }
        u32(r.type.rawValue)
        u64(r.start)
        u64(r.end)
        u32(r.pid)
    }
}

extension WireReader {
    package mutating func credential() throws(FSError) -> Credential? {
        guard try bool() else { return nil }
        let uid = try u32()
        let gid = try u32()
        let pid = try u32()
        let n = Int(try u16())
        if n > Wire.maxGroups { throw Wire.malformed("\(n) groups (at most \(Wire.maxGroups))") }
        var groups: [UInt32] = []
        for _ in 0..<n { groups.append(try u32()) }
        return Credential(uid: uid, gid: gid, groups: groups, pid: pid)
    }

    package mutating func session() throws(FSError) -> SessionInfo {
        let sid = try u64()
        let host = try string(max: 256)
        let pid = try i32()
        let mp = try string(max: 4096)
        let version = try string(max: 64)
        var s = SessionInfo(sid: sid, hostname: host, pid: pid, mountPoint: mp, version: version, started: try i64(), heartbeat: try i64())
        let uid = try u32()
        s.uid = uid == UInt32.max ? nil : uid
        return s
    }

    package mutating func setattr() throws(FSError) -> SetAttrRequest {
        var r = SetAttrRequest(mask: SetAttrMask(rawValue: try u32()))
        r.mode = try u16()
        r.uid = try u32()
        r.gid = try u32()
        r.size = try u64()
        r.atime = try time()
        r.mtime = try time()
        r.ctime = try time()
        r.viaHandle = try bool()
        return r
    }

    package mutating func removed() throws(FSError) -> RemovedName {
        RemovedName(ino: try u64(), attr: try attr(), freed: try bool())
    }

    package mutating func statfs() throws(FSError) -> StatFS {
        StatFS(totalSpace: try u64(), availSpace: try u64(), usedSpace: try u64(), usedInodes: try u64(), availInodes: try u64())
    }

    package mutating func lockType() throws(FSError) -> LockType {
        guard let t = LockType(rawValue: try u32()) else { throw Wire.malformed("an unknown lock type") }
        return t
    }

    package mutating func lockRange() throws(FSError) -> LockRange? {
        guard try bool() else { return nil }
        return LockRange(type: try lockType(), start: try u64(), end: try u64(), pid: try u32())
    }
}

/// What a request carries after its credential block so that sending it again is safe
/// (README.md, "Request ids"): `u8 flags` (bit 0: an id follows; bit 1: sent again after the
/// connection broke before its reply), then, with an id, `u64 session`, `u64 session tag`,
/// `u32 slot`, `u64 number`.
package struct RequestMark: Sendable, Equatable {
    package var resend = false
    package var id: ID?
    /// The gateway's keyed digest of the request (`Grants.digest`; not on the wire): a record
    /// answers only the request that made it.
    package var digest: UInt64 = 0

    package struct ID: Sendable, Equatable {
        package var session: UInt64
        package var sessionTag: UInt64
        package var slot: UInt32
        package var number: UInt64

        package init(session: UInt64, sessionTag: UInt64, slot: UInt32, number: UInt64) {
            self.session = session
            self.sessionTag = sessionTag
            self.slot = slot
            self.number = number
        }
    }

    package init(resend: Bool = false, id: ID? = nil) {
        self.resend = resend
        self.id = id
    }

    /// Slots a client may number its requests in (the records of a session stay this small).
    package static let slots: UInt32 = 1024
}

extension WireWriter {
    package mutating func quota(_ q: QuotaInfo) {
        string(q.target.key)
        u64(q.limits.capacity)
        u64(q.limits.inodes)
        i64(q.usage.space)
        i64(q.usage.inodes)
        i64(q.usage.trashSpace)
        i64(q.usage.trashInodes)
    }
}

extension WireReader {
    package mutating func quota() throws(FSError) -> QuotaInfo {
        let key = try string(max: 64)
        guard let t = QuotaTarget(key: key) else { throw Wire.malformed("a quota named '\(key)'") }
        let limits = QuotaLimits(capacity: try u64(), inodes: try u64())
        let usage = QuotaUsage(space: try i64(), inodes: try i64(), trashSpace: try i64(), trashInodes: try i64())
        return QuotaInfo(target: t, limits: limits, usage: usage)
    }
}

extension WireWriter {
    package mutating func mark(_ m: RequestMark) {
        u8((m.id != nil ? 1 : 0) | (m.resend ? 2 : 0))
        guard let id = m.id else { return }
        u64(id.session)
        u64(id.sessionTag)
        u32(id.slot)
        u64(id.number)
    }
}

extension WireReader {
    package mutating func mark() throws(FSError) -> RequestMark {
        let flags = try u8()
        guard flags & ~3 == 0 else { throw Wire.malformed("unknown request flags \(flags)") }
        var m = RequestMark(resend: flags & 2 != 0)
        if flags & 1 != 0 {
            m.id = RequestMark.ID(session: try u64(), sessionTag: try u64(), slot: try u32(), number: try u64())
            guard m.id!.slot < RequestMark.slots, m.id!.number > 0 else {
                throw Wire.malformed("request slot \(m.id!.slot) (below \(RequestMark.slots)) or number 0")
            }
        }
        return m
    }
}
