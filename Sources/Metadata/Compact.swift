import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// A chunk with this many slice records is compacted in the background by the mount that sees
/// it (reads slow down with every overwrite: each record is a segment to plan, and small
/// writes leave an object each).
package let compactThreshold = 100

extension TxnMetadata {
    /// Replaces the first records of chunk `index` of `ino`, exactly `old` (what the compactor
    /// read), with `merged` (one slice that reads the same), keeping the records appended since;
    /// each replaced record is released once (`unreferenced`: a shared slice loses a reference,
    /// another goes to deletion). False when the chunk no longer starts with `old` (cut or
    /// rewritten meanwhile): nothing changes, and `merged`'s objects are the caller's to delete.
    package func compactChunk(_ ino: Ino, _ index: UInt32, old: [Slice], merged: Slice) throws(FSError) -> Bool {
        var w = ByteWriter(capacity: old.count * Slice.encodedSize)
        for s in old { s.encode(into: &w) }
        let oldBytes = w.bytes
        return try store.transaction(write: true) { (tx) throws(FSError) -> Bool in
            try store.prefetch(tx, [.chunk(ino, index), .setting("slicesShared")])
            let cur = try store.chunk(tx, ino, index)
            guard !old.isEmpty, cur.count >= oldBytes.count, cur[..<oldBytes.count].elementsEqual(oldBytes) else { return false }
            _ = try store.deleteChunk(tx, ino, index)
            var nw = ByteWriter(capacity: cur.count - oldBytes.count + Slice.encodedSize)
            merged.encode(into: &nw)
            try store.appendChunk(tx, ino, index, nw.bytes + cur[oldBytes.count...])
            let gone = try unreferenced(tx, old.filter { $0.id != 0 })
            if !gone.isEmpty {
                var g = ByteWriter(capacity: gone.count * Slice.encodedSize)
                for s in gone { s.encode(into: &g) }
                try store.pushDroppedSlices(tx, g.bytes)
            }
            return true
        }
    }

    /// Chunks of regular files with at least `minRecords` slice records, found a page of the
    /// inode scan at a time; `each` gets the inode, the chunk and its record count.
    package func fragmentedChunks(minRecords: Int, _ each: (Ino, UInt32, Int) throws(FSError) -> Void) throws(FSError) {
        var cursor: UInt64 = 0
        var seen = SparseBitmap()
        while true {
            var page: [(Ino, Attr)] = []
            var next: UInt64?
            var found: [(Ino, UInt32, Int)] = []
            try store.transaction(write: false) { (tx) throws(FSError) in
                (page, next) = try store.scanInodes(tx, cursor: cursor, limit: 1000)
                found = []
                let files = page.filter { $0.1.type == .regular && $0.1.size > 0 }.map(\.0)
                try store.prefetch(tx, files.map { .chunkList($0, from: 0, limit: dumpFirstChunks) })
                for ino in files {
                    for idx in try store.chunkIndexes(tx, ino, from: 0, limit: chunkBatch, descending: false) {
                        let n = try store.chunk(tx, ino, idx).count / Slice.encodedSize
                        if n >= minRecords { found.append((ino, idx, n)) }
                    }
                }
            }
            // (Redis's SCAN may return an inode twice: its chunks are given once.)
            var fresh = Set<Ino>()
            for (ino, _, _) in found where !seen.contains(ino) { fresh.insert(ino) }
            for ino in fresh { _ = try seen.insert(ino) }
            for (ino, idx, n) in found where fresh.contains(ino) { try each(ino, idx, n) }
            guard let c = next else { return }
            cursor = c
        }
    }
}

/// What compaction asks of an engine (the volume's own: a gateway's clients do not compact).
package protocol CompactAdmin: AnyObject, Sendable {
    func compactChunk(_ ino: Ino, _ index: UInt32, old: [Slice], merged: Slice) throws(FSError) -> Bool
    func fragmentedChunks(minRecords: Int, _ each: (Ino, UInt32, Int) throws(FSError) -> Void) throws(FSError)
}

extension TxnMetadata: CompactAdmin {}
