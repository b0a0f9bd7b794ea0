import ArgumentParser
import DataPath
import Metadata
import ObjectStorage
import StageFSCore
import VFS

#if canImport(Glibc)
    import Glibc
#endif

/// The volume an admin command names: its engine (the volume's own, not a gateway's), format
/// and bucket.
func adminVolume(_ metaURL: String?, what: String) throws -> (meta: any MetadataEngine, format: VolumeFormat, store: any ObjectStore) {
    guard let text = metaURL ?? defaultVolume() else { throw FSError.usage("name the volume: its META-URL, or STAGEFS_VOLUME") }
    let meta = try openEngine(try metaURLArgument(text))
    let format = try meta.requireFormat()
    if throughGateway(meta) { throw FSError.usage("\(text) names a gateway: \(what) takes the volume's own META-URL (an admin's)") }
    let store = try openObjectStore(
        StoreConfig(storage: format.storage, bucket: format.bucket, accessKey: format.accessKey, secretKey: format.secretKey))
    return (meta, format, store)
}

/// `stagefs fsck META-URL [--path P] [--repair] [--check-objects]`.
struct FsckCmd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "fsck",
        abstract: "Check the volume's metadata (and objects) for damage; repair what can be repaired.",
        discussion: """
            Checks every directory entry against the inode it names (missing, of another type),
            link counts, directories' parents; and for the whole volume every inode (leaked ones,
            such as a file with no name that nothing holds open, or one no directory names),
            slice ids past the counter, a sample of the objects of the slices (all with
            --check-objects), the usage and trash counters, clone references, quotas and stale
            sessions (a client killed without unmounting). It prints one line per problem.

            --repair fixes what it found, each in a transaction that checks the problem again
            first: a dangling entry is removed, link counts and parents set, a leaked file freed,
            an inode no directory names given a name in /lost+found (#INODE), stale sessions
            ended (what they held open after its unlink is freed), counters and quotas set to what
            the inodes add up to. Missing objects cannot be repaired: the lines name the inodes.
            While clients are connected (a session with a heartbeat within --stale-after), what
            changes while it is counted (link counts, parents, /lost+found, usage, quotas,
            references going down) is reported, not repaired: unmount first.

            --path checks one directory's tree only (entries, link counts, parents).
            Works in bounded steps; progress on a terminal. Exit status: 0 clean (or all
            repaired), 3 problems remain, 1 the check itself failed.

            Examples:
              stagefs fsck redis://10.0.0.5:6379/1
              stagefs fsck redis://10.0.0.5:6379/1 --repair --check-objects
            """
    )

    @Argument(help: "The volume's META-URL (default: STAGEFS_VOLUME).")
    var metaURL: String?

    @Option(help: "Check only this directory's tree (from the volume's root, /team1).")
    var path: String?

    @Flag(help: "Repair what was found.")
    var repair = false

    @Flag(help: "Check that every slice's objects are in the bucket (default: one slice in --sample).")
    var checkObjects = false

    @Option(help: "Check the objects of one slice in N.")
    var sample = 100

    @Option(help: "Sessions silent this long are stale (their client is gone).")
    var staleAfter = DurationArg(seconds: 300)

    func validate() throws {
        if sample < 1 { throw ValidationError("--sample takes a number of 1 or more") }
    }

    func run() throws {
        let (meta, format, store) = try adminVolume(metaURL, what: "fsck")
        guard let admin = meta as? any FsckAdmin else { throw FSError(EOPNOTSUPP, "\(meta.displayName) cannot be checked") }
        var o = FsckOptions()
        o.repair = repair
        o.staleAge = Int64(staleAfter.seconds)
        o.sampleEvery = checkObjects ? 1 : sample
        if let path {
            guard path.hasPrefix("/") else { throw FSError.usage("--path takes a directory from the volume's root, such as /\(path)") }
            let (ino, a) = try lookupPath(meta, path, .root, what: "--path \(path)")
            guard a.type == .directory else { throw FSError(ENOTDIR, "--path \(path) is not a directory") }
            o.top = ino
        } else {
            let layout = Layout(volume: format.name, blockSize: format.blockSize)
            o.missingObjects = { (s) throws(FSError) -> [String] in
                var missing: [String] = []
                for k in layout.keys(of: s) where try store.head(k) == nil { missing.append(k) }
                return missing
            }
        }
        let tty = isatty(2) != 0
        var last: UInt64 = 0
        o.progress = { r in
            let now = Sys.monotonicNanos()
            guard tty, now - last > 500_000_000 else { return }
            last = now
            printError("\rstagefs: checked \(r.directories) directories, \(r.inodes) inodes; \(r.count) problem(s)...", newline: false)
        }
        let start = Sys.monotonicNanos()
        let r = try admin.fsck(o)
        if tty { printError("\r\u{1B}[K", newline: false) }
        for p in r.problems { print(p) }
        if r.count > r.problems.count { print("... and \(r.count - r.problems.count) more") }
        let secs = (Double(Sys.monotonicNanos() - start) / 1e8).rounded() / 10
        let objects = r.slicesChecked > 0 ? ", the objects of \(r.slicesChecked) slice(s) checked" : ""
        printError(
            "stagefs: fsck of volume '\(format.name)'\(path.map { " (\($0))" } ?? ""): \(r.count) problem(s)\(repair ? ", \(r.repaired) repaired" : "") in \(r.directories) directories\(objects), \(secs) s"
                + (r.count > 0 && !repair ? "; run again with --repair to fix them" : "")
                + (r.deferred > 0
                    ? "; \(r.deferred) left unrepaired while clients are connected (link counts, usage, quotas, references: they change while counted): repair them with the volume unmounted"
                    : ""))
        if r.count > 0 && (!repair || r.repaired < r.count) { throw ExitCode(3) }
    }
}

