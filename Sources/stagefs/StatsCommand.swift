import ArgumentParser
import StageFSCore
import Telemetry

#if canImport(Glibc)
    import Glibc
#endif

struct Stats: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "A live view of a mount's metrics: operations, latencies, throughput, caches, the object store, uploads.",
        discussion: """
            TARGET is a mountpoint (or a path inside one) of a mount of yours on this node: its metrics come through a socket only \
            you can open, whether or not it serves a --metrics port. TARGET may also be HOST:PORT of a --metrics port (a gateway's, \
            root's node-wide mount's, a 'stage --metrics' run). The screen is redrawn every --interval seconds, like top; Ctrl-C \
            ends it. Rates are per second over the last interval. When the output is not a terminal, each view is printed after \
            the last, separated by a blank line.
            """)

    @Argument(help: "A mountpoint, a path inside a mount, or HOST:PORT of a metrics port.")
    var target: String

    @Option(help: "Seconds between views.")
    var interval: Double = 1

    @Option(help: "Views to show before ending (default: until Ctrl-C).")
    var count: Int?

    func validate() throws {
        guard interval >= 0.1, interval <= 3600 else { throw ValidationError("--interval must be 0.1 to 3600 seconds") }
        if let count, count < 1 { throw ValidationError("--count must be at least 1") }
    }

    func run() throws {
        let (source, title) = try resolve()
        var last = try Scrape(source())
        var lastAt = Sys.monotonicNanos()
        let tty = isatty(1) == 1
        var shown = 0
        while count.map({ shown < $0 }) ?? true {
            Sys.sleep(seconds: interval)
            let now = try Scrape(source())
            let at = Sys.monotonicNanos()
            let screen = StatsView(title: title, old: last, new: now, seconds: Double(at - lastAt) / 1e9).render()
            // (Straight to the descriptor: each view whole and at once, also into a pipe.)
            let out = Array(((tty ? "\u{1B}[H\u{1B}[2J" : "") + screen + (tty ? "" : "\n")).utf8)
            try fsTyped { try out.withUnsafeBytes { try Sys.writeAll(1, [$0], path: "standard output") } }
            last = now
            lastAt = at
            shown += 1
        }
    }

    /// How to read the target's metrics, and the view's title. (The target is matched against
    /// the mount table, never looked up: a mount that hangs does not hang this.)
    private func resolve() throws(FSError) -> (() throws(FSError) -> [UInt8], String) {
        if let address = try Stats.address(target) {
            return ({ () throws(FSError) in try MetricsClient.fetch(address) }, "metrics at \(address)")
        }
        let path = MountTable.normalized(absolutePath(target))
        guard let mount = MountTable.containing(path) else {
            throw FSError(EINVAL, "\(path) is not in a StageFS mount of this node (for a metrics port, give HOST:PORT or PORT)")
        }
        let mp = mount.mountPoint
        guard let (record, dir, dirPath) = Runtime.loadWithDirectory(mp) else {
            throw FSError(
                ENOENT,
                "no record of the mount at \(mp) among uid \(getuid())'s mounts: it is another user's (or root's node-wide mount), or was mounted from a /dev/fd descriptor, which keeps none; read its metrics port instead: stagefs stats HOST:PORT (mount --metrics)"
            )
        }
        guard let socket = record.metricsSocket else {
            close(dir)
            throw FSError(
                ENOENT, "the mount at \(mp) serves no metrics socket (it started before this version, or could not make one: see its log)")
        }
        let label = "the metrics socket of the mount at \(mp) (\(dirPath)/\(socket))"
        let port = record.metricsAddress.map { ", metrics on \($0)" } ?? ""
        return (
            { () throws(FSError) in try MetricsClient.fetch(dir: dir, name: socket, label: label) },
            "\(mp) (volume \(record.volume), pid \(record.pid)\(port))"
        )
    }

    /// The metrics port a target names: `PORT` (127.0.0.1), `HOST:PORT`, `http://HOST:PORT[/...]`;
    /// nil for a path (one with a '/', or no port at its end: `./name:1` is a path).
    static func address(_ target: String) throws(FSError) -> TCPAddress? {
        var text = target
        if text.hasPrefix("http://") {
            text = String(text.dropFirst(7))
            if let slash = text.firstIndex(of: "/") { text = String(text[..<slash]) }
        }
        if text.contains("/") || text.isEmpty { return nil }
        if text.allSatisfy(\.isNumber) || (text.contains(":") && text.split(separator: ":").last?.allSatisfy(\.isNumber) == true) {
            return try TCPAddress.parse(text, option: "stats", defaultHost: "127.0.0.1", example: 9567)
        }
        return nil
    }
}

