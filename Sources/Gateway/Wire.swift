import Metadata
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// The gateway's wire format (documented in README.md): length-prefixed frames, each a request
/// or its reply, big-endian integers.
///
/// A frame is `u32 length` and `length` bytes of body, at most `maxFrame`. A request body is
/// `u64 request id`, `u16 op` and the op's fields; a reply body is `u64 request id`, `i32 status`
/// (0 or an errno), then the op's results, or for an error its message.
package enum Wire {
    /// The protocol this StageFS speaks; the first request of a connection (`hello`) names it.
    package static let version: UInt16 = 4
    /// What the first request starts with, so a stray client is told what it reached.
    package static let magic = Array("stagefs-gateway".utf8)
    /// The largest frame: a block of the largest block size (16 MiB) as stored (LZ4 may take
    /// 16 MiB / 255 + 16 bytes more of incompressible data) and its fields.
    package static let maxFrame = (16 << 20) + (128 << 10)
    /// The largest reply a gateway builds from records (chunks, entries, sessions): the rest is
    /// asked for again.
    package static let maxReply = 8 << 20
    /// The most supplementary groups a credential carries (Linux's NGROUPS_MAX is 65536; NSS
    /// setups rarely give more than a few hundred).
    package static let maxGroups = 4096
    /// The most entries one readdir, getattrs or readChunks request may ask for.
    package static let maxBatch = 4096
    /// The most closes one `closes` request carries (one commit: kept small).
    package static let maxCloses = 256
}

/// The operations a client asks of a gateway.
package enum Op: UInt16, Sendable, CaseIterable {
    case hello = 1
    case loadFormat = 2
    case statfs = 3
    case newSession = 4
    case heartbeat = 5
    case closeSession = 6
    case listSessions = 7
    /// Over TCP, right after hello: the client's MUNGE credential for this connection's nonce.
    case auth = 8
    case lookup = 10
    case getattr = 11
    case setattr = 12
    case access = 13
    case mknod = 14
    case create = 15
    case unlink = 16
    case rmdir = 17
    case rename = 18
    case link = 19
    case readlink = 20
    case readdir = 21
    case getattrs = 22
    case getxattr = 30
    case listxattr = 31
    case setxattr = 32
    case removexattr = 33
    case open = 40
    case close = 41
    /// Many closes in one request (and one commit): a client's batch of last closes.
    case closes = 42
    case readChunks = 43
    case writeSlice = 44
    case newSliceIDs = 45
    /// fallocate(2) through a file the session holds open for writing.
    case fallocate = 46
    /// Quota space reserved ahead of buffered writes of a file the session holds open for
    /// writing, and given back (`MetadataEngine.reserveSpace`).
    case reserveSpace = 47
    case releaseSpace = 48
    /// Whether the volume has quotas.
    case hasQuotas = 9
    /// copy_file_range(2) from a file the session holds open for reading to one it holds open
    /// for writing (slices shared, no bytes copied).
    case copyRange = 49
    /// `stagefs clone`'s steps (`CloneAdmin`), as the caller: permissions are checked by the
    /// engine with the connection's credential.
    case cloneFile = 70
    case cloneChunks = 71
    case cloneFinish = 72
    /// `stagefs trash` (`TrashAdmin`): `u8` what, then its fields (`TrashOp`).
    case trash = 73
    /// `stagefs quota get|list` (`u8` 0 and a quota, or 1): what anyone may read, as df shows.
    /// Setting, deleting and checking quotas takes the volume's META-URL (a check walks the tree).
    case quota = 74
    case getlk = 50
    case setlk = 51
    case flock = 52
    case getBlock = 60
    case putBlock = 61
    /// A descriptor of the block's file, passed over the Unix socket (`SCM_RIGHTS`).
    case openBlock = 62
    /// A pre-signed URL from which to read a block of an S3 bucket.
    case presignBlock = 63
}

/// What a `trash` request asks.
package enum TrashOp: UInt8, Sendable {
    case usage = 0, hours = 1, ownerDirs = 2, entries = 3, purge = 4, restore = 5, removeEmptyDir = 6
}

