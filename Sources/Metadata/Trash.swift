import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// The trash: `/.trash/<YYYY-MM-DD-HH>/<uid>/<ino>-<name>`, directories whose inode numbers
/// are from 2^52 up (`.trash` itself is 2^52; the others count up from there, their own
/// counter): the inodes of files count up from 1 and never get there, and every number stays
/// below 2^53, which Redis's Lua (doubles) holds exactly.
/// - `.trash` itself, root's, mode 0555;
/// - an hour's directory (UTC), root's, mode 0555;
/// - in it one directory per owner of what was deleted in that hour, named by the uid, the
///   owner's, mode 0500 (the owner and root may list and read it; nobody writes in it through
///   a mount but root).
///
/// A regular file whose last link goes (unlink, or a rename over it) while the volume keeps a
/// trash (`format --trash-days N`, N > 0) is not freed: it gets an entry in its owner's
/// directory of this hour, keeps link count 0 (an open descriptor's fstat says 0, as on ext4:
/// a trash entry is not a link), and its target record says where it came from (parent inode,
/// time, name). What POSIX programs see elsewhere does not change.
package enum Trash {
    static let base: Ino = 1 << 52
    /// `.trash`.
    package static let root: Ino = base
    package static let name = Array(".trash".utf8)

    /// Whether `ino` is one of the trash's directories (a file whose parent is one is in the trash).
    package static func isTrash(_ ino: Ino) -> Bool { ino >= base && ino < base << 1 }

    /// The hour since the epoch an hour directory's name says (nil: not such a name).
    package static func hour(named name: [UInt8]) -> Int64? {
        let parts = String(decoding: name, as: UTF8.self).split(separator: "-")
        guard parts.count == 4, let y = Int32(parts[0]), let mo = Int32(parts[1]), let d = Int32(parts[2]), let h = Int32(parts[3]),
            let u = UTCTime(year: y, month: mo, day: d, hour: h)
        else { return nil }
        return u.seconds / 3600
    }

    /// `YYYY-MM-DD-HH` (UTC) of an hour since the epoch.
    package static func hourName(_ hour: Int64) -> [UInt8] {
        let u = UTCTime(hour * 3600)
        let two = UTCTime.two
        return Array("\(u.year)-\(two(u.month))-\(two(u.day))-\(two(u.hour))".utf8)
    }

    /// The name of a trashed file's entry: its inode and (as much as fits 255 bytes of) its name.
    static func entryName(_ ino: Ino, _ name: [UInt8]) -> [UInt8] {
        let prefix = Array("\(ino)-".utf8)
        var keep = name.prefix(maxNameLength - prefix.count)
        // Not cut inside a UTF-8 sequence.
        while keep.count < name.count, let last = keep.last, last & 0xC0 == 0x80 || last & 0xC0 == 0xC0 {
            keep = keep.dropLast()
            if last & 0xC0 == 0xC0 { break }
        }
        return prefix + keep
    }

    /// Where a trashed file came from, as its target record holds it.
    package struct Origin: Sendable, Equatable {
        /// The directory it was in; 0 for the content of a file cut to zero (where that file's
        /// names are is not known: it is restored into a directory given).
        package var parent: Ino
        package var deleted: Int64
        package var name: [UInt8]
        /// The bytes counted in `trashSpace` when it came (its size may change in the trash
        /// through a descriptor still open, or root's writes).
        package var counted: Int64 = 0
        /// The directory quotas it counted in when it came (`quotaKeys`): it counts there
        /// until it leaves the trash.
        package var quotaDirs: [Ino] = []

        package init(parent: Ino, deleted: Int64, name: [UInt8], counted: Int64 = 0, quotaDirs: [Ino] = []) {
            self.parent = parent
            self.deleted = deleted
            self.name = name
            self.counted = counted
            self.quotaDirs = quotaDirs
        }

        /// `parent\ndeleted\ncounted[:dir,dir...]\nname`.
        package func encoded() -> [UInt8] {
            let dirs = quotaDirs.isEmpty ? "" : ":" + quotaDirs.map { String($0) }.joined(separator: ",")
            return Array("\(parent)\n\(deleted)\n\(counted)\(dirs)\n".utf8) + name
        }

        package static func decode(_ b: [UInt8]) -> Origin? {
            let parts = b.split(separator: UInt8(ascii: "\n"), maxSplits: 3, omittingEmptySubsequences: false)
            guard parts.count == 4, let p = Ino(String(decoding: parts[0], as: UTF8.self)),
                let d = Int64(String(decoding: parts[1], as: UTF8.self))
            else { return nil }
            let third = String(decoding: parts[2], as: UTF8.self).split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false)
            guard let c = Int64(third[0]) else { return nil }
            var dirs: [Ino] = []
            if third.count == 2 {
                for part in third[1].split(separator: ",") {
                    guard let i = Ino(part) else { return nil }
                    dirs.append(i)
                }
            }
            return Origin(parent: p, deleted: d, name: Array(parts[3]), counted: c, quotaDirs: dirs)
        }
    }
}

