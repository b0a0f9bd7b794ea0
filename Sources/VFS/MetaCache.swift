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
final class MetaCache: @unchecked Sendable {
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
    private var entries: [EntryKey: (Ino, UInt64)] = [:]
    private static let limit = 200_000

    init(
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

    func attr(_ ino: Ino) -> Attr? {
        guard attrTTL > 0 else { return nil }
        let now = Sys.monotonicNanos()
        let last = changed(ino)
        return lock.withLock {
            // (An expired record stays until overwritten or the cache starts over: removing
            // a key from a large dictionary moves its neighbours and cost more than the lookup.)
            guard let e = attrs[ino], e.deadline >= now, e.asOf >= last else { return nil }
            return e.0
        }
    }

    /// Remembers `a`, read from metadata after `stamp()` returned `asOf`.
    func put(_ ino: Ino, _ a: Attr, asOf: UInt64) {
        guard attrTTL > 0 else { return }
        let deadline = Sys.monotonicNanos() + attrTTL
        lock.withLock {
            if attrs.count > MetaCache.limit { attrs.removeAll(keepingCapacity: true) }
            attrs[ino] = (a, deadline, asOf)
        }
    }

    func drop(_ inos: Ino...) {
        lock.withLock { for i in inos { attrs[i]?.deadline = 0 } }
    }

    func entry(_ parent: Ino, _ name: [UInt8]) -> Ino? {
        guard entryTTL > 0 || dirEntryTTL > 0 else { return nil }
        let now = Sys.monotonicNanos()
        let k = EntryKey(parent: parent, name: name)
        return lock.withLock {
            guard let (ino, deadline) = entries[k], deadline >= now else { return nil }
            return ino
        }
    }

    func putEntry(_ parent: Ino, _ name: [UInt8], _ ino: Ino, _ a: Attr, asOf: UInt64) {
        let ttl = a.type == .directory ? dirEntryTTL : entryTTL
        put(ino, a, asOf: asOf)
        guard ttl > 0 else { return }
        let deadline = Sys.monotonicNanos() + ttl
        lock.withLock {
            if entries.count > MetaCache.limit { entries.removeAll(keepingCapacity: true) }
            entries[EntryKey(parent: parent, name: name)] = (ino, deadline)
        }
    }

    /// Changes of a directory by this client now under way, and how many began (see
    /// `beginChange`).
    private var changing: [Ino: (inFlight: Int, began: UInt64)] = [:]

    /// A change of directory `dir` by this client begins (an entry is added or removed).
    /// Returns what `endChange` needs.
    func beginChange(_ dir: Ino) -> (began: UInt64, alone: Bool) {
        lock.withLock {
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
        lock.withLock { entries[EntryKey(parent: parent, name: name)]?.1 = 0 }
    }
}
