import StageFSCore

/// Attributes and directory entries remembered for a few seconds (`--attr-cache`,
/// `--entry-cache`, `--dir-entry-cache`), so repeated lookups and stats — `import numpy` walks
/// the same directories again and again — need no metadata round trip. Local changes update or
/// drop what they touch; other clients' changes show after the TTL (close-to-open still holds:
/// open always asks the metadata engine).
final class MetaCache: @unchecked Sendable {
    private struct EntryKey: Hashable {
        var parent: Ino
        var name: [UInt8]
    }

    let attrTTL: UInt64
    let entryTTL: UInt64
    let dirEntryTTL: UInt64
    private let lock = ConditionLock()
    private var attrs: [Ino: (Attr, UInt64)] = [:]
    private var entries: [EntryKey: (Ino, UInt64)] = [:]
    private static let limit = 200_000

    init(attrTTL: Double, entryTTL: Double, dirEntryTTL: Double) {
        self.attrTTL = UInt64(max(0, attrTTL) * 1e9)
        self.entryTTL = UInt64(max(0, entryTTL) * 1e9)
        self.dirEntryTTL = UInt64(max(0, dirEntryTTL) * 1e9)
    }

    var enabled: Bool { attrTTL > 0 }

    func attr(_ ino: Ino) -> Attr? {
        guard attrTTL > 0 else { return nil }
        let now = Sys.monotonicNanos()
        return lock.withLock {
            guard let (a, deadline) = attrs[ino] else { return nil }
            if deadline < now {
                attrs[ino] = nil
                return nil
            }
            return a
        }
    }

    func put(_ ino: Ino, _ a: Attr) {
        guard attrTTL > 0 else { return }
        let deadline = Sys.monotonicNanos() + attrTTL
        lock.withLock {
            if attrs.count > MetaCache.limit { attrs.removeAll(keepingCapacity: true) }
            attrs[ino] = (a, deadline)
        }
    }

    func drop(_ inos: Ino...) {
        lock.withLock { for i in inos { attrs[i] = nil } }
    }

    func entry(_ parent: Ino, _ name: [UInt8]) -> Ino? {
        guard entryTTL > 0 || dirEntryTTL > 0 else { return nil }
        let now = Sys.monotonicNanos()
        let k = EntryKey(parent: parent, name: name)
        return lock.withLock {
            guard let (ino, deadline) = entries[k] else { return nil }
            if deadline < now {
                entries[k] = nil
                return nil
            }
            return ino
        }
    }

    func putEntry(_ parent: Ino, _ name: [UInt8], _ ino: Ino, _ a: Attr) {
        let ttl = a.type == .directory ? dirEntryTTL : entryTTL
        put(ino, a)
        guard ttl > 0 else { return }
        let deadline = Sys.monotonicNanos() + ttl
        lock.withLock {
            if entries.count > MetaCache.limit { entries.removeAll(keepingCapacity: true) }
            entries[EntryKey(parent: parent, name: name)] = (ino, deadline)
        }
    }

    func dropEntry(_ parent: Ino, _ name: [UInt8]) {
        lock.withLock { entries[EntryKey(parent: parent, name: name)] = nil }
    }
}
