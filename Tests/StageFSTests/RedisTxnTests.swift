import Foundation
import Metadata
import StageFSCore
import Testing

private let alice = Credential(uid: 1000, gid: 1000, groups: [1000])
private func n(_ s: String) -> [UInt8] { Array(s.utf8) }

/// A fresh volume on the transactional Redis engine, with the store of its first client.
private final class TxnFixture: @unchecked Sendable {
    let redis: RedisServer
    let url: String
    let meta: RedisTxnMetadata
    var store: RedisTxnStore { meta.store }

    init() throws {
        redis = try RedisServer()
        url = redis.url
        meta = try #require(try openMetadata(try MetaURL.parse(url), create: true) as? RedisTxnMetadata)
        try meta.initialize(VolumeFormat(name: "txn", storage: "file", bucket: "/tmp/none", trashDays: 0), force: false, rootMode: 0o777)
    }

    /// Another client of the same volume.
    func client() throws -> RedisTxnMetadata {
        try #require(try openMetadata(try MetaURL.parse(url)) as? RedisTxnMetadata)
    }

    /// Runs redis-cli against the server; returns its output lines.
    func cli(_ args: [String]) throws -> [String] {
        let (status, out) = try Spawn.run("/usr/bin/redis-cli", ["-p", "\(redis.port)"] + args)
        guard status == 0 else { throw TestFailure("redis-cli \(args.joined(separator: " ")): \(out)") }
        return out.split(separator: "\n").map(String.init)
    }
}

/// Round trips (read batches plus commits) and conflicts of `body` on the client of store `s`.
private func cost(_ s: RedisTxnStore, _ body: () throws -> Void) rethrows -> (trips: Int, conflicts: Int) {
    let a = s.stats
    try body()
    let b = s.stats
    return ((b.reads - a.reads) + (b.commits - a.commits), b.conflicts - a.conflicts)
}

private func chmod(_ m: any MetadataEngine, _ ino: Ino, _ mode: UInt16) throws {
    var r = SetAttrRequest(mask: .mode)
    r.mode = mode
    _ = try m.setattr(alice, ino, r)
}

/// The transaction layer of the Redis engine driven directly: conflicts, lost replies,
/// bounded retries, the client cache, the key layout, and round trips per operation.
@Suite("Redis transactions", .timeLimit(.minutes(2)))
struct RedisTxnTests {
    @Test func aConflictRunsTheTransactionAgainWithFreshValues() throws {
        let f = try TxnFixture()
        let other = try f.client()
        let (ino, _) = try f.meta.mknod(alice, rootIno, n("f"), .regular, 0o644, rdev: 0, target: nil)
        // Between this client's read of the inode and its commit, another client changes it.
        var meddled = false
        f.store.hooks.setBeforeCommit {
            if meddled { return }
            meddled = true
            try? chmod(other, ino, 0o600)
        }
        let before = f.store.stats
        let a = try f.meta.writeSlice(ino, 0, Slice(pos: 0, id: 7, size: 100, off: 0, len: 100), minSize: 100, mtime: .now(), sid: 0)
        f.store.hooks.setBeforeCommit(nil)
        #expect(meddled)
        #expect(a.size == 100 && a.mode == 0o600, "the retry saw the other client's change and kept it")
        let after = f.store.stats
        #expect(after.conflicts - before.conflicts == 1)
        #expect(after.commits - before.commits == 2)
        #expect(try other.getattr(ino).mode == 0o600 && other.getattr(ino).size == 100)
        #expect(try other.readChunk(ino, 0).count == 1, "the slice was appended once")
    }

    @Test func readModifyWriteLosesNoUpdate() throws {
        let f = try TxnFixture()
        let other = try f.client()
        let (ino, a0) = try f.meta.mknod(alice, rootIno, n("f"), .regular, 0o644, rdev: 0, target: nil)
        let bump = { (s: RedisTxnStore) throws(FSError) in
            try s.transaction(write: true) { (tx) throws(FSError) in
                guard var a = try s.attr(tx, ino) else { throw FSError.notFound }
                a.nlink += 1
                try s.putAttr(tx, ino, a)
            }
        }
        var rounds = 0
        f.store.hooks.setBeforeCommit {
            rounds += 1
            if rounds <= 3 { try? bump(other.store) }
        }
        try bump(f.store)
        f.store.hooks.setBeforeCommit(nil)
        // Three increments by the other client between read and commit, then this one.
        #expect(try f.meta.getattr(ino).nlink == a0.nlink + 4)
        #expect(f.store.stats.conflicts == 3)
    }

    @Test func aTransactionIsAValueAnotherThreadCanUse() throws {
        let f = try TxnFixture()
        let (ino, a0) = try f.meta.mknod(alice, rootIno, n("f"), .regular, 0o644, rdev: 0, target: nil)
        let s = f.store
        try s.transaction(write: true) { (tx) throws(FSError) in
            // Its reads and writes are made on another thread: nothing of the transaction is
            // found through the thread that started it.
            let box = TxnBox(tx)
            let done = DispatchSemaphore(value: 0)
            DispatchQueue.global().async {
                do throws(FSError) {
                    guard var a = try s.attr(box.tx, ino) else { throw FSError.notFound }
                    a.nlink += 1
                    try s.putAttr(box.tx, ino, a)
                } catch {
                    box.error = error
                }
                done.signal()
            }
            done.wait()
            if let e = box.error { throw e }
        }
        #expect(try f.meta.getattr(ino).nlink == a0.nlink + 1)
    }

    @Test func aCommitWhoseReplyIsLostIsAppliedOnce() throws {
        let f = try TxnFixture()
        let sid = try f.meta.newSession(SessionInfo(hostname: "h", pid: 1, mountPoint: "/m", version: "t"))
        let used = try f.meta.statfs()
        f.store.hooks.loseCommitReplies(1)
        let (ino, _) = try f.meta.create(alice, rootIno, n("once"), 0o644, sid: sid)
        #expect(f.store.stats.replays == 1, "the resend was answered from the request-id record")
        #expect(try f.meta.lookup(alice, rootIno, n("once")).0 == ino)
        #expect(try f.meta.statfs().usedInodes == used.usedInodes + 1, "counted once")
        f.store.hooks.loseCommitReplies(1)
        _ = try f.meta.writeSlice(ino, 0, Slice(pos: 0, id: 9, size: 10, off: 0, len: 10), minSize: 10, mtime: .now(), sid: 0)
        #expect(f.store.stats.replays == 2)
        #expect(try f.meta.readChunk(ino, 0).count == 1, "appended once")
        #expect(try f.meta.statfs().usedSpace == used.usedSpace + 4096)
        // The open recorded by create was counted once: one close frees the unlinked file.
        _ = try f.meta.unlink(alice, rootIno, n("once"))
        try f.meta.close(ino, sid: sid)
        expectErrno(ENOENT) { _ = try f.meta.getattr(ino) }
        #expect(try f.meta.pendingDeletes(limit: 10).contains { $0.ino == ino })
    }

