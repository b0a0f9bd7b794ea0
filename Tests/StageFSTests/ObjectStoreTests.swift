import Foundation
import ObjectStorage
import StageFSCore
import Testing

/// The stores the object-store tests run against.
enum StoreKind: String, CaseIterable, CustomTestStringConvertible, Sendable {
    case local, s3
    var testDescription: String { rawValue }
}

@Suite("Object storage", .timeLimit(.minutes(3)))
struct ObjectStoreTests {
    @Test(arguments: StoreKind.allCases)
    func putGetRangeListDelete(kind: StoreKind) throws {
        let dir = try makeTempDir("store")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var moto: MotoServer?
        let store: any ObjectStore
        switch kind {
        case .local:
            store = try openObjectStore(StoreConfig(storage: "file", bucket: dir + "/bucket"))
        case .s3:
            moto = try MotoServer()
            store = try openObjectStore(
                StoreConfig(storage: "s3", bucket: moto!.bucketURL("stagefs-test"), accessKey: "testing", secretKey: "testing"))
        }
        try store.create()
        try store.create()  // twice is fine
        let data = (0..<(1 << 20) + 17).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
        try store.put("vol/chunks/0/0/1_0_1048593", bytes: data)
        try store.put("vol/chunks/0/0/2_0_3", bytes: [1, 2, 3])
        try store.put("other/x", bytes: [9])
        #expect(try store.getAll("vol/chunks/0/0/1_0_1048593", size: data.count) == data)
        var part = [UInt8](repeating: 0, count: 1000)
        let n = try part.withUnsafeMutableBytes { try store.get("vol/chunks/0/0/1_0_1048593", offset: 5000, into: $0) }
        #expect(n == 1000 && part == Array(data[5000..<6000]))
        #expect(try store.head("vol/chunks/0/0/2_0_3") == 3)
        #expect(try store.head("vol/missing") == nil)
        #expect(try store.list(prefix: "vol/", limit: 100).map { $0.key } == ["vol/chunks/0/0/1_0_1048593", "vol/chunks/0/0/2_0_3"])
        #expect(try store.list(prefix: "vol/", limit: 100).last?.size == 3)
        #expect(try store.list(prefix: "vol/", limit: 100).allSatisfy { abs(($0.modified ?? 0) - Timespec.now().sec) < 120 }, "listings say when")
        // Pages: each starts after the last key of the one before, in key order across
        // directories (a directory sorts as its name and "/": "0/" after "0-x" and "0.y").
        for k in ["vol/chunks/0/1/1001_0_3", "vol/chunks/0/10/10000_0_3", "vol/chunks/0-x", "vol/chunks/0.y", "vol/chunks/1/1000/1000000_0_3"] {
            try store.put(k, bytes: [1, 2, 3])
        }
        let all = try store.list(prefix: "vol/chunks/", limit: 100).map(\.key)
        #expect(all == all.sorted { Array($0.utf8).lexicographicallyPrecedes(Array($1.utf8)) } && all.count == 7, "\(all)")
        var paged: [String] = []
        var after: String?
        while true {
            let page = try store.list(prefix: "vol/chunks/", after: after, limit: 2)
            paged += page.map(\.key)
            guard page.count == 2 else { break }
            after = page.last!.key
        }
        #expect(paged == all)
        expectErrno(ENOENT) { _ = try store.getAll("vol/missing", size: 10) }
        try store.delete("vol/chunks/0/0/2_0_3")
        try store.delete("vol/chunks/0/0/2_0_3")  // twice is fine
        #expect(try store.head("vol/chunks/0/0/2_0_3") == nil)
        try store.check(prefix: "vol")
        withExtendedLifetime(moto) {}
    }

