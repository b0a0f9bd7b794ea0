import Compress
import ObjectStorage
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// One block of a slice: its object key (which names the slice, the block's index and its
/// length) and its length before any compression.
public struct Block: Sendable, Hashable {
    public let key: String
    public let length: Int

    public init(key: String, length: Int) {
        self.key = key
        self.length = length
    }
}

/// The blocks of a volume and where they are kept: the one place that knows a block's key, its
/// codec and its tiers (the memory cache, the node's disk cache, the object store). Readers get
/// a block's bytes as written; what the tiers below memory hold is what the object store holds
/// (compressed on a compressed volume). One download per block at a time however many readers
/// want it (later askers wait for the first).
public final class BlockStore: @unchecked Sendable {
    private final class Pending: @unchecked Sendable {
        var done = false
        var result: Result<Buffer, FSError>?
    }

    public let layout: Layout
    public let codec: BlockCodec
    public let store: any ObjectStore
    public let disk: DiskCache?
    public let memory: MemoryCache
    let pool: WorkerPool
    private let lock = ConditionLock()
    // (@unchecked: `inflight`, `optionalRunning` and `aheadInflight` are guarded by `lock`; the rest is
    // immutable or thread-safe.)
    private var inflight: [String: Pending] = [:]
    /// Bytes of blocks stored and deleted by this process, and the bytes the store holds for
    /// them, not yet added to the volume's counters (`takeCounts`).
    private let counts = Locked(StoredCounts())

    /// Whether blocks read from the store are kept in the disk cache too: not when the store is
    /// a directory on the cache's own file system (the copy would cost a write of every block
    /// read, and read no faster than the original).
    public let cachesReads: Bool

    public init(layout: Layout, codec: BlockCodec, store: any ObjectStore, memory: MemoryCache, disk: DiskCache?, threads: Int) {
        self.layout = layout
        self.codec = codec
        self.store = store
        self.memory = memory
        self.disk = disk
        cachesReads = disk.map { !store.isOnFileSystem(of: $0.userDirs) } ?? false
        pool = WorkerPool(name: "download", threads: threads)
    }

    // MARK: names

    /// The most bytes the store may hold for a block of `length` bytes.
    public func storedBound(_ length: Int) -> Int { codec.storedBound(length) }

    // MARK: reads

    /// The block if it is in memory.
    func cached(_ b: Block) -> Buffer? { memory.get(b.key) }

    /// The whole block, from memory, the disk cache or the store (kept in memory, and on disk
    /// as stored); waits for it.
    public func fetch(_ b: Block) throws(FSError) -> Buffer {
        if let buf = memory.get(b.key) { return buf }
        let (pending, mine) = lock.withLock { () -> (Pending, Bool) in
            if let p = inflight[b.key] { return (p, false) }
            let p = Pending()
            inflight[b.key] = p
            return (p, true)
        }
        if mine { download(b, pending) }
        let buf = try lock.withLock { () throws(FSError) -> Buffer in
            while !pending.done { lock.wait() }
            return try pending.result!.get()
        }
        // (A block read ahead that a reader waited for is read: its bytes no longer count as
        // read-ahead's.)
        if !mine { _ = memory.get(b.key) }
        return buf
    }