/// One file in the trash, as `trashEntries` lists it.
package struct TrashEntry: Sendable, Equatable {
    package var ino: Ino
    /// Its owner's directory of the hour it was deleted in, and its entry's name there.
    package var dir: Ino
    package var entryName: [UInt8]
    package var attr: Attr
    package var origin: Trash.Origin?

    package init(ino: Ino, dir: Ino, entryName: [UInt8], attr: Attr, origin: Trash.Origin?) {
        self.ino = ino
        self.dir = dir
        self.entryName = entryName
        self.attr = attr
        self.origin = origin
    }
}

/// Seconds between purge steps of a client's trash purger and between reads of the trash's
/// setting: 60, or `STAGEFS_TRASH_INTERVAL` (tests).
package let trashInterval: Double = {
    guard let v = getenv("STAGEFS_TRASH_INTERVAL").flatMap({ Double(String(cString: $0)) }), v > 0 else { return 60 }
    return v
}()

extension TxnMetadata {
    static var formatNanos: UInt64 { UInt64(trashInterval * 1e9) }

    /// The format record as read at most a minute ago (`trashInterval`): what it says of the
    /// trash and the volume's limits reaches every client within that.
    /// `tx`: the transaction the caller is in, if any (the record is then read in it: a store
    /// may not start a transaction inside another).
    func recentFormat(_ tx: S.Txn? = nil) throws(FSError) -> VolumeFormat? {
        let now = Sys.monotonicNanos()
        // (Another thread may have read it after `now`: a later `at` is fresh too.)
        if let (f, at) = formatSetting.withLock({ $0 }), at >= now || now - at < Self.formatNanos { return f }
        var f: VolumeFormat?
        if let tx {
            f = try store.setting(tx, "format").map { (t) throws(FSError) in try VolumeFormat.decode(t) }
        } else {
            f = try loadFormat()
        }
        formatSetting.withLock { $0 = (f, now) }
        return f
    }

    /// How many days the volume keeps deleted files (0: no trash).
    func trashDays() throws(FSError) -> Int { try recentFormat()?.trashDays ?? 0 }

