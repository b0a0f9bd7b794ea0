import CLZ4
import CZstd
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// How a volume's data blocks are stored, chosen at format (`--compress`). Each block is
/// compressed whole, alone: an LZ4 block (`lz4`, no frame) or one zstd frame at level 1
/// (`zstd`), as JuiceFS stores them, so a compressed JuiceFS volume's objects read as ours. A
/// block's key names its length before compression; the object holds what the codec made.
public enum BlockCodec: String, Sendable, CaseIterable, Codable {
    case none
    case lz4
    case zstd

    /// The zstd level: the fastest (writers must not wait on it).
    static let zstdLevel: Int32 = 1

    /// The most bytes a block of `length` bytes can take stored: what a reader allows for and
    /// what a writer sets aside.
    public func storedBound(_ length: Int) -> Int {
        switch self {
        case .none: return length
        case .lz4: return Int(LZ4_compressBound(Int32(clamping: length)))
        case .zstd: return ZSTD_compressBound(length)
        }
    }

    /// Compresses `src` into `dst` (at least `storedBound(src.count)` bytes); returns the bytes
    /// written.
    public func compress(_ src: UnsafeRawBufferPointer, into dst: UnsafeMutableRawBufferPointer) throws(FSError) -> Int {
        guard dst.count >= storedBound(src.count) else {
            throw FSError(EINVAL, "a buffer of \(dst.count) bytes is too small to compress \(src.count) bytes")
        }
        let from = src.baseAddress ?? UnsafeRawPointer(bitPattern: 1)!
        switch self {
        case .none:
            if src.count > 0 { dst.baseAddress!.copyMemory(from: from, byteCount: src.count) }
            return src.count
        case .lz4:
            let n = LZ4_compress_default(
                from.assumingMemoryBound(to: CChar.self), dst.baseAddress!.assumingMemoryBound(to: CChar.self), Int32(src.count),
                Int32(clamping: dst.count))
            if n <= 0 { throw FSError(EIO, "LZ4 could not compress a block of \(src.count) bytes") }
            return Int(n)
        case .zstd:
            let n = ZSTD_compress(dst.baseAddress, dst.count, from, src.count, Self.zstdLevel)
            if ZSTD_isError(n) != 0 { throw FSError(EIO, "zstd could not compress a block: \(String(cString: ZSTD_getErrorName(n)))") }
            return n
        }
    }

    /// Decompresses the stored block `src` into `dst`, which holds exactly the block's length
    /// (its key names it). Damaged data, or data that does not make exactly `dst.count` bytes,
    /// is an `EIO` error (never a write past `dst`).
    public func decompress(_ src: UnsafeRawBufferPointer, into dst: UnsafeMutableRawBufferPointer, what: String) throws(FSError) {
        let from = src.baseAddress ?? UnsafeRawPointer(bitPattern: 1)!
        switch self {
        case .none:
            guard src.count == dst.count else { throw FSError(EIO, "\(what) has \(src.count) bytes, expected \(dst.count)") }
            if src.count > 0 { dst.baseAddress!.copyMemory(from: from, byteCount: src.count) }
        case .lz4:
            guard src.count > 0, src.count <= Int(Int32.max), dst.count <= Int(Int32.max), let to = dst.baseAddress else {
                throw FSError(EIO, "\(what) is not an LZ4 block of \(dst.count) bytes (\(src.count) bytes stored)")
            }
            let n = LZ4_decompress_safe(
                from.assumingMemoryBound(to: CChar.self), to.assumingMemoryBound(to: CChar.self), Int32(src.count), Int32(dst.count))
            guard n == Int32(dst.count) else {
                throw FSError(EIO, "\(what) is damaged: it is not an LZ4 block of \(dst.count) bytes (\(src.count) bytes stored)")
            }
        case .zstd:
            guard let to = dst.baseAddress else { throw FSError(EIO, "\(what) is empty") }
            let n = ZSTD_decompress(to, dst.count, from, src.count)
            if ZSTD_isError(n) != 0 {
                throw FSError(EIO, "\(what) is damaged: zstd says \(String(cString: ZSTD_getErrorName(n))) (\(src.count) bytes stored)")
            }
            guard n == dst.count else { throw FSError(EIO, "\(what) holds \(n) bytes once decompressed, expected \(dst.count)") }
        }
    }

    /// Checks that stored bytes make a block of `length` bytes without keeping it: a zstd
    /// frame's header says its size (one frame, all the bytes); an LZ4 block has none and is
    /// decompressed (into a scratch buffer of `length` bytes, freed before this returns).
    public func check(_ src: UnsafeRawBufferPointer, length: Int, what: String) throws(FSError) {
        switch self {
        case .none:
            guard src.count == length else { throw FSError(EINVAL, "\(what) must be \(length) bytes") }
        case .zstd:
            guard src.count > 0, src.count <= storedBound(length), let from = src.baseAddress,
                ZSTD_findFrameCompressedSize(from, src.count) == src.count,
                ZSTD_getFrameContentSize(from, src.count) == UInt64(length)
            else { throw FSError(EINVAL, "\(what) is not one zstd frame of \(length) bytes") }
        case .lz4:
            guard src.count > 0, src.count <= storedBound(length) else {
                throw FSError(EINVAL, "\(what) must take 1 to \(storedBound(length)) bytes compressed with lz4")
            }
            let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: max(length, 1), alignment: 16)
            defer { scratch.deallocate() }
            do {
                try decompress(src, into: UnsafeMutableRawBufferPointer(rebasing: scratch[0..<length]), what: what)
            } catch {
                throw FSError(EINVAL, error.message)
            }
        }
    }

    /// The codec a format record or a command line names (`none`, `lz4`, `zstd`; any case).
    public static func named(_ text: String) throws(FSError) -> BlockCodec {
        guard let c = BlockCodec(rawValue: text.lowercased()) else {
            throw FSError(EINVAL, "unknown compression '\(text.prefix(40))': use none, lz4 or zstd")
        }
        return c
    }
}
