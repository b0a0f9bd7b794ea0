import Compress
import ObjectStorage
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// Tunables of the data path.
public struct DataConfig: Sendable {
    /// Bytes of written data buffered before writers wait (back-pressure).
    public var bufferSize = 300 << 20
    /// Bytes of blocks kept in memory for reads.
    public var memoryCacheSize = 64 << 20
    public var uploadThreads = 20
    public var downloadThreads = 20
    /// Blocks fetched ahead of a sequential reader, at most.
    public var readAheadBlocks = 8
    /// Seconds after which buffered writes are committed even without close/fsync.
    public var flushAge = 5.0
    /// Whether full blocks written are kept in the disk cache too (smaller ones always are).
    public var cacheLargeWrites = false

    public init() {}
}

/// Cached view of a chunk: its segments, and the slices it was built from.
struct ChunkView {
    var segments: [Segment]
}

/// The data path of one client: write buffers, uploads, reads with read-ahead, the memory block
/// cache, and deletion of objects that metadata no longer references.
public final class DataStore: @unchecked Sendable {
    /// Chunk records, slice commits and ids, from the layer above.
    public let ledger: any SliceLedger
    public let store: any ObjectStore
    public let layout: Layout
    public let config: DataConfig
    let budget: ByteBudget
    let uploads: WorkerPool
    let background: WorkerPool
    /// The volume's blocks: keys, codec, the memory and disk caches, the store.
    public let blocks: BlockStore
    /// The node-local block cache, if configured.
    public var disk: DiskCache? { blocks.disk }
    let ids: SliceIDs
    /// Blocks waiting for or in upload (`uploadQueue`).
    let queue = UploadQueue()
    private let lock = ConditionLock()
    private var writers: [Ino: FileWriter] = [:]
    private var views: [Ino: [UInt32: ChunkView]] = [:]
    /// Change counter per inode (bumped by `invalidate`), so open files know when to refresh.
    private var changes: [Ino: UInt64] = [:]
    private var changeClock: UInt64 = 0
    private var changesFloor: UInt64 = 0

    public init(ledger: any SliceLedger, store: any ObjectStore, format: VolumeFormat, config: DataConfig = DataConfig(), disk: DiskCache? = nil) {
        self.ledger = ledger
        self.store = store
        self.config = config
        layout = Layout(volume: format.name, blockSize: format.blockSize)
        budget = ByteBudget(limit: config.bufferSize)
        uploads = WorkerPool(name: "upload", threads: config.uploadThreads)
        background = WorkerPool(name: "background", threads: 2)
        // (`requireFormat` refused a codec this build does not know.)
        blocks = BlockStore(
            layout: layout, codec: BlockCodec(rawValue: format.compressionName) ?? .none, store: store,
            memory: MemoryCache(limit: config.memoryCacheSize), disk: disk, threads: config.downloadThreads)
        ids = SliceIDs(ledger: ledger)
    }

    // MARK: writers

    /// The writer of `ino`, created on first use; pair with `releaseWriter`.
    public func openWriter(_ ino: Ino) -> FileWriter {
        lock.withLock {
            let w = writers[ino] ?? FileWriter(ino: ino, data: self)
            writers[ino] = w
            w.refs += 1
            return w
        }
    }

    /// The writer of `ino` if this client has buffered writes or open writers for it.
    public func writer(_ ino: Ino) -> FileWriter? { lock.withLock { writers[ino] } }

    /// Drops one user of a writer (after flushing it).
    public func releaseWriter(_ w: FileWriter) {
        lock.withLock {
            w.refs -= 1
            if w.refs <= 0 && !w.hasPending && writers[w.ino] === w { writers[w.ino] = nil }
        }
    }

    /// Flushes the buffered writes of `ino`, if any.
    public func flush(_ ino: Ino) throws(FSError) {
        if let w = writer(ino) { try w.flush() }
    }

    /// Flushes every writer, and the store (unmount, SIGTERM).
    public func flushAll() throws(FSError) {
        let all = lock.withLock { Array(writers.values) }
        var first: FSError?
        for w in all {
            do { try w.flush() } catch { first = first ?? error }
        }
        do { try store.sync() } catch { first = first ?? error }
        if let first { throw first }
    }

