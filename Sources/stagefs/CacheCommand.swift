import ArgumentParser
import DataPath
import StageFSCore

#if canImport(Glibc)
    import Glibc
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
            else is reported and never followed. Every step inside a user's
            directory runs in a child that has switched to that user's uid and gid
            (no groups). Run by a user, gc works on that user's cache only (2, 3).

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
        var skipped: [String] = []
        if me == 0 {
            (users, skipped) = userDirectories()
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
        for uid in users {
            var r: GCUserReport
            do {
                r = try userStep(uid, "inspect")
            } catch {
                print("stagefs: \(userName(uid)): \(error.message)")
                failed = true
                continue
            }
            if !active.contains(uid) && r.lastUse + Int64(olderThan.seconds) <= now {
                do {
                    let p = try userStep(uid, "purge")
                    r.purged = true
                    r.freed += p.freed
                    r.freedBlocks += p.freedBlocks
                    r.logs += p.logs
                    r.pinned = 0
                    if !dryRun { removeEmptyUserDirs(uid) }
                } catch {
                    print("stagefs: \(userName(uid)): \(error.message)")
                    failed = true
                }
            }
            reports[uid] = r
            totalFreed += r.freed
        }
        // Least recently used unpinned blocks of the users whose cache stays, to the target.
        var need = 0
        if freeSpaceRatio != nil || target != nil {
            need = bytesToFree() - (dryRun ? totalFreed : 0)
        }
        if need > 0 {
            var buckets: [Int64: Int] = [:]
            for r in reports.values where !r.purged { for (t, b) in r.buckets { buckets[t, default: 0] += b } }
            var sum = 0
            var cutoff: Int64?
            for t in buckets.keys.sorted() {
                sum += buckets[t]!
                if sum >= need {
                    cutoff = t + CacheGC.bucket
                    break
                }
            }
            let until = cutoff ?? Int64.max
            for uid in users {
                guard var r = reports[uid], !r.purged else { continue }
                let mine = r.buckets.filter { $0.0 < until }.reduce(0) { $0 + $1.1 }
                if mine == 0 { continue }
                do {
                    let e = try userStep(uid, "evict", before: until, limit: mine)
                    r.freed += e.freed
                    r.freedBlocks += e.freedBlocks
                    totalFreed += e.freed
                    reports[uid] = r
                } catch {
                    print("stagefs: \(userName(uid)): \(error.message)")
                    failed = true
                }
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
                parts.append("kept \(humanBytes(UInt64(r.pinned))) pinned by job(s) \(r.jobs.joined(separator: ", "))")
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

    // MARK: root's side

    /// Numeric entries of the cache root(s) and the log root that are real directories owned by
    /// the uid they are named after; the others, described, to report.
    private func userDirectories() -> ([uid_t], [String]) {
        var users: Set<uid_t> = []
        var skipped: [String] = []
        for root in Set(roots + [logRoot]) {
            let fd = Glibc.open(root, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
            if fd < 0 {
                skipped.append("\(root): \(String(cString: strerror(errno)))")
                continue
            }
            defer { close(fd) }
            for name in SafeDir.names(fd) {
                guard let uid = uid_t(name), String(uid) == name else { continue }
                var st = Glibc.stat()
                guard fstatat(fd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 else { continue }
                if st.st_mode & S_IFMT != S_IFDIR || st.st_uid != uid {
                    skipped.append("\(root)/\(name): a symbolic link or not a directory owned by uid \(uid) (not followed)")
                    continue
                }
                users.insert(uid)
            }
        }
        return (users.sorted(), skipped)
    }

    /// Runs a step for `uid`: in a child that became the user (root), or here (the user itself).
    private func userStep(_ uid: uid_t, _ step: String, before: Int64 = 0, limit: Int = 0) throws(FSError) -> GCUserReport {
        var args = ["cache", "gc", "--step", step, "--cache-dir", roots.joined(separator: ":"), "--log-dir", logRoot]
        args += ["--keep-logs", "\(keepLogs.seconds)", "--before", "\(before)", "--limit", "\(limit)"]
        if dryRun { args.append("--dry-run") }
        if getuid() != 0 {
            return try CacheGC.perform(step, roots: roots, logRoot: logRoot, keepLogs: keepLogs.seconds, before: before, limit: limit, dryRun: dryRun)
        }
        args += ["--as-uid", "\(uid)", "--as-gid", "\(groupFor(uid))"]
        let (rc, out) = try Spawn.run(selfExecutable(), args, env: ["PATH=/usr/bin:/bin", "HOME=/"])
        let lines = out.split(separator: "\n").map(String.init)
        if rc != 0 {
            let why = lines.filter { $0.hasPrefix("stagefs: ") }.map { String($0.dropFirst(9)) }.joined(separator: "; ")
            throw FSError(EIO, "the \(step) step (as uid \(uid)) failed: \(why.isEmpty ? "exit status \(rc)" : why)")
        }
        return GCUserReport(lines: lines)
    }

    /// The gid a child for `uid` takes: the user's own group, or for a user no longer in the
    /// password database, the group of their directory unless it is root's (then nogroup).
    private func groupFor(_ uid: uid_t) -> gid_t {
        if let pw = getpwuid(uid) { return pw.pointee.pw_gid }
        var st = Glibc.stat()
        if lstat("\(roots[0])/\(uid)", &st) == 0 && st.st_gid != 0 { return st.st_gid }
        return 65534
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
        print(r.lines.joined(separator: "\n"))
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
                r.jobs = try cache.jobs().map { $0.0 }
                r.lastUse = try cache.lastUse()
                r.buckets = try cache.unpinnedByLastUse(bucket: CacheGC.bucket)
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

/// What a per-user step found or did, as lines `gc KEY VALUE` between root and its child.
struct GCUserReport {
    var bytes = 0
    var pinned = 0
    var jobs: [String] = []
    var lastUse: Int64 = 0
    var buckets: [(Int64, Int)] = []
    var freed = 0
    var freedBlocks = 0
    var logs = 0
    var purged = false

    init() {}

    init(lines: [String]) {
        for line in lines {
            let f = line.split(separator: " ").map(String.init)
            guard f.count >= 3, f[0] == "gc" else { continue }
            switch f[1] {
            case "bytes": bytes = Int(f[2]) ?? 0
            case "pinned": pinned = Int(f[2]) ?? 0
            case "jobs": jobs = f[2].split(separator: ",").map(String.init)
            case "lastuse": lastUse = Int64(f[2]) ?? 0
            case "bucket": if f.count >= 4, let t = Int64(f[2]), let b = Int(f[3]) { buckets.append((t, b)) }
            case "freed": freed = Int(f[2]) ?? 0
            case "freedblocks": freedBlocks = Int(f[2]) ?? 0
            case "logs": logs = Int(f[2]) ?? 0
            default: break
            }
        }
    }

    var lines: [String] {
        var out = [
            "gc bytes \(bytes)", "gc pinned \(pinned)", "gc lastuse \(lastUse)", "gc freed \(freed)", "gc freedblocks \(freedBlocks)",
            "gc logs \(logs)",
        ]
        if !jobs.isEmpty { out.append("gc jobs \(jobs.joined(separator: ","))") }
        out += buckets.map { "gc bucket \($0.0) \($0.1)" }
        return out
    }
}
