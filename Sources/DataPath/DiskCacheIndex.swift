import SQLiteKit
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// The SQLite index: batched entries, used bytes, removal, and its rebuild from the files.
extension DiskCache {
    // MARK: index

    /// Writes pending blocks to the index in one transaction and evicts what the limits ask.
    /// Throws `ENOSPC` when pinned blocks alone leave no room; the pending blocks written since
    /// the last flush are then dropped.
    public func flushIndex() throws(FSError) {
        let batch = lock.withLock { () -> [Pending] in
            defer {
                pending.removeAll(keepingCapacity: true)
                pendingBytes = 0
                lastIndexFlush = Sys.monotonicNanos()
            }
            return pending
        }
        if batch.isEmpty { return }
        let checkSpace = lock.withLock { () -> Bool in
            putsSinceSpaceCheck += batch.count
            if putsSinceSpaceCheck >= 32 {
                putsSinceSpaceCheck = 0
                return true
            }
            return false
        }
        let spaceLow = checkSpace && lowOnSpace()
        var gone: ([String], [(Int64, String)]) = ([], [])
        do {
            gone = try indexTransaction { () throws(FSError) -> ([String], [(Int64, String)]) in
                var deadPacks: [(Int64, String)] = []
                for p in batch {
                    deadPacks += try setRow(p.indexKey, size: p.size, location: p.location)
                    if let job = p.job { try index.query("INSERT OR IGNORE INTO pins(job, key) VALUES(?, ?)", [.text(job), .text(p.indexKey)]) }
                }
                let (files, packs) = try evictLocked(spaceLow: spaceLow)
                return (files, deadPacks + packs)
            }
        } catch {
            // Pinned data fills the cache: the blocks of this batch are not kept.
            for p in batch { if let f = p.file { unlink(f) } }
            lock.withLock { for p in batch { pendingLocations[p.indexKey] = nil } }
            throw error
        }
        lock.withLock { for p in batch { pendingLocations[p.indexKey] = nil } }
        unlinkGone(gone)
    }

    /// Flushes pending index entries that have waited over a second (called periodically).
    public func flushIndexIfStale() {
        let stale = lock.withLock { !pending.isEmpty && Sys.monotonicNanos() - lastIndexFlush > 1_000_000_000 }
        if stale {
            do { try flushIndex() } catch { Log.warning("cache index: \(error.message)") }
        }
    }

    /// Adds or replaces the row of `ik`; keeps the used-bytes total and the packs' live bytes.
    /// Returns packs left empty by the replacement (in a transaction).
    func setRow(_ ik: String, size: Int, location: Location) throws(FSError) -> [(Int64, String)] {
        let dead = try deleteRow(ik)
        try index.query(
            "INSERT INTO blocks(key, size, atime, pack, off) VALUES(?, ?, ?, ?, ?)",
            [.text(ik), .int(Int64(size)), .int(Timespec.now().sec), .int(location.pack), .int(location.off)])
        try addUsed(size)
        if location.pack != 0 { try index.query("UPDATE packs SET live=live+? WHERE id=?", [.int(Int64(size)), .int(location.pack)]) }
        return dead
    }

    /// Deletes the row of `ik` (in a transaction); returns packs it left empty and finished.
    @discardableResult
    func deleteRow(_ ik: String) throws(FSError) -> [(Int64, String)] {
        var old: (Int, Int64)?
        try index.query("SELECT size, pack FROM blocks WHERE key=?", [.text(ik)]) { old = (Int(Col.int($0, 0)), Col.int($0, 1)) }
        guard let (size, pack) = old else { return [] }
        try index.query("DELETE FROM blocks WHERE key=?", [.text(ik)])
        try addUsed(-size)
        guard pack != 0 else { return [] }
        try index.query("UPDATE packs SET live=live-? WHERE id=?", [.int(Int64(size)), .int(pack)])
        return try deadPacks([pack])
    }

    /// Of `ids`, the packs with no live block whose writer is done (or dead): their rows go.
    func deadPacks(_ ids: [Int64]) throws(FSError) -> [(Int64, String)] {
        var out: [(Int64, String)] = []
        for id in Set(ids) {
            var row: (Int64, Int64, String)?
            try index.query("SELECT live, writer, volume FROM packs WHERE id=?", [.int(id)]) {
                row = (Col.int($0, 0), Col.int($0, 1), Col.text($0, 2))
            }
            guard let (live, writer, vol) = row, live <= 0 else { continue }
            if writer != 0 && (writer == Int64(Sys.pid) || kill(pid_t(writer), 0) == 0) { continue }
            try index.query("DELETE FROM packs WHERE id=?", [.int(id)])
            out.append((id, vol))
        }
        return out
    }