    /// A directory bucket that defers its flushes: objects read back at once, `sync` flushes
    /// what was put before it, a failure reaches the caller that names the object even when
    /// another caller's batch met it, and the backlog is bounded.
    @Test func deferredFlushesAreKeptUntilSync() throws {
        let dir = try makeTempDir("deferred")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var config = StoreConfig(storage: "file", bucket: dir + "/bucket")
        config.deferSync = true
        let store = try #require(try openObjectStore(config) as? LocalObjectStore)
        try store.create()
        #expect(store.deferSync)
        for i in 0..<3 { try store.put("v/chunks/0/\(i)/obj", bytes: Array(repeating: UInt8(i), count: 5000)) }
        #expect(store.unsyncedCount == 3)
        #expect(try store.getAll("v/chunks/0/2/obj", size: 5000) == Array(repeating: 2, count: 5000))
        try store.sync(["v/chunks/0/1/obj"])
        #expect(store.unsyncedCount == 0, "a sync flushes everything put before it")
        try store.sync()  // nothing to do
        // An object deleted before the flush is no error.
        try store.put("v/chunks/0/9/gone", bytes: [1, 2, 3])
        try store.delete("v/chunks/0/9/gone")
        try store.sync(["v/chunks/0/9/gone"])
        // An object that cannot be flushed (here a FIFO put in its place: fdatasync refuses it)
        // fails the sync of its owner, once, though a periodic sync's batch met it first.
        try store.put("v/chunks/0/9/bad", bytes: [1])
        try store.put("v/chunks/0/9/good", bytes: [2])
        let bad = dir + "/bucket/v/chunks/0/9/bad"
        try FileManager.default.removeItem(atPath: bad)
        #expect(mkfifo(bad, 0o600) == 0)
        #expect(throws: FSError.self, "the batch's failure goes to the sync that met it") { try store.sync() }
        try store.sync(["v/chunks/0/9/good"])
        #expect(throws: FSError.self, "and to the owner of the object") { try store.sync(["v/chunks/0/9/bad"]) }
        try store.sync(["v/chunks/0/9/bad"])  // reported once
        for i in 0..<LocalObjectStore.unsyncedLimit - 1 { try store.put("v/many/\(i)", bytes: [1]) }
        #expect(store.unsyncedCount == LocalObjectStore.unsyncedLimit - 1)
        try store.put("v/many/last", bytes: [1])
        #expect(store.unsyncedCount == 0, "a put past the bound flushed the backlog")
        // Without deferSync each put is flushed before it returns: nothing waits.
        let plain = try #require(try openObjectStore(StoreConfig(storage: "file", bucket: dir + "/bucket")) as? LocalObjectStore)
        try plain.put("v/plain", bytes: [1])
        #expect(plain.unsyncedCount == 0)
    }

    /// A block of whole pages from a page-aligned buffer is written past the page cache
    /// (`O_DIRECT`) where the bucket's file system takes it: it reads back byte for byte, and
    /// none of its pages is left in the page cache. Other objects (a length not of whole pages,
    /// a buffer not aligned) go through the page cache and read back as well.
    @Test func wholePageBlocksAreWrittenPastThePageCache() throws {
        let dir = try makeTempDir("direct")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var config = StoreConfig(storage: "file", bucket: dir + "/bucket")
        config.deferSync = true
        let store = try #require(try openObjectStore(config) as? LocalObjectStore)
        try store.create()
        let n = 1 << 20
        let buf = Sys.map(n + 4096)
        defer { Sys.unmap(buf, n + 4096) }
        for i in 0..<(n + 4096) { buf.storeBytes(of: UInt8(truncatingIfNeeded: i &* 7 &+ i >> 12), toByteOffset: i, as: UInt8.self) }
        let whole = UnsafeRawBufferPointer(start: buf, count: n)
        let odd = UnsafeRawBufferPointer(start: buf, count: n + 100)
        let unaligned = UnsafeRawBufferPointer(start: buf + 512, count: n)
        try store.put("v/direct", whole)
        try store.put("v/odd", odd)
        try store.put("v/unaligned", unaligned)
        try store.sync()
        #expect(try store.getAll("v/direct", size: n) == Array(whole))
        #expect(try store.getAll("v/odd", size: n + 100) == Array(odd))
        #expect(try store.getAll("v/unaligned", size: n) == Array(unaligned))
        // (Whether this file system takes O_DIRECT at all: tmpfs does not.)
        let probe = open(dir + "/probe", O_WRONLY | O_CREAT | Sys.O_DIRECT, 0o600)
        guard probe >= 0 else { return }
        close(probe)
        // Read back the pages: mapped, not read (mincore says which are in memory). The reads
        // above went through the cache, so write again first.
        try store.put("v/direct2", whole)
        try store.sync()
        let fd = open(dir + "/bucket/v/direct2", O_RDONLY)
        #expect(fd >= 0)
        defer { close(fd) }
        let m = mmap(nil, n, PROT_READ, MAP_SHARED, fd, 0)
        #expect(m != MAP_FAILED)
        defer { munmap(m, n) }
        var resident = [UInt8](repeating: 0, count: n / 4096)
        #expect(mincore(m, n, &resident) == 0)
        let cached = resident.filter { $0 & 1 != 0 }.count
        #expect(cached == 0, "\(cached) of \(n / 4096) pages of a block written past the page cache are in it")
    }

