import CZlib
import CZstd
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// How a stream (a metadata dump) is compressed.
public enum StreamCodec: String, Sendable, CaseIterable {
    case none
    case gzip
    case zstd

    /// What a file's name says: `.gz` gzip, `.zst` or `.zstd` zstd, anything else none.
    public static func named(_ path: String) -> StreamCodec {
        if path.hasSuffix(".gz") { return .gzip }
        if path.hasSuffix(".zst") || path.hasSuffix(".zstd") { return .zstd }
        return .none
    }

    /// What a stream's first bytes say (gzip's and zstd's magic numbers), whatever its name.
    public static func sniffed(_ head: [UInt8]) -> StreamCodec {
        if head.count >= 2 && head[0] == 0x1f && head[1] == 0x8b { return .gzip }
        if head.count >= 4 && head[0] == 0x28 && head[1] == 0xb5 && head[2] == 0x2f && head[3] == 0xfd { return .zstd }
        return .none
    }

    /// `sink` behind this codec's encoder (itself for `none`).
    public func encoding(into sink: ByteSink) throws(FSError) -> ByteSink {
        switch self {
        case .none: return sink
        case .gzip: return try GzipEncoder(sink)
        case .zstd: return try ZstdEncoder(sink)
        }
    }

    /// `source` through this codec's decoder (itself for `none`).
    public func decoding(_ source: ByteSource) throws(FSError) -> ByteSource {
        switch self {
        case .none: return source
        case .gzip: return try GzipDecoder(source)
        case .zstd: return try ZstdDecoder(source)
        }
    }
}

/// `source` decoded by what its first bytes say it is (gzip, zstd, or plain).
public func decodingSniffed(_ source: ByteSource) throws(FSError) -> (ByteSource, StreamCodec) {
    var head = [UInt8](repeating: 0, count: 4)
    var got = 0
    while got < head.count {
        let n = try head.withUnsafeMutableBufferPointer { (b) throws(FSError) -> Int in
            try source.read(into: UnsafeMutableRawBufferPointer(rebasing: UnsafeMutableRawBufferPointer(b)[got...]))
        }
        if n == 0 { break }
        got += n
    }
    head.removeLast(head.count - got)
    let codec = StreamCodec.sniffed(head)
    return (try codec.decoding(BytesSource(head, then: source)), codec)
}

/// Size of the buffers between a codec and its sink or source.
let streamBuffer = 1 << 17

/// A gzip encoder in front of `sink` (zlib's deflate, level 6).
/// Not Sendable: one thread uses a stream.
final class GzipEncoder: ByteSink {
    let sink: ByteSink
    let z = UnsafeMutablePointer<z_stream>.allocate(capacity: 1)
    var out = [UInt8](repeating: 0, count: streamBuffer)
    var finished = false

    init(_ sink: ByteSink) throws(FSError) {
        self.sink = sink
        z.initialize(to: z_stream())
        // (On failure deinit frees `z`: every stored property is set by then.)
        guard czlib_deflate_init_gzip(z, 6) == Z_OK else { throw FSError(ENOMEM, "cannot start a gzip encoder") }
    }

    deinit {
        deflateEnd(z)
        z.deallocate()
    }

    func write(_ bytes: UnsafeRawBufferPointer) throws(FSError) {
        if bytes.isEmpty { return }
        try run(bytes, flush: Z_NO_FLUSH)
    }

    func finish() throws(FSError) {
        if finished { return }
        finished = true
        try run(UnsafeRawBufferPointer(start: nil, count: 0), flush: Z_FINISH)
        try sink.finish()
    }

    private func run(_ bytes: UnsafeRawBufferPointer, flush: Int32) throws(FSError) {
        z.pointee.next_in = UnsafeMutablePointer(mutating: bytes.baseAddress?.assumingMemoryBound(to: UInt8.self))
        z.pointee.avail_in = UInt32(bytes.count)
        while true {
            let (r, produced) = out.withUnsafeMutableBytes { (o) -> (Int32, Int) in
                z.pointee.next_out = o.baseAddress!.assumingMemoryBound(to: UInt8.self)
                z.pointee.avail_out = UInt32(o.count)
                let r = deflate(z, flush)
                return (r, o.count - Int(z.pointee.avail_out))
            }
            if r != Z_OK && r != Z_STREAM_END && r != Z_BUF_ERROR { throw FSError(EIO, "gzip encoding failed (zlib error \(r))") }
            if produced > 0 {
                try out.withUnsafeBufferPointer { (o) throws(FSError) -> Void in
                    try sink.write(UnsafeRawBufferPointer(rebasing: UnsafeRawBufferPointer(o)[..<produced]))
                }
            }
            if flush == Z_FINISH ? r == Z_STREAM_END : (z.pointee.avail_in == 0 && produced < out.count) { break }
        }
    }
}

/// A gzip decoder reading from `source` (members one after another read as one stream, as
/// `gunzip` does).
final class GzipDecoder: ByteSource {
    let source: ByteSource
    let z = UnsafeMutablePointer<z_stream>.allocate(capacity: 1)
    /// zlib keeps a pointer into it between calls: memory of our own, never moved.
    let input = UnsafeMutableRawBufferPointer.allocate(byteCount: streamBuffer, alignment: 8)
    var inputEnded = false
    var streamEnded = false

    init(_ source: ByteSource) throws(FSError) {
        self.source = source
        z.initialize(to: z_stream())
        // (On failure deinit frees `z` and `input`: every stored property is set by then.)
        guard czlib_inflate_init_gzip(z) == Z_OK else { throw FSError(ENOMEM, "cannot start a gzip decoder") }
    }

