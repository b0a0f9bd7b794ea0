import Foundation
import Metadata
import StageFSCore
import Testing

/// The SQLite engine's transaction layer driven directly (`SQLiteStore.transaction`), as
/// `RedisTxnTests` drives the Redis one: all or nothing, no lost update between two
/// connections to one database (two processes of a node), and a nested call that joins.
@Suite("SQLite transactions", .timeLimit(.minutes(2)))
final class SQLiteTxnTests {
    /// The directories this test made (a suite instance runs one test), removed after it.
    private var dirs: [String] = []

    deinit {
        for d in dirs { try? FileManager.default.removeItem(atPath: d) }
    }

    private func volume() throws -> (SQLiteMetadata, String) {
        let dir = try makeTempDir("sqltxn")
        dirs.append(dir)
        let m = try SQLiteMetadata(path: dir + "/meta.db", create: true)
        try m.initialize(VolumeFormat(name: "sqltxn", storage: "file", bucket: dir + "/data"), force: false, rootMode: 0o777)
        return (m, dir)
    }

    @Test func aFailedTransactionWritesNothing() throws {
        let (m, _) = try volume()
        let s = m.store
        #expect(throws: FSError.self) {
            try s.transaction(write: true) { (tx) throws(FSError) in
                try s.setSetting(tx, "a", "1")
                try s.add(tx, "usedInodes", 5)
                throw FSError.perm
            }
        }
        let (a, used) = try s.transaction(write: false) { (tx) throws(FSError) in (try s.setting(tx, "a"), try s.counter(tx, "usedInodes")) }
        #expect(a == nil)
        #expect(used == 1, "only the root directory")
    }

    @Test func twoConnectionsLoseNoUpdate() throws {
        let (m, dir) = try volume()
        let other = try SQLiteMetadata(path: dir + "/meta.db")
        let rounds = 300
        try m.store.transaction(write: true) { (tx) throws(FSError) in try m.store.setSetting(tx, "n", "0") }
        // Read, then write what was read plus one: a lost update would leave less than 2 * rounds.
        let failures = Locked(0)
        let group = DispatchGroup()
        for s in [m.store, other.store] {
            DispatchQueue.global().async(group: group) {
                for _ in 0..<rounds {
                    do {
                        try s.transaction(write: true) { (tx) throws(FSError) in
                            let n = Int(try s.setting(tx, "n") ?? "") ?? -1_000_000
                            try s.setSetting(tx, "n", String(n + 1))
                        }
                    } catch {
                        failures.withLock { $0 += 1 }
                    }
                }
            }
        }
        #expect(group.wait(timeout: .now() + 90) == .success)
        #expect(failures.current == 0)
        let n = try m.store.transaction(write: false) { (tx) throws(FSError) in try m.store.setting(tx, "n") }
        #expect(n == String(2 * rounds))
    }

    @Test func aCallGivenTheTransactionIsPartOfIt() throws {
        let (m, _) = try volume()
        let s = m.store
        func inner(_ tx: SQLiteTxn) throws(FSError) { try s.setSetting(tx, "inner", "1") }
        #expect(throws: FSError.self) {
            try s.transaction(write: true) { (tx) throws(FSError) in
                try s.setSetting(tx, "outer", "1")
                try inner(tx)
                throw FSError.invalid
            }
        }
        let (outer, inner) = try s.transaction(write: false) { (tx) throws(FSError) in (try s.setting(tx, "outer"), try s.setting(tx, "inner")) }
        #expect(outer == nil && inner == nil, "the inner writes went with the outer transaction")
    }
}
