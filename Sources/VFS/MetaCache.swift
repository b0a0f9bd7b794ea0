import StageFSCore

/// Attributes and directory entries remembered for a few seconds (`--attr-cache`,
/// `--entry-cache`, `--dir-entry-cache`), so repeated lookups and stats — `import numpy` walks
/// the same directories again and again — need no metadata round trip. Local changes update or
/// drop what they touch; other clients' changes show after the TTL (close-to-open still holds:
/// open always asks the metadata engine).
///
/// Attributes are stamped with the data store's change clock as it was before they were read:
/// once this client commits writes to (or otherwise changes the data of) an inode after that,
/// its cached attributes are stale and not used.
package final class MetaCache: @unchecked Sendable {
    private struct EntryKey: Hashable {
        var parent: Ino
        var name: [UInt8]

        // The name hashed as one byte string (an array of bytes hashes byte by byte).
        func hash(into h: inout Hasher) {
            h.combine(parent)
            name.withUnsafeBytes { h.combine(bytes: $0) }
        }
    }

    let attrTTL: UInt64
    let entryTTL: UInt64
    let dirEntryTTL: UInt64
    private let lock = ConditionLock()
    private var attrs: [Ino: (Attr, deadline: UInt64, asOf: UInt64)] = [:]
    /// The data store's change clock, and the clock value of an inode's last data change.
    private let clock: @Sendable () -> UInt64
    private let changed: @Sendable (Ino) -> UInt64
    /// Each entry's inode, deadline, and position in its directory when a listing gave it (0
    /// when a lookup did).
    private var entries: [EntryKey: (Ino, UInt64, position: UInt64)] = [:]
    private static let limit = 200_000
    /// Sizes at which the expired records are next swept out of `attrs` and `entries`.
    private var attrSweep = MetaCache.firstSweep
    private var entrySweep = MetaCache.firstSweep
    private static let firstSweep = 4096

    package init(
        attrTTL: Double, entryTTL: Double, dirEntryTTL: Double, clock: @escaping @Sendable () -> UInt64,
        changed: @escaping @Sendable (Ino) -> UInt64
    ) {
        self.clock = clock
        self.changed = changed
        self.attrTTL = UInt64(max(0, attrTTL) * 1e9)
        self.entryTTL = UInt64(max(0, entryTTL) * 1e9)
        self.dirEntryTTL = UInt64(max(0, dirEntryTTL) * 1e9)
    }

    var enabled: Bool { attrTTL > 0 }

    /// The stamp to pass to `put` for attributes about to be read from metadata.
    func stamp() -> UInt64 { clock() }

    package func attr(_ ino: Ino) -> Attr? {
        guard attrTTL > 0 else { return nil }
        let now = Sys.monotonicNanos()
        let last = changed(ino)
        return lock.withLock {
            // (An expired record stays until overwritten or swept out by `put`: removing one
            // key from a large dictionary moves its neighbours and cost more than the lookup.)
            guard let e = attrs[ino], e.deadline >= now, e.asOf >= last else { return nil }
            return e.0
        }
    }

    /// Remembers `a`, read from metadata after `stamp()` returned `asOf`.
    package func put(_ ino: Ino, _ a: Attr, asOf: UInt64) {
        guard attrTTL > 0 else { return }
        let now = Sys.monotonicNanos()
        let deadline = now + attrTTL
        lock.withLock {
            if attrs.count >= attrSweep { attrSweep = Self.sweep(&attrs, now) { $0.deadline } }
            attrs[ino] = (a, deadline, asOf)
        }
    }

    func drop(_ inos: Ino...) {
        lock.withLock {
            for i in inos { attrs[i]?.deadline = 0 }
            _changes &+= 1
        }
    }

    /// How many times this client changed metadata (each `drop`, `dropEntry`, `beginChange`,
    /// `endChange` and `noteChange` counts): what was read from the engine while it stood
    /// still is as good as what the cache holds (`DirReadahead`).
    var changes: UInt64 { lock.withLock { _changes } }
    private var _changes: UInt64 = 0

    /// This client changed the attributes of an inode (and `put` the new ones).
    func noteChange() { lock.withLock { _changes &+= 1 } }

    package func entry(_ parent: Ino, _ name: [UInt8]) -> Ino? {
        guard entryTTL > 0 || dirEntryTTL > 0 else { return nil }
        let now = Sys.monotonicNanos()
        let k = EntryKey(parent: parent, name: name)
        return lock.withLock {
            guard let (ino, deadline, _) = entries[k], deadline >= now else { return nil }
            return ino
        }
    }

    /// The position of `name` in `parent` as the last listing of it here gave it, expired or
    /// not, while the record is kept (`VFS.lookup` reads on from there in one go).
    func listedPosition(_ parent: Ino, _ name: [UInt8]) -> UInt64? {
        guard entryTTL > 0 || dirEntryTTL > 0 else { return nil }
        let k = EntryKey(parent: parent, name: name)
        return lock.withLock {
            guard let p = entries[k]?.position, p > 0 else { return nil }
            return p
        }
    }

    /// Forgets where a listing put `name` in `parent` (it was not found there).
    func forgetPosition(_ parent: Ino, _ name: [UInt8]) {
        let k = EntryKey(parent: parent, name: name)
        lock.withLock {
            if let e = entries[k], e.position != 0 { entries[k] = (e.0, e.1, 0) }
        }
    }

    /// `position`: the entry's position in `parent`, when a listing gave it.
    package func putEntry(_ parent: Ino, _ name: [UInt8], _ ino: Ino, _ a: Attr, asOf: UInt64, position: UInt64 = 0) {
        let ttl = a.type == .directory ? dirEntryTTL : entryTTL
        put(ino, a, asOf: asOf)
        guard ttl > 0 else { return }
        let now = Sys.monotonicNanos()
        let deadline = now + ttl
        lock.withLock {
            if entries.count >= entrySweep { entrySweep = Self.sweep(&entries, now) { $0.1 } }
            entries[EntryKey(parent: parent, name: name)] = (ino, deadline, position)
        }
    }

    /// How many records the tables hold, expired ones included (for tests).
    package var sizes: (attrs: Int, entries: Int) { lock.withLock { (attrs.count, entries.count) } }

    /// Keeps the records of `table` still valid at `now`, in a table of their size (without
    /// sweeps, expired and dropped records piled up across a long run, and a large table makes
    /// every access a cache miss); none when more than half of `limit` are. Returns the size
    /// for the next sweep: twice what stayed (at most `limit`), so the work is a constant per
    /// record put.
    private static func sweep<K, V>(_ table: inout [K: V], _ now: UInt64, deadline: (V) -> UInt64) -> Int {
        table = table.filter { deadline($0.value) >= now }
        if table.count > limit / 2 { table = [:] }
        return min(limit, max(firstSweep, 2 * table.count))
    }

    /// Changes of a directory by this client now under way, and how many began (see
    /// `beginChange`).
    private var changing: [Ino: (inFlight: Int, began: UInt64)] = [:]

    /// A change of directory `dir` by this client begins (an entry is added or removed).
    /// Returns what `endChange` needs.
    func beginChange(_ dir: Ino) -> (began: UInt64, alone: Bool) {
        lock.withLock {
            _changes &+= 1
            var e = changing[dir] ?? (0, 0)
            let alone = e.inFlight == 0
            e.inFlight += 1
            e.began &+= 1
            changing[dir] = e
            return (e.began, alone)
        }
    }

    /// The change ended; `after` is the directory's attributes as its commit left them (nil:
    /// not known, or it failed). They are kept only when no other change of the directory by
    /// this client overlapped this one (then they are the newest this client made); otherwise
    /// the directory's attributes are forgotten and read again.
    func endChange(_ dir: Ino, _ token: (began: UInt64, alone: Bool), after: Attr?) {
        let deadline = Sys.monotonicNanos() + attrTTL
        let asOf = clock()
        lock.withLock {
            _changes &+= 1
            guard var e = changing[dir] else { return }
            e.inFlight -= 1
            let overlapped = !token.alone || e.began != token.began
            changing[dir] = e.inFlight == 0 ? nil : e
            if let after, !overlapped, attrTTL > 0 {
                attrs[dir] = (after, deadline, asOf)
            } else {
                attrs[dir]?.deadline = 0
            }
        }
    }

    func dropEntry(_ parent: Ino, _ name: [UInt8]) {
        lock.withLock {
            let k = EntryKey(parent: parent, name: name)
            if let e = entries[k] { entries[k] = (e.0, 0, 0) }
            _changes &+= 1
        }
    }
}
