#if canImport(Glibc)
    import Glibc
#endif

/// The StageFS release.
public let stageFSVersion = "0.1.0"

/// An inode number. 1 is the root directory; 0 means "none".
public typealias Ino = UInt64

/// The root directory's inode number.
public let rootIno: Ino = 1

/// A file's size limit per chunk: files are cut into 64 MiB chunks.
public let chunkSize: UInt64 = 64 << 20

/// Longest file name accepted (as ext4).
public let maxNameLength = 255

/// Largest file size: 1 PiB. A write or truncate beyond it fails with `EFBIG`, as ext4 refuses
/// sizes beyond its 16 TiB.
public let maxFileSize: UInt64 = 1 << 50

/// The kinds of inode the file system stores.
public enum FileType: UInt8, Sendable, CaseIterable {
    case regular = 1
    case directory = 2
    case symlink = 3
    case fifo = 4
    case blockDevice = 5
    case charDevice = 6
    case socket = 7

    /// The `S_IFMT` bits of this type.
    public var modeBits: UInt32 {
        switch self {
        case .regular: return UInt32(S_IFREG)
        case .directory: return UInt32(S_IFDIR)
        case .symlink: return UInt32(S_IFLNK)
        case .fifo: return UInt32(S_IFIFO)
        case .blockDevice: return UInt32(S_IFBLK)
        case .charDevice: return UInt32(S_IFCHR)
        case .socket: return UInt32(S_IFSOCK)
        }
    }

    /// The type named by the `S_IFMT` bits of `mode`, if any.
    public init?(mode: UInt32) {
        switch mode & UInt32(S_IFMT) {
        case UInt32(S_IFREG): self = .regular
        case UInt32(S_IFDIR): self = .directory
        case UInt32(S_IFLNK): self = .symlink
        case UInt32(S_IFIFO): self = .fifo
        case UInt32(S_IFBLK): self = .blockDevice
        case UInt32(S_IFCHR): self = .charDevice
        case UInt32(S_IFSOCK): self = .socket
        default: return nil
        }
    }

    /// The `d_type` value for readdir.
    public var direntType: UInt8 {
        UInt8(truncatingIfNeeded: modeBits >> 12)
    }
}

/// Seconds and nanoseconds since the epoch, as in `struct timespec`.
public struct Timespec: Sendable, Equatable, Comparable {
    public var sec: Int64
    public var nsec: UInt32

    public init(sec: Int64, nsec: UInt32) {
        self.sec = sec
        self.nsec = nsec
    }

    /// The current wall-clock time (`clock_gettime(CLOCK_REALTIME)`).
    public static func now() -> Timespec {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Timespec(sec: Int64(ts.tv_sec), nsec: UInt32(ts.tv_nsec))
    }

    public static func < (a: Timespec, b: Timespec) -> Bool {
        (a.sec, a.nsec) < (b.sec, b.nsec)
    }
}

/// The attributes of one inode.
public struct Attr: Sendable, Equatable {
    public var type: FileType
    /// Permission bits including set-user-ID, set-group-ID and sticky (the low 12 bits of `st_mode`).
    public var mode: UInt16
    public var uid: UInt32
    public var gid: UInt32
    public var nlink: UInt32
    public var size: UInt64
    public var atime: Timespec
    public var mtime: Timespec
    public var ctime: Timespec
    /// Device number of block and character devices.
    public var rdev: UInt32
    /// The parent directory of a directory; of another inode, its home, the directory whose
    /// quotas it counts in (0: the root, made before homes were kept), or the trash's directory
    /// it is in.
    public var parent: Ino

    public init(
        type: FileType, mode: UInt16, uid: UInt32, gid: UInt32, nlink: UInt32 = 1, size: UInt64 = 0,
        atime: Timespec, mtime: Timespec, ctime: Timespec, rdev: UInt32 = 0, parent: Ino = 0
    ) {
        self.type = type
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.nlink = nlink
        self.size = size
        self.atime = atime
        self.mtime = mtime
        self.ctime = ctime
        self.rdev = rdev
        self.parent = parent
    }

    /// `st_mode`: type bits and permission bits.
    public var fullMode: UInt32 { type.modeBits | UInt32(mode) }

    /// `st_blocks` in 512-byte units.
    public var blocks: UInt64 { (size + 511) / 512 }

    /// Size of the fixed binary encoding (see `encode()`).
    public static let encodedSize = 71

    /// A fixed 71-byte big-endian encoding (as `struct.pack(">BI2I4I4I4I8i8I4i8I4i8I4I4I8", ...)`
    /// in Redis Lua; volumes written by earlier versions' scripts read the same).
    public func encode() -> [UInt8] {
        var w = ByteWriter(capacity: Attr.encodedSize)
        w.u8(type.rawValue)
        w.u16(mode)
        w.u32(uid)
        w.u32(gid)
        w.u32(nlink)
        w.u64(size)
        w.i64(atime.sec)
        w.u32(atime.nsec)
        w.i64(mtime.sec)
        w.u32(mtime.nsec)
        w.i64(ctime.sec)
        w.u32(ctime.nsec)
        w.u32(rdev)
        w.u64(parent)
        return w.bytes
    }

