import ArgumentParser
import Compress
import Metadata
import ObjectStorage
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// A group named by name or number.
func groupID(_ name: String) throws(FSError) -> gid_t {
    if let g = getgrnam(name) { return g.pointee.gr_gid }
    if let n = gid_t(name), getgrgid(n) != nil { return n }
    throw FSError(ENOENT, "no such group '\(name)' (see getent group)")
}

struct Format: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create a volume (or check an existing one has the same settings).",
        discussion: """
            Writes the volume's format record into the metadata store, creates the root directory \
            and checks the object store by writing, reading back and deleting a probe object. \
            Formatting an existing volume again with the same settings is harmless; other settings \
            are refused unless --force, which records them but moves no data: files already written \
            under another name, storage, bucket or block size become unreadable.

            A file bucket that several users write (a directory on NFS, Lustre or GPFS) must be
            shared by a group of theirs: --bucket-group GROUP makes the bucket directory
            root:GROUP mode 2770 (set-group-ID, group-writable) and gives what is in it to the
            group; StageFS then creates every directory in it group-writable and set-group-ID and
            every object group-readable, whatever the writer's umask. Formatting the volume again
            with --bucket-group is accepted (it is not one of the settings compared) and repairs
            a bucket written before it was shared. Without it the bucket belongs to whoever
            formats it. The bucket directory may be new; its parent must exist.

            Examples:
              stagefs format sqlite3:///var/lib/stagefs/demo.db demo \\
                  --bucket /var/lib/stagefs/data
              stagefs format redis://10.0.0.5:6379/1 shared \\
                  --bucket /lustre/stagefs/shared --bucket-group hpcusers
              stagefs format redis://127.0.0.1:6379/1 datasets \\
                  --storage s3 --bucket http://127.0.0.1:9000/stagefs \\
                  --access-key KEY --secret-key SECRET
            """
    )

    @Argument(help: metaURLHelp)
    var metaURL: String

    @Argument(help: "Volume name: 3 to 63 characters of a-z, 0-9 and '-'. Object keys start with it.")
    var name: String

    @Option(help: "Object storage kind: file (a local or shared directory) or s3.")
    var storage = "file"

    @Option(
        help: "For file: an absolute directory (default /var/lib/stagefs for root, ~/.stagefs/local otherwise). For s3: http(s)://host:port/bucket.")
    var bucket: String?

    @Option(
        help: "For file: the group whose members all write the volume; the bucket becomes root:GROUP mode 2770 and what is in it the group's.")
    var bucketGroup: String?

    @Option(help: "S3 access key (default: $AWS_ACCESS_KEY_ID).")
    var accessKey: String?

    @Option(help: "S3 secret key (default: $AWS_SECRET_ACCESS_KEY).")
    var secretKey: String?

    @Option(help: "Block size in KiB: a power of two from 64 to 16384.")
    var blockSize = 4096

    /// A volume keeps the value it was formatted with when this is not given.
    @Option(
        help: ArgumentHelp(
            "Days deleted files wait in the volume's trash (/.trash) before they are purged (default 1; 0: no trash).",
            discussion:
                "A regular file whose last name goes (rm, a rename over it) waits there; 'stagefs trash' lists, restores and purges. Its space stays counted until it is purged. Another value on a formatted volume needs --force (files stay; mounts follow within a minute).",
            valueName: "days"))
    var trashDays: Int?

    /// A volume keeps the value it was formatted with when this is not given.
    @Option(
        help: ArgumentHelp(
            "The volume's capacity, SIZE (10G, 1T, 500M; a plain number is GiB; 0: none, the default).",
            discussion: "Writes past it fail with ENOSPC and df shows it. Another value on a formatted volume needs --force (files stay).",
            valueName: "size"))
    var capacity: String?

    @Option(help: ArgumentHelp("The most inodes the volume holds (0: no limit, the default).", valueName: "n"))
    var inodes: UInt64?

    /// A volume keeps the value it was formatted with when this is not given.
    @Option(
        help: ArgumentHelp(
            "How blocks are stored: none (the default), lz4 or zstd.",
            discussion:
                "Each block is compressed whole by the client that writes it and read back whole (lz4: fast; zstd: smaller). Fixed once the volume is formatted; 'stagefs status' shows the bytes stored beside the bytes written.",
            valueName: "codec"))
    var compress: String?

    @Option(
        help: ArgumentHelp(
            "Mode of the volume's root directory, in octal (owner root).",
            discussion:
                "1777 (the default, like /tmp) lets every user create files at the top and only remove their own; 755 keeps the top level to root, who then makes a directory per user or project."
        ))
    var rootMode: String?

    @Flag(
        help: ArgumentHelp(
            "Overwrite the settings of an existing volume.",
            discussion:
                "Its files and uuid stay, but no data is moved: files already written under another name, storage, bucket or block size become unreadable."
        ))
    var force = false

    func validate() throws {
        let ok =
            name.count >= 3 && name.count <= 63 && name.utf8.allSatisfy { ($0 >= 97 && $0 <= 122) || ($0 >= 48 && $0 <= 57) || $0 == 45 }
            && !name.hasPrefix("-") && !name.hasSuffix("-")
        if !ok { throw ValidationError("invalid volume name '\(name)': use 3 to 63 characters of a-z, 0-9 and '-' (not first or last)") }
        if storage != "file" && storage != "s3" { throw ValidationError("unknown --storage '\(storage)': use file or s3") }
        if blockSize < 64 || blockSize > 16384 || blockSize & (blockSize - 1) != 0 {
            throw ValidationError("invalid --block-size \(blockSize): use a power of two from 64 to 16384 (KiB)")
        }
        if let trashDays, trashDays < 0 { throw ValidationError("--trash-days cannot be negative") }
        if let c = compress, BlockCodec(rawValue: c) == nil { throw ValidationError("unknown --compress '\(c)': use none, lz4 or zstd") }
        if let c = capacity, parseSize(c) == nil { throw ValidationError("--capacity takes a size such as 500M, 10G or 1T (a plain number is GiB)") }
        if bucketGroup != nil && storage != "file" { throw ValidationError("--bucket-group is for --storage file (a directory)") }
        if storage == "s3" && bucket == nil { throw ValidationError("--storage s3 needs --bucket http(s)://host:port/bucket") }
        if let rootMode {
            guard let m = UInt16(rootMode, radix: 8), m <= 0o7777 else {
                throw ValidationError("invalid --root-mode '\(rootMode)': give octal permission bits such as 1777 or 755")
            }
        }
    }

    func run() throws {
        if storage == "file", let bucket, !bucket.hasPrefix("/") {
            throw FSError.usage(
                "--bucket takes an absolute directory for --storage file (every client and the gateway find the data by that path): did you mean --bucket \(absolutePath(bucket))?"
            )
        }
        let url = try metaURLArgument(metaURL)
        let env = { (n: String) in getenv(n).map { String(cString: $0) } }
        var bucketURL = bucket ?? (getuid() == 0 ? "/var/lib/stagefs" : "\(homeDirectory())/.stagefs/local")
        if storage == "file" { bucketURL = absolutePath(bucketURL) }
        let key = storage == "s3" ? (accessKey ?? env("AWS_ACCESS_KEY_ID")) : nil
        let secret = storage == "s3" ? (secretKey ?? env("AWS_SECRET_ACCESS_KEY")) : nil
        let meta = try openMetadata(url, create: true)
        warnIfVolatile(meta)
        let existing = try meta.loadFormat()
        let record = VolumeFormat(
            name: name, storage: storage, bucket: bucketURL, accessKey: key, secretKey: secret, blockSizeKiB: blockSize,
            trashDays: trashDays ?? existing?.trashDays ?? 1, capacity: capacity.flatMap(parseSize) ?? existing?.capacity,
            inodes: inodes ?? existing?.inodes, compression: compress ?? existing?.compression)
        if let old = existing, old.differences(from: record).isEmpty == false, !force {
            // Refuse before touching the store.
            try meta.initialize(record, force: false, rootMode: 0)
        }
        // A bucket named on a shared file system that is not mounted here must not end up on the
        // local disk: the bucket directory may be new, its parent must exist.
        if storage == "file", bucket != nil, Sys.stat(bucketURL) == nil, Sys.stat(Sys.dirname(of: bucketURL)) == nil {
            throw FSError(
                ENOENT,
                "the parent of the bucket directory \(bucketURL) does not exist: is its file system mounted on this node? (create \(Sys.dirname(of: bucketURL)) first if it is meant to be new)"
            )
        }
        var shareNote: String?
        if let bucketGroup {
            let gid = try groupID(bucketGroup)
            do {
                let n = try LocalObjectStore.share(root: bucketURL, gid: gid)
                shareNote = "  shared by group \(bucketGroup) (mode 2770)\(n > 1 ? ": \(n - 1) entries given to the group" : "")"
            } catch {
                throw error.context("cannot share \(bucketURL) with group \(bucketGroup) (root, or an owner who is in that group, can)")
            }
        }
        let store = try openObjectStore(StoreConfig(storage: storage, bucket: bucketURL, accessKey: key, secretKey: secret))
        try store.create()
        try store.check(prefix: name)
        try meta.initialize(record, force: force, rootMode: rootMode.flatMap { UInt16($0, radix: 8) } ?? 0o1777)
        if existing != nil, let rootMode {
            printError("stagefs: the volume exists: --root-mode \(rootMode) is not applied to its root directory (chmod it in a mount as root)")
        }
        let f = try meta.requireFormat()
        print("Formatted volume '\(f.name)' (uuid \(f.uuid))")
        print("  metadata: \(url)")
        print("  storage:  \(f.storage) \(f.bucket)")
        if let shareNote { print(shareNote) }
        if storage == "file", bucketGroup == nil, let local = store as? LocalObjectStore, !local.isShared, getuid() == 0 {
            printError(
                "stagefs: note: \(bucketURL) is root's: only root can write this volume's data. For a volume that users write, run this again with --bucket-group GROUP (a group of all of them)"
            )
        }
        print("  block size: \(f.blockSizeKiB) KiB")
        if f.compression != nil { print("  compression: \(f.compressionName)") }
    }
}
