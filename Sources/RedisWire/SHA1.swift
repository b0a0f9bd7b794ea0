import COpenSSL

/// SHA-1 as a Redis script computes it with `redis.sha1hex`, through OpenSSL's libcrypto (`SHA1`):
/// the one place in the package that hands OpenSSL a pointer for a SHA-1.
package enum RedisSHA1 {
    /// The SHA-1 of `bytes` as 40 lowercase hexadecimal digits (ASCII).
    package static func hex(_ bytes: ArraySlice<UInt8>) -> [UInt8] {
        var md = [UInt8](repeating: 0, count: 20)
        bytes.withUnsafeBufferPointer { b in _ = SHA1(b.baseAddress, b.count, &md) }
        let hex = Array("0123456789abcdef".utf8)
        var out: [UInt8] = []
        out.reserveCapacity(40)
        for byte in md {
            out.append(hex[Int(byte >> 4)])
            out.append(hex[Int(byte & 15)])
        }
        return out
    }
}
