import RedisWire
import StageFSCore

/// What this client last saw of keys and hash fields (GET, HGET, HLEN replies), kept so that a
/// write transaction can start from it without a read round trip. Every value a write
/// transaction takes from here is a read of it and checked by its commit, so a stale one costs
/// a retry, never a wrong result.
///
/// With client tracking (`RedisPool.startTracking`, the gateway's default), attributes and
/// directory entries are also *trusted*: read-only transactions (lookup, getattr) answer from
/// them without a round trip. An entry is trusted when all it holds was read, or written by a
/// commit that read it again, through a tracked connection of the current generation, and no
/// invalidation of its key arrived since the transaction that learnt it began; an invalidation
/// drops the entry. Trusted entries answer only while the listener has heard from the server
/// within the last second, so a change by another client is seen once its invalidation arrives
/// (in a network partition: after at most a second).
///
/// What a transaction that wrote nothing saw is noted only when the cache is next asked or
/// changed: most lookups and stats are followed by nothing that asks it, and noting each one
/// took about a fifth of the mount's user CPU per lookup. Of those reads only the newest
/// `pendingLimit` wait (at least one transaction's); a dropped one costs a later transaction a
/// read.
final class RedisTxnCache: RedisInvalidationSink, @unchecked Sendable {
    typealias Reads = [(cmd: ReadCmd, reply: RedisReply, cached: Bool)]

    struct Entry {
        /// The string value (`.null`: known missing; nil: unknown).
        var value: RedisReply?
        /// The hash's length, when known (always when `complete`).
        var len: Int64?
        /// Hash fields (`.null`: known missing).
        var fields: [Field: RedisReply] = [:]
        /// `fields` lists every field the hash has (a new or deleted key).
        var complete = false
        /// Read-only transactions may answer from it (see above).
        var trusted = false

        static let empty = Entry(value: .null, len: 0, fields: [:], complete: true)

        func field(_ f: Field) -> RedisReply? { fields[f] ?? (complete ? .null : nil) }
        var length: Int64? { len }
    }

    private let lock = ConditionLock()
    private var entries: [RKey: Entry] = [:]
    /// Hash fields added since the cache last started over (with the keys, a bound of what it holds).
    private var fieldsAdded = 0
    /// Keys and fields kept at most; the cache starts over when it holds more.
    let capacity: Int
    /// Reads of transactions that wrote nothing, oldest first, not noted yet.
    /// (Each with its transaction's stamp, and whether its reads were tracked.)
    private var pending: [(Reads, Stamp, Bool, [RKey])] = []
    private var pendingReads = 0
    /// Reads that wait to be noted at most (the newest transaction's always wait).
    let pendingLimit = 4096

    // Client tracking, under `lock`.
    /// Whether this cache is told of changes (`RedisInvalidationSink`).
    let tracking: Bool
    /// The volume's key prefix (to read invalidated keys' names).
    private let prefix: [UInt8]
    /// The tracking generation whose reads can be trusted; nil while tracking is down.
    private var generation: UInt64?
    /// When the listener last heard from the server.
    private var heardAt: UInt64 = 0
    /// Invalidations of trackable keys so far.
    private var invalidations: UInt64 = 0
    /// The number of the newest invalidation of each key among the last `recentLimit`.
    private var invalidatedAt: [RKey: UInt64] = [:]
    private var recent: [(key: RKey, number: UInt64)] = []
    private var recentNext = 0
    /// Invalidations forgotten are numbered `forgotten` or less: a stamp older cannot be trusted.
    private var forgotten: UInt64 = 0
    let recentLimit = 65536

    /// When a transaction began, as far as trust goes: the generation then and the number of
    /// invalidations heard.
    struct Stamp {
        let generation: UInt64?
        let invalidations: UInt64
        static let none = Stamp(generation: nil, invalidations: 0)
    }

    /// The pool whose listener brings the invalidations (`invalidationsArriving`).
    private let pool: RedisPool?

    init(capacity: Int, tracking: Bool = false, prefix: String = "", pool: RedisPool? = nil) {
        self.capacity = capacity
        self.tracking = tracking
        self.prefix = Array(prefix.utf8)
        self.pool = pool
    }

    /// The kinds of keys trusted (what lookups and getattr read).
    static func trackable(_ k: RKey) -> Bool { k.kind == .attr || k.kind == .entries }

    /// Whether trusted entries answer now (tracking up, the listener heard lately).
    var live: Bool { lock.withLock { liveLocked } }