    /// Starts fetching the block in the background unless it is in memory or on its way.
    /// `optional`: a hunch (a small random read's block may be read again), not a stream's
    /// read-ahead: dropped while `optionalLimit` such fetches run, so random reads do not turn
    /// each few KiB asked into a whole block downloaded.
    /// A stream's read-ahead (not `optional`) is dropped when the blocks read ahead and not yet
    /// read, with those on their way, would take more than half the memory cache: several
    /// streams share it rather than evict each other's blocks before they are read.
    public func prefetch(_ b: Block, optional: Bool = false) {
        if memory.contains(b.key) { return }
        let bounded = !optional && memory.limit > 0
        let pending: Pending? = lock.withLock {
            if inflight[b.key] != nil { return nil }
            if optional {
                if optionalRunning >= Self.optionalLimit { return nil }
                optionalRunning += 1
            } else if bounded {
                // (One block ahead always goes, however small the cache. Blocks read ahead long
                // ago and never read, by a reader that stopped, no longer hold the room.)
                func full() -> Bool {
                    let held = memory.aheadBytes + aheadInflight
                    return held > 0 && held + b.length > memory.limit / 2
                }
                if full() {
                    memory.expireAhead(olderThan: Self.aheadLifetime)
                    if full() { return nil }
                }
                aheadInflight += b.length
            }
            let p = Pending()
            inflight[b.key] = p
            return p
        }
        guard let pending else { return }
        pool.submit { [self] in
            download(b, pending, ahead: bounded)
            if optional { lock.withLock { optionalRunning -= 1 } }
        }
    }

    /// Nanoseconds after which a block read ahead and not read stops counting as read-ahead's.
    static let aheadLifetime: UInt64 = 10_000_000_000

    /// Optional prefetches running, and at most how many; bytes of read-ahead on their way
    /// (guarded by `lock`).
    private var optionalRunning = 0
    private var aheadInflight = 0
    static let optionalLimit = 1

    /// Bytes `offset..<offset+dest.count` of the block (small random reads): a ranged read of
    /// the disk cache or the store where the store holds the bytes as written, else the whole
    /// block (a compressed block is read whole).
    public func read(_ b: Block, offset: Int, into dest: UnsafeMutableRawBufferPointer) throws(FSError) {
        guard codec == .none else {
            let buf = try fetch(b)
            dest.baseAddress!.copyMemory(from: buf.base + offset, byteCount: dest.count)
            return
        }
        if let disk, disk.read(b.key, length: b.length, offset: offset, into: dest) {
            CacheMetrics.hit(.disk, dest.count)
            return
        }
        CacheMetrics.miss(dest.count)
        let n = try get(b, offset: offset, into: dest)
        if n != dest.count { throw FSError(EIO, "block \(b.key) in \(store.description) is shorter than its name says") }
    }

    /// The block as the store holds it, into `scratch` (grown as needed): what staging puts in
    /// the disk cache. Checked as a reader would check it.
    public func download(_ b: Block, into scratch: Buffer) throws(FSError) -> UnsafeRawBufferPointer {
        let bound = storedBound(b.length)
        scratch.reserve(bound)
        let n = try get(b, offset: 0, into: UnsafeMutableRawBufferPointer(start: scratch.base, count: bound))
        scratch.count = n
        _ = try written(b, from: scratch)
        return scratch.bytes
    }

    /// A stored block's bytes as written, into a new buffer.
    func decoded(_ b: Block, _ stored: UnsafeRawBufferPointer) throws(FSError) -> Buffer {
        let buf = Buffer(capacity: b.length)
        try codec.decompress(stored, into: UnsafeMutableRawBufferPointer(start: buf.base, count: b.length), what: "block \(b.key)")
        buf.count = b.length
        return buf
    }

    /// The block's bytes as written from the bytes stored: `stored` itself when they are not
    /// compressed (of the block's length), else decompressed into a new buffer.
    private func written(_ b: Block, from stored: Buffer) throws(FSError) -> Buffer {
        guard codec == .none else { return try decoded(b, stored.bytes) }
        if stored.count != b.length {
            throw FSError(EIO, "block \(b.key) in \(store.description) has \(stored.count) bytes, expected \(b.length)")
        }
        return stored
    }

    /// A ranged get of the stored bytes; a missing block is `EIO` that says so.
    private func get(_ b: Block, offset: Int, into dest: UnsafeMutableRawBufferPointer) throws(FSError) -> Int {
        do {
            let n = try ObjectMetrics.measure(.get) { () throws(FSError) in try store.get(b.key, offset: offset, into: dest) }
            ObjectMetrics.bytes(.get, n)
            return n
        } catch {
            let e = error.code == ENOENT ? FSError(EIO, "block \(b.key) is missing from \(store.description)") : FSError(EIO, error.message)
            Log.error(e.message)
            throw e
        }
    }

