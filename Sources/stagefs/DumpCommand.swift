import ArgumentParser
import Compress
import Metadata
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// `stagefs dump META-URL [FILE|-]`.
struct DumpCmd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dump",
        abstract: "Write the volume's metadata (tree, attributes, data layout, trash, quotas) to a JSON file.",
        discussion: """
            The dump holds everything 'stagefs load' needs to make the same volume again over the
            same bucket: every file and directory with its attributes and extended attributes,
            symlinks, hard links, the chunks and slices that say where each file's data is, the
            trash, quotas and the volume's settings. It holds no data: the objects stay in the
            bucket. The S3 secret key and the volume's own secrets are left out unless
            --keep-secret-key (keep such a dump as safe as the key).

            FILE ending in .gz is gzip, in .zst zstd (or --compress); '-' or no FILE writes to
            standard output. The file is written under a temporary name and renamed when
            complete, mode 0600. Memory stays bounded (about one bit per inode number, plus a
            page of a directory), so a volume of any size can be dumped while it is in use.

            SQLite volumes are dumped from one snapshot: exactly the volume at one moment,
            writers going on meanwhile. Redis volumes are read a directory page at a time: each
            file as it was at one moment, the whole as it was during the dump (a file created or
            renamed meanwhile may be in it or not; no file appears twice). 'stagefs load' makes
            link counts, usage and quotas agree with what the dump holds.

            Examples:
              stagefs dump redis://10.0.0.5:6379/1 /backup/vol-$(date +%F).json.zst
              stagefs dump sqlite3:///var/lib/stagefs/vol.db - | ssh backup 'cat > vol.json'
            """
    )

    @Argument(help: "The volume's META-URL (default: STAGEFS_VOLUME).")
    var metaURL: String?

    @Argument(help: "Where to write the dump ('-' or none: standard output).")
    var file: String?

    @Option(help: "Compression: none, gzip or zstd (default: by FILE's name).")
    var compress: String?

    @Flag(help: "Keep the S3 secret key and the volume's secrets in the dump.")
    var keepSecretKey = false

    func validate() throws {
        if let c = compress, StreamCodec(rawValue: c) == nil { throw ValidationError("--compress takes none, gzip or zstd") }
    }

    func run() throws {
        guard let text = metaURL ?? defaultVolume() else { throw FSError.usage("name the volume: its META-URL, or STAGEFS_VOLUME") }
        let meta = try openEngine(try metaURLArgument(text))
        _ = try meta.requireFormat()
        guard let admin = meta as? any DumpAdmin else {
            throw FSError.usage("\(text) names a gateway: a dump takes the volume's own META-URL (an admin's)")
        }
        let toStdout = file == nil || file == "-"
        let codec = compress.flatMap(StreamCodec.init(rawValue:)) ?? (toStdout ? .none : StreamCodec.named(file!))
        var fd: Int32 = 1
        var tmp = ""
        if !toStdout {
            tmp = file! + ".tmp-\(getpid())"
            fd = try Sys.open(tmp, O_WRONLY | O_CREAT | O_EXCL, 0o600)
        } else if isatty(1) != 0 {
            throw FSError.usage("standard output is a terminal: give a FILE, or redirect it")
        }
        let where_ = toStdout ? "standard output" : file!
        let progress = Progress(verb: "dumped")
        do {
            let sink = try codec.encoding(into: FileSink(fd: fd, path: where_))
            let start = Sys.monotonicNanos()
            let stats = try admin.dump(into: sink, keepSecrets: keepSecretKey, progress: progress.show)
            if !toStdout {
                try Sys.fsync(fd, path: tmp)
                Sys.close(fd)
                try Sys.rename(tmp, file!)
            }
            progress.done(stats, seconds: Double(Sys.monotonicNanos() - start) / 1e9, to: where_)
        } catch {
            if !toStdout {
                Sys.close(fd)
                try? Sys.unlinkIfPresent(tmp)
            }
            throw error
        }
    }
}

