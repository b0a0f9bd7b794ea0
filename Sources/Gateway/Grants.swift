import Metadata
import ObjectStorage
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// Unforgeable tags the gateway hands a user for what that user reached through checks, so that
/// later requests prove it without the gateway keeping per-client state: an inode found through
/// a lookup (`inode`), a file opened for reading or writing (`read`, `write`), a slice whose
/// blocks the user may fetch (`block`), a range of slice ids allocated to the user (`slices`), a
/// session the user registered (`session`).
///
/// A tag is the first 8 bytes of HMAC-SHA-256 under the volume's gateway key of (kind, two
/// numbers, uid). The key lives in the volume's metadata, which only gateways reach, so every
/// gateway of the volume (and a restarted one) honours the tags of the others; a tag made for
/// one uid is worthless to another. Guessing one takes 2^63 requests on average.
package struct Grants: Sendable {
    package enum Kind: UInt8, Sendable {
        case inode = 0x69  // i
        case read = 0x72  // r
        case write = 0x77  // w
        case block = 0x62  // b
        case slices = 0x73  // s
        case session = 0x6e  // n
    }

    private let key: [UInt8]

    package init(key: [UInt8]) { self.key = key }

    /// The tag of these values (0, which no check accepts, should OpenSSL fail).
    package func tag(_ kind: Kind, _ a: UInt64, _ b: UInt64 = 0, uid: UInt32) -> UInt64 {
        mac(kind, a, b, uid) ?? 0
    }

    private func mac(_ kind: Kind, _ a: UInt64, _ b: UInt64, _ uid: UInt32) -> UInt64? {
        var w = ByteWriter(capacity: 21)
        w.u8(kind.rawValue)
        w.u64(a)
        w.u64(b)
        w.u32(uid)
        guard let mac = try? Digest.hmacSHA256(key: key, w.bytes) else { return nil }
        var r = ByteReader(mac)
        return r.u64()
    }

    /// Whether `tag` is the one for these values (the comparison takes the same time either way).
    package func check(_ tag: UInt64, _ kind: Kind, _ a: UInt64, _ b: UInt64 = 0, uid: UInt32) -> Bool {
        guard let want = mac(kind, a, b, uid) else { return false }
        return (want ^ tag) == 0
    }
}
