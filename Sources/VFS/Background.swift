import DataPath
import Metadata
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// This client's session: registered at start, kept alive by heartbeats, registered again
/// (with the files open here) if another client cleaned it up as stale.
final class SessionKeeper: Sendable {
    private let meta: any MetadataEngine
    private let info: @Sendable () -> SessionInfo
    private let id = Locked<UInt64>(0)
    /// Sessions silent for longer than this many seconds are cleaned up.
    private let timeout: Int64

    init(meta: any MetadataEngine, timeout: Int64, info: @escaping @Sendable () -> SessionInfo) {
        self.meta = meta
        self.timeout = timeout
        self.info = info
    }

    /// The session's id (0 before `register`; it changes if the session had to be registered again).
    var sid: UInt64 { id.current }

    func register() throws(FSError) {
        let sid = try meta.newSession(info())
        id.withLock { $0 = sid }
    }

    /// A heartbeat, and the stale sessions of others cleaned up. `open`: the files open here
    /// (inode, access mode), opened again if this session was found gone.
    func beat(open: () -> [(Ino, Int32)]) {
        do {
            try meta.heartbeat(sid)
        } catch {
            if error.code == ENOENT {
                reregister(open: open())
            } else {
                Log.error("session heartbeat: \(error.message)")
            }
        }
        do {
            let n = try meta.cleanStaleSessions(age: timeout)
            if n > 0 { Log.info("cleaned up \(n) stale session(s)") }
        } catch {
            Log.warning("cleaning stale sessions: \(error.message)")
        }
    }

    /// Another client cleaned this session up as stale (this one was silent too long, e.g.
    /// suspended or cut off): register again and record the open files again, so files unlinked
    /// meanwhile by others stay readable here until closed. Locks held before are gone.
    private func reregister(open: [(Ino, Int32)]) {
        let old = sid
        do {
            try register()
            let new = sid
            // Each open again as it was (for reading, writing or both): through a gateway the
            // right to write comes from an open for writing held by the session.
            var lost = 0
            for (ino, mode) in open {
                do { _ = try meta.open(.root, ino, flags: mode, sid: new) } catch { lost += 1 }
            }
            Log.warning(
                "session \(old) had been cleaned up as stale; registered again as session \(new) with \(open.count - lost) open file(s)"
                    + (lost > 0 ? ", \(lost) already gone" : "") + "; locks held before are released")
        } catch {
            Log.error("session \(old) is gone and registering again failed: \(error.message)")
        }
    }
}

/// The client's background thread: it writes out buffered data that has waited, keeps the
/// session alive, and deletes what nothing references any more. The deletions of this
/// client's own changes (a close, unlink or truncate) wake it; it gathers them for
/// `deleteDelayNanos` and deletes them in one go, and every 10 s it deletes everything
/// waiting (other clients' leftovers, a crash's).
final class Background: @unchecked Sendable {
    // @unchecked: `pending` is guarded by `life.lock` (on which the thread waits for work and
    // for its time).
    private let life = ThreadLife()
    private var lock: ConditionLock { life.lock }
    /// What the deleter was woken for.
    private var pending: Deletions = []
    private let meta: any MetadataEngine
    private let data: DataStore
    private let session: SessionKeeper
    private let heartbeat: Double
    private let readOnly: Bool
    private let open: @Sendable () -> [(Ino, Int32)]

    /// How long the deleter waits after a removal for more to come.
    static let deleteDelayNanos: UInt64 = 100_000_000

    init(
        meta: any MetadataEngine, data: DataStore, session: SessionKeeper, heartbeat: Double, readOnly: Bool,
        open: @escaping @Sendable () -> [(Ino, Int32)]
    ) {
        self.meta = meta
        self.data = data
        self.session = session
        self.heartbeat = heartbeat
        self.readOnly = readOnly
        self.open = open
    }

    func start() { life.start { [self] in run() } }

    /// Stops the thread and waits for it.
    func stop() { life.stop() }

    func wake(_ what: Deletions) {
        lock.withLock {
            pending.formUnion(what)
            lock.broadcast()
        }
    }

    /// Deletes the objects of files whose last link went away and of slices cut off by
    /// truncation: metadata says which (in bounded steps), the data path deletes them. Returns
    /// how many objects were deleted.
    @discardableResult
    func cleanDeleted(_ what: Deletions = .all, limit: Int = 1000) -> Int {
        var count = 0
        do {
            let left = try meta.collectDeleted(what, limit: limit) { count += data.deleteObjects($0) }
            if !left.isEmpty { lock.withLock { pending.formUnion(left) } }
        } catch {
            Log.warning("deleting unreferenced data: \(error.message)")
        }
        return count
    }

    /// Adds what this client stored and deleted to the volume's counters.
    func recordStored() {
        data.blocks.recordCounts { (c) throws(FSError) in try meta.recordStored(blockBytes: c.blockBytes, storedBytes: c.storedBytes) }
    }

    private func run() {
        var lastBeat = Sys.monotonicNanos()
        var lastClean = lastBeat
        var lastCount = lastBeat
        var purger = TrashPurger(now: lastBeat)
        while true {
            let (stop, deletes) = lock.withLock { () -> (Bool, Deletions) in
                if pending.isEmpty { _ = life.pause(seconds: 1) }
                if !life.stopping && !pending.isEmpty {
                    // Gathers what a burst of removals leaves (one step deletes many files).
                    let until = Sys.monotonicNanos() + Self.deleteDelayNanos
                    while !life.stopping {
                        let now = Sys.monotonicNanos()
                        if now >= until { break }
                        lock.wait(seconds: Double(until - now) / 1e9)
                    }
                }
                let d = pending
                pending = []
                return (life.stopping, d)
            }
            if stop { break }
            data.flushIdle()
            let now = Sys.monotonicNanos()
            if Double(now - lastCount) / 1e9 >= 5 {
                lastCount = now
                recordStored()
            }
            if Double(now - lastBeat) / 1e9 >= heartbeat {
                lastBeat = now
                session.beat(open: open)
            }
            if !readOnly { purger.runIfDue(meta, holder: session.sid) }
            if !readOnly {
                if Double(now - lastClean) / 1e9 >= 10 {
                    lastClean = now
                    cleanDeleted()
                } else if !deletes.isEmpty {
                    cleanDeleted(deletes)
                }
            }
        }
    }
}
