/// Appends big-endian integers to a byte array (the on-disk and in-Redis encodings).
public struct ByteWriter {
    public private(set) var bytes: [UInt8]

    public init(capacity: Int = 64) {
        bytes = []
        bytes.reserveCapacity(capacity)
    }

    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func u16(_ v: UInt16) { append(UInt64(v), 2) }
    public mutating func u32(_ v: UInt32) { append(UInt64(v), 4) }
    public mutating func u64(_ v: UInt64) { append(v, 8) }
    public mutating func i64(_ v: Int64) { append(UInt64(bitPattern: v), 8) }
    public mutating func raw<C: Collection<UInt8>>(_ v: C) { bytes.append(contentsOf: v) }

    /// Overwrites 4 bytes written before at `offset` (a count known only later).
    public mutating func set(u32 v: UInt32, at offset: Int) {
        for i in 0..<4 { bytes[offset + i] = UInt8(truncatingIfNeeded: v >> UInt32(24 - 8 * i)) }
    }

    private mutating func append(_ v: UInt64, _ n: Int) {
        var shift = (n - 1) * 8
        while shift >= 0 {
            bytes.append(UInt8(truncatingIfNeeded: v >> UInt64(shift)))
            shift -= 8
        }
    }
}

/// Reads big-endian integers from a byte array; reading past the end yields zeros.
public struct ByteReader {
    public let bytes: [UInt8]
    public private(set) var offset: Int

    public init(_ bytes: [UInt8], offset: Int = 0) {
        self.bytes = bytes
        self.offset = offset
    }

    public var remaining: Int { bytes.count - offset }

    public mutating func u8() -> UInt8 { UInt8(read(1)) }
    public mutating func u16() -> UInt16 { UInt16(read(2)) }
    public mutating func u32() -> UInt32 { UInt32(read(4)) }
    public mutating func u64() -> UInt64 { read(8) }
    public mutating func i64() -> Int64 { Int64(bitPattern: read(8)) }
    public mutating func raw(_ n: Int) -> [UInt8] {
        let end = min(bytes.count, offset + n)
        defer { offset = end }
        return Array(bytes[offset..<end])
    }

    private mutating func read(_ n: Int) -> UInt64 {
        var v: UInt64 = 0
        for _ in 0..<n {
            v <<= 8
            if offset < bytes.count { v |= UInt64(bytes[offset]) }
            offset += 1
        }
        return v
    }
}

/// "1.5 GiB" style sizes.
public func humanBytes(_ n: UInt64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    var v = Double(n)
    var i = 0
    while v >= 1024 && i < units.count - 1 {
        v /= 1024
        i += 1
    }
    if i == 0 { return "\(n) B" }
    let tenths = Int((v * 10).rounded())
    return "\(tenths / 10).\(tenths % 10) \(units[i])"
}

/// "1.5 GiB" style sizes of any byte count (negative counts as 0).
public func humanBytes<T: BinaryInteger>(_ n: T) -> String { humanBytes(n < 0 ? 0 : UInt64(n)) }
