#if canImport(Glibc)
    import Glibc
#endif

/// One slice record of a chunk: `len` bytes at `pos` in the chunk come from bytes
/// `off..<off+len` of slice `id` (whose stored length is `size`). Slice id 0 is a hole (zeros).
public struct Slice: Sendable, Equatable {
    public var pos: UInt32
    public var id: UInt64
    public var size: UInt32
    public var off: UInt32
    public var len: UInt32

    public init(pos: UInt32, id: UInt64, size: UInt32, off: UInt32, len: UInt32) {
        self.pos = pos
        self.id = id
        self.size = size
        self.off = off
        self.len = len
    }

    /// Size of one encoded record.
    public static let encodedSize = 24

    /// Appends the 24-byte big-endian record (`>I4I8I4I4I4`).
    public func encode(into w: inout ByteWriter) {
        w.u32(pos)
        w.u64(id)
        w.u32(size)
        w.u32(off)
        w.u32(len)
    }

    public func encoded() -> [UInt8] {
        var w = ByteWriter(capacity: Slice.encodedSize)
        encode(into: &w)
        return w.bytes
    }

    /// Decodes a chunk's concatenated records, oldest first.
    public static func decodeAll(_ bytes: [UInt8]) -> [Slice] {
        var r = ByteReader(bytes)
        var out: [Slice] = []
        out.reserveCapacity(bytes.count / encodedSize)
        while r.remaining >= encodedSize {
            out.append(Slice(pos: r.u32(), id: r.u64(), size: r.u32(), off: r.u32(), len: r.u32()))
        }
        return out
    }
}

/// A run of bytes of a chunk as readers see it: `len` bytes at `pos` come from offset `off` of
/// slice `id` (size `size`), or are zeros when `id` is 0.
public struct Segment: Sendable, Equatable {
    public var pos: UInt32
    public var len: UInt32
    public var id: UInt64
    public var size: UInt32
    public var off: UInt32

    public init(pos: UInt32, len: UInt32, id: UInt64, size: UInt32, off: UInt32) {
        self.pos = pos
        self.len = len
        self.id = id
        self.size = size
        self.off = off
    }
}

/// Builds the visible segments of a chunk from its slice records, newest winning.
public func buildView(_ slices: [Slice]) -> [Segment] {
    var view: [Segment] = []
    for s in slices where s.len > 0 {
        let start = s.pos
        let end = s.pos + s.len
        var next: [Segment] = []
        next.reserveCapacity(view.count + 2)
        for g in view {
            let gEnd = g.pos + g.len
            if gEnd <= start || g.pos >= end {
                next.append(g)
                continue
            }
            if g.pos < start {
                next.append(Segment(pos: g.pos, len: start - g.pos, id: g.id, size: g.size, off: g.off))
            }
            if gEnd > end {
                next.append(Segment(pos: end, len: gEnd - end, id: g.id, size: g.size, off: g.off + (end - g.pos)))
            }
        }
        next.append(Segment(pos: start, len: s.len, id: s.id, size: s.size, off: s.off))
        next.sort { $0.pos < $1.pos }
        view = next
    }
    return view
}

/// A file whose last link is gone and whose data waits to be deleted from the object store.
public struct PendingDelete: Sendable, Equatable {
    public var ino: Ino
    public var size: UInt64

    public init(ino: Ino, size: UInt64) {
        self.ino = ino
        self.size = size
    }
}
