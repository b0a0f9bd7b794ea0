import Foundation
import ObjectStorage
import StageFSCore
import Testing

/// One pre-signing case, in the shape `Tests/tools/botocore_presign.py` reads.
private struct PresignCase: Codable, Sendable {
    var endpoint: String
    var style: String
    var bucket: String
    var region: String
    var access: String
    var secret: String
    var method: String
    var key: String
    var expires: Int
    var now: Int

    /// The bucket URL as `--bucket` takes it: `endpoint/bucket`, or `scheme://bucket.host:port`.
    var bucketURL: String {
        if style == "path" { return "\(endpoint)/\(bucket)" }
        let parts = endpoint.split(separator: "://", maxSplits: 1)
        return "\(parts[0])://\(bucket).\(parts[1])"
    }
}

/// Endpoints, object keys and signing inputs crossed into the cases checked against botocore.
private func botocoreCases() -> [PresignCase] {
    let endpoints: [(endpoint: String, style: String, bucket: String, region: String)] = [
        ("http://127.0.0.1:9000", "path", "stagefs-data", "us-east-1"),
        ("https://s3.example.com", "path", "bucket1", "eu-west-3"),
        ("https://s3.example.com:443", "path", "bucket1", "eu-west-3"),  // the default port, written
        ("http://[::1]:9000", "path", "b-ipv6", "us-east-1"),
        ("http://Example.COM:80", "virtual", "vbucket", "ap-southeast-2"),  // upper case, default port
        ("https://s3.eu-central-1.example.org:8443", "virtual", "my-bucket", "eu-central-1"),
    ]
    let keys = [
        "vol/chunks/0/1/1234_0_4194304",
        "team vol/chunks/0/0/17_0_4096",
        "a+b=c~d/e&f=g",
        "données/日本語/ü 🚀.bin",
        "!\"#$%'()*,:;<>?@[\\]^`{|}",
        "/lead//double/",
    ]
    let credentials = [("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"), ("stagefs", "s3cr3t/with+slash=")]
    let expiries = [1, 300, 3600, S3Presigner.maxExpires]
    // The epoch, a leap day's last second, an ordinary instant, a date past 2038, the last second of 9999.
    let times = [0, 1_709_251_199, 1_700_000_000, 4_107_542_400, 253_402_300_799]
    var cases: [PresignCase] = []
    for e in endpoints {
        for method in ["GET", "PUT"] {
            for key in keys {
                let i = cases.count
                let (access, secret) = credentials[i % credentials.count]
                cases.append(
                    PresignCase(
                        endpoint: e.endpoint, style: e.style, bucket: e.bucket, region: e.region, access: access, secret: secret,
                        method: method, key: key, expires: expiries[i % expiries.count], now: times[i % times.count]))
            }
        }
    }
    return cases
}

/// The URLs botocore's `generate_presigned_url` makes for `cases`, through
/// `Tests/tools/botocore_presign.py`. A missing python3 or botocore fails the test, with how to
/// install them: CI has them (scripts/install-deps.sh).
private func botocoreURLs(_ cases: [PresignCase]) throws -> [String] {
    let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("tools/botocore_presign.py").path
    let input = String(decoding: try JSONEncoder().encode(cases), as: UTF8.self)
    var outcome = Spawn.Outcome()
    Spawn.runMany(
        [Spawn.Command("/usr/bin/env", ["python3", script, input])], parallel: 1, timeout: 120, outputLimit: 1 << 22, separateErrors: true
    ) { _, o in
        outcome = o
        return nil
    }
    let errors = String(decoding: outcome.errors, as: UTF8.self)
    guard outcome.status == 0 else {
        throw TestFailure(
            "the botocore reference signer failed (status \(outcome.status.map(String.init) ?? "none")\(outcome.failure.map { ": \($0)" } ?? "")): "
                + "\(errors)\npython3 with botocore is needed: `python3 -m pip install boto3` (scripts/install-deps.sh)")
    }
    guard let urls = try? JSONDecoder().decode([String].self, from: Data(outcome.output)), urls.count == cases.count else {
        throw TestFailure(
            "the botocore reference signer printed no list of \(cases.count) URLs: \(String(decoding: outcome.output, as: UTF8.self)) \(errors)")
    }
    return urls
}

@Suite("Presign: S3 SigV4 query-string pre-signing", .timeLimit(.minutes(2)))
struct PresignTests {
    /// Every case gives, byte for byte, the URL botocore gives for the same inputs and instant.
    @Test func matchesBotocoreByteForByte() throws {
        let cases = botocoreCases()
        let expected = try botocoreURLs(cases)
        var matched = 0
        for (c, want) in zip(cases, expected) {
            let signer = try S3Presigner(bucket: c.bucketURL, accessKey: c.access, secretKey: c.secret, region: c.region)
            let got = try signer.presign(method: c.method, key: c.key, expires: c.expires, now: c.now)
            #expect(got == want, "\(c.method) \(c.bucketURL) key \(c.key) expires \(c.expires) at \(c.now)")
            if got == want { matched += 1 }
        }
        #expect(matched == cases.count && cases.count == 72)
    }

