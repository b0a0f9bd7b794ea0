import DataPath
import Foundation
import StageFSCore
import Testing

private func block(_ n: Int, _ seed: UInt8) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 31) ^ seed } }

private func put(_ c: DiskCache, _ key: String, _ data: [UInt8], pin: String? = nil) throws {
    try data.withUnsafeBytes { try c.put(key, $0, pin: pin) }
}

@Suite("Disk cache", .timeLimit(.minutes(1)))
struct DiskCacheTests {
    @Test func storesVerifiesAndSurvivesReopen() throws {
        let dir = try makeTempDir("cache")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let cfg = DiskCacheConfig(dirs: [dir + "/a", dir + "/b"], capacity: 10 << 20)
        let c = try DiskCache(config: cfg, volumeUUID: "vol1")
        let data = block(300_000, 1)
        try put(c, "v/chunks/0/0/1_0_300000", data)
        #expect(c.get("v/chunks/0/0/1_0_300000", length: 300_000).map { Array($0.bytes) } == data)
        var part = [UInt8](repeating: 0, count: 1000)
        #expect(part.withUnsafeMutableBytes { c.read("v/chunks/0/0/1_0_300000", length: 300_000, offset: 131_000, into: $0) })
        #expect(part == Array(data[131_000..<132_000]))
        #expect(c.get("v/chunks/0/0/1_0_300000", length: 299_999) == nil, "a file of another size than expected is dropped")
        try put(c, "v/chunks/0/0/1_0_300000", data)
        // The user directory is private.
        let st = try FileManager.default.attributesOfItem(atPath: "\(dir)/a/\(getuid())")
        #expect((st[.posixPermissions] as? Int) == 0o700)
        // A second instance (another process) sees the index without scanning.
        try put(c, "v/chunks/0/0/2_0_10", block(10, 2))
        try c.flushIndex()
        let d = try DiskCache(config: cfg, volumeUUID: "vol1")
        #expect(try d.usage().blocks == 2)
        #expect(try d.usage().bytes == DiskCache.fileSize(300_000) + DiskCache.fileSize(10))
        #expect(d.get("v/chunks/0/0/2_0_10", length: 10).map { Array($0.bytes) } == block(10, 2))
    }

    @Test func corruptedAndTornFilesAreDroppedNotServed() throws {
        let dir = try makeTempDir("cache")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let c = try DiskCache(config: DiskCacheConfig(dirs: [dir], capacity: 10 << 20), volumeUUID: "vol")
        let key = "v/chunks/0/0/7_0_200000"
        try put(c, key, block(200_000, 3))
        // Flip one byte in the middle of the data.
        let fd = open(c.path(key), O_RDWR)
        var b: UInt8 = 0
        pread(fd, &b, 1, 150_000)
        b ^= 0xff
        pwrite(fd, &b, 1, 150_000)
        close(fd)
        #expect(c.get(key, length: 200_000) == nil)
        #expect(!FileManager.default.fileExists(atPath: c.path(key)), "the damaged file is removed")
        // A torn (short) file.
        try put(c, key, block(200_000, 3))
        truncate(c.path(key), 100_000)
        var part = [UInt8](repeating: 0, count: 10)
        #expect(!part.withUnsafeMutableBytes { c.read(key, length: 200_000, offset: 0, into: $0) })
        #expect(try c.usage().blocks == 0)
    }