    deinit {
        inflateEnd(z)
        z.deallocate()
        input.deallocate()
    }

    func read(into buffer: UnsafeMutableRawBufferPointer) throws(FSError) -> Int {
        while true {
            if z.pointee.avail_in == 0 && !inputEnded {
                let n = try source.read(into: input)
                if n == 0 { inputEnded = true }
                z.pointee.avail_in = UInt32(n)
                z.pointee.next_in = input.baseAddress!.assumingMemoryBound(to: UInt8.self)
            }
            if streamEnded {
                if z.pointee.avail_in == 0 {
                    if inputEnded { return 0 }
                    continue
                }
                // Another member follows.
                inflateReset(z)
                streamEnded = false
            }
            z.pointee.next_out = buffer.baseAddress!.assumingMemoryBound(to: UInt8.self)
            z.pointee.avail_out = UInt32(buffer.count)
            let r = inflate(z, Z_NO_FLUSH)
            let produced = buffer.count - Int(z.pointee.avail_out)
            if r == Z_STREAM_END {
                streamEnded = true
            } else if r != Z_OK && r != Z_BUF_ERROR {
                throw FSError(EIO, "the gzip stream is damaged (zlib error \(r))")
            }
            if produced > 0 { return produced }
            if inputEnded && z.pointee.avail_in == 0 && !streamEnded {
                throw FSError(EIO, "the gzip stream ends early (a truncated file)")
            }
        }
    }
}

/// A zstd encoder in front of `sink` (level 3, zstd's default).
final class ZstdEncoder: ByteSink {
    let sink: ByteSink
    let ctx: OpaquePointer
    var out = [UInt8](repeating: 0, count: streamBuffer)
    var finished = false

    init(_ sink: ByteSink) throws(FSError) {
        self.sink = sink
        guard let c = ZSTD_createCCtx() else { throw FSError(ENOMEM, "cannot start a zstd encoder") }
        ctx = c
        ZSTD_CCtx_setParameter(ctx, ZSTD_c_compressionLevel, 3)
    }

    deinit { ZSTD_freeCCtx(ctx) }

    func write(_ bytes: UnsafeRawBufferPointer) throws(FSError) {
        if bytes.isEmpty { return }
        try run(bytes, ZSTD_e_continue)
    }

    func finish() throws(FSError) {
        if finished { return }
        finished = true
        try run(UnsafeRawBufferPointer(start: nil, count: 0), ZSTD_e_end)
        try sink.finish()
    }

    private func run(_ bytes: UnsafeRawBufferPointer, _ mode: ZSTD_EndDirective) throws(FSError) {
        var inb = ZSTD_inBuffer(src: bytes.baseAddress, size: bytes.count, pos: 0)
        while true {
            let (left, produced) = out.withUnsafeMutableBytes { (o) -> (Int, Int) in
                var outb = ZSTD_outBuffer(dst: o.baseAddress, size: o.count, pos: 0)
                let left = ZSTD_compressStream2(ctx, &outb, &inb, mode)
                return (left, outb.pos)
            }
            if ZSTD_isError(left) != 0 { throw FSError(EIO, "zstd encoding failed: \(String(cString: ZSTD_getErrorName(left)))") }
            if produced > 0 {
                try out.withUnsafeBufferPointer { (o) throws(FSError) -> Void in
                    try sink.write(UnsafeRawBufferPointer(rebasing: UnsafeRawBufferPointer(o)[..<produced]))
                }
            }
            if mode == ZSTD_e_end ? left == 0 : inb.pos == inb.size { break }
        }
    }
}

/// A zstd decoder reading from `source`.
final class ZstdDecoder: ByteSource {
    let source: ByteSource
    let ctx: OpaquePointer
    var input = [UInt8](repeating: 0, count: streamBuffer)
    var inPos = 0
    var inSize = 0
    var inputEnded = false
    /// What the last call of the decoder returned: 0 when a frame just ended.
    var frameLeft = 0

    init(_ source: ByteSource) throws(FSError) {
        self.source = source
        guard let c = ZSTD_createDCtx() else { throw FSError(ENOMEM, "cannot start a zstd decoder") }
        ctx = c
    }

    deinit { ZSTD_freeDCtx(ctx) }

    func read(into buffer: UnsafeMutableRawBufferPointer) throws(FSError) -> Int {
        while true {
            if inPos == inSize && !inputEnded {
                inSize = try input.withUnsafeMutableBufferPointer { (b) throws(FSError) -> Int in
                    try source.read(into: UnsafeMutableRawBufferPointer(b))
                }
                inPos = 0
                if inSize == 0 { inputEnded = true }
            }
            var outb = ZSTD_outBuffer(dst: buffer.baseAddress, size: buffer.count, pos: 0)
            let consumedBefore = inPos
            let r = input.withUnsafeBytes { (b) -> Int in
                var inb = ZSTD_inBuffer(src: b.baseAddress, size: inSize, pos: inPos)
                let r = ZSTD_decompressStream(ctx, &outb, &inb)
                inPos = inb.pos
                return r
            }
            if ZSTD_isError(r) != 0 { throw FSError(EIO, "the zstd stream is damaged: \(String(cString: ZSTD_getErrorName(r)))") }
            // (A call with no input left says how much a next frame's header would need.)
            if outb.pos > 0 || inPos > consumedBefore { frameLeft = r }
            if outb.pos > 0 { return outb.pos }
            if inputEnded && inPos == inSize {
                if frameLeft == 0 { return 0 }
                throw FSError(EIO, "the zstd stream ends early (a truncated file)")
            }
        }
    }
}
