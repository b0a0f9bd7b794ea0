import ArgumentParser
import DataPath
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif
#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// `stagefs cache ...`: the node's block cache as a whole.
struct Cache: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Work on this node's cache as a whole (gc).",
        subcommands: [CacheGC.self]
    )
}

/// Cleans up a node's cache root: caches of users long gone, least recently used blocks until
/// the file system has room, expired job logs. Root decides from the cache root's own listing
/// (never following an entry there) and does every per-user step in a child that has become
/// that user, so a link a user planted in `<cache root>/<uid>` leads only where that user could
/// go anyway.
struct CacheGC: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "gc",
        abstract: "Free this node's cache: caches of users gone for a while, least recently used blocks, expired job logs.",
        discussion: """
            Run as root on a node (cron, a systemd timer, or by hand) over the cache
            root the Slurm hooks and users' mounts share (<cache-dir>/<uid>/ per user):
              1. a user with no process and no StageFS mount on this node, whose
                 blocks were all last used longer ago than --older-than: that
                 user's cache is removed (job logs follow --keep-logs);
              2. with --free-space-ratio or --target: unpinned blocks of all users,
                 least recently used first (to the minute, across users), are
                 evicted until that much of the cache file system is free;
              3. logs of jobs that ended more than --keep-logs ago (reports, mount
                 and epilog logs in <log-dir>/<uid>/jobs/<job>/) are removed.
            Blocks pinned for a job are never evicted while their user has a
            process on the node (a running job always has one); the job's epilog
            releases them.

            Root reads only the cache root's own listing and takes an entry only
            when it is a real directory owned by the uid it is named after; anything
            else is reported and never followed. gc never enters another file
            system: a user whose <cache-dir>/<uid> is, or holds, a mount point (in
            /proc/self/mountinfo, or an entry on another mount or device) is skipped
            with a line saying so, before root touches it. Every step inside a
            user's directory runs in a child that has switched to that user's uid
            and gid (no groups), 4 users at a time; a child still running after
            --user-timeout is killed and its user skipped with a line saying so,
            so that no user's directory can hold up the others for longer. Run by
            a user, gc works on that user's cache only (2, 3).

            The children report in a structured form that root bounds: byte counts
            no larger than the cache file systems, what a step freed no more than
            it was asked for or found, job ids as everywhere (1 to 64 characters of
            0-9 A-Z a-z . _ -; a pin with any other name in an index is counted,
            never shown). Eviction across users follows their reports of when
            their blocks were last used; when the file system is still short of
            the target afterwards (as root measures it), every remaining user is
            asked for an equal share, so a report cannot spare the others.

            It prints what it freed per user and what it kept pinned; --dry-run
            prints what it would do and changes nothing. Exit status 0, 1 when a
            step failed (the message says which), 2 for a usage error.

            Examples:
              stagefs cache gc --cache-dir /local/stagefs/cache --older-than 7d
              stagefs cache gc --free-space-ratio 0.3 --dry-run
            """
    )

    @Option(help: "The cache root(s), colon-separated as for mount (default $STAGEFS_CACHE_ROOT, else /var/cache/stagefs for root).")
    var cacheDir: String?

    @Option(help: "The root of the job logs when the hooks keep them elsewhere (the plugin's log_root=; default: the cache root).")
    var logDir: String?

    @Option(help: "Remove the cache of a user with no process or mount on this node whose blocks were last used longer ago (7d, 12h, 90m).")
    var olderThan = DurationArg(seconds: 7 * 86400)

    @Option(help: "Evict least recently used unpinned blocks until this fraction of the cache file system is free (0 to below 1).")
    var freeSpaceRatio: Double?

    @Option(help: "Evict least recently used unpinned blocks until this much of the cache file system is free (500G, 20T, bytes).")
    var target: SizeArg?

    @Option(help: "Remove job logs of jobs that ended longer ago (the hooks' keep_logs=).")
    var keepLogs = DurationArg(seconds: 7 * 86400)

    @Flag(help: "Say what would be freed; change nothing.")
    var dryRun = false

    @Option(help: "How long each per-user step may take (5m, 90s); then it is killed and the user skipped.")
    var userTimeout = DurationArg(seconds: 300)

    // The per-user steps, run by root's child after it became the user.
    @Option(help: .hidden) var step: String?
    @Option(help: .hidden) var asUID: UInt32?
    @Option(help: .hidden) var asGID: UInt32?
    @Option(help: .hidden) var before: Int64 = 0
    @Option(help: .hidden) var limit: Int = 0

    func validate() throws {
        if let r = freeSpaceRatio, r < 0 || r >= 1 { throw ValidationError("--free-space-ratio must be from 0 to below 1") }
        if let d = cacheDir, d.split(separator: ":").contains(where: { !$0.hasPrefix("/") }) {
            throw ValidationError("--cache-dir takes absolute directories, colon-separated")
        }
        if let d = logDir, !d.hasPrefix("/") { throw ValidationError("--log-dir takes an absolute directory") }
        if let s = step, !["inspect", "purge", "evict"].contains(s) { throw ValidationError("unknown step '\(s)'") }
        if userTimeout.seconds <= 0 { throw ValidationError("--user-timeout must be positive") }
    }

    private var roots: [String] { cacheDirectories(cacheDir) }
    private var logRoot: String { logDir ?? roots[0] }

    func run() throws {
        if let step {
            try runStep(step)
            return
        }
        let me = getuid()
        var users: [uid_t] = []
        var gids: [uid_t: gid_t] = [:]
        var skipped: [String] = []
        if me == 0 {
            (gids, skipped) = userDirectories()
            users = gids.keys.sorted()
        } else {
            users = [me]
        }
        skipped.forEach { print("stagefs: skipped \($0)") }
        // Who may be using the cache now: a process or a StageFS mount of the user.
        let active = me == 0 ? MountTable.stagefsUsers().union(processOwners()) : [me]
        let now = Timespec.now().sec
        let would = dryRun ? "would free" : "freed"
        var failed = false
        var reports: [uid_t: GCUserReport] = [:]
        var totalFreed = 0
        let bounds = GCBounds(fileSystems: fileSystemBytes(), now: now)

        // Inspect every user, then purge the caches of users gone for long enough: several
        // users at a time, each step with its deadline.
        var stepOf: [uid_t: String] = [:]
        runSteps(users.map { ($0, "inspect", 0, 0) }, gids: gids) { uid, result in
            let step = stepOf[uid] ?? "inspect"
            guard case .success(var r) = result else {
                if case .failure(let why) = result { print("stagefs: \(userName(uid)): skipped: \(why.text)") }
                failed = true
                return nil
            }
            if step == "inspect" {
                if let why = bounds.problem(inspect: &r) {
                    print("stagefs: \(userName(uid)): skipped: its inspect step reported \(why)")
                    failed = true
                    return nil
                }
                reports[uid] = r
                if !active.contains(uid) && r.lastUse + Int64(olderThan.seconds) <= now {
                    stepOf[uid] = "purge"
                    return (uid, "purge", 0, 0)
                }
                return nil
            }
            // The purge: it frees at most what the inspection found.
            guard var mine = reports[uid] else { return nil }
            if let why = bounds.problem(freed: &r, atMost: mine.bytes) {
                print("stagefs: \(userName(uid)): its purge step reported \(why)")
                failed = true
                return nil
            }
            mine.purged = true
            mine.freed = r.freed
            mine.freedBlocks = r.freedBlocks
            mine.logs = max(mine.logs, r.logs)
            mine.pinned = 0
            reports[uid] = mine
            if !dryRun { removeEmptyUserDirs(uid) }
            return nil
        }
        totalFreed = reports.values.reduce(0) { GCBounds.add($0, $1.freed) }

        // Least recently used unpinned blocks of the users whose cache stays, to the target.
        var need = 0
        if freeSpaceRatio != nil || target != nil {
            need = bytesToFree() - (dryRun ? totalFreed : 0)
        }
        if need > 0 {
            var buckets: [Int64: Int] = [:]
            for r in reports.values where !r.purged {
                for b in r.buckets { buckets[b.since, default: 0] = GCBounds.add(buckets[b.since, default: 0], b.bytes) }
            }
            var sum = 0
            var cutoff: Int64?
            for t in buckets.keys.sorted() {
                sum = GCBounds.add(sum, buckets[t]!)
                if sum >= need {
                    cutoff = t + CacheGC.bucket
                    break
                }
            }
            let until = cutoff ?? Int64.max
            var asks: [(uid_t, String, Int64, Int)] = []
            for uid in users {
                guard let r = reports[uid], !r.purged else { continue }
                let mine = r.buckets.filter { $0.since < until }.reduce(0) { GCBounds.add($0, $1.bytes) }
                if mine > 0 { asks.append((uid, "evict", until, mine)) }
            }
            failed = evictRound(asks, gids: gids, bounds: bounds, reports: &reports, totalFreed: &totalFreed) || failed
            // The reports said when each user's blocks were last used; root checks the result
            // on the file system itself. Still short: an equal share from every user whose
            // cache stays, until the file system stops gaining (at most three rounds).
            var short = dryRun ? 0 : bytesToFree()
            var rounds = 0
            while short > 0 && rounds < 3 {
                rounds += 1
                let staying = users.filter { reports[$0].map { !$0.purged } ?? false }
                if staying.isEmpty { break }
                let share = short / staying.count + 1
                failed =
                    evictRound(
                        staying.map { ($0, "evict", Int64.max, share) }, gids: gids, bounds: bounds, reports: &reports, totalFreed: &totalFreed)
                    || failed
                let after = bytesToFree()
                if after >= short { break }
                short = after
            }
        }
        for uid in users {
            guard let r = reports[uid] else { continue }
            var parts: [String] = []
            if r.purged {
                let last = r.lastUse == 0 ? "no block in it" : "last used \(ago(now - r.lastUse)) ago"
                parts.append(
                    "no process or mount on this node and \(last): \(dryRun ? "would remove" : "removed") its cache, \(would) \(humanBytes(UInt64(r.freed)))"
                )
            } else if r.freed > 0 {
                parts.append("\(would) \(humanBytes(UInt64(r.freed))) (\(r.freedBlocks) least recently used block(s))")
            } else {
                parts.append("nothing to free")
            }
            if r.pinned > 0 {
                var jobs = r.jobs.prefix(20).joined(separator: ", ")
                if r.jobs.count > 20 { jobs += " and \(r.jobs.count - 20) more" }
                if r.invalidJobs > 0 { jobs += "\(jobs.isEmpty ? "" : " and ")\(r.invalidJobs) pin name(s) that are not job ids (not shown)" }
                parts.append("kept \(humanBytes(UInt64(r.pinned))) pinned by job(s) \(jobs)")
            }
            if r.logs > 0 {
                parts.append(
                    "\(dryRun ? "would remove" : "removed") the logs of \(r.logs) job(s) ended over \(Setting.durationText(keepLogs.seconds)) ago")
            }
            print("\(userName(uid)): \(parts.joined(separator: "; "))")
        }
        var summary = "\(dryRun ? "would free" : "freed") \(humanBytes(UInt64(totalFreed))) in all"
        if let (free, size) = freeSpace(roots[0]) {
            let pct = Double(Int(Double(free) / Double(max(size, 1)) * 1000)) / 10
            summary += "; \(roots[0]) has \(humanBytes(UInt64(free))) free (\(pct)%)"
            if !dryRun, freeSpaceRatio != nil || target != nil, bytesToFree() > 0 {
                summary += ", short of the target: the rest is pinned by running jobs, used by other files, or in packs still being written"
            }
        }
        print(summary)
        if failed { throw ExitCode(1) }
    }

    /// Buckets of last use, in seconds: eviction across users is least-recently-used to the minute.
    static let bucket: Int64 = 60

    /// Users' steps run at the same time (each in its own child).
    static let parallelUsers = 4

    /// Bytes of a step's report read at most (a report is a few hundred KiB at most).
    static let reportLimit = 1 << 20

    /// One round of evictions (`asks`: uid, step, before, limit); adds what each freed (at most
    /// what it was asked) to its report. Returns whether a step failed.
    private func evictRound(
        _ asks: [(uid_t, String, Int64, Int)], gids: [uid_t: gid_t], bounds: GCBounds, reports: inout [uid_t: GCUserReport], totalFreed: inout Int
    ) -> Bool {
        var failed = false
        var limits: [uid_t: Int] = [:]
        for a in asks { limits[a.0] = a.3 }
        var got = reports
        var total = totalFreed
        runSteps(asks, gids: gids) { uid, result in
            switch result {
            case .failure(let why):
                print("stagefs: \(userName(uid)): skipped: \(why.text)")
                failed = true
            case .success(var e):
                if let why = bounds.problem(freed: &e, atMost: limits[uid] ?? 0) {
                    print("stagefs: \(userName(uid)): its evict step reported \(why)")
                    failed = true
                } else if var r = got[uid] {
                    r.freed = GCBounds.add(r.freed, e.freed)
                    r.freedBlocks = GCBounds.add(r.freedBlocks, e.freedBlocks)
                    total = GCBounds.add(total, e.freed)
                    got[uid] = r
                }
            }
            return nil
        }
        reports = got
        totalFreed = total
        return failed
    }

    // MARK: root's side

    /// Numeric entries of the cache root(s) and the log root that are real directories owned by
    /// the uid they are named after, on the root's own mount, with their gid; the others,
    /// described, to report. Nothing here enters another file system or waits on one: mount
    /// points are known from /proc/self/mountinfo before any entry is looked at, and an entry is
    /// opened with `O_PATH` (no call into its file system) and checked to be on the root's own
    /// mount (its `mnt_id` in /proc/self/fdinfo) before `fstat` asks about it. A user with a
    /// mount point at or below `<root>/<uid>` in any root is skipped as a whole.
    private func userDirectories() -> ([uid_t: gid_t], [String]) {
        var users: [uid_t: gid_t] = [:]
        var excluded: Set<uid_t> = []
        var skipped: [String] = []
        let mounts = MountTable.all().map(\.mountPoint)
        for root in Set(roots + [logRoot]).sorted() {
            let fd = Glibc.open(root, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
            if fd < 0 {
                skipped.append("\(root): \(String(cString: strerror(errno)))")
                continue
            }
            defer { close(fd) }
            var rst = Glibc.stat()
            guard fstat(fd, &rst) == 0, let rootMount = CacheGC.mountID(fd) else {
                skipped.append("\(root): cannot tell its mount")
                continue
            }
            // Mount points below the root, by the user directory they are in.
            let canonical = absolutePath(root)
            let prefix = canonical == "/" ? "/" : canonical + "/"
            var mounted: [String: String] = [:]
            for m in mounts where m.hasPrefix(prefix) {
                let first = String(m.dropFirst(prefix.count).split(separator: "/").first ?? "")
                if mounted[first] == nil { mounted[first] = m }
            }
            for name in SafeDir.names(fd) {
                guard let uid = uid_t(name), String(uid) == name else { continue }
                if let m = mounted[name] {
                    // The mount point's path is the user's choice: shown escaped (one line, bounded).
                    skipped.append(
                        "\(root)/\(name): a file system is mounted at \(GCUserReport.printable(m, max: 300)) (gc never enters another file system)")
                    excluded.insert(uid)
                    continue
                }
                let e = openat(fd, name, Sys.O_PATH | O_NOFOLLOW | O_CLOEXEC)
                if e < 0 { continue }
                defer { close(e) }
                guard CacheGC.mountID(e) == rootMount else {
                    skipped.append("\(root)/\(name): a mount point (gc never enters another file system)")
                    excluded.insert(uid)
                    continue
                }
                var st = Glibc.stat()
                guard fstat(e, &st) == 0 else { continue }
                if st.st_mode & S_IFMT != S_IFDIR || st.st_uid != uid {
                    skipped.append("\(root)/\(name): a symbolic link or not a directory owned by uid \(uid) (not followed)")
                    continue
                }
                if st.st_dev != rst.st_dev {
                    skipped.append("\(root)/\(name): on another device (gc never enters another file system)")
                    excluded.insert(uid)
                    continue
                }
                // The gid a child for `uid` takes: the user's own group, or for a user no longer in the
                // password database, the group of their directory unless it is root's (then nogroup).
                if users[uid] == nil {
                    users[uid] = getpwuid(uid).map { $0.pointee.pw_gid } ?? (st.st_gid != 0 ? st.st_gid : 65534)
                }
            }
        }
        for uid in excluded { users[uid] = nil }
        return (users, skipped)
    }

    /// The mount id of an open descriptor (`mnt_id:` in /proc/self/fdinfo): asks nothing of the
    /// file system the descriptor is on.
    static func mountID(_ fd: Int32) -> Int? {
        guard let bytes = Sys.readFile("/proc/self/fdinfo/\(fd)") else { return nil }
        for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") where line.hasPrefix("mnt_id:") {
            return Int(String(line.dropFirst(7)).trimmed)
        }
        return nil
    }

    /// Runs per-user steps (uid, step, before, limit): in children that became the users, several
    /// at a time, each killed after --user-timeout (root); or here, one by one (a user's own gc).
    /// `then` gets each step's bounded report, or why there is none, and may return the user's
    /// next step.
    private func runSteps(
        _ steps: [(uid_t, String, Int64, Int)], gids: [uid_t: gid_t],
        then: (uid_t, Result<GCUserReport, GCStepFailure>) -> (uid_t, String, Int64, Int)?
    ) {
        if getuid() != 0 {
            var queue = steps
            while !queue.isEmpty {
                let (uid, step, before, limit) = queue.removeFirst()
                let result: Result<GCUserReport, GCStepFailure>
                do {
                    result = .success(
                        try CacheGC.perform(
                            step, roots: roots, logRoot: logRoot, keepLogs: keepLogs.seconds, before: before, limit: limit, dryRun: dryRun))
                } catch {
                    result = .failure(GCStepFailure("the \(step) step failed: \(error.message)"))
                }
                if let n = then(uid, result) { queue.insert(n, at: 0) }
            }
            return
        }
        func command(_ s: (uid_t, String, Int64, Int)) -> Spawn.Command {
            var args = ["cache", "gc", "--step", s.1, "--cache-dir", roots.joined(separator: ":"), "--log-dir", logRoot]
            args += ["--keep-logs", "\(keepLogs.seconds)", "--before", "\(s.2)", "--limit", "\(s.3)"]
            if dryRun { args.append("--dry-run") }
            args += ["--as-uid", "\(s.0)", "--as-gid", "\(gids[s.0] ?? 65534)"]
            return Spawn.Command(selfExecutable(), args, env: ["PATH=/usr/bin:/bin", "HOME=/"])
        }
        var current = steps
        Spawn.runMany(
            steps.map { command($0) }, parallel: CacheGC.parallelUsers, timeout: Double(userTimeout.seconds), outputLimit: CacheGC.reportLimit,
            separateErrors: true
        ) { i, outcome in
            let (uid, step, _, _) = current[i]
            guard let n = then(uid, GCUserReport.from(outcome, step: step, timeout: userTimeout.seconds)) else { return nil }
            current[i] = n
            return command(n)
        }
    }

    /// Removes `<root>/<uid>` entries the purge emptied (through the root's descriptor; a
    /// directory that is not empty stays).
    private func removeEmptyUserDirs(_ uid: uid_t) {
        for root in Set(roots + [logRoot]) {
            let fd = Glibc.open(root, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
            if fd < 0 { continue }
            _ = unlinkat(fd, "\(uid)", AT_REMOVEDIR)
            close(fd)
        }
    }

    /// Users with a process on this node.
    private func processOwners() -> Set<uid_t> {
        guard let d = opendir("/proc") else { return [] }
        defer { closedir(d) }
        var out: Set<uid_t> = []
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            guard pid_t(name) != nil, let st = Sys.stat("/proc/\(name)") else { continue }
            out.insert(st.st_uid)
        }
        return out
    }

    /// The sizes of the cache roots' file systems, added up (each file system once).
    private func fileSystemBytes() -> Int {
        var seen: Set<UInt> = []
        var total = 0
        for root in roots {
            var s = statvfs()
            guard statvfs(root, &s) == 0, seen.insert(UInt(s.f_fsid)).inserted else { continue }
            total = GCBounds.add(total, Int(s.f_blocks) * Int(s.f_frsize))
        }
        return total
    }

    /// Bytes to free so that every cache root's file system reaches the target.
    private func bytesToFree() -> Int {
        var need = 0
        for root in roots {
            guard let (free, size) = freeSpace(root) else { continue }
            var want = 0
            if let r = freeSpaceRatio { want = Int(Double(size) * r) }
            if let t = target { want = max(want, t.bytes) }
            need = max(need, want - free)
        }
        return need
    }

    private func freeSpace(_ path: String) -> (free: Int, size: Int)? {
        var s = statvfs()
        guard statvfs(path, &s) == 0 else { return nil }
        return (Int(s.f_bavail) * Int(s.f_frsize), Int(s.f_blocks) * Int(s.f_frsize))
    }

    private func userName(_ uid: uid_t) -> String {
        if let pw = getpwuid(uid) { return "uid \(uid) (\(String(cString: pw.pointee.pw_name)))" }
        return "uid \(uid) (no passwd entry)"
    }

    private func ago(_ secs: Int64) -> String {
        if secs >= 86400 { return "\(secs / 86400) day(s)" }
        if secs >= 3600 { return "\(secs / 3600) hour(s)" }
        return "\(max(secs, 0) / 60) minute(s)"
    }

    // MARK: the user's side

    /// The child's work: become the user named by --as-uid (root only; groups dropped), then
    /// perform the step and print its report lines.
    private func runStep(_ step: String) throws {
        if let uid = asUID {
            guard getuid() == 0 else { throw FSError.usage("--as-uid needs root") }
            let gid = asGID ?? 65534
            if setgroups(0, nil) != 0 { throw FSError.errno(errno, "cannot drop the groups") }
            if setgid(gid) != 0 { throw FSError.errno(errno, "cannot switch to gid \(gid)") }
            if setuid(uid) != 0 { throw FSError.errno(errno, "cannot switch to uid \(uid)") }
            if uid != 0 && setuid(0) == 0 { throw FSError(EPERM, "could switch back to root after becoming uid \(uid)") }
        }
        let r = try CacheGC.perform(step, roots: roots, logRoot: logRoot, keepLogs: keepLogs.seconds, before: before, limit: limit, dryRun: dryRun)
        // The report is the only thing on standard output (messages go to standard error).
        print(r.json)
    }

    /// One step in the caller's own `<root>/<uid>`: inspect (usage, pins, last use, unpinned
    /// bytes by last use; expired job logs), purge (everything but the job logs; job logs of
    /// jobs never marked ended count from their last change), evict (unpinned blocks used
    /// before `before`, least recently used first, up to `limit` bytes).
    static func perform(
        _ step: String, roots: [String], logRoot: String, keepLogs: Int, before: Int64, limit: Int, dryRun: Bool
    ) throws(FSError) -> GCUserReport {
        let uid = getuid()
        var r = GCUserReport()
        let userDir = "\(roots[0])/\(uid)"
        // Never into another file system: a mount at or below one of this user's directories
        // stops the step before anything there is touched.
        let mounts = MountTable.all().map(\.mountPoint)
        for dir in Set(roots.map { "\($0)/\(uid)" } + ["\(logRoot)/\(uid)"]) {
            let canonical = absolutePath(Sys.dirname(of: dir)) + "/\(uid)"
            if let m = mounts.first(where: { $0 == canonical || $0.hasPrefix(canonical + "/") }) {
                throw FSError(EXDEV, "a file system is mounted at \(m), inside \(dir): gc never enters another file system")
            }
        }
        var cache: DiskCache?
        if Sys.stat("\(userDir)/index.db") != nil {
            cache = try DiskCache(config: DiskCacheConfig(dirs: roots, capacity: Int.max >> 1), volumeUUID: nil)
        }
        switch step {
        case "inspect":
            if let cache {
                let u = try cache.usage()
                r.bytes = u.bytes
                r.pinned = u.pinnedBytes
                let (jobs, invalid) = try cache.jobs()
                r.jobs = jobs.prefix(GCBounds.maxJobs).map { $0.0 }
                r.invalidJobs = invalid
                r.lastUse = try cache.lastUse()
                // At most maxBuckets buckets: the newest ones beyond go into the last.
                var buckets = try cache.unpinnedByLastUse(bucket: CacheGC.bucket).map { GCUserReport.Bucket(since: $0.since, bytes: $0.bytes) }
                if buckets.count > GCBounds.maxBuckets {
                    let rest = buckets[(GCBounds.maxBuckets - 1)...].reduce(0) { GCBounds.add($0, $1.bytes) }
                    buckets =
                        Array(buckets.prefix(GCBounds.maxBuckets - 1)) + [
                            GCUserReport.Bucket(since: buckets[GCBounds.maxBuckets - 1].since, bytes: rest)
                        ]
                }
                r.buckets = buckets
            }
            r.logs = JobLogs.expire(jobsDir: "\(logRoot)/\(uid)/jobs", keep: keepLogs, dryRun: dryRun).count
        case "purge":
            if let cache {
                let u = try cache.usage()
                r.freed = u.bytes
                r.freedBlocks = u.blocks
            }
            cache = nil  // closes the index before it is removed
            if !dryRun {
                for root in roots {
                    let fd = Glibc.open("\(root)/\(uid)", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
                    if fd < 0 { continue }
                    defer { close(fd) }
                    for name in SafeDir.names(fd) where !(root == logRoot && name == "jobs") {
                        try SafeDir.removeTree(in: fd, name, path: "\(root)/\(uid)/\(name)")
                    }
                }
            }
            r.logs = JobLogs.expire(jobsDir: "\(logRoot)/\(uid)/jobs", keep: keepLogs, unmarked: true, dryRun: dryRun).count
            if !dryRun {
                // An emptied jobs directory goes too, so that root can remove <root>/<uid>.
                _ = rmdir("\(logRoot)/\(uid)/jobs")
            }
        default:
            if let cache {
                let e = try cache.evict(usedBefore: before, limit: limit, dryRun: dryRun)
                r.freed = e.bytes
                r.freedBlocks = e.blocks
            }
        }
        return r
    }
}

