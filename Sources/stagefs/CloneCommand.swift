import ArgumentParser
import Metadata
import StageFSCore
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// Set by SIGINT or SIGTERM during a clone: it stops between steps and removes what it made.
private let cloneStopRequested = Atomic<Bool>(false)

private func cloneSignal(_ sig: Int32) { cloneStopRequested.store(true, ordering: .relaxed) }

/// `stagefs clone SRC DST [--preserve]`.
struct CloneCmd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "clone",
        abstract: "Copy a file or a directory tree within a mount without copying data.",
        discussion: """
            The copy records the same data blocks as the original (each gains a reference): it
            takes metadata only, whatever the size, and stores no new bytes. Writes to either
            side never change the other; a block is deleted once nothing refers to it.

            SRC and DST are paths in one StageFS mount of this node; DST must not exist (or is a
            directory, which then gets SRC's name in it). Permissions are checked as you: you
            must be able to read what you clone and write where it goes. The copy is yours, with
            SRC's modes less your umask and the times of now; --preserve keeps modes, owner,
            group and times (owner and group as root, or for your own files in your groups).
            A tree is made under a hidden name and renamed to DST when complete: interrupted
            (Ctrl-C), it is removed and nothing is left. Hard links inside a tree become separate
            files; extended attributes are not copied; the volume's .trash is left out.

            cp of coreutils 9 gets the same sharing through copy_file_range on its own.

            Examples:
              stagefs clone /mnt/vol/models/llama-70b /mnt/vol/models/llama-70b-finetune
              stagefs clone --preserve /mnt/vol/datasets/imagenet /mnt/vol/scratch/imagenet
            """
    )

    @Argument(help: "What to clone: a file or a directory in a StageFS mount.")
    var src: String

    @Argument(help: "Where the clone goes (must not exist, or an existing directory to put it in).")
    var dst: String

    @Flag(help: "Keep modes, owner, group and times.")
    var preserve = false

    func run() throws {
        let srcAbs = absolutePath(src)
        var dstAbs = absolutePath(dst)
        guard let mount = MountTable.containing(srcAbs)?.mountPoint else {
            throw FSError.usage("\(src) is not in a StageFS mount of this node")
        }
        guard MountTable.containing(Sys.dirname(of: dstAbs))?.mountPoint == mount else {
            throw FSError.usage("\(dst) is not in the mount \(mount) that \(src) is in: a clone stays within one volume")
        }
        guard let record = Runtime.load(mount) else {
            throw FSError(ENOENT, "no record of the mount at \(mount) for uid \(getuid()): clone works in your own mounts")
        }
        let meta = try openEngine(try record.metadataURL())
        _ = try meta.requireFormat()
        guard let admin = meta as? any CloneAdmin else { throw FSError(EOPNOTSUPP, "\(meta.displayName) cannot clone") }
        let cred = processCredential()
        let (srcIno, srcAttr) = try lookupPath(meta, record.volumePath(srcAbs), cred, what: src)
        if Trash.isTrash(srcIno) || Trash.isTrash(srcAttr.parent) { throw FSError(EPERM, "\(src) is in the trash: restore it first") }
        // An existing directory as DST takes SRC's name in it.
        if let (_, a) = try? lookupPath(meta, record.volumePath(dstAbs), cred, what: dst) {
            guard a.type == .directory else { throw FSError(EEXIST, "\(dst) exists") }
            dstAbs = dstAbs + "/" + Sys.basename(of: srcAbs)
            if (try? lookupPath(meta, record.volumePath(dstAbs), cred, what: dst)) != nil { throw FSError(EEXIST, "\(dstAbs) exists") }
        }
        let (parent, pa) = try lookupPath(meta, record.volumePath(Sys.dirname(of: dstAbs)), cred, what: Sys.dirname(of: dstAbs))
        guard pa.type == .directory else { throw FSError(ENOTDIR, "\(Sys.dirname(of: dstAbs)) is not a directory") }
        let name = Array(Sys.basename(of: dstAbs).utf8)
        if srcAttr.type == .directory {
            if try isWithin(meta, parent, srcIno) { throw FSError(EINVAL, "\(dst) is inside \(src): a tree cannot be cloned into itself") }
        }
        let mask = UInt16(truncatingIfNeeded: umask(0o022))
        _ = umask(mode_t(mask))
        signal(SIGINT, cloneSignal)
        signal(SIGTERM, cloneSignal)
        let c = Cloner(meta: meta, admin: admin, cred: cred, preserve: preserve, umask: mask)
        let start = Sys.monotonicNanos()
        try c.clone(srcIno, srcAttr, into: parent, as: name)
        let secs = Double(Sys.monotonicNanos() - start) / 1e9
        c.progressLine(final: true)
        printError("stagefs: cloned \(printable(src)) to \(printable(dstAbs)): \(c.files) file(s), \(c.dirs) director\(c.dirs == 1 ? "y" : "ies"), \(humanBytes(c.bytes)) shared, in \((secs * 10).rounded() / 10) s")
    }

    /// Whether directory `ino` is `ancestor` or below it (the walk up stops after 4,096 levels).
    private func isWithin(_ meta: any MetadataEngine, _ ino: Ino, _ ancestor: Ino) throws(FSError) -> Bool {
        var cur = ino
        for _ in 0..<4096 {
            if cur == ancestor { return true }
            if cur == rootIno { return false }
            let a = try meta.getattr(cur)
            cur = a.parent == 0 ? rootIno : a.parent
        }
        return false
    }
}

