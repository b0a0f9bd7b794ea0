#if canImport(Glibc)
    import Glibc
#endif

/// The one error type of StageFS: an errno for the kernel and a readable message for people.
///
/// Every layer throws `FSError`. The FUSE adapter replies with `code`; the CLI prints
/// `stagefs: <message>` and exits 1 (runtime) or 2 (`isUsage`).
public struct FSError: Error, CustomStringConvertible, Equatable, Sendable {
    /// The errno the operation maps to (`ENOENT`, `EACCES`, ...).
    public var code: Int32
    /// One line naming the thing and the cause.
    public var message: String
    /// True for errors in what the user typed (exit code 2).
    public var isUsage: Bool
    /// A fault of the system, not of the call (a metadata server out of memory): a mount logs
    /// its message, as it does for every `EIO`, since the application sees only the errno.
    public var logged = false

    public init(_ code: Int32, _ message: String, usage: Bool = false) {
        self.code = code
        self.message = message
        self.isUsage = usage
    }

    public var description: String { message }

    /// An error with the standard text of `code`, e.g. "No such file or directory".
    public static func errno(_ code: Int32, _ what: String = "") -> FSError {
        let text = String(cString: strerror(code))
        return FSError(code, what.isEmpty ? text : "\(what): \(text)")
    }

    /// A usage error (bad flag value, malformed URL): exit code 2.
    public static func usage(_ message: String) -> FSError {
        FSError(EINVAL, message, usage: true)
    }

    public static func == (a: FSError, b: FSError) -> Bool { a.code == b.code }

    public static let notFound = FSError(ENOENT, "no such file or directory")
    public static let exists = FSError(EEXIST, "file exists")
    public static let notDir = FSError(ENOTDIR, "not a directory")
    public static let isDir = FSError(EISDIR, "is a directory")
    public static let notEmpty = FSError(ENOTEMPTY, "directory not empty")
    public static let access = FSError(EACCES, "permission denied")
    public static let perm = FSError(EPERM, "operation not permitted")
    public static let invalid = FSError(EINVAL, "invalid argument")
    public static let noAttr = FSError(ENODATA, "no such attribute")
    public static let range = FSError(ERANGE, "result too large")
    public static let nameTooLong = FSError(ENAMETOOLONG, "file name too long")
    public static let io = FSError(EIO, "input/output error")
    /// A directory entry whose type is not its inode's: damaged metadata, reported as such.
    public static let damagedEntry = FSError(EIO, "damaged metadata: the directory entry's type is not its inode's")
    public static let again = FSError(EAGAIN, "resource temporarily unavailable")
    public static let loop = FSError(ELOOP, "too many levels of symbolic links")
    public static let xdev = FSError(EXDEV, "cross-device link")
    public static let readOnly = FSError(EROFS, "read-only file system")
    public static let badF = FSError(EBADF, "bad file descriptor")
    public static let noSpace = FSError(ENOSPC, "no space left on device")
    public static let mlink = FSError(EMLINK, "too many links")
    public static let busy = FSError(EBUSY, "device or resource busy")
    public static let deadlock = FSError(EDEADLK, "resource deadlock would occur")
    public static let notSupported = FSError(EOPNOTSUPP, "operation not supported")
}

extension FSError {
    /// The same error with `context` put in front of its message.
    public func context(_ context: String) -> FSError {
        var e = FSError(code, "\(context): \(message)", usage: isUsage)
        e.logged = logged
        return e
    }
}

/// Runs a closure passed through an untyped-`rethrows` API (such as `withUnsafeBytes`) and
/// gives back its `FSError` typed.
@inline(__always)
public func fsTyped<T>(_ body: () throws -> T) throws(FSError) -> T {
    do {
        return try body()
    } catch let e as FSError {
        throw e
    } catch {
        throw FSError(EIO, "\(error)")
    }
}
