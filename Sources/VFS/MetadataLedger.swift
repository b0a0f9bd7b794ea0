import DataPath
import Metadata
import StageFSCore

/// The metadata engine as the data path's `SliceLedger`: the VFS layer connects the two, so the
/// data path never depends on metadata.
public final class MetadataLedger: SliceLedger {
    public let meta: any MetadataEngine
    /// The session commits are made in (what it reserved of quotas they use): set by the VFS.
    private let session = Hook<@Sendable () -> UInt64>()

    /// Told of each commit (a compactor counts them per chunk).
    private let committed = Hook<@Sendable (Ino, UInt32) -> Void>()

    public init(_ meta: any MetadataEngine) { self.meta = meta }

    func onCommit(_ f: @escaping @Sendable (Ino, UInt32) -> Void) { committed.set(f) }

    /// Says which session commits are made in.
    func bind(session sid: @escaping @Sendable () -> UInt64) { session.set(sid) }

    public func readChunk(_ ino: Ino, _ index: UInt32) throws(FSError) -> [Slice] { try meta.readChunk(ino, index) }

    public func writeSlice(_ ino: Ino, _ index: UInt32, _ slice: Slice, minSize: UInt64, mtime: Timespec) throws(FSError) {
        let sid = session.current?() ?? 0
        _ = try meta.writeSlice(ino, index, slice, minSize: minSize, mtime: mtime, sid: sid)
        committed.current?(ino, index)
    }

    public func newSliceIDs(_ count: Int) throws(FSError) -> UInt64 { try meta.newSliceIDs(count) }
}
