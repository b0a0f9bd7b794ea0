"""POSIX behaviour through a real FUSE mount made by an unprivileged user, on SQLite + local
directory and on Redis + S3 (moto)."""
import errno
import fcntl
import hashlib
import os
import random
import stat
import subprocess
import threading
import time

import pytest

import datafuzz
import helpers
from helpers import OTHER, USER, run_as


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def test_mount_is_owned_by_the_user_not_root(volume):
    pid = helpers.mount_pid(volume.mnt)
    assert pid, "mount process found"
    with open(f"/proc/{pid}/status") as f:
        uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
    assert int(uids[0]) != 0 and int(uids[1]) != 0, "the mount runs without root"


def test_big_file_roundtrip_sha256(volume, workdir, tmp_path):
    src = os.path.join(volume.base, "big.src")

    def write():
        rnd = random.Random(7)
        h = hashlib.sha256()
        with open(src, "wb") as f:
            for _ in range(200):
                b = rnd.randbytes(1 << 20)
                f.write(b)
                h.update(b)
        dst = os.path.join(workdir, "big")
        with open(src, "rb") as fi, open(dst, "wb") as fo:
            while True:
                b = fi.read(1 << 20)
                if not b:
                    break
                fo.write(b)
        return h.hexdigest()

    want = run_as(USER, write)
    assert run_as(USER, sha256_file, os.path.join(workdir, "big")) == want
    assert os.stat(os.path.join(workdir, "big")).st_size == 200 << 20
    os.unlink(src)


def test_random_overwrites_match_a_local_copy(volume, workdir):
    path = os.path.join(workdir, "rw")
    local = os.path.join(volume.base, "rw.local")

    def work():
        rnd = random.Random(11)
        size = 70 << 20  # crosses the 64 MiB chunk boundary
        data = rnd.randbytes(size)
        with open(path, "wb") as f:
            f.write(data)
        with open(local, "wb") as f:
            f.write(data)
        fd = os.open(path, os.O_RDWR)
        ld = os.open(local, os.O_RDWR)
        for i in range(300):
            off = rnd.randrange(0, size + (4 << 20))
            n = rnd.choice([1, 17, 4096, 65536, 1 << 20, 3 << 20])
            buf = rnd.randbytes(n)
            os.pwrite(fd, buf, off)
            os.pwrite(ld, buf, off)
            if i % 50 == 0:  # reads in between see the writes
                assert os.pread(fd, 4096, off) == os.pread(ld, 4096, off)
        os.close(fd)
        os.close(ld)
        return sha256_file(local), os.stat(local).st_size

    want, size = run_as(USER, work)
    assert os.stat(path).st_size == size
    assert run_as(USER, sha256_file, path) == want
    os.unlink(local)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_data_matches_a_model_under_writes_truncates_fallocate_copies_and_mmap(volume, workdir, seed):
    """datafuzz.py: random writes, truncates, fallocate (each mode), copy_file_range, clones and
    shared mmap writes on three files, checked byte for byte against a model (`make fuzz` runs
    more)."""
    d = os.path.join(workdir, f"fuzz{seed}")
    run_as(USER, os.mkdir, d)
    run_as(USER, datafuzz.run, d, seed, 120, True, volume.env.bin, volume.meta_url)


def test_truncate_down_and_up(volume, workdir):
    path = os.path.join(workdir, "t")

    def work():
        data = os.urandom(70 << 20)
        with open(path, "wb") as f:
            f.write(data)
        os.truncate(path, (5 << 20) + 123)
        with open(path, "rb") as f:
            assert f.read() == data[:(5 << 20) + 123]
        os.truncate(path, 72 << 20)
        with open(path, "rb") as f:
            got = f.read()
        assert len(got) == 72 << 20
        assert got[:(5 << 20) + 123] == data[:(5 << 20) + 123]
        assert got[(5 << 20) + 123:] == bytes((72 << 20) - (5 << 20) - 123), "extended part reads as zeros"
        with open(path, "r+b") as f:  # ftruncate through an open file, then write past the end
            f.truncate(10)
            f.seek(100)
            f.write(b"tail")
        with open(path, "rb") as f:
            return f.read()

    got = run_as(USER, work)
    assert len(got) == 104 and got[10:100] == bytes(90) and got[100:] == b"tail"


