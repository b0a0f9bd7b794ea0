import Metadata
import StageFSCore

/// The inodes the kernel holds: how many lookups it holds of each (FUSE's nlookup: each entry
/// reply adds one, FORGET takes them away), and the ghosts: inodes whose last name went while
/// the kernel still held them and no session had them open (a FIFO or device node open in some
/// process, a directory that is someone's working directory). A ghost's attributes stay here
/// until the kernel forgets it, so fstat, fchmod and futimens on it work as on ext4. Nothing
/// else can reach them: they have no name.
final class KernelInodes: Sendable {
    /// `unnamed`: files whose last name this client removed while they stayed (in the trash,
    /// or open elsewhere): the kernel may still ask for them (an `O_PATH` descriptor), and they
    /// answer, as on ext4, until it forgets them.
    private let state = Locked<(refs: [Ino: UInt64], ghosts: [Ino: Attr], unnamed: Set<Ino>)>(([:], [:], []))

    /// The kernel took a reference to `ino` (an entry reply it accepted).
    func remember(_ ino: Ino) { state.withLock { $0.refs[ino, default: 0] += 1 } }

    /// FORGET: the kernel dropped `count` references to `ino`.
    func forget(_ ino: Ino, _ count: UInt64) {
        state.withLock { s in
            guard let n = s.refs[ino] else { return }
            if n <= count {
                s.refs[ino] = nil
                s.ghosts[ino] = nil
                s.unnamed.remove(ino)
            } else {
                s.refs[ino] = n - count
            }
        }
    }

    /// Keeps the attributes of an inode that lost its last name while the kernel holds it (or,
    /// when it stays, that this client removed that name).
    func bury(_ r: RemovedName?) {
        guard let r, r.attr.nlink == 0 else { return }
        state.withLock { s in
            guard s.refs[r.ino] != nil else { return }
            if r.freed { s.ghosts[r.ino] = r.attr } else { s.unnamed.insert(r.ino) }
        }
    }

    /// Whether this client removed the last name of `ino` while the kernel held it.
    func unnamedHere(_ ino: Ino) -> Bool { state.withLock { $0.unnamed.contains(ino) } }

    func ghost(_ ino: Ino) -> Attr? { state.withLock { $0.ghosts[ino] } }

    /// setattr on a ghost: the same rules, applied here (no size: it has no data and no name).
    func setattr(_ cred: Credential, _ ino: Ino, _ req: SetAttrRequest) throws(FSError) -> Attr {
        guard var a = ghost(ino) else { throw FSError.notFound }
        if req.mask.contains(.size) { throw FSError.notFound }
        let before = a
        let now = Timespec.now()
        let touch = try SetAttrRules.apply(req, to: &a, cred, now: now)
        SetAttrRules.finish(req, &a, before, cred, now: now, touch: touch)
        let updated = a
        state.withLock { s in if s.ghosts[ino] != nil { s.ghosts[ino] = updated } }
        return a
    }
}
