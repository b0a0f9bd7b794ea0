import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// The engine-independent rules of setattr, as Linux applies them to ext4 (`chown_common`,
/// `setattr_prepare`, `notify_change`, `do_truncate`): who may change what, which privilege
/// bits a chown, a write or a truncate clears, and which times change. An engine reads the
/// attributes, calls `apply`, changes the size itself, then calls `finish`.
package enum SetAttrRules {
    /// Checks permissions and applies ownership, mode and explicit times to `a`. Returns whether
    /// the change must update mtime: any truncate does, even to the size the file has.
    package static func apply(_ req: SetAttrRequest, to a: inout Attr, _ cred: Credential, now: Timespec) throws(FSError) -> Bool {
        let m = req.mask
        let owner = cred.isRoot || cred.uid == a.uid
        // An empty request comes from chown(-1, -1) or, with the writer's credential, from a
        // write to a set-group-ID file (file_remove_privs): it clears privilege bits as a write
        // does and is never refused (a write must not fail). ext4 refuses chown(-1, -1) by a
        // non-owner that would clear a bit; through FUSE the kernel does so for set-user-ID.
        if m.subtracting(.ctime).isEmpty {
            a.mode = Posix.modeAfterWrite(a, cred)
        }
        if m.contains(.uid) || m.contains(.gid) {
            let newUid = m.contains(.uid) ? req.uid : a.uid
            let newGid = m.contains(.gid) ? req.gid : a.gid
            if !cred.isRoot {
                if m.contains(.uid) && !(cred.uid == a.uid && newUid == a.uid) { throw FSError.perm }
                if m.contains(.gid) && !(cred.uid == a.uid && (cred.inGroup(newGid) || newGid == a.gid)) { throw FSError.perm }
            }
            // Clearing a privilege bit is a mode change: only the owner may cause it.
            let mode = Posix.modeAfterChown(a, cred)
            if mode != a.mode && !owner { throw FSError.perm }
            a.mode = mode
            a.uid = newUid
            a.gid = newGid
        }
        if m.contains(.mode) {
            // A non-owner may only drop set-user-ID/set-group-ID bits: the kernel asks that,
            // with the writer's credential, after a write or truncate (`file_remove_privs`).
            if !owner && !onlyDropsPrivileges(from: a.mode, to: req.mode & 0o7777) { throw FSError.perm }
            var mode = req.mode & 0o7777
            if !cred.isRoot && !cred.inGroup(a.gid) { mode &= ~0o2000 }
            a.mode = mode
        }
        var touch = false
        if m.contains(.size) {
            if a.type == .directory { throw FSError.isDir }
            if a.type != .regular { throw FSError.invalid }
            if !req.viaHandle { try Posix.check(a, cred, .write) }
            a.mode = Posix.modeAfterWrite(a, cred)
            touch = true
        }
        if m.contains(.killPriv) { a.mode = Posix.modeAfterWrite(a, cred) }
        if m.contains(.atime) || m.contains(.mtime) || m.contains(.atimeNow) || m.contains(.mtimeNow) {
            let explicit = (m.contains(.atime) && !m.contains(.atimeNow)) || (m.contains(.mtime) && !m.contains(.mtimeNow))
            if !owner {
                if explicit { throw FSError.perm }
                if !Posix.mayAccess(a, cred, .write) { throw FSError.access }
            }
            if m.contains(.atimeNow) { a.atime = now } else if m.contains(.atime) { a.atime = req.atime }
            if m.contains(.mtimeNow) { a.mtime = now } else if m.contains(.mtime) { a.mtime = req.mtime }
        }
        return touch
    }

    /// Whether `new` is `old` without some (at least one) of its set-user-ID and set-group-ID bits.
    package static func onlyDropsPrivileges(from old: UInt16, to new: UInt16) -> Bool {
        new != old && new & ~old == 0 && (old ^ new) & ~0o6000 == 0
    }

    /// Sets mtime and ctime once the size was applied (`touch`: it was a truncate). Clearing
    /// privilege bits after a write changes ctime only when a bit went.
    package static func finish(_ req: SetAttrRequest, _ a: inout Attr, _ before: Attr, _ cred: Credential, now: Timespec, touch: Bool) {
        let m = req.mask
        if touch && !m.contains(.mtime) && !m.contains(.mtimeNow) { a.mtime = now }
        if m.contains(.ctime) {
            a.ctime = req.ctime
        } else if m == .killPriv {
            if a.mode != before.mode { a.ctime = now }
        } else {
            a.ctime = now
        }
    }
}
