import StageFSCore

/// Recently used blocks in memory, bounded in bytes, least recently used dropped first. Blocks
/// fetched ahead of a reader are counted until first read or dropped (`aheadBytes`), so read-
/// ahead never takes more of the cache than it is given and evicts blocks not yet read.
public final class MemoryCache: @unchecked Sendable {
    // (@unchecked: every var is guarded by `lock`.)
    private final class Node {
        let key: String
        let block: Buffer
        /// Put by read-ahead and not read since.
        var ahead = false
        /// When it was put (monotonic nanoseconds).
        var at: UInt64 = 0
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
    private var ahead = 0
    private var lastExpiry: UInt64 = 0
    public let limit: Int

    public init(limit: Int) { self.limit = limit }

    public func get(_ key: String) -> Buffer? {
        lock.withLock {
            guard let n = map[key] else { return nil }
            if n.ahead {
                n.ahead = false
                ahead -= n.block.count
            }
            unlink(n)
            pushFront(n)
            return n.block
        }
    }

    public func contains(_ key: String) -> Bool { lock.withLock { map[key] != nil } }

    /// Keeps `block`; `ahead`: fetched ahead of a reader, not read yet.
    public func put(_ key: String, _ block: Buffer, ahead isAhead: Bool = false) {
        guard limit > 0, block.count <= limit else { return }
        lock.withLock {
            if let old = map[key] { drop(old) }
            let n = Node(key: key, block: block)
            n.ahead = isAhead
            if isAhead {
                ahead += block.count
                n.at = Sys.monotonicNanos()
            }
            map[key] = n
            pushFront(n)
            used += block.count
            while used > limit, let t = tail {
                drop(t)
                CacheMetrics.evictions[CacheMetrics.Level.memory.rawValue].increment()
            }
        }
    }

    public func remove(_ key: String) {
        lock.withLock {
            if let n = map[key] { drop(n) }
        }
    }

    public var bytesUsed: Int { lock.withLock { used } }

    /// Bytes of blocks fetched ahead and not read yet.
    public var aheadBytes: Int { lock.withLock { ahead } }

    /// Stops counting as read ahead the blocks put more than `nanos` ago and never read (their
    /// reader stopped or went elsewhere); they stay cached. (A walk of the whole cache, so at
    /// most once a second.)
    public func expireAhead(olderThan nanos: UInt64) {
        let now = Sys.monotonicNanos()
        lock.withLock {
            if lastExpiry != 0 && now &- lastExpiry < 1_000_000_000 { return }
            lastExpiry = now
            var n = tail
            while let node = n {
                if node.ahead && now &- node.at > nanos {
                    node.ahead = false
                    ahead -= node.block.count
                }
                n = node.prev
            }
        }
    }

    private func drop(_ n: Node) {
        unlink(n)
        map[n.key] = nil
        used -= n.block.count
        if n.ahead { ahead -= n.block.count }
    }

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
