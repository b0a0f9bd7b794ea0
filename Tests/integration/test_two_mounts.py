"""Two mounts of one volume (two nodes of a job) behave like one file system: what one removes
and makes again the other opens, SQLite with a rollback journal and git work across them, and
close-to-open consistency holds. As the ordinary test user, on each volume kind."""
import os
import sqlite3
import stat
import subprocess

import pytest

import helpers
from helpers import USER, run_as


@pytest.fixture(scope="module")
def second(volume):
    """A second mount of the same volume, as the same user, at another mountpoint."""
    mnt = volume.env.dir_for(USER, f"mnt2-{volume.kind}")
    volume.env.stagefs("mount", "-d", volume.meta_url, mnt, "--log", os.path.join(volume.base, "mount2.log"))
    assert helpers.is_mounted(mnt)
    yield mnt
    volume.umount(mnt)


def on(mnt, workdir):
    """`workdir` (a directory of the first mount) as seen through mount `mnt`."""
    return os.path.join(mnt, os.path.basename(workdir))


def test_a_name_removed_and_made_again_elsewhere_opens(volume, workdir, second):
    """The second mount has the name cached; the first removes it and makes it again (another
    inode): opening it there, with O_CREAT or without, gets the new file, never ENOENT."""
    a, b = os.path.join(workdir, "j"), os.path.join(on(second, workdir), "j")

    def steps():
        out = []
        for i in range(20):
            with open(a, "w") as f:
                f.write(f"old {i}")
            with open(b) as f:  # the second mount looks it up (and keeps the entry)
                out.append(f.read() == f"old {i}")
            os.unlink(a)
            with open(a, "w") as f:
                f.write(f"new {i}")
            fd = os.open(b, os.O_RDWR | os.O_CREAT, 0o644)
            out.append(os.pread(fd, 100, 0) == f"new {i}".encode())
            os.close(fd)
            with open(b) as f:
                out.append(f.read() == f"new {i}")
            os.unlink(a)
        return out
    got = run_as(USER, steps)
    assert all(got), got


SQLITE_WRITER = r"""
import sqlite3, sys
path, n = sys.argv[1], int(sys.argv[2])
db = sqlite3.connect(path, timeout=120, isolation_level=None)
db.execute("PRAGMA journal_mode=DELETE")
for _ in range(n):
    db.execute("BEGIN IMMEDIATE")
    (v,) = db.execute("SELECT v FROM counter").fetchone()
    db.execute("UPDATE counter SET v = ?", (v + 1,))
    db.execute("COMMIT")
db.close()
"""


def test_two_sqlite_writers_on_two_mounts(volume, workdir, second):
    """Two processes, one on each mount, each 300 read-modify-write transactions on one SQLite
    database with a rollback journal (WAL needs shared memory, which no network file system
    gives): no error, the counter ends at 600, and the database passes its integrity check."""
    n = 300
    path = os.path.join(workdir, "x.db")

    def setup():
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("PRAGMA journal_mode=DELETE")
        db.execute("CREATE TABLE counter (v INTEGER)")
        db.execute("INSERT INTO counter VALUES (0)")
        db.close()
    run_as(USER, setup)
    writers = [subprocess.Popen(["runuser", "-u", USER, "--", "python3", "-c", SQLITE_WRITER, p, str(n)], stderr=subprocess.PIPE, text=True)
               for p in (path, os.path.join(on(second, workdir), "x.db"))]
    errors = [w.communicate(timeout=600)[1] for w in writers]
    assert [w.returncode for w in writers] == [0, 0], errors

    def check(p):
        db = sqlite3.connect(p)
        return db.execute("SELECT v FROM counter").fetchone()[0], db.execute("PRAGMA integrity_check").fetchone()[0]
    assert run_as(USER, check, path) == (2 * n, "ok")
    assert run_as(USER, check, os.path.join(on(second, workdir), "x.db")) == (2 * n, "ok")


