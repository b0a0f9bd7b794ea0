import ArgumentParser
import Compress
import Metadata
import ObjectStorage
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// One backup: the volume dumped (zstd, no secrets) into `<volume>/meta/<name>` of its bucket.
/// The dump is held in memory, compressed (about 3 bytes per file), then stored in one put.
/// `cancelled` is asked as the dump goes (a mount that is being unmounted stops it).
func takeBackup(
    _ admin: any DumpAdmin, _ store: any ObjectStore, volume: String, at: Int64, cancelled: @escaping () -> Bool = { false }
) throws(FSError) -> (key: String, bytes: Int, stats: DumpStats) {
    let sink = CancellableSink(cancelled)
    let stats = try admin.dump(into: try StreamCodec.zstd.encoding(into: sink), keepSecrets: false, progress: { _ in })
    let key = Backups.prefix(volume: volume) + Backups.name(at: at)
    try store.put(key, bytes: sink.bytes)
    try store.sync([key])
    return (key, sink.bytes.count, stats)
}

/// Bytes in memory, until `cancelled` says to stop (then a write fails with `ECANCELED`).
final class CancellableSink: ByteSink {
    private(set) var bytes: [UInt8] = []
    let cancelled: () -> Bool

    init(_ cancelled: @escaping () -> Bool) { self.cancelled = cancelled }

    func write(_ b: UnsafeRawBufferPointer) throws(FSError) {
        if cancelled() { throw FSError(ECANCELED, "stopped") }
        bytes.append(contentsOf: b)
    }

    func finish() throws(FSError) {}
}

/// The backups in the bucket, oldest first: (name, time, size).
func listBackups(_ store: any ObjectStore, volume: String) throws(FSError) -> [(name: String, time: Int64, size: Int)] {
    let prefix = Backups.prefix(volume: volume)
    return try store.list(prefix: prefix, limit: 1_000_000).compactMap { o -> (String, Int64, Int)? in
        let name = String(o.key.dropFirst(prefix.count))
        guard let t = Backups.time(of: name) else { return nil }
        return (name, t, Int(o.size))
    }.sorted { $0.1 < $1.1 }
}

/// Deletes the backups the thinning rule lets go (`Backups.thinned`); returns how many.
@discardableResult
func thinBackups(_ store: any ObjectStore, volume: String, now: Int64) throws(FSError) -> Int {
    let all = try listBackups(store, volume: volume)
    let gone = Set(Backups.thinned(all.map(\.time), now: now))
    var n = 0
    for b in all where gone.contains(b.time) {
        try store.delete(Backups.prefix(volume: volume) + b.name)
        n += 1
    }
    return n
}

/// A mount's automatic backups (`mount --backup-meta`): a thread that, every so often, takes the
/// volume's backup lease when a backup is due and no other client holds it, dumps into the
/// bucket and thins the old ones.
final class MetaBackupRunner: Sendable {
    private let life = ThreadLife()
    private let admin: any DumpAdmin
    private let meta: any MetadataEngine
    private let store: any ObjectStore
    private let volume: String
    private let interval: Int
    private let explicit: Bool
    private let holder: @Sendable () -> UInt64

    init(
        admin: any DumpAdmin, meta: any MetadataEngine, store: any ObjectStore, volume: String, interval: Int, explicit: Bool,
        holder: @escaping @Sendable () -> UInt64
    ) {
        self.admin = admin
        self.meta = meta
        self.store = store
        self.volume = volume
        self.interval = interval
        self.explicit = explicit
        self.holder = holder
    }

    func start() { life.start { [self] in run() } }

    func stop() { life.stop() }

    private func run() {
        // Checked at least every minute (more often for short intervals).
        let every = Double(min(60, max(1, interval / 2)))
        var skipped = false
        while true {
            if life.lock.withLock({ life.pause(seconds: every) }) { break }
            do {
                if !explicit {
                    let inodes = try meta.statfs().usedInodes
                    if let secs = Backups.tooBig(inodes: inodes, interval: interval) {
                        if !skipped {
                            Log.warning(
                                "automatic metadata backup skipped: the volume has \(inodes) inodes, about \(Int(secs)) s to dump, too long for a backup every \(Setting.durationText(interval)); give --backup-meta to back it up anyway"
                            )
                            skipped = true
                        }
                        continue
                    }
                }
                let h = holder()
                guard try admin.takeBackupLease(holder: h, interval: Int64(interval), seconds: Int64(max(3600, interval))) else { continue }
                let at = Timespec.now().sec
                do {
                    let (key, bytes, stats) = try takeBackup(admin, store, volume: volume, at: at) { [life] in life.lock.withLock { life.stopping } }
                    try admin.finishBackup(holder: h, at: at)
                    let gone = try thinBackups(store, volume: volume, now: at)
                    Log.info(
                        "metadata backup \(key): \(stats.inodes) inodes, \(humanBytes(UInt64(bytes)))"
                            + (gone > 0 ? "; \(gone) older backup(s) thinned out" : ""))
                } catch {
                    try? admin.finishBackup(holder: h, at: nil)
                    if error.code != ECANCELED { Log.error("metadata backup failed: \(error.message)") }
                }
            } catch {
                Log.warning("metadata backup: \(error.message)")
            }
        }
    }
}

