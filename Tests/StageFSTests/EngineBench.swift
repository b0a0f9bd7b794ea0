import Foundation
import Metadata
import StageFSCore
import Testing

/// Client CPU and wall time per metadata operation of the Redis engine, without FUSE or data.
/// Runs only with STAGEFS_ENGINE_BENCH=N (operations per kind): `swift test -c release --filter EngineBench`.
@Suite("Engine bench", .enabled(if: ProcessInfo.processInfo.environment["STAGEFS_ENGINE_BENCH"] != nil))
struct EngineBench {
    @Test func perOperation() throws {
        let n = Int(ProcessInfo.processInfo.environment["STAGEFS_ENGINE_BENCH"] ?? "") ?? 2000
        let who = Credential(uid: 1000, gid: 1000, groups: [1000])
        func cpu() -> Double {
            var u = rusage()
            getrusage(RUSAGE_SELF.rawValue, &u)
            return Double(u.ru_utime.tv_sec + u.ru_stime.tv_sec) + Double(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6
        }
        for round in 0..<2 {
            for kind in [EngineKind.redis] {
                let f = try EngineFixture(kind)
                let m = f.engine
                let sid = try m.newSession(SessionInfo(hostname: "h", pid: 1, mountPoint: "/m", version: "t"))
                let (dir, _) = try m.mknod(who, rootIno, Array("d".utf8), .directory, 0o777, rdev: 0, target: nil)
                var line = "\(kind) round \(round):"
                let serverPid = f.redis!.pid
                func serverCPU() -> Double {
                    guard let text = try? String(contentsOfFile: "/proc/\(serverPid)/stat", encoding: .utf8),
                        let tail = text.split(separator: ")").last
                    else { return 0 }
                    let fields = tail.split(separator: " ")
                    return (Double(fields[11]) ?? 0) / 100 + (Double(fields[12]) ?? 0) / 100
                }
                let store = (m as? RedisTxnMetadata)?.store
                func phase(_ name: String, _ body: (Int) throws -> Void) rethrows {
                    let st0 = store?.stats
                    let c0 = cpu()
                    let s0 = serverCPU()
                    let t0 = Date()
                    for i in 0..<n { try body(i) }
                    let wall = Date().timeIntervalSince(t0) / Double(n) * 1e6
                    let c = (cpu() - c0) / Double(n) * 1e6
                    let sc = (serverCPU() - s0) / Double(n) * 1e6
                    line += " \(name) \(Int(wall)) us wall, cpu \(Int(c)) client + \(Int(sc)) server"
                    if let st0, let st1 = store?.stats {
                        let per = { (x: Int) in String(format: "%.2f", Double(x) / Double(n)) }
                        line +=
                            " (reads \(per(st1.reads - st0.reads)), commits \(per(st1.commits - st0.commits)), conflicts \(per(st1.conflicts - st0.conflicts)), refreshes \(per(st1.refreshes - st0.refreshes)))"
                    }
                    line += ";"
                }
                var inos: [Ino] = []
                try phase("create+write+close") { i in
                    let name = Array("f\(i)".utf8)
                    _ = try? m.lookup(who, dir, name)
                    let (ino, _) = try m.create(who, dir, name, 0o644, sid: sid)
                    _ = try m.writeSlice(ino, 0, Slice(pos: 0, id: UInt64(i + 1), size: 4096, off: 0, len: 4096), minSize: 4096, mtime: .now(), sid: 0)
                    try m.close(ino, sid: sid)
                    inos.append(ino)
                }
                try phase("lookup+getattr") { i in
                    _ = try m.lookup(who, dir, Array("f\(i)".utf8))
                    _ = try m.getattr(inos[i])
                }
                try phase("open+close") { i in
                    _ = try m.open(who, inos[i], flags: O_RDONLY, sid: sid)
                    try m.close(inos[i], sid: sid)
                }
                try phase("unlink+delete") { i in
                    _ = try m.unlink(who, dir, Array("f\(i)".utf8))
                    if let p = try m.pendingDeletes(limit: 1).first { _ = try m.finishDelete(p) }
                }
                print(line)
            }
        }
    }
}