    @Test func anOutsideRequestIDRecordsItsChangeOnceWithItsResult() throws {
        let f = try TxnFixture()
        let sid = try f.meta.newSession(SessionInfo(hostname: "h", pid: 1, mountPoint: "/m", version: "t"))
        let id = RequestID(session: sid, slot: 3, number: 7)
        let save: (Any) -> [UInt8]? = { v in (v as? (Ino, Attr)).map { withUnsafeBytes(of: $0.0.bigEndian) { Array($0) } } }
        #expect(try f.meta.carriedOut(id) == nil)
        let (ino, _) = try f.meta.recording(id, save: save) { () throws(FSError) in try f.meta.create(alice, rootIno, n("r"), 0o644, sid: sid) }
        #expect(try f.meta.carriedOut(id) == withUnsafeBytes(of: ino.bigEndian) { Array($0) }, "recorded with its result")
        // A second attempt of the same request whose body gets to its commit (another client:
        // e.g. a gateway after a restart) is refused there, unapplied.
        let other = try f.client()
        let ws = Slice(pos: 0, id: 9, size: 10, off: 0, len: 10)
        let wid = RequestID(session: sid, slot: 4, number: 8)
        _ = try f.meta.recording(wid, save: { _ in [] }) { () throws(FSError) in try f.meta.writeSlice(ino, 0, ws, minSize: 10, mtime: .now(), sid: 0)
        }
        #expect(try other.carriedOut(wid) == [], "recorded, nothing saved")
        let used = try f.meta.statfs().usedSpace
        expectErrno(EALREADY) {
            _ = try other.recording(wid, save: { _ in [] }) { () throws(FSError) in
                try other.writeSlice(ino, 0, ws, minSize: 10, mtime: .now(), sid: 0)
            }
        }
        #expect(try f.meta.readChunk(ino, 0).count == 1, "appended once")
        #expect(try f.meta.statfs().usedSpace == used)
        // A transaction the save function declines (nil) is not the request's change: it
        // commits without the id, which a later one takes.
        let lid = RequestID(session: sid, slot: 5, number: 9)
        var calls = 0
        _ = try f.meta.recording(
            lid,
            save: { _ in
                calls += 1; return calls == 1 ? nil : [1]
            }
        ) { () throws(FSError) -> Void in
            try f.meta.setxattr(alice, ino, n("user.a"), n("1"), .any)
            try f.meta.setxattr(alice, ino, n("user.b"), n("2"), .any)
        }
        #expect(try f.meta.carriedOut(lid) == [1])
        #expect(try f.meta.getxattr(alice, ino, n("user.a")) == n("1"))
        // Its own commit whose reply was lost: the resend finds the record, and the answer is
        // the result saved with the commit that applied.
        f.store.hooks.loseCommitReplies(1)
        let cid = RequestID(session: sid, slot: 6, number: 10)
        expectErrno(EALREADY) {
            _ = try f.meta.recording(cid, save: save) { () throws(FSError) in try f.meta.create(alice, rootIno, n("lost"), 0o644, sid: sid) }
        }
        #expect(try f.meta.carriedOut(cid) == withUnsafeBytes(of: try f.meta.lookup(alice, rootIno, n("lost")).0.bigEndian) { Array($0) })
        // Another sending of a request committed while this one's connection broke before its
        // commit went out: the record (that sending's result) answers, never this attempt's.
        let other2 = try f.client()
        let xid = RequestID(session: sid, slot: 7, number: 11)
        var fired = false
        f.store.hooks.setBeforeCommit {
            if fired { return }
            fired = true
            _ = try? other2.recording(xid, save: save) { () throws(FSError) in try other2.create(alice, rootIno, n("x"), 0o644, sid: sid) }
            _ = try? f.cli(["CLIENT", "KILL", "TYPE", "normal"])
        }
        expectErrno(EALREADY) {
            _ = try f.meta.recording(xid, save: save) { () throws(FSError) in try f.meta.create(alice, rootIno, n("x"), 0o644, sid: sid) }
        }
        f.store.hooks.setBeforeCommit(nil)
        #expect(fired)
        #expect(try f.meta.carriedOut(xid) == withUnsafeBytes(of: try f.meta.lookup(alice, rootIno, n("x")).0.bigEndian) { Array($0) })
        // An older number arriving after a later one of its slot is not applied.
        expectErrno(ESTALE) {
            _ = try f.meta.recording(RequestID(session: sid, slot: 7, number: 2), save: save) { () throws(FSError) in
                try f.meta.create(alice, rootIno, n("z"), 0o644, sid: sid)
            }
        }
        expectErrno(ENOENT) { _ = try f.meta.lookup(alice, rootIno, n("z")) }
        // A slot moved on to a later number no longer answers for the earlier one; the records
        // go with the session.
        #expect(try f.meta.carriedOut(RequestID(session: sid, slot: 3, number: 6)) == nil)
        try f.meta.closeSession(sid)
        #expect(try f.meta.carriedOut(id) == nil)
    }

    @Test func retriesAreBoundedAndNameTheContention() throws {
        let f = try TxnFixture()
        let other = try f.client()
        let (ino, _) = try f.meta.mknod(alice, rootIno, n("hot"), .regular, 0o644, rdev: 0, target: nil)
        f.store.maxAttempts = 4
        var mode: UInt16 = 0o600
        f.store.hooks.setBeforeCommit {
            mode ^= 0o044
            try? chmod(other, ino, mode)
        }
        let before = f.store.stats.commits
        do {
            _ = try f.meta.writeSlice(ino, 0, Slice(pos: 0, id: 1, size: 1, off: 0, len: 1), minSize: 1, mtime: .now(), sid: 0)
            Issue.record("a transaction that always conflicts succeeded")
        } catch {
            #expect(error.code == EIO)
            #expect(error.message.contains("contention") && error.message.contains("i\(ino)"), "\(error.message)")
        }
        #expect(f.store.stats.commits - before == 4)
        #expect(try other.readChunk(ino, 0).isEmpty, "nothing applied")
        f.store.hooks.setBeforeCommit(nil)
        #expect(try f.meta.writeSlice(ino, 0, Slice(pos: 0, id: 1, size: 1, off: 0, len: 1), minSize: 1, mtime: .now(), sid: 0).size == 1)
    }

