import CoreMetrics
import Prometheus
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// The process's metrics: swift-metrics bootstrapped with a Prometheus registry, so that what
/// the layers count (`CoreMetrics.Counter`, `Timer`, `Recorder`, `Meter`) lands in one
/// exposition. A process that never calls `start` (a command, a unit test) counts into
/// swift-metrics' no-op backend: nothing is kept and nothing costs more than a call.
package enum Telemetry {
    private struct State: Sendable {
        var registry: PrometheusCollectorRegistry?
        var hooks: [@Sendable () -> Void] = []
    }

    private static let state = Locked(State())

    /// Latency buckets of every timer, from 50 µs (a lookup answered from memory) to 30 s (a
    /// blocked lock, an upload through a slow link).
    static let durationBuckets: [Duration] = [
        .microseconds(50), .microseconds(100), .microseconds(250), .microseconds(500), .milliseconds(1), .microseconds(2500),
        .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100), .milliseconds(250),
        .milliseconds(500), .seconds(1), .milliseconds(2500), .seconds(5), .seconds(10), .seconds(30),
    ]

    /// Size buckets of the histograms of request sizes (FUSE reads and writes).
    static let sizeBuckets: [Double] = [4096, 16384, 65536, 131072, 262144, 524288, 1_048_576, 4_194_304]

    /// Names of the histograms of sizes (the rest take swift-prometheus' default buckets).
    package static let sizeHistograms = ["stagefs_fuse_read_size_bytes", "stagefs_fuse_written_size_bytes"]

    /// Starts metrics for this process: bootstraps swift-metrics (once; later calls change
    /// nothing) and adds the process's own gauges. Metrics a layer made before this call stay
    /// silent, so a process calls it before it does any work.
    package static func start() {
        let fresh = state.withLock { (s: inout State) -> PrometheusCollectorRegistry? in
            if s.registry != nil { return nil }
            let registry = PrometheusCollectorRegistry()
            s.registry = registry
            return registry
        }
        guard let registry = fresh else { return }
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.defaultDurationHistogramBuckets = durationBuckets
        for name in sizeHistograms { factory.valueHistogramBuckets[name] = sizeBuckets }
        MetricsSystem.bootstrap(factory)
        let started = Sys.monotonicNanos()
        func gauge(_ name: String, _ help: String) -> Prometheus.Gauge {
            registry.makeGauge(descriptor: MetricNameDescriptor(namespace: "stagefs", metricName: name, unitName: "", helpText: help))
        }
        let uptime = gauge("uptime", "Seconds since the process started.")
        let memory = gauge("memory", "Resident memory of the process, bytes.")
        let cpu = gauge("cpu_usage", "CPU time the process used (user and system), seconds.")
        onScrape {
            uptime.set(Double(Sys.monotonicNanos() - started) / 1e9)
            memory.set(Double(residentBytes()))
            var u = rusage()
            if getrusage(RUSAGE_SELF.rawValue, &u) == 0 {
                cpu.set(Double(u.ru_utime.tv_sec + u.ru_stime.tv_sec) + Double(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6)
            }
        }
    }

    /// Whether `start` was called.
    package static var started: Bool { state.withLock { $0.registry != nil } }

    /// Adds work done before each exposition: gauges set from the state they show (bytes
    /// cached, the upload queue, the volume's usage). A hook must be quick and bounded.
    package static func onScrape(_ body: @escaping @Sendable () -> Void) {
        state.withLock { $0.hooks.append(body) }
    }

    /// The exposition in Prometheus' text format (after the hooks ran); empty before `start`.
    package static func exposition() -> [UInt8] {
        let (registry, hooks) = state.withLock { ($0.registry, $0.hooks) }
        guard let registry else { return [] }
        for h in hooks { h() }
        return registry.emitToBuffer()
    }

    /// The process's resident memory (`/proc/self/statm`), bytes.
    static func residentBytes() -> Int {
        guard let bytes = Sys.readFile("/proc/self/statm") else { return 0 }
        let fields = bytes.split(separator: 32)
        guard fields.count > 1, let pages = Int(String(decoding: fields[1], as: UTF8.self)) else { return 0 }
        return pages * Int(sysconf(Int32(_SC_PAGESIZE)))
    }
}
