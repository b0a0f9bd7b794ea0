import Metadata
import MungeAuth
import StageFSCore
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// A client's connections to a gateway: a pool of sockets, each carrying one request at a time
/// (so the threads of a mount ask in parallel). A connection found dead while idle (the gateway
/// restarted) is replaced before a request goes on it; while the gateway cannot be reached,
/// requests wait up to `retryTimeout` seconds, then fail with `EIO`. Over TCP each connection
/// authenticates itself with a MUNGE credential made for it (README.md, "TCP and MUNGE").
package final class GatewayClient: Sendable {
    package let address: GatewayAddress
    package let retryTimeout: Double
    /// The munged that makes this client's credentials (TCP only).
    let munge: MungeContext
    /// The volume the gateway serves (from its hello).
    package let volume: String
    /// The gateway passes descriptors of block files (a `file` bucket, over its Unix socket).
    package let blockDescriptors: Bool
    /// The gateway signs URLs from which blocks are read (an S3 bucket).
    package let blockURLs: Bool
    private let idle = Mutex<[Int32]>([])
    private let nextID = Atomic<UInt64>(1)
    /// The session (and its tag) whose records the ids of this client's changes go in (nil
    /// before the mount's session starts: its changes carry no id).
    package let session = Mutex<(sid: UInt64, tag: UInt64)?>(nil)
    /// Slots of the changes in flight, and the number of the last change.
    private let slots = Mutex<(free: [UInt32], used: UInt32)>(([], 0))
    private let nextNumber = Atomic<UInt64>(1)

    /// Connects once (a first contact that fails is reported at once, with the reason).
    /// `mungeSocket`: munged's socket for TCP (nil: libmunge's default).
    package init(_ address: GatewayAddress, retryTimeout: Double = 60, mungeSocket: String? = nil) throws(FSError) {
        self.address = address
        self.retryTimeout = retryTimeout
        self.munge = MungeContext(socket: mungeSocket)
        let (fd, volume, flags) = try Self.connect(address, timeout: retryTimeout, munge: munge)
        self.volume = volume
        self.blockDescriptors = flags & 1 != 0
        self.blockURLs = flags & 2 != 0
        idle.withLock { $0.append(fd) }
    }

    deinit {
        for fd in idle.withLock({ $0 }) { close(fd) }
    }

    package var description: String { "gateway at \(MetaURL.gateway(address))" }

    /// Sends a request and returns the reader of its reply's results (after the status). An
    /// error reply is thrown as the gateway's errno and message. `tail` goes after the fields
    /// without being copied into them (a block's bytes).
    ///
    /// `onBehalf`: the caller a root client acts for (a root mount with `allow_other`); the
    /// gateway honours it only from a root peer, and a user's client sends none.
    package func call(
        _ op: Op, onBehalf: Credential? = nil, tail: UnsafeRawBufferPointer? = nil, _ fields: (inout WireWriter) -> Void = { _ in }
    ) throws(FSError) -> WireReader {
        try call(op, onBehalf: onBehalf, tail: tail, passed: nil, fields)
    }

    /// `call`, taking the descriptor the reply carries (`openBlock`): the caller closes it.
    package func callForDescriptor(_ op: Op, _ fields: (inout WireWriter) -> Void) throws(FSError) -> (WireReader, Int32) {
        let (r, passed) = try callTakingDescriptor(op, onBehalf: nil, fields)
        guard passed >= 0 else { throw FSError(EIO, "\(description) sent no descriptor with the block") }
        return (r, passed)
    }

    /// `call`, taking a descriptor when the reply carries one (-1 when not): the caller closes it.
    package func callTakingDescriptor(
        _ op: Op, onBehalf: Credential?, _ fields: (inout WireWriter) -> Void
    ) throws(FSError) -> (WireReader, Int32) {
        var passed: Int32 = -1
        let r = try withUnsafeMutablePointer(to: &passed) { (p) throws(FSError) in try call(op, onBehalf: onBehalf, tail: nil, passed: p, fields) }
        return (r, passed)
    }

    private func call(
        _ op: Op, onBehalf: Credential?, tail: UnsafeRawBufferPointer?, passed: UnsafeMutablePointer<Int32>?,
        _ fields: (inout WireWriter) -> Void
    ) throws(FSError) -> WireReader {
        let start = Sys.monotonicNanos()
        var request = prepare(op, onBehalf: onBehalf, fields)
        defer {
            release(request)
            GatewayMetrics.client.recordNanoseconds(Int64(Sys.monotonicNanos() &- start))
        }
        return try exchange(&request, op, tail: tail, passed: passed)
    }

    /// A request's body, ready to be sent (again).
    struct Prepared {
        let id: UInt64
        var body: [UInt8]
        /// Where the request mark's flags are in `body`.
        let flagsAt: Int
        let mark: RequestMark

        /// The request went out on a connection that broke before its reply: marked as sent
        /// again, so the gateway looks for its record first.
        mutating func markSentAgain() { body[flagsAt] |= 2 }
    }

    /// Builds a request. A change carries an id (its session's, a slot and a number), so that
    /// one sent again after the connection broke is found carried out instead of being done
    /// twice; its slot is held until `release`.
    private func prepare(_ op: Op, onBehalf: Credential?, _ fields: (inout WireWriter) -> Void) -> Prepared {
        let id = nextID.add(1, ordering: .relaxed).oldValue
        var w = WireWriter()
        w.u64(id)
        w.u16(op.rawValue)
        w.credential(onBehalf)
        var mark = RequestMark()
        if op.carriesRequestID, let s = session.withLock({ $0 }), let slot = takeSlot() {
            mark.id = RequestMark.ID(session: s.sid, sessionTag: s.tag, slot: slot, number: nextNumber.add(1, ordering: .relaxed).oldValue)
        }
        let flagsAt = w.bytes.count
        w.mark(mark)
        fields(&w)
        return Prepared(id: id, body: w.bytes, flagsAt: flagsAt, mark: mark)
    }

    private func release(_ p: Prepared) { if let m = p.mark.id { giveSlot(m.slot) } }

    /// Sends a prepared request and returns the reader of its reply's results, sending it again
    /// (to the next gateway, after a restart) while that is safe, for up to `retryTimeout`.
    private func exchange(
        _ request: inout Prepared, _ op: Op, tail: UnsafeRawBufferPointer?, passed: UnsafeMutablePointer<Int32>?
    ) throws(FSError) -> WireReader {
        let id = request.id
        let deadline = Sys.monotonicNanos() + UInt64(retryTimeout * 1e9)
        var attempt = 0
        while true {
            var fd: Int32 = -1
            var sent = false
            do {
                fd = try take()
                if let tail {
                    try FrameIO.send(fd, request.body, tail: tail)
                } else {
                    try FrameIO.send(fd, request.body)
                }
                sent = true
                guard let reply = try FrameIO.receive(fd, passed: passed) else {
                    throw FSError(EIO, "the gateway closed the connection without answering")
                }
                var r = WireReader(reply)
                let rid = try r.u64()
                let status = try r.i32()
                guard rid == id || rid == 0 else { throw Wire.malformed("a reply to request \(rid) where \(id) was asked") }
                if status == ESHUTDOWN {
                    // A gateway that is stopping carried nothing out: ask the next one.
                    close(fd)
                    fd = -1
                    throw FSError(ESHUTDOWN, "the gateway is restarting")
                }
                if status != 0 {
                    let message = (try? r.string(max: 4096)) ?? "error \(status)"
                    // The gateway ends a connection after a protocol error; others keep it.
                    if status == EPROTO { close(fd) } else { give(fd) }
                    throw GatewayReply(error: FSError(status, message))
                }
                give(fd)
                return r
            } catch let e as GatewayReply {
                throw e.error
            } catch {
                if fd >= 0 { close(fd) }
                let e = error as? FSError ?? FSError.io
                // Only a request the gateway cannot have acted on is sent again, or one that
                // changes nothing, or one with an id; another change whose reply was lost is
                // reported (EIO). Not acted on: refused as the gateway stops (ESHUTDOWN), or
                // never read: a Unix socket closed with unread data tells its peer ECONNRESET,
                // and a gateway closes a connection only between requests (a gateway killed
                // while it works on one leaves nothing unread: EOF, an unknown outcome).
                // (Over TCP a reset may follow a request carried out: a crashed host, a dropped
                // connection; only the gateway's own refusal is safe there.)
                var unread = e.code == ESHUTDOWN
                if case .unix = address, e.code == ECONNRESET || e.code == EPIPE { unread = true }
                if sent && !unread {
                    // Sent again, marked so: a change with an id is answered from its record if
                    // it was carried out (README.md, "Request ids").
                    guard op.isRead || op.isIdempotent || request.mark.id != nil else {
                        throw FSError(EIO, "\(description): the connection broke before the reply (\(e.message))")
                    }
                    request.markSentAgain()
                }
                // A protocol error or a refused credential will not go away by asking again.
                if e.code == EPROTO || e.code == EACCES { throw e }
                attempt += 1
                if Sys.monotonicNanos() > deadline {
                    throw FSError(EIO, "\(description) could not be reached for \(Int(retryTimeout)) s: \(e.message)")
                }
                Sys.sleep(seconds: min(1.0, 0.05 * Double(attempt)))
            }
        }
    }

    private func takeSlot() -> UInt32? {
        slots.withLock { s -> UInt32? in
            if let f = s.free.popLast() { return f }
            guard s.used < RequestMark.slots else { return nil }
            s.used += 1
            return s.used - 1
        }
    }

    private func giveSlot(_ slot: UInt32) { slots.withLock { $0.free.append(slot) } }

    /// An idle connection that is still alive, or a new one.
    private func take() throws(FSError) -> Int32 {
        while let fd = idle.withLock({ $0.popLast() }) {
            // On a Unix socket a send to a gateway that went away fails at once (EPIPE, before
            // anything is sent): no check needed. Over TCP it would seem to succeed.
            if case .unix = address { return fd }
            // Idle, nothing may be readable: readable or hung up means the gateway went away.
            var p = pollfd(fd: fd, events: Int16(POLLIN) | Sys.POLLRDHUP, revents: 0)
            if poll(&p, 1, 0) == 0 { return fd }
            close(fd)
        }
        return try Self.connect(address, timeout: retryTimeout, munge: munge).fd
    }

    private func give(_ fd: Int32) {
        let keep = idle.withLock { list -> Bool in
            guard list.count < 64 else { return false }
            list.append(fd)
            return true
        }
        if !keep { close(fd) }
    }

    /// A new connection that has said hello (and over TCP, authenticated), with the gateway's
    /// flags (bit 0: blocks come as descriptors).
    private static func connect(
        _ address: GatewayAddress, timeout: Double, munge: MungeContext
    ) throws(FSError) -> (fd: Int32, volume: String, flags: UInt8) {
        let fd: Int32
        switch address {
        case .unix(let path): fd = try connectUnix(path)
        case .tcp(let host, let port): fd = try TCP.connect(host: host, port: port, timeout: min(max(1, timeout), 10))
        }
        var tv = timeval(tv_sec: Int(max(1, timeout)), tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        do throws(FSError) {
            var w = WireWriter()
            w.u64(0)
            w.u16(Op.hello.rawValue)
            w.data(Wire.magic)
            w.u16(Wire.version)
            try FrameIO.send(fd, w.bytes)
            guard let reply = try FrameIO.receive(fd) else { throw FSError(ECONNRESET, "the gateway closed the connection at hello") }
            var r = WireReader(reply)
            _ = try r.u64()
            let status = try r.i32()
            if status != 0 { throw FSError(status, "gateway at \(MetaURL.gateway(address)): \(try r.string(max: 4096))") }
            _ = try r.u16()
            let volume = try r.string(max: 1024)
            let nonce = try r.data(max: 64)
            let flags = try r.u8()
            if case .tcp = address { try authenticate(fd, address, nonce: nonce, munge: munge) }
            return (fd, volume, flags)
        } catch {
            close(fd)
            throw error
        }
    }

    /// `auth`: a MUNGE credential of this process for the connection's `nonce`. The gateway
    /// takes the uid and gid from it and answers with the ones it will act as.
    private static func authenticate(_ fd: Int32, _ address: GatewayAddress, nonce: [UInt8], munge: MungeContext) throws(FSError) {
        let gateway = "gateway at \(MetaURL.gateway(address))"
        guard nonce.count == ConnectionBinding.nonceLength else {
            throw FSError(EPROTO, "the \(gateway) sent no connection nonce at hello: it is no StageFS gateway serving TCP, or of another version")
        }
        let credential: String
        do throws(FSError) {
            credential = try munge.encode(payload: ConnectionBinding.payload(nonce: nonce), ttl: 60)
        } catch {
            throw FSError(error.code, "cannot authenticate to the \(gateway): \(error.message)")
        }
        var w = WireWriter()
        w.u64(0)
        w.u16(Op.auth.rawValue)
        w.string(credential)
        try FrameIO.send(fd, w.bytes)
        guard let reply = try FrameIO.receive(fd) else { throw FSError(ECONNRESET, "the \(gateway) closed the connection at auth") }
        var r = WireReader(reply)
        _ = try r.u64()
        let status = try r.i32()
        if status != 0 { throw FSError(status, "the \(gateway) refused the connection: \(try r.string(max: 4096))") }
    }

    private static func connectUnix(_ path: String) throws(FSError) -> Int32 {
        var addr = try UnixSocket.address(path)
        let fd = try UnixSocket.make()
        let rc = withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if rc != 0 {
            let e = errno
            close(fd)
            let why = e == ENOENT || e == ECONNREFUSED ? " (is 'stagefs gateway' running?)" : ""
            throw FSError(e == ENOENT ? ECONNREFUSED : e, "cannot reach the gateway at \(path): \(String(cString: strerror(e)))\(why)")
        }
        return fd
    }
}

/// An error reply, kept apart from the connection's own faults while a call unwinds.
private struct GatewayReply: Error {
    let error: FSError
}

extension Op {
    /// Changes that carry a request id (when the client has a session): sent again after a
    /// lost reply, they are answered from their record if they were carried out.
    var carriesRequestID: Bool {
        switch self {
        case .setattr, .mknod, .create, .unlink, .rmdir, .rename, .link, .setxattr, .removexattr, .open, .close, .closes, .writeSlice, .fallocate:
            return true
        default: return false
        }
    }

    /// Changes that leave the same state when done twice (a lock set or released again by its
    /// owner, a heartbeat, a session ended again, a block the gateway finds already written
    /// with the same bytes when told the request is sent again).
    var isIdempotent: Bool {
        switch self {
        case .heartbeat, .closeSession, .setlk, .flock, .putBlock: return true
        default: return false
        }
    }

    /// Operations that change nothing, so sending one again after a lost reply is harmless.
    var isRead: Bool {
        switch self {
        case .hello, .loadFormat, .statfs, .listSessions, .lookup, .getattr, .access, .readlink, .readdir, .getattrs, .getxattr,
            .listxattr, .readChunks, .getBlock, .getlk, .newSliceIDs, .openBlock, .presignBlock:
            return true
        default:
            return false
        }
    }
}
