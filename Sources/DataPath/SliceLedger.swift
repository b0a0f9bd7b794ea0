import StageFSCore

/// What the data path needs from the layer above it: the slices that make up a chunk, a place
/// to commit a slice once its blocks are stored, and slice ids. The data path knows nothing of
/// how these are kept; the VFS layer gives it the metadata engine behind this protocol.
public protocol SliceLedger: AnyObject, Sendable {
    /// The slice records of chunk `index` of `ino`, oldest first.
    func readChunk(_ ino: Ino, _ index: UInt32) throws(FSError) -> [Slice]
    /// Records a slice whose blocks are stored; the file grows to at least `minSize`.
    func writeSlice(_ ino: Ino, _ index: UInt32, _ slice: Slice, minSize: UInt64, mtime: Timespec) throws(FSError)
    /// Reserves `count` consecutive slice ids; returns the first.
    func newSliceIDs(_ count: Int) throws(FSError) -> UInt64
}
