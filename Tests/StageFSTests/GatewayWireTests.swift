import Gateway
import Metadata
import StageFSCore
import Testing

#if canImport(Glibc)
    import Glibc
#endif

@Suite("Gateway frames and tags")
struct GatewayWireTests {
    @Test func blockKeysNameTheirSlice() {
        #expect(GatewayObjectStore.sliceID("vol/chunks/0/1/1234_0_4096") == 1234)
        #expect(GatewayObjectStore.sliceID("1234_5_6") == 1234)
        #expect(GatewayObjectStore.sliceID("vol/chunks/0/1/99") == 99)
        for bad in ["vol/chunks/0/1/_0_4096", "vol/chunks/0/1/12a_0_1", "vol/", "", "vol/chunks/0/1/99999999999999999999_0_1"] {
            #expect(GatewayObjectStore.sliceID(bad) == nil, "\(bad)")
        }
    }

    @Test func fieldsRoundTrip() throws {
        var w = WireWriter()
        w.u64(7)
        w.data(Array("name".utf8))
        var req = SetAttrRequest(mask: [.mode, .size])
        req.mode = 0o640
        req.size = 12345
        req.viaHandle = true
        w.setattr(req)
        w.credential(Credential(uid: 5, gid: 6, groups: [7, 8], pid: 9))
        w.slices([Slice(pos: 1, id: 2, size: 3, off: 0, len: 3)])
        var r = WireReader(w.bytes)
        #expect(try r.u64() == 7)
        #expect(try r.name() == Array("name".utf8))
        let back = try r.setattr()
        #expect(back.mask == [.mode, .size] && back.mode == 0o640 && back.size == 12345 && back.viaHandle)
        let c = try r.credential()
        #expect(c == Credential(uid: 5, gid: 6, groups: [7, 8], pid: 9) && c?.groups == [7, 8])
        #expect(try r.slices() == [Slice(pos: 1, id: 2, size: 3, off: 0, len: 3)])
        try r.end()
    }

    /// Whatever the bytes, decoding ends in a value or `EPROTO`/`ENAMETOOLONG`, never past the
    /// frame, and never allocates for a length the frame does not hold.
    @Test func malformedFieldsAreRefused() throws {
        func code(_ bytes: [UInt8], _ read: (inout WireReader) throws(FSError) -> Void) -> Int32 {
            var r = WireReader(bytes)
            do throws(FSError) {
                try read(&r)
                try r.end()
                return 0
            } catch {
                return error.code
            }
        }
        #expect(code([0, 0, 0]) { (r) throws(FSError) in _ = try r.u64() } == EPROTO)
        // A byte string that claims 4 GiB.
        #expect(code([0xFF, 0xFF, 0xFF, 0xFF, 1, 2]) { (r) throws(FSError) in _ = try r.data(max: 1 << 20) } == EPROTO)
        #expect(code([0, 0, 0x10, 0, 1, 2]) { (r) throws(FSError) in _ = try r.data(max: Wire.maxFrame) } == EPROTO)
        // A list of a million slices in six bytes.
        #expect(code([0, 0x0F, 0x42, 0x40, 0, 0]) { (r) throws(FSError) in _ = try r.slices() } == EPROTO)
        // A name of 300 bytes is too long, not malformed.
        var w = WireWriter()
        w.data([UInt8](repeating: 0x61, count: 300))
        #expect(code(w.bytes) { (r) throws(FSError) in _ = try r.name() } == ENAMETOOLONG)
        // Bytes after the last field.
        #expect(code([0, 0, 0, 0, 0, 0, 0, 1, 9]) { (r) throws(FSError) in _ = try r.u64() } == EPROTO)
        // An attribute record of an unknown file type.
        #expect(code([UInt8](repeating: 0xEE, count: Attr.encodedSize)) { (r) throws(FSError) in _ = try r.attr() } == EPROTO)
        // More groups than a credential may carry.
        var g = WireWriter()
        g.u8(1)
        g.u32(1)
        g.u32(1)
        g.u32(1)
        g.u16(UInt16(Wire.maxGroups + 1))
        #expect(code(g.bytes) { (r) throws(FSError) in _ = try r.credential() } == EPROTO)
        // Request marks: unknown flags, a slot past the bound, number 0.
        #expect(code([4]) { (r) throws(FSError) in _ = try r.mark() } == EPROTO)
        for (slot, number) in [(RequestMark.slots, UInt64(1)), (0, 0)] {
            var m = WireWriter()
            m.mark(RequestMark(id: RequestMark.ID(session: 1, sessionTag: 2, slot: slot, number: number)))
            #expect(code(m.bytes) { (r) throws(FSError) in _ = try r.mark() } == EPROTO)
        }
    }

    @Test func requestMarksRoundTrip() throws {
        for m in [
            RequestMark(), RequestMark(resend: true), RequestMark(resend: true, id: RequestMark.ID(session: 9, sessionTag: 8, slot: 7, number: 6)),
        ] {
            var w = WireWriter()
            w.mark(m)
            var r = WireReader(w.bytes)
            #expect(try r.mark() == m)
            try r.end()
        }
    }

    /// The reference vector of the SipHash paper (appendix A): key 00..0f, message 00..0e.
    @Test func sipHashMatchesTheReferenceVector() {
        let out = SipHash24.hash(0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908, words: [0x0706_0504_0302_0100, 0x000e_0d0c_0b0a_0908], byteCount: 15)
        #expect(out == 0xa129_ca61_49be_45e5)
        let empty = SipHash24.hash(0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908, words: [], byteCount: 0)
        #expect(empty == 0x726f_db47_dd0e_0e31)
        // Read in place from bytes after a first word: the same function.
        let message = (8..<15).map { UInt8($0) }
        let inPlace = message.withUnsafeBytes {
            SipHash24.hash(0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908, first: 0x0706_0504_0302_0100, bytes: $0)
        }
        #expect(inPlace == 0xa129_ca61_49be_45e5)
    }

    @Test func tagsAreBoundToKindNumbersUidAndKey() {
        let g = Grants(key: Array(repeating: 1, count: 32))
        let t = g.tag(.inode, 42, uid: 1000)
        #expect(g.check(t, .inode, 42, uid: 1000))
        #expect(!g.check(t, .inode, 42, uid: 1001))
        #expect(!g.check(t, .inode, 43, uid: 1000))
        #expect(!g.check(t, .read, 42, uid: 1000))
        #expect(!g.check(t ^ 1, .inode, 42, uid: 1000))
        #expect(!Grants(key: Array(repeating: 2, count: 32)).check(t, .inode, 42, uid: 1000))
        #expect(g.tag(.slices, 100, 8, uid: 1) != g.tag(.slices, 100, 9, uid: 1))
        #expect(!g.check(0, .inode, 42, uid: 1000))
    }
}
