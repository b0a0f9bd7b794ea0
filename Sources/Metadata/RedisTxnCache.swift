import RedisWire
import StageFSCore

/// What this client last saw of keys and hash fields (GET, HGET, HLEN replies), kept so that a
/// write transaction can start from it without a read round trip. Never trusted: every value
/// taken from here is a read of the transaction and checked by its commit, so a stale one costs
/// a retry, never a wrong result. Read-only transactions do not use it.
///
/// What a transaction that wrote nothing saw is noted only when the cache is next asked or
/// changed: most lookups and stats are followed by nothing that asks it, and noting each one
/// took about a fifth of the mount's user CPU per lookup. Of those reads only the newest
/// `pendingLimit` wait (at least one transaction's); a dropped one costs a later transaction a
/// read.
final class RedisTxnCache: @unchecked Sendable {
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
    private var pending: [Reads] = []
    private var pendingReads = 0
    /// Reads that wait to be noted at most (the newest transaction's always wait).
    let pendingLimit = 4096

    init(capacity: Int) { self.capacity = capacity }

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
            let dropped = lock.withLock { wait(t.reads) }
            _ = dropped
            return
        }
        lock.withLock {
            notePending()
            note(t.reads)
            // A new inode has no records yet: what the next operations on it read (a regular
            // file's first chunk and opens, a directory's entries) is known without asking.
            let k = t.store.keys
            for ino in t.newInodes {
                guard case .set(let a)? = t.writes[k.attr(ino)]?.string, let type = a.first else { continue }
                if type == FileType.directory.rawValue {
                    entries[k.entries(ino)] = .empty
                } else {
                    entries[k.chunk(ino, 0)] = Entry(value: .null)
                    entries[k.opens(ino)] = .empty
                }
            }
            for k in t.writeOrder { Self.apply(&entries, k, t.writes[k]!, &fieldsAdded) }
        }
    }

    /// Replies seen by a commit that found them changed.
    func noteChanged(_ changed: [(ReadCmd, RedisReply?)]) {
        lock.withLock {
            notePending()
            for (c, r) in changed {
                if let r, c.cacheable {
                    Self.note(&entries, c, r, &fieldsAdded)
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
    private func wait(_ reads: Reads) -> [Reads] {
        if reads.isEmpty { return [] }
        pending.append(reads)
        pendingReads += reads.count
        guard pendingReads > pendingLimit, pending.count > 1 else { return [] }
        // Down to half the limit at once, so that dropping costs a constant per read kept.
        var drop = 0
        while drop < pending.count - 1 && pendingReads > pendingLimit / 2 {
            pendingReads -= pending[drop].count
            drop += 1
        }
        let before = pending
        pending = Array(before[drop...])
        return before
    }

    private func notePending() {
        if pending.isEmpty { return }
        for reads in pending { note(reads) }
        pending.removeAll(keepingCapacity: true)
        pendingReads = 0
    }

    private func note(_ reads: Reads) {
        if entries.count + fieldsAdded > capacity {
            entries.removeAll()
            fieldsAdded = 0
        }
        for (c, r, cached) in reads where c.cacheable && !cached { Self.note(&entries, c, r, &fieldsAdded) }
    }

    // Both change an entry in place (`entries[key, default:]`): a copy of it would copy its
    // fields, which for a large directory made every operation cost its size.

    private static func note(_ entries: inout [RKey: Entry], _ c: ReadCmd, _ r: RedisReply, _ added: inout Int) {
        guard c.verb == .get || c.verb == .hget || (c.verb == .hlen && r.int != nil) else { return }
        note(&entries[c.key, default: Entry()], c, r, &added)
    }

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