/// One screen of `stagefs stats`: what changed between two scrapes, per second, and the
/// gauges as they are now.
struct StatsView {
    var title: String
    var old: Scrape
    var new: Scrape
    var seconds: Double

    func rate(_ name: String, _ labels: [String: String] = [:]) -> Double {
        max(0, new.sum(name, labels) - old.sum(name, labels)) / max(seconds, 0.001)
    }

    /// Operations per second and their mean latency (ms) of a histogram.
    func timed(_ name: String, _ labels: [String: String] = [:]) -> (Double, Double) {
        let n = new.sum(name + "_count", labels) - old.sum(name + "_count", labels)
        let s = new.sum(name + "_sum", labels) - old.sum(name + "_sum", labels)
        return (max(0, n) / max(seconds, 0.001), n > 0 ? s / n * 1000 : 0)
    }

    func render() -> String {
        var lines: [String] = []
        lines.append("stagefs stats: \(title), every \(num(seconds)) s")
        let cpu = (new.sum("stagefs_cpu_usage") - old.sum("stagefs_cpu_usage")) / max(seconds, 0.001) * 100
        lines.append(
            "process     cpu \(num(cpu))%   memory \(bytes((new.sum("stagefs_memory"))))   uptime \(duration(new.sum("stagefs_uptime")))"
                + (new.has("stagefs_used_buffer_size_bytes") ? "   write buffer \(bytes((new.sum("stagefs_used_buffer_size_bytes"))))" : "")
        )
        let fuse = "stagefs_fuse_ops_durations_histogram_seconds"
        if new.has(fuse + "_count") {
            let (ops, lat) = timed(fuse)
            lines.append(
                "fuse        \(num(ops)) ops/s   \(ms(lat)) avg   read \(bytes((rate("stagefs_fuse_read_size_bytes_sum"))))/s   write \(bytes((rate("stagefs_fuse_written_size_bytes_sum"))))/s   errors \(num(rate("stagefs_fuse_errors")))/s"
            )
            let byOp = new.by(fuse + "_count", "method")
            let busiest = byOp.keys.map { m in (m, timed(fuse, ["method": m])) }.filter { $0.1.0 > 0 }.sorted { $0.1.0 > $1.1.0 }.prefix(6)
            if !busiest.isEmpty {
                lines.append("  busiest   " + busiest.map { "\(shown($0.0)) \(num($0.1.0))/s \(ms($0.1.1))" }.joined(separator: "   "))
            }
        }
        let txn = "stagefs_transaction_durations_histogram_seconds"
        if new.has(txn + "_count") {
            let (w, wl) = timed(txn, ["kind": "write"])
            let (r, rl) = timed(txn, ["kind": "read"])
            var line =
                "metadata    \(num(w)) writes/s \(ms(wl))   \(num(r)) reads/s \(ms(rl))   restarts \(num(rate("stagefs_transaction_restart")))/s"
            let redis = "stagefs_redis_round_trip_durations_histogram_seconds"
            if new.sum(redis + "_count") > 0 {
                let (n, l) = timed(redis)
                line += "   redis \(num(n)) round trips/s \(ms(l))"
            }
            let gw = "stagefs_gateway_round_trip_durations_histogram_seconds"
            if new.sum(gw + "_count") > 0 {
                let (n, l) = timed(gw)
                line += "   gateway \(num(n)) round trips/s \(ms(l))"
            }
            lines.append(line)
        }
        if new.has("stagefs_blockcache_hits") {
            let mem = rate("stagefs_blockcache_hit_bytes", ["level": "memory"])
            let disk = rate("stagefs_blockcache_hit_bytes", ["level": "disk"])
            let miss = rate("stagefs_blockcache_miss_bytes")
            // (Reads served from memory, in bytes; blocks brought into memory, read-ahead
            // included, from the disk cache or from the store.)
            lines.append("cache       reads from memory \(bytes(mem))/s   blocks loaded from disk \(bytes(disk))/s, from the store \(bytes(miss))/s")
            lines.append(
                "            held in memory \(bytes((new.sum("stagefs_blockcache_bytes", ["level": "memory"]))))   on disk \(bytes((new.sum("stagefs_blockcache_bytes", ["level": "disk"]))))   written to disk \(bytes((rate("stagefs_blockcache_write_bytes"))))/s   evicted \(num(rate("stagefs_blockcache_evict")))/s"
            )
        }
        let obj = "stagefs_object_request_durations_histogram_seconds"
        if new.has(obj + "_count") {
            var parts: [String] = []
            for m in ["GET", "PUT", "DELETE", "HEAD"] {
                let (n, l) = timed(obj, ["method": m])
                var p = "\(m.lowercased()) \(num(n))/s"
                if m == "GET" || m == "PUT" { p += " \(bytes((rate("stagefs_object_request_data_bytes", ["method": m]))))/s" }
                if n > 0 { p += " \(ms(l))" }
                parts.append(p)
            }
            lines.append("objects     " + parts.joined(separator: "   ") + "   errors \(num(rate("stagefs_object_request_errors")))/s")
        }
        if new.has("stagefs_upload_queue_blocks") {
            lines.append(
                "uploads     \(count(new.sum("stagefs_upload_queue_blocks"))) blocks waiting (\(bytes((new.sum("stagefs_upload_queue_bytes"))))), the oldest for \(num(new.sum("stagefs_upload_queue_oldest_seconds"))) s"
            )
        }
        if new.has("stagefs_used_space") {
            lines.append("volume      \(bytes((new.sum("stagefs_used_space")))) used, \(count(new.sum("stagefs_used_inodes"))) inodes")
        }
        if new.has("stagefs_stage_files") {
            lines.append(
                "staging     \(count(new.sum("stagefs_stage_files_done"))) of \(count(new.sum("stagefs_stage_files"))) files, \(bytes((new.sum("stagefs_stage_bytes_done")))) of \(bytes((new.sum("stagefs_stage_bytes")))), fetching \(bytes((rate("stagefs_stage_bytes_fetched"))))/s"
            )
        }
        let gwReq = "stagefs_gateway_request_durations_histogram_seconds"
        if new.has(gwReq + "_count") {
            let (n, l) = timed(gwReq)
            lines.append(
                "gateway     \(num(n)) requests/s \(ms(l))   \(count(new.sum("stagefs_gateway_connections"))) connections   errors \(num(rate("stagefs_gateway_request_errors")))/s"
            )
        }
        return lines.joined(separator: "\n") + "\n"
    }

