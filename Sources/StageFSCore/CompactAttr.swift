/// The short encoding of an inode's attributes that the Redis engine stores for files of
/// volumes of format 4 (`VolumeFormat.currentVersion`): a record of 20 to 40 bytes where the
/// fixed encoding (`Attr.encode`) takes 71, which Redis keeps inside the key's object (a string
/// of at most 44 bytes) instead of in a separate allocation.
///
/// Layout: a tag `0xC0 | type` (a fixed record starts with the type, 1 to 7), a flags byte, then
/// unsigned LEB128 numbers: mode, uid, gid, nlink, size, parent, atime's seconds (zigzag) and
/// nanoseconds; mtime as a zigzag difference of seconds from atime and its nanoseconds unless
/// flag 1 (mtime is atime); ctime likewise from mtime unless flag 2 (ctime is mtime); rdev
/// when flag 4. Nothing may follow.
extension Attr {
    private static let compactTag: UInt8 = 0xC0
    private static let sameMtime: UInt8 = 1
    private static let sameCtime: UInt8 = 2
    private static let hasRdev: UInt8 = 4

    /// The short encoding (see the extension's comment).
    public func encodeCompact() -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(40)
        var flags: UInt8 = 0
        if mtime == atime { flags |= Self.sameMtime }
        if ctime == mtime { flags |= Self.sameCtime }
        if rdev != 0 { flags |= Self.hasRdev }
        out.append(Self.compactTag | type.rawValue)
        out.append(flags)
        for v in [UInt64(mode), UInt64(uid), UInt64(gid), UInt64(nlink), size, parent] { leb(v, &out) }
        leb(zigzag(atime.sec), &out)
        leb(UInt64(atime.nsec), &out)
        if flags & Self.sameMtime == 0 {
            leb(zigzag(mtime.sec &- atime.sec), &out)
            leb(UInt64(mtime.nsec), &out)
        }
        if flags & Self.sameCtime == 0 {
            leb(zigzag(ctime.sec &- mtime.sec), &out)
            leb(UInt64(ctime.nsec), &out)
        }
        if flags & Self.hasRdev != 0 { leb(UInt64(rdev), &out) }
        return out
    }

    /// A stored record in either encoding (`encode`, `encodeCompact`); nil when malformed.
    public static func decodeStored(_ bytes: [UInt8]) -> Attr? {
        guard let first = bytes.first else { return nil }
        if first & 0xF8 != compactTag { return Attr(decoding: bytes) }
        guard let type = FileType(rawValue: first & 0x07), bytes.count >= 2 else { return nil }
        let flags = bytes[1]
        guard flags & ~(sameMtime | sameCtime | hasRdev) == 0 else { return nil }
        var at = 2
        func next(max: UInt64 = .max) -> UInt64? {
            var v: UInt64 = 0
            var shift: UInt64 = 0
            while at < bytes.count {
                let b = bytes[at]
                at += 1
                // (The tenth byte of a 64-bit number holds its top bit alone.)
                if shift == 63 && b > 1 { return nil }
                v |= UInt64(b & 0x7F) << shift
                if b & 0x80 == 0 { return v <= max ? v : nil }
                shift += 7
                if shift > 63 { return nil }
            }
            return nil
        }
        func time(after base: Int64) -> Timespec? {
            guard let d = next(), let ns = next(max: UInt64(UInt32.max)) else { return nil }
            return Timespec(sec: base &+ unzigzag(d), nsec: UInt32(ns))
        }
        guard let mode = next(max: UInt64(UInt16.max)), let uid = next(max: UInt64(UInt32.max)), let gid = next(max: UInt64(UInt32.max)),
            let nlink = next(max: UInt64(UInt32.max)), let size = next(), let parent = next(), let atime = time(after: 0)
        else { return nil }
        var mtime = atime
        if flags & sameMtime == 0 {
            guard let t = time(after: atime.sec) else { return nil }
            mtime = t
        }
        var ctime = mtime
        if flags & sameCtime == 0 {
            guard let t = time(after: mtime.sec) else { return nil }
            ctime = t
        }
        var rdev: UInt64 = 0
        if flags & hasRdev != 0 {
            guard let r = next(max: UInt64(UInt32.max)) else { return nil }
            rdev = r
        }
        guard at == bytes.count else { return nil }
        return Attr(
            type: type, mode: UInt16(mode), uid: UInt32(uid), gid: UInt32(gid), nlink: UInt32(nlink), size: size, atime: atime, mtime: mtime,
            ctime: ctime, rdev: UInt32(rdev), parent: parent)
    }
}

private func leb(_ v: UInt64, _ out: inout [UInt8]) {
    var v = v
    while v >= 0x80 {
        out.append(UInt8(truncatingIfNeeded: v) | 0x80)
        v >>= 7
    }
    out.append(UInt8(v))
}

private func zigzag(_ v: Int64) -> UInt64 { UInt64(bitPattern: (v << 1) ^ (v >> 63)) }
private func unzigzag(_ v: UInt64) -> Int64 { Int64(bitPattern: v >> 1) ^ -Int64(bitPattern: v & 1) }
