import Foundation
import Metadata
import StageFSCore
import Testing

private let alice = Credential(uid: 1000, gid: 1000, groups: [1000, 3000])
private let bob = Credential(uid: 1001, gid: 1001, groups: [1001])
private let root = Credential.root

private func n(_ s: String) -> [UInt8] { Array(s.utf8) }

/// Creates a world-writable directory under root for the users' tests.
/// Whether `check` holds: at once, or for the tracked cache (which hears of another client's
/// change a moment after it committed) within 2 s.
private func seenSoon(_ kind: EngineKind, _ check: () throws -> Bool) throws -> Bool {
    let until = Sys.monotonicNanos() + (kind == .redisTracked ? 2_000_000_000 : 0)
    while true {
        if try check() { return true }
        if Sys.monotonicNanos() >= until { return false }
        usleep(5000)
    }
}

private func playground(_ m: any MetadataEngine, _ name: String = "play", mode: UInt16 = 0o777) throws -> Ino {
    let (ino, _) = try m.mknod(root, rootIno, n(name), .directory, mode, rdev: 0, target: nil)
    _ = try m.setattr(
        root, ino,
        {
            var r = SetAttrRequest(mask: .mode); r.mode = mode; return r
        }())
    return ino
}

private func names(_ m: any MetadataEngine, _ dir: Ino) throws -> [String] {
    var out: [String] = []
    var cookie: UInt64 = 0
    while true {
        let batch = try m.readdir(dir, after: cookie, limit: 3, plus: false)
        if batch.isEmpty { break }
        out += batch.map { $0.nameString }
        cookie = batch.last!.cookie
    }
    return out.sorted()
}

/// One behaviour suite, run against SQLite and Redis alike.
@Suite("Metadata conformance", .timeLimit(.minutes(2)))
struct ConformanceTests {
    @Test(arguments: EngineKind.allCases)
    func formatRecord(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let fmt = try #require(try f.engine.loadFormat())
        #expect(fmt.name == "test")
        #expect(fmt.blockSizeKiB == 4096)
        // Same settings again: accepted, UUID kept.
        try f.engine.initialize(VolumeFormat(name: "test", storage: "file", bucket: fmt.bucket, trashDays: 0), force: false, rootMode: 0o777)
        #expect(try f.engine.loadFormat()?.uuid == fmt.uuid)
        // Other settings: refused with a message naming the difference.
        do {
            try f.engine.initialize(
                VolumeFormat(name: "test", storage: "file", bucket: fmt.bucket, blockSizeKiB: 1024), force: false, rootMode: 0o777)
            Issue.record("reformat with another block size was accepted")
        } catch {
            let e = error
            #expect(e.code == EEXIST)
            #expect(e.message.contains("block size"))
        }
        let rootAttr = try f.engine.getattr(rootIno)
        #expect(rootAttr.type == .directory)
        #expect(rootAttr.nlink == 2)
    }

    /// Where the engines once disagreed (issue 10): the order of the name-length and permission
    /// checks, names over 255 bytes in unlink/rmdir, an entry whose type is not its inode's, and
    /// two formats at the same time.
    @Test(arguments: EngineKind.allCases)
    func enginesAgreeWhereTheyOnceDiffered(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let long = [UInt8](repeating: 97, count: 256)
        let dir = try playground(m)
        // Search permission is checked before the name's length, as the kernel's lookup does.
        let closed = try playground(m, "closed", mode: 0o700)
        expectErrno(EACCES) { _ = try m.lookup(alice, closed, long) }
        expectErrno(ENAMETOOLONG) { _ = try m.lookup(alice, dir, long) }
        expectErrno(EACCES) { _ = try m.unlink(alice, closed, long) }
        expectErrno(EACCES) { _ = try m.rmdir(alice, closed, long) }
        expectErrno(ENAMETOOLONG) { _ = try m.unlink(alice, dir, long) }
        expectErrno(ENAMETOOLONG) { _ = try m.rmdir(alice, dir, long) }
        // An entry that says directory for a regular file (and the reverse) is damage: EIO,
        // not a missing name, and nothing is removed.
        _ = try m.mknod(alice, dir, n("file"), .regular, 0o644, rdev: 0, target: nil)
        _ = try m.mknod(alice, dir, n("sub"), .directory, 0o755, rdev: 0, target: nil)
        try f.corruptEntryType(dir, "file", .directory)
        try f.corruptEntryType(dir, "sub", .regular)
        expectErrno(EIO) { _ = try m.rmdir(alice, dir, n("file")) }
        expectErrno(EIO) { _ = try m.unlink(alice, dir, n("file")) }
        expectErrno(EIO) { _ = try m.unlink(alice, dir, n("sub")) }
        expectErrno(EIO) { _ = try m.rmdir(alice, dir, n("sub")) }
        #expect(try names(m, dir) == ["file", "sub"])
        // Two formats of one fresh volume at the same time with different settings: exactly
        // one wins, the other is refused.
        for round in 0..<8 {
            let url = f.freshURL(round)
            let a = try openMetadata(try MetaURL.parse(url), create: true)
            let b = try openMetadata(try MetaURL.parse(url), create: true)
            let wins = Locked(0)
            let refused = Locked(0)
            let group = DispatchGroup()
            for (engine, kib) in [(a, 4096), (b, 1024)] {
                DispatchQueue.global().async(group: group) {
                    do {
                        try engine.initialize(
                            VolumeFormat(name: "race", storage: "file", bucket: "/tmp/race", blockSizeKiB: kib), force: false, rootMode: 0o777)
                        wins.withLock { $0 += 1 }
                    } catch {
                        if (error as? FSError)?.code == EEXIST { refused.withLock { $0 += 1 } }
                    }
                }
            }
            group.wait()
            #expect(wins.current == 1 && refused.current == 1, "round \(round): \(wins.current) formats won, \(refused.current) refused")
        }
    }

    @Test(arguments: EngineKind.allCases)
    func createLookupGetattr(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let dir = try playground(m)
        let (ino, a) = try m.mknod(alice, dir, n("file"), .regular, 0o640, rdev: 0, target: nil)
        #expect(a.type == .regular && a.mode == 0o640 && a.uid == 1000 && a.gid == 1000 && a.nlink == 1 && a.size == 0)
        let (ino2, a2) = try m.lookup(alice, dir, n("file"))
        #expect(ino2 == ino)
        #expect(a2 == a)
        #expect(try m.getattr(ino) == a)
        expectErrno(EEXIST) { _ = try m.mknod(alice, dir, n("file"), .regular, 0o644, rdev: 0, target: nil) }
        expectErrno(ENOENT) { _ = try m.lookup(alice, dir, n("missing")) }
        expectErrno(ENOTDIR) { _ = try m.lookup(alice, ino, n("x")) }
        expectErrno(ENOTDIR) { _ = try m.mknod(alice, ino, n("x"), .regular, 0o644, rdev: 0, target: nil) }
        expectErrno(ENAMETOOLONG) { _ = try m.mknod(alice, dir, [UInt8](repeating: 97, count: 256), .regular, 0o644, rdev: 0, target: nil) }
        // Parent times move on create.
        let pa = try m.getattr(dir)
        #expect(pa.mtime >= a.ctime)
    }

    @Test(arguments: EngineKind.allCases)
    func specialFilesAndSymlinks(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let dir = try playground(m)
        let (_, fifo) = try m.mknod(alice, dir, n("fifo"), .fifo, 0o600, rdev: 0, target: nil)
        #expect(fifo.type == .fifo)
        let (_, sock) = try m.mknod(alice, dir, n("sock"), .socket, 0o600, rdev: 0, target: nil)
        #expect(sock.type == .socket)
        let (_, dev) = try m.mknod(root, dir, n("null"), .charDevice, 0o666, rdev: 0x0103, target: nil)
        #expect(dev.type == .charDevice && dev.rdev == 0x0103)
        let (_, blk) = try m.mknod(root, dir, n("blk"), .blockDevice, 0o660, rdev: 0x0801, target: nil)
        #expect(blk.type == .blockDevice && blk.rdev == 0x0801)
        let (lino, link) = try m.mknod(alice, dir, n("link"), .symlink, 0o777, rdev: 0, target: n("../some/target"))
        #expect(link.type == .symlink && link.size == 14)
        #expect(try m.readlink(lino) == n("../some/target"))
        let (fino, _) = try m.lookup(alice, dir, n("fifo"))
        expectErrno(EINVAL) { _ = try m.readlink(fino) }
    }

    @Test(arguments: EngineKind.allCases)
    func directoriesAndRemoval(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let dir = try playground(m)
        let (sub, sa) = try m.mknod(alice, dir, n("sub"), .directory, 0o755, rdev: 0, target: nil)
        #expect(sa.nlink == 2 && sa.size == 4096 && sa.parent == dir)
        #expect(try m.getattr(dir).nlink == 3)
        _ = try m.mknod(alice, sub, n("f"), .regular, 0o644, rdev: 0, target: nil)
        expectErrno(ENOTEMPTY) { _ = try m.rmdir(alice, dir, n("sub")) }
        expectErrno(EISDIR) { _ = try m.unlink(alice, dir, n("sub")) }
        expectErrno(ENOTDIR) { _ = try m.rmdir(alice, sub, n("f")) }
        let r = try m.unlink(alice, sub, n("f"))
        #expect(r.freed)
        _ = try m.rmdir(alice, dir, n("sub"))
        #expect(try m.getattr(dir).nlink == 2)
        expectErrno(ENOENT) { _ = try m.getattr(sub) }
        expectErrno(ENOENT) { _ = try m.rmdir(alice, dir, n("sub")) }
        let (dotdot, _) = try m.lookup(alice, dir, n(".."))
        #expect(dotdot == rootIno)
    }

    @Test(arguments: EngineKind.allCases)
    func hardLinks(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let dir = try playground(m)
        let (ino, _) = try m.mknod(alice, dir, n("a"), .regular, 0o644, rdev: 0, target: nil)
        let a = try m.link(alice, ino, dir, n("b"))
        #expect(a.nlink == 2)
        let (ino2, _) = try m.lookup(alice, dir, n("b"))
        #expect(ino2 == ino)
        expectErrno(EEXIST) { _ = try m.link(alice, ino, dir, n("a")) }
        let (sub, _) = try m.mknod(alice, dir, n("d"), .directory, 0o755, rdev: 0, target: nil)
        expectErrno(EPERM) { _ = try m.link(alice, sub, dir, n("d2")) }
        let r = try m.unlink(alice, dir, n("a"))
        #expect(!r.freed && r.attr.nlink == 1)
        #expect(try m.getattr(ino).nlink == 1)
        #expect(try m.unlink(alice, dir, n("b")).freed)
        expectErrno(ENOENT) { _ = try m.getattr(ino) }
    }

    @Test(arguments: EngineKind.allCases)
    func renames(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let dir = try playground(m)
        let (d1, _) = try m.mknod(alice, dir, n("d1"), .directory, 0o755, rdev: 0, target: nil)
        let (d2, _) = try m.mknod(alice, dir, n("d2"), .directory, 0o755, rdev: 0, target: nil)
        let (fa, _) = try m.mknod(alice, d1, n("a"), .regular, 0o644, rdev: 0, target: nil)
        let (fb, _) = try m.mknod(alice, d1, n("b"), .regular, 0o644, rdev: 0, target: nil)
        // Plain rename within a directory.
        #expect(try m.rename(alice, d1, n("a"), d1, n("a2"), []).removed == nil)
        #expect(try m.lookup(alice, d1, n("a2")).0 == fa)
        expectErrno(ENOENT) { _ = try m.lookup(alice, d1, n("a")) }
        // Replace an existing file: the old one is freed.
        let replaced = try #require(try m.rename(alice, d1, n("a2"), d1, n("b"), []).removed)
        #expect(replaced.ino == fb && replaced.freed)
        #expect(try m.lookup(alice, d1, n("b")).0 == fa)
        // Across directories.
        _ = try m.rename(alice, d1, n("b"), d2, n("moved"), [])
        #expect(try m.lookup(alice, d2, n("moved")).0 == fa)
        // RENAME_NOREPLACE.
        _ = try m.mknod(alice, d2, n("other"), .regular, 0o644, rdev: 0, target: nil)
        expectErrno(EEXIST) { _ = try m.rename(alice, d2, n("moved"), d2, n("other"), .noReplace) }
        // RENAME_EXCHANGE swaps a file and a directory across parents.
        let (sub, _) = try m.mknod(alice, d1, n("sub"), .directory, 0o755, rdev: 0, target: nil)
        #expect(try m.getattr(d1).nlink == 3)
        _ = try m.rename(alice, d1, n("sub"), d2, n("moved"), .exchange)
        #expect(try m.lookup(alice, d2, n("moved")).0 == sub)
        #expect(try m.lookup(alice, d1, n("sub")).0 == fa)
        #expect(try m.getattr(sub).parent == d2)
        #expect(try m.lookup(alice, sub, n("..")).0 == d2)
        #expect(try m.getattr(d1).nlink == 2)
        #expect(try m.getattr(d2).nlink == 3)
        expectErrno(ENOENT) { _ = try m.rename(alice, d1, n("sub"), d2, n("nothing"), .exchange) }
        // Directory over an empty directory; over a non-empty one; type mismatches.
        let (e1, _) = try m.mknod(alice, dir, n("e1"), .directory, 0o755, rdev: 0, target: nil)
        let (e2, _) = try m.mknod(alice, dir, n("e2"), .directory, 0o755, rdev: 0, target: nil)
        let over = try #require(try m.rename(alice, dir, n("e1"), dir, n("e2"), []).removed)
        #expect(over.ino == e2)
        #expect(try m.lookup(alice, dir, n("e2")).0 == e1)
        expectErrno(ENOENT) { _ = try m.getattr(e2) }
        expectErrno(ENOTEMPTY) { _ = try m.rename(alice, dir, n("e2"), dir, n("d1"), []) }
        expectErrno(EISDIR) { _ = try m.rename(alice, d1, n("sub"), dir, n("e2"), []) }
        expectErrno(ENOTDIR) { _ = try m.rename(alice, dir, n("e2"), d1, n("sub"), []) }
        // A directory into its own subtree.
        expectErrno(EINVAL) { _ = try m.rename(alice, dir, n("d2"), sub, n("loop"), []) }
        // Same inode under two names: nothing happens.
        _ = try m.link(alice, fa, d1, n("hard"))
        #expect(try m.rename(alice, d1, n("sub"), d1, n("hard"), []).removed == nil)
        #expect(try m.lookup(alice, d1, n("sub")).0 == fa)
        #expect(try m.getattr(fa).nlink == 2)
    }

