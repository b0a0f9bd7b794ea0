#if canImport(Glibc)
    import Glibc
#endif

/// A calendar time in UTC (`gmtime_r` and `timegm`): what names of backups, trash hours and
/// S3's times are made of and read from.
public struct UTCTime: Sendable, Equatable {
    public var year: Int32
    public var month: Int32
    public var day: Int32
    public var hour: Int32
    public var minute: Int32
    public var second: Int32

    /// The time `secs` seconds after the epoch.
    public init(_ secs: Int64) {
        var t = time_t(secs)
        var parts = tm()
        gmtime_r(&t, &parts)
        year = parts.tm_year + 1900
        month = parts.tm_mon + 1
        day = parts.tm_mday
        hour = parts.tm_hour
        minute = parts.tm_min
        second = parts.tm_sec
    }

    /// A time from its parts; nil when one is out of range.
    public init?(year: Int32, month: Int32, day: Int32, hour: Int32 = 0, minute: Int32 = 0, second: Int32 = 0) {
        guard (1...12).contains(month), (1...31).contains(day), (0..<24).contains(hour), (0..<60).contains(minute), (0...60).contains(second) else {
            return nil
        }
        (self.year, self.month, self.day, self.hour, self.minute, self.second) = (year, month, day, hour, minute, second)
    }

    /// Seconds after the epoch.
    public var seconds: Int64 {
        var parts = tm()
        parts.tm_year = year - 1900
        parts.tm_mon = month - 1
        parts.tm_mday = day
        parts.tm_hour = hour
        parts.tm_min = minute
        parts.tm_sec = second
        return Int64(timegm(&parts))
    }

    /// `v` in two digits at least.
    public static func two(_ v: Int32) -> String { v < 10 ? "0\(v)" : "\(v)" }
}