    /// Puts `ino` (a regular file whose last link just went: `a`, link count 0) into its
    /// owner's trash directory of this hour, making the directories it needs. Returns false
    /// (the caller frees it as without a trash) when the volume's root holds a `.trash` that is
    /// not the trash (a user's, made before there was one).
    /// `keys`: the quotas it counts in (`quotaKeys`), where it goes on counting, as trash.
    func putInTrash(
        _ tx: S.Txn, _ ino: Ino, _ a: inout Attr, _ attrs: inout AttrSet, from parent: Ino, name: [UInt8], by deleter: Credential, now: Timespec,
        keys: [String]
    )
        throws(FSError) -> Bool
    {
        let hourName = Trash.hourName(now.sec / 3600)
        // Filed under who deleted it (who could reach it there), never its owner (who may not
        // have been able to reach the directory it was in).
        let uidName = Array(String(deleter.uid).utf8)
        try store.prefetch(tx, [.attr(Trash.root), .entry(rootIno, Trash.name), .entry(Trash.root, hourName)])
        func dir(_ mode: UInt16, uid: UInt32, gid: UInt32, parent: Ino) -> Attr {
            Attr(type: .directory, mode: mode, uid: uid, gid: gid, nlink: 2, size: 4096, atime: now, mtime: now, ctime: now, parent: parent)
        }
        /// Makes directory `d` (`attr`), named `name` in `parent`.
        func make(_ d: Ino, _ parent: Ino, _ name: [UInt8], _ attr: Attr, touchParent: Bool = true) throws(FSError) {
            attrs.put(d, attr)
            try store.putEntry(tx, parent, name, d, .directory)
            try attrs.update(store, tx, parent) {
                $0.nlink += 1
                if touchParent {
                    $0.mtime = now
                    $0.ctime = now
                }
            }
            try store.add(tx, "usedInodes", 1)
            try store.add(tx, "usedSpace", 4096)
        }
        /// The directory `name` of `parent`, made (`attr`) when missing.
        func subdir(_ parent: Ino, _ name: [UInt8], _ attr: Attr) throws(FSError) -> Ino {
            if let (d, _) = try store.entry(tx, parent, name), Trash.isTrash(d) { return d }
            let d = Trash.base + 1 + (try store.reserveIDs(tx, "nextTrashInode", 1))
            try make(d, parent, name, attr)
            return d
        }
        if try store.attr(tx, Trash.root) == nil {
            if try store.entry(tx, rootIno, Trash.name) != nil { return false }
            try make(Trash.root, rootIno, Trash.name, dir(0o555, uid: 0, gid: 0, parent: rootIno), touchParent: false)
        }
        let hourIno = try subdir(Trash.root, hourName, dir(0o555, uid: 0, gid: 0, parent: Trash.root))
        let ownerIno = try subdir(hourIno, uidName, dir(0o500, uid: deleter.uid, gid: deleter.gid, parent: hourIno))
        try store.putEntry(tx, ownerIno, Trash.entryName(ino, name), ino, .regular)
        try attrs.update(store, tx, ownerIno) {
            $0.mtime = now
            $0.ctime = now
        }
        let dirs = keys.compactMap { k -> Ino? in k.first == "d" ? Ino(k.dropFirst()) : nil }
        let origin = Trash.Origin(parent: parent, deleted: now.sec, name: name, counted: align4K(a.size), quotaDirs: dirs)
        try store.putSymlinkTarget(tx, ino, origin.encoded())
        a.parent = ownerIno
        try store.add(tx, "trashInodes", 1)
        try store.add(tx, "trashSpace", align4K(a.size))
        try addTrashToQuotas(tx, keys, space: align4K(a.size), inodes: 1)
        return true
    }

    /// Trashed file `ino` (`a`) leaves the trash (restored, or purged) for home `newHome`: the
    /// counters take back what its coming added, and its usage moves from the quotas of where
    /// it was deleted to those of its new home.
    /// `enforce`: the quotas it comes into are checked (a user's restore through a gateway).
    func leftTrash(_ tx: S.Txn, _ ino: Ino, _ a: Attr, to newHome: Ino, enforce: Bool = false) throws(FSError) {
        let counted = try store.symlinkTarget(tx, ino).flatMap(Trash.Origin.decode)?.counted ?? 0
        try store.add(tx, "trashInodes", -1)
        try store.add(tx, "trashSpace", -counted)
        let kinds = try quotaKinds(tx)
        if kinds.isEmpty { return }
        let old = try quotaKeys(tx, ino, a, kinds: kinds)
        try addTrashToQuotas(tx, old, space: -counted, inodes: -1)
        var moved = a
        moved.parent = newHome
        try moveUsage(tx, from: old, to: try quotaKeys(tx, ino, moved, kinds: kinds), space: align4K(a.size), inodes: 1, enforce: enforce)
    }

    // MARK: what admins and owners do

    /// How many files the trash holds and their bytes (kept counted in `df` until purged).
    package func trashUsage() throws(FSError) -> (inodes: Int64, bytes: Int64) {
        try store.transaction(write: false) { (tx) throws(FSError) in
            try store.prefetch(tx, [.counter("trashInodes"), .counter("trashSpace")])
            return (max(0, try store.counter(tx, "trashInodes")), max(0, try store.counter(tx, "trashSpace")))
        }
    }

