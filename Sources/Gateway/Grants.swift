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
/// A tag is SipHash-2-4 (a pseudo-random function made for short inputs, 64-bit output) under a
/// 128-bit key of (kind, two numbers, uid). The key comes from the volume's gateway secret, kept
/// in the volume's metadata, which only gateways reach, so every gateway of the volume (and a
/// restarted one) honours the tags of the others; a tag made for one uid is worthless to
/// another. Forging one takes 2^63 requests on average, each refused and logged. (SipHash costs
/// tens of nanoseconds: a listing of thousands of entries tags each one.)
package struct Grants: Sendable {
    package enum Kind: UInt8, Sendable {
        case inode = 0x69  // i
        case read = 0x72  // r
        case write = 0x77  // w
        case block = 0x62  // b
        case slices = 0x73  // s
        case session = 0x6e  // n
    }

    private let k0: UInt64
    private let k1: UInt64

    /// `key`: at least 16 bytes; the first 16 are the SipHash key.
    package init(key: [UInt8]) {
        var r = ByteReader(key)
        k0 = r.u64().byteSwapped
        k1 = r.u64().byteSwapped
    }

    /// The tag of these values.
    package func tag(_ kind: Kind, _ a: UInt64, _ b: UInt64 = 0, uid: UInt32) -> UInt64 {
        // 24 bytes: kind and uid in the first word, then the two numbers.
        SipHash24.hash(k0, k1, words: [UInt64(kind.rawValue) | UInt64(uid) << 32, a, b], byteCount: 24)
    }

    /// A keyed digest of a request: its op, the caller's uid, its credential block and its
    /// fields (what a request id's record is bound to, so it answers only that request).
    package func digest(_ op: UInt16, uid: UInt32, credential: UnsafeRawBufferPointer, fields: UnsafeRawBufferPointer) -> UInt64 {
        let head = SipHash24.hash(k0, k1, first: UInt64(op) | UInt64(uid) << 32, bytes: credential)
        return SipHash24.hash(k0, k1, first: head, bytes: fields)
    }

    /// Whether `tag` is the one for these values (the comparison takes the same time either way).
    package func check(_ tag: UInt64, _ kind: Kind, _ a: UInt64, _ b: UInt64 = 0, uid: UInt32) -> Bool {
        (self.tag(kind, a, b, uid: uid) ^ tag) == 0
    }
}

/// SipHash-2-4 (Aumasson and Bernstein, 2012) of a message of whole little-endian 64-bit words.
package enum SipHash24 {
    package static func hash(_ k0: UInt64, _ k1: UInt64, words: [UInt64], byteCount: Int) -> UInt64 {
        hash(k0, k1, byteCount: byteCount) { words[$0] }
    }

    /// Of the word `first` and then `bytes` (little-endian words), read in place.
    package static func hash(_ k0: UInt64, _ k1: UInt64, first: UInt64, bytes: UnsafeRawBufferPointer) -> UInt64 {
        hash(k0, k1, byteCount: 8 + bytes.count) { i in
            if i == 0 { return first }
            let off = (i - 1) * 8
            if off + 8 <= bytes.count { return UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: off, as: UInt64.self)) }
            var w: UInt64 = 0
            for j in 0..<(bytes.count - off) { w |= UInt64(bytes[off + j]) << UInt64(8 * j) }
            return w
        }
    }

    /// SipHash-2-4 of `byteCount` bytes given as little-endian words (`word(i)`, the last one
    /// partial).
    @inline(__always)
    private static func hash(_ k0: UInt64, _ k1: UInt64, byteCount: Int, word: (Int) -> UInt64) -> UInt64 {
        var v0: UInt64 = 0x736f_6d65_7073_6575 ^ k0
        var v1: UInt64 = 0x646f_7261_6e64_6f6d ^ k1
        var v2: UInt64 = 0x6c79_6765_6e65_7261 ^ k0
        var v3: UInt64 = 0x7465_6462_7974_6573 ^ k1
        @inline(__always) func round() {
            v0 &+= v1
            v1 = v1.rotl(13)
            v1 ^= v0
            v0 = v0.rotl(32)
            v2 &+= v3
            v3 = v3.rotl(16)
            v3 ^= v2
            v0 &+= v3
            v3 = v3.rotl(21)
            v3 ^= v0
            v2 &+= v1
            v1 = v1.rotl(17)
            v1 ^= v2
            v2 = v2.rotl(32)
        }
        @inline(__always) func compress(_ m: UInt64) {
            v3 ^= m
            round()
            round()
            v0 ^= m
        }
        let whole = byteCount / 8
        for i in 0..<whole { compress(word(i)) }
        // The last word: the remaining bytes and the length's low byte on top.
        var last = UInt64(byteCount & 0xff) << 56
        let rest = byteCount % 8
        if rest > 0 { last |= word(whole) & ((1 << UInt64(rest * 8)) - 1) }
        compress(last)
        v2 ^= 0xff
        round()
        round()
        round()
        round()
        return v0 ^ v1 ^ v2 ^ v3
    }
}

extension UInt64 {
    @inline(__always) fileprivate func rotl(_ n: UInt64) -> UInt64 { (self << n) | (self >> (64 - n)) }
}
