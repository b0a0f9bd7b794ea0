import Foundation
import Metadata
import StageFSCore
import Testing

@testable import VFS

/// Where on the stack a call runs: the address of a local of the caller's frame.
@inline(never)
private func stackAddress() -> Int {
    var local = 0
    return withUnsafeMutablePointer(to: &local) { Int(bitPattern: $0) }
}

/// A function kept for later calls is called through the same frames however often it is
/// called. (Kept in a `Locked`, each inout access wrapped it in one more thunk: a mount's
/// commits each went deeper into the stack than the last, until an upload thread overflowed.)
@Suite("Hooks", .timeLimit(.minutes(2)))
struct HookTests {
    @Test func aHookIsCalledAtTheSameDepthEveryTime() {
        let hook = Hook<@Sendable () -> Int>()
        #expect(hook.current == nil)
        hook.set { stackAddress() }
        var depths: [Int] = []
        for _ in 0..<20_000 { depths.append(hook.current!()) }
        #expect(depths.first == depths.last, "\(abs(depths.last! - depths.first!)) bytes deeper after 20,000 calls")
        hook.set { 7 }
        #expect(hook.current!() == 7, "set replaces")
    }

    @Test func commitsCallTheLedgersHooksAtTheSameDepth() throws {
        let dir = try makeTempDir("hooks")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let m = try SQLiteMetadata(path: dir + "/meta.db", create: true)
        try m.initialize(VolumeFormat(name: "hooks", storage: "file", bucket: dir + "/data"), force: false, rootMode: 0o777)
        let (ino, _) = try m.create(Credential(uid: 0, gid: 0), rootIno, Array("f".utf8), 0o644, sid: 0)
        let ledger = MetadataLedger(m)
        let depths = Locked<(session: [Int], commit: [Int])>(([], []))
        ledger.bind(session: {
            let d = stackAddress()
            depths.withLock { $0.session.append(d) }
            return 0
        })
        ledger.onCommit { _, _ in
            let d = stackAddress()
            depths.withLock { $0.commit.append(d) }
        }
        let now = Timespec(sec: 1, nsec: 0)
        for i in 0..<3000 {
            let s = Slice(pos: 0, id: UInt64(i + 1), size: 1, off: 0, len: 1)
            try ledger.writeSlice(ino, UInt32(i), s, minSize: UInt64(i) * chunkSize + 1, mtime: now)
        }
        let (session, commit) = depths.current
        #expect(session.count == 3000 && commit.count == 3000)
        #expect(session.first == session.last, "the session hook ran \(abs(session.last! - session.first!)) bytes deeper on the last commit")
        #expect(commit.first == commit.last, "the commit hook ran \(abs(commit.last! - commit.first!)) bytes deeper on the last commit")
    }
}
