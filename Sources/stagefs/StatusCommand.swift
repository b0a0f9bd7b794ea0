import ArgumentParser
import Metadata
import StageFSCore

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show a volume's settings, usage and client sessions.",
        discussion: "Secrets are not shown. Sessions whose heartbeat is older than a minute are marked stale."
    )

    @Argument(help: volumeOrFirstHelp)
    var metaURL: String?

    func run() throws {
        guard let text = metaURL ?? defaultVolume() else {
            throw ValidationError("give the volume's META-URL, or set STAGEFS_VOLUME ('module load fs-client' sets it)")
        }
        let url = try metaURLArgument(text)
        let meta = try openEngine(url)
        let f = try meta.requireFormat()
        let usage = try meta.statfs()
        let sessions = try meta.listSessions()
        let now = Timespec.now().sec
        print("Volume:      \(f.name)")
        print("UUID:        \(f.uuid)")
        print("Metadata:    \(url)")
        print("Storage:     \(f.storage) \(f.bucket)")
        if let k = f.accessKey { print("Access key:  \(k)") }
        print("Block size:  \(f.blockSizeKiB) KiB")
        print("Compression: \(f.compressionName)")
        print("Created:     \(timeText(f.createdAt))")
        // (An older StageFS refuses a newer version; `format` run again keeps it.)
        print("Format:      version \(f.version)")
        print("Used:        \(humanBytes(usage.usedSpace)) in \(usage.usedInodes) inode\(usage.usedInodes == 1 ? "" : "s")")
        if let admin = meta as? any StoredBytesAdmin {
            print("Stored:      \(storedText(try admin.storedCounts()))")
        }
        if f.capacity != nil || f.inodes != nil {
            print("Capacity:    \(f.capacity.map(humanBytes) ?? "no limit"), \(f.inodes.map { "\($0) inodes" } ?? "no inode limit")")
        }
        if let t = meta as? any TrashAdmin {
            let (inodes, bytes) = try t.trashUsage()
            let kept = f.trashDays == 0 ? "off" : "deleted files kept \(f.trashDays) day\(f.trashDays == 1 ? "" : "s")"
            print("Trash:       \(kept); holds \(inodes) file\(inodes == 1 ? "" : "s"), \(humanBytes(UInt64(bytes))) (counted in Used until purged)")
        } else if f.trashDays > 0 {
            print("Trash:       deleted files kept \(f.trashDays) day\(f.trashDays == 1 ? "" : "s")")
        }
        print("Sessions:    \(sessions.count)")
        for s in sessions {
            let age = now - s.heartbeat
            let state = age > 60 ? "stale, last heartbeat \(age) s ago" : "alive"
            // What a client said of itself, shown without its control characters.
            print(
                "  \(s.sid): \(printable(s.hostname)) pid \(s.pid) \(s.mountPoint.isEmpty ? "(no mount)" : printable(s.mountPoint)) version \(printable(s.version)), since \(timeText(s.started)), \(state)"
            )
        }
    }
}

/// `text` with control characters shown as `\u{..}` escapes (nothing a terminal acts on).
func printable(_ text: String) -> String {
    var out = ""
    for u in text.unicodeScalars {
        if u.value < 0x20 || (u.value >= 0x7f && u.value < 0xa0) {
            out += "\\u{\(String(u.value, radix: 16))}"
        } else {
            out.unicodeScalars.append(u)
        }
    }
    return out
}

/// The bytes the bucket holds for the blocks, and the blocks' own bytes (status, gc).
func storedText(_ counts: (blockBytes: Int64, storedBytes: Int64)?) -> String {
    guard let c = counts else { return "not counted on this volume yet ('stagefs gc' lists the bucket and counts it)" }
    let ratio = c.storedBytes > 0 ? "\((Double(c.blockBytes) / Double(c.storedBytes) * 100).rounded() / 100)" : "-"
    return "\(humanBytes(UInt64(c.storedBytes))) in the bucket for \(humanBytes(UInt64(c.blockBytes))) of blocks (\(ratio):1)"
}
