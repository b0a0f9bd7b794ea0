import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// What learns which keys other clients changed (the metadata store's client cache), from
/// Redis's client tracking (`RedisPool.startTracking`).
package protocol RedisInvalidationSink: AnyObject, Sendable {
    /// Tracking starts a new generation (nil: it is down). Nothing learnt before is covered any
    /// more: no invalidation of it will come. Called under the pool's lock, so that no
    /// connection of the new generation is handed out before the sink knows of it.
    func trackingChanged(_ generation: UInt64?)
    /// Keys some client changed (nil: all of them, as after `FLUSHDB`).
    func invalidated(_ keys: [[UInt8]]?)
    /// The listener heard from the server: every invalidation sent before now has arrived.
    func heard()
}

/// The connection that hears invalidations, while it listens.
struct TrackingListener {
    let id: Int64
    /// Its client name (random): a tracked connection checks that the client it redirects to
    /// is this one, on the same server.
    let name: String
    let generation: UInt64
    let fd: Int32

    func next(_ generation: UInt64) -> TrackingListener { TrackingListener(id: id, name: name, generation: generation, fd: fd) }
}

/// Redis's client tracking for a pool (Redis 6 and later, not on a Redis Cluster): one
/// connection of its own listens (subscribed to `__redis__:invalidate`), and one connection of
/// the pool is tracked, with `CLIENT TRACKING on REDIRECT <listener> OPTIN NOLOOP`: the keys of
/// a command sent on it right after `CLIENT CACHING yes` are tracked, and the server tells the
/// listener when any other connection changes one of them (its own changes it does not: a
/// commit on it reads what it wrote again, tracked, in the same MULTI). Calls that want
/// tracking take that connection when it is free (`with(tracking:)`) and an untracked one
/// otherwise, so that everything trusted is tracked by one client and this client's own
/// writes through it drop nothing.
///
/// The generation changes whenever something read may no longer be tracked: the listener
/// (re)connects or is lost, the tracked connection breaks or is closed by the server (its
/// socket, polled while it is free, before each trusted answer: `invalidationsArriving`). The
/// listener pings after 200 ms of silence and gives up after 1 s without an answer.
extension RedisPool {
    /// Starts tracking on a thread of its own, telling `sink`; until `stopTracking`.
    package func startTracking(_ sink: any RedisInvalidationSink) {
        lock.withLock { trackingSink = sink }
        DetachedThread.start { [self] in listen(sink) }
    }

    /// Stops tracking; the listener ends within 200 ms.
    package func stopTracking() {
        lock.withLock {
            trackingStopped = true
            if let l = trackingListener { Glibc.shutdown(l.fd, Int32(SHUT_RDWR)) }
        }
    }

    /// Whether invalidations have arrived that the listener has not applied yet (bytes wait on
    /// its socket, or it is applying them): a reader does not trust the cache meanwhile. So a
    /// change whose invalidation reached this node before the read is never missed, even if
    /// the listener thread has not run since.
    /// (It also notices a tracked connection that Redis closed: `trackedConnectionEnded`.)
    package var invalidationsArriving: Bool {
        if listenerBusy.load(ordering: .sequentiallyConsistent) { return true }
        let (waiting, ended) = lock.withLock { () -> (Int32, UInt64?) in
            guard let l = trackingListener else { return (0, nil) }
            var n: Int32 = 0
            let waiting = ioctl(l.fd, UInt(FIONREAD), &n) == 0 ? n : 1
            return (waiting, endedLocked(l))
        }
        if let ended {
            trackingLost(ended, "the tracked connection was closed by the server")
            return true
        }
        return waiting > 0 || listenerBusy.load(ordering: .sequentiallyConsistent)
    }

    /// Wakes the listener to connect again (the master may have changed).
    func wakeListener() {
        lock.withLock {
            if let l = trackingListener { wakeLocked(l) }
        }
    }

    /// Under the lock: makes listener `l` connect again; nothing is trusted from now on, not
    /// once the listener thread runs.
    private func wakeLocked(_ l: TrackingListener) {
        listenerWoken = true
        Glibc.shutdown(l.fd, Int32(SHUT_RDWR))
        downLocked()
    }

    /// Under the lock: tracking is down (the listener no longer counts).
    private func downLocked() {
        if trackingListener != nil { newGenerationLocked { _ in nil } }
    }

    /// Under the lock: starts a generation, listened to by `listener(generation)` (nil: down).
    private func newGenerationLocked(_ listener: (UInt64) -> TrackingListener?) {
        trackingGeneration += 1
        trackingListener = listener(trackingGeneration)
        trackingSink?.trackingChanged(trackingListener?.generation)
    }

    /// Turns tracking on for `c`, redirected to `listener`, once sure the listener is a client
    /// of the same server (after a failover, its number may be another client's there).
    func track(_ c: RedisConnection, _ listener: TrackingListener) throws(FSError) {
        let r = try c.command(["CLIENT", "LIST", "ID", listener.id])
        if case .error(let e) = r {
            pauseTracking("CLIENT LIST was refused: \(e)")
            return
        }
        guard (r.text ?? "").split(separator: " ").contains(where: { $0 == "name=\(listener.name)" }) else {
            // Not this server's client: nothing read in this generation is covered.
            trackingLost(listener.generation, "the listener is not a client of this server", wake: true)
            return
        }
        let on = try c.pipeline([
            RedisCommand(["CLIENT", "TRACKING", "on", "REDIRECT", listener.id, "OPTIN", "NOLOOP"]),
            // (So that Redis does not close it to save memory, which would end its tracking.)
            RedisCommand(["CLIENT", "NO-EVICT", "on"]),
        ])[0]
        guard case .status = on else {
            pauseTracking("CLIENT TRACKING was refused: \(on)")
            return
        }
        if lock.withLock({ trackingListener?.generation == listener.generation }) { c.trackingGeneration = listener.generation }
    }