    @Test func aStaleCachedReadNeverCausesAnError() throws {
        let f = try TxnFixture()
        let other = try f.client()
        let (dir, _) = try f.meta.mknod(alice, rootIno, n("d"), .directory, 0o755, rdev: 0, target: nil)
        _ = try f.meta.mknod(alice, dir, n("x"), .regular, 0o644, rdev: 0, target: nil)
        // This client remembers that "x" exists; another client removes it.
        _ = try other.unlink(alice, dir, n("x"))
        let (ino, _) = try f.meta.mknod(alice, dir, n("x"), .regular, 0o644, rdev: 0, target: nil)
        #expect(f.store.stats.refreshes == 1, "EEXIST from the cache was checked with fresh reads")
        #expect(try other.lookup(alice, dir, n("x")).0 == ino)
        // And the other way round: remembered as missing, created meanwhile elsewhere.
        _ = try other.mknod(alice, dir, n("y"), .regular, 0o644, rdev: 0, target: nil)
        expectErrno(EEXIST) { _ = try f.meta.mknod(alice, dir, n("y"), .regular, 0o644, rdev: 0, target: nil) }
    }

    @Test func aFailedCheckOrARefusedCommitWritesNothing() throws {
        let f = try TxnFixture()
        _ = try f.cli(["SET", "{0}a", "old"])
        _ = try f.cli(["SET", "{0}n", "not a number"])
        let sha = try f.cli(["SCRIPT", "LOAD", RedisTxnScripts.commit]).first ?? ""
        // A check that fails: nothing is written, the reply names check 1 and its value now.
        let stale = String(decoding: RedisTxnStore.expectation(value: Array("older".utf8)), as: UTF8.self)
        let r1 = try f.cli(["EVALSHA", sha, "3", "{0}rqT", "{0}a", "{0}b", "1:1", "1", "GET", "2", "0", stale, "SET", "3", "1", "new"])
        #expect(r1 == ["2", "1", "old"])
        #expect(try f.cli(["EXISTS", "{0}b"]) == ["0"])
        // A long value is checked by its SHA-1: a different one fails, the same one passes.
        let long = String(repeating: "x", count: 400)
        _ = try f.cli(["SET", "{0}long", long])
        let longOld = String(decoding: RedisTxnStore.expectation(value: Array(String(repeating: "y", count: 400).utf8)), as: UTF8.self)
        let longNow = String(decoding: RedisTxnStore.expectation(value: Array(long.utf8)), as: UTF8.self)
        #expect(longNow.count == 40 && longOld != longNow)
        let r1b = try f.cli(["EVALSHA", sha, "3", "{0}rqT", "{0}long", "{0}b", "", "1", "GET", "2", "0", longOld, "SET", "3", "1", "new"])
        #expect(r1b == ["2", "1", long], "a long value that changed: \(r1b)")
        #expect(try f.cli(["EXISTS", "{0}b"]) == ["0"])
        let r1c = try f.cli(["EVALSHA", sha, "3", "{0}rqT", "{0}long", "{0}b", "", "1", "GET", "2", "0", longNow, "SET", "3", "1", "new"])
        #expect(r1c == ["0"], "\(r1c)")
        _ = try f.cli(["DEL", "{0}b"])
        // A write that would fail halfway (INCRBY of a non-number after a SET): refused before the SET.
        let ok = String(decoding: RedisTxnStore.expectation(value: Array("old".utf8)), as: UTF8.self)
        let r2 = try f.cli([
            "EVALSHA", sha, "3", "{0}rqT", "{0}a", "{0}n", "1:2", "1", "GET", "2", "0", ok, "SET", "2", "1", "new", "INCRBY", "3", "1", "5",
        ])
        #expect(r2.joined().contains("refused"), "\(r2)")
        #expect(try f.cli(["GET", "{0}a"]) == ["old"])
        // A write to a key of another kind (a hash field of a string), after a SET: refused first.
        let r2b = try f.cli(["EVALSHA", sha, "3", "{0}rqT", "{0}b", "{0}a", "1:2", "0", "SET", "2", "1", "new", "HSET", "3", "2", "f", "v"])
        #expect(r2b.joined().contains("refused"), "\(r2b)")
        #expect(try f.cli(["EXISTS", "{0}b"]) == ["0"])
        // Applied once; the same request again is answered from the record.
        let r3 = try f.cli([
            "EVALSHA", sha, "3", "{0}rqT", "{0}a", "{0}c", "1:3", "1", "GET", "2", "0", ok, "SET", "2", "1", "new", "INCRBY", "3", "1", "5",
        ])
        let r4 = try f.cli([
            "EVALSHA", sha, "3", "{0}rqT", "{0}a", "{0}c", "1:3", "1", "GET", "2", "0", ok, "SET", "2", "1", "new", "INCRBY", "3", "1", "5",
        ])
        #expect(r3 == ["0"] && r4 == ["1"])
        #expect(try f.cli(["GET", "{0}c"]) == ["5"])
    }