/// Builds a frame body.
package struct WireWriter {
    package var w: ByteWriter

    package init(capacity: Int = 128) { w = ByteWriter(capacity: capacity) }

    package var bytes: [UInt8] { w.bytes }

    package mutating func u8(_ v: UInt8) { w.u8(v) }
    package mutating func set(u32 v: UInt32, at offset: Int) { w.set(u32: v, at: offset) }
    package mutating func u16(_ v: UInt16) { w.u16(v) }
    package mutating func u32(_ v: UInt32) { w.u32(v) }
    package mutating func i32(_ v: Int32) { w.u32(UInt32(bitPattern: v)) }
    package mutating func u64(_ v: UInt64) { w.u64(v) }
    package mutating func i64(_ v: Int64) { w.i64(v) }
    package mutating func bool(_ v: Bool) { w.u8(v ? 1 : 0) }
    /// A byte string: `u32 length` and the bytes.
    package mutating func data<C: Collection<UInt8>>(_ v: C) {
        w.u32(UInt32(v.count))
        w.raw(v)
    }
    package mutating func string(_ v: String) { data(Array(v.utf8)) }
    package mutating func time(_ t: Timespec) {
        w.i64(t.sec)
        w.u32(t.nsec)
    }
    package mutating func attr(_ a: Attr) { w.raw(a.encode()) }
    package mutating func slices(_ s: [Slice]) {
        w.u32(UInt32(s.count))
        for x in s { x.encode(into: &w) }
    }
}

/// Reads a frame body; any field that runs past the end, or a length beyond its bound, is a
/// malformed frame (`EPROTO`), never a crash or a large allocation.
package struct WireReader {
    private var r: ByteReader

    package init(_ bytes: [UInt8], offset: Int = 0) { r = ByteReader(bytes, offset: offset) }

    package var remaining: Int { r.remaining }

    private func need(_ n: Int) throws(FSError) {
        if r.remaining < n { throw Wire.malformed("a field runs past the end of the frame") }
    }

    package mutating func u8() throws(FSError) -> UInt8 {
        try need(1)
        return r.u8()
    }
    package mutating func u16() throws(FSError) -> UInt16 {
        try need(2)
        return r.u16()
    }
    package mutating func u32() throws(FSError) -> UInt32 {
        try need(4)
        return r.u32()
    }
    package mutating func i32() throws(FSError) -> Int32 { Int32(bitPattern: try u32()) }
    package mutating func u64() throws(FSError) -> UInt64 {
        try need(8)
        return r.u64()
    }
    package mutating func i64() throws(FSError) -> Int64 {
        try need(8)
        return r.i64()
    }
    package mutating func bool() throws(FSError) -> Bool { try u8() != 0 }
    /// A byte string of at most `max` bytes.
    package mutating func data(max: Int) throws(FSError) -> [UInt8] {
        let n = Int(try u32())
        if n > max { throw Wire.malformed("a field of \(n) bytes exceeds its limit of \(max)") }
        try need(n)
        return r.raw(n)
    }
    package mutating func string(max: Int = 4096) throws(FSError) -> String { String(decoding: try data(max: max), as: UTF8.self) }
    /// A file name: one longer than a name may be is `ENAMETOOLONG`, as the engines answer it
    /// (the kernel hands such names on: a symlink's target followed as a path).
    package mutating func name() throws(FSError) -> [UInt8] {
        let n = try data(max: Wire.maxFrame)
        if n.count > maxNameLength { throw FSError.nameTooLong }
        return n
    }
    package mutating func time() throws(FSError) -> Timespec { Timespec(sec: try i64(), nsec: try u32()) }
    package mutating func attr() throws(FSError) -> Attr {
        try need(Attr.encodedSize)
        guard let a = Attr(decoding: r.raw(Attr.encodedSize)) else { throw Wire.malformed("an attribute record of an unknown file type") }
        return a
    }
    /// A count of at most `max` items, each at least `itemSize` bytes long.
    package mutating func count(max: Int, itemSize: Int) throws(FSError) -> Int {
        let n = Int(try u32())
        if n > max { throw Wire.malformed("a list of \(n) items exceeds its limit of \(max)") }
        try need(n * itemSize)
        return n
    }
    package mutating func slices() throws(FSError) -> [Slice] {
        let n = try count(max: 1 << 20, itemSize: Slice.encodedSize)
        var out: [Slice] = []
        out.reserveCapacity(n)
        for _ in 0..<n {
            out.append(Slice(pos: try u32(), id: try u64(), size: try u32(), off: try u32(), len: try u32()))
        }
        return out
    }
    package mutating func raw(_ n: Int) throws(FSError) -> [UInt8] {
        try need(n)
        return r.raw(n)
    }
    /// The frame must end here.
    package func end() throws(FSError) {
        if r.remaining != 0 { throw Wire.malformed("\(r.remaining) bytes follow the last field") }
    }
}

extension Wire {
    package static func malformed(_ why: String) -> FSError { FSError(EPROTO, "malformed gateway frame: \(why)") }
}