/// The backup runner of a mount or a gateway for its volume (nil: `every` is 0, or the engine
/// is a gateway's client). A SQLite dump reads one snapshot in one transaction: on a
/// connection of its own, so that the client's operations never wait for it.
func startBackups(
    url: MetaURL, meta: any MetadataEngine, store: any ObjectStore, volume: String, every: Int, explicit: Bool,
    holder: @escaping @Sendable () -> UInt64
) -> MetaBackupRunner? {
    guard every > 0, meta is any DumpAdmin else { return nil }
    var own: any MetadataEngine = meta
    if case .sqlite = url, let e = try? openMetadata(url) { own = e }
    guard let admin = own as? any DumpAdmin else { return nil }
    let r = MetaBackupRunner(admin: admin, meta: own, store: store, volume: volume, interval: every, explicit: explicit, holder: holder)
    r.start()
    return r
}

/// `stagefs backup list|restore|now`.
struct BackupCmd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "backup",
        abstract: "List, take and restore the metadata backups kept in the volume's bucket.",
        discussion: """
            Mounts take a backup of the volume's metadata into its bucket every --backup-meta
            (1h by default; one mount at a time, through a lease in the metadata), as a zstd dump
            named <volume>/meta/dump-YYYYMMDD-HHMMSS.json.zst (UTC), without the S3 secret key.
            Old ones are thinned: the newest is always kept, then the first of each hour for a
            day, the first of each day for a week, the first of each week after that.

            The volume is named by its META-URL, or, when the metadata is lost, by its bucket:
            --bucket URL [--storage s3] --volume NAME (S3 keys from AWS_ACCESS_KEY_ID and
            AWS_SECRET_ACCESS_KEY). 'restore' loads a backup (a name from 'list', or latest)
            into an empty engine, as 'stagefs load' does.

            Examples:
              stagefs backup list redis://10.0.0.5:6379/1
              stagefs backup now redis://10.0.0.5:6379/1
              stagefs backup restore --bucket http://s3:9000/data --storage s3 --volume vol1 latest --to redis://10.0.0.6:6379/1
            """,
        subcommands: [List.self, Now.self, Restore.self]
    )

    /// The bucket of a volume whose metadata is lost.
    struct BucketOptions: ParsableArguments {
        @Option(help: "The volume's bucket, when its metadata is lost (a directory, or http(s)://host:port/bucket).")
        var bucket: String?
        @Option(help: "The bucket's storage with --bucket: file or s3.")
        var storage: String = "file"
        @Option(help: "The volume's name with --bucket.")
        var volume: String?
    }

    /// The volume's bucket and name, from --bucket or else from META-URL; its engine too when
    /// META-URL names one.
    static func open(_ metaURL: String?, _ b: BucketOptions) throws -> (store: any ObjectStore, volume: String, meta: (any MetadataEngine)?) {
        if let bucket = b.bucket {
            guard let volume = b.volume else { throw FSError.usage("--bucket needs --volume NAME (the name given at format)") }
            guard b.storage == "file" || b.storage == "s3" else { throw FSError.usage("--storage takes file or s3") }
            let env = { (n: String) in getenv(n).map { String(cString: $0) } }
            let store = try openObjectStore(
                StoreConfig(storage: b.storage, bucket: bucket, accessKey: env("AWS_ACCESS_KEY_ID"), secretKey: env("AWS_SECRET_ACCESS_KEY")))
            return (store, volume, nil)
        }
        let (store, volume, admin) = try BackupCmd.volume(metaURL)
        return (store, volume, admin as? any MetadataEngine)
    }

    /// The volume META-URL names (or STAGEFS_VOLUME): its bucket, its name and its engine.
    static func volume(_ metaURL: String?) throws -> (store: any ObjectStore, volume: String, admin: any DumpAdmin) {
        guard let text = metaURL ?? defaultVolume() else { throw FSError.usage("name the volume: its META-URL, or --bucket URL --volume NAME") }
        let meta = try openEngine(try metaURLArgument(text))
        let format = try meta.requireFormat()
        guard let admin = meta as? any DumpAdmin else {
            throw FSError.usage("\(text) names a gateway: backups take the volume's own META-URL (an admin's)")
        }
        let store = try openObjectStore(
            StoreConfig(storage: format.storage, bucket: format.bucket, accessKey: format.accessKey, secretKey: format.secretKey))
        return (store, format.name, admin)
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "The backups in the bucket, oldest first.")
        @Argument(help: "The volume's META-URL (default: STAGEFS_VOLUME).")
        var metaURL: String?
        @OptionGroup var lost: BucketOptions

        func run() throws {
            let (store, volume, _) = try BackupCmd.open(metaURL, lost)
            let all = try listBackups(store, volume: volume)
            if all.isEmpty {
                printError("stagefs: no backups of volume '\(volume)' in \(store.description)")
                return
            }
            print("BACKUP                                 TAKEN (UTC)           SIZE")
            for b in all {
                let taken = String(timeText(b.time).dropLast(4))
                print(b.name + String(repeating: " ", count: max(1, 39 - b.name.count)) + taken + "   " + humanBytes(UInt64(b.size)))
            }
        }
    }

    struct Now: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Take a backup now (and thin the old ones).")
        @Argument(help: "The volume's META-URL (default: STAGEFS_VOLUME).")
        var metaURL: String?

        func run() throws {
            let (store, volume, admin) = try BackupCmd.volume(metaURL)
            let at = Timespec.now().sec
            let (key, bytes, stats) = try takeBackup(admin, store, volume: volume, at: at)
            try admin.finishBackup(holder: 0, at: at)
            let gone = try thinBackups(store, volume: volume, now: at)
            printError(
                "stagefs: backup \(key): \(stats.inodes) inodes, \(humanBytes(UInt64(bytes)))"
                    + (gone > 0 ? "; \(gone) older backup(s) thinned out" : ""))
        }
    }

    struct Restore: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Load a backup into an empty engine.",
            discussion: """
                stagefs backup restore META-URL BACKUP --to TARGET-META-URL
                stagefs backup restore --bucket URL [--storage s3] --volume NAME BACKUP --to TARGET-META-URL
                """)
        @Argument(
            help: ArgumentHelp(
                "[META-URL] BACKUP: the volume (unless --bucket), and a backup's name from 'backup list' or latest.", valueName: "meta-url-and-backup"
            ))
        var words: [String] = []
        @OptionGroup var lost: BucketOptions
        @Option(help: "The META-URL of an empty engine to load it into.")
        var to: String

        func validate() throws {
            let need = lost.bucket == nil && defaultVolume() == nil ? 2 : 1
            if words.count < need || words.count > 2 {
                throw ValidationError(
                    lost.bucket == nil ? "give META-URL BACKUP (or --bucket URL --volume NAME BACKUP)" : "with --bucket give only BACKUP")
            }
            if lost.bucket != nil && words.count != 1 { throw ValidationError("with --bucket give only BACKUP") }
        }

        func run() throws {
            let backup = words.last!
            let (store, volume, _) = try BackupCmd.open(words.count == 2 ? words[0] : nil, lost)
            let all = try listBackups(store, volume: volume)
            guard let pick = backup == "latest" ? all.last : all.first(where: { $0.name == backup }) else {
                throw FSError(ENOENT, "no backup '\(backup)' of volume '\(volume)' in \(store.description): see 'stagefs backup list'")
            }
            let input = try StreamCodec.zstd.decoding(ObjectSource(store, key: Backups.prefix(volume: volume) + pick.name))
            try loadDump(input, into: to, juiceFS: false, what: " from backup " + pick.name)
        }
    }
}

/// An object read in order, 4 MiB a request.
final class ObjectSource: ByteSource {
    let store: any ObjectStore
    let key: String
    var offset = 0

    init(_ store: any ObjectStore, key: String) {
        self.store = store
        self.key = key
    }

    func read(into buffer: UnsafeMutableRawBufferPointer) throws(FSError) -> Int {
        let n = try store.get(key, offset: offset, into: UnsafeMutableRawBufferPointer(rebasing: buffer[..<min(buffer.count, 4 << 20)]))
        offset += n
        return n
    }
}
