import Metadata
import MungeAuth
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// How a gateway authenticates its TCP connections (README.md, "TCP and MUNGE").
package struct GatewayTCPOptions: Sendable {
    /// munged's socket; nil: libmunge's default.
    package var mungeSocket: String?
    /// Whether a root credential over TCP stays root (and may act for its callers); otherwise
    /// it acts as `nobody` (root squash).
    package var trustRoot = false

    package init(mungeSocket: String? = nil, trustRoot: Bool = false) {
        self.mungeSocket = mungeSocket
        self.trustRoot = trustRoot
    }
}

/// The uid and gid a squashed root acts as.
let nobodyID: UInt32 = 65534

/// The longest MUNGE credential an `auth` request may carry (ours are about 200 bytes).
private let maxCredential = 4096

// The TCP side of a gateway: over TCP the kernel cannot say who connects, so the client proves
// its uid with a MUNGE credential made for this connection's nonce, before anything else.
extension GatewayServer {
    /// A new TCP connection: counted against the limit of unauthenticated connections, then
    /// authenticated and served on a thread of its own.
    func startTCPConnection(_ fd: Int32) {
        let address = TCP.peerName(fd)
        let admitted = authenticating.withLock { n -> Bool in
            if n >= limits.unauthenticated { return false }
            n += 1
            return true
        }
        guard admitted else {
            Log.warning("gateway: refused TCP connection from \(address): \(limits.unauthenticated) connections are authenticating already")
            refuseAtOnce(fd, FSError(EAGAIN, "the gateway has too many connections authenticating (\(limits.unauthenticated)); try again"))
            return
        }
        TCP.tune(fd)
        let started = DetachedThread.start { [self] in serveTCPConnection(fd, address) }
        if !started {
            authenticating.withLock { $0 -= 1 }
            Log.warning("gateway: refused TCP connection from \(address): no thread for it")
            refuseAtOnce(fd, FSError(EAGAIN, "the gateway could not start a thread for the connection"))
        }
    }

    /// Authenticates a TCP connection, then serves it as its credential's user; one log line
    /// when it is refused.
    private func serveTCPConnection(_ fd: Int32, _ address: String) {
        let peer: Peer
        do throws(FSError) {
            defer { authenticating.withLock { $0 -= 1 } }
            guard let p = try handshake(fd, address) else {
                Log.info("gateway: TCP connection from \(address) closed before hello")
                close(fd)
                return
            }
            peer = p
        } catch {
            // A client that went away was not refused: that is no news for the log.
            if error.code == ECONNRESET {
                Log.info("gateway: TCP connection from \(address) ended before auth: \(error.message)")
            } else {
                Log.warning("gateway: refused TCP connection from \(address): \(error.message)")
            }
            close(fd)
            return
        }
        Log.info("gateway: \(peer) authenticated by MUNGE")
        serveConnection(fd, peer, helloDone: true)
        leave(peer.uid)
    }

    /// hello, then auth, both within `limits.authSeconds` of the accept. Returns the peer (its
    /// uid admitted: the caller calls `leave`), nil when the client left before hello; throws
    /// why the connection is refused, after telling the client.
    private func handshake(_ fd: Int32, _ address: String) throws(FSError) -> Peer? {
        setTimeouts(fd)
        let deadline = Sys.monotonicNanos() + UInt64(limits.authSeconds * 1e9)
        let nonce = try ConnectionBinding.makeNonce()
        var id: UInt64 = 0
        do throws(FSError) {
            guard var r = try request(fd, deadline, &id, first: true) else { return nil }
            let first = try r.u16()
            guard first == Op.hello.rawValue else { throw outOfTurn(first, due: .hello) }
            try FrameIO.send(fd, try hello(id, &r, nonce: nonce).bytes)

            guard var a = try request(fd, deadline, &id, first: false) else { return nil }
            let second = try a.u16()
            guard second == Op.auth.rawValue else { throw outOfTurn(second, due: .auth) }
            let text = try a.string(max: maxCredential)
            try a.end()
            guard !text.isEmpty else { throw FSError(EACCES, "no MUNGE credential in auth") }
            let peer = try authenticate(text, nonce, address)
            guard admit(peer.uid) else {
                throw FSError(
                    EAGAIN, "the gateway serves its limit of connections (\(limits.connectionsPerUser) per user, \(limits.connections) in all)")
            }
            var w = Reply.ok(id)
            w.u32(peer.uid)
            w.u32(peer.gid)
            do throws(FSError) { try FrameIO.send(fd, w.bytes) } catch {
                leave(peer.uid)
                throw error
            }
            return peer
        } catch {
            var e = error
            if e.code == ETIMEDOUT { e = FSError(ETIMEDOUT, "not authenticated within \(limits.authSeconds.formatted) s") }
            try? FrameIO.send(fd, Reply.error(id, e))
            throw e
        }
    }

