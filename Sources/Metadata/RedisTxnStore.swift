import CoreMetrics
import RedisWire
import StageFSCore
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// A key of one volume, without the volume's prefix. The transaction layer keeps its reads,
/// writes and client cache by key, so a key is a few numbers that hash and compare as numbers;
/// its name is written only into the commands sent (`RedisKeys.append`).
struct RKey: Hashable, Sendable {
    enum Kind: UInt8 {
        case named, attr, entries, positions, symlink, xattrs, xattrBytes, chunk, chunkIndex, opens, sessionOpens, locks, sessionLocks,
            sessionRequests
    }
    let kind: Kind
    /// The inode, session or chunk number; for a `named` key, the number of its name
    /// (`KeyNames`), which lives only in this process.
    let id: UInt64
    let sub: UInt32

    init(_ kind: Kind, _ id: UInt64, _ sub: UInt32 = 0) {
        self.kind = kind
        self.id = id
        self.sub = sub
    }

    init(named: String) { self.init(.named, KeyNames.number(named)) }

    /// The name of a `named` key (empty for the others).
    var name: String { kind == .named ? KeyNames.name(id) : "" }

    static func == (a: RKey, b: RKey) -> Bool { a.kind == b.kind && a.id == b.id && a.sub == b.sub }

    func hash(into h: inout Hasher) {
        h.combine(id)
        h.combine(UInt64(sub) << 8 | UInt64(kind.rawValue))
    }
}

/// The names of `named` keys (counters, settings, queues, a client's requests), each given a
/// number the first time it is used, so that every `RKey` is plain numbers: copied without
/// reference counting, compared and hashed as integers. A process uses a few dozen names.
enum KeyNames {
    private static let table = Mutex<(numbers: [String: UInt64], names: [String])>(([:], []))

    static func number(_ name: String) -> UInt64 {
        table.withLock { t in
            if let n = t.numbers[name] { return n }
            t.names.append(name)
            t.numbers[name] = UInt64(t.names.count - 1)
            return UInt64(t.names.count - 1)
        }
    }

    static func name(_ number: UInt64) -> String { table.withLock { $0.names[Int(number)] } }
}

/// Key names of one volume in Redis, each behind the volume's prefix. A volume formatted now puts
/// the hash tag `{<db>}` in front of every key, so that all of them fall in one slot of a Redis
/// Cluster; a volume formatted before the tag (by the script engine of earlier versions, same
/// names) keeps its names without a prefix.
struct RedisKeys: Sendable {
    let prefix: String

    // (The fixed named keys are made once per store: making a named key looks its name up.)
    let setting = RKey(named: "setting")
    func counter(_ name: String) -> RKey { RKey(named: name) }
    func attr(_ ino: Ino) -> RKey { RKey(.attr, ino) }
    /// Directory hash: name -> packed (ino, type).
    func entries(_ dir: Ino) -> RKey { RKey(.entries, dir) }
    /// Directory sorted set: name -> readdir position.
    func positions(_ dir: Ino) -> RKey { RKey(.positions, dir) }
    func symlink(_ ino: Ino) -> RKey { RKey(.symlink, ino) }
    func xattrs(_ ino: Ino) -> RKey { RKey(.xattrs, ino) }
    /// String: the bytes of names and values in `xattrs(ino)` (`TxnStore.xattrBytes`).
    func xattrBytes(_ ino: Ino) -> RKey { RKey(.xattrBytes, ino) }
    func chunk(_ ino: Ino, _ index: UInt32) -> RKey { RKey(.chunk, ino, index) }
    /// Sorted set of the chunk indexes of `ino` that have records.
    func chunkIndex(_ ino: Ino) -> RKey { RKey(.chunkIndex, ino) }
    /// Hash: session -> opens of `ino`.
    func opens(_ ino: Ino) -> RKey { RKey(.opens, ino) }
    /// Hash: inode -> opens by session `sid`.
    func sessionOpens(_ sid: UInt64) -> RKey { RKey(.sessionOpens, sid) }
    func locks(_ ino: Ino, _ kind: UInt8) -> RKey { RKey(.locks, ino, UInt32(kind)) }
    /// Set of "ino:kind" lock tables session `sid` has records in.
    func sessionLocks(_ sid: UInt64) -> RKey { RKey(.sessionLocks, sid) }
    let sessions = RKey(named: "sessions")
    let sessionInfos = RKey(named: "sessionInfos")
    let delfiles = RKey(named: "delfiles")
    let delslices = RKey(named: "delslices")
    /// Hash: slice id (decimal) -> its references beyond the first record (`TxnStore.sliceRefs`).
    let sliceRefs = RKey(named: "sliceRefs")
    /// Hash: slice id (decimal) -> 1, the slices gc `holder` keeps (`TxnStore.keepForGC`).
    func gcKept(_ holder: String) -> RKey { RKey(named: "gcKept_" + holder) }
    func requests(_ client: String) -> RKey { RKey(named: "rq" + client) }
    /// Hash: the request ids (and saved results) of a gateway client's session `sid`
    /// (`RequestRecords`; "rqs" never begins one of this client's own, whose names are hex).
    func sessionRequests(_ sid: UInt64) -> RKey { RKey(.sessionRequests, sid) }

    /// The letters in front of a key's numbers (up to three; 0: none).
    private static func letters(_ k: RKey) -> (UInt8, UInt8, UInt8) {
        func l(_ a: Unicode.Scalar, _ b: Unicode.Scalar? = nil) -> (UInt8, UInt8, UInt8) { (UInt8(ascii: a), b.map { UInt8(ascii: $0) } ?? 0, 0) }
        switch k.kind {
        case .named: return (0, 0, 0)
        case .attr: return l("i")
        case .entries: return l("d")
        case .positions: return l("z")
        case .symlink: return l("s")
        case .xattrs: return l("x")
        case .xattrBytes: return l("x", "b")
        case .chunk: return l("c")
        case .chunkIndex: return l("k")
        case .opens: return l("o")
        case .sessionOpens: return l("s", "o")
        case .locks: return (UInt8(ascii: "l"), UInt8(ascii: "k"), UInt8(truncatingIfNeeded: k.sub))
        case .sessionLocks: return l("s", "l")
        case .sessionRequests: return (UInt8(ascii: "r"), UInt8(ascii: "q"), UInt8(ascii: "s"))
        }
    }

    private func arg(_ k: RKey) -> KeyArg { KeyArg(prefix: prefix, letters: Self.letters(k), id: k.id, sub: k.kind == .chunk ? k.sub : nil) }

    /// The key's name in Redis.
    func name(_ k: RKey) -> String {
        if k.kind == .named { return prefix + k.name }
        var out: [UInt8] = []
        arg(k).appendName(to: &out)
        return String(decoding: out, as: UTF8.self)
    }

    /// Appends the key's name to a command as one argument, without building a `String`.
    func append(_ k: RKey, to c: inout RedisCommand) {
        if k.kind == .named { c.add(prefix + k.name) } else { c.add(arg(k)) }
    }
}

/// A key's name as a RESP argument: prefix, letters, the number, and `_sub`.
private struct KeyArg: RedisArg {
    let prefix: String
    let letters: (UInt8, UInt8, UInt8)
    let id: UInt64
    let sub: UInt32?

    var count: Int {
        prefix.utf8.count + (letters.0 == 0 ? 0 : 1) + (letters.1 == 0 ? 0 : 1) + (letters.2 == 0 ? 0 : 1) + RESP.digits(id)
            + (sub.map { 1 + RESP.digits(UInt64($0)) } ?? 0)
    }

    func appendName(to out: inout [UInt8]) {
        out.append(contentsOf: prefix.utf8)
        if letters.0 != 0 { out.append(letters.0) }
        if letters.1 != 0 { out.append(letters.1) }
        if letters.2 != 0 { out.append(letters.2) }
        RESP.appendDecimal(id, to: &out)
        if let sub {
            out.append(UInt8(ascii: "_"))
            RESP.appendDecimal(UInt64(sub), to: &out)
        }
    }