    @Test func smallBlocksArePackedVerifiedAndReclaimed() throws {
        let dir = try makeTempDir("cache")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let size = 4096
        let cap = DiskCache.fileSize(size) * 100
        let c = try DiskCache(config: DiskCacheConfig(dirs: [dir], capacity: cap, freeSpaceRatio: 0), volumeUUID: "vol")
        for i in 0..<50 { try put(c, "v/chunks/0/0/\(i)_0_4096", block(size, UInt8(i))) }
        // Served before and after the index write, from one pack file, not 50 files.
        #expect(c.get("v/chunks/0/0/7_0_4096", length: size).map { Array($0.bytes) } == block(size, 7))
        try c.flushIndex()
        #expect(c.cached([("v/chunks/0/0/7_0_4096", size), ("v/chunks/0/0/99_0_4096", size)]) == [true, false])
        let packs = try FileManager.default.contentsOfDirectory(atPath: "\(dir)/\(getuid())/vol/packs")
        #expect(packs.count == 1)
        var part = [UInt8](repeating: 0, count: 100)
        #expect(part.withUnsafeMutableBytes { c.read("v/chunks/0/0/9_0_4096", length: size, offset: 4000, into: $0) })
        #expect(part[0..<96] == block(size, 9)[4000..<4096])
        // A corrupted packed block is detected, dropped and not served.
        let packPath = "\(dir)/\(getuid())/vol/packs/\(packs[0])"
        let fd = open(packPath, O_RDWR)
        var b: UInt8 = 0
        pread(fd, &b, 1, 4100 * 3 + 10)
        b ^= 0x55
        pwrite(fd, &b, 1, 4100 * 3 + 10)
        close(fd)
        #expect(c.get("v/chunks/0/0/3_0_4096", length: size) == nil)
        #expect(!c.contains("v/chunks/0/0/3_0_4096", length: size))
        #expect(c.get("v/chunks/0/0/4_0_4096", length: size) != nil, "its neighbours are fine")
        // Once every block of a finished pack is gone, the pack file goes too.
        let other = try DiskCache(config: DiskCacheConfig(dirs: [dir], capacity: cap, freeSpaceRatio: 0), volumeUUID: "vol")
        withExtendedLifetime(c) {}
        for i in 0..<50 { _ = try other.evictOne("v/chunks/0/0/\(i)_0_4096") }
        #expect(try other.usage().blocks == 0)
    }

    @Test func lruEvictionSkipsPinnedBlocksUntilReleased() throws {
        let dir = try makeTempDir("cache")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let size = 100_000
        let cap = DiskCache.fileSize(size) * 4 + 100
        let c = try DiskCache(config: DiskCacheConfig(dirs: [dir], capacity: cap, freeSpaceRatio: 0), volumeUUID: "vol")
        try put(c, "k/p1", block(size, 1), pin: "job1")
        try put(c, "k/p2", block(size, 2), pin: "job1")
        for i in 0..<6 { try put(c, "k/u\(i)", block(size, UInt8(10 + i))) }
        #expect(c.contains("k/p1", length: size) && c.contains("k/p2", length: size), "pinned blocks survive pressure")
        #expect(!c.contains("k/u0", length: size), "the least recently used unpinned block went first")
        #expect(c.contains("k/u5", length: size))
        #expect(try c.usage().bytes <= cap)
        // Pinned data alone beyond the limit: refused, not thrashed.
        try put(c, "k/p3", block(size, 3), pin: "job2")
        try put(c, "k/p4", block(size, 4), pin: "job2")
        do {
            try put(c, "k/p5", block(size, 5), pin: "job2")
            Issue.record("a pin beyond the cache size was accepted")
        } catch let e as FSError {
            #expect(e.code == ENOSPC)
            #expect(e.message.contains("pinned"))
        }
        #expect(try c.jobs().jobs.map { $0.0 } == ["job1", "job2"])
        // Job ids are [0-9A-Za-z._-]{1,64}: anything else is refused by pin, put and release.
        for bad in ["x\ngc bucket 0 1", "", String(repeating: "j", count: 65), "a/b", "job 1"] {
            #expect(throws: FSError.self, "\(bad)") { try c.pin(["k/p1"], job: bad) }
            #expect(throws: FSError.self, "\(bad)") { try put(c, "k/bad", block(size, 9), pin: bad) }
            #expect(throws: FSError.self, "\(bad)") { try c.release(job: bad) }
        }
        #expect(try c.release(job: "job1") == 2)
        for i in 0..<3 { try put(c, "k/v\(i)", block(size, UInt8(30 + i))) }
        #expect(!c.contains("k/p1", length: size) || !c.contains("k/p2", length: size), "released blocks can be evicted")
        #expect(c.contains("k/p3", length: size) && c.contains("k/p4", length: size))
    }
}
