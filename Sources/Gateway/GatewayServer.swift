import Compress
import DataPath
import Metadata
import MungeAuth
import ObjectStorage
import StageFSCore
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// Limits of a gateway (see README.md).
package struct GatewayLimits: Sendable {
    /// Connections at once, in all.
    package var connections = 1024
    /// Connections at once of one uid.
    package var connectionsPerUser = 128
    /// Seconds a started frame may take to arrive in full, and a reply to be taken.
    package var frameSeconds = 30
    /// Bytes of frames being read or answered at once, in all (a block is up to 16 MiB).
    package var frameBytes = 512 << 20
    /// The same for one uid: a user who stalls many half-sent frames waits on their own budget.
    package var frameBytesPerUser = 64 << 20
    /// Seconds the supplementary groups of a uid are kept after an NSS lookup.
    package var groupSeconds = 30.0
    /// Seconds a TCP connection has from its accept to a successful `auth`; then it is closed.
    package var authSeconds = 10.0
    /// TCP connections at once that have not yet authenticated (counted apart from the others,
    /// which they cannot crowd out).
    package var unauthenticated = 64

    package init() {}
}

/// `stagefs gateway`: holds the volume's secrets and does every metadata operation and object
/// access for the users of a node, each as the credential the kernel gives for its connection
/// (`SO_PEERCRED`) and the groups NSS gives for that uid. What a user reached through checks is
/// proven by tags (`Grants`), so a request naming an inode, a slice or a session the user never
/// reached is refused.
package final class GatewayServer: Sendable {
    let meta: any MetadataEngine
    let store: any ObjectStore
    let format: VolumeFormat
    let layout: Layout
    /// The volume's blocks in the bucket: what the gateway stores for its clients and deletes,
    /// counted.
    let blocks: BlockStore
    let grants: Grants
    let limits: GatewayLimits
    private let groups: GroupCache
    private let frames: ByteBudget
    /// The files each session holds open through this gateway.
    private let opens = OpenTable()
    /// Locks that make a step of the engine and the gateway's note of it one (per session and
    /// file, per user for new sessions), striped.
    private let stripes = (0..<64).map { _ in ConditionLock() }

    private func stripe(_ a: UInt64, _ b: UInt64) -> ConditionLock { stripes[stripeIndex(a, b)] }
    private func stripeIndex(_ a: UInt64, _ b: UInt64) -> Int { Int((a &* 0x9E37_79B9_7F4A_7C15 ^ b) % UInt64(stripes.count)) }
    private let userFrames = Mutex<[UInt32: (budget: ByteBudget, connections: Int)]>([:])
    private let counts = Mutex<(all: Int, byUID: [UInt32: Int])>((0, [:]))
    private let deleter = ConditionLock()
    private let deletesWanted = Atomic<Bool>(false)
    /// How TCP connections authenticate (GatewayTCP.swift).
    let tcp: GatewayTCPOptions
    let munge: MungeContext
    /// TCP connections accepted and not yet authenticated.
    let authenticating = Mutex<Int>(0)

    /// Signs the URLs from which users read blocks of an S3 bucket (nil: blocks travel through
    /// the gateway).
    let presigner: S3Presigner?
    /// Seconds a pre-signed URL stays valid.
    static let presignSeconds = 300
    /// Sessions one uid may hold on one host, and in all.
    static let maxSessionsPerUserHost = 256
    static let maxSessionsPerUser = 16384

    package init(
        meta: any MetadataEngine, store: any ObjectStore, format: VolumeFormat, limits: GatewayLimits = GatewayLimits(),
        tcp: GatewayTCPOptions = GatewayTCPOptions(), presigner: S3Presigner? = nil
    ) throws(FSError) {
        guard let secrets = meta as? any VolumeSecrets else { throw FSError(EINVAL, "\(meta.displayName) cannot keep a gateway's key") }
        self.presigner = presigner
        self.meta = meta
        self.store = store
        self.format = format
        self.layout = Layout(volume: format.name, blockSize: format.blockSize)
        blocks = BlockStore(
            layout: layout, codec: BlockCodec(rawValue: format.compressionName) ?? .none, store: store, memory: MemoryCache(limit: 0),
            disk: nil, threads: 1)
        self.grants = Grants(key: try secrets.volumeSecret("gateway", bytes: 32))
        self.limits = limits
        self.groups = GroupCache(seconds: limits.groupSeconds)
        self.frames = ByteBudget(limit: limits.frameBytes)
        self.tcp = tcp
        self.munge = MungeContext(socket: tcp.mungeSocket)
    }

    // MARK: serving

    /// Set (by the CLI's SIGTERM and SIGINT handler) to stop: the gateway accepts no more
    /// connections, answers the request each connection is serving, answers any later one with
    /// `ESHUTDOWN` (not carried out: the client sends it again, to the next gateway), closes
    /// idle connections, and `serve` returns. So a restart costs a client no operation.
    package static let stopRequested = Atomic<Bool>(false)

    private var stopping: Bool { Self.stopRequested.load(ordering: .relaxed) }

    /// Serves the Unix socket at `unixSocket` (mode 0666: every local user may connect; the
    /// kernel says who they are) and each TCP address in `tcp` (clients prove who they are with
    /// MUNGE, see GatewayTCP.swift), each listener's accept loop on a thread of its own, until
    /// `stopRequested`; a listener that fails stops the others, and its error is thrown. A stale
    /// socket file is replaced; anything else at the path is refused.
    package func serve(unixSocket path: String?, tcp addresses: [TCPAddress] = []) throws(FSError) {
        var listeners: [Listener] = []
        do throws(FSError) {
            if let path { listeners.append(Listener(fd: try listenUnix(path), tcp: false, label: path)) }
            for a in addresses {
                for l in try TCP.listen(a) { listeners.append(Listener(fd: l.fd, tcp: true, label: l.label)) }
            }
        } catch {
            for l in listeners { close(l.fd) }
            throw error
        }
        guard !listeners.isEmpty else { throw FSError.usage("the gateway has nothing to listen on") }
        var bound = Glibc.stat()
        if let path { _ = lstat(path, &bound) }
        if listeners.contains(where: \.tcp) { checkMunge() }
        startBackground()
        defer {
            for l in listeners { close(l.fd) }
            // The socket file goes unless a newer gateway has made its own there.
            var now = Glibc.stat()
            if let path, lstat(path, &now) == 0 && now.st_ino == bound.st_ino { unlink(path) }
            drain()
            // What was stored and deleted since the last count.
            recordStored()
        }
        let ended = ConditionLock()
        let state = Mutex<(running: Int, failure: FSError?)>((listeners.count, nil))
        for l in listeners {
            Log.info("gateway for volume '\(format.name)' listening on \(l.tcp ? "TCP " : "")\(l.label)")
            let started = DetachedThread.start { [self] in
                let e = acceptLoop(l)
                if e != nil { Self.stopRequested.store(true, ordering: .relaxed) }
                state.withLock { $0 = ($0.running - 1, $0.failure ?? e) }
                ended.withLock { ended.signal() }
            }
            if !started {
                Self.stopRequested.store(true, ordering: .relaxed)
                let e = FSError(EAGAIN, "the gateway could not start a thread to accept on \(l.label)")
                state.withLock { $0 = ($0.running - 1, $0.failure ?? e) }
            }
        }
        let failure = ended.withLock { () -> FSError? in
            while true {
                let s = state.withLock { $0 }
                if s.running == 0 { return s.failure }
                ended.wait()
            }
        }
        if let failure { throw failure }
    }

    /// A listening socket and what it serves.
    struct Listener: Sendable {
        let fd: Int32
        let tcp: Bool
        let label: String
    }

    /// Accepts connections on `l` until the gateway stops (nil) or accepting fails for good (why).
    private func acceptLoop(_ l: Listener) -> FSError? {
        while true {
            var p = pollfd(fd: l.fd, events: Int16(POLLIN), revents: 0)
            let ready = poll(&p, 1, 250)
            if stopping { return nil }
            if ready <= 0 { continue }
            let c = Sys.acceptCloexec(l.fd)
            if c < 0 {
                if errno == EINTR || errno == ECONNABORTED { continue }
                if errno == EMFILE || errno == ENFILE {
                    Log.warning("gateway: out of file descriptors; waiting before accepting more connections")
                    Sys.sleep(seconds: 0.1)
                    continue
                }
                return FSError.errno(errno, "accepting on \(l.label)")
            }
            if l.tcp {
                startTCPConnection(c)
            } else {
                startUnixConnection(c)
            }
        }
    }

    /// A new connection on the Unix socket: its peer is who the kernel says.
    private func startUnixConnection(_ c: Int32) {
        guard let cred = Sys.peerCredential(c) else {
            Log.warning("gateway: no peer credential on a connection: \(String(cString: strerror(errno)))")
            close(c)
            return
        }
        let peer = Peer(uid: cred.uid, gid: cred.gid, pid: UInt32(bitPattern: cred.pid))
        if !admit(peer.uid) {
            refuse(
                c,
                FSError(
                    EAGAIN, "the gateway serves its limit of connections (\(limits.connectionsPerUser) per user, \(limits.connections) in all)"))
            return
        }
        let started = DetachedThread.start { [self] in
            serveConnection(c, peer)
            leave(peer.uid)
        }
        if !started {
            leave(peer.uid)
            refuse(c, FSError(EAGAIN, "the gateway could not start a thread for the connection"))
        }
    }

    private func listenUnix(_ path: String) throws(FSError) -> Int32 {
        var st = Glibc.stat()
        if lstat(path, &st) == 0 {
            guard st.st_mode & S_IFMT == S_IFSOCK else {
                throw FSError(EEXIST, "\(path) exists and is not a socket: remove it or pick another --socket")
            }
            unlink(path)
        }
        var addr = try UnixSocket.address(path)
        let fd = try UnixSocket.make()
        let rc = withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else {
            let e = errno
            close(fd)
            throw FSError.errno(e, "binding \(path)")
        }
        // Every user connects; who they are comes from the kernel.
        guard chmod(path, 0o666) == 0, listen(fd, 256) == 0 else {
            let e = errno
            close(fd)
            throw FSError.errno(e, "listening on \(path)")
        }
        return fd
    }

    /// Waits (at most 30 s) for every connection to be answered and closed.
    private func drain() {
        let until = Sys.monotonicNanos() + 30_000_000_000
        while counts.withLock({ $0.all }) > 0 && Sys.monotonicNanos() < until { Sys.sleep(seconds: 0.02) }
        let left = counts.withLock { $0.all }
        if left > 0 { Log.warning("gateway: stopping with \(left) connection(s) still busy after 30 s") }
    }

    func admit(_ uid: UInt32) -> Bool {
        counts.withLock { c in
            if c.all >= limits.connections || c.byUID[uid, default: 0] >= limits.connectionsPerUser { return false }
            c.all += 1
            c.byUID[uid, default: 0] += 1
            return true
        }
    }

    func leave(_ uid: UInt32) {
        counts.withLock { c in
            c.all -= 1
            c.byUID[uid, default: 1] -= 1
            if c.byUID[uid] == 0 { c.byUID[uid] = nil }
        }
    }

    /// The frame budgets a connection of `uid` counts against: its user's and the gateway's.
    private func budgets(_ uid: UInt32) -> [ByteBudget] {
        let user = userFrames.withLock { u -> ByteBudget in
            if let b = u[uid] {
                u[uid]!.connections += 1
                return b.budget
            }
            let b = ByteBudget(limit: limits.frameBytesPerUser)
            u[uid] = (b, 1)
            return b
        }
        return [user, frames]
    }

    private func releaseBudgets(_ uid: UInt32) {
        userFrames.withLock { u in
            u[uid]?.connections -= 1
            if u[uid]?.connections == 0 { u[uid] = nil }
        }
    }

    /// Answers a connection that will not be served with `e` (as the reply to its hello, which
    /// is not waited for: the accept loop must never wait on a client) and closes it.
    private func refuse(_ fd: Int32, _ e: FSError) {
        var tv = timeval(tv_sec: 1, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        try? FrameIO.send(fd, Reply.error(0, e))
        close(fd)
    }

    func setTimeouts(_ fd: Int32) {
        var tv = timeval(tv_sec: limits.frameSeconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    /// One connection, on its own thread: requests are answered in order. A malformed frame gets
    /// an error reply and the connection ends (its stream can no longer be trusted). `helloDone`:
    /// the connection's handshake was done already (TCP: hello and auth).
    func serveConnection(_ fd: Int32, _ peer: Peer, helloDone: Bool = false) {
        let budgets = budgets(peer.uid)
        GatewayMetrics.connections.increment()
        defer {
            releaseBudgets(peer.uid)
            close(fd)
            GatewayMetrics.connections.decrement()
        }
        setTimeouts(fd)
        // Descriptors travel only over the Unix socket (whose connections start before hello).
        let descriptors = store is LocalObjectStore && !helloDone
        var helloDone = helloDone
        let who = peer.description
        while true {
            let body: [UInt8]
            do {
                guard let b = try receive(fd, budgets) else { return }
                body = b
            } catch {
                Log.warning("gateway: connection of \(who): \(error.message); closing it")
                try? FrameIO.send(fd, Reply.error(0, error))
                return
            }
            defer { if body.count > 65536 { for b in budgets { b.release(body.count) } } }
            var r = WireReader(body)
            var id: UInt64 = 0
            var out: WireWriter
            var tail: Buffer?
            var passing: Int32 = -1
            let start = Sys.monotonicNanos()
            var timed: Op?
            defer { if let timed { GatewayMetrics.requests[timed]?.recordNanoseconds(Int64(Sys.monotonicNanos() &- start)) } }
            do throws(FSError) {
                id = try r.u64()
                let raw = try r.u16()
                guard let op = Op(rawValue: raw) else {
                    throw FSError(EPROTO, "unknown operation \(raw) (this gateway speaks protocol \(Wire.version))")
                }
                timed = op
                if stopping { throw FSError(ESHUTDOWN, "the gateway is restarting; the request was not carried out") }
                if !helloDone {
                    guard op == .hello else { throw FSError(EPROTO, "the first request of a connection must be hello") }
                    out = try hello(id, &r)
                    helloDone = true
                } else {
                    let credentialAt = body.count - r.remaining
                    let onBehalf = try r.credential()
                    let markAt = body.count - r.remaining
                    var mark = try r.mark()
                    if mark.id != nil {
                        let fieldsAt = body.count - r.remaining
                        mark.digest = body.withUnsafeBytes { b in
                            grants.digest(
                                raw, uid: peer.uid, credential: UnsafeRawBufferPointer(rebasing: b[credentialAt..<markAt]),
                                fields: UnsafeRawBufferPointer(rebasing: b[fieldsAt...]))
                        }
                    }
                    if let m = mark.id, !grants.check(m.sessionTag, .session, m.session, uid: peer.uid) {
                        throw FSError(EACCES, "session \(m.session) is not one of uid \(peer.uid)")
                    }
                    // Root on this node may act for its callers (a root mount with allow_other);
                    // anyone else acts as itself whatever the request says. (Over TCP root is
                    // squashed to nobody before it gets here unless the gateway trusts it.)
                    let cred = peer.uid == 0 ? onBehalf ?? peer.credential(groups) : peer.credential(groups)
                    out = Reply.ok(id)
                    if op == .openBlock {
                        guard descriptors else { throw FSError(EOPNOTSUPP, "blocks come as descriptors only over the Unix socket") }
                        passing = try openBlock(cred, holder: peer.uid, &r, &out)
                    } else {
                        tail = try withUnsafeMutablePointer(to: &passing) { (p) throws(FSError) in
                            try handle(
                                op, cred, holder: peer.uid, &r, &out, mark: mark, passing: descriptors ? p : nil, budgets: budgets,
                                peerHost: peer.address.map(Self.hostOf))
                        }
                    }
                }
            } catch {
                if error.code != ENOENT && error.code != ENODATA { GatewayMetrics.errors.increment() }
                if error.code == EPROTO || error.logged || error.code == EIO {
                    Log.warning("gateway: request of \(who): \(error.message)")
                }
                do { try FrameIO.send(fd, Reply.error(id, error)) } catch { return }
                if error.code == EPROTO || error.code == ESHUTDOWN { return }
                continue
            }
            // A reply is sent within the frame time in all, however slowly the client reads.
            let deadline = Sys.monotonicNanos() + UInt64(limits.frameSeconds) * 1_000_000_000
            do {
                if passing >= 0 {
                    defer { close(passing) }
                    try FrameIO.send(fd, out.bytes, passing: passing)
                } else if let tail {
                    defer { for b in budgets { b.release(tail.budgeted) } }
                    try FrameIO.send(fd, out.bytes, tail: tail.bytes, deadline: deadline)
                } else {
                    try FrameIO.send(fd, out.bytes, deadline: deadline)
                }
            } catch {
                Log.warning("gateway: answering \(who): \(error.message); closing the connection")
                return
            }
        }
    }

    /// Reads one frame, counting big ones against the gateway's frame budget (released by the caller).
    private func receive(_ fd: Int32, _ budgets: [ByteBudget]) throws(FSError) -> [UInt8]? {
        // Idle between requests as long as the client likes (until the gateway stops); a started
        // frame must finish in time.
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        while true {
            let r = poll(&p, 1, 250)
            if r > 0 || (r < 0 && errno != EINTR) { break }
            if stopping { return nil }
        }
        return try FrameIO.receive(fd, budgets: budgets, deadline: Sys.monotonicNanos() + UInt64(limits.frameSeconds) * 1_000_000_000)
    }

    /// The reply to hello: the protocol, the volume's name and `nonce` (a TCP connection's, for
    /// its MUNGE credential; empty on the Unix socket).
    func hello(_ id: UInt64, _ r: inout WireReader, nonce: [UInt8] = []) throws(FSError) -> WireWriter {
        let magic = try r.data(max: 64)
        guard magic == Wire.magic else { throw FSError(EPROTO, "not a StageFS gateway client") }
        let version = try r.u16()
        guard version == Wire.version else {
            throw FSError(
                EPROTO,
                "this gateway speaks protocol \(Wire.version) and the client protocol \(version): use the same StageFS version on clients and gateway"
            )
        }
        var w = Reply.ok(id)
        w.u16(Wire.version)
        w.string(format.name)
        w.data(nonce)
        // Bit 0: blocks of this `file` bucket come as descriptors (openBlock; over the Unix
        // socket, the connections without a nonce). Bit 1: blocks are read from pre-signed URLs.
        w.u8((store is LocalObjectStore && nonce.isEmpty ? 1 : 0) | (presigner != nil ? 2 : 0))
        return w
    }

    // MARK: requests

    /// Answers one request into `w`; returns the bytes of a block when the reply carries one.
    ///
    /// `cred` is whom the checks are for; `holder` the uid of the connection's process, for whom
    /// tags are made and checked (what a root mount reached, it reached for all its callers).
    /// `passing`: where to put a descriptor for the reply to carry (nil: none may be passed).
    ///
    /// `peerHost`: the address of a TCP peer (nil on the Unix socket).
    private func handle(
        _ op: Op, _ cred: Credential, holder uid: UInt32, _ r: inout WireReader, _ w: inout WireWriter, mark: RequestMark = RequestMark(),
        passing: UnsafeMutablePointer<Int32>? = nil, budgets: [ByteBudget] = [], peerHost: String? = nil
    ) throws(FSError) -> Buffer? {
        switch op {
        case .hello, .auth:
            throw FSError(EPROTO, "\(op) out of place: a connection starts with hello, then (over TCP only) auth")
        case .openBlock:
            throw FSError(EPROTO, "openBlock answered elsewhere")
        case .loadFormat:
            try r.end()
            guard var f = try meta.loadFormat() else { throw FSError(EIO, "the gateway's volume is not formatted") }
            f.accessKey = nil
            f.secretKey = nil
            w.string(f.encoded())
        case .statfs:
            // (A directory the client reached: df there shows the quota that counts it.)
            let at = try ino(&r, uid)
            try r.end()
            w.statfs(try meta.statfs(at))
        case .hasQuotas:
            try r.end()
            // (Read now: the client keeps the answer for a while itself.)
            if let admin = meta as? any QuotaAdmin { w.bool(try admin.quotasExist()) } else { w.bool(try meta.hasQuotas()) }
        case .copyRange:
            let src = try ino(&r, uid)
            let srcOff = try r.u64()
            let readTag = try r.u64()
            let dst = try ino(&r, uid)
            let dstOff = try r.u64()
            let length = try r.u64()
            let writeTag = try r.u64()
            let (sid, sidOK) = try sessionIfAny(&r, uid)
            try r.end()
            guard sidOK, try holds(sid, src, write: false, tag: readTag, cred, holder: uid) else {
                throw FSError(EBADF, "inode \(src) is not open for reading in session \(sid) of uid \(uid)")
            }
            guard try holds(sid, dst, write: true, tag: writeTag, cred, holder: uid) else {
                throw FSError(EBADF, "inode \(dst) is not open for writing in session \(sid) of uid \(uid)")
            }
            let (n, a) = try meta.copyRange(cred, src: src, srcOff: srcOff, dst: dst, dstOff: dstOff, length: length)
            w.u64(n)
            w.attr(a)
        case .cloneFile:
            let src = try ino(&r, uid)
            let parent = try ino(&r, uid)
            let name = try r.name()
            let preserve = try r.bool()
            let umask = try r.u16()
            try r.end()
            guard let admin = meta as? any CloneAdmin else { throw FSError.notSupported }
            let (ino, a, next) = try admin.cloneFile(cred, src: src, parent: parent, name: name, preserve: preserve, umask: umask)
            entry(&w, ino, a, uid)
            w.bool(next != nil)
            w.u32(next ?? 0)
        case .cloneChunks:
            let src = try ino(&r, uid)
            let dst = try ino(&r, uid)
            let from = try r.u32()
            try r.end()
            guard let admin = meta as? any CloneAdmin else { throw FSError.notSupported }
            let next = try admin.cloneChunks(cred, src: src, dst: dst, from: from)
            w.bool(next != nil)
            w.u32(next ?? 0)
        case .cloneFinish:
            let src = try ino(&r, uid)
            let dst = try ino(&r, uid)
            let preserve = try r.bool()
            let umask = try r.u16()
            try r.end()
            guard let admin = meta as? any CloneAdmin else { throw FSError.notSupported }
            w.attr(try admin.cloneFinish(cred, src: src, dst: dst, preserve: preserve, umask: umask))
        case .trash:
            try trashRequest(&r, &w, cred)
        case .quota:
            guard let admin = meta as? any QuotaAdmin else { throw FSError.notSupported }
            let what = try r.u8()
            var list: [QuotaInfo] = []
            if what == 0 {
                let key = try r.string(max: 64)
                try r.end()
                guard let t = QuotaTarget(key: key) else { throw Wire.malformed("a quota named '\(key)'") }
                if let q = try admin.quota(t) { list = [q] }
            } else if what == 1 {
                try r.end()
                list = try admin.quotas()
            } else {
                throw Wire.malformed("an unknown quota request")
            }
            // Other users' and groups' usage is root's to see (as with Linux quotas).
            if !cred.isRoot {
                list = list.filter {
                    switch $0.target {
                    case .dir: true
                    case .user(let u): u == cred.uid
                    case .group(let g): cred.inGroup(g)
                    }
                }
            }

            w.u32(UInt32(list.count))
            for q in list { w.quota(q) }
        case .reserveSpace, .releaseSpace:
            let ino = try ino(&r, uid)
            let bytes = op == .reserveSpace ? try r.i64() : 0
            let writeTag = try r.u64()
            let (sid, sidOK) = try sessionIfAny(&r, uid)
            try r.end()
            guard sidOK, try holds(sid, ino, write: true, tag: writeTag, cred, holder: uid) else {
                throw FSError(EBADF, "inode \(ino) is not open for writing in session \(sid) of uid \(uid)")
            }
            if op == .reserveSpace {
                // (A step at a time: what one request may hold of a quota is bounded.)
                guard bytes > 0 && bytes <= 1 << 30 else { throw Wire.malformed("\(bytes) bytes to reserve (1 to 1 GiB)") }
                w.bool(try meta.reserveSpace(ino, sid: sid, bytes: bytes))
            } else {
                try meta.releaseSpace(ino, sid: sid)
            }
        case .newSession:
            var info = try r.session()
            try r.end()
            // The kernel's pid on the Unix socket (where the host is this one); over TCP there is
            // none, the client's stays, and the host is the peer's address.
            if cred.pid != 0 {
                info.pid = Int32(bitPattern: cred.pid)
                info.hostname = Sys.hostname()
            } else if let peerHost {
                info.hostname = peerHost
            }
            info.uid = cred.uid
            // Bounded per user and host, so that no user fills the metadata with sessions (one
            // at a time per user, so that parallel requests cannot pass the bound).
            let sid = try stripe(UInt64(cred.uid), 0).withLock { () throws(FSError) -> UInt64 in
                let mine = try meta.listSessions().filter { $0.uid == cred.uid }
                if mine.count >= Self.maxSessionsPerUser || mine.filter({ $0.hostname == info.hostname }).count >= Self.maxSessionsPerUserHost {
                    throw FSError(
                        EAGAIN,
                        "uid \(cred.uid) has \(mine.count) sessions (at most \(Self.maxSessionsPerUserHost) on one host, \(Self.maxSessionsPerUser) in all): unmount some"
                    )
                }
                return try meta.newSession(info)
            }
            w.u64(sid)
            w.u64(grants.tag(.session, sid, uid: uid))
        case .heartbeat:
            let sid = try session(&r, uid)
            try r.end()
            try meta.heartbeat(sid)
        case .closeSession:
            let sid = try session(&r, uid)
            try r.end()
            try meta.closeSession(sid)
            opens.drop(sid)
            wakeDeleter()
        case .listSessions:
            try r.end()
            // A user sees their own sessions (hosts, mountpoints, pids are theirs to know); root all.
            let all = try meta.listSessions().filter { cred.isRoot || $0.uid == cred.uid }
            let countAt = w.bytes.count
            w.u32(0)
            var n: UInt32 = 0
            for s in all where w.bytes.count < Wire.maxReply {
                w.session(s)
                n += 1
            }
            w.set(u32: n, at: countAt)
        case .lookup:
            let parent = try ino(&r, uid)
            let name = try r.name()
            try r.end()
            let (ino, a) = try meta.lookup(cred, parent, name)
            entry(&w, ino, a, uid)
        case .getattr:
            let ino = try ino(&r, uid)
            try r.end()
            w.attr(try meta.getattr(ino))
        case .setattr:
            let ino = try ino(&r, uid)
            var req = try r.setattr()
            let writeTag = try r.u64()
            let (sid, sidOK) = try sessionIfAny(&r, uid)
            try r.end()
            let opened = sidOK ? try holds(sid, ino, write: true, tag: writeTag, cred, holder: uid) : false
            // Truncation through an open file skips the permission check: only for the opener.
            if req.viaHandle && !opened { req.viaHandle = false }
            if !cred.isRoot {
                // A time of change is the gateway's to set (now), never a user's. (The kernel
                // sends one alone for chown(-1, -1), which changes ctime and nothing else.)
                if req.mask.contains(.ctime) { req.ctime = Timespec.now() }
                // Dropping privilege bits of a file one does not own is what a write does: only
                // for a writer (an opener for writing, or one who may write it now). A request
                // with no field but ctime drops them too (chown(-1, -1)): refused so when the
                // file has any, as ext4 refuses it, and harmless when it has none.
                let empty = req.mask.subtracting(.ctime).isEmpty
                let drops = req.mask.contains(.mode) || req.mask.contains(.killPriv) || empty
                if drops && !opened {
                    let a = try meta.getattr(ino)
                    let bits = a.mode & 0o6000 != 0 || req.mask.contains(.mode)
                    if a.uid != cred.uid && !Posix.mayAccess(a, cred, .write) && bits { throw FSError.perm }
                }
            }
            // (A long truncation is several steps: the last one is the change its id records.)
            let save: (Any) -> [UInt8]? = { ($0 as? (Attr, Bool)).flatMap { $0.1 ? Results.attr($0.0) : nil } }
            w.attr(
                try once(mark, save: save, load: { (r) throws(FSError) in try r.attr() }) { () throws(FSError) in try meta.setattr(cred, ino, req) })
            if req.mask.contains(.size) { wakeDeleter() }
        case .access:
            let ino = try ino(&r, uid)
            let mask = AccessMask(rawValue: try r.u32() & 7)
            try r.end()
            try meta.access(cred, ino, mask)
        case .mknod:
            let parent = try ino(&r, uid)
            let name = try r.name()
            guard let type = FileType(rawValue: try r.u8()) else { throw Wire.malformed("an unknown file type") }
            let mode = try r.u16()
            let rdev = try r.u32()
            let target: [UInt8]? = try r.bool() ? try r.data(max: 4096) : nil
            try r.end()
            // Device nodes need CAP_MKNOD, which the kernel checks before a mount hears of it.
            if (type == .blockDevice || type == .charDevice) && !cred.isRoot { throw FSError.perm }
            let ((ino, a), replayed) = try answer(mark, save: Results.saveEntry, load: Results.entry) { () throws(FSError) in
                try meta.mknod(cred, parent, name, type, mode, rdev: rdev, target: target)
            }
            entry(&w, ino, a, uid)
            changedDirs(&w, [parent], replayed: replayed)
        case .create:
            let parent = try ino(&r, uid)
            let name = try r.name()
            let mode = try r.u16()
            let sid = try session(&r, uid)
            try r.end()
            let ((ino, a), replayed) = try answer(mark, save: Results.saveEntry, load: Results.entry) { () throws(FSError) in
                try meta.create(cred, parent, name, mode, sid: sid)
            }
            // An answer from a record notes no open here: a right found only in the engine's
            // open table needs the permission now too (a replay grants nothing new).
            if !replayed { opens.opened(sid, ino, read: true, write: true) }
            entry(&w, ino, a, uid)
            w.u64(grants.tag(.read, ino, uid: uid))
            w.u64(grants.tag(.write, ino, uid: uid))
            changedDirs(&w, [parent], replayed: replayed)
        case .unlink, .rmdir:
            let parent = try ino(&r, uid)
            let name = try r.name()
            try r.end()
            let save: (Any) -> [UInt8]? = { ($0 as? RemovedName).map(Results.removed) }
            let (removed, replayed) = try answer(mark, save: save, load: { (r) throws(FSError) in try r.removed() }) { () throws(FSError) in
                op == .unlink ? try meta.unlink(cred, parent, name) : try meta.rmdir(cred, parent, name)
            }
            w.removed(removed)
            changedDirs(&w, [parent], replayed: replayed)
            if removed.freed { wakeDeleter() }
        case .rename:
            let sp = try ino(&r, uid)
            let sn = try r.name()
            let dp = try ino(&r, uid)
            let dn = try r.name()
            let flags = RenameFlags(rawValue: try r.u32())
            try r.end()
            let (res, replayed) = try answer(mark, save: { ($0 as? RenameResult).map(Results.rename) }, load: Results.rename) {
                () throws(FSError) in try meta.rename(cred, sp, sn, dp, dn, flags)
            }
            w.u64(res.moved)
            w.u64(res.other)
            w.u64(res.other == 0 ? 0 : grants.tag(.inode, res.other, uid: uid))
            w.bool(res.removed != nil)
            if let removed = res.removed {
                w.removed(removed)
                if removed.freed { wakeDeleter() }
            }
            changedDirs(&w, [sp, dp], replayed: replayed)
        case .link:
            let ino = try ino(&r, uid)
            let parent = try self.ino(&r, uid)
            let name = try r.name()
            try r.end()
            // What Linux's fs.protected_hardlinks checks before a link reaches a file system:
            // only the owner, or one who may read and write the file, links it.
            if !cred.isRoot {
                let a = try meta.getattr(ino)
                let special = a.type == .regular && (a.mode & 0o4000 != 0 || (a.mode & 0o2010 == 0o2010))
                if a.uid != cred.uid && (a.type != .regular || special || !Posix.mayAccess(a, cred, [.read, .write])) {
                    throw FSError.perm
                }
            }
            let (a, replayed) = try answer(mark, save: { ($0 as? Attr).map(Results.attr) }, load: { (r) throws(FSError) in try r.attr() }) {
                () throws(FSError) in try meta.link(cred, ino, parent, name)
            }
            w.attr(a)
            changedDirs(&w, [parent], replayed: replayed)
        case .readlink:
            let ino = try ino(&r, uid)
            try r.end()
            w.data(try meta.readlink(ino))
        case .readdir:
            let ino = try ino(&r, uid)
            let cookie = try r.u64()
            let limit = Int(try r.u32())
            let plus = try r.bool()
            try r.end()
            guard limit > 0 && limit <= Wire.maxBatch else { throw Wire.malformed("readdir of \(limit) entries (at most \(Wire.maxBatch))") }
            // What opendir checks on a kernel's file system, at each step here: the gateway keeps
            // no open directories.
            let dir = try meta.getattr(ino)
            try Posix.check(dir, cred, .read)
            // Without search permission a directory lists names and types only, as on ext4: no
            // attributes, and no tags (the entries cannot be looked up).
            let search = Posix.mayAccess(dir, cred, .execute)
            let entries = try meta.readdir(ino, after: cookie, limit: limit, plus: plus && search)
            w.u32(UInt32(entries.count))
            for e in entries {
                w.data(e.name)
                w.u64(e.ino)
                w.u64(search ? grants.tag(.inode, e.ino, uid: uid) : 0)
                w.u8(e.type.rawValue)
                w.u64(e.cookie)
                w.bool(e.attr != nil)
                if let a = e.attr { w.attr(a) }
            }
        case .getattrs:
            let n = try r.count(max: Wire.maxBatch, itemSize: 16)
            var inos: [Ino] = []
            inos.reserveCapacity(n)
            for _ in 0..<n { inos.append(try ino(&r, uid)) }
            try r.end()
            let attrs = try meta.getattrs(inos)
            for a in attrs {
                w.bool(a != nil)
                if let a { w.attr(a) }
            }
        case .getxattr:
            let ino = try ino(&r, uid)
            let name = try r.data(max: 256)
            try r.end()
            w.data(try meta.getxattr(cred, ino, name))
        case .listxattr:
            let ino = try ino(&r, uid)
            try r.end()
            let names = try meta.listxattr(cred, ino)
            w.u32(UInt32(names.count))
            for n in names { w.data(n) }
        case .setxattr:
            let ino = try ino(&r, uid)
            let name = try r.data(max: 256)
            let value = try r.data(max: 65536)
            guard let flag = XattrFlag(rawValue: try r.u32()) else { throw Wire.malformed("an unknown setxattr flag") }
            try r.end()
            try once(mark, save: { _ in [] }, load: { _ in () }) { () throws(FSError) in try meta.setxattr(cred, ino, name, value, flag) }
        case .removexattr:
            let ino = try ino(&r, uid)
            let name = try r.data(max: 256)
            try r.end()
            try once(mark, save: { _ in [] }, load: { _ in () }) { () throws(FSError) in try meta.removexattr(cred, ino, name) }
        case .open:
            let ino = try ino(&r, uid)
            let flags = try r.i32()
            let sid = try session(&r, uid)
            try r.end()
            let mask = accessMask(openFlags: flags)
            // The engine's open and the gateway's note of it go together (a close of the same
            // file by the same session waits), so the two never disagree.
            let (a, slices) = try stripe(sid, ino).withLock { () throws(FSError) in
                // (Its transaction's result is the attributes; the first chunk comes after the
                // commit, so an open answered from its record leaves that chunk to the client.)
                let save: (Any) -> [UInt8]? = { ($0 as? Attr).map(Results.attr) }
                let load = { (r: inout WireReader) throws(FSError) -> (Attr, [Slice]?) in (try r.attr(), nil) }
                let (r, replayed) = try answer(mark, save: save, load: load) { () throws(FSError) in try meta.open(cred, ino, flags: flags, sid: sid)
                }
                if !replayed { opens.opened(sid, ino, read: mask.contains(.read), write: mask.contains(.write)) }
                return r
            }
            w.attr(a)
            w.u64(mask.contains(.read) ? grants.tag(.read, ino, uid: uid) : 0)
            w.u64(mask.contains(.write) ? grants.tag(.write, ino, uid: uid) : 0)
            w.bool(slices != nil && mask.contains(.read))
            if let slices, mask.contains(.read) { chunk(&w, slices, uid) }
            // A file of one block written at once: its block comes with the reply, so reading
            // it takes no further request (open and the block in one round trip).
            var sent = false
            if let passing, mask.contains(.read), let s = slices, s.count == 1, let only = s.first, only.id != 0, only.off == 0,
                only.len == only.size, UInt64(only.len) == a.size, Int(only.size) <= layout.blockSize, let local = store as? LocalObjectStore
            {
                let key = layout.key(slice: only.id, index: 0, length: Int(only.size))
                if let fd = try? local.openForReading(key) {
                    passing.pointee = fd
                    sent = true
                    w.bool(true)
                    w.string(key)
                }
            }
            if !sent { w.bool(false) }
        case .close:
            let ino = try ino(&r, uid)
            let sid = try session(&r, uid)
            try r.end()
            let freed = try stripe(sid, ino).withLock { () throws(FSError) in
                let (f, replayed) = try answer(mark, save: { ($0 as? Bool).map { [$0 ? 1 : 0] } }, load: { (r) throws(FSError) in try r.bool() }) {
                    () throws(FSError) in try meta.close(ino, sid: sid)
                }
                // (A close answered from its record had its note dropped by its first sending;
                // the session may hold the file open again since.)
                if !replayed { opens.closed(sid, ino) }
                return f
            }
            w.bool(freed)
            if freed { wakeDeleter() }
        case .closes:
            let n = try r.count(max: Wire.maxCloses, itemSize: 32)
            var closes: [(ino: Ino, sid: UInt64)] = []
            closes.reserveCapacity(n)
            for _ in 0..<n { closes.append((try ino(&r, uid), try session(&r, uid))) }
            try r.end()
            // Each file's stripe, as for one close; taken in one order (no two batches wait on
            // each other).
            let held = Set(closes.map { stripeIndex($0.sid, $0.ino) }).sorted()
            for i in held { stripes[i].lock() }
            defer { for i in held.reversed() { stripes[i].unlock() } }
            let (freed, replayed) = try answer(
                mark, save: { ($0 as? [Bool]).map { $0.map { $0 ? 1 : 0 } } },
                load: { (r) throws(FSError) -> [Bool] in
                    var out: [Bool] = []
                    for _ in 0..<n { out.append(try r.bool()) }
                    return out
                }
            ) { () throws(FSError) in try meta.close(closes) }
            if !replayed { for c in closes { opens.closed(c.sid, c.ino) } }
            for f in freed { w.bool(f) }
            if freed.contains(true) { wakeDeleter() }
        case .readChunks:
            let (sid, sidOK) = try sessionIfAny(&r, uid)
            let n = try r.count(max: Wire.maxBatch, itemSize: 28)
            var asks: [(Ino, UInt32)] = []
            var unproven: [Ino] = []
            asks.reserveCapacity(n)
            for _ in 0..<n {
                let ino = try ino(&r, uid)
                let index = try r.u32()
                let readTag = try r.u64()
                asks.append((ino, index))
                // A file this session holds open for reading keeps its reader's right; otherwise
                // the caller must be allowed to read it now (staging reads chunks without opening).
                // (Only what this gateway saw: otherwise the permission check below decides.)
                if !(sidOK ? try holds(sid, ino, write: false, tag: readTag, cred, holder: uid, engine: false) : false) { unproven.append(ino) }
            }
            try r.end()
            var seen = Set<ChunkID>()
            for (ino, index) in asks where !seen.insert(ChunkID(ino: ino, index: index)).inserted {
                throw FSError(EINVAL, "chunk \(index) of inode \(ino) asked twice in one request")
            }
            if !unproven.isEmpty {
                let attrs = try meta.getattrs(unproven)
                for a in attrs {
                    guard let a else { throw FSError.notFound }
                    guard a.type == .regular else { throw FSError.invalid }
                    try Posix.check(a, cred, .read)
                }
            }
            // The answer stays within a frame: chunks are read 16 at a time and answered while
            // they fit; `u32 answered` says how many (the client asks for the rest again).
            let countAt = w.bytes.count
            w.u32(0)
            var answered = 0
            var start = 0
            fill: while start < asks.count {
                let part = Array(asks[start..<min(asks.count, start + 16)])
                for s in try meta.readChunks(part) {
                    let size = 4 + s.count * (Slice.encodedSize + 8)
                    if w.bytes.count + size > Wire.maxReply {
                        if answered == 0 {
                            throw FSError(
                                EFBIG, "chunk \(asks[0].1) of inode \(asks[0].0) holds \(s.count) slice records, more than one answer may carry")
                        }
                        break fill
                    }
                    chunk(&w, s, uid)
                    answered += 1
                }
                start += part.count
            }
            w.set(u32: UInt32(answered), at: countAt)
        case .writeSlice:
            let ino = try ino(&r, uid)
            let index = try r.u32()
            let s = Slice(pos: try r.u32(), id: try r.u64(), size: try r.u32(), off: try r.u32(), len: try r.u32())
            let minSize = try r.u64()
            var mtime = try r.time()
            let writeTag = try r.u64()
            let first = try r.u64()
            let count = try r.u64()
            let rangeTag = try r.u64()
            let (sid, sidOK) = try sessionIfAny(&r, uid)
            // Small blocks of the slice that come along (a small file: its one block and its
            // commit in one request), stored before the slice is committed.
            let n = try r.count(max: 4, itemSize: 8)
            var blocks: [(key: String, data: [UInt8])] = []
            for _ in 0..<n { blocks.append((try r.string(max: 1024), try r.data(max: self.blocks.storedBound(layout.blockSize)))) }
            try r.end()
            guard sidOK, try holds(sid, ino, write: true, tag: writeTag, cred, holder: uid) else {
                throw FSError(EBADF, "inode \(ino) is not open for writing in session \(sid) of uid \(uid)")
            }
            try ownSlice(s.id, first, count, rangeTag, uid)
            let end = UInt64(index) * chunkSize + UInt64(s.pos) + UInt64(s.len)
            guard s.len > 0, UInt64(s.off) + UInt64(s.len) <= UInt64(s.size), UInt64(s.pos) + UInt64(s.len) <= chunkSize,
                end <= maxFileSize, minSize <= maxFileSize
            else { throw FSError(EINVAL, "a slice record outside its chunk or its slice") }
            for (key, data) in blocks {
                let b = try block(key)
                guard b.id == s.id else { throw FSError(EINVAL, "block \(key) is not of slice \(s.id)") }
                try storeNewBlock(key, b.length, data, resend: mark.resend)
            }
            // The time of the write, as the client saw it: never later than now, and (but for
            // root) at most an hour before it (a slow upload), not any time a user likes.
            let now = Timespec.now()
            if mtime > now { mtime = now }
            if !cred.isRoot && mtime.sec < now.sec - 3600 { mtime = now }
            w.attr(
                try once(mark, save: { ($0 as? Attr).map(Results.attr) }, load: { (r) throws(FSError) in try r.attr() }) { () throws(FSError) in
                    try meta.writeSlice(ino, index, s, minSize: minSize, mtime: mtime, sid: sid)
                })
        case .fallocate:
            let ino = try ino(&r, uid)
            let flags = try r.u8()
            let offset = try r.u64()
            let length = try r.u64()
            let writeTag = try r.u64()
            let (sid, sidOK) = try sessionIfAny(&r, uid)
            try r.end()
            guard sidOK, try holds(sid, ino, write: true, tag: writeTag, cred, holder: uid) else {
                throw FSError(EBADF, "inode \(ino) is not open for writing in session \(sid) of uid \(uid)")
            }
            // (A range over many chunks is several steps: the last one is the change its id records.)
            let save: (Any) -> [UInt8]? = { ($0 as? (Attr, Bool)).flatMap { $0.1 ? Results.attr($0.0) : nil } }
            w.attr(
                try once(mark, save: save, load: { (r) throws(FSError) in try r.attr() }) { () throws(FSError) in
                    try meta.fallocate(cred, ino, zero: flags & 1 != 0, keepSize: flags & 2 != 0, offset: offset, length: length)
                })
        case .newSliceIDs:
            let count = Int(try r.u32())
            try r.end()
            guard count > 0 && count <= 4096 else { throw Wire.malformed("\(count) slice ids asked (1 to 4096)") }
            let first = try meta.newSliceIDs(count)
            w.u64(first)
            w.u64(grants.tag(.slices, first, UInt64(count), uid: uid))
        case .getlk, .setlk, .flock:
            let ino = try ino(&r, uid)
            let sid = try session(&r, uid)
            let owner = try r.u64()
            let pid = try r.u32()
            let type = try r.lockType()
            let start = try r.u64()
            let end = try r.u64()
            let readTag = try r.u64()
            let writeTag = try r.u64()
            try r.end()
            // A lock is taken through an open file: a read lock needs it open for reading, a
            // write lock for writing, flock either; releasing needs nothing.
            let canRead = try holds(sid, ino, write: false, tag: readTag, cred, holder: uid)
            let canWrite = try holds(sid, ino, write: true, tag: writeTag, cred, holder: uid)
            let needed: Bool
            switch (op, type) {
            case (_, .unlock): needed = true
            case (.flock, _), (.getlk, _): needed = canRead || canWrite
            case (_, .read): needed = canRead
            default: needed = canWrite
            }
            if !needed { throw FSError(EBADF, "inode \(ino) is not open for a lock of that kind by uid \(uid)") }
            switch op {
            case .getlk: w.lockRange(try meta.getlk(ino, sid: sid, owner: owner, type: type, start: start, end: end))
            case .setlk: try meta.setlk(ino, sid: sid, owner: owner, pid: pid, type: type, start: start, end: end)
            default: try meta.flock(ino, sid: sid, owner: owner, pid: pid, type: type)
            }
        case .getBlock:
            let key = try r.string(max: 1024)
            let offset = Int(try r.u32())
            let length = Int(try r.u32())
            let tag = try r.u64()
            try r.end()
            let b = try block(key)
            guard grants.check(tag, .block, b.id, uid: uid) else { throw FSError(EACCES, "uid \(uid) may not read the blocks of slice \(b.id)") }
            // (A compressed block may take a few bytes more than its length.)
            let stored = blocks.storedBound(b.length)
            guard offset <= stored, length <= stored - offset else { throw FSError(EINVAL, "a read past the end of block \(key)") }
            // The reply's bytes count against the caller's and the gateway's budgets until they
            // are sent (the caller of `handle` releases them).
            for b in budgets { b.acquire(length) }
            let buf = Buffer(capacity: length)
            buf.budgeted = length
            do {
                buf.count = try store.get(key, offset: offset, into: UnsafeMutableRawBufferPointer(start: buf.base, count: length))
            } catch {
                for b in budgets { b.release(length) }
                throw error
            }
            return buf
        case .presignBlock:
            // A URL from which the caller reads one block, for a few minutes: only for a holder
            // of the slice's block tag. (New blocks go through putBlock, so that each is written
            // once: a signed PUT could be sent again while it is valid.)
            let key = try r.string(max: 1024)
            let tag = try r.u64()
            try r.end()
            guard let presigner else { throw FSError(EOPNOTSUPP, "blocks of this bucket are not read from URLs") }
            let b = try block(key)
            guard grants.check(tag, .block, b.id, uid: uid) else { throw FSError(EACCES, "uid \(uid) may not read the blocks of slice \(b.id)") }
            w.string(try presigner.presign(method: "GET", key: key, expires: Self.presignSeconds))
            w.u32(UInt32(Self.presignSeconds))
        case .putBlock:
            let key = try r.string(max: 1024)
            let first = try r.u64()
            let count = try r.u64()
            let tag = try r.u64()
            let n = Int(try r.u32())
            let b = try block(key)
            try ownSlice(b.id, first, count, tag, uid)
            guard r.remaining == n else { throw FSError(EINVAL, "block \(key) says \(n) bytes and sends \(r.remaining)") }
            try storeNewBlock(key, b.length, try r.raw(n), resend: mark.resend)
        }
        return nil
    }

    /// A read-only descriptor of a block's file (a `file` bucket, Unix socket): the client reads
    /// the bytes itself, with no copy through the gateway. Returns the descriptor to pass.
    private func openBlock(_ cred: Credential, holder uid: UInt32, _ r: inout WireReader, _ w: inout WireWriter) throws(FSError) -> Int32 {
        let key = try r.string(max: 1024)
        let tag = try r.u64()
        try r.end()
        guard let local = store as? LocalObjectStore else { throw FSError(EOPNOTSUPP, "blocks of this bucket are not files") }
        let b = try block(key)
        guard grants.check(tag, .block, b.id, uid: uid) else { throw FSError(EACCES, "uid \(uid) may not read the blocks of slice \(b.id)") }
        let fd = try local.openForReading(key)
        w.u32(UInt32(b.length))
        return fd
    }

    /// Stores a block a user wrote: of the length its key names, and only when it does not
    /// exist (blocks are immutable: a user writes new ones, never over one). A request sent again
    /// (its first sending may have written the block before the connection broke) finds it done
    /// when the block holds the same bytes.
    private func storeNewBlock(_ key: String, _ length: Int, _ data: [UInt8], resend: Bool) throws(FSError) {
        // Stored as the client encoded it, once it is shown to make a block of the length its
        // key names (so the counters hold what the blocks are).
        try data.withUnsafeBufferPointer { (b) throws(FSError) in
            try blocks.codec.check(UnsafeRawBufferPointer(b), length: length, what: "block \(key)")
        }
        func sameBytes() throws(FSError) -> Bool { resend ? try store.getAll(key, size: blocks.storedBound(length)) == data : false }
        if let local = store as? LocalObjectStore {
            // The check and the rename into place in one step, one walk to the block's directory.
            do throws(FSError) {
                try ObjectMetrics.measure(.put) { () throws(FSError) in try fsTyped { try data.withUnsafeBytes { try local.putNew(key, $0) } } }
                ObjectMetrics.bytes(.put, data.count)
                blocks.countStored(length: length, stored: data.count)
            } catch {
                if error.code == EEXIST {
                    if try sameBytes() { return }
                    throw FSError(EEXIST, "block \(key) exists: blocks are never overwritten")
                }
                throw error
            }
            return
        }
        if try ObjectMetrics.measure(.head, { () throws(FSError) in try store.head(key) }) != nil {
            if try sameBytes() { return }
            throw FSError(EEXIST, "block \(key) exists: blocks are never overwritten")
        }
        try ObjectMetrics.measure(.put) { () throws(FSError) in try store.put(key, bytes: data) }
        ObjectMetrics.bytes(.put, data.count)
        blocks.countStored(length: length, stored: data.count)
    }

    /// The attributes of directories `dirs` as the change just committed on this thread left
    /// them (`u8 count`, then `u64 ino` and the attributes each): the kernel asks for them next,
    /// and the client answers from these instead of asking again (as a direct mount answers
    /// from its own commit). None for an answer from a record.
    private func changedDirs(_ w: inout WireWriter, _ dirs: [Ino], replayed: Bool) {
        var found: [(Ino, Attr)] = []
        if !replayed {
            for d in dirs where !found.contains(where: { $0.0 == d }) {
                if let a = meta.recentAttr(d), a.type == .directory { found.append((d, a)) }
            }
        }
        w.u8(UInt8(found.count))
        for (d, a) in found {
            w.u64(d)
            w.attr(a)
        }
    }

    /// The engine's part of a change request. One with an id records it with its change (and
    /// the change's result, `save`); one sent again whose first sending was carried out is
    /// answered with that sending's result (`load`) instead of being done twice. Without an id,
    /// or on an engine that keeps no records (SQLite), `body` just runs.
    private func once<T>(
        _ mark: RequestMark, save: @escaping (Any) -> [UInt8]?, load: (inout WireReader) throws(FSError) -> T,
        _ body: () throws(FSError) -> T
    ) throws(FSError) -> T {
        try answer(mark, save: save, load: load, body).result
    }

    /// `once`, saying whether the result came from the record (`replayed`): a client may send
    /// an old request of its session again at any time, so an answer from a record must grant
    /// no right the caller does not hold now.
    private func answer<T>(
        _ mark: RequestMark, save: @escaping (Any) -> [UInt8]?, load: (inout WireReader) throws(FSError) -> T,
        _ body: () throws(FSError) -> T
    ) throws(FSError) -> (result: T, replayed: Bool) {
        guard let m = mark.id, let records = meta as? any RequestRecords else { return (try body(), false) }
        let id = RequestID(session: m.session, slot: m.slot, number: m.number)
        // A record holds the request's digest, then the result: it answers only a request with
        // the same op, caller and fields (never, say, a rename sent with an open's id).
        let digest = withUnsafeBytes(of: mark.digest.bigEndian) { Array($0) }
        let save: (Any) -> [UInt8]? = { v in save(v).map { digest + $0 } }
        func saved() throws(FSError) -> T? {
            guard let bytes = try records.carriedOut(id) else { return nil }
            guard bytes.count >= 8 else { throw FSError(EIO, "\(id) was carried out, but its result was not kept") }
            guard bytes.prefix(8).elementsEqual(digest) else { throw FSError(EINVAL, "\(id) names another request") }
            var r = WireReader(Array(bytes.dropFirst(8)))
            do { return try load(&r) } catch { throw FSError(EIO, "\(id) was carried out, but its result was not kept") }
        }
        if mark.resend, let t = try saved() { return (t, true) }
        do {
            return (try records.recording(id, save: save, body), false)
        } catch {
            // Carried out by another sending meanwhile (found by the commit), or, for a request
            // sent again, an error its first sending explains (an exclusive create finding the
            // file that sending made): the first sending's result answers.
            if error.code == EALREADY || mark.resend, let t = try saved() { return (t, true) }
            // (Carried out, but its record went meanwhile: with its session.)
            if error.code == EALREADY { throw FSError(EIO, "\(id) was carried out, but its record is gone (its session ended)") }
            throw error
        }
    }

    // MARK: checks

    /// An inode a request names: root, or one whose tag proves this uid reached it.
    private func ino(_ r: inout WireReader, _ uid: UInt32) throws(FSError) -> Ino {
        let ino = try r.u64()
        let tag = try r.u64()
        if ino == rootIno || grants.check(tag, .inode, ino, uid: uid) { return ino }
        Log.warning("gateway: uid \(uid) named inode \(ino) without having reached it")
        throw FSError(EACCES, "inode \(ino) was not reached by uid \(uid) through a lookup")
    }

    private func session(_ r: inout WireReader, _ uid: UInt32) throws(FSError) -> UInt64 {
        let sid = try r.u64()
        let tag = try r.u64()
        guard grants.check(tag, .session, sid, uid: uid) else { throw FSError(EACCES, "session \(sid) is not one of uid \(uid)") }
        return sid
    }

    /// A session a request names, when it names one (0: none): the id and whether its tag is right.
    private func sessionIfAny(_ r: inout WireReader, _ uid: UInt32) throws(FSError) -> (UInt64, Bool) {
        let sid = try r.u64()
        let tag = try r.u64()
        return (sid, sid != 0 && grants.check(tag, .session, sid, uid: uid))
    }

    /// Whether session `sid` holds `ino` open for writing (or for reading): the tag of that
    /// open, and the open still held: known here from the opens and closes this gateway saw, or
    /// (after a restart, or through another gateway) from the engine's open table.
    ///
    /// The engine records that a session holds a file open, not for what; so when this gateway
    /// did not see the open (it restarted, or the open went through another gateway) the right
    /// needs the permission now as well: an open for writing outlives a chmod only while the
    /// gateway that saw it runs. (Nothing is noted from such an answer: each is asked again.)
    /// `engine: false`: only what this gateway saw (the caller falls back to a permission check).
    private func holds(
        _ sid: UInt64, _ ino: Ino, write: Bool, tag: UInt64, _ cred: Credential, holder uid: UInt32, engine: Bool = true
    ) throws(FSError) -> Bool {
        guard grants.check(tag, write ? .write : .read, ino, uid: uid) else { return false }
        if let known = opens.holds(sid, ino, write: write) { return known }
        guard engine, let checks = meta as? any OpenChecks else { return false }
        let (count, attr) = try checks.openState(sid, ino)
        guard count > 0, let attr else { return false }
        return Posix.mayAccess(attr, cred, write ? .write : .read)
    }

    /// The host of `HOST:PORT` (`[v6]:PORT` too).
    static func hostOf(_ address: String) -> String {
        guard let colon = address.lastIndex(of: ":") else { return address }
        let host = address[..<colon]
        return String(host.hasPrefix("[") && host.hasSuffix("]") ? host.dropFirst().dropLast() : host)
    }

    private func ownSlice(_ id: UInt64, _ first: UInt64, _ count: UInt64, _ tag: UInt64, _ uid: UInt32) throws(FSError) {
        guard grants.check(tag, .slices, first, count, uid: uid), id >= first, id - first < count else {
            throw FSError(EACCES, "slice \(id) was not allocated to uid \(uid)")
        }
    }

    /// The slice, index and length a block key names; only the exact form `Layout.key` makes.
    private func block(_ key: String) throws(FSError) -> (id: UInt64, index: Int, length: Int) {
        guard let (id, index, length) = Layout.parts(ofKey: key), id > 0, index >= 0, index < Int(chunkSize) / layout.blockSize + 1, length > 0,
            length <= layout.blockSize,
            layout.key(slice: id, index: index, length: length) == key
        else { throw FSError(EINVAL, "'\(key.prefix(200))' is not a block of volume '\(format.name)'") }
        return (id, index, length)
    }

    /// `stagefs trash` through the gateway: anyone lists the trash's hours and owners (mode 0555
    /// through a mount too), an owner's files only that owner (and root); a file's owner
    /// restores and purges it, as root does (`ownerMayRestore`, `ownerMayPurge`).
    private func trashRequest(_ r: inout WireReader, _ w: inout WireWriter, _ cred: Credential) throws(FSError) {
        guard let admin = meta as? any TrashAdmin else { throw FSError.notSupported }
        guard let what = TrashOp(rawValue: try r.u8()) else { throw Wire.malformed("an unknown trash request") }
        switch what {
        case .usage:
            try r.end()
            let (inodes, bytes) = try admin.trashUsage()
            w.i64(inodes)
            w.i64(bytes)
        case .hours:
            try r.end()
            let hours = try admin.trashHours(limit: 100_000)
            w.u32(UInt32(hours.count))
            for (ino, hour) in hours {
                w.u64(ino)
                w.i64(hour)
            }
        case .ownerDirs:
            let hour = try r.u64()
            try r.end()
            guard Trash.isTrash(hour) else { throw FSError(EINVAL, "inode \(hour) is not one of the trash's directories") }
            let dirs = try admin.trashOwnerDirs(hour, limit: 100_000)
            w.u32(UInt32(dirs.count))
            for (ino, uid) in dirs {
                w.u64(ino)
                w.u32(uid)
            }
        case .entries:
            let dir = try r.u64()
            let after = try r.u64()
            let limit = Int(try r.u32())
            try r.end()
            guard Trash.isTrash(dir), limit > 0 && limit <= 1000 else { throw FSError(EINVAL, "a trash listing of inode \(dir), \(limit) entries") }
            let a = try meta.getattr(dir)
            guard cred.isRoot || Posix.mayAccess(a, cred, [.read, .execute]) else {
                throw FSError(EACCES, "the trash's files of uid \(a.uid) are theirs to list")
            }
            let (entries, next) = try admin.trashEntries(in: dir, after: after, limit: limit)
            w.u32(UInt32(entries.count))
            for e in entries {
                w.u64(e.ino)
                w.u64(e.dir)
                w.data(e.entryName)
                w.attr(e.attr)
                w.bool(e.origin != nil)
                if let o = e.origin { w.data(o.encoded()) }
            }
            w.bool(next != nil)
            w.u64(next ?? 0)
        case .purge:
            let ino = try r.u64()
            try r.end()
            w.bool(try admin.purgeTrashed(cred, ino, ownerMayPurge: true))
        case .restore:
            let ino = try r.u64()
            let to: Ino? = try r.bool() ? try self.ino(&r, cred.uid) : nil
            try r.end()
            let (dir, name) = try admin.restoreTrashed(cred, ino, to: to, ownerMayRestore: true)
            w.u64(dir)
            w.data(name)
        case .removeEmptyDir:
            // (Only an empty directory of the trash goes: harmless for anyone to ask.)
            let dir = try r.u64()
            try r.end()
            try admin.removeEmptyTrashDir(dir)
        }
    }

    private func entry(_ w: inout WireWriter, _ ino: Ino, _ a: Attr, _ uid: UInt32) {
        w.u64(ino)
        w.u64(grants.tag(.inode, ino, uid: uid))
        w.attr(a)
    }

    /// A chunk's slices and, for each, the tag that lets this uid fetch its blocks.
    private func chunk(_ w: inout WireWriter, _ slices: [Slice], _ uid: UInt32) {
        w.slices(slices)
        for s in slices { w.u64(s.id == 0 ? 0 : grants.tag(.block, s.id, uid: uid)) }
    }

    // MARK: background

    /// The gateway deletes what nobody references any more (users never delete objects) and
    /// ends the sessions of clients that went silent.
    private func startBackground() {
        DetachedThread.start { [self] () -> Void in
            var lastStale = Sys.monotonicNanos()
            var purger = TrashPurger(now: lastStale)
            // The trash lease's holder name of this gateway.
            let holder = UInt64.random(in: 1 << 63..<UInt64.max)
            while true {
                deleter.withLock { _ = deleter.wait(seconds: 2) }
                deletesWanted.store(false, ordering: .relaxed)
                cleanDeleted()
                recordStored()
                purger.runIfDue(meta, holder: holder, who: "gateway: ")
                if Sys.monotonicNanos() - lastStale > 30_000_000_000 {
                    lastStale = Sys.monotonicNanos()
                    do throws(FSError) {
                        let n = try meta.cleanStaleSessions(age: 300)
                        if n > 0 { Log.info("gateway: cleaned up \(n) stale session(s)") }
                        opens.keep(only: Set(try meta.listSessions().map(\.sid)))
                    } catch {
                        Log.warning("gateway: cleaning stale sessions: \(error.message)")
                    }
                }
            }
        }
    }

    private func wakeDeleter() {
        if !deletesWanted.exchange(true, ordering: .relaxed) { deleter.withLock { deleter.signal() } }
    }

    /// In bounded steps: at most about two seconds, the rest in the next round.
    private func cleanDeleted() {
        do {
            if !(try meta.collectDeleted { blocks.delete($0) }).isEmpty { wakeDeleter() }
        } catch {
            Log.warning("gateway: deleting unreferenced data: \(error.message)")
        }
    }

    /// Adds what the gateway stored and deleted to the volume's counters.
    private func recordStored() {
        blocks.recordCounts { (c) throws(FSError) in try meta.recordStored(blockBytes: c.blockBytes, storedBytes: c.storedBytes) }
    }
}

/// Who is at the other end of a connection, as the kernel says (or over TCP, its MUNGE credential).
struct Peer: Sendable, CustomStringConvertible {
    let uid: UInt32
    let gid: UInt32
    let pid: UInt32
    /// Whether its supplementary groups come from NSS; false for a squashed root (none).
    var nssGroups = true
    /// `HOST:PORT` of a TCP peer; nil on the Unix socket.
    var address: String? = nil

    func credential(_ groups: GroupCache) -> Credential {
        Credential(uid: uid, gid: gid, groups: nssGroups ? groups.groups(uid: uid, gid: gid) : [], pid: pid)
    }

    var description: String { address.map { "uid \(uid) from \($0)" } ?? "uid \(uid) (pid \(pid))" }
}

/// Supplementary groups of a uid from this node's NSS (`getgrouplist`), kept briefly.
final class GroupCache: Sendable {
    private let seconds: Double
    private let cache = Mutex<[UInt32: (gid: UInt32, groups: [UInt32], at: UInt64)]>([:])

    init(seconds: Double) { self.seconds = seconds }

    func groups(uid: UInt32, gid: UInt32) -> [UInt32] {
        let now = Sys.monotonicNanos()
        if let hit = cache.withLock({ $0[uid] }), hit.gid == gid, Double(now - hit.at) / 1e9 < seconds { return hit.groups }
        let found = Self.lookup(uid: uid, gid: gid)
        cache.withLock { c in
            if c.count > 65536 { c.removeAll() }
            c[uid] = (gid, found, now)
        }
        return found
    }

    private static func lookup(uid: UInt32, gid: UInt32) -> [UInt32] {
        var pw = passwd()
        var result: UnsafeMutablePointer<passwd>?
        var buf = [CChar](repeating: 0, count: 16384)
        guard getpwuid_r(uid, &pw, &buf, buf.count, &result) == 0, result != nil, let name = pw.pw_name else {
            Log.info("gateway: uid \(uid) is unknown to this node's NSS: it acts with no supplementary groups")
            return []
        }
        var n: Int32 = 64
        while true {
            var list = [gid_t](repeating: 0, count: Int(n))
            let before = n
            if getgrouplist(name, gid, &list, &n) >= 0 { return Array(list[0..<Int(n)]).filter { $0 != gid } }
            if n <= before || n > 65536 { return [] }
        }
    }
}

/// Which files each session holds open, as this gateway saw them opened and closed: so that the
/// right a read or write tag proves ends with the open (a tag alone outlives it). At most
/// `limit` entries; past it nothing more is noted and checks ask the engine.
final class OpenTable: Sendable {
    private struct Entry {
        var count: Int
        var read: Bool
        var write: Bool
    }
    private let table = Mutex<(sessions: [UInt64: [Ino: Entry]], entries: Int)>(([:], 0))
    static let limit = 4_000_000

    func opened(_ sid: UInt64, _ ino: Ino, read: Bool, write: Bool) {
        table.withLock { t in
            if var e = t.sessions[sid]?[ino] {
                e.count += 1
                e.read = e.read || read
                e.write = e.write || write
                t.sessions[sid]![ino] = e
            } else if t.entries < Self.limit {
                t.sessions[sid, default: [:]][ino] = Entry(count: 1, read: read, write: write)
                t.entries += 1
            }
        }
    }

    func closed(_ sid: UInt64, _ ino: Ino) {
        table.withLock { t in
            guard var e = t.sessions[sid]?[ino] else { return }
            e.count -= 1
            if e.count > 0 {
                t.sessions[sid]![ino] = e
                return
            }
            t.sessions[sid]![ino] = nil
            t.entries -= 1
            if t.sessions[sid]!.isEmpty { t.sessions[sid] = nil }
        }
    }

    /// Whether the session holds `ino` open so; nil when this gateway knows nothing of it.
    func holds(_ sid: UInt64, _ ino: Ino, write: Bool) -> Bool? {
        table.withLock { t in
            guard let e = t.sessions[sid]?[ino] else { return nil }
            return write ? e.write : e.read
        }
    }

    func drop(_ sid: UInt64) {
        table.withLock { t in
            if let s = t.sessions.removeValue(forKey: sid) { t.entries -= s.count }
        }
    }

    /// Forgets sessions that no longer exist (ended elsewhere, or cleaned up as stale).
    func keep(only live: Set<UInt64>) {
        table.withLock { t in
            for sid in t.sessions.keys where !live.contains(sid) {
                t.entries -= t.sessions[sid]!.count
                t.sessions[sid] = nil
            }
        }
    }
}

/// One chunk of one file, as a set member.
private struct ChunkID: Hashable {
    let ino: Ino
    let index: UInt32
}

/// How the results of changes are kept with their request ids (`GatewayServer.once`).
enum Results {
    static func attr(_ a: Attr) -> [UInt8] { a.encode() }

    static func saveEntry(_ v: Any) -> [UInt8]? {
        guard let (ino, a) = v as? (Ino, Attr) else { return nil }
        var w = WireWriter()
        w.u64(ino)
        w.attr(a)
        return w.bytes
    }

    static func entry(_ r: inout WireReader) throws(FSError) -> (Ino, Attr) { (try r.u64(), try r.attr()) }

    static func removed(_ x: RemovedName) -> [UInt8] {
        var w = WireWriter()
        w.removed(x)
        return w.bytes
    }

    static func rename(_ x: RenameResult) -> [UInt8] {
        var w = WireWriter()
        w.u64(x.moved)
        w.u64(x.other)
        w.bool(x.removed != nil)
        if let removed = x.removed { w.removed(removed) }
        return w.bytes
    }

    static func rename(_ r: inout WireReader) throws(FSError) -> RenameResult {
        RenameResult(moved: try r.u64(), other: try r.u64(), removed: try r.bool() ? try r.removed() : nil)
    }
}
