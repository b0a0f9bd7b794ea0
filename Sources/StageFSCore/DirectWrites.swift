import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// Writes of new files past the page cache (`O_DIRECT`) into one directory tree (a bucket, a
/// disk cache): a block of whole pages from a page-aligned buffer goes from the writer's memory
/// to the device, with no copy into the page cache (most of a mount's CPU when writing a
/// checkpoint) and no page cache filled with what nobody reads soon. Once the file system
/// refuses `O_DIRECT`, it is not asked again.
public final class DirectWrites: Sendable {
    /// The alignment of the buffer and the length.
    public static let alignment = 4096
    /// Smaller writes go through the page cache.
    public static let minimum = 64 << 10
    private let allowed = Atomic<Bool>(true)

    public init() {}

    /// Writes `count` bytes from `base` at the start of `fd` past the page cache (`O_DIRECT`,
    /// set for this write only) when they suit it; false when not all written (the caller
    /// writes them through the page cache, from the start).
    public func write(_ fd: Int32, _ base: UnsafeRawPointer, _ count: Int) -> Bool {
        let a = Self.alignment
        guard count >= Self.minimum, count % a == 0, Int(bitPattern: base) % a == 0, allowed.load(ordering: .relaxed) else { return false }
        let flags = fcntl(fd, F_GETFL)
        guard flags >= 0, fcntl(fd, F_SETFL, flags | Sys.O_DIRECT) == 0 else {
            allowed.store(false, ordering: .relaxed)
            return false
        }
        defer { _ = fcntl(fd, F_SETFL, flags) }
        var done = 0
        while done < count {
            let n = Glibc.pwrite(fd, base + done, count - done, off_t(done))
            if n > 0 {
                done += n
            } else if n < 0 && errno == EINTR {
                continue
            } else {
                // (Refused at once: this file system or device does not take it. Stopped part
                // way: an error the write through the page cache reports, if it persists.)
                if n < 0 && errno == EINVAL && done == 0 { allowed.store(false, ordering: .relaxed) }
                return false
            }
        }
        return true
    }
}
