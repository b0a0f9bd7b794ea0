import Compress
import Foundation
import ObjectStorage
import StageFSCore
import Testing

@testable import DataPath

private func textBlock(_ n: Int) -> [UInt8] {
    var out: [UInt8] = []
    var i = 0
    while out.count < n {
        out += Array("line \(i) of some compressible text\n".utf8)
        i += 1
    }
    return Array(out.prefix(n))
}

private func noise(_ n: Int, seed: UInt64) -> [UInt8] {
    var x = seed | 1
    return (0..<n).map { _ in
        x ^= x << 13
        x ^= x >> 7
        x ^= x << 17
        return UInt8(truncatingIfNeeded: x)
    }
}

private func compress(_ c: BlockCodec, _ src: [UInt8]) throws -> [UInt8] {
    var out = [UInt8](repeating: 0, count: c.storedBound(src.count))
    let n = try src.withUnsafeBytes { s in try out.withUnsafeMutableBytes { try c.compress(s, into: $0) } }
    return Array(out.prefix(n))
}

private func decompress(_ c: BlockCodec, _ src: [UInt8], length: Int) throws -> [UInt8] {
    var out = [UInt8](repeating: 0, count: length)
    try src.withUnsafeBytes { s in try out.withUnsafeMutableBytes { try c.decompress(s, into: $0, what: "block") } }
    return out
}

@Suite("Blocks and codecs", .timeLimit(.minutes(2)))
struct BlockTests {
    @Test(arguments: BlockCodec.allCases)
    func codecsRoundTripAndRefuseDamage(codec: BlockCodec) throws {
        for src in [textBlock(4 << 20), noise(1 << 20, seed: 3), textBlock(1), textBlock(70_000)] {
            let stored = try compress(codec, src)
            #expect(stored.count <= codec.storedBound(src.count))
            if codec != .none && src.count > 1000 && src[0] == UInt8(ascii: "l") { #expect(stored.count < src.count / 3) }
            #expect(try decompress(codec, stored, length: src.count) == src)
            // What a gateway checks before it stores a client's block.
            try stored.withUnsafeBytes { try codec.check($0, length: src.count, what: "block") }
            #expect(throws: FSError.self) { try stored.withUnsafeBytes { try codec.check($0, length: src.count + 1, what: "block") } }
            // Another length than the key names: an error, never a write past the buffer.
            #expect(throws: FSError.self) { _ = try decompress(codec, stored, length: src.count - 1) }
            if codec != .none {
                #expect(throws: FSError.self) { _ = try decompress(codec, stored, length: src.count + 1) }
            }
        }
        guard codec != .none else { return }
        // Damage: cut short, or bytes flipped (zstd checks its frame; LZ4 may decode garbage of
        // the right length, which the disk cache's and the store's own checks catch).
        let stored = try compress(codec, textBlock(200_000))
        #expect(throws: FSError.self) { _ = try decompress(codec, Array(stored.prefix(stored.count / 2)), length: 200_000) }
        #expect(throws: FSError.self) { _ = try decompress(codec, [], length: 200_000) }
        #expect(throws: FSError.self) { _ = try decompress(codec, noise(5000, seed: 9), length: 200_000) }
        #expect(throws: FSError.self) { try noise(5000, seed: 9).withUnsafeBytes { try codec.check($0, length: 200_000, what: "block") } }
        #expect(throws: FSError.self) {
            try stored.withUnsafeBytes { try codec.check(UnsafeRawBufferPointer(rebasing: $0.dropLast()), length: 200_000, what: "block") }
        }
        #expect(try BlockCodec.named("ZSTD") == .zstd)
        #expect(throws: FSError.self) { _ = try BlockCodec.named("brotli") }
    }

