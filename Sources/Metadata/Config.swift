import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

extension TxnMetadata {
    /// Changes the format record in one transaction: `change` gets the record as it is and
    /// edits it. Returns the record before and after. Clients read it again within a minute
    /// (`recentFormat`).
    package func updateFormat(_ change: (inout VolumeFormat) throws(FSError) -> Void) throws(FSError) -> (old: VolumeFormat, new: VolumeFormat) {
        let r = try store.transaction(write: true) { (tx) throws(FSError) -> (VolumeFormat, VolumeFormat) in
            guard let text = try store.setting(tx, "format") else { throw FSError(EINVAL, "\(displayName) holds no StageFS volume") }
            let old = try VolumeFormat.decode(text)
            var new = old
            try change(&new)
            if new != old { try store.setSetting(tx, "format", new.encoded()) }
            return (old, new)
        }
        formatSetting.withLock { $0 = (r.1, Sys.monotonicNanos()) }
        return r
    }

    /// Removes every record of the volume (`stagefs destroy`; the caller checked that no
    /// client is connected).
    package func wipe() throws(FSError) {
        try store.wipe()
        formatSetting.withLock { $0 = nil }
    }
}

/// What `stagefs config` and `destroy` ask of an engine (the volume's own).
package protocol VolumeAdmin: AnyObject, Sendable {
    func updateFormat(_ change: (inout VolumeFormat) throws(FSError) -> Void) throws(FSError) -> (old: VolumeFormat, new: VolumeFormat)
    func wipe() throws(FSError)
}

extension TxnMetadata: VolumeAdmin {}