    /// Decodes `encode()`'s bytes; nil when they are malformed.
    public init?<C: Collection<UInt8>>(decoding bytes: C) {
        guard bytes.count >= Attr.encodedSize else { return nil }
        var r = ByteReader(Array(bytes))
        guard let t = FileType(rawValue: r.u8()) else { return nil }
        type = t
        mode = r.u16()
        uid = r.u32()
        gid = r.u32()
        nlink = r.u32()
        size = r.u64()
        atime = Timespec(sec: r.i64(), nsec: r.u32())
        mtime = Timespec(sec: r.i64(), nsec: r.u32())
        ctime = Timespec(sec: r.i64(), nsec: r.u32())
        rdev = r.u32()
        parent = r.u64()
    }
}

/// One directory entry as readdir returns it.
public struct DirEntry: Sendable, Equatable {
    public var name: [UInt8]
    public var ino: Ino
    public var type: FileType
    /// Position to resume after this entry (pass it back as the readdir offset).
    public var cookie: UInt64
    /// Attributes, when asked for (readdirplus).
    public var attr: Attr?
    /// Whether the inode has extended attributes, when the engine said (with `attr`).
    public var hasXattrs: Bool?

    public init(name: [UInt8], ino: Ino, type: FileType, cookie: UInt64, attr: Attr? = nil, hasXattrs: Bool? = nil) {
        self.name = name
        self.ino = ino
        self.type = type
        self.cookie = cookie
        self.attr = attr
        self.hasXattrs = hasXattrs
    }

    public var nameString: String { String(decoding: name, as: UTF8.self) }
}

/// Space and inode figures for statfs.
public struct StatFS: Sendable, Equatable {
    public var totalSpace: UInt64
    public var availSpace: UInt64
    public var usedSpace: UInt64
    public var usedInodes: UInt64
    public var availInodes: UInt64

    public init(totalSpace: UInt64, availSpace: UInt64, usedSpace: UInt64, usedInodes: UInt64, availInodes: UInt64) {
        self.totalSpace = totalSpace
        self.availSpace = availSpace
        self.usedSpace = usedSpace
        self.usedInodes = usedInodes
        self.availInodes = availInodes
    }
}

/// Which fields a setattr call changes.
public struct SetAttrMask: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let mode = SetAttrMask(rawValue: 1 << 0)
    public static let uid = SetAttrMask(rawValue: 1 << 1)
    public static let gid = SetAttrMask(rawValue: 1 << 2)
    public static let size = SetAttrMask(rawValue: 1 << 3)
    public static let atime = SetAttrMask(rawValue: 1 << 4)
    public static let mtime = SetAttrMask(rawValue: 1 << 5)
    /// Set atime to the current time (`UTIME_NOW`).
    public static let atimeNow = SetAttrMask(rawValue: 1 << 7)
    /// Set mtime to the current time (`UTIME_NOW`).
    public static let mtimeNow = SetAttrMask(rawValue: 1 << 8)
    public static let ctime = SetAttrMask(rawValue: 1 << 10)
    /// Clear set-user-ID (and set-group-ID when it marks an executable or the caller is not in
    /// the file's group) unless the caller is root: what a write does (`file_remove_privs`).
    /// StageFS's own bit, never sent by the kernel.
    public static let killPriv = SetAttrMask(rawValue: 1 << 20)
}

/// A setattr request: the mask says which of the values apply.
public struct SetAttrRequest: Sendable {
    public var mask: SetAttrMask
    public var mode: UInt16 = 0
    public var uid: UInt32 = 0
    public var gid: UInt32 = 0
    public var size: UInt64 = 0
    public var atime = Timespec(sec: 0, nsec: 0)
    public var mtime = Timespec(sec: 0, nsec: 0)
    public var ctime = Timespec(sec: 0, nsec: 0)
    /// The change comes through an open file (ftruncate): write permission was checked at open.
    public var viaHandle = false

    public init(mask: SetAttrMask) { self.mask = mask }
}

/// Flags of rename(2)/renameat2(2).
public struct RenameFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// `RENAME_NOREPLACE`
    public static let noReplace = RenameFlags(rawValue: 1)
    /// `RENAME_EXCHANGE`
    public static let exchange = RenameFlags(rawValue: 2)
    /// `RENAME_WHITEOUT` (not supported)
    public static let whiteout = RenameFlags(rawValue: 4)
}

/// Flags of setxattr(2).
public enum XattrFlag: UInt32, Sendable {
    case any = 0
    /// `XATTR_CREATE`: fail if the attribute exists.
    case create = 1
    /// `XATTR_REPLACE`: fail if it does not.
    case replace = 2
}

/// A POSIX record lock type.
public enum LockType: UInt32, Sendable {
    case read = 0  // F_RDLCK
    case write = 1  // F_WRLCK
    case unlock = 2  // F_UNLCK
}

/// A byte range lock as `F_GETLK` reports it.
public struct LockRange: Sendable, Equatable {
    public var type: LockType
    public var start: UInt64
    /// Last byte, inclusive (`UInt64.max` for "to the end").
    public var end: UInt64
    public var pid: UInt32

    public init(type: LockType, start: UInt64, end: UInt64, pid: UInt32) {
        self.type = type
        self.start = start
        self.end = end
        self.pid = pid
    }
}
