import CCurl
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// Process-wide libcurl set-up: `curl_global_init` once, SIGPIPE ignored.
private let curlReady: Bool = {
    signal(SIGPIPE, SIG_IGN)
    return curl_global_init(Int(CURL_GLOBAL_ALL)) == CURLE_OK
}()

/// State of one transfer, reached from libcurl's callbacks through an unretained pointer:
/// `perform` keeps the object alive (`withExtendedLifetime`) for the whole `curl_easy_perform`.
private final class Transfer {
    let handle: UnsafeMutableRawPointer
    var upload: UnsafeRawBufferPointer?
    var uploadPos = 0
    var dest: UnsafeMutableRawBufferPointer?
    var destPos = 0
    var body: [UInt8] = []

    init(handle: UnsafeMutableRawPointer) { self.handle = handle }
}

private func transferWrite(_ ptr: UnsafeMutablePointer<CChar>?, _ size: Int, _ count: Int, _ ctx: UnsafeMutableRawPointer?) -> Int {
    let t = Unmanaged<Transfer>.fromOpaque(ctx!).takeUnretainedValue()
    let n = size * count
    guard let ptr, n > 0 else { return n }
    var code = 0
    _ = ccurl_getinfo_long(t.handle, CURLINFO_RESPONSE_CODE, &code)
    if let dest = t.dest, code >= 200 && code < 300 {
        let room = dest.count - t.destPos
        let take = min(room, n)
        if take > 0 { (dest.baseAddress! + t.destPos).copyMemory(from: ptr, byteCount: take) }
        t.destPos += take
        return n
    }
    if t.body.count < 1 << 20 { t.body.append(contentsOf: UnsafeRawBufferPointer(start: ptr, count: n)) }
    return n
}

private func transferRead(_ ptr: UnsafeMutablePointer<CChar>?, _ size: Int, _ count: Int, _ ctx: UnsafeMutableRawPointer?) -> Int {
    let t = Unmanaged<Transfer>.fromOpaque(ctx!).takeUnretainedValue()
    guard let src = t.upload, let ptr else { return 0 }
    let n = min(size * count, src.count - t.uploadPos)
    if n > 0 { UnsafeMutableRawPointer(ptr).copyMemory(from: src.baseAddress! + t.uploadPos, byteCount: n) }
    t.uploadPos += n
    return n
}

/// An S3-compatible bucket through libcurl: SigV4 signing by curl (`CURLOPT_AWS_SIGV4`), keep-alive
/// handles reused from a pool, timeouts, and retries with back-off and jitter on 5xx, throttling
/// and connection errors.
public final class S3ObjectStore: ObjectStore, @unchecked Sendable {
    /// The bucket's URL, split (path style or virtual-host style).
    let bucket: S3BucketURL
    /// Base URL of the bucket, ending without a slash.
    var base: String { bucket.base }
    var endpoint: String { bucket.endpoint }
    let region: String
    let credentials: String?
    let config: StoreConfig
    private let lock = ConditionLock()
    private var idle: [UnsafeMutableRawPointer] = []
    public let description: String

    public init(_ config: StoreConfig) throws(FSError) {
        _ = curlReady
        self.config = config
        bucket = try S3BucketURL(config.bucket)
        region = defaultS3Region()
        credentials = s3Credentials(config).map { "\($0.accessKey):\($0.secretKey)" }
        description = "S3 bucket \(bucket.base)"
    }

    deinit {
        for h in idle { curl_easy_cleanup(h) }
    }

    private func takeHandle() throws(FSError) -> UnsafeMutableRawPointer {
        if let h = lock.withLock({ idle.popLast() }) {
            curl_easy_reset(h)
            return h
        }
        guard let h = curl_easy_init() else { throw FSError(ENOMEM, "\(description): curl_easy_init failed") }
        return h
    }

    private func giveBack(_ h: UnsafeMutableRawPointer) {
        lock.withLock { idle.append(h) }
    }

    struct Response {
        var status: Int
        var body: [UInt8]
        var received: Int
        var contentLength: Int
    }

