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

    /// The slice id, index and length a block key's last part `<id>_<index>_<length>` names.
    public static func parts(ofKey key: String) -> (id: UInt64, index: Int, length: Int)? {
        let name = key.split(separator: "/").last ?? ""
        let p = name.split(separator: "_", omittingEmptySubsequences: false)
        guard p.count == 3, p.allSatisfy({ $0.count <= 19 }), let id = UInt64(p[0]), let index = Int(p[1]), let length = Int(p[2]) else {
            return nil
        }
        return (id, index, length)
    }

    /// Every block of a slice (for deletion and checks).
    public func blocks(of slice: Slice) -> [Block] {
        guard slice.id != 0, slice.size > 0 else { return [] }
        var out: [Block] = []
        forEachBlock(slice: slice.id, size: slice.size, from: 0, count: Int(slice.size)) { b, _, _, _ in out.append(b) }
        return out
    }

    /// Every block key of a slice.
    public func keys(of slice: Slice) -> [String] { blocks(of: slice).map(\.key) }

    /// The blocks that bytes `from..<from+count` of slice `id` (of `size` bytes) lie in, in
    /// order: `body(block, offset in the block, bytes of the range before it, bytes taken from
    /// it)`. The one place a range of a slice becomes blocks (reads, read-ahead, staging,
    /// stores). Stops at the slice's end; returns the bytes of the range it covered.
    @discardableResult
    public func forEachBlock<E: Error>(
        slice id: UInt64, size: UInt32, from: Int, count: Int, _ body: (Block, Int, Int, Int) throws(E) -> Void
    ) throws(E) -> Int {
        var off = from
        var done = 0
        while done < count && off < Int(size) {
            let index = off / blockSize
            let inBlock = off % blockSize
            let length = blockLength(sliceSize: size, index: index)
            let take = min(count - done, length - inBlock)
            try body(Block(key: key(slice: id, index: index, length: length), length: length), inBlock, done, take)
            off += take
            done += take
        }
        return done
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

    /// Grows to at least `n` bytes, keeping the contents (a mapped buffer is remapped: its
    /// pages move, no byte is copied).
    public func reserve(_ n: Int) {
        guard n > capacity else { return }
        let newCap = max(n, capacity * 2)
        if capacity >= Buffer.mapThreshold {
            base = Sys.remap(base, from: capacity, to: newCap)
            capacity = newCap
            return
        }
        let nb = Buffer.allocate(newCap)
        nb.copyMemory(from: base, byteCount: count)
        Buffer.free(base, capacity)
        base = nb
        capacity = newCap
    }

    public var bytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: base, count: count) }
}