    /// Commits writes older than `flushAge` (called periodically) and, when the write buffer is
    /// nearly full, everything, so writers waiting for buffer space go on.
    public func flushIdle() {
        disk?.flushIndexIfStale()
        do { try store.sync() } catch { Log.error("flushing blocks to \(store.description): \(error.message)") }
        let all = lock.withLock { Array(writers.values) }
        let pressure = budget.inUse > budget.limit * 3 / 4
        for w in all where pressure || w.oldestAge > config.flushAge {
            w.freezeAll()
            background.submit { try? w.flush() }
        }
    }

    // MARK: reads

    /// Forgets cached chunk views of `ino` (after a commit, a truncate, or on open).
    public func invalidate(_ ino: Ino) {
        lock.withLock {
            _ = views.removeValue(forKey: ino)
            changeClock += 1
            if changes.count > 100_000 {
                changes.removeAll()
                changesFloor = changeClock
            }
            changes[ino] = changeClock
        }
    }

    /// Records chunk `index` of `ino` as read with its metadata (after `invalidate`).
    public func prime(_ ino: Ino, _ index: UInt32, _ slices: [Slice]) {
        let v = ChunkView(segments: buildView(slices))
        lock.withLock { views[ino, default: [:]][index] = v }
    }

    /// A number that grows whenever this client changes `ino` or reopens it.
    /// The change clock now: every later `invalidate` gives its inode a higher stamp.
    public var changeClockNow: UInt64 { lock.withLock { changeClock } }

    public func changeStamp(_ ino: Ino) -> UInt64 {
        lock.withLock { max(changes[ino] ?? 0, changesFloor) }
    }

    /// Told of every chunk whose records this client reads, with their number (a compactor's
    /// hint: many records make slow reads).
    private let fragmentWatch = Hook<@Sendable (Ino, UInt32, Int) -> Void>()

    public func watchFragments(_ f: @escaping @Sendable (Ino, UInt32, Int) -> Void) { fragmentWatch.set(f) }

    private func view(_ ino: Ino, _ index: UInt32) throws(FSError) -> ChunkView {
        if let v = lock.withLock({ views[ino]?[index] }) { return v }
        let records = try ledger.readChunk(ino, index)
        if records.count > 1, let watch = fragmentWatch.current { watch(ino, index, records.count) }
        let v = ChunkView(segments: buildView(records))
        lock.withLock {
            if views.count > 10_000 { views.removeAll() }
            views[ino, default: [:]][index] = v
        }
        return v
    }

    /// One piece of a read: `len` bytes from offset `off` of a block to `dest`.
    private struct Piece: @unchecked Sendable {
        var block: Block
        var off: Int
        var len: Int
        var dest: UnsafeMutableRawPointer
    }

    /// Reads `buffer.count` bytes at `offset` of a file of `fileSize` bytes; returns bytes read.
    /// `hint` carries a reader's sequential-read state between calls.
    public func read(
        _ ino: Ino, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, fileSize: UInt64, hint: ReadAhead? = nil
    ) throws(FSError) -> Int {
        do {
            return try readOnce(ino, at: offset, into: buffer, fileSize: fileSize, hint: hint)
        } catch {
            // A block gone under a view kept here: another client compacted or cut the file
            // since. Read its records again once.
            guard error.code == EIO else { throw error }
            invalidate(ino)
            return try readOnce(ino, at: offset, into: buffer, fileSize: fileSize, hint: hint)
        }
    }

    private func readOnce(
        _ ino: Ino, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, fileSize: UInt64, hint: ReadAhead?
    ) throws(FSError) -> Int {
        if offset >= fileSize || buffer.count == 0 { return 0 }
        let total = Int(min(UInt64(buffer.count), fileSize - offset))
        var pieces: [Piece] = []
        var done = 0
        while done < total {
            let off = offset + UInt64(done)
            let chunk = UInt32(off / chunkSize)
            let posInChunk = UInt32(off % chunkSize)
            let n = min(total - done, Int(chunkSize) - Int(posInChunk))
            try plan(try view(ino, chunk).segments, ino: ino, from: posInChunk, count: n, into: buffer.baseAddress! + done, &pieces)
            done += n
        }
        let bs = layout.blockSize
        let sequential = hint?.observe(offset: offset, length: total) ?? false
        try fetchPieces(pieces, wholeBlocks: sequential || total >= bs / 4)
        // Read ahead when a sequential reader enters another block (not on every request).
        if sequential, let hint, hint.enteredBlock(offset / UInt64(bs)) {
            readAhead(ino, after: offset + UInt64(total), fileSize: fileSize, blocks: hint.window(max: config.readAheadBlocks))
        }
        return total
    }

