import CSQLite3
import SQLiteKit
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif
#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// A transaction of `SQLiteStore`: the store's connection is in a transaction, and this
/// value says so to the calls made in it (only `SQLiteStore.transaction` makes one).
package struct SQLiteTxn {
    fileprivate init() {}
}

/// The embedded metadata store: one SQLite database file in WAL mode, safe for several
/// processes on one node (SQLite's file locks) and serialized within a process.
package final class SQLiteStore: TxnStore, @unchecked Sendable {
    private let conn: SQLiteConnection
    private let lock = ConditionLock()
    package let displayName: String

    package init(path: String, create: Bool) throws(FSError) {
        conn = try SQLiteConnection(path: path, create: create)
        displayName = "SQLite database \(path)"
        try conn.exec("PRAGMA journal_mode=WAL")
        try conn.exec("PRAGMA synchronous=FULL")
        try conn.exec(
            """
            CREATE TABLE IF NOT EXISTS setting(k TEXT PRIMARY KEY, v TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS counter(name TEXT PRIMARY KEY, value INTEGER NOT NULL);
            CREATE TABLE IF NOT EXISTS node(ino INTEGER PRIMARY KEY, attr BLOB NOT NULL);
            CREATE TABLE IF NOT EXISTS edge(cookie INTEGER PRIMARY KEY AUTOINCREMENT, parent INTEGER NOT NULL,
                name BLOB NOT NULL, ino INTEGER NOT NULL, type INTEGER NOT NULL);
            CREATE UNIQUE INDEX IF NOT EXISTS edge_name ON edge(parent, name);
            CREATE INDEX IF NOT EXISTS edge_cookie ON edge(parent, cookie);
            CREATE TABLE IF NOT EXISTS symlink(ino INTEGER PRIMARY KEY, target BLOB NOT NULL);
            CREATE TABLE IF NOT EXISTS xattr(ino INTEGER NOT NULL, name BLOB NOT NULL, value BLOB NOT NULL,
                PRIMARY KEY(ino, name)) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS xattrbytes(ino INTEGER PRIMARY KEY, bytes INTEGER NOT NULL);
            CREATE TABLE IF NOT EXISTS chunk(ino INTEGER NOT NULL, idx INTEGER NOT NULL, slices BLOB NOT NULL,
                PRIMARY KEY(ino, idx)) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS openfile(sid INTEGER NOT NULL, ino INTEGER NOT NULL, count INTEGER NOT NULL,
                PRIMARY KEY(sid, ino)) WITHOUT ROWID;
            CREATE INDEX IF NOT EXISTS openfile_ino ON openfile(ino);
            CREATE TABLE IF NOT EXISTS delfile(ino INTEGER PRIMARY KEY, size INTEGER NOT NULL, at INTEGER NOT NULL);
            CREATE TABLE IF NOT EXISTS delslices(id INTEGER PRIMARY KEY AUTOINCREMENT, slices BLOB NOT NULL);
            CREATE TABLE IF NOT EXISTS sliceref(id INTEGER PRIMARY KEY, refs INTEGER NOT NULL);
            CREATE TABLE IF NOT EXISTS gc_kept(holder TEXT NOT NULL, id INTEGER NOT NULL, PRIMARY KEY(holder, id));
            CREATE TABLE IF NOT EXISTS session(sid INTEGER PRIMARY KEY, heartbeat INTEGER NOT NULL, info TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS locks(ino INTEGER NOT NULL, kind INTEGER NOT NULL, tbl BLOB NOT NULL,
                PRIMARY KEY(ino, kind)) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS sessionlock(sid INTEGER NOT NULL, ino INTEGER NOT NULL, kind INTEGER NOT NULL,
                PRIMARY KEY(sid, ino, kind)) WITHOUT ROWID;
            """)
    }

    package typealias Txn = SQLiteTxn

    package func transaction<T>(write: Bool, _ body: (SQLiteTxn) throws(FSError) -> T) throws(FSError) -> T {
        let start = Sys.monotonicNanos()
        lock.lock()
        defer {
            lock.unlock()
            MetaMetrics.transaction(write, since: start)
        }
        return try conn.transaction(write: write) { () throws(FSError) in try body(SQLiteTxn()) }
    }

    private func one<T>(_ sql: String, _ args: [SQLValue], _ read: (OpaquePointer) -> T) throws(FSError) -> T? {
        var out: T?
        try conn.query(sql, args) { s in out = read(s) }
        return out
    }

    package func setting(_ tx: SQLiteTxn, _ key: String) throws(FSError) -> String? {
        try one("SELECT v FROM setting WHERE k=?", [.text(key)]) { Col.text($0, 0) }
    }

    package func setSetting(_ tx: SQLiteTxn, _ key: String, _ value: String) throws(FSError) {
        try conn.query("INSERT OR REPLACE INTO setting(k, v) VALUES(?, ?)", [.text(key), .text(value)])
    }

    package func counter(_ tx: SQLiteTxn, _ name: String) throws(FSError) -> Int64 { try incr(name, 0) }

    package func add(_ tx: SQLiteTxn, _ counter: String, _ delta: Int64) throws(FSError) { _ = try incr(counter, delta) }

    package func atMost(_ tx: SQLiteTxn, _ counter: String, _ max: Int64) throws(FSError) -> Bool { try incr(counter, 0) <= max }

    package func scanInodes(_ tx: SQLiteTxn, cursor: UInt64, limit: Int) throws(FSError) -> (inodes: [(Ino, Attr)], next: UInt64?) {
        var out: [(Ino, Attr)] = []
        var bad: UInt64?
        try conn.query("SELECT ino, attr FROM node WHERE ino > ? ORDER BY ino LIMIT ?", [.int(Int64(bitPattern: cursor)), .int(Int64(limit))]) {
            if let a = Attr(decoding: Col.blob($0, 1)) { out.append((UInt64(Col.int($0, 0)), a)) } else { bad = UInt64(Col.int($0, 0)) }
        }
        // (A record that cannot be read is no reason to take its slices for unreferenced.)
        if let bad { throw FSError(EIO, "\(displayName): inode \(bad) has a corrupt record") }
        return (out, out.count < limit ? nil : out.last!.0)
    }

    package func keepForGC(_ tx: SQLiteTxn, holder: String, _ ids: [UInt64]) throws(FSError) {
        for id in ids { try conn.query("INSERT OR IGNORE INTO gc_kept(holder, id) VALUES(?, ?)", [.text(holder), .int(Int64(bitPattern: id))]) }
    }

    package func keptForGC(_ tx: SQLiteTxn, holder: String, _ id: UInt64) throws(FSError) -> Bool {
        try one("SELECT 1 FROM gc_kept WHERE holder=? AND id=?", [.text(holder), .int(Int64(bitPattern: id))]) { _ in true } ?? false
    }

    package func clearKeptForGC(holder: String) throws(FSError) {
        try transaction(write: true) { (_) throws(FSError) in try conn.query("DELETE FROM gc_kept WHERE holder=?", [.text(holder)]) }
    }

    package func wipe() throws(FSError) {
        let tables = [
            "setting", "counter", "node", "edge", "symlink", "xattr", "xattrbytes", "chunk", "openfile", "delfile", "delslices", "sliceref",
            "gc_kept",
            "session", "locks", "sessionlock",
        ]
        try transaction(write: true) { (_) throws(FSError) in
            for t in tables { try conn.query("DELETE FROM \(t)", []) }
        }
    }

    package var snapshotReads: Bool { true }

    package func reserveIDs(_ tx: SQLiteTxn?, _ counter: String, _ count: Int) throws(FSError) -> UInt64 {
        // Ids are taken in the caller's transaction when there is one (one of this store's
        // transactions waits for another to end).
        if tx != nil { return UInt64(try incr(counter, Int64(count)) - Int64(count) + 1) }
        return try transaction(write: true) { (_) throws(FSError) in UInt64(try incr(counter, Int64(count)) - Int64(count) + 1) }
    }

    package func newInode(_ tx: SQLiteTxn) throws(FSError) -> Ino { Ino(try incr("nextInode", 1)) }

    /// Adds `delta` to a named counter and returns the new value (missing counters are 0).
    private func incr(_ counter: String, _ delta: Int64) throws(FSError) -> Int64 {
        if delta == 0 {
            return try one("SELECT value FROM counter WHERE name=?", [.text(counter)]) { Col.int($0, 0) } ?? 0
        }
        return try one(
            "INSERT INTO counter(name, value) VALUES(?, ?) ON CONFLICT(name) DO UPDATE SET value=value+excluded.value RETURNING value",
            [.text(counter), .int(delta)]
        ) { Col.int($0, 0) } ?? 0
    }

    package func attr(_ tx: SQLiteTxn, _ ino: Ino) throws(FSError) -> Attr? {
        guard let b = try one("SELECT attr FROM node WHERE ino=?", [.int(Int64(ino))], { Col.blob($0, 0) }) else { return nil }
        guard let a = Attr(decoding: b) else { throw FSError(EIO, "\(displayName): inode \(ino) has a corrupt record") }
        return a
    }

    package func putAttr(_ tx: SQLiteTxn, _ ino: Ino, _ attr: Attr) throws(FSError) {
        try conn.query("INSERT OR REPLACE INTO node(ino, attr) VALUES(?, ?)", [.int(Int64(ino)), .blob(attr.encode())])
    }

    package func deleteInode(_ tx: SQLiteTxn, _ ino: Ino) throws(FSError) {
        let i = SQLValue.int(Int64(ino))
        try conn.query("DELETE FROM node WHERE ino=?", [i])
        try conn.query("DELETE FROM symlink WHERE ino=?", [i])
        try conn.query("DELETE FROM xattr WHERE ino=?", [i])
        try conn.query("DELETE FROM xattrbytes WHERE ino=?", [i])
    }

    package func entry(_ tx: SQLiteTxn, _ parent: Ino, _ name: [UInt8]) throws(FSError) -> (Ino, FileType)? {
        try one("SELECT ino, type FROM edge WHERE parent=? AND name=?", [.int(Int64(parent)), .blob(name)]) {
            (Ino(Col.int($0, 0)), FileType(rawValue: UInt8(Col.int($0, 1))) ?? .regular)
        }
    }

    package func putEntry(_ tx: SQLiteTxn, _ parent: Ino, _ name: [UInt8], _ ino: Ino, _ type: FileType) throws(FSError) {
        try deleteEntry(tx, parent, name)
        try conn.query(
            "INSERT INTO edge(parent, name, ino, type) VALUES(?, ?, ?, ?)",
            [.int(Int64(parent)), .blob(name), .int(Int64(ino)), .int(Int64(type.rawValue))])
    }

    package func deleteEntry(_ tx: SQLiteTxn, _ parent: Ino, _ name: [UInt8]) throws(FSError) {
        try conn.query("DELETE FROM edge WHERE parent=? AND name=?", [.int(Int64(parent)), .blob(name)])
    }

    package func hasEntries(_ tx: SQLiteTxn, _ parent: Ino) throws(FSError) -> Bool {
        try one("SELECT 1 FROM edge WHERE parent=? LIMIT 1", [.int(Int64(parent))]) { _ in true } ?? false
    }

    package func entries(_ tx: SQLiteTxn, _ parent: Ino, after cookie: UInt64, limit: Int) throws(FSError) -> [DirEntry] {
        var out: [DirEntry] = []
        try conn.query(
            "SELECT cookie, name, ino, type FROM edge WHERE parent=? AND cookie>? ORDER BY cookie LIMIT ?",
            [.int(Int64(parent)), .int(Int64(cookie)), .int(Int64(limit))]
        ) { s in
            out.append(
                DirEntry(
                    name: Col.blob(s, 1), ino: Ino(Col.int(s, 2)), type: FileType(rawValue: UInt8(Col.int(s, 3))) ?? .regular,
                    cookie: UInt64(Col.int(s, 0))))
        }
        return out
    }

    package func symlinkTarget(_ tx: SQLiteTxn, _ ino: Ino) throws(FSError) -> [UInt8]? {
        try one("SELECT target FROM symlink WHERE ino=?", [.int(Int64(ino))]) { Col.blob($0, 0) }
    }

    package func putSymlinkTarget(_ tx: SQLiteTxn, _ ino: Ino, _ target: [UInt8]) throws(FSError) {
        try conn.query("INSERT OR REPLACE INTO symlink(ino, target) VALUES(?, ?)", [.int(Int64(ino)), .blob(target)])
    }

    package func xattr(_ tx: SQLiteTxn, _ ino: Ino, _ name: [UInt8]) throws(FSError) -> [UInt8]? {
        try one("SELECT value FROM xattr WHERE ino=? AND name=?", [.int(Int64(ino)), .blob(name)]) { Col.blob($0, 0) }
    }

    package func putXattr(_ tx: SQLiteTxn, _ ino: Ino, _ name: [UInt8], _ value: [UInt8]) throws(FSError) {
        try conn.query("INSERT OR REPLACE INTO xattr(ino, name, value) VALUES(?, ?, ?)", [.int(Int64(ino)), .blob(name), .blob(value)])
    }

    package func deleteXattr(_ tx: SQLiteTxn, _ ino: Ino, _ name: [UInt8]) throws(FSError) {
        try conn.query("DELETE FROM xattr WHERE ino=? AND name=?", [.int(Int64(ino)), .blob(name)])
    }

    package func xattrBytes(_ tx: SQLiteTxn, _ ino: Ino) throws(FSError) -> Int? {
        try one("SELECT bytes FROM xattrbytes WHERE ino=?", [.int(Int64(ino))]) { Int(Col.int($0, 0)) }
    }

    package func putXattrBytes(_ tx: SQLiteTxn, _ ino: Ino, _ bytes: Int?) throws(FSError) {
        if let bytes {
            try conn.query("INSERT OR REPLACE INTO xattrbytes(ino, bytes) VALUES(?, ?)", [.int(Int64(ino)), .int(Int64(bytes))])
        } else {
            try conn.query("DELETE FROM xattrbytes WHERE ino=?", [.int(Int64(ino))])
        }
    }

    package func sumXattrBytes(_ tx: SQLiteTxn, _ ino: Ino) throws(FSError) -> Int {
        // (length() of a blob reads its size, not its overflow pages.)
        Int(try one("SELECT COALESCE(SUM(length(name) + length(value)), 0) FROM xattr WHERE ino=?", [.int(Int64(ino))]) { Col.int($0, 0) } ?? 0)
    }

    package func xattrNames(_ tx: SQLiteTxn, _ ino: Ino) throws(FSError) -> [[UInt8]] {
        var out: [[UInt8]] = []
        try conn.query("SELECT name FROM xattr WHERE ino=? ORDER BY name", [.int(Int64(ino))]) { out.append(Col.blob($0, 0)) }
        return out
    }

    package func chunk(_ tx: SQLiteTxn, _ ino: Ino, _ index: UInt32) throws(FSError) -> [UInt8] {
        try one("SELECT slices FROM chunk WHERE ino=? AND idx=?", [.int(Int64(ino)), .int(Int64(index))]) { Col.blob($0, 0) } ?? []
    }

    package func appendChunk(_ tx: SQLiteTxn, _ ino: Ino, _ index: UInt32, _ record: [UInt8]) throws(FSError) {
        try conn.query(
            "INSERT INTO chunk(ino, idx, slices) VALUES(?, ?, ?) ON CONFLICT(ino, idx) DO UPDATE SET slices=slices||excluded.slices",
            [.int(Int64(ino)), .int(Int64(index)), .blob(record)])
    }

    package func chunkIndexes(_ tx: SQLiteTxn, _ ino: Ino, from index: UInt32, limit: Int, descending: Bool) throws(FSError) -> [UInt32] {
        var out: [UInt32] = []
        try conn.query(
            "SELECT idx FROM chunk WHERE ino=? AND idx>=? ORDER BY idx \(descending ? "DESC" : "ASC") LIMIT ?",
            [.int(Int64(ino)), .int(Int64(index)), .int(Int64(limit))]
        ) { out.append(UInt32(Col.int($0, 0))) }
        return out
    }

    package func deleteChunk(_ tx: SQLiteTxn, _ ino: Ino, _ index: UInt32) throws(FSError) -> [UInt8] {
        let blob = try chunk(tx, ino, index)
        if !blob.isEmpty { try conn.query("DELETE FROM chunk WHERE ino=? AND idx=?", [.int(Int64(ino)), .int(Int64(index))]) }
        return blob
    }

    package func isOpen(_ tx: SQLiteTxn, _ ino: Ino) throws(FSError) -> Bool {
        try one("SELECT 1 FROM openfile WHERE ino=? LIMIT 1", [.int(Int64(ino))]) { _ in true } ?? false
    }

    package func addOpen(_ tx: SQLiteTxn, _ sid: UInt64, _ ino: Ino) throws(FSError) {
        _ = try changeOpens(sid, ino, 1)
    }

    package func openCount(_ tx: SQLiteTxn, _ sid: UInt64, _ ino: Ino) throws(FSError) -> Int {
        Int(try one("SELECT count FROM openfile WHERE sid=? AND ino=?", [.int(Int64(sid)), .int(Int64(ino))]) { Col.int($0, 0) } ?? 0)
    }

    package func dropOpens(_ tx: SQLiteTxn, _ sid: UInt64, _ ino: Ino, _ count: Int) throws(FSError) -> Int {
        try changeOpens(sid, ino, -count)
    }

    private func changeOpens(_ sid: UInt64, _ ino: Ino, _ delta: Int) throws(FSError) -> Int {
        let args: [SQLValue] = [.int(Int64(sid)), .int(Int64(ino))]
        let cur = Int(try one("SELECT count FROM openfile WHERE sid=? AND ino=?", args) { Col.int($0, 0) } ?? 0)
        let n = max(0, cur + delta)
        if n == 0 {
            try conn.query("DELETE FROM openfile WHERE sid=? AND ino=?", args)
        } else {
            try conn.query("INSERT OR REPLACE INTO openfile(sid, ino, count) VALUES(?, ?, ?)", args + [.int(Int64(n))])
        }
        return n
    }

    package func sessionOpens(_ tx: SQLiteTxn, _ sid: UInt64, limit: Int) throws(FSError) -> [(Ino, Int)] {
        var out: [(Ino, Int)] = []
        try conn.query("SELECT ino, count FROM openfile WHERE sid=? LIMIT ?", [.int(Int64(sid)), .int(Int64(limit))]) {
            out.append((Ino(Col.int($0, 0)), Int(Col.int($0, 1))))
        }
        return out
    }

    package func xattrCount(_ tx: SQLiteTxn, _ ino: Ino) throws(FSError) -> Int {
        Int(try one("SELECT COUNT(*) FROM xattr WHERE ino=?", [.int(Int64(ino))]) { Col.int($0, 0) } ?? 0)
    }

    package func addPendingDelete(_ tx: SQLiteTxn, _ ino: Ino, _ size: UInt64) throws(FSError) {
        try conn.query(
            "INSERT OR REPLACE INTO delfile(ino, size, at) VALUES(?, ?, ?)", [.int(Int64(ino)), .int(Int64(size)), .int(Timespec.now().sec)])
    }

    package func pendingDeletes(_ tx: SQLiteTxn, limit: Int) throws(FSError) -> [PendingDelete] {
        var out: [PendingDelete] = []
        try conn.query("SELECT ino, size FROM delfile ORDER BY at LIMIT ?", [.int(Int64(limit))]) {
            out.append(PendingDelete(ino: Ino(Col.int($0, 0)), size: UInt64(Col.int($0, 1))))
        }
        return out
    }

    package func removePendingDelete(_ tx: SQLiteTxn, _ pending: PendingDelete) throws(FSError) {
        try conn.query("DELETE FROM delfile WHERE ino=?", [.int(Int64(pending.ino))])
    }

    package func pushDroppedSlices(_ tx: SQLiteTxn, _ records: [UInt8]) throws(FSError) {
        try conn.query("INSERT INTO delslices(slices) VALUES(?)", [.blob(records)])
    }

    package func sliceRefs(_ tx: SQLiteTxn, _ id: UInt64) throws(FSError) -> Int64 {
        try one("SELECT refs FROM sliceref WHERE id=?", [.int(Int64(bitPattern: id))]) { Col.int($0, 0) } ?? 0
    }

    package func addSliceRefs(_ tx: SQLiteTxn, _ id: UInt64, _ delta: Int64) throws(FSError) {
        try conn.query(
            "INSERT INTO sliceref(id, refs) VALUES(?, ?) ON CONFLICT(id) DO UPDATE SET refs=refs+excluded.refs",
            [.int(Int64(bitPattern: id)), .int(delta)])
        try conn.query("DELETE FROM sliceref WHERE id=? AND refs<=0", [.int(Int64(bitPattern: id))])
    }

    package func takeDroppedSlices(_ tx: SQLiteTxn, limit: Int) throws(FSError) -> [UInt8] {
        var out: [UInt8] = []
        var ids: [Int64] = []
        try conn.query("SELECT id, slices FROM delslices ORDER BY id LIMIT ?", [.int(Int64(limit))]) {
            ids.append(Col.int($0, 0))
            out += Col.blob($0, 1)
        }
        for id in ids { try conn.query("DELETE FROM delslices WHERE id=?", [.int(id)]) }
        return out
    }

    package func session(_ tx: SQLiteTxn, _ sid: UInt64) throws(FSError) -> SessionInfo? {
        guard let text = try one("SELECT info FROM session WHERE sid=?", [.int(Int64(sid))], { Col.text($0, 0) }) else { return nil }
        return decodeSession(text)
    }

    package func putSession(_ tx: SQLiteTxn, _ info: SessionInfo) throws(FSError) {
        try conn.query(
            "INSERT OR REPLACE INTO session(sid, heartbeat, info) VALUES(?, ?, ?)",
            [.int(Int64(info.sid)), .int(info.heartbeat), .text(encodeSession(info))])
    }

    package func deleteSession(_ tx: SQLiteTxn, _ sid: UInt64) throws(FSError) {
        try conn.query("DELETE FROM session WHERE sid=?", [.int(Int64(sid))])
        try conn.query("DELETE FROM sessionlock WHERE sid=?", [.int(Int64(sid))])
        try conn.query("DELETE FROM openfile WHERE sid=?", [.int(Int64(sid))])
    }

    package func sessions(_ tx: SQLiteTxn) throws(FSError) -> [SessionInfo] {
        var out: [SessionInfo] = []
        try conn.query("SELECT info FROM session ORDER BY sid", []) { if let s = decodeSession(Col.text($0, 0)) { out.append(s) } }
        return out
    }

    package func locks(_ tx: SQLiteTxn, _ ino: Ino, _ kind: UInt8) throws(FSError) -> [UInt8] {
        try one("SELECT tbl FROM locks WHERE ino=? AND kind=?", [.int(Int64(ino)), .int(Int64(kind))]) { Col.blob($0, 0) } ?? []
    }

    package func putLocks(_ tx: SQLiteTxn, _ ino: Ino, _ kind: UInt8, _ table: [UInt8], sid: UInt64) throws(FSError) {
        let key: [SQLValue] = [.int(Int64(ino)), .int(Int64(kind))]
        if table.isEmpty {
            try conn.query("DELETE FROM locks WHERE ino=? AND kind=?", key)
        } else {
            try conn.query("INSERT OR REPLACE INTO locks(ino, kind, tbl) VALUES(?, ?, ?)", key + [.blob(table)])
        }
        if sid != 0 {
            try conn.query("INSERT OR IGNORE INTO sessionlock(sid, ino, kind) VALUES(?, ?, ?)", [.int(Int64(sid))] + key)
        }
    }

    package func forgetSessionLock(_ tx: SQLiteTxn, _ sid: UInt64, _ ino: Ino, _ kind: UInt8) throws(FSError) {
        try conn.query("DELETE FROM sessionlock WHERE sid=? AND ino=? AND kind=?", [.int(Int64(sid)), .int(Int64(ino)), .int(Int64(kind))])
    }

    package func sessionLocks(_ tx: SQLiteTxn, _ sid: UInt64, limit: Int) throws(FSError) -> [(Ino, UInt8)] {
        var out: [(Ino, UInt8)] = []
        try conn.query("SELECT ino, kind FROM sessionlock WHERE sid=? LIMIT ?", [.int(Int64(sid)), .int(Int64(limit))]) {
            out.append((Ino(Col.int($0, 0)), UInt8(Col.int($0, 1))))
        }
        return out
    }
}

/// The embedded engine: `sqlite3:///path.db`.
package typealias SQLiteMetadata = TxnMetadata<SQLiteStore>

extension TxnMetadata where S == SQLiteStore {
    /// Opens (or with `create`, creates) the database at `path`.
    package convenience init(path: String, create: Bool = false) throws(FSError) {
        self.init(store: try SQLiteStore(path: path, create: create))
    }
}

func encodeSession(_ info: SessionInfo) -> String {
    let data = (try? JSONEncoder().encode(info)) ?? Data()
    return String(decoding: data, as: UTF8.self)
}

func decodeSession(_ text: String) -> SessionInfo? {
    try? JSONDecoder().decode(SessionInfo.self, from: Data(text.utf8))
}
