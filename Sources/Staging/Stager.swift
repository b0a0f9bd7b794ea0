import Compress
import CoreMetrics
import DataPath
import Metadata
import ObjectStorage
import StageFSCore
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// Set by SIGINT/SIGTERM during staging: workers stop taking blocks and the run ends cleanly
/// (every cache file is complete: written under a temporary name, then renamed).
public let stagingStopRequested = Atomic<Bool>(false)

/// What a run does with the blocks of the paths.
public enum StageMode: String, Sendable, Codable {
    /// Fetch missing blocks into the cache (and pin them all for the job, if one is given).
    case stage
    /// Count what is cached.
    case check
    /// Drop the blocks from the cache (blocks pinned by a job stay).
    case evict
}

/// Results for one path given on the command line.
public struct PathReport: Codable, Sendable {
    public var path: String
    public var files = 0
    /// Sum of the files' sizes.
    public var bytes: Int64 = 0
    public var blocks = 0
    /// Bytes of the blocks that hold the files' data.
    public var blockBytes: Int64 = 0
    public var blocksFetched = 0
    public var bytesFetched: Int64 = 0
    /// Blocks that were (stage) or are (check) in the cache already.
    public var blocksCached = 0
    public var bytesCached: Int64 = 0
    public var filesFullyCached = 0
    /// After the run: blocks and bytes of the path that are in the cache (what was fetched
    /// and kept plus what was there already); eviction during the run is accounted for.
    public var blocksKept = 0
    public var bytesKept: Int64 = 0
    /// Blocks not fetched because the cache had no room for them.
    public var blocksNoRoom = 0
    public var blocksEvicted = 0
    public var blocksPinnedKept = 0
    public var errors: [String] = []

    public init(path: String) { self.path = path }

    /// Share of the block bytes in the cache after the run, in percent.
    public var percentCached: Double {
        blockBytes == 0 ? (errors.isEmpty ? 100 : 0) : Double(bytesKept) * 100 / Double(blockBytes)
    }
}

/// The outcome of a run (`--report FILE.json` writes it).
public struct StageReport: Codable, Sendable {
    public var mode: StageMode
    public var volume: String
    public var job: String?
    public var paths: [PathReport] = []
    public var files = 0
    public var bytes: Int64 = 0
    public var blocksFetched = 0
    public var bytesFetched: Int64 = 0
    public var blocksCached = 0
    /// After the run: files all of whose blocks are in the cache, and the bytes of the set there.
    public var filesKept = 0
    public var bytesKept: Int64 = 0
    /// Bytes of the blocks of every path.
    public var blockBytes: Int64 = 0
    public var durationSeconds = 0.0
    public var interrupted = false
    /// `ok` (every block of every path is in the cache), `partial` (some are not: the errors say
    /// why) or `failed` (nothing is).
    public var status = "ok"
    /// When the cache could not hold the set: why, and what would fit.
    public var cacheShortfall: String?
    public var errors: [String] = []
}

/// Running totals for a progress display.
public final class StageProgress: @unchecked Sendable {
    private let lock = ConditionLock()
    public private(set) var filesTotal = 0
    public private(set) var filesDone = 0
    public private(set) var bytesTotal: Int64 = 0
    public private(set) var bytesDone: Int64 = 0
    public private(set) var bytesFetched: Int64 = 0
    public private(set) var phase = "listing"
    let started = Sys.monotonicNanos()

    func set(phase: String, files: Int, bytes: Int64) {
        lock.withLock {
            self.phase = phase
            filesTotal = files
            bytesTotal = bytes
        }
        StageMetrics.filesTotal.increment(by: Int64(files))
        StageMetrics.bytesTotal.increment(by: bytes)
    }

    func add(done: Int64, fetched: Int64, filesFinished: Int) {
        lock.withLock {
            bytesDone += done
            bytesFetched += fetched
            filesDone += filesFinished
        }
        StageMetrics.filesDone.increment(by: Int64(filesFinished))
        StageMetrics.bytesDone.increment(by: done)
        StageMetrics.bytesFetched.increment(by: fetched)
    }

