import ArgumentParser
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// Values an admin writes in plugstack.conf, stagefs.env or on the command line: durations
/// (`7d`), sizes (`500G`) and the FUSE options a job's mount may take.
enum Setting {
    /// Seconds of a duration: `N` or `N` followed by `s`, `m`, `h` or `d` (`90s`, `12h`, `7d`).
    static func seconds(_ text: String) -> Int? {
        var digits = Substring(text)
        var unit = 1
        switch text.last {
        case "s": unit = 1
        case "m": unit = 60
        case "h": unit = 3600
        case "d": unit = 86400
        default: unit = 0
        }
        if unit != 0 { digits = digits.dropLast() } else { unit = 1 }
        guard !digits.isEmpty, digits.utf8.allSatisfy({ $0 >= 48 && $0 <= 57 }), let n = Int(digits), n <= Int(Int32.max) else { return nil }
        return n * unit
    }

    /// Bytes of a size: `N` or `N` followed by `K`, `M`, `G`, `T` (binary units; `KiB`, `MiB`... too).
    static func bytes(_ text: String) -> Int? {
        var t = Substring(text)
        if t.hasSuffix("iB") { t = t.dropLast(2) } else if t.hasSuffix("B") { t = t.dropLast() }
        var shift = 0
        switch t.last {
        case "K", "k": shift = 10
        case "M", "m": shift = 20
        case "G", "g": shift = 30
        case "T", "t": shift = 40
        default: break
        }
        if shift != 0 { t = t.dropLast() }
        guard !t.isEmpty, t.utf8.allSatisfy({ $0 >= 48 && $0 <= 57 }), let n = Int(t), n <= Int.max >> (shift + 1) else { return nil }
        return n << shift
    }

    /// "7d", "3h", "90s": the shortest exact form of a duration, for messages.
    static func durationText(_ secs: Int) -> String {
        if secs > 0 && secs % 86400 == 0 { return "\(secs / 86400)d" }
        if secs > 0 && secs % 3600 == 0 { return "\(secs / 3600)h" }
        if secs > 0 && secs % 60 == 0 { return "\(secs / 60)m" }
        return "\(secs)s"
    }

    /// FUSE options a job's mount may be given by the site (`mount_options=` of the plugin,
    /// `STAGEFS_MOUNT_OPTIONS` of the shell prolog): the ones a setuid container runtime or
    /// other users need, and ones that only take rights away. Anything else is refused.
    static let jobMountOptions = ["allow_root", "allow_other", "ro", "noatime", "noexec", "nosuid", "nodev"]

    /// The FUSE options of `text` (comma-separated, may be empty), each one of `jobMountOptions`.
    static func jobMountOptions(_ text: String) throws(FSError) -> [String] {
        let opts = text.split(separator: ",").map(String.init)
        for o in opts where !jobMountOptions.contains(o) {
            throw FSError.usage(
                "mount option '\(o)' is not allowed for a job's mount (allowed: \(jobMountOptions.joined(separator: ", ")))")
        }
        if opts.contains("allow_root") && opts.contains("allow_other") {
            throw FSError.usage("mount options allow_root and allow_other exclude each other: allow_other already lets root in")
        }
        return opts
    }
}

/// A duration option (`--keep-logs 7d`), parsed by argument-parser with a clear error.
struct DurationArg: ExpressibleByArgument, Sendable {
    let seconds: Int

    init(seconds: Int) { self.seconds = seconds }

    init?(argument: String) {
        guard let s = Setting.seconds(argument) else { return nil }
        seconds = s
    }

    var defaultValueDescription: String { Setting.durationText(seconds) }
}

/// A size option (`--target 500G`).
struct SizeArg: ExpressibleByArgument, Sendable {
    let bytes: Int

    init?(argument: String) {
        guard let b = Setting.bytes(argument) else { return nil }
        bytes = b
    }
}
