import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// The most destination chunks one `copyRange` step records (4 GiB of 64 MiB chunks): a longer
/// copy_file_range returns a short count and the caller goes on, as the syscall allows.
package let copyStepChunks: UInt64 = 64

/// What a clone step does (`cloneFile`, `cloneChunks`): it copies at most this many chunk
/// records' worth of chunks.
package let cloneStepChunks = 256

/// The most slice records one copied range reads from a source chunk or adds in all: beyond,
/// `copyRange` answers `EXDEV` and the kernel copies the bytes instead (no step's work grows
/// with how fragmented a file is, and sharing never multiplies records without bound).
package let maxSharedRecords = 4096

/// The most slice records one clone step copies (it always copies at least one chunk).
package let cloneStepRecords = 65536

/// Shared slices: a clone or a copied range records a source's slices again instead of copying
/// bytes. Each record of a slice beyond the first is a reference (`TxnStore.sliceRefs`); when a
/// record goes (a deletion, a cut), a slice with references loses one instead of its objects
/// (`unreferenced`). The setting `slicesShared` says that any slice ever was, so that a volume
/// never cloned pays nothing for it.
extension TxnMetadata {
    /// Of the slices whose records just went, those whose objects go too: one with references
    /// left loses one instead.
    func unreferenced(_ tx: S.Txn, _ slices: [Slice]) throws(FSError) -> [Slice] {
        if slices.isEmpty { return slices }
        guard try store.setting(tx, "slicesShared") != nil else { return slices }
        var ids: [UInt64] = []
        for s in slices where s.id != 0 && !ids.contains(s.id) { ids.append(s.id) }
        try store.prefetch(tx, ids.map { .sliceRefs($0) })
        var out: [Slice] = []
        for s in slices {
            if s.id != 0, try store.sliceRefs(tx, s.id) > 0 {
                try store.addSliceRefs(tx, s.id, -1)
            } else {
                out.append(s)
            }
        }
        return out
    }

    static var tooFragmented: FSError {
        FSError(EXDEV, "the range is too fragmented to share its slices: its bytes are copied instead")
    }

    /// Records that slices are shared (once).
    private func noteShared(_ tx: S.Txn) throws(FSError) {
        if try store.setting(tx, "slicesShared") == nil { try store.setSetting(tx, "slicesShared", "1") }
    }

    /// Appends `records` to chunk `index` of `ino`, each slice gaining a reference.
    private func appendShared(_ tx: S.Txn, _ ino: Ino, _ index: UInt32, _ records: [Slice]) throws(FSError) {
        if records.isEmpty { return }
        var w = ByteWriter(capacity: records.count * Slice.encodedSize)
        for r in records {
            r.encode(into: &w)
            if r.id != 0 { try store.addSliceRefs(tx, r.id, 1) }
        }
        try store.appendChunk(tx, ino, index, w.bytes)
        try keepIfGC(tx, records.map(\.id))
    }

    /// While a gc scans (the setting `gcRunning`), slices recorded again in another inode are
    /// noted for it to keep: its scan may have read the new place before and the old one after
    /// the records left it (a clone, then the source purged).
    func keepIfGC(_ tx: S.Txn, _ ids: [UInt64]) throws(FSError) {
        let ids = ids.filter { $0 != 0 }
        if ids.isEmpty { return }
        // (Whatever this client's clock says of the lease: the gc itself stops if it ran out.)
        if let g = try store.setting(tx, "gcRunning"), let (holder, _) = gcLease(g) { try store.keepForGC(tx, holder: holder, ids) }
    }

