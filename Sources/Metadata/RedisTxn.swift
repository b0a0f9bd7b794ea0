import RedisWire
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// One read command of a transaction: the reply is what the transaction saw, and the commit
/// runs the command again to check that the reply is still the same.
struct ReadCmd: Hashable {
    enum Verb: UInt8 {
        case get, hget, hlen, hstrlen, scard, sismember, zscore, hkeys, lrange, zrange, zrangeByScore, zrevrangeByScore, hrandfield, srandmember
        case hgetall
        /// Of the key and the one other key named in the argument (in one slot): what a read
        /// after a commit takes at one moment (`chunkAfterCommit`); never checked or cached.
        case mget
        /// Not a Redis command: whether a counter is at most the argument (`RedisTxn.atMost`),
        /// which the commit script checks as that comparison.
        case atMost

        var name: String {
            switch self {
            case .get: "GET"
            case .hget: "HGET"
            case .hlen: "HLEN"
            case .hstrlen: "HSTRLEN"
            case .scard: "SCARD"
            case .sismember: "SISMEMBER"
            case .zscore: "ZSCORE"
            case .hkeys: "HKEYS"
            case .lrange: "LRANGE"
            case .zrange: "ZRANGE"
            case .zrangeByScore: "ZRANGEBYSCORE"
            case .zrevrangeByScore: "ZREVRANGEBYSCORE"
            case .hrandfield: "HRANDFIELD"
            case .srandmember: "SRANDMEMBER"
            case .hgetall: "HGETALL"
            case .mget: "MGET"
            case .atMost: "ATMOST"
            }
        }
    }
    let verb: Verb
    let key: RKey
    /// The argument of a one-argument command (a field, a member): most reads have none or
    /// one, and this keeps them from allocating a list.
    let arg: [UInt8]?
    /// The arguments of the others.
    let args: [[UInt8]]

    init(_ verb: Verb, _ key: RKey, _ args: [[UInt8]] = []) {
        self.verb = verb
        self.key = key
        self.arg = nil
        self.args = args
    }

    init(_ verb: Verb, _ key: RKey, arg: [UInt8]) {
        self.verb = verb
        self.key = key
        self.arg = arg
        self.args = []
    }

    static func == (a: ReadCmd, b: ReadCmd) -> Bool { a.verb == b.verb && a.key == b.key && a.arg == b.arg && a.args == b.args }

    // The arguments hashed as whole byte strings (an array of bytes hashes byte by byte).
    func hash(into h: inout Hasher) {
        h.combine(key)
        h.combine(verb.rawValue)
        arg?.withUnsafeBytes { h.combine(bytes: $0) }
        for a in args { a.withUnsafeBytes { h.combine(bytes: $0) } }
    }

    var argCount: Int { (arg == nil ? 0 : 1) + args.count }

    /// Appends the arguments to a command.
    func appendArgs(to c: inout RedisCommand) {
        if let arg { c.add(arg) }
        for a in args { c.add(a) }
    }

    var cmd: String { verb.name }

    static func get(_ k: RKey) -> ReadCmd { ReadCmd(.get, k) }
    /// `k` and the key named `other` (its whole name, in the same slot).
    static func mget(_ k: RKey, _ other: String) -> ReadCmd { ReadCmd(.mget, k, arg: Array(other.utf8)) }
    static func hget(_ k: RKey, _ field: [UInt8]) -> ReadCmd { ReadCmd(.hget, k, arg: field) }
    static func hlen(_ k: RKey) -> ReadCmd { ReadCmd(.hlen, k) }
    static func hstrlen(_ k: RKey, _ field: [UInt8]) -> ReadCmd { ReadCmd(.hstrlen, k, arg: field) }
    static func scard(_ k: RKey) -> ReadCmd { ReadCmd(.scard, k) }
    static func sismember(_ k: RKey, _ m: [UInt8]) -> ReadCmd { ReadCmd(.sismember, k, arg: m) }
    static func zscore(_ k: RKey, _ m: [UInt8]) -> ReadCmd { ReadCmd(.zscore, k, arg: m) }
    static func hkeys(_ k: RKey) -> ReadCmd { ReadCmd(.hkeys, k) }
    static func lrange(_ k: RKey, count: Int) -> ReadCmd { ReadCmd(.lrange, k, [Array("0".utf8), Array(String(count - 1).utf8)]) }
    static func zrange(_ k: RKey, count: Int) -> ReadCmd { ReadCmd(.zrange, k, [Array("0".utf8), Array(String(count - 1).utf8)]) }
    /// At most `limit` members of a sorted set whose scores are `min` or more, the lowest first
    /// (`descending`: the highest first).
    static func zrangeByScore(_ k: RKey, from min: String, limit: Int, descending: Bool) -> ReadCmd {
        let bounds = descending ? ["+inf", min] : [min, "+inf"]
        return ReadCmd(descending ? .zrevrangeByScore : .zrangeByScore, k, (bounds + ["LIMIT", "0", String(limit)]).map { Array($0.utf8) })
    }
    /// The indexes of a file's chunks from `from` on, the lowest first (what the read script's
    /// `K` operation runs).
    static func chunkList(_ k: RKey, from: UInt32, limit: Int) -> ReadCmd {
        zrangeByScore(k, from: String(from), limit: limit, descending: false)
    }
    /// A page of a directory's positions (what the read script's `D` operation runs).
    static func page(_ z: RKey, after: UInt64, limit: Int) -> ReadCmd {
        ReadCmd(.zrangeByScore, z, ["(\(after)", "+inf", "WITHSCORES", "LIMIT", "0", String(limit)].map { Array($0.utf8) })
    }

