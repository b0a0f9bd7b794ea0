import Metadata
import StageFSCore

/// Inodes known to have no extended attribute at all (created by this client, or listed with
/// their attributes lately) or no `security.capability` (asked about lately), each until a
/// deadline: the attribute cache's timeout, so another client's change shows as late as a
/// change of its attributes would. The kernel asks for `security.capability` before every
/// write to a file (to drop it), and `ls -l` asks for `security.selinux` of every file it
/// lists; a `security.` name is readable by anyone (no permission decides the answer), so
/// such a question about an inode known to have none is answered here, without a round trip.
/// `epoch` counts this client's extended-attribute changes: an answer read while one was
/// under way is not kept.
final class XattrAbsence: Sendable {
    private struct Known {
        var deadline: UInt64
        /// No attribute at all (else: no `security.capability`).
        var all: Bool
    }

    private let ttl: UInt64
    private let state = Locked<(known: [Ino: Known], epoch: UInt64)>(([:], 0))
    static let capability = Array("security.capability".utf8)
    private static let security = Array("security.".utf8)

    /// `ttl`: nanoseconds an absence is remembered (0: never).
    init(ttl: UInt64) { self.ttl = ttl }

    /// Whether the answer for `name` can come from here: a `security.` name (anyone may read
    /// one; it has something after the prefix and is not too long, else the engine refuses it).
    static func answerable(_ name: [UInt8]) -> Bool {
        name.count > security.count && name.count <= 255 && name.starts(with: security)
    }

    /// The epoch to pass to `absent` for an answer read from now.
    var epoch: UInt64 { state.withLock { $0.epoch } }

    /// Notes that `ino` has no attribute (`all`), or no `security.capability`, unless an
    /// extended-attribute change of this client began since `epoch`.
    func absent(_ ino: Ino, all: Bool, ifUnchangedSince epoch: UInt64? = nil) {
        guard ttl > 0 else { return }
        let now = Sys.monotonicNanos()
        state.withLock {
            if let epoch, $0.epoch != epoch { return }
            if $0.known.count > 100_000 { $0.known.removeAll(keepingCapacity: true) }
            let before = $0.known[ino]
            $0.known[ino] = Known(deadline: now + ttl, all: all || (before.map { $0.all && $0.deadline >= now } ?? false))
        }
    }

    /// Whether `ino` is known to have no attribute `name` (nil: none at all).
    func isAbsent(_ ino: Ino, _ name: [UInt8]?) -> Bool {
        let now = Sys.monotonicNanos()
        return state.withLock { (c) -> Bool in
            guard let k = c.known[ino] else { return false }
            if k.deadline < now {
                c.known[ino] = nil
                return false
            }
            return k.all || name == Self.capability
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
