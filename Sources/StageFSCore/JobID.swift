/// The rule for job ids, the same everywhere (`stage --job`, pins in a cache index, the job
/// hooks, the reports of `cache gc`): 1 to 64 characters of `0-9 A-Z a-z . _ -`. Nothing else
/// can be a job's name in a cache, so a name read back from a user's index can be printed by
/// root and can never be taken for anything but a name.
public enum JobID {
    /// The longest job id.
    public static let maxLength = 64

    /// Whether `id` is a valid job id.
    public static func isValid(_ id: String) -> Bool {
        let b = id.utf8
        return !b.isEmpty && b.count <= maxLength
            && b.allSatisfy { ($0 >= 48 && $0 <= 57) || ($0 >= 65 && $0 <= 90) || ($0 >= 97 && $0 <= 122) || $0 == 46 || $0 == 95 || $0 == 45 }
    }

    /// Why `id` is not a valid job id, for a message; nil when it is valid. The id is shown
    /// escaped (at most its first 80 characters), never as the raw bytes.
    public static func problem(_ id: String) -> String? {
        if isValid(id) { return nil }
        return "invalid job id \(escaped(id)): a job id is 1 to \(maxLength) characters of 0-9, A-Z, a-z, '.', '_' and '-'"
    }

    /// `id` quoted with control and non-ASCII characters escaped, at most 80 characters of it.
    public static func escaped(_ id: String) -> String {
        var out = "'"
        for u in id.unicodeScalars.prefix(80) {
            if u.value >= 32 && u.value < 127 && u != "'" && u != "\\" { out.unicodeScalars.append(u) } else { out += u.escaped(asASCII: true) }
        }
        return out + (id.unicodeScalars.count > 80 ? "...'" : "'")
    }
}
