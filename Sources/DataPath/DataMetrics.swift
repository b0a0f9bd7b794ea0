import CoreMetrics
import StageFSCore

/// Requests to the object store for blocks, by kind, with their latency, the bytes they moved
/// and the ones that failed (names as JuiceFS's: `stagefs_object_request_*`). Every block goes
/// through `BlockStore`, which counts here (and a gateway's store of a block it was sent).
package enum ObjectMetrics {
    package enum Method: Int, CaseIterable {
        case get, put, delete, head
        var name: String { ["GET", "PUT", "DELETE", "HEAD"][rawValue] }
    }

    static let durations: [CoreMetrics.Timer] = Method.allCases.map {
        CoreMetrics.Timer(label: "stagefs_object_request_durations_histogram_seconds", dimensions: [("method", $0.name)])
    }
    static let dataBytes: [CoreMetrics.Counter] = Method.allCases.map {
        CoreMetrics.Counter(label: "stagefs_object_request_data_bytes", dimensions: [("method", $0.name)])
    }
    static let errors = CoreMetrics.Counter(label: "stagefs_object_request_errors")

    /// Runs one request, timing it and counting it as an error when it throws.
    @inline(__always)
    package static func measure<T>(_ m: Method, _ body: () throws(FSError) -> T) throws(FSError) -> T {
        let start = Sys.monotonicNanos()
        defer { durations[m.rawValue].recordNanoseconds(Int64(Sys.monotonicNanos() &- start)) }
        do {
            return try body()
        } catch {
            errors.increment()
            throw error
        }
    }

    package static func bytes(_ m: Method, _ n: Int) { dataBytes[m.rawValue].increment(by: Int64(n)) }
}

/// Reads by where they were answered: memory, the node's disk cache, or the object store (a
/// miss), in requests and bytes; blocks evicted from each cache; bytes written to the disk
/// cache. Names as JuiceFS's `juicefs_blockcache_*`, with a `level` label.
enum CacheMetrics {
    enum Level: Int, CaseIterable {
        case memory, disk
        var name: String { rawValue == 0 ? "memory" : "disk" }
    }

    static let hits: [CoreMetrics.Counter] = Level.allCases.map {
        CoreMetrics.Counter(label: "stagefs_blockcache_hits", dimensions: [("level", $0.name)])
    }
    static let hitBytes: [CoreMetrics.Counter] = Level.allCases.map {
        CoreMetrics.Counter(label: "stagefs_blockcache_hit_bytes", dimensions: [("level", $0.name)])
    }
    static let misses = CoreMetrics.Counter(label: "stagefs_blockcache_miss")
    static let missBytes = CoreMetrics.Counter(label: "stagefs_blockcache_miss_bytes")
    static let evictions: [CoreMetrics.Counter] = Level.allCases.map {
        CoreMetrics.Counter(label: "stagefs_blockcache_evict", dimensions: [("level", $0.name)])
    }
    static let diskWrites = CoreMetrics.Counter(label: "stagefs_blockcache_write_bytes")

    @inline(__always)
    static func hit(_ level: Level, _ bytes: Int) {
        hits[level.rawValue].increment()
        hitBytes[level.rawValue].increment(by: Int64(bytes))
    }

    @inline(__always)
    static func miss(_ bytes: Int) {
        misses.increment()
        missBytes.increment(by: Int64(bytes))
    }
}
