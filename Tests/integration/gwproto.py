"""A raw client of the gateway's protocol (Sources/Gateway/README.md), for tests that act as a
hostile user: it sends whatever it likes, frame by frame."""
import os
import socket
import struct

VERSION = 4
MAGIC = b"stagefs-gateway"

OPS = dict(hello=1, loadFormat=2, statfs=3, newSession=4, heartbeat=5, closeSession=6, listSessions=7, lookup=10, getattr=11,
           setattr=12, access=13, mknod=14, create=15, unlink=16, rmdir=17, rename=18, link=19, readlink=20, readdir=21, getattrs=22,
           getxattr=30, listxattr=31, setxattr=32, removexattr=33, open=40, close=41, closes=42, readChunks=43, writeSlice=44,
           newSliceIDs=45, fallocate=46, reserveSpace=47, releaseSpace=48, hasQuotas=9, copyRange=49, cloneFile=70, cloneChunks=71, cloneFinish=72, trash=73, quota=74, getlk=50, setlk=51, flock=52, getBlock=60, putBlock=61, openBlock=62, presignBlock=63)

ATTR = struct.Struct(">BHIIIQqIqIqIIQ")  # 71 bytes: type, mode, uid, gid, nlink, size, 3 times, rdev, parent


def data(b):
    return struct.pack(">I", len(b)) + b


def mark(sid=0, sid_tag=0, slot=0, number=0, resend=False):
    """A request mark: with a number, a request id (the session's, a slot, the number)."""
    flags = (1 if number else 0) | (2 if resend else 0)
    return bytes([flags]) + (struct.pack(">QQIQ", sid, sid_tag, slot, number) if number else b"")


def ref(ino, tag=0):
    return struct.pack(">QQ", ino, tag)


def attr(b, off=0):
    f = ATTR.unpack_from(b, off)
    return dict(type=f[0], mode=f[1], uid=f[2], gid=f[3], nlink=f[4], size=f[5], parent=f[13])


class GatewayError(Exception):
    def __init__(self, status, message):
        super().__init__(status, message)  # both, so that it pickles (run_as sends it back)
        self.errno, self.message = status, message

    def __str__(self):
        return f"errno {self.errno}: {self.message}"


def code(fn, *args):
    """The errno of a call that the gateway (or the kernel) refuses, 0 when it answers."""
    try:
        fn(*args)
        return 0
    except (GatewayError, OSError) as e:
        return e.errno


