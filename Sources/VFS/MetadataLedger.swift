import DataPath
import Metadata
import StageFSCore

/// The metadata engine as the data path's `SliceLedger`: the VFS layer connects the two, so the
/// data path never depends on metadata.
public final class MetadataLedger: SliceLedger {
    public let meta: any MetadataEngine

    public init(_ meta: any MetadataEngine) { self.meta = meta }

    public func readChunk(_ ino: Ino, _ index: UInt32) throws(FSError) -> [Slice] { try meta.readChunk(ino, index) }

    public func writeSlice(_ ino: Ino, _ index: UInt32, _ slice: Slice, minSize: UInt64, mtime: Timespec) throws(FSError) {
        _ = try meta.writeSlice(ino, index, slice, minSize: minSize, mtime: mtime)
    }

    public func newSliceIDs(_ count: Int) throws(FSError) -> UInt64 { try meta.newSliceIDs(count) }
}