    /// Whether a commit can run it again and expect the same reply (random picks cannot; the
    /// commit's script lists the commands it checks).
    var checkable: Bool { verb != .hrandfield && verb != .srandmember && verb != .hgetall && verb != .mget }
    /// Whether the client cache keeps its reply.
    var cacheable: Bool { verb == .get || verb == .hget || verb == .hlen }

    /// The command as sent, with the key's name in `keys`.
    func command(_ keys: RedisKeys) -> RedisCommand {
        var c = RedisCommand(capacity: 64)
        c.add(cmd)
        keys.append(key, to: &c)
        appendArgs(to: &c)
        return c
    }
}

/// A hash field's name as a dictionary key: hashed as one byte string (an array of bytes hashes
/// byte by byte).
struct Field: Hashable {
    let bytes: [UInt8]
    init(_ bytes: [UInt8]) { self.bytes = bytes }
    static func == (a: Field, b: Field) -> Bool { a.bytes == b.bytes }
    func hash(into h: inout Hasher) { bytes.withUnsafeBytes { h.combine(bytes: $0) } }
}

/// One element of a read batch (see `RedisTxnScripts.read`).
enum ReadOp {
    case cmd(ReadCmd)
    /// An entry of directory hash `dir` and what the inode it names holds.
    case entry(dir: RKey, name: [UInt8])
    /// A page of a directory: positions in `positions`, entries in `entries`.
    /// `plus`: with the attributes of the inodes they name, and with `xattrs` the counts of
    /// their extended attributes.
    case page(positions: RKey, entries: RKey, after: UInt64, limit: Int, plus: Bool, xattrs: Bool)
    /// The indexes of a file's chunks from `from` on (sorted set `index`, at most `limit`) and
    /// the records of those chunks.
    case chunks(index: RKey, ino: Ino, from: UInt32, limit: Int)
    /// The first `limit` members of the pending-delete set `queue` and, for the file each
    /// names, its chunk indexes with their records, `chunks` in all (the first file may take
    /// them all).
    case pending(queue: RKey, limit: Int, chunks: Int)
}

/// What a transaction changes in one key, reduced to its net effect (the commit sends that).
struct KeyWrites {
    enum StringWrite {
        case set([UInt8])
        case append([UInt8])
        case incr(Int64)
    }
    enum FieldWrite: Equatable {
        case set([UInt8])
        case deleted
        case incr(Int64)
    }
    /// The key is deleted first.
    var cleared = false
    var string: StringWrite?
    var fields: [Field: FieldWrite] = [:]
    var fieldOrder: [[UInt8]] = []
    /// Sorted-set, set and list changes, in order.
    var ops: [(cmd: String, args: [[UInt8]])] = []

    var touchesFields: Bool { cleared || !fields.isEmpty }
}