/// Why a per-user step gave no report (shown to root's caller).
struct GCStepFailure: Error {
    let text: String
    init(_ text: String) { self.text = text }
}

/// What a per-user step found or did: one JSON object, the only thing the child writes on its
/// standard output. Root reads at most `CacheGC.reportLimit` bytes of it and bounds every field
/// (`GCBounds`) before using any: the child runs as the user, on the user's own index.
struct GCUserReport: Codable {
    struct Bucket: Codable {
        var since: Int64
        var bytes: Int
    }
    var bytes = 0
    var pinned = 0
    /// Valid job ids holding pins (at most `GCBounds.maxJobs`).
    var jobs: [String] = []
    /// Pins whose name is not a job id (an index its user edited): counted, never shown.
    var invalidJobs = 0
    var lastUse: Int64 = 0
    var buckets: [Bucket] = []
    var freed = 0
    var freedBlocks = 0
    var logs = 0
    var purged = false

    init() {}

    var json: String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        guard let data = try? encoder.encode(self) else { return "{}" }
        return String(decoding: data, as: UTF8.self)
    }

    /// The report in a child's outcome, or why there is none: killed at its deadline, failed
    /// (its `stagefs:` lines, escaped and bounded), or output that is not one report.
    static func from(_ o: Spawn.Outcome, step: String, timeout: Int) -> Result<GCUserReport, GCStepFailure> {
        if let f = o.failure { return .failure(GCStepFailure("cannot start its \(step) step: \(f.message)")) }
        guard let status = o.status else {
            return .failure(
                GCStepFailure(
                    "its \(step) step did not finish within \(Setting.durationText(timeout)) (--user-timeout): killed\(o.abandoned ? " (it had not exited 2 s later: left behind, not waited for)" : "")"
                ))
        }
        if status != 0 {
            let lines = String(decoding: o.errors, as: UTF8.self).split(separator: "\n").filter { $0.hasPrefix("stagefs: ") }.prefix(3)
            let why = lines.map { GCUserReport.printable(String($0.dropFirst(9)), max: 300) }.joined(separator: "; ")
            return .failure(GCStepFailure("its \(step) step failed: \(why.isEmpty ? "exit status \(status)" : why)"))
        }
        if o.overflowed { return .failure(GCStepFailure("its \(step) step wrote more than \(CacheGC.reportLimit) bytes: not a report")) }
        guard let r = try? JSONDecoder().decode(GCUserReport.self, from: Data(o.output)) else {
            return .failure(GCStepFailure("its \(step) step wrote no valid report"))
        }
        return .success(r)
    }

    /// `text` with control characters escaped, at most `max` characters of it.
    static func printable(_ text: String, max: Int) -> String {
        var out = ""
        for u in text.unicodeScalars.prefix(max) {
            if u.value < 32 || u.value == 127 { out += u.escaped(asASCII: true) } else { out.unicodeScalars.append(u) }
        }
        return text.unicodeScalars.count > max ? out + "..." : out
    }
}