    /// The trash's hour directories (inode, hour since the epoch), oldest first (at most `limit`).
    package func trashHours(limit: Int = 10_000) throws(FSError) -> [(Ino, Int64)] {
        try store.transaction(write: false) { (tx) throws(FSError) in
            guard try store.attr(tx, Trash.root) != nil else { return [] }
            return try store.entries(tx, Trash.root, after: 0, limit: limit).compactMap { e -> (Ino, Int64)? in
                guard Trash.isTrash(e.ino), let h = Trash.hour(named: e.name) else { return nil }
                return (e.ino, h)
            }.sorted { $0.1 < $1.1 }
        }
    }

    /// Files of the trash in owner directory `ownerDir` (one uid's of one hour), from position
    /// `after` on, at most `limit`: one step of a listing (`next`: where the next one starts).
    package func trashEntries(in ownerDir: Ino, after: UInt64, limit: Int) throws(FSError) -> (entries: [TrashEntry], next: UInt64?) {
        try store.transaction(write: false) { (tx) throws(FSError) in
            let page = try store.entries(tx, ownerDir, after: after, limit: limit)
            try store.prefetch(tx, page.flatMap { [.attr($0.ino), .symlink($0.ino)] })
            var out: [TrashEntry] = []
            for e in page {
                guard let a = try store.attr(tx, e.ino), a.parent == ownerDir else { continue }
                out.append(
                    TrashEntry(
                        ino: e.ino, dir: ownerDir, entryName: e.name, attr: a, origin: try store.symlinkTarget(tx, e.ino).flatMap(Trash.Origin.decode)
                    ))
            }
            return (out, page.count == limit ? page.last?.cookie : nil)
        }
    }

    /// The owner directories of an hour directory (at most `limit`).
    package func trashOwnerDirs(_ hourDir: Ino, limit: Int = 100_000) throws(FSError) -> [(Ino, UInt32)] {
        try store.transaction(write: false) { (tx) throws(FSError) in
            try store.entries(tx, hourDir, after: 0, limit: limit).compactMap { e -> (Ino, UInt32)? in
                guard Trash.isTrash(e.ino), let uid = UInt32(String(decoding: e.name, as: UTF8.self)) else { return nil }
                return (e.ino, uid)
            }
        }
    }

    /// Deletes trashed file `ino` for good (its data is queued for deletion once nobody has it
    /// open). `cred` must be root or (`ownerMayPurge`) its owner.
    @discardableResult
    package func purgeTrashed(_ cred: Credential, _ ino: Ino, ownerMayPurge: Bool = false) throws(FSError) -> Bool {
        try store.transaction(write: true) { (tx) throws(FSError) -> Bool in
            try store.prefetch(tx, [.attr(ino), .isOpen(ino)])
            guard let a = try store.attr(tx, ino), a.nlink == 0, Trash.isTrash(a.parent) else {
                throw FSError(ENOENT, "inode \(ino) is not in the trash")
            }
            if !cred.isRoot && !(ownerMayPurge && cred.uid == a.uid) {
                throw FSError(EPERM, "only root (or, through a gateway, its owner) purges a file from the trash")
            }
            guard let entry = try trashEntryName(tx, ino, a) else { throw FSError.damagedEntry }
            try store.deleteEntry(tx, a.parent, entry)
            try leftTrash(tx, ino, a, to: rootIno)
            var gone = a
            gone.parent = rootIno
            try store.putAttr(tx, ino, gone)
            return try freeIfUnused(tx, ino)
        }
    }

