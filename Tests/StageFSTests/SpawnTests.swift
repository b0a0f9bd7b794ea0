import StageFSCore
import Testing

#if canImport(Glibc)
    import Glibc
#endif

@Suite("Spawn")
struct SpawnTests {
    @Test func aProgramPastItsDeadlineIsKilled() {
        let started = Sys.monotonicNanos()
        do {
            _ = try Spawn.run("/bin/sh", ["-c", "sleep 30"], timeout: 0.5)
            Issue.record("a program past its deadline was waited for")
        } catch {
            #expect(error.code == ETIMEDOUT)
            #expect(error.message.contains("sh did not finish within"))
        }
        #expect(Sys.monotonicNanos() - started < 5_000_000_000)
    }

    @Test func aProcessLeftHoldingThePipeIsNotWaitedFor() throws {
        let started = Sys.monotonicNanos()
        let (rc, out) = try Spawn.run("/bin/sh", ["-c", "sleep 30 & echo hi"], timeout: 10)
        #expect(rc == 0 && out == "hi\n")
        #expect(Sys.monotonicNanos() - started < 5_000_000_000)
    }

    @Test func outputIsBoundedAndStreamsAreSeparate() {
        var outcome = Spawn.Outcome()
        Spawn.runMany(
            [Spawn.Command("/bin/sh", ["-c", "head -c 5000000 /dev/zero; echo oops >&2"])], parallel: 1, timeout: 10, outputLimit: 1000,
            separateErrors: true
        ) { _, o in
            outcome = o
            return nil
        }
        #expect(outcome.status == 0 && outcome.overflowed && outcome.output.count == 1000)
        #expect(String(decoding: outcome.errors, as: UTF8.self) == "oops\n")
    }

    @Test func chainsRunSideBySideEachWithItsDeadline() {
        let started = Sys.monotonicNanos()
        var results: [Int: [Int32?]] = [:]
        let commands = (0..<4).map { i in Spawn.Command("/bin/sh", ["-c", i == 0 ? "sleep 30" : "sleep 0.3; exit \(i)"]) }
        Spawn.runMany(commands, parallel: 4, timeout: 1, outputLimit: 100, separateErrors: false) { i, o in
            results[i, default: []].append(o.status)
            // Chain 1 goes on with a second program.
            return i == 1 && results[i]!.count == 1 ? Spawn.Command("/bin/sh", ["-c", "exit 7"]) : nil
        }
        #expect(results[0]! == [nil], "the stuck one was killed")
        #expect(results[1]! == [1, 7] && results[2]! == [2] && results[3]! == [3])
        #expect(Sys.monotonicNanos() - started < 4_000_000_000)
    }

    @Test func jobIDs() {
        for good in ["1", "4242", "Job_1.a-b", String(repeating: "j", count: 64), ".."] { #expect(JobID.isValid(good), "\(good)") }
        for bad in ["", "x\ny", "a/b", "job 1", "é", String(repeating: "j", count: 65)] { #expect(!JobID.isValid(bad), "\(bad)") }
        #expect(JobID.escaped("x\ny") == "'x\\ny'")
    }
}
