import CSQLite3
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// A value bound to or read from a SQL statement.
package enum SQLValue {
    case int(Int64)
    case blob([UInt8])
    case text(String)
    case null
}

/// One SQLite connection with a cache of prepared statements (`sqlite3_prepare_v2`).
/// Not thread-safe: its owner serializes every use (the metadata store's lock, the disk-cache
/// index's lock).
package final class SQLiteConnection {
    package let db: OpaquePointer
    package let path: String
    private var statements: [String: OpaquePointer] = [:]

    /// `sqlite3_open_v2`; `create` allows a new database file.
    package init(path: String, create: Bool) throws(FSError) {
        self.path = path
        if !create && Sys.stat(path) == nil {
            throw FSError(ENOENT, "SQLite database \(path) does not exist: run 'stagefs format' first")
        }
        if create { try Sys.mkdirs(Sys.dirname(of: path)) }
        var handle: OpaquePointer?
        let flags = SQLITE_OPEN_READWRITE | (create ? SQLITE_OPEN_CREATE : 0) | SQLITE_OPEN_NOMUTEX
        let rc = sqlite3_open_v2(path, &handle, flags, nil)
        guard rc == SQLITE_OK, let handle else {
            let msg = handle.map { String(cString: sqlite3_errmsg($0)) } ?? "out of memory"
            if let handle { sqlite3_close(handle) }
            throw FSError(rc == SQLITE_CANTOPEN ? EACCES : EIO, "cannot open SQLite database \(path): \(msg)")
        }
        db = handle
        sqlite3_busy_timeout(db, 30_000)
        sqlite3_extended_result_codes(db, 1)
    }

    deinit {
        for (_, s) in statements { sqlite3_finalize(s) }
        sqlite3_close_v2(db)
    }

    private func fail(_ rc: Int32, _ what: String) -> FSError {
        let msg = String(cString: sqlite3_errmsg(db))
        let code: Int32
        switch rc & 0xff {
        case SQLITE_BUSY, SQLITE_LOCKED: code = EAGAIN
        case SQLITE_FULL: code = ENOSPC
        case SQLITE_READONLY, SQLITE_PERM, SQLITE_AUTH: code = EACCES
        default: code = EIO
        }
        return FSError(code, "SQLite database \(path): \(what): \(msg)")
    }

    /// Runs statements that return no rows (`sqlite3_exec`).
    package func exec(_ sql: String) throws(FSError) {
        var err: UnsafeMutablePointer<CChar>?
        let rc = sqlite3_exec(db, sql, nil, nil, &err)
        if let err { sqlite3_free(err) }
        if rc != SQLITE_OK { throw fail(rc, "running '\(sql.prefix(40))'") }
    }

    private func prepare(_ sql: String) throws(FSError) -> OpaquePointer {
        if let s = statements[sql] { return s }
        var stmt: OpaquePointer?
        let rc = sqlite3_prepare_v2(db, sql, -1, &stmt, nil)
        guard rc == SQLITE_OK, let stmt else { throw fail(rc, "preparing '\(sql)'") }
        statements[sql] = stmt
        return stmt
    }

    /// Runs `sql` with `args`, calling `row` for each result row.
    package func query(_ sql: String, _ args: [SQLValue], _ row: (OpaquePointer) throws(FSError) -> Void = { _ in }) throws(FSError) {
        let stmt = try prepare(sql)
        defer {
            sqlite3_reset(stmt)
            sqlite3_clear_bindings(stmt)
        }
        for (i, a) in args.enumerated() {
            let idx = Int32(i + 1)
            switch a {
            case .int(let v): sqlite3_bind_int64(stmt, idx, v)
            case .text(let v): _ = v.withCString { csqlite3_bind_text(stmt, idx, $0, -1) }
            case .blob(let v):
                _ = v.withUnsafeBytes { csqlite3_bind_blob(stmt, idx, $0.baseAddress ?? UnsafeRawPointer(bitPattern: 1), Int32(v.count)) }
            case .null: sqlite3_bind_null(stmt, idx)
            }
        }
        while true {
            let rc = sqlite3_step(stmt)
            if rc == SQLITE_ROW {
                try row(stmt)
            } else if rc == SQLITE_DONE {
                return
            } else {
                throw fail(rc, "running '\(sql.prefix(60))'")
            }
        }
    }

    /// Runs `body` in a transaction (`BEGIN IMMEDIATE` for writers, retried while another
    /// process holds the database), committed when it returns, rolled back when it throws.
    package func transaction<T>(write: Bool, _ body: () throws(FSError) -> T) throws(FSError) -> T {
        var attempt = 0
        while true {
            do {
                try exec(write ? "BEGIN IMMEDIATE" : "BEGIN")
                break
            } catch {
                attempt += 1
                if error.code != EAGAIN || attempt > 20 { throw error }
                Sys.sleep(seconds: 0.05)
            }
        }
        do {
            let r = try body()
            try exec("COMMIT")
            return r
        } catch {
            try? exec("ROLLBACK")
            throw error
        }
    }

    /// Number of rows the last statement changed.
    package var changes: Int { Int(sqlite3_changes(db)) }
}

/// Column readers for a result row.
package enum Col {
    package static func int(_ s: OpaquePointer, _ i: Int32) -> Int64 { sqlite3_column_int64(s, i) }
    package static func blob(_ s: OpaquePointer, _ i: Int32) -> [UInt8] {
        let n = Int(sqlite3_column_bytes(s, i))
        guard n > 0, let p = sqlite3_column_blob(s, i) else { return [] }
        return Array(UnsafeRawBufferPointer(start: p, count: n))
    }
    package static func text(_ s: OpaquePointer, _ i: Int32) -> String {
        guard let p = sqlite3_column_text(s, i) else { return "" }
        return String(cString: p)
    }
}