    /// Puts trashed file `ino` back where it came from, or in directory `to` (with its old name),
    /// refusing to replace anything. `cred` must be root or (`ownerMayRestore`) its owner, and
    /// may write the directory. Returns the directory and the name it got.
    package func restoreTrashed(_ cred: Credential, _ ino: Ino, to: Ino? = nil, ownerMayRestore: Bool = false) throws(FSError) -> (Ino, [UInt8]) {
        try store.transaction(write: true) { (tx) throws(FSError) -> (Ino, [UInt8]) in
            try store.prefetch(tx, [.attr(ino), .symlink(ino)])
            guard var a = try store.attr(tx, ino), a.nlink == 0, Trash.isTrash(a.parent) else {
                throw FSError(ENOENT, "inode \(ino) is not in the trash")
            }
            if !cred.isRoot && !(ownerMayRestore && cred.uid == a.uid) {
                throw FSError(EPERM, "only root (or, through a gateway, its owner) restores a file from the trash")
            }
            guard let origin = try store.symlinkTarget(tx, ino).flatMap(Trash.Origin.decode) else {
                throw FSError(EIO, "inode \(ino) in the trash does not say where it came from: restore it with a directory to put it in")
            }
            if to == nil && origin.parent == 0 {
                throw FSError(EINVAL, "inode \(ino) is the content of a file cut to zero: restore it into a directory given (--to DIR)")
            }
            let dir = to ?? origin.parent
            guard var pa = try store.attr(tx, dir), pa.type == .directory, pa.nlink > 0 else {
                throw FSError(ENOENT, "the directory inode \(ino) came from (inode \(dir)) is gone: restore it into another directory")
            }
            if Trash.isTrash(dir) { throw FSError(EPERM, "a file is restored out of the trash, not into it") }
            try Posix.check(pa, cred, [.write, .execute])
            if try store.entry(tx, dir, origin.name) != nil {
                throw FSError(
                    EEXIST, "'\(String(decoding: origin.name, as: UTF8.self))' exists in the directory (inode \(dir)): restore into another directory"
                )
            }
            guard let entry = try trashEntryName(tx, ino, a) else { throw FSError.damagedEntry }
            let now = Timespec.now()
            try store.deleteEntry(tx, a.parent, entry)
            try store.putEntry(tx, dir, origin.name, ino, .regular)
            try leftTrash(tx, ino, a, to: dir, enforce: !cred.isRoot)
            a.nlink = 1
            a.parent = dir
            a.ctime = now
            try store.putAttr(tx, ino, a)
            pa.mtime = now
            pa.ctime = now
            try store.putAttr(tx, dir, pa)
            return (dir, origin.name)
        }
    }

    /// The name of `ino`'s entry in its trash directory.
    private func trashEntryName(_ tx: S.Txn, _ ino: Ino, _ a: Attr) throws(FSError) -> [UInt8]? {
        if let o = try store.symlinkTarget(tx, ino).flatMap(Trash.Origin.decode) {
            let name = Trash.entryName(ino, o.name)
            if let (e, _) = try store.entry(tx, a.parent, name), e == ino { return name }
        }
        // Renamed inside the trash by root: look for it (an owner's directory of one hour).
        return try entryNaming(tx, ino, in: a.parent)
    }

    /// The name of `ino`'s entry in directory `dir`, looked for page by page (a directory of the
    /// trash: one hour's owners, one owner's files of an hour).
    private func entryNaming(_ tx: S.Txn, _ ino: Ino, in dir: Ino) throws(FSError) -> [UInt8]? {
        var after: UInt64 = 0
        while true {
            let page = try store.entries(tx, dir, after: after, limit: 1000)
            if let e = page.first(where: { $0.ino == ino }) { return e.name }
            guard page.count == 1000, let last = page.last else { return nil }
            after = last.cookie
        }
    }

    /// Removes an empty directory of the trash (an hour's or an owner's), as purging does.
    package func removeEmptyTrashDir(_ dir: Ino) throws(FSError) {
        try store.transaction(write: true) { (tx) throws(FSError) in
            guard Trash.isTrash(dir), dir != Trash.root, let a = try store.attr(tx, dir), a.type == .directory else { return }
            if try store.hasEntries(tx, dir) { return }
            // Its name: an owner's directory is named by the uid; an hour's, found in `.trash`.
            let name = a.parent != Trash.root ? Array(String(a.uid).utf8) : try entryNaming(tx, dir, in: Trash.root)
            guard let name, let (e, _) = try store.entry(tx, a.parent, name), e == dir else { return }
            try store.deleteEntry(tx, a.parent, name)
            try store.deleteInode(tx, dir)
            if var pa = try store.attr(tx, a.parent) {
                pa.nlink -= 1
                try store.putAttr(tx, a.parent, pa)
            }
            try store.add(tx, "usedInodes", -1)
            try store.add(tx, "usedSpace", -4096)
        }
    }
}

