#!/usr/bin/env python3
"""Differential POSIX test: the same random sequence of file-system operations runs on a
directory of the machine's own file system (the oracle, ext4 or tmpfs) and on a StageFS mount,
each operation done as one of two ordinary users (and now and then as root), and every result
is compared: the value or the errno, whether the operation changed mtime and ctime of what it
touched, and at the end of each sequence the whole tree (names, types, modes, owners, link
counts, sizes, contents, symlink targets, extended attributes, which names are hard links of
one another).

Nothing here computes an expected value: the kernel's own file system gives it.

Replay one sequence (it sets up Redis/moto/mounts itself, like the tests):
    python3 Tests/integration/posixdiff.py --engine sqlite --seed 1234 --verbose
Run many (what `make fuzz` does):
    python3 Tests/integration/posixdiff.py --engine both --count 2000
Engines: sqlite, redis, or both.
"""
import argparse
import ctypes
import errno
import grp
import hashlib
import mmap
import os
import pickle
import pwd
import random
import stat
import struct
import sys
import time

# An absolute symlink target outside both trees (normally missing).
DANGLING = "/nonexistent-stagefs"


def remove_dangling():
    try:
        os.unlink(DANGLING)
    except (FileNotFoundError, IsADirectoryError):
        pass

CHUNK = 64 << 20
OLD_TIME_LIMIT = 1_600_000_000  # explicit times are set before this; "now" is after it
SLOTS = 4

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE, FALLOC_ZERO_RANGE = 0x01, 0x02, 0x10


