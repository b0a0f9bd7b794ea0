import DataPath
import Metadata
import StageFSCore

/// The metadata engine as the data path's `SliceLedger`: the VFS layer connects the two, so the
/// data path never depends on metadata.
public final class MetadataLedger: SliceLedger {
    public let meta: any MetadataEngine
    /// The session commits are made in (what it reserved of quotas they use): set by the VFS.
    private let session = Locked<(@Sendable () -> UInt64)?>(nil)

    /// Told of each commit (a compactor counts them per chunk).
    private let committed = Locked<(@Sendable (Ino, UInt32) -> Void)?>(nil)

    public init(_ meta: any MetadataEngine) { self.meta = meta }

    func onCommit(_ f: @escaping @Sendable (Ino, UInt32) -> Void) { committed.withLock { $0 = f } }

    /// Says which session commits are made in.
    func bind(session sid: @escaping @Sendable () -> UInt64) { session.withLock { $0 = sid } }

    public func readChunk(_ ino: Ino, _ index: UInt32) throws(FSError) -> [Slice] { try meta.readChunk(ino, index) }

    public func writeSlice(_ ino: Ino, _ index: UInt32, _ slice: Slice, minSize: UInt64, mtime: Timespec) throws(FSError) {
        let sid = session.withLock { $0 }?() ?? 0
        _ = try meta.writeSlice(ino, index, slice, minSize: minSize, mtime: mtime, sid: sid)
        committed.withLock { $0 }?(ino, index)
    }

    public func newSliceIDs(_ count: Int) throws(FSError) -> UInt64 { try meta.newSliceIDs(count) }
}
