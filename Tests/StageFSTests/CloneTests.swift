import Metadata
import StageFSCore
import Testing

#if canImport(Glibc)
    import Glibc
#endif

@testable import Metadata

private let alice = Credential(uid: 1000, gid: 1000, groups: [1000])
private let bob = Credential(uid: 1001, gid: 1001, groups: [1001])
private func n(_ s: String) -> [UInt8] { Array(s.utf8) }

/// Clones and copied ranges share slices (`Clone.swift`) on every engine: what each file reads
/// is what was copied, byte for byte as a map of (slice, offset); writes to either never change
/// the other; deleting both releases each slice exactly once.
@Suite("Clones and copied ranges", .timeLimit(.minutes(2)))
struct CloneTests {
    /// What `ino` reads over `range`, byte by byte: (slice id, offset in the slice), (0, 0) for zeros.
    private func map(_ m: any MetadataEngine, _ ino: Ino, _ range: Range<UInt64>) throws -> [(UInt64, UInt32)] {
        var out: [(UInt64, UInt32)] = []
        var views: [UInt32: [Segment]] = [:]
        let size = try m.getattr(ino).size
        for off in range {
            if off >= size {
                out.append((0, 0))
                continue
            }
            let c = UInt32(off / chunkSize)
            if views[c] == nil { views[c] = buildView(try m.readChunk(ino, c)) }
            let pos = UInt32(off % chunkSize)
            if let g = views[c]!.first(where: { $0.pos <= pos && pos < $0.pos + $0.len }), g.id != 0 {
                out.append((g.id, g.off + (pos - g.pos)))
            } else {
                out.append((0, 0))
            }
        }
        return out
    }

    private func same(_ a: [(UInt64, UInt32)], _ b: [(UInt64, UInt32)]) -> Bool {
        a.count == b.count && zip(a, b).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
    }

    /// Slices freed when everything deleted is collected, with how many times each came.
    private func collected(_ m: any MetadataEngine) throws -> [UInt64: Int] {
        var out: [UInt64: Int] = [:]
        _ = try m.collectDeleted(.all, limit: 100_000, seconds: 30) { s in if s.id != 0 { out[s.id, default: 0] += 1 } }
        return out
    }

    @Test(arguments: EngineKind.allCases)
    func aCopiedRangeReadsWhatTheSourceReadsAndSlicesGoOnce(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let (src, _) = try m.mknod(alice, rootIno, n("src"), .regular, 0o644, rdev: 0, target: nil)
        let (dst, _) = try m.mknod(alice, rootIno, n("dst"), .regular, 0o644, rdev: 0, target: nil)
        // The source: a slice ending near its first chunk's end, one overwriting part of it,
        // a hole, and data in the second chunk.
        let end0 = UInt32(chunkSize)
        _ = try m.writeSlice(src, 0, Slice(pos: end0 - 5000, id: 11, size: 5000, off: 0, len: 5000), minSize: chunkSize, mtime: .now(), sid: 0)
        _ = try m.writeSlice(src, 0, Slice(pos: end0 - 3000, id: 12, size: 1000, off: 0, len: 1000), minSize: chunkSize, mtime: .now(), sid: 0)
        _ = try m.writeSlice(src, 1, Slice(pos: 100, id: 13, size: 400, off: 0, len: 400), minSize: chunkSize + 500, mtime: .now(), sid: 0)
        // The destination has data where the copy lands, which the copy replaces (holes too).
        _ = try m.writeSlice(dst, 0, Slice(pos: 0, id: 21, size: 9000, off: 0, len: 9000), minSize: 9000, mtime: .now(), sid: 0)
        let from = chunkSize - 6000
        let (copied, a) = try m.copyRange(alice, src: src, srcOff: from, dst: dst, dstOff: 1000, length: 7000)
        #expect(copied == 6500 && a.size == 9000)
        #expect(same(try map(m, dst, 1000..<7500), try map(m, src, from..<(from + 6500))))
        #expect(try map(m, dst, 0..<1)[0].0 == 21)
        // Past the source's end nothing is copied; overlapping ranges of one file are refused.
        #expect(try m.copyRange(alice, src: src, srcOff: chunkSize + 500, dst: dst, dstOff: 0, length: 10).0 == 0)
        expectErrno(EINVAL) { _ = try m.copyRange(alice, src: src, srcOff: 0, dst: src, dstOff: 10, length: 100) }
        // Across a chunk boundary of the destination, within one file.
        let (c2, _) = try m.copyRange(alice, src: src, srcOff: chunkSize + 100, dst: src, dstOff: 2 * chunkSize - 200, length: 400)
        #expect(c2 == 400)
        #expect(same(try map(m, src, (2 * chunkSize - 200)..<(2 * chunkSize + 200)), try map(m, src, (chunkSize + 100)..<(chunkSize + 500))))
        // An offset near 2^64 is EFBIG, never an overflow; a range of too many records is not
        // shared (EXDEV: the kernel copies its bytes), so copies never multiply records unbounded.
        expectErrno(EFBIG) { _ = try m.copyRange(alice, src: src, srcOff: 0, dst: dst, dstOff: UInt64.max - 1, length: 10) }
        let (frag, _) = try m.mknod(alice, rootIno, n("frag"), .regular, 0o644, rdev: 0, target: nil)
        for i in 0..<UInt32(maxSharedRecords + 1) {
            _ = try m.writeSlice(frag, 0, Slice(pos: i * 2, id: 500 + UInt64(i), size: 1, off: 0, len: 1), minSize: UInt64(i) * 2 + 1, mtime: .now(), sid: 0)
        }
        expectErrno(EXDEV) { _ = try m.copyRange(alice, src: frag, srcOff: 0, dst: dst, dstOff: 0, length: 100) }
        _ = try m.unlink(alice, rootIno, n("frag"))
        _ = try collected(m)
        // Deleting the source frees nothing the destination reads; deleting both frees each once.
        _ = try m.unlink(alice, rootIno, n("src"))
        let first = try collected(m)
        #expect(first.isEmpty, "\(first)")
        #expect(try map(m, dst, 2000..<2001)[0].0 == 11)
        _ = try m.unlink(alice, rootIno, n("dst"))
        let second = try collected(m)
        #expect(second == [11: 1, 12: 1, 13: 1, 21: 1], "\(second)")
    }

