import CChecksum

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78): the SSE 4.2 instruction where the CPU
/// has it, else table-driven eight bytes at a time. Used to verify cache files: a torn or
/// corrupted block is detected and fetched again.
public enum CRC32C {
    private static let hardware = cchecksum_has_hw() != 0

    /// Eight 256-entry tables: table k maps a byte to its CRC contribution k bytes further on.
    private static let tables: [UInt32] = {
        var t = [UInt32](repeating: 0, count: 8 * 256)
        for i in 0..<256 {
            var c = UInt32(i)
            for _ in 0..<8 { c = c & 1 != 0 ? (c >> 1) ^ 0x82F6_3B78 : c >> 1 }
            t[i] = c
        }
        for k in 1..<8 {
            for i in 0..<256 {
                let prev = t[(k - 1) * 256 + i]
                t[k * 256 + i] = (prev >> 8) ^ t[Int(prev & 0xff)]
            }
        }
        return t
    }()

    /// The CRC-32C of `count` bytes at `p`, continuing from `seed` (0 to start).
    public static func checksum(_ p: UnsafeRawPointer, _ count: Int, seed: UInt32 = 0) -> UInt32 {
        if hardware { return ~cchecksum_crc32c_update(~seed, p, count) }
        return software(p, count, seed: seed)
    }

    /// The table-driven computation (also what runs without SSE 4.2).
    public static func software(_ p: UnsafeRawPointer, _ count: Int, seed: UInt32 = 0) -> UInt32 {
        var crc = ~seed
        var i = 0
        tables.withUnsafeBufferPointer { t in
            while count - i >= 8 {
                let word = UInt64(littleEndian: p.loadUnaligned(fromByteOffset: i, as: UInt64.self)) ^ UInt64(crc)
                crc =
                    t[7 * 256 + Int(word & 0xff)] ^ t[6 * 256 + Int((word >> 8) & 0xff)] ^ t[5 * 256 + Int((word >> 16) & 0xff)]
                    ^ t[4 * 256 + Int((word >> 24) & 0xff)] ^ t[3 * 256 + Int((word >> 32) & 0xff)]
                    ^ t[2 * 256 + Int((word >> 40) & 0xff)] ^ t[1 * 256 + Int((word >> 48) & 0xff)] ^ t[Int(word >> 56)]
                i += 8
            }
            while i < count {
                crc = (crc >> 8) ^ t[Int((crc ^ UInt32(p.load(fromByteOffset: i, as: UInt8.self))) & 0xff)]
                i += 1
            }
        }
        return ~crc
    }

    public static func checksum(_ bytes: [UInt8]) -> UInt32 {
        bytes.withUnsafeBytes { checksum($0.baseAddress ?? UnsafeRawPointer(bitPattern: 1)!, $0.count) }
    }
}
