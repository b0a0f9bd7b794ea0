import Compress
import Metadata
import StageFSCore
import Testing

@testable import Metadata

#if canImport(Glibc)
    import Glibc
#endif

private let alice = Credential(uid: 1000, gid: 1000, groups: [1000])
private let bob = Credential(uid: 1001, gid: 1001, groups: [1001])
private func n(_ s: String) -> [UInt8] { Array(s.utf8) }

private func parse(_ text: String, maxValueBytes: Int = 1 << 20) throws -> JSONValue {
    try JSONReader(BytesSource(Array(text.utf8)), maxValueBytes: maxValueBytes).value()
}

private func expectEINVAL(_ text: String, _ code: Int32 = EINVAL, sourceLocation: SourceLocation = #_sourceLocation, maxValueBytes: Int = 1 << 20) {
    do {
        _ = try parse(text, maxValueBytes: maxValueBytes)
        Issue.record("parsed \(text)", sourceLocation: sourceLocation)
    } catch {
        #expect((error as? FSError)?.code == code, sourceLocation: sourceLocation)
    }
}

/// The JSON reader and the compression streams that dumps go through, and `dump`/`load` from
/// one engine to the other (`Dump.swift`, `Load.swift`).
@Suite("Dump and load", .timeLimit(.minutes(3)))
struct DumpTests {
    @Test func theReaderParsesJSONExactlyAndRefusesWhatIsNot() throws {
        let v = try parse(#" {"a": [1, -2, 18446744073709551615, 2.5e3, true, false, null], "s": "q\"\\\/\n\u00e9\ud83d\ude00", "o": {}} "#)
        #expect(v["a"]?[0] == .int(1))
        #expect(v["a"]?[1] == .int(-2))
        #expect(v["a"]?[2]?.uint64 == UInt64.max)
        #expect(v["a"]?[3] == .double(2500))
        #expect(v["a"]?[4] == .bool(true) && v["a"]?[6] == .null)
        #expect(v["s"]?.string == "q\"\\/\né😀")
        #expect(v["o"] == .object([]))
        // Bytes that are not UTF-8 go as base64 and come back.
        var out: [UInt8] = []
        JSONText.bytes([0x66, 0xff, 0x00, 0x0a], into: &out)
        #expect(try parse(String(decoding: out, as: UTF8.self)).bytes == [0x66, 0xff, 0x00, 0x0a])
        out = []
        JSONText.bytes(n("tab\there \"q\" \u{1}"), into: &out)
        #expect(try parse(String(decoding: out, as: UTF8.self)).bytes == n("tab\there \"q\" \u{1}"))
        for b in [[UInt8](), [1, 2], [1, 2, 3], [255, 254, 253, 252]] {
            #expect(Base64.decode(String(decoding: Base64.encode(b), as: UTF8.self)) == b)
        }
        // Malformed text, lone surrogates, control characters, nesting and size past the limits.
        for bad in ["{", "[1,]", "{\"a\" 1}", "tru", "\"\\ud800\"", "\"a\u{1}\"", "[01x]", "[1 2]", "\"\\x\"", "-"] {
            expectEINVAL(bad)
        }
        expectEINVAL(String(repeating: "[", count: 100) + String(repeating: "]", count: 100))
        expectEINVAL("\"" + String(repeating: "a", count: 5000) + "\"", EFBIG, maxValueBytes: 1000)
        // The outer structure is walked in steps; each value within has the limit.
        let r = JSONReader(BytesSource(n(#"{"k": [ {"x":1}, {"x":2} ], "z": 3}"#)), maxValueBytes: 100)
        try r.beginObject()
        #expect(try r.nextKey() == "k")
        try r.beginArray()
        var xs: [Int64] = []
        while try r.nextElement() { xs.append(try r.value()["x"]?.int64 ?? -1) }
        #expect(xs == [1, 2])
        #expect(try r.nextKey() == "z")
        #expect(try r.value() == .int(3))
        #expect(try r.nextKey() == nil)
        #expect(try r.atEnd())
    }

    @Test(arguments: [StreamCodec.gzip, .zstd, .none])
    func compressedStreamsComeBackAndTruncationIsAnError(codec: StreamCodec) throws {
        var data: [UInt8] = []
        var x: UInt32 = 1
        for i in 0..<600_000 {
            x = x &* 1_103_515_245 &+ 12345
            data.append(i % 3 == 0 ? UInt8(truncatingIfNeeded: x >> 16) : UInt8(ascii: "a"))
        }
        let sink = BytesSink()
        let enc = try codec.encoding(into: sink)
        var at = 0
        while at < data.count {
            let n = min(70_000, data.count - at)
            try enc.write(Array(data[at..<at + n]))
            at += n
        }
        try enc.finish()
        if codec != .none { #expect(sink.bytes.count < data.count) }
        #expect(StreamCodec.sniffed(Array(sink.bytes.prefix(4))) == codec)
        func readAll(_ bytes: [UInt8]) throws -> [UInt8] {
            let (src, found) = try decodingSniffed(BytesSource(bytes))
            #expect(found == codec)
            var out: [UInt8] = []
            var buf = [UInt8](repeating: 0, count: 5000)
            while true {
                let n = try buf.withUnsafeMutableBytes { try src.read(into: $0) }
                if n == 0 { break }
                out.append(contentsOf: buf[0..<n])
            }
            return out
        }
        #expect(try readAll(sink.bytes) == data)
        if codec != .none {
            #expect(throws: FSError.self) { _ = try readAll(Array(sink.bytes.prefix(sink.bytes.count / 2))) }
            var damaged = sink.bytes
            for i in stride(from: 20, to: damaged.count - 20, by: 97) { damaged[i] ^= 0x5a }
            #expect(throws: FSError.self) { _ = try readAll(damaged) }
        }
    }

    /// A volume with what a dump must carry: directories with modes and owners, files with
    /// slices over two chunks, a hard link, a symlink, a fifo, a device, extended attributes
    /// (one binary), a name that is not UTF-8, a file in the trash, a quota, a copied range
    /// sharing slices.
    static func populate(_ m: any MetadataEngine) throws -> Ino {
        // (Slices below get fixed ids: reserved first, as writers do.)
        _ = try m.newSliceIDs(100)
        let (d1, _) = try m.mknod(alice, rootIno, n("d1"), .directory, 0o750, rdev: 0, target: nil)
        let (d2, _) = try m.mknod(alice, d1, n("d2"), .directory, 0o700, rdev: 0, target: nil)
        let (f, _) = try m.mknod(alice, d1, n("f"), .regular, 0o640, rdev: 0, target: nil)
        _ = try m.writeSlice(f, 0, Slice(pos: 0, id: 11, size: 5000, off: 0, len: 5000), minSize: 5000, mtime: .now(), sid: 0)
        _ = try m.writeSlice(f, 0, Slice(pos: 100, id: 12, size: 300, off: 0, len: 300), minSize: 5000, mtime: .now(), sid: 0)
        _ = try m.writeSlice(f, 1, Slice(pos: 7, id: 13, size: 100, off: 0, len: 100), minSize: chunkSize + 107, mtime: .now(), sid: 0)
        _ = try m.link(alice, f, d2, n("hard"))
        _ = try m.mknod(alice, d2, n("sym"), .symlink, 0o777, rdev: 0, target: n("../f"))
        _ = try m.mknod(alice, d2, n("fifo"), .fifo, 0o600, rdev: 0, target: nil)
        _ = try m.mknod(.root, rootIno, n("dev"), .charDevice, 0o600, rdev: 0x0103, target: nil)
        _ = try m.mknod(bob, rootIno, [0x62, 0xff, 0x6e], .regular, 0o644, rdev: 0, target: nil)
        try m.setxattr(alice, f, n("user.text"), n("value"), .any)
        try m.setxattr(alice, d1, n("user.bin"), [0, 1, 0xff, 10], .any)
        let (g, _) = try m.mknod(alice, d1, n("gone"), .regular, 0o644, rdev: 0, target: nil)
        _ = try m.writeSlice(g, 0, Slice(pos: 0, id: 14, size: 4096, off: 0, len: 4096), minSize: 4096, mtime: .now(), sid: 0)
        _ = try m.unlink(alice, d1, n("gone"))
        let (c, _) = try m.mknod(alice, d1, n("copy"), .regular, 0o644, rdev: 0, target: nil)
        _ = try m.copyRange(alice, src: f, srcOff: 0, dst: c, dstOff: 0, length: 5000)
        _ = try (m as! any QuotaAdmin).setQuota(.dir(d1), QuotaLimits(capacity: 1 << 30, inodes: 100))
        return d1
    }

    /// Everything a reader of the volume sees, as text lines: each path with its attributes,
    /// extended attributes, link target and chunk records.
    private func listing(_ m: any MetadataEngine) throws -> [String] {
        var out: [String] = []
        var dirs: [(Ino, String)] = [(rootIno, "")]
        func describe(_ ino: Ino, _ a: Attr, _ path: String) throws {
            var line =
                "\(path) ino=\(ino) \(a.type) mode=\(String(a.mode, radix: 8)) \(a.uid):\(a.gid) nlink=\(a.nlink) size=\(a.size) rdev=\(a.rdev)"
            line += " times=\(a.atime.sec).\(a.atime.nsec),\(a.mtime.sec).\(a.mtime.nsec),\(a.ctime.sec).\(a.ctime.nsec)"
            for x in try m.listxattr(.root, ino) { line += " x:\(x)=\(try m.getxattr(.root, ino, x))" }
            if a.type == .symlink { line += " -> \(try m.readlink(ino))" }
            if a.type == .regular {
                for i in 0..<UInt32((a.size + chunkSize - 1) / chunkSize) {
                    line += " c\(i)=\(try m.readChunk(ino, i).map { "\($0.pos)/\($0.id)/\($0.off)/\($0.len)" })"
                }
            }
            out.append(line)
        }
        try describe(rootIno, try m.getattr(rootIno), "/")
        while let (d, path) = dirs.popLast() {
            var cookie: UInt64 = 0
            while true {
                let page = try m.readdir(d, after: cookie, limit: 100, plus: true)
                for e in page {
                    let p = path + "/" + e.name.map { String($0, radix: 16) }.joined(separator: ".")
                    try describe(e.ino, e.attr!, p)
                    if e.type == .directory { dirs.append((e.ino, p)) }
                }
                guard let last = page.last else { break }
                cookie = last.cookie
            }
        }
        return out
    }

    /// A second, empty engine of `kind` (nothing formatted) beside `f`'s.
    private func emptyEngine(_ kind: EngineKind, beside f: EngineFixture) throws -> any MetadataEngine {
        switch kind {
        case .sqlite: return try openMetadata(try MetaURL.parse("sqlite3://\(try makeTempDir("load"))/meta.db"), create: true)
        default: return try openMetadata(try MetaURL.parse(f.url.replacingOccurrences(of: "/0", with: "/3")), create: true)
        }
    }

    @Test(arguments: [(EngineKind.sqlite, EngineKind.redis), (.redis, .sqlite)])
    func aVolumeDumpedAndLoadedIntoTheOtherEngineIsTheSame(from: EngineKind, to: EngineKind) throws {
        let f = try EngineFixture(from, trash: 1)
        let redis = from == .redis ? f : try EngineFixture(.redis)
        let m = f.engine
        let d1 = try DumpTests.populate(m)
        let sink = BytesSink()
        let dumped = try (m as! any DumpAdmin).dump(into: sink, keepSecrets: false, progress: { _ in })
        #expect(dumped.inodes == 13 && dumped.directories == 6 && dumped.slices == 8)
        let target = try emptyEngine(to, beside: redis)
        let loaded = try (target as! any DumpAdmin).load(from: JSONReader(BytesSource(sink.bytes)), secretKey: nil, progress: { _ in })
        #expect(loaded == dumped)
        #expect(try listing(target) == listing(m))
        #expect(try target.statfs() == m.statfs())
        #expect(try target.requireFormat() == m.requireFormat())
        let qa = m as! any QuotaAdmin
        let qb = target as! any QuotaAdmin
        #expect(try qb.quota(.dir(d1)) == qa.quota(.dir(d1)))
        #expect(try (target as! any TrashAdmin).trashUsage() == (m as! any TrashAdmin).trashUsage())
        // Its dump is the first one again (but for the engine's name and the times of the dumps).
        let again = BytesSink()
        _ = try (target as! any DumpAdmin).dump(into: again, keepSecrets: false, progress: { _ in })
        func body(_ b: [UInt8]) -> [Substring] {
            String(decoding: b, as: UTF8.self).split(separator: "\n").filter {
                !$0.contains("\"stagefs_dump\"") && !$0.contains("\"summary\"") && !$0.contains("\"counters\"")
            }
        }
        #expect(body(again.bytes) == body(sink.bytes))
        // Shared slices keep their references; new ids are past every one in use.
        for id: UInt64 in 11...14 { #expect(try refs(target, id) == refs(m, id)) }
        #expect(try refs(m, 11) == 2 && refs(m, 12) == 1)
        #expect(try target.newSliceIDs(1) > 14)
        let maxIno = try listing(m).compactMap { line in line.split(separator: " ").first { $0.hasPrefix("ino=") }.flatMap { Ino($0.dropFirst(4)) } }
            .filter { !Trash.isTrash($0) }.max()!
        #expect(try target.mknod(alice, rootIno, n("new"), .regular, 0o644, rdev: 0, target: nil).0 > maxIno)
    }

    /// A file of more chunks than a dump's first record holds, at sparse indexes: the rest follow
    /// from after the last of those (once each), and a load gives no slice a reference.
    @Test(arguments: EngineKind.allCases)
    func aSparseLongFileIsDumpedWithEachChunkOnce(kind: EngineKind) throws {
        let f = try EngineFixture(kind)
        let m = f.engine
        let (ino, _) = try m.mknod(alice, rootIno, n("sparse"), .regular, 0o644, rdev: 0, target: nil)
        for i: UInt32 in 0..<40 {
            _ = try m.writeSlice(ino, i * 10, Slice(pos: 0, id: 100 + UInt64(i), size: 10, off: 0, len: 10), minSize: 0, mtime: .now(), sid: 0)
        }
        let sink = BytesSink()
        let dumped = try (m as! any DumpAdmin).dump(into: sink, keepSecrets: false, progress: { _ in })
        #expect(dumped.slices == 40)
        let spare = try EngineFixture(.redis)
        let target = try emptyEngine(kind == .sqlite ? .redis : .sqlite, beside: spare)
        _ = try (target as! any DumpAdmin).load(from: JSONReader(BytesSource(sink.bytes)), secretKey: nil, progress: { _ in })
        for id: UInt64 in 100..<140 { #expect(try refs(target, id) == 0, "slice \(id)") }
        #expect(try target.readChunk(ino, 390).map(\.id) == [139] && target.readChunk(ino, 160).map(\.id) == [116])
    }

    private func refs(_ m: any MetadataEngine, _ id: UInt64) throws -> Int64 {
        if let t = m as? SQLiteMetadata { return try t.store.transaction(write: false) { (tx) throws(FSError) in try t.store.sliceRefs(tx, id) } }
        let t = m as! RedisTxnMetadata
        return try t.store.transaction(write: false) { (tx) throws(FSError) in try t.store.sliceRefs(tx, id) }
    }

    @Test func backupsAreNamedByTheirTimeAndThinnedHourlyDailyWeekly() throws {
        let t: Int64 = 1_796_579_623  // 2026-12-06 17:53:43 UTC
        #expect(Backups.name(at: t) == "dump-20261206-175343.json.zst")
        #expect(Backups.time(of: Backups.name(at: t)) == t)
        for bad in ["dump-20261306-175343.json.zst", "dump-2026120-175343.json.zst", "dump-20261206-175343.json.gz", "x"] {
            #expect(Backups.time(of: bad) == nil)
        }
        // A backup every 20 minutes for 60 days, thinned after each as a mount does.
        let start: Int64 = 1_790_000_000
        var kept: [Int64] = []
        var now = start
        while now < start + 60 * 86400 {
            kept.append(now)
            let gone = Set(Backups.thinned(kept, now: now))
            kept.removeAll { gone.contains($0) }
            now += 1200
        }
        now -= 1200
        #expect(kept.last == now, "the newest stays")
        let day = kept.filter { now - $0 < 86400 && $0 != now }
        let week = kept.filter { now - $0 >= 86400 && now - $0 < 7 * 86400 }
        let older = kept.filter { now - $0 >= 7 * 86400 }
        #expect(Set(day.map { $0 / 3600 }).count == day.count && day.count >= 23 && day.count <= 24, "one an hour for a day: \(day.count)")
        #expect(Set(week.map { $0 / 86400 }).count == week.count && week.count >= 6 && week.count <= 7, "one a day for a week: \(week.count)")
        #expect(Set(older.map { $0 / (7 * 86400) }).count == older.count && older.count >= 7 && older.count <= 9, "one a week after: \(older.count)")
        // Too big for the default hour: a dump of more than 15 minutes (45 million inodes).
        #expect(Backups.tooBig(inodes: 1_000_000, interval: 3600) == nil)
        #expect(Backups.tooBig(inodes: 50_000_000, interval: 3600) != nil)
        #expect(Backups.tooBig(inodes: 1_000_000, interval: 60) != nil)
        // Each kept one is the first of its slot among those ever taken.
        for t in day { #expect(t % 3600 < 1200) }
    }

    @Test func aJuiceFSDumpLoadsWithItsEscapesAndHardLinksAndWhatCannotBeReadIsRefused() throws {
        let setting =
            #""Setting": {"Name": "jv", "UUID": "u-1", "Storage": "file", "Bucket": "/data/", "BlockSize": 4096, "Compression": "none", "TrashDays": 0}"#
        func attr(_ ino: Int, _ type: String, nlink: Int = 1, length: Int = 0) -> String {
            #"{"inode":\#(ino),"type":"\#(type)","mode":420,"uid":5,"gid":6,"atime":1,"mtime":2,"ctime":3,"mtimensec":7,"nlink":\#(nlink),"length":\#(length)}"#
        }
        let tree = """
            {\(setting), "Counters": {"nextInodes": 10, "nextChunk": 50},
            "FSTree": {"attr": \(attr(1, "directory", nlink: 3)), "entries": {
              "d": {"attr": \(attr(2, "directory")), "entries": {
                "a%FFb%25": {"attr": \(attr(3, "regular", nlink: 2, length: 10)), "xattrs": [{"name": "user.k", "value": "v%00"}], "chunks": [{"index": 0, "slices": [{"id": 40, "size": 10, "len": 10}]}]},
                "link": {"attr": \(attr(3, "regular", nlink: 2, length: 10)), "chunks": [{"index": 0, "slices": [{"id": 40, "size": 10, "len": 10}]}]},
                "s": {"attr": \(attr(4, "symlink")), "symlink": "a%25b"}
              }}
            }}}
            """
        let e = try openMetadata(try MetaURL.parse("sqlite3://\(try makeTempDir("jfs"))/meta.db"), create: true)
        let stats = try (e as! any JuiceFSLoadAdmin).loadJuiceFS(from: JSONReader(BytesSource(n(tree))), secretKey: nil, progress: { _ in })
        #expect(stats.inodes == 4 && stats.entries == 4)
        let (d, _) = try e.lookup(.root, rootIno, n("d"))
        let (f, a) = try e.lookup(.root, d, [0x61, 0xff, 0x62, 0x25])
        #expect(f == 3 && a.nlink == 2 && a.size == 10 && a.uid == 5 && a.mtime == Timespec(sec: 2, nsec: 7))
        #expect(try e.lookup(.root, d, n("link")).0 == 3)
        #expect(try e.getxattr(.root, f, n("user.k")) == [0x76, 0])
        #expect(try e.readlink(try e.lookup(.root, d, n("s")).0) == n("a%b"))
        #expect(try e.readChunk(f, 0) == [Slice(pos: 0, id: 40, size: 10, off: 0, len: 10)])
        #expect(try e.requireFormat().name == "jv" && e.requireFormat().bucket == "/data" && e.newSliceIDs(1) > 50)
        // A compressed one stays compressed (JuiceFS compresses blocks whole, as StageFS does).
        let e3 = try openMetadata(try MetaURL.parse("sqlite3://\(try makeTempDir("jfs"))/meta.db"), create: true)
        _ = try (e3 as! any JuiceFSLoadAdmin).loadJuiceFS(
            from: JSONReader(BytesSource(n(tree.replacingOccurrences(of: #""Compression": "none""#, with: #""Compression": "lz4""#)))),
            secretKey: nil, progress: { _ in })
        #expect(try e3.requireFormat().compression == "lz4" && e3.requireFormat().version == VolumeFormat.currentVersion)
        // What StageFS cannot read as it is: refused, nothing made.
        for (bad, why) in [
            (#""Compression": "none""#, #""Compression": "snappy""#), (#""TrashDays": 0"#, #""TrashDays": 0, "EncryptKey": "k""#),
            (#""TrashDays": 0"#, #""TrashDays": 0, "HashPrefix": true"#), (#""Storage": "file""#, #""Storage": "oss""#),
        ] {
            let e2 = try openMetadata(try MetaURL.parse("sqlite3://\(try makeTempDir("jfs"))/meta.db"), create: true)
            expectErrno(EOPNOTSUPP, "\(why)") {
                _ = try (e2 as! any JuiceFSLoadAdmin).loadJuiceFS(
                    from: JSONReader(BytesSource(n(tree.replacingOccurrences(of: bad, with: why)))), secretKey: nil, progress: { _ in })
            }
            #expect(try e2.loadFormat() == nil)
        }
    }

    @Test func aLoadRefusesAnEngineInUseAndDumpsThatAreNotWhole() throws {
        let f = try EngineFixture(.sqlite)
        _ = try DumpTests.populate(f.engine)
        let sink = BytesSink()
        _ = try (f.engine as! any DumpAdmin).dump(into: sink, keepSecrets: false, progress: { _ in })
        // Into a volume: refused, nothing written.
        expectErrno(EEXIST) {
            _ = try (f.engine as! any DumpAdmin).load(from: JSONReader(BytesSource(sink.bytes)), secretKey: nil, progress: { _ in })
        }
        let text = String(decoding: sink.bytes, as: UTF8.self)
        func refused(_ t: String, _ why: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
            let e = try openMetadata(try MetaURL.parse("sqlite3://\(try makeTempDir("load"))/meta.db"), create: true)
            do {
                _ = try (e as! any DumpAdmin).load(from: JSONReader(BytesSource(Array(t.utf8))), secretKey: nil, progress: { _ in })
                Issue.record("loaded a dump that is \(why)", sourceLocation: sourceLocation)
            } catch {
                #expect(error.code == EINVAL || error.code == EFBIG, sourceLocation: sourceLocation)
            }
            // No volume was made.
            #expect(try e.loadFormat() == nil, sourceLocation: sourceLocation)
        }
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        let summary = lines.firstIndex { $0.hasPrefix("\"summary\"") }!
        try refused(lines[..<summary].joined(separator: "\n"), "cut short")
        let count = try #require(JSONReader(BytesSource(sink.bytes)).valueOfTopLevel("summary")?["inodes"]?.int64)
        try refused(
            text.replacingOccurrences(of: "\"summary\":{\"inodes\":\(count)", with: "\"summary\":{\"inodes\":\(count + 1)"), "missing a record")
        let firstFile = lines.firstIndex { $0.contains("\"t\":\"f\"") }!
        var twice = lines
        twice.insert(lines[firstFile], at: firstFile)
        try refused(twice.joined(separator: "\n"), "holding an inode twice")
        let entries = lines.firstIndex { $0.hasPrefix(",\n{\"e\"") || $0.hasPrefix("{\"e\"") }!
        var early = lines
        early.insert(",{\"e\":1,\"n\":[[\"x\",999,\"f\"]]}", at: entries)
        try refused(early.joined(separator: "\n"), "naming an inode without a record")
        try refused(text.replacingOccurrences(of: "[[0,11,5000,0,5000]", with: "[[0,11,5000,4000,5000]"), "holding a slice past its end")
        try refused(text.replacingOccurrences(of: "[\"d1\",", with: "[\"a/b\","), "holding a name with a slash")
        try refused(text.replacingOccurrences(of: "\"version\":1", with: "\"version\":9"), "of a newer version")
        try refused(String(text.prefix(text.count / 2)), "cut in the middle")
        // Numbers past what fits: refused, never a trap.
        try refused(
            text.replacingOccurrences(of: "[[0,11,5000,0,5000]", with: "[[0,0,0,4294967296,10],[0,11,5000,0,5000]"), "holding a hole past 2^32")
        try refused(
            text.replacingOccurrences(of: "[[0,11,5000,0,5000]", with: "[[18446744073709551615,11,5000,0,5000]"), "holding a position past 2^64")
        try refused(
            text.replacingOccurrences(of: "[[0,11,5000,0,5000]", with: "[[0,18446744073709551615,5000,0,5000]"), "holding a slice id past 2^63")
        // A directory named twice, or named as a file.
        var twiceNamed = lines
        twiceNamed.insert(",{\"e\":1,\"n\":[[\"again\",2,\"d\"]]}", at: entries + 1)
        try refused(twiceNamed.joined(separator: "\n"), "naming a directory twice")
        var asFile = lines
        asFile.insert(",{\"e\":1,\"n\":[[\"as-file\",2,\"f\"]]}", at: entries + 1)
        try refused(asFile.joined(separator: "\n"), "naming a directory as a file")
    }
}

extension JSONReader {
    /// The value of a top-level member, the others skipped.
    fileprivate func valueOfTopLevel(_ key: String) throws -> JSONValue? {
        try beginObject()
        while let k = try nextKey() {
            let v = try value()
            if k == key { return v }
        }
        return nil
    }
}
