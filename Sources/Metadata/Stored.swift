import StageFSCore

/// The bytes a volume's objects take in the bucket, beside the bytes of the blocks they hold
/// (the two differ on a compressed volume): counted by the processes that store and delete
/// blocks (a mount, the gateway, gc), kept in three counters. A volume formatted by an older
/// StageFS, or loaded from JuiceFS, is not counted until `stagefs gc` lists its bucket.
package protocol StoredBytesAdmin: AnyObject, Sendable {
    /// Adds what a process stored (positive) and deleted (negative) since it last said.
    func addStored(blockBytes: Int64, storedBytes: Int64) throws(FSError)
    /// The counts; nil when this volume's bytes are not counted.
    func storedCounts() throws(FSError) -> (blockBytes: Int64, storedBytes: Int64)?
    /// Sets the counts from a listing of the bucket (gc), and from then on they are counted.
    func setStored(blockBytes: Int64, storedBytes: Int64) throws(FSError)
}

extension TxnMetadata: StoredBytesAdmin {
    /// The counters: the blocks' bytes, the bytes stored for them, and whether they count.
    static var storedCounters: [String] { ["storedBlockBytes", "storedBytes", "storedCounted"] }

    package func addStored(blockBytes: Int64, storedBytes: Int64) throws(FSError) {
        guard blockBytes != 0 || storedBytes != 0 else { return }
        try store.transaction(write: true) { (tx) throws(FSError) in
            try store.add(tx, "storedBlockBytes", blockBytes)
            try store.add(tx, "storedBytes", storedBytes)
        }
    }

    package func storedCounts() throws(FSError) -> (blockBytes: Int64, storedBytes: Int64)? {
        try store.transaction(write: false) { (tx) throws(FSError) in
            try store.prefetch(tx, Self.storedCounters.map { .counter($0) })
            guard try store.counter(tx, "storedCounted") > 0 else { return nil }
            return (max(0, try store.counter(tx, "storedBlockBytes")), max(0, try store.counter(tx, "storedBytes")))
        }
    }

    package func setStored(blockBytes: Int64, storedBytes: Int64) throws(FSError) {
        try store.transaction(write: true) { (tx) throws(FSError) in
            try store.add(tx, "storedBlockBytes", blockBytes - (try store.counter(tx, "storedBlockBytes")))
            try store.add(tx, "storedBytes", storedBytes - (try store.counter(tx, "storedBytes")))
            if try store.counter(tx, "storedCounted") == 0 { try store.add(tx, "storedCounted", 1) }
        }
    }
}

extension MetadataEngine {
    /// Adds what a process stored and deleted to the volume's counters, on an engine that keeps
    /// them (not a gateway's client: the gateway counts for it).
    package func recordStored(blockBytes: Int64, storedBytes: Int64) throws(FSError) {
        try (self as? any StoredBytesAdmin)?.addStored(blockBytes: blockBytes, storedBytes: storedBytes)
    }
}