    /// The next handshake request (its id in `id`), which must arrive by `deadline`; nil when
    /// the client closed the connection before the first.
    private func request(_ fd: Int32, _ deadline: UInt64, _ id: inout UInt64, first: Bool) throws(FSError) -> WireReader? {
        guard let body = try FrameIO.receive(fd, maxFrame: maxCredential + 1024, deadline: deadline) else {
            if first { return nil }
            throw FSError(ECONNRESET, "the client closed the connection before auth")
        }
        var r = WireReader(body)
        id = try r.u64()
        return r
    }

    /// Why a request other than the one `due` is refused: an operation of the protocol before
    /// auth is not allowed (`EACCES`); anything else breaks the protocol (`EPROTO`).
    private func outOfTurn(_ raw: UInt16, due: Op) -> FSError {
        guard let op = Op(rawValue: raw) else { return FSError(EPROTO, "unknown operation \(raw) (this gateway speaks protocol \(Wire.version))") }
        if op == .hello || op == .auth {
            return FSError(EPROTO, due == .hello ? "the first request of a connection must be hello" : "hello twice")
        }
        return FSError(EACCES, "\(op) before auth: a TCP connection must authenticate with a MUNGE credential first")
    }

    /// Who a credential says the client is: its uid and gid (never anything else the client
    /// says), supplementary groups from this node's NSS, root squashed unless trusted.
    private func authenticate(_ text: String, _ nonce: [UInt8], _ address: String) throws(FSError) -> Peer {
        let cred: MungeCredential
        do throws(FSError) {
            cred = try munge.decode(text)
        } catch {
            // munged out of reach is the gateway's fault, not the client's: it may try again.
            if error.code == ECONNREFUSED || error.code == EIO { throw FSError(EAGAIN, "the gateway cannot check credentials now: \(error.message)") }
            throw error
        }
        try ConnectionBinding.verify(credential: cred, nonce: nonce)
        if cred.uid == 0 && !tcp.trustRoot {
            return Peer(uid: nobodyID, gid: nobodyID, pid: 0, nssGroups: false, address: address)
        }
        return Peer(uid: cred.uid, gid: cred.gid, pid: 0, address: address)
    }

    /// Tells a connection it is refused without waiting for its request (the accept loop must
    /// not wait on a client), then closes it.
    private func refuseAtOnce(_ fd: Int32, _ e: FSError) {
        var tv = timeval(tv_sec: 1, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        try? FrameIO.send(fd, Reply.error(0, e))
        shutdown(fd, Int32(SHUT_WR))
        // What the client sent already is read, so the close does not reset the connection
        // before the client reads the reply.
        var buf = [UInt8](repeating: 0, count: 4096)
        while recv(fd, &buf, buf.count, Int32(MSG_DONTWAIT)) > 0 {}
        close(fd)
    }

    /// Says at start whether MUNGE works here (a credential made and checked by our munged);
    /// TCP clients are refused while it does not.
    func checkMunge() {
        do throws(FSError) {
            let nonce = try ConnectionBinding.makeNonce()
            let cred = try munge.decode(try munge.encode(payload: ConnectionBinding.payload(nonce: nonce, purpose: "self-check"), ttl: 10))
            try ConnectionBinding.verify(credential: cred, nonce: nonce, purpose: "self-check")
        } catch {
            Log.warning("gateway: MUNGE does not work here (\(error.message)): TCP clients are refused until it does")
        }
    }
}

extension Double {
    /// `10` for 10.0, `2.5` for 2.5.
    fileprivate var formatted: String { self == rounded() ? String(Int(self)) : String(self) }
}