    func addUsed(_ delta: Int) throws(FSError) {
        if delta != 0 { try index.query("UPDATE stats SET v=v+? WHERE k='used'", [.int(Int64(delta))]) }
    }

    /// Bytes the cache holds: the index's total and what waits to be added to it (no flush; nil
    /// when the index cannot be read).
    public var bytesHeld: Int? {
        lock.withLock { () -> Int? in
            guard let used = try? usedBytes() else { return nil }
            return used + pendingBytes
        }
    }

    func usedBytes() throws(FSError) -> Int {
        var used = 0
        try index.query("SELECT v FROM stats WHERE k='used'", []) { used = Int(Col.int($0, 0)) }
        return used
    }

    func indexTransaction<T>(_ body: () throws(FSError) -> T) throws(FSError) -> T {
        try lock.withLock { () throws(FSError) -> T in try index.transaction(write: true, body) }
    }

    /// Removes files of evicted blocks and files of emptied packs.
    func unlinkGone(_ gone: ([String], [(Int64, String)])) {
        for ik in gone.0 {
            let objectKey = String(ik.drop { $0 != "/" }.dropFirst())
            let vol = String(ik.prefix { $0 != "/" })
            unlink("\(dir(for: objectKey))/\(vol)/\(objectKey)")
        }
        for (id, vol) in gone.1 {
            packLock.withLock {
                if let fd = readFDs.removeValue(forKey: id) { Sys.close(fd) }
            }
            unlink(packPath(id, volume: vol))
        }
    }

    /// Drops a block from the cache (its pins too).
    public func remove(_ key: String) {
        let ik = indexKey(key)
        var file: String?
        if let l = location(key), l.pack == 0 { file = path(key) } else if location(key) == nil { file = path(key) }
        if let file { unlink(file) }
        lock.withLock {
            pending.removeAll { $0.indexKey == ik }
            pendingLocations[ik] = nil
        }
        if let packs = try? indexTransaction({ () throws(FSError) -> [(Int64, String)] in
            let dead = try deleteRow(ik)
            try index.query("DELETE FROM pins WHERE key=?", [.text(ik)])
            return dead
        }) {
            unlinkGone(([], packs))
        }
    }

    /// Drops a block unless a job pinned it; returns whether it was dropped.
    @discardableResult
    public func evictOne(_ key: String) throws(FSError) -> Bool {
        try flushIndex()
        let ik = indexKey(key)
        let (pinned, packed, packs) = try indexTransaction { () throws(FSError) -> (Bool, Bool, [(Int64, String)]) in
            var pinned = false
            var packed = false
            try index.query("SELECT 1 FROM pins WHERE key=? LIMIT 1", [.text(ik)]) { _ in pinned = true }
            try index.query("SELECT pack FROM blocks WHERE key=?", [.text(ik)]) { packed = Col.int($0, 0) != 0 }
            let dead = pinned ? [] : try deleteRow(ik)
            return (pinned, packed, dead)
        }
        if !pinned {
            if !packed { unlink(path(key)) }
            unlinkGone(([], packs))
        }
        return !pinned
    }

    /// Indexes block files found on disk (first use of a cache directory with blocks in it);
    /// pack files without an index are unreadable and removed.
    func rebuildIndex() throws(FSError) {
        var found: [(String, Int, Int64)] = []
        for d in userDirs { scan(d, rel: "", into: &found) }
        if found.isEmpty { return }
        try indexTransaction { () throws(FSError) in
            for (k, size, t) in found {
                try index.query("INSERT OR IGNORE INTO blocks(key, size, atime) VALUES(?, ?, ?)", [.text(k), .int(Int64(size)), .int(t)])
            }
            try index.query("UPDATE stats SET v=(SELECT COALESCE(SUM(size), 0) FROM blocks) WHERE k='used'", [])
        }
        Log.info("indexed \(found.count) cached blocks found in \(userDirs.joined(separator: ":"))")
    }

    func scan(_ dir: String, rel: String, into found: inout [(String, Int, Int64)]) {
        guard let d = opendir(rel.isEmpty ? dir : "\(dir)/\(rel)") else { return }
        var subdirs: [String] = []
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name == "." || name == ".." || (rel.isEmpty && name.hasPrefix("index.db")) { continue }
            let relName = rel.isEmpty ? name : "\(rel)/\(name)"
            guard let st = Sys.stat("\(dir)/\(relName)") else { continue }
            if st.st_mode & S_IFMT == S_IFDIR {
                subdirs.append(relName)
            } else if name.contains(".tmp") || rel.hasSuffix("/packs") {
                unlink("\(dir)/\(relName)")
            } else {
                found.append((relName, Int(st.st_size), Int64(st.st_mtim.tv_sec)))
            }
        }
        closedir(d)
        for s in subdirs { scan(dir, rel: s, into: &found) }
    }
}