    /// (files done, files, bytes done, bytes, bytes fetched, seconds, phase)
    public var snapshot: (Int, Int, Int64, Int64, Int64, Double, String) {
        lock.withLock { (filesDone, filesTotal, bytesDone, bytesTotal, bytesFetched, Double(Sys.monotonicNanos() - started) / 1e9, phase) }
    }
}

/// One regular file found under a path.
struct FileItem {
    var path: String
    var ino: Ino
    var size: UInt64
    var top: Int
}

/// One block a file needs.
struct BlockRef {
    var key: String
    var length: Int
    var file: Int
}

/// Stages, checks or evicts datasets: resolves paths through metadata with the caller's
/// credential (nobody stages what they may not read), lists directories in parallel, reads chunk
/// records in batches, and moves blocks between the object store and the node-local cache with
/// many parallel downloads. Already cached blocks are skipped, so a second run resumes.
public final class Stager: @unchecked Sendable {
    let meta: any MetadataEngine
    let store: (any ObjectStore)?
    /// The volume's blocks in `store` (what a fetch downloads and checks).
    let blocks: BlockStore?
    let cache: DiskCache
    let layout: Layout
    /// The stored length of a block, when its key says it (no compression).
    let knownLength: (BlockRef) -> Int?
    let cred: Credential
    let threads: Int
    let job: String?
    public let progress = StageProgress()
    private let lock = ConditionLock()
    private var reports: [PathReport] = []
    private var fatal: FSError?

    public init(
        meta: any MetadataEngine, store: (any ObjectStore)?, cache: DiskCache, format: VolumeFormat, cred: Credential, threads: Int, job: String?
    ) {
        self.meta = meta
        self.store = store
        self.cache = cache
        let layout = Layout(volume: format.name, blockSize: format.blockSize)
        self.layout = layout
        let codec = BlockCodec(rawValue: format.compressionName) ?? .none
        blocks = store.map { BlockStore(layout: layout, codec: codec, store: $0, memory: MemoryCache(limit: 0), disk: nil, threads: 1) }
        knownLength = codec == .none ? { $0.length } : { _ in nil }
        self.cred = cred
        self.threads = max(1, threads)
        self.job = job
    }

    deinit { blocks?.shutdown() }

    private func fail(_ top: Int, _ message: String) {
        lock.withLock { reports[top].errors.append(message) }
    }

    private func stopping() -> Bool {
        stagingStopRequested.load(ordering: .relaxed) || lock.withLock { fatal != nil }
    }

    // MARK: resolving and listing

    /// The inode of an absolute volume path, looked up component by component as `cred`.
    func resolve(_ path: String) throws(FSError) -> (Ino, Attr) {
        var ino = rootIno
        var attr = try meta.getattr(rootIno)
        for part in path.split(separator: "/") where part != "." {
            (ino, attr) = try meta.lookup(cred, ino, Array(part.utf8))
        }
        return (ino, attr)
    }

    /// Every readable regular file under the paths; unreadable parts are reported per path.
    func walk(_ paths: [String]) -> [FileItem] {
        var files: [FileItem] = []
        var dirs: [(String, Ino, Int)] = []
        for (top, path) in paths.enumerated() {
            do {
                let (ino, a) = try resolve(path)
                switch a.type {
                case .regular:
                    if Posix.mayAccess(a, cred, .read) {
                        files.append(FileItem(path: path, ino: ino, size: a.size, top: top))
                    } else {
                        fail(top, "\(path): permission denied")
                    }
                case .directory:
                    if Posix.mayAccess(a, cred, [.read, .execute]) {
                        dirs.append((path, ino, top))
                    } else {
                        fail(top, "\(path): permission denied")
                    }
                default:
                    fail(top, "\(path): not a regular file or directory")
                }
            } catch {
                fail(top, "\(path): \(error.message)")
            }
        }
        files += listTrees(dirs)
        return files
    }

