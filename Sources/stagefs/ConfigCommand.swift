import ArgumentParser
import Metadata
import ObjectStorage
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// Asks on the terminal whether to go on (`--yes` answers for it); refuses without a terminal.
func confirm(_ question: String, yes: Bool, expect: String = "y") throws {
    if yes { return }
    guard isatty(0) != 0 else { throw FSError.usage("\(question): add --yes to confirm (standard input is not a terminal)") }
    printError("\(question) [\(expect == "y" ? "y/N" : "type \(expect)")]: ", newline: false)
    let answer = readLine(strippingNewline: true) ?? ""
    if expect == "y" ? !["y", "yes"].contains(answer.lowercased()) : answer != expect {
        throw FSError(ECANCELED, "nothing changed")
    }
}

/// `stagefs config META-URL [--trash-days N] [--capacity SIZE] [--inodes N] ...`.
struct ConfigCmd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "config",
        abstract: "Show or change a volume's settings after format.",
        discussion: """
            Without options it shows the settings (the secret key hidden). With options it
            changes them, shows what changed (old -> new), and asks before the ones that matter:
            a new bucket or storage (the data must already be there: nothing is copied), the
            trash turned off (deleted files are then gone at once), a capacity or inode limit
            below what the volume uses (writes fail until it shrinks). New keys or a new bucket
            are tried with a probe object first. Mounts take the change within a minute.

            SIZE has a unit: 10G, 2T (binary); a plain number is GiB; 0 is no limit. Give the
            secret key as AWS_SECRET_ACCESS_KEY rather than --secret-key.

            Examples:
              stagefs config redis://10.0.0.5:6379/1
              stagefs config redis://10.0.0.5:6379/1 --trash-days 7 --capacity 500T
            """
    )

    @Argument(help: "The volume's META-URL (default: STAGEFS_VOLUME).")
    var metaURL: String?

    @Option(help: "Days the trash keeps deleted files (0: no trash).")
    var trashDays: Int?
    @Option(help: "The volume's capacity, SIZE (0: no limit).")
    var capacity: String?
    @Option(help: "The volume's inode limit (0: no limit).")
    var inodes: UInt64?
    @Option(help: "A new bucket (its objects must already be there).")
    var bucket: String?
    @Option(help: "The bucket's storage with --bucket: file or s3.")
    var storage: String?
    @Option(help: "A new S3 access key.")
    var accessKey: String?
    @Option(help: "A new S3 secret key (better: AWS_SECRET_ACCESS_KEY with --secret-key-from-env).")
    var secretKey: String?
    @Flag(help: "Take the new S3 secret key from AWS_SECRET_ACCESS_KEY.")
    var secretKeyFromEnv = false
    @Flag(help: "Change settings that matter without asking.")
    var yes = false

    func validate() throws {
        if let t = trashDays, t < 0 || t > 3650 { throw ValidationError("--trash-days takes 0 to 3650") }
        if let c = capacity, parseSize(c) == nil { throw ValidationError("--capacity takes a size such as 10G or 2T (a plain number is GiB)") }
        if let s = storage, s != "file" && s != "s3" { throw ValidationError("--storage takes file or s3") }
        if secretKey != nil && secretKeyFromEnv { throw ValidationError("give --secret-key or --secret-key-from-env, not both") }
    }

    func run() throws {
        let (meta, format, _) = try adminVolume(metaURL, what: "config")
        guard let admin = meta as? any VolumeAdmin else { throw FSError(EOPNOTSUPP, "\(meta.displayName) cannot be configured") }
        var want = format
        if let t = trashDays { want.trashDays = t }
        if let c = capacity { want.capacity = parseSize(c)! == 0 ? nil : parseSize(c)! }
        if let i = inodes { want.inodes = i == 0 ? nil : i }
        if let b = bucket { want.bucket = b }
        if let s = storage { want.storage = s }
        if let k = accessKey { want.accessKey = k }
        if let s = secretKey { want.secretKey = s }
        if secretKeyFromEnv {
            guard let s = getenv("AWS_SECRET_ACCESS_KEY").map({ String(cString: $0) }), !s.isEmpty else {
                throw FSError.usage("--secret-key-from-env: AWS_SECRET_ACCESS_KEY is not set")
            }
            want.secretKey = s
        }
        if want == format {
            if trashDays == nil && capacity == nil && inodes == nil && bucket == nil && storage == nil && accessKey == nil && secretKey == nil
                && !secretKeyFromEnv
            {
                show(format)
            } else {
                printError("stagefs: no change")
            }
            return
        }
        var changes = want.differences(from: format)
        if want.accessKey != format.accessKey { changes.append("access key \(format.accessKey ?? "none") -> \(want.accessKey ?? "none")") }
        if want.secretKey != format.secretKey { changes.append("secret key changed") }
        // What matters: asked before.
        var matters: [String] = []
        if want.bucket != format.bucket || want.storage != format.storage {
            matters.append("the volume's data is read from \(want.storage) \(want.bucket) from now on: its objects must be there already")
        }
        if want.trashDays == 0 && format.trashDays > 0 { matters.append("the trash goes off: deleted files are gone at once") }
        let usage = try meta.statfs()
        if let c = want.capacity, c < usage.usedSpace {
            matters.append(
                "the capacity \(humanBytes(c)) is below what the volume uses (\(humanBytes(usage.usedSpace))): writes fail until it shrinks")
        }
        if let i = want.inodes, i < usage.usedInodes { matters.append("the inode limit \(i) is below the inodes in use (\(usage.usedInodes))") }
        for c in changes { printError("stagefs: \(c)") }
        if !matters.isEmpty {
            for m in matters { printError("stagefs: note: \(m)") }
            try confirm("change volume '\(format.name)'", yes: yes)
        }
        if want.bucket != format.bucket || want.storage != format.storage || want.accessKey != format.accessKey || want.secretKey != format.secretKey
        {
            let store = try openObjectStore(
                StoreConfig(storage: want.storage, bucket: want.bucket, accessKey: want.accessKey, secretKey: want.secretKey))
            try store.check(prefix: want.name)
        }
        let wanted = want
        _ = try admin.updateFormat { (f: inout VolumeFormat) throws(FSError) in
            // Only what was asked changes (another admin's change in between stays).
            if trashDays != nil { f.trashDays = wanted.trashDays }
            if capacity != nil { f.capacity = wanted.capacity }
            if inodes != nil { f.inodes = wanted.inodes }
            if bucket != nil { f.bucket = wanted.bucket }
            if storage != nil { f.storage = wanted.storage }
            if accessKey != nil { f.accessKey = wanted.accessKey }
            if secretKey != nil || secretKeyFromEnv { f.secretKey = wanted.secretKey }
        }
        printError("stagefs: volume '\(format.name)' changed; mounts take it within a minute")
    }

    private func show(_ f: VolumeFormat) {
        print("name:        \(f.name)")
        print("uuid:        \(f.uuid)")
        print("storage:     \(f.storage)")
        print("bucket:      \(f.bucket)")
        if let k = f.accessKey { print("access key:  \(k)") }
        if f.secretKey != nil { print("secret key:  (set, hidden)") }
        print("block size:  \(f.blockSizeKiB) KiB")
        print("trash days:  \(f.trashDays)")
        print("capacity:    \(f.capacity.map { humanBytes($0) } ?? "no limit")")
        print("inodes:      \(f.inodes.map { String($0) } ?? "no limit")")
    }
}