    /// From format 5 a file's chunk index names its chunks from 1 on, and a chunk 0 of one
    /// record is kept after the file's attributes: a file written once has one key. The next
    /// record moves it to the chunk's key, in order, also from a client that does not know the
    /// format, and a change of the attributes keeps it. A volume of an earlier format keeps
    /// naming chunk 0 in the index (an older StageFS mounted on it finds chunks only through
    /// it), and a file whose index names chunk 0 is read, truncated, dumped and deleted with
    /// it counted once.
    @Test func chunkZeroHasNoIndexEntryFromFormat5() throws {
        let f = try TxnFixture()
        let m = f.meta
        func slice(_ id: UInt64) -> Slice { Slice(pos: 0, id: id, size: 100, off: 0, len: 100) }
        func write(_ name: String, _ chunks: [UInt32], id: UInt64) throws -> Ino {
            let (ino, _) = try m.mknod(alice, rootIno, n(name), .regular, 0o644, rdev: 0, target: nil)
            for (i, c) in chunks.enumerated() {
                _ = try m.writeSlice(ino, c, slice(id + UInt64(i)), minSize: UInt64(c) << 26 + 100, mtime: .now(), sid: 0)
            }
            return ino
        }
        let one = try write("one", [0], id: 10)
        let three = try write("three", [0, 1, 5], id: 20)
        #expect(try f.cli(["EXISTS", "{0}k\(one)", "{0}c\(one)_0", "{0}c\(three)_0"]) == ["0"])
        #expect(try f.cli(["ZRANGE", "{0}k\(three)", "0", "-1"]) == ["1", "5"])
        #expect(try m.readChunk(one, 0).map(\.id) == [10] && m.open(alice, one, flags: O_RDONLY, sid: 0).1?.map(\.id) == [10])
        let two = try write("two", [0, 0], id: 40)
        #expect(try m.readChunk(two, 0).map(\.id) == [40, 41] && f.cli(["STRLEN", "{0}c\(two)_0"]) == ["48"])
        // A client that never read the format: its changes keep the record with the attributes,
        // and its next record goes after it.
        let other = try f.client()
        let solo = try write("solo", [0], id: 50)
        try chmod(other, solo, 0o600)
        #expect(try m.readChunk(solo, 0).map(\.id) == [50] && m.getattr(solo).mode == 0o600)
        _ = try other.writeSlice(solo, 0, slice(51), minSize: 100, mtime: .now(), sid: 0)
        #expect(try m.readChunk(solo, 0).map(\.id) == [50, 51] && other.readChunk(solo, 0).map(\.id) == [50, 51])
        // As an earlier format wrote it: chunk 0 in the index too.
        let old = try write("old", [0, 2], id: 30)
        _ = try f.cli(["ZADD", "{0}k\(old)", "0", "0"])
        let sink = BytesSink()
        _ = try m.dump(into: sink, keepSecrets: false)
        let dumped = String(decoding: sink.bytes, as: UTF8.self)
        for ino in [one, three, old] {
            let line = try #require(dumped.split(separator: "\n").first { $0.hasPrefix("{\"i\":\(ino),") })
            #expect(line.components(separatedBy: "[0,[[").count == 2, "chunk 0 once in \(line)")
        }
        // Truncation to 0 finds chunk 0 through its key (and once where the index names it).
        var cut = SetAttrRequest(mask: .size)
        cut.size = 0
        _ = try m.setattr(alice, old, cut)
        _ = try m.setattr(alice, one, cut)
        let dropped = try m.takeDroppedSlices(limit: 100).map(\.id).sorted()
        #expect(dropped == [10, 30, 31])
        for ino in [old, one] { #expect(try f.cli(["EXISTS", "{0}c\(ino)_0", "{0}k\(ino)", "{0}c\(ino)_2"]) == ["0"]) }
        // Deletion in steps of one chunk finds all three, chunk 0 first.
        _ = try m.unlink(alice, rootIno, n("three"))
        var freed: [UInt64] = []
        while true {
            let (slices, done) = try m.finishDelete(PendingDelete(ino: three, size: 5 << 26 + 100))
            freed += slices.map(\.id)
            if done { break }
        }
        #expect(freed == [20, 21, 22])
        #expect(try f.cli(["KEYS", "{0}[ck]\(three)*"]) == [])

        // A volume of format 2 names chunk 0 in its index, and a format written again keeps
        // its version (a StageFS of that format may have it mounted).
        let r = try RedisServer()
        let v2 = try #require(try openMetadata(try MetaURL.parse(r.url), create: true) as? RedisTxnMetadata)
        var format = VolumeFormat(name: "v2", storage: "file", bucket: "/tmp/none", trashDays: 0)
        format.version = 2
        try v2.initialize(format, force: false, rootMode: 0o777)
        try v2.initialize(VolumeFormat(name: "v2", storage: "file", bucket: "/tmp/none", trashDays: 0), force: false, rootMode: 0o777)
        #expect(try v2.requireFormat().version == 2)
        let (file, _) = try v2.mknod(alice, rootIno, n("f"), .regular, 0o644, rdev: 0, target: nil)
        _ = try v2.writeSlice(file, 0, slice(1), minSize: 0, mtime: .now(), sid: 0)
        let (rc, out) = try Spawn.run("/usr/bin/redis-cli", ["-p", "\(r.port)", "ZRANGE", "{0}k\(file)", "0", "-1"])
        #expect(rc == 0 && out == "0\n", "\(out)")
        // Version 4, a development build's layout with another short encoding, is refused.
        let r4 = try RedisServer()
        let v4 = try openMetadata(try MetaURL.parse(r4.url), create: true)
        format.version = 4
        try v4.initialize(format, force: false, rootMode: 0o777)
        expectErrno(EINVAL) { _ = try v4.requireFormat() }
    }

    @Test func keysCarryTheVolumeHashTagAndUntaggedVolumesStayReadable() throws {
        let f = try TxnFixture()
        let sid = try f.meta.newSession(SessionInfo(hostname: "h", pid: 1, mountPoint: "/m", version: "t"))
        let (ino, _) = try f.meta.create(alice, rootIno, n("f"), 0o644, sid: sid)
        _ = try f.meta.writeSlice(ino, 0, Slice(pos: 0, id: 1, size: 1, off: 0, len: 1), minSize: 1, mtime: .now(), sid: 0)
        _ = try f.meta.writeSlice(ino, 1, Slice(pos: 0, id: 2, size: 1, off: 0, len: 1), minSize: 1, mtime: .now(), sid: 0)
        try f.meta.setxattr(alice, ino, n("user.k"), n("v"), .any)
        try f.meta.updateLocks(ino, kind: UInt8(ascii: "f"), sid: sid) { _ in [1, 2, 3] }
        let keys = try f.cli(["KEYS", "*"])
        #expect(!keys.isEmpty && keys.allSatisfy { $0.hasPrefix("{0}") }, "\(keys)")
        // The names are a stored format (the script engine of earlier versions wrote the same).
        let expected = [
            "{0}i\(ino)", "{0}c\(ino)_1", "{0}k\(ino)", "{0}x\(ino)", "{0}xb\(ino)", "{0}d1", "{0}z1", "{0}o\(ino)", "{0}so\(sid)", "{0}lkf\(ino)",
            "{0}sl\(sid)", "{0}setting",
        ]
        for k in expected {
            #expect(keys.contains(k), "\(k) in \(keys)")
        }

        // A volume formatted before volumes had a hash tag (the same names without it, as the
        // script engine of earlier versions wrote them): used as it is, and kept untagged.
        let r = try RedisServer()
        let first = try openMetadata(try MetaURL.parse(r.url), create: true)
        try first.initialize(VolumeFormat(name: "old", storage: "file", bucket: "/tmp/none"), force: false, rootMode: 0o777)
        let (old, _) = try first.mknod(alice, rootIno, n("old"), .regular, 0o644, rdev: 0, target: nil)
        let untag = "for _, k in ipairs(redis.call('KEYS', '{0}*')) do redis.call('RENAME', k, string.sub(k, 4)) end return 1"
        let (rc, out) = try Spawn.run("/usr/bin/redis-cli", ["-p", "\(r.port)", "EVAL", untag, "0"])
        #expect(rc == 0 && out.hasPrefix("1"), "\(out)")
        let txn = try openMetadata(try MetaURL.parse(r.url + "?engine=txn"))
        #expect(try txn.requireFormat().name == "old")
        #expect(try txn.lookup(alice, rootIno, n("old")).0 == old)
        let (new, _) = try txn.mknod(alice, rootIno, n("new"), .directory, 0o755, rdev: 0, target: nil)
        #expect(try txn.readdir(rootIno, after: 0, limit: 10, plus: false).map(\.nameString).sorted() == ["new", "old"])
        _ = try txn.rename(alice, rootIno, n("old"), new, n("moved"), [])
        #expect(try openMetadata(try MetaURL.parse(r.url)).lookup(alice, new, n("moved")).0 == old)
        let (_, stdout) = try Spawn.run("/usr/bin/redis-cli", ["-p", "\(r.port)", "KEYS", "{*"])
        #expect(stdout.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty, "no tagged key in an untagged volume: \(stdout)")
    }

    @Test func createsAndUnlinksInOneDirectoryDoNotConflictOverItsTimes() throws {
        let f = try TxnFixture()
        let other = try f.client()
        let (dir, _) = try f.meta.mknod(alice, rootIno, n("d"), .directory, 0o777, rdev: 0, target: nil)
        _ = try other.mknod(alice, dir, n("gone"), .regular, 0o644, rdev: 0, target: nil)
        var step = 0
        f.store.hooks.setBeforeCommit {
            step += 1
            switch step {
            case 1: _ = try? other.mknod(alice, dir, n("theirs"), .regular, 0o644, rdev: 0, target: nil)
            case 2: _ = try? other.unlink(alice, dir, n("gone"))
            case 3: _ = try? other.mknod(alice, dir, n("sub"), .directory, 0o755, rdev: 0, target: nil)
            default: break
            }
        }
        // Another client creates, then unlinks, in the directory between this client's reads and
        // its commits: they changed only the directory's times, so nothing conflicts.
        _ = try f.meta.mknod(alice, dir, n("mine"), .regular, 0o644, rdev: 0, target: nil)
        _ = try f.meta.unlink(alice, dir, n("mine"))
        #expect(f.store.stats.conflicts == 0)
        // A mkdir changes the directory's link count: that conflicts, and the retry keeps it.
        _ = try f.meta.mknod(alice, dir, n("mine2"), .regular, 0o644, rdev: 0, target: nil)
        f.store.hooks.setBeforeCommit(nil)
        #expect(f.store.stats.conflicts == 1)
        let a = try other.getattr(dir)
        #expect(a.nlink == 3)
        let mine2 = try other.lookup(alice, dir, n("mine2")).1
        #expect(a.mtime == mine2.ctime && a.ctime == mine2.ctime, "the last change set the directory's times")
        var names: [String] = []
        for e in try other.readdir(dir, after: 0, limit: 100, plus: false) { names.append(e.nameString) }
        #expect(names.sorted() == ["mine2", "sub", "theirs"])
    }

    @Test func manyWritersInOneDirectoryAllSucceed() throws {
        let f = try TxnFixture()
        let clients = [f.meta, try f.client(), try f.client()]
        let (dir, _) = try f.meta.mknod(alice, rootIno, n("shared"), .directory, 0o777, rdev: 0, target: nil)
        let perThread = 60
        let threads = 4
        let failures = Locked<[String]>([])
        DispatchQueue.concurrentPerform(iterations: clients.count * threads) { i in
            let m = clients[i % clients.count]
            for j in 0..<perThread {
                do {
                    let (ino, _) = try m.mknod(alice, dir, n("f\(i)-\(j)"), .regular, 0o644, rdev: 0, target: nil)
                    if j % 3 == 0 {
                        _ = try m.unlink(alice, dir, n("f\(i)-\(j)"))
                    } else {
                        _ = try m.writeSlice(ino, 0, Slice(pos: 0, id: 1, size: 1, off: 0, len: 1), minSize: 1, mtime: .now(), sid: 0)
                    }
                } catch {
                    failures.withLock { $0.append("\(error)") }
                }
            }
        }
        #expect(failures.withLock { $0 }.isEmpty, "\(failures.withLock { $0 }.prefix(3))")
        var names: [String] = []
        var cookie: UInt64 = 0
        while true {
            let page = try f.meta.readdir(dir, after: cookie, limit: 100, plus: false)
            if page.isEmpty { break }
            names += page.map(\.nameString)
            cookie = page.last!.cookie
        }
        let expected = clients.count * threads * (perThread - (perThread + 2) / 3)
        #expect(names.count == expected && Set(names).count == expected)
        #expect(try f.meta.getattr(dir).nlink == 2)
        let conflicts = clients.map { $0.store.stats.conflicts }.reduce(0, +)
        let commits = clients.map { $0.store.stats.commits }.reduce(0, +)
        print("shared directory: \(commits) commits, \(conflicts) conflicts")
    }

    /// Round trips per operation (read batches plus commits; the ids reserved 1000 at a time
    /// are left out). Cold: a new client that has seen nothing; warm: a client that did what
    /// the kernel does first (a lookup before a create, a create before the write, a lookup
    /// before an unlink).
    @Test func roundTripsOfTheHotPaths() throws {
        let f = try TxnFixture()
        let m = f.meta
        let sid = try m.newSession(SessionInfo(hostname: "h", pid: 1, mountPoint: "/m", version: "t"))
        let (dir, _) = try m.mknod(alice, rootIno, n("d"), .directory, 0o777, rdev: 0, target: nil)
        func trips(_ s: RedisTxnStore, _ body: () throws -> Void) rethrows -> Int { try cost(s, body).trips }
        var warm: [String: Int] = [:]
        warm["lookup (missing)"] = trips(f.store) { expectErrno(ENOENT) { _ = try m.lookup(alice, dir, n("a")) } }
        warm["create"] = try trips(f.store) { _ = try m.create(alice, dir, n("a"), 0o644, sid: sid) }
        let ino = try m.lookup(alice, dir, n("a")).0
        warm["write-slice commit"] = try trips(f.store) {
            _ = try m.writeSlice(ino, 0, Slice(pos: 0, id: 5, size: 4096, off: 0, len: 4096), minSize: 4096, mtime: .now(), sid: 0)
        }
        warm["close"] = try trips(f.store) { try m.close(ino, sid: sid) }
        warm["lookup"] = try trips(f.store) { _ = try m.lookup(alice, dir, n("a")) }
        warm["getattr"] = try trips(f.store) { _ = try m.getattr(ino) }
        var first: [Slice]?
        warm["open"] = try trips(f.store) { first = try m.open(alice, ino, flags: O_RDONLY, sid: sid).1 }
        #expect(first == [Slice(pos: 0, id: 5, size: 4096, off: 0, len: 4096)], "open brings the first chunk's slices")
        try m.close(ino, sid: sid)
        _ = try m.create(alice, dir, n("b"), 0o644, sid: sid)
        warm["unlink"] = try trips(f.store) { _ = try m.unlink(alice, dir, n("b")) }
        // Elsewhere (the directory above is listed below).
        let (other, _) = try m.mknod(alice, rootIno, n("o"), .directory, 0o777, rdev: 0, target: nil)
        _ = try? m.lookup(alice, other, n("m"))
        warm["mkdir"] = try trips(f.store) { _ = try m.mknod(alice, other, n("m"), .directory, 0o755, rdev: 0, target: nil) }
        _ = try? m.lookup(alice, other, n("l"))
        warm["link"] = try trips(f.store) { _ = try m.link(alice, ino, other, n("l")) }
        _ = try? m.lookup(alice, other, n("r"))
        warm["rename"] = try trips(f.store) { _ = try m.rename(alice, other, n("l"), other, n("r"), []) }
        warm["chmod"] = try trips(f.store) { try chmod(m, ino, 0o640) }
        try m.setxattr(alice, ino, n("user.k"), n("v"), .any)
        warm["setxattr"] = try trips(f.store) { try m.setxattr(alice, ino, n("user.k"), n("v2"), .any) }
        warm["getxattr"] = try trips(f.store) { _ = try m.getxattr(alice, ino, n("user.k")) }
        // A deleted file's chunks, listed with their records in one read, removed in one commit.
        let (big, _) = try m.create(alice, dir, n("big"), 0o644, sid: sid)
        for i in 0..<3 {
            _ = try m.writeSlice(
                big, UInt32(i), Slice(pos: 0, id: UInt64(10 + i), size: 7, off: 0, len: 7), minSize: UInt64(i) * chunkSize + 7, mtime: .now(), sid: 0)
        }
        try m.close(big, sid: sid)
        _ = try m.unlink(alice, dir, n("big"))
        let pending = try #require(try m.pendingDeletes(limit: 10).first { $0.ino == big })
        var finished: (slices: [Slice], done: Bool) = ([], false)
        let finish = try trips(f.store) { finished = try m.finishDelete(pending) }
        #expect(finish == 2 && finished.done && finished.slices.map(\.id).sorted() == [10, 11, 12], "finishing a delete: \(finish) round trips")

        var cold: [String: Int] = [:]
        // A new client, as a mount starts: it reads the format record and registers a session.
        func fresh() throws -> (RedisTxnMetadata, UInt64) {
            let c = try f.client()
            _ = try c.loadFormat()
            return (c, try c.newSession(SessionInfo(hostname: "h", pid: 2, mountPoint: "/m", version: "t")))
        }
        var (c, csid) = try fresh()
        cold["lookup (missing)"] = trips(c.store) { expectErrno(ENOENT) { _ = try c.lookup(alice, dir, n("x")) } }
        (c, csid) = try fresh()
        cold["lookup"] = try trips(c.store) { _ = try c.lookup(alice, dir, n("a")) }
        (c, csid) = try fresh()
        cold["getattr"] = try trips(c.store) { _ = try c.getattr(ino) }
        (c, csid) = try fresh()
        var listed: [DirEntry] = []
        let readdirPlus = try trips(c.store) { listed = try c.readdir(dir, after: 0, limit: 100, plus: true, xattrs: true) }
        #expect(readdirPlus == 1 && listed.count == 1 && listed[0].attr?.size == 4096, "a page of a directory with attributes in one round trip")
        #expect(listed.first?.hasXattrs == true, "and whether each has extended attributes (user.k)")
        (c, csid) = try fresh()
        cold["open"] = try trips(c.store) { first = try c.open(alice, ino, flags: O_RDONLY, sid: csid).1 }
        #expect(first == [Slice(pos: 0, id: 5, size: 4096, off: 0, len: 4096)])
        cold["close"] = try trips(c.store) { try c.close(ino, sid: csid) }
        (c, csid) = try fresh()
        cold["write-slice commit"] = try trips(c.store) {
            _ = try c.writeSlice(ino, 0, Slice(pos: 0, id: 6, size: 1, off: 0, len: 1), minSize: 1, mtime: .now(), sid: 0)
        }
        (c, csid) = try fresh()
        cold["create"] = try trips(c.store) { _ = try c.create(alice, dir, n("e"), 0o644, sid: csid) }
        (c, csid) = try fresh()
        cold["unlink"] = try trips(c.store) { _ = try c.unlink(alice, dir, n("e")) }
        (c, csid) = try fresh()
        cold["mkdir"] = try trips(c.store) { _ = try c.mknod(alice, other, n("m2"), .directory, 0o755, rdev: 0, target: nil) }
        (c, csid) = try fresh()
        cold["link"] = try trips(c.store) { _ = try c.link(alice, ino, other, n("l2")) }
        (c, csid) = try fresh()
        cold["rename"] = try trips(c.store) { _ = try c.rename(alice, other, n("l2"), other, n("r2"), []) }
        (c, csid) = try fresh()
        cold["chmod"] = try trips(c.store) { try chmod(c, ino, 0o644) }
        (c, csid) = try fresh()
        cold["setxattr"] = try trips(c.store) { try c.setxattr(alice, ino, n("user.k"), n("w"), .any) }
        (c, csid) = try fresh()
        cold["getxattr"] = try trips(c.store) { _ = try c.getxattr(alice, ino, n("user.k")) }
        // A client whose cached directory is stale (other clients created files there since):
        // they changed only its times, which the commit does not check.
        let stale = try trips(f.store) { _ = try m.create(alice, dir, n("s"), 0o644, sid: sid) }

        for k in warm.keys.sorted() { print("round trips: \(k): cold \(cold[k] ?? -1), warm \(warm[k]!)") }
        print("round trips: create with a stale directory: \(stale)")
        for (k, v) in warm { #expect(v == 1, "\(k) warm: \(v)") }
        for (k, v) in cold { #expect(v <= (k.hasPrefix("lookup") || k == "getattr" ? 1 : 2), "\(k) cold: \(v)") }
        #expect(stale == 1)
    }

    /// What a lookup saw waits to be noted in the client cache until a transaction asks it, and
    /// is noted then; only the newest reads wait. Another client changes the file first, so a
    /// cache that missed the lookup's reads would hand the next change an old attribute record
    /// and its commit would conflict.
    @Test func lookupsAreNotedWhenAskedForAndFewWait() throws {
        let f = try TxnFixture()
        let m = f.meta
        let other = try f.client()
        let sid = try m.newSession(SessionInfo(hostname: "h", pid: 1, mountPoint: "/m", version: "t"))
        let (dir, _) = try m.mknod(alice, rootIno, n("d"), .directory, 0o777, rdev: 0, target: nil)
        let (ino, _) = try m.create(alice, dir, n("a"), 0o644, sid: sid)
        try m.close(ino, sid: sid)
        /// The other client changes the file; this one looks it up and opens it.
        func lookupAndOpen(mode: UInt16) throws -> (trips: Int, conflicts: Int) {
            try chmod(other, ino, mode)
            _ = try m.lookup(alice, dir, n("a"))
            let c = try cost(f.store) { _ = try m.open(alice, ino, flags: O_RDONLY, sid: sid) }
            try m.close(ino, sid: sid)
            return c
        }

        try chmod(other, ino, 0o640)
        let before = f.store.cacheSizes
        _ = try m.lookup(alice, dir, n("a"))
        let looked = f.store.cacheSizes
        #expect(looked.pending > before.pending, "a lookup's reads wait: \(before) then \(looked)")
        let open = try cost(f.store) { _ = try m.open(alice, ino, flags: O_RDONLY, sid: sid) }
        #expect(open.trips == 1 && open.conflicts == 0, "the open after a lookup: \(open)")
        #expect(f.store.cacheSizes.pending == 0)
        try m.close(ino, sid: sid)

        // A change of this client's own after a lookup starts from what the lookup saw, and the
        // open after it finds what the change wrote.
        try chmod(other, ino, 0o604)
        _ = try m.lookup(alice, dir, n("a"))
        let change = try cost(f.store) { try chmod(m, ino, 0o644) }
        #expect(change.trips == 1 && change.conflicts == 0, "a chmod after a lookup: \(change)")
        let afterChange = try cost(f.store) { _ = try m.open(alice, ino, flags: O_RDONLY, sid: sid) }
        #expect(afterChange.trips == 1 && afterChange.conflicts == 0, "the open after a lookup and a chmod: \(afterChange)")
        try m.close(ino, sid: sid)

        let limit = 4096
        for i in 0..<(limit + 1000) {
            expectErrno(ENOENT) { _ = try m.lookup(alice, dir, n("missing\(i)")) }
            let p = f.store.cacheSizes.pending
            if p > limit {
                Issue.record("\(p) reads wait after \(i + 1) lookups")
                break
            }
        }
        #expect(f.store.cacheSizes.pending > 0)
        let last = try lookupAndOpen(mode: 0o600)
        #expect(last.trips == 1 && last.conflicts == 0, "the open after a lookup, after many: \(last)")
    }
}

/// Whether `body` holds within `seconds` (asked every millisecond).
private func within(_ seconds: Double, _ body: () throws -> Bool) rethrows -> Bool {
    let end = Date().addingTimeInterval(seconds)
    while Date() < end {
        if try body() { return true }
        usleep(1000)
    }
    return try body()
}

/// The client cache kept coherent by Redis's client tracking (the gateway's): lookups and
/// getattr answer without a round trip, and another client's change is seen once its
/// invalidation arrives, never an older value after a newer one, and nothing is trusted once
/// what tracks it is gone.
@Suite("Redis client tracking", .timeLimit(.minutes(2)))
struct RedisTrackingTests {
    private func tracked(_ f: TxnFixture) throws -> RedisTxnMetadata {
        let t = try #require(try openMetadata(try MetaURL.parse(f.url), tracking: true) as? RedisTxnMetadata)
        #expect(within(5) { t.store.trackingLive }, "tracking starts")
        return t
    }

    private func mode(_ m: any MetadataEngine, _ ino: Ino) throws -> UInt16 { try m.getattr(ino).mode & 0o7777 }

    @Test func lookupsAndStatsAnswerFromTheCacheAndSeeOtherClientsChanges() throws {
        let f = try TxnFixture()
        let t = try tracked(f)
        let other = f.meta
        let (dir, _) = try t.mknod(alice, rootIno, n("d"), .directory, 0o777, rdev: 0, target: nil)
        let (ino, _) = try t.mknod(alice, dir, n("f"), .regular, 0o644, rdev: 0, target: nil)
        let (empty, _) = try t.mknod(alice, rootIno, n("e"), .directory, 0o777, rdev: 0, target: nil)
        // What this client wrote, and a new directory's (empty) entries, answer without asking.
        var found: (Ino, UInt16) = (0, 0)
        let own = try cost(t.store) {
            found = (try t.lookup(alice, dir, n("f")).0, try mode(t, ino))
            expectErrno(ENOENT) { _ = try t.lookup(alice, empty, n("missing")) }
            expectErrno(ENOENT) { _ = try t.lookup(alice, dir, n("missing")) }
            _ = try t.getattr(dir)
        }
        #expect(found == (ino, 0o644))
        #expect(own.trips == 0, "lookups and getattr of what this client wrote: \(own.trips) round trips")
        // Another client's change: seen once the invalidation arrives.
        try chmod(other, ino, 0o600)
        #expect(try within(2) { try mode(t, ino) == 0o600 }, "another client's chmod is seen")
        _ = try other.mknod(alice, dir, n("missing"), .regular, 0o644, rdev: 0, target: nil)
        #expect(try within(2) { (try? t.lookup(alice, dir, n("missing"))) != nil }, "another client's create is seen")
        _ = try other.unlink(alice, dir, n("f"))
        #expect(try within(2) { (try? t.lookup(alice, dir, n("f"))) == nil }, "another client's unlink is seen")
        // What was read before answers again without asking (a lookup's entry at once; the
        // attributes its read script found under a computed name are not tracked, so the
        // next lookup reads them again, tracked).
        _ = try t.lookup(alice, dir, n("missing"))
        let second = try cost(t.store) { _ = try t.lookup(alice, dir, n("missing")) }
        #expect(second.trips <= 1, "a lookup read before: \(second.trips) round trips")
        // (An invalidation of the other client's changes above may still be on its way and drop
        // the entry once more: the cached answer holds once they are all in.)
        #expect(
            try within(2) { try cost(t.store) { _ = try t.lookup(alice, dir, n("missing")) }.trips == 0 },
            "a lookup read before answers without a round trip")
        // An untracked client keeps asking.
        let plain = try cost(other.store) { _ = try other.getattr(dir) }
        #expect(plain.trips == 1)
    }

    @Test func aChangeSeenIsNeverFollowedByAnOlderValue() throws {
        let f = try TxnFixture()
        let t = try tracked(f)
        let other = f.meta
        let (ino, _) = try t.mknod(alice, rootIno, n("f"), .regular, 0o644, rdev: 0, target: nil)
        // The other client changes the mode over and over while this one reads it from two
        // threads: each new mode is seen within the bound, and once seen, no older one again.
        let modes: [UInt16] = (0..<150).map { UInt16(0o200 + $0) }
        let index = Dictionary(uniqueKeysWithValues: modes.enumerated().map { ($1, $0) })
        let seen = Locked<Int>(-1)
        let stop = Locked(false)
        let errors = Locked<[String]>([])
        let group = DispatchGroup()
        for _ in 0..<2 {
            DispatchQueue.global().async(group: group) {
                var newest = -1
                while !stop.current {
                    let before = seen.current
                    guard let m = try? self.mode(t, ino) else { continue }
                    let after = seen.current
                    let i = index[m] ?? -1
                    // Set last (or the one before, while its invalidation travels; or the next,
                    // set but not published yet), and never older than one read before.
                    if before >= 0 && (i < before - 1 || i > after + 1) {
                        errors.withLock { $0.append("read mode #\(i) while #\(before)...#\(after) were set") }
                    }
                    if i < newest { errors.withLock { $0.append("read mode #\(i) after reading #\(newest)") } }
                    newest = max(newest, i)
                }
            }
        }
        for (i, m) in modes.enumerated() {
            try chmod(other, ino, m)
            seen.withLock { $0 = i }
            #expect(try within(2) { try mode(t, ino) == m }, "mode #\(i) is seen")
        }
        stop.withLock { $0 = true }
        group.wait()
        #expect(errors.current.isEmpty, "\(errors.current.prefix(5))")
        #expect(t.store.stats.reads < modes.count * 20, "reads came from the cache: \(t.store.stats.reads) round trips")
    }

    /// Random changes by two tracked clients and an untracked one in one directory, some with
    /// their commit's reply lost, while a thread keeps the first client's tracked connection
    /// busy (so its own changes go through untracked connections too): after each change,
    /// every tracked client's view of the directory becomes the untracked client's (the truth)
    /// within the bound, and the trusted cache did answer.
    @Test func randomChangesBySeveralClientsAreSeenByEveryTrackedOne() throws {
        let f = try TxnFixture()
        let a = try tracked(f)
        let b = try tracked(f)
        let truth = f.meta
        let (dir, _) = try a.mknod(alice, rootIno, n("d"), .directory, 0o777, rdev: 0, target: nil)
        let names = (0..<6).map { "n\($0)" }
        func view(_ m: RedisTxnMetadata) -> [String] {
            names.map { name in
                guard let (ino, attr) = try? m.lookup(alice, dir, n(name)) else { return "-" }
                return "\(ino):\(String(attr.mode & 0o777, radix: 8)):\(attr.type)"
            }
        }
        let stop = Locked(false)
        let busy = DispatchGroup()
        DispatchQueue.global().async(group: busy) {
            while !stop.current { _ = try? a.getattr(dir) }
        }
        var rng = SystemRandomNumberGenerator()
        for step in 0..<300 {
            let actor = [a, b, truth].randomElement(using: &rng)!
            if Int.random(in: 0..<10, using: &rng) == 0 { actor.store.hooks.loseCommitReplies(1) }
            let x = n(names.randomElement(using: &rng)!)
            let y = n(names.randomElement(using: &rng)!)
            switch Int.random(in: 0..<5, using: &rng) {
            case 0: _ = try? actor.mknod(alice, dir, x, .regular, 0o644, rdev: 0, target: nil)
            case 1: _ = try? actor.mknod(alice, dir, x, .directory, 0o755, rdev: 0, target: nil)
            case 2:
                if (try? actor.unlink(alice, dir, x)) == nil { _ = try? actor.rmdir(alice, dir, x) }
            case 3:
                if let (ino, _) = try? actor.lookup(alice, dir, x) {
                    var r = SetAttrRequest(mask: .mode)
                    r.mode = UInt16.random(in: 0o400...0o777, using: &rng)
                    _ = try? actor.setattr(alice, ino, r)
                }
            default: _ = try? actor.rename(alice, dir, x, dir, y, [])
            }
            actor.store.hooks.loseCommitReplies(0)
            let want = view(truth)
            for (label, m) in [("a", a), ("b", b)] {
                let ok = within(2) { view(m) == want }
                #expect(ok, "step \(step): client \(label) sees \(view(m)), the volume holds \(want)")
                if !ok { break }
            }
        }
        stop.withLock { $0 = true }
        busy.wait()
        _ = view(b)
        _ = view(b)
        let hits = cost(b.store) { _ = view(b) }
        #expect(hits.trips == 0, "a view read just before answers from the cache: \(hits.trips) round trips")
    }

    @Test func nothingIsTrustedOnceTheListenerOrATrackedConnectionIsGone() throws {
        let f = try TxnFixture()
        let t = try tracked(f)
        let other = f.meta
        let (ino, _) = try t.mknod(alice, rootIno, n("f"), .regular, 0o644, rdev: 0, target: nil)
        #expect(try cost(t.store) { _ = try t.getattr(ino) }.trips == 0)
        // The listener's connection is killed: nothing it would have heard is missed.
        _ = try f.cli(["CLIENT", "KILL", "TYPE", "pubsub"])
        try chmod(other, ino, 0o600)
        #expect(try within(2) { try mode(t, ino) == 0o600 }, "a change while the listener was away is seen")
        #expect(within(5) { t.store.trackingLive }, "tracking comes back")
        _ = try t.getattr(ino)
        #expect(try within(2) { try cost(t.store) { _ = try t.getattr(ino) }.trips == 0 }, "and the cache answers again")
        // The server closes this client's tracked connections (an idle timeout, a kill): what
        // they tracked would never be invalidated, so nothing read through them is trusted.
        _ = try f.cli(["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"])
        try chmod(other, ino, 0o640)
        #expect(try within(2) { try mode(t, ino) == 0o640 }, "a change after the tracked connections were closed is seen")
        // A flush of the database drops everything.
        _ = try t.getattr(ino)
        _ = try f.cli(["FLUSHALL"])
        #expect(try within(2) { (try? t.getattr(ino)) == nil }, "a flushed volume's inode is gone")
    }
}

/// A transaction handed to one other thread while the thread that made the box waits on a
/// semaphore: the two never touch it at once (the wait orders their accesses).
private final class TxnBox: @unchecked Sendable {
    let tx: RedisTxn
    var error: FSError?
    init(_ tx: RedisTxn) { self.tx = tx }
}
