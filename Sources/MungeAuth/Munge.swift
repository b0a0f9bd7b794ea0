import CMunge
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// What a valid MUNGE credential says: who made it, when, and the bytes it carries.
public struct MungeCredential: Equatable, Sendable {
    /// The user id of the process that made the credential, as its munged saw it.
    public var uid: uid_t
    /// The group id of that process.
    public var gid: gid_t
    /// The bytes the maker put in (empty when none).
    public var payload: [UInt8]
    /// When it was made (seconds since the epoch, by the maker's clock).
    public var encodedAt: Int64
    /// Seconds it stays valid after `encodedAt`.
    public var ttl: Int

    public init(uid: uid_t, gid: gid_t, payload: [UInt8], encodedAt: Int64 = 0, ttl: Int = 0) {
        self.uid = uid
        self.gid = gid
        self.payload = payload
        self.encodedAt = encodedAt
        self.ttl = ttl
    }
}

/// The local munged, reached through its Unix socket: makes credentials (`munge_encode`) and
/// checks them (`munge_decode`). Each call uses its own libmunge context, so a value may be used
/// from any thread; each call blocks on a round trip to munged, so call it from a worker thread,
/// not from the Swift concurrency pool.
public struct MungeContext: Sendable {
    /// munged's socket; nil: libmunge's default (`/run/munge/munge.socket.2` on Debian).
    public var socket: String?

    public init(socket: String? = nil) {
        self.socket = socket
    }

    /// `munge_encode`: a credential carrying `payload`, valid for `ttl` seconds (nil or 0:
    /// munged's default, -1: its maximum).
    public func encode(payload: [UInt8], ttl: Int? = nil) throws(FSError) -> String {
        guard payload.count <= Int(Int32.max), let ttl32 = Int32(exactly: ttl ?? 0) else {
            throw FSError(EINVAL, "cannot make a MUNGE credential: payload or time to live too large")
        }
        let ctx = try makeContext()
        defer { munge_ctx_destroy(ctx) }
        if ttl32 != 0 {
            let rc = cmunge_ctx_set_ttl(ctx, ttl32)
            if rc != EMUNGE_SUCCESS { throw mungeError(rc, ctx, decoding: false) }
        }
        var cred: UnsafeMutablePointer<CChar>?
        let rc = payload.withUnsafeBytes { munge_encode(&cred, ctx, $0.baseAddress, Int32($0.count)) }
        defer { free(cred) }
        guard rc == EMUNGE_SUCCESS, let cred else { throw mungeError(rc, ctx, decoding: false) }
        return String(cString: cred)
    }

    /// `munge_decode`: checks `credential` (its MAC under the site key, its time to live, that
    /// munged has not seen it before) and says who made it. A fault of the credential throws
    /// `EACCES`; munged out of reach throws `ECONNREFUSED` naming the socket.
    public func decode(_ credential: String) throws(FSError) -> MungeCredential {
        let ctx = try makeContext()
        defer { munge_ctx_destroy(ctx) }
        var buf: UnsafeMutableRawPointer?
        var len: Int32 = 0
        var uid = uid_t()
        var gid = gid_t()
        let rc = munge_decode(credential, ctx, &buf, &len, &uid, &gid)
        // libmunge allocates the payload even for some refusals (expired, rewound, replayed).
        defer { free(buf) }
        guard rc == EMUNGE_SUCCESS else { throw mungeError(rc, ctx, decoding: true) }
        let payload = buf.map { [UInt8](UnsafeRawBufferPointer(start: $0, count: Int(len))) } ?? []
        var encodedAt = time_t()
        var ttl: Int32 = 0
        _ = cmunge_ctx_get_encode_time(ctx, &encodedAt)
        _ = cmunge_ctx_get_ttl(ctx, &ttl)
        return MungeCredential(uid: uid, gid: gid, payload: payload, encodedAt: Int64(encodedAt), ttl: Int(ttl))
    }

    /// A libmunge context for one call, set to our socket.
    private func makeContext() throws(FSError) -> munge_ctx_t {
        guard let ctx = munge_ctx_create() else { throw FSError(ENOMEM, "cannot make a MUNGE context: out of memory") }
        if let socket {
            let rc = cmunge_ctx_set_socket(ctx, socket)
            if rc != EMUNGE_SUCCESS {
                let e = mungeError(rc, ctx, decoding: false)
                munge_ctx_destroy(ctx)
                throw e
            }
        }
        return ctx
    }
}

/// The `FSError` for a libmunge failure: `EACCES` for a credential at fault, `ECONNREFUSED` when
/// munged cannot be reached, the message naming the cause.
private func mungeError(_ rc: munge_err_t, _ ctx: munge_ctx_t, decoding: Bool) -> FSError {
    let generic = String(cString: munge_strerror(rc))
    // The context's message is more precise ("Failed to match armor prefix") when there is one.
    let detail = munge_ctx_strerror(ctx).map { String(cString: $0) } ?? generic
    switch rc {
    case EMUNGE_SOCKET:
        var path: UnsafePointer<CChar>?
        _ = cmunge_ctx_get_socket(ctx, &path)
        let socket = path.map { String(cString: $0) } ?? "its default socket"
        // libmunge says `Failed to connect to "SOCKET": Connection refused`: the socket once is enough.
        let cause = detail.firstRange(of: "\"\(socket)\": ").map { String(detail[$0.upperBound...]) } ?? detail
        var e = FSError(ECONNREFUSED, "cannot reach munged at \(socket): \(cause)")
        e.logged = true
        return e
    case EMUNGE_CRED_EXPIRED: return FSError(EACCES, "MUNGE credential expired")
    case EMUNGE_CRED_REPLAYED: return FSError(EACCES, "MUNGE credential replayed")
    case EMUNGE_CRED_REWOUND: return FSError(EACCES, "MUNGE credential rewound (made in the future: are the two hosts' clocks apart?)")
    case EMUNGE_CRED_UNAUTHORIZED: return FSError(EACCES, "MUNGE credential not for this user: \(detail)")
    case EMUNGE_CRED_INVALID, EMUNGE_BAD_CRED, EMUNGE_BAD_VERSION, EMUNGE_BAD_CIPHER, EMUNGE_BAD_MAC, EMUNGE_BAD_ZIP, EMUNGE_BAD_REALM:
        return FSError(EACCES, "MUNGE credential invalid\(detail == generic ? "" : ": \(detail)")")
    case EMUNGE_BAD_ARG, EMUNGE_BAD_LENGTH:
        return decoding ? FSError(EACCES, "MUNGE credential invalid: \(detail)") : FSError(EINVAL, "cannot make a MUNGE credential: \(detail)")
    case EMUNGE_NO_MEMORY: return FSError(ENOMEM, "munged: \(detail)")
    default:
        var e = FSError(EIO, "munged failed to \(decoding ? "check" : "make") a credential: \(detail)")
        e.logged = true
        return e
    }
}
