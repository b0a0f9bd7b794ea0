import CLinux

#if canImport(Glibc)
    import Glibc
#endif

/// A TCP address to listen on (a gateway's `--listen`, a metrics port): `HOST:PORT`
/// (`[IPv6]:PORT` for a literal IPv6 address).
package struct TCPAddress: Sendable, Equatable, CustomStringConvertible {
    package var host: String
    package var port: Int

    package init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    /// Parses `HOST:PORT` given to `option`; a malformed one is a usage error naming the
    /// expected form. With `defaultHost`, a bare `PORT` means that host.
    package static func parse(
        _ text: String, option: String = "--listen", defaultHost: String? = nil, example: Int = 7420
    ) throws(FSError) -> TCPAddress {
        func bad(_ why: String) -> FSError {
            FSError.usage(
                "\(option) '\(text)': \(why) (the form is HOST:PORT, e.g. 0.0.0.0:\(example), 127.0.0.1:\(example) or [::1]:\(example)\(defaultHost == nil ? "" : ", or PORT for \(defaultHost!):PORT"))"
            )
        }
        if let defaultHost, let port = Int(text) {
            guard port > 0, port < 65536 else { throw bad("the port must be 1 to 65535") }
            return TCPAddress(host: defaultHost, port: port)
        }
        guard let colon = text.lastIndex(of: ":") else { throw bad("no port") }
        guard let port = Int(text[text.index(after: colon)...]), port > 0, port < 65536 else { throw bad("the port must be 1 to 65535") }
        var host = String(text[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") {
            host = String(host.dropFirst().dropLast())
        } else if host.contains(":") {
            throw bad("an IPv6 address goes in brackets")
        }
        guard !host.isEmpty else { throw bad("no host (0.0.0.0 for every IPv4 address, [::] for every IPv6 one)") }
        return TCPAddress(host: host, port: port)
    }

    package var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}

/// TCP sockets of the gateway and its clients (and of metrics ports): listening, connecting
/// within a time limit, and the options both ends set.
package enum TCP {
    /// A listening socket for each address `address` resolves to (a name may give IPv4 and IPv6
    /// ones), each with a label `HOST:PORT` for the log. An IPv6 socket takes IPv6 only, so
    /// `[::]:P` and `0.0.0.0:P` may both be given.
    package static func listen(_ address: TCPAddress, option: String = "--listen") throws(FSError) -> [(fd: Int32, label: String)] {
        let list = try resolve(address.host, address.port, passive: true, what: "\(option) \(address)")
        defer { freeaddrinfo(list) }
        var out: [(fd: Int32, label: String)] = []
        var ai: UnsafeMutablePointer<addrinfo>? = list
        while let a = ai {
            ai = a.pointee.ai_next
            let fd = socket(a.pointee.ai_family, a.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), a.pointee.ai_protocol)
            guard fd >= 0 else {
                let e = errno
                for l in out { close(l.fd) }
                throw FSError.errno(e, "socket for \(address)")
            }
            var one: Int32 = 1
            // A restarted gateway binds again while its old connections linger in TIME_WAIT.
            setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
            if a.pointee.ai_family == AF_INET6 {
                setsockopt(fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, &one, socklen_t(MemoryLayout<Int32>.size))
            }
            let label = numericName(a.pointee.ai_addr, a.pointee.ai_addrlen) ?? address.description
            guard bind(fd, a.pointee.ai_addr, a.pointee.ai_addrlen) == 0, Glibc.listen(fd, 256) == 0 else {
                let e = errno
                close(fd)
                for l in out { close(l.fd) }
                let hint = e == EADDRINUSE ? " (another process listens there)" : e == EADDRNOTAVAIL ? " (not an address of this host)" : ""
                throw FSError(e, "cannot listen on \(label): \(String(cString: strerror(e)))\(hint)")
            }
            out.append((fd, label))
        }
        if out.isEmpty { throw FSError(EADDRNOTAVAIL, "\(option) \(address): no address to listen on") }
        return out
    }

    /// A connection to `host:port` (each address it resolves to in turn), each attempt bounded
    /// by `timeout` seconds; the error names the address and the cause.
    package static func connect(host: String, port: Int, timeout: Double, what: String? = nil) throws(FSError) -> Int32 {
        let name = TCPAddress(host: host, port: port).description
        let what = what ?? "the gateway at \(name)"
        let list = try resolve(host, port, passive: false, what: what)
        defer { freeaddrinfo(list) }
        var lastErr: Int32 = ECONNREFUSED
        var ai: UnsafeMutablePointer<addrinfo>? = list
        while let a = ai {
            ai = a.pointee.ai_next
            let fd = socket(a.pointee.ai_family, a.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), a.pointee.ai_protocol)
            guard fd >= 0 else {
                lastErr = errno
                continue
            }
            if Sys.connect(fd, a.pointee.ai_addr, a.pointee.ai_addrlen, seconds: timeout, err: &lastErr) {
                tune(fd)
                return fd
            }
            close(fd)
        }
        let why: String
        switch lastErr {
        case ETIMEDOUT: why = "timed out after \(Int(timeout)) s"
        case ECONNREFUSED:
            why =
                what.hasPrefix("the gateway")
                ? "connection refused (is 'stagefs gateway --listen' running there, on that port?)" : "connection refused"
        default: why = String(cString: strerror(lastErr)).lowercased()
        }
        throw FSError(lastErr == ETIMEDOUT ? ETIMEDOUT : ECONNREFUSED, "cannot reach \(what): \(why)")
    }

    /// TCP_NODELAY (a request is one small write, its reply awaited at once) and keep-alives
    /// after a minute of silence, every 10 s, 6 unanswered: a peer whose node vanished is
    /// noticed in about two minutes (Linux's defaults take over two hours), so its connections
    /// stop counting against its user's limit.
    package static func tune(_ fd: Int32) {
        let size = socklen_t(MemoryLayout<Int32>.size)
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, size)
        setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, size)
        var idle: Int32 = 60
        var interval: Int32 = 10
        var count: Int32 = 6
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_KEEPIDLE, &idle, size)
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_KEEPINTVL, &interval, size)
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_KEEPCNT, &count, size)
    }

    /// `HOST:PORT` of the other end of a connected socket (numeric), for the log.
    package static func peerName(_ fd: Int32) -> String {
        var ss = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let rc = withUnsafeMutablePointer(to: &ss) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd, $0, &len) }
        }
        guard rc == 0 else { return "an unknown address" }
        let name = withUnsafePointer(to: &ss) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { numericName($0, len) }
        }
        return name ?? "an unknown address"
    }

    /// `getnameinfo` with numeric host and port: `1.2.3.4:P` or `[::1]:P`.
    private static func numericName(_ addr: UnsafePointer<sockaddr>?, _ len: socklen_t) -> String? {
        var host = [CChar](repeating: 0, count: 1025)
        var serv = [CChar](repeating: 0, count: 32)
        guard getnameinfo(addr, len, &host, socklen_t(host.count), &serv, socklen_t(serv.count), NI_NUMERICHOST | NI_NUMERICSERV) == 0 else {
            return nil
        }
        func text(_ c: [CChar]) -> String { String(decoding: c.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) }
        let h = text(host)
        guard let port = Int(text(serv)) else { return nil }
        return TCPAddress(host: h, port: port).description
    }

    /// `getaddrinfo` for stream sockets; the caller frees the list.
    private static func resolve(_ host: String, _ port: Int, passive: Bool, what: String) throws(FSError) -> UnsafeMutablePointer<addrinfo> {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = passive ? AI_PASSIVE : 0
        var res: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host, String(port), &hints, &res)
        guard rc == 0, let res else {
            let why = rc == EAI_SYSTEM ? String(cString: strerror(errno)) : String(cString: gai_strerror(rc))
            throw FSError(EHOSTUNREACH, "cannot resolve \(what): \(why.lowercased())")
        }
        return res
    }
}

/// Unix stream sockets (the gateway's, as both sides make it; a mount's metrics socket).
package enum UnixSocket {
    /// The address of the socket file at `path` (at most 107 bytes).
    package static func address(_ path: String) throws(FSError) -> sockaddr_un {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else {
            throw FSError.usage("socket path \(path) is too long (at most 107 bytes)")
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            for (i, b) in bytes.enumerated() { p[i] = b }
        }
        return addr
    }

    /// A new stream socket, close-on-exec.
    package static func make() throws(FSError) -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw FSError.errno(errno, "socket") }
        return fd
    }
}
