import SQLiteKit
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// Pins, usage, room for a set, least-recently-used eviction, and what `stagefs cache gc` asks.
extension DiskCache {
    // MARK: pins

    /// Pins already cached blocks for `job`, then evicts unpinned blocks to stay within the
    /// size limit. Throws `ENOSPC` when pinned blocks alone exceed it (the pins stay recorded
    /// until the job releases them). `job` must be a valid job id (`JobID`).
    public func pin(_ keys: [String], job: String) throws(FSError) {
        if let why = JobID.problem(job) { throw FSError(EINVAL, why) }
        for batch in stride(from: 0, to: keys.count, by: 500) {
            try indexTransaction { () throws(FSError) in
                for k in keys[batch..<min(keys.count, batch + 500)] {
                    try index.query("INSERT OR IGNORE INTO pins(job, key) VALUES(?, ?)", [.text(job), .text(indexKey(k))])
                }
            }
        }
        try evict(checkSpace: false)
    }

    /// Releases every pin of `job` (all volumes); returns how many blocks it had pinned.
    public func release(job: String) throws(FSError) -> Int {
        if let why = JobID.problem(job) { throw FSError(EINVAL, why) }
        return try indexTransaction { () throws(FSError) -> Int in
            try index.query("DELETE FROM pins WHERE job=?", [.text(job)])
            return index.changes
        }
    }

    /// Jobs holding pins, with their pinned block counts, and how many pins name no valid job id
    /// (an index its user edited: those names are never returned, their pins still count).
    public func jobs() throws(FSError) -> (jobs: [(String, Int)], invalid: Int) {
        var out: [(String, Int)] = []
        var invalid = 0
        try lock.withLock { () throws(FSError) in
            try index.query("SELECT job, COUNT(*) FROM pins GROUP BY job ORDER BY job", []) {
                let name = Col.text($0, 0)
                if JobID.isValid(name) { out.append((name, Int(Col.int($0, 1)))) } else { invalid += 1 }
            }
        }
        return (out, invalid)
    }

    // MARK: usage and eviction

    /// Notes a use of `key`; uses are written to the index in batches.
    func touch(_ key: String) {
        let now = Timespec.now().sec
        let flush = lock.withLock { () -> [String: Int64]? in
            accessed[indexKey(key)] = now
            if Sys.monotonicNanos() - lastFlush < 2_000_000_000 && accessed.count < 1000 { return nil }
            lastFlush = Sys.monotonicNanos()
            defer { accessed.removeAll() }
            return accessed
        }
        if let flush {
            try? indexTransaction { () throws(FSError) in
                for (k, t) in flush { try index.query("UPDATE blocks SET atime=? WHERE key=?", [.int(t), .text(k)]) }
            }
        }
    }

    /// Bytes and blocks in use (all volumes of this user's cache), and the pinned part.
    public func usage() throws(FSError) -> CacheUsage {
        try flushIndex()
        return try lock.withLock { () throws(FSError) -> CacheUsage in
            var u = CacheUsage(bytes: 0, blocks: 0, pinnedBytes: 0)
            u.bytes = try usedBytes()
            try index.query("SELECT COUNT(*) FROM blocks", []) { u.blocks = Int(Col.int($0, 0)) }
            try index.query("SELECT COALESCE(SUM(size), 0) FROM blocks WHERE key IN (SELECT key FROM pins)", []) {
                u.pinnedBytes = Int(Col.int($0, 0))
            }
            return u
        }
    }

    /// Marks blocks as just used, so eviction takes other blocks first (staging calls it for the
    /// blocks of a set that are cached already before fetching the rest).
    public func markUsed(_ keys: [String]) {
        let now = Timespec.now().sec
        for start in stride(from: 0, to: keys.count, by: 500) {
            try? indexTransaction { () throws(FSError) in
                for k in keys[start..<min(keys.count, start + 500)] {
                    try index.query("UPDATE blocks SET atime=? WHERE key=?", [.int(now), .text(indexKey(k))])
                }
            }
        }
    }

