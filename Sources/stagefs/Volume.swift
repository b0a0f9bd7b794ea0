import Gateway
import Metadata
import ObjectStorage
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// The metadata engine a META-URL names: the volume's own (Redis, SQLite), or a gateway's
/// client for `stagefs+unix://` and `stagefs://` URLs.
/// `tracking`: a Redis engine's cache kept coherent by client tracking (`openMetadata`).
func openEngine(_ url: MetaURL, retryTimeout: Double = 60, tracking: Bool = false) throws(FSError) -> any MetadataEngine {
    if case .gateway(let address) = url {
        // Over TCP the client's credentials come from munged: STAGEFS_MUNGE_SOCKET or libmunge's default socket.
        let mungeSocket = getenv("STAGEFS_MUNGE_SOCKET").map { String(cString: $0) }.flatMap { $0.isEmpty ? nil : $0 }
        return GatewayMetadata(client: try GatewayClient(address, retryTimeout: retryTimeout, mungeSocket: mungeSocket))
    }
    return try openMetadata(url, retryTimeout: retryTimeout, tracking: tracking)
}

/// The object store of a volume opened with `openEngine`: through the gateway when the engine
/// is a gateway's (the user holds no key), else the bucket itself.
func openStore(_ meta: any MetadataEngine, _ config: StoreConfig) throws(FSError) -> any ObjectStore {
    if let g = meta as? GatewayMetadata { return try GatewayObjectStore(meta: g, bucket: config.bucket) }
    return try openObjectStore(config)
}

/// Says on the terminal when the engine's server keeps the metadata only in memory (a Redis
/// with neither AOF nor snapshots: JuiceFS warns of it too).
func warnIfVolatile(_ meta: any MetadataEngine) {
    if let w = (meta as? DurabilityCheck)?.durabilityWarning() { printError("stagefs: warning: \(w)") }
}

/// Whether the engine reaches its volume through a gateway.
func throughGateway(_ meta: any MetadataEngine) -> Bool { meta is GatewayMetadata }

/// The inode at `path` (absolute, inside the volume), looked up step by step as `cred`, so a
/// gateway answers for it later and permissions apply as to any walk. `what` names the path in
/// errors ("--subdir /a/b").
func lookupPath(_ meta: any MetadataEngine, _ path: String, _ cred: Credential, what: String) throws(FSError) -> (Ino, Attr) {
    var ino = rootIno
    var a = try meta.getattr(rootIno)
    var walked = ""
    for part in path.split(separator: "/") where part != "." {
        if part == ".." { throw FSError.usage("\(what): name the directory without '..'") }
        walked += "/" + part
        do {
            (ino, a) = try meta.lookup(cred, ino, Array(part.utf8))
        } catch {
            if error.code == ENOENT { throw FSError(ENOENT, "\(what): \(walked) does not exist in the volume") }
            throw FSError(error.code, "\(what): \(walked): \(error.message)")
        }
    }
    return (ino, a)
}

/// The path of directory `dir` from the volume's root ("/" for the root); nil when it is gone
/// (the walk up stops after 4,096 levels, and looks for each name a page at a time).
func directoryPath(_ meta: any MetadataEngine, _ dir: Ino) -> String? {
    var parts: [String] = []
    var cur = dir
    for _ in 0..<4096 where cur != rootIno {
        guard let a = try? meta.getattr(cur), a.type == .directory else { return nil }
        let parent = a.parent == 0 ? rootIno : a.parent
        var found: String?
        var after: UInt64 = 0
        for _ in 0..<1000 {
            guard let page = try? meta.readdir(parent, after: after, limit: 1000, plus: false) else { return nil }
            if let e = page.first(where: { $0.ino == cur }) {
                found = e.nameString
                break
            }
            guard page.count == 1000, let last = page.last else { break }
            after = last.cookie
        }
        guard let found else { return nil }
        parts.append(found)
        cur = parent
    }
    return "/" + parts.reversed().joined(separator: "/")
}
