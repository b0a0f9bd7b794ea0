import ObjectStorage
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// Bytes written to one place of a chunk, buffered and uploaded block by block, then committed
/// to metadata as one slice.
/// Guarded by its FileWriter's lock.
final class SliceWriter: @unchecked Sendable {
    let chunk: UInt32
    let pos: UInt32
    var len = 0
    var id: UInt64 = 0
    /// Block buffers not yet uploaded (nil once uploaded or never written).
    var blocks: [Buffer?] = []
    /// Blocks whose upload started (their bytes can no longer change).
    var sealed = 0
    var pendingUploads = 0
    var frozen = false
    var committed = false
    var error: FSError?
    let created = Sys.monotonicNanos()
    /// When the last write into this slice happened: its commit sets the file's mtime to it.
    var written = Timespec.now()

    init(chunk: UInt32, pos: UInt32) {
        self.chunk = chunk
        self.pos = pos
    }

    var end: Int { Int(pos) + len }
}

/// The buffered writes of one file in this client: shared by all its open handles.
/// Writes become slices; flush uploads what is left, waits, and commits slices in order.
public final class FileWriter: @unchecked Sendable {
    let ino: Ino
    unowned let data: DataStore
    let lock = ConditionLock()
    /// Uncommitted slices, oldest first.
    var slices: [SliceWriter] = []
    var firstError: FSError?
    var committing = false
    /// Handles using this writer.
    var refs = 0
    /// The latest write time committed so far: commits never move mtime back.
    var committedWritten = Timespec(sec: 0, nsec: 0)

    init(ino: Ino, data: DataStore) {
        self.ino = ino
        self.data = data
    }

    /// End of the furthest byte written but not yet committed, and the time of the latest
    /// such write; nil when nothing waits.
    public var pending: (end: UInt64, written: Timespec)? {
        lock.withLock {
            guard let first = slices.first else { return nil }
            var end: UInt64 = 0
            var written = first.written
            for s in slices {
                end = max(end, UInt64(s.chunk) * chunkSize + UInt64(s.end))
                written = max(written, s.written)
            }
            return (end, written)
        }
    }

    public var hasPending: Bool { lock.withLock { !slices.isEmpty } }

    /// Buffers `buf` at file offset `offset`. Blocks while the write buffer is full.
    public func write(_ buf: UnsafeRawBufferPointer, at offset: UInt64) throws(FSError) {
        if let e = lock.withLock({ firstError }) { throw e }
        var done = 0
        while done < buf.count {
            let off = offset + UInt64(done)
            let chunk = UInt32(off / chunkSize)
            let pos = Int(off % chunkSize)
            let n = min(buf.count - done, Int(chunkSize) - pos)
            data.budget.acquire(n)
            var grown = 0
            lock.withLock {
                grown = writeLocked(chunk: chunk, pos: pos, UnsafeRawBufferPointer(rebasing: buf[done..<(done + n)]))
            }
            if grown < n { data.budget.release(n - grown) } else if grown > n { data.budget.add(grown - n) }
            done += n
        }
    }