    /// How much of the cache a set of blocks (key, length) can have: the limit from --cache-size
    /// and from the free-space ratio of the file systems, and what pins of blocks outside the set
    /// hold.
    public func room(for blocks: [(String, Int)]) throws(FSError) -> CacheRoom {
        try flushIndex()
        var r = CacheRoom(capacity: config.capacity, fileSystemLimit: nil, pinnedOutside: 0, pinningJobs: [])
        var pinnedTotal = 0
        var pinnedInSet = 0
        var used = 0
        try lock.withLock { () throws(FSError) in
            used = try usedBytes()
            try index.query("SELECT COALESCE(SUM(size), 0) FROM blocks WHERE key IN (SELECT key FROM pins)", []) { pinnedTotal = Int(Col.int($0, 0)) }
            let keys = Array(Set(blocks.map { indexKey($0.0) }))
            for start in stride(from: 0, to: keys.count, by: 500) {
                let part = Array(keys[start..<min(keys.count, start + 500)])
                let sql =
                    "SELECT COALESCE(SUM(size), 0) FROM blocks WHERE key IN (\(Array(repeating: "?", count: part.count).joined(separator: ","))) AND EXISTS (SELECT 1 FROM pins WHERE pins.key = blocks.key)"
                try index.query(sql, part.map { .text($0) }) { pinnedInSet += Int(Col.int($0, 0)) }
            }
            try index.query("SELECT DISTINCT job FROM pins ORDER BY job LIMIT 20", []) {
                let name = Col.text($0, 0)
                r.pinningJobs.append(JobID.isValid(name) ? name : JobID.escaped(name))
            }
        }
        r.pinnedOutside = max(0, pinnedTotal - pinnedInSet)
        // Space the file systems can give beyond their free-space ratio, plus what this cache
        // holds there already (it can evict its own unpinned blocks).
        var seen = Set<UInt>()
        var extra = 0
        for d in userDirs {
            var s = statvfs()
            guard statvfs(d, &s) == 0, s.f_blocks > 0, seen.insert(s.f_fsid).inserted else { continue }
            let keep = Double(s.f_blocks) * config.freeSpaceRatio
            extra += max(0, Int((Double(s.f_bavail) - keep) * Double(s.f_frsize)))
        }
        if used + extra < config.capacity { r.fileSystemLimit = used + extra }
        return r
    }

    func lowOnSpace() -> Bool {
        for d in userDirs {
            var s = statvfs()
            if statvfs(d, &s) == 0, s.f_blocks > 0, Double(s.f_bavail) / Double(s.f_blocks) < config.freeSpaceRatio { return true }
        }
        return false
    }

    /// Evicts least recently used unpinned blocks until under the size limit (and, when the
    /// file systems are short of their free-space ratio, a tenth of the cache more).
    /// Throws `ENOSPC` when pinned blocks alone exceed the limit.
    public func evict(checkSpace: Bool = true) throws(FSError) {
        try flushIndex()
        let spaceLow = checkSpace && lowOnSpace()
        unlinkGone(try indexTransaction { () throws(FSError) in try evictLocked(spaceLow: spaceLow) })
    }

    /// The eviction step inside an index transaction; returns index keys of evicted block files
    /// and packs left empty.
    func evictLocked(spaceLow: Bool) throws(FSError) -> ([String], [(Int64, String)]) {
        let used = try usedBytes()
        let over = used - config.capacity
        let need = spaceLow ? max(over, used / 10) : over
        guard need > 0 else { return ([], []) }
        let (gone, _, freed) = try dropBlocks(
            "SELECT key, size, pack FROM blocks WHERE NOT EXISTS (SELECT 1 FROM pins WHERE pins.key = blocks.key) ORDER BY atime LIMIT 5000", [],
            upTo: need)
        if freed < over {
            throw FSError(
                ENOSPC,
                "the cache in \(config.dirs.joined(separator: ":")) is full of pinned blocks: \(used - freed) bytes held by jobs' pins exceed --cache-size \(config.capacity) bytes; release a job (stagefs stage --release JOB) or raise --cache-size"
            )
        }
        return gone
    }

