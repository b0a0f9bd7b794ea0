import CoreMetrics
import StageFSCore

/// The metadata layer's metrics: transactions by kind with their latency (retries included)
/// and the transactions run again because what they read changed (a conflict) or came from a
/// stale client cache. Names as JuiceFS's where the meaning is the same.
enum MetaMetrics {
    static let writes = CoreMetrics.Timer(label: "stagefs_transaction_durations_histogram_seconds", dimensions: [("kind", "write")])
    static let reads = CoreMetrics.Timer(label: "stagefs_transaction_durations_histogram_seconds", dimensions: [("kind", "read")])
    static let restarts = CoreMetrics.Counter(label: "stagefs_transaction_restart")

    @inline(__always)
    static func transaction(_ write: Bool, since start: UInt64) {
        (write ? writes : reads).recordNanoseconds(Int64(Sys.monotonicNanos() &- start))
    }
}
