"""The trash through real mounts, as ordinary users: deleted and overwritten files wait in
/.trash/<hour>/<uid>/, their owner alone may look at them, root restores them byte for byte
(never over an existing name) or purges them; `status` counts them."""
import errno
import hashlib
import os
import subprocess

import pytest

import helpers
from helpers import OTHER, USER, run_as


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def trash_entries(mnt):
    """Paths of the files in the trash, as root sees them."""
    out = []
    top = os.path.join(mnt, ".trash")
    for hour in sorted(os.listdir(top)):
        for owner in sorted(os.listdir(os.path.join(top, hour))):
            d = os.path.join(top, hour, owner)
            out += [os.path.join(d, n) for n in sorted(os.listdir(d))]
    return out


def trash(volume, *args, user="root", check=True):
    return volume.env.stagefs("trash", *args, user=user, check=check)


def test_delete_restore_gives_equal_bytes_and_only_the_owner_looks(volume, workdir):
    path = os.path.join(workdir, "data.bin")
    payload = os.urandom(5 << 20)  # more than one block

    def write_and_remove():
        with open(path, "wb") as f:
            f.write(payload)
        os.unlink(path)
        return os.path.exists(path)
    assert run_as(USER, write_and_remove) is False
    before = [e for e in trash_entries(volume.mnt) if e.endswith("-data.bin")]
    assert len(before) == 1, trash_entries(volume.mnt)
    entry = before[0]
    uid = os.stat(entry).st_uid
    assert os.path.basename(os.path.dirname(entry)) == str(uid)
    # The owner reads it there; another user cannot even list the owner's directory.
    assert run_as(USER, sha, entry) == hashlib.sha256(payload).hexdigest()

    def other_looks():
        try:
            os.listdir(os.path.dirname(entry))
            return "listed"
        except PermissionError:
            return "refused"
    assert run_as(OTHER, other_looks) == "refused"
    # A user cannot remove it through the mount, nor restore it with the META-URL.
    assert run_as(USER, lambda: helpers_errno(os.unlink, entry)) == errno.EACCES
    p = trash(volume, "restore", entry, user=USER, check=False)
    assert p.returncode == 1 and "only root" in p.stderr, p.stderr
    # Listed with where it came from; root restores it to the original path.
    out = trash(volume, "list", "--meta", volume.meta_url).stdout
    assert "data.bin" in out and "5.0 MiB" in out, out
    # Not over a file made there since.
    run_as(USER, lambda: open(path, "w").write("new"))
    p = trash(volume, "restore", "--meta", volume.meta_url, entry, check=False)
    assert p.returncode == 1 and "exists" in p.stderr, p.stderr
    run_as(USER, os.unlink, path)
    p = trash(volume, "restore", "--meta", volume.meta_url, entry)
    assert p.stdout.startswith("restored ") and p.stdout.strip().endswith(os.path.relpath(path, volume.mnt)), p.stdout
    st = os.stat(path)
    assert st.st_nlink == 1 and st.st_size == len(payload)
    assert run_as(USER, sha, path) == hashlib.sha256(payload).hexdigest()
    assert not any(e.endswith("-data.bin") and os.path.basename(e).startswith(str(st.st_ino)) for e in trash_entries(volume.mnt))


def helpers_errno(fn, *args):
    try:
        fn(*args)
        return 0
    except OSError as e:
        return e.errno


def test_an_overwritten_files_old_content_waits_in_the_trash(volume, workdir):
    path = os.path.join(workdir, "conf")

    def overwrite():
        with open(path, "w") as f:
            f.write("version 1\n")
        with open(path + ".tmp", "w") as f:
            f.write("version 2\n")
        os.rename(path + ".tmp", path)
        return open(path).read()
    assert run_as(USER, overwrite) == "version 2\n"
    olds = [e for e in trash_entries(volume.mnt) if e.endswith("-conf")]
    assert len(olds) == 1 and open(olds[0]).read() == "version 1\n"
    # Cut by O_TRUNC (a shell's `>`): the content before waits as <inode>.before-truncate.
    ino = os.stat(path).st_ino

    def truncate_by_open():
        with open(path, "w") as f:
            f.write("version 3\n")
        return open(path).read()
    assert run_as(USER, truncate_by_open) == "version 3\n"
    cut = [e for e in trash_entries(volume.mnt) if e.endswith(f"-{ino}.before-truncate")]
    assert len(cut) == 1 and open(cut[0]).read() == "version 2\n", trash_entries(volume.mnt)
    # An open file deleted keeps reading, with link count 0, as without a trash.

    def open_and_remove():
        fd = os.open(path, os.O_RDONLY)
        os.unlink(path)
        st = os.fstat(fd)
        data = os.pread(fd, 100, 0)
        os.close(fd)
        return st.st_nlink, data
    assert run_as(USER, open_and_remove) == (0, b"version 3\n")


