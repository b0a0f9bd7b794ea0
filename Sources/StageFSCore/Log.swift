import Logging

#if canImport(Glibc)
    import Glibc
#endif

/// StageFS's log: swift-log's `Logger` (label `stagefs`), whose handler writes timestamped
/// lines to standard error (the mount's log file once it runs in the background):
/// `2026-11-23T20:51:49.123Z stagefs[4242] WARNING: message key=value`.
public enum Log {
    public typealias Level = Logger.Level

    private static let shared = Locked(Logger(label: "stagefs") { _ in StageFSLogHandler() })

    /// The logger, for code that adds metadata or hands it on.
    public static var logger: Logger { shared.current }

    /// The lowest level written (warning unless the mount is verbose).
    public static var level: Level {
        get { shared.current.logLevel }
        set { shared.withLock { $0.logLevel = newValue } }
    }

    public static func debug(_ message: @autoclosure () -> String) { logger.debug("\(message())") }
    public static func info(_ message: @autoclosure () -> String) { logger.info("\(message())") }
    public static func warning(_ message: @autoclosure () -> String) { logger.warning("\(message())") }
    public static func error(_ message: @autoclosure () -> String) { logger.error("\(message())") }
}

/// Writes each event as one line to standard error, in one write(2) (lines of threads do not
/// mix): UTC time to the millisecond, the process id, the level, the message, then metadata.
public struct StageFSLogHandler: LogHandler {
    public var logLevel: Logger.Level = .warning
    public var metadata: Logger.Metadata = [:]

    public init() {}

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        var t = tm()
        var secs = now.tv_sec
        gmtime_r(&secs, &t)
        func pad(_ v: Int, _ width: Int) -> String {
            let s = String(v)
            return String(repeating: "0", count: max(0, width - s.count)) + s
        }
        let stamp =
            "\(pad(Int(t.tm_year) + 1900, 4))-\(pad(Int(t.tm_mon) + 1, 2))-\(pad(Int(t.tm_mday), 2))T"
            + "\(pad(Int(t.tm_hour), 2)):\(pad(Int(t.tm_min), 2)):\(pad(Int(t.tm_sec), 2)).\(pad(now.tv_nsec / 1_000_000, 3))Z"
        var all = metadata
        if let extra = event.metadata { all.merge(extra) { _, new in new } }
        let tail = all.isEmpty ? "" : " " + all.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
        let line = "\(stamp) stagefs[\(getpid())] \(event.level.rawValue.uppercased()): \(event.message)\(tail)\n"
        _ = line.withCString { Glibc.write(2, $0, strlen($0)) }
    }
}
