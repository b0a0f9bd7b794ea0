#if canImport(Glibc)
    import Glibc
#endif

/// A JSON value as `JSONReader` parses it. Integers stay exact (`int`, `uint`: inode numbers
/// and slice ids do not fit a double); other numbers are `double`.
public enum JSONValue: Sendable, Equatable {
    case null
    case bool(Bool)
    case int(Int64)
    case uint(UInt64)
    case double(Double)
    case string(String)
    case array([JSONValue])
    /// Members in the order written (a key may repeat; `self[key]` finds the first).
    case object([(String, JSONValue)])

    public static func == (a: JSONValue, b: JSONValue) -> Bool {
        switch (a, b) {
        case (.null, .null): return true
        case (.bool(let x), .bool(let y)): return x == y
        case (.int(let x), .int(let y)): return x == y
        case (.uint(let x), .uint(let y)): return x == y
        case (.double(let x), .double(let y)): return x == y
        case (.string(let x), .string(let y)): return x == y
        case (.array(let x), .array(let y)): return x == y
        case (.object(let x), .object(let y)): return x.count == y.count && zip(x, y).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
        default: return false
        }
    }

    /// The member `key` of an object (nil for other values or a missing key).
    public subscript(_ key: String) -> JSONValue? {
        guard case .object(let members) = self else { return nil }
        return members.first { $0.0 == key }?.1
    }

    /// Element `i` of an array (nil out of range or for other values).
    public subscript(_ i: Int) -> JSONValue? {
        guard case .array(let a) = self, i >= 0, i < a.count else { return nil }
        return a[i]
    }

    public var array: [JSONValue]? {
        if case .array(let a) = self { return a }
        return nil
    }

    public var string: String? {
        if case .string(let s) = self { return s }
        return nil
    }

    public var bool: Bool? {
        if case .bool(let b) = self { return b }
        return nil
    }

    /// A non-negative integer (nil for anything else).
    public var uint64: UInt64? {
        switch self {
        case .uint(let v): return v
        case .int(let v): return v >= 0 ? UInt64(v) : nil
        default: return nil
        }
    }

    /// An integer that fits an `Int64` (nil for anything else).
    public var int64: Int64? {
        switch self {
        case .int(let v): return v
        case .uint(let v): return v <= UInt64(Int64.max) ? Int64(v) : nil
        default: return nil
        }
    }
}

/// Appends JSON text to a byte buffer; the caller writes the structure.
public enum JSONText {
    /// `s` as a JSON string (quotes and escapes).
    public static func string(_ s: String, into out: inout [UInt8]) {
        escaped(s.utf8, into: &out)
    }

    /// `bytes`, which must be valid UTF-8, as a JSON string.
    public static func escaped<C: Collection<UInt8>>(_ bytes: C, into out: inout [UInt8]) {
        let hex: [UInt8] = Array("0123456789abcdef".utf8)
        out.append(UInt8(ascii: "\""))
        for b in bytes {
            switch b {
            case UInt8(ascii: "\""): out.append(contentsOf: [92, 34])
            case UInt8(ascii: "\\"): out.append(contentsOf: [92, 92])
            case 10: out.append(contentsOf: [92, UInt8(ascii: "n")])
            case 13: out.append(contentsOf: [92, UInt8(ascii: "r")])
            case 9: out.append(contentsOf: [92, UInt8(ascii: "t")])
            case 0..<32, 127:
                out.append(contentsOf: [92, UInt8(ascii: "u"), 48, 48, hex[Int(b >> 4)], hex[Int(b & 15)]])
            default: out.append(b)
            }
        }
        out.append(UInt8(ascii: "\""))
    }

    /// Bytes as a JSON string when they are UTF-8, else as `{"b64":"..."}` (file names,
    /// link targets and attribute values are bytes, not text). `JSONValue.bytes` reads both.
    public static func bytes(_ b: [UInt8], into out: inout [UInt8]) {
        if validUTF8(b) {
            escaped(b, into: &out)
        } else {
            out.append(contentsOf: Array("{\"b64\":\"".utf8))
            out.append(contentsOf: Base64.encode(b))
            out.append(contentsOf: Array("\"}".utf8))
        }
    }

