import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// Seconds a client trusts that the volume has quotas or none (`hasQuotas`): 5, or
/// `STAGEFS_QUOTA_INTERVAL` (tests). Quotas are enforced at every commit regardless; this only
/// decides whether writes reserve space ahead.
package let quotaInterval: Double = {
    guard let v = getenv("STAGEFS_QUOTA_INTERVAL").flatMap({ Double(String(cString: $0)) }), v >= 0 else { return 5 }
    return v
}()

/// Whether the volume has quotas, as last asked, kept `quotaInterval` seconds (an engine's
/// `hasQuotas`, and a gateway client's).
package final class QuotaFlag: Sendable {
    private let state = Locked<(Bool, UInt64)?>(nil)

    package init() {}

    package func answer(_ ask: () throws(FSError) -> Bool) throws(FSError) -> Bool {
        let now = Sys.monotonicNanos()
        // (Another thread may have asked after `now`: a later time is fresh too.)
        if let (has, at) = state.withLock({ $0 }), at >= now || now - at < UInt64(quotaInterval * 1e9) { return has }
        let has = try ask()
        state.withLock { $0 = (has, now) }
        return has
    }
}

/// What a quota limits: a directory's tree, a user's files or a group's.
package enum QuotaTarget: Hashable, Sendable, CustomStringConvertible {
    case dir(Ino)
    case user(UInt32)
    case group(UInt32)

    /// The quota's name in its records: `d<ino>`, `u<uid>`, `g<gid>`.
    package var key: String {
        switch self {
        case .dir(let ino): "d\(ino)"
        case .user(let uid): "u\(uid)"
        case .group(let gid): "g\(gid)"
        }
    }

    package init?(key: String) {
        guard let first = key.first else { return nil }
        let rest = key.dropFirst()
        switch first {
        case "d": guard let n = Ino(rest) else { return nil }; self = .dir(n)
        case "u": guard let n = UInt32(rest) else { return nil }; self = .user(n)
        case "g": guard let n = UInt32(rest) else { return nil }; self = .group(n)
        default: return nil
        }
    }

    package var description: String {
        switch self {
        case .dir(let ino): "the quota of directory inode \(ino)"
        case .user(let uid): "the quota of uid \(uid)"
        case .group(let gid): "the quota of gid \(gid)"
        }
    }
}

/// A quota's limits; 0 is no limit.
package struct QuotaLimits: Sendable, Equatable {
    package var capacity: UInt64
    package var inodes: UInt64

    package init(capacity: UInt64 = 0, inodes: UInt64 = 0) {
        self.capacity = capacity
        self.inodes = inodes
    }

    var encoded: String { "\(capacity) \(inodes)" }

    static func decode(_ text: String) -> QuotaLimits? {
        let parts = text.split(separator: " ")
        guard parts.count == 2, let c = UInt64(parts[0]), let i = UInt64(parts[1]) else { return nil }
        return QuotaLimits(capacity: c, inodes: i)
    }
}

/// What counts in a quota: space (sizes in 4 KiB granules, as `df` counts) and inodes, of which
/// `trashSpace` and `trashInodes` are files in the trash (they count until purged).
package struct QuotaUsage: Sendable, Equatable {
    package var space: Int64 = 0
    package var inodes: Int64 = 0
    package var trashSpace: Int64 = 0
    package var trashInodes: Int64 = 0

    package init(space: Int64 = 0, inodes: Int64 = 0, trashSpace: Int64 = 0, trashInodes: Int64 = 0) {
        self.space = space
        self.inodes = inodes
        self.trashSpace = trashSpace
        self.trashInodes = trashInodes
    }

    static func - (a: QuotaUsage, b: QuotaUsage) -> QuotaUsage {
        QuotaUsage(space: a.space - b.space, inodes: a.inodes - b.inodes, trashSpace: a.trashSpace - b.trashSpace, trashInodes: a.trashInodes - b.trashInodes)
    }
}