    private var liveLocked: Bool { generation != nil && Sys.monotonicNanos() &- heardAt < 1_000_000_000 }

    func stamp() -> Stamp {
        guard tracking else { return .none }
        return lock.withLock { Stamp(generation: generation, invalidations: invalidations) }
    }

    /// Under the lock: whether what a transaction stamped `s` learnt of `k` can be trusted.
    private func trusts(_ k: RKey, _ s: Stamp) -> Bool {
        guard let g = generation, s.generation == g, s.invalidations >= forgotten, Self.trackable(k) else { return false }
        return (invalidatedAt[k] ?? 0) <= s.invalidations
    }

    /// A trusted reply to `c` (for a read-only transaction), nil when there is none.
    /// (`arriving`: `invalidationsArriving`, asked once per transaction.)
    func lookupTrusted(_ c: ReadCmd, arriving: Bool) -> RedisReply? {
        if arriving { return nil }
        return lock.withLock { () -> RedisReply? in
            guard liveLocked else { return nil }
            notePending()
            guard let e = entries[c.key], e.trusted else { return nil }
            switch c.verb {
            case .get: return e.value
            case .hget: return e.field(Field(c.arg ?? []))
            case .hlen: return e.length.map { .integer($0) }
            default: return nil
            }
        }
    }

    /// Keys held and reads waiting to be noted.
    var sizes: (keys: Int, pending: Int) { lock.withLock { (entries.count, pendingReads) } }

    func lookup(_ c: ReadCmd) -> RedisReply? {
        lock.withLock { () -> RedisReply? in
            notePending()
            guard let e = entries[c.key] else { return nil }
            switch c.verb {
            case .get: return e.value
            case .hget: return e.field(Field(c.arg ?? []))
            case .hlen: return e.length.map { .integer($0) }
            default: return nil
            }
        }
    }

    /// Applies what a transaction saw and, when it committed, what it wrote.
    func record(_ t: RedisTxn, committed: Bool) {
        guard committed else {
            // (What this drops is freed here, after the lock is let go.)
            let dropped = lock.withLock { wait(t.reads, t.stamp, tracked: t.useTrusted && t.readsTracked, computed: t.computedKeys) }
            _ = dropped
            return
        }
        lock.withLock {
            notePending()
            // (A write transaction's reads are not tracked.)
            note(t.reads, t.stamp, tracked: false)
            // The keys written: what the commit read again (tracked, in its MULTI) is
            // trusted, and what it wrote on top of a trusted entry. Each counts as invalidated
            // now, so that what another transaction read before, or committed before and
            // records later, is not trusted.
            // (A few keys: a list.)
            var fresh: [(key: RKey, ok: Bool)] = []
            func freshness(_ k: RKey) -> Bool? { fresh.first { $0.key == k }?.ok }
            if tracking {
                for (c, _) in t.reread where freshness(c.key) == nil { fresh.append((c.key, trusts(c.key, t.stamp))) }
                for k in t.writeOrder where Self.trackable(k) && freshness(k) == nil { fresh.append((k, false)) }
                for f in fresh { invalidate(f.key) }
            }
            // A new inode has no records yet: what the next operations on it read (a regular
            // file's first chunk and opens, a directory's entries) is known without asking.
            let k = t.store.keys
            for ino in t.newInodes {
                guard case .set(let a)? = t.writes[k.attr(ino)]?.string, let type = a.first else { continue }
                if type == FileType.directory.rawValue {
                    var e = Entry.empty
                    e.trusted = freshness(k.entries(ino)) ?? false
                    entries[k.entries(ino)] = e
                } else {
                    entries[k.chunk(ino, 0)] = Entry(value: .null)
                    entries[k.opens(ino)] = .empty
                }
            }
            for key in t.writeOrder {
                let w = t.writes[key]!
                guard tracking, let ok = freshness(key) else {
                    Self.apply(&entries, key, w, &fieldsAdded)
                    continue
                }
                // (Only the flag is read: a copy of the entry would make the change below copy
                // a large directory's fields.)
                let before = entries[key]?.trusted
                let whole = w.cleared || { if case .set? = w.string { return w.fields.isEmpty && w.ops.isEmpty } else { return false } }()
                Self.apply(&entries, key, w, &fieldsAdded)
                entries[key]?.trusted = ok && (before ?? true || whole)
            }
            for (c, r) in t.reread { note(c, r, trusted: freshness(c.key) ?? false, replacing: true) }
        }
    }