/// `stagefs gc META-URL [--delete] [--older-than 1h]`.
struct GCCmd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "gc",
        abstract: "Find (and with --delete remove) objects in the bucket that no file references.",
        discussion: """
            Reads which slices every inode records (the tree, the trash, files still open after
            their unlink), then lists the bucket's blocks: a block of a slice nothing records is
            leaked (a client killed mid-write, an interrupted deletion). Without --delete it only
            says what it found.

            It never deletes what anything may still reference: blocks of slices recorded
            anywhere; slices a clone, a copied range or a file cut to zero records elsewhere
            while gc runs (they are noted for it); slices numbered after gc began (writes it did
            not see); and blocks newer than --older-than (1h: uploads whose commit may still
            come). A listing or read error stops it; nothing is deleted after one. One gc runs
            on a volume at a time.

            --compact first merges the chunks of files fragmented by many writes or overwrites
            (--min-slices records or more) into one slice each, as mounts do by themselves for
            chunks of 100 records: reads get faster and the small objects are replaced by one.
            Each chunk is changed only if nothing wrote to it meanwhile, and each old slice is
            released once (deleted here, unless a clone still shares it).

            Examples:
              stagefs gc redis://10.0.0.5:6379/1
              stagefs gc redis://10.0.0.5:6379/1 --delete
            """
    )

    @Argument(help: "The volume's META-URL (default: STAGEFS_VOLUME).")
    var metaURL: String?

    @Flag(help: "Delete the leaked objects found.")
    var delete = false

    @Option(help: "Leave objects newer than this (uploads whose commit may still come).")
    var olderThan = DurationArg(seconds: 3600)

    @Flag(help: "Compact fragmented files first.")
    var compact = false

    @Option(help: "With --compact: chunks of at least this many slice records are compacted.")
    var minSlices = 20

    func validate() throws {
        if minSlices < 2 { throw ValidationError("--min-slices takes 2 or more") }
    }

    func run() throws {
        if metaURL == nil && defaultVolume() == nil {
            throw FSError.usage("name the volume: its META-URL, or STAGEFS_VOLUME (a node's cache of blocks is cleaned by 'stagefs cache gc')")
        }
        let (meta, format, store) = try adminVolume(metaURL, what: "gc")
        guard let admin = meta as? any GCAdmin else { throw FSError(EOPNOTSUPP, "\(meta.displayName) cannot be collected") }
        if compact { try compactAll(meta, format, store) }
        if olderThan.seconds < 600 {
            printError(
                "stagefs: warning: --older-than \(Setting.durationText(olderThan.seconds)) may delete blocks a writer uploaded and has not committed yet"
            )
        }
        let holder = "\(Sys.hostname()):\(getpid()):\(Timespec.now().sec)"
        // Blocks written from now on may belong to writes the scan does not see: only older
        // ones are candidates, by the store's own clock (a probe object says what it is).
        let cutoff = try storeNow(store, format) - Int64(olderThan.seconds)
        try admin.beginGC(holder: holder)
        defer { try? admin.endGC(holder: holder) }
        let tty = isatty(2) != 0
        var last: UInt64 = 0
        func show(_ s: String) {
            let now = Sys.monotonicNanos()
            guard tty, now - last > 500_000_000 else { return }
            last = now
            printError("\rstagefs: " + s, newline: false)
        }
        let start = Sys.monotonicNanos()
        let scan = try admin.scanSlices(renew: { () throws(FSError) in try admin.renewGC(holder: holder) }) { s in
            show("read \(s.inodes) inodes, \(s.slices) slice records...")
        }
        let prefix = format.name + "/chunks/"
        var after: String?
        var listed = 0
        var leaked: [(key: String, size: Int)] = []
        var leakedBytes = 0
        var leakedCount = 0
        var deleted = 0
        var kept = 0
        var lastRenew = Sys.monotonicNanos()
        // What the bucket holds, as listed (the volume's counters, where not counted yet).
        var listedCounts = (blockBytes: Int64(0), storedBytes: Int64(0))
        var deletedCounts = (blockBytes: Int64(0), storedBytes: Int64(0))
        while true {
            let page = try store.list(prefix: prefix, after: after, limit: 1000)
            listed += page.count
            for o in page {
                guard let p = Layout.parts(ofKey: o.key) else { continue }
                listedCounts.blockBytes += Int64(p.length)
                listedCounts.storedBytes += Int64(o.size)
            }
            var candidates: [(ObjectInfo, UInt64)] = []
            for o in page {
                guard let id = Layout.sliceID(ofKey: o.key), id != 0 else { continue }
                if scan.referenced.contains(id) || id > scan.nextSlice { continue }
                guard let m = o.modified, m < cutoff else { continue }
                candidates.append((o, id))
            }
            if !candidates.isEmpty {
                let keep = try admin.keptForGC(holder: holder, Array(Set(candidates.map(\.1))))
                kept += candidates.filter { keep.contains($0.1) }.count
                candidates.removeAll { keep.contains($0.1) }
            }
            if Sys.monotonicNanos() - lastRenew > 60_000_000_000 {
                try admin.renewGC(holder: holder)
                lastRenew = Sys.monotonicNanos()
            }
            if delete && !candidates.isEmpty {
                // The lease still runs: every clone since the scan began was noted.
                try admin.renewGC(holder: holder)
                lastRenew = Sys.monotonicNanos()
            }
            for (o, _) in candidates {
                leakedCount += 1
                leakedBytes += o.size
                if leaked.count < 100 { leaked.append((o.key, o.size)) }
                if delete {
                    try store.delete(o.key)
                    deleted += 1
                    deletedCounts.blockBytes += Int64(Layout.parts(ofKey: o.key)?.length ?? 0)
                    deletedCounts.storedBytes += Int64(o.size)
                }
            }
            show("listed \(listed) objects, \(leakedCount) leaked...")
            guard let lastKey = page.last?.key, page.count == 1000 else { break }
            after = lastKey
        }
        if tty { printError("\r\u{1B}[K", newline: false) }
        if let counter = meta as? any StoredBytesAdmin {
            if try counter.storedCounts() == nil {
                // (Writers storing meanwhile are in the listing or not: off by what they stored.)
                try counter.setStored(
                    blockBytes: listedCounts.blockBytes - deletedCounts.blockBytes, storedBytes: listedCounts.storedBytes - deletedCounts.storedBytes)
            } else if deleted > 0 {
                try counter.addStored(blockBytes: -deletedCounts.blockBytes, storedBytes: -deletedCounts.storedBytes)
            }
        }
        let left = (blockBytes: listedCounts.blockBytes - deletedCounts.blockBytes, storedBytes: listedCounts.storedBytes - deletedCounts.storedBytes)
        print("bucket: \(storedText(left))")
        for l in leaked { print("\(delete ? "deleted" : "leaked") \(l.key) (\(humanBytes(UInt64(l.size))))") }
        if leakedCount > leaked.count { print("... and \(leakedCount - leaked.count) more") }
        let secs = (Double(Sys.monotonicNanos() - start) / 1e8).rounded() / 10
        printError(
            "stagefs: gc of volume '\(format.name)': \(scan.inodes) inodes and \(scan.slices) slice records read, \(listed) objects listed; \(leakedCount) leaked (\(humanBytes(UInt64(leakedBytes))))"
                + (delete ? ", \(deleted) deleted" : leakedCount > 0 ? "; run again with --delete to delete them" : "")
                + (kept > 0 ? "; \(kept) kept for clones made meanwhile" : "") + " in \(secs) s")
    }
}