/// The state of one attempt of a transaction of `RedisTxnStore`: what it read (each read is a
/// check of the commit), the writes it buffered, and how it got its reads. It is the
/// transaction's value (`TxnStore.Txn`): `RedisTxnStore.transaction` hands it to its body, and
/// every read and write of the transaction is passed it. Used by one thread at a time.
package final class RedisTxn {
    // (unowned(unsafe): a transaction lives only inside its store's `transaction` call, and a
    // checked reference cost an atomic operation on every use.)
    unowned(unsafe) let store: RedisTxnStore
    var write: Bool
    /// Whether reads may come from the client cache (write transactions: the commit checks them).
    let useCache: Bool
    /// Whether reads may come from what the client cache trusts (read-only transactions, with
    /// client tracking).
    let useTrusted: Bool
    /// When it began, for what the cache may trust of what it learns.
    let stamp: RedisTxnCache.Stamp
    /// Whether every read of this (read-only) transaction was tracked in its stamp's generation.
    var readsTracked = true
    /// What the commit read again, tracked, of the attributes and entries it wrote (and of a new
    /// directory's entries), in the same round trip (`RedisTxnStore.commit`).
    var reread: [(ReadCmd, RedisReply)] = []
    /// Replies of the checkable reads, the first one seen for each command.
    private(set) var results: [ReadCmd: RedisReply] = [:]
    /// The same reads in the order made, each with its reply and whether that came from the
    /// client cache (which needs no telling again).
    private(set) var reads: RedisTxnCache.Reads = []
    private(set) var fromCache = false
    /// Round trips taken for reads.
    private(set) var batches = 0
    private(set) var writes: [RKey: KeyWrites] = [:]
    private(set) var writeOrder: [RKey] = []
    /// Inode numbers this transaction gave out (their keys are known to be empty).
    var newInodes: [Ino] = []
    /// Reads sent after the commit, unchecked, each with what takes its reply.
    var trailing: [(ReadCmd, (RedisReply) -> Void)] = []
    /// Chunk 0's records by inode, from the read script's `K` (the attributes and the chunk's key
    /// at one moment): what a read-only transaction reads of chunk 0 (`RedisTxnStore.chunk`).
    var firstChunks: [Ino: [UInt8]] = [:]

    init(store: RedisTxnStore, write: Bool, useCache: Bool) {
        self.store = store
        self.write = write
        self.useCache = useCache
        useTrusted = !write && store.cache.tracking
        stamp = store.cache.stamp()
        // (Most transactions read a few keys: one allocation each instead of growing.)
        results.reserveCapacity(8)
        reads.reserveCapacity(8)
    }

    /// Keys read under names the read script computed (not among the script's declared keys):
    /// Redis tracks only a script's declared keys (`OPTIN`), so what they held is not trusted.
    private(set) var computedKeys: [RKey] = []
    /// `RedisTxnCache.arriving`, asked at the first trusted lookup.
    private var arriving: Bool?

    private func trusted(_ c: ReadCmd) -> RedisReply? {
        if arriving == nil { arriving = store.cache.arriving }
        return store.cache.lookupTrusted(c, arriving: arriving!)
    }

    private func remember(_ c: ReadCmd, _ r: RedisReply, cached: Bool = false, computed: Bool = false) {
        guard c.checkable, results[c] == nil else { return }
        results[c] = r
        reads.append((c, r, cached))
        if computed && useTrusted && !computedKeys.contains(c.key) { computedKeys.append(c.key) }
    }

    // MARK: reads

    /// Fetches, in one round trip, the operations whose replies are not known yet (from this
    /// transaction or, when allowed, from the client cache).
    func load(_ wanted: [ReadOp]) throws(FSError) {
        var ops: [ReadOp] = []
        // (A batch has a few commands: a list is cheaper than a set.)
        var asked: [ReadCmd] = []
        func want(_ c: ReadCmd) {
            if results[c] != nil || asked.contains(c) { return }
            if useCache && c.cacheable, let v = store.cache.lookup(c) {
                remember(c, v, cached: true)
                fromCache = true
                return
            }
            if useTrusted && c.cacheable, let v = trusted(c) {
                remember(c, v, cached: true)
                return
            }
            asked.append(c)
            ops.append(.cmd(c))
        }
        for w in wanted {
            switch w {
            case .cmd(let c): want(c)
            case .entry(let dir, let name):
                let c = ReadCmd.hget(dir, name)
                if results[c] == nil && useCache, let v = store.cache.lookup(c) {
                    remember(c, v, cached: true)
                    fromCache = true
                }
                if results[c] == nil && useTrusted, let v = trusted(c) {
                    remember(c, v, cached: true)
                }
                if let v = results[c] {
                    // What removing or replacing the entry reads: a directory's entries, a
                    // file's opens (a read-only transaction changes nothing: the attributes).
                    if let ino = RedisTxnStore.entryIno(v), case .string(let e) = v {
                        want(.get(store.keys.attr(ino)))
                        if write {
                            want(e[8] == FileType.directory.rawValue ? .hlen(store.keys.entries(ino)) : .hlen(store.keys.opens(ino)))
                        }
                    }
                } else if !asked.contains(c) {
                    asked.append(c)
                    ops.append(w)
                }
            case .page(let z, _, let after, let limit, _, _):
                if results[.page(z, after: after, limit: limit)] == nil { ops.append(w) }
            case .chunks(let index, _, let from, let limit):
                if results[.chunkList(index, from: from, limit: limit)] == nil { ops.append(w) }
            case .pending(let queue, let limit, _):
                if results[.zrange(queue, count: limit)] == nil { ops.append(w) }
            }
        }
        if ops.isEmpty { return }
        let (replies, tracked) = try store.fetch(ops, track: useTrusted)
        if !useTrusted || tracked == nil || tracked != stamp.generation { readsTracked = false }
        batches += 1
        for (op, r) in zip(ops, replies) {
            switch op {
            case .cmd(let c): remember(c, r)
            case .entry(let dir, let name):
                let a = r.array
                let v = a.first ?? .null
                remember(.hget(dir, name), v)
                if a.count == 4, let ino = RedisTxnStore.entryIno(v), case .string(let e) = v {
                    remember(.get(store.keys.attr(ino)), a[1], computed: true)
                    // What a change of the entry reads (as `want` above): a directory's entries,
                    // a file's opens; the other count is not kept (or checked).
                    if e[8] == FileType.directory.rawValue {
                        remember(.hlen(store.keys.entries(ino)), a[3], computed: true)
                    } else {
                        remember(.hlen(store.keys.opens(ino)), a[2], computed: true)
                    }
                }
            case .page(let z, let d, let after, let limit, _, _):
                let a = r.array
                let names = a.first ?? .array([])
                remember(.page(z, after: after, limit: limit), names)
                let ents = a.count > 1 ? a[1].array : []
                let attrs = a.count > 2 ? a[2].array : []
                let xattrs = a.count > 3 ? a[3].array : []
                // (Up to three replies an entry: made room for at once.)
                results.reserveCapacity(results.count + ents.count + attrs.count + xattrs.count)
                reads.reserveCapacity(reads.count + ents.count + attrs.count + xattrs.count)
                let items = names.array
                for i in stride(from: 0, to: items.count - 1, by: 2) where i / 2 < ents.count {
                    if let n = items[i].bytes { remember(.hget(d, n), ents[i / 2]) }
                    if i / 2 < attrs.count, let ino = RedisTxnStore.entryIno(ents[i / 2]) {
                        remember(.get(store.keys.attr(ino)), attrs[i / 2], computed: true)
                        if i / 2 < xattrs.count { remember(.hlen(store.keys.xattrs(ino)), xattrs[i / 2], computed: true) }
                    }
                }
            case .chunks(let index, let ino, let from, let limit):
                rememberChunks(r, index: index, ino: ino, from: from, limit: limit)
            case .pending(let queue, let limit, let chunks):
                let a = r.array
                let members = a.first ?? .array([])
                remember(.zrange(queue, count: limit), members)
                let lists = a.count > 1 ? a[1].array : []
                var budget = chunks
                for (m, list) in zip(members.array, lists) {
                    guard budget > 0, let ino = m.text.flatMap({ $0.split(separator: ":").first }).flatMap({ Ino($0) }) else { break }
                    rememberChunks(list, index: store.keys.chunkIndex(ino), ino: ino, from: 0, limit: budget)
                    // (Chunk 0 counts though the index names it no more: as the script counts.)
                    let names = list.array.first?.array ?? []
                    budget -= names.count + (names.first?.text == "0" ? 0 : 1)
                }
            }
        }
    }

    /// A reply of the read script's `K` operation: {indexes, records} (and from 0 chunk 0's records
    /// and the file's attributes).
    private func rememberChunks(_ r: RedisReply, index: RKey, ino: Ino, from: UInt32, limit: Int) {
        let a = r.array
        let names = a.first ?? .array([])
        remember(.chunkList(index, from: from, limit: limit), names)
        let records = a.count > 1 ? a[1].array : []
        for (n, v) in zip(names.array, records) {
            if let i = n.text.flatMap({ UInt32($0) }) { remember(.get(store.keys.chunk(ino, i)), v, computed: true) }
        }
        if from == 0 && a.count > 3 {
            remember(.get(store.keys.chunk(ino, 0)), a[2], computed: true)
            remember(.get(store.keys.attr(ino)), a[3], computed: true)
            firstChunks[ino] = Attr.storedTail(a[3].bytes ?? []) + (a[2].bytes ?? [])
        }
    }

    /// The reply of `c` in this transaction.
    func value(_ c: ReadCmd) throws(FSError) -> RedisReply {
        if let r = results[c] { return r }
        try load([.cmd(c)])
        guard let r = results[c] else { throw store.bug("no reply for \(c.cmd) \(store.keys.name(c.key))") }
        return r
    }

    /// A read of a whole key (a range, a count): it must come before this transaction's own
    /// writes to that key, which it would not see.
    func scan(_ c: ReadCmd) throws(FSError) -> RedisReply {
        if writes[c.key] != nil { throw store.bug("\(c.cmd) \(store.keys.name(c.key)) after writing it in the same transaction") }
        return try value(c)
    }

    /// Up to `count` fields of a hash with their values, picked by the server (all of them when
    /// it has no more). Checked as the hash's length and each field's value.
    func someFields(_ k: RKey, _ count: Int) throws(FSError) -> [([UInt8], [UInt8])] {
        if writes[k] != nil { throw store.bug("HRANDFIELD \(store.keys.name(k)) after writing it in the same transaction") }
        let r = try store.fetch([
            .cmd(.hlen(k)), .cmd(ReadCmd(.hrandfield, k, [Array(String(count).utf8), Array("WITHVALUES".utf8)])),
        ])
        batches += 1
        readsTracked = false
        remember(.hlen(k), r[0])
        var out: [([UInt8], [UInt8])] = []
        let a = r[1].array
        for i in stride(from: 0, to: a.count - 1, by: 2) {
            guard let f = a[i].bytes, let v = a[i + 1].bytes else { continue }
            remember(.hget(k, f), .string(v))
            out.append((f, v))
        }
        return out
    }

    /// Up to `count` members of a set, picked by the server; checked as the set's size and
    /// each member's presence.
    func someMembers(_ k: RKey, _ count: Int) throws(FSError) -> [[UInt8]] {
        if writes[k] != nil { throw store.bug("SRANDMEMBER \(store.keys.name(k)) after writing it in the same transaction") }
        let r = try store.fetch([.cmd(.scard(k)), .cmd(ReadCmd(.srandmember, k, [Array(String(count).utf8)]))])
        batches += 1
        readsTracked = false
        remember(.scard(k), r[0])
        let members = r[1].array.compactMap { $0.bytes }
        for m in members { remember(.sismember(k, m), .integer(1)) }
        return members
    }

    /// Whether the counter `k` is at most `max` (`TxnStore.atMost`): read now, and checked by
    /// the commit as that comparison alone, so that transactions adding to the counter while it
    /// stays true do not conflict. Asked before this transaction adds to `k` itself.
    func atMost(_ k: RKey, _ max: Int64) throws(FSError) -> Bool {
        if writes[k] != nil { throw store.bug("ATMOST \(store.keys.name(k)) after writing it in the same transaction") }
        let c = ReadCmd(.atMost, k, arg: Array(String(max).utf8))
        if let r = results[c] { return r.int == 1 }
        let now: RedisReply
        if let r = results[.get(k)] {
            now = r
        } else {
            // (Not remembered as a GET: the commit checks the comparison, not the value.)
            now = try store.fetch([.cmd(.get(k))])[0]
            batches += 1
            readsTracked = false
        }
        let ok = (now.int ?? 0) <= max
        remember(c, .integer(ok ? 1 : 0))
        return ok
    }

    /// A whole read that cannot be checked (read-only transactions only).
    func unchecked(_ c: ReadCmd) throws(FSError) -> RedisReply {
        if write { throw store.bug("\(c.cmd) \(store.keys.name(c.key)) in a write transaction cannot be checked") }
        let r = try store.fetch([.cmd(c)])
        batches += 1
        return r[0]
    }

    /// GET with this transaction's own writes applied.
    func string(_ k: RKey) throws(FSError) -> [UInt8]? {
        let w = writes[k]
        switch w?.string {
        case .set(let v)?: return v
        case .append(let a)?: return (try value(.get(k)).bytes ?? []) + a
        case .incr(let n)?: return Array(String((try value(.get(k)).int ?? 0) + n).utf8)
        case nil:
            if w?.cleared == true { return nil }
            let r = try value(.get(k))
            return r == .null ? nil : r.bytes
        }
    }

    /// HGET with this transaction's own writes applied.
    func field(_ k: RKey, _ f: [UInt8]) throws(FSError) -> [UInt8]? {
        let w = writes[k]
        switch w?.fields[Field(f)] {
        case .set(let v)?: return v
        case .deleted?: return nil
        case .incr(let n)?: return Array(String((try value(.hget(k, f)).int ?? 0) + n).utf8)
        case nil:
            if w?.cleared == true { return nil }
            let r = try value(.hget(k, f))
            return r == .null ? nil : r.bytes
        }
    }

    /// HLEN with this transaction's own writes applied: the length read, and for each field
    /// written whether it was there before.
    func hashLength(_ k: RKey) throws(FSError) -> Int64 {
        guard let w = writes[k], w.touchesFields else { return try value(.hlen(k)).int ?? 0 }
        if w.cleared { return Int64(w.fields.values.filter { $0 != .deleted }.count) }
        try load([.cmd(.hlen(k))] + w.fieldOrder.map { .cmd(.hget(k, $0)) })
        var n = try value(.hlen(k)).int ?? 0
        for f in w.fieldOrder {
            let before = try value(.hget(k, f)) != .null
            let after = w.fields[Field(f)] != .deleted
            n += (after ? 1 : 0) - (before ? 1 : 0)
        }
        return n
    }

    // MARK: writes

    private func change(_ k: RKey, _ body: (inout KeyWrites) throws(FSError) -> Void) throws(FSError) {
        if !write { throw store.bug("a write to \(store.keys.name(k)) in a read-only transaction") }
        if writes[k] == nil { writeOrder.append(k) }
        // In place: a copy would copy the key's fields.
        try body(&writes[k, default: KeyWrites()])
    }

    func set(_ k: RKey, _ v: [UInt8]) throws(FSError) { try change(k) { $0.string = .set(v) } }

    func del(_ k: RKey) throws(FSError) { try change(k) { $0 = KeyWrites(cleared: true) } }

    func append(_ k: RKey, _ a: [UInt8]) throws(FSError) {
        try change(k) { (w) throws(FSError) in
            switch w.string {
            case .set(let v)?: w.string = .set(v + a)
            case .append(let b)?: w.string = .append(b + a)
            case .incr?: throw store.bug("APPEND to counter \(store.keys.name(k))")
            case nil: w.string = w.cleared ? .set(a) : .append(a)
            }
        }
    }

    func incr(_ k: RKey, _ n: Int64) throws(FSError) {
        try change(k) { (w) throws(FSError) in
            switch w.string {
            case .set(let v)?: w.string = .set(Array(String((Int64(String(decoding: v, as: UTF8.self)) ?? 0) + n).utf8))
            case .incr(let m)?: w.string = .incr(m + n)
            case .append?: throw store.bug("INCRBY of appended \(store.keys.name(k))")
            case nil: w.string = w.cleared ? .set(Array(String(n).utf8)) : .incr(n)
            }
        }
    }

    private func setField(_ w: inout KeyWrites, _ f: [UInt8], _ v: KeyWrites.FieldWrite) {
        if w.fields.updateValue(v, forKey: Field(f)) == nil { w.fieldOrder.append(f) }
    }

    func hset(_ k: RKey, _ f: [UInt8], _ v: [UInt8]) throws(FSError) { try change(k) { setField(&$0, f, .set(v)) } }

    func hdel(_ k: RKey, _ f: [UInt8]) throws(FSError) { try change(k) { setField(&$0, f, .deleted) } }

    func hincr(_ k: RKey, _ f: [UInt8], _ n: Int64) throws(FSError) {
        try change(k) { (w) throws(FSError) in
            let next: KeyWrites.FieldWrite
            switch w.fields[Field(f)] {
            case .set(let v)?: next = .set(Array(String((Int64(String(decoding: v, as: UTF8.self)) ?? 0) + n).utf8))
            case .deleted?: next = .set(Array(String(n).utf8))
            case .incr(let m)?: next = .incr(m + n)
            case nil: next = w.cleared ? .set(Array(String(n).utf8)) : .incr(n)
            }
            setField(&w, f, next)
        }
    }

    /// A sorted-set, set or list change (ZADD, ZREM, SADD, SREM, RPUSH, LTRIM).
    func op(_ cmd: String, _ k: RKey, _ args: [[UInt8]]) throws(FSError) {
        try change(k) { $0.ops.append((cmd, args)) }
    }

    var hasWrites: Bool { !writes.isEmpty }

    // MARK: commit

    /// Fields of an encoded attribute record (see `Attr.encode`): mtime and ctime, which a
    /// change of a directory may write alone; what such a change leaves as it is; and what its
    /// commit checks (all but the times).
    static let touchFields: [Range<Int>] = [35..<47, 47..<59]
    static let keptFields: [Range<Int>] = [0..<35, 59..<Attr.encodedSize]
    static let checkedFields: [Range<Int>] = [0..<23, 59..<Attr.encodedSize]

    /// For a directory's attributes that this transaction read and either left alone or changed
    /// only in mtime and ctime (what a create, unlink, rename or link does to its parents): the
    /// fields it changed. The rules never decide anything from a directory's times in a write
    /// transaction (`TxnStore`), so the commit checks the record without them and writes just
    /// those fields: clients creating and removing files in one directory do not conflict over
    /// its times. nil: the record is checked and written whole.
    private func changedTimes(_ c: ReadCmd) -> [Range<Int>]? {
        guard c.verb == .get, c.key.kind == .attr, case .string(let base)? = results[c], base.count == Attr.encodedSize,
            base[0] == FileType.directory.rawValue
        else { return nil }
        guard let w = writes[c.key] else { return [] }
        guard !w.cleared, w.fields.isEmpty, w.ops.isEmpty, case .set(let new)? = w.string, new.count == base.count else { return nil }
        for r in Self.keptFields where !base[r].elementsEqual(new[r]) { return nil }
        return Self.touchFields.filter { !base[$0].elementsEqual(new[$0]) }
    }

    /// The commit as one command (see `RedisTxnScripts.commit`): `verb` and `script` (EVALSHA
    /// and the SHA, or EVAL and the text), the key count, the keys, the request tag, the checks
    /// and the writes; and the read each check stands for, in order.
    /// `checksOnly`: the checks alone (nothing is written).
    func commitCommand(_ verb: String, _ script: String, requestKey: RKey, tag: String, checksOnly: Bool = false) -> (RedisCommand, [ReadCmd]) {
        // The keys first (checks and writes name them by position), each once.
        var keys = KeyList(requestKey)
        var times: [[Range<Int>]?] = []
        times.reserveCapacity(reads.count)
        var checkCount = 0
        for (c, _, _) in reads {
            let t = changedTimes(c)
            times.append(t)
            checkCount += t == nil ? 1 : Self.checkedFields.count
            keys.position(c.key)
        }
        let writeOrder = checksOnly ? [] : self.writeOrder
        for k in writeOrder { keys.position(k) }
        var cmd = RedisCommand(capacity: 128 + keys.list.count * 24 + reads.count * 48 + writes.count * 128)
        cmd.add(verb)
        cmd.add(script)
        cmd.add(keys.list.count)
        for k in keys.list { store.keys.append(k, to: &cmd) }
        cmd.add(tag)
        cmd.add(checkCount)
        var sent: [ReadCmd] = []
        sent.reserveCapacity(checkCount)
        var timesOnly: [RKey: [Range<Int>]] = [:]
        for ((c, reply, _), changed) in zip(reads, times) {
            let i = keys.position(c.key)
            if let changed, case .string(let base) = reply {
                timesOnly[c.key] = changed
                for r in Self.checkedFields {
                    cmd.add("GETRANGE")
                    cmd.add(i)
                    cmd.add(2)
                    cmd.add(r.lowerBound)
                    cmd.add(r.upperBound - 1)
                    cmd.add(RedisTxnStore.expectation(.string(Array(base[r]))))
                    sent.append(c)
                }
                continue
            }
            cmd.add(c.cmd)
            cmd.add(i)
            cmd.add(c.argCount)
            c.appendArgs(to: &cmd)
            cmd.add(RedisTxnStore.expectation(reply))
            sent.append(c)
        }
        func write(_ name: String, _ i: Int, _ args: [UInt8]...) {
            cmd.add(name)
            cmd.add(i)
            cmd.add(args.count)
            for a in args { cmd.add(a) }
        }
        for k in writeOrder {
            let kw = writes[k]!
            let i = keys.position(k)
            if !timesOnly.isEmpty, let changed = timesOnly[k], case .set(let v)? = kw.string {
                for r in changed { write("SETRANGE", i, Array(String(r.lowerBound).utf8), Array(v[r])) }
                continue
            }
            if kw.cleared { write("DEL", i) }
            switch kw.string {
            case .set(let v)?: write("SET", i, v)
            case .append(let a)?: write("APPEND", i, a)
            case .incr(let n)?: write("INCRBY", i, Array(String(n).utf8))
            case nil: break
            }
            for f in kw.fieldOrder {
                switch kw.fields[Field(f)]! {
                case .set(let v): write("HSET", i, f, v)
                case .deleted: write("HDEL", i, f)
                case .incr(let n): write("HINCRBY", i, f, Array(String(n).utf8))
                }
            }
            for o in kw.ops {
                cmd.add(o.cmd)
                cmd.add(i)
                cmd.add(o.args.count)
                for a in o.args { cmd.add(a) }
            }
        }
        return (cmd, sent)
    }
}