def test_sparse_file_reads_zeros(volume, workdir):
    path = os.path.join(workdir, "sparse")

    def work():
        with open(path, "wb") as f:
            f.seek(100 << 20)
            f.write(b"end")
        with open(path, "rb") as f:
            f.seek((100 << 20) - 5)
            return f.read(), os.stat(path).st_size

    got, size = run_as(USER, work)
    assert size == (100 << 20) + 3
    assert got == bytes(5) + b"end"


def test_hard_links_and_counts(volume, workdir):
    a, b, c = (os.path.join(workdir, n) for n in "abc")

    def work():
        with open(a, "w") as f:
            f.write("linked")
        os.link(a, b)
        os.link(b, c)
        counts = [os.stat(p).st_nlink for p in (a, b, c)]
        same = os.stat(a).st_ino == os.stat(c).st_ino
        os.unlink(a)
        after = os.stat(b).st_nlink
        with open(c) as f:
            content = f.read()
        return counts, same, after, content

    counts, same, after, content = run_as(USER, work)
    assert counts == [3, 3, 3] and same
    assert after == 2 and content == "linked"
    d = os.path.join(workdir, "dir")
    run_as(USER, os.mkdir, d)
    with pytest.raises(PermissionError):
        run_as(USER, os.link, d, os.path.join(workdir, "dirlink"))
    assert os.stat(workdir).st_nlink == 3, "a subdirectory adds a link to its parent"


def test_symlinks(volume, workdir):
    target = os.path.join(workdir, "target")
    link = os.path.join(workdir, "link")

    def work():
        with open(target, "w") as f:
            f.write("via link")
        os.symlink("target", link)
        with open(link) as f:
            content = f.read()
        os.symlink("/nonexistent/dangling", os.path.join(workdir, "dangling"))
        return os.readlink(link), content, stat.S_ISLNK(os.lstat(link).st_mode), os.lstat(link).st_size

    rl, content, is_link, size = run_as(USER, work)
    assert rl == "target" and content == "via link" and is_link and size == 6
    assert not os.path.exists(os.path.join(workdir, "dangling"))
    assert os.path.islink(os.path.join(workdir, "dangling"))


def test_rename_over_existing_file(volume, workdir):
    a, b = os.path.join(workdir, "a"), os.path.join(workdir, "b")

    def work():
        with open(a, "w") as f:
            f.write("new")
        with open(b, "w") as f:
            f.write("old")
        ino = os.stat(a).st_ino
        os.rename(a, b)
        with open(b) as f:
            return f.read(), os.stat(b).st_ino == ino, os.path.exists(a), sorted(os.listdir(workdir))

    content, same, a_exists, names = run_as(USER, work)
    assert content == "new" and same and not a_exists and names == ["b"]
    sub = os.path.join(workdir, "sub")
    run_as(USER, os.mkdir, sub)
    run_as(USER, os.rename, b, os.path.join(sub, "moved"))
    assert os.listdir(sub) == ["moved"]
    with pytest.raises(OSError) as e:
        run_as(USER, os.rename, workdir, os.path.join(sub, "inside"))
    assert e.value.errno == errno.EINVAL


def test_unlink_while_open_keeps_data_until_close(volume, workdir):
    path = os.path.join(workdir, "ghost")

    def work():
        payload = os.urandom(5 << 20)
        with open(path, "wb") as f:
            f.write(payload)
        f = open(path, "rb")
        os.unlink(path)
        gone = not os.path.exists(path)
        f.seek(1 << 20)
        part = f.read(1 << 20)
        fstat_links = os.fstat(f.fileno()).st_nlink
        f.close()
        return gone, part == payload[1 << 20:2 << 20], fstat_links

    gone, same, links = run_as(USER, work)
    assert gone and same and links == 0


