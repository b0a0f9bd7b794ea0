import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// One stored object as listed.
public struct ObjectInfo: Sendable, Equatable {
    public var key: String
    public var size: Int
    /// When the object was last written, in seconds since the epoch (nil: the store did not say).
    public var modified: Int64?
    public init(key: String, size: Int, modified: Int64? = nil) {
        self.key = key
        self.size = size
        self.modified = modified
    }
}

/// Where blocks live: a local directory or an S3 bucket. Methods block; they run on worker
/// threads. An object is never reported written before the store acknowledged it.
public protocol ObjectStore: AnyObject, Sendable {
    /// "directory /data" or "S3 bucket http://host:port/bucket", for messages.
    var description: String { get }
    /// Stores `data` under `key` (whole-object replace).
    func put(_ key: String, _ data: UnsafeRawBufferPointer) throws(FSError)
    /// Reads up to `buffer.count` bytes of `key` from `offset`; returns how many were read.
    /// A missing object is `ENOENT`.
    func get(_ key: String, offset: Int, into buffer: UnsafeMutableRawBufferPointer) throws(FSError) -> Int
    /// Removes `key`; a missing object is not an error.
    func delete(_ key: String) throws(FSError)
    /// The object's size, or nil when it does not exist.
    func head(_ key: String) throws(FSError) -> Int?
    /// Objects whose keys start with `prefix` and sort after `after` (nil: from the first), in
    /// key order, at most `limit`: a page of a listing (the next starts after its last key).
    func list(prefix: String, after: String?, limit: Int) throws(FSError) -> [ObjectInfo]
    /// Creates the bucket or directory if it does not exist.
    func create() throws(FSError)
    /// Keeps a copy of a small block of a slice not yet committed, to go out with that slice's
    /// commit, when this store does so (a gateway's: one request for a small file's block and
    /// its record); false: the block is to be `put`. Does no I/O, so a writer calls it in place
    /// rather than on an upload thread. The block is durable once its slice's commit returns.
    func holdForCommit(_ key: String, _ data: UnsafeRawBufferPointer) -> Bool
    /// Whether another process stores and deletes the objects for this one (a gateway's
    /// client): that process counts the bytes the bucket holds, not this one.
    var isProxy: Bool { get }
    /// Waits until every object put before is durable (a directory bucket with `deferSync`;
    /// other stores' puts are durable when they return); throws if one of `keys` (or, with
    /// none named, any object of the batch this call flushed) could not be made durable.
    func sync(_ keys: [String]) throws(FSError)
    /// Whether this store's objects are files on the same file system as every one of `paths`
    /// (a disk cache there would copy them to where they already are).
    func isOnFileSystem(of paths: [String]) -> Bool
}

extension ObjectStore {
    /// The first `limit` objects whose keys start with `prefix`, in key order.
    public func list(prefix: String, limit: Int) throws(FSError) -> [ObjectInfo] { try list(prefix: prefix, after: nil, limit: limit) }

    /// Stores do not hold blocks back unless they say so.
    public func holdForCommit(_ key: String, _ data: UnsafeRawBufferPointer) -> Bool { false }

    public var isProxy: Bool { false }

    public func isOnFileSystem(of paths: [String]) -> Bool { false }

    public func sync(_ keys: [String]) throws(FSError) {}

    /// `sync` naming no object.
    public func sync() throws(FSError) { try sync([]) }

    /// Stores a byte array.
    public func put(_ key: String, bytes: [UInt8]) throws(FSError) {
        try fsTyped { try bytes.withUnsafeBytes { try put(key, $0) } }
    }

    /// Reads a whole small object.
    public func getAll(_ key: String, size: Int) throws(FSError) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: size)
        let n = try fsTyped { try out.withUnsafeMutableBytes { try get(key, offset: 0, into: $0) } }
        return Array(out[0..<n])
    }

    /// Proves the store works with these settings: writes, reads back and removes a probe object.
    /// Used by `format` and `mount` so wrong credentials fail at once with a clear message.
    public func check(prefix: String) throws(FSError) {
        let key = "\(prefix)/stagefs-probe-\(getpid())-\(Sys.monotonicNanos())"
        let payload = Array("stagefs probe".utf8)
        try put(key, bytes: payload)
        let back = try getAll(key, size: payload.count)
        try delete(key)
        if back != payload { throw FSError(EIO, "\(description) returned other bytes than were written to it") }
    }
}

/// Settings for opening a store.
public struct StoreConfig: Sendable {
    /// `file` or `s3`.
    public var storage: String
    public var bucket: String
    public var accessKey: String?
    public var secretKey: String?
    /// Seconds one request may take (connect + transfer).
    public var timeout: Double = 60
    /// Attempts per request for retryable failures (5xx, throttling, connection errors).
    public var maxAttempts: Int = 6
    /// A directory bucket's puts reach the disk at `sync` (before each commit that names them,
    /// and every second), not each before it returns (`LocalObjectStore`).
    public var deferSync = false

    public init(storage: String, bucket: String, accessKey: String? = nil, secretKey: String? = nil) {
        self.storage = storage
        self.bucket = bucket
        self.accessKey = accessKey
        self.secretKey = secretKey
    }
}

/// Opens the store a volume's settings name.
public func openObjectStore(_ config: StoreConfig) throws(FSError) -> any ObjectStore {
    switch config.storage {
    case "file": return try LocalObjectStore(root: config.bucket, deferSync: config.deferSync)
    case "s3": return try S3ObjectStore(config)
    default: throw FSError.usage("unknown storage '\(config.storage)' (expected file or s3)")
    }
}

/// Exponential back-off with full jitter: attempt 1 waits up to 0.1 s, doubling to 5 s at most.
func backoffDelay(attempt: Int) -> Double {
    let cap = min(5.0, 0.1 * Double(1 << min(attempt, 10)))
    return cap * 0.5 + Double.random(in: 0...(cap * 0.5))
}