    /// What another member of a shared bucket could plant under a block's name or directory
    /// (a link to a file or directory outside, a FIFO) is refused, never followed: nothing
    /// outside the bucket is read, created, changed or removed, and nothing hangs.
    @Test func plantedLinksAndFIFOsInABucketAreNeverFollowed() throws {
        let dir = try makeTempDir("planted")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let outside = dir + "/outside"
        try FileManager.default.createDirectory(atPath: outside, withIntermediateDirectories: true)
        try Array("secret\n".utf8).withUnsafeBytes { b in
            let fd = open(outside + "/secret", O_WRONLY | O_CREAT, 0o600)
            _ = write(fd, b.baseAddress, b.count)
            close(fd)
        }
        let bucket = dir + "/bucket"
        let store = try openObjectStore(StoreConfig(storage: "file", bucket: bucket))
        try store.create()
        try store.put("vol/chunks/0/0/1_0_3", bytes: [1, 2, 3])
        // A block replaced by a link to a file outside; a FIFO in place of another.
        #expect(unlink(bucket + "/vol/chunks/0/0/1_0_3") == 0 && symlink(outside + "/secret", bucket + "/vol/chunks/0/0/1_0_3") == 0)
        #expect(mkfifo(bucket + "/vol/chunks/0/0/2_0_3", 0o644) == 0)
        expectErrno(EIO) { _ = try store.getAll("vol/chunks/0/0/1_0_3", size: 3) }
        expectErrno(EIO) { _ = try store.head("vol/chunks/0/0/1_0_3") }
        expectErrno(EIO) { _ = try store.getAll("vol/chunks/0/0/2_0_3", size: 3) }
        #expect(try store.list(prefix: "vol/", limit: 10).isEmpty)
        // A chunk directory replaced by a link to a directory outside.
        #expect(symlink(outside, bucket + "/vol/chunks/5") == 0)
        expectErrno(EIO) { try store.put("vol/chunks/5/5000/5000000_0_3", bytes: [1, 2, 3]) }
        expectErrno(EIO) { try store.put("vol/chunks/5/secret", bytes: [1, 2, 3]) }
        expectErrno(EIO) { _ = try store.getAll("vol/chunks/5/secret", size: 7) }
        expectErrno(EIO) { try store.delete("vol/chunks/5/secret") }
        expectErrno(EIO) { try store.put("vol/../outside/new", bytes: [1]) }
        #expect(try FileManager.default.contentsOfDirectory(atPath: outside) == ["secret"])
        #expect(FileManager.default.contents(atPath: outside + "/secret") == Data("secret\n".utf8))
        // Deleting the planted block removes the link, not what it names.
        try store.delete("vol/chunks/0/0/1_0_3")
        #expect(FileManager.default.contents(atPath: outside + "/secret") == Data("secret\n".utf8))
        // The rest of the bucket still works.
        try store.put("vol/chunks/0/0/3_0_2", bytes: [7, 8])
        #expect(try store.getAll("vol/chunks/0/0/3_0_2", size: 2) == [7, 8])
    }

    @Test func wrongSecretIsAClearError() throws {
        let moto = try MotoServer(auth: true)
        let good = try openObjectStore(
            StoreConfig(storage: "s3", bucket: moto.bucketURL("authed"), accessKey: moto.accessKey, secretKey: moto.secretKey))
        try good.create()
        try good.check(prefix: "v")
        let bad = try openObjectStore(StoreConfig(storage: "s3", bucket: moto.bucketURL("authed"), accessKey: moto.accessKey, secretKey: "wrong"))
        do {
            try bad.check(prefix: "v")
            Issue.record("a wrong secret was accepted")
        } catch {
            #expect(error.code == EACCES)
            #expect(error.message.contains("SignatureDoesNotMatch"), "\(error.message)")
            #expect(error.message.contains("authed"))
        }
    }

    @Test func unreachableEndpointFailsAfterRetries() throws {
        var cfg = StoreConfig(storage: "s3", bucket: "http://127.0.0.1:\(freePort())/nobody", accessKey: "a", secretKey: "b")
        cfg.maxAttempts = 3
        cfg.timeout = 2
        let store = try openObjectStore(cfg)
        let start = Date()
        do {
            try store.put("k", bytes: [1])
            Issue.record("a put to a closed port succeeded")
        } catch {
            #expect(error.code == EIO)
            #expect(error.message.contains("cannot reach"), "\(error.message)")
        }
        #expect(Date().timeIntervalSince(start) < 10)
    }

    @Test func malformedBucketURLsAreUsageErrors() {
        for url in ["ftp://x/y", "http://", "localhost:9000/b"] {
            do {
                _ = try openObjectStore(StoreConfig(storage: "s3", bucket: url))
                Issue.record("\(url) was accepted")
            } catch {
                #expect(error.isUsage)
            }
        }
        #expect(throws: FSError.self) { _ = try openObjectStore(StoreConfig(storage: "file", bucket: "relative/dir")) }
    }
}