    /// The example of AWS's SigV4 query-string documentation (a GET of `test.txt` in
    /// `examplebucket`, 2013-05-24, one day), with the signature published there.
    @Test func awsDocumentedExample() throws {
        let signer = try S3Presigner(
            bucket: "https://examplebucket.s3.amazonaws.com", accessKey: "AKIAIOSFODNN7EXAMPLE",
            secretKey: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", region: "us-east-1")
        let url = try signer.presign(method: "GET", key: "test.txt", expires: 86400, now: 1_369_353_600)
        #expect(
            url == "https://examplebucket.s3.amazonaws.com/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256"
                + "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20130524T000000Z"
                + "&X-Amz-Expires=86400&X-Amz-SignedHeaders=host"
                + "&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404")
    }

    /// Any change of an input changes the signature (it is no constant), the same inputs give the
    /// same URL, and a URL tampered with (another key, a longer expiry) does not carry the
    /// signature made for what it asks.
    @Test func everyInputChangesTheSignature() throws {
        let bucket = "http://127.0.0.1:9000/stagefs-data"
        let signer = try S3Presigner(bucket: bucket, accessKey: "AKID", secretKey: "secret", region: "us-east-1")
        let key = "vol/chunks/0/1/1234_0_4194304"
        let now = 1_700_000_000
        func signature(_ url: String) -> String { String(url.split(separator: "X-Amz-Signature=").last ?? "") }
        let base = try signer.presign(method: "GET", key: key, expires: 300, now: now)
        let sig = signature(base)
        #expect(sig.count == 64 && sig.allSatisfy { "0123456789abcdef".contains($0) })
        #expect(try signer.presign(method: "GET", key: key, expires: 300, now: now) == base)

        // A URL edited to reach another block or to last longer keeps the old signature, which
        // is not the one made for what it now asks.
        let otherBlock = base.replacingOccurrences(of: "1234_0_4194304", with: "1235_0_4194304")
        let realOtherBlock = try signer.presign(method: "GET", key: "vol/chunks/0/1/1235_0_4194304", expires: 300, now: now)
        #expect(otherBlock != base && otherBlock != realOtherBlock)
        let longer = base.replacingOccurrences(of: "X-Amz-Expires=300", with: "X-Amz-Expires=604800")
        let realLonger = try signer.presign(method: "GET", key: key, expires: 604_800, now: now)
        #expect(longer != base && longer != realLonger)

        let variants = [
            try signer.presign(method: "PUT", key: key, expires: 300, now: now),
            try signer.presign(method: "GET", key: key + "x", expires: 300, now: now),
            try signer.presign(method: "GET", key: key, expires: 301, now: now),
            try signer.presign(method: "GET", key: key, expires: 300, now: now + 1),
            try S3Presigner(bucket: bucket, accessKey: "AKID", secretKey: "secreT", region: "us-east-1")
                .presign(method: "GET", key: key, expires: 300, now: now),
            try S3Presigner(bucket: bucket, accessKey: "AKID", secretKey: "secret", region: "eu-west-1")
                .presign(method: "GET", key: key, expires: 300, now: now),
            try S3Presigner(bucket: "http://127.0.0.1:9001/stagefs-data", accessKey: "AKID", secretKey: "secret", region: "us-east-1")
                .presign(method: "GET", key: key, expires: 300, now: now),
        ]
        var seen: Set<String> = [sig]
        for v in variants {
            #expect(v != base)
            seen.insert(signature(v))
        }
        #expect(seen.count == variants.count + 1, "every variant has a signature of its own")
    }

    /// An expiry out of 1...604800, another method, an empty key, a malformed bucket URL or a
    /// missing key is a usage error (EINVAL); the description never shows the secret key.
    @Test func refusesBadInputs() throws {
        let signer = try S3Presigner(bucket: "http://bkt.s3.example.com", accessKey: "AKID", secretKey: "topsecret", region: "us-east-1")
        for expires in [0, -1, S3Presigner.maxExpires + 1] {
            expectErrno(EINVAL, "expires \(expires)") { _ = try signer.presign(method: "GET", key: "k", expires: expires, now: 0) }
        }
        #expect(throws: Never.self) { try signer.presign(method: "PUT", key: "k", expires: S3Presigner.maxExpires, now: 0) }
        expectErrno(EINVAL, "DELETE") { _ = try signer.presign(method: "DELETE", key: "k", expires: 60, now: 0) }
        expectErrno(EINVAL, "lower-case get") { _ = try signer.presign(method: "get", key: "k", expires: 60, now: 0) }
        expectErrno(EINVAL, "empty key") { _ = try signer.presign(method: "GET", key: "", expires: 60, now: 0) }
        expectErrno(EINVAL, "negative time") { _ = try signer.presign(method: "GET", key: "k", expires: 60, now: -1) }
        expectErrno(EINVAL, "no scheme") { _ = try S3Presigner(bucket: "s3.example.com/bkt", accessKey: "a", secretKey: "s") }
        expectErrno(EINVAL, "no bucket") { _ = try S3Presigner(bucket: "http://localhost:9000", accessKey: "a", secretKey: "s") }
        expectErrno(EINVAL, "empty secret") { _ = try S3Presigner(bucket: "http://localhost:9000/b", accessKey: "a", secretKey: "") }
        expectErrno(EINVAL, "a file bucket") { _ = try S3Presigner(StoreConfig(storage: "file", bucket: "/tmp/b")) }
        #expect(!"\(signer)".contains("topsecret") && !String(reflecting: signer).contains("topsecret"))
    }
}