/// The keys of a command that names them by position (1, 2, ...), each once, in the order
/// first asked for. A short list is searched; a long one gets an index.
struct KeyList {
    private(set) var list: [RKey] = []
    private var index: [RKey: Int] = [:]

    init() { list.reserveCapacity(16) }

    init(_ first: RKey) {
        self.init()
        list.append(first)
    }

    /// The position of `k`, added if new.
    @discardableResult
    mutating func position(_ k: RKey) -> Int {
        if index.isEmpty {
            if let i = list.firstIndex(of: k) { return i + 1 }
            list.append(k)
            if list.count > 16 { for (i, x) in list.enumerated() { index[x] = i + 1 } }
            return list.count
        }
        if let i = index[k] { return i }
        list.append(k)
        index[k] = list.count
        return list.count
    }
}

extension RedisTxnStore {
    /// What a check expects of a reply: `=` and the reply's canonical form when that is at most
    /// `inlineLimit` bytes (the commit compares it as it is), else the SHA-1 (lowercase hex) of
    /// the canonical form, as `redis.sha1hex(canon(r))`.
    static func expectation(_ r: RedisReply) -> [UInt8] {
        var bytes: [UInt8] = [UInt8(ascii: "=")]
        canonical(r, into: &bytes)
        if bytes.count <= inlineLimit + 1 { return bytes }
        return RedisSHA1.hex(bytes[1...])
    }

