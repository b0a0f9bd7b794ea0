#if canImport(Glibc)
    import Glibc
#endif

/// A small leveled logger writing timestamped lines to standard error (the mount's log file
/// once it runs in the background).
public enum Log {
    public enum Level: Int, Sendable, Comparable {
        case debug = 0, info, warning, error
        public static func < (a: Level, b: Level) -> Bool { a.rawValue < b.rawValue }
        var name: String {
            switch self {
            case .debug: return "DEBUG"
            case .info: return "INFO"
            case .warning: return "WARNING"
            case .error: return "ERROR"
            }
        }
    }

    private static let state = Locked<Level>(.warning)

    /// The lowest level written.
    public static var level: Level {
        get { state.current }
        set { state.withLock { $0 = newValue } }
    }

    public static func debug(_ message: @autoclosure () -> String) { write(.debug, message) }
    public static func info(_ message: @autoclosure () -> String) { write(.info, message) }
    public static func warning(_ message: @autoclosure () -> String) { write(.warning, message) }
    public static func error(_ message: @autoclosure () -> String) { write(.error, message) }

    private static func write(_ level: Level, _ message: () -> String) {
        guard level >= self.level else { return }
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
        let line = "\(stamp) stagefs[\(getpid())] \(level.name): \(message())\n"
        _ = line.withCString { Glibc.write(2, $0, strlen($0)) }
    }
}
