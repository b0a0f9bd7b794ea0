import CoreMetrics
import Foundation
import StageFSCore
import Telemetry
import Testing

#if canImport(Glibc)
    import Glibc
#endif

@Suite("Metrics")
struct TelemetryTests {
    @Test func anExpositionIsReadBack() {
        let text = """
            # HELP stagefs_uptime Seconds since the process started.
            # TYPE stagefs_uptime gauge
            stagefs_uptime 12.5
            stagefs_fuse_ops_durations_histogram_seconds_count{method="read"} 40
            stagefs_fuse_ops_durations_histogram_seconds_count{method="write"} 2
            stagefs_fuse_ops_durations_histogram_seconds_bucket{le="+Inf",method="write"} 2
            odd{a="x\\"y\\\\z\\n",b="2"} 1e3
            broken{a="x" 5
            nolabels_and_no_value
            """
        let s = Scrape(Array(text.utf8))
        #expect(s.sum("stagefs_uptime") == 12.5)
        #expect(s.sum("stagefs_fuse_ops_durations_histogram_seconds_count") == 42)
        #expect(s.sum("stagefs_fuse_ops_durations_histogram_seconds_count", ["method": "read"]) == 40)
        #expect(s.by("stagefs_fuse_ops_durations_histogram_seconds_count", "method") == ["read": 40, "write": 2])
        #expect(s.samples.contains(Sample(name: "odd", labels: ["a": "x\"y\\z\n", "b": "2"], value: 1000)))
        #expect(s.sum("stagefs_fuse_ops_durations_histogram_seconds_bucket") == 2)
        #expect(!s.has("broken") && !s.has("nolabels_and_no_value"))
    }

    @Test func requestsAreRouted() {
        func route(_ s: String) -> MetricsServer.Route { MetricsServer.route(Array(s.utf8)) }
        #expect(route("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n") == .metrics)
        #expect(route("GET /metrics?x=1 HTTP/1.0\r\n\r\n") == .metrics)
        #expect(route("GET /other HTTP/1.1\r\n\r\n") == .notFound)
        #expect(route("POST /metrics HTTP/1.1\r\n\r\n") == .badMethod)
        #expect(route("\u{0}\u{1}garbage\r\n\r\n") == .bad)
        #expect(route("no line end") == .bad)
        #expect(MetricsServer.endOfHead(Array("GET / HTTP/1.1\r\n\r\n".utf8)))
        #expect(MetricsServer.endOfHead(Array("GET / HTTP/1.1\n\n".utf8)))
        #expect(!MetricsServer.endOfHead(Array("GET / HTTP/1.1\r\nHost: x\r\n".utf8)))
    }

    /// A counter made after `start` reaches the exposition, served on a Unix socket in a
    /// directory and read back by the client.
    @Test func countsAreServedOnASocket() throws {
        Telemetry.start()
        let c = CoreMetrics.Counter(label: "stagefs_test_counted", dimensions: [("kind", "unit")])
        c.increment(by: 7)
        let base = FileManager.default.temporaryDirectory.appendingPathComponent("stagefs-telemetry-\(getpid())").path
        try FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: base) }
        let dir = open(base, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        #expect(dir >= 0)
        defer { close(dir) }
        let server = MetricsServer()
        try server.listenUnix(dir: dir, name: "m.sock", label: "test socket")
        server.start()
        defer { server.stop() }
        let got = try MetricsClient.fetch(dir: dir, name: "m.sock", label: "test socket")
        let s = Scrape(got)
        #expect(s.sum("stagefs_test_counted", ["kind": "unit"]) == 7)
        #expect(s.sum("stagefs_uptime") > 0)
        // A file of that name that is not a socket is not replaced.
        let file = open("\(base)/f.sock", O_CREAT | O_WRONLY | O_CLOEXEC, 0o600)
        close(file)
        #expect(throws: FSError.self) { try MetricsServer().listenUnix(dir: dir, name: "f.sock", label: "f") }
    }
}