    /// Lists directory trees with `threads` workers.
    private func listTrees(_ roots: [(String, Ino, Int)]) -> [FileItem] {
        let state = Locked((queue: roots, active: 0, files: [FileItem]()))
        let cond = ConditionLock()
        let pool = WorkerPool(name: "list", threads: min(threads, 16))
        defer { pool.shutdown() }
        let group = WaitGroup()
        for _ in 0..<min(threads, 16) {
            group.add()
            pool.submit { [self] in
                while true {
                    var next: (String, Ino, Int)?
                    cond.withLock {
                        while true {
                            let (item, busy) = state.withLock { s -> ((String, Ino, Int)?, Int) in
                                if let i = s.queue.popLast() {
                                    s.active += 1
                                    return (i, s.active)
                                }
                                return (nil, s.active)
                            }
                            if item != nil || busy == 0 || stopping() {
                                next = item
                                return
                            }
                            cond.wait(seconds: 0.05)
                        }
                    }
                    guard let (dirPath, dirIno, top) = next else { break }
                    var found: [FileItem] = []
                    var subdirs: [(String, Ino, Int)] = []
                    var cookie: UInt64 = 0
                    do throws(FSError) {
                        while !stopping() {
                            let batch = try meta.readdir(dirIno, after: cookie, limit: 1000, plus: true)
                            if batch.isEmpty { break }
                            cookie = batch.last!.cookie
                            for e in batch {
                                guard let a = e.attr else { continue }
                                let p = dirPath == "/" ? "/\(e.nameString)" : "\(dirPath)/\(e.nameString)"
                                if a.type == .directory {
                                    if Posix.mayAccess(a, cred, [.read, .execute]) {
                                        subdirs.append((p, e.ino, top))
                                    } else {
                                        fail(top, "\(p): permission denied")
                                    }
                                } else if a.type == .regular {
                                    if Posix.mayAccess(a, cred, .read) {
                                        found.append(FileItem(path: p, ino: e.ino, size: a.size, top: top))
                                    } else {
                                        fail(top, "\(p): permission denied")
                                    }
                                }
                            }
                        }
                    } catch {
                        fail(top, "\(dirPath): \(error.message)")
                    }
                    state.withLock { s in
                        s.files += found
                        s.queue += subdirs
                        s.active -= 1
                    }
                    cond.withLock { cond.broadcast() }
                }
                group.done()
            }
        }
        try? group.wait()
        return state.withLock { $0.files }
    }

    // MARK: blocks

    /// The blocks holding the visible bytes of each file (chunk records read in batches).
    func blocks(of files: [FileItem]) -> [BlockRef] {
        var out: [BlockRef] = []
        var start = 0
        while start < files.count && !stopping() {
            var asks: [(Ino, UInt32)] = []
            var owners: [Int] = []
            var end = start
            while end < files.count && asks.count < 512 {
                let f = files[end]
                let chunks = UInt32((f.size + chunkSize - 1) / chunkSize)
                for idx in 0..<chunks {
                    asks.append((f.ino, idx))
                    owners.append(end)
                }
                end += 1
            }
            do throws(FSError) {
                let results = try meta.readChunks(asks)
                var seen = Set<String>()
                for (i, slices) in results.enumerated() {
                    let f = files[owners[i]]
                    let idx = asks[i].1
                    let chunkStart = UInt64(idx) * chunkSize
                    let limit = UInt32(min(chunkSize, f.size - chunkStart))
                    for seg in buildView(slices) where seg.id != 0 && seg.pos < limit {
                        let count = Int(min(seg.pos + seg.len, limit) - seg.pos)
                        layout.forEachBlock(slice: seg.id, size: seg.size, from: Int(seg.off), count: count) { b, _, _, _ in
                            if seen.insert(b.key).inserted { out.append(BlockRef(key: b.key, length: b.length, file: owners[i])) }
                        }
                    }
                }
            } catch {
                for i in start..<end { fail(files[i].top, "\(files[i].path): \(error.message)") }
            }
            start = end
        }
        return out
    }