    /// `v` as JSON text (objects' members in their order).
    public static func value(_ v: JSONValue, into out: inout [UInt8]) {
        switch v {
        case .null: out.append(contentsOf: Array("null".utf8))
        case .bool(let b): out.append(contentsOf: Array((b ? "true" : "false").utf8))
        case .int(let i): number(i, into: &out)
        case .uint(let u): number(u, into: &out)
        case .double(let d): out.append(contentsOf: Array((d.isFinite ? "\(d)" : "null").utf8))
        case .string(let s): string(s, into: &out)
        case .array(let a):
            out.append(UInt8(ascii: "["))
            for (i, e) in a.enumerated() {
                if i > 0 { out.append(UInt8(ascii: ",")) }
                value(e, into: &out)
            }
            out.append(UInt8(ascii: "]"))
        case .object(let m):
            out.append(UInt8(ascii: "{"))
            for (i, (k, e)) in m.enumerated() {
                if i > 0 { out.append(UInt8(ascii: ",")) }
                string(k, into: &out)
                out.append(UInt8(ascii: ":"))
                value(e, into: &out)
            }
            out.append(UInt8(ascii: "}"))
        }
    }

    public static func number<T: BinaryInteger>(_ v: T, into out: inout [UInt8]) {
        out.append(contentsOf: Array(String(v).utf8))
    }

    public static func raw(_ s: StaticString, into out: inout [UInt8]) {
        s.withUTF8Buffer { out.append(contentsOf: $0) }
    }

    public static func validUTF8(_ b: [UInt8]) -> Bool {
        var it = b.makeIterator()
        var decoder = UTF8()
        while true {
            switch decoder.decode(&it) {
            case .scalarValue: continue
            case .emptyInput: return true
            case .error: return false
            }
        }
    }
}

extension JSONValue {
    /// Bytes written by `JSONText.bytes`: a string's UTF-8, or a `{"b64":...}` object decoded.
    public var bytes: [UInt8]? {
        switch self {
        case .string(let s): return Array(s.utf8)
        case .object:
            guard let t = self["b64"]?.string else { return nil }
            return Base64.decode(t)
        default: return nil
        }
    }
}

/// Standard base64 (RFC 4648, with padding).
public enum Base64 {
    static let alphabet: [UInt8] = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)

    public static func encode(_ b: [UInt8]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity((b.count + 2) / 3 * 4)
        var i = 0
        while i + 3 <= b.count {
            let v = UInt32(b[i]) << 16 | UInt32(b[i + 1]) << 8 | UInt32(b[i + 2])
            out += [alphabet[Int(v >> 18)], alphabet[Int(v >> 12 & 63)], alphabet[Int(v >> 6 & 63)], alphabet[Int(v & 63)]]
            i += 3
        }
        let left = b.count - i
        if left == 1 {
            let v = UInt32(b[i]) << 16
            out += [alphabet[Int(v >> 18)], alphabet[Int(v >> 12 & 63)], 61, 61]
        } else if left == 2 {
            let v = UInt32(b[i]) << 16 | UInt32(b[i + 1]) << 8
            out += [alphabet[Int(v >> 18)], alphabet[Int(v >> 12 & 63)], alphabet[Int(v >> 6 & 63)], 61]
        }
        return out
    }

    /// nil when `s` is not base64.
    public static func decode(_ s: String) -> [UInt8]? {
        var out: [UInt8] = []
        var acc: UInt32 = 0
        var bits = 0
        var pad = 0
        for c in s.utf8 {
            let v: UInt32
            switch c {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"): v = UInt32(c - 65)
            case UInt8(ascii: "a")...UInt8(ascii: "z"): v = UInt32(c - 97 + 26)
            case UInt8(ascii: "0")...UInt8(ascii: "9"): v = UInt32(c - 48 + 52)
            case UInt8(ascii: "+"): v = 62
            case UInt8(ascii: "/"): v = 63
            case UInt8(ascii: "="):
                pad += 1
                continue
            default: return nil
            }
            if pad > 0 { return nil }
            acc = acc << 6 | v
            bits += 6
            if bits >= 8 {
                bits -= 8
                out.append(UInt8(truncatingIfNeeded: acc >> UInt32(bits)))
            }
        }
        return pad <= 2 ? out : nil
    }
}

/// A pull parser of JSON text from a `ByteSource`, in bounded memory: the caller walks the
/// outer structure (`beginObject`/`nextKey`, `beginArray`/`nextElement`) and parses the
/// values inside whole (`value()`), each at most `maxValueBytes` of text and `maxDepth`
/// levels deep: a larger one is an error, never an allocation that grows with the input.
public final class JSONReader {
    let source: ByteSource
    var buffer = [UInt8](repeating: 0, count: 1 << 16)
    var at = 0
    var end = 0
    var ended = false
    /// Bytes consumed before the buffer's start (for error positions).
    var consumed: Int64 = 0
    public let maxValueBytes: Int
    public let maxDepth: Int
    /// Bytes the value being parsed may still take.
    var budget = Int.max
    /// Whether the container just begun had a first element or member yet.
    var first: [Bool] = []