    /// Tracking refused (an ACL, a proxy): no tracked connection for a minute, said once.
    private func pauseTracking(_ why: String) {
        let first = lock.withLock { () -> Bool in
            trackingPausedUntil = Sys.monotonicNanos() + 60_000_000_000
            defer { trackingPauseSaid = true }
            return !trackingPauseSaid
        }
        if first { Log.warning("\(displayName): the client cache cannot track what it reads (\(why)); reads go to Redis (asked again every minute)") }
    }

    /// Under the lock: the generation to end when the tracked connection, free, has something
    /// to read: unasked, that is its end (Redis closed it: what it tracked is no longer tracked).
    private func endedLocked(_ l: TrackingListener) -> UInt64? {
        guard !trackedInUse, let t = trackedConnection, t.trackingGeneration == l.generation else { return nil }
        var p = pollfd(fd: t.socketNumber, events: Int16(POLLIN) | Int16(truncatingIfNeeded: Sys.POLLRDHUP), revents: 0)
        return Glibc.poll(&p, 1, 0) > 0 ? l.generation : nil
    }

    /// Starts a new generation, if `generation` is still the current one. `wake`: make the
    /// listener connect again too.
    func trackingLost(_ generation: UInt64, _ why: String, wake: Bool = false) {
        let changed = lock.withLock { () -> Bool in
            guard let l = trackingListener, l.generation == generation else { return false }
            if wake { wakeLocked(l) } else { newGenerationLocked { l.next($0) } }
            return true
        }
        if changed { Log.debug("\(displayName): client tracking starts over: \(why)") }
    }

    private var trackingShouldStop: Bool { lock.withLock { trackingStopped } }

    private func listen(_ sink: any RedisInvalidationSink) {
        var delay = 0.05
        var warned = false
        while !trackingShouldStop {
            do throws(FSError) {
                if isCluster { return }
                let conn = try connect()
                try withExtendedLifetime(conn) { () throws(FSError) in
                    let name = "stagefs-invalidations-" + Sys.randomBytes(8).map { String($0, radix: 16) }.joined()
                    let setup = try conn.pipeline([RedisCommand(["CLIENT", "SETNAME", name]), RedisCommand(["CLIENT", "ID"])])
                    guard case .status = setup[0], let id = setup[1].int else {
                        throw FSError(EIO, "CLIENT SETNAME/ID answered \(setup)")
                    }
                    let r = try conn.command(["SUBSCRIBE", "__redis__:invalidate"])
                    guard r.array.first?.text == "subscribe" else { throw FSError(EIO, "SUBSCRIBE __redis__:invalidate answered \(r)") }
                    let started = lock.withLock { () -> Bool in
                        if trackingStopped { return false }
                        newGenerationLocked { TrackingListener(id: id, name: name, generation: $0, fd: conn.socketNumber) }
                        return true
                    }
                    guard started else { return }
                    sink.heard()
                    if warned {
                        Log.info("\(displayName): the client cache hears of changes again")
                        warned = false
                    }
                    delay = 0.05
                    // (Down before the connection closes, so that no one shuts its socket down once
                    // the number may be another file's.)
                    defer { lock.withLock { downLocked() } }
                    try serve(conn, sink)
                }
            } catch {
                // (Woken on purpose, to connect again: nothing to say.)
                let woken = lock.withLock { () -> Bool in
                    defer { listenerWoken = false }
                    return listenerWoken
                }
                if !warned && !woken {
                    Log.warning("\(displayName): the client cache hears of no changes (\(error.message)); reads go to Redis until it does")
                    warned = true
                }
            }
            Sys.sleep(seconds: delay)
            delay = min(delay * 2, 1)
        }
    }

    /// Reads invalidations until the connection fails or tracking stops.
    private func serve(_ conn: RedisConnection, _ sink: any RedisInvalidationSink) throws(FSError) {
        var lastHeard = Sys.monotonicNanos()
        var pinged = false
        while !trackingShouldStop {
            let now = Sys.monotonicNanos()
            if conn.waitReadable(millis: 200) {
                // Busy before the bytes leave the socket, until all that arrived is applied.
                listenerBusy.store(true, ordering: .sequentiallyConsistent)
                defer { listenerBusy.store(false, ordering: .sequentiallyConsistent) }
                repeat {
                    let m = try conn.nextReply()
                    let a = m.array
                    if a.count == 3, a[0].text == "message" {
                        switch a[2] {
                        case .array(let keys): sink.invalidated(keys.compactMap(\.bytes))
                        default: sink.invalidated(nil)
                        }
                    }
                } while conn.waitReadable(millis: 0)
                lastHeard = Sys.monotonicNanos()
                pinged = false
                sink.heard()
            } else if now - lastHeard > 1_000_000_000 {
                throw .redisTransient("\(displayName): no answer to PING on the tracking connection in 1 s")
            } else if !pinged {
                try conn.send([RedisCommand(["PING"])])
                pinged = true
            }
        }
    }
}