    /// Whether invalidations wait to be applied (no trusted answer meanwhile).
    var arriving: Bool { pool?.invalidationsArriving ?? false }

    /// A commit of `t` may have been applied without its reply: nothing is trusted of the keys
    /// it writes, and no read begun before is.
    func forget(_ t: RedisTxn) {
        guard tracking else { return }
        lock.withLock {
            notePending()
            for k in t.writeOrder where Self.trackable(k) { forgetLocked(k) }
        }
    }

    /// Under the lock: drops `k` and counts it invalidated now.
    private func forgetLocked(_ k: RKey) {
        entries[k] = nil
        invalidate(k)
    }

    /// Replies seen by a commit that found them changed.
    func noteChanged(_ changed: [(ReadCmd, RedisReply?)]) {
        lock.withLock {
            notePending()
            for (c, r) in changed {
                if let r, c.cacheable {
                    note(c, r, trusted: false)
                } else {
                    entries[c.key] = nil
                }
            }
        }
    }

    func removeAll() {
        lock.withLock {
            entries.removeAll()
            fieldsAdded = 0
            pending.removeAll()
            pendingReads = 0
        }
    }

    // The three below run under the lock.

    /// Keeps `reads` to be noted later, dropping the oldest waiting past `pendingLimit`.
    /// Returns the list before the drop, for the caller to free outside the lock.
    private func wait(_ reads: Reads, _ stamp: Stamp, tracked: Bool, computed: [RKey]) -> [(Reads, Stamp, Bool, [RKey])] {
        if reads.isEmpty { return [] }
        pending.append((reads, stamp, tracked, computed))
        pendingReads += reads.count
        guard pendingReads > pendingLimit, pending.count > 1 else { return [] }
        // Down to half the limit at once, so that dropping costs a constant per read kept.
        var drop = 0
        while drop < pending.count - 1 && pendingReads > pendingLimit / 2 {
            pendingReads -= pending[drop].0.count
            drop += 1
        }
        let before = pending
        pending = Array(before[drop...])
        return before
    }

    private func notePending() {
        if pending.isEmpty { return }
        for (reads, stamp, tracked, computed) in pending { note(reads, stamp, tracked: tracked, computed: computed) }
        pending.removeAll(keepingCapacity: true)
        pendingReads = 0
    }

    /// Notes a transaction's reads (`tracked`: all of them tracked in its stamp's generation).
    /// (`computed`: keys among them that were not tracked.)
    private func note(_ reads: Reads, _ stamp: Stamp, tracked: Bool, computed: [RKey] = []) {
        if entries.count + fieldsAdded > capacity {
            entries.removeAll()
            fieldsAdded = 0
        }
        for (c, r, cached) in reads where c.cacheable && !cached {
            note(c, r, trusted: tracked && !computed.contains(c.key) && trusts(c.key, stamp))
        }
    }

    /// Notes one reply: a trusted one into a trusted entry (an untrusted entry is dropped
    /// first), an untrusted one making its entry untrusted.
    /// `replacing`: a commit's reread, newer than what the entry holds; otherwise a trusted
    /// reply that disagrees with a trusted entry drops it (two reads noted in the other order
    /// than they ran, the invalidation between them still on its way).
    private func note(_ c: ReadCmd, _ r: RedisReply, trusted: Bool, replacing: Bool = false) {
        guard c.verb == .get || c.verb == .hget || (c.verb == .hlen && r.int != nil) else { return }
        let trusted = tracking && trusted
        if trusted, !replacing, let e = entries[c.key], e.trusted {
            let known: RedisReply? =
                switch c.verb {
                case .get: e.value
                case .hget: e.field(Field(c.arg ?? []))
                default: e.length.map { .integer($0) }
                }
            if let known, known != r {
                entries[c.key] = nil
                return
            }
        }
        if trusted, let e = entries[c.key], !e.trusted { entries[c.key] = nil }
        Self.note(&entries[c.key, default: Entry(trusted: trusted)], c, r, &fieldsAdded)
        if tracking && !trusted { entries[c.key]?.trusted = false }
    }

    // MARK: invalidations (`RedisInvalidationSink`)

    func trackingChanged(_ generation: UInt64?) {
        lock.withLock {
            self.generation = generation
            // Nothing trusted before is covered now.
            for i in entries.indices where entries.values[i].trusted { entries.values[i].trusted = false }
        }
    }

    func heard() { lock.withLock { heardAt = Sys.monotonicNanos() } }

