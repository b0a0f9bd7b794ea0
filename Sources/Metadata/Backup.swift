import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// Automatic metadata backups: dumps kept in the volume's bucket under `<volume>/meta/`, named
/// by the time they were taken (UTC), made by one client at a time (the lease `backupLease` =
/// `<holder> <unix seconds it ends>` and `lastBackup` = `<unix seconds>` in the settings).
package enum Backups {
    /// The prefix of the backups' object keys.
    package static func prefix(volume: String) -> String { "\(volume)/meta/" }

    /// `dump-YYYYMMDD-HHMMSS.json.zst`
    package static func name(at t: Int64) -> String {
        let u = UTCTime(t)
        let two = UTCTime.two
        return "dump-\(u.year)\(two(u.month))\(two(u.day))-\(two(u.hour))\(two(u.minute))\(two(u.second)).json.zst"
    }

    /// The time a backup's name says (nil for another name).
    package static func time(of name: String) -> Int64? {
        let b = Array(name.utf8)
        guard b.count == 29, name.hasPrefix("dump-"), name.hasSuffix(".json.zst"), b[13] == UInt8(ascii: "-") else { return nil }
        func num(_ r: Range<Int>) -> Int32? { Int32(String(decoding: b[r], as: UTF8.self)) }
        guard let y = num(5..<9), let mo = num(9..<11), let d = num(11..<13), let h = num(14..<16), let mi = num(16..<18), let s = num(18..<20),
            let u = UTCTime(year: y, month: mo, day: d, hour: h, minute: mi, second: s)
        else { return nil }
        return u.seconds
    }

    /// Seconds a dump takes per inode, as measured (about 5 µs on SQLite, 20 µs on Redis).
    package static let secondsPerInode = 20e-6

    /// Whether a volume of `inodes` is too big for a backup every `interval` seconds when the
    /// interval was not asked for: its dump would take more than a quarter of it (45 million
    /// inodes for the default hour). Returns the dump's expected seconds then.
    package static func tooBig(inodes: UInt64, interval: Int) -> Double? {
        let secs = Double(inodes) * secondsPerInode
        return secs > Double(interval) / 4 ? secs : nil
    }

    /// Which of the backups taken at `times` to delete at `now`: the newest is always kept;
    /// of the others, the first of each hour for a day, the first of each day for a week, the
    /// first of each week after that.
    package static func thinned(_ times: [Int64], now: Int64) -> [Int64] {
        let sorted = times.sorted()
        guard let newest = sorted.last else { return [] }
        var seen = Set<String>()
        var delete: [Int64] = []
        for t in sorted where t != newest {
            let age = now - t
            let slot: String
            if age < 86400 {
                slot = "h\(t / 3600)"
            } else if age < 7 * 86400 {
                slot = "d\(t / 86400)"
            } else {
                // Weeks from the epoch (a Thursday), as UTC days / 7.
                slot = "w\(t / (7 * 86400))"
            }
            if !seen.insert(slot).inserted { delete.append(t) }
        }
        return delete
    }
}

extension TxnMetadata {
    /// Takes the backup lease for `seconds` when a backup is due (none finished for `interval`
    /// seconds) and no other client holds it; returns whether this one (`holder`) does now.
    package func takeBackupLease(holder: UInt64, interval: Int64, seconds: Int64) throws(FSError) -> Bool {
        let now = Timespec.now().sec
        return try store.transaction(write: true) { (tx) throws(FSError) -> Bool in
            try store.prefetch(tx, [.setting("lastBackup"), .setting("backupLease")])
            if let last = try store.setting(tx, "lastBackup").flatMap({ Int64($0) }), now - last < interval { return false }
            if let lease = try store.setting(tx, "backupLease") {
                let parts = lease.split(separator: " ")
                if parts.count == 2, let h = UInt64(parts[0]), let until = Int64(parts[1]), h != holder, until > now { return false }
            }
            try store.setSetting(tx, "backupLease", "\(holder) \(now + seconds)")
            return true
        }
    }

    /// Records a backup finished at `at` (or, `at` nil, one that failed) and gives the lease back.
    package func finishBackup(holder: UInt64, at: Int64?) throws(FSError) {
        try store.transaction(write: true) { (tx) throws(FSError) in
            if let at { try store.setSetting(tx, "lastBackup", "\(at)") }
            if let lease = try store.setting(tx, "backupLease"), lease.hasPrefix("\(holder) ") {
                try store.setSetting(tx, "backupLease", "0 0")
            }
        }
    }
}