/// `stagefs destroy META-URL UUID`.
struct DestroyCmd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "destroy",
        abstract: "Delete a volume: all its objects in the bucket and all its metadata.",
        discussion: """
            Refused while a client is connected (a session with a heartbeat in the last 5
            minutes: unmount everywhere first). UUID must be the volume's (stagefs status shows
            it), and the command asks for the volume's name on a terminal unless --yes. Objects
            go first (the blocks and the metadata backups under <volume>/ in the bucket), the
            metadata last: interrupted, it can be run again.

            Example:
              stagefs destroy redis://10.0.0.5:6379/1 3f2a...-...-...
            """
    )

    @Argument(help: "The volume's META-URL.")
    var metaURL: String

    @Argument(help: "The volume's UUID (stagefs status shows it).")
    var uuid: String

    @Flag(help: "Do not ask.")
    var yes = false

    func run() throws {
        let (meta, format, store) = try adminVolume(metaURL, what: "destroy")
        guard let admin = meta as? any VolumeAdmin else { throw FSError(EOPNOTSUPP, "\(meta.displayName) cannot be destroyed") }
        guard uuid == format.uuid else {
            throw FSError(EINVAL, "\(meta.displayName) holds volume '\(format.name)' with uuid \(format.uuid), not \(uuid): nothing deleted")
        }
        let now = Timespec.now().sec
        let live = try meta.listSessions().filter { now - $0.heartbeat < 300 }
        if !live.isEmpty {
            let list = live.prefix(5).map { "\(printable($0.hostname)) pid \($0.pid) \(printable($0.mountPoint))" }.joined(separator: "; ")
            throw FSError(EBUSY, "volume '\(format.name)' has \(live.count) connected client(s) (\(list)): unmount them first; nothing deleted")
        }
        try confirm("delete volume '\(format.name)' and every object of it in \(store.description)", yes: yes, expect: format.name)
        let tty = isatty(2) != 0
        var deleted = 0
        var bytes = 0
        var after: String?
        while true {
            let page = try store.list(prefix: format.name + "/", after: after, limit: 1000)
            for o in page {
                try store.delete(o.key)
                deleted += 1
                bytes += o.size
            }
            if tty { printError("\rstagefs: deleted \(deleted) objects (\(humanBytes(UInt64(bytes))))...", newline: false) }
            // (Until a listing comes back empty: a short page is not proof of the end.)
            guard let last = page.last?.key else { break }
            after = last
        }
        if tty { printError("\r\u{1B}[K", newline: false) }
        try admin.wipe()
        printError(
            "stagefs: volume '\(format.name)' destroyed: \(deleted) objects (\(humanBytes(UInt64(bytes)))) and its metadata in \(meta.displayName) deleted"
        )
    }
}