    /// One HTTP exchange with retries. `dest` receives a 2xx body; other bodies are kept for messages.
    ///
    /// `presigned`: the URL carries its own signature (`S3Presigner`): nothing is signed here.
    private func request(
        _ method: String, url: String, headers: [String] = [], upload: UnsafeRawBufferPointer? = nil,
        dest: UnsafeMutableRawBufferPointer? = nil, what: String, presigned: Bool = false
    ) throws(FSError) -> Response {
        var attempt = 0
        while true {
            attempt += 1
            let h = try takeHandle()
            let t = Transfer(handle: h)
            t.upload = upload
            t.dest = dest
            var list: UnsafeMutablePointer<curl_slist>?
            for hd in headers + (presigned ? [] : ["x-amz-content-sha256: UNSIGNED-PAYLOAD"]) { list = curl_slist_append(list, hd) }
            let ctx = Unmanaged.passUnretained(t).toOpaque()
            _ = ccurl_setopt_string(h, CURLOPT_URL, url)
            _ = ccurl_setopt_long(h, CURLOPT_NOSIGNAL, 1)
            _ = ccurl_setopt_long(h, CURLOPT_EXPECT_100_TIMEOUT_MS, 0)
            if getenv("STAGEFS_CURL_VERBOSE") != nil { _ = ccurl_setopt_long(h, CURLOPT_VERBOSE, 1) }
            _ = ccurl_setopt_long(h, CURLOPT_CONNECTTIMEOUT_MS, Int(min(config.timeout, 10) * 1000))
            _ = ccurl_setopt_long(h, CURLOPT_TIMEOUT_MS, Int(config.timeout * 1000))
            _ = ccurl_setopt_slist(h, CURLOPT_HTTPHEADER, list)
            _ = ccurl_setopt_datafn(h, CURLOPT_WRITEFUNCTION, transferWrite)
            _ = ccurl_setopt_ptr(h, CURLOPT_WRITEDATA, ctx)
            if let credentials, !presigned {
                _ = ccurl_setopt_string(h, CURLOPT_AWS_SIGV4, "aws:amz:\(region):s3")
                _ = ccurl_setopt_string(h, CURLOPT_USERPWD, credentials)
            }
            switch method {
            case "PUT":
                _ = ccurl_setopt_long(h, CURLOPT_UPLOAD, 1)
                _ = ccurl_setopt_datafn(h, CURLOPT_READFUNCTION, transferRead)
                _ = ccurl_setopt_ptr(h, CURLOPT_READDATA, ctx)
                _ = ccurl_setopt_off(h, CURLOPT_INFILESIZE_LARGE, curl_off_t(upload?.count ?? 0))
            case "HEAD":
                _ = ccurl_setopt_long(h, CURLOPT_NOBODY, 1)
            case "GET":
                break
            default:
                _ = ccurl_setopt_string(h, CURLOPT_CUSTOMREQUEST, method)
            }
            let rc = withExtendedLifetime(t) { curl_easy_perform(h) }
            curl_slist_free_all(list)
            var code = 0
            _ = ccurl_getinfo_long(h, CURLINFO_RESPONSE_CODE, &code)
            var length: curl_off_t = -1
            _ = ccurl_getinfo_off(h, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &length)
            giveBack(h)
            if rc != CURLE_OK {
                let msg = String(cString: curl_easy_strerror(rc)).lowercased()
                if attempt < config.maxAttempts {
                    Log.warning("\(description): \(what): \(msg); retrying (attempt \(attempt + 1) of \(config.maxAttempts))")
                    Sys.sleep(seconds: backoffDelay(attempt: attempt))
                    continue
                }
                let reach = rc == CURLE_COULDNT_CONNECT || rc == CURLE_COULDNT_RESOLVE_HOST ? "cannot reach" : "request failed:"
                throw FSError(EIO, "\(description): \(what): \(reach) \(endpoint): \(msg)")
            }
            if (code >= 500 || code == 429) && attempt < config.maxAttempts {
                Log.warning("\(description): \(what): HTTP \(code); retrying (attempt \(attempt + 1) of \(config.maxAttempts))")
                Sys.sleep(seconds: backoffDelay(attempt: attempt))
                continue
            }
            return Response(status: code, body: t.body, received: t.destPos, contentLength: Int(length))
        }
    }

    /// An FSError for a non-2xx answer, naming the S3 error code and message.
    private func failure(_ r: Response, _ what: String) -> FSError {
        let text = String(decoding: r.body, as: UTF8.self)
        let code = xmlValue(text, "Code") ?? "HTTP \(r.status)"
        let message = xmlValue(text, "Message").map { ": \($0)" } ?? ""
        switch r.status {
        case 403:
            return FSError(EACCES, "\(description): \(what): access denied (\(code)\(message)); check the access key and secret key")
        case 404:
            if code == "NoSuchBucket" { return FSError(ENOENT, "\(description) does not exist (NoSuchBucket)") }
            return FSError(ENOENT, "\(description): \(what): not found (\(code))")
        default:
            return FSError(EIO, "\(description): \(what): \(code)\(message)")
        }
    }

    public func create() throws(FSError) {
        let r = try request("PUT", url: base, upload: UnsafeRawBufferPointer(start: nil, count: 0), what: "create bucket")
        if r.status / 100 == 2 { return }
        let code = xmlValue(String(decoding: r.body, as: UTF8.self), "Code")
        if code == "BucketAlreadyOwnedByYou" || code == "BucketAlreadyExists" { return }
        throw failure(r, "create bucket")
    }

    public func put(_ key: String, _ data: UnsafeRawBufferPointer) throws(FSError) {
        let r = try request("PUT", url: bucket.objectURL(key), upload: data, what: "put \(key)")
        if r.status / 100 != 2 { throw failure(r, "put \(key)") }
    }

