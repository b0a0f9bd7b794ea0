import ArgumentParser
import Metadata
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// `stagefs trash list|restore|purge`.
struct TrashCmd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "trash",
        abstract: "List, restore or purge what the volume's trash holds (format --trash-days N keeps deleted files N days).",
        discussion: """
            A file whose last name goes (rm, or a rename over it) waits in /.trash/<YYYY-MM-DD-HH>/<uid>/
            at the volume's root (its owner may list and read it there), then is purged by one of
            the volume's clients once N days have passed. Only root restores or purges early.

            A PATH is an entry as seen under a mount's .trash (or a directory there: an hour's or
            an owner's); without one, list shows the whole trash (--meta names the volume, else
            STAGEFS_VOLUME).

            Examples:
              stagefs trash list --meta redis://10.0.0.5:6379/1
              stagefs trash restore /mnt/vol/.trash/2026-12-06-12/1000/57-results.csv
              stagefs trash restore --to /mnt/vol/recovered /mnt/vol/.trash/2026-12-06-12/1000
              stagefs trash purge --older-than 12h --meta redis://10.0.0.5:6379/1
            """,
        subcommands: [List.self, Restore.self, Purge.self]
    )

    struct Where: ParsableArguments {
        @Option(help: "The volume's META-URL (default: the mount the paths are in, or STAGEFS_VOLUME).")
        var meta: String?

        @Argument(help: "Entries under a mount's .trash, or directories there.")
        var paths: [String] = []
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List files in the trash: when deleted, owner, size, where from.")
        @OptionGroup var at: Where

        func run() throws {
            let v = try TrashVolume(at)
            var n = 0
            try v.each { e in
                n += 1
                let when = e.origin.map { timeText($0.deleted) } ?? "?"
                // (Names shown without their control characters: a name is anyone's choice.)
                print("\(when)  uid \(e.attr.uid)  \(humanBytes(e.attr.size))  \(printable(v.originPath(e)))  (inode \(e.ino))")
            }
            let (inodes, bytes) = try v.admin.trashUsage()
            print("\(n) file\(n == 1 ? "" : "s") listed; the trash holds \(inodes) file\(inodes == 1 ? "" : "s"), \(humanBytes(UInt64(bytes)))")
        }
    }

    struct Restore: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Put files of the trash back where they were (refusing to replace anything), or into --to DIR.")
        @OptionGroup var at: Where
        @Option(help: "A directory (in a mount of the volume) to restore into instead, keeping the names.")
        var to: String?

        func validate() throws {
            if at.paths.isEmpty { throw ValidationError("name the entries (or directories) of the trash to restore") }
        }

        func run() throws {
            let v = try TrashVolume(at)
            let dir = try to.map { (d) throws(FSError) -> Ino in try v.inode(of: d) }
            var failed = 0
            try v.each { e in
                do {
                    let (d, name) = try v.admin.restoreTrashed(processCredential(), e.ino, to: dir, ownerMayRestore: false)  // (a gateway lets owners)
                    print("restored \(printable(v.path(d, name)))")
                } catch {
                    failed += 1
                    printError("stagefs: \(printable(v.originPath(e))) (inode \(e.ino)): \((error as? FSError)?.message ?? "\(error)")")
                }
            }
            if failed > 0 { throw ExitCode(1) }
        }
    }

    struct Purge: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Delete files of the trash for good (root; through a gateway, each file's owner).")
        @OptionGroup var at: Where
        @Option(help: "Only files deleted longer ago than this (30m, 12h, 3d; a plain number is hours).")
        var olderThan: String?

        func validate() throws {
            if let o = olderThan, TrashCmd.seconds(o) == nil { throw ValidationError("--older-than takes a duration such as 30m, 12h or 3d") }
        }

        func run() throws {
            let v = try TrashVolume(at)
            let cutoff = olderThan.flatMap(TrashCmd.seconds).map { Timespec.now().sec - $0 }
            var n = 0
            try v.each { e in
                if let cutoff, (e.origin?.deleted ?? 0) > cutoff { return }
                _ = try v.admin.purgeTrashed(processCredential(), e.ino, ownerMayPurge: false)
                n += 1
            }
            try v.dropEmptyDirs()
            print("purged \(n) file\(n == 1 ? "" : "s")")
        }
    }

    /// Seconds in "30m", "12h", "3d", "90s" (a plain number: hours).
    static func seconds(_ s: String) -> Int64? {
        guard let last = s.last else { return nil }
        let units: [Character: Int64] = ["s": 1, "m": 60, "h": 3600, "d": 86400]
        if let u = units[last], let v = Int64(s.dropLast()), v >= 0 { return v * u }
        if let v = Int64(s), v >= 0 { return v * 3600 }
        return nil
    }
}

/// The volume a trash command works on, and the entries its paths name.
struct TrashVolume {
    let meta: any MetadataEngine
    let admin: any TrashAdmin
    /// Inodes the paths named (entries, or trash directories); empty: the whole trash.
    let named: [Ino]
    let mountPoint: String?