    /// copy_file_range(2) within the volume, one bounded step: `dst` at `dstOff` comes to read
    /// what `src` reads at `srcOff`, for up to `length` bytes and at most `copyStepChunks` chunks
    /// of the destination, by recording the source's slices there again (no byte is copied or
    /// stored; each slice gains a reference). Returns the bytes copied (0 at or past the source's
    /// end) and the destination's attributes. Overlapping ranges of one file are `EINVAL`.
    package func copyRange(_ cred: Credential, src: Ino, srcOff: UInt64, dst: Ino, dstOff: UInt64, length: UInt64) throws(FSError) -> (UInt64, Attr) {
        try store.transaction(write: true) { (tx) throws(FSError) -> (UInt64, Attr) in
            try store.prefetch(tx, [.attr(src), .attr(dst), quotaKindsRead, .setting("slicesShared"), .setting("gcRunning")])
            guard let sa = try store.attr(tx, src), var da = try store.attr(tx, dst) else { throw FSError.notFound }
            guard sa.type == .regular, da.type == .regular else {
                throw sa.type == .directory || da.type == .directory ? FSError.isDir : FSError.invalid
            }
            if srcOff >= sa.size || length == 0 { return (0, da) }
            if dstOff >= maxFileSize { throw FSError(EFBIG, "file too large (the largest is 1 PiB)") }
            var n = min(length, sa.size - srcOff)
            let stepEnd = (dstOff / chunkSize + copyStepChunks) * chunkSize
            n = min(n, stepEnd - dstOff)
            let (end, over) = dstOff.addingReportingOverflow(n)
            if over || end > maxFileSize { throw FSError(EFBIG, "file too large (the largest is 1 PiB)") }
            if src == dst && srcOff < dstOff + n && dstOff < srcOff + n { throw FSError(EINVAL, "the ranges of one file overlap") }
            // The source's chunks as readers see them, read before anything is written.
            let first = UInt32(srcOff / chunkSize)
            let last = UInt32((srcOff + n - 1) / chunkSize)
            try store.prefetch(tx, (first...last).map { .chunk(src, $0) })
            var views: [UInt32: [Segment]] = [:]
            for i in first...last {
                let records = Slice.decodeAll(try store.chunk(tx, src, i))
                // A chunk of very many records is not shared (its view would cost too much to
                // build, and sharing would multiply its records): the caller copies its bytes.
                if records.count > maxSharedRecords { throw Self.tooFragmented }
                views[i] = buildView(records)
            }
            var pieces: [UInt32: [Slice]] = [:]
            var order: [UInt32] = []
            var done: UInt64 = 0
            while done < n {
                let s = srcOff + done
                let d = dstOff + done
                let sc = UInt32(s / chunkSize)
                let so = UInt32(s % chunkSize)
                let dc = UInt32(d / chunkSize)
                let doff = UInt32(d % chunkSize)
                let take = UInt32(min(n - done, chunkSize - UInt64(so), chunkSize - UInt64(doff)))
                // Zeros over the whole piece first (the source's holes), then its data on top.
                var recs = [Slice(pos: doff, id: 0, size: 0, off: 0, len: take)]
                for g in views[sc] ?? [] where g.id != 0 {
                    let lo = max(g.pos, so)
                    let hi = min(g.pos + g.len, so + take)
                    if lo >= hi { continue }
                    recs.append(Slice(pos: doff + (lo - so), id: g.id, size: g.size, off: g.off + (lo - g.pos), len: hi - lo))
                }
                if pieces[dc] == nil { order.append(dc) }
                pieces[dc, default: []] += recs
                done += UInt64(take)
            }
            if pieces.values.reduce(0, { $0 + $1.count }) > maxSharedRecords { throw Self.tooFragmented }
            for dc in order { try appendShared(tx, dst, dc, pieces[dc]!) }
            try noteShared(tx)
            try wrote(tx, dst, &da, upTo: end, by: cred)
            return (n, da)
        }
    }

