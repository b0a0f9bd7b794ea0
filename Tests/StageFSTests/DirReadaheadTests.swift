import StageFSCore
import Synchronization
import Testing

@testable import VFS

/// The read-ahead of directory listings (`DirReadahead`), against a model directory: a listing
/// served from it in the kernel's steps gives each entry once, in order, to the end; a page
/// that lost entries does not end the listing; a stale page is not served.
@Suite("Directory read-ahead", .timeLimit(.minutes(2)))
struct DirReadaheadTests {
    /// A directory of `n` entries at positions 1...n, less `gone` (inodes gone: a page read
    /// skips them, as the engine does).
    final class Model: Sendable {
        let n: UInt64
        let gone: Set<UInt64>
        let reads = Atomic<Int>(0)
        init(n: UInt64, gone: Set<UInt64> = []) {
            self.n = n
            self.gone = gone
        }

        func page(after: UInt64, limit: Int, changes: UInt64 = 0) -> DirReadahead.Page {
            reads.add(1, ordering: .relaxed)
            var e: [DirEntry] = []
            var pos = after + 1
            while pos <= n && e.count + (gone.filter { $0 > after && $0 < pos }.count) < limit {
                if !gone.contains(pos) { e.append(DirEntry(name: Array("f\(pos)".utf8), ino: 100 + pos, type: .regular, cookie: pos)) }
                pos += 1
            }
            let p = DirReadahead.Page(after: after, limit: limit)
            p.fill(e, stamp: 1, epoch: 1, changes: changes)
            return p
        }
    }

    /// Lists `dir` as the kernel does, taking `fits` of each page served (a buffer that holds
    /// fewer than the page) and going on after the last one taken.
    func list(_ ra: DirReadahead, _ m: Model, limit: Int, fits: Int, changes: @escaping @Sendable () -> UInt64 = { 0 }) -> [UInt64] {
        var out: [UInt64] = []
        var after: UInt64 = 0
        while true {
            var served = ra.take(7, after: after, limit: limit) { $0.changes == changes() }?.entries
            if served == nil {
                let p = m.page(after: after, limit: limit, changes: changes())
                served = p.entries
                ra.keep(7, p)
            }
            ra.readAhead(7, changes: changes()) { a, l in m.page(after: a, limit: l, changes: changes()) }
            let taken = served!.prefix(fits)
            if taken.isEmpty { return out }
            out += taken.map(\.cookie)
            after = taken.last!.cookie
        }
    }

    @Test func aListingGivesEachEntryOnceInOrderToTheEnd() {
        let m = Model(n: 1000)
        let ra = DirReadahead(ttl: 60_000_000_000)
        defer { ra.shutdown() }
        let got = list(ra, m, limit: 40, fits: 37)
        #expect(got == Array(1...1000), "every entry once, in order")
        #expect(m.reads.load(ordering: .relaxed) <= 1000 / 37 + 3, "pages read ahead were used (\(m.reads.load(ordering: .relaxed)) reads)")
    }

    @Test func aPageThatLostEntriesDoesNotEndTheListing() {
        // (Positions 38...45 name inodes that are gone: the page read from 37 comes back short.)
        let m = Model(n: 300, gone: Set(38...45))
        let ra = DirReadahead(ttl: 60_000_000_000)
        defer { ra.shutdown() }
        let got = list(ra, m, limit: 40, fits: 40)
        #expect(got == Array(1...300).filter { !(38...45).contains($0) })
    }

    @Test func aPageReadBeforeAChangeIsNotServed() {
        let m = Model(n: 200)
        let ra = DirReadahead(ttl: 60_000_000_000)
        defer { ra.shutdown() }
        let p = m.page(after: 0, limit: 50, changes: 0)
        ra.keep(7, p)
        ra.readAhead(7, changes: 0) { a, l in m.page(after: a, limit: l, changes: 0) }
        #expect(ra.take(7, after: 50, limit: 50) { $0.changes == 0 }?.entries.first?.cookie == 51, "unchanged: served")
        #expect(ra.take(7, after: 50, limit: 50) { $0.changes == 1 } == nil, "changed since: read again")
        #expect(ra.take(7, after: 50, limit: 50) { _ in true } == nil, "and dropped")
    }

    @Test func anOldPageIsNotServed() {
        let m = Model(n: 200)
        let ra = DirReadahead(ttl: 1)
        defer { ra.shutdown() }
        ra.keep(7, m.page(after: 0, limit: 50))
        let start = Sys.monotonicNanos()
        while Sys.monotonicNanos() - start < 1000 {}
        #expect(ra.take(7, after: 10, limit: 20) { _ in true } == nil, "past its time: read again")
    }
}