/// One clone's walk: a file in one step (or a few for a large one), a tree under a hidden name
/// renamed into place at the end, everything made removed again when interrupted or failed.
final class Cloner {
    let meta: any MetadataEngine
    let admin: any CloneAdmin
    let cred: Credential
    let preserve: Bool
    let umask: UInt16
    var files = 0
    var dirs = 0
    var bytes: UInt64 = 0
    private var lastProgress = Sys.monotonicNanos()
    private let tty = isatty(2) != 0

    init(meta: any MetadataEngine, admin: any CloneAdmin, cred: Credential, preserve: Bool, umask: UInt16) {
        self.meta = meta
        self.admin = admin
        self.cred = cred
        self.preserve = preserve
        self.umask = umask
    }

    func clone(_ src: Ino, _ a: Attr, into parent: Ino, as name: [UInt8]) throws {
        if a.type != .directory {
            // A file: in place at once when small; a large one under a hidden name first.
            let temp = hiddenName(name)
            let (ino, first, next) = try admin.cloneFile(cred, src: src, parent: parent, name: next(a) ? temp : name, preserve: preserve, umask: umask)
            guard next != nil else {
                count(first)
                return
            }
            do {
                try finishLarge(src, ino, from: next!)
                _ = try meta.rename(cred, parent, temp, parent, name, .noReplace)
            } catch {
                _ = try? meta.unlink(cred, parent, temp)
                throw error
            }
            count(try meta.getattr(ino))
            return
        }
        let temp = hiddenName(name)
        let (top, _) = try meta.mknod(cred, parent, temp, .directory, 0o700, rdev: 0, target: nil)
        do {
            var fixes: [(ino: Ino, src: Attr)] = [(top, a)]
            try tree(src, top, &fixes)
            // Modes and times last (a read-only directory is filled first), deepest first.
            for f in fixes.reversed() { try finishDir(f.ino, f.src) }
            if cloneStopRequested.load(ordering: .relaxed) { throw FSError(EINTR, "interrupted") }
            _ = try meta.rename(cred, parent, temp, parent, name, .noReplace)
        } catch {
            progressLine(final: true)
            printError("stagefs: removing the partial clone \(String(decoding: temp, as: UTF8.self))")
            removeTree(parent, temp, top)
            if let e = error as? FSError, e.code == EINTR { throw FSError(EINTR, "clone interrupted: the partial clone was removed") }
            throw error
        }
    }

    /// Whether a file takes more than one step.
    private func next(_ a: Attr) -> Bool { a.type == .regular && a.size > UInt64(cloneStepChunks) * chunkSize }

    private func hiddenName(_ name: [UInt8]) -> [UInt8] {
        let tag = Sys.randomBytes(4).map { String($0, radix: 16) }.joined()
        return Array(".\(String(decoding: name.prefix(200), as: UTF8.self)).clone-\(tag)".utf8)
    }