class Raw:
    def __init__(self, path, hello=True, timeout=20):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        self.s.connect(path)
        self.next = 1
        if hello:
            self.hello()

    def close(self):
        self.s.close()

    def send_raw(self, b):
        self.s.sendall(b)

    def frame(self, body):
        self.send_raw(struct.pack(">I", len(body)) + body)

    def recv(self):
        """(request id, status, rest); raises EOFError when the gateway closed the connection."""
        head = self._recvn(4)
        (n,) = struct.unpack(">I", head)
        body = self._recvn(n)
        rid, status = struct.unpack(">Qi", body[:12])
        return rid, status, body[12:]

    def _recvn(self, n):
        out = b""
        while len(out) < n:
            b = self.s.recv(n - len(out))
            if not b:
                raise EOFError("the gateway closed the connection")
            out += b
        return out

    def hello(self, version=VERSION, magic=MAGIC):
        self.frame(struct.pack(">QH", 0, OPS["hello"]) + data(magic) + struct.pack(">H", version))
        _, status, rest = self.recv()
        if status:
            raise GatewayError(status, rest[4:].decode(errors="replace"))
        return rest

    def call(self, op, fields=b"", on_behalf=None, mark=b"\0"):
        """Sends `op` with `fields` (and, when given, a (uid, gid, groups) to act for, and the
        request mark: see `mark`); returns the reply's results or raises GatewayError."""
        rid = self.next
        self.next += 1
        cred = b"\0"
        if on_behalf:
            uid, gid, groups = on_behalf
            cred = b"\1" + struct.pack(">IIIH", uid, gid, 0, len(groups)) + b"".join(struct.pack(">I", g) for g in groups)
        self.frame(struct.pack(">QH", rid, OPS[op]) + cred + mark + fields)
        got, status, rest = self.recv()
        if status:
            raise GatewayError(status, rest[4:].decode(errors="replace"))
        assert got == rid, (got, rid)
        return rest

    # The operations the tests use.
    def new_session(self):
        fields = struct.pack(">Q", 0) + data(b"raw") + struct.pack(">i", 1) + data(b"") + data(b"raw") + struct.pack(">qqI", 0, 0, 0xFFFFFFFF)
        rest = self.call("newSession", fields)
        return struct.unpack(">QQ", rest[:16])

    def lookup(self, parent, tag, name, **kw):
        rest = self.call("lookup", ref(parent, tag) + data(name), **kw)
        ino, t = struct.unpack(">QQ", rest[:16])
        return ino, t, attr(rest, 16)

    def getattr(self, ino, tag):
        return attr(self.call("getattr", ref(ino, tag)))

    def create(self, parent, tag, name, mode, sid, sid_tag, **kw):
        rest = self.call("create", ref(parent, tag) + data(name) + struct.pack(">HQQ", mode, sid, sid_tag), **kw)
        ino, t = struct.unpack(">QQ", rest[:16])
        return ino, t, attr(rest, 16)

    def read_chunks(self, ino, tag, index=0, read_tag=0, sid=0, sid_tag=0):
        return self.call("readChunks", struct.pack(">QQI", sid, sid_tag, 1) + ref(ino, tag) + struct.pack(">IQ", index, read_tag))

    def get_block(self, key, length, tag, offset=0):
        return self.call("getBlock", data(key.encode()) + struct.pack(">IIQ", offset, length, tag))

    def new_slice_ids(self, count):
        return struct.unpack(">QQ", self.call("newSliceIDs", struct.pack(">I", count))[:16])

    def put_block(self, key, first, count, tag, payload):
        return self.call("putBlock", data(key.encode()) + struct.pack(">QQQI", first, count, tag, len(payload)) + payload)

    def chown(self, ino, tag, uid, gid):
        fields = ref(ino, tag) + struct.pack(">IHIIQ", 0b110, 0, uid, gid, 0) + struct.pack(">qIqIqI", 0, 0, 0, 0, 0, 0) + b"\0" + struct.pack(">QQQ", 0, 0, 0)
        return attr(self.call("setattr", fields))

    def heartbeat(self, sid, tag):
        return self.call("heartbeat", struct.pack(">QQ", sid, tag))

    def open(self, ino, tag, flags, sid, sid_tag):
        """(attr, first chunk's [(slice id, size, block tag)])"""
        rest = self.call("open", ref(ino, tag) + struct.pack(">iQQ", flags, sid, sid_tag))
        a = attr(rest)
        off = 71 + 16
        slices = []
        if rest[off]:
            (n,) = struct.unpack_from(">I", rest, off + 1)
            recs = [struct.unpack_from(">IQIII", rest, off + 5 + 24 * i) for i in range(n)]
            tags = struct.unpack_from(f">{n}Q", rest, off + 5 + 24 * n)
            slices = [(r[1], r[2], t) for r, t in zip(recs, tags)]
        return a, slices

    def open_block(self, key, tag):
        """A descriptor of the block's file, or GatewayError."""
        rid = self.next
        self.next += 1
        self.frame(struct.pack(">QH", rid, OPS["openBlock"]) + b"\0\0" + data(key.encode()) + struct.pack(">Q", tag))
        head, fds, _, _ = socket.recv_fds(self.s, 4, 4)
        head += self._recvn(4 - len(head))
        (n,) = struct.unpack(">I", head)
        body = self._recvn(n)
        _, status = struct.unpack(">Qi", body[:12])
        if status:
            for fd in fds:
                os.close(fd)
            raise GatewayError(status, body[16:].decode(errors="replace"))
        assert len(fds) == 1, fds
        return fds[0]

    def presign_block(self, key, tag):
        rest = self.call("presignBlock", data(key.encode()) + struct.pack(">Q", tag))
        (n,) = struct.unpack_from(">I", rest)
        return rest[4:4 + n].decode()


def write_slice_fields(ino, tag, slice_id, length, write_tag, first, rtag, sid, sid_tag):
    """A writeSlice of `length` bytes at offset 0 of chunk 0 from slice `slice_id` (of the range
    `first`, 1 count, tagged `rtag`), under session `sid`, with no block along."""
    return (ref(ino, tag) + struct.pack(">I", 0) + struct.pack(">IQIII", 0, slice_id, length, 0, length) + struct.pack(">QqI", length, 0, 0)
            + struct.pack(">QQQQ", write_tag, first, 1, rtag) + struct.pack(">QQ", sid, sid_tag) + struct.pack(">I", 0))


def truncate_fields(ino, tag, size, write_tag, sid, sid_tag):
    """A setattr of the size through an open file (viaHandle) under session `sid`."""
    return (ref(ino, tag) + struct.pack(">IHIIQ", 1 << 3, 0, 0, 0, size) + struct.pack(">qIqIqI", 0, 0, 0, 0, 0, 0) + b"\1"
            + struct.pack(">QQQ", write_tag, sid, sid_tag))