def test_non_owner_gets_the_errors_ext4_gives(volume, workdir):
    path = os.path.join(workdir, "mine")

    def create():
        with open(path, "w") as f:
            f.write("x")
        os.chmod(workdir, 0o777)

    run_as(USER, create)
    with pytest.raises(PermissionError) as e:
        run_as(OTHER, os.chmod, path, 0o777)
    assert e.value.errno == errno.EPERM
    with pytest.raises(PermissionError) as e:
        run_as(OTHER, os.chown, path, os.getuid(), -1)
    assert e.value.errno == errno.EPERM
    with pytest.raises(PermissionError) as e:
        run_as(USER, os.chown, path, 0, -1)
    assert e.value.errno == errno.EPERM, "only root may give a file away"
    with pytest.raises(PermissionError) as e:
        run_as(OTHER, lambda: open(path, "a"))
    assert e.value.errno == errno.EACCES
    # Sticky directory: others may not remove or rename the owner's file.
    run_as(USER, os.chmod, workdir, 0o1777)
    with pytest.raises(PermissionError) as e:
        run_as(OTHER, os.unlink, path)
    assert e.value.errno == errno.EPERM
    with pytest.raises(PermissionError) as e:
        run_as(OTHER, os.rename, path, os.path.join(workdir, "taken"))
    assert e.value.errno == errno.EPERM
    # Without write permission on the directory: EACCES.
    run_as(USER, os.chmod, workdir, 0o755)
    with pytest.raises(PermissionError) as e:
        run_as(OTHER, os.unlink, path)
    assert e.value.errno == errno.EACCES
    run_as(USER, os.unlink, path)


def test_setgid_directory_passes_its_group(volume, workdir):
    shared = os.path.join(workdir, "shared")
    other_gid = helpers.pwd.getpwnam(OTHER).pw_gid

    def setup():
        os.mkdir(shared, 0o777)

    run_as(USER, setup)
    os.chown(shared, -1, other_gid)  # as root, like an admin setting up a project directory
    os.chmod(shared, 0o2777)

    def create():
        p = os.path.join(shared, "f")
        with open(p, "w"):
            pass
        os.mkdir(os.path.join(shared, "d"))
        return os.stat(p).st_gid, os.stat(os.path.join(shared, "d")).st_mode

    gid, dmode = run_as(USER, create)
    assert gid == other_gid
    assert dmode & stat.S_ISGID


def test_fifo(volume, workdir):
    path = os.path.join(workdir, "pipe")
    run_as(USER, os.mkfifo, path, 0o666)
    assert stat.S_ISFIFO(os.stat(path).st_mode)
    got = {}

    def reader():
        with open(path, "rb") as f:
            got["data"] = f.read()

    t = threading.Thread(target=reader)
    t.start()
    with open(path, "wb") as f:
        f.write(b"through the fifo")
    t.join(10)
    assert got.get("data") == b"through the fifo"


def test_xattrs(volume, workdir):
    path = os.path.join(workdir, "x")

    def work():
        with open(path, "w"):
            pass
        os.setxattr(path, "user.project", b"climate")
        os.setxattr(path, "user.bin", bytes(range(256)))
        try:
            os.setxattr(path, "user.project", b"again", os.XATTR_CREATE)
            create_err = None
        except OSError as e:
            create_err = e.errno
        try:
            os.setxattr(path, "user.none", b"x", os.XATTR_REPLACE)
            replace_err = None
        except OSError as e:
            replace_err = e.errno
        names = sorted(os.listxattr(path))
        val = os.getxattr(path, "user.bin")
        os.removexattr(path, "user.project")
        try:
            os.getxattr(path, "user.project")
            missing = None
        except OSError as e:
            missing = e.errno
        return create_err, replace_err, names, val, missing

    create_err, replace_err, names, val, missing = run_as(USER, work)
    assert create_err == errno.EEXIST
    assert replace_err == errno.ENODATA
    assert names == ["user.bin", "user.project"]
    assert val == bytes(range(256))
    assert missing == errno.ENODATA