    public init(_ source: ByteSource, maxValueBytes: Int = 64 << 20, maxDepth: Int = 64) {
        self.source = source
        self.maxValueBytes = maxValueBytes
        self.maxDepth = maxDepth
    }

    /// Where the reader is, in bytes from the start (for messages).
    public var offset: Int64 { consumed + Int64(at) }

    func fail(_ what: String) -> FSError {
        FSError(EINVAL, "not valid JSON at byte \(offset): \(what)")
    }

    @inline(__always)
    func peek() throws(FSError) -> UInt8? {
        if at == end {
            if ended { return nil }
            consumed += Int64(end)
            at = 0
            end = try buffer.withUnsafeMutableBufferPointer { (b) throws(FSError) -> Int in try source.read(into: UnsafeMutableRawBufferPointer(b)) }
            if end == 0 {
                ended = true
                return nil
            }
        }
        return buffer[at]
    }

    @inline(__always)
    func take() throws(FSError) -> UInt8 {
        guard let c = try peek() else { throw fail("the text ends early") }
        at += 1
        budget -= 1
        if budget < 0 { throw FSError(EFBIG, "a JSON value at byte \(offset) is larger than \(maxValueBytes) bytes") }
        return c
    }

    func skipSpace() throws(FSError) {
        while let c = try peek(), c == 32 || c == 10 || c == 13 || c == 9 { at += 1 }
    }

    func expect(_ c: UInt8) throws(FSError) {
        try skipSpace()
        let got = try take()
        if got != c { throw fail("expected '\(Character(Unicode.Scalar(c)))', found '\(Character(Unicode.Scalar(got)))'") }
    }

    /// Reads `{` of an object whose members the caller takes with `nextKey`.
    public func beginObject() throws(FSError) {
        budget = Int.max
        try expect(UInt8(ascii: "{"))
        first.append(true)
    }

    /// The next member's key (its value is next: `value()`, or a nested `begin...`), or nil
    /// at the object's `}`.
    public func nextKey() throws(FSError) -> String? {
        budget = Int.max
        try skipSpace()
        if try peek() == UInt8(ascii: "}") {
            at += 1
            first.removeLast()
            return nil
        }
        if first.last == false { try expect(UInt8(ascii: ",")) }
        first[first.count - 1] = false
        try skipSpace()
        budget = maxValueBytes
        guard try take() == UInt8(ascii: "\"") else { throw fail("expected a key") }
        let key = try stringBody()
        try expect(UInt8(ascii: ":"))
        return key
    }

    /// Reads `[` of an array whose elements the caller takes with `nextElement`.
    public func beginArray() throws(FSError) {
        budget = Int.max
        try expect(UInt8(ascii: "["))
        first.append(true)
    }

    /// Whether another element follows (then it is next), false at the array's `]`.
    public func nextElement() throws(FSError) -> Bool {
        budget = Int.max
        try skipSpace()
        if try peek() == UInt8(ascii: "]") {
            at += 1
            first.removeLast()
            return false
        }
        if first.last == false { try expect(UInt8(ascii: ",")) }
        first[first.count - 1] = false
        return true
    }

    /// The next value, whole.
    public func value() throws(FSError) -> JSONValue {
        budget = maxValueBytes
        let v = try parse(depth: 0)
        budget = Int.max
        return v
    }

    /// Skips the next value whole, in bounded memory however large it is (objects and arrays
    /// are walked, not kept; a string or number still has the value limit).
    public func skipValue(depth: Int = 0) throws(FSError) {
        if depth > 4096 { throw fail("nested deeper than 4096 levels") }
        try skipSpace()
        switch try peek() {
        case UInt8(ascii: "{"):
            try beginObject()
            while try nextKey() != nil { try skipValue(depth: depth + 1) }
        case UInt8(ascii: "["):
            try beginArray()
            while try nextElement() { try skipValue(depth: depth + 1) }
        default:
            _ = try value()
        }
    }

    /// Whether the next value is an object (without reading it).
    public func nextIsObject() throws(FSError) -> Bool {
        try skipSpace()
        return try peek() == UInt8(ascii: "{")
    }

    /// Whether only white space is left.
    public func atEnd() throws(FSError) -> Bool {
        try skipSpace()
        return try peek() == nil
    }