def test_purge_and_status(volume, workdir):
    def make_and_remove():
        for i in range(3):
            p = os.path.join(workdir, f"p{i}")
            with open(p, "wb") as f:
                f.write(b"x" * 10000)
            os.unlink(p)
    run_as(USER, make_and_remove)
    out = volume.env.stagefs("status", volume.meta_url).stdout
    assert "Trash:       deleted files kept 1 day; holds" in out, out
    p = trash(volume, "purge", "--older-than", "1h", "--meta", volume.meta_url)
    assert "purged 0 files" in p.stdout, p.stdout
    assert trash(volume, "purge", "--meta", volume.meta_url, user=USER, check=False).returncode == 1
    p = trash(volume, "purge", "--meta", volume.meta_url)
    assert "purged" in p.stdout and not trash_entries(volume.mnt), p.stdout
    out = volume.env.stagefs("status", volume.meta_url).stdout
    assert "holds 0 files, 0 B" in out, out


def test_the_trash_is_reserved(volume, workdir):
    assert run_as(USER, lambda: helpers_errno(os.mkdir, os.path.join(volume.mnt, ".trash-not"))) == 0
    run_as(USER, os.rmdir, os.path.join(volume.mnt, ".trash-not"))
    run_as(USER, lambda: open(os.path.join(workdir, "z"), "w").write("z"))
    run_as(USER, os.unlink, os.path.join(workdir, "z"))
    hour = sorted(os.listdir(os.path.join(volume.mnt, ".trash")))[-1]
    # Nobody makes files in it, not even root through a mount.
    assert helpers_errno(os.mkdir, os.path.join(volume.mnt, ".trash", hour, "x")) in (errno.EPERM, errno.EACCES)
    assert run_as(USER, lambda: helpers_errno(os.rename, os.path.join(volume.mnt, ".trash"), os.path.join(workdir, "t"))) in (errno.EPERM, errno.EACCES)


def test_expired_trash_is_purged_by_one_client_while_two_run(env, redis):
    """Two mounts of one volume (purging every second here, STAGEFS_TRASH_INTERVAL): once the
    trash's files expire (the trash turned off), they are purged in steps by whichever holds
    the trash lease, each file once, and the trash's directories go."""
    base = env.dir_for(USER, "purge2")
    url = redis.url(redis.new_db())
    env.stagefs("format", url, "purge2", "--bucket", os.path.join(base, "data"))
    mounts = []
    try:
        for i in range(2):
            mnt = env.dir_for(USER, f"purge2-m{i}")
            log = os.path.join(base, f"m{i}.log")
            p = subprocess.run(["runuser", "-u", USER, "--", "env", "STAGEFS_TRASH_INTERVAL=1", env.bin, "mount", "-d", url, mnt,
                                "--log", log, "-v", "--cache-size", "0", "-o", "allow_other"], capture_output=True, text=True)
            assert p.returncode == 0, p.stderr
            mounts.append((mnt, log))
        d = os.path.join(mounts[0][0], "w")

        def make_and_remove():
            os.mkdir(d)
            for i in range(250):
                with open(os.path.join(d, f"f{i}"), "wb") as f:
                    f.write(b"x" * 5000)
            for i in range(250):
                os.unlink(os.path.join(d, f"f{i}"))
        run_as(USER, make_and_remove)
        assert "holds 250 files" in env.stagefs("status", url).stdout
        env.stagefs("format", url, "purge2", "--bucket", os.path.join(base, "data"), "--trash-days", "0", "--force")
        helpers.wait_until(lambda: "holds 0 files, 0 B" in env.stagefs("status", url).stdout, 60, "the trash to be purged")
        helpers.wait_until(lambda: not os.listdir(os.path.join(mounts[1][0], ".trash")), 30, "the trash's directories to go")
        purged = []
        for _, log in mounts:
            purged += [int(line.split("purged ")[1].split()[0]) for line in open(log) if "from the trash" in line and "purged" in line]
        assert sum(purged) == 250 and max(purged) <= 100, purged
    finally:
        for mnt, _ in mounts:
            env.stagefs("umount", mnt)
