import SQLiteKit
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// Blocks on disk: lookups, checksummed block files and pack files, reads that verify, writes
/// under temporary names.
extension DiskCache {
    // MARK: lookups

    /// Where the index (or this process's pending writes) puts a packed block.
    func location(_ key: String) -> Location? {
        let ik = indexKey(key)
        return lock.withLock { () -> Location? in
            if let l = pendingLocations[ik] { return l }
            var loc: Location?
            try? index.query("SELECT pack, off, size FROM blocks WHERE key=? AND pack > 0", [.text(ik)]) {
                loc = Location(pack: Col.int($0, 0), off: Col.int($0, 1), length: Int(Col.int($0, 2)) - 4)
            }
            return loc
        }
    }

    func readFD(_ pack: Int64) -> Int32? {
        packLock.withLock { () -> Int32? in
            if let fd = readFDs[pack] { return fd }
            let fd = Glibc.open(packPath(pack, volume: volume), O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { return nil }
            if readFDs.count >= 256 {
                for (_, f) in readFDs { Sys.close(f) }
                readFDs.removeAll()
            }
            readFDs[pack] = fd
            return fd
        }
    }

    /// Whether a block is cached (packed blocks: indexed; others: a complete file exists).
    /// `length`: the block's stored length when the caller knows it (else the cache finds it).
    public func contains(_ key: String, length: Int? = nil) -> Bool {
        if let length, DiskCache.packed(length) { return location(key) != nil }
        if length == nil && location(key) != nil { return true }
        guard let st = Sys.stat(path(key)) else { return false }
        guard let length else { return DiskCache.blockLength(fileSize: Int(st.st_size)) != nil }
        return Int(st.st_size) == DiskCache.fileSize(length)
    }

    /// Which of `blocks` (key, stored length if known) are cached, with one index query per 500
    /// packed (or possibly packed) blocks.
    public func cached(_ blocks: [(String, Int?)]) -> [Bool] {
        var out = [Bool](repeating: false, count: blocks.count)
        var packedAt: [String: [Int]] = [:]
        for (i, (key, length)) in blocks.enumerated() {
            if let length, !DiskCache.packed(length) {
                out[i] = contains(key, length: length)
            } else {
                packedAt[indexKey(key), default: []].append(i)
            }
        }
        let keys = Array(packedAt.keys)
        lock.withLock {
            for k in keys where pendingLocations[k] != nil { for i in packedAt[k]! { out[i] = true } }
            for start in stride(from: 0, to: keys.count, by: 500) {
                let part = Array(keys[start..<min(keys.count, start + 500)])
                let sql = "SELECT key FROM blocks WHERE pack > 0 AND key IN (\(Array(repeating: "?", count: part.count).joined(separator: ",")))"
                try? index.query(sql, part.map { .text($0) }) { row in
                    for i in packedAt[Col.text(row, 0)] ?? [] { out[i] = true }
                }
            }
        }
        // A block of unknown length not packed may be a file.
        for (i, (key, length)) in blocks.enumerated() where !out[i] && length == nil {
            out[i] = Sys.stat(path(key)).map { DiskCache.blockLength(fileSize: Int($0.st_size)) != nil } ?? false
        }
        return out
    }

    // MARK: reads

    /// Opens the cache file of `key` if it has the size a block of `length` gives (or, not
    /// given, the size of some block); returns it and the block's length.
    func openChecked(_ key: String, length: Int?) -> (fd: Int32, length: Int)? {
        let fd = Glibc.open(path(key), O_RDONLY | O_CLOEXEC)
        if fd < 0 { return nil }
        var st = Glibc.stat()
        let found = fstat(fd, &st) == 0 ? DiskCache.blockLength(fileSize: Int(st.st_size)) : nil
        guard let found, length == nil || found == length else {
            Log.warning(
                "cache file \(path(key)) has \(st.st_size) bytes, \(length.map { "expected \(DiskCache.fileSize($0))" } ?? "the size of no block"); dropping it"
            )
            Sys.close(fd)
            remove(key)
            return nil
        }
        return (fd, found)
    }

    /// Reads the checksums of pieces `first...last` from a block file's trailer.
    func checksums(_ fd: Int32, length: Int, first: Int, last: Int) -> [UInt32]? {
        var sums = [UInt32](repeating: 0, count: last - first + 1)
        let want = sums.count * 4
        let n = sums.withUnsafeMutableBytes { b in try? Sys.pread(fd, b.baseAddress!, want, Int64(length + 4 * first)) }
        guard n == want else { return nil }
        return sums.map { UInt32(littleEndian: $0) }
    }

    /// A packed block with its checksum verified, into `dest` (which holds `loc.length` bytes).
    func readPacked(_ key: String, _ loc: Location, into dest: UnsafeMutableRawPointer) -> Bool {
        let length = loc.length
        guard length >= 0, let fd = readFD(loc.pack) else { return false }
        let tmp = UnsafeMutableRawPointer.allocate(byteCount: length + 4, alignment: 16)
        defer { tmp.deallocate() }
        guard let n = try? Sys.pread(fd, tmp, length + 4, loc.off), n == length + 4 else {
            Log.warning("cache pack \(loc.pack) is shorter than its index says; dropping \(key)")
            remove(key)
            return false
        }
        let want = UInt32(littleEndian: tmp.loadUnaligned(fromByteOffset: length, as: UInt32.self))
        if CRC32C.checksum(tmp, length) != want {
            Log.warning("cached block \(key) in pack \(loc.pack) fails its checksum; dropping it")
            remove(key)
            return false
        }
        dest.copyMemory(from: tmp, byteCount: length)
        return true
    }

    /// The whole block, verified, or nil (missing or damaged; a damaged block is removed).
    /// `length`: the block's stored length when the caller knows it (a block of another length
    /// is dropped); else the cache's own record of it, at most `atMost` (a longer one is
    /// dropped unread).
    public func get(_ key: String, length: Int? = nil, atMost: Int = Int.max) -> Buffer? {
        if length.map(DiskCache.packed) ?? true, let loc = location(key) {
            if let length, loc.length != length {
                remove(key)
                return nil
            }
            if loc.length > atMost {
                remove(key)
                return nil
            }
            let buf = Buffer(capacity: max(loc.length, 1))
            guard readPacked(key, loc, into: buf.base) else { return nil }
            buf.count = loc.length
            touch(key)
            return buf
        }
        if let length, DiskCache.packed(length) { return nil }
        guard let (fd, length) = openChecked(key, length: length) else { return nil }
        defer { Sys.close(fd) }
        if length > atMost {
            Log.warning("cache file \(path(key)) holds \(length) bytes, more than its block can take (\(atMost)); dropping it")
            remove(key)
            return nil
        }
        let buf = Buffer(capacity: max(length, 1))
        guard let n = try? Sys.pread(fd, buf.base, length, 0), n == length,
            let sums = checksums(fd, length: length, first: 0, last: DiskCache.pieces(length) - 1),
            verify(buf.base, length: length, firstPiece: 0, sums: sums, key: key)
        else { return nil }
        buf.count = length
        touch(key)
        return buf
    }

    /// Bytes `offset..<offset+dest.count` of a cached block of `length` bytes into `dest`,
    /// verified; false when the block is not cached (or was damaged and has been removed).
    public func read(_ key: String, length: Int, offset: Int, into dest: UnsafeMutableRawBufferPointer) -> Bool {
        guard dest.count > 0 else { return true }
        if DiskCache.packed(length) {
            guard let b = get(key, length: length) else { return false }
            dest.baseAddress!.copyMemory(from: b.base + offset, byteCount: dest.count)
            return true
        }
        guard let (fd, _) = openChecked(key, length: length) else { return false }
        defer { Sys.close(fd) }
        let first = offset / DiskCache.pieceSize
        let last = (offset + dest.count - 1) / DiskCache.pieceSize
        let start = first * DiskCache.pieceSize
        let end = min(length, (last + 1) * DiskCache.pieceSize)
        let span = UnsafeMutableRawPointer.allocate(byteCount: end - start, alignment: 64)
        defer { span.deallocate() }
        guard let n = try? Sys.pread(fd, span, end - start, Int64(start)), n == end - start,
            let sums = checksums(fd, length: length, first: first, last: last),
            verify(span, length: end - start, firstPiece: first, sums: sums, key: key)
        else { return false }
        dest.baseAddress!.copyMemory(from: span + (offset - start), byteCount: dest.count)
        touch(key)
        return true
    }

    func verify(_ p: UnsafeRawPointer, length: Int, firstPiece: Int, sums: [UInt32], key: String) -> Bool {
        for (i, want) in sums.enumerated() {
            let off = i * DiskCache.pieceSize
            let n = min(DiskCache.pieceSize, length - off)
            if CRC32C.checksum(p + off, n) != want {
                Log.warning("cache file \(path(key)) is corrupted (piece \(firstPiece + i) fails its checksum); dropping it")
                remove(key)
                return false
            }
        }
        return true
    }

    // MARK: writes

    /// Stores a block, pinned for `job` if given: blocks over 64 KiB as files (temporary name,
    /// checksums, rename), smaller ones appended to this process's pack file. Index entries are
    /// written in batches (`flushIndex`), and older blocks evicted then. Throws `ENOSPC` when
    /// pinned blocks alone leave no room (the batch is then not kept). `job` must be a valid job id.
    public func put(_ key: String, _ data: UnsafeRawBufferPointer, pin job: String? = nil) throws(FSError) {
        guard config.capacity > 0 else { return }
        if let job, let why = JobID.problem(job) { throw FSError(EINVAL, why) }
        let size = DiskCache.fileSize(data.count)
        if size > config.capacity { throw FSError(ENOSPC, "a block of \(data.count) bytes does not fit a cache of \(config.capacity) bytes") }
        var file: String?
        var loc = Location(pack: 0, off: 0)
        if DiskCache.packed(data.count) {
            loc = try append(data)
            loc.length = data.count
        } else {
            // Callers put blocks they found missing; a racing writer's copy is replaced whole.
            file = path(key)
            try writeFile(file!, data)
        }
        CacheMetrics.diskWrites.increment(by: Int64(data.count))
        let ik = indexKey(key)
        let flushNow = lock.withLock { () -> Bool in
            pending.append(Pending(indexKey: ik, size: size, job: job, file: file, location: loc))
            if loc.pack != 0 { pendingLocations[ik] = loc }
            pendingBytes += size
            return pending.count >= 512 || pendingBytes >= min(64 << 20, max(config.capacity / 8, 1))
                || Sys.monotonicNanos() - lastIndexFlush > 1_000_000_000
        }
        if flushNow { try flushIndex() }
    }

    /// Appends a small block and its checksum to the pack file being written; returns where.
    /// Appends are serialized (they are small), so a pack is never closed under a writer.
    func append(_ data: UnsafeRawBufferPointer) throws(FSError) -> Location {
        let need = Int64(data.count + 4)
        var crc = CRC32C.checksum(data.baseAddress ?? UnsafeRawPointer(bitPattern: 1)!, data.count).littleEndian
        return try packLock.withLock { () throws(FSError) -> Location in
            if writing == nil || writing!.end + need > Int64(DiskCache.packSize) {
                if let w = writing {
                    Sys.close(w.fd)
                    writing = nil
                    try indexTransaction { () throws(FSError) in try index.query("UPDATE packs SET writer=0 WHERE id=?", [.int(w.id)]) }
                }
                var id: Int64 = 0
                try indexTransaction { () throws(FSError) in
                    try index.query("INSERT INTO packs(volume, live, writer) VALUES(?, 0, ?) RETURNING id", [.text(volume), .int(Int64(Sys.pid))]) {
                        id = Col.int($0, 0)
                    }
                }
                let p = packPath(id, volume: volume)
                try? Sys.mkdirs(Sys.dirname(of: p), 0o700)
                let fd = Glibc.open(p, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
                if fd < 0 { throw FSError.errno(errno, "cannot create cache pack \(p)") }
                writing = (id, fd, 0)
            }
            let w = writing!
            try withUnsafeBytes(of: &crc) { (c) throws(FSError) in
                var iov = [
                    iovec(iov_base: UnsafeMutableRawPointer(mutating: data.baseAddress), iov_len: data.count),
                    iovec(iov_base: UnsafeMutableRawPointer(mutating: c.baseAddress), iov_len: 4),
                ]
                let n = iov.withUnsafeMutableBufferPointer { pwritev(w.fd, $0.baseAddress, 2, off_t(w.end)) }
                if n != Int(need) { throw FSError.errno(n < 0 ? errno : EIO, "cannot write cache pack \(w.id)") }
            }
            writing!.end += need
            return Location(pack: w.id, off: w.end)
        }
    }

    func writeFile(_ final: String, _ data: UnsafeRawBufferPointer) throws(FSError) {
        let tmp = "\(final).tmp\(Sys.pid)-\(Sys.monotonicNanos() % 1_000_000_007)"
        var fd = Glibc.open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        if fd < 0 && errno == ENOENT {
            try? Sys.mkdirs(Sys.dirname(of: final), 0o700)
            fd = Glibc.open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        }
        if fd < 0 { throw FSError.errno(errno, "cannot write cache file \(final)") }
        let n = DiskCache.pieces(data.count)
        var trailer = ByteWriter(capacity: 4 * n + 8)
        for i in 0..<n {
            let off = i * DiskCache.pieceSize
            let sum = CRC32C.checksum(data.baseAddress! + off, min(DiskCache.pieceSize, data.count - off))
            withUnsafeBytes(of: sum.littleEndian) { trailer.raw($0) }
        }
        withUnsafeBytes(of: UInt32(n).littleEndian) { trailer.raw($0) }
        withUnsafeBytes(of: DiskCache.magic.littleEndian) { trailer.raw($0) }
        // (A block of whole pages from a page-aligned buffer goes past the page cache: reading
        // a file from the store, the copy into the page cache of its blocks' cache files took
        // more CPU than the read itself. The trailer follows through the page cache.)
        let direct = data.baseAddress.map { self.direct.write(fd, $0, data.count) } ?? false
        do {
            let t = trailer.bytes
            try fsTyped {
                try t.withUnsafeBytes { tb in
                    if direct {
                        try Sys.pwrite(fd, tb.baseAddress!, tb.count, Int64(data.count), path: tmp)
                    } else {
                        try Sys.writeAll(fd, [UnsafeRawBufferPointer(start: data.baseAddress, count: data.count), tb], path: tmp)
                    }
                }
            }
            Sys.close(fd)
            try Sys.rename(tmp, final)
        } catch {
            Sys.close(fd)
            unlink(tmp)
            throw error.context("cannot write cache file \(final)")
        }
    }
}
