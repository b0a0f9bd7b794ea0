import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// An S3 bucket URL split into what requests and signatures need. Two forms:
/// path style, `http(s)://host:port/bucket`, and virtual-host style, `http(s)://bucket.host:port`.
struct S3BucketURL: Sendable, Equatable {
    /// `http` or `https`.
    let scheme: String
    /// The bucket's URL as written, without a trailing slash; an object's URL is this, `/`, the key.
    let base: String
    /// The bucket's name.
    let name: String
    /// The service without the bucket (`scheme://host:port`), for messages.
    let endpoint: String
    /// The `Host` header a request to `base` carries, as SigV4 signs it: the host and port of
    /// `base` in lower case, without the port when it is the scheme's default (80, 443).
    let host: String
    /// The bucket's part of an object's path: `/bucket` in path style, empty in virtual-host style.
    let pathPrefix: String

    /// Parses `url`; a malformed URL is a usage error naming it.
    init(_ url: String) throws(FSError) {
        let expected = "expected http(s)://host:port/bucket or http(s)://bucket.host:port"
        guard let schemeEnd = url.firstRange(of: "://"), url.hasPrefix("http://") || url.hasPrefix("https://") else {
            throw FSError.usage("malformed S3 bucket URL '\(url)' (\(expected))")
        }
        scheme = String(url[..<schemeEnd.lowerBound])
        var rest = String(url[schemeEnd.upperBound...])
        while rest.hasSuffix("/") { rest.removeLast() }
        let authority: String
        if let slash = rest.firstIndex(of: "/") {
            // Path style: http://host:port/bucket
            authority = String(rest[..<slash])
            name = String(rest[rest.index(after: slash)...])
            guard !authority.isEmpty, !name.isEmpty, !name.contains("/") else {
                throw FSError.usage("malformed S3 bucket URL '\(url)' (\(expected))")
            }
            endpoint = "\(scheme)://\(authority)"
            base = "\(endpoint)/\(name)"
            pathPrefix = "/\(name)"
        } else {
            // Virtual-host style: http://bucket.host:port
            guard let dot = rest.firstIndex(of: "."), dot != rest.startIndex, rest.index(after: dot) != rest.endIndex else {
                throw FSError.usage("malformed S3 bucket URL '\(url)': no bucket name (\(expected))")
            }
            authority = rest
            name = String(rest[..<dot])
            endpoint = "\(scheme)://\(rest[rest.index(after: dot)...])"
            base = "\(scheme)://\(rest)"
            pathPrefix = ""
        }
        host = S3BucketURL.hostHeader(authority: authority, scheme: scheme)
    }

    /// `host[:port]` in lower case, the port left out when it is the scheme's default.
    private static func hostHeader(authority: String, scheme: String) -> String {
        let lower = authority.lowercased()
        // The port follows the last colon, unless that colon is inside an IPv6 literal ("[::1]").
        guard let colon = lower.lastIndex(of: ":"), !lower[colon...].contains("]") else { return lower }
        let digits = lower[lower.index(after: colon)...]
        guard let port = Int(digits) else { return lower }
        let defaultPort = scheme == "https" ? 443 : 80
        return port == defaultPort ? String(lower[..<colon]) : lower
    }

    /// The URL of the object `key`.
    func objectURL(_ key: String) -> String { "\(base)/\(S3BucketURL.uriEncode(key))" }

    /// The path of the object `key` as SigV4's canonical request names it (the path of `objectURL`).
    func objectPath(_ key: String) -> String { "\(pathPrefix)/\(S3BucketURL.uriEncode(key))" }

    /// Percent-encodes `text` as SigV4 asks: the unreserved characters `A-Z a-z 0-9 - . _ ~`
    /// stay, every other byte of its UTF-8 becomes `%XX` (upper-case hex); `/` stays too unless
    /// `keepSlash` is false (a query value).
    static func uriEncode(_ text: String, keepSlash: Bool = true) -> String {
        let hex = Array("0123456789ABCDEF".utf8)
        var out: [UInt8] = []
        out.reserveCapacity(text.utf8.count)
        for b in text.utf8 {
            switch b {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
                UInt8(ascii: "-"), UInt8(ascii: "_"), UInt8(ascii: "."), UInt8(ascii: "~"):
                out.append(b)
            case UInt8(ascii: "/") where keepSlash:
                out.append(b)
            default:
                out += [UInt8(ascii: "%"), hex[Int(b >> 4)], hex[Int(b & 15)]]
            }
        }
        return String(decoding: out, as: UTF8.self)
    }
}

/// The region S3 requests are signed for when none is given: `AWS_REGION`, else `us-east-1`.
func defaultS3Region() -> String {
    getenv("AWS_REGION").map { String(cString: $0) } ?? "us-east-1"
}

/// The access key and secret key of `config`, each from the environment (`AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`) when the config has none; nil unless both are known.
func s3Credentials(_ config: StoreConfig) -> (accessKey: String, secretKey: String)? {
    let key = config.accessKey ?? getenv("AWS_ACCESS_KEY_ID").map { String(cString: $0) }
    let secret = config.secretKey ?? getenv("AWS_SECRET_ACCESS_KEY").map { String(cString: $0) }
    guard let key, let secret else { return nil }
    return (key, secret)
}
