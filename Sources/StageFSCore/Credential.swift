/// Who asks: the caller's uid, gid and supplementary groups, checked like ext4 does.
public struct Credential: Sendable, Equatable {
    public var uid: UInt32
    public var gid: UInt32
    public var groups: [UInt32]
    /// The caller's process id (for lock owners and messages); 0 when unknown.
    public var pid: UInt32

    public init(uid: UInt32, gid: UInt32, groups: [UInt32] = [], pid: UInt32 = 0) {
        self.uid = uid
        self.gid = gid
        self.groups = groups
        self.pid = pid
    }

    /// The superuser: bypasses permission checks as `CAP_DAC_OVERRIDE` and `CAP_FOWNER` do.
    public static let root = Credential(uid: 0, gid: 0)

    public var isRoot: Bool { uid == 0 }

    /// True when `gid` is the caller's primary or a supplementary group.
    public func inGroup(_ gid: UInt32) -> Bool {
        self.gid == gid || groups.contains(gid)
    }
}

/// Access bits as in access(2).
public struct AccessMask: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let execute = AccessMask(rawValue: 1)
    public static let write = AccessMask(rawValue: 2)
    public static let read = AccessMask(rawValue: 4)
}

/// The POSIX permission rules the metadata engines follow (`TxnMetadata`, for both).
public enum Posix {
    /// Whether `cred` may access an inode with `attr` for `mask` (generic_permission in Linux).
    public static func mayAccess(_ attr: Attr, _ cred: Credential, _ mask: AccessMask) -> Bool {
        if mask.isEmpty { return true }
        if cred.isRoot {
            // Root may read and write anything, and execute when any x bit is set (or a directory).
            if mask.contains(.execute) && attr.type != .directory && attr.mode & 0o111 == 0 { return false }
            return true
        }
        let mode = UInt32(attr.mode)
        let bits: UInt32
        if cred.uid == attr.uid {
            bits = (mode >> 6) & 7
        } else if cred.inGroup(attr.gid) {
            bits = (mode >> 3) & 7
        } else {
            bits = mode & 7
        }
        return bits & mask.rawValue == mask.rawValue
    }

    /// Throws `EACCES` unless `mayAccess`.
    public static func check(_ attr: Attr, _ cred: Credential, _ mask: AccessMask) throws(FSError) {
        if !mayAccess(attr, cred, mask) { throw FSError.access }
    }

    /// The mode after a write or truncate by `cred` (`setattr_should_drop_suidgid`): a caller
    /// without `CAP_FSETID` (not root) clears set-user-ID, and set-group-ID when the group may
    /// execute or the caller is not in the file's group. Other types keep their bits.
    public static func modeAfterWrite(_ attr: Attr, _ cred: Credential) -> UInt16 {
        if cred.isRoot || attr.type != .regular { return attr.mode }
        return attr.mode & ~dropped(attr, cred)
    }

    /// The mode after a chown (any caller, even root: `chown_common`): a non-directory loses
    /// set-user-ID, and set-group-ID as `modeAfterWrite` says, except that root keeps a
    /// set-group-ID without group execute.
    public static func modeAfterChown(_ attr: Attr, _ cred: Credential) -> UInt16 {
        if attr.type == .directory { return attr.mode }
        var kill: UInt16 = 0o4000
        if attr.mode & 0o2000 != 0 && (attr.mode & 0o010 != 0 || (!cred.isRoot && !cred.inGroup(attr.gid))) { kill |= 0o2000 }
        return attr.mode & ~kill
    }

    private static func dropped(_ attr: Attr, _ cred: Credential) -> UInt16 {
        var kill: UInt16 = 0o4000
        if attr.mode & 0o2000 != 0 && (attr.mode & 0o010 != 0 || !cred.inGroup(attr.gid)) { kill |= 0o2000 }
        return kill
    }

    /// Whether `cred` may remove or rename `child` from the sticky directory `dir`.
    public static func stickyAllows(dir: Attr, child: Attr, _ cred: Credential) -> Bool {
        if dir.mode & 0o1000 == 0 || cred.isRoot { return true }
        return cred.uid == dir.uid || cred.uid == child.uid
    }
}
