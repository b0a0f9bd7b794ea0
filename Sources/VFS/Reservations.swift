import Metadata
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// Quota space this client reserved ahead of the writes it buffers, per file
/// (`MetadataEngine.reserveSpace`): a write that takes a file past what is reserved reserves
/// first, a step ahead, so that a write crossing a quota fails with `EDQUOT` from `write()`
/// itself, not at `close()` after its bytes were accepted. The reservation goes back when the
/// file's last writer here closes (or its size is set). A volume without quotas costs a cached
/// flag (`MetadataEngine.hasQuotas`).
final class Reservations: Sendable {
    /// How far ahead of a write a reservation reaches (bounded: what one client may hold of a
    /// quota that others wait for is this per file being written).
    static let step: Int64 = 4 << 20
    /// Per file, the offset up to which growth is reserved; `.max` when no quota counts it.
    private let ends = Locked<[Ino: UInt64]>([:])

    /// Before a write of `ino` ending at `end`: reserves what it grows the file by beyond what
    /// is reserved, or fails with `EDQUOT`. `size` gives the file's size (asked once per file).
    func beforeWrite(_ meta: any MetadataEngine, sid: UInt64, _ ino: Ino, end: UInt64, size: () throws(FSError) -> UInt64) throws(FSError) {
        let known = ends.withLock { $0[ino] }
        if let known, end <= known { return }
        guard try meta.hasQuotas() else { return }
        let base: UInt64
        if let known { base = known } else { base = try size() }
        if end <= base {
            ends.withLock { $0[ino] = max($0[ino] ?? 0, base) }
            return
        }
        let from = UInt64(align4K(base))
        let need = align4K(end) - Int64(from)
        var granted = need + Self.step
        do {
            if try !meta.reserveSpace(ino, sid: sid, bytes: granted) {
                ends.withLock { $0[ino] = .max }
                return
            }
        } catch {
            // The step ahead does not fit: what this write needs may.
            if error.code != EDQUOT { throw error }
            granted = need
            if try !meta.reserveSpace(ino, sid: sid, bytes: granted) {
                ends.withLock { $0[ino] = .max }
                return
            }
        }
        ends.withLock { $0[ino] = max($0[ino] ?? 0, from + UInt64(granted)) }
    }

    /// Gives back what is reserved for `ino` (its last writer here closed, or its size was set).
    func release(_ meta: any MetadataEngine, sid: UInt64, _ ino: Ino) {
        guard ends.withLock({ $0.removeValue(forKey: ino) }) != nil else { return }
        do { try meta.releaseSpace(ino, sid: sid) } catch { Log.warning("giving back quota reserved for inode \(ino): \(error.message)") }
    }
}