    private func finishLarge(_ src: Ino, _ dst: Ino, from: UInt32) throws {
        var next: UInt32? = from
        while let f = next {
            if cloneStopRequested.load(ordering: .relaxed) { throw FSError(EINTR, "interrupted") }
            next = try admin.cloneChunks(cred, src: src, dst: dst, from: f)
        }
        _ = try admin.cloneFinish(cred, src: src, dst: dst, preserve: preserve, umask: umask)
    }

    private func tree(_ src: Ino, _ dst: Ino, _ fixes: inout [(ino: Ino, src: Attr)]) throws {
        var after: UInt64 = 0
        while true {
            let page = try meta.readdir(src, after: after, limit: 1000, plus: true)
            for e in page {
                if cloneStopRequested.load(ordering: .relaxed) { throw FSError(EINTR, "interrupted") }
                guard let a = e.attr, e.name != [UInt8(ascii: ".")], e.name != [UInt8(ascii: "."), UInt8(ascii: ".")] else { continue }
                if Trash.isTrash(e.ino) { continue }
                if a.type == .directory {
                    let (d, _) = try meta.mknod(cred, dst, e.name, .directory, 0o700, rdev: 0, target: nil)
                    dirs += 1
                    fixes.append((d, a))
                    try tree(e.ino, d, &fixes)
                } else if a.type == .regular || a.type == .symlink {
                    let (ino, first, next) = try admin.cloneFile(cred, src: e.ino, parent: dst, name: e.name, preserve: preserve, umask: umask)
                    if let next { try finishLarge(e.ino, ino, from: next) }
                    count(first)
                } else {
                    // FIFOs, sockets, devices: made anew.
                    _ = try meta.mknod(cred, dst, e.name, a.type, (preserve ? a.mode : a.mode & ~umask) & 0o7777, rdev: a.rdev, target: nil)
                    files += 1
                }
            }
            guard page.count == 1000, let last = page.last else { return }
            after = last.cookie
        }
    }

    private func finishDir(_ ino: Ino, _ src: Attr) throws {
        var req = SetAttrRequest(mask: [.mode, .atime, .mtime])
        req.mode = preserve ? src.mode & 0o7777 : src.mode & 0o777 & ~umask
        let now = Timespec.now()
        req.atime = preserve ? src.atime : now
        req.mtime = preserve ? src.mtime : now
        if preserve && (src.uid != cred.uid || src.gid != cred.gid) {
            req.mask.formUnion([.uid, .gid])
            req.uid = src.uid
            req.gid = src.gid
        }
        _ = try meta.setattr(cred, ino, req)
    }

    private func count(_ a: Attr) {
        files += 1
        if a.type == .regular { bytes += a.size }
        let now = Sys.monotonicNanos()
        if tty && now - lastProgress > 500_000_000 {
            lastProgress = now
            progressLine(final: false)
        }
    }

    func progressLine(final: Bool) {
        guard tty else { return }
        printError("\r\(files) file(s), \(dirs) director\(dirs == 1 ? "y" : "ies"), \(humanBytes(bytes)) cloned", newline: final)
    }

    /// Removes a partial clone (as the caller), as far as it goes.
    private func removeTree(_ parent: Ino, _ name: [UInt8], _ top: Ino) {
        // (Its directories are 0700 and the caller's until the end, so the walk can empty them.)
        func empty(_ dir: Ino) {
            // A page at a time until nothing is left, or a page of which nothing could go.
            while true {
                guard let page = try? meta.readdir(dir, after: 0, limit: 1000, plus: true) else { return }
                let entries = page.filter { $0.name != [UInt8(ascii: ".")] && $0.name != [UInt8(ascii: "."), UInt8(ascii: ".")] }
                var removed = 0
                for e in entries {
                    if e.attr?.type == .directory {
                        var req = SetAttrRequest(mask: .mode)
                        req.mode = 0o700
                        _ = try? meta.setattr(cred, e.ino, req)
                        empty(e.ino)
                        if (try? meta.rmdir(cred, dir, e.name)) != nil { removed += 1 }
                    } else if (try? meta.unlink(cred, dir, e.name)) != nil {
                        removed += 1
                    }
                }
                if removed == 0 { return }
            }
        }
        var req = SetAttrRequest(mask: .mode)
        req.mode = 0o700
        _ = try? meta.setattr(cred, top, req)
        empty(top)
        _ = try? meta.rmdir(cred, parent, name)
    }
}
