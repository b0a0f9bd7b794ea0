/// The short encoding of an inode's attributes that the Redis engine stores for files of
/// volumes of format 5 (`VolumeFormat.currentVersion`): a record of about 20 bytes where the
/// fixed encoding (`Attr.encode`) takes 71, with a small file's slice record about 25, which
/// Redis keeps inside the key's object (a string of at most 44 bytes; at most 28 fit its
/// smallest allocation of 48) instead of in a separate allocation.
///
/// Layout: a byte `0b11fffttt` (flags `f`, type `t`; a fixed record starts with the type, 1 to
/// 7), then unsigned LEB128 numbers: mode exclusive-or 0o644, uid, gid exclusive-or uid, nlink,
/// size, parent, atime's seconds (zigzag) and nanoseconds (4 bytes, little-endian: most take 5
/// as LEB128); mtime as a zigzag difference of seconds from atime and its nanoseconds unless
/// flag 1 (mtime is atime); ctime likewise from mtime unless flag 2 (ctime is mtime); rdev
/// when flag 4. What follows, when the Redis engine keeps the records of the file's chunk 0
/// there, is their count (LEB128, at least 1) and each record as LEB128 numbers: id, then size times 2 plus 1 for a record of a whole
/// slice at the chunk's start (pos and off 0, len the size), else size times 2 and pos, off and
/// len (5 bytes for a small file's record where a `Slice` record takes 24).
extension Attr {
    private static let compactTag: UInt8 = 0xC0
    private static let sameMtime: UInt8 = 1
    private static let sameCtime: UInt8 = 2
    private static let hasRdev: UInt8 = 4

    /// The short encoding (see the extension's comment), followed by `firstChunk`'s records
    /// (`Slice` records, 24 bytes each) in theirs.
    public func encodeCompact(firstChunk: [UInt8] = []) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(40 + firstChunk.count / 2)
        var flags: UInt8 = 0
        if mtime == atime { flags |= Self.sameMtime }
        if ctime == mtime { flags |= Self.sameCtime }
        if rdev != 0 { flags |= Self.hasRdev }
        out.append(Self.compactTag | flags << 3 | type.rawValue)
        for v in [UInt64(mode ^ 0o644), UInt64(uid), UInt64(gid ^ uid), UInt64(nlink), size, parent] { leb(v, &out) }
        func time(_ t: Timespec, after base: Int64) {
            leb(zigzag(t.sec &- base), &out)
            for i in 0..<4 { out.append(UInt8(truncatingIfNeeded: t.nsec >> (8 * i))) }
        }
        time(atime, after: 0)
        if flags & Self.sameMtime == 0 { time(mtime, after: atime.sec) }
        if flags & Self.sameCtime == 0 { time(ctime, after: mtime.sec) }
        if flags & Self.hasRdev != 0 { leb(UInt64(rdev), &out) }
        let records = Slice.decodeAll(firstChunk)
        if !records.isEmpty { leb(UInt64(records.count), &out) }
        for s in records {
            let whole = s.pos == 0 && s.off == 0 && s.len == s.size
            leb(s.id, &out)
            leb(UInt64(s.size) << 1 | (whole ? 1 : 0), &out)
            if !whole { for v in [s.pos, s.off, s.len] { leb(UInt64(v), &out) } }
        }
        return out
    }

    /// A stored record in either encoding (`encode`, `encodeCompact`); nil when malformed.
    public static func decodeStored(_ bytes: [UInt8]) -> Attr? { storedParts(bytes)?.attr }

    /// The records of chunk 0 kept after a stored record in the short encoding, as `Slice`
    /// records (empty for the fixed encoding, or a record that cannot be read).
    public static func storedTail(_ bytes: [UInt8]) -> [UInt8] { storedParts(bytes)?.firstChunk ?? [] }

    /// The record, the length of its attributes, and the records of chunk 0 after them (as
    /// `Slice` records); nil when malformed. The fixed encoding is 71 bytes or more (what
    /// follows is not read).
    public static func storedParts(_ bytes: [UInt8]) -> (attr: Attr, length: Int, firstChunk: [UInt8])? {
        guard let first = bytes.first else { return nil }
        if first & compactTag != compactTag { return Attr(decoding: bytes).map { ($0, Attr.encodedSize, []) } }
        guard let type = FileType(rawValue: first & 0x07) else { return nil }
        let flags = first >> 3 & 0x07
        var r = LEBReader(bytes: bytes, at: 1)
        func time(after base: Int64) -> Timespec? {
            guard let d = r.next(), let ns = r.u32() else { return nil }
            return Timespec(sec: base &+ unzigzag(d), nsec: ns)
        }
        let u32 = UInt64(UInt32.max)
        guard let mode = r.next(max: UInt64(UInt16.max)), let uid = r.next(max: u32), let gidBits = r.next(max: u32),
            let nlink = r.next(max: u32), let size = r.next(), let parent = r.next(), let atime = time(after: 0)
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
            guard let v = r.next(max: u32) else { return nil }
            rdev = v
        }
        let length = r.at
        var chunk = ByteWriter(capacity: 0)
        // (A count first: bytes after the attributes that are not whole records are an error,
        // never slices.)
        var count: UInt64 = 0
        if r.at < bytes.count {
            guard let n = r.next(max: UInt64((bytes.count - r.at) / 2)), n > 0 else { return nil }
            count = n
        }
        for _ in 0..<count {
            guard let id = r.next(), let shape = r.next(max: u32 << 1 | 1) else { return nil }
            let size = UInt32(shape >> 1)
            if shape & 1 == 1 {
                Slice(pos: 0, id: id, size: size, off: 0, len: size).encode(into: &chunk)
                continue
            }
            guard let pos = r.next(max: u32), let off = r.next(max: u32), let len = r.next(max: u32) else { return nil }
            Slice(pos: UInt32(pos), id: id, size: size, off: UInt32(off), len: UInt32(len)).encode(into: &chunk)
        }
        guard r.at == bytes.count else { return nil }
        let a = Attr(
            type: type, mode: UInt16(mode) ^ 0o644, uid: UInt32(uid), gid: UInt32(gidBits) ^ UInt32(uid), nlink: UInt32(nlink), size: size,
            atime: atime, mtime: mtime,
            ctime: ctime, rdev: UInt32(rdev), parent: parent)
        return (a, length, chunk.bytes)
    }
}

/// Unsigned LEB128 numbers from a byte array.
private struct LEBReader {
    let bytes: [UInt8]
    var at: Int

    /// Four bytes, little-endian; nil when cut off.
    mutating func u32() -> UInt32? {
        guard bytes.count - at >= 4 else { return nil }
        defer { at += 4 }
        return (0..<4).reduce(UInt32(0)) { $0 | UInt32(bytes[at + $1]) << (8 * $1) }
    }

    /// The next number, nil when it is cut off, longer than 64 bits or above `max`.
    mutating func next(max: UInt64 = .max) -> UInt64? {
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