package struct QuotaInfo: Sendable, Equatable {
    package var target: QuotaTarget
    package var limits: QuotaLimits
    package var usage: QuotaUsage

    package init(target: QuotaTarget, limits: QuotaLimits, usage: QuotaUsage) {
        self.target = target
        self.limits = limits
        self.usage = usage
    }
}

/// What `checkQuota` found.
package struct QuotaCheck: Sendable, Equatable {
    /// The usage recorded when the walk began, and what the walk counted.
    package var recorded: QuotaUsage
    package var counted: QuotaUsage
    /// Files of one link whose recorded directory was not the one they were found in
    /// (`repair` sets it).
    package var homesFixed: Int
    package var repaired: Bool
}

/// Quotas (`stagefs quota`). The records:
/// - setting `quota_<key>`: the limits, `<capacity bytes> <inodes>` (0: none; empty: no quota),
///   `<key>` being `d<inode>`, `u<uid>` or `g<gid>` (`QuotaTarget.key`);
/// - setting `quotaList`: the keys of all quotas, space-separated; setting `quotaKinds`: which
///   kinds exist (letters `d`, `u`, `g`), which every change reads first, so that a volume
///   without quotas pays one cached read;
/// - counters `q_<key>_space`, `q_<key>_inodes`, `q_<key>_tspace`, `q_<key>_tinodes`: usage,
///   and the part of it in the trash.
///
/// Usage changes in the same transaction as what changes it; a change that grows usage asks
/// each quota whether it stays within its limit (`TxnStore.atMost`: writers into one quota do
/// not conflict while it does) or fails with `EDQUOT`. A directory quota counts the directory,
/// everything below it and what was deleted from there into the trash. A file counts in the
/// directory quotas of its home (`Attr.parent` of a non-directory): the directory of its name,
/// or for a file of several names the one it was made in (or the innermost quota directory of
/// that, once that name is gone). A hard link or a rename of a file of several names into
/// another set of directory quotas answers `EXDEV`, as ext4 and XFS project quotas do (`mv`
/// then copies, which counts), and so does the rename of a non-empty directory without a quota
/// of its own into another set (with one, its usage moves whole).
extension TxnMetadata {
    // MARK: records

    /// The read of `quotaKinds`, for the prefetch of a change's first reads.
    var quotaKindsRead: TxnRead { .setting("quotaKinds") }

    /// Which kinds of quota the volume has (`d`, `u`, `g`); empty when none.
    func quotaKinds(_ tx: S.Txn) throws(FSError) -> String { try store.setting(tx, "quotaKinds") ?? "" }

    func quotaLimits(_ tx: S.Txn, _ key: String) throws(FSError) -> QuotaLimits? {
        guard let text = try store.setting(tx, "quota_" + key), !text.isEmpty else { return nil }
        return QuotaLimits.decode(text)
    }

    /// The directory quotas of `dir` and its ancestors, innermost first. A directory gone
    /// (the recorded home of a file whose names all moved) ends the walk.
    func dirQuotas(_ tx: S.Txn, from dir: Ino) throws(FSError) -> [String] {
        var out: [String] = []
        var cur = dir
        for _ in 0...maxRenameDepth {
            if Trash.isTrash(cur) { return out }
            try store.prefetch(tx, [.attr(cur), .setting("quota_d\(cur)")])
            if try quotaLimits(tx, "d\(cur)") != nil { out.append("d\(cur)") }
            if cur == rootIno { return out }
            guard let a = try store.attr(tx, cur), a.type == .directory else { return out }
            cur = a.parent == 0 ? rootIno : a.parent
        }
        throw FSError(ELOOP, "directory nested deeper than \(maxRenameDepth) levels")
    }

    /// The home of a non-directory: the directory whose quotas it counts in.
    func home(_ a: Attr) -> Ino { a.parent == 0 ? rootIno : a.parent }

