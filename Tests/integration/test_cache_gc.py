"""Root's `stagefs cache gc` against hostile users of the node (issue 18, findings 2 and 4): a
user who stops a FUSE mount inside their cache directory, or makes their index a FIFO, holds up
neither root's gc nor the cleaning of other users; a user who forges pins in their own index
cannot steer what root evicts from the others. No Slurm: gc works on a cache root alone."""
import os
import signal
import sqlite3
import stat
import subprocess
import time

import pytest

import helpers
from helpers import run_as

# Users of no other test: gc judges users by their processes on the node.
ATTACKER = "stagefs-gca"
VICTIM = "stagefs-gcv"
FORGER = "stagefs-gcf"

FORGED = "x\ngc bucket 0 999999999999999\ngc pinned 123"


@pytest.fixture(scope="module")
def users():
    return {u: helpers.ensure_user(u) for u in (ATTACKER, VICTIM, FORGER)}


def cache_root(env):
    env.counter += 1
    root = os.path.join(env.root, f"gc-cache-{env.counter}")
    os.mkdir(root)
    os.chmod(root, 0o1777)
    return root


def volume_with_data(env, user, size=3 << 20):
    """A SQLite volume of `user` with /data (`size` random bytes); its META-URL."""
    base = env.dir_for(user, "gcvol")
    url = f"sqlite3://{base}/meta.db"
    env.stagefs("format", url, f"gc{env.counter}", "--bucket", f"{base}/data", user=user)
    mnt = env.dir_for(user, "gcmnt")
    env.stagefs("mount", "-d", url, mnt, "--cache-size", "0", user=user)
    try:
        run_as(user, lambda: open(f"{mnt}/data", "wb").write(os.urandom(size)))
    finally:
        env.stagefs("umount", mnt, user=user)
    return url


def stage(env, user, url, root, *extra, check=True):
    return env.stagefs("stage", "--meta", url, "--cache-dir", root, "/data", *extra, user=user, check=check)


def index_rows(root, uid, sql):
    with sqlite3.connect(f"file:{root}/{uid}/index.db?mode=ro", uri=True) as db:
        return db.execute(sql).fetchall()


def age_blocks(root, user, uid, seconds):
    def work():
        with sqlite3.connect(f"{root}/{uid}/index.db") as db:
            db.execute("UPDATE blocks SET atime = atime - ?", (seconds,))
    run_as(user, work)


def gc(env, root, *args, timeout=90):
    """Root's gc; returns (CompletedProcess, seconds it took)."""
    started = time.monotonic()
    p = subprocess.run([env.bin, "cache", "gc", "--cache-dir", root, *args], capture_output=True, text=True, timeout=timeout)
    return p, time.monotonic() - started


def a_stale_victim(env, users, root):
    """The victim: a cache whose blocks were last used 10 days ago, and no process on the node."""
    uid = users[VICTIM].pw_uid
    url = volume_with_data(env, VICTIM)
    stage(env, VICTIM, url, root)
    age_blocks(root, VICTIM, uid, 864000)
    assert os.path.isdir(f"{root}/{uid}")
    return uid


