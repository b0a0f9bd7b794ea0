import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// One held lock: POSIX record lock (byte range) or flock (whole file, range unused).
struct LockRecord: Equatable {
    var sid: UInt64
    var owner: UInt64
    var pid: UInt32
    var type: LockType
    var start: UInt64
    var end: UInt64

    static let encodedSize = 37

    static func decodeAll(_ bytes: [UInt8]) -> [LockRecord] {
        var r = ByteReader(bytes)
        var out: [LockRecord] = []
        while r.remaining >= encodedSize {
            let sid = r.u64(), owner = r.u64(), pid = r.u32()
            let type = LockType(rawValue: UInt32(r.u8())) ?? .read
            out.append(LockRecord(sid: sid, owner: owner, pid: pid, type: type, start: r.u64(), end: r.u64()))
        }
        return out
    }

    static func encodeAll(_ recs: [LockRecord]) -> [UInt8] {
        var w = ByteWriter(capacity: recs.count * encodedSize)
        for r in recs {
            w.u64(r.sid)
            w.u64(r.owner)
            w.u32(r.pid)
            w.u8(UInt8(r.type.rawValue))
            w.u64(r.start)
            w.u64(r.end)
        }
        return w.bytes
    }

    func overlaps(_ start: UInt64, _ end: UInt64) -> Bool { self.start <= end && start <= self.end }
    func sameOwner(_ sid: UInt64, _ owner: UInt64) -> Bool { self.sid == sid && self.owner == owner }
}

/// Lock records one file's table may hold (of each kind): every lock operation reads and writes
/// the whole table, so it must stay small; past it a new lock fails with `ENOLCK`.
package let maxLocksPerInode = 4096

/// Lock records one session may hold in one file's table: so that no client fills a table
/// others need (a session holds at most this many, the table `maxLocksPerInode`).
package let maxLocksPerSession = 256

/// `ENOLCK` when one more lock of session `sid` would not fit in a table holding `recs`.
func checkLockRoom(_ recs: [LockRecord], _ sid: UInt64, _ ino: Ino) throws(FSError) {
    if recs.count >= maxLocksPerInode { throw FSError(ENOLCK, "inode \(ino) holds \(recs.count) locks, the most one file may have") }
    if recs.lazy.filter({ $0.sid == sid }).count >= maxLocksPerSession {
        throw FSError(ENOLCK, "session \(sid) holds \(maxLocksPerSession) locks on inode \(ino), the most one session may hold on a file")
    }
}

/// Lock kinds in the engine's lock tables.
enum LockKind {
    static let posix = UInt8(ascii: "p")
    static let flock = UInt8(ascii: "f")
}

extension MetadataEngine {
    /// `F_GETLK`: the first lock of another owner that conflicts with `type` on `start...end`.
    public func getlk(_ ino: Ino, sid: UInt64, owner: UInt64, type: LockType, start: UInt64, end: UInt64) throws(FSError) -> LockRange? {
        var found: LockRange?
        try updateLocks(ino, kind: LockKind.posix, sid: sid) { (blob) throws(FSError) -> [UInt8]? in
            for r in LockRecord.decodeAll(blob) where !r.sameOwner(sid, owner) && r.overlaps(start, end) {
                if r.type == .write || type == .write {
                    found = LockRange(type: r.type, start: r.start, end: r.end, pid: r.pid)
                    break
                }
            }
            return nil
        }
        return found
    }

    /// `F_SETLK`: takes, changes or releases (`.unlock`) a record lock; `EAGAIN` on conflict.
    public func setlk(_ ino: Ino, sid: UInt64, owner: UInt64, pid: UInt32, type: LockType, start: UInt64, end: UInt64) throws(FSError) {
        try updateLocks(ino, kind: LockKind.posix, sid: sid) { (blob) throws(FSError) -> [UInt8]? in
            let recs = LockRecord.decodeAll(blob)
            if type != .unlock {
                for r in recs where !r.sameOwner(sid, owner) && r.overlaps(start, end) && (r.type == .write || type == .write) {
                    throw FSError.again
                }
            }
            var out: [LockRecord] = []
            var changed = false
            for r in recs {
                guard r.sameOwner(sid, owner) && r.overlaps(start, end) else {
                    out.append(r)
                    continue
                }
                changed = true
                if r.start < start { out.append(LockRecord(sid: r.sid, owner: r.owner, pid: r.pid, type: r.type, start: r.start, end: start - 1)) }
                if r.end > end { out.append(LockRecord(sid: r.sid, owner: r.owner, pid: r.pid, type: r.type, start: end + 1, end: r.end)) }
            }
            if type != .unlock {
                try checkLockRoom(out, sid, ino)
                out.append(LockRecord(sid: sid, owner: owner, pid: pid, type: type, start: start, end: end))
                changed = true
            }
            return changed ? LockRecord.encodeAll(out) : nil
        }
    }

    /// `flock(2)`: shared (`.read`), exclusive (`.write`) or unlock; `EAGAIN` on conflict.
    public func flock(_ ino: Ino, sid: UInt64, owner: UInt64, pid: UInt32, type: LockType) throws(FSError) {
        try updateLocks(ino, kind: LockKind.flock, sid: sid) { (blob) throws(FSError) -> [UInt8]? in
            var recs = LockRecord.decodeAll(blob)
            if type != .unlock {
                for r in recs where !r.sameOwner(sid, owner) && (r.type == .write || type == .write) {
                    throw FSError.again
                }
            }
            let before = recs.count
            recs.removeAll { $0.sameOwner(sid, owner) }
            if type == .unlock && recs.count == before { return nil }
            if type != .unlock {
                try checkLockRoom(recs, sid, ino)
                recs.append(LockRecord(sid: sid, owner: owner, pid: pid, type: type, start: 0, end: UInt64.max))
            }
            return LockRecord.encodeAll(recs)
        }
    }
}

/// Drops a session's records from an encoded lock table (nil when it held none).
func strippingSession(_ sid: UInt64, from blob: [UInt8]) -> [UInt8]? {
    let recs = LockRecord.decodeAll(blob)
    let kept = recs.filter { $0.sid != sid }
    return kept.count == recs.count ? nil : LockRecord.encodeAll(kept)
}
