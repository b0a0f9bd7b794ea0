import ObjectStorage
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// Downloads whole blocks, one download per block at a time however many readers want it
/// (later askers wait for the first), into the memory cache.
final class BlockFetcher: @unchecked Sendable {
    private final class Pending: @unchecked Sendable {
        var done = false
        var result: Result<Buffer, FSError>?
    }

    let store: any ObjectStore
    let cache: MemoryCache
    let disk: DiskCache?
    let pool: WorkerPool
    private let lock = ConditionLock()
    private var inflight: [String: Pending] = [:]

    init(store: any ObjectStore, cache: MemoryCache, disk: DiskCache?, threads: Int) {
        self.store = store
        self.cache = cache
        self.disk = disk
        pool = WorkerPool(name: "download", threads: threads)
    }

    /// The block `key` of `length` bytes, from memory or the store; waits for it.
    func fetch(_ key: String, length: Int) throws(FSError) -> Buffer {
        if let b = cache.get(key) { return b }
        let (pending, mine) = lock.withLock { () -> (Pending, Bool) in
            if let p = inflight[key] { return (p, false) }
            let p = Pending()
            inflight[key] = p
            return (p, true)
        }
        if mine { download(key, length, pending) }
        return try lock.withLock { () throws(FSError) -> Buffer in
            while !pending.done { lock.wait() }
            return try pending.result!.get()
        }
    }

    /// Starts fetching `key` in the background unless it is cached or on its way.
    func prefetch(_ key: String, length: Int) {
        if cache.contains(key) { return }
        let pending: Pending? = lock.withLock {
            if inflight[key] != nil { return nil }
            let p = Pending()
            inflight[key] = p
            return p
        }
        guard let pending else { return }
        pool.submit { [self] in download(key, length, pending) }
    }

    private func download(_ key: String, _ length: Int, _ pending: Pending) {
        if let b = disk?.get(key, length: length) {
            cache.put(key, b)
            finish(key, pending, .success(b))
            return
        }
        let buf = Buffer(capacity: length)
        let result: Result<Buffer, FSError>
        do throws(FSError) {
            let n = try store.get(key, offset: 0, into: UnsafeMutableRawBufferPointer(start: buf.base, count: length))
            if n != length {
                throw FSError(EIO, "block \(key) in \(store.description) has \(n) bytes, expected \(length)")
            }
            buf.count = n
            cache.put(key, buf)
            result = .success(buf)
        } catch {
            let e = error.code == ENOENT ? FSError(EIO, "block \(key) is missing from \(store.description)") : error
            Log.error(e.message)
            result = .failure(FSError(EIO, e.message))
        }
        finish(key, pending, result)
        if case .success(let b) = result, let disk {
            do { try disk.put(key, b.bytes) } catch { Log.warning("not cached: \(error.message)") }
        }
    }

    private func finish(_ key: String, _ pending: Pending, _ result: Result<Buffer, FSError>) {
        lock.withLock {
            pending.result = result
            pending.done = true
            inflight[key] = nil
            lock.broadcast()
        }
    }

    /// Reads part of a block straight from the store (small random reads).
    func readRange(_ key: String, length: Int, offset: Int, into dest: UnsafeMutableRawBufferPointer) throws(FSError) {
        if let disk, disk.read(key, length: length, offset: offset, into: dest) { return }
        let n: Int
        do {
            n = try store.get(key, offset: offset, into: dest)
        } catch {
            let e = error.code == ENOENT ? FSError(EIO, "block \(key) is missing from \(store.description)") : FSError(EIO, error.message)
            Log.error(e.message)
            throw e
        }
        if n != dest.count { throw FSError(EIO, "block \(key) in \(store.description) is shorter than its name says") }
    }
}