    /// Copies into a writable slice; returns how many bytes of buffer memory were added.
    private func writeLocked(chunk: UInt32, pos: Int, _ src: UnsafeRawBufferPointer) -> Int {
        let bs = data.layout.blockSize
        // A slice that this write continues, or overlaps only in blocks not yet uploaded.
        // Only the newest slice of the chunk may take it, or an older one would hide this write.
        var target: SliceWriter?
        if let s = slices.last(where: { $0.chunk == chunk }), !s.frozen,
            pos >= Int(s.pos) && pos <= s.end && pos - Int(s.pos) >= s.sealed * bs
        {
            target = s
        }
        if target == nil {
            let s = SliceWriter(chunk: chunk, pos: UInt32(pos))
            slices.append(s)
            target = s
            let open = slices.filter { !$0.frozen }
            if open.count > 8 { freeze(open[0]) }
        }
        let s = target!
        s.written = Timespec.now()
        var grown = 0
        var copied = 0
        while copied < src.count {
            let rel = pos - Int(s.pos) + copied
            let bi = rel / bs
            let bo = rel % bs
            let n = min(src.count - copied, bs - bo)
            while s.blocks.count <= bi { s.blocks.append(nil) }
            let b: Buffer
            if let existing = s.blocks[bi] {
                b = existing
            } else {
                b = Buffer(capacity: min(bs, max(bo + n, 64 << 10)))
                s.blocks[bi] = b
                grown += b.capacity
            }
            if bo + n > b.capacity {
                let before = b.capacity
                b.reserve(min(bs, max(bo + n, b.capacity * 2)))
                grown += b.capacity - before
            }
            if bo > b.count { (b.base + b.count).initializeMemory(as: UInt8.self, repeating: 0, count: bo - b.count) }
            (b.base + bo).copyMemory(from: src.baseAddress! + copied, byteCount: n)
            b.count = max(b.count, bo + n)
            copied += n
        }
        s.len = max(s.len, pos - Int(s.pos) + src.count)
        // Upload blocks that are full and will not be written again by this appender.
        let full = s.len / bs
        while s.sealed < full && s.sealed < (pos - Int(s.pos) + src.count) / bs {
            upload(s, block: s.sealed)
            s.sealed += 1
        }
        if s.end >= Int(chunkSize) { freeze(s) }
        return grown
    }

    /// Starts uploading block `index` of `s` (lock held).
    private func upload(_ s: SliceWriter, block index: Int) {
        guard index < s.blocks.count, let b = s.blocks[index] else { return }
        if s.id == 0 {
            do {
                s.id = try data.ids.next()
            } catch {
                s.error = error
                return
            }
        }
        let blocks = data.blocks
        let block = Block(key: data.layout.key(slice: s.id, index: index, length: b.count), length: b.count)
        let written = UnsafeRawBufferPointer(start: b.base, count: b.count)
        // A block the store keeps for its slice's commit (a gateway's small block, sent with the
        // commit) is kept at once: no upload thread to wake and wait for. (Only a small block:
        // compressing it here holds the file's lock a moment. Encoded once: an upload of a block
        // the store did not keep takes it as it is.)
        var encoded: Buffer?
        var encodedHere = false
        if data.store.isProxy && b.count <= 256 << 10 {
            do {
                encoded = try blocks.encode(written)
                encodedHere = true
            } catch {
                // (The upload below tries again and reports it.)
            }
        }
        if encodedHere, blocks.holdForCommit(block, stored: encoded?.bytes ?? written) {
            s.blocks[index] = nil
            guard blocks.disk != nil else {
                data.budget.release(b.capacity)
                return
            }
            // Written blocks are cached too (below), off the writer's way.
            let held = encoded
            data.uploads.submit { [data] in
                blocks.cache(block, stored: held?.bytes ?? UnsafeRawBufferPointer(start: b.base, count: b.count))
                data.budget.release(b.capacity)
            }
            return
        }
        let pre = encoded
        s.pendingUploads += 1
        let ticket = data.queue.add(b.count)
        data.uploads.submit { [self] in
            defer { data.queue.remove(ticket) }
            var err: FSError?
            do throws(FSError) {
                // Written blocks smaller than a full one are cached too (reading back a small file
                // just written stays local); full ones only when asked (a checkpoint would push
                // out what is being read).
                let cache = b.count < data.layout.blockSize || data.config.cacheLargeWrites
                if let pre {
                    try blocks.put(block, stored: pre.bytes, cache: cache)
                } else {
                    try blocks.put(block, written: UnsafeRawBufferPointer(start: b.base, count: b.count), cache: cache)
                }
            } catch {
                err = error
                Log.error("upload of \(block.key) failed: \(error.message)")
            }
            let freed = b.capacity
            lock.withLock {
                s.blocks[index] = nil
                s.pendingUploads -= 1
                if let err, s.error == nil { s.error = err }
                lock.broadcast()
            }
            data.budget.release(freed)
            if s.frozen { data.background.submit { [self] in try? commitReady(wait: false) } }
        }
    }