    func appendBulk(to out: inout [UInt8]) {
        out.append(36)
        RESP.appendDecimal(UInt64(count), to: &out)
        RESP.crlf(&out)
        appendName(to: &out)
        RESP.crlf(&out)
    }
}

/// Numbers handed out from ranges reserved ahead (one `INCRBY` per `size` numbers).
final class IDBatch: @unchecked Sendable {
    private let lock = ConditionLock()
    private var next: UInt64 = 0
    private var end: UInt64 = 0
    let size: Int

    init(size: Int) { self.size = size }

    func take(_ reserve: (Int) throws(FSError) -> UInt64) throws(FSError) -> UInt64 {
        lock.lock()
        defer { lock.unlock() }
        if next == end {
            next = try reserve(size)
            end = next + UInt64(size)
        }
        defer { next += 1 }
        return next
    }
}

/// Test seams: a step run before each commit is sent, and commit replies to lose.
package final class RedisTxnHooks: @unchecked Sendable {
    private let lock = ConditionLock()
    private var before: (() -> Void)?
    private var lose = 0

    /// Runs before each commit of the store is sent (another client may change keys here).
    package func setBeforeCommit(_ body: (() -> Void)?) { lock.withLock { before = body } }
    /// The next `n` commits reach the server and are applied, but their replies are dropped as
    /// if the connection broke; the client sends them again.
    package func loseCommitReplies(_ n: Int) { lock.withLock { lose = n } }

    func beforeCommit() -> (() -> Void)? { lock.withLock { before } }
    func takeLostReply() -> Bool {
        lock.withLock {
            if lose == 0 { return false }
            lose -= 1
            return true
        }
    }
}

/// What the store did, for tests and for counting round trips.
package struct RedisTxnStats: Sendable, Equatable {
    /// Read round trips (a batch of reads, or one read).
    package var reads = 0
    /// Commits sent (each one round trip), conflicts among them, and resends answered from the
    /// request-id record.
    package var commits = 0
    package var conflicts = 0
    package var replays = 0
    /// Transactions run again with fresh reads because a cached read led to an error.
    package var refreshes = 0
    /// Round trips that reserved ids (inode numbers and readdir positions come 1000 at a time).
    package var reservations = 0
}

