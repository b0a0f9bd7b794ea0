import CoreMetrics
import DataPath
import StageFSCore
import Telemetry
import VFS

#if canImport(Glibc)
    import Glibc
#endif

/// `--metrics ADDRESS` of mount, gateway and stage: `HOST:PORT`, or `PORT` for
/// 127.0.0.1:PORT; nil when not given.
func metricsAddress(_ text: String?) throws(FSError) -> TCPAddress? {
    guard let text else { return nil }
    return try TCPAddress.parse(text, option: "--metrics", defaultHost: "127.0.0.1", example: 9567)
}

/// Starts metrics for this process and listens on `address` (nil: no port); the labels of
/// the addresses it listens on, and a warning when another process holds the port (it is
/// tried again until free: a user who takes it first cannot keep a gateway or mount from
/// starting). An address that cannot be listened on otherwise is an error naming it.
func startMetrics(_ address: TCPAddress?) throws(FSError) -> (server: MetricsServer, labels: [String], warning: String?) {
    Telemetry.start()
    let server = MetricsServer()
    guard let address else { return (server, [], nil) }
    let (labels, deferred) = try server.listenOrRetry(address, option: "--metrics")
    return (server, labels, deferred)
}

/// The gauges of a mount, set from its state before each exposition: the caches' sizes, the
/// write buffer, the upload queue and the volume's usage (asked of the metadata at most every
/// 5 s, whatever the scrape rate).
func registerMountGauges(_ vfs: VFS) {
    let data = vfs.data
    let memoryBytes = Gauge(label: "stagefs_blockcache_bytes", dimensions: [("level", "memory")])
    let memoryBlocks = Gauge(label: "stagefs_blockcache_blocks", dimensions: [("level", "memory")])
    let diskBytes = Gauge(label: "stagefs_blockcache_bytes", dimensions: [("level", "disk")])
    let buffer = Gauge(label: "stagefs_used_buffer_size_bytes")
    let queueBlocks = Gauge(label: "stagefs_upload_queue_blocks")
    let queueBytes = Gauge(label: "stagefs_upload_queue_bytes")
    let queueAge = Gauge(label: "stagefs_upload_queue_oldest_seconds")
    let usedSpace = Gauge(label: "stagefs_used_space")
    let usedInodes = Gauge(label: "stagefs_used_inodes")
    let asked = Locked<UInt64>(0)
    let diskAsked = Locked<UInt64>(0)
    Telemetry.onScrape {
        memoryBytes.record(data.blocks.memory.bytesUsed)
        memoryBlocks.record(data.blocks.memory.count)
        // (The disk cache's size is read from its index, at most once a second: scrapes do not
        // hold the index's lock from the mount's reads.)
        if let disk = data.disk, due(diskAsked, every: 1_000_000_000), let held = disk.bytesHeld { diskBytes.record(held) }
        buffer.record(data.bufferedBytes)
        let q = data.uploadQueue
        queueBlocks.record(q.blocks)
        queueBytes.record(q.bytes)
        queueAge.record(q.oldest)
        if due(asked, every: 5_000_000_000), let s = try? vfs.meta.statfs() {
            usedSpace.record(Int64(clamping: s.usedSpace))
            usedInodes.record(Int64(clamping: s.usedInodes))
        }
    }
}

/// Whether `nanos` have passed since the last time this said yes (and notes now if so).
private func due(_ last: Locked<UInt64>, every nanos: UInt64) -> Bool {
    let now = Sys.monotonicNanos()
    return last.withLock { (t: inout UInt64) -> Bool in
        guard t == 0 || now &- t >= nanos else { return false }
        t = now
        return true
    }
}