/// Blocking frame I/O on a socket.
package enum FrameIO {
    /// Writes one frame (the length prefix and `body`), all of it.
    /// With a `deadline` (`Sys.monotonicNanos()`), all of it must be sent by then (`ETIMEDOUT`).
    package static func send(_ fd: Int32, _ body: [UInt8], deadline: UInt64? = nil) throws(FSError) {
        guard body.count <= Wire.maxFrame else { throw FSError(E2BIG, "a frame of \(body.count) bytes (the limit is \(Wire.maxFrame))") }
        var head = ByteWriter(capacity: 4)
        head.u32(UInt32(body.count))
        let h = head.bytes
        try fsTyped { try h.withUnsafeBytes { hp in try body.withUnsafeBytes { bp in try writeAll(fd, [hp, bp], deadline: deadline) } } }
    }

    /// Writes one frame whose body is `head` followed by `tail` (a block's bytes), without
    /// joining them.
    package static func send(_ fd: Int32, _ head: [UInt8], tail: UnsafeRawBufferPointer, deadline: UInt64? = nil) throws(FSError) {
        guard head.count + tail.count <= Wire.maxFrame else {
            throw FSError(E2BIG, "a frame of \(head.count + tail.count) bytes (the limit is \(Wire.maxFrame))")
        }
        var len = ByteWriter(capacity: 4)
        len.u32(UInt32(head.count + tail.count))
        let l = len.bytes
        try fsTyped { try l.withUnsafeBytes { lp in try head.withUnsafeBytes { hp in try writeAll(fd, [lp, hp, tail], deadline: deadline) } } }
    }

    /// Writes frames of bodies `bodies` back to back, in one piece (requests a gateway answers
    /// in order).
    package static func send(_ fd: Int32, frames bodies: [[UInt8]]) throws(FSError) {
        var w = ByteWriter(capacity: bodies.reduce(0) { $0 + 4 + $1.count })
        for body in bodies {
            guard body.count <= Wire.maxFrame else { throw FSError(E2BIG, "a frame of \(body.count) bytes (the limit is \(Wire.maxFrame))") }
            w.u32(UInt32(body.count))
            w.raw(body)
        }
        let all = w.bytes
        try fsTyped { try all.withUnsafeBytes { p in try writeAll(fd, [p]) } }
    }

    /// Writes one frame with descriptor `passing` attached to its first bytes (`SCM_RIGHTS`).
    package static func send(_ fd: Int32, _ body: [UInt8], passing: Int32) throws(FSError) {
        var w = ByteWriter(capacity: 4 + body.count)
        w.u32(UInt32(body.count))
        w.raw(body)
        let frame = w.bytes
        let first = frame.withUnsafeBytes { p in
            var n: Int
            repeat { n = Sys.send(fd, p, passing: passing) } while n < 0 && errno == EINTR
            return n
        }
        if first < 0 { throw FSError.errno(errno == EAGAIN ? ETIMEDOUT : errno, "gateway connection") }
        try fsTyped { try frame.withUnsafeBytes { p in try writeAll(fd, [UnsafeRawBufferPointer(rebasing: p[first...])]) } }
    }

    /// Sends `parts` in order, all of them, with as few `sendmsg` calls as the socket allows:
    /// a frame goes out in one piece, so the peer wakes once for it (not once for its length and
    /// again for its body).
    private static func writeAll(_ fd: Int32, _ parts: [UnsafeRawBufferPointer], deadline: UInt64? = nil) throws(FSError) {
        var iov = parts.compactMap { p in p.count > 0 ? iovec(iov_base: UnsafeMutableRawPointer(mutating: p.baseAddress!), iov_len: p.count) : nil }
        let flags = Int32(MSG_NOSIGNAL) | (deadline != nil ? Int32(MSG_DONTWAIT) : 0)
        var first = 0
        while first < iov.count {
            // What fits is sent at once; only a wait for room is bounded by the deadline.
            let n = iov.withUnsafeMutableBufferPointer { b -> Int in
                var msg = msghdr()
                msg.msg_iov = b.baseAddress! + first
                msg.msg_iovlen = b.count - first
                return sendmsg(fd, &msg, flags)
            }
            if n < 0 {
                if errno == EINTR { continue }
                if let deadline, errno == EAGAIN || errno == EWOULDBLOCK {
                    try waitWritable(fd, until: deadline)
                    continue
                }
                throw FSError.errno(errno == EAGAIN ? ETIMEDOUT : errno, "gateway connection")
            }
            var left = n
            while left > 0 && first < iov.count {
                if iov[first].iov_len <= left {
                    left -= iov[first].iov_len
                    first += 1
                } else {
                    iov[first].iov_base += left
                    iov[first].iov_len -= left
                    left = 0
                }
            }
        }
    }

    /// Reads one frame's body; nil at a clean end of the stream (before any byte of a frame).
    /// A length beyond `maxFrame` is refused before anything is allocated.
    /// A body of more than 64 KiB is counted against each of `budgets` first (waiting while one
    /// is spent); the caller releases them once done with the body. With a `deadline`
    /// (`Sys.monotonicNanos()`), the whole frame must have arrived by then (`ETIMEDOUT`),
    /// however slowly its bytes trickle in.
    ///
    /// `passed`: where a descriptor that came with the frame goes (-1 when none came); without
    /// it, a descriptor sent along is dropped by the kernel.
    package static func receive(
        _ fd: Int32, maxFrame: Int = Wire.maxFrame, budgets: [ByteBudget] = [], deadline: UInt64? = nil,
        passed: UnsafeMutablePointer<Int32>? = nil
    ) throws(FSError) -> [UInt8]? {
        var head = [UInt8](repeating: 0, count: 4)
        let got = try fsTyped {
            try head.withUnsafeMutableBytes { p in try readFull(fd, p, allowEOF: true, deadline: deadline, passed: passed) }
        }
        if !got { return nil }
        var hr = ByteReader(head)
        let n = Int(hr.u32())
        if n > maxFrame { throw Wire.malformed("a frame of \(n) bytes (the limit is \(maxFrame))") }
        let counted = n > 65536
        if counted { for b in budgets { b.acquire(n) } }
        var body = [UInt8](repeating: 0, count: n)
        do throws(FSError) {
            if n > 0 {
                _ = try fsTyped { try body.withUnsafeMutableBytes { p in try readFull(fd, p, allowEOF: false, deadline: deadline) } }
            }
        } catch {
            if counted { for b in budgets { b.release(n) } }
            throw error
        }
        return body
    }

    /// Fills `p`; false when the stream ended before its first byte and `allowEOF`.
    private static func readFull(
        _ fd: Int32, _ p: UnsafeMutableRawBufferPointer, allowEOF: Bool, deadline: UInt64?, passed: UnsafeMutablePointer<Int32>? = nil
    ) throws(FSError) -> Bool {
        var off = 0
        while off < p.count {
            let n: Int
            if let passed, off == 0 {
                if let deadline { try waitReadable(fd, until: deadline) }
                // The descriptor travels with the frame's first bytes.
                n = Sys.receive(fd, UnsafeMutableRawBufferPointer(rebasing: p[off...]), passed: &passed.pointee)
            } else if let deadline {
                // What has arrived is taken at once; only a wait is bounded by the deadline.
                n = recv(fd, p.baseAddress! + off, p.count - off, Int32(MSG_DONTWAIT))
                if n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) {
                    try waitReadable(fd, until: deadline)
                    continue
                }
            } else {
                n = recv(fd, p.baseAddress! + off, p.count - off, 0)
            }
            if n < 0 {
                if errno == EINTR { continue }
                throw FSError.errno(errno == EAGAIN ? ETIMEDOUT : errno, "gateway connection")
            }
            if n == 0 {
                if off == 0 && allowEOF { return false }
                throw FSError(EIO, "gateway connection closed in the middle of a frame")
            }
            off += n
        }
        return true
    }

    /// Waits until `fd` has bytes to read (or an end of stream), throwing `ETIMEDOUT` once the
    /// monotonic clock passes `deadline`.
    private static func waitReadable(_ fd: Int32, until deadline: UInt64) throws(FSError) {
        try wait(fd, Int16(POLLIN), until: deadline, "the peer did not send in time")
    }

    /// Waits until `fd` takes more bytes, throwing `ETIMEDOUT` once `deadline` passes.
    private static func waitWritable(_ fd: Int32, until deadline: UInt64) throws(FSError) {
        try wait(fd, Int16(POLLOUT), until: deadline, "the peer did not take the reply in time")
    }

    private static func wait(_ fd: Int32, _ events: Int16, until deadline: UInt64, _ why: String) throws(FSError) {
        var p = pollfd(fd: fd, events: events, revents: 0)
        while true {
            let now = Sys.monotonicNanos()
            if now >= deadline { throw FSError(ETIMEDOUT, why) }
            let ms = Int32(min((deadline - now) / 1_000_000 + 1, 60_000))
            let n = poll(&p, 1, ms)
            if n > 0 { return }
            if n < 0 && errno != EINTR { throw FSError.errno(errno, "gateway connection") }
        }
    }
}

/// The reply to a request: `u64 id`, `i32 status`, then results or an error message.
package enum Reply {
    package static func ok(_ id: UInt64) -> WireWriter {
        var w = WireWriter()
        w.u64(id)
        w.i32(0)
        return w
    }

    package static func error(_ id: UInt64, _ e: FSError) -> [UInt8] {
        var w = WireWriter()
        w.u64(id)
        w.i32(e.code == 0 ? EIO : e.code)
        w.string(String(e.message.prefix(1000)))
        return w.bytes
    }
}