/// The Redis `TxnStore`: optimistic transactions, so that `TxnMetadata` (the one copy of the
/// POSIX rules) runs on Redis with no operation-specific script.
///
/// A transaction reads through batches of reads (`RedisTxnScripts.read`, one round trip, atomic
/// on the server), or, in a write transaction, from what this client last saw
/// (`RedisTxnCache`); it buffers its writes; and it commits with `RedisTxnScripts.commit`, which
/// checks every reply the transaction read (absent values included) and applies all writes
/// atomically, or answers which reads changed. Then the body runs again with the new values
/// (a bounded number of times, with back-off; then `EIO` naming the keys). Every key a commit
/// touches is one of its script KEYS. Inode numbers and readdir positions come from ranges this
/// client reserved ahead, never from inside a commit. A commit carries a request id, so one sent
/// again after a lost reply answers that it was applied instead of applying it twice.
package final class RedisTxnStore: RequestRecordStore, @unchecked Sendable {
    let pool: RedisPool
    package let displayName: String
    let keys: RedisKeys
    let cache: RedisTxnCache
    package let hooks = RedisTxnHooks()
    /// This store's number among the stores of the process (`CommittedWrites`).
    let serial = storeSerials.next()
    private var readSha = ""
    private var commitSha = ""
    private let requestKey: RKey
    private let requestNumbers = Counter()
    private let slots = RequestSlots()
    private let waitReplicas: Int
    private let waitTimeoutMillis: Int
    private let inodes = IDBatch(size: 1000)
    private let cookies = IDBatch(size: 1000)
    /// Threads whose transactions conflict on the same key take turns (one lock per stripe).
    private let stripes = (0..<64).map { _ in ConditionLock() }
    private let statsLock = ConditionLock()
    private var counts = RedisTxnStats()
    /// Attempts of one transaction before it fails with `EIO`.
    package var maxAttempts = 50
    /// The layout written follows the volume's format version (`formatLoaded`; until it is
    /// known, that of version 2, which this store reads in any volume). From version 5 a file's
    /// chunk index names its chunks from 1 on (before, chunk 0 too: an older StageFS mounted on
    /// the volume finds chunks only through the index), and the attributes of inodes but
    /// directories are stored in the short encoding (`Attr.encodeCompact`).
    private let layoutVersion = Atomic<Int>(2)

    /// `tracking`: keep the client cache coherent with Redis's client tracking, so that lookups
    /// and getattr answer from it (`RedisTxnCache`; not on a Redis Cluster).
    package init(location: RedisLocation, retryTimeout: Double = 60, cacheCapacity: Int = 100_000, tracking: Bool = false) throws(FSError) {
        pool = try RedisPool(location, retryTimeout: retryTimeout)
        displayName = pool.displayName
        waitReplicas = location.waitReplicas
        waitTimeoutMillis = location.waitTimeoutMillis
        let client = Sys.randomBytes(8).map { String($0, radix: 16) }.joined()
        // Connect now (no retry) so an unreachable server is reported at once; load the scripts
        // and find the layout: a volume formatted before the hash tag keeps its names.
        var shas: [String] = []
        var legacy = false
        let name = pool.displayName
        let pool = self.pool
        try pool.once { (c) throws(FSError) in
            for text in [RedisTxnScripts.read, RedisTxnScripts.commit] {
                let reply = try c.command(["SCRIPT", "LOAD", text])
                guard case .string = reply, let sha = reply.text else {
                    if case .error(let e) = reply, e.contains("NOAUTH") || e.contains("WRONGPASS") {
                        throw FSError(EACCES, "\(name) wants a password: \(e)")
                    }
                    throw FSError(EIO, "\(name) refused StageFS's transaction script (Redis 7 or later is needed): \(reply)")
                }
                shas.append(sha)
            }
            // (A cluster's volume is always tagged: an untagged name lives in another slot.)
            if !pool.isCluster { legacy = try c.command(["EXISTS", "setting"]).int == 1 }
        }
        readSha = shas[0]
        commitSha = shas[1]
        keys = RedisKeys(prefix: legacy ? "" : "{\(location.db)}")
        requestKey = keys.requests(client)
        let tracked = tracking && !pool.isCluster
        cache = RedisTxnCache(capacity: cacheCapacity, tracking: tracked, prefix: keys.prefix, pool: tracked ? pool : nil)
        if tracked { pool.startTracking(cache) }
    }

    deinit { pool.stopTracking() }

    /// What the store did so far.
    package var stats: RedisTxnStats { statsLock.withLock { counts } }

    /// Whether the client cache answers lookups and getattr now (client tracking up).
    package var trackingLive: Bool { cache.tracking && cache.live }

    /// Keys and hash fields the client cache holds, and reads waiting to be noted in it.
    package var cacheSizes: (keys: Int, pending: Int) { cache.sizes }

    private func count(_ body: (inout RedisTxnStats) -> Void) { statsLock.withLock { body(&counts) } }

    /// The error for an error reply to `what`. A server out of memory (`maxmemory` reached)
    /// refuses every change: `ENOSPC`, the metadata store being full, logged by the mount.
    func replyError(_ e: String, _ what: String) -> FSError {
        guard e.hasPrefix("OOM") else { return FSError(EIO, "\(displayName): \(what) failed: \(e)") }
        var err = FSError(
            ENOSPC,
            "\(displayName) is out of memory (maxmemory reached) and refused \(what): free memory or raise maxmemory (Redis: \(e))")
        err.logged = true
        return err
    }

    func bug(_ what: String) -> FSError { FSError(EIO, "\(displayName): internal error in a metadata transaction: \(what)") }

    // MARK: transactions

    package typealias Txn = RedisTxn

    package func transaction<T>(write: Bool, _ body: (RedisTxn) throws(FSError) -> T) throws(FSError) -> T {
        if write { RedisTxn.lastCommitted = nil }
        let start = Sys.monotonicNanos()
        defer { MetaMetrics.transaction(write, since: start) }
        // The outside request (a gateway's client) whose change this may be (`RequestRecords`).
        let outside = write ? ActiveRequest.pending : nil
        var attempt = 0
        var useCache = write
        var stripe: ConditionLock?
        defer { stripe?.unlock() }
        var changed: [RKey] = []
        while true {
            attempt += 1
            if attempt > maxAttempts {
                let names = Set(changed.map { keys.name($0) }).sorted().prefix(5).joined(separator: ", ")
                throw FSError(
                    EIO,
                    "\(displayName): a metadata change gave up after \(maxAttempts) attempts: other clients kept changing \(names.isEmpty ? "what it read" : names) (contention)"
                )
            }
            let t = RedisTxn(store: self, write: write, useCache: useCache)
            let result: T
            do {
                result = try body(t)
            } catch {
                // An error of the rules that came from what this client remembered, or from
                // reads taken in several round trips, is confirmed before it is given (an I/O
                // error is not: Redis was unreachable for the whole retry time already).
                if error.code == EIO { throw error }
                if t.fromCache {
                    count { $0.refreshes += 1 }
                    MetaMetrics.restarts.increment()
                    useCache = false
                    continue
                }
                if t.write && t.batches > 1, case .conflict(let c) = try commit(t, checksOnly: true) {
                    changed = c
                    MetaMetrics.restarts.increment()
                    continue
                }
                cache.record(t, committed: false)
                throw error
            }
            if !t.hasWrites && (!t.write || (!t.fromCache && t.batches <= 1)) {
                cache.record(t, committed: false)
                if !t.trailing.isEmpty {
                    for ((_, got), r) in zip(t.trailing, try fetch(t.trailing.map { .cmd($0.0) })) { got(r) }
                }
                return result
            }
            // The request's id (and its saved result) goes with the commit that is its change.
            var recorded: RequestID?
            if let outside, t.hasWrites, let saved = outside.save(result) {
                recorded = outside.id
                // (Always written: an earlier request's result in the slot must not remain.)
                try t.hset(keys.sessionRequests(outside.id.session), Array("r\(outside.id.slot)".utf8), saved.count <= 65536 ? saved : [])
            }
            let outcome: Outcome
            do {
                outcome = try commit(t, checksOnly: !t.hasWrites, outside: recorded)
            } catch {
                // The commit may have been applied (a reply lost for good, too few replicas):
                // what the cache knows of its keys no longer stands.
                cache.forget(t)
                throw error
            }
            switch outcome {
            case .applied:
                if recorded != nil { outside?.taken = true }
                cache.record(t, committed: true)
                RedisTxn.lastCommitted = CommittedWrites(t)
                return result
            case .conflict(let c):
                changed = c
                MetaMetrics.restarts.increment()
                if stripe == nil, let first = c.first {
                    let s = stripes[Int(UInt(bitPattern: first.hashValue) % UInt(stripes.count))]
                    s.lock()
                    stripe = s
                }
                if attempt > 2 { Sys.sleep(seconds: Double.random(in: 0...min(0.05, 0.0005 * Double(1 << min(attempt - 2, 10))))) }
            }
        }
    }

    enum Outcome {
        case applied
        case conflict([RKey])
    }

    /// A read after a commit of what it wrote (`commit`): the command, and the reads its reply
    /// answers.
    struct Reread {
        let command: RedisCommand
        let replies: (RedisReply) -> [(ReadCmd, RedisReply)]
    }

    /// The rereads of `t`'s trackable writes: its attributes in one `MGET`, each directory's
    /// entries written in an `HMGET` of those names, each new directory's entries as `HLEN`.
    private func rereads(_ t: RedisTxn) -> [Reread] {
        var out: [Reread] = []
        let attrs = t.writeOrder.filter { $0.kind == .attr }
        if !attrs.isEmpty {
            var c = RedisCommand(capacity: 16 + attrs.count * 24)
            c.add("MGET")
            for k in attrs { keys.append(k, to: &c) }
            out.append(Reread(command: c) { r in zip(attrs, r.array).map { (.get($0), $1) } })
        }
        for k in t.writeOrder where k.kind == .entries {
            let names = t.writes[k]!.fieldOrder
            guard !names.isEmpty else { continue }
            var c = RedisCommand(capacity: 16 + names.count * 24)
            c.add("HMGET")
            keys.append(k, to: &c)
            for n in names { c.add(n) }
            out.append(Reread(command: c) { r in zip(names, r.array).map { (.hget(k, $0), $1) } })
        }
        for ino in t.newInodes where t.writes[keys.entries(ino)] == nil {
            guard case .set(let a)? = t.writes[keys.attr(ino)]?.string, a.first == FileType.directory.rawValue else { continue }
            let k = keys.entries(ino)
            var c = RedisCommand(capacity: 40)
            c.add("HLEN")
            keys.append(k, to: &c)
            out.append(Reread(command: c) { r in r.int == nil ? [] : [(.hlen(k), r)] })
        }
        return out
    }

    /// Sends the commit of `t` (only its checks when `checksOnly`).
    /// `outside`: the request id the commit records instead of one of this client's own.
    private func commit(_ t: RedisTxn, checksOnly: Bool, outside: RequestID? = nil) throws(FSError) -> Outcome {
        hooks.beforeCommit()?()
        let slot = checksOnly || outside != nil ? nil : slots.take()
        defer { if let slot { slots.give(slot) } }
        var tag = slot.map { "\($0):\(requestNumbers.next())" } ?? ""
        var requestKey = self.requestKey
        if let outside, !checksOnly {
            tag = "\(outside.slot):\(outside.number):m"
            requestKey = keys.sessionRequests(outside.session)
        }
        let (call, checks) = t.commitCommand("EVALSHA", commitSha, requestKey: requestKey, tag: tag, checksOnly: checksOnly)
        var wait = !checksOnly && waitReplicas > 0 ? [RedisCommand(["WAIT", waitReplicas, waitTimeoutMillis])] : []
        // Reads after the commit, in the same round trip (what they give counts only when the
        // commit applied).
        let trailing = checksOnly ? [] : t.trailing
        wait += trailing.map { $0.0.command(keys) }
        // With client tracking: the attributes and entries written are read again in the same
        // MULTI as the commit, tracked (`CLIENT CACHING yes` before them; the commit's own
        // reads stay untracked): a connection's own write ends its tracking of a key without
        // a word (NOLOOP), and nothing may change between the commit and the read.
        let reread = !checksOnly && cache.tracking ? rereads(t) : []
        count { $0.commits += 1 }
        var after: [((RedisReply) -> Void, RedisReply)] = []
        let reply = try pool.with(tracking: !reread.isEmpty) { (c) throws(FSError) -> RedisReply in
            after.removeAll()
            let again = !reread.isEmpty && c.trackingGeneration != nil
            func send(_ commit: RedisCommand) throws(FSError) -> [RedisReply] {
                t.reread = []
                guard again else { return try c.pipeline([commit] + wait) }
                let block =
                    [RedisCommand(["MULTI"]), commit, RedisCommand(["CLIENT", "CACHING", "yes"])] + reread.map(\.command) + [RedisCommand(["EXEC"])]
                let r = try c.pipeline(block + wait)
                let exec = block.count - 1
                guard case .array(let done) = r[exec], done.count == 2 + reread.count else {
                    // Refused as queued (out of memory, a bad command): that error is the reply.
                    let refused = r[1..<exec].first { if case .error = $0 { return true } else { return false } }
                    return [refused ?? r[exec]] + r[(exec + 1)...]
                }
                if c.trackingGeneration == t.stamp.generation, case .status = done[1] {
                    for (i, rr) in reread.enumerated() { t.reread += rr.replies(done[2 + i]) }
                }
                return [done[0]] + r[(exec + 1)...]
            }
            var r = try send(call)
            if case .error(let e) = r[0], e.hasPrefix("NOSCRIPT") {
                r = try send(t.commitCommand("EVAL", RedisTxnScripts.commit, requestKey: requestKey, tag: tag, checksOnly: checksOnly).0)
            }
            if hooks.takeLostReply() {
                c.abandon()
                throw .redisTransient("\(displayName): the reply to a commit was lost (test)")
            }
            if !checksOnly && waitReplicas > 0, let acked = r[1].int, acked < waitReplicas {
                throw FSError(
                    EIO,
                    "\(displayName): a metadata change reached \(acked) of the \(waitReplicas) replica(s) asked for (wait-replicas) within \(waitTimeoutMillis) ms"
                )
            }
            for (i, (_, got)) in trailing.enumerated() { after.append((got, r[r.count - trailing.count + i])) }
            return r[0]
        }
        if case .error(let e) = reply { throw replyError(e, "a metadata change") }
        let items = reply.array
        func applied() -> Outcome {
            for (got, r) in after { got(r) }
            return .applied
        }
        switch items.first?.int {
        case 0: return applied()
        case 1:
            count { $0.replays += 1 }
            // An outside request found recorded was applied by this commit sent before (a
            // lost reply) or by another attempt of the request (a gateway since killed): the
            // result saved with whichever applied is the answer, not this attempt's.
            if outside != nil {
                cache.record(t, committed: false)
                throw FSError.carriedOut
            }
            return applied()
        case 3:
            // A later request of the same slot is recorded: this one came late (its client
            // gave up on it) and is not applied.
            cache.record(t, committed: false)
            throw FSError(ESTALE, "\(displayName): \(outside.map { "\($0)" } ?? "a request") came after a later one of its slot")
        case 2:
            count { $0.conflicts += 1 }
            var seen: [(ReadCmd, RedisReply?)] = []
            var i = 1
            while i + 1 < items.count {
                if let n = items[i].int, n != 0, Int(n.magnitude) <= checks.count {
                    seen.append((checks[Int(n.magnitude) - 1], n > 0 ? items[i + 1] : nil))
                }
                i += 2
            }
            // What it read fresh is the newest this client knows, except what changed since.
            cache.record(t, committed: false)
            cache.noteChanged(seen)
            return .conflict(seen.map { $0.0.key })
        default:
            throw FSError(EIO, "\(displayName): unexpected reply to a metadata commit: \(reply)")
        }
    }

    /// Whether outside request `r` was committed, and the result it saved (see `RequestRecords`).
    package func carriedOut(_ r: RequestID) throws(FSError) -> [UInt8]? {
        let key = keys.sessionRequests(r.session)
        let reply = try pool.with { (c) throws(FSError) in
            try c.pipeline([RedisCommand(["HMGET", keys.name(key), "\(r.slot)", "r\(r.slot)"])])[0]
        }
        if case .error(let e) = reply { throw replyError(e, "a request-id lookup") }
        let items = reply.array
        guard items.count == 2, items[0].text == "\(r.number)" else { return nil }
        if case .string(let b) = items[1] { return b }
        return []
    }

    /// Runs a batch of reads in one round trip (one command, or the read script).
    func fetch(_ ops: [ReadOp]) throws(FSError) -> [RedisReply] { try fetch(ops, track: false).replies }

    /// Sends `cmd` on `conn`, tracked when `track` and the connection is (`CLIENT CACHING yes`
    /// first): the reply, and the tracking generation its keys are tracked in (nil: not).
    static func send(_ conn: RedisConnection, _ cmd: RedisCommand, track: Bool) throws(FSError) -> (RedisReply, UInt64?) {
        guard track, let g = conn.trackingGeneration else { return (try conn.pipeline([cmd])[0], nil) }
        let r = try conn.pipeline([RedisCommand(["CLIENT", "CACHING", "yes"]), cmd])
        if case .status = r[0] { return (r[1], g) }
        return (r[1], nil)
    }

    /// The same; `track`: with client tracking, the keys read are tracked (`tracked`: in which
    /// generation; nil when they are not).
    func fetch(_ ops: [ReadOp], track: Bool) throws(FSError) -> (replies: [RedisReply], tracked: UInt64?) {
        count { $0.reads += 1 }
        // (HKEYS goes through the read script, which sorts it as a commit's check does: a hash
        // kept as a hash table lists its fields in no fixed order.)
        if ops.count == 1, case .cmd(let c) = ops[0], c.verb != .hkeys {
            let (r, g) = try pool.with(tracking: track) { (conn) throws(FSError) in try Self.send(conn, c.command(keys), track: track) }
            if case .error(let e) = r { throw FSError(EIO, "\(displayName): \(c.cmd) \(keys.name(c.key)): \(e)") }
            return ([r], g)
        }
        var names = KeyList()
        func idx(_ k: RKey) -> Int { names.position(k) }
        var argv = RedisCommand(capacity: ops.count * 48)
        argv.add(keys.prefix)
        for op in ops {
            switch op {
            case .cmd(let c):
                argv.add("C")
                argv.add(c.cmd)
                argv.add(idx(c.key))
                argv.add(c.argCount)
                c.appendArgs(to: &argv)
            case .entry(let dir, let name):
                argv.add("E")
                argv.add(idx(dir))
                argv.add(name)
            case .page(let z, let d, let after, let limit, let plus, let xattrs):
                argv.add("D")
                argv.add(idx(z))
                argv.add(idx(d))
                argv.add(after)
                argv.add(limit)
                argv.add(!plus ? 0 : xattrs ? 1 : 2)
            case .chunks(let index, let ino, let from, let limit):
                argv.add("K")
                argv.add(idx(index))
                argv.add(ino)
                argv.add(Int(from))
                argv.add(limit)
            case .pending(let queue, let limit, let chunks):
                argv.add("Q")
                argv.add(idx(queue))
                argv.add(limit)
                argv.add(chunks)
            }
        }
        func call(_ verb: String, _ script: String) -> RedisCommand {
            var c = RedisCommand(capacity: argv.body.count + names.list.count * 24 + script.utf8.count + 32)
            c.add(verb)
            c.add(script)
            c.add(names.list.count)
            for n in names.list { keys.append(n, to: &c) }
            c.add(contentsOf: argv)
            return c
        }
        let (reply, tracked) = try pool.with(tracking: track) { (c) throws(FSError) -> (RedisReply, UInt64?) in
            let r = try Self.send(c, call("EVALSHA", readSha), track: track)
            if case .error(let e) = r.0, e.hasPrefix("NOSCRIPT") { return try Self.send(c, call("EVAL", RedisTxnScripts.read), track: track) }
            return r
        }
        if case .error(let e) = reply { throw replyError(e, "a metadata read") }
        let items = reply.array
        guard items.count == ops.count else { throw FSError(EIO, "\(displayName): metadata read gave \(items.count) replies for \(ops.count)") }
        return (items, tracked)
    }

    private func command(_ args: [any RedisArg]) throws(FSError) -> RedisReply {
        let r = try pool.with { (c) throws(FSError) -> RedisReply in try c.command(args) }
        if case .error(let e) = r { throw replyError(e, "\(args.first.map { "\($0)" } ?? "a command")") }
        return r
    }

    package func prefetch(_ t: RedisTxn, _ reads: [TxnRead]) throws(FSError) {
        var ops: [ReadOp] = []
        for r in reads {
            switch r {
            case .attr(let ino): ops.append(.cmd(.get(keys.attr(ino))))
            case .entry(let dir, let name): ops.append(.entry(dir: keys.entries(dir), name: name))
            case .chunk(let ino, let idx):
                ops.append(.cmd(.get(keys.chunk(ino, idx))))
                // (Chunk 0 may be kept with the attributes: `chunk`.)
                if idx == 0 { ops.append(.cmd(.get(keys.attr(ino)))) }
            case .chunkList(let ino, let from, let limit): ops.append(.chunks(index: keys.chunkIndex(ino), ino: ino, from: from, limit: limit))
            case .pendingDeletes(let limit, let chunks): ops.append(.pending(queue: keys.delfiles, limit: limit, chunks: chunks))
            case .opens(let sid, let ino): ops.append(.cmd(.hget(keys.opens(ino), Array(String(sid).utf8))))
            case .isOpen(let ino): ops.append(.cmd(.hlen(keys.opens(ino))))
            case .hasEntries(let ino): ops.append(.cmd(.hlen(keys.entries(ino))))
            case .xattr(let ino, let name): ops.append(.cmd(.hget(keys.xattrs(ino), name)))
            case .xattrCount(let ino): ops.append(.cmd(.hlen(keys.xattrs(ino))))
            case .xattrBytes(let ino): ops.append(.cmd(.get(keys.xattrBytes(ino))))
            case .locks(let ino, let kind): ops.append(.cmd(.get(keys.locks(ino, kind))))
            case .symlink(let ino): ops.append(.cmd(.get(keys.symlink(ino))))
            case .counter(let name): ops.append(.cmd(.get(keys.counter(name))))
            case .setting(let name): ops.append(.cmd(.get(settingKey(name))))
            case .sliceRefs(let id): ops.append(.cmd(.hget(keys.sliceRefs, Array(String(id).utf8))))
            case .entries(let dir, let after, let limit, let plus, let xattrs):
                ops.append(
                    .page(positions: keys.positions(dir), entries: keys.entries(dir), after: after, limit: limit, plus: plus, xattrs: xattrs))
            }
        }
        // A key this transaction already wrote is read through its writes, not fetched.
        ops.removeAll {
            switch $0 {
            case .cmd(let c): return t.writes[c.key] != nil
            case .chunks(let index, _, _, _): return t.writes[index] != nil
            case .pending(let queue, _, _): return t.writes[queue] != nil
            default: return false
            }
        }
        try t.load(ops)
    }

    // MARK: settings, counters, ids

    private func settingKey(_ key: String) -> RKey { key == "format" ? keys.setting : keys.counter("setting_" + key) }

    package func setting(_ tx: RedisTxn, _ key: String) throws(FSError) -> String? {
        try tx.string(settingKey(key)).map { String(decoding: $0, as: UTF8.self) }
    }

    package func setSetting(_ tx: RedisTxn, _ key: String, _ value: String) throws(FSError) {
        try tx.set(settingKey(key), Array(value.utf8))
    }

    package func counter(_ tx: RedisTxn, _ name: String) throws(FSError) -> Int64 {
        guard let v = try tx.string(keys.counter(name)) else { return 0 }
        return Int64(String(decoding: v, as: UTF8.self)) ?? 0
    }

    package func add(_ tx: RedisTxn, _ counter: String, _ delta: Int64) throws(FSError) {
        if delta != 0 { try tx.incr(keys.counter(counter), delta) }
    }

    package func atMost(_ tx: RedisTxn, _ counter: String, _ max: Int64) throws(FSError) -> Bool {
        try tx.atMost(keys.counter(counter), max)
    }

    package func reserveIDs(_ tx: RedisTxn?, _ counter: String, _ count: Int) throws(FSError) -> UInt64 {
        self.count { $0.reservations += 1 }
        guard let last = try command(["INCRBY", keys.name(keys.counter(counter)), count]).int else {
            throw FSError(EIO, "\(displayName): no \(counter) ids")
        }
        return UInt64(last - Int64(count) + 1)
    }

    package func newInode(_ t: RedisTxn) throws(FSError) -> Ino {
        let ino = try inodes.take { (n) throws(FSError) in try reserveIDs(nil, "nextInode", n) }
        t.newInodes.append(ino)
        return ino
    }

    // MARK: inodes and entries

    package func attr(_ tx: RedisTxn, _ ino: Ino) throws(FSError) -> Attr? {
        guard let b = try tx.string(keys.attr(ino)) else { return nil }
        guard let a = Attr.decodeStored(b) else { throw FSError(EIO, "\(displayName): inode \(ino) has a corrupt record") }
        return a
    }

    package func recentAttr(_ ino: Ino) -> Attr? {
        guard let c = RedisTxn.lastCommitted, c.store == serial, case .set(let b)? = c.writes[keys.attr(ino)]?.string else { return nil }
        return Attr.decodeStored(b)
    }

    package func putAttr(_ tx: RedisTxn, _ ino: Ino, _ attr: Attr) throws(FSError) {
        // (A directory's record keeps the fixed encoding, whose times a commit may write alone:
        // `RedisTxn.changedTimes`.)
        let k = keys.attr(ino)
        // The record of chunk 0 kept after a file's attributes stays, whatever the format this
        // client knows (a new inode has none).
        var tail: [UInt8] = []
        if attr.type == .regular && !(tx.newInodes.contains(ino) && tx.writes[k] == nil), let cur = try tx.string(k) {
            tail = Attr.storedTail(cur)
        }
        let short = !tail.isEmpty || (attr.type != .directory && layoutVersion.load(ordering: .relaxed) >= 5)
        try tx.set(k, short ? attr.encodeCompact(firstChunk: tail) : attr.encode())
    }

    package func deleteInode(_ t: RedisTxn, _ ino: Ino) throws(FSError) {
        // A record of chunk 0 kept with the attributes goes to the chunk's key, where the
        // deletion of the file's data finds it.
        if let cur = try t.string(keys.attr(ino)) {
            let tail = Attr.storedTail(cur)
            if !tail.isEmpty { try t.append(keys.chunk(ino, 0), tail) }
        }
        try t.del(keys.attr(ino))
        try t.del(keys.symlink(ino))
        try t.del(keys.xattrs(ino))
        try t.del(keys.xattrBytes(ino))
    }

    package func entry(_ tx: RedisTxn, _ parent: Ino, _ name: [UInt8]) throws(FSError) -> (Ino, FileType)? {
        guard let v = try tx.field(keys.entries(parent), name), v.count >= 9 else { return nil }
        var r = ByteReader(v)
        let ino = r.u64()
        return (ino, FileType(rawValue: r.u8()) ?? .regular)
    }

    package func putEntry(_ t: RedisTxn, _ parent: Ino, _ name: [UInt8], _ ino: Ino, _ type: FileType) throws(FSError) {
        var w = ByteWriter(capacity: 9)
        w.u64(ino)
        w.u8(type.rawValue)
        let cookie = try cookies.take { (n) throws(FSError) in try reserveIDs(nil, "nextCookie", n) }
        try t.hset(keys.entries(parent), name, w.bytes)
        try t.op("ZADD", keys.positions(parent), [Array(String(cookie).utf8), name])
    }

    package func deleteEntry(_ t: RedisTxn, _ parent: Ino, _ name: [UInt8]) throws(FSError) {
        try t.hdel(keys.entries(parent), name)
        try t.op("ZREM", keys.positions(parent), [name])
    }

    package func hasEntries(_ tx: RedisTxn, _ parent: Ino) throws(FSError) -> Bool {
        try tx.hashLength(keys.entries(parent)) > 0
    }

    package func entries(_ t: RedisTxn, _ parent: Ino, after cookie: UInt64, limit: Int) throws(FSError) -> [DirEntry] {
        let z = keys.positions(parent)
        let d = keys.entries(parent)
        if t.writes[z] != nil || t.writes[d] != nil { throw bug("reading directory \(parent) after changing it in the same transaction") }
        try t.load([.page(positions: z, entries: d, after: cookie, limit: limit, plus: false, xattrs: false)])
        let names = try t.value(.page(z, after: cookie, limit: limit)).array
        var out: [DirEntry] = []
        out.reserveCapacity(names.count / 2)
        for i in stride(from: 0, to: names.count - 1, by: 2) {
            guard let name = names[i].bytes, let pos = names[i + 1].text.flatMap({ Double($0) }) else { continue }
            guard let v = try t.field(d, name), v.count >= 9 else { continue }
            var r = ByteReader(v)
            let ino = r.u64()
            out.append(DirEntry(name: name, ino: ino, type: FileType(rawValue: r.u8()) ?? .regular, cookie: UInt64(pos)))
        }
        return out
    }

    package func symlinkTarget(_ tx: RedisTxn, _ ino: Ino) throws(FSError) -> [UInt8]? { try tx.string(keys.symlink(ino)) }

    package func putSymlinkTarget(_ tx: RedisTxn, _ ino: Ino, _ target: [UInt8]) throws(FSError) { try tx.set(keys.symlink(ino), target) }

    // MARK: extended attributes

    package func xattr(_ tx: RedisTxn, _ ino: Ino, _ name: [UInt8]) throws(FSError) -> [UInt8]? { try tx.field(keys.xattrs(ino), name) }

    package func putXattr(_ tx: RedisTxn, _ ino: Ino, _ name: [UInt8], _ value: [UInt8]) throws(FSError) {
        try tx.hset(keys.xattrs(ino), name, value)
    }

    package func deleteXattr(_ tx: RedisTxn, _ ino: Ino, _ name: [UInt8]) throws(FSError) { try tx.hdel(keys.xattrs(ino), name) }

    package func xattrNames(_ tx: RedisTxn, _ ino: Ino) throws(FSError) -> [[UInt8]] {
        try tx.scan(.hkeys(keys.xattrs(ino))).array.compactMap { $0.bytes }.sorted { $0.lexicographicallyPrecedes($1) }
    }

    package func scanInodes(_ tx: RedisTxn, cursor: UInt64, limit: Int) throws(FSError) -> (inodes: [(Ino, Attr)], next: UInt64?) {
        let r = try command(["SCAN", String(cursor), "MATCH", keys.prefix + "i[0-9]*", "COUNT", String(limit)]).array
        guard r.count == 2, let next = r[0].bytes.flatMap({ UInt64(String(decoding: $0, as: UTF8.self)) }) else {
            throw FSError(EIO, "\(displayName): an unexpected reply to SCAN")
        }
        let names = r[1].array.compactMap { $0.bytes }
        let start = keys.prefix.utf8.count + 1
        var inos: [Ino] = []
        for n in names where n.count > start {
            if let ino = Ino(String(decoding: n[start...], as: UTF8.self)) { inos.append(ino) }
        }
        var out: [(Ino, Attr)] = []
        if !inos.isEmpty {
            let values = try command(["MGET"] + inos.map { keys.name(keys.attr($0)) }).array
            for (ino, v) in zip(inos, values) {
                guard let b = v.bytes else { continue }  // (gone since SCAN saw it)
                // (A record that cannot be read is no reason to take its slices for unreferenced.)
                guard let a = Attr.decodeStored(b) else { throw FSError(EIO, "\(displayName): inode \(ino) has a corrupt record") }
                out.append((ino, a))
            }
        }
        return (out, next == 0 ? nil : next)
    }

    package func xattrCount(_ tx: RedisTxn, _ ino: Ino) throws(FSError) -> Int { Int(try tx.hashLength(keys.xattrs(ino))) }

    package func xattrBytes(_ tx: RedisTxn, _ ino: Ino) throws(FSError) -> Int? {
        guard let v = try tx.string(keys.xattrBytes(ino)) else { return nil }
        guard let n = Int(String(decoding: v, as: UTF8.self)), n >= 0 else {
            throw FSError(EIO, "\(displayName): inode \(ino) has a corrupt extended-attribute total")
        }
        return n
    }

    package func putXattrBytes(_ t: RedisTxn, _ ino: Ino, _ bytes: Int?) throws(FSError) {
        if let bytes { try t.set(keys.xattrBytes(ino), Array(String(bytes).utf8)) } else { try t.del(keys.xattrBytes(ino)) }
    }

    /// The names (HKEYS), then every value's length (HSTRLEN) in one more round trip.
    package func sumXattrBytes(_ t: RedisTxn, _ ino: Ino) throws(FSError) -> Int {
        let k = keys.xattrs(ino)
        let names = try t.scan(.hkeys(k)).array.compactMap { $0.bytes }
        try t.load(names.map { .cmd(.hstrlen(k, $0)) })
        var total = 0
        for n in names { total += n.count + Int(try t.value(.hstrlen(k, n)).int ?? 0) }
        return total
    }

    // MARK: chunks

    /// What `chunk(_, ino, 0)` reads, to be sent with other reads in one round trip: a read-only
    /// transaction the read script's `K` (both keys at one moment), a write both keys (but
    /// those it wrote, which it reads through its writes).
    private func chunkZeroReads(_ t: RedisTxn, _ ino: Ino) -> [ReadOp] {
        if !t.write { return t.firstChunks[ino] == nil ? [.chunks(index: keys.chunkIndex(ino), ino: ino, from: 0, limit: 1)] : [] }
        return [keys.chunk(ino, 0), keys.attr(ino)].filter { t.writes[$0] == nil }.map { .cmd(.get($0)) }
    }

    /// Chunk 0's records: its key's, or (format 5) the one record kept after the file's
    /// attributes (`Attr.storedTail`) while the chunk has no key. Both are read (that one first),
    /// whatever the format: a reader never misses records. A read-only transaction takes them
    /// at one moment (the read script's `K`); a write takes them through its own writes, and
    /// its commit checks the reads.
    package func chunk(_ tx: RedisTxn, _ ino: Ino, _ index: UInt32) throws(FSError) -> [UInt8] {
        let k = keys.chunk(ino, index)
        guard index == 0 else { return try tx.string(k) ?? [] }
        let reads = chunkZeroReads(tx, ino)
        if !reads.isEmpty { try tx.load(reads) }
        if !tx.write, let r = tx.firstChunks[ino] { return r }
        let tail = try tx.string(keys.attr(ino)).map { Attr.storedTail($0) } ?? []
        return tail + (try tx.string(k) ?? [])
    }

    package func chunkAfterCommit(_ t: RedisTxn, _ ino: Ino, _ index: UInt32, _ got: @escaping ([UInt8]) -> Void) throws(FSError) {
        if !t.write { return got(try chunk(t, ino, index)) }
        guard index == 0 else { return t.trailing.append((.get(keys.chunk(ino, index)), { got($0.bytes ?? []) })) }
        // (The attributes and the chunk's key at one moment.)
        t.trailing.append(
            (
                .mget(keys.attr(ino), keys.name(keys.chunk(ino, 0))),
                { r in
                    let v = r.array
                    got(Attr.storedTail(v.first?.bytes ?? []) + ((v.count > 1 ? v[1].bytes : nil) ?? []))
                }
            ))
    }

    /// From format 5 chunk 0 of a regular file keeps a single record after the file's
    /// attributes while that is all it has; the record after it moves both to the chunk's key
    /// (whatever the format this client knows: a record kept there is older than any in the key,
    /// and never beside them).
    package func appendChunk(_ t: RedisTxn, _ ino: Ino, _ index: UInt32, _ record: [UInt8]) throws(FSError) {
        let k = keys.chunk(ino, index)
        let layout = layoutVersion.load(ordering: .relaxed)
        if index == 0 {
            let a = keys.attr(ino)
            let reads = chunkZeroReads(t, ino)
            if !reads.isEmpty { try t.load(reads) }
            if let cur = try t.string(a), let (attr, length, tail) = Attr.storedParts(cur) {
                if !tail.isEmpty {
                    try t.set(a, Array(cur[..<length]))
                    try t.append(k, tail)
                } else if layout >= 5 && attr.type == .regular && record.count == Slice.encodedSize, try t.string(k) == nil {
                    try t.set(a, attr.encodeCompact(firstChunk: record))
                    return
                }
            }
        }
        try t.append(k, record)
        if index == 0 && layout >= 5 { return }
        let idx = Array(String(index).utf8)
        try t.op("ZADD", keys.chunkIndex(ino), [idx, idx])
    }

    package func formatLoaded(_ format: VolumeFormat) {
        layoutVersion.store(format.version, ordering: .relaxed)
    }

    package func deleteChunk(_ t: RedisTxn, _ ino: Ino, _ index: UInt32) throws(FSError) -> [UInt8] {
        let k = keys.chunk(ino, index)
        let blob = try chunk(t, ino, index)
        if index == 0, let cur = try t.string(keys.attr(ino)), let (_, length, tail) = Attr.storedParts(cur), !tail.isEmpty {
            try t.set(keys.attr(ino), Array(cur[..<length]))
        }
        if try t.string(k) != nil { try t.del(k) }
        try t.op("ZREM", keys.chunkIndex(ino), [Array(String(index).utf8)])
        return blob
    }

    /// The index (a sorted set) names the chunks from 1 on; chunk 0 is there when its key is
    /// (volumes before format 5 also name it in the index: it is counted once).
    package func chunkIndexes(_ tx: RedisTxn, _ ino: Ino, from index: UInt32, limit: Int, descending: Bool) throws(FSError) -> [UInt32] {
        let c = ReadCmd.zrangeByScore(keys.chunkIndex(ino), from: String(index), limit: limit, descending: descending)
        // (What chunk 0 needs goes with the index's read.)
        if index == 0 && tx.writes[c.key] == nil { try tx.load([.cmd(c)] + chunkZeroReads(tx, ino)) }
        var got = try tx.scan(c).array.compactMap { $0.text.flatMap { UInt32($0) } }
        guard index == 0 else { return got }
        got.removeAll { $0 == 0 }
        if try !chunk(tx, ino, 0).isEmpty {
            if descending { got.append(0) } else { got.insert(0, at: 0) }
        }
        return Array(got.prefix(limit))
    }

    // MARK: opens

    package func isOpen(_ tx: RedisTxn, _ ino: Ino) throws(FSError) -> Bool { try tx.hashLength(keys.opens(ino)) > 0 }

    package func openCount(_ tx: RedisTxn, _ sid: UInt64, _ ino: Ino) throws(FSError) -> Int {
        try tx.field(keys.opens(ino), Array(String(sid).utf8)).flatMap { Int(String(decoding: $0, as: UTF8.self)) } ?? 0
    }

    package func addOpen(_ t: RedisTxn, _ sid: UInt64, _ ino: Ino) throws(FSError) {
        try t.hincr(keys.opens(ino), Array(String(sid).utf8), 1)
        try t.hincr(keys.sessionOpens(sid), Array(String(ino).utf8), 1)
    }

    package func dropOpens(_ t: RedisTxn, _ sid: UInt64, _ ino: Ino, _ count: Int) throws(FSError) -> Int {
        let s = Array(String(sid).utf8)
        let i = Array(String(ino).utf8)
        let cur = try t.field(keys.opens(ino), s).flatMap { Int(String(decoding: $0, as: UTF8.self)) } ?? 0
        let left = max(0, cur - count)
        if left == 0 {
            try t.hdel(keys.opens(ino), s)
            try t.hdel(keys.sessionOpens(sid), i)
        } else {
            try t.hset(keys.opens(ino), s, Array(String(left).utf8))
            try t.hset(keys.sessionOpens(sid), i, Array(String(left).utf8))
        }
        return left
    }

    package func sessionOpens(_ tx: RedisTxn, _ sid: UInt64, limit: Int) throws(FSError) -> [(Ino, Int)] {
        try tx.someFields(keys.sessionOpens(sid), limit).compactMap { (f, v) -> (Ino, Int)? in
            guard let ino = Ino(String(decoding: f, as: UTF8.self)), let n = Int(String(decoding: v, as: UTF8.self)) else { return nil }
            return (ino, n)
        }
    }

    // MARK: deletion queues

    package func addPendingDelete(_ tx: RedisTxn, _ ino: Ino, _ size: UInt64) throws(FSError) {
        try tx.op("ZADD", keys.delfiles, [Array(String(Timespec.now().sec).utf8), Array("\(ino):\(size)".utf8)])
    }

    package func pendingDeletes(_ tx: RedisTxn, limit: Int) throws(FSError) -> [PendingDelete] {
        try tx.scan(.zrange(keys.delfiles, count: limit)).array.compactMap { r -> PendingDelete? in
            guard let t = r.text else { return nil }
            let parts = t.split(separator: ":")
            guard parts.count == 2, let ino = UInt64(parts[0]), let size = UInt64(parts[1]) else { return nil }
            return PendingDelete(ino: ino, size: size)
        }
    }

    package func removePendingDelete(_ tx: RedisTxn, _ pending: PendingDelete) throws(FSError) {
        try tx.op("ZREM", keys.delfiles, [Array("\(pending.ino):\(pending.size)".utf8)])
    }

    package func pushDroppedSlices(_ tx: RedisTxn, _ records: [UInt8]) throws(FSError) {
        try tx.op("RPUSH", keys.delslices, [records])
    }

    package func sliceRefs(_ tx: RedisTxn, _ id: UInt64) throws(FSError) -> Int64 {
        guard let v = try tx.field(keys.sliceRefs, Array(String(id).utf8)) else { return 0 }
        return Int64(String(decoding: v, as: UTF8.self)) ?? 0
    }

    package func keepForGC(_ tx: RedisTxn, holder: String, _ ids: [UInt64]) throws(FSError) {
        for id in ids { try tx.hset(keys.gcKept(holder), Array(String(id).utf8), [UInt8(ascii: "1")]) }
    }

    package func keptForGC(_ tx: RedisTxn, holder: String, _ id: UInt64) throws(FSError) -> Bool {
        try tx.field(keys.gcKept(holder), Array(String(id).utf8)) != nil
    }

    package func wipe() throws(FSError) {
        // Every key of the volume (its prefix; a volume without one owns the database), 1,000
        // a step, then the settings key last (the volume is gone once it is).
        var cursor = "0"
        repeat {
            let r = try command(["SCAN", cursor, "MATCH", keys.prefix + "*", "COUNT", "1000"]).array
            guard r.count == 2, let next = r[0].bytes else { throw FSError(EIO, "\(displayName): an unexpected reply to SCAN") }
            let names = r[1].array.compactMap { $0.bytes }.filter { $0 != Array(keys.name(keys.setting).utf8) }
            if !names.isEmpty { _ = try command(["UNLINK"] + names.map { String(decoding: $0, as: UTF8.self) }) }
            cursor = String(decoding: next, as: UTF8.self)
        } while cursor != "0"
        _ = try command(["UNLINK", keys.name(keys.setting)])
    }

    package func clearKeptForGC(holder: String) throws(FSError) {
        // (UNLINK frees a large hash in the background.)
        _ = try command(["UNLINK", keys.name(keys.gcKept(holder))])
    }

    package func addSliceRefs(_ tx: RedisTxn, _ id: UInt64, _ delta: Int64) throws(FSError) {
        let f = Array(String(id).utf8)
        if delta > 0 {
            try tx.hincr(keys.sliceRefs, f, delta)
        } else if delta < 0 {
            let now = try sliceRefs(tx, id) + delta
            if now <= 0 { try tx.hdel(keys.sliceRefs, f) } else { try tx.hincr(keys.sliceRefs, f, delta) }
        }
    }

    package func takeDroppedSlices(_ t: RedisTxn, limit: Int) throws(FSError) -> [UInt8] {
        let items = try t.scan(.lrange(keys.delslices, count: limit)).array
        if items.isEmpty { return [] }
        try t.op("LTRIM", keys.delslices, [Array(String(items.count).utf8), Array("-1".utf8)])
        return items.flatMap { $0.bytes ?? [] }
    }

    // MARK: sessions

    package func session(_ t: RedisTxn, _ sid: UInt64) throws(FSError) -> SessionInfo? {
        let s = Array(String(sid).utf8)
        try t.load([.cmd(.hget(keys.sessionInfos, s)), .cmd(.zscore(keys.sessions, s))])
        guard let text = try t.field(keys.sessionInfos, s), var info = decodeSession(String(decoding: text, as: UTF8.self)) else { return nil }
        info.sid = sid
        if let beat = try t.value(.zscore(keys.sessions, s)).text.flatMap({ Double($0) }) { info.heartbeat = Int64(beat) }
        return info
    }

    package func putSession(_ t: RedisTxn, _ info: SessionInfo) throws(FSError) {
        let s = Array(String(info.sid).utf8)
        try t.op("ZADD", keys.sessions, [Array(String(info.heartbeat).utf8), s])
        try t.hset(keys.sessionInfos, s, Array(encodeSession(info).utf8))
    }

    package func deleteSession(_ t: RedisTxn, _ sid: UInt64) throws(FSError) {
        let s = Array(String(sid).utf8)
        try t.op("ZREM", keys.sessions, [s])
        try t.hdel(keys.sessionInfos, s)
        try t.del(keys.sessionLocks(sid))
        try t.del(keys.sessionOpens(sid))
        try t.del(keys.sessionRequests(sid))
    }

    package func sessions(_ t: RedisTxn) throws(FSError) -> [SessionInfo] {
        let z = try t.unchecked(ReadCmd(.zrange, keys.sessions, ["0", "-1", "WITHSCORES"].map { Array($0.utf8) })).array
        let h = try t.unchecked(ReadCmd(.hgetall, keys.sessionInfos)).array
        var beats: [UInt64: Int64] = [:]
        for i in stride(from: 0, to: z.count - 1, by: 2) {
            if let sid = z[i].int, let b = z[i + 1].text.flatMap({ Double($0) }) { beats[UInt64(sid)] = Int64(b) }
        }
        var out: [SessionInfo] = []
        for i in stride(from: 0, to: h.count - 1, by: 2) {
            guard let sid = h[i].int, let text = h[i + 1].text, var info = decodeSession(text) else { continue }
            info.sid = UInt64(sid)
            if let b = beats[info.sid] { info.heartbeat = b }
            out.append(info)
        }
        return out.sorted { $0.sid < $1.sid }
    }

    // MARK: locks

    package func locks(_ tx: RedisTxn, _ ino: Ino, _ kind: UInt8) throws(FSError) -> [UInt8] { try tx.string(keys.locks(ino, kind)) ?? [] }

    package func putLocks(_ t: RedisTxn, _ ino: Ino, _ kind: UInt8, _ table: [UInt8], sid: UInt64) throws(FSError) {
        if table.isEmpty { try t.del(keys.locks(ino, kind)) } else { try t.set(keys.locks(ino, kind), table) }
        if sid != 0 { try t.op("SADD", keys.sessionLocks(sid), [Array("\(ino):\(kind)".utf8)]) }
    }

    package func sessionLocks(_ tx: RedisTxn, _ sid: UInt64, limit: Int) throws(FSError) -> [(Ino, UInt8)] {
        try tx.someMembers(keys.sessionLocks(sid), limit).compactMap { m -> (Ino, UInt8)? in
            let parts = String(decoding: m, as: UTF8.self).split(separator: ":")
            guard parts.count == 2, let ino = Ino(parts[0]), let kind = UInt8(parts[1]) else { return nil }
            return (ino, kind)
        }
    }

    package func forgetSessionLock(_ tx: RedisTxn, _ sid: UInt64, _ ino: Ino, _ kind: UInt8) throws(FSError) {
        try tx.op("SREM", keys.sessionLocks(sid), [Array("\(ino):\(kind)".utf8)])
    }
}

