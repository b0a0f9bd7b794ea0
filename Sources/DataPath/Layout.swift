import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// Names and shapes of the immutable blocks of a volume.
public struct Layout: Sendable {
    /// The volume name: the first part of every object key.
    public let volume: String
    /// The largest block, in bytes (fixed at format).
    public let blockSize: Int

    public init(volume: String, blockSize: Int) {
        self.volume = volume
        self.blockSize = blockSize
    }

    /// `<volume>/chunks/<id/1e6>/<id/1e3>/<id>_<index>_<length>`: the object key and, under
    /// the cache directory, the cache file name of one block.
    public func key(slice id: UInt64, index: Int, length: Int) -> String {
        "\(volume)/chunks/\(id / 1_000_000)/\(id / 1_000)/\(id)_\(index)_\(length)"
    }

    /// The length of block `index` of a slice of `size` bytes.
    public func blockLength(sliceSize: UInt32, index: Int) -> Int {
        min(blockSize, Int(sliceSize) - index * blockSize)
    }

    /// The slice id of a block key `<volume>/chunks/a/b/<id>_<index>_<length>`.
    public static func sliceID(ofKey key: String) -> UInt64? {
        // (Read from the bytes: splitting the string cost a few percent of a mount's CPU per
        // small file.)
        let u = key.utf8
        let start = u.lastIndex(of: UInt8(ascii: "/")).map { u.index(after: $0) } ?? u.startIndex
        var id: UInt64 = 0
        var digits = 0
        for b in u[start...] {
            if b == UInt8(ascii: "_") { break }
            guard b >= 48 && b <= 57, digits < 19 else { return nil }
            id = id * 10 + UInt64(b - 48)
            digits += 1
        }
        return digits > 0 ? id : nil
    }

    /// Every block key of a slice (for deletion).
    public func keys(of slice: Slice) -> [String] {
        guard slice.id != 0, slice.size > 0 else { return [] }
        let count = (Int(slice.size) + blockSize - 1) / blockSize
        return (0..<count).map { key(slice: slice.id, index: $0, length: blockLength(sliceSize: slice.size, index: $0)) }
    }
}


/// A buffer with a fixed address, freed with its owner (no copy-on-write surprises). Buffers of
/// 64 KiB and more are mapped from the kernel and unmapped when freed, so memory held by
/// finished blocks does not linger.
public final class Buffer: @unchecked Sendable {
    public private(set) var base: UnsafeMutableRawPointer
    public private(set) var capacity: Int
    public var count: Int
    /// Bytes of a budget this buffer holds, for whoever releases them with it.
    public var budgeted = 0
    private static let mapThreshold = 64 << 10

    public init(capacity: Int) {
        self.capacity = max(capacity, 1)
        base = Buffer.allocate(self.capacity)
        count = 0
    }

    deinit { Buffer.free(base, capacity) }

    private static func allocate(_ n: Int) -> UnsafeMutableRawPointer {
        n >= mapThreshold ? Sys.map(n) : UnsafeMutableRawPointer.allocate(byteCount: n, alignment: 64)
    }

    private static func free(_ p: UnsafeMutableRawPointer, _ n: Int) {
        if n >= mapThreshold { Sys.unmap(p, n) } else { p.deallocate() }
    }

    /// Grows to at least `n` bytes, keeping the contents.
    public func reserve(_ n: Int) {
        guard n > capacity else { return }
        let newCap = max(n, capacity * 2)
        let nb = Buffer.allocate(newCap)
        nb.copyMemory(from: base, byteCount: count)
        Buffer.free(base, capacity)
        base = nb
        capacity = newCap
    }

    public var bytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: base, count: count) }
}