    /// The quotas a change of inode `ino` (attributes `a`) counts in: its owner's, its group's,
    /// and the directory quotas of its home (a directory: of itself); for a file in the trash,
    /// those of the directory it was deleted from (as its origin recorded them). The trash's
    /// own directories count in none.
    func quotaKeys(_ tx: S.Txn, _ ino: Ino, _ a: Attr, kinds: String) throws(FSError) -> [String] {
        if kinds.isEmpty || Trash.isTrash(ino) { return [] }
        var keys: [String] = []
        if kinds.contains("u"), try quotaLimits(tx, "u\(a.uid)") != nil { keys.append("u\(a.uid)") }
        if kinds.contains("g"), try quotaLimits(tx, "g\(a.gid)") != nil { keys.append("g\(a.gid)") }
        if kinds.contains("d") {
            if a.type != .directory && Trash.isTrash(a.parent) {
                let dirs = try store.symlinkTarget(tx, ino).flatMap(Trash.Origin.decode)?.quotaDirs ?? []
                for d in dirs where try quotaLimits(tx, "d\(d)") != nil { keys.append("d\(d)") }
            } else {
                keys += try dirQuotas(tx, from: a.type == .directory ? ino : home(a))
            }
        }
        return keys
    }

    /// The quotas of a change of `ino` as the transaction finds them.
    func quotaKeys(_ tx: S.Txn, _ ino: Ino, _ a: Attr) throws(FSError) -> [String] {
        try quotaKeys(tx, ino, a, kinds: try quotaKinds(tx))
    }

    // MARK: counting

    /// Adds a change to the volume's usage and to that of quotas `keys`. With `enforce`, a
    /// growth past a quota's limit fails with `EDQUOT` (and the transaction changes nothing).
    func account(_ tx: S.Txn, _ keys: [String], space: Int64, inodes: Int64, enforce: Bool) throws(FSError) {
        try addToVolume(tx, space: space, inodes: inodes, enforce: enforce)
        if !keys.isEmpty { try addToQuotas(tx, keys.map { ($0, space, inodes) }, enforce: enforce) }
    }

    /// Adds to the volume's usage; with `enforce`, a growth past its capacity or inode limit
    /// (`format --capacity`, `--inodes`) fails with `ENOSPC`.
    func addToVolume(_ tx: S.Txn, space: Int64, inodes: Int64, enforce: Bool) throws(FSError) {
        if enforce && (space > 0 || inodes > 0), let f = try recentFormat(tx) {
            if space > 0, let cap = f.capacity, try !store.atMost(tx, "usedSpace", Int64(clamping: cap) - space) {
                throw FSError(ENOSPC, "the volume is full (its capacity is \(humanBytes(cap)))")
            }
            if inodes > 0, let limit = f.inodes, try !store.atMost(tx, "usedInodes", Int64(clamping: limit) - inodes) {
                throw FSError(ENOSPC, "the volume has no inodes left (its limit is \(limit))")
            }
        }
        try store.add(tx, "usedSpace", space)
        try store.add(tx, "usedInodes", inodes)
    }

    /// Adds usage to quotas, the changes of one quota added up first; with `enforce`, each
    /// quota that grows is checked against its limits first.
    func addToQuotas(_ tx: S.Txn, _ changes: [(key: String, space: Int64, inodes: Int64)], enforce: Bool) throws(FSError) {
        var merged: [(key: String, space: Int64, inodes: Int64)] = []
        for c in changes {
            if let i = merged.firstIndex(where: { $0.key == c.key }) {
                merged[i].space += c.space
                merged[i].inodes += c.inodes
            } else {
                merged.append(c)
            }
        }
        if enforce {
            for c in merged where c.space > 0 || c.inodes > 0 {
                guard let limits = try quotaLimits(tx, c.key) else { continue }
                if c.space > 0 && limits.capacity > 0, try !store.atMost(tx, "q_\(c.key)_space", Int64(clamping: limits.capacity) - c.space) {
                    throw Self.overQuota(c.key, "space")
                }
                if c.inodes > 0 && limits.inodes > 0, try !store.atMost(tx, "q_\(c.key)_inodes", Int64(clamping: limits.inodes) - c.inodes) {
                    throw Self.overQuota(c.key, "inodes")
                }
            }
        }
        for c in merged {
            try store.add(tx, "q_\(c.key)_space", c.space)
            try store.add(tx, "q_\(c.key)_inodes", c.inodes)
        }
    }

