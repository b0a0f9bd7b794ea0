import Foundation
import MungeAuth
import StageFSCore
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// A real munged on its own socket and key in a fresh directory, stopped when released.
final class MungeDaemon {
    let dir: String
    let pid: pid_t
    var socket: String { "\(dir)/munge.sock" }

    init() throws {
        let dir = try makeTempDir("munge")
        // Traversable, so that the munge CLI run as another user reaches the socket.
        chmod(dir, 0o755)
        let key = "\(dir)/munge.key"
        guard FileManager.default.createFile(atPath: key, contents: Data(Sys.randomBytes(1024)), attributes: [.posixPermissions: 0o400]) else {
            throw TestFailure("cannot write \(key)")
        }
        let pid = try Spawn.start(
            Spawn.which("munged") ?? "/usr/sbin/munged",
            [
                "-F", "-f", "--socket=\(dir)/munge.sock", "--key-file=\(key)", "--pid-file=\(dir)/munged.pid",
                "--seed-file=\(dir)/munged.seed", "--log-file=\(dir)/munged.log",
            ], stdout: .file("\(dir)/munged.out"), stderr: .file("\(dir)/munged.out"))
        let deadline = Sys.monotonicNanos() + 20_000_000_000
        while Sys.stat("\(dir)/munge.sock") == nil {
            if Spawn.poll(pid) != nil || Sys.monotonicNanos() > deadline {
                kill(pid, SIGKILL)
                Spawn.wait(pid)
                let log = String(decoding: Sys.readFile("\(dir)/munged.out") ?? [], as: UTF8.self)
                try? FileManager.default.removeItem(atPath: dir)
                throw TestFailure("munged did not start: \(log)")
            }
            Sys.sleep(seconds: 0.02)
        }
        self.dir = dir
        self.pid = pid
    }

    deinit {
        kill(pid, SIGTERM)
        Spawn.wait(pid)
        try? FileManager.default.removeItem(atPath: dir)
    }
}

/// Each test has its own munged (a suite's value is made anew for every test).
@Suite("Munge", .timeLimit(.minutes(1)))
struct MungeTests {
    let munged: MungeDaemon
    let munge: MungeContext

    init() throws {
        munged = try MungeDaemon()
        munge = MungeContext(socket: munged.socket)
    }

    @Test func roundTripCarriesPayloadAndMaker() throws {
        let payload: [UInt8] = [0, 1, 2, 255] + Array("hello".utf8)
        let cred = try munge.encode(payload: payload, ttl: 30)
        #expect(cred.hasPrefix("MUNGE:"))
        let decoded = try munge.decode(cred)
        #expect(decoded.uid == getuid() && decoded.gid == getgid())
        #expect(decoded.payload == payload)
        #expect(decoded.ttl == 30)
        #expect(abs(decoded.encodedAt - Int64(time(nil))) < 60)
        #expect(try munge.decode(try munge.encode(payload: [])).payload == [])
    }

    @Test func credentialBoundToAnotherConnectionIsRefused() throws {
        let a = try ConnectionBinding.makeNonce()
        let b = try ConnectionBinding.makeNonce()
        #expect(a.count == 32 && a != b)
        let cred = try munge.decode(try munge.encode(payload: ConnectionBinding.payload(nonce: a)))
        try ConnectionBinding.verify(credential: cred, nonce: a)
        let other = #expect(throws: FSError.self) { try ConnectionBinding.verify(credential: cred, nonce: b) }
        #expect(other?.code == EACCES && other?.message.contains("made for another connection") == true)
        let purpose = #expect(throws: FSError.self) { try ConnectionBinding.verify(credential: cred, nonce: a, purpose: "admin") }
        #expect(purpose?.code == EACCES)
        let foreign = try munge.decode(try munge.encode(payload: a))
        let unbound = #expect(throws: FSError.self) { try ConnectionBinding.verify(credential: foreign, nonce: a) }
        #expect(unbound?.message.contains("not for the StageFS gateway") == true)
    }

    @Test func replayedCredentialIsRefused() throws {
        let cred = try munge.encode(payload: [7])
        _ = try munge.decode(cred)
        let e = #expect(throws: FSError.self) { try munge.decode(cred) }
        #expect(e?.code == EACCES && e?.message == "MUNGE credential replayed")
    }

    @Test func expiredCredentialIsRefused() throws {
        let cred = try munge.encode(payload: [7], ttl: 1)
        // munged refuses once its clock is past encode time + ttl; the encode time is at most `made`.
        let made = time(nil)
        let deadline = Sys.monotonicNanos() + 10_000_000_000
        while time(nil) < made + 2 && Sys.monotonicNanos() < deadline { Sys.sleep(seconds: 0.05) }
        let e = #expect(throws: FSError.self) { try munge.decode(cred) }
        #expect(e?.code == EACCES && e?.message == "MUNGE credential expired")
    }

    @Test func garbageIsRefused() throws {
        let good = try munge.encode(payload: [7])
        // One character of the MAC-protected body changed.
        var chars = [Character](good)
        let i = chars.count / 2
        chars[i] = chars[i] == "A" ? "B" : "A"
        for bad in ["garbage", "", "MUNGE:AAAA:", String(chars)] {
            let e = #expect(throws: FSError.self, "\(bad)") { try munge.decode(bad) }
            #expect(e?.code == EACCES && e?.message.hasPrefix("MUNGE credential invalid") == true, "\(bad): \(e?.message ?? "")")
        }
    }

    @Test func unreachableMungedIsNamed() {
        let absent = "\(munged.dir)/absent.sock"
        let lost = MungeContext(socket: absent)
        let e = #expect(throws: FSError.self) { try lost.encode(payload: [1]) }
        #expect(e?.code == ECONNREFUSED && e?.message.hasPrefix("cannot reach munged at \(absent): ") == true, "\(e?.message ?? "")")
        let d = #expect(throws: FSError.self) { try lost.decode("MUNGE:AAAA:") }
        #expect(d?.code == ECONNREFUSED)
    }

    @Test(.enabled(if: getuid() == 0, "runs the munge CLI as another user")) func decodeReportsTheMakersUid() throws {
        let user = "stagefs-t1"
        if getpwnam(user) == nil {
            let (rc, out) = try Spawn.run("/usr/sbin/useradd", ["--create-home", "--shell", "/bin/bash", user])
            if rc != 0 && getpwnam(user) == nil { throw TestFailure("useradd \(user): \(out)") }
        }
        guard let pw = getpwnam(user) else { throw TestFailure("no user \(user)") }
        let uid = pw.pointee.pw_uid
        let nonce = try ConnectionBinding.makeNonce()
        let input = "\(munged.dir)/payload"
        guard
            FileManager.default.createFile(
                atPath: input, contents: Data(ConnectionBinding.payload(nonce: nonce)), attributes: [.posixPermissions: 0o644])
        else { throw TestFailure("cannot write \(input)") }
        let (rc, out) = try Spawn.run(
            Spawn.which("runuser") ?? "/usr/sbin/runuser", ["-u", user, "--", "/usr/bin/munge", "-S", munged.socket, "-i", input], timeout: 30)
        #expect(rc == 0, "\(out)")
        let cred = try munge.decode(out.trimmingCharacters(in: .whitespacesAndNewlines))
        #expect(cred.uid == uid && cred.uid != 0)
        try ConnectionBinding.verify(credential: cred, nonce: nonce)
    }
}