    public func get(_ key: String, offset: Int, into buffer: UnsafeMutableRawBufferPointer) throws(FSError) -> Int {
        if buffer.count == 0 { return 0 }
        let range = "Range: bytes=\(offset)-\(offset + buffer.count - 1)"
        let r = try request("GET", url: bucket.objectURL(key), headers: [range], dest: buffer, what: "get \(key)")
        if r.status == 416 { return 0 }
        if r.status / 100 != 2 { throw failure(r, "get \(key)") }
        return r.received
    }

    /// Reads from a pre-signed GET URL of `key` (no keys needed here): as `get`.
    package func get(presigned url: String, key: String, offset: Int, into buffer: UnsafeMutableRawBufferPointer) throws(FSError) -> Int {
        if buffer.count == 0 { return 0 }
        let range = "Range: bytes=\(offset)-\(offset + buffer.count - 1)"
        let r = try request("GET", url: url, headers: [range], dest: buffer, what: "get \(key)", presigned: true)
        if r.status == 416 { return 0 }
        if r.status / 100 != 2 { throw failure(r, "get \(key)") }
        return r.received
    }

    public func delete(_ key: String) throws(FSError) {
        let r = try request("DELETE", url: bucket.objectURL(key), what: "delete \(key)")
        if r.status / 100 != 2 && r.status != 404 { throw failure(r, "delete \(key)") }
    }

    public func head(_ key: String) throws(FSError) -> Int? {
        let r = try request("HEAD", url: bucket.objectURL(key), what: "head \(key)")
        if r.status == 404 { return nil }
        if r.status / 100 != 2 { throw failure(r, "head \(key)") }
        return r.contentLength
    }

    public func list(prefix: String, after: String?, limit: Int) throws(FSError) -> [ObjectInfo] {
        var out: [ObjectInfo] = []
        var token: String?
        repeat {
            var url = "\(base)?list-type=2&max-keys=\(min(1000, limit - out.count))&prefix=\(S3BucketURL.uriEncode(prefix, keepSlash: false))"
            if let token {
                url += "&continuation-token=\(S3BucketURL.uriEncode(token, keepSlash: false))"
            } else if let after {
                url += "&start-after=\(S3BucketURL.uriEncode(after, keepSlash: false))"
            }
            let r = try request("GET", url: url, what: "list \(prefix)")
            if r.status / 100 != 2 { throw failure(r, "list \(prefix)") }
            let text = String(decoding: r.body, as: UTF8.self)
            for item in xmlBlocks(text, "Contents") {
                if let k = xmlValue(item, "Key"), let s = xmlValue(item, "Size").flatMap({ Int($0) }) {
                    out.append(ObjectInfo(key: k, size: s, modified: xmlValue(item, "LastModified").flatMap(iso8601Seconds)))
                }
            }
            token = xmlValue(text, "IsTruncated") == "true" ? xmlValue(text, "NextContinuationToken") : nil
        } while token != nil && out.count < limit
        return out
    }
}

/// Seconds since the epoch of an S3 time (`2026-12-06T18:04:03.000Z`); nil when malformed.
func iso8601Seconds(_ s: String) -> Int64? {
    let b = Array(s.utf8)
    guard b.count >= 19, b[4] == UInt8(ascii: "-"), b[10] == UInt8(ascii: "T") else { return nil }
    func num(_ r: Range<Int>) -> Int32? { Int32(String(decoding: b[r], as: UTF8.self)) }
    guard let y = num(0..<4), let mo = num(5..<7), let d = num(8..<10), let h = num(11..<13), let mi = num(14..<16), let sec = num(17..<19),
        let u = UTCTime(year: y, month: mo, day: d, hour: h, minute: mi, second: sec)
    else { return nil }
    return u.seconds
}

/// The unescaped text of the first `<tag>...</tag>` in `xml`.
func xmlValue(_ xml: String, _ tag: String) -> String? {
    guard let open = xml.firstRange(of: "<\(tag)>"), let close = xml[open.upperBound...].firstRange(of: "</\(tag)>") else { return nil }
    return xmlUnescape(String(xml[open.upperBound..<close.lowerBound]))
}

/// The contents of every `<tag>...</tag>` block in `xml`.
func xmlBlocks(_ xml: String, _ tag: String) -> [String] {
    var out: [String] = []
    var rest = xml[...]
    while let open = rest.firstRange(of: "<\(tag)>"), let close = rest[open.upperBound...].firstRange(of: "</\(tag)>") {
        out.append(String(rest[open.upperBound..<close.lowerBound]))
        rest = rest[close.upperBound...]
    }
    return out
}

func xmlUnescape(_ s: String) -> String {
    guard s.contains("&") else { return s }
    var out = s
    for (ent, ch) in [("&lt;", "<"), ("&gt;", ">"), ("&quot;", "\""), ("&apos;", "'"), ("&#39;", "'"), ("&amp;", "&")] {
        out = out.replacing(ent, with: ch)
    }
    return out
}
