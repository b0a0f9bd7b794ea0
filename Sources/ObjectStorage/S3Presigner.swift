import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// Pre-signed URLs for the objects of one S3 bucket: AWS Signature Version 4 with query-string
/// authentication, so that whoever holds a URL may `GET` or `PUT` that one object until it
/// expires, without holding the bucket's keys.
///
/// The URL is the one botocore's `generate_presigned_url` makes for the same inputs, byte for byte:
/// the object's URL (its key percent-encoded, `/` kept), then `X-Amz-Algorithm=AWS4-HMAC-SHA256`,
/// `X-Amz-Credential`, `X-Amz-Date`, `X-Amz-Expires`, `X-Amz-SignedHeaders=host` (in that order,
/// which is their sorted order) and `X-Amz-Signature`. Only the `Host` header is signed and the
/// payload is `UNSIGNED-PAYLOAD`: the holder of a `PUT` URL chooses the bytes, not the key.
public struct S3Presigner: Sendable, CustomStringConvertible {
    /// The longest validity SigV4 allows a pre-signed URL: seven days, in seconds.
    public static let maxExpires = 604_800

    let bucket: S3BucketURL
    let accessKey: String
    let secretKey: String
    /// The region the URLs are signed for.
    public let region: String

    /// A pre-signer for the bucket at `bucket` (`http(s)://host:port/bucket` or
    /// `http(s)://bucket.host:port`, as `--bucket` takes) with these keys; `region` defaults to
    /// `AWS_REGION`, else `us-east-1`, as for `S3ObjectStore`.
    public init(bucket: String, accessKey: String, secretKey: String, region: String? = nil) throws(FSError) {
        self.bucket = try S3BucketURL(bucket)
        guard !accessKey.isEmpty, !secretKey.isEmpty else {
            throw FSError.usage("S3 bucket \(self.bucket.base): pre-signing needs an access key and a secret key")
        }
        let region = region ?? defaultS3Region()
        guard !region.isEmpty, !region.contains("/") else { throw FSError.usage("invalid S3 region '\(region)'") }
        self.accessKey = accessKey
        self.secretKey = secretKey
        self.region = region
    }

    /// A pre-signer for the S3 bucket of `config`, its keys taken as `S3ObjectStore` takes them:
    /// from `config`, else from `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`.
    public init(_ config: StoreConfig, region: String? = nil) throws(FSError) {
        guard config.storage == "s3" else { throw FSError.usage("only an S3 bucket has pre-signed URLs (storage is '\(config.storage)')") }
        guard let keys = s3Credentials(config) else {
            throw FSError.usage("S3 bucket \(config.bucket): pre-signing needs an access key and a secret key")
        }
        try self.init(bucket: config.bucket, accessKey: keys.accessKey, secretKey: keys.secretKey, region: region)
    }

    /// Names the bucket and region, never the secret key.
    public var description: String { "S3 pre-signer for \(bucket.base) (region \(region))" }

    /// A URL that lets its holder `method` (`GET` or `PUT`) the object `key` from `now` (seconds
    /// since the epoch, UTC) for `expires` seconds (1 through `maxExpires`). A bad method, an empty
    /// key, an expiry out of bounds or a time outside years 1970–9999 is a usage error (`EINVAL`).
    public func presign(method: String, key: String, expires: Int, now: Int = Int(time(nil))) throws(FSError) -> String {
        guard method == "GET" || method == "PUT" else {
            throw FSError.usage("cannot pre-sign method '\(method)' (expected GET or PUT)")
        }
        guard !key.isEmpty else { throw FSError.usage("cannot pre-sign an empty object key") }
        guard (1...S3Presigner.maxExpires).contains(expires) else {
            throw FSError.usage("pre-signed URL expiry \(expires) s is out of bounds (1 to \(S3Presigner.maxExpires) s)")
        }
        let stamp = try S3Presigner.timestamp(now)
        let day = String(stamp.prefix(8))
        let scope = "\(day)/\(region)/s3/aws4_request"
        let params = [
            ("X-Amz-Algorithm", "AWS4-HMAC-SHA256"),
            ("X-Amz-Credential", "\(accessKey)/\(scope)"),
            ("X-Amz-Date", stamp),
            ("X-Amz-Expires", String(expires)),
            ("X-Amz-SignedHeaders", "host"),
        ]
        let query =
            params
            .map { (S3BucketURL.uriEncode($0.0, keepSlash: false), S3BucketURL.uriEncode($0.1, keepSlash: false)) }
            .sorted { $0.0 != $1.0 ? $0.0 < $1.0 : $0.1 < $1.1 }
            .map { "\($0.0)=\($0.1)" }
            .joined(separator: "&")
        // The canonical request: method, path, query, headers (each "name:value\n"), signed
        // header names, payload hash.
        let canonical = [method, bucket.objectPath(key), query, "host:\(bucket.host)\n", "host", "UNSIGNED-PAYLOAD"]
            .joined(separator: "\n")
        let toSign = ["AWS4-HMAC-SHA256", stamp, scope, Digest.hex(try Digest.sha256(Array(canonical.utf8)))]
            .joined(separator: "\n")
        var signingKey = Array("AWS4\(secretKey)".utf8)
        for part in [day, region, "s3", "aws4_request"] {
            signingKey = try Digest.hmacSHA256(key: signingKey, Array(part.utf8))
        }
        let signature = Digest.hex(try Digest.hmacSHA256(key: signingKey, Array(toSign.utf8)))
        return "\(bucket.objectURL(key))?\(query)&X-Amz-Signature=\(signature)"
    }

    /// `now` as SigV4's `YYYYMMDD'T'HHMMSS'Z'` (UTC).
    static func timestamp(_ now: Int) throws(FSError) -> String {
        // 253402300799 is 9999-12-31T23:59:59Z: the last second with a four-digit year.
        guard (0...253_402_300_799).contains(now) else { throw FSError.usage("cannot pre-sign for the time \(now) (seconds since the epoch)") }
        var t = time_t(now)
        var parts = tm()
        guard gmtime_r(&t, &parts) != nil else { throw FSError.usage("cannot pre-sign for the time \(now) (seconds since the epoch)") }
        func pad(_ n: Int32, _ width: Int) -> String {
            let s = String(n)
            return String(repeating: "0", count: max(0, width - s.count)) + s
        }
        return pad(parts.tm_year + 1900, 4) + pad(parts.tm_mon + 1, 2) + pad(parts.tm_mday, 2) + "T" + pad(parts.tm_hour, 2)
            + pad(parts.tm_min, 2) + pad(parts.tm_sec, 2) + "Z"
    }
}