    @Test func diskCacheFindsTheLengthOfWhatItHolds() throws {
        let dir = try makeTempDir("cache")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let c = try DiskCache(config: DiskCacheConfig(dirs: [dir], capacity: 64 << 20), volumeUUID: "vol")
        // A block of 4 MiB stored in 30,000 bytes (packed: small) and one in 300,000 (a file).
        let small = noise(30_000, seed: 1)
        let large = noise(300_000, seed: 2)
        let k1 = "v/chunks/0/0/1_0_4194304"
        let k2 = "v/chunks/0/0/2_0_4194304"
        try small.withUnsafeBytes { try c.put(k1, $0) }
        try large.withUnsafeBytes { try c.put(k2, $0) }
        for flush in [false, true] {
            if flush { try c.flushIndex() }
            #expect(c.get(k1).map { Array($0.bytes) } == small)
            #expect(c.get(k2).map { Array($0.bytes) } == large)
            #expect(c.cached([(k1, nil), (k2, nil), ("v/chunks/0/0/3_0_4194304", nil)]) == [true, true, false])
            #expect(c.contains(k1) && c.contains(k2))
        }
        // More than its block can take stored: dropped unread.
        #expect(c.get(k1, atMost: 20_000) == nil)
        #expect(!c.contains(k1))
        // A torn file is dropped, not served under another length.
        truncate(c.path(k2), 250_000)
        #expect(c.get(k2) == nil)
        #expect(!c.contains(k2))
    }

