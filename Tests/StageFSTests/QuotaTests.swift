import Foundation
import Metadata
import StageFSCore
import Testing

@testable import Metadata

private let alice = Credential(uid: 1000, gid: 1000, groups: [1000, 3000])
private let bob = Credential(uid: 1001, gid: 1001, groups: [1001])
private let root = Credential.root
private func n(_ s: String) -> [UInt8] { Array(s.utf8) }

/// Quotas (`Quota.swift`) on every engine: usage changes with what changes it, growth past a
/// limit fails with EDQUOT and changes nothing, nested quotas all apply, renames and links
/// across quotas move usage or are refused, the trash counts until purged, and `checkQuota`
/// finds and repairs drift.
@Suite("Quotas", .timeLimit(.minutes(2)))
struct QuotaTests {
    private func admin(_ m: any MetadataEngine) -> any QuotaAdmin { m as! any QuotaAdmin }

    private func usage(_ m: any MetadataEngine, _ t: QuotaTarget) throws -> QuotaUsage { try admin(m).quota(t)!.usage }

    private func dir(_ m: any MetadataEngine, _ parent: Ino, _ name: String) throws -> Ino {
        try m.mknod(root, parent, n(name), .directory, 0o777, rdev: 0, target: nil).0
    }

    /// A file of `size` bytes (one slice) made by `cred` in `parent`.
    private func file(_ m: any MetadataEngine, _ cred: Credential, _ parent: Ino, _ name: String, _ size: UInt32) throws -> Ino {
        let (ino, _) = try m.mknod(cred, parent, n(name), .regular, 0o644, rdev: 0, target: nil)
        if size > 0 { _ = try m.writeSlice(ino, 0, Slice(pos: 0, id: 1, size: size, off: 0, len: size), minSize: UInt64(size), mtime: .now(), sid: 0) }
        return ino
    }

    @Test(arguments: EngineKind.allCases)
    func growthPastALimitFailsAndNestedQuotasAllApply(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let outer = try dir(m, rootIno, "team")
        let inner = try dir(m, outer, "project")
        _ = try file(m, alice, inner, "before", 10_000)
        // A new quota counts what is there: the directory, its subdirectory, the file (12 KiB).
        var q = try admin(m).setQuota(.dir(outer), QuotaLimits(capacity: 100 << 10, inodes: 10))
        #expect(q.usage == QuotaUsage(space: 4096 * 2 + 12288, inodes: 3))
        q = try admin(m).setQuota(.dir(inner), QuotaLimits(capacity: 40 << 10))
        #expect(q.usage == QuotaUsage(space: 4096 + 12288, inodes: 2))
        #expect(try m.hasQuotas())
        // The inner quota stops a write past 40 KiB; nothing changed.
        let ino = try file(m, alice, inner, "grow", 0)
        _ = try m.writeSlice(ino, 0, Slice(pos: 0, id: 2, size: 20_000, off: 0, len: 20_000), minSize: 20_000, mtime: .now(), sid: 0)
        expectErrno(EDQUOT) { _ = try m.writeSlice(ino, 0, Slice(pos: 0, id: 3, size: 10_000, off: 20_000, len: 10_000), minSize: 30_000, mtime: .now(), sid: 0) }
        #expect(try m.getattr(ino).size == 20_000)
        #expect(try usage(m, .dir(inner)).space == 4096 + 12288 + 20480)
        // Truncate up and fallocate count too.
        var up = SetAttrRequest(mask: .size)
        up.size = 1 << 20
        expectErrno(EDQUOT) { _ = try m.setattr(alice, ino, up) }
        expectErrno(EDQUOT) { _ = try m.fallocate(alice, ino, zero: false, keepSize: false, offset: 0, length: 1 << 20) }
        _ = try m.fallocate(alice, ino, zero: false, keepSize: true, offset: 0, length: 1 << 20)
        // The outer one's inode limit applies below the inner one too.
        for i in 0..<6 { _ = try file(m, alice, outer, "f\(i)", 0) }
        #expect(try usage(m, .dir(outer)).inodes == 10)
        expectErrno(EDQUOT) { _ = try m.mknod(alice, inner, n("one-more"), .regular, 0o644, rdev: 0, target: nil) }
        expectErrno(EDQUOT) { _ = try m.mknod(alice, outer, n("one-more"), .directory, 0o755, rdev: 0, target: nil) }
        // Deleting gives back; usage never goes below what is there.
        for i in 0..<6 { _ = try m.unlink(alice, outer, n("f\(i)")) }
        _ = try m.unlink(alice, inner, n("grow"))
        _ = try m.unlink(alice, inner, n("before"))
        #expect(try usage(m, .dir(inner)) == QuotaUsage(space: 4096, inodes: 1))
        #expect(try usage(m, .dir(outer)) == QuotaUsage(space: 8192, inodes: 2))
        // df in the inner directory shows its quota; the root shows the volume.
        let s = try m.statfs(inner)
        #expect(s.totalSpace == 40 << 10 && s.usedSpace == 4096)
        #expect(try m.statfs(rootIno).totalSpace == (try m.statfs()).totalSpace)
        // rmdir of a quota directory takes its quota with it.
        _ = try m.rmdir(root, outer, n("project"))
        #expect(try admin(m).quota(.dir(inner)) == nil)
        #expect(try usage(m, .dir(outer)) == QuotaUsage(space: 4096, inodes: 1))
        #expect(try admin(m).quotas().map(\.target) == [.dir(outer)])
    }

