import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// Binds a MUNGE credential to one connection: the gateway sends a fresh random nonce, the client
/// puts `payload(nonce:)` into its credential, the gateway checks it with `verify`. A credential
/// made for another connection (one a hostile server relays, or one seen on the wire) is refused.
public enum ConnectionBinding {
    /// Bytes in a nonce.
    public static let nonceLength = 32
    /// What every binding payload starts with (the version of this format).
    public static let prefix: [UInt8] = Array("stagefs-gateway-v1\0".utf8)

    /// A fresh nonce for a new connection: `nonceLength` bytes from `getrandom(2)`.
    public static func makeNonce() throws(FSError) -> [UInt8] {
        try Sys.secureRandom(nonceLength)
    }

    /// What a client puts into its credential for the connection that sent `nonce`:
    /// `prefix`, `purpose`, a NUL, then the nonce.
    public static func payload(nonce: [UInt8], purpose: String = "connect") -> [UInt8] {
        prefix + Array(purpose.utf8) + [0] + nonce
    }

    /// Checks that a decoded credential was made for this connection (its `nonce`) and `purpose`;
    /// throws `EACCES` otherwise. The comparison takes the same time wherever the bytes differ.
    public static func verify(credential: MungeCredential, nonce: [UInt8], purpose: String = "connect") throws(FSError) {
        let expected = payload(nonce: nonce, purpose: purpose)
        if sameBytes(credential.payload, expected) { return }
        // The prefix is public: telling a foreign credential from a wrong binding leaks nothing.
        if !credential.payload.starts(with: prefix) {
            throw FSError(EACCES, "MUNGE credential of uid \(credential.uid) is not for the StageFS gateway (no connection binding in it)")
        }
        throw FSError(EACCES, "MUNGE credential of uid \(credential.uid) was made for another connection")
    }

    /// Equal bytes, compared without stopping at the first difference (lengths are public).
    static func sameBytes(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        var diff: UInt8 = 0
        for i in a.indices { diff |= a[i] ^ b[i] }
        return diff == 0
    }
}