    static func overQuota(_ key: String, _ what: String) -> FSError {
        FSError(EDQUOT, "\(QuotaTarget(key: key).map { "\($0)" } ?? key) has no \(what) left (disk quota exceeded)")
    }

    /// Adds to the trash's part of quotas `keys`.
    func addTrashToQuotas(_ tx: S.Txn, _ keys: [String], space: Int64, inodes: Int64) throws(FSError) {
        for k in keys {
            try store.add(tx, "q_\(k)_tspace", space)
            try store.add(tx, "q_\(k)_tinodes", inodes)
        }
    }

    /// Moves the usage of something from quotas `from` to quotas `to` (those in both keep it);
    /// with `enforce`, the quotas it comes into are checked.
    func moveUsage(_ tx: S.Txn, from: [String], to: [String], space: Int64, inodes: Int64, enforce: Bool) throws(FSError) {
        let out = from.filter { !to.contains($0) }.map { ($0, -space, -inodes) }
        let into = to.filter { !from.contains($0) }.map { ($0, space, inodes) }
        if out.isEmpty && into.isEmpty { return }
        try addToQuotas(tx, out + into, enforce: enforce)
    }

    /// A rename moves `ino` (`a`) from directory quotas `from` (those of its old directory) to
    /// `to`: a directory with its whole usage when it has a quota of its own, an empty one or a
    /// file of one name as itself; anything else answers `EXDEV` (see the type's comment).
    func moveAcrossQuotas(_ tx: S.Txn, _ ino: Ino, _ a: Attr, from: [String], to: [String]) throws(FSError) {
        if from == to { return }
        if a.type == .directory {
            if try store.hasEntries(tx, ino) {
                guard try quotaLimits(tx, "d\(ino)") != nil else {
                    throw FSError(EXDEV, "a non-empty directory moves into another directory quota only when it has a quota of its own")
                }
                // (Its trash stays counted where its origins say: only what lives moves.)
                let k = "d\(ino)"
                try store.prefetch(tx, ["space", "inodes", "tspace", "tinodes"].map { .counter("q_\(k)_\($0)") })
                let space = try store.counter(tx, "q_\(k)_space") - store.counter(tx, "q_\(k)_tspace")
                let inodes = try store.counter(tx, "q_\(k)_inodes") - store.counter(tx, "q_\(k)_tinodes")
                try moveUsage(tx, from: from, to: to, space: space, inodes: inodes, enforce: true)
                return
            }
        } else if a.nlink > 1 {
            throw FSError(EXDEV, "a file of several names stays within its directory quotas (link or rename it within them, or copy it)")
        }
        try moveUsage(tx, from: from, to: to, space: align4K(a.size), inodes: 1, enforce: true)
    }

    // MARK: reservations

    /// Whether the volume has quotas, read again at most every `quotaInterval` seconds.
    package func hasQuotas() throws(FSError) -> Bool { try quotaSetting.answer { () throws(FSError) in try quotasExist() } }

    /// Whether the volume has quotas, read now (what a gateway answers its clients, who keep
    /// the answer `quotaInterval` seconds themselves).
    package func quotasExist() throws(FSError) -> Bool {
        try store.transaction(write: false) { (tx) throws(FSError) in try !quotaKinds(tx).isEmpty }
    }

    /// Space reserved for data a client buffers (`reserveSpace`), by session and file; kept by
    /// the process that runs the engine (a mount, or the gateway for its clients).
    struct Reservation {
        var bytes: Int64
        var keys: [String]
    }

    struct ReservationKey: Hashable {
        var sid: UInt64
        var ino: Ino
    }