    @Test(arguments: EngineKind.allCases)
    func aCloneDivergesFromItsSourceAndEachSliceGoesOnce(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let t = m as! any CloneAdmin
        let (src, _) = try m.mknod(alice, rootIno, n("big"), .regular, 0o640, rdev: 0, target: nil)
        let chunks = UInt32(cloneStepChunks + 5)
        for i in 0..<chunks {
            _ = try m.writeSlice(src, i, Slice(pos: 0, id: 100 + UInt64(i), size: 10, off: 0, len: 10), minSize: UInt64(i) * chunkSize + 10, mtime: .now(), sid: 0)
        }
        let (dir, _) = try m.mknod(alice, rootIno, n("d"), .directory, 0o755, rdev: 0, target: nil)
        // Another user may not clone what they cannot read, nor into a directory they cannot write.
        expectErrno(EACCES) { _ = try t.cloneFile(bob, src: src, parent: rootIno, name: n("stolen"), preserve: false, umask: 0o022) }
        var (c, a, next) = try t.cloneFile(alice, src: src, parent: dir, name: n("copy"), preserve: false, umask: 0o027)
        #expect(next == UInt32(cloneStepChunks) && a.mode & 0o777 == 0)
        while let from = next { next = try t.cloneChunks(alice, src: src, dst: c, from: from) }
        a = try t.cloneFinish(alice, src: src, dst: c, preserve: false, umask: 0o027)
        let srcSize = try m.getattr(src).size
        #expect(a.mode & 0o777 == 0o640 && a.size == srcSize && a.uid == alice.uid)
        let whole = UInt64(chunks - 1) * chunkSize + 10
        #expect(same(try map(m, c, (whole - 20)..<whole), try map(m, src, (whole - 20)..<whole)))
        // Writes to either side change only that side.
        _ = try m.writeSlice(c, 0, Slice(pos: 0, id: 900, size: 5, off: 0, len: 5), minSize: 5, mtime: .now(), sid: 0)
        _ = try m.writeSlice(src, 1, Slice(pos: 0, id: 901, size: 5, off: 0, len: 5), minSize: 5, mtime: .now(), sid: 0)
        #expect(try map(m, src, 0..<1)[0].0 == 100 && (try map(m, c, 0..<1)[0].0) == 900)
        #expect(try map(m, c, chunkSize..<(chunkSize + 1))[0].0 == 101 && (try map(m, src, chunkSize..<(chunkSize + 1))[0].0) == 901)
        // A small file clones in one step; a symlink clones its target.
        let (small, _) = try m.mknod(alice, rootIno, n("small"), .regular, 0o600, rdev: 0, target: nil)
        _ = try m.writeSlice(small, 0, Slice(pos: 0, id: 50, size: 3, off: 0, len: 3), minSize: 3, mtime: .now(), sid: 0)
        #expect(try t.cloneFile(alice, src: small, parent: dir, name: n("small"), preserve: true, umask: 0).next == nil)
        let (l, _) = try m.mknod(alice, rootIno, n("link"), .symlink, 0o777, rdev: 0, target: n("big"))
        let lc = try t.cloneFile(alice, src: l, parent: dir, name: n("link"), preserve: false, umask: 0o022)
        #expect(try m.readlink(lc.ino) == n("big"))
        expectErrno(EEXIST) { _ = try t.cloneFile(alice, src: small, parent: dir, name: n("small"), preserve: false, umask: 0) }
        // A device node is made anew only by root (CAP_MKNOD), clone or not.
        let (dev, _) = try m.mknod(Credential.root, rootIno, n("null"), .charDevice, 0o666, rdev: 0x103, target: nil)
        expectErrno(EPERM) { _ = try t.cloneFile(alice, src: dev, parent: dir, name: n("null"), preserve: false, umask: 0) }
        // Deleting both frees each slice once.
        for name in ["big", "small"] { _ = try m.unlink(alice, rootIno, n(name)) }
        let first = try collected(m)
        #expect(first == [901: 1], "\(first)")
        for name in ["copy", "small"] { _ = try m.unlink(alice, dir, n(name)) }
        var want: [UInt64: Int] = [900: 1, 50: 1]
        for i in 0..<chunks { want[100 + UInt64(i)] = 1 }
        #expect(try collected(m) == want)
    }
}
