import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// What a gc's scan found: every slice id any inode records, and the id counter when the scan
/// began (ids above it were handed out later, to writes the scan may not have seen).
package struct GCScan {
    package var referenced = SparseBitmap()
    package var nextSlice: UInt64 = 0
    package var inodes = 0
    package var files = 0
    package var slices = 0
    package init() {}
}

/// A page of the inode scan: the inodes, each regular file's slices, where the next page starts.
struct InodePage {
    var inodes: [(Ino, Attr)] = []
    var slices: [Ino: [Slice]] = [:]
    var next: UInt64?
}

/// Seconds a gc's lease (`gcRunning` = `<holder> <unix seconds it ends>`) runs; the gc renews
/// it as it goes, and stops if it ever ran out (clones would no longer be noted for it).
package let gcLeaseSeconds: Int64 = 600

extension TxnMetadata {
    /// Starts a gc: takes the lease `gcRunning` unless another gc holds one that runs, and
    /// forgets slices kept for an earlier one. From now until `endGC`, a slice recorded again in
    /// another inode (a clone, a copied range, a file cut to zero into the trash) is noted
    /// (`keptForGC`).
    package func beginGC(holder: String) throws(FSError) {
        let now = Timespec.now().sec
        let before = try store.transaction(write: true) { (tx) throws(FSError) -> String? in
            let old = try store.setting(tx, "gcRunning").flatMap { gcLease($0) }
            if let (h, until) = old, h != holder, until > now {
                throw FSError(EBUSY, "another gc (\(h)) is running on this volume until \(until - now) s from now")
            }
            try store.setSetting(tx, "gcRunning", "\(holder) \(now + gcLeaseSeconds)")
            return old?.0
        }
        // What a gc that stopped without ending noted is of no use to anyone now.
        if let old = before, old != holder { try store.clearKeptForGC(holder: old) }
    }

    /// Renews the lease; fails when it ran out or another took it (then what the scan read can
    /// no longer be trusted: clones went unnoted).
    package func renewGC(holder: String) throws(FSError) {
        let now = Timespec.now().sec
        try store.transaction(write: true) { (tx) throws(FSError) in
            guard let g = try store.setting(tx, "gcRunning"), let (h, until) = gcLease(g), h == holder, until > now else {
                throw FSError(
                    ETIMEDOUT,
                    "the gc's lease on the volume ran out (the gc was stopped for over \(gcLeaseSeconds) s): nothing is deleted; run it again")
            }
            try store.setSetting(tx, "gcRunning", "\(holder) \(now + gcLeaseSeconds)")
        }
    }

    /// Ends gc `holder`: its lease and what was noted for it (another's, if it took over, stay).
    package func endGC(holder: String) throws(FSError) {
        let mine = try store.transaction(write: true) { (tx) throws(FSError) -> Bool in
            guard let g = try store.setting(tx, "gcRunning"), let (h, _) = gcLease(g), h == holder else { return false }
            try store.setSetting(tx, "gcRunning", "")
            return true
        }
        if mine { try store.clearKeptForGC(holder: holder) }
    }

    func gcLease(_ text: String) -> (String, Int64)? {
        let parts = text.split(separator: " ")
        guard parts.count == 2, let until = Int64(parts[1]) else { return nil }
        return (String(parts[0]), until)
    }

    /// Every slice id recorded by any inode (in the tree, the trash, open after unlink), read in
    /// bounded steps (`scanInodes`, the chunks of a page of files at a time). Call after
    /// `beginGC`; `renew` is called between steps.
    package func scanSlices(renew: () throws(FSError) -> Void, progress: (GCScan) -> Void) throws(FSError) -> GCScan {
        var scan = GCScan()
        scan.nextSlice = UInt64(max(0, try store.transaction(write: false) { (tx) throws(FSError) in try store.counter(tx, "nextSlice") }))
        var cursor: UInt64 = 0
        var lastRenew = Sys.monotonicNanos()
        while true {
            let page = try inodePage(cursor: cursor)
            for list in page.slices.values {
                for s in list where s.id != 0 {
                    _ = try scan.referenced.insert(s.id)
                    scan.slices += 1
                }
            }
            scan.inodes += page.inodes.count
            scan.files += page.slices.count
            progress(scan)
            if Sys.monotonicNanos() - lastRenew > 60_000_000_000 {
                try renew()
                lastRenew = Sys.monotonicNanos()
            }
            guard let n = page.next else { break }
            cursor = n
        }
        return scan
    }