    init(_ at: TrashCmd.Where) throws {
        // The mount the paths are in (all in one), and the volume: --meta, that mount's, or
        // STAGEFS_VOLUME.
        var mount: String?
        for p in at.paths {
            guard let m = MountTable.containing(absolutePath(p))?.mountPoint else {
                throw FSError.usage("\(p) is not in a StageFS mount of this node: name entries under a mount's .trash")
            }
            if let prev = mount, prev != m { throw FSError.usage("the paths are in two mounts (\(prev), \(m)); name one mount's") }
            mount = m
        }
        let url: MetaURL
        if let m = at.meta {
            url = try metaURLArgument(m)
        } else if let mount {
            guard let r = Runtime.load(mount) else {
                throw FSError(ENOENT, "no record of the mount at \(mount) for uid \(getuid()): give --meta META-URL")
            }
            url = try r.metadataURL()
        } else if let v = defaultVolume() {
            url = try metaURLArgument(v)
        } else {
            throw FSError.usage("name the volume: --meta META-URL, a path in a mount of it, or STAGEFS_VOLUME")
        }
        meta = try openEngine(url)
        _ = try meta.requireFormat()
        guard let a = meta as? any TrashAdmin else { throw FSError(EOPNOTSUPP, "\(meta.displayName) keeps no trash") }
        admin = a
        mountPoint = mount
        // What a path names is asked of the engine, by its names from the volume's root: a
        // mount's inode numbers (another user's FUSE mount could make them up) are not used.
        let record = mount.flatMap { Runtime.load($0) }
        var inodes: [Ino] = []
        for p in at.paths {
            let (ino, a) = try lookupPath(meta, Self.volumePath(absolutePath(p), mount!, record), processCredential(), what: p)
            guard Trash.isTrash(ino) || (a.nlink == 0 && Trash.isTrash(a.parent)) else {
                throw FSError(EINVAL, "\(p) is not in the trash (.trash at the volume's root)")
            }
            inodes.append(ino)
        }
        named = inodes
    }

    /// Calls `body` for each trashed file the paths name (all of them without paths).
    func each(_ body: (TrashEntry) throws -> Void) throws {
        let dirs = named.isEmpty ? [Trash.root] : named
        for d in dirs {
            if d == Trash.root {
                for (h, _) in try admin.trashHours(limit: 100_000) { try eachIn(hour: h, body) }
            } else if Trash.isTrash(d) {
                // An hour's directory is in `.trash`; an owner's, in an hour's.
                if try meta.getattr(d).parent == Trash.root { try eachIn(hour: d, body) } else { try eachIn(owner: d, body) }
            } else {
                let a = try meta.getattr(d)
                guard Trash.isTrash(a.parent) else { throw FSError(EINVAL, "inode \(d) is not in the trash") }
                var after: UInt64 = 0
                while true {
                    let (page, next) = try admin.trashEntries(in: a.parent, after: after, limit: 1000)
                    if let e = page.first(where: { $0.ino == d }) {
                        try body(e)
                        break
                    }
                    guard let next else { throw FSError(ENOENT, "inode \(d) is no longer in the trash") }
                    after = next
                }
            }
        }
    }

    private func eachIn(hour: Ino, _ body: (TrashEntry) throws -> Void) throws {
        for (o, _) in try admin.trashOwnerDirs(hour, limit: 100_000) { try eachIn(owner: o, body) }
    }

    private func eachIn(owner: Ino, _ body: (TrashEntry) throws -> Void) throws {
        // Pages taken before the body changes them: restore and purge remove what they see.
        var all: [TrashEntry] = []
        var after: UInt64 = 0
        while true {
            let got: (entries: [TrashEntry], next: UInt64?)
            do {
                got = try admin.trashEntries(in: owner, after: after, limit: 1000)
            } catch {
                // (Through a gateway a user sees their own part of the trash: others' are skipped.)
                if throughGateway(meta) && error.code == EACCES { return }
                throw error
            }
            let (page, next) = got
            all += page
            guard let next else { break }
            after = next
        }
        for e in all { try body(e) }
    }

    /// Removes the trash's directories that are empty now.
    func dropEmptyDirs() throws {
        for (h, _) in try admin.trashHours(limit: 100_000) {
            for (o, _) in try admin.trashOwnerDirs(h, limit: 100_000) { try admin.removeEmptyTrashDir(o) }
            try admin.removeEmptyTrashDir(h)
        }
    }

    /// The inode of a directory given as a path in the mount.
    func inode(of path: String) throws(FSError) -> Ino {
        let abs = absolutePath(path)
        guard let m = mountPoint, MountTable.containing(abs)?.mountPoint == m else {
            throw FSError.usage("--to must be a directory in the same mount as the trash paths")
        }
        let (ino, a) = try lookupPath(meta, Self.volumePath(abs, m, Runtime.load(m)), processCredential(), what: "--to \(path)")
        guard a.type == .directory else { throw FSError(ENOTDIR, "\(path) is not a directory") }
        return ino
    }

    /// The volume path of `abs` in mount `mount`: by its record (which knows a `--subdir`), or
    /// for another user's mount (root's `--meta`), as a mount of the whole volume.
    private static func volumePath(_ abs: String, _ mount: String, _ record: MountRecord?) -> String {
        let r = record ?? MountRecord(mountPoint: mount, metaURL: "", pid: 0, volume: "")
        return r.volumePath(abs)
    }

    /// Where an entry came from, as a path from the volume's root when its directory is still there.
    func originPath(_ e: TrashEntry) -> String {
        guard let o = e.origin else { return "(origin unknown)" }
        if o.parent == 0 { return "(the content of a file cut to zero: \(String(decoding: o.name, as: UTF8.self)))" }
        return path(o.parent, o.name)
    }

    /// `name` in directory `dir`, as a path in the mount.
    func path(_ dir: Ino, _ name: [UInt8]) -> String {
        let n = String(decoding: name, as: UTF8.self)
        guard let d = directoryPath(meta, dir) else { return "(a directory that is gone: inode \(dir))/" + n }
        return (mountPoint ?? "") + (d == "/" ? "" : d) + "/" + n
    }
}