    @Test(arguments: EngineKind.allCases)
    func readdirOffsetsSurviveChanges(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let dir = try playground(m)
        for i in 0..<20 { _ = try m.mknod(alice, dir, n("f\(i)"), .regular, 0o644, rdev: 0, target: nil) }
        let first = try m.readdir(dir, after: 0, limit: 5, plus: false)
        #expect(first.count == 5)
        let seen = Set(first.map { $0.nameString })
        // Change the directory behind the reader: remove five unread entries, add five.
        let unread = (0..<20).map { "f\($0)" }.filter { !seen.contains($0) }
        for name in unread.prefix(5) { _ = try m.unlink(alice, dir, n(name)) }
        for i in 20..<25 { _ = try m.mknod(alice, dir, n("f\(i)"), .regular, 0o644, rdev: 0, target: nil) }
        var rest: [DirEntry] = []
        var cookie = first.last!.cookie
        while true {
            let b = try m.readdir(dir, after: cookie, limit: 4, plus: true)
            if b.isEmpty { break }
            rest += b
            cookie = b.last!.cookie
        }
        let restNames = rest.map { $0.nameString }
        #expect(Set(restNames).count == restNames.count, "no entry twice")
        // Whether each has extended attributes comes with the attributes (f24 has one).
        let tagged = try m.lookup(alice, dir, n("f24")).0
        try m.setxattr(alice, tagged, n("user.tag"), n("v"), .any)
        let again = try m.readdir(dir, after: 0, limit: 100, plus: true, xattrs: true)
        #expect(again.count == 20 && again.allSatisfy { $0.hasXattrs == ($0.nameString == "f24") }, "hasXattrs of each entry")
        let unasked = try m.readdir(dir, after: 0, limit: 100, plus: true)
        #expect(unasked.count == 20 && unasked.allSatisfy { $0.hasXattrs == nil && $0.attr != nil }, "not asked, not told")
        #expect(seen.isDisjoint(with: restNames), "entries already read do not come again")
        for name in unread.dropFirst(5) { #expect(restNames.contains(name), "unchanged entry \(name) still listed") }
        for name in unread.prefix(5) { #expect(!restNames.contains(name), "removed entry \(name) not listed") }
        #expect(rest.allSatisfy { $0.attr?.type == .regular }, "readdirplus gives attributes")
        #expect(try names(m, dir).count == 20)
    }

    @Test(arguments: EngineKind.allCases)
    func ownershipAndModes(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let dir = try playground(m)
        let (ino, _) = try m.mknod(alice, dir, n("f"), .regular, 0o644, rdev: 0, target: nil)
        var chmod = SetAttrRequest(mask: .mode)
        chmod.mode = 0o600
        #expect(try m.setattr(alice, ino, chmod).mode == 0o600)
        expectErrno(EPERM) { _ = try m.setattr(bob, ino, chmod) }
        var chown = SetAttrRequest(mask: .uid)
        chown.uid = 1001
        expectErrno(EPERM) { _ = try m.setattr(alice, ino, chown) }
        expectErrno(EPERM) { _ = try m.setattr(bob, ino, chown) }
        var chgrp = SetAttrRequest(mask: .gid)
        chgrp.gid = 3000
        #expect(try m.setattr(alice, ino, chgrp).gid == 3000)
        chgrp.gid = 4000
        expectErrno(EPERM) { _ = try m.setattr(alice, ino, chgrp) }
        // Root may chown; set-user-ID is dropped by a chown.
        chmod.mode = 0o4755
        #expect(try m.setattr(alice, ino, chmod).mode == 0o4755)
        #expect(try m.setattr(root, ino, chown).mode == 0o755)
        #expect(try m.getattr(ino).uid == 1001)
        // chmod g+s by a user not in the file's group drops set-group-ID.
        let (g, _) = try m.mknod(bob, dir, n("g"), .regular, 0o644, rdev: 0, target: nil)
        chgrp.gid = 5000
        _ = try m.setattr(root, g, chgrp)
        chmod.mode = 0o2755
        #expect(try m.setattr(bob, g, chmod).mode == 0o755)
        #expect(try m.setattr(root, g, chmod).mode == 0o2755)
    }

    @Test(arguments: EngineKind.allCases)
    func timesWithNanoseconds(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let dir = try playground(m)
        let (ino, before) = try m.mknod(alice, dir, n("f"), .regular, 0o664, rdev: 0, target: nil)
        var t = SetAttrRequest(mask: [.atime, .mtime])
        t.atime = Timespec(sec: 1_000_000_000, nsec: 123_456_789)
        t.mtime = Timespec(sec: 1_500_000_000, nsec: 987_654_321)
        let a = try m.setattr(alice, ino, t)
        #expect(a.atime == t.atime && a.mtime == t.mtime)
        #expect(a.ctime >= before.ctime)
        // UTIME_OMIT for atime: only mtime changes.
        var onlyM = SetAttrRequest(mask: .mtime)
        onlyM.mtime = Timespec(sec: 42, nsec: 7)
        let b = try m.setattr(alice, ino, onlyM)
        #expect(b.atime == t.atime && b.mtime == onlyM.mtime)
        // Explicit times by a non-owner: EPERM; UTIME_NOW needs write permission.
        expectErrno(EPERM) { _ = try m.setattr(bob, ino, t) }
        let now = SetAttrRequest(mask: [.atime, .mtime, .atimeNow, .mtimeNow])
        expectErrno(EACCES) { _ = try m.setattr(bob, ino, now) }
        var chgrp = SetAttrRequest(mask: .gid)
        chgrp.gid = 1001
        _ = try m.setattr(root, ino, chgrp)
        let c = try m.setattr(bob, ino, now)
        #expect(c.mtime > onlyM.mtime)
    }

    @Test(arguments: EngineKind.allCases)
    func setgidAndStickyDirectories(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let shared = try playground(m, "shared", mode: 0o2777)
        var chgrp = SetAttrRequest(mask: .gid)
        chgrp.gid = 3000
        _ = try m.setattr(root, shared, chgrp)
        let (_, file) = try m.mknod(bob, shared, n("f"), .regular, 0o2755, rdev: 0, target: nil)
        #expect(file.gid == 3000, "gid inherited from a set-group-ID directory")
        #expect(file.mode & 0o2000 == 0, "set-group-ID dropped: bob is not in group 3000")
        let (_, sub) = try m.mknod(bob, shared, n("sub"), .directory, 0o755, rdev: 0, target: nil)
        #expect(sub.gid == 3000 && sub.mode & 0o2000 != 0, "subdirectory inherits set-group-ID")

        let tmp = try playground(m, "tmp", mode: 0o1777)
        _ = try m.mknod(alice, tmp, n("alices"), .regular, 0o666, rdev: 0, target: nil)
        expectErrno(EPERM) { _ = try m.unlink(bob, tmp, n("alices")) }
        expectErrno(EPERM) { _ = try m.rename(bob, tmp, n("alices"), tmp, n("stolen"), []) }
        _ = try m.mknod(bob, tmp, n("bobs"), .regular, 0o666, rdev: 0, target: nil)
        expectErrno(EPERM) { _ = try m.rename(bob, tmp, n("bobs"), tmp, n("alices"), []) }
        #expect(try m.unlink(alice, tmp, n("alices")).freed)
        #expect(try m.unlink(root, tmp, n("bobs")).freed)
    }

    @Test(arguments: EngineKind.allCases)
    func directoryPermissions(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let (priv, _) = try m.mknod(alice, try playground(m), n("priv"), .directory, 0o755, rdev: 0, target: nil)
        _ = try m.mknod(alice, priv, n("f"), .regular, 0o644, rdev: 0, target: nil)
        expectErrno(EACCES) { _ = try m.mknod(bob, priv, n("x"), .regular, 0o644, rdev: 0, target: nil) }
        expectErrno(EACCES) { _ = try m.unlink(bob, priv, n("f")) }
        var chmod = SetAttrRequest(mask: .mode)
        chmod.mode = 0o700
        _ = try m.setattr(alice, priv, chmod)
        expectErrno(EACCES) { _ = try m.lookup(bob, priv, n("f")) }
        _ = try m.lookup(root, priv, n("f"))
        expectErrno(EACCES) { try m.access(bob, priv, .read) }
        try m.access(alice, priv, [.read, .write, .execute])
    }

    @Test(arguments: EngineKind.allCases)
    func extendedAttributes(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let dir = try playground(m)
        let (ino, _) = try m.mknod(alice, dir, n("f"), .regular, 0o644, rdev: 0, target: nil)
        try m.setxattr(alice, ino, n("user.a"), n("one"), .any)
        try m.setxattr(alice, ino, n("user.b"), [0, 1, 2, 255], .create)
        #expect(try m.getxattr(alice, ino, n("user.b")) == [0, 1, 2, 255])
        #expect(try m.listxattr(alice, ino) == [n("user.a"), n("user.b")])
        expectErrno(EEXIST) { try m.setxattr(alice, ino, n("user.a"), n("x"), .create) }
        expectErrno(ENODATA) { try m.setxattr(alice, ino, n("user.zz"), n("x"), .replace) }
        try m.setxattr(alice, ino, n("user.a"), n("two"), .replace)
        #expect(try m.getxattr(bob, ino, n("user.a")) == n("two"))
        expectErrno(EACCES) { try m.setxattr(bob, ino, n("user.c"), n("x"), .any) }
        expectErrno(EPERM) { try m.setxattr(alice, ino, n("trusted.t"), n("x"), .any) }
        try m.setxattr(root, ino, n("trusted.t"), n("x"), .any)
        #expect(try m.listxattr(alice, ino).count == 2)
        #expect(try m.listxattr(root, ino).count == 3)
        try m.removexattr(alice, ino, n("user.a"))
        expectErrno(ENODATA) { _ = try m.getxattr(alice, ino, n("user.a")) }
        expectErrno(ENODATA) { try m.removexattr(alice, ino, n("user.a")) }
        expectErrno(EOPNOTSUPP) { try m.setxattr(alice, ino, n("system.posix_acl_access"), n("x"), .any) }
    }

    @Test(arguments: EngineKind.allCases)
    func chunksSizeAndTruncate(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let dir = try playground(m)
        let (ino, _) = try m.mknod(alice, dir, n("f"), .regular, 0o644, rdev: 0, target: nil)
        let id = try m.newSliceIDs(10)
        #expect(try m.newSliceIDs(1) == id + 10)
        let s0 = Slice(pos: 0, id: id, size: 1000, off: 0, len: 1000)
        let a = try m.writeSlice(ino, 0, s0, minSize: 1000, mtime: Timespec(sec: 5, nsec: 6), sid: 0)
        #expect(a.size == 1000 && a.mtime == Timespec(sec: 5, nsec: 6))
        let s1 = Slice(pos: 100, id: id + 1, size: 50, off: 0, len: 50)
        _ = try m.writeSlice(ino, 0, s1, minSize: 150, mtime: Timespec.now(), sid: 0)
        #expect(try m.readChunk(ino, 0) == [s0, s1])
        #expect(try m.readChunks([(ino, 0), (ino, 5), (ino, 0)]) == [[s0, s1], [], [s0, s1]])
        #expect(try m.getattrs([ino, 999_999, dir]).map { $0?.type } == [.regular, nil, .directory])
        #expect(try m.getattr(ino).size == 1000, "a write inside the file keeps its size")
        // A file spanning two chunks, truncated into the first: the second chunk is dropped
        // and a hole hides the tail of the first.
        let s2 = Slice(pos: 0, id: id + 2, size: 10, off: 0, len: 10)
        _ = try m.writeSlice(ino, 1, s2, minSize: chunkSize + 10, mtime: Timespec.now(), sid: 0)
        var trunc = SetAttrRequest(mask: .size)
        trunc.size = 500
        #expect(try m.setattr(alice, ino, trunc).size == 500)
        #expect(try m.readChunk(ino, 1).isEmpty)
        let c0 = try m.readChunk(ino, 0)
        #expect(c0.last == Slice(pos: 500, id: 0, size: 0, off: 0, len: UInt32(chunkSize - 500)))
        #expect(try m.takeDroppedSlices(limit: 100) == [s2])
        trunc.size = 3000
        #expect(try m.setattr(alice, ino, trunc).size == 3000)
        expectErrno(EACCES) { _ = try m.setattr(bob, ino, trunc) }
        let (d, _) = try m.mknod(alice, dir, n("d"), .directory, 0o755, rdev: 0, target: nil)
        expectErrno(EISDIR) { _ = try m.setattr(alice, d, trunc) }
    }

    @Test(arguments: EngineKind.allCases)
    func statfsCounts(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let s0 = try m.statfs()
        let (ino, _) = try m.mknod(alice, rootIno, n("f"), .regular, 0o644, rdev: 0, target: nil)
        _ = try m.writeSlice(ino, 0, Slice(pos: 0, id: 1, size: 10000, off: 0, len: 10000), minSize: 10000, mtime: .now(), sid: 0)
        let s1 = try m.statfs()
        #expect(s1.usedInodes == s0.usedInodes + 1)
        #expect(s1.usedSpace == s0.usedSpace + 12288)
        #expect(s1.totalSpace >= s1.usedSpace + s1.availSpace - 1)
        _ = try m.unlink(alice, rootIno, n("f"))
        let s2 = try m.statfs()
        #expect(s2.usedInodes == s0.usedInodes && s2.usedSpace == s0.usedSpace)
        #expect(try m.pendingDeletes(limit: 10) == [PendingDelete(ino: ino, size: 10000)])
        let (slices, done) = try m.finishDelete(PendingDelete(ino: ino, size: 10000))
        #expect(slices.count == 1 && done)
        #expect(try m.pendingDeletes(limit: 10).isEmpty)
    }

    @Test(arguments: EngineKind.allCases)
    func unlinkWhileOpenAndSessions(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let other = try f.reopen()
        let dir = try playground(m)
        let sid = try m.newSession(SessionInfo(hostname: "h", pid: 1, mountPoint: "/mnt", version: "t"))
        let (ino, _) = try m.mknod(alice, dir, n("f"), .regular, 0o644, rdev: 0, target: nil)
        _ = try m.writeSlice(ino, 0, Slice(pos: 0, id: 7, size: 10, off: 0, len: 10), minSize: 10, mtime: .now(), sid: 0)
        let (_, first) = try m.open(alice, ino, flags: O_RDONLY, sid: sid)
        #expect(first == [Slice(pos: 0, id: 7, size: 10, off: 0, len: 10)], "open returns the first chunk's slices")
        _ = try m.open(alice, ino, flags: O_RDONLY, sid: sid)
        // Unlinked by another client while open: kept.
        let r = try other.unlink(alice, dir, n("f"))
        #expect(!r.freed && r.attr.nlink == 0)
        // (A client with the tracked cache hears of another client's change a moment later:
        // Redis sends the invalidation as it answers the change.)
        #expect(try seenSoon(kind) { try m.getattr(ino).nlink == 0 })
        #expect(try m.readChunk(ino, 0).count == 1)
        try m.close(ino, sid: sid)
        #expect(try m.pendingDeletes(limit: 10).isEmpty, "still open once")
        try m.close(ino, sid: sid)
        expectErrno(ENOENT) { _ = try m.getattr(ino) }
        #expect(try m.pendingDeletes(limit: 10).map { $0.ino } == [ino])
        // A client that dies with a file open: its session is cleaned up and the file freed.
        let dead = try other.newSession(SessionInfo(hostname: "h2", pid: 2, mountPoint: "/mnt2", version: "t"))
        let (ino2, _) = try other.mknod(alice, dir, n("g"), .regular, 0o644, rdev: 0, target: nil)
        _ = try other.open(alice, ino2, flags: O_RDWR, sid: dead)
        _ = try m.unlink(alice, dir, n("g"))
        #expect(try m.getattr(ino2).nlink == 0)
        #expect(try m.listSessions().map { $0.sid }.contains(dead))
        #expect(try m.cleanStaleSessions(age: -10) == 2)
        expectErrno(ENOENT) { _ = try m.getattr(ino2) }
        #expect(try m.listSessions().isEmpty)
        // A file created open (create) is kept when unlinked before its first close.
        let (c, _) = try m.create(alice, dir, n("created"), 0o644, sid: sid)
        #expect(!(try m.unlink(alice, dir, n("created")).freed))
        #expect(try m.getattr(c).nlink == 0)
        try m.close(c, sid: sid)
        expectErrno(ENOENT) { _ = try m.getattr(c) }
        // Permission is checked at open.
        let (p, _) = try m.mknod(alice, dir, n("p"), .regular, 0o600, rdev: 0, target: nil)
        expectErrno(EACCES) { _ = try m.open(bob, p, flags: O_RDONLY, sid: sid) }
        expectErrno(EISDIR) { _ = try m.open(bob, dir, flags: O_WRONLY, sid: sid) }
    }

    /// Many closes in one call (a gateway's batch) count as the same closes one by one: a file
    /// closed twice in the batch is freed once, one still open elsewhere or linked is kept.
    @Test(arguments: EngineKind.allCases)
    func closesInOneCall(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let dir = try playground(m)
        let sid = try m.newSession(SessionInfo(hostname: "h", pid: 1, mountPoint: "/mnt", version: "t"))
        let other = try m.newSession(SessionInfo(hostname: "h2", pid: 2, mountPoint: "/mnt2", version: "t"))
        let (twice, _) = try m.create(alice, dir, n("twice"), 0o644, sid: sid)
        _ = try m.writeSlice(twice, 0, Slice(pos: 0, id: 9, size: 10, off: 0, len: 10), minSize: 10, mtime: .now(), sid: 0)
        _ = try m.open(alice, twice, flags: O_RDONLY, sid: sid)
        let (kept, _) = try m.create(alice, dir, n("kept"), 0o644, sid: sid)
        let (shared, _) = try m.create(alice, dir, n("shared"), 0o644, sid: sid)
        _ = try m.open(alice, shared, flags: O_RDONLY, sid: other)
        let (once, _) = try m.create(alice, dir, n("once"), 0o644, sid: sid)
        _ = try m.open(alice, once, flags: O_RDONLY, sid: sid)
        for name in ["twice", "shared", "once"] { _ = try m.unlink(alice, dir, n(name)) }
        let freed = try m.close([(twice, sid), (kept, sid), (shared, sid), (once, sid), (twice, sid)])
        #expect(freed == [true, false, false, false, true])
        expectErrno(ENOENT) { _ = try m.getattr(twice) }
        #expect(try m.pendingDeletes(limit: 10).map { $0.ino } == [twice], "freed once, its data queued once")
        #expect(try m.getattr(kept).nlink == 1)
        #expect(try m.getattr(shared).nlink == 0, "still open in another session")
        #expect(try m.getattr(once).nlink == 0, "opened twice, closed once")
        #expect(try m.close([(shared, other), (once, sid)]) == [true, true])
        expectErrno(ENOENT) { _ = try m.getattr(shared) }
        expectErrno(ENOENT) { _ = try m.getattr(once) }
        #expect(try m.close([]) == [])
    }

    @Test(arguments: EngineKind.allCases)
    func recordLocksAndFlock(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let (ino, _) = try m.mknod(alice, rootIno, n("f"), .regular, 0o644, rdev: 0, target: nil)
        let s1 = try m.newSession(SessionInfo(hostname: "a", pid: 1, mountPoint: "/a", version: "t"))
        let s2 = try m.newSession(SessionInfo(hostname: "b", pid: 2, mountPoint: "/b", version: "t"))
        try m.setlk(ino, sid: s1, owner: 1, pid: 11, type: .write, start: 0, end: 99)
        expectErrno(EAGAIN) { try m.setlk(ino, sid: s2, owner: 2, pid: 22, type: .read, start: 50, end: 60) }
        try m.setlk(ino, sid: s2, owner: 2, pid: 22, type: .write, start: 100, end: .max)
        let conflict = try m.getlk(ino, sid: s2, owner: 2, type: .read, start: 10, end: 20)
        #expect(conflict == LockRange(type: .write, start: 0, end: 99, pid: 11))
        // Unlock the middle of a range: the rest stays locked.
        try m.setlk(ino, sid: s1, owner: 1, pid: 11, type: .unlock, start: 40, end: 59)
        try m.setlk(ino, sid: s2, owner: 3, pid: 33, type: .read, start: 45, end: 55)
        #expect(try m.getlk(ino, sid: s2, owner: 2, type: .write, start: 30, end: 39)?.pid == 11)
        #expect(try m.getlk(ino, sid: s2, owner: 2, type: .write, start: 60, end: 70)?.pid == 11)
        // Shared read locks coexist.
        try m.setlk(ino, sid: s1, owner: 4, pid: 44, type: .read, start: 45, end: 50)
        // flock
        try m.flock(ino, sid: s1, owner: 9, pid: 11, type: .write)
        expectErrno(EAGAIN) { try m.flock(ino, sid: s2, owner: 8, pid: 22, type: .read) }
        try m.flock(ino, sid: s1, owner: 9, pid: 11, type: .read)
        try m.flock(ino, sid: s2, owner: 8, pid: 22, type: .read)
        // A closed session's locks are gone.
        try m.closeSession(s1)
        #expect(try m.getlk(ino, sid: s2, owner: 2, type: .write, start: 0, end: 30) == nil)
        try m.flock(ino, sid: s2, owner: 8, pid: 22, type: .write)
    }

    @Test(arguments: EngineKind.allCases)
    func twoClientsShareOneVolume(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let other = try f.reopen()
        let (ino, _) = try f.engine.mknod(alice, rootIno, n("shared"), .regular, 0o644, rdev: 0, target: nil)
        #expect(try other.lookup(alice, rootIno, n("shared")).0 == ino)
        _ = try other.writeSlice(ino, 0, Slice(pos: 0, id: 3, size: 5, off: 0, len: 5), minSize: 5, mtime: .now(), sid: 0)
        // (A tracked cache sees another client's change once Redis's invalidation arrives:
        // Redis may send it just after its reply to the writer.)
        #expect(try seenSoon(kind) { try f.engine.getattr(ino).size == 5 })
    }
}

/// The rules the differential test found missing or wrong, and the bounded steps of work that
/// grows with a file or a session: every engine must follow them alike.
@Suite("Metadata rules and bounds", .timeLimit(.minutes(3)))
struct RulesAndBoundsTests {
    private func mode(_ m: any MetadataEngine, _ ino: Ino) throws -> UInt16 { try m.getattr(ino).mode }

    private func chmod(_ m: any MetadataEngine, _ who: Credential, _ ino: Ino, _ mode: UInt16) throws {
        var r = SetAttrRequest(mask: .mode)
        r.mode = mode
        _ = try m.setattr(who, ino, r)
    }

    @Test(arguments: EngineKind.allCases)
    func privilegeBits(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let dir = try playground(m)
        let (ino, _) = try m.mknod(alice, dir, n("prog"), .regular, 0o644, rdev: 0, target: nil)
        // A write by anyone but root clears set-user-ID, and set-group-ID of an executable.
        try chmod(m, alice, ino, 0o6777)
        _ = try m.setattr(bob, ino, SetAttrRequest(mask: .killPriv))
        #expect(try mode(m, ino) == 0o777)
        try chmod(m, alice, ino, 0o4755)
        _ = try m.setattr(root, ino, SetAttrRequest(mask: .killPriv))
        #expect(try mode(m, ino) == 0o4755, "root keeps them (CAP_FSETID)")
        // set-group-ID without group execute stays for a writer in the group, goes otherwise.
        try chmod(m, alice, ino, 0o2646)
        _ = try m.setattr(alice, ino, SetAttrRequest(mask: .killPriv))
        #expect(try mode(m, ino) == 0o2646)
        _ = try m.setattr(bob, ino, SetAttrRequest(mask: []))
        #expect(try mode(m, ino) == 0o646, "the kernel's empty setattr after a write by bob")
        // A truncate clears them, and chown (even by root, even to the same owner) clears set-user-ID.
        try chmod(m, alice, ino, 0o6755)
        var trunc = SetAttrRequest(mask: .size)
        trunc.size = 0
        _ = try m.setattr(alice, ino, trunc)
        #expect(try mode(m, ino) == 0o755)
        try chmod(m, alice, ino, 0o4755)
        var chown = SetAttrRequest(mask: .uid)
        chown.uid = alice.uid
        _ = try m.setattr(root, ino, chown)
        #expect(try mode(m, ino) == 0o755)
        // A non-owner may only drop privilege bits (the kernel asks that after a write).
        try chmod(m, alice, ino, 0o4755)
        try chmod(m, bob, ino, 0o755)
        #expect(try mode(m, ino) == 0o755)
        expectErrno(EPERM) { try chmod(m, bob, ino, 0o755) }
        expectErrno(EPERM) { try chmod(m, bob, ino, 0o4755) }
        expectErrno(EPERM) { try chmod(m, bob, ino, 0o700) }
    }

    @Test(arguments: EngineKind.allCases)
    func truncateTimes(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let dir = try playground(m)
        let (ino, a0) = try m.mknod(alice, dir, n("t"), .regular, 0o644, rdev: 0, target: nil)
        var old = SetAttrRequest(mask: [.mtime, .atime])
        old.mtime = Timespec(sec: 1000, nsec: 5)
        old.atime = old.mtime
        _ = try m.setattr(alice, ino, old)
        var same = SetAttrRequest(mask: .size)
        same.size = a0.size
        let a = try m.setattr(alice, ino, same)
        #expect(a.mtime.sec > 1000 && a.ctime.sec > 1000, "a truncate to the same size updates mtime and ctime")
        expectErrno(EFBIG) {
            var big = SetAttrRequest(mask: .size)
            big.size = maxFileSize + 1
            _ = try m.setattr(alice, ino, big)
        }
        var max = SetAttrRequest(mask: .size)
        max.size = maxFileSize
        #expect(try m.setattr(alice, ino, max).size == maxFileSize)
    }

    @Test(arguments: EngineKind.allCases)
    func truncateAndDeleteInBoundedSteps(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let dir = try playground(m)
        let (ino, _) = try m.mknod(alice, dir, n("dense"), .regular, 0o644, rdev: 0, target: nil)
        let chunks: UInt32 = 2500
        for i in 0..<chunks {
            let s = Slice(pos: 0, id: UInt64(i) + 1, size: 10, off: 0, len: 10)
            _ = try m.writeSlice(ino, i, s, minSize: UInt64(i) * chunkSize + 10, mtime: .now(), sid: 0)
        }
        // Cutting to 100 bytes takes three bounded steps inside setattr; all records beyond go.
        var cut = SetAttrRequest(mask: .size)
        cut.size = 100
        #expect(try m.setattr(alice, ino, cut).size == 100)
        #expect(try m.readChunk(ino, 1).isEmpty && m.readChunk(ino, chunks - 1).isEmpty)
        let first = try m.readChunk(ino, 0)
        #expect(first.count == 2 && first[1].id == 0 && first[1].pos == 100, "a hole after the new end")
        var dropped = 0
        while true {
            let batch = try m.takeDroppedSlices(limit: 500)
            if batch.isEmpty { break }
            dropped += batch.count
        }
        #expect(dropped == Int(chunks) - 1)
        // Deleting a file with many chunks: finishDelete drops at most chunkBatch per call.
        let (big, _) = try m.mknod(alice, dir, n("big"), .regular, 0o644, rdev: 0, target: nil)
        for i in 0..<chunks {
            _ = try m.writeSlice(big, i * 7, Slice(pos: 0, id: UInt64(i) + 9000, size: 1, off: 0, len: 1), minSize: 1, mtime: .now(), sid: 0)
        }
        _ = try m.unlink(alice, dir, n("big"))
        let pending = try #require(try m.pendingDeletes(limit: 10).first { $0.ino == big })
        var calls = 0
        var freed = 0
        while true {
            let (slices, done) = try m.finishDelete(pending)
            calls += 1
            freed += slices.count
            #expect(slices.count <= chunkBatch)
            if done { break }
        }
        #expect(freed == Int(chunks) && calls == 3)
        #expect(try m.pendingDeletes(limit: 10).allSatisfy { $0.ino != big })
        // A sparse file of the largest size is deleted at once: nothing was written.
        let (sparse, _) = try m.mknod(alice, dir, n("sparse"), .regular, 0o644, rdev: 0, target: nil)
        var max = SetAttrRequest(mask: .size)
        max.size = maxFileSize
        _ = try m.setattr(alice, sparse, max)
        _ = try m.unlink(alice, dir, n("sparse"))
        let p2 = try #require(try m.pendingDeletes(limit: 10).first { $0.ino == sparse })
        let (none, done) = try m.finishDelete(p2)
        #expect(none.isEmpty && done)
    }

    @Test(arguments: EngineKind.allCases)
    func closingASessionWithManyOpenFiles(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let dir = try playground(m)
        let before = try m.statfs().usedInodes
        let sid = try m.newSession(SessionInfo(hostname: "h", pid: 1, mountPoint: "/m", version: "t"))
        for i in 0..<2100 {
            _ = try m.create(alice, dir, n("f\(i)"), 0o644, sid: sid)
            _ = try m.unlink(alice, dir, n("f\(i)"))
        }
        #expect(try m.statfs().usedInodes == before + 2100, "unlinked but open")
        try m.closeSession(sid)
        #expect(try m.statfs().usedInodes == before)
        #expect(try m.listSessions().allSatisfy { $0.sid != sid })
    }

    @Test(arguments: EngineKind.allCases)
    func extendedAttributeNames(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let dir = try playground(m)
        let (ino, _) = try m.mknod(alice, dir, n("x"), .regular, 0o600, rdev: 0, target: nil)
        expectErrno(EINVAL) { try m.setxattr(alice, ino, n("user."), [1], .any) }
        expectErrno(EINVAL) { _ = try m.getxattr(alice, ino, n("user.")) }
        expectErrno(EOPNOTSUPP) { _ = try m.getxattr(alice, ino, n("bogus.x")) }
        expectErrno(EACCES) { _ = try m.getxattr(bob, ino, n("bogus.x")) }
        expectErrno(ENODATA) { _ = try m.getxattr(bob, ino, n("security.s")) }
        expectErrno(EPERM) { try m.setxattr(alice, ino, n("security.s"), [1], .any) }
        try m.setxattr(root, ino, n("security.s"), [1], .any)
        for i in 0..<(maxXattrsPerInode - 1) { try m.setxattr(alice, ino, n("user.a\(i)"), [], .any) }
        expectErrno(ENOSPC) { try m.setxattr(alice, ino, n("user.one-too-many"), [], .any) }
        try m.setxattr(alice, ino, n("user.a0"), [2], .replace)
    }

    /// An inode's attributes take at most `maxXattrBytesPerInode` bytes of names and values
    /// (issue 18: a user filled the shared Redis through them): growing past it is `ENOSPC`, for
    /// root too, and changes nothing; a value no larger and a removal always work, and the room
    /// a removal frees is usable again. Each inode has its own bound; a deleted inode leaves no
    /// total behind.
    @Test(arguments: EngineKind.allCases)
    func extendedAttributeBytesAreBounded(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let dir = try playground(m)
        let (ino, _) = try m.mknod(alice, dir, n("x"), .regular, 0o600, rdev: 0, target: nil)
        func bytes(_ count: Int, _ b: UInt8) -> [UInt8] { [UInt8](repeating: b, count: count) }
        // The largest value the syscall allows does not fit with its name (one byte more: E2BIG).
        expectErrno(ENOSPC) { try m.setxattr(alice, ino, n("user.v"), bytes(65536, 1), .any) }
        expectErrno(E2BIG) { try m.setxattr(alice, ino, n("user.v"), bytes(65537, 1), .any) }
        #expect(try m.listxattr(alice, ino).isEmpty)
        // Exactly the bound fits ("user.a" and "user.b": 6 bytes each).
        try m.setxattr(alice, ino, n("user.a"), bytes(40000, 1), .any)
        try m.setxattr(alice, ino, n("user.b"), bytes(maxXattrBytesPerInode - 40000 - 12, 2), .any)
        expectErrno(ENOSPC) { try m.setxattr(alice, ino, n("user.c"), [], .any) }
        expectErrno(ENOSPC) { try m.setxattr(alice, ino, n("user.a"), bytes(40001, 3), .replace) }
        expectErrno(ENOSPC) { try m.setxattr(root, ino, n("trusted.t"), [], .any) }
        #expect(try m.getxattr(alice, ino, n("user.a")) == bytes(40000, 1))
        #expect(try m.listxattr(root, ino) == [n("user.a"), n("user.b")])
        // A value of the same size, or smaller, always fits; what it frees is usable.
        try m.setxattr(alice, ino, n("user.a"), bytes(40000, 4), .replace)
        try m.setxattr(alice, ino, n("user.a"), bytes(30000, 5), .any)
        try m.setxattr(alice, ino, n("user.c"), bytes(10000 - 6, 6), .create)
        expectErrno(ENOSPC) { try m.setxattr(alice, ino, n("user.d"), [], .any) }
        try m.removexattr(alice, ino, n("user.b"))
        // Left: user.a 30006, user.c 10000.
        try m.setxattr(alice, ino, n("user.d"), bytes(maxXattrBytesPerInode - 40006 - 6, 7), .any)
        expectErrno(ENOSPC) { try m.setxattr(alice, ino, n("user.e"), [], .any) }
        for name in ["user.a", "user.c", "user.d"] { try m.removexattr(alice, ino, n(name)) }
        #expect(try f.storedXattrTotals() == 0, "no attribute left, no total kept")
        try m.setxattr(alice, ino, n("user.e"), bytes(maxXattrBytesPerInode - 6, 8), .any)
        // Another inode has its own bound.
        let (other, _) = try m.mknod(alice, dir, n("y"), .regular, 0o600, rdev: 0, target: nil)
        try m.setxattr(alice, other, n("user.e"), bytes(maxXattrBytesPerInode - 6, 9), .any)
        #expect(try f.storedXattrTotals() == 2)
        _ = try m.unlink(alice, dir, n("x"))
        _ = try m.unlink(alice, dir, n("y"))
        #expect(try f.storedXattrTotals() == 0, "deleted inodes keep no total")
    }

    /// Attributes set before the total was kept (an older volume): the total is summed once from
    /// the attributes themselves, and an inode already past the bound can shrink but not grow.
    @Test(arguments: EngineKind.allCases)
    func extendedAttributeBytesOfAnOlderVolume(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let dir = try playground(m)
        let (ino, _) = try m.mknod(alice, dir, n("x"), .regular, 0o600, rdev: 0, target: nil)
        // 2 x (7 + 40000) = 80014 bytes, past the bound.
        try f.putXattrsWithoutTotal(ino, [("user.l1", 40000), ("user.l2", 40000)])
        #expect(try m.listxattr(alice, ino) == [n("user.l1"), n("user.l2")])
        expectErrno(ENOSPC) { try m.setxattr(alice, ino, n("user.new"), [], .any) }
        expectErrno(ENOSPC) { try m.setxattr(alice, ino, n("user.l1"), [UInt8](repeating: 1, count: 40001), .replace) }
        try m.setxattr(alice, ino, n("user.l1"), [1], .replace)
        // Now 8 + 40007: what is left is counted to the byte.
        let room = maxXattrBytesPerInode - 40015 - 8
        expectErrno(ENOSPC) { try m.setxattr(alice, ino, n("user.new"), [UInt8](repeating: 2, count: room + 1), .any) }
        try m.setxattr(alice, ino, n("user.new"), [UInt8](repeating: 2, count: room), .any)
        expectErrno(ENOSPC) { try m.setxattr(alice, ino, n("user.z"), [], .any) }
        // A removal where no total is stored leaves it to be summed the next time.
        let (b, _) = try m.mknod(alice, dir, n("b"), .regular, 0o600, rdev: 0, target: nil)
        try f.putXattrsWithoutTotal(b, [("user.p", 100), ("user.q", 65000)])
        try m.removexattr(alice, b, n("user.q"))
        expectErrno(ENOSPC) { try m.setxattr(alice, b, n("user.r"), [UInt8](repeating: 3, count: maxXattrBytesPerInode - 106 - 5), .any) }
        try m.setxattr(alice, b, n("user.r"), [UInt8](repeating: 3, count: maxXattrBytesPerInode - 106 - 6), .any)
    }

    @Test(arguments: EngineKind.allCases)
    func renameWalksABoundedNumberOfAncestors(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let top = try playground(m)
        _ = try m.mknod(alice, top, n("moved"), .directory, 0o755, rdev: 0, target: nil)
        var parent = top
        for _ in 0...maxRenameDepth { (parent, _) = try m.mknod(alice, parent, n("d"), .directory, 0o755, rdev: 0, target: nil) }
        expectErrno(ELOOP) { _ = try m.rename(alice, top, n("moved"), parent, n("moved"), []) }
        let (shallow, _) = try m.mknod(alice, top, n("shallow"), .directory, 0o755, rdev: 0, target: nil)
        _ = try m.rename(alice, top, n("moved"), shallow, n("moved"), [])
    }
}

/// A third user: in alice's group (1000), owner of nothing the tests make unless said.
private let carol = Credential(uid: 1002, gid: 1000, groups: [1000])

/// The errno paths of the rules (`TxnMetadata`, `SetAttrRules`, `validateName`, the xattr
/// checks) that the differential test against ext4
/// drives, each asserted with the errno ext4 gives at the engine's interface, and with what a
/// refused call must leave as it was.
@Suite("Metadata errno paths", .timeLimit(.minutes(2)))
struct ErrnoPathTests {
    private func session(_ m: any MetadataEngine) throws -> UInt64 {
        try m.newSession(SessionInfo(hostname: "h", pid: 1, mountPoint: "/m", version: "t"))
    }

    private func ino(_ m: any MetadataEngine, _ dir: Ino, _ name: String) throws -> Ino {
        try m.lookup(root, dir, n(name)).0
    }

    /// ENAMETOOLONG for a 256-byte name from every call that makes a name; 255 bytes is the
    /// longest accepted. "." and ".." always exist (EEXIST); rmdir of "." is EINVAL, of ".."
    /// ENOTEMPTY (`do_rmdir`).
    @Test(arguments: EngineKind.allCases)
    func nameLengthAndDotNames(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let dir = try playground(m)
        let sid = try session(m)
        let long = [UInt8](repeating: 97, count: 256)
        let (file, _) = try m.mknod(alice, dir, n("file"), .regular, 0o644, rdev: 0, target: nil)
        let (sub, _) = try m.mknod(alice, dir, n("sub"), .directory, 0o755, rdev: 0, target: nil)
        let inodes = try m.statfs().usedInodes
        expectErrno(ENAMETOOLONG, "create") { _ = try m.create(alice, dir, long, 0o644, sid: sid) }
        expectErrno(ENAMETOOLONG, "mkdir") { _ = try m.mknod(alice, dir, long, .directory, 0o755, rdev: 0, target: nil) }
        expectErrno(ENAMETOOLONG, "symlink") { _ = try m.mknod(alice, dir, long, .symlink, 0o777, rdev: 0, target: n("file")) }
        expectErrno(ENAMETOOLONG, "mkfifo") { _ = try m.mknod(alice, dir, long, .fifo, 0o644, rdev: 0, target: nil) }
        expectErrno(ENAMETOOLONG, "link") { _ = try m.link(alice, file, dir, long) }
        expectErrno(ENAMETOOLONG, "rename") { _ = try m.rename(alice, dir, n("file"), dir, long, []) }
        expectErrno(ENAMETOOLONG, "rename dir") { _ = try m.rename(alice, dir, n("sub"), dir, long, []) }
        expectErrno(ENAMETOOLONG, "rename noreplace") { _ = try m.rename(alice, dir, n("file"), dir, long, .noReplace) }
        expectErrno(ENAMETOOLONG, "lookup") { _ = try m.lookup(root, dir, long) }
        #expect(try names(m, dir) == ["file", "sub"])
        #expect(try m.statfs().usedInodes == inodes, "no inode left behind")
        #expect(try m.getattr(file).nlink == 1)
        #expect(try m.getattr(dir).nlink == 3)

        // 255 bytes: accepted by each, and found again.
        let l255 = [UInt8](repeating: 98, count: 255)
        let r255 = [UInt8](repeating: 99, count: 255)
        _ = try m.link(alice, file, dir, l255)
        #expect(try m.lookup(alice, dir, l255).0 == file)
        _ = try m.rename(alice, dir, l255, dir, r255, [])
        #expect(try m.lookup(alice, dir, r255).0 == file)
        _ = try m.unlink(alice, dir, r255)
        _ = try m.mknod(alice, dir, l255, .directory, 0o755, rdev: 0, target: nil)
        _ = try m.rmdir(alice, dir, l255)
        // A symlink target of 4095 bytes (PATH_MAX less its NUL) is kept whole.
        let target = [UInt8](repeating: 116, count: 4095)
        let (sl, sla) = try m.mknod(alice, dir, l255, .symlink, 0o777, rdev: 0, target: target)
        #expect(sla.size == 4095)
        #expect(try m.readlink(sl) == target)
        _ = try m.unlink(alice, dir, l255)
        let (c, _) = try m.create(alice, dir, l255, 0o644, sid: sid)
        _ = try m.unlink(alice, dir, l255)
        try m.close(c, sid: sid)

        // "." and "..": never created (filename_create), whoever asks.
        for dot in [n("."), n("..")] {
            for who in [alice, root] {
                expectErrno(EEXIST, "mkdir \(dot.count)") { _ = try m.mknod(who, sub, dot, .directory, 0o755, rdev: 0, target: nil) }
                expectErrno(EEXIST, "create \(dot.count)") { _ = try m.create(who, sub, dot, 0o644, sid: sid) }
                expectErrno(EEXIST, "symlink \(dot.count)") { _ = try m.mknod(who, sub, dot, .symlink, 0o777, rdev: 0, target: n("x")) }
                expectErrno(EEXIST, "mkfifo \(dot.count)") { _ = try m.mknod(who, sub, dot, .fifo, 0o644, rdev: 0, target: nil) }
                expectErrno(EEXIST, "link \(dot.count)") { _ = try m.link(who, file, sub, dot) }
            }
        }
        for who in [alice, root] {
            expectErrno(EINVAL, "rmdir .") { _ = try m.rmdir(who, sub, n(".")) }
            expectErrno(ENOTEMPTY, "rmdir ..") { _ = try m.rmdir(who, sub, n("..")) }
        }
        #expect(try names(m, sub).isEmpty)
        #expect(try names(m, dir) == ["file", "sub"])
        #expect(try m.getattr(sub).nlink == 2 && m.getattr(dir).nlink == 3 && m.getattr(file).nlink == 1)
        #expect(try m.statfs().usedInodes == inodes)
    }

    /// EEXIST from every call that makes a name when the name is taken, whatever the type of
    /// what has it; the existing entry is untouched and no inode is left behind.
    @Test(arguments: EngineKind.allCases)
    func takenNamesAreEEXIST(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let dir = try playground(m)
        let sid = try session(m)
        let (src, _) = try m.mknod(alice, dir, n("src"), .regular, 0o644, rdev: 0, target: nil)
        var taken: [String: Ino] = [:]
        taken["f"] = try m.mknod(alice, dir, n("f"), .regular, 0o644, rdev: 0, target: nil).0
        taken["d"] = try m.mknod(alice, dir, n("d"), .directory, 0o755, rdev: 0, target: nil).0
        taken["l"] = try m.mknod(alice, dir, n("l"), .symlink, 0o777, rdev: 0, target: n("d")).0
        taken["p"] = try m.mknod(alice, dir, n("p"), .fifo, 0o644, rdev: 0, target: nil).0
        let inodes = try m.statfs().usedInodes
        for (name, _) in taken {
            for who in [alice, root] {
                expectErrno(EEXIST, "create (O_EXCL) over \(name)") { _ = try m.create(who, dir, n(name), 0o644, sid: sid) }
                expectErrno(EEXIST, "mknod over \(name)") { _ = try m.mknod(who, dir, n(name), .regular, 0o644, rdev: 0, target: nil) }
                expectErrno(EEXIST, "mkdir over \(name)") { _ = try m.mknod(who, dir, n(name), .directory, 0o755, rdev: 0, target: nil) }
                expectErrno(EEXIST, "symlink over \(name)") { _ = try m.mknod(who, dir, n(name), .symlink, 0o777, rdev: 0, target: n("x")) }
                expectErrno(EEXIST, "mkfifo over \(name)") { _ = try m.mknod(who, dir, n(name), .fifo, 0o644, rdev: 0, target: nil) }
                expectErrno(EEXIST, "link over \(name)") { _ = try m.link(who, src, dir, n(name)) }
                expectErrno(EEXIST, "rename noreplace over \(name)") { _ = try m.rename(who, dir, n("src"), dir, n(name), .noReplace) }
            }
        }
        for (name, i) in taken { #expect(try ino(m, dir, name) == i, "\(name) still names its inode") }
        #expect(try ino(m, dir, "src") == src)
        #expect(try m.getattr(src).nlink == 1)
        #expect(try m.getattr(taken["f"]!).nlink == 1)
        #expect(try m.getattr(dir).nlink == 3)
        #expect(try m.statfs().usedInodes == inodes, "no inode left behind")
        #expect(try names(m, dir) == ["d", "f", "l", "p", "src"])
    }

    /// ENOENT for a name that is not there or a directory removed meanwhile (`IS_DEADDIR`), for
    /// linking an inode with no links left (`vfs_link`); ENOTDIR where a directory is needed.
    @Test(arguments: EngineKind.allCases)
    func missingAndWrongTypeOperands(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let dir = try playground(m)
        let sid = try session(m)
        let (file, _) = try m.mknod(alice, dir, n("f"), .regular, 0o644, rdev: 0, target: nil)
        let (gone, _) = try m.mknod(alice, dir, n("gone"), .directory, 0o777, rdev: 0, target: nil)
        _ = try m.mknod(alice, dir, n("sl"), .symlink, 0o777, rdev: 0, target: n("gone"))
        _ = try m.rmdir(alice, dir, n("gone"))
        // A removed directory (a process's working directory): nothing is found or made in it.
        expectErrno(ENOENT, "lookup") { _ = try m.lookup(alice, gone, n("x")) }
        expectErrno(ENOENT, "create") { _ = try m.create(alice, gone, n("x"), 0o644, sid: sid) }
        expectErrno(ENOENT, "mknod") { _ = try m.mknod(alice, gone, n("x"), .regular, 0o644, rdev: 0, target: nil) }
        expectErrno(ENOENT, "mkdir") { _ = try m.mknod(alice, gone, n("x"), .directory, 0o755, rdev: 0, target: nil) }
        expectErrno(ENOENT, "symlink") { _ = try m.mknod(alice, gone, n("x"), .symlink, 0o777, rdev: 0, target: n("f")) }
        expectErrno(ENOENT, "link") { _ = try m.link(alice, file, gone, n("x")) }
        expectErrno(ENOENT, "readdir") { _ = try m.readdir(gone, after: 0, limit: 10, plus: false) }
        #expect(try m.getattr(file).nlink == 1)
        // Names that are not there.
        expectErrno(ENOENT, "unlink") { _ = try m.unlink(alice, dir, n("missing")) }
        expectErrno(ENOENT, "rename") { _ = try m.rename(alice, dir, n("missing"), dir, n("x"), []) }
        expectErrno(ENOENT, "rename noreplace") { _ = try m.rename(alice, dir, n("missing"), dir, n("x"), .noReplace) }
        expectErrno(ENOENT, "rename exchange") { _ = try m.rename(alice, dir, n("missing"), dir, n("f"), .exchange) }
        // A regular file (or a symlink) where a directory is needed.
        expectErrno(ENOTDIR, "unlink in a file") { _ = try m.unlink(alice, file, n("x")) }
        expectErrno(ENOTDIR, "rmdir in a file") { _ = try m.rmdir(alice, file, n("x")) }
        expectErrno(ENOTDIR, "link into a file") { _ = try m.link(alice, file, file, n("x")) }
        expectErrno(ENOTDIR, "rename out of a file") { _ = try m.rename(alice, file, n("x"), dir, n("y"), []) }
        expectErrno(ENOTDIR, "rename into a file") { _ = try m.rename(alice, dir, n("f"), file, n("y"), []) }
        expectErrno(ENOTDIR, "readdir of a file") { _ = try m.readdir(file, after: 0, limit: 10, plus: false) }
        expectErrno(ENOTDIR, "rmdir of a symlink") { _ = try m.rmdir(alice, dir, n("sl")) }
        #expect(try names(m, dir) == ["f", "sl"])
        // An unlinked file still open cannot get a name again.
        let (tmp, _) = try m.create(alice, dir, n("tmp"), 0o644, sid: sid)
        _ = try m.unlink(alice, dir, n("tmp"))
        expectErrno(ENOENT, "link of an unlinked inode") { _ = try m.link(alice, tmp, dir, n("back")) }
        expectErrno(ENOENT) { _ = try m.lookup(alice, dir, n("back")) }
        #expect(try m.getattr(tmp).nlink == 0)
        try m.close(tmp, sid: sid)
        expectErrno(ENOENT, "link of a freed inode") { _ = try m.link(alice, tmp, dir, n("back")) }
        #expect(try names(m, dir) == ["f", "sl"])
    }

    /// rename's refusals beyond the type rules: EACCES without write permission on either
    /// directory (`may_delete`/`may_create`) or, for a directory that changes parent, on itself
    /// (its ".." changes; both sides of an exchange); EINVAL for RENAME_EXCHANGE with
    /// RENAME_NOREPLACE and for an exchange with an ancestor of the source; ENOTEMPTY for a
    /// rename onto one. Nothing moves.
    @Test(arguments: EngineKind.allCases)
    func renameRefusals(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let dir = try playground(m)
        let (priv, _) = try m.mknod(alice, dir, n("priv"), .directory, 0o755, rdev: 0, target: nil)
        let (pf, _) = try m.mknod(alice, priv, n("pf"), .regular, 0o666, rdev: 0, target: nil)
        let (bf, _) = try m.mknod(bob, dir, n("bf"), .regular, 0o644, rdev: 0, target: nil)
        expectErrno(EACCES, "out of a directory bob cannot write") { _ = try m.rename(bob, priv, n("pf"), dir, n("taken"), []) }
        expectErrno(EACCES, "into it") { _ = try m.rename(bob, dir, n("bf"), priv, n("bf"), []) }
        expectErrno(EACCES, "over a file in it") { _ = try m.rename(bob, dir, n("bf"), priv, n("pf"), []) }
        expectErrno(EACCES, "exchange with a file in it") { _ = try m.rename(bob, dir, n("bf"), priv, n("pf"), .exchange) }
        expectErrno(EACCES, "within it") { _ = try m.rename(bob, priv, n("pf"), priv, n("pf2"), []) }
        expectErrno(EACCES, "a link into it") { _ = try m.link(bob, bf, priv, n("bf")) }
        #expect(try names(m, priv) == ["pf"] && ino(m, priv, "pf") == pf && ino(m, dir, "bf") == bf)
        #expect(try m.getattr(bf).nlink == 1)
        // Root may.
        _ = try m.rename(root, priv, n("pf"), priv, n("pf2"), [])
        _ = try m.rename(root, priv, n("pf2"), priv, n("pf"), [])

        // A directory moving to another parent needs write permission on itself, even its owner's.
        let (other, _) = try m.mknod(bob, dir, n("other"), .directory, 0o777, rdev: 0, target: nil)
        let (ro, _) = try m.mknod(bob, dir, n("ro"), .directory, 0o555, rdev: 0, target: nil)
        expectErrno(EACCES, "read-only directory to another parent") { _ = try m.rename(bob, dir, n("ro"), other, n("ro"), []) }
        #expect(try ino(m, dir, "ro") == ro && m.getattr(ro).parent == dir)
        #expect(try m.getattr(dir).nlink == 5 && m.getattr(other).nlink == 2)
        _ = try m.rename(bob, dir, n("ro"), dir, n("ro2"), [])  // same parent: ".." does not change
        _ = try m.rename(root, dir, n("ro2"), other, n("ro"), [])
        #expect(try m.getattr(ro).parent == other && m.getattr(other).nlink == 3)
        // An exchange with someone else's directory in another parent: EACCES on that directory.
        let (adir, _) = try m.mknod(alice, dir, n("adir"), .directory, 0o755, rdev: 0, target: nil)
        let (bf2, _) = try m.mknod(bob, other, n("bf2"), .regular, 0o644, rdev: 0, target: nil)
        expectErrno(EACCES, "exchange with alice's directory") { _ = try m.rename(bob, other, n("bf2"), dir, n("adir"), .exchange) }
        #expect(try ino(m, dir, "adir") == adir && ino(m, other, "bf2") == bf2 && m.getattr(adir).parent == dir)
        _ = try m.rename(alice, dir, n("adir"), dir, n("bf"), .exchange)  // same parent: allowed
        #expect(try ino(m, dir, "bf") == adir && ino(m, dir, "adir") == bf)
        _ = try m.rename(alice, dir, n("adir"), dir, n("bf"), .exchange)

        // RENAME_EXCHANGE with RENAME_NOREPLACE.
        expectErrno(EINVAL, "exchange and noreplace") { _ = try m.rename(alice, dir, n("adir"), dir, n("bf"), [.exchange, .noReplace]) }
        // An ancestor of the source as destination: EINVAL for an exchange, ENOTEMPTY otherwise.
        let (a, _) = try m.mknod(alice, dir, n("A"), .directory, 0o755, rdev: 0, target: nil)
        let (b, _) = try m.mknod(alice, a, n("B"), .directory, 0o755, rdev: 0, target: nil)
        let (fb, _) = try m.mknod(alice, b, n("f"), .regular, 0o644, rdev: 0, target: nil)
        expectErrno(EINVAL, "exchange a file with its grandparent") { _ = try m.rename(alice, b, n("f"), dir, n("A"), .exchange) }
        expectErrno(EINVAL, "exchange a directory with its parent") { _ = try m.rename(alice, a, n("B"), dir, n("A"), .exchange) }
        expectErrno(ENOTEMPTY, "a directory onto its parent") { _ = try m.rename(alice, a, n("B"), dir, n("A"), []) }
        expectErrno(EINVAL, "a directory into itself") { _ = try m.rename(alice, dir, n("A"), a, n("A"), []) }
        #expect(try names(m, a) == ["B"] && names(m, b) == ["f"])
        #expect(try ino(m, dir, "A") == a && ino(m, a, "B") == b && ino(m, b, "f") == fb)
        #expect(try m.getattr(b).parent == a && m.getattr(a).parent == dir && m.getattr(a).nlink == 3)
    }

    /// A sticky directory: only the entry's owner, the directory's owner and root remove or
    /// rename an entry (EPERM, checked before ENOTEMPTY), for directories as for files.
    @Test(arguments: EngineKind.allCases)
    func stickyDirectoryRemovalsAndRenames(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let tmp = try playground(m, "tmp", mode: 0o1777)
        let (full, _) = try m.mknod(alice, tmp, n("full"), .directory, 0o777, rdev: 0, target: nil)
        _ = try m.mknod(alice, full, n("inside"), .regular, 0o666, rdev: 0, target: nil)
        let (empty, _) = try m.mknod(alice, tmp, n("empty"), .directory, 0o777, rdev: 0, target: nil)
        let (bd, _) = try m.mknod(bob, tmp, n("bd"), .directory, 0o777, rdev: 0, target: nil)
        expectErrno(EPERM, "rmdir of alice's empty directory") { _ = try m.rmdir(bob, tmp, n("empty")) }
        expectErrno(EPERM, "rmdir of a non-empty one: sticky first") { _ = try m.rmdir(bob, tmp, n("full")) }
        expectErrno(EPERM, "rename of alice's directory") { _ = try m.rename(bob, tmp, n("empty"), tmp, n("mine"), []) }
        expectErrno(EPERM, "rename over it") { _ = try m.rename(bob, tmp, n("bd"), tmp, n("empty"), []) }
        expectErrno(EPERM, "rename over a non-empty one: sticky first") { _ = try m.rename(bob, tmp, n("bd"), tmp, n("full"), []) }
        expectErrno(EPERM, "exchange with it") { _ = try m.rename(bob, tmp, n("bd"), tmp, n("empty"), .exchange) }
        #expect(try names(m, tmp) == ["bd", "empty", "full"])
        #expect(try ino(m, tmp, "empty") == empty && ino(m, tmp, "full") == full && ino(m, tmp, "bd") == bd)
        #expect(try m.getattr(tmp).nlink == 5)
        _ = try m.rmdir(alice, tmp, n("empty"))
        _ = try m.rmdir(root, tmp, n("bd"))

        // The directory's owner: alice's sticky directory, where bob and carol keep things.
        let (share, _) = try m.mknod(alice, tmp, n("share"), .directory, 0o1777, rdev: 0, target: nil)
        _ = try m.mknod(bob, share, n("bf"), .regular, 0o666, rdev: 0, target: nil)
        _ = try m.mknod(bob, share, n("bg"), .regular, 0o666, rdev: 0, target: nil)
        _ = try m.mknod(bob, share, n("bsub"), .directory, 0o777, rdev: 0, target: nil)
        _ = try m.mknod(carol, share, n("cf"), .regular, 0o666, rdev: 0, target: nil)
        expectErrno(EPERM, "carol unlinks bob's file") { _ = try m.unlink(carol, share, n("bf")) }
        expectErrno(EPERM, "carol renames it") { _ = try m.rename(carol, share, n("bf"), share, n("cf2"), []) }
        expectErrno(EPERM, "carol renames hers over it") { _ = try m.rename(carol, share, n("cf"), share, n("bf"), []) }
        expectErrno(EPERM, "carol removes bob's directory") { _ = try m.rmdir(carol, share, n("bsub")) }
        expectErrno(EPERM, "bob unlinks carol's file") { _ = try m.unlink(bob, share, n("cf")) }
        #expect(try names(m, share) == ["bf", "bg", "bsub", "cf"])
        _ = try m.rename(alice, share, n("bf"), share, n("bf2"), [])
        _ = try m.rename(alice, share, n("cf"), share, n("bf2"), [])
        #expect(try names(m, share) == ["bf2", "bg", "bsub"])
        #expect(try m.unlink(alice, share, n("bf2")).freed)
        _ = try m.rmdir(alice, share, n("bsub"))
        _ = try m.rename(root, share, n("bg"), tmp, n("bg"), [])
        #expect(try names(m, share).isEmpty)
    }

    /// setattr's refusals: truncation of a directory (EISDIR) or of another non-regular file
    /// (EINVAL) before any permission, of a file without write permission (EACCES) unless
    /// through an open file; chown/chgrp by anyone but the owner (EPERM) even to what the file
    /// has; explicit times by a non-owner (EPERM) even beside "now". Nothing changes.
    @Test(arguments: EngineKind.allCases)
    func setattrRefusals(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let dir = try playground(m)
        let (fifo, _) = try m.mknod(alice, dir, n("fifo"), .fifo, 0o600, rdev: 0, target: nil)
        let (d, _) = try m.mknod(alice, dir, n("d"), .directory, 0o700, rdev: 0, target: nil)
        var trunc = SetAttrRequest(mask: .size)
        trunc.size = 10
        for who in [alice, bob, root] {
            expectErrno(EISDIR, "truncate a directory") { _ = try m.setattr(who, d, trunc) }
            expectErrno(EINVAL, "truncate a fifo") { _ = try m.setattr(who, fifo, trunc) }
        }
        #expect(try m.getattr(fifo).size == 0)

        let (ro, _) = try m.mknod(alice, dir, n("ro"), .regular, 0o444, rdev: 0, target: nil)
        expectErrno(EACCES, "owner without write permission") { _ = try m.setattr(alice, ro, trunc) }
        expectErrno(EACCES, "other without write permission") { _ = try m.setattr(bob, ro, trunc) }
        #expect(try m.getattr(ro).size == 0)
        var viaFd = trunc
        viaFd.viaHandle = true
        #expect(try m.setattr(alice, ro, viaFd).size == 10, "ftruncate: permission was checked at open")
        trunc.size = 20
        #expect(try m.setattr(root, ro, trunc).size == 20)

        let (file, _) = try m.mknod(alice, dir, n("f"), .regular, 0o666, rdev: 0, target: nil)
        let before = try m.getattr(file)
        var chown = SetAttrRequest(mask: .uid)
        chown.uid = alice.uid
        expectErrno(EPERM, "chown by a non-owner to the owner it has") { _ = try m.setattr(bob, file, chown) }
        var chgrp = SetAttrRequest(mask: .gid)
        chgrp.gid = bob.gid
        expectErrno(EPERM, "chgrp by a non-owner to a group of his") { _ = try m.setattr(bob, file, chgrp) }
        chgrp.gid = before.gid
        expectErrno(EPERM, "chgrp by a non-owner to the group it has") { _ = try m.setattr(bob, file, chgrp) }
        expectErrno(EPERM, "chgrp by a group member who is not the owner") { _ = try m.setattr(carol, file, chgrp) }
        var both = SetAttrRequest(mask: [.uid, .gid])
        both.uid = bob.uid
        both.gid = bob.gid
        expectErrno(EPERM, "chown and chgrp by the owner to another user") { _ = try m.setattr(alice, file, both) }
        var mixed = SetAttrRequest(mask: [.atime, .mtime, .atimeNow])
        mixed.mtime = Timespec(sec: 1000, nsec: 0)
        expectErrno(EPERM, "an explicit mtime beside atime now, by a writer who is not the owner") { _ = try m.setattr(bob, file, mixed) }
        var onlyM = SetAttrRequest(mask: .mtime)
        onlyM.mtime = Timespec(sec: 1000, nsec: 0)
        expectErrno(EPERM, "an explicit mtime alone") { _ = try m.setattr(bob, file, onlyM) }
        var chmod = SetAttrRequest(mask: .mode)
        chmod.mode = 0o666
        expectErrno(EPERM, "chmod by a non-owner, even to the mode it has") { _ = try m.setattr(bob, file, chmod) }
        let after = try m.getattr(file)
        #expect(after.uid == before.uid && after.gid == before.gid && after.mode == before.mode)
        #expect(after.mtime == before.mtime && after.atime == before.atime && after.ctime == before.ctime)
        // What the owner and root may: chown to himself, "now" without write permission,
        // explicit times on anyone's file.
        #expect(try m.setattr(alice, file, chown).uid == alice.uid)
        let touch = SetAttrRequest(mask: [.atime, .mtime, .atimeNow, .mtimeNow])
        _ = try m.setattr(alice, ro, touch)
        #expect(try m.setattr(root, file, mixed).mtime == Timespec(sec: 1000, nsec: 0))
        #expect(try m.setattr(root, file, both).uid == bob.uid)
    }

    /// security.capability: only root sets it; the owner or a writer of the file may remove it
    /// (the kernel does, with the writer's credentials, when a file with a capability is
    /// written; a removexattr call without CAP_SETFCAP never gets past the kernel); a user who
    /// may not write it may not.
    @Test(arguments: EngineKind.allCases)
    func aWriterMayDropACapability(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let dir = try playground(m)
        let cap: [UInt8] = [1, 0, 0, 2, 0, 0x20, 0, 0] + Array(repeating: 0, count: 12)
        let (owned, _) = try m.mknod(alice, dir, n("owned"), .regular, 0o444, rdev: 0, target: nil)
        let (shared, _) = try m.mknod(bob, dir, n("shared"), .regular, 0o666, rdev: 0, target: nil)
        let (closed, _) = try m.mknod(bob, dir, n("closed"), .regular, 0o644, rdev: 0, target: nil)
        for ino in [owned, shared, closed] {
            expectErrno(EPERM) { try m.setxattr(alice, ino, n("security.capability"), cap, .any) }
            try m.setxattr(root, ino, n("security.capability"), cap, .any)
        }
        expectErrno(EPERM) { try m.removexattr(alice, closed, n("security.capability")) }
        #expect(try m.getxattr(root, closed, n("security.capability")) == cap)
        expectErrno(EPERM) { try m.removexattr(alice, shared, n("security.other")) }
        try m.removexattr(alice, owned, n("security.capability"))
        try m.removexattr(alice, shared, n("security.capability"))
        for ino in [owned, shared] { expectErrno(ENODATA) { _ = try m.getxattr(root, ino, n("security.capability")) } }
    }

    /// Extended attributes: the name's length (ERANGE, first), the value's size (E2BIG), the
    /// user namespace only on regular files and directories (ENODATA to read, EPERM to change,
    /// even for root), trusted for root only (ENODATA/EPERM), read/write permission for user
    /// names (EACCES), a sticky directory's user names changed by its owner only (EPERM).
    @Test(arguments: EngineKind.allCases)
    func extendedAttributeRefusals(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let dir = try playground(m)
        let (file, _) = try m.mknod(alice, dir, n("f"), .regular, 0o644, rdev: 0, target: nil)
        let (fifo, _) = try m.mknod(alice, dir, n("fifo"), .fifo, 0o666, rdev: 0, target: nil)
        let (sl, _) = try m.mknod(alice, dir, n("sl"), .symlink, 0o777, rdev: 0, target: n("f"))
        let long = n("user.") + [UInt8](repeating: 120, count: 251)
        let longest = n("user.") + [UInt8](repeating: 121, count: 250)
        for who in [alice, root] {
            expectErrno(ERANGE, "set, 256-byte name") { try m.setxattr(who, file, long, [1], .any) }
            expectErrno(ERANGE, "get, 256-byte name") { _ = try m.getxattr(who, file, long) }
            expectErrno(ERANGE, "remove, 256-byte name") { try m.removexattr(who, file, long) }
            expectErrno(ERANGE, "set, empty name") { try m.setxattr(who, file, [], [1], .any) }
            expectErrno(ERANGE, "get, empty name") { _ = try m.getxattr(who, file, []) }
            expectErrno(ERANGE, "remove, empty name") { try m.removexattr(who, file, []) }
        }
        try m.setxattr(alice, file, longest, [1], .create)
        #expect(try m.getxattr(alice, file, longest) == [1])
        expectErrno(E2BIG, "a value over 64 KiB") { try m.setxattr(alice, file, n("user.big"), [UInt8](repeating: 0, count: 65537), .any) }
        expectErrno(E2BIG, "replacing with one") { try m.setxattr(alice, file, longest, [UInt8](repeating: 0, count: 65537), .any) }
        expectErrno(ENODATA) { _ = try m.getxattr(alice, file, n("user.big")) }
        #expect(try m.getxattr(alice, file, longest) == [1])

        // user.* only on regular files and directories, whoever asks; other namespaces anywhere.
        for (what, ino) in [("fifo", fifo), ("symlink", sl)] {
            for who in [alice, root] {
                expectErrno(EPERM, "set user.* on a \(what)") { try m.setxattr(who, ino, n("user.a"), [1], .any) }
                expectErrno(ENODATA, "get user.* on a \(what)") { _ = try m.getxattr(who, ino, n("user.a")) }
                expectErrno(EPERM, "remove user.* on a \(what)") { try m.removexattr(who, ino, n("user.a")) }
                expectErrno(EPERM, "set user. on a \(what): the type before the empty name") { try m.setxattr(who, ino, n("user."), [1], .any) }
            }
            try m.setxattr(root, ino, n("trusted.t"), [2], .any)
            try m.setxattr(root, ino, n("security.s"), [3], .any)
            #expect(try m.listxattr(root, ino) == [n("security.s"), n("trusted.t")])
            #expect(try m.listxattr(alice, ino) == [n("security.s")])
        }

        // trusted.* is root's: others read ENODATA (it exists) and change EPERM.
        try m.setxattr(root, file, n("trusted.t"), [7], .any)
        for who in [alice, bob] {
            expectErrno(ENODATA, "get trusted.*") { _ = try m.getxattr(who, file, n("trusted.t")) }
            expectErrno(EPERM, "replace trusted.*") { try m.setxattr(who, file, n("trusted.t"), [8], .replace) }
            expectErrno(EPERM, "remove trusted.*") { try m.removexattr(who, file, n("trusted.t")) }
        }
        #expect(try m.getxattr(root, file, n("trusted.t")) == [7])
        try m.removexattr(root, file, n("trusted.t"))
        expectErrno(ENODATA) { _ = try m.getxattr(root, file, n("trusted.t")) }
        expectErrno(ENODATA, "remove a missing one") { try m.removexattr(root, file, n("trusted.t")) }

        // user.* needs read permission to read and write permission to change.
        let (priv, _) = try m.mknod(alice, dir, n("priv"), .regular, 0o600, rdev: 0, target: nil)
        try m.setxattr(alice, priv, n("user.a"), [1], .any)
        expectErrno(EACCES, "get without read permission") { _ = try m.getxattr(bob, priv, n("user.a")) }
        expectErrno(EACCES, "remove without write permission") { try m.removexattr(bob, priv, n("user.a")) }
        expectErrno(EACCES, "XATTR_CREATE without write permission") { try m.setxattr(bob, file, n("user.b"), [1], .create) }
        #expect(try m.getxattr(root, priv, n("user.a")) == [1])
        #expect(try m.listxattr(bob, priv) == [n("user.a")], "listing asks no permission")

        // A sticky directory's user.* names: its owner's and root's to change, even where
        // others may write.
        let (sd, _) = try m.mknod(alice, dir, n("sd"), .directory, 0o1777, rdev: 0, target: nil)
        expectErrno(EPERM, "set on a sticky directory not his") { try m.setxattr(bob, sd, n("user.s"), [1], .any) }
        try m.setxattr(alice, sd, n("user.s"), [1], .any)
        try m.setxattr(root, sd, n("user.r"), [2], .any)
        expectErrno(EPERM, "remove on a sticky directory not his") { try m.removexattr(bob, sd, n("user.s")) }
        #expect(try m.getxattr(bob, sd, n("user.s")) == [1], "reading needs only read permission")
        let (od, _) = try m.mknod(alice, dir, n("od"), .directory, 0o777, rdev: 0, target: nil)
        try m.setxattr(bob, od, n("user.s"), [1], .any)
        #expect(try m.listxattr(alice, sd) == [n("user.r"), n("user.s")])
    }

    /// open and access: O_TRUNC asks for write permission even read-only (EACCES); a directory
    /// opened for writing is EISDIR, for root too and before any permission; the owner's bits
    /// apply to the owner and the group's to a member even when "other" would allow more; root
    /// executes only what some x bit marks executable.
    @Test(arguments: EngineKind.allCases)
    func openAndAccessRefusals(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let dir = try playground(m)
        let sid = try session(m)
        let (ro, _) = try m.mknod(alice, dir, n("ro"), .regular, 0o444, rdev: 0, target: nil)
        expectErrno(EACCES, "O_RDONLY|O_TRUNC on a read-only file") { _ = try m.open(alice, ro, flags: O_RDONLY | O_TRUNC, sid: sid) }
        expectErrno(EACCES, "O_WRONLY") { _ = try m.open(bob, ro, flags: O_WRONLY, sid: sid) }
        expectErrno(EACCES, "O_RDWR") { _ = try m.open(bob, ro, flags: O_RDWR, sid: sid) }
        _ = try m.open(bob, ro, flags: O_RDONLY, sid: sid)
        try m.close(ro, sid: sid)
        _ = try m.open(root, ro, flags: O_RDWR | O_TRUNC, sid: sid)
        try m.close(ro, sid: sid)
        // A directory for writing: EISDIR before permission (may_open), whoever asks.
        let (adir, _) = try m.mknod(alice, dir, n("adir"), .directory, 0o755, rdev: 0, target: nil)
        for who in [alice, bob, root] {
            expectErrno(EISDIR, "a directory for writing") { _ = try m.open(who, adir, flags: O_WRONLY, sid: sid) }
            expectErrno(EISDIR, "a directory for reading and writing") { _ = try m.open(who, adir, flags: O_RDWR, sid: sid) }
        }

        // Permission classes: the owner gets the owner's bits, a group member the group's.
        let (odd, _) = try m.mknod(alice, dir, n("odd"), .regular, 0o077, rdev: 0, target: nil)
        expectErrno(EACCES, "owner, owner bits ---") { try m.access(alice, odd, .read) }
        expectErrno(EACCES, "owner opens") { _ = try m.open(alice, odd, flags: O_RDONLY, sid: sid) }
        try m.access(carol, odd, [.read, .write, .execute])
        try m.access(bob, odd, [.read, .write, .execute])
        let (grp, _) = try m.mknod(alice, dir, n("grp"), .regular, 0o607, rdev: 0, target: nil)
        expectErrno(EACCES, "group member, group bits ---") { try m.access(carol, grp, .read) }
        try m.access(bob, grp, .read)
        // Root: read and write anything, execute only with some x bit (any directory).
        let (plain, _) = try m.mknod(alice, dir, n("plain"), .regular, 0o000, rdev: 0, target: nil)
        let (script, _) = try m.mknod(alice, dir, n("script"), .regular, 0o001, rdev: 0, target: nil)
        let (closed, _) = try m.mknod(alice, dir, n("closed"), .directory, 0o000, rdev: 0, target: nil)
        try m.access(root, plain, [.read, .write])
        expectErrno(EACCES, "root executes a file without x") { try m.access(root, plain, .execute) }
        try m.access(root, script, [.read, .write, .execute])
        try m.access(root, closed, [.read, .write, .execute])
        expectErrno(EACCES) { try m.access(alice, closed, .execute) }
        expectErrno(EACCES, "alice searches her closed directory") { _ = try m.lookup(alice, closed, n("x")) }
        expectErrno(ENOENT, "root searches it") { _ = try m.lookup(root, closed, n("x")) }
    }
}

/// The trash (`format --trash-days N`): what POSIX sees does not change; deleted regular files
/// wait in `/.trash/<hour>/<uid>/` with link count 0 until restored or purged.
@Suite("Trash")
struct TrashTests {
    private func usage(_ m: any MetadataEngine) throws -> (Int64, Int64) { try (m as! any TrashAdmin).trashUsage() }

    /// The files in the trash: (inode, owner, entry name, where it came from).
    private func listed(_ m: any MetadataEngine) throws -> [TrashEntry] {
        let t = m as! any TrashAdmin
        var out: [TrashEntry] = []
        for (hour, _) in try t.trashHours(limit: 100) {
            for (dir, _) in try t.trashOwnerDirs(hour, limit: 100) { out += try t.trashEntries(in: dir, after: 0, limit: 1000).entries }
        }
        return out
    }

    @Test(arguments: EngineKind.allCases)
    func deletedFilesWaitInTheTrashWithTheirLinkCountsAsWithout(kind: EngineKind) throws {
        let f = try EngineFixture(kind, trash: 1)
        let m = f.engine
        let dir = try playground(m)
        let sid = try m.newSession(SessionInfo(hostname: "h", pid: 1, mountPoint: "/mnt", version: "t"))
        let inodesBefore = try m.statfs().usedInodes
        // The last link of a regular file: into the trash, link count 0, not freed.
        let (a, _) = try m.mknod(alice, dir, n("a"), .regular, 0o644, rdev: 0, target: nil)
        _ = try m.writeSlice(a, 0, Slice(pos: 0, id: 11, size: 5000, off: 0, len: 5000), minSize: 5000, mtime: .now(), sid: 0)
        let r = try m.unlink(alice, dir, n("a"))
        #expect(!r.freed && r.attr.nlink == 0)
        #expect(try m.getattr(a).nlink == 0)
        #expect(try m.pendingDeletes(limit: 10).isEmpty)
        expectErrno(ENOENT) { _ = try m.lookup(alice, dir, n("a")) }
        let trash = try m.lookup(.root, rootIno, n(".trash"))
        #expect(trash.0 == Trash.root && trash.1.mode & 0o777 == 0o555)
        var l = try listed(m)
        #expect(l.map(\.ino) == [a] && l[0].entryName == n("\(a)-a") && l[0].origin?.parent == dir && l[0].origin?.name == n("a"))
        #expect(try usage(m) == (1, 8192))
        #expect(try m.statfs().usedInodes == inodesBefore + 4, "the file and the trash's three directories stay counted")
        // One of two links: no trash, the other link stays with link count 1; the last one: trash.
        let (b, _) = try m.mknod(alice, dir, n("b"), .regular, 0o644, rdev: 0, target: nil)
        _ = try m.link(alice, b, dir, n("b2"))
        #expect(try m.unlink(alice, dir, n("b")).attr.nlink == 1)
        #expect(try m.getattr(b).nlink == 1)
        #expect(try listed(m).count == 1)
        _ = try m.unlink(alice, dir, n("b2"))
        #expect(try listed(m).map(\.ino).sorted() == [a, b].sorted())
        // A rename over one of two links drops that link only; over the last, the file goes to the trash.
        let (c, _) = try m.mknod(alice, dir, n("c"), .regular, 0o644, rdev: 0, target: nil)
        _ = try m.link(alice, c, dir, n("c2"))
        _ = try m.mknod(alice, dir, n("x"), .regular, 0o644, rdev: 0, target: nil)
        let over = try m.rename(alice, dir, n("x"), dir, n("c"), [])
        #expect(over.removed?.attr.nlink == 1 && !(over.removed!.freed))
        #expect(try m.getattr(c).nlink == 1)
        #expect(try listed(m).count == 2)
        _ = try m.mknod(alice, dir, n("y"), .regular, 0o644, rdev: 0, target: nil)
        _ = try m.rename(alice, dir, n("y"), dir, n("c2"), [])
        #expect(try listed(m).contains { $0.ino == c })
        #expect(try m.getattr(c).nlink == 0)
        // Open when deleted: in the trash, and its last close frees nothing.
        let (d, _) = try m.create(alice, dir, n("d"), 0o644, sid: sid)
        _ = try m.unlink(alice, dir, n("d"))
        #expect(!(try m.close(d, sid: sid)))
        #expect(try m.getattr(d).nlink == 0)
        #expect(try listed(m).contains { $0.ino == d })
        // Not regular files: freed as without a trash.
        _ = try m.mknod(alice, dir, n("s"), .symlink, 0o777, rdev: 0, target: n("t"))
        #expect(try m.unlink(alice, dir, n("s")).freed)
        #expect(try listed(m).count == 4)
        // Filed under who deleted it: bob's deletion of alice's file is in bob's directory,
        // which is bob's (0500); alice's own directory does not show it.
        let (e, _) = try m.mknod(alice, dir, n("e"), .regular, 0o644, rdev: 0, target: nil)
        _ = try m.unlink(bob, dir, n("e"))
        let byBob = try listed(m).first { $0.ino == e }!
        let bobDir = try m.getattr(byBob.dir)
        #expect(bobDir.uid == bob.uid && bobDir.mode & 0o777 == 0o500)
        // Only root changes the trash: not its owner through a chmod of its directory, nor an rm there.
        var chmod = SetAttrRequest(mask: .mode)
        chmod.mode = 0o700
        expectErrno(EPERM) { _ = try m.setattr(bob, byBob.dir, chmod) }
        // (The directory's mode refuses first: no one but root may write in it.)
        expectErrno(EACCES) { _ = try m.unlink(bob, byBob.dir, byBob.entryName) }
        expectErrno(EPERM) { _ = try m.rename(bob, byBob.dir, byBob.entryName, dir, n("back"), []) }
        // What the trash counts stays right when a file grows there (an open descriptor writes on).
        let (g, _) = try m.create(alice, dir, n("g"), 0o644, sid: sid)
        _ = try m.unlink(alice, dir, n("g"))
        let before = try usage(m)
        _ = try m.writeSlice(g, 0, Slice(pos: 0, id: 77, size: 50_000, off: 0, len: 50_000), minSize: 50_000, mtime: .now(), sid: 0)
        #expect(try (m as! any TrashAdmin).purgeTrashed(.root, g, ownerMayPurge: false) == false, "still open")
        #expect(try usage(m) == (before.0 - 1, before.1))
    }

    @Test(arguments: EngineKind.allCases)
    func restoreAndPurge(kind: EngineKind) throws {
        let f = try EngineFixture(kind, trash: 1)
        let m = f.engine
        let t = m as! any TrashAdmin
        let dir = try playground(m)
        let (a, _) = try m.mknod(alice, dir, n("a"), .regular, 0o644, rdev: 0, target: nil)
        _ = try m.writeSlice(a, 0, Slice(pos: 0, id: 12, size: 100, off: 0, len: 100), minSize: 100, mtime: .now(), sid: 0)
        _ = try m.unlink(alice, dir, n("a"))
        // Only root, or the owner when allowed (a gateway's caller); never over an existing name.
        expectErrno(EPERM) { _ = try t.restoreTrashed(bob, a, to: nil, ownerMayRestore: true) }
        expectErrno(EPERM) { _ = try t.restoreTrashed(alice, a, to: nil, ownerMayRestore: false) }
        _ = try m.mknod(alice, dir, n("a"), .regular, 0o644, rdev: 0, target: nil)
        expectErrno(EEXIST) { _ = try t.restoreTrashed(alice, a, to: nil, ownerMayRestore: true) }
        _ = try m.unlink(alice, dir, n("a"))
        #expect(try listed(m).count == 2)
        #expect(try t.restoreTrashed(alice, a, to: nil, ownerMayRestore: true) == (dir, n("a")))
        let back = try m.lookup(alice, dir, n("a"))
        #expect(back.0 == a && back.1.nlink == 1 && back.1.size == 100)
        #expect(try m.readChunk(a, 0) == [Slice(pos: 0, id: 12, size: 100, off: 0, len: 100)])
        #expect(try listed(m).count == 1)
        #expect(try usage(m) == (1, 0))
        // Purged: freed, its data queued for deletion (the empty one has none).
        let left = try listed(m)[0]
        expectErrno(EPERM) { _ = try t.purgeTrashed(alice, left.ino, ownerMayPurge: false) }
        #expect(try t.purgeTrashed(.root, left.ino, ownerMayPurge: false))
        expectErrno(ENOENT) { _ = try m.getattr(left.ino) }
        #expect(try listed(m).isEmpty)
        #expect(try usage(m) == (0, 0))
        // Deleted again and purged: its data is queued.
        _ = try m.unlink(alice, dir, n("a"))
        #expect(try t.purgeTrashed(.root, a, ownerMayPurge: false))
        #expect(try m.pendingDeletes(limit: 10).map(\.ino) == [a])
        // Empty directories of the trash go.
        let hours = try t.trashHours(limit: 10)
        for (h, _) in hours {
            for (o, _) in try t.trashOwnerDirs(h, limit: 10) { try t.removeEmptyTrashDir(o) }
            try t.removeEmptyTrashDir(h)
        }
        #expect(try t.trashHours(limit: 10).isEmpty)
    }

    @Test(arguments: EngineKind.allCases)
    func nothingIsMadeInTheTrashAndItsNameIsReserved(kind: EngineKind) throws {
        let f = try EngineFixture(kind, trash: 1)
        let m = f.engine
        let dir = try playground(m)
        expectErrno(EPERM) { _ = try m.mknod(alice, rootIno, n(".trash"), .directory, 0o777, rdev: 0, target: nil) }
        _ = try m.mknod(alice, dir, n("a"), .regular, 0o644, rdev: 0, target: nil)
        _ = try m.mknod(alice, dir, n("k"), .regular, 0o644, rdev: 0, target: nil)
        expectErrno(EPERM) { _ = try m.rename(alice, dir, n("k"), rootIno, n(".trash"), []) }
        _ = try m.unlink(alice, dir, n("a"))
        let l = try listed(m)
        let owner = l[0].dir
        expectErrno(EPERM) { _ = try m.mknod(.root, owner, n("new"), .regular, 0o644, rdev: 0, target: nil) }
        expectErrno(EPERM) { _ = try m.mknod(.root, Trash.root, n("new"), .directory, 0o755, rdev: 0, target: nil) }
        expectErrno(EPERM) { _ = try m.rename(.root, dir, n("k"), owner, n("k"), []) }
        let k = try m.lookup(alice, dir, n("k")).0
        expectErrno(EPERM) { _ = try m.link(.root, k, owner, n("k")) }
        expectErrno(EPERM) { _ = try m.rename(.root, rootIno, n(".trash"), dir, n("t"), []) }
        // Root deleting in the trash deletes for good; root moving a file out restores it.
        _ = try m.unlink(alice, dir, n("k"))
        let kEntry = try listed(m).first { $0.ino == k }!
        _ = try m.rename(.root, owner, kEntry.entryName, dir, n("k-back"), [])
        #expect(try m.lookup(alice, dir, n("k-back")).1.nlink == 1)
        #expect(try m.unlink(.root, owner, l[0].entryName).freed)
        #expect(try listed(m).isEmpty)
        #expect(try usage(m) == (0, 0))
    }

    @Test(arguments: EngineKind.allCases)
    func expiredTrashIsPurgedByOneLeaseHolder(kind: EngineKind) throws {
        let f = try EngineFixture(kind, trash: 1)
        let m = f.engine
        let dir = try playground(m)
        for i in 0..<5 {
            _ = try m.mknod(alice, dir, n("f\(i)"), .regular, 0o644, rdev: 0, target: nil)
            _ = try m.unlink(alice, dir, n("f\(i)"))
        }
        // Nothing has expired yet.
        #expect(try m.purgeExpiredTrash(holder: 1, limit: 100) == 0)
        #expect(try listed(m).count == 5)
        // With the trash turned off, everything in it expires; holder 1 holds the lease.
        let fmt = try #require(try m.loadFormat())
        var off = fmt
        off.trashDays = 0
        try m.initialize(off, force: true, rootMode: 0o777)
        let other = try f.reopen()
        _ = try other.loadFormat()
        #expect(try other.purgeExpiredTrash(holder: 2, limit: 100) == 0, "another client holds the lease")
        #expect(try m.purgeExpiredTrash(holder: 1, limit: 2) == 2, "bounded steps")
        #expect(try m.purgeExpiredTrash(holder: 1, limit: 100) == 3)
        #expect(try listed(m).isEmpty)
        #expect(try (m as! any TrashAdmin).trashHours(limit: 10).isEmpty)
        #expect(try other.purgeExpiredTrash(holder: 2, limit: 100) == 0)
    }
}

extension TrashTests {
    /// A file cut to zero (truncate, O_TRUNC) while the volume keeps a trash: its old content
    /// moves to a copy in the trash, in bounded steps for a file of many chunks; the file is
    /// empty, and nothing is queued for deletion.
    @Test(arguments: EngineKind.allCases)
    func aFileCutToZeroLeavesItsContentInTheTrash(kind: EngineKind) throws {
        let f = try EngineFixture(kind, trash: 1)
        let m = f.engine
        let t = m as! any TrashAdmin
        let dir = try playground(m)
        let (ino, _) = try m.mknod(alice, dir, n("big"), .regular, 0o644, rdev: 0, target: nil)
        let chunks = UInt32(chunkBatch + 5)
        for i in 0..<chunks {
            _ = try m.writeSlice(
                ino, i, Slice(pos: 0, id: 100 + UInt64(i), size: 10, off: 0, len: 10), minSize: UInt64(i) * chunkSize + 10, mtime: .now(), sid: 0)
        }
        let size = try m.getattr(ino).size
        let used = try m.statfs().usedSpace
        var req = SetAttrRequest(mask: .size)
        req.size = 0
        let a = try m.setattr(alice, ino, req)
        #expect(a.size == 0 && a.nlink == 1)
        #expect(try m.readChunk(ino, 0).isEmpty)
        #expect(try m.readChunk(ino, chunks - 1).isEmpty)
        #expect(try m.takeDroppedSlices(limit: 10).isEmpty)
        #expect(try m.pendingDeletes(limit: 10).isEmpty)
        let copies = try listed(m)
        #expect(copies.count == 1)
        let c = copies[0]
        #expect(c.attr.size == size && c.attr.nlink == 0 && c.origin?.name == n("\(ino).before-truncate") && c.origin?.parent == 0)
        // Where the file's names are is not known: restored only into a directory given.
        expectErrno(EINVAL) { _ = try t.restoreTrashed(.root, c.ino, to: nil, ownerMayRestore: false) }
        for i in [UInt32(0), chunks / 2, chunks - 1] {
            #expect(try m.readChunk(c.ino, i) == [Slice(pos: 0, id: 100 + UInt64(i), size: 10, off: 0, len: 10)])
        }
        #expect(try m.statfs().usedSpace == used + 4096 * 3, "the copy stays counted (and the trash's three directories)")
        // An empty file cut again: nothing to keep.
        _ = try m.setattr(alice, ino, req)
        #expect(try listed(m).count == 1)
        // Purged: the old content's slices are queued once.
        #expect(try t.purgeTrashed(.root, c.ino, ownerMayPurge: false))
        #expect(try m.pendingDeletes(limit: 10).map(\.ino) == [c.ino])
    }
}