    func invalidated(_ names: [[UInt8]]?) {
        lock.withLock {
            notePending()
            guard let names else {
                // Everything (a flush): no stamp before now is trusted.
                invalidations += 1
                forgotten = invalidations
                entries.removeAll()
                fieldsAdded = 0
                return
            }
            for n in names {
                guard let k = key(n) else { continue }
                forgetLocked(k)
            }
        }
    }

    /// Under the lock: counts `k` invalidated now (a read of it begun before is not trusted).
    private func invalidate(_ k: RKey) {
        invalidations += 1
        if recent.count < recentLimit {
            recent.append((k, invalidations))
        } else {
            let old = recent[recentNext]
            forgotten = max(forgotten, old.number)
            if invalidatedAt[old.key] == old.number { invalidatedAt[old.key] = nil }
            recent[recentNext] = (k, invalidations)
            recentNext = (recentNext + 1) % recentLimit
        }
        invalidatedAt[k] = invalidations
    }

    /// The trackable key a Redis key name is (`RedisKeys`: prefix, `i` or `d`, the number).
    private func key(_ name: [UInt8]) -> RKey? {
        guard name.count > prefix.count + 1, name.starts(with: prefix) else { return nil }
        let kind: RKey.Kind
        switch name[prefix.count] {
        case UInt8(ascii: "i"): kind = .attr
        case UInt8(ascii: "d"): kind = .entries
        default: return nil
        }
        var n: UInt64 = 0
        for b in name[(prefix.count + 1)...] {
            guard b >= 48 && b <= 57, n < UInt64.max / 10 else { return nil }
            n = n * 10 + UInt64(b - 48)
        }
        return RKey(kind, n)
    }

    // These change an entry in place (`entries[key, default:]`): a copy of it would copy its
    // fields, which for a large directory made every operation cost its size.

    private static func note(_ e: inout Entry, _ c: ReadCmd, _ r: RedisReply, _ added: inout Int) {
        switch c.verb {
        case .get: e.value = r
        case .hget:
            let f = Field(c.arg ?? [])
            // (Found once: the lookup of a large hash's field is a cache miss.)
            let i = e.fields.index(forKey: f)
            let old = i.map { e.fields.values[$0] } ?? (e.complete ? .null : nil)
            if let old, (old == .null) != (r == .null) {
                // The field came or went since: the length and completeness are no longer known.
                e.len = nil
                e.complete = false
            }
            if let i {
                e.fields.values[i] = r
            } else {
                e.fields[f] = r
                added += 1
            }
        case .hlen:
            guard let n = r.int else { return }
            if e.complete && e.length != n { e.complete = false }
            e.len = n
            // An empty hash: every field is known missing.
            if n == 0 {
                e.fields = [:]
                e.complete = true
            }
        default: return
        }
    }

    private static func apply(_ entries: inout [RKey: Entry], _ k: RKey, _ w: KeyWrites, _ added: inout Int) {
        if w.cleared { entries[k] = .empty }
        apply(&entries[k, default: Entry()], w, &added)
    }

    private static func apply(_ e: inout Entry, _ w: KeyWrites, _ added: inout Int) {
        switch w.string {
        case .set(let v)?: e.value = .string(v)
        case .append(let a)?:
            switch e.value {
            case .string(let b)?: e.value = .string(b + a)
            case .null?: e.value = .string(a)
            default: e.value = nil
            }
        case .incr(let n)?:
            switch e.value {
            case .null?: e.value = .string(Array(String(n).utf8))
            case let v?: e.value = v.int.map { .string(Array(String($0 + n).utf8)) }
            case nil: break
            }
        case nil: break
        }
        if !w.fields.isEmpty {
            var len = e.length
            for name in w.fieldOrder {
                let f = Field(name)
                let before = e.field(f)
                var after: RedisReply?
                switch w.fields[f]! {
                case .set(let v): after = .string(v)
                case .deleted: after = .null
                case .incr(let n):
                    if let b = before { after = b == .null ? .string(Array(String(n).utf8)) : b.int.map { .string(Array(String($0 + n).utf8)) } }
                }
                if let l = len, let b = before {
                    len = l + (w.fields[f]! == .deleted ? 0 : 1) - (b == .null ? 0 : 1)
                } else {
                    len = nil
                }
                if let after {
                    if e.fields.updateValue(after, forKey: f) == nil { added += 1 }
                } else {
                    e.fields[f] = nil
                }
            }
            e.len = len
            if len == nil { e.complete = false }
        }
    }
}