def test_a_mount_with_no_xattr_turns_extended_attributes_off(volume, workdir):
    """`mount --no-xattr`: every extended-attribute call fails with EOPNOTSUPP (the kernel stops
    asking the mount, as with JuiceFS's default); the attributes another mount set stay."""
    path = os.path.join(workdir, "x")
    run_as(USER, lambda: (open(path, "w").close(), os.setxattr(path, "user.kept", b"1")))
    other = volume.mount("--no-xattr")
    try:
        there = os.path.join(other, os.path.relpath(path, volume.mnt))

        def calls():
            out = {}
            for name, call in (("get", lambda: os.getxattr(there, "user.kept")), ("get-security", lambda: os.getxattr(there, "security.selinux")),
                               ("list", lambda: os.listxattr(there)), ("set", lambda: os.setxattr(there, "user.new", b"2")),
                               ("remove", lambda: os.removexattr(there, "user.kept"))):
                try:
                    call()
                    out[name] = 0
                except OSError as e:
                    out[name] = e.errno
            out["ls"] = subprocess.run(["ls", "-l", os.path.dirname(there)], capture_output=True, text=True).returncode
            return out

        got = run_as(USER, calls)
        assert got == {"get": errno.EOPNOTSUPP, "get-security": errno.EOPNOTSUPP, "list": errno.EOPNOTSUPP, "set": errno.EOPNOTSUPP,
                       "remove": errno.EOPNOTSUPP, "ls": 0}, got
        assert run_as(USER, lambda: os.listxattr(path)) == ["user.kept"]
    finally:
        volume.umount(other)


LOCK_HOLDER = r"""
import fcntl, os, sys, time
kind, path, ready = sys.argv[1], sys.argv[2], sys.argv[3]
fd = os.open(path, os.O_RDWR)
if kind == "flock":
    fcntl.flock(fd, fcntl.LOCK_EX)
else:
    fcntl.lockf(fd, fcntl.LOCK_EX, 100, 0)
open(ready, "w").close()
while not os.path.exists(sys.argv[4]):  # hold the lock until told to let go
    time.sleep(0.02)
"""


@pytest.mark.parametrize("kind", ["flock", "fcntl"])
def test_locks_between_two_processes(volume, workdir, kind):
    path = os.path.join(workdir, f"lock-{kind}")
    ready = os.path.join(volume.base, f"ready-{kind}-{os.getpid()}")
    run_as(USER, lambda: open(path, "w").close())
    os.chmod(volume.base, 0o777)
    release = ready + ".release"
    waiting = ready + ".waiting"
    holder = subprocess.Popen(["runuser", "-u", USER, "--", "python3", "-c", LOCK_HOLDER, kind, path, ready, release])
    try:
        deadline = time.time() + 20
        while not os.path.exists(ready) and time.time() < deadline:
            time.sleep(0.05)
        assert os.path.exists(ready), "the holder took its lock"

        def try_lock():
            fd = os.open(path, os.O_RDWR)
            try:
                if kind == "flock":
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                else:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 50)
                return None
            except OSError as e:
                return e.errno
            finally:
                os.close(fd)

        assert run_as(USER, try_lock) in (errno.EAGAIN, errno.EACCES), "a conflicting lock is refused"

        def wait_lock():
            fd = os.open(path, os.O_RDWR)
            open(waiting, "w").close()
            if kind == "flock":
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                fcntl.lockf(fd, fcntl.LOCK_EX, 10, 50)
            got = time.time()
            os.close(fd)
            return got

        import threading
        result = {}
        waiter = threading.Thread(target=lambda: result.setdefault("got", run_as(USER, wait_lock)))
        waiter.start()
        helpers.wait_until(lambda: os.path.exists(waiting), 20, "the second process to ask for the lock")
        released = time.time()
        open(release, "w").close()
        waiter.join(60)
        assert result.get("got", 0) >= released, "the blocking lock was granted only after the holder let go"
    finally:
        open(release, "w").close()
        holder.wait(30)
        for f in (ready, release, waiting):
            if os.path.exists(f):
                os.unlink(f)