    /// Stops writes into `s` and uploads its last block (lock held). `kick`: have a background
    /// thread commit it once its blocks are stored (false: the caller commits, as flush does).
    private func freeze(_ s: SliceWriter, kick: Bool = true) {
        guard !s.frozen else { return }
        s.frozen = true
        let bs = data.layout.blockSize
        let count = (s.len + bs - 1) / bs
        while s.sealed < count {
            upload(s, block: s.sealed)
            s.sealed += 1
        }
        if kick && s.pendingUploads == 0 { data.background.submit { [self] in try? commitReady(wait: false) } }
    }

    /// Freezes every slice (background flush of idle data).
    public func freezeAll() {
        lock.withLock { slices.forEach { freeze($0) } }
    }

    /// Age in seconds of the oldest uncommitted slice.
    var oldestAge: Double {
        lock.withLock {
            guard let first = slices.first else { return 0 }
            return Double(Sys.monotonicNanos() - first.created) / 1e9
        }
    }

    /// Commits leading frozen slices whose uploads finished, in order. With `wait`, waits for
    /// uploads and commits everything (flush).
    private func commitReady(wait: Bool) throws(FSError) {
        lock.lock()
        while committing {
            if !wait {
                lock.unlock()
                return
            }
            lock.wait()
        }
        committing = true
        defer {
            committing = false
            lock.broadcast()
            lock.unlock()
        }
        while let s = slices.first, s.frozen {
            if s.pendingUploads > 0 {
                if !wait { return }
                while s.pendingUploads > 0 { lock.wait() }
            }
            if let e = s.error {
                firstError = firstError ?? e
                slices.removeFirst()
                continue
            }
            if s.len > 0 && s.id != 0 {
                let slice = Slice(pos: s.pos, id: s.id, size: UInt32(s.len), off: 0, len: UInt32(s.len))
                let minSize = UInt64(s.chunk) * chunkSize + UInt64(s.end)
                committedWritten = max(committedWritten, s.written)
                let mtime = committedWritten
                lock.unlock()
                var err: FSError?
                do {
                    // The slice's blocks are durable before a record names them.
                    try data.store.sync(data.layout.blocks(of: slice).map(\.key))
                    try data.ledger.writeSlice(ino, s.chunk, slice, minSize: minSize, mtime: mtime)
                } catch {
                    err = error
                }
                lock.lock()
                if let err {
                    Log.error("commit of a slice of inode \(ino) failed: \(err.message)")
                    firstError = firstError ?? err
                }
                data.invalidate(ino)
            }
            s.committed = true
            slices.removeFirst()
        }
    }

    /// Uploads and commits everything written so far: data is durable when this returns.
    public func flush() throws(FSError) {
        lock.withLock { slices.forEach { freeze($0, kick: false) } }
        try commitReady(wait: true)
        let e: FSError? = lock.withLock {
            let e = firstError
            firstError = nil
            return e
        }
        // (A quota or the volume full keeps its errno: the writer hears why, as from ext4.)
        if let e { throw FSError(e.code == EDQUOT || e.code == ENOSPC ? e.code : EIO, "writing inode \(ino) failed: \(e.message)") }
    }
}

/// Hands out slice ids reserved from the ledger in batches.
final class SliceIDs: @unchecked Sendable {
    private let ledger: any SliceLedger
    private let lock = ConditionLock()
    private var nextID: UInt64 = 0
    private var last: UInt64 = 0

    init(ledger: any SliceLedger) { self.ledger = ledger }

    func next() throws(FSError) -> UInt64 {
        try lock.withLock { () throws(FSError) -> UInt64 in
            if nextID == 0 || nextID > last {
                let first = try ledger.newSliceIDs(256)
                nextID = first
                last = first + 255
            }
            defer { nextID += 1 }
            return nextID
        }
    }
}
