import DataPath
import Metadata
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// Compaction of chunks fragmented by many small writes or overwrites: the chunk's bytes as its
/// records make them are read (whole blocks), written as one new slice, and the records
/// replaced by it in one metadata transaction that checks they did not change
/// (`compactChunk`); the old slices are released once each. Runs on its own thread for a
/// mount (chunks it was told of: `hint`), or in the caller for `stagefs gc --compact`.
package final class Compactor: @unchecked Sendable {
    // @unchecked: `queue`, `queued` and `commits` are guarded by `life.lock` (the thread waits
    // on it for work).
    private let life = ThreadLife()
    private var lock: ConditionLock { life.lock }
    private var queue: [(Ino, UInt32)] = []
    private var queued = Set<ChunkKey>()
    private let admin: any CompactAdmin
    private let meta: any MetadataEngine
    private let data: DataStore
    /// Told when a compaction released slices (a mount wakes its deleter).
    private let released: @Sendable () -> Void

    private struct ChunkKey: Hashable {
        let ino: Ino
        let index: UInt32
    }

    package init(admin: any CompactAdmin, meta: any MetadataEngine, data: DataStore, released: @escaping @Sendable () -> Void = {}) {
        self.admin = admin
        self.meta = meta
        self.data = data
        self.released = released
    }

    package func start() { life.start { [self] in run() } }

    package func stop() { life.stop { queue.removeAll() } }

    /// Slices this client committed to each chunk since it was last queued, and how many it
    /// takes to queue it (at most 10,000 chunks are counted).
    private var commits: [ChunkKey: (count: Int, next: Int)] = [:]

    /// This client committed a slice to chunk `index` of `ino`: after `compactThreshold` of them
    /// the chunk is queued; once compacted, after one more per 64 KiB of what the compaction
    /// wrote (a chunk appended to in large writes is rewritten about once per its size of new
    /// data, not every hundred appends; one of tiny appends every hundred).
    package func noteCommit(_ ino: Ino, _ index: UInt32) {
        let k = ChunkKey(ino: ino, index: index)
        let n = lock.withLock { () -> Int? in
            if commits.count > 10_000 { commits.removeAll() }
            var c = commits[k] ?? (0, compactThreshold)
            c.count += 1
            defer { commits[k] = c }
            guard c.count >= c.next else { return nil }
            let n = c.count
            c.count = 0
            return n
        }
        if let n { hint(ino, index, records: n) }
    }

    /// After a compaction that wrote `bytes`: the commits it takes to queue the chunk again.
    private func compacted(_ ino: Ino, _ index: UInt32, bytes: Int) {
        lock.withLock {
            let k = ChunkKey(ino: ino, index: index)
            commits[k] = (commits[k]?.count ?? 0, max(compactThreshold, bytes >> 16))
        }
    }

    /// A chunk seen with `records` slice records: queued when that is many (at most 1,000 wait).
    package func hint(_ ino: Ino, _ index: UInt32, records: Int) {
        guard records >= compactThreshold else { return }
        lock.withLock {
            guard !life.stopping, queue.count < 1000, queued.insert(ChunkKey(ino: ino, index: index)).inserted else { return }
            queue.append((ino, index))
            lock.broadcast()
        }
    }

    private func run() {
        while true {
            let next = lock.withLock { () -> (Ino, UInt32)? in
                while queue.isEmpty { if life.pause(seconds: 5) { return nil } }
                if life.stopping { return nil }
                let n = queue.removeFirst()
                queued.remove(ChunkKey(ino: n.0, index: n.1))
                return n
            }
            guard let (ino, index) = next else { break }
            do {
                if let (before, after) = try compact(ino, index) {
                    Log.info("compacted chunk \(index) of inode \(ino): \(before) slice records into \(after)")
                }
            } catch {
                if error.code != ENOENT { Log.warning("compacting chunk \(index) of inode \(ino): \(error.message)") }
            }
        }
    }

    /// Compacts chunk `index` of `ino` now. Returns the records before and after, or nil when
    /// there was nothing to do or the chunk changed meanwhile (then nothing changed).
    package func compact(_ ino: Ino, _ index: UInt32) throws(FSError) -> (Int, Int)? {
        let old = try meta.readChunk(ino, index)
        guard old.count >= 2 else { return nil }
        let segments = buildView(old)
        // Holes before the first data and after the last read as zeros without a record: the
        // merged slice spans the data only (a chunk cut to zero is not stored as zeros).
        let filled = segments.filter { $0.id != 0 }
        guard let first = filled.first, let last = filled.last else { return try compactHoles(ino, index, old) }
        let start = first.pos
        let length = Int(last.pos + last.len - start)
        var bytes = [UInt8](repeating: 0, count: length)
        try bytes.withUnsafeMutableBufferPointer { (b) throws(FSError) -> Void in
            try self.data.read(segments: segments, from: start, count: length, into: UnsafeMutableRawPointer(b.baseAddress!))
        }
        var merged = Slice(pos: start, id: 0, size: 0, off: 0, len: UInt32(length))
        if bytes.contains(where: { $0 != 0 }) {
            merged.id = try meta.newSliceIDs(1)
            merged.size = UInt32(length)
            try bytes.withUnsafeBufferPointer { (b) throws(FSError) -> Void in try self.data.storeSlice(merged.id, UnsafeRawBufferPointer(b)) }
        }
        guard try admin.compactChunk(ino, index, old: old, merged: merged) else {
            if merged.id != 0 { self.data.deleteObjects(merged) }
            return nil
        }
        self.data.invalidate(ino)
        compacted(ino, index, bytes: length)
        released()
        return (old.count, 1)
    }

    /// A chunk whose records hold no data (holes only): one hole record over what they cover.
    private func compactHoles(_ ino: Ino, _ index: UInt32, _ old: [Slice]) throws(FSError) -> (Int, Int)? {
        guard let start = old.map(\.pos).min(), let end = old.map({ $0.pos + $0.len }).max(), end > start else { return nil }
        guard try admin.compactChunk(ino, index, old: old, merged: Slice(pos: start, id: 0, size: 0, off: 0, len: end - start)) else { return nil }
        data.invalidate(ino)
        released()
        return (old.count, 1)
    }
}