    // MARK: running

    /// Runs `mode` over the paths (absolute paths inside the volume).
    public func run(_ paths: [String], mode: StageMode) -> StageReport {
        let started = Sys.monotonicNanos()
        reports = paths.map { PathReport(path: $0) }
        var report = StageReport(mode: mode, volume: layout.volume, job: job)
        let files = walk(paths)
        let refs = blocks(of: files)
        for f in files {
            reports[f.top].files += 1
            reports[f.top].bytes += Int64(f.size)
        }
        var blocksLeft = [Int](repeating: 0, count: files.count)
        for r in refs {
            reports[files[r.file].top].blocks += 1
            reports[files[r.file].top].blockBytes += Int64(r.length)
            blocksLeft[r.file] += 1
        }
        progress.set(phase: mode.rawValue, files: files.count, bytes: refs.reduce(0) { $0 + Int64($1.length) })
        // Files without blocks (empty or all holes) are done at once.
        progress.add(done: 0, fetched: 0, filesFinished: blocksLeft.filter { $0 == 0 }.count)
        for (i, n) in blocksLeft.enumerated() where n == 0 { reports[files[i].top].filesFullyCached += 1 }
        // What is cached already, in batches (one index query per 500 packed blocks).
        let present = cache.cached(refs.map { ($0.key, knownLength($0)) })
        // Blocks already cached are pinned before anything is downloaded: otherwise the
        // evictions that make room for the downloads could drop them first (and pins beyond
        // the cache size are found now, not after the downloads).
        if mode == .stage, let job {
            let keys = zip(refs, present).filter { $0.1 }.map { $0.0.key }
            if !keys.isEmpty {
                do { try cache.pin(keys, job: job) } catch { lock.withLock { fatal = error } }
            }
        }
        // When the set cannot all stay in the cache, fetch only what fits: fetching more would
        // evict what this run fetched first.
        var budget = Int.max
        var room: CacheRoom?
        if mode == .stage && !refs.isEmpty {
            cache.markUsed(refs.indices.filter { present[$0] }.map { refs[$0].key })
            do {
                let r = try cache.room(for: refs.map { ($0.key, $0.length) })
                room = r
                let need = refs.reduce(0) { $0 + DiskCache.fileSize($1.length) }
                if need > r.available {
                    let have = refs.indices.filter { present[$0] }.reduce(0) { $0 + DiskCache.fileSize(refs[$1].length) }
                    budget = max(0, r.available - have)
                }
            } catch {
                report.errors.append("cannot read the cache index: \(error.message)")
            }
        }
        let reserved = Locked(0)
        let fetchBudget = budget
        let remaining = Locked(blocksLeft)
        let fileOK = Locked([Bool](repeating: true, count: files.count))
        let next = Locked(0)
        let pool = WorkerPool(name: "stage", threads: threads)
        let group = WaitGroup()
        for _ in 0..<threads {
            group.add()
            pool.submit { [self] in
                // One block buffer per worker, reused: fresh memory per block costs page faults.
                let scratch = Buffer(capacity: layout.blockSize)
                while !stopping() {
                    let i = next.withLock { n -> Int in
                        defer { n += 1 }
                        return n
                    }
                    if i >= refs.count { break }
                    let r = refs[i]
                    let top = files[r.file].top
                    var fetched: Int64 = 0
                    var ok = true
                    switch mode {
                    case .stage:
                        if present[i] {
                            lock.withLock {
                                reports[top].blocksCached += 1
                                reports[top].bytesCached += Int64(r.length)
                            }
                        } else if !reserved.withLock({ used -> Bool in
                            let size = DiskCache.fileSize(r.length)
                            if fetchBudget != Int.max && used + size > fetchBudget { return false }
                            used += size
                            return true
                        }) {
                            ok = false
                            lock.withLock { reports[top].blocksNoRoom += 1 }
                        } else {
                            do throws(FSError) {
                                try fetch(r, into: scratch)
                                fetched = Int64(r.length)
                                lock.withLock {
                                    reports[top].blocksFetched += 1
                                    reports[top].bytesFetched += Int64(r.length)
                                }
                            } catch {
                                ok = false
                                if error.code == ENOSPC {
                                    lock.withLock { if fatal == nil { fatal = error } }
                                } else {
                                    fail(top, "\(files[r.file].path): \(error.message)")
                                }
                            }
                        }
                    case .check:
                        if present[i] {
                            lock.withLock {
                                reports[top].blocksCached += 1
                                reports[top].bytesCached += Int64(r.length)
                            }
                        } else {
                            ok = false
                        }
                    case .evict:
                        if present[i] {
                            let dropped = (try? cache.evictOne(r.key)) ?? false
                            lock.withLock {
                                if dropped { reports[top].blocksEvicted += 1 } else { reports[top].blocksPinnedKept += 1 }
                            }
                        }
                    }
                    if !ok { fileOK.withLock { $0[r.file] = false } }
                    let finished = remaining.withLock { left -> Bool in
                        left[r.file] -= 1
                        return left[r.file] == 0
                    }
                    if finished && fileOK.withLock({ $0[r.file] }) && mode != .evict {
                        lock.withLock { reports[top].filesFullyCached += 1 }
                    }
                    progress.add(done: Int64(r.length), fetched: fetched, filesFinished: finished ? 1 : 0)
                }
                group.done()
            }
        }
        try? group.wait()
        pool.shutdown()
        do {
            try cache.flushIndex()
        } catch {
            lock.withLock { if fatal == nil { fatal = error } }
        }
        // What is in the cache now, not what went through it.
        let kept = mode == .evict ? [] : (mode == .check ? present : cache.cached(refs.map { ($0.key, knownLength($0)) }))
        if mode != .evict {
            var missing = [Int](repeating: 0, count: files.count)
            for (i, r) in refs.enumerated() {
                let top = files[r.file].top
                if kept[i] {
                    reports[top].blocksKept += 1
                    reports[top].bytesKept += Int64(r.length)
                } else {
                    missing[r.file] += 1
                }
            }
            for i in reports.indices { reports[i].filesFullyCached = 0 }
            for (i, f) in files.enumerated() where missing[i] == 0 { reports[f.top].filesFullyCached += 1 }
        }
        report.paths = reports
        report.files = files.count
        report.bytes = reports.reduce(0) { $0 + $1.bytes }
        report.blockBytes = reports.reduce(0) { $0 + $1.blockBytes }
        report.blocksFetched = reports.reduce(0) { $0 + $1.blocksFetched }
        report.bytesFetched = reports.reduce(0) { $0 + $1.bytesFetched }
        report.blocksCached = reports.reduce(0) { $0 + $1.blocksCached }
        report.filesKept = reports.reduce(0) { $0 + $1.filesFullyCached }
        report.bytesKept = reports.reduce(0) { $0 + $1.bytesKept }
        report.durationSeconds = Double(Sys.monotonicNanos() - started) / 1e9
        report.interrupted = stagingStopRequested.load(ordering: .relaxed)
        if let fatal { report.errors.append(fatal.message) }
        if report.interrupted { report.errors.append("interrupted") }
        if mode == .stage && report.bytesKept < report.blockBytes && !report.interrupted {
            // Blocks missing without a failed fetch to explain them: the cache had no room.
            let noRoom = reports.contains { $0.blocksNoRoom > 0 } || fatal?.code == ENOSPC
            let unexplained = fatal == nil && reports.allSatisfy { $0.errors.isEmpty }
            if noRoom || unexplained {
                let why = shortfall(room: room, refs: refs, kept: report.bytesKept)
                report.cacheShortfall = why
                report.errors.append(why)
            }
        }
        let failedPaths = reports.filter { !$0.errors.isEmpty }.count
        let nothing =
            mode == .stage
            ? report.bytesKept == 0 && (report.blockBytes > 0 || failedPaths == reports.count)
            : report.blocksFetched + report.blocksCached == 0 && (failedPaths == reports.count || fatal != nil)
        if failedPaths == 0 && report.errors.isEmpty {
            report.status = "ok"
        } else if nothing {
            report.status = "failed"
        } else {
            report.status = "partial"
        }
        if mode == .check && reports.contains(where: { $0.percentCached < 100 }) && report.status == "ok" {
            report.status = "partial"
        }
        return report
    }