    /// Charges `bytes` to the quotas of `ino` ahead of writes session `sid` buffers, failing
    /// with `EDQUOT` when they do not fit; the commits of those writes use it up
    /// (`writeSlice`), `releaseSpace` gives back the rest. False when no quota counts the file
    /// (nothing is reserved; the caller need not ask again while it has it open).
    package func reserveSpace(_ ino: Ino, sid: UInt64, bytes: Int64) throws(FSError) -> Bool {
        if bytes <= 0 { return true }
        // (What one file's writer holds is bounded: a client buffers far less.)
        let held = reservations.withLock { $0[ReservationKey(sid: sid, ino: ino)]?.bytes ?? 0 }
        if held + bytes > Self.maxReservation {
            throw FSError(EINVAL, "session \(sid) would hold more than \(humanBytes(Self.maxReservation)) reserved for inode \(ino)")
        }
        let keys = try store.transaction(write: true) { (tx) throws(FSError) -> [String] in
            let kinds = try quotaKinds(tx)
            if kinds.isEmpty { return [] }
            guard let a = try store.attr(tx, ino) else { throw FSError.notFound }
            let keys = try quotaKeys(tx, ino, a, kinds: kinds)
            if !keys.isEmpty { try addToQuotas(tx, keys.map { ($0, bytes, 0) }, enforce: true) }
            return keys
        }
        if keys.isEmpty { return false }
        let key = ReservationKey(sid: sid, ino: ino)
        let stale = reservations.withLock { (r) -> Reservation? in
            if var old = r[key], old.keys == keys {
                old.bytes += bytes
                r[key] = old
                return nil
            }
            let old = r[key]
            r[key] = Reservation(bytes: bytes, keys: keys)
            return old
        }
        // (The file moved to other quotas since the earlier reservation: that one goes back.)
        if let stale { try giveBack(stale) }
        return true
    }

    /// The most one session may hold reserved for one file.
    static var maxReservation: Int64 { 4 << 30 }

    /// Gives back what session `sid` still has reserved for `ino`.
    package func releaseSpace(_ ino: Ino, sid: UInt64) throws(FSError) {
        guard let r = reservations.withLock({ $0.removeValue(forKey: ReservationKey(sid: sid, ino: ino)) }) else { return }
        try giveBack(r)
    }

    /// Gives back all that session `sid` has reserved (its end).
    func releaseSpace(sid: UInt64) throws(FSError) {
        let mine = reservations.withLock { r in
            let keys = r.keys.filter { $0.sid == sid }
            return keys.compactMap { r.removeValue(forKey: $0) }
        }
        for r in mine { try giveBack(r) }
    }

    private func giveBack(_ r: Reservation) throws(FSError) {
        if r.bytes <= 0 { return }
        try store.transaction(write: true) { (tx) throws(FSError) in
            try addToQuotas(tx, r.keys.map { ($0, -r.bytes, 0) }, enforce: false)
        }
    }

    /// Takes session `sid`'s reservation for `ino` out of the table while a commit uses it.
    func claimReservation(_ sid: UInt64, _ ino: Ino) -> Reservation? {
        reservations.withLock { $0.removeValue(forKey: ReservationKey(sid: sid, ino: ino)) }
    }

    /// Puts back what a commit left of a claimed reservation.
    func returnReservation(_ sid: UInt64, _ ino: Ino, _ r: Reservation) {
        if r.bytes <= 0 { return }
        let key = ReservationKey(sid: sid, ino: ino)
        let stale = reservations.withLock { (t) -> Reservation? in
            if var cur = t[key] {
                if cur.keys == r.keys {
                    cur.bytes += r.bytes
                    t[key] = cur
                    return nil
                }
                return r
            }
            t[key] = r
            return nil
        }
        if let stale { try? giveBack(stale) }
    }

    // MARK: what admins do