    @Test(arguments: EngineKind.allCases)
    func userAndGroupQuotasFollowOwnership(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let d = try dir(m, rootIno, "shared")
        _ = try admin(m).setQuota(.user(alice.uid), QuotaLimits(capacity: 64 << 10))
        _ = try admin(m).setQuota(.group(3000), QuotaLimits(inodes: 1))
        let a = try file(m, alice, d, "a", 30_000)
        _ = try file(m, bob, d, "b", 30_000)
        #expect(try usage(m, .user(alice.uid)) == QuotaUsage(space: 32768, inodes: 1))
        // Another file of alice's past 64 KiB fails; bob's does not count.
        let b2 = try file(m, alice, d, "a2", 0)
        expectErrno(EDQUOT) { _ = try m.writeSlice(b2, 0, Slice(pos: 0, id: 5, size: 40_000, off: 0, len: 40_000), minSize: 40_000, mtime: .now(), sid: 0) }
        // chgrp to a group at its limit is refused for a user, done for root; chown moves usage.
        var chgrp = SetAttrRequest(mask: .gid)
        chgrp.gid = 3000
        _ = try m.setattr(alice, b2, chgrp)
        #expect(try usage(m, .group(3000)).inodes == 1)
        expectErrno(EDQUOT) { _ = try m.setattr(alice, a, chgrp) }
        var chown = SetAttrRequest(mask: .uid)
        chown.uid = bob.uid
        _ = try m.setattr(root, a, chown)
        #expect(try usage(m, .user(alice.uid)) == QuotaUsage(space: 0, inodes: 1))
        #expect(try admin(m).checkQuota(.user(alice.uid), repair: false, progress: { _ in }).counted == QuotaUsage(space: 0, inodes: 1))
        #expect(try admin(m).checkQuota(.group(3000), repair: false, progress: { _ in }).counted == QuotaUsage(space: 0, inodes: 1))
    }

    @Test(arguments: EngineKind.allCases)
    func renamesAndLinksAcrossQuotasMoveUsageOrAreRefused(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let q = try dir(m, rootIno, "q")
        let out = try dir(m, rootIno, "out")
        _ = try admin(m).setQuota(.dir(q), QuotaLimits(capacity: 64 << 10))
        let base = try usage(m, .dir(q))
        // A file renamed in counts; renamed out gives back; past the limit, EDQUOT.
        _ = try file(m, alice, out, "small", 10_000)
        _ = try m.rename(alice, out, n("small"), q, n("small"), [])
        #expect(try usage(m, .dir(q)).space == base.space + 12288)
        _ = try file(m, alice, out, "big", 60_000)
        expectErrno(EDQUOT) { _ = try m.rename(alice, out, n("big"), q, n("big"), []) }
        _ = try m.rename(alice, q, n("small"), out, n("small"), [])
        #expect(try usage(m, .dir(q)) == base)
        // A file of several names, and a hard link, stay within their quotas: EXDEV.
        let two = try file(m, alice, out, "two", 100)
        _ = try m.link(alice, two, out, n("two-b"))
        expectErrno(EXDEV) { _ = try m.rename(alice, out, n("two"), q, n("two"), []) }
        expectErrno(EXDEV) { _ = try m.link(alice, two, q, n("two-c")) }
        // A non-empty directory without a quota of its own: EXDEV; an empty one moves.
        let sub = try dir(m, out, "sub")
        _ = try file(m, alice, sub, "x", 100)
        expectErrno(EXDEV) { _ = try m.rename(root, out, n("sub"), q, n("sub"), []) }
        _ = try dir(m, out, "empty")
        _ = try m.rename(root, out, n("empty"), q, n("empty"), [])
        #expect(try usage(m, .dir(q)).inodes == base.inodes + 1)
        // With a quota of its own, its usage moves whole, both ways.
        _ = try admin(m).setQuota(.dir(sub), QuotaLimits(inodes: 100))
        _ = try m.rename(root, out, n("sub"), q, n("sub"), [])
        #expect(try usage(m, .dir(q)) == QuotaUsage(space: base.space + 4096 * 2 + 4096, inodes: base.inodes + 3))
        _ = try m.rename(root, q, n("sub"), out, n("sub"), [])
        #expect(try usage(m, .dir(q)).inodes == base.inodes + 1)
        // What the records say is what a walk counts.
        let c = try admin(m).checkQuota(.dir(q), repair: false, progress: { _ in })
        #expect(c.counted == c.recorded)
    }