LOCK_COUNTER = r"""
import fcntl, os, sys
kind, path, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
fd = os.open(path, os.O_RDWR)
for _ in range(rounds):
    if kind == "flock":
        fcntl.flock(fd, fcntl.LOCK_EX)
    else:
        fcntl.lockf(fd, fcntl.LOCK_EX)
    n = int(os.pread(fd, 32, 0) or b"0")
    os.pwrite(fd, b"%-31d" % (n + 1), 0)
    if kind == "flock":
        fcntl.flock(fd, fcntl.LOCK_UN)
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN)
"""


@pytest.mark.parametrize("kind", ["flock", "fcntl"])
def test_contended_locks_lose_no_update(volume, workdir, kind):
    """Four processes take turns at a counter under a blocking lock (waiters are woken by this
    mount's releases): every increment lands, none is lost to two holders at once."""
    path = os.path.join(workdir, f"counter-{kind}")
    run_as(USER, lambda: open(path, "w").close())
    procs = [subprocess.Popen(["runuser", "-u", USER, "--", "python3", "-c", LOCK_COUNTER, kind, path, "50"]) for _ in range(4)]
    for p in procs:
        assert p.wait(120) == 0
    assert int(run_as(USER, lambda: open(path, "rb").read())) == 200


def test_statfs(volume, workdir):
    before = os.statvfs(volume.mnt)
    assert before.f_bsize == 4096 and before.f_blocks > 0 and before.f_namemax == 255

    def many():
        for i in range(20):
            with open(os.path.join(workdir, f"s{i}"), "wb") as f:
                f.write(b"x" * 10000)

    run_as(USER, many)
    after = os.statvfs(volume.mnt)
    assert after.f_ffree <= before.f_ffree - 20
    assert (after.f_blocks - after.f_bfree) >= (before.f_blocks - before.f_bfree) + 20 * 3


def test_a_listing_shows_what_this_mount_changed_while_it_went_on(volume, workdir):
    """A listing goes on from pages the mount read ahead while the kernel took the ones before:
    what this mount changed meanwhile (modes, removals) must still show in the entries and
    attributes the rest of the listing hands the kernel, so a stat after it sees the changes."""
    d = os.path.join(workdir, "many")
    n = 3000

    def work():
        helpers.empty_files(d, n)
        with os.scandir(d) as it:
            first = next(it).name
            # (The first page is served and the next read ahead: change what they hold.)
            for i in range(n):
                name = f"f{i:04}"
                if name == first:
                    continue
                if i % 4 == 0:
                    os.unlink(os.path.join(d, name))
                elif i % 2 == 1:
                    os.chmod(os.path.join(d, name), 0o600)
            listed = [first] + [e.name for e in it]
        wrong = []
        for i in range(n):
            name = f"f{i:04}"
            try:
                mode = stat.S_IMODE(os.lstat(os.path.join(d, name)).st_mode)
            except FileNotFoundError:
                mode = None
            want = 0o644 if name == first or i % 4 == 2 else None if i % 4 == 0 else 0o600
            if mode != want:
                wrong.append((name, mode, want))
        return wrong, len(listed)

    wrong, count = run_as(USER, work)
    assert not wrong, f"{len(wrong)} stale after the listing, e.g. {wrong[:5]}"
    assert count >= n - n // 4, count


def test_directory_listing_and_permissions(volume, workdir):
    def work():
        for i in range(300):
            with open(os.path.join(workdir, f"e{i:03}"), "w"):
                pass
        os.mkdir(os.path.join(workdir, "private"), 0o700)
        return sorted(os.listdir(workdir))

    names = run_as(USER, work)
    assert len(names) == 301 and names[0] == "e000"
    with pytest.raises(PermissionError):
        run_as(OTHER, os.listdir, os.path.join(workdir, "private"))
    with pytest.raises(OSError) as e:
        run_as(USER, os.rmdir, workdir)
    assert e.value.errno == errno.ENOTEMPTY