    /// Reads `count` bytes from `start` of a chunk whose records make `segments` (a compactor's
    /// snapshot, not this client's view), whole blocks at a time.
    public func read(segments: [Segment], from start: UInt32, count: Int, into dest: UnsafeMutableRawPointer) throws(FSError) {
        var pieces: [Piece] = []
        try plan(segments, ino: 0, from: start, count: count, into: dest, &pieces)
        try fetchPieces(pieces, wholeBlocks: true)
    }

    /// Fills the holes of `count` bytes from `start` of a chunk of `segments` at `dest` with
    /// zeros and adds the pieces to fetch for the rest.
    private func plan(
        _ segments: [Segment], ino: Ino, from posInChunk: UInt32, count n: Int, into base: UnsafeMutableRawPointer, _ pieces: inout [Piece]
    ) throws(FSError) {
        var cursor = posInChunk
        let end = posInChunk + UInt32(n)
        for seg in segments where seg.pos + seg.len > cursor && seg.pos < end {
            if seg.pos > cursor {
                // Gap before this segment: a hole.
                (base + Int(cursor - posInChunk)).initializeMemory(as: UInt8.self, repeating: 0, count: Int(seg.pos - cursor))
                cursor = seg.pos
            }
            let segEnd = min(seg.pos + seg.len, end)
            let dest = base + Int(cursor - posInChunk)
            if seg.id == 0 {
                dest.initializeMemory(as: UInt8.self, repeating: 0, count: Int(segEnd - cursor))
            } else {
                let want = Int(segEnd - cursor)
                let covered = layout.forEachBlock(slice: seg.id, size: seg.size, from: Int(seg.off) + Int(cursor - seg.pos), count: want) {
                    b, inBlock, done, take in pieces.append(Piece(block: b, off: inBlock, len: take, dest: dest + done))
                }
                if covered < want { throw FSError(EIO, "inode \(ino): a slice record points past its slice") }
            }
            cursor = segEnd
        }
        if cursor < end {
            (base + Int(cursor - posInChunk)).initializeMemory(as: UInt8.self, repeating: 0, count: Int(end - cursor))
        }
    }

    /// Stores a new slice's bytes as its blocks (a compactor's merged slice), in parallel;
    /// durable when it returns.
    public func storeSlice(_ id: UInt64, _ data: UnsafeRawBufferPointer) throws(FSError) {
        try store.sync(try blocks.putSlice(id, data))
    }

    private func fetchPieces(_ pieces: [Piece], wholeBlocks: Bool) throws(FSError) {
        if pieces.isEmpty { return }
        var missing: [Piece] = []
        for p in pieces {
            if let b = blocks.cached(p.block) {
                p.dest.copyMemory(from: b.base + p.off, byteCount: p.len)
                CacheMetrics.hit(.memory, p.len)
            } else {
                missing.append(p)
            }
        }
        if missing.isEmpty { return }
        let one = missing.count == 1
        let group = WaitGroup()
        for p in missing {
            let work: @Sendable () -> Void = { [self] in
                do throws(FSError) {
                    if wholeBlocks || p.len * 4 >= p.block.length {
                        let b = try blocks.fetch(p.block)
                        p.dest.copyMemory(from: b.base + p.off, byteCount: p.len)
                    } else {
                        try blocks.read(p.block, offset: p.off, into: UnsafeMutableRawBufferPointer(start: p.dest, count: p.len))
                        blocks.prefetch(p.block, optional: true)
                    }
                    group.done()
                } catch {
                    group.done(error)
                }
            }
            group.add()
            if one { work() } else { blocks.pool.submit(work) }
        }
        try group.wait()
    }