    @Test(arguments: EngineKind.allCases)
    func theTrashCountsUntilPurgedAndOpenFilesUntilClosed(kind: EngineKind) throws {
        let f = try EngineFixture(kind, trash: 1)
        let m = f.engine
        let q = try dir(m, rootIno, "q")
        _ = try admin(m).setQuota(.dir(q), QuotaLimits(capacity: 1 << 20))
        _ = try admin(m).setQuota(.user(alice.uid), QuotaLimits(capacity: 1 << 20))
        let base = try usage(m, .dir(q))
        let ino = try file(m, alice, q, "a", 10_000)
        _ = try m.unlink(alice, q, n("a"))
        #expect(try usage(m, .dir(q)) == QuotaUsage(space: base.space + 12288, inodes: base.inodes + 1, trashSpace: 12288, trashInodes: 1))
        #expect(try usage(m, .user(alice.uid)).trashInodes == 1)
        #expect(try admin(m).checkQuota(.dir(q), repair: false, progress: { _ in }).counted == (try usage(m, .dir(q))))
        #expect(try admin(m).checkQuota(.user(alice.uid), repair: false, progress: { _ in }).counted == (try usage(m, .user(alice.uid))))
        // Restored: live again, not trash.
        _ = try (m as! any TrashAdmin).restoreTrashed(root, ino, to: nil, ownerMayRestore: false)
        #expect(try usage(m, .dir(q)) == QuotaUsage(space: base.space + 12288, inodes: base.inodes + 1))
        // Deleted and purged: gone from the quota.
        _ = try m.unlink(alice, q, n("a"))
        _ = try (m as! any TrashAdmin).purgeTrashed(root, ino, ownerMayPurge: false)
        #expect(try usage(m, .dir(q)) == base)
        #expect(try usage(m, .user(alice.uid)) == QuotaUsage())
    }

    @Test(arguments: EngineKind.allCases)
    func anUnlinkedOpenFileCountsUntilItsLastClose(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let q = try dir(m, rootIno, "q")
        _ = try admin(m).setQuota(.dir(q), QuotaLimits(capacity: 1 << 20))
        let base = try usage(m, .dir(q))
        let sid = try m.newSession(SessionInfo(hostname: "h", pid: 1, mountPoint: "/mnt", version: "t"))
        let (ino, _) = try m.create(alice, q, n("open"), 0o644, sid: sid)
        _ = try m.writeSlice(ino, 0, Slice(pos: 0, id: 1, size: 5000, off: 0, len: 5000), minSize: 5000, mtime: .now(), sid: sid)
        _ = try m.unlink(alice, q, n("open"))
        #expect(try usage(m, .dir(q)).space == base.space + 8192)
        // Written on while unlinked: still counted where it was.
        _ = try m.writeSlice(ino, 0, Slice(pos: 0, id: 2, size: 5000, off: 5000, len: 5000), minSize: 10_000, mtime: .now(), sid: sid)
        #expect(try usage(m, .dir(q)).space == base.space + 12288)
        #expect(try m.close(ino, sid: sid))
        #expect(try usage(m, .dir(q)) == base)
    }

