#if canImport(Glibc)
    import Glibc
#endif

/// Where a stream of bytes goes (a file, standard output, an encoder in front of one).
public protocol ByteSink: AnyObject {
    func write(_ bytes: UnsafeRawBufferPointer) throws(FSError)
    /// Writes what is buffered and ends the stream (an encoder writes its trailer).
    func finish() throws(FSError)
}

/// Where a stream of bytes comes from.
public protocol ByteSource: AnyObject {
    /// Reads at most `buffer.count` bytes; 0 at the end of the stream.
    func read(into buffer: UnsafeMutableRawBufferPointer) throws(FSError) -> Int
}

extension ByteSink {
    public func write(_ bytes: [UInt8]) throws(FSError) {
        try bytes.withUnsafeBufferPointer { (b) throws(FSError) -> Void in try write(UnsafeRawBufferPointer(b)) }
    }
}

/// A descriptor written in order (`write(2)` through `Sys.writeAll`), through a buffer of
/// `bufferSize` bytes. The descriptor is the caller's: `finish` writes out, never closes.
public final class FileSink: ByteSink {
    let fd: Int32
    let path: String
    var buffer: [UInt8] = []
    let bufferSize: Int

    public init(fd: Int32, path: String, bufferSize: Int = 1 << 20) {
        self.fd = fd
        self.path = path
        self.bufferSize = bufferSize
        buffer.reserveCapacity(bufferSize)
    }

    public func write(_ bytes: UnsafeRawBufferPointer) throws(FSError) {
        if buffer.count + bytes.count > bufferSize { try flush() }
        if bytes.count >= bufferSize {
            try Sys.writeAll(fd, [bytes], path: path)
        } else {
            buffer.append(contentsOf: bytes)
        }
    }

    public func finish() throws(FSError) { try flush() }

    func flush() throws(FSError) {
        if buffer.isEmpty { return }
        try buffer.withUnsafeBufferPointer { (b) throws(FSError) -> Void in try Sys.writeAll(fd, [UnsafeRawBufferPointer(b)], path: path) }
        buffer.removeAll(keepingCapacity: true)
    }
}

/// A descriptor read in order (`read(2)`); the descriptor is the caller's.
public final class FileSource: ByteSource {
    let fd: Int32
    let path: String

    public init(fd: Int32, path: String) {
        self.fd = fd
        self.path = path
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer) throws(FSError) -> Int {
        try Sys.read(fd, buffer, path: path)
    }
}

/// Bytes in memory as a source (tests, sniffed prefixes put back in front of a stream).
public final class BytesSource: ByteSource {
    var bytes: [UInt8]
    var at = 0
    let then: ByteSource?

    /// `bytes`, then what `then` reads.
    public init(_ bytes: [UInt8], then: ByteSource? = nil) {
        self.bytes = bytes
        self.then = then
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer) throws(FSError) -> Int {
        if at < bytes.count {
            let n = min(buffer.count, bytes.count - at)
            bytes.withUnsafeBytes { buffer.baseAddress!.copyMemory(from: $0.baseAddress! + at, byteCount: n) }
            at += n
            return n
        }
        return try then?.read(into: buffer) ?? 0
    }
}

/// Bytes collected in memory (tests).
public final class BytesSink: ByteSink {
    public private(set) var bytes: [UInt8] = []
    public init() {}
    public func write(_ b: UnsafeRawBufferPointer) throws(FSError) { bytes.append(contentsOf: b) }
    public func finish() throws(FSError) {}
}