    /// Sets (or changes) a quota's limits. A new quota counts what exists already by walking
    /// it (`checkQuota` with repair), in bounded steps.
    package func setQuota(_ target: QuotaTarget, _ limits: QuotaLimits) throws(FSError) -> QuotaInfo {
        let key = target.key
        let isNew = try store.transaction(write: true) { (tx) throws(FSError) -> Bool in
            if case .dir(let ino) = target {
                guard let a = try store.attr(tx, ino), a.type == .directory, a.nlink > 0 else {
                    throw FSError(ENOENT, "directory inode \(ino) does not exist")
                }
                if Trash.isTrash(ino) { throw FSError(EPERM, "the trash has no quotas") }
            }
            let existed = try quotaLimits(tx, key) != nil
            try store.setSetting(tx, "quota_" + key, limits.encoded)
            if !existed {
                var list = try quotaList(tx)
                list.append(key)
                try putQuotaList(tx, list)
                try zeroUsage(tx, key)
            }
            return !existed
        }
        if isNew { _ = try checkQuota(target, repair: true) }
        guard let info = try quota(target) else { throw FSError(ENOENT, "\(target) was deleted meanwhile") }
        return info
    }

    /// Removes a quota (its usage records too).
    package func deleteQuota(_ target: QuotaTarget) throws(FSError) {
        try store.transaction(write: true) { (tx) throws(FSError) in
            guard try quotaLimits(tx, target.key) != nil else { throw FSError(ENOENT, "there is no \(target)") }
            try dropQuota(tx, target.key)
        }
    }

    /// Removes quota `key`'s records (a directory's goes with the directory).
    func dropQuota(_ tx: S.Txn, _ key: String) throws(FSError) {
        try store.setSetting(tx, "quota_" + key, "")
        try putQuotaList(tx, try quotaList(tx).filter { $0 != key })
        try zeroUsage(tx, key)
    }

    /// Sets quota `key`'s usage records to 0 (one set anew, or gone).
    private func zeroUsage(_ tx: S.Txn, _ key: String) throws(FSError) {
        for c in ["space", "inodes", "tspace", "tinodes"] {
            let name = "q_\(key)_\(c)"
            try store.add(tx, name, -(try store.counter(tx, name)))
        }
    }

    func quotaList(_ tx: S.Txn) throws(FSError) -> [String] {
        (try store.setting(tx, "quotaList") ?? "").split(separator: " ").map(String.init)
    }

    private func putQuotaList(_ tx: S.Txn, _ list: [String]) throws(FSError) {
        try store.setSetting(tx, "quotaList", list.joined(separator: " "))
        let kinds = String(["d", "u", "g"].filter { k in list.contains { $0.first == k } })
        if kinds != (try quotaKinds(tx)) { try store.setSetting(tx, "quotaKinds", kinds) }
    }

    private func usage(_ tx: S.Txn, _ key: String) throws(FSError) -> QuotaUsage {
        try store.prefetch(tx, ["space", "inodes", "tspace", "tinodes"].map { .counter("q_\(key)_\($0)") })
        return QuotaUsage(
            space: try store.counter(tx, "q_\(key)_space"), inodes: try store.counter(tx, "q_\(key)_inodes"),
            trashSpace: try store.counter(tx, "q_\(key)_tspace"), trashInodes: try store.counter(tx, "q_\(key)_tinodes"))
    }

    /// A quota's limits and usage; nil when there is none.
    package func quota(_ target: QuotaTarget) throws(FSError) -> QuotaInfo? {
        try store.transaction(write: false) { (tx) throws(FSError) -> QuotaInfo? in
            guard let limits = try quotaLimits(tx, target.key) else { return nil }
            return QuotaInfo(target: target, limits: limits, usage: try usage(tx, target.key))
        }
    }

    /// Every quota, directories first, then users and groups (each in numeric order).
    package func quotas() throws(FSError) -> [QuotaInfo] {
        let keys = try store.transaction(write: false) { (tx) throws(FSError) in try quotaList(tx) }
        var out: [QuotaInfo] = []
        for k in keys { if let t = QuotaTarget(key: k), let q = try quota(t) { out.append(q) } }
        func order(_ t: QuotaTarget) -> (Int, UInt64) {
            switch t {
            case .dir(let i): (0, i)
            case .user(let u): (1, UInt64(u))
            case .group(let g): (2, UInt64(g))
            }
        }
        return out.sorted { order($0.target) < order($1.target) }
    }