    /// Clones `src` as `name` in directory `parent`, as `cred`: a new inode whose chunks record
    /// the source's slices (no byte is copied; each slice gains a reference); writes to either
    /// never change the other. `cred` must be able to read `src` and write `parent`. The clone
    /// is `cred`'s, with the source's mode less `umask` and the set-id bits, and times now;
    /// `preserve` keeps the mode, the owner and group (root, or the owner of the source for its
    /// own uid and a group it is in) and the times. A regular file with more than
    /// `cloneStepChunks` chunks is made in this step with mode 0 and the rest is copied by
    /// `cloneChunks` (from the returned index) and ended by `cloneFinish`: nil when done.
    /// Symbolic links clone their target; other special files are made anew.
    package func cloneFile(
        _ cred: Credential, src: Ino, parent: Ino, name: [UInt8], preserve: Bool, umask: UInt16
    ) throws(FSError) -> (ino: Ino, attr: Attr, next: UInt32?) {
        try validateName(name)
        try reserved(parent, name)
        if Trash.isTrash(parent) { throw Self.trashIsClosed }
        return try store.transaction(write: true) { (tx) throws(FSError) -> (ino: Ino, attr: Attr, next: UInt32?) in
            try store.prefetch(
                tx, [.attr(src), .attr(parent), .entry(parent, name), .chunkList(src, from: 0, limit: cloneStepChunks), quotaKindsRead])
            guard let sa = try store.attr(tx, src) else { throw FSError.notFound }
            if sa.type == .directory { throw FSError.isDir }
            if Trash.isTrash(src) { throw FSError.perm }
            try Posix.check(sa, cred, .read)
            guard var pa = try store.attr(tx, parent) else { throw FSError.notFound }
            guard pa.type == .directory else { throw FSError.notDir }
            try Posix.check(pa, cred, [.write, .execute])
            if pa.nlink == 0 { throw FSError.notFound }
            if try store.entry(tx, parent, name) != nil { throw FSError.exists }
            let now = Timespec.now()
            var a = try cloneAttr(sa, cred, preserve: preserve, umask: umask, now: now)
            a.parent = parent
            let ino = try store.newInode(tx)
            var next: UInt32? = nil
            if sa.type == .regular {
                let idxs = try store.chunkIndexes(tx, src, from: 0, limit: cloneStepChunks, descending: false)
                next = try copyChunks(tx, src, ino, idxs)
                if next != nil { a.mode = 0 }
            } else if sa.type == .symlink {
                guard let t = try store.symlinkTarget(tx, src) else { throw FSError.invalid }
                try store.putSymlinkTarget(tx, ino, t)
            } else if (sa.type == .blockDevice || sa.type == .charDevice) && !cred.isRoot {
                // (Making a device node takes CAP_MKNOD, as mknod does.)
                throw FSError.perm
            }
            try store.putAttr(tx, ino, a)
            try store.putEntry(tx, parent, name, ino, a.type)
            pa.mtime = now
            pa.ctime = now
            try store.putAttr(tx, parent, pa)
            try account(tx, try quotaKeys(tx, ino, a), space: align4K(a.size), inodes: 1, enforce: true)
            return (ino, a, next)
        }
    }

    /// One further step of a clone of a large file (`cloneFile`): copies the chunk records of
    /// `src` from index `from` to `dst` (at most `cloneStepChunks` chunks); nil when none are
    /// left. `cred` must still be able to read `src` and write `dst`.
    package func cloneChunks(_ cred: Credential, src: Ino, dst: Ino, from: UInt32) throws(FSError) -> UInt32? {
        try store.transaction(write: true) { (tx) throws(FSError) -> UInt32? in
            try store.prefetch(tx, [.attr(src), .attr(dst), .chunkList(src, from: from, limit: cloneStepChunks)])
            guard let sa = try store.attr(tx, src), let da = try store.attr(tx, dst) else { throw FSError.notFound }
            guard sa.type == .regular, da.type == .regular, da.size == sa.size else { throw FSError(EINVAL, "inode \(dst) is no clone of inode \(src) in the making") }
            try Posix.check(sa, cred, .read)
            if da.uid != cred.uid && !cred.isRoot { throw FSError.perm }
            let idxs = try store.chunkIndexes(tx, src, from: from, limit: cloneStepChunks, descending: false)
            if try !store.chunkIndexes(tx, dst, from: from, limit: 1, descending: false).isEmpty {
                throw FSError(EINVAL, "inode \(dst) already has chunks from index \(from)")
            }
            return try copyChunks(tx, src, dst, idxs)
        }
    }