extension TxnMetadata {
    /// One bounded step of purging the trash: files deleted more than the volume's trash days
    /// ago (all of them once the trash is turned off), at most `limit`, by the client that holds
    /// the trash lease. `holder` names the client (its session); the lease is taken when free or
    /// expired, held two minutes and renewed by each step, so two clients never purge at once.
    /// Returns how many files were purged (0 too when another client holds the lease).
    package func purgeExpiredTrash(holder: UInt64, limit: Int = 100) throws(FSError) -> Int {
        let days = try trashDays()
        let now = Timespec.now().sec
        let mine = try store.transaction(write: true) { (tx) throws(FSError) -> Bool in
            if let v = try store.setting(tx, "trashLease") {
                let parts = v.split(separator: " ")
                if parts.count == 2, let who = UInt64(parts[0]), let until = Int64(parts[1]), who != holder && until > now { return false }
            }
            try store.setSetting(tx, "trashLease", "\(holder) \(now + 120)")
            return true
        }
        guard mine else { return 0 }
        // Hours wholly older than the cut-off expire.
        let cutoff = (now - Int64(days) * 86400) / 3600
        var purged = 0
        for (hourDir, hour) in try trashHours(limit: 1000) where hour < cutoff || days == 0 {
            for (ownerDir, _) in try trashOwnerDirs(hourDir, limit: 1000) {
                let (entries, more) = try trashEntries(in: ownerDir, after: 0, limit: limit - purged)
                for e in entries {
                    do {
                        try purgeTrashed(.root, e.ino)
                        purged += 1
                    } catch {
                        // (Purged by someone else meanwhile: an admin's `trash purge`.)
                        if error.code != ENOENT { throw error }
                    }
                }
                if more == nil { try removeEmptyTrashDir(ownerDir) }
                if purged >= limit { return purged }
            }
            if try trashOwnerDirs(hourDir, limit: 1).isEmpty { try removeEmptyTrashDir(hourDir) }
        }
        return purged
    }
}

/// When a client's background thread purges expired trash, and the step it runs: mounts and
/// gateways alike. A step a minute (`trashInterval`), one a second while full steps come back.
package struct TrashPurger {
    private var next: UInt64
    static let step = 100

    /// The first step comes one interval after `now`.
    package init(now: UInt64 = Sys.monotonicNanos()) { next = now + UInt64(trashInterval * 1e9) }

    /// Runs a step when one is due, as lease holder `holder`; `who` starts its log lines.
    package mutating func runIfDue(_ meta: any MetadataEngine, holder: UInt64, who: String = "") {
        let now = Sys.monotonicNanos()
        guard now >= next else { return }
        let interval = UInt64(trashInterval * 1e9)
        var full = false
        do {
            let n = try meta.purgeExpiredTrash(holder: holder, limit: Self.step)
            if n > 0 { Log.info("\(who)purged \(n) expired file(s) from the trash") }
            full = n >= Self.step
        } catch {
            Log.warning("\(who)purging the trash: \(error.message)")
        }
        next = Sys.monotonicNanos() + (full ? min(interval, 1_000_000_000) : interval)
    }
}

/// What the trash commands ask of an engine (`stagefs trash`): the transactional engines.
package protocol TrashAdmin: AnyObject, Sendable {
    func trashUsage() throws(FSError) -> (inodes: Int64, bytes: Int64)
    func trashHours(limit: Int) throws(FSError) -> [(Ino, Int64)]
    func trashOwnerDirs(_ hourDir: Ino, limit: Int) throws(FSError) -> [(Ino, UInt32)]
    func trashEntries(in ownerDir: Ino, after: UInt64, limit: Int) throws(FSError) -> (entries: [TrashEntry], next: UInt64?)
    func purgeTrashed(_ cred: Credential, _ ino: Ino, ownerMayPurge: Bool) throws(FSError) -> Bool
    func restoreTrashed(_ cred: Credential, _ ino: Ino, to: Ino?, ownerMayRestore: Bool) throws(FSError) -> (Ino, [UInt8])
    func removeEmptyTrashDir(_ dir: Ino) throws(FSError)
}

extension TxnMetadata: TrashAdmin {}