@pytest.mark.parametrize("where", ["jobs", "itself"])
def test_a_stopped_mount_in_a_cache_dir_holds_up_neither_roots_gc_nor_other_users(env, users, where):
    """A user mounts a StageFS volume inside (`<root>/<uid>/jobs`) or on (`<root>/<uid>`, with
    allow_other so that root's own calls reach it) their cache directory and stops the mount
    process (SIGSTOP): any call into it would wait forever. Root's gc does not enter it: it
    finishes, says it skipped that user, and removes the stale cache of another user."""
    root = cache_root(env)
    victim = a_stale_victim(env, users, root)
    auid = users[ATTACKER].pw_uid
    url = volume_with_data(env, ATTACKER, size=1 << 20)
    mnt = f"{root}/{auid}/jobs" if where == "jobs" else f"{root}/{auid}"
    if where == "jobs":
        stage(env, ATTACKER, url, root)
    run_as(ATTACKER, os.mkdir, mnt, 0o700)
    opts = ["-o", "allow_other"] if where == "itself" else []
    env.stagefs("mount", "-d", url, mnt, "--cache-size", "0", *opts, user=ATTACKER)
    pid = helpers.mount_pid(mnt)
    assert pid and helpers.is_mounted(mnt)
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(2)  # past the kernel's attribute and entry caches of the mount
        p, secs = gc(env, root, "--older-than", "7d", timeout=60)
        out = p.stdout
        assert p.returncode == 0, (p.stdout, p.stderr)
        assert secs < 30, f"gc took {secs} s"
        assert f"skipped {root}/{auid}: a file system is mounted at {mnt} (gc never enters another file system)" in out, out
        assert f"uid {victim} ({VICTIM}): no process or mount on this node and last used 10 day(s) ago: removed its cache" in out, out
        assert not os.path.lexists(f"{root}/{victim}"), "the other user's stale cache is gone"
        assert f"uid {auid} ({ATTACKER}):" not in out, "the attacker's cache was not touched"
    finally:
        os.kill(pid, signal.SIGCONT)
        subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
        helpers.wait_until(lambda: not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z", 30,
                           "the attacker's mount process to exit")
    if where == "jobs":
        assert os.path.isfile(f"{root}/{auid}/index.db"), "the attacker's cache is still there (skipped, not removed)"


def test_a_user_whose_gc_step_hangs_is_killed_at_the_deadline_and_skipped(env, users):
    """A user links their index to a file in a StageFS mount of theirs outside the cache root
    and stops that mount: the child that inspects their cache (as that user) waits on it forever.
    It is killed after --user-timeout, the user skipped with a line saying so, and another
    user's stale cache is removed all the same. A FIFO planted as a job's `ended` mark makes
    nothing wait."""
    root = cache_root(env)
    victim = a_stale_victim(env, users, root)
    uid = users[FORGER].pw_uid
    url = volume_with_data(env, FORGER, size=1 << 10)
    mnt = env.dir_for(FORGER, "gcstopped")
    env.stagefs("mount", "-d", url, mnt, "--cache-size", "0", user=FORGER)
    pid = helpers.mount_pid(mnt)
    assert pid
    run_as(FORGER, os.mkdir, f"{root}/{uid}", 0o700)
    run_as(FORGER, os.makedirs, f"{root}/{uid}/jobs/123", 0o700)
    run_as(FORGER, os.mkfifo, f"{root}/{uid}/jobs/123/ended", 0o600)
    run_as(FORGER, os.symlink, f"{mnt}/data", f"{root}/{uid}/index.db")
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(2)  # past the kernel's attribute and entry caches of the mount
        p, secs = gc(env, root, "--older-than", "7d", "--user-timeout", "3s", timeout=60)
    finally:
        os.kill(pid, signal.SIGCONT)
        subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
    out = p.stdout
    assert secs < 30, f"gc took {secs} s"
    assert f"stagefs: uid {uid} ({FORGER}): skipped: its inspect step did not finish within 3s (--user-timeout): killed" in out, out
    assert f"uid {victim} ({VICTIM}): no process or mount on this node and last used 10 day(s) ago: removed its cache" in out, out
    assert not os.path.lexists(f"{root}/{victim}")
    assert p.returncode == 1, "a user skipped for a step that failed is an error (exit status 1)"
    os.unlink(f"{root}/{uid}/index.db")
    p, secs = gc(env, root, "--older-than", "7d", "--user-timeout", "10s", timeout=60)
    assert p.returncode == 0 and secs < 10, (p.stdout, p.stderr, secs)
    assert stat.S_ISFIFO(os.lstat(f"{root}/{uid}/jobs/123/ended").st_mode), "the user's files were left alone"


def forger_and_victim(env, users):
    """A cache root where the forger and the victim each staged a volume of their own:
    (root, forger's uid, victim's uid, victim's META-URL)."""
    root = cache_root(env)
    fuid, vuid = users[FORGER].pw_uid, users[VICTIM].pw_uid
    furl = volume_with_data(env, FORGER, size=1 << 20)
    stage(env, FORGER, furl, root)
    vurl = volume_with_data(env, VICTIM)
    stage(env, VICTIM, vurl, root)
    return root, fuid, vuid, vurl