    /// The last step of a clone of a large file: its mode, owner and times as `cloneFile` gives them.
    package func cloneFinish(_ cred: Credential, src: Ino, dst: Ino, preserve: Bool, umask: UInt16) throws(FSError) -> Attr {
        try store.transaction(write: true) { (tx) throws(FSError) -> Attr in
            guard let sa = try store.attr(tx, src), var da = try store.attr(tx, dst) else { throw FSError.notFound }
            if da.uid != cred.uid && !cred.isRoot { throw FSError.perm }
            try Posix.check(sa, cred, .read)
            let final = try cloneAttr(sa, cred, preserve: preserve, umask: umask, now: Timespec.now())
            let kinds = try quotaKinds(tx)
            if !kinds.isEmpty && (final.uid != da.uid || final.gid != da.gid) {
                var moved = da
                moved.uid = final.uid
                moved.gid = final.gid
                try moveUsage(tx, from: try quotaKeys(tx, dst, da, kinds: kinds), to: try quotaKeys(tx, dst, moved, kinds: kinds),
                    space: align4K(da.size), inodes: 1, enforce: !cred.isRoot)
            }
            da.mode = final.mode
            da.uid = final.uid
            da.gid = final.gid
            da.atime = final.atime
            da.mtime = final.mtime
            da.ctime = Timespec.now()
            try store.putAttr(tx, dst, da)
            return da
        }
    }

    /// A clone's attributes, before its home is set (see `cloneFile`).
    private func cloneAttr(_ sa: Attr, _ cred: Credential, preserve: Bool, umask: UInt16, now: Timespec) throws(FSError) -> Attr {
        var a = sa
        a.nlink = sa.type == .directory ? 2 : 1
        a.ctime = now
        if preserve {
            if !cred.isRoot && (sa.uid != cred.uid || !cred.inGroup(sa.gid)) {
                throw FSError(EPERM, "--preserve keeps the owner and group: only root, or the owner in the file's group, may")
            }
        } else {
            a.uid = cred.uid
            a.gid = cred.gid
            a.mode = sa.mode & 0o777 & ~umask
            a.atime = now
            a.mtime = now
        }
        return a
    }

    /// Copies the records of chunks `idxs` of `src` to `dst` (each slice gaining a reference),
    /// in order, stopping after the chunk that takes the step past `cloneStepRecords` records.
    /// Returns the index the next step starts from: nil when none is left (`idxs` is the
    /// whole rest of the file when it holds fewer than `cloneStepChunks` indexes).
    private func copyChunks(_ tx: S.Txn, _ src: Ino, _ dst: Ino, _ idxs: [UInt32]) throws(FSError) -> UInt32? {
        if idxs.isEmpty { return nil }
        try store.prefetch(tx, idxs.map { .chunk(src, $0) })
        var records = 0
        for (k, i) in idxs.enumerated() {
            let slices = Slice.decodeAll(try store.chunk(tx, src, i))
            try appendShared(tx, dst, i, slices)
            records += slices.count
            if records >= cloneStepRecords && k + 1 < idxs.count {
                try noteShared(tx)
                return idxs[k + 1]
            }
        }
        try noteShared(tx)
        return idxs.count == cloneStepChunks ? idxs.last! + 1 : nil
    }
}

/// What `stagefs clone` asks of an engine: the transactional engines, and a gateway's client.
package protocol CloneAdmin: AnyObject, Sendable {
    func cloneFile(_ cred: Credential, src: Ino, parent: Ino, name: [UInt8], preserve: Bool, umask: UInt16) throws(FSError) -> (ino: Ino, attr: Attr, next: UInt32?)
    func cloneChunks(_ cred: Credential, src: Ino, dst: Ino, from: UInt32) throws(FSError) -> UInt32?
    func cloneFinish(_ cred: Credential, src: Ino, dst: Ino, preserve: Bool, umask: UInt16) throws(FSError) -> Attr
}

extension TxnMetadata: CloneAdmin {}