    /// The longest canonical form a check sends as it is.
    static let inlineLimit = 256

    /// `expectation` of a GET or HGET reply: `value`, or nil for a missing one.
    package static func expectation(value: [UInt8]?) -> [UInt8] { expectation(value.map { .string($0) } ?? .null) }

    static func canonical(_ r: RedisReply, into out: inout [UInt8]) {
        switch r {
        case .null: out.append(UInt8(ascii: "N"))
        case .integer(let n):
            out.append(UInt8(ascii: "I"))
            out += Array(String(n).utf8)
        case .string(let b):
            out.append(UInt8(ascii: "S"))
            out += b
        case .status(let s):
            out.append(UInt8(ascii: "S"))
            out += Array(s.utf8)
        case .error(let e):
            out.append(UInt8(ascii: "E"))
            out += Array(e.utf8)
        case .array(let items):
            out.append(UInt8(ascii: "A"))
            out += Array("\(items.count):".utf8)
            for item in items {
                var c: [UInt8] = []
                canonical(item, into: &c)
                out += Array("\(c.count):".utf8)
                out += c
            }
        }
    }

    /// The inode an encoded entry (`>I8B`) names.
    static func entryIno(_ r: RedisReply) -> Ino? {
        guard case .string(let b) = r, b.count >= 9 else { return nil }
        var rd = ByteReader(b)
        return rd.u64()
    }
}