    /// Space and inodes as `df` in directory `ino` shows them: of the innermost directory quota
    /// with a limit that counts it, else of the volume.
    package func statfs(_ ino: Ino) throws(FSError) -> StatFS {
        let found = try store.transaction(write: false) { (tx) throws(FSError) -> (QuotaLimits, QuotaUsage)? in
            guard try quotaKinds(tx).contains("d"), let a = try store.attr(tx, ino) else { return nil }
            for k in try dirQuotas(tx, from: a.type == .directory ? ino : home(a)) {
                if let l = try quotaLimits(tx, k), l.capacity > 0 || l.inodes > 0 { return (l, try usage(tx, k)) }
            }
            return nil
        }
        let volume = try statfs()
        guard let (l, u) = found else { return volume }
        let used = UInt64(max(0, u.space))
        let inodes = UInt64(max(0, u.inodes))
        let total = l.capacity > 0 ? max(l.capacity, used) : volume.totalSpace
        let inodeTotal = l.inodes > 0 ? max(l.inodes, inodes) : volume.usedInodes + volume.availInodes
        return StatFS(
            totalSpace: total, availSpace: l.capacity > 0 ? total - used : volume.availSpace, usedSpace: used, usedInodes: inodes,
            availInodes: l.inodes > 0 ? inodeTotal - inodes : volume.availInodes)
    }

