import StageFSCore

/// Recently used blocks in memory, bounded in bytes, least recently used dropped first.
public final class MemoryCache: @unchecked Sendable {
    private final class Node {
        let key: String
        let block: Buffer
        var prev: Node?
        var next: Node?
        init(key: String, block: Buffer) {
            self.key = key
            self.block = block
        }
    }

    private let lock = ConditionLock()
    private var map: [String: Node] = [:]
    private var head: Node?
    private var tail: Node?
    private var used = 0
    public let limit: Int

    public init(limit: Int) { self.limit = limit }

    public func get(_ key: String) -> Buffer? {
        lock.withLock {
            guard let n = map[key] else { return nil }
            unlink(n)
            pushFront(n)
            return n.block
        }
    }

    public func contains(_ key: String) -> Bool { lock.withLock { map[key] != nil } }

    public func put(_ key: String, _ block: Buffer) {
        guard limit > 0, block.count <= limit else { return }
        lock.withLock {
            if let old = map[key] {
                unlink(old)
                used -= old.block.count
            }
            let n = Node(key: key, block: block)
            map[key] = n
            pushFront(n)
            used += block.count
            while used > limit, let t = tail {
                unlink(t)
                map[t.key] = nil
                used -= t.block.count
                CacheMetrics.evictions[CacheMetrics.Level.memory.rawValue].increment()
            }
        }
    }

    public func remove(_ key: String) {
        lock.withLock {
            if let n = map.removeValue(forKey: key) {
                unlink(n)
                used -= n.block.count
            }
        }
    }

    public var bytesUsed: Int { lock.withLock { used } }

    /// Blocks held.
    public var count: Int { lock.withLock { map.count } }

    private func unlink(_ n: Node) {
        n.prev?.next = n.next
        n.next?.prev = n.prev
        if head === n { head = n.next }
        if tail === n { tail = n.prev }
        n.prev = nil
        n.next = nil
    }

    private func pushFront(_ n: Node) {
        n.next = head
        head?.prev = n
        head = n
        if tail == nil { tail = n }
    }
}