    /// One page of the inode scan (`scanInodes`, about 1,000) with the slices of each regular
    /// file, read in one transaction (a long file's beyond its first `dumpFirstChunks` chunks in
    /// further steps). `extra` names more reads of an inode, which `more` makes in the same
    /// transaction (fsck's link targets and opens).
    func inodePage(
        cursor: UInt64, extra: (Ino, Attr) -> [TxnRead] = { _, _ in [] }, more: (S.Txn, Ino, Attr) throws(FSError) -> Void = { _, _, _ in }
    ) throws(FSError) -> InodePage {
        var page = InodePage()
        var long: [(Ino, UInt32)] = []
        try store.transaction(write: false) { (tx) throws(FSError) in
            page = InodePage()
            long = []
            (page.inodes, page.next) = try store.scanInodes(tx, cursor: cursor, limit: 1000)
            var reads: [TxnRead] = []
            for (ino, a) in page.inodes {
                if a.type == .regular { reads.append(.chunkList(ino, from: 0, limit: dumpFirstChunks)) }
                reads += extra(ino, a)
            }
            try store.prefetch(tx, reads)
            for (ino, a) in page.inodes {
                if a.type == .regular {
                    var list: [Slice] = []
                    let idxs = try store.chunkIndexes(tx, ino, from: 0, limit: dumpFirstChunks, descending: false)
                    for idx in idxs { list += Slice.decodeAll(try store.chunk(tx, ino, idx)) }
                    // (It goes on after the last of these: indexes may be sparse.)
                    if idxs.count == dumpFirstChunks, let last = idxs.last, last < UInt32.max { long.append((ino, last + 1)) }
                    page.slices[ino] = list
                }
                try more(tx, ino, a)
            }
        }
        for (ino, next) in long { page.slices[ino, default: []] += try slicesOf(ino, from: next) }
        return page
    }

    /// The slices of `ino`'s chunks from `from` on, `chunkBatch` chunks a step (a long file's
    /// after the first few, which came with its page).
    func slicesOf(_ ino: Ino, from start: UInt32) throws(FSError) -> [Slice] {
        var out: [Slice] = []
        var from = start
        while true {
            var idxs: [UInt32] = []
            try store.transaction(write: false) { (tx) throws(FSError) in
                try store.prefetch(tx, [.chunkList(ino, from: from, limit: chunkBatch)])
                idxs = try store.chunkIndexes(tx, ino, from: from, limit: chunkBatch, descending: false)
                for idx in idxs { out += Slice.decodeAll(try store.chunk(tx, ino, idx)) }
            }
            if idxs.count < chunkBatch || idxs.last! == UInt32.max { return out }
            from = idxs.last! + 1
        }
    }

    /// Which of `ids` were noted while the gc ran (`keepIfGC`).
    package func keptForGC(holder: String, _ ids: [UInt64]) throws(FSError) -> Set<UInt64> {
        try store.transaction(write: false) { (tx) throws(FSError) in
            var out = Set<UInt64>()
            for id in ids where try store.keptForGC(tx, holder: holder, id) { out.insert(id) }
            return out
        }
    }
}

/// What `stagefs gc` asks of an engine (the volume's own, never a gateway's client).
package protocol GCAdmin: AnyObject, Sendable {
    func beginGC(holder: String) throws(FSError)
    func renewGC(holder: String) throws(FSError)
    func endGC(holder: String) throws(FSError)
    func scanSlices(renew: () throws(FSError) -> Void, progress: (GCScan) -> Void) throws(FSError) -> GCScan
    func keptForGC(holder: String, _ ids: [UInt64]) throws(FSError) -> Set<UInt64>
}

extension TxnMetadata: GCAdmin {}