/// The writes of the thread's last committed transaction: the attribute records it set whole
/// are as they are on the server right after it (what `recentAttr` answers).
///
/// Not transaction state: nothing in a transaction reads it. It is kept per thread (below)
/// because `recentAttr` answers "what did the change this caller just made commit", and the
/// caller (`VFS.changing`) asks on the thread that ran the change, right after it returns;
/// one slot in the store would answer with whichever thread committed last.
final class CommittedWrites {
    /// The store's `serial` (not a weak reference: one of those would move the store's reference
    /// counts to a side table and make every retain of it slower).
    let store: UInt64
    let writes: [RKey: KeyWrites]
    init(_ t: RedisTxn) {
        store = t.store.serial
        writes = t.writes
    }
}

/// Gives each store a number of its own.
private let storeSerials = Counter()

private let lastCommittedOfThread = PerThread<CommittedWrites>()

extension RedisTxn {
    static var lastCommitted: CommittedWrites? {
        get { lastCommittedOfThread.value }
        set { lastCommittedOfThread.value = newValue }
    }
}

/// The shared engine on optimistic transactions: `redis://...?engine=txn`.
package typealias RedisTxnMetadata = TxnMetadata<RedisTxnStore>

extension TxnMetadata where S == RedisTxnStore {
    package convenience init(location: RedisLocation, retryTimeout: Double = 60, tracking: Bool = false) throws(FSError) {
        self.init(store: try RedisTxnStore(location: location, retryTimeout: retryTimeout, tracking: tracking))
    }
}