def test_git_commit_on_one_mount_is_clean_on_the_other(volume, workdir, second):
    repo = os.path.join(workdir, "repo")
    other = os.path.join(on(second, workdir), "repo")

    def git(cwd, *args):
        env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@x", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@x")
        return subprocess.run(["git", "-c", "safe.directory=*", *args], cwd=cwd, env=env, capture_output=True, text=True)

    def commit():
        os.mkdir(repo)
        out = [git(repo, "init", "-q")]
        for i in range(30):
            with open(os.path.join(repo, f"f{i}.txt"), "w") as f:
                f.write(f"file {i}\n" * (i + 1))
        out += [git(repo, "add", "."), git(repo, "commit", "-q", "-m", "first")]
        with open(os.path.join(repo, "f3.txt"), "a") as f:
            f.write("more\n")
        os.unlink(os.path.join(repo, "f4.txt"))
        out += [git(repo, "commit", "-q", "-am", "second")]
        return [(r.returncode, r.stderr) for r in out]
    made = run_as(USER, commit)
    assert all(rc == 0 for rc, _ in made), made

    def inspect():
        st, fsck, log = git(other, "status", "--porcelain"), git(other, "fsck", "--strict"), git(other, "log", "--oneline")
        return st.returncode, st.stdout, fsck.returncode, fsck.stdout + fsck.stderr, len(log.stdout.splitlines())
    st_rc, st_out, fsck_rc, fsck_out, commits = run_as(USER, inspect)
    assert (st_rc, st_out) == (0, ""), st_out
    assert fsck_rc == 0, fsck_out
    assert commits == 2


def test_close_to_open_between_mounts(volume, workdir, second):
    """What one mount wrote and closed, the other reads whole at its next open, while both
    keep the file in their caches between rounds."""
    a, b = os.path.join(workdir, "c2o"), os.path.join(on(second, workdir), "c2o")

    def rounds():
        bad = []
        for i in range(30):
            data = os.urandom(1000 + 7919 * i)
            src, dst = (a, b) if i % 2 == 0 else (b, a)
            with open(src, "wb") as f:
                f.write(data)
            with open(dst, "rb") as f:
                if f.read() != data:
                    bad.append(i)
        return bad
    assert run_as(USER, rounds) == []


def test_lookups_after_a_listing_see_what_the_other_mount_changed(volume, workdir, second):
    """`find` of a large directory lists it all, then looks each name up after the client
    cache's time: those lookups read on from the name's listed position, a page at a time. What
    the second mount changed in between (modes, removals, renames, names made anew) shows in
    them exactly, and the result of `find` is the kernel file system's answer."""
    d = os.path.join(workdir, "big")
    n = 2000

    def make():
        helpers.empty_files(d, n)
        # (Lists it all, plain pages after the first: each name's position is kept.)
        subprocess.run(["find", d, "-name", "none"], check=True, capture_output=True)
    run_as(USER, make)
    there = os.path.join(on(second, workdir), "big")

    def change():
        import time
        time.sleep(1.5)  # the first mount's records of the listing expire
        for i in range(0, n, 7):
            os.chmod(os.path.join(there, f"f{i:04}"), 0o600)
        for i in range(3, n, 11):
            os.unlink(os.path.join(there, f"f{i:04}"))
        for i in range(5, n, 13):
            p = os.path.join(there, f"f{i:04}")
            if os.path.exists(p):
                os.rename(p, p + ".moved")
        for i in range(1, n, 17):
            p = os.path.join(there, f"f{i:04}")
            if os.path.exists(p):
                os.unlink(p)
                with open(p, "w") as f:
                    f.write("new")
        return {name: (os.lstat(os.path.join(there, name)).st_ino, stat.S_IMODE(os.lstat(os.path.join(there, name)).st_mode))
                for name in os.listdir(there)}
    truth = run_as(USER, change)

    def look():
        out = {}
        for i in range(n):
            for name in (f"f{i:04}", f"f{i:04}.moved"):
                try:
                    st = os.lstat(os.path.join(d, name))
                    out[name] = (st.st_ino, stat.S_IMODE(st.st_mode))
                except FileNotFoundError:
                    pass
        found = subprocess.run(["find", d, "-type", "f", "-perm", "600"], check=True, capture_output=True, text=True).stdout.split()
        return out, sorted(os.path.basename(p) for p in found)
    seen, found = run_as(USER, look)
    assert seen == truth
    assert found == sorted(name for name, (_, mode) in truth.items() if mode == 0o600)