/// The store's time now: the modification time it gives a probe object (this node's clock
/// when it gives none).
func storeNow(_ store: any ObjectStore, _ format: VolumeFormat) throws(FSError) -> Int64 {
    let key = "\(format.name)/meta/clock-probe-\(Sys.hostname())-\(getpid())"
    try store.put(key, bytes: [0])
    defer { try? store.delete(key) }
    let found = try store.list(prefix: key, limit: 1).first { $0.key == key }
    return found?.modified ?? Timespec.now().sec
}

extension GCCmd {
    /// `--compact`: every chunk of `--min-slices` records or more, merged (`Compactor`); then
    /// the slices it released deleted.
    func compactAll(_ meta: any MetadataEngine, _ format: VolumeFormat, _ store: any ObjectStore) throws {
        guard let admin = meta as? any CompactAdmin else { throw FSError(EOPNOTSUPP, "\(meta.displayName) cannot compact") }
        let data = DataStore(ledger: MetadataLedger(meta), store: store, format: format)
        defer {
            data.blocks.recordCounts { (c) throws(FSError) in try meta.recordStored(blockBytes: c.blockBytes, storedBytes: c.storedBytes) }
            data.shutdown()
        }
        let compactor = Compactor(admin: admin, meta: meta, data: data)
        var chunks = 0
        var before = 0
        var after = 0
        var changed = 0
        let start = Sys.monotonicNanos()
        try admin.fragmentedChunks(minRecords: minSlices) { (ino, index, _) throws(FSError) in
            if let (b, a) = try compactor.compact(ino, index) {
                chunks += 1
                before += b
                after += a
            } else {
                changed += 1
            }
            if isatty(2) != 0 { printError("\rstagefs: compacted \(chunks) chunks...", newline: false) }
        }
        if isatty(2) != 0 { printError("\r\u{1B}[K", newline: false) }
        var objects = 0
        _ = try meta.collectDeleted(.slices, limit: 100_000, seconds: 600) { objects += data.deleteObjects($0) }
        let secs = (Double(Sys.monotonicNanos() - start) / 1e8).rounded() / 10
        printError(
            "stagefs: compacted \(chunks) chunk(s) of volume '\(format.name)': \(before) slice records into \(after), \(objects) old object(s) deleted in \(secs) s"
                + (changed > 0 ? "; \(changed) chunk(s) changed meanwhile were left" : ""))
    }
}