def fallocate(fd, mode, off, length):
    if _libc.fallocate(fd, mode, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def renameat2(src, dst, flags):
    if _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def errname(e):
    return errno.errorcode.get(e.errno, str(e.errno))


def norm_stat(st):
    """What must agree between two file systems: not inode numbers, devices, blocks, atime, or
    directory sizes (those are each file system's own), and mtime only when it was set
    explicitly to a time in the past (a time taken from the clock cannot agree)."""
    out = {
        "type": stat.S_IFMT(st.st_mode),
        "mode": oct(stat.S_IMODE(st.st_mode)),
        "nlink": st.st_nlink,
        "uid": st.st_uid,
        "gid": st.st_gid,
    }
    if not stat.S_ISDIR(st.st_mode):
        out["size"] = st.st_size
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        out["rdev"] = st.st_rdev
    # FIFO data never reaches a FUSE server, so writes to a FIFO cannot update its times.
    if st.st_mtime_ns < OLD_TIME_LIMIT * 10**9 and not stat.S_ISFIFO(st.st_mode):
        out["mtime"] = st.st_mtime_ns
    return out


def digest(b):
    return (len(b), hashlib.sha256(b).hexdigest()[:16])


class Worker:
    """A child process with the uid, gid and groups of one user that applies operations to
    the oracle tree and to the StageFS tree; it keeps the open file descriptors of both."""

    def __init__(self, user, roots):
        self.user = user
        self.roots = roots
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(w1)
            os.close(r2)
            code = 0
            try:
                self._child(r1, w2)
            except BaseException:  # noqa: BLE001
                code = 1
            os._exit(code)
        os.close(r1)
        os.close(w2)
        self.wfd, self.rfd = w1, r2

    # -- plumbing

    @staticmethod
    def _send(fd, obj):
        data = pickle.dumps(obj)
        data = struct.pack("<I", len(data)) + data
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    @staticmethod
    def _recv(fd):
        def exact(n):
            parts = []
            while n:
                b = os.read(fd, n)
                if not b:
                    raise EOFError("worker pipe closed")
                parts.append(b)
                n -= len(b)
            return b"".join(parts)

        (n,) = struct.unpack("<I", exact(4))
        return pickle.loads(exact(n))

    def call(self, root_index, op):
        self._send(self.wfd, (root_index, op))
        return self._recv(self.rfd)

    def stop(self):
        try:
            self._send(self.wfd, None)
        except OSError:
            pass
        os.close(self.wfd)
        os.close(self.rfd)
        os.waitpid(self.pid, 0)

    def _child(self, rfd, wfd):
        if self.user != "root":
            pw = pwd.getpwnam(self.user)
            os.setgroups(os.getgrouplist(self.user, pw.pw_gid))
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
        os.umask(0o022)
        self.fds = {}
        while True:
            msg = self._recv(rfd)
            if msg is None:
                return
            r, op = msg
            self._send(wfd, self.apply(r, op))

    # -- applying one operation

    def involved(self, r, op):
        """Paths (and the descriptor) whose times the operation may change."""
        name, args = op[0], op[1:]
        keys = []
        if name in FD_OPS:
            keys.append(("fd", args[0]))
        for p in PATH_ARGS.get(name, ()):
            rel = args[p]
            keys.append(("p", rel))
            keys.append(("p", os.path.dirname(rel)))
        return keys

    def times(self, r, keys):
        out = {}
        for k in keys:
            try:
                if k[0] == "fd":
                    fd = self.fds.get((r, k[1]))
                    st = os.fstat(fd) if fd is not None else None
                else:
                    st = os.lstat(os.path.join(self.roots[r], k[1]))
            except OSError:
                st = None
            # FIFO data never reaches a FUSE server, so it cannot update their times: skip them.
            out[k] = None if st is None or stat.S_ISFIFO(st.st_mode) else (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        return out

    def apply(self, r, op):
        keys = self.involved(r, op)
        before = self.times(r, keys)
        try:
            res = ("ok", getattr(self, "op_" + op[0])(r, self.roots[r], *op[1:]))
        except OSError as e:
            res = ("err", errname(e))
        after = self.times(r, keys)
        changed = {}
        for k in keys:
            b, a = before[k], after[k]
            if b is not None and a is not None:
                if a[0] != b[0]:
                    changed[k] = "another inode"  # a rename replaced it: its times say nothing
                else:
                    changed[k] = ("mtime" if a[1] != b[1] else "") + ("ctime" if a[2] != b[2] else "")
        return res, changed

    def fd(self, r, slot):
        fd = self.fds.get((r, slot))
        if fd is None:
            raise OSError(errno.EBADF, "no such slot")
        return fd

    def op_open(self, r, root, slot, p, flags, mode):
        old = self.fds.pop((r, slot), None)
        if old is not None:
            os.close(old)
        self.fds[(r, slot)] = os.open(os.path.join(root, p), flags | os.O_NONBLOCK, mode)

    def op_close(self, r, root, slot):
        os.close(self.fd(r, slot))
        del self.fds[(r, slot)]

    def op_pwrite(self, r, root, slot, off, data):
        return os.pwrite(self.fd(r, slot), data, off)

    def op_write(self, r, root, slot, data):
        return os.write(self.fd(r, slot), data)

    def op_pread(self, r, root, slot, off, n):
        return digest(os.pread(self.fd(r, slot), n, off))

    def op_read(self, r, root, slot, n):
        return digest(os.read(self.fd(r, slot), n))

    def op_lseek(self, r, root, slot, off, whence):
        fd = self.fd(r, slot)
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            return "directory: not compared"  # FUSE's kernel side answers this itself
        return os.lseek(fd, off, whence)

    def op_ftruncate(self, r, root, slot, size):
        os.ftruncate(self.fd(r, slot), size)

    def op_fstat(self, r, root, slot):
        return norm_stat(os.fstat(self.fd(r, slot)))

    def op_fsync(self, r, root, slot):
        os.fsync(self.fd(r, slot))

    def op_futimens(self, r, root, slot, ns):
        os.utime(self.fd(r, slot), ns=ns) if ns else os.utime(self.fd(r, slot))

    def op_fchmod(self, r, root, slot, mode):
        os.fchmod(self.fd(r, slot), mode)

    def op_truncate(self, r, root, p, size):
        os.truncate(os.path.join(root, p), size)

    def op_fallocate(self, r, root, slot, mode, off, length):
        fallocate(self.fd(r, slot), mode, off, length)

    def op_copyrange(self, r, root, slot, dst_slot, off, dst_off, n):
        return os.copy_file_range(self.fd(r, slot), self.fd(r, dst_slot), n, off, dst_off)

    # The same through paths (opened and closed by the operation), so that they meet files
    # more often than the descriptor slots do.
    def op_fallocatep(self, r, root, p, mode, off, length):
        fd = os.open(os.path.join(root, p), os.O_RDWR | os.O_NONBLOCK)
        try:
            fallocate(fd, mode, off, length)
        finally:
            os.close(fd)

    def op_copyrangep(self, r, root, src, dst, off, dst_off, n):
        fi = os.open(os.path.join(root, src), os.O_RDONLY | os.O_NONBLOCK)
        try:
            fo = os.open(os.path.join(root, dst), os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK, 0o644)
            try:
                return os.copy_file_range(fi, fo, n, off, dst_off)
            finally:
                os.close(fo)
        finally:
            os.close(fi)

    def op_mmapp(self, r, root, p, off, data):
        fd = os.open(os.path.join(root, p), os.O_RDWR | os.O_NONBLOCK)
        try:
            self.fds[(r, "m")] = fd
            return self.op_mmapwrite(r, root, "m", off, data)
        finally:
            del self.fds[(r, "m")]
            os.close(fd)

    def mapped(self, r, slot, writable):
        """A shared mapping of the whole file (None for an empty or non-regular one)."""
        fd = self.fd(r, slot)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            return None, 0
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        return mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, prot), st.st_size

    def op_mmapwrite(self, r, root, slot, off, data):
        m, size = self.mapped(r, slot, True)
        if m is None:
            return "nothing mapped"
        n = max(0, min(len(data), size - off))
        m[off:off + n] = data[:n]
        m.flush()
        m.close()
        return n

    def op_mmapread(self, r, root, slot, off, n):
        m, size = self.mapped(r, slot, False)
        if m is None:
            return "nothing mapped"
        out = digest(m[off:off + n])
        m.close()
        return out

    def op_mkdir(self, r, root, p, mode):
        os.mkdir(os.path.join(root, p), mode)

    def op_rmdir(self, r, root, p):
        os.rmdir(os.path.join(root, p))

    def op_unlink(self, r, root, p):
        os.unlink(os.path.join(root, p))

    def op_rename(self, r, root, src, dst, flags):
        if flags:
            renameat2(os.path.join(root, src), os.path.join(root, dst), flags)
        else:
            os.rename(os.path.join(root, src), os.path.join(root, dst))

    def op_link(self, r, root, src, dst):
        os.link(os.path.join(root, src), os.path.join(root, dst), follow_symlinks=False)

    def op_symlink(self, r, root, target, p):
        os.symlink(target, os.path.join(root, p))

    def op_readlink(self, r, root, p):
        return os.readlink(os.path.join(root, p))

    def op_mkfifo(self, r, root, p, mode):
        os.mkfifo(os.path.join(root, p), mode)

    def op_chmod(self, r, root, p, mode):
        os.chmod(os.path.join(root, p), mode)

    def op_chown(self, r, root, p, uid, gid):
        os.chown(os.path.join(root, p), uid, gid, follow_symlinks=False)

    def op_utime(self, r, root, p, ns):
        if ns:
            os.utime(os.path.join(root, p), ns=ns)
        else:
            os.utime(os.path.join(root, p))

    def op_stat(self, r, root, p):
        return norm_stat(os.stat(os.path.join(root, p)))

    def op_lstat(self, r, root, p):
        return norm_stat(os.lstat(os.path.join(root, p)))

    def op_listdir(self, r, root, p):
        return sorted(os.listdir(os.path.join(root, p)))

    def op_setxattr(self, r, root, p, name, value, flags, follow):
        os.setxattr(os.path.join(root, p), name, value, flags, follow_symlinks=follow)

    def op_getxattr(self, r, root, p, name, follow):
        return os.getxattr(os.path.join(root, p), name, follow_symlinks=follow)

    def op_listxattr(self, r, root, p, follow):
        return sorted(os.listxattr(os.path.join(root, p), follow_symlinks=follow))

    def op_removexattr(self, r, root, p, name, follow):
        os.removexattr(os.path.join(root, p), name, follow_symlinks=follow)

    def op_access(self, r, root, p, mode):
        return os.access(os.path.join(root, p), mode)

    @staticmethod
    def redirect(path, data, flag):
        """What a shell redirect does: open (creating) with `flag`, write, close."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | flag | os.O_NONBLOCK, 0o666)
        try:
            return os.write(fd, data)
        finally:
            os.close(fd)

    def op_writefile(self, r, root, p, data):
        """`echo data > p`."""
        return self.redirect(os.path.join(root, p), data, os.O_TRUNC)

    def op_appendfile(self, r, root, p, data):
        """`echo data >> p`."""
        return self.redirect(os.path.join(root, p), data, os.O_APPEND)

    def op_readfile(self, r, root, p):
        fd = os.open(os.path.join(root, p), os.O_RDONLY | os.O_NONBLOCK)
        try:
            h = hashlib.sha256()
            n = 0
            while True:
                b = os.read(fd, 1 << 20)
                if not b:
                    break
                h.update(b)
                n += len(b)
                if n > 256 << 20:
                    break
            return (n, h.hexdigest()[:16])
        finally:
            os.close(fd)

    def op_umask(self, r, root, mask):
        os.umask(mask)

    def op_copyp(self, r, root, src, dst, data, ns):
        """What `cp -p` does: create, write, set the times on the open file, close."""
        fd = os.open(os.path.join(root, dst), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NONBLOCK, 0o644)
        try:
            os.write(fd, data)
            os.utime(fd, ns=ns)
        finally:
            os.close(fd)


FD_OPS = {"close", "pwrite", "write", "pread", "read", "lseek", "ftruncate", "fstat", "fsync", "futimens", "fchmod", "fallocate",
          "copyrange", "mmapwrite", "mmapread"}
# Operation -> positions (after the name) of its path arguments.
PATH_ARGS = {
    "open": (1,), "truncate": (0,), "mkdir": (0,), "rmdir": (0,), "unlink": (0,), "rename": (0, 1),
    "link": (0, 1), "symlink": (1,), "readlink": (0,), "mkfifo": (0,), "chmod": (0,), "chown": (0,),
    "utime": (0,), "stat": (0,), "lstat": (0,), "listdir": (0,), "setxattr": (0,), "getxattr": (0,),
    "listxattr": (0,), "removexattr": (0,), "access": (0,), "writefile": (0,), "appendfile": (0,),
    "readfile": (0,), "copyp": (1,), "fallocatep": (0,), "copyrangep": (0, 1), "mmapp": (0,),
}


class Generator:
    """Random operations over a small set of names, so that they collide often."""

    def __init__(self, seed, base, users, block_size):
        self.rng = random.Random(seed)
        self.base = base
        self.users = users  # name -> (uid, gid)
        self.block = block_size
        self.existing = []  # relative paths that exist in the oracle (refreshed by the driver)
        self.sizes = {}
        self.names = ["a", "b", "c", "dd", "e f", "x" * 255, "y" * 256, "é"]

    def path(self):
        rng = self.rng
        if self.existing and rng.random() < 0.65:
            return rng.choice(self.existing)
        dirs = [self.base] + [q for q in self.existing if self.is_dir.get(q)]
        parent = rng.choice(dirs) if rng.random() < 0.8 else rng.choice(self.existing or [self.base]) + "/sub"
        return parent + "/" + rng.choice(self.names)

    def offset(self, p=None):
        rng = self.rng
        d = rng.choice([-3, -1, 0, 0, 1, 2, rng.randrange(-5000, 5000)])
        size = self.sizes.get(p, 0)
        points = [0, rng.randrange(0, 100_000), 4096, 65536, self.block, 2 * self.block, size, size]
        if rng.random() < 0.08:
            points += [CHUNK, CHUNK - self.block, 2 * CHUNK, CHUNK + self.block]
        return max(0, rng.choice(points) + d)

    def data(self):
        rng = self.rng
        x = rng.random()
        if x < 0.7:
            n = rng.randrange(1, 5000)
        elif x < 0.9:
            n = rng.randrange(5000, 70_000)
        elif x < 0.98:
            n = rng.randrange(70_000, 300_000)
        else:
            n = rng.randrange(self.block, self.block + 300_000)
        return rng.randbytes(n)

    def size(self, p=None):
        rng = self.rng
        if rng.random() < 0.03:
            return rng.choice([1 << 40, 3 * CHUNK + 5])
        return self.offset(p)

    def mode(self):
        rng = self.rng
        if rng.random() < 0.5:
            return rng.choice([0o644, 0o755, 0o600, 0o700, 0o777, 0o666, 0o000, 0o4755, 0o2755, 0o6777,
                               0o1777, 0o2770, 0o4777, 0o2711, 0o3777, 0o2775, 0o444, 0o555, 0o711])
        return rng.randrange(0, 0o10000)

    def times(self):
        rng = self.rng
        if rng.random() < 0.3:
            return None
        return (rng.randrange(10**9, 15 * 10**8) * 10**9 + rng.randrange(10**9),
                rng.randrange(10**9, 15 * 10**8) * 10**9 + rng.randrange(10**9))

    def xname(self):
        return self.rng.choice(["user.a", "user.b", "user.long" + "z" * 200, "trusted.t", "security.s", "bogus.x", "user."])

    def op(self):
        rng = self.rng
        p = self.path
        kind = rng.choices(
            ["open", "close", "pwrite", "write", "pread", "read", "ftruncate", "fstat", "fsync", "futimens",
             "fchmod", "truncate", "mkdir", "rmdir", "unlink", "rename", "link", "symlink", "readlink",
             "mkfifo", "chmod", "chown", "utime", "stat", "lstat", "listdir", "setxattr", "getxattr",
             "listxattr", "removexattr", "access", "writefile", "appendfile", "readfile", "umask", "lseek",
             "copyp", "fallocate", "copyrange", "mmapwrite", "mmapread", "fallocatep", "copyrangep", "mmapp"],
            weights=[10, 5, 10, 6, 4, 2, 3, 3, 1, 2,
                     1, 3, 6, 3, 4, 6, 3, 3, 1,
                     1, 4, 2, 2, 3, 2, 2, 3, 2,
                     1, 2, 2, 6, 3, 3, 1, 1,
                     2, 2, 2, 1, 1, 4, 4, 3])[0]
        slot = rng.randrange(SLOTS)
        if kind == "open":
            acc = rng.choice([os.O_RDONLY, os.O_WRONLY, os.O_RDWR, os.O_RDWR])
            extra = 0
            for f, pr in ((os.O_CREAT, 0.5), (os.O_EXCL, 0.2), (os.O_TRUNC, 0.3), (os.O_APPEND, 0.2), (os.O_DIRECTORY, 0.03)):
                if rng.random() < pr:
                    extra |= f
            return ("open", slot, p(), acc | extra, self.mode())
        if kind in ("close", "fstat", "fsync"):
            return (kind, slot)
        if kind == "pwrite":
            q = p()
            return ("pwrite", slot, self.offset(q), self.data())
        if kind == "write":
            return ("write", slot, self.data())
        if kind == "pread":
            return ("pread", slot, self.offset(), rng.choice([1, 100, 4096, 70_000, 1 << 20]))
        if kind == "read":
            return ("read", slot, rng.choice([1, 4096, 70_000]))
        if kind == "lseek":
            return ("lseek", slot, self.offset(), rng.choice([os.SEEK_SET, os.SEEK_CUR, os.SEEK_END]))
        if kind == "ftruncate":
            return ("ftruncate", slot, self.size())
        if kind == "fallocate":
            mode = rng.choice([0, FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE, FALLOC_ZERO_RANGE,
                               FALLOC_ZERO_RANGE | FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE])
            return ("fallocate", slot, mode, self.offset(), rng.choice([0, 1, 100, 4096, 70_000, self.block + 3, CHUNK + 5]))
        if kind == "copyrange":
            return ("copyrange", slot, rng.randrange(SLOTS), self.offset(), self.offset(), rng.choice([0, 1, 100, 5000, 70_000, self.block + 7]))
        if kind == "fallocatep":
            q = p()
            mode = rng.choice([0, FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE, FALLOC_ZERO_RANGE, FALLOC_ZERO_RANGE | FALLOC_KEEP_SIZE])
            return ("fallocatep", q, mode, self.offset(q), rng.choice([1, 100, 4096, 70_000, self.block + 3, CHUNK + 5]))
        if kind == "copyrangep":
            q = p()
            return ("copyrangep", q, p(), self.offset(q), self.offset(), rng.choice([1, 100, 5000, 70_000, self.block + 7, 3 * self.block]))
        if kind == "mmapp":
            q = p()
            return ("mmapp", q, self.offset(q), self.data()[:200_000])
        if kind == "mmapwrite":
            return ("mmapwrite", slot, self.offset(), self.data()[:70_000])
        if kind == "mmapread":
            return ("mmapread", slot, self.offset(), rng.choice([1, 100, 4096, 70_000]))
        if kind == "futimens":
            return ("futimens", slot, self.times())
        if kind == "fchmod":
            return ("fchmod", slot, self.mode())
        if kind == "truncate":
            q = p()
            return ("truncate", q, self.size(q))
        if kind in ("mkdir", "mkfifo"):
            return (kind, p(), self.mode())
        if kind in ("rmdir", "unlink", "readlink", "stat", "lstat", "listdir", "readfile"):
            return (kind, p())
        if kind == "rename":
            flags = rng.choices([0, RENAME_NOREPLACE, RENAME_EXCHANGE], weights=[8, 1, 1])[0]
            return ("rename", p(), p(), flags)
        if kind == "link":
            return ("link", p(), p())
        if kind == "symlink":
            target = rng.choice(["a", "b", "dd/c", DANGLING, "t" * 4095, "x" * 255, "c"])
            return ("symlink", target, p())
        if kind == "chmod":
            return ("chmod", p(), self.mode())
        if kind == "chown":
            uids = [-1, -1] + [u for u, _ in self.users.values()]
            gids = [-1, -1] + [g for _, g in self.users.values()] + [self.shared_gid]
            return ("chown", p(), rng.choice(uids), rng.choice(gids))
        if kind == "utime":
            return ("utime", p(), self.times())
        if kind == "setxattr":
            flags = rng.choice([0, 0, os.XATTR_CREATE, os.XATTR_REPLACE])
            return ("setxattr", p(), self.xname(), rng.randbytes(rng.choice([0, 1, 30, 300])), flags, rng.random() < 0.8)
        if kind in ("getxattr", "removexattr"):
            return (kind, p(), self.xname(), rng.random() < 0.8)
        if kind == "listxattr":
            return ("listxattr", p(), rng.random() < 0.8)
        if kind == "access":
            return ("access", p(), rng.choice([os.F_OK, os.R_OK, os.W_OK, os.X_OK, os.R_OK | os.W_OK]))
        if kind in ("writefile", "appendfile"):
            return (kind, p(), self.data())
        if kind == "umask":
            return ("umask", rng.choice([0o022, 0o002, 0o077, 0o000]))
        if kind == "copyp":
            ns = self.times() or (1_234_567_890_123_456_789, 1_234_567_890_987_654_321)
            return ("copyp", "", p(), self.data(), ns)
        raise AssertionError(kind)


def run_seeds(driver, seeds, length, max_failures=3):
    """Runs the sequences of `seeds` (the driver is closed at the end); the mismatches found,
    stopping at `max_failures`."""
    failures = []
    try:
        for seed in seeds:
            try:
                driver.run(seed, length)
            except Mismatch as e:
                failures.append(str(e))
                if len(failures) >= max_failures:
                    break
    finally:
        driver.close()
    return failures


class Mismatch(AssertionError):
    pass


def describe(op):
    out = []
    for a in op:
        if isinstance(a, (bytes, bytearray)):
            out.append(f"<{len(a)} bytes>")
        elif isinstance(a, str) and len(a) > 40:
            out.append(f"{a[:6]}...({len(a)} chars)")
        elif isinstance(a, int) and a > 7 and a < 0o10000 and op[0] in ("chmod", "fchmod", "mkdir", "mkfifo", "umask"):
            out.append(oct(a))
        else:
            out.append(repr(a))
    return "(" + ", ".join(out) + ")"


def tree(root, base, samples):
    """Everything that must agree about the tree under root/base, read as root. `samples`
    holds, per huge file, the offsets to compare (taken from the oracle, filled in when empty)."""
    entries = {}
    inodes = {}
    top = os.path.join(root, base)
    for dirpath, dirnames, filenames in os.walk(top):
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            e = norm_stat(st)
            inodes.setdefault(st.st_ino, []).append(rel)
            if stat.S_ISREG(st.st_mode):
                e["content"] = file_digest(full, st.st_size, samples, rel)
            elif stat.S_ISLNK(st.st_mode):
                e["target"] = os.readlink(full)
            try:
                xs = sorted(os.listxattr(full, follow_symlinks=False))
                e["xattrs"] = {x: os.getxattr(full, x, follow_symlinks=False) for x in xs}
            except OSError as ex:
                e["xattrs"] = errname(ex)
            entries[rel] = e
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    links = sorted(sorted(v) for v in inodes.values() if len(v) > 1)
    return entries, links


def file_digest(path, size, samples, rel):
    """Whole content up to 300 MiB; beyond that (huge sparse files) the data regions the
    oracle reports (SEEK_DATA) and the first and last MiB."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= 300 << 20:
            while True:
                b = f.read(1 << 20)
                if not b:
                    break
                h.update(b)
            return h.hexdigest()[:16]
        if rel not in samples:
            samples[rel] = sample_offsets(path, size)
        for off in samples[rel]:
            f.seek(off)
            h.update(struct.pack("<Q", off) + f.read(1 << 20))
    return h.hexdigest()[:16]


def sample_offsets(path, size):
    offs = {0, max(0, size - (1 << 20))}
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            pos = 0
            while len(offs) < 64:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
                offs.add(pos & ~((1 << 20) - 1))
                pos = os.lseek(fd, pos, os.SEEK_HOLE)
        finally:
            os.close(fd)
    except OSError:
        pass
    return sorted(offs)


class Driver:
    """Runs sequences on (oracle root, StageFS root) with one worker per user."""

    def __init__(self, oracle, fs, users, shared_group, block_size, verbose=False):
        self.roots = [oracle, fs]
        self.users = {u: (pwd.getpwnam(u).pw_uid, pwd.getpwnam(u).pw_gid) for u in users}
        self.shared_gid = grp.getgrnam(shared_group).gr_gid
        self.block = block_size
        self.verbose = verbose
        self.workers = {u: Worker(u, self.roots) for u in list(users) + ["root"]}
        self.ops_run = 0

    def close(self):
        for w in self.workers.values():
            w.stop()
        remove_dangling()

    def run(self, seed, length=40):
        # A write as root through the dangling absolute symlink target creates it on the host,
        # where the oracle and the mount would then share it: start every sequence without it.
        remove_dangling()
        base = f"s{seed}"
        gen = Generator(seed, base, self.users, self.block)
        gen.shared_gid = gen_shared = self.shared_gid
        gen.is_dir = {}
        names = list(self.users)
        history = []
        owner = names[0]
        dir_mode = gen.rng.choice([0o777, 0o1777, 0o2777, 0o755, 0o3777])
        setup = [(u, ("umask", 0o022)) for u in names + ["root"]]
        setup += [(owner, ("mkdir", base, 0o700)), (owner, ("chown", base, -1, gen_shared)), (owner, ("chmod", base, dir_mode))]
        ops = setup + [(self.pick_user(gen.rng, names), None) for _ in range(length)]
        try:
            self.run_ops(seed, gen, base, ops, history)
        finally:
            # Close what is open (data durable), even after a mismatch.
            for user in names + ["root"]:
                for slot in range(SLOTS):
                    for r in (0, 1):
                        self.workers[user].call(r, ("close", slot))
        samples = {}
        ta = tree(self.roots[0], base, samples)
        tb = tree(self.roots[1], base, samples)
        if ta != tb:
            raise Mismatch(self.report(seed, history, "final trees differ:\n" + tree_diff(ta, tb)))

    def run_ops(self, seed, gen, base, ops, history):
        for i, (user, op) in enumerate(ops):
            if op is None:
                op = gen.op()
                if self.fuse_limit(user, op):
                    continue
            history.append((user, op))
            w = self.workers[user]
            a = w.call(0, op)
            b = w.call(1, op)
            self.ops_run += 1
            if self.verbose:
                print(f"  [{i}] {user} {describe(op)} -> {a[0]} {a[1] if a[1] else ''}")
            if a != b:
                raise Mismatch(self.report(seed, history, f"operation {i}: oracle {a}\n  stagefs {b}"))
            self.refresh(gen, base)

    def fuse_limit(self, user, op):
        """Operations whose result the FUSE kernel module decides differently from ext4 before
        any file system sees them (README, "Known differences from ext4"): chown(-1, -1) by a
        non-owner outside the group of a set-group-ID file without group execute."""
        if op[0] != "chown" or op[2] != -1 or op[3] != -1 or user == "root":
            return False
        try:
            st = os.stat(os.path.join(self.roots[0], op[1]), follow_symlinks=False)
        except OSError:
            return False
        uid, _ = self.users[user]
        groups = os.getgrouplist(user, self.users[user][1])
        return (st.st_mode & 0o2010 == 0o2000 and st.st_uid != uid and st.st_gid not in groups)

    @staticmethod
    def pick_user(rng, names):
        x = rng.random()
        if x < 0.05:
            return "root"
        return names[0] if x < 0.7 else names[1 % len(names)]

    def refresh(self, gen, base):
        existing = []
        gen.is_dir = {}
        gen.sizes = {}
        top = os.path.join(self.roots[0], base)
        for dirpath, dirnames, filenames in os.walk(top):
            for name in dirnames + filenames:
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, self.roots[0])
                existing.append(rel)
                try:
                    st = os.lstat(full)
                except OSError:
                    continue
                gen.is_dir[rel] = stat.S_ISDIR(st.st_mode)
                gen.sizes[rel] = st.st_size
        existing.sort()
        gen.existing = existing

    def report(self, seed, history, what):
        lines = [f"seed {seed}: {what}", "  operations (user, op):"]
        for i, (u, op) in enumerate(history[-25:], start=max(0, len(history) - 25)):
            lines.append(f"    [{i}] {u} {describe(op)}")
        lines.append(f"  replay: python3 Tests/integration/posixdiff.py --seed {seed} --engine <sqlite|redis> --verbose")
        return "\n".join(lines)