    /// `ahead`: for a stream's read-ahead (kept in memory as not read yet; its bytes leave
    /// `aheadInflight` as they enter memory, or fail to).
    private func download(_ b: Block, _ pending: Pending, ahead: Bool = false) {
        var landing = ahead
        func landed() {
            if landing { lock.withLock { aheadInflight -= b.length } }
            landing = false
        }
        defer { landed() }
        if let disk, let stored = disk.get(b.key, length: codec == .none ? b.length : nil, atMost: storedBound(b.length)) {
            do throws(FSError) {
                let buf = try written(b, from: stored)
                landed()
                memory.put(b.key, buf, ahead: ahead)
                finish(b.key, pending, .success(buf))
                CacheMetrics.hit(.disk, b.length)
                return
            } catch {
                Log.warning("cached \(error.message); dropping it")
                disk.remove(b.key)
            }
        }
        let bound = storedBound(b.length)
        let raw = Buffer(capacity: bound)
        CacheMetrics.miss(b.length)
        var result: Result<Buffer, FSError>
        do throws(FSError) {
            raw.count = try get(b, offset: 0, into: UnsafeMutableRawBufferPointer(start: raw.base, count: bound))
            let buf = try written(b, from: raw)
            landed()
            memory.put(b.key, buf, ahead: ahead)
            result = .success(buf)
        } catch {
            Log.error(error.message)
            result = .failure(FSError(EIO, error.message))
        }
        landed()
        finish(b.key, pending, result)
        if case .success = result, let disk, cachesReads {
            do { try disk.put(b.key, raw.bytes) } catch { Log.warning("not cached: \(error.message)") }
        }
    }

    private func finish(_ key: String, _ pending: Pending, _ result: Result<Buffer, FSError>) {
        lock.withLock {
            pending.result = result
            pending.done = true
            inflight[key] = nil
            lock.broadcast()
        }
    }

    // MARK: writes

    /// The block's bytes as the store is to hold them, compressed into a new buffer; nil when
    /// the store holds `data` itself (no compression).
    public func encode(_ data: UnsafeRawBufferPointer) throws(FSError) -> Buffer? {
        if codec == .none { return nil }
        let out = Buffer(capacity: storedBound(data.count))
        out.count = try codec.compress(data, into: UnsafeMutableRawBufferPointer(start: out.base, count: out.capacity))
        return out
    }

    /// Encodes and stores a block written, in the store and then in the disk cache.
    public func put(_ b: Block, written: UnsafeRawBufferPointer, cache: Bool = true) throws(FSError) {
        let encoded = try encode(written)
        try withExtendedLifetime(encoded) { () throws(FSError) in try put(b, stored: encoded?.bytes ?? written, cache: cache) }
    }

    /// Stores a block written (encoded by `encode`) in the store and then, with `cache`, in the
    /// disk cache.
    public func put(_ b: Block, stored: UnsafeRawBufferPointer, cache keep: Bool = true) throws(FSError) {
        try ObjectMetrics.measure(.put) { () throws(FSError) in try store.put(b.key, stored) }
        ObjectMetrics.bytes(.put, stored.count)
        counted(b.length, stored.count)
        if keep { cache(b, stored: stored) }
    }

    /// Hands a small block to a store that sends it with its slice's commit (a gateway's):
    /// true when it took it (and the disk cache has it too).
    public func holdForCommit(_ b: Block, stored: UnsafeRawBufferPointer) -> Bool {
        store.holdForCommit(b.key, stored)
    }

    /// Puts a block written in the disk cache (reading back what was just written stays local).
    public func cache(_ b: Block, stored: UnsafeRawBufferPointer) {
        guard let disk else { return }
        do { try disk.put(b.key, stored) } catch { Log.warning("not cached: \(error.message)") }
    }

