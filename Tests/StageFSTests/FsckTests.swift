import Metadata
import StageFSCore
import Testing

@testable import Metadata

#if canImport(Glibc)
    import Glibc
#endif

private let alice = Credential(uid: 1000, gid: 1000, groups: [1000])
private func n(_ s: String) -> [UInt8] { Array(s.utf8) }

/// Damage made directly in the store, as a bug or a crash of another version could leave it.
private func damage(_ m: any MetadataEngine, _ body: (any DamageStore) throws(FSError) -> Void) throws {
    if let t = m as? SQLiteMetadata { try body(Damager(t: t)) } else { try body(Damager(t: m as! RedisTxnMetadata)) }
}

private protocol DamageStore {
    func deleteAttr(_ ino: Ino) throws(FSError)
    func setAttr(_ ino: Ino, _ change: (inout Attr) -> Void) throws(FSError)
    func putAttr(_ ino: Ino, _ a: Attr) throws(FSError)
    func newInode() throws(FSError) -> Ino
}

private struct Damager<S: TxnStore>: DamageStore {
    let t: TxnMetadata<S>
    func deleteAttr(_ ino: Ino) throws(FSError) { try t.store.transaction(write: true) { (tx) throws(FSError) in try t.store.deleteInode(tx, ino) } }
    func setAttr(_ ino: Ino, _ change: (inout Attr) -> Void) throws(FSError) {
        try t.store.transaction(write: true) { (tx) throws(FSError) in
            var a = try t.store.attr(tx, ino)!
            change(&a)
            try t.store.putAttr(tx, ino, a)
        }
    }
    func putAttr(_ ino: Ino, _ a: Attr) throws(FSError) {
        try t.store.transaction(write: true) { (tx) throws(FSError) in try t.store.putAttr(tx, ino, a) }
    }
    func newInode() throws(FSError) -> Ino { try t.store.transaction(write: true) { (tx) throws(FSError) in try t.store.newInode(tx) } }
}

/// fsck (`Fsck.swift`) and gc's scan and guard (`GC.swift`) on every engine.
@Suite("fsck and gc", .timeLimit(.minutes(2)))
struct FsckTests {
    @Test(arguments: [EngineKind.sqlite, .redis])
    func fsckIsCleanOnAHealthyVolumeFindsDamageAndRepairsIt(kind: EngineKind) throws {
        let f = try EngineFixture(kind, trash: 1)
        let m = f.engine
        let d1 = try DumpTests.populate(m)
        let admin = m as! any FsckAdmin
        var o = FsckOptions()
        o.missingObjects = { _ in [] }
        o.sampleEvery = 1
        let clean = try admin.fsck(o)
        #expect(clean.count == 0, "\(clean.problems.joined(separator: " | "))")
        #expect(clean.slicesChecked == 7)
        // A name of a gone inode, a wrong link count, an inode no directory names, a file
        // with no link and no open outside the trash, a directory with a wrong parent.
        let (gone, _) = try m.mknod(alice, d1, n("gone-attr"), .regular, 0o644, rdev: 0, target: nil)
        let (wrong, _) = try m.mknod(alice, d1, n("wrong-links"), .regular, 0o644, rdev: 0, target: nil)
        let (sub, _) = try m.mknod(alice, d1, n("sub"), .directory, 0o755, rdev: 0, target: nil)
        let now = Timespec.now()
        var lostIno: Ino = 0
        var freeIno: Ino = 0
        try damage(m) { (d) throws(FSError) in
            try d.deleteAttr(gone)
            try d.setAttr(wrong) { $0.nlink = 3 }
            try d.setAttr(sub) { $0.parent = rootIno }
            lostIno = try d.newInode()
            try d.putAttr(
                lostIno, Attr(type: .regular, mode: 0o600, uid: 1000, gid: 1000, nlink: 1, size: 10, atime: now, mtime: now, ctime: now, parent: d1))
            freeIno = try d.newInode()
            try d.putAttr(
                freeIno, Attr(type: .regular, mode: 0o600, uid: 1000, gid: 1000, nlink: 0, size: 10, atime: now, mtime: now, ctime: now, parent: d1))
        }
        let found = try admin.fsck(o)
        let text = found.problems.joined(separator: "\n")
        #expect(text.contains("names inode \(gone), which does not exist"), "\(text)")
        #expect(text.contains("inode \(wrong) has link count 3, but 1 name(s)"), "\(text)")
        #expect(text.contains("inode \(lostIno) (a regular, 1 link(s)) is named by no directory"), "\(text)")
        #expect(text.contains("inode \(freeIno) has no link"), "\(text)")
        #expect(text.contains("records parent \(rootIno), but is in inode \(d1)"), "\(text)")
        o.repair = true
        let fixed = try admin.fsck(o)
        #expect(fixed.repaired >= 5 && fixed.repaired == fixed.count, "\(fixed.problems)")
        o.repair = false
        let after = try admin.fsck(o)
        #expect(after.count == 0, "\(after.problems)")
        let (lf, _) = try m.lookup(.root, rootIno, n("lost+found"))
        #expect(try m.lookup(.root, lf, n("#\(lostIno)")).0 == lostIno)
        #expect(try m.getattr(wrong).nlink == 1)
        expectErrno(ENOENT) { _ = try m.lookup(.root, d1, n("gone-attr")) }
    }

    @Test(arguments: [EngineKind.sqlite, .redis])
    func gcSeesEverySliceAndKeepsWhatIsSharedWhileItRuns(kind: EngineKind) throws {
        let f = try EngineFixture(kind, trash: 1)
        let m = f.engine
        _ = try DumpTests.populate(m)
        let gc = m as! any GCAdmin
        try gc.beginGC(holder: "test")
        let scan = try gc.scanSlices(renew: {}, progress: { _ in })
        // The tree's slices and the trashed file's.
        for id: UInt64 in [11, 12, 13, 14] { #expect(scan.referenced.contains(id)) }
        #expect(!scan.referenced.contains(15))
        // A copy made while gc runs: its slices are noted for it, not others.
        let (src, _) = try m.mknod(alice, rootIno, n("s"), .regular, 0o644, rdev: 0, target: nil)
        _ = try m.writeSlice(src, 0, Slice(pos: 0, id: 40, size: 100, off: 0, len: 100), minSize: 100, mtime: .now(), sid: 0)
        let (dst, _) = try m.mknod(alice, rootIno, n("d"), .regular, 0o644, rdev: 0, target: nil)
        _ = try m.copyRange(alice, src: src, srcOff: 0, dst: dst, dstOff: 0, length: 100)
        #expect(try gc.keptForGC(holder: "test", [40, 41, 11]) == [40])
        // Another gc that could not start leaves the running one's notes alone.
        expectErrno(EBUSY) { try gc.beginGC(holder: "other") }
        try gc.endGC(holder: "other")
        #expect(try gc.keptForGC(holder: "test", [40]) == [40])
        try gc.renewGC(holder: "test")
        try gc.endGC(holder: "test")
        #expect(try gc.keptForGC(holder: "test", [40]).isEmpty)
        // Without a gc, nothing is noted.
        _ = try m.copyRange(alice, src: src, srcOff: 0, dst: dst, dstOff: 0, length: 100)
        #expect(try gc.keptForGC(holder: "test", [40]).isEmpty)
        expectErrno(ETIMEDOUT) { try gc.renewGC(holder: "test") }
    }
}