    func parse(depth: Int) throws(FSError) -> JSONValue {
        if depth > maxDepth { throw fail("nested deeper than \(maxDepth) levels") }
        try skipSpace()
        let c = try take()
        switch c {
        case UInt8(ascii: "{"):
            var members: [(String, JSONValue)] = []
            try skipSpace()
            if try peek() == UInt8(ascii: "}") {
                at += 1
                return .object(members)
            }
            while true {
                try expect(UInt8(ascii: "\""))
                let k = try stringBody()
                try expect(UInt8(ascii: ":"))
                members.append((k, try parse(depth: depth + 1)))
                try skipSpace()
                let d = try take()
                if d == UInt8(ascii: "}") { return .object(members) }
                if d != UInt8(ascii: ",") { throw fail("expected ',' or '}' in an object") }
            }
        case UInt8(ascii: "["):
            var items: [JSONValue] = []
            try skipSpace()
            if try peek() == UInt8(ascii: "]") {
                at += 1
                return .array(items)
            }
            while true {
                items.append(try parse(depth: depth + 1))
                try skipSpace()
                let d = try take()
                if d == UInt8(ascii: "]") { return .array(items) }
                if d != UInt8(ascii: ",") { throw fail("expected ',' or ']' in an array") }
            }
        case UInt8(ascii: "\""): return .string(try stringBody())
        case UInt8(ascii: "t"):
            try word("rue")
            return .bool(true)
        case UInt8(ascii: "f"):
            try word("alse")
            return .bool(false)
        case UInt8(ascii: "n"):
            try word("ull")
            return .null
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return try number(c)
        default: throw fail("unexpected '\(Character(Unicode.Scalar(c)))'")
        }
    }

    func word(_ rest: String) throws(FSError) {
        for b in rest.utf8 where try take() != b { throw fail("an unknown word") }
    }

    func number(_ firstByte: UInt8) throws(FSError) -> JSONValue {
        var text: [UInt8] = [firstByte]
        var integral = true
        while let c = try peek() {
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): break
            case UInt8(ascii: "."), UInt8(ascii: "e"), UInt8(ascii: "E"), UInt8(ascii: "+"), UInt8(ascii: "-"): integral = false
            default:
                return try finishNumber(text, integral: integral)
            }
            text.append(try take())
            if text.count > 64 { throw fail("a number longer than 64 characters") }
        }
        return try finishNumber(text, integral: integral)
    }

    func finishNumber(_ text: [UInt8], integral: Bool) throws(FSError) -> JSONValue {
        let s = String(decoding: text, as: UTF8.self)
        if integral {
            if text.first == UInt8(ascii: "-") {
                if let v = Int64(s) { return .int(v) }
            } else if let v = UInt64(s) {
                return v <= UInt64(Int64.max) ? .int(Int64(v)) : .uint(v)
            }
        }
        guard let d = Double(s) else { throw fail("a malformed number '\(s)'") }
        return .double(d)
    }

    /// A string's text after its opening quote, escapes decoded. Invalid UTF-8 and lone
    /// surrogates are errors.
    func stringBody() throws(FSError) -> String {
        var out: [UInt8] = []
        while true {
            let c = try take()
            if c == UInt8(ascii: "\"") { break }
            if c < 32 { throw fail("a control character in a string") }
            if c != UInt8(ascii: "\\") {
                out.append(c)
                continue
            }
            let e = try take()
            switch e {
            case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"): out.append(e)
            case UInt8(ascii: "b"): out.append(8)
            case UInt8(ascii: "f"): out.append(12)
            case UInt8(ascii: "n"): out.append(10)
            case UInt8(ascii: "r"): out.append(13)
            case UInt8(ascii: "t"): out.append(9)
            case UInt8(ascii: "u"):
                var scalar = try hex4()
                if scalar >= 0xD800 && scalar < 0xDC00 {
                    guard try take() == UInt8(ascii: "\\"), try take() == UInt8(ascii: "u") else { throw fail("a lone surrogate in a string") }
                    let low = try hex4()
                    guard low >= 0xDC00 && low < 0xE000 else { throw fail("a lone surrogate in a string") }
                    scalar = 0x10000 + ((scalar - 0xD800) << 10) + (low - 0xDC00)
                } else if scalar >= 0xDC00 && scalar < 0xE000 {
                    throw fail("a lone surrogate in a string")
                }
                guard let u = Unicode.Scalar(scalar) else { throw fail("a bad \\u escape") }
                out.append(contentsOf: Array(String(Character(u)).utf8))
            default: throw fail("a bad escape in a string")
            }
        }
        guard JSONText.validUTF8(out) else { throw fail("a string that is not UTF-8") }
        return String(decoding: out, as: UTF8.self)
    }

    func hex4() throws(FSError) -> UInt32 {
        var v: UInt32 = 0
        for _ in 0..<4 {
            let c = try take()
            let d: UInt32
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): d = UInt32(c - 48)
            case UInt8(ascii: "a")...UInt8(ascii: "f"): d = UInt32(c - 87)
            case UInt8(ascii: "A")...UInt8(ascii: "F"): d = UInt32(c - 55)
            default: throw fail("a bad \\u escape")
            }
            v = v << 4 | d
        }
        return v
    }
}
