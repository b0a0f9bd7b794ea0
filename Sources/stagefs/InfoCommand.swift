import ArgumentParser
import DataPath
import Metadata
import ObjectStorage
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

struct Info: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show the inode, attributes, chunks and object keys of files in a StageFS mount.",
        discussion:
            "For a file, each block's stored size and the total beside the blocks' own bytes (the compression's effect), when this user reaches the bucket (a direct mount; not through a gateway), for its first 10,000 blocks."
    )

    @Argument(help: "Paths inside a StageFS mount of this node.")
    var paths: [String]

    func validate() throws {
        if paths.isEmpty { throw ValidationError("name at least one path") }
    }

    func run() throws {
        var failed = false
        for p in paths {
            do {
                try show(p)
            } catch {
                printError("stagefs: \(error.message)\n")
                failed = true
            }
        }
        if failed { throw ExitCode(1) }
    }

    private func show(_ p: String) throws(FSError) {
        // Resolve the directory part only, so a symlink is shown itself.
        let trimmedPath = p.count > 1 && p.hasSuffix("/") ? String(p.dropLast()) : p
        let base = trimmedPath.split(separator: "/").last.map(String.init) ?? trimmedPath
        let dir = trimmedPath.contains("/") ? Sys.dirname(of: trimmedPath) : "."
        let path =
            base == "." || base == ".." || trimmedPath == "/"
            ? absolutePath(trimmedPath) : "\(absolutePath(dir) == "/" ? "" : absolutePath(dir))/\(base)"
        var st = stat()
        if lstat(path, &st) != 0 { throw FSError.errno(errno, path) }
        guard let mount = MountTable.containing(path) else { throw FSError(EINVAL, "\(path) is not inside a StageFS mount") }
        guard let record = Runtime.load(mount.mountPoint) else {
            throw FSError(ENOENT, "no record of the mount at \(mount.mountPoint) for uid \(getuid()) (was it mounted by another user?)")
        }
        let meta = try openEngine(try record.metadataURL())
        let format = try meta.requireFormat()
        let layout = Layout(volume: format.name, blockSize: format.blockSize)
        var ino = Ino(st.st_ino)
        if throughGateway(meta) || (ino == rootIno && record.subdir != nil) {
            // A gateway answers only for inodes reached through lookups, as this user; the
            // root of a --subdir mount is that directory.
            ino = try lookupPath(meta, record.volumePath(path), processCredential(), what: path).0
        }
        let a = try meta.getattr(ino)
        print("\(path):")
        print("  inode:  \(ino)")
        print("  type:   \(a.type)  mode: 0\(String(a.mode, radix: 8))  uid: \(a.uid)  gid: \(a.gid)  links: \(a.nlink)")
        print("  size:   \(a.size) (\(humanBytes(a.size)))")
        print("  mtime:  \(timeText(a.mtime.sec, nanos: a.mtime.nsec))")
        if a.type == .symlink { print("  target: \(String(decoding: try meta.readlink(ino), as: UTF8.self))") }
        guard a.type == .regular, a.size > 0 else { return }
        // The bytes the bucket holds for the file's blocks, asked of the store where this user
        // reaches it (not through a gateway), for the first `statLimit` blocks.
        let store: (any ObjectStore)? =
            throughGateway(meta)
            ? nil
            : try? openObjectStore(
                StoreConfig(storage: format.storage, bucket: format.bucket, accessKey: format.accessKey, secretKey: format.secretKey))
        var asked = 0
        var stored = StoredCounts()
        var unknown = 0
        let chunks = UInt32((a.size + chunkSize - 1) / chunkSize)
        print("  chunks: \(chunks)")
        for idx in 0..<chunks {
            let slices = try meta.readChunk(ino, idx)
            print("    chunk \(idx): \(slices.count) slice(s)")
            for s in slices {
                if s.id == 0 {
                    print("      hole at \(s.pos) length \(s.len)")
                    continue
                }
                print("      slice \(s.id) at \(s.pos) length \(s.len) (bytes \(s.off)..<\(s.off + s.len) of \(s.size))")
                for b in layout.blocks(of: s) {
                    var size: Int?
                    if let store, asked < Self.statLimit {
                        asked += 1
                        size = (try? store.head(b.key)) ?? nil
                    }
                    if let size {
                        stored.blockBytes += Int64(b.length)
                        stored.storedBytes += Int64(size)
                        print("        \(b.key)  (\(size) bytes stored)")
                    } else {
                        unknown += 1
                        print("        \(b.key)")
                    }
                }
            }
        }
        guard stored.blockBytes > 0 else { return }
        print(
            "  stored: \(storedText((stored.blockBytes, stored.storedBytes))), compression \(format.compressionName)"
                + (unknown > 0 ? "; \(unknown) block(s) not asked" : ""))
    }

    /// The most blocks of one file whose stored size is asked of the store.
    static let statLimit = 10_000
}
