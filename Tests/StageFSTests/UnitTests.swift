import DataPath
import Metadata
import StageFSCore
import Testing
import VFS

@Suite("Units")
struct UnitTests {
    @Test func metaURLs() throws {
        #expect(try MetaURL.parse("sqlite3:///var/lib/x.db") == .sqlite(path: "/var/lib/x.db"))
        #expect(try MetaURL.parse("redis://127.0.0.1:6380/3") == .redis(RedisLocation(hosts: [RedisHost("127.0.0.1", 6380)], db: 3)))
        #expect(try MetaURL.parse("redis://u:p@h/2") == .redis(RedisLocation(hosts: [RedisHost("h", 6379)], db: 2, user: "u", password: "p")))
        #expect(try MetaURL.parse("redis://:secret@h:7000/1") == .redis(RedisLocation(hosts: [RedisHost("h", 7000)], db: 1, password: "secret")))
        let sentinel = RedisLocation(
            hosts: [RedisHost("10.0.0.1", 26379), RedisHost("10.0.0.2", 26380)], masterName: "mymaster", db: 4, password: "pw")
        #expect(try MetaURL.parse("redis://:pw@mymaster,10.0.0.1,10.0.0.2:26380/4") == .redis(sentinel))
        var tls = RedisLocation(hosts: [RedisHost("h", 6379)], db: 0)
        tls.tls = true
        tls.tlsCACert = "/etc/ca.pem"
        tls.waitReplicas = 1
        #expect(try MetaURL.parse("rediss://h/0?tls-ca-cert-file=/etc/ca.pem&wait-replicas=1") == .redis(tls))
        #expect(throws: FSError.self) { try MetaURL.parse("redis://h/0?tls-ca-cert-file=/x") }
        #expect(throws: FSError.self) { try MetaURL.parse("redis://h/0?bogus=1") }
        // engine=txn picked this engine while there were two; it still reads, nothing else does.
        #expect(try MetaURL.parse("redis://h/5?engine=txn") == .redis(RedisLocation(hosts: [RedisHost("h", 6379)], db: 5)))
        #expect(throws: FSError.self) { try MetaURL.parse("redis://h/0?engine=lua") }
        #expect(throws: FSError.self) { try MetaURL.parse("redis://:7000,h/0") }
        #expect(try MetaURL.parse("redis://:secret@h:1/0").description == "redis://:****@h:1/0")
        // What a mount record keeps: no password, parseable again, a user name kept.
        let plain = try MetaURL.parse("redis://:secret@h:1/0")
        #expect(plain.withoutPassword == "redis://h:1/0" && plain.hasPassword)
        #expect(try MetaURL.parse(plain.withoutPassword) == .redis(RedisLocation(hosts: [RedisHost("h", 1)], db: 0)))
        let named = try MetaURL.parse("redis://alice:secret@m,s1,s2/3")
        #expect(named.withoutPassword == "redis://alice:@m,s1:26379,s2:26379/3")
        let waits = try MetaURL.parse("rediss://:pw@h/2?wait-replicas=1&wait-timeout=2500")
        #expect(try MetaURL.parse(waits.withoutPassword).with(password: "pw") == waits)
        let back = try MetaURL.parse(named.withoutPassword)
        #expect(!back.hasPassword && back.with(password: "secret") == named)
        for bad in ["redis://h:0/1", "redis://h:x/1", "redis://h/abc", "sqlite3://rel.db", "sqlite3:///dir/", "http://x", "x"] {
            #expect(throws: FSError.self, "\(bad)") { try MetaURL.parse(bad) }
        }
    }

    @Test func attrEncodingRoundTrips() {
        let a = Attr(
            type: .charDevice, mode: 0o4755, uid: 4_000_000_000, gid: 7, nlink: 3, size: 1 << 40,
            atime: Timespec(sec: -5, nsec: 999_999_999), mtime: Timespec(sec: 1_700_000_000, nsec: 1), ctime: Timespec(sec: 0, nsec: 0),
            rdev: 0x0801, parent: 12345)
        let bytes = a.encode()
        #expect(bytes.count == Attr.encodedSize)
        #expect(Attr(decoding: bytes) == a)
        #expect(Attr(decoding: bytes.dropLast()) == nil)
    }

