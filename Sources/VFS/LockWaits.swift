import StageFSCore

/// Threads of this client waiting for a lock (`F_SETLKW`, `flock` without `LOCK_NB`), woken
/// the moment this client lets a lock of the same inode go, instead of at their next poll.
/// An inode has an entry only while someone waits on it.
///
/// `@unchecked Sendable`: `inodes` is read and written under `lock` only.
final class LockWaits: @unchecked Sendable {
    private let lock = ConditionLock()
    private var inodes: [Ino: (releases: UInt64, waiters: Int)] = [:]

    /// A waiter of `ino` arrives (pair with `leave`).
    func enter(_ ino: Ino) {
        lock.withLock { inodes[ino, default: (0, 0)].waiters += 1 }
    }

    func leave(_ ino: Ino) {
        lock.withLock {
            guard var e = inodes[ino] else { return }
            e.waiters -= 1
            inodes[ino] = e.waiters > 0 ? e : nil
        }
    }

    /// How many times a lock of `ino` was let go while someone waited (read before an attempt).
    func releases(_ ino: Ino) -> UInt64 { lock.withLock { inodes[ino]?.releases ?? 0 } }

    /// Waits up to `seconds`, returning early once a lock of `ino` is let go after `seen`.
    func wait(_ ino: Ino, after seen: UInt64, seconds: Double) {
        let deadline = Sys.monotonicNanos() + UInt64(seconds * 1e9)
        lock.withLock {
            while (inodes[ino]?.releases ?? 0) == seen {
                let now = Sys.monotonicNanos()
                if now >= deadline { return }
                _ = lock.wait(seconds: Double(deadline - now) / 1e9)
            }
        }
    }

    /// A lock of `ino` was let go (or made shared) by this client.
    func released(_ ino: Ino) {
        lock.withLock {
            guard inodes[ino] != nil else { return }
            inodes[ino]!.releases &+= 1
            lock.broadcast()
        }
    }
}