    /// Why the set did not stay in the cache, and what would fit.
    private func shortfall(room: CacheRoom?, refs: [BlockRef], kept: Int64) -> String {
        let need = refs.reduce(0) { $0 + DiskCache.fileSize($1.length) }
        let mib = { (n: Int) in (n + (1 << 20) - 1) >> 20 }
        let dirs = cache.config.dirs.joined(separator: ":")
        guard let room else { return "not all of the set stayed in the cache in \(dirs)" }
        let size = humanBytes(need)
        if let fsLimit = room.fileSystemLimit, fsLimit < need + room.pinnedOutside, fsLimit < room.capacity {
            return
                "the cache could not hold the set: it needs \(size) and the file system of \(dirs) has room for \(humanBytes(fsLimit)) of cache while keeping --free-space-ratio \(cache.config.freeSpaceRatio) free\(room.pinnedOutside > 0 ? " (\(humanBytes(room.pinnedOutside)) of it pinned by other jobs)" : ""); \(humanBytes(kept)) of the set is in it: free space there or stage less"
        }
        if need > room.capacity {
            return
                "the cache is too small for the set: it needs \(size) and --cache-size is \(mib(room.capacity)) MiB (\(humanBytes(kept)) of the set is in it\(room.pinnedOutside > 0 ? ", \(humanBytes(room.pinnedOutside)) being pinned by other jobs" : "")); raise --cache-size to at least \(mib(need + room.pinnedOutside)) (MiB) or stage less"
        }
        if room.pinnedOutside > 0 && need > room.available {
            let jobs = room.pinningJobs.filter { $0 != job }
            return
                "the cache is held by other jobs' pins: the set needs \(size), --cache-size is \(mib(room.capacity)) MiB and \(humanBytes(room.pinnedOutside)) of it is pinned by other jobs\(jobs.isEmpty ? "" : " (\(jobs.joined(separator: ", ")))"); \(humanBytes(kept)) of the set is in it: release finished jobs (stagefs stage --release JOB) or raise --cache-size to at least \(mib(need + room.pinnedOutside)) (MiB)"
        }
        return
            "not all of the set stayed in the cache in \(dirs): other use of the cache evicted blocks while staging (it needs \(size); --cache-size is \(mib(room.capacity)) MiB)"
    }

    /// Downloads one block and stores it in the cache as the store holds it (pinned for the job).
    private func fetch(_ r: BlockRef, into buf: Buffer) throws(FSError) {
        guard let blocks else { throw FSError(EINVAL, "no object store to fetch from") }
        try cache.put(r.key, try blocks.download(Block(key: r.key, length: r.length), into: buf), pin: job)
    }
}

/// Staging's progress as metrics (`stagefs stage --metrics`): files and bytes asked for, done
/// (in the cache), and fetched from the store to get there.
enum StageMetrics {
    static let filesTotal = CoreMetrics.Counter(label: "stagefs_stage_files")
    static let bytesTotal = CoreMetrics.Counter(label: "stagefs_stage_bytes")
    static let filesDone = CoreMetrics.Counter(label: "stagefs_stage_files_done")
    static let bytesDone = CoreMetrics.Counter(label: "stagefs_stage_bytes_done")
    static let bytesFetched = CoreMetrics.Counter(label: "stagefs_stage_bytes_fetched")
}