    /// A byte count as text; what is not a finite, non-negative number shows as 0.
    func bytes(_ v: Double) -> String { humanBytes(Int64(clamp(v))) }

    /// A count as text, the same way.
    func count(_ v: Double) -> Int { Int(clamp(v)) }

    /// `v` within 0...2^62 (a hostile or broken exposition's NaN, infinities and huge values
    /// are not trusted to convert).
    func clamp(_ v: Double) -> Double { v.isFinite ? min(max(v, 0), 4.6e18) : 0 }

    /// A label value as shown: printable ASCII only, at most 32 characters.
    func shown(_ s: String) -> String {
        String(String.UnicodeScalarView(s.unicodeScalars.prefix(32).map { $0.value >= 32 && $0.value < 127 ? $0 : "?" }))
    }

    func num(_ v: Double) -> String {
        let v = clamp(v)
        if v >= 100 || v == v.rounded() { return String(Int(v.rounded())) }
        let tenths = Int((v * 10).rounded())
        return "\(tenths / 10).\(tenths % 10)"
    }

    func ms(_ v: Double) -> String {
        clamp(v) < 1 ? "\(num(v * 1000)) µs" : "\(num(v)) ms"
    }

    func duration(_ s: Double) -> String {
        let t = Int(clamp(s))
        if t < 60 { return "\(t) s" }
        if t < 3600 { return "\(t / 60)m\(t % 60 < 10 ? "0" : "")\(t % 60)s" }
        return "\(t / 3600)h\(t % 3600 / 60 < 10 ? "0" : "")\(t % 3600 / 60)m"
    }
}