    /// Encodes and stores a slice's bytes as its blocks, in parallel (a compactor's merged
    /// slice); the blocks' keys.
    @discardableResult
    public func putSlice(_ id: UInt64, _ data: UnsafeRawBufferPointer) throws(FSError) -> [String] {
        let group = WaitGroup()
        var keys: [String] = []
        layout.forEachBlock(slice: id, size: UInt32(data.count), from: 0, count: data.count) { b, _, at, _ in
            keys.append(b.key)
            let part = BytesRef(UnsafeRawBufferPointer(rebasing: data[at..<at + b.length]))
            group.add()
            pool.submit { [self] in
                do throws(FSError) {
                    try put(b, written: part.bytes)
                    group.done()
                } catch {
                    group.done(error)
                }
            }
        }
        try group.wait()
        return keys
    }

    // MARK: deletion

    /// Deletes the blocks of a slice nothing references any more, from the caches too.
    /// Returns how many objects were deleted.
    @discardableResult
    public func delete(_ s: Slice) -> Int {
        var n = 0
        for b in layout.blocks(of: s) {
            memory.remove(b.key)
            // A compressed block's size is asked before it goes (the counters subtract it; one
            // the store no longer has is not subtracted, nor one whose size cannot be had; an
            // uncompressed block's is its length). Each slice comes to one process to delete.
            var size: Int? = b.length
            if codec != .none && counting {
                do { size = try ObjectMetrics.measure(.head) { () throws(FSError) in try store.head(b.key) } } catch { size = nil }
            }
            disk?.remove(b.key)
            do {
                try ObjectMetrics.measure(.delete) { () throws(FSError) in try store.delete(b.key) }
                if let size { counted(-b.length, -size) }
                n += 1
            } catch {
                Log.warning("could not delete \(b.key): \(error.message)")
            }
        }
        return n
    }

    // MARK: counting

    /// Whether this process stores and deletes blocks itself (a gateway's client does not: the
    /// gateway counts what it stores for it).
    var counting: Bool { !store.isProxy }

    func counted(_ length: Int, _ stored: Int) {
        guard counting else { return }
        counts.withLock {
            $0.blockBytes += Int64(length)
            $0.storedBytes += Int64(stored)
        }
    }

    /// What this process stored and deleted since the last call, for the volume's counters.
    public func takeCounts() -> StoredCounts {
        counts.withLock {
            let c = $0
            $0 = StoredCounts()
            return c
        }
    }

    /// Hands what this process stored and deleted since the last call to `record` (which adds
    /// it to the volume's counters); kept for the next call if that fails.
    public func recordCounts(_ record: (StoredCounts) throws(FSError) -> Void) {
        let c = takeCounts()
        guard !c.isZero else { return }
        do {
            try record(c)
        } catch {
            Log.warning("counting the bytes stored: \(error.message)")
            counts.withLock {
                $0.blockBytes += c.blockBytes
                $0.storedBytes += c.storedBytes
            }
        }
    }

    /// Counts a block another process asked this one to store (a gateway's client's).
    public func countStored(length: Int, stored: Int) { counted(length, stored) }

    /// Stops the download threads once their queue drains.
    public func shutdown() { pool.shutdown() }
}

/// Bytes of blocks (as written) and the bytes the object store holds for them.
public struct StoredCounts: Sendable, Equatable {
    public var blockBytes: Int64 = 0
    public var storedBytes: Int64 = 0

    public init(blockBytes: Int64 = 0, storedBytes: Int64 = 0) {
        self.blockBytes = blockBytes
        self.storedBytes = storedBytes
    }

    public var isZero: Bool { blockBytes == 0 && storedBytes == 0 }
}

/// Bytes a worker reads. @unchecked: the caller waits for every worker before the memory goes.
struct BytesRef: @unchecked Sendable {
    let bytes: UnsafeRawBufferPointer
    init(_ b: UnsafeRawBufferPointer) { bytes = b }
}
