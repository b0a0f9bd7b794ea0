import Metadata
import StageFSCore

/// Inodes known to have no `security.capability`, each until a deadline (the attribute cache's
/// timeout): created by this client, or asked about lately. The kernel asks for it before
/// every write to a file (to drop it), so its absence is remembered like an attribute (no
/// permission decides it). `epoch` counts this client's extended-attribute changes: an answer
/// read while one was under way is not kept.
final class Capabilities: Sendable {
    private let ttl: UInt64
    private let state = Locked<(known: [Ino: UInt64], epoch: UInt64)>(([:], 0))
    static let name = Array("security.capability".utf8)

    /// `ttl`: nanoseconds an absence is remembered (0: never).
    init(ttl: UInt64) { self.ttl = ttl }

    /// The epoch to pass to `absent(_:ifUnchangedSince:)` for an answer read from now.
    var epoch: UInt64 { state.withLock { $0.epoch } }

    /// Notes that `ino` has none (unless an extended-attribute change began since `epoch`).
    func absent(_ ino: Ino, ifUnchangedSince epoch: UInt64? = nil) {
        guard ttl > 0 else { return }
        let deadline = Sys.monotonicNanos() + ttl
        state.withLock {
            if let epoch, $0.epoch != epoch { return }
            if $0.known.count > 100_000 { $0.known.removeAll(keepingCapacity: true) }
            $0.known[ino] = deadline
        }
    }

    func isAbsent(_ ino: Ino) -> Bool {
        let now = Sys.monotonicNanos()
        return state.withLock { (c) -> Bool in
            guard let d = c.known[ino] else { return false }
            if d < now { c.known[ino] = nil }
            return d >= now
        }
    }

    /// Called before and after each extended-attribute change of this client.
    func forget(_ ino: Ino) {
        state.withLock {
            $0.known[ino] = nil
            $0.epoch &+= 1
        }
    }
}