    /// Prefetches the blocks after `offset` into memory.
    private func readAhead(_ ino: Ino, after offset: UInt64, fileSize: UInt64, blocks: Int) {
        let bs = UInt64(layout.blockSize)
        var pos = offset
        var queued = 0
        while queued < blocks && pos < fileSize {
            let chunk = UInt32(pos / chunkSize)
            let inChunk = UInt32(pos % chunkSize)
            guard let v = try? view(ino, chunk) else { return }
            guard let seg = v.segments.first(where: { $0.pos <= inChunk && $0.pos + $0.len > inChunk }) else {
                pos = (pos / bs + 1) * bs
                continue
            }
            if seg.id != 0 {
                // The block this position lies in; the next position is past it.
                var step = 0
                layout.forEachBlock(slice: seg.id, size: seg.size, from: Int(seg.off) + Int(inChunk - seg.pos), count: 1) { b, inBlock, _, _ in
                    self.blocks.prefetch(b)
                    step = b.length - inBlock
                }
                if step == 0 { return }
                queued += 1
                pos += UInt64(step)
            } else {
                pos += UInt64(seg.pos + seg.len - inChunk)
            }
        }
    }

    // MARK: deletion

    /// Deletes the objects of a slice nothing references any more (the layer above finds them:
    /// files whose last link went away, slices cut off by truncation), from the caches too.
    /// Returns how many objects were deleted.
    @discardableResult
    public func deleteObjects(_ s: Slice) -> Int { blocks.delete(s) }

    /// Bytes of written data waiting to be uploaded.
    public var bufferedBytes: Int { budget.inUse }

    /// Blocks written and not yet stored: how many, their bytes, and how long the oldest has
    /// waited (seconds; 0 when none).
    public var uploadQueue: (blocks: Int, bytes: Int, oldest: Double) { queue.state }

    /// Stops the worker threads once their queues drain.
    public func shutdown() {
        do { try disk?.flushIndex() } catch { Log.warning("cache index: \(error.message)") }
        uploads.shutdown()
        background.shutdown()
        blocks.shutdown()
    }
}

/// Sequential-read detection for one open file: grows the read-ahead window while reads follow
/// each other, resets it on a jump.
public final class ReadAhead: @unchecked Sendable {
    private let lock = ConditionLock()
    private var nextOffset: UInt64 = 0
    private var run = 0
    private var block = UInt64.max

    public init() {}

    /// True the first time a read falls in block `index` (consecutive reads in one block: false).
    func enteredBlock(_ index: UInt64) -> Bool {
        lock.withLock {
            if index == block { return false }
            block = index
            return true
        }
    }

    /// Records a read; true when it continues the previous one.
    func observe(offset: UInt64, length: Int) -> Bool {
        lock.withLock {
            let seq = offset == nextOffset && offset != 0 || (offset == 0 && run == 0 && length > 0 && nextOffset == 0)
            run = seq ? run + 1 : 0
            nextOffset = offset + UInt64(length)
            return run >= 1
        }
    }

    /// Blocks to read ahead: doubles with each sequential read up to `max`.
    func window(max: Int) -> Int {
        lock.withLock { Swift.min(max, 1 << Swift.min(run, 6)) }
    }
}

/// The blocks handed to the upload threads and not yet stored, for the metrics.
final class UploadQueue: Sendable {
    private struct State {
        var next: UInt64 = 0
        var bytes = 0
        /// Ticket → (when queued, bytes).
        var waiting: [UInt64: (at: UInt64, bytes: Int)] = [:]
    }

    private let state_ = Locked(State())

    func add(_ bytes: Int) -> UInt64 {
        let now = Sys.monotonicNanos()
        return state_.withLock {
            $0.next += 1
            $0.waiting[$0.next] = (now, bytes)
            $0.bytes += bytes
            return $0.next
        }
    }

    func remove(_ ticket: UInt64) {
        state_.withLock {
            if let w = $0.waiting.removeValue(forKey: ticket) { $0.bytes -= w.bytes }
        }
    }

    /// (A scan of the queue, which the write buffer (`--buffer-size`) bounds.)
    var state: (blocks: Int, bytes: Int, oldest: Double) {
        let now = Sys.monotonicNanos()
        return state_.withLock { s in
            let first = s.waiting.values.map(\.at).min()
            return (s.waiting.count, s.bytes, first.map { Double(now &- $0) / 1e9 } ?? 0)
        }
    }
}