    @Test(arguments: BlockCodec.allCases)
    func blockStoreStoresEncodedAndReadsRanges(codec: BlockCodec) throws {
        let dir = try makeTempDir("blocks")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = try openObjectStore(StoreConfig(storage: "file", bucket: dir + "/bucket"))
        try store.create()
        let disk = try DiskCache(config: DiskCacheConfig(dirs: [dir + "/cache"], capacity: 64 << 20), volumeUUID: "vol")
        let layout = Layout(volume: "v", blockSize: 1 << 20)
        let blocks = BlockStore(layout: layout, codec: codec, store: store, memory: MemoryCache(limit: 8 << 20), disk: disk, threads: 2)
        defer { blocks.shutdown() }
        let data = textBlock(2 << 20 + 5000)  // two whole blocks and a short one
        _ = try data.withUnsafeBytes { try blocks.putSlice(7, $0) }
        let slice = Slice(pos: 0, id: 7, size: UInt32(data.count), off: 0, len: UInt32(data.count))
        let all = layout.blocks(of: slice)
        #expect(all.map(\.length) == [1 << 20, 1 << 20, 5000])
        let sizes = try all.map { try store.head($0.key) ?? -1 }
        if codec == .none { #expect(sizes == [1 << 20, 1 << 20, 5000]) } else { #expect(sizes.allSatisfy { $0 > 0 && $0 < 1 << 18 }) }
        // What the disk cache holds is what the store holds.
        for b in all { #expect(disk.get(b.key).map { Array($0.bytes) } == (try store.getAll(b.key, size: 2 << 20))) }
        // Ranged reads (from the cache, then from the store once the cache lost them).
        for pass in 0..<2 {
            if pass == 1 { for b in all { disk.remove(b.key) } }
            var rng = SystemRandomNumberGenerator()
            for _ in 0..<50 {
                let bi = Int.random(in: 0..<3, using: &rng)
                let b = all[bi]
                let off = Int.random(in: 0..<b.length, using: &rng)
                let n = Int.random(in: 1...(b.length - off), using: &rng)
                var out = [UInt8](repeating: 0, count: n)
                try out.withUnsafeMutableBytes { try blocks.read(b, offset: off, into: $0) }
                #expect(out == Array(data[(bi << 20) + off..<(bi << 20) + off + n]))
            }
        }
        // Counted: what was stored, and deleted again.
        let counts = blocks.takeCounts()
        #expect(counts.blockBytes == Int64(data.count))
        #expect(counts.storedBytes == Int64(sizes.reduce(0, +)))
        #expect(blocks.delete(slice) == 3)
        #expect(blocks.takeCounts() == StoredCounts(blockBytes: -Int64(data.count), storedBytes: -Int64(sizes.reduce(0, +))))
        #expect(try store.list(prefix: "v/", limit: 10).isEmpty)
        // A damaged stored block is an error that names it, never other bytes.
        if codec == .zstd {
            _ = try data.withUnsafeBytes { try blocks.putSlice(8, UnsafeRawBufferPointer(rebasing: $0[0..<5000])) }
            let b = layout.blocks(of: Slice(pos: 0, id: 8, size: 5000, off: 0, len: 5000))[0]
            disk.remove(b.key)
            try store.put(b.key, bytes: [0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3])
            #expect(throws: FSError.self) { _ = try blocks.fetch(b) }
        }
    }
}

extension BlockTests {
    /// A block read from the store is kept in the disk cache, unless the store is a directory
    /// on the cache's own file system (the copy would read no faster than the original).
    @Test func blocksReadAreCachedOnlyFromAnotherFileSystem() throws {
        let dir = try makeTempDir("reads")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // (/dev/shm is a tmpfs: another file system than the temporary directory's.)
        let elsewhere = "/dev/shm/stagefs-reads-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: elsewhere) }
        let layout = Layout(volume: "v", blockSize: 1 << 20)
        let data = textBlock(1 << 20)
        // (Where /dev/shm is no other file system, both are on the cache's own.)
        let apart = Sys.stat("/dev/shm").map { $0.st_dev } != Sys.stat(dir).map { $0.st_dev }
        for (bucket, cached) in [(dir + "/bucket", false), (elsewhere, apart)] {
            let store = try openObjectStore(StoreConfig(storage: "file", bucket: bucket))
            try store.create()
            let disk = try DiskCache(config: DiskCacheConfig(dirs: [dir + "/cache"], capacity: 64 << 20), volumeUUID: "vol")
            let blocks = BlockStore(layout: layout, codec: .none, store: store, memory: MemoryCache(limit: 8 << 20), disk: disk, threads: 2)
            defer { blocks.shutdown() }
            #expect(blocks.cachesReads == cached, "\(bucket)")
            let b = layout.blocks(of: Slice(pos: 0, id: 9, size: UInt32(data.count), off: 0, len: UInt32(data.count)))[0]
            try data.withUnsafeBytes { try store.put(b.key, $0) }
            #expect(Array(try blocks.fetch(b).bytes) == data)
            // (The cache write follows the reader's answer, on the download thread.)
            let deadline = Sys.monotonicNanos() + 5_000_000_000
            while blocks.pool.pending > 0 && Sys.monotonicNanos() < deadline { Sys.sleep(seconds: 0.01) }
            #expect((disk.get(b.key) != nil) == cached, "a block read from \(bucket) is \(cached ? "" : "not ")cached")
            disk.remove(b.key)
        }
    }
}

/// A store whose whole-block gets wait until released, counting them (the optional-prefetch test).
private final class GatedStore: ObjectStore, @unchecked Sendable {
    // @unchecked: `wholeGets` and `open` are guarded by `lock`; `inner` is thread-safe.
    let inner: any ObjectStore
    let lock = ConditionLock()
    var wholeGets = 0
    var open = false
    init(_ inner: any ObjectStore) { self.inner = inner }
    /// Over a new directory bucket.
    static func over(bucket: String) throws -> GatedStore {
        let local = try openObjectStore(StoreConfig(storage: "file", bucket: bucket))
        try local.create()
        return GatedStore(local)
    }
    /// Lets the waiting gets (and all later ones) go.
    func release() {
        lock.withLock {
            open = true
            lock.broadcast()
        }
    }
    var description: String { "gated \(inner.description)" }
    func put(_ key: String, _ data: UnsafeRawBufferPointer) throws(FSError) { try inner.put(key, data) }
    func get(_ key: String, offset: Int, into buffer: UnsafeMutableRawBufferPointer) throws(FSError) -> Int {
        if offset == 0 && buffer.count >= 1 << 20 {
            lock.withLock {
                wholeGets += 1
                lock.broadcast()
                while !open { lock.wait() }
            }
        }
        return try inner.get(key, offset: offset, into: buffer)
    }
    func delete(_ key: String) throws(FSError) { try inner.delete(key) }
    func head(_ key: String) throws(FSError) -> Int? { try inner.head(key) }
    func list(prefix: String, after: String?, limit: Int) throws(FSError) -> [ObjectInfo] {
        try inner.list(prefix: prefix, after: after, limit: limit)
    }
    func create() throws(FSError) { try inner.create() }
}

@Suite("Prefetching", .timeLimit(.minutes(1)))
struct PrefetchTests {
    @Test func smallRandomReadsDoNotEachDownloadTheirBlock() throws {
        let dir = try makeTempDir("prefetch")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = try GatedStore.over(bucket: dir + "/bucket")
        let layout = Layout(volume: "v", blockSize: 1 << 20)
        let blocks = BlockStore(layout: layout, codec: .none, store: store, memory: MemoryCache(limit: 64 << 20), disk: nil, threads: 8)
        defer { blocks.shutdown() }
        let data = noise(8 << 20, seed: 5)
        _ = try data.withUnsafeBytes { try blocks.putSlice(9, $0) }
        let all = layout.blocks(of: Slice(pos: 0, id: 9, size: UInt32(data.count), off: 0, len: UInt32(data.count)))
        // A small read in each of 8 blocks, each followed by its hunch: one whole block is
        // fetched at a time, the others' hunches dropped; the reads themselves are ranged.
        for (i, b) in all.enumerated() {
            var out = [UInt8](repeating: 0, count: 4096)
            try out.withUnsafeMutableBytes { try blocks.read(b, offset: 1000, into: $0) }
            #expect(out == Array(data[(i << 20) + 1000..<(i << 20) + 5096]))
            blocks.prefetch(b, optional: true)
        }
        store.lock.withLock { while store.wholeGets < 1 { store.lock.wait() } }
        // A stream's read-ahead is never dropped.
        for b in all.suffix(3) { blocks.prefetch(b) }
        store.lock.withLock { while store.wholeGets < 4 { store.lock.wait() } }
        #expect(store.lock.withLock { store.wholeGets } == 4)
        store.release()
        #expect(try blocks.fetch(all[0]).count == 1 << 20)
    }

    /// Several streams reading ahead share half the memory cache: read-ahead beyond it is
    /// dropped, not let in to evict blocks read ahead that no one has read yet.
    @Test func readAheadTakesAtMostHalfTheMemoryCache() throws {
        let dir = try makeTempDir("readahead")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = try GatedStore.over(bucket: dir + "/bucket")
        let layout = Layout(volume: "v", blockSize: 1 << 20)
        let memory = MemoryCache(limit: 4 << 20)
        let blocks = BlockStore(layout: layout, codec: .none, store: store, memory: memory, disk: nil, threads: 8)
        defer { blocks.shutdown() }
        let data = noise(8 << 20, seed: 6)
        _ = try data.withUnsafeBytes { try blocks.putSlice(10, $0) }
        let all = layout.blocks(of: Slice(pos: 0, id: 10, size: UInt32(data.count), off: 0, len: UInt32(data.count)))
        // Blocks on their way count: two of eight are fetched.
        for b in all { blocks.prefetch(b) }
        store.lock.withLock { while store.wholeGets < 2 { store.lock.wait() } }
        store.release()
        let deadline = Sys.monotonicNanos() + 10_000_000_000
        while memory.aheadBytes < 2 << 20 && Sys.monotonicNanos() < deadline { Sys.sleep(seconds: 0.01) }
        #expect(memory.aheadBytes == 2 << 20)
        #expect(store.lock.withLock { store.wholeGets } == 2, "the other six were dropped")
        // A block read is no longer read-ahead's: one more fits, then no more.
        #expect(try Array(blocks.fetch(all[0]).bytes) == Array(data[0..<(1 << 20)]))
        #expect(memory.aheadBytes == 1 << 20)
        blocks.prefetch(all[2])
        blocks.prefetch(all[3])
        while memory.aheadBytes < 2 << 20 && Sys.monotonicNanos() < deadline { Sys.sleep(seconds: 0.01) }
        #expect(store.lock.withLock { store.wholeGets } == 3)
        #expect(memory.contains(all[2].key) && !memory.contains(all[3].key))
        // Dropped from memory, a block read ahead no longer counts.
        memory.remove(all[1].key)
        memory.remove(all[2].key)
        #expect(memory.aheadBytes == 0)
        let b7 = Buffer(capacity: 4 << 20)
        b7.count = 4 << 20
        memory.put("other", b7)
        #expect(memory.bytesUsed == 4 << 20 && memory.aheadBytes == 0, "the rest was evicted")
        // One block ahead always goes, however small the cache (here less than two blocks).
        let small = MemoryCache(limit: 3 << 19)
        let few = BlockStore(layout: layout, codec: .none, store: store, memory: small, disk: nil, threads: 2)
        defer { few.shutdown() }
        few.prefetch(all[5])
        few.prefetch(all[6])
        while small.aheadBytes < 1 << 20 && Sys.monotonicNanos() < deadline { Sys.sleep(seconds: 0.01) }
        #expect(small.contains(all[5].key) && !small.contains(all[6].key))
    }
}
