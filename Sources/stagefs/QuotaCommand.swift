import ArgumentParser
import Metadata
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// `stagefs quota set|get|list|delete|check`.
struct QuotaCmd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "quota",
        abstract: "Limit the space and inodes of a directory's tree, a user's files or a group's.",
        discussion: """
            A write that would take a quota past its limit fails with EDQUOT ("Disk quota
            exceeded") at the write() that crosses it; appends, truncates up, fallocate and
            renames into a quota directory count too, and nested quotas all apply. Usage counts
            file sizes in 4 KiB granules (as df does), the directory itself and everything below
            it, and deleted files while they wait in the trash (get says how much of it is trash).
            df in a quota directory (or on a --subdir mount of one) shows the quota.

            A hard link, or a rename of a file with several names, into another set of directory
            quotas fails with EXDEV (as with ext4 and XFS project quotas; mv then copies), and so
            does the rename of a non-empty directory without a quota of its own.

            SIZE has a unit: 512K, 10M or 10MiB, 2G, 1T (all binary: M is 2^20 bytes); a plain
            number is GiB, as in JuiceFS. 0 means no limit. --path is a directory of the volume,
            from its root (/team1), or a path in a mount of it on this node. Through a gateway URL
            anyone may get and list quotas; set, delete and check take the volume's META-URL.

            Examples:
              stagefs quota set redis://10.0.0.5:6379/1 --path /team1 --capacity 10T --inodes 50000000
              stagefs quota set redis://10.0.0.5:6379/1 --uid 1001 --capacity 500G
              stagefs quota get redis://10.0.0.5:6379/1 --path /team1
              stagefs quota list redis://10.0.0.5:6379/1
              stagefs quota check redis://10.0.0.5:6379/1 --repair
            """,
        subcommands: [Set.self, Get.self, List.self, Delete.self, Check.self]
    )

    struct Which: ParsableArguments {
        @Argument(help: "The volume's META-URL (default: STAGEFS_VOLUME).")
        var metaURL: String?

        @Option(help: "A directory: its tree's quota.")
        var path: String?
        @Option(help: "A user id: the quota of the files it owns.")
        var uid: UInt32?
        @Option(help: "A group id: the quota of the files of that group.")
        var gid: UInt32?

        var given: Int { (path == nil ? 0 : 1) + (uid == nil ? 0 : 1) + (gid == nil ? 0 : 1) }

        func requireOne() throws {
            if given != 1 { throw ValidationError("name one quota: --path DIR, --uid N or --gid N") }
        }
    }

    struct Set: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Set or change a quota's limits (a new one counts what exists first).")
        @OptionGroup var which: Which
        @Option(help: "Space limit, SIZE (10M, 2G, 1T; a plain number is GiB; 0: none).")
        var capacity: String?
        @Option(help: "Inode limit (0: none).")
        var inodes: UInt64?

        func validate() throws {
            try which.requireOne()
            if capacity == nil && inodes == nil { throw ValidationError("give --capacity SIZE, --inodes N or both") }
            if let c = capacity, parseSize(c) == nil { throw ValidationError("--capacity takes a size such as 10M, 2G or 1T (a plain number is GiB)") }
        }

        func run() throws {
            let v = try QuotaVolume(which)
            let target = try v.target(which)
            var limits = try v.admin.quota(target)?.limits ?? QuotaLimits()
            if let c = capacity { limits.capacity = parseSize(c)! }
            if let i = inodes { limits.inodes = i }
            let q = try v.admin.setQuota(target, limits)
            print(QuotaCmd.header)
            print(v.line(q))
        }
    }

    struct Get: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show a quota's limits and usage.")
        @OptionGroup var which: Which

        func validate() throws { try which.requireOne() }

        func run() throws {
            let v = try QuotaVolume(which)
            let target = try v.target(which)
            guard let q = try v.admin.quota(target) else { throw FSError(ENOENT, "there is no quota for \(v.describe(target))") }
            print(QuotaCmd.header)
            print(v.line(q))
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show every quota of the volume.")
        @OptionGroup var which: Which

        func validate() throws {
            if which.given > 0 { throw ValidationError("list shows every quota: give only the META-URL") }
        }

        func run() throws {
            let v = try QuotaVolume(which)
            let all = try v.admin.quotas()
            if all.isEmpty {
                print("the volume has no quotas")
                return
            }
            print(QuotaCmd.header)
            for q in all { print(v.line(q)) }
        }
    }

    struct Delete: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Remove a quota.")
        @OptionGroup var which: Which

        func validate() throws { try which.requireOne() }

        func run() throws {
            let v = try QuotaVolume(which)
            let target = try v.target(which)
            try v.admin.deleteQuota(target)
            print("removed the quota of \(v.describe(target))")
        }
    }

    struct Check: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Count what a quota covers and compare with its records; --repair fixes them.",
            discussion: """
                Walks the quota's directory tree (for a user or a group, the whole volume) in
                bounded steps. Exact when nothing changes the tree during the walk; what changes
                meanwhile is kept. Without --path, --uid or --gid: every quota.
                """)
        @OptionGroup var which: Which
        @Flag(help: "Set the records to what was counted.")
        var repair = false

        func validate() throws {
            if which.given > 1 { throw ValidationError("name at most one quota: --path DIR, --uid N or --gid N") }
        }

        func run() throws {
            let v = try QuotaVolume(which)
            let targets = which.given == 1 ? [try v.target(which)] : try v.admin.quotas().map(\.target)
            if targets.isEmpty { print("the volume has no quotas") }
            var drift = 0
            for t in targets {
                let tty = isatty(2) != 0
                let c = try v.admin.checkQuota(t, repair: repair) { seen in
                    if tty { printError("\r\(v.describe(t)): \(seen) inodes counted", newline: false) }
                }
                if tty { printError("") }
                let same = c.recorded.space == c.counted.space && c.recorded.inodes == c.counted.inodes
                    && c.recorded.trashSpace == c.counted.trashSpace && c.recorded.trashInodes == c.counted.trashInodes
                var text = "\(v.describe(t)): "
                if same {
                    text += "ok (\(humanBytes(c.counted.space)), \(c.counted.inodes) inodes)"
                } else {
                    drift += 1
                    text += "recorded \(humanBytes(c.recorded.space)) in \(c.recorded.inodes) inodes"
                    text += " (trash \(humanBytes(c.recorded.trashSpace)) in \(c.recorded.trashInodes))"
                    text += ", counted \(humanBytes(c.counted.space)) in \(c.counted.inodes) inodes"
                    text += " (trash \(humanBytes(c.counted.trashSpace)) in \(c.counted.trashInodes))"
                    text += repair ? ": repaired" : ": run with --repair to fix"
                }
                if c.homesFixed > 0 {
                    text += "; \(c.homesFixed) file(s) found away from their recorded directory\(repair ? " (fixed)" : "")"
                }
                print(text)
            }
            if drift > 0 && !repair { throw ExitCode(1) }
        }
    }

    static let header = "QUOTA                                  CAPACITY     USED          INODES       IUSED        TRASH"

}