def test_a_forged_pin_name_steers_nothing_and_is_refused_at_stage(env, users):
    """A user inserts a pin whose name holds newlines and report lines (`gc bucket 0 ...`) into
    their own index: root's gc still evicts the other user's least recently used blocks for the
    free-space target, reports the forged pin without its name, and `stage --job` refuses such a
    name (exit status 2), as does every job id outside [0-9A-Za-z._-]{1,64}."""
    root, fuid, vuid, vurl = forger_and_victim(env, users)
    assert index_rows(root, vuid, "SELECT COUNT(*) FROM blocks")[0][0] > 0

    def forge():
        with sqlite3.connect(f"{root}/{fuid}/index.db") as db:
            key = db.execute("SELECT key FROM blocks LIMIT 1").fetchone()[0]
            db.execute("INSERT INTO pins(job, key) VALUES(?, ?)", (FORGED, key))
    run_as(FORGER, forge)

    p, _ = gc(env, root, "--older-than", "365d", "--free-space-ratio", "0.999", timeout=120)
    out = p.stdout
    assert p.returncode == 0, (p.stdout, p.stderr)
    mine = next(l for l in out.splitlines() if l.startswith(f"uid {vuid} ({VICTIM}): "))
    assert "freed" in mine and "least recently used block(s)" in mine, out
    assert index_rows(root, vuid, "SELECT COUNT(*) FROM blocks")[0][0] == 0, "the victim's unpinned blocks were evicted"
    forger = next(l for l in out.splitlines() if l.startswith(f"uid {fuid} ({FORGER}): "))
    assert "pinned by job(s) 1 pin name(s) that are not job ids (not shown)" in forger, out
    assert "gc bucket" not in out and "gc pinned" not in out, out

    for bad in ("x\ny", "a/b", "", "j" * 65, "job 1", "é"):
        r = stage(env, VICTIM, vurl, root, "--job", bad, check=False)
        assert r.returncode == 2, (bad, r.returncode, r.stderr)
        assert "job id" in r.stderr, r.stderr
        r = env.stagefs("stage", "--cache-dir", root, "--release", bad, user=VICTIM, check=False)
        assert r.returncode == 2, (bad, r.returncode, r.stderr)
    r = stage(env, VICTIM, vurl, root, "--job", "Job_1.a-" + "b" * 56)
    assert index_rows(root, vuid, "SELECT DISTINCT job FROM pins") == [("Job_1.a-" + "b" * 56,)]
    r = subprocess.run([env.bin, "job", "epilog", "--job", "1\n2", "--cache-dir", root], capture_output=True, text=True)
    assert r.returncode == 2 and "job id" in r.stderr, r.stderr


def test_a_forged_index_cannot_spare_other_users_blocks(env, users):
    """A user adds rows for blocks they do not have to their own index, all used long ago and as
    large as the file system: their report makes the least-recently-used cutoff fall before
    every real block. Root measures the file system itself afterwards, finds it still short of
    the target, and asks every user for an equal share: the other user's blocks are evicted."""
    root, fuid, vuid, vurl = forger_and_victim(env, users)
    st = os.statvfs(root)
    size = st.f_blocks * st.f_frsize

    def forge():
        with sqlite3.connect(f"{root}/{fuid}/index.db") as db:
            for i in range(20):
                db.execute("INSERT INTO blocks(key, size, atime) VALUES(?, ?, 60)", (f"fakevol/fake-{i}", size // 25))
            # The usage counter too, so that the report is consistent (and within bounds).
            db.execute("UPDATE stats SET v = v + ? WHERE k = 'used'", (20 * (size // 25),))
    run_as(FORGER, forge)

    p, _ = gc(env, root, "--older-than", "365d", "--free-space-ratio", "0.999", timeout=120)
    out = p.stdout
    assert p.returncode == 0, (p.stdout, p.stderr)
    mine = next(l for l in out.splitlines() if l.startswith(f"uid {vuid} ({VICTIM}): "))
    assert "least recently used block(s)" in mine, out
    assert index_rows(root, vuid, "SELECT COUNT(*) FROM blocks")[0][0] == 0, "the victim's unpinned blocks were evicted"
