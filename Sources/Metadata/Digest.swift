import COpenSSL

/// SHA-256 and HMAC-SHA-256 through OpenSSL (this module and ObjectStorage, for its S3
/// pre-signer, import the OpenSSL shim): for keyed tags the gateway hands out.
package enum Digest {
    /// SHA-256 of `data` (OpenSSL's one-shot `SHA256`).
    package static func sha256(_ data: [UInt8]) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        data.withUnsafeBufferPointer { d in
            out.withUnsafeMutableBufferPointer { o in _ = SHA256(d.baseAddress, d.count, o.baseAddress) }
        }
        return out
    }

    /// HMAC-SHA-256 of `data` under `key` (RFC 2104 over `sha256`).
    package static func hmacSHA256(key: [UInt8], _ data: [UInt8]) -> [UInt8] {
        var k = key.count > 64 ? sha256(key) : key
        k += [UInt8](repeating: 0, count: 64 - k.count)
        let inner = sha256(k.map { $0 ^ 0x36 } + data)
        return sha256(k.map { $0 ^ 0x5c } + inner)
    }
}