/// Bytes in "10M", "10MiB", "2G", "1T", "512K", "4096B" (binary units: M is 2^20 bytes); a
/// plain number is GiB, as JuiceFS reads quota and volume capacities.
func parseSize(_ s: String) -> UInt64? {
    var t = s.uppercased()
    if t.hasSuffix("IB") { t.removeLast(2) }
    let units: [Character: UInt64] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50]
    var unit: UInt64 = 1 << 30
    if let last = t.last, let u = units[last] {
        unit = u
        t.removeLast()
    } else if t.hasSuffix("B") {
        unit = 1
        t.removeLast()
    }
    guard let n = UInt64(t) else { return nil }
    let (v, over) = n.multipliedReportingOverflow(by: unit)
    return over ? nil : v
}

/// The volume a quota command works on.
struct QuotaVolume {
    let meta: any MetadataEngine
    let admin: any QuotaAdmin

    init(_ which: QuotaCmd.Which) throws {
        guard let text = which.metaURL ?? defaultVolume() else {
            throw FSError.usage("name the volume: its META-URL, or STAGEFS_VOLUME")
        }
        meta = try openEngine(try metaURLArgument(text))
        _ = try meta.requireFormat()
        guard let a = meta as? any QuotaAdmin else { throw FSError(EOPNOTSUPP, "\(meta.displayName) keeps no quotas") }
        admin = a
    }

    func target(_ which: QuotaCmd.Which) throws -> QuotaTarget {
        if let uid = which.uid { return .user(uid) }
        if let gid = which.gid { return .group(gid) }
        guard let p = which.path else { throw FSError.usage("name one quota: --path DIR, --uid N or --gid N") }
        // A path in a mount of this node: its volume path (the mount's record knows a --subdir).
        var volumePath = p
        let abs = absolutePath(p)
        if let m = MountTable.containing(abs)?.mountPoint, m != "/" {
            let r = Runtime.load(m) ?? MountRecord(mountPoint: m, metaURL: "", pid: 0, volume: "")
            volumePath = r.volumePath(abs)
        } else if !p.hasPrefix("/") {
            throw FSError.usage("--path \(p): give the directory from the volume's root (/team1), or a path in a mount of it")
        }
        let (ino, a) = try lookupPath(meta, volumePath, .root, what: "--path \(p)")
        guard a.type == .directory else { throw FSError(ENOTDIR, "--path \(p) is not a directory") }
        if Trash.isTrash(ino) { throw FSError(EPERM, "--path \(p): the trash has no quotas") }
        return .dir(ino)
    }

    func describe(_ t: QuotaTarget) -> String {
        switch t {
        case .dir(let ino): "\(directoryPath(meta, ino).map(printable) ?? "(a directory that is gone)") (inode \(ino))"
        case .user(let uid): "uid \(uid)"
        case .group(let gid): "gid \(gid)"
        }
    }

    /// One row of the table (`QuotaCmd.header`).
    func line(_ q: QuotaInfo) -> String {
        func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s + " " : s + String(repeating: " ", count: n - s.count) }
        let cap = q.limits.capacity == 0 ? "-" : humanBytes(q.limits.capacity)
        let ino = q.limits.inodes == 0 ? "-" : "\(q.limits.inodes)"
        var used = humanBytes(q.usage.space)
        if q.limits.capacity > 0 { used += " \(min(999, q.usage.space * 100 / Int64(clamping: q.limits.capacity)))%" }
        let trash = "\(humanBytes(q.usage.trashSpace)) in \(q.usage.trashInodes)"
        return pad(describe(q.target), 39) + pad(cap, 13) + pad(used, 14) + pad(ino, 13) + pad("\(q.usage.inodes)", 13) + trash
    }
}