/// An engine whose server may keep the metadata only in memory.
package protocol DurabilityCheck: AnyObject, Sendable {
    /// Why the metadata may be lost on a restart of its server, or nil when it is kept (or the
    /// server would not say).
    func durabilityWarning() -> String?
}

extension TxnMetadata: DurabilityCheck where S == RedisTxnStore {
    /// A Redis that neither appends to an AOF nor saves snapshots loses everything when it
    /// restarts. (A server that refuses `CONFIG GET`, a managed one, is not second-guessed.)
    package func durabilityWarning() -> String? {
        guard
            let (aof, save) = try? store.pool.with({ (c) throws(FSError) -> (Bool, String?) in
                let info = try c.command(["INFO", "persistence"]).text ?? ""
                let reply = try c.command(["CONFIG", "GET", "save"]).array
                return (info.contains("aof_enabled:1"), reply.count == 2 ? reply[1].text : nil)
            })
        else { return nil }
        guard !aof, let save, save.allSatisfy({ $0 == " " }) else { return nil }
        return "\(store.displayName) neither appends to an AOF nor saves snapshots (appendonly no, save \"\"): "
            + "a restart of Redis loses the volume's metadata, and with it every file; set appendonly yes in its configuration"
    }
}

/// Hands out request numbers, unique within this client.
final class Counter: @unchecked Sendable {
    private let lock = ConditionLock()
    private var value: UInt64 = 0

    func next() -> UInt64 {
        lock.withLock {
            value += 1
            return value
        }
    }
}

/// Small integers, each held by one request (with its retries) at a time: the field of the
/// request-id hash, so the hash holds as many entries as requests ever ran at once.
final class RequestSlots: @unchecked Sendable {
    private let lock = ConditionLock()
    private var free: [Int] = []
    private var count = 0

    func take() -> Int {
        lock.withLock {
            if let s = free.popLast() { return s }
            count += 1
            return count
        }
    }

    func give(_ s: Int) { lock.withLock { free.append(s) } }
}
