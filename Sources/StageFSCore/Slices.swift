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

/// A file whose last link is gone and whose data waits to be deleted from the object store.
public struct PendingDelete: Sendable, Equatable {
    public var ino: Ino
    public var size: UInt64

    public init(ino: Ino, size: UInt64) {
        self.ino = ino
        self.size = size
    }
}