/// The bounds root holds every number of a child's report to: byte counts within what the cache
/// file systems hold, what a step freed within what it was asked for or found, times within
/// the epoch and now, lists of bounded length, job ids valid.
struct GCBounds {
    /// Sum of the sizes of the cache roots' file systems (root's own statvfs).
    let fileSystems: Int
    let now: Int64

    static let maxJobs = 1000
    static let maxBuckets = 10080  // a week of minutes
    static let maxLogs = 10_000_000

    init(fileSystems: Int, now: Int64) {
        self.fileSystems = max(fileSystems, 0)
        self.now = now
    }

    /// Adds without overflow (saturating).
    static func add(_ a: Int, _ b: Int) -> Int {
        let (s, o) = a.addingReportingOverflow(b)
        return o ? Int.max : s
    }

    /// What is wrong with an inspection's report; nil when every field is within bounds (then
    /// its last use is at most now).
    func problem(inspect r: inout GCUserReport) -> String? {
        func within(_ v: Int, _ hi: Int) -> Bool { v >= 0 && v <= hi }
        if !within(r.bytes, fileSystems) { return "\(r.bytes) bytes in use, more than its file systems hold (\(fileSystems))" }
        // The counts come from separate queries of an index the user's mount may be changing:
        // each is bounded by the file systems, not by the others.
        if !within(r.pinned, fileSystems) { return "\(r.pinned) pinned bytes, more than its file systems hold (\(fileSystems))" }
        if r.freed != 0 || r.freedBlocks != 0 || r.purged { return "freeing bytes while only inspecting" }
        if !within(r.logs, GCBounds.maxLogs) { return "\(r.logs) expired job logs" }
        if r.jobs.count > GCBounds.maxJobs || !r.jobs.allSatisfy(JobID.isValid) { return "a job id that is not valid or too many jobs" }
        if !within(r.invalidJobs, Int.max) { return "a negative count" }
        if r.lastUse < 0 || r.lastUse > now + 86400 { return "a last use of \(r.lastUse)" }
        r.lastUse = min(r.lastUse, now)
        if r.buckets.count > GCBounds.maxBuckets { return "\(r.buckets.count) buckets of last use (at most \(GCBounds.maxBuckets))" }
        var sum = 0
        var previous = Int64.min
        for b in r.buckets {
            if b.since <= previous || b.since < 0 || b.since > now + 86400 || b.bytes < 0 {
                return "buckets of last use out of order or out of range"
            }
            previous = b.since
            sum = GCBounds.add(sum, b.bytes)
            if sum > fileSystems { return "more unpinned bytes by last use than its file systems hold (\(fileSystems))" }
        }
        return nil
    }

    /// What is wrong with the report of a step that frees (purge, evict); nil when its numbers
    /// are not negative, and then what it freed is taken as at most `atMost` bytes (what it was
    /// asked for, or what the inspection found, plus one block: eviction ends with the block
    /// that reaches its limit) and at most one block per byte.
    func problem(freed r: inout GCUserReport, atMost: Int) -> String? {
        if r.freed < 0 || r.freedBlocks < 0 || r.logs < 0 { return "a negative count" }
        r.freed = min(r.freed, GCBounds.add(atMost, GCBounds.maxBlock))
        r.freedBlocks = min(r.freedBlocks, r.freed)
        r.logs = min(r.logs, GCBounds.maxLogs)
        return nil
    }

    /// The most the last block an eviction takes can add past its limit: more than any block
    /// with its checksums (`format --block-size` allows at most 16 MiB).
    static let maxBlock = 65 << 20
}