/// `stagefs load META-URL FILE|-`.
struct LoadCmd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "load",
        abstract: "Make a volume from a dump, in an empty metadata engine.",
        discussion: """
            Loads what 'stagefs dump' wrote into META-URL, which must hold no volume (a new
            SQLite file, an empty Redis database): SQLite to Redis and back, or a backup again.
            The volume is the same (name, uuid, bucket, settings) and reads the same objects:
            do not mount the old and the new one at once over the same bucket, as each would
            delete objects the other still uses.

            gzip and zstd dumps are recognised by their content. Changes go in batches; link
            counts, usage, the trash's counters, clone references and quotas are counted from
            what the dump holds. The volume is usable only once the load is complete: a load
            that fails leaves no volume (empty the engine and load again).

            A dump without the S3 secret key takes it from AWS_SECRET_ACCESS_KEY when set;
            otherwise mounts need --secret-key.

            --from-juicefs DUMP takes the JSON output of 'juicefs dump' (1.4) instead and makes a
            StageFS volume over the same bucket and the same objects, copying no data (README:
            "Moving from JuiceFS"). A volume that cannot be read as it is (compressed or
            encrypted blocks, a hash prefix or shards in its keys, POSIX ACLs, another storage)
            is refused with the reason.

            Examples:
              stagefs load redis://10.0.0.6:6379/1 /backup/vol-2026-12-06.json.zst
              stagefs dump sqlite3:///var/lib/stagefs/vol.db - | stagefs load redis://10.0.0.6:6379/1 -
              stagefs load --from-juicefs jfs-dump.json redis://10.0.0.6:6379/2
            """
    )

    @Argument(help: "The META-URL of an empty engine.")
    var metaURL: String

    @Argument(help: "The dump ('-': standard input).")
    var file: String?

    @Option(help: "A JuiceFS dump to take over ('-': standard input).")
    var fromJuicefs: String?

    func validate() throws {
        if (file == nil) == (fromJuicefs == nil) { throw ValidationError("give the dump: FILE, or --from-juicefs DUMP") }
    }

    func run() throws {
        let path = fromJuicefs ?? file!
        let fd = path == "-" ? 0 : try Sys.open(path, O_RDONLY)
        defer { if fd != 0 { Sys.close(fd) } }
        let (source, _) = try decodingSniffed(FileSource(fd: fd, path: path == "-" ? "standard input" : path))
        try loadDump(source, into: metaURL, juiceFS: fromJuicefs != nil, what: "")
    }
}

/// Loads a dump (`juiceFS`: JuiceFS's) from `source` into the empty engine `target` names,
/// with progress on a terminal and a summary line naming `what` it came from. The S3 secret key,
/// when the dump has none, comes from `AWS_SECRET_ACCESS_KEY`.
func loadDump(_ source: ByteSource, into target: String, juiceFS: Bool, what: String) throws {
    // A SQLite file made here holds the volume's keys: its owner's alone.
    umask(0o077)
    let meta = try openMetadata(try metaURLArgument(target), create: true)
    guard let admin = meta as? any DumpAdmin, let jfs = meta as? any JuiceFSLoadAdmin else {
        throw FSError(EOPNOTSUPP, "\(meta.displayName) cannot load a dump")
    }
    let secret = getenv("AWS_SECRET_ACCESS_KEY").map { String(cString: $0) }.flatMap { $0.isEmpty ? nil : $0 }
    let progress = Progress(verb: "loaded")
    let start = Sys.monotonicNanos()
    let reader = JSONReader(source, maxValueBytes: 16 << 20)
    let stats =
        juiceFS
        ? try jfs.loadJuiceFS(from: reader, secretKey: secret, progress: progress.show)
        : try admin.load(from: reader, secretKey: secret, progress: progress.show)
    progress.done(stats, seconds: Double(Sys.monotonicNanos() - start) / 1e9, to: meta.displayName + what)
    for n in stats.notes { printError("stagefs: note: \(n)") }
    if let f = try meta.loadFormat(), f.storage == "s3", f.secretKey == nil {
        printError("stagefs: note: the dump holds no S3 secret key: mount with --secret-key (or load with AWS_SECRET_ACCESS_KEY set)")
    }
}

/// A dump's or a load's progress on a terminal, and its summary line.
final class Progress {
    let verb: String
    let tty = isatty(2) != 0

    init(verb: String) { self.verb = verb }

    func show(_ s: DumpStats) {
        guard tty else { return }
        printError(
            "\rstagefs: \(verb) \(s.inodes) inodes, \(s.entries) names, \(s.slices) slices (\(humanBytes(s.bytes)) of files)...", newline: false)
    }

    func done(_ s: DumpStats, seconds: Double, to: String) {
        if tty { printError("\r\u{1B}[K", newline: false) }
        let dirs = s.directories == 1 ? "directory" : "directories"
        printError(
            "stagefs: \(verb) \(s.inodes) inodes (\(s.directories) \(dirs)), \(s.entries) names, \(s.chunks) chunks, \(s.slices) slices (\(humanBytes(s.bytes)) of files) \(verb == "dumped" ? "to" : "into") \(to) in \((seconds * 10).rounded() / 10) s"
        )
    }
}