def tree_diff(ta, tb):
    (ea, la), (eb, lb) = ta, tb
    out = []
    for k in sorted(set(ea) | set(eb)):
        if ea.get(k) != eb.get(k):
            out.append(f"  {k}:\n    oracle  {ea.get(k)}\n    stagefs {eb.get(k)}")
    if la != lb:
        out.append(f"  hard links: oracle {la} stagefs {lb}")
    return "\n".join(out[:20])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=["sqlite", "redis", "both"], default="both")
    ap.add_argument("--seed", type=int, help="run this one sequence")
    ap.add_argument("--count", type=int, default=200, help="sequences per engine (default 200)")
    ap.add_argument("--start", type=int, help="first seed (default: random)")
    ap.add_argument("--length", type=int, default=40, help="operations per sequence")
    ap.add_argument("--stagefs-bin", default=".build/release/stagefs")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import helpers

    env = helpers.standalone(args.stagefs_bin, "posixdiff")
    redis = moto = None
    failures = 0
    try:
        engines = ["sqlite", "redis"] if args.engine == "both" else [args.engine]
        seeds = [args.seed] if args.seed is not None else None
        start = args.start if args.start is not None else random.randrange(1, 1 << 30)
        for engine in engines:
            if engine.startswith("redis") and redis is None:
                redis, moto = helpers.Redis(env.root), helpers.Moto()
            kind = {"sqlite": "sqlite-local", "redis": "redis-s3"}[engine]
            vol = helpers.make_volume(env, kind, redis, moto, f"diff-{engine}")
            oracle = env.dir_for("root", "oracle")
            os.chmod(oracle, 0o777)
            d = Driver(oracle, vol.mnt, [helpers.USER, helpers.OTHER], helpers.SHARED_GROUP, vol.block_size, verbose=args.verbose)
            t0 = time.time()
            before = failures
            try:
                for seed in seeds or range(start, start + args.count):
                    try:
                        d.run(seed, args.length)
                    except Mismatch as e:
                        failures += 1
                        print(f"{engine}: {e}\n", flush=True)
                        if args.seed is not None:
                            break
            finally:
                d.close()
                vol.umount(vol.mnt)
            n = len(seeds) if seeds else args.count
            print(f"{engine}: {n} sequences from seed {seeds[0] if seeds else start}, {d.ops_run} operations, "
                  f"{failures - before} failed, {time.time() - t0:.0f} s", flush=True)
    finally:
        helpers.stop_all(env, redis, moto)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