    /// Inside an index transaction: drops the blocks `select` lists (key, size, pack), in its
    /// order, until `budget` bytes are dropped. Returns the index keys of block files and the
    /// packs left empty (to unlink), how many blocks went and their bytes.
    private func dropBlocks(
        _ select: String, _ args: [SQLValue], upTo budget: Int
    ) throws(FSError) -> (
        gone: ([String], [(Int64, String)]), count: Int, freed: Int
    ) {
        var victims: [(key: String, size: Int, pack: Int64)] = []
        var freed = 0
        try index.query(select, args) { row in
            if freed < budget {
                victims.append((Col.text(row, 0), Int(Col.int(row, 1)), Col.int(row, 2)))
                freed += Int(Col.int(row, 1))
            }
        }
        var packLive: [Int64: Int] = [:]
        for v in victims {
            try index.query("DELETE FROM blocks WHERE key=?", [.text(v.key)])
            if v.pack != 0 { packLive[v.pack, default: 0] += v.size }
        }
        for (pack, size) in packLive { try index.query("UPDATE packs SET live=live-? WHERE id=?", [.int(Int64(size)), .int(pack)]) }
        try addUsed(-freed)
        CacheMetrics.evictions[CacheMetrics.Level.disk.rawValue].increment(by: Int64(victims.count))
        let files = victims.filter { $0.pack == 0 }.map(\.key)
        return ((files, try deadPacks(Array(packLive.keys))), victims.count, freed)
    }

    // MARK: garbage collection (stagefs cache gc)

    /// Bytes of unpinned blocks by last use, in buckets of `bucket` seconds, oldest first: what
    /// eviction in least-recently-used order frees, and when those blocks were last used.
    public func unpinnedByLastUse(bucket: Int64) throws(FSError) -> [(since: Int64, bytes: Int)] {
        try flushIndex()
        var out: [(since: Int64, bytes: Int)] = []
        try lock.withLock { () throws(FSError) in
            try index.query(
                """
                SELECT atime / ?1 * ?1 AS b, SUM(size) FROM blocks
                WHERE NOT EXISTS (SELECT 1 FROM pins WHERE pins.key = blocks.key) GROUP BY b ORDER BY b
                """, [.int(bucket)]
            ) { out.append((Col.int($0, 0), Int(Col.int($0, 1)))) }
        }
        return out
    }

    /// The last use of any block (seconds since the epoch); 0 for an empty cache.
    public func lastUse() throws(FSError) -> Int64 {
        try flushIndex()
        var t: Int64 = 0
        try lock.withLock { () throws(FSError) in
            try index.query("SELECT COALESCE(MAX(atime), 0) FROM blocks", []) { t = Col.int($0, 0) }
        }
        return t
    }

    /// Evicts unpinned blocks last used before `before` (seconds since the epoch), least
    /// recently used first, until `limit` bytes are freed; pinned blocks are never touched. With
    /// `dryRun` only counts. Returns the bytes and blocks (as the index counts them; a pack file
    /// goes once none of its blocks is left).
    public func evict(usedBefore before: Int64, limit: Int, dryRun: Bool) throws(FSError) -> (bytes: Int, blocks: Int) {
        try flushIndex()
        let unpinnedBefore = """
            SELECT key, size, pack FROM blocks WHERE atime < ?
            AND NOT EXISTS (SELECT 1 FROM pins WHERE pins.key = blocks.key) ORDER BY atime
            """
        var bytes = 0
        var blocks = 0
        if dryRun {
            try lock.withLock { () throws(FSError) in
                try index.query(unpinnedBefore, [.int(before)]) { row in
                    if bytes < limit {
                        bytes += Int(Col.int(row, 1))
                        blocks += 1
                    }
                }
            }
            return (bytes, blocks)
        }
        while bytes < limit {
            let (gone, n, freed) = try indexTransaction { () throws(FSError) in
                try dropBlocks(unpinnedBefore + " LIMIT 5000", [.int(before)], upTo: limit - bytes)
            }
            if n == 0 { break }
            unlinkGone(gone)
            bytes += freed
            blocks += n
        }
        return (bytes, blocks)
    }
}