    @Test(arguments: EngineKind.allCases)
    func reservationsAreUsedByCommitsAndGivenBack(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let q = try dir(m, rootIno, "q")
        _ = try admin(m).setQuota(.dir(q), QuotaLimits(capacity: 100 << 10))
        let base = try usage(m, .dir(q)).space
        let sid = try m.newSession(SessionInfo(hostname: "h", pid: 1, mountPoint: "/mnt", version: "t"))
        let (ino, _) = try m.create(alice, q, n("r"), 0o644, sid: sid)
        #expect(try m.reserveSpace(ino, sid: sid, bytes: 64 << 10))
        #expect(try usage(m, .dir(q)).space == base + (64 << 10))
        // Another file cannot take what is reserved.
        let (other, _) = try m.create(alice, q, n("o"), 0o644, sid: sid)
        expectErrno(EDQUOT) { _ = try m.reserveSpace(other, sid: sid, bytes: 40 << 10) }
        expectErrno(EDQUOT) { _ = try m.writeSlice(other, 0, Slice(pos: 0, id: 3, size: 40_000, off: 0, len: 40_000), minSize: 40_000, mtime: .now(), sid: sid) }
        // The commit uses the reservation: no double count, and it fits.
        _ = try m.writeSlice(ino, 0, Slice(pos: 0, id: 1, size: 60_000, off: 0, len: 60_000), minSize: 60_000, mtime: .now(), sid: sid)
        #expect(try usage(m, .dir(q)).space == base + (64 << 10))
        try m.releaseSpace(ino, sid: sid)
        #expect(try usage(m, .dir(q)).space == base + align4K(60_000))
        // The session's last close of a file gives back what it reserved for it.
        #expect(try m.reserveSpace(ino, sid: sid, bytes: 4096))
        #expect(try usage(m, .dir(q)).space == base + align4K(60_000) + 4096)
        _ = try m.close(ino, sid: sid)
        #expect(try usage(m, .dir(q)).space == base + align4K(60_000))
        // A session's end gives back what it reserved.
        #expect(try m.reserveSpace(other, sid: sid, bytes: 8192))
        try m.closeSession(sid)
        #expect(try usage(m, .dir(q)).space == base + align4K(60_000))
        // No quota counts a file elsewhere: nothing to reserve.
        let (free, _) = try m.mknod(alice, rootIno, n("free"), .regular, 0o644, rdev: 0, target: nil)
        #expect(try !m.reserveSpace(free, sid: sid, bytes: 4096))
    }

    @Test(arguments: EngineKind.allCases)
    func theVolumesCapacityAndInodeLimitAnswerENOSPC(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let used = try m.statfs()
        var format = try m.requireFormat()
        format.capacity = used.usedSpace + (64 << 10)
        format.inodes = used.usedInodes + 3
        try m.initialize(format, force: true, rootMode: 0o777)
        #expect(try m.statfs().totalSpace == used.usedSpace + (64 << 10))
        #expect(try m.statfs().usedInodes + (try m.statfs().availInodes) == used.usedInodes + 3)
        let a = try file(m, alice, rootIno, "a", 60_000)
        expectErrno(ENOSPC) { _ = try m.writeSlice(a, 0, Slice(pos: 0, id: 9, size: 8192, off: 60_000, len: 8192), minSize: 68_192, mtime: .now(), sid: 0) }
        _ = try file(m, alice, rootIno, "b", 0)
        _ = try file(m, alice, rootIno, "c", 0)
        expectErrno(ENOSPC) { _ = try file(m, alice, rootIno, "d", 0) }
        _ = try m.unlink(alice, rootIno, n("c"))
        _ = try file(m, alice, rootIno, "d", 0)
    }

    @Test(arguments: EngineKind.allCases)
    func checkFindsAndRepairsDrift(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine as! TxnMetadataTesting
        let q = try dir(f.engine, rootIno, "q")
        _ = try file(f.engine, alice, q, "a", 5000)
        _ = try admin(f.engine).setQuota(.dir(q), QuotaLimits(capacity: 1 << 20))
        let right = try usage(f.engine, .dir(q))
        try m.addToCounter("q_d\(q)_space", 123_456)
        try m.addToCounter("q_d\(q)_inodes", -7)
        let seen = try admin(f.engine).checkQuota(.dir(q), repair: false, progress: { _ in })
        #expect(seen.recorded.space == right.space + 123_456 && seen.counted == right && !seen.repaired)
        #expect(try usage(f.engine, .dir(q)).space == right.space + 123_456, "not repaired without asking")
        _ = try admin(f.engine).checkQuota(.dir(q), repair: true, progress: { _ in })
        #expect(try usage(f.engine, .dir(q)) == right)
        _ = try admin(f.engine).deleteQuota(.dir(q))
        #expect(try !(f.engine as! any QuotaAdmin).quotas().contains { $0.target == .dir(q) })
    }
}

/// A counter changed behind the rules' back (drift, for `checkFindsAndRepairsDrift`).
protocol TxnMetadataTesting {
    func addToCounter(_ name: String, _ delta: Int64) throws
}

extension TxnMetadata: TxnMetadataTesting {
    func addToCounter(_ name: String, _ delta: Int64) throws {
        try store.transaction(write: true) { (tx) throws(FSError) in try store.add(tx, name, delta) }
    }
}