    /// The short encoding the Redis engine stores: every value comes back (extremes, negative
    /// times, equal and unequal times), a new file's record fits in a string Redis keeps inside
    /// its object (44 bytes), the fixed encoding still reads, chunk records after it are its
    /// tail, and no malformed record decodes (every prefix, a byte added, random bytes: nil,
    /// never a crash).
    @Test func compactAttrEncodingRoundTripsAndRefusesWhatIsMalformed() {
        let now = Timespec(sec: 1_765_000_000, nsec: 123_456_789)
        let later = Timespec(sec: 1_765_000_007, nsec: 5)
        var rng = SystemRandomNumberGenerator()
        var cases = [
            Attr(type: .regular, mode: 0o644, uid: 1001, gid: 1001, nlink: 1, size: 4096, atime: now, mtime: later, ctime: later, parent: 123_456),
            Attr(type: .regular, mode: 0o644, uid: 1001, gid: 1001, atime: now, mtime: now, ctime: now, parent: 1 << 40),
            Attr(
                type: .charDevice, mode: 0xFFFF, uid: .max, gid: .max, nlink: .max, size: .max, atime: Timespec(sec: .min, nsec: .max),
                mtime: Timespec(sec: .max, nsec: 0), ctime: Timespec(sec: .min, nsec: 999_999_999), rdev: .max, parent: .max),
            Attr(type: .symlink, mode: 0o777, uid: 0, gid: 0, atime: Timespec(sec: -5, nsec: 0), mtime: now, ctime: Timespec(sec: 0, nsec: 0)),
        ]
        for _ in 0..<500 {
            func t() -> Timespec {
                Timespec(sec: Int64.random(in: -1 << 40...1 << 40, using: &rng), nsec: UInt32.random(in: 0...999_999_999, using: &rng))
            }
            let a = t()
            cases.append(
                Attr(
                    type: FileType.allCases.randomElement(using: &rng)!, mode: .random(in: 0...0o7777, using: &rng),
                    uid: .random(in: 0...UInt32.max, using: &rng),
                    gid: .random(in: 0...UInt32.max, using: &rng), nlink: .random(in: 0...UInt32.max, using: &rng),
                    size: .random(in: 0...UInt64.max, using: &rng),
                    atime: a, mtime: Bool.random(using: &rng) ? a : t(), ctime: t(),
                    rdev: Bool.random(using: &rng) ? 0 : .random(in: 0...UInt32.max, using: &rng),
                    parent: .random(in: 0...UInt64.max, using: &rng)))
        }
        for a in cases {
            let b = a.encodeCompact()
            #expect(Attr.decodeStored(b) == a, "\(a)")
            #expect(Attr.decodeStored(a.encode()) == a)
            for n in 0..<b.count { #expect(Attr.decodeStored(Array(b.prefix(n))) == nil, "prefix \(n) of \(b)") }
            #expect(Attr.decodeStored(b + [0]) == nil)
            // The records of chunk 0 a file may keep after them: whole records only.
            let size = UInt32.random(in: 0...UInt32.max, using: &rng)
            let records = [
                Slice(pos: 1, id: 2, size: 3, off: 4, len: 5), Slice(pos: .max, id: .max, size: .max, off: .max, len: .max),
                Slice(pos: 0, id: .random(in: 0...UInt64.max, using: &rng), size: size, off: 0, len: size),
                Slice(pos: 0, id: 9, size: 10, off: 0, len: 9), Slice(pos: 0, id: 0, size: 0, off: 0, len: 4096),
            ].flatMap { $0.encoded() }
            let with = a.encodeCompact(firstChunk: records)
            #expect(Attr.decodeStored(with) == a && Attr.storedTail(with) == records && Attr.storedParts(with)?.length == b.count)
            #expect(Attr.decodeStored(Array(with.dropLast())) == nil && Attr.storedTail(b).isEmpty)
            #expect(Attr.storedTail(a.encode() + records).isEmpty, "the fixed encoding keeps nothing after it")
        }
        // A file written once: its attributes and its one slice record in 44 bytes.
        let written = cases[0].encodeCompact(firstChunk: Slice(pos: 0, id: 123_456_789, size: 4096, off: 0, len: 4096).encoded())
        #expect(written.count <= 44 && cases[1].encodeCompact().count <= 44, "\(written.count)")
        for _ in 0..<20_000 {
            var junk = (0..<Int.random(in: 0...48, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            if !junk.isEmpty && Bool.random(using: &rng) { junk[0] = 0xC1 }
            _ = Attr.decodeStored(junk)
        }
    }

    @Test func newerSlicesWinAndHolesStay() {
        // 0..<100 from slice 1, then 40..<60 overwritten by slice 2, then a hole from 90.
        let view = buildView([
            Slice(pos: 0, id: 1, size: 100, off: 0, len: 100),
            Slice(pos: 40, id: 2, size: 20, off: 0, len: 20),
            Slice(pos: 90, id: 0, size: 0, off: 0, len: 1000),
        ])
        #expect(
            view == [
                Segment(pos: 0, len: 40, id: 1, size: 100, off: 0),
                Segment(pos: 40, len: 20, id: 2, size: 20, off: 0),
                Segment(pos: 60, len: 30, id: 1, size: 100, off: 60),
                Segment(pos: 90, len: 1000, id: 0, size: 0, off: 0),
            ])
    }

    @Test func blockKeysFollowTheLayout() {
        let l = Layout(volume: "vol", blockSize: 4 << 20)
        #expect(l.key(slice: 1_234_567, index: 2, length: 100) == "vol/chunks/1/1234/1234567_2_100")
        let keys = l.keys(of: Slice(pos: 0, id: 9, size: UInt32((4 << 20) * 2 + 5), off: 0, len: 1))
        #expect(keys == ["vol/chunks/0/0/9_0_4194304", "vol/chunks/0/0/9_1_4194304", "vol/chunks/0/0/9_2_5"])
    }

    /// The attribute and entry cache sweeps out expired records as new ones come: a long run
    /// kept every record it ever saw, and a large table slowed every lookup. Records still
    /// valid survive the sweeps.
    @Test func metadataCacheSweepsExpiredRecords() {
        let a = Attr(type: .regular, mode: 0o644, uid: 1, gid: 1, atime: .now(), mtime: .now(), ctime: .now())
        let names = (0..<10_000).map { Array("f\($0)".utf8) }
        let lasting = MetaCache(attrTTL: 600, entryTTL: 600, dirEntryTTL: 600, clock: { 0 }, changed: { _ in 0 })
        for (i, n) in names.enumerated() { lasting.putEntry(1, n, Ino(i + 2), a, asOf: 0) }
        #expect(lasting.sizes == (10_000, 10_000))
        #expect(names.indices.allSatisfy { lasting.attr(Ino($0 + 2)) == a && lasting.entry(1, names[$0]) == Ino($0 + 2) })

        let brief = MetaCache(attrTTL: 0.01, entryTTL: 0.01, dirEntryTTL: 0.01, clock: { 0 }, changed: { _ in 0 })
        for (i, n) in names.enumerated() { brief.putEntry(1, n, Ino(i + 2), a, asOf: 0) }
        // Wait until every one of them has expired.
        let expired = Sys.monotonicNanos() + 10_000_000
        while Sys.monotonicNanos() <= expired {}
        for (i, n) in names.enumerated() { brief.putEntry(2, n, Ino(i + 20_000), a, asOf: 0) }
        // Without sweeps both tables would hold all 20,000 records.
        #expect(brief.sizes.attrs <= 10_000 && brief.sizes.entries <= 10_000, "\(brief.sizes)")
        #expect(brief.attr(2) == nil && brief.entry(1, names[0]) == nil)
    }

    @Test func posixAccessRules() {
        let a = Attr(type: .regular, mode: 0o640, uid: 10, gid: 20, atime: .now(), mtime: .now(), ctime: .now())
        #expect(Posix.mayAccess(a, Credential(uid: 10, gid: 99), [.read, .write]))
        #expect(Posix.mayAccess(a, Credential(uid: 11, gid: 99, groups: [20]), .read))
        #expect(!Posix.mayAccess(a, Credential(uid: 11, gid: 20), .write))
        #expect(!Posix.mayAccess(a, Credential(uid: 12, gid: 12), .read))
        #expect(Posix.mayAccess(a, .root, [.read, .write]))
        #expect(!Posix.mayAccess(a, .root, .execute), "root needs some x bit to execute a file")
    }
}

@Suite("Checksums")
struct ChecksumTests {
    @Test func crc32cKnownValues() {
        // The check value of CRC-32C is 0xE3069283 for "123456789" (RFC 3720, B.4).
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
        #expect(CRC32C.checksum([UInt8](repeating: 0, count: 32)) == 0x8A91_36AA)
        #expect(CRC32C.checksum([]) == 0)
        let data = (0..<1000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        let whole = CRC32C.checksum(data)
        let part = data.withUnsafeBytes { b in
            CRC32C.checksum(b.baseAddress! + 333, 667, seed: CRC32C.checksum(b.baseAddress!, 333))
        }
        #expect(whole == part, "continuing from a seed equals one pass")
        let big = (0..<100_003).map { UInt8(truncatingIfNeeded: $0 &* 131 &+ 17) }
        big.withUnsafeBytes { b in
            #expect(CRC32C.checksum(b.baseAddress!, b.count) == CRC32C.software(b.baseAddress!, b.count), "hardware and table agree")
        }
    }
}
