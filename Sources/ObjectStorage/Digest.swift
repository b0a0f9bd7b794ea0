import COpenSSL
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// SHA-256 and HMAC-SHA256 through OpenSSL's libcrypto (`EVP_Digest`, `HMAC`): the one place
/// where ObjectStorage hands OpenSSL a pointer.
enum Digest {
    /// The SHA-256 of `data` (32 bytes).
    static func sha256(_ data: [UInt8]) throws(FSError) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        let ok = withBytes(data) { d in
            out.withUnsafeMutableBufferPointer { copenssl_sha256(d.baseAddress, d.count, $0.baseAddress) }
        }
        if ok != 1 { throw FSError(EIO, "OpenSSL could not compute a SHA-256") }
        return out
    }

    /// The HMAC-SHA256 of `data` under `key` (32 bytes).
    static func hmacSHA256(key: [UInt8], _ data: [UInt8]) throws(FSError) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        let ok = withBytes(key) { k in
            withBytes(data) { d in
                out.withUnsafeMutableBufferPointer { copenssl_hmac_sha256(k.baseAddress, k.count, d.baseAddress, d.count, $0.baseAddress) }
            }
        }
        if ok != 1 { throw FSError(EIO, "OpenSSL could not compute an HMAC-SHA256") }
        return out
    }

    /// `bytes` in lower-case hexadecimal.
    static func hex(_ bytes: [UInt8]) -> String {
        let digits = Array("0123456789abcdef".utf8)
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count * 2)
        for b in bytes { out += [digits[Int(b >> 4)], digits[Int(b & 15)]] }
        return String(decoding: out, as: UTF8.self)
    }

    /// Runs `body` on the bytes of `data`, never with a nil base address (an empty array may have
    /// none, and OpenSSL wants a valid pointer even for zero bytes).
    private static func withBytes<R>(_ data: [UInt8], _ body: (UnsafeBufferPointer<UInt8>) -> R) -> R {
        if data.isEmpty {
            let one: [UInt8] = [0]
            return one.withUnsafeBufferPointer { body(UnsafeBufferPointer(rebasing: $0[0..<0])) }
        }
        return data.withUnsafeBufferPointer(body)
    }
}
