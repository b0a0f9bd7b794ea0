"""POSIX behaviour checked against the kernel's own file system: the differential test
(posixdiff.py) with fixed seeds on both engines, and one test per defect it was built to catch
(O_TRUNC, privilege bits, times set while writes are buffered, the sticky volume root, the
largest file size)."""
import os
import shutil
import stat
import subprocess

import pytest

import helpers
import posixdiff
from helpers import OTHER, SHARED_GROUP, USER, run_as

SEQUENCES = int(os.environ.get("STAGEFS_DIFF_SEQUENCES", "300"))


def test_same_results_as_the_kernel_file_system(env, volume):
    """Random operations by two users (and root) on ext4 and on StageFS: every result, every
    change of mtime/ctime and the final trees agree. Seeds 1..SEQUENCES; a failure prints the
    seed and the command that replays it."""
    oracle = env.dir_for("root", f"oracle-{volume.kind}")
    os.chmod(oracle, 0o777)
    d = posixdiff.Driver(oracle, volume.mnt, [USER, OTHER], SHARED_GROUP, volume.block_size)
    failures = posixdiff.run_seeds(d, range(1, SEQUENCES + 1), 40)
    print(f"{volume.kind}: {SEQUENCES} sequences, {d.ops_run} operations")
    assert not failures, "\n\n".join(failures)
    assert d.ops_run >= SEQUENCES * 40


def sh(user, script):
    return subprocess.run(["runuser", "-u", user, "--", "bash", "-c", script], capture_output=True, text=True)


def test_shell_redirect_replaces_the_content(volume, workdir):
    f = os.path.join(workdir, "f")
    p = sh(USER, f"seq 1 2000 > '{f}' && echo hi > '{f}'")
    assert p.returncode == 0, p.stderr
    assert run_as(USER, lambda: open(f, "rb").read()) == b"hi\n"
    assert os.stat(f).st_size == 3

    def python_rewrite():
        with open(f, "wb") as out:
            out.write(b"x" * 10)
        with open(f, "wb") as out:
            out.write(b"y")
        return open(f, "rb").read()

    assert run_as(USER, python_rewrite) == b"y"

    # open(O_TRUNC) updates mtime and ctime even when the file is empty already.
    sh(USER, f": > '{f}'")
    before = os.stat(f)
    assert sh(USER, f": > '{f}'").returncode == 0
    after = os.stat(f)
    assert after.st_size == 0
    assert after.st_mtime_ns > before.st_mtime_ns and after.st_ctime_ns > before.st_ctime_ns


def test_writes_truncates_and_chowns_clear_privilege_bits(volume, workdir):
    f = os.path.join(workdir, "suid")
    run_as(USER, lambda: open(f, "w").write("#!/bin/sh\n"))
    run_as(USER, os.chown, f, -1, helpers.grp.getgrnam(SHARED_GROUP).gr_gid)
    os.chmod(workdir, 0o777)

    def set_mode(m):
        run_as(USER, os.chmod, f, m)
        assert stat.S_IMODE(os.stat(f).st_mode) == m

    # A write by another user (through the group bits) clears set-user-ID and the
    # set-group-ID of an executable.
    set_mode(0o6777)
    assert sh(OTHER, f"echo more >> '{f}'").returncode == 0
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o777
    # The owner's own write clears them too (no CAP_FSETID).
    set_mode(0o4755)
    assert sh(USER, f"echo more >> '{f}'").returncode == 0
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o755
    # So does a truncate.
    set_mode(0o6775)
    run_as(OTHER, os.truncate, f, 3)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o775
    # And a chown, even one that changes nothing.
    set_mode(0o4755)
    run_as(USER, os.chown, f, -1, -1)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o755
    # Root keeps them on write (CAP_FSETID).
    set_mode(0o4755)
    with open(f, "a") as out:
        out.write("root\n")
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o4755


def test_copies_keep_the_times_they_set(volume, workdir, tmp_path):
    """cp -a, cp -p and tar set mtime on files whose data may still be buffered: the times
    they set are what stays, as on ext4."""
    src = "/usr/share/doc"
    dst = os.path.join(workdir, "doc")
    p = sh(USER, f"cp -a {src} '{dst}'")
    assert p.returncode == 0, p.stderr
    checked = 0
    for dirpath, dirnames, filenames in os.walk(src):
        for name in filenames + dirnames:
            s = os.path.join(dirpath, name)
            d = os.path.join(dst, os.path.relpath(s, src))
            a, b = os.lstat(s), os.lstat(d)
            assert b.st_mtime_ns == a.st_mtime_ns, f"{d}: mtime {b.st_mtime_ns} != {a.st_mtime_ns}"
            if stat.S_ISREG(a.st_mode):
                assert b.st_size == a.st_size, d
            checked += 1
    assert checked > 100, "the tree was copied"
    # tar extracting into the volume sets each file's mtime after writing it.
    tar = os.path.join(workdir, "tar")
    run_as(USER, os.mkdir, tar)
    p = sh(USER, f"tar -C {src} -cf - . | tar -C '{tar}' -xf -")
    assert p.returncode == 0, p.stderr
    for dirpath, _, filenames in os.walk(src):
        for name in filenames:
            s = os.path.join(dirpath, name)
            assert os.lstat(os.path.join(tar, os.path.relpath(s, src))).st_mtime_ns // 10**9 == os.lstat(s).st_mtime_ns // 10**9
    shutil.rmtree(dst)
    shutil.rmtree(tar)


def test_volume_root_is_sticky(volume):
    root = os.stat(volume.mnt)
    assert stat.S_IMODE(root.st_mode) == 0o1777 and root.st_uid == 0
    mine = volume.path(f"top-{os.urandom(3).hex()}")
    run_as(USER, lambda: open(mine, "w").write("mine"))
    with pytest.raises(PermissionError):
        run_as(OTHER, os.unlink, mine)
    with pytest.raises(PermissionError):
        run_as(OTHER, os.rename, mine, mine + ".stolen")
    run_as(USER, os.unlink, mine)


def test_root_mode_is_chosen_at_format(env):
    base = env.dir_for(USER, "rootmode")
    url = f"sqlite3://{base}/meta.db"
    env.stagefs("format", url, "rootmode", "--bucket", f"{base}/data", "--root-mode", "755")
    m = env.dir_for(USER, "m")
    env.stagefs("mount", "-d", url, m)
    try:
        assert stat.S_IMODE(run_as(USER, os.stat, m).st_mode) == 0o755
        with pytest.raises(PermissionError):
            run_as(USER, os.mkdir, os.path.join(m, "x"))
    finally:
        env.stagefs("umount", m)
    p = env.stagefs("format", url, "other", "--root-mode", "9", check=False)
    assert p.returncode == 2 and "--root-mode" in p.stderr


def test_largest_file_size(volume, workdir):
    f = os.path.join(workdir, "max")
    run_as(USER, lambda: open(f, "w").close())
    run_as(USER, os.truncate, f, 1 << 50)
    assert os.stat(f).st_size == 1 << 50
    with pytest.raises(OSError) as e:
        run_as(USER, os.truncate, f, (1 << 50) + 1)
    assert e.value.errno == 27  # EFBIG

    def write_past():
        fd = os.open(f, os.O_WRONLY)
        try:
            os.pwrite(fd, b"x", 1 << 50)
        finally:
            os.close(fd)

    with pytest.raises(OSError) as e:
        run_as(USER, write_past)
    assert e.value.errno == 27
    run_as(USER, os.unlink, f)