    /// Counts what quota `target` covers by walking it in bounded read steps (a directory's
    /// tree and the trash's files deleted from it; for a user or a group, the whole volume),
    /// and compares with what is recorded. `repair` adds the difference to the records (what
    /// changes during the walk is kept: the walk is exact on a tree that does not change) and
    /// sets the home of files of one name found away from it. `progress` hears how many inodes
    /// were seen so far.
    package func checkQuota(_ target: QuotaTarget, repair: Bool, progress: (Int) -> Void = { _ in }) throws(FSError) -> QuotaCheck {
        let key = target.key
        let recorded = try store.transaction(write: false) { (tx) throws(FSError) -> QuotaUsage in
            guard try quotaLimits(tx, key) != nil else { throw FSError(ENOENT, "there is no \(target)") }
            return try usage(tx, key)
        }
        var counted = QuotaUsage()
        var homes: [(ino: Ino, dir: Ino)] = []
        var linked = Set<Ino>()
        var seen = 0
        let top: Ino
        switch target {
        case .dir(let d): top = d
        default: top = rootIno
        }
        func owns(_ a: Attr) -> Bool {
            switch target {
            case .dir: true
            case .user(let uid): a.uid == uid
            case .group(let gid): a.gid == gid
            }
        }
        // The top itself.
        let topAttr = try getattr(top)
        if owns(topAttr) {
            counted.space += align4K(topAttr.size)
            counted.inodes += 1
        }
        var dirs: [Ino] = [top]
        while let dir = dirs.popLast() {
            var after: UInt64 = 0
            while true {
                let page = try readdir(dir, after: after, limit: 1000, plus: true)
                for e in page {
                    guard let a = e.attr else { continue }
                    seen += 1
                    if a.type == .directory {
                        // The trash: its directories count nowhere, its files as deleted
                        // (below, for a directory quota; here for a user or a group).
                        if Trash.isTrash(e.ino) {
                            if case .dir = target {} else { dirs.append(e.ino) }
                            continue
                        }
                        dirs.append(e.ino)
                        if owns(a) {
                            counted.space += align4K(a.size)
                            counted.inodes += 1
                        }
                        continue
                    }
                    if Trash.isTrash(dir) {
                        guard a.nlink == 0, owns(a) else { continue }
                        counted.space += align4K(a.size)
                        counted.inodes += 1
                        let c = try store.transaction(write: false) { (tx) throws(FSError) in
                            try store.symlinkTarget(tx, e.ino).flatMap(Trash.Origin.decode)?.counted ?? 0
                        }
                        counted.trashSpace += c
                        counted.trashInodes += 1
                        continue
                    }
                    guard owns(a) else { continue }
                    if a.nlink > 1 {
                        if linked.contains(e.ino) { continue }
                        if case .dir(let d) = target {
                            let within = try store.transaction(write: false) { (tx) throws(FSError) in try isWithin(tx, home(a), d) }
                            if !within { continue }
                        }
                        if linked.count >= 10_000_000 { throw FSError(E2BIG, "more than 10,000,000 files with several names to check") }
                        linked.insert(e.ino)
                    } else if a.parent != dir {
                        homes.append((e.ino, dir))
                    }
                    counted.space += align4K(a.size)
                    counted.inodes += 1
                }
                if seen % 10_000 < page.count { progress(seen) }
                guard page.count == 1000, let last = page.last else { break }
                after = last.cookie
            }
        }
        // A directory quota's trash: files deleted from its tree.
        if case .dir(let d) = target {
            for (hourDir, _) in try trashHours(limit: 100_000) {
                for (ownerDir, _) in try trashOwnerDirs(hourDir, limit: 100_000) {
                    var after: UInt64 = 0
                    while true {
                        let (entries, next) = try trashEntries(in: ownerDir, after: after, limit: 1000)
                        for e in entries where e.origin?.quotaDirs.contains(d) == true {
                            counted.space += align4K(e.attr.size)
                            counted.inodes += 1
                            counted.trashSpace += e.origin?.counted ?? 0
                            counted.trashInodes += 1
                        }
                        seen += entries.count
                        guard let next else { break }
                        after = next
                    }
                }
            }
        }
        progress(seen)
        var fixed = 0
        if repair {
            // Homes, a page at a time: only a file still of one name in the directory it was
            // found in.
            for start in stride(from: 0, to: homes.count, by: 500) {
                let part = homes[start..<min(homes.count, start + 500)]
                fixed += try store.transaction(write: true) { (tx) throws(FSError) -> Int in
                    var n = 0
                    for h in part {
                        guard var a = try store.attr(tx, h.ino), a.type != .directory, a.nlink == 1, a.parent != h.dir,
                            !Trash.isTrash(a.parent)
                        else { continue }
                        a.parent = h.dir
                        try store.putAttr(tx, h.ino, a)
                        n += 1
                    }
                    return n
                }
            }
            let diff = counted - recorded
            try store.transaction(write: true) { (tx) throws(FSError) in
                guard try quotaLimits(tx, key) != nil else { throw FSError(ENOENT, "\(target) was deleted during the check") }
                try store.add(tx, "q_\(key)_space", diff.space)
                try store.add(tx, "q_\(key)_inodes", diff.inodes)
                try store.add(tx, "q_\(key)_tspace", diff.trashSpace)
                try store.add(tx, "q_\(key)_tinodes", diff.trashInodes)
            }
        } else {
            fixed = homes.count
        }
        return QuotaCheck(recorded: recorded, counted: counted, homesFixed: fixed, repaired: repair)
    }
}

/// What the quota commands ask of an engine (`stagefs quota`): the transactional engines.
package protocol QuotaAdmin: AnyObject, Sendable {
    func quotasExist() throws(FSError) -> Bool
    func setQuota(_ target: QuotaTarget, _ limits: QuotaLimits) throws(FSError) -> QuotaInfo
    func deleteQuota(_ target: QuotaTarget) throws(FSError)
    func quota(_ target: QuotaTarget) throws(FSError) -> QuotaInfo?
    func quotas() throws(FSError) -> [QuotaInfo]
    func checkQuota(_ target: QuotaTarget, repair: Bool, progress: (Int) -> Void) throws(FSError) -> QuotaCheck
}

extension TxnMetadata: QuotaAdmin {}
