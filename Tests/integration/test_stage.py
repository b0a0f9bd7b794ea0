"""Staging: `stagefs stage` fills the node-local cache so reads are served locally — with no
mount, through a mount, with pins, checks, evictions, corrupted files, several processes at once
and per-user caches."""
import hashlib
import json
import os
import random
import signal
import stat
import subprocess
import time

import pytest

import helpers
from helpers import OTHER, USER, run_as


@pytest.fixture
def s3vol(env, redis):
    """A Redis + S3 volume with a dataset written by a client without disk cache; its own moto."""
    moto = helpers.Moto()
    db = s3vol.next = getattr(s3vol, "next", 20) + 1
    url = redis.url(db)
    name = f"stage{db}"
    env.stagefs("format", url, name, "--storage", "s3", "--bucket", moto.bucket(name),
                "--access-key", moto.access_key, "--secret-key", moto.secret_key)
    w = env.dir_for(USER, "writer")
    env.stagefs("mount", "-d", url, w, "--cache-size", "0")
    sums = {}

    def populate():
        rnd = random.Random(db)
        # About 8.3 MiB per directory: empty, tiny, one-block and multi-block files.
        sizes = [0, 100, 4096, 70_000, 1 << 20, (4 << 20) + 3, 1 << 20, 2 << 20, 70_000, 4096]
        for d in ("a", "b", "c"):
            os.makedirs(os.path.join(w, "datasets", "small", d))
            for i, size in enumerate(sizes):
                data = rnd.randbytes(size)
                rel = f"datasets/small/{d}/f{i}"
                with open(os.path.join(w, rel), "wb") as f:
                    f.write(data)
                sums[rel] = hashlib.sha256(data).hexdigest()
        os.makedirs(os.path.join(w, "private"), mode=0o700)
        with open(os.path.join(w, "private", "secret"), "wb") as f:
            f.write(b"x" * 5000)
        return sums

    sums = run_as(USER, populate)
    env.stagefs("umount", w)
    v = type("S3Vol", (), {})()
    v.url, v.moto, v.sums, v.name = url, moto, sums, name
    v.cache = env.dir_for(USER, "cache")
    yield v
    if v.moto:
        v.moto.stop()


def stage(env, v, *args, user=USER, check=True, cache=None):
    return env.stagefs("stage", "--meta", v.url, "--cache-dir", cache or v.cache, *args, user=user, check=check)


def report(path):
    with open(path) as f:
        return json.load(f)


def read_all(m, sums):
    def work():
        return {rel: hashlib.sha256(open(os.path.join(m, rel), "rb").read()).hexdigest() for rel in sums}
    return run_as(USER, work)


def test_stage_without_mount_then_serve_with_s3_stopped(env, s3vol):
    rep = os.path.join(env.dir_for(USER, "rep"), "r.json")
    p = stage(env, s3vol, "/datasets/small", "--report", rep)
    assert "status ok" in p.stdout and p.returncode == 0
    r = report(rep)
    assert r["files"] == 30 and r["blocksFetched"] > 0 and r["blocksCached"] == 0 and r["status"] == "ok"
    assert r["paths"][0]["errors"] == []
    assert "100.0% cached" in stage(env, s3vol, "/datasets/small", "--check").stdout
    m = env.dir_for(USER, "m")
    env.stagefs("mount", "-d", s3vol.url, m, "--cache-dir", s3vol.cache, "--io-retries", "2", "--io-timeout", "2")
    try:
        s3vol.moto.stop()
        s3vol.moto = None
        assert read_all(m, s3vol.sums) == s3vol.sums, "every staged file is served from the cache"
        p = stage(env, s3vol, "/datasets/small", "--evict")
        assert "evicted" in p.stdout
        p = stage(env, s3vol, "/datasets/small", "--check", check=False)
        assert "/datasets/small: 0.0% cached" in p.stdout and p.returncode == 3, "not fully cached: exit 3"
        # Nothing cached and the store gone: a new mount comes up (with a warning) and a read
        # fails with EIO, not a hang.
        env.stagefs("umount", m)
        p = env.stagefs("mount", "-d", s3vol.url, m, "--cache-dir", s3vol.cache, "--io-retries", "2", "--io-timeout", "2")
        assert p.stderr.count("only cached data is readable") == 1, p.stderr  # once, not twice
        start = time.time()
        big = next(rel for rel in s3vol.sums if s3vol.sums[rel] != hashlib.sha256(b"").hexdigest())
        with pytest.raises(OSError) as e:
            run_as(USER, lambda: open(os.path.join(m, big), "rb").read())
        assert e.value.errno == 5 and time.time() - start < 30
    finally:
        env.stagefs("umount", m)


def test_a_second_stage_fetches_only_missing_blocks(env, s3vol):
    d = env.dir_for(USER, "rep")
    r1, r2 = os.path.join(d, "r1.json"), os.path.join(d, "r2.json")
    stage(env, s3vol, "/datasets/small/a", "--report", r1)
    stage(env, s3vol, "/datasets/small", "--report", r2)
    first, second = report(r1), report(r2)
    assert first["blocksFetched"] > 0
    assert second["blocksCached"] == first["blocksFetched"], "blocks staged before are skipped"
    total = report_blocks = sum(p["blocks"] for p in second["paths"])
    assert second["blocksFetched"] == total - first["blocksFetched"]
    assert report_blocks > second["blocksFetched"]


def test_paths_inside_a_mount_and_a_manifest(env, s3vol):
    m = env.dir_for(USER, "m")
    env.stagefs("mount", "-d", s3vol.url, m, "--cache-dir", s3vol.cache)
    try:
        manifest = os.path.join(env.dir_for(USER, "mf"), "list")
        run_as(USER, lambda: open(manifest, "w").write(f"# datasets\n{m}/datasets/small/a\n\n{m}/datasets/small/b/f1\n"))
        p = env.stagefs("stage", "--manifest", manifest)
        assert "status ok" in p.stdout
        p = env.stagefs("stage", "--check", f"{m}/datasets/small/a", f"{m}/datasets/small/c", check=False)
        assert f"{m}/datasets/small/a: 100.0% cached" in p.stdout
        assert f"{m}/datasets/small/c: 0.0% cached" in p.stdout
        assert p.returncode == 3
        # A path that does not exist is named as it was typed, not as the volume path.
        p = env.stagefs("stage", f"{m}/datasets/small/a", f"{m}/datasets/nope", check=False)
        assert p.returncode == 3 and f"stagefs: {m}/datasets/nope: no such file or directory" in p.stderr, p.stderr
    finally:
        env.stagefs("umount", m)


def test_errors_are_reported_per_path(env, s3vol):
    p = stage(env, s3vol, "/datasets/small/a", "/datasets/nothing", "/private", check=False)
    assert p.returncode == 3, "partial"
    assert "/datasets/nothing: no such file or directory" in p.stderr
    assert "/private: permission denied" not in p.stderr, "the owner may read /private"
    assert "status partial" in p.stdout
    p = stage(env, s3vol, "/private", user=OTHER, cache=env.dir_for(OTHER, "c2"), check=False)
    assert p.returncode == 4 and "/private: permission denied" in p.stderr, "failed: nothing staged"


def test_two_processes_stage_while_a_mount_reads(env, s3vol):
    m = env.dir_for(USER, "m")
    env.stagefs("mount", "-d", s3vol.url, m, "--cache-dir", s3vol.cache)
    try:
        base = ["runuser", "-u", USER, "--", env.bin, "stage", "--meta", s3vol.url, "--cache-dir", s3vol.cache, "--threads", "4"]
        p1 = subprocess.Popen(base + ["/datasets/small"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        p2 = subprocess.Popen(base + ["/datasets/small/b", "/datasets/small/c"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        got = read_all(m, s3vol.sums)
        o1, e1 = p1.communicate(120)
        o2, e2 = p2.communicate(120)
        assert p1.returncode == 0 and p2.returncode == 0, (e1, e2)
        assert got == s3vol.sums
        assert "100.0% cached" in stage(env, s3vol, "/datasets/small", "--check").stdout
        leftovers = [f for _, _, fs in os.walk(s3vol.cache) for f in fs if ".tmp" in f]
        assert leftovers == []
    finally:
        env.stagefs("umount", m)


def test_a_corrupted_cache_file_is_detected_and_refetched(env, s3vol):
    stage(env, s3vol, "/datasets/small")
    files = [os.path.join(d, f) for d, _, fs in os.walk(s3vol.cache) for f in fs if "_" in f and not f.startswith("index")]
    victim = max(files, key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 0xFF]))
    m = env.dir_for(USER, "m")
    log = os.path.join(env.dir_for(USER, "log"), "mount.log")
    env.stagefs("mount", "-d", s3vol.url, m, "--cache-dir", s3vol.cache, "--log", log)
    try:
        assert read_all(m, s3vol.sums) == s3vol.sums, "the damaged block was not served"
    finally:
        env.stagefs("umount", m)
    text = open(log).read()
    assert os.path.basename(victim) in text and "corrupted" in text, "the mount read the damaged cache file and dropped it"
    assert "100.0% cached" in stage(env, s3vol, "/datasets/small", "--check").stdout, "and it was cached again"


def test_pinned_blocks_survive_eviction_until_released(env, s3vol):
    small = "12"  # MiB; each directory holds about 8.3 MiB
    p = stage(env, s3vol, "/datasets/small/a", "--cache-size", small, "--job", "1001")
    assert "pinned for job 1001" in p.stdout
    # The pins of job 1001 leave room for part of b only: that is what staging says, with exit 3,
    # and the part it says it kept is what --check finds.
    p = stage(env, s3vol, "/datasets/small/b", "--cache-size", small, check=False)
    assert p.returncode == 3 and "status partial" in p.stdout, p.stdout + p.stderr
    assert "pinned by other jobs (1001)" in p.stderr and "of the set is in it" in p.stderr, p.stderr
    kept = p.stdout.split("files, ")[1].split(" in the cache")[0]
    check = stage(env, s3vol, "/datasets/small/b", "--check", "--cache-size", small, check=False).stdout
    assert check.split("files, ")[1].strip() == kept, (p.stdout, check)
    assert "/datasets/small/a: 100.0% cached" in stage(env, s3vol, "/datasets/small/a", "--check", "--cache-size", small).stdout
    # The same for a job of its own: its pins cannot push out job 1001's.
    p = stage(env, s3vol, "/datasets/small/c", "--cache-size", small, "--job", "1002", check=False)
    assert p.returncode == 3 and "pinned by other jobs (1001)" in p.stderr, p.stderr
    assert "released" in env.stagefs("stage", "--release", "1001", "--cache-dir", s3vol.cache).stdout
    p = stage(env, s3vol, "/datasets/small/c", "--cache-size", small, "--job", "1002")
    assert "status ok" in p.stdout
    p = stage(env, s3vol, "/datasets/small/a", "--check", "--cache-size", small, check=False)
    assert "/datasets/small/a: 100.0% cached" not in p.stdout, "released blocks were evicted"


def test_a_cache_too_small_for_the_set_is_partial(env, s3vol):
    """The set (about 25 MiB) does not fit a 12 MiB cache: exit 3, the reason, what fits, and a
    summary that matches what --check finds afterwards."""
    rep = os.path.join(env.dir_for(USER, "rep"), "r.json")
    p = stage(env, s3vol, "/datasets/small", "--cache-size", "12", "--report", rep, check=False)
    assert p.returncode == 3 and "status partial" in p.stdout, p.stdout + p.stderr
    assert "the cache is too small for the set: it needs 2" in p.stderr and "raise --cache-size to at least 2" in p.stderr, p.stderr
    kept = p.stdout.split("files, ")[1].split(" in the cache")[0]
    check = stage(env, s3vol, "/datasets/small", "--check", "--cache-size", "12", check=False)
    assert check.returncode == 3 and check.stdout.split("files, ")[1].strip() == kept, (p.stdout, check.stdout)
    r = report(rep)
    assert r["status"] == "partial" and "too small" in r["cacheShortfall"]
    assert 0 < r["bytesKept"] < r["blockBytes"] and r["bytesKept"] <= 12 << 20
    # What it fetched stayed: it stopped at the cache's size instead of evicting its own blocks.
    assert r["bytesFetched"] == r["bytesKept"], r
    # With room, the same command completes.
    p = stage(env, s3vol, "/datasets/small", "--cache-size", "64")
    assert "status ok" in p.stdout and "staged 30 of 30 files" in p.stdout


def test_users_have_separate_caches_and_as_user_checks_permissions(env, s3vol):
    stage(env, s3vol, "/datasets/small/a")
    uid = helpers.pwd.getpwnam(USER).pw_uid
    with pytest.raises(PermissionError):
        run_as(OTHER, os.listdir, os.path.join(s3vol.cache, str(uid)))
    shared = env.dir_for("root", "shared-cache")
    os.chmod(shared, 0o755)
    p = env.stagefs("stage", "--meta", s3vol.url, "--cache-dir", shared, "--as-user", OTHER, "/private", user="root", check=False)
    assert p.returncode == 4 and "/private: permission denied" in p.stderr
    p = env.stagefs("stage", "--meta", s3vol.url, "--cache-dir", shared, "--as-user", OTHER, "/datasets/small/b", user="root")
    assert "status ok" in p.stdout
    other_uid = helpers.pwd.getpwnam(OTHER).pw_uid
    st = os.stat(os.path.join(shared, str(other_uid)))
    assert st.st_uid == other_uid and st.st_mode & 0o777 == 0o700
    owners = {os.stat(os.path.join(d, f)).st_uid for d, _, fs in os.walk(os.path.join(shared, str(other_uid))) for f in fs}
    assert owners == {other_uid}
    p = env.stagefs("stage", "--meta", s3vol.url, "--cache-dir", shared, "--as-user", OTHER, "/private", check=False)
    assert p.returncode == 2 and "needs root" in p.stderr
    # Root never prepares a cache by a path the user controls.
    p = env.stagefs("stage", "--meta", s3vol.url, "--as-user", OTHER, "/datasets/small/b", user="root", check=False)
    assert p.returncode == 2 and "--as-user needs --cache-dir" in p.stderr
    users = env.dir_for(OTHER, "users-cache")
    p = env.stagefs("stage", "--meta", s3vol.url, "--cache-dir", users, "--as-user", OTHER, "/datasets/small/b", user="root", check=False)
    assert p.returncode == 1 and "must be owned by root" in p.stderr, p.stderr


@pytest.fixture
def smallvol(env):
    """A SQLite volume with a local-directory bucket holding one 300 KB file, /f."""
    base = env.dir_for(USER, "smallvol")
    url = f"sqlite3://{base}/meta.db"
    env.stagefs("format", url, "small", "--bucket", f"{base}/data")
    m = env.dir_for(USER, "smallmnt")
    env.stagefs("mount", "-d", url, m, "--cache-size", "0")
    run_as(USER, lambda: open(os.path.join(m, "f"), "wb").write(os.urandom(300_000)))
    env.stagefs("umount", m)
    return url


@pytest.fixture
def links_followed_anywhere():
    """fs.protected_symlinks=0, as on nodes that turned it off: root then follows a link that
    another user planted in a sticky directory, which is the attack to show."""
    path = "/proc/sys/fs/protected_symlinks"
    with open(path) as f:
        old = f.read().strip()
    subprocess.run(["sysctl", "-q", "-w", "fs.protected_symlinks=0"], check=True)
    try:
        yield
    finally:
        subprocess.run(["sysctl", "-q", "-w", f"fs.protected_symlinks={old}"], check=True)


def shared_cache_root(env):
    """A site cache root as root makes it: root's, mode 1777 like /tmp."""
    shared = env.dir_for("root", "shared-cache")
    os.chmod(shared, 0o1777)
    return shared


def moved_aside(shared, name):
    return [n for n in os.listdir(shared) if n.startswith(f".stagefs-moved-{name}-")]


def test_a_squatted_uid_directory_is_moved_aside_by_root(env, smallvol):
    shared = shared_cache_root(env)
    other = helpers.pwd.getpwnam(OTHER).pw_uid
    # OTHER makes root's directory first, open to everyone: root's cache goes elsewhere.
    squat = os.path.join(shared, "0")
    run_as(OTHER, os.mkdir, squat)
    run_as(OTHER, os.chmod, squat, 0o777)
    p = env.stagefs("stage", "--meta", smallvol, "--cache-dir", shared, "/f", user="root", check=False)
    assert p.returncode == 0 and "status ok" in p.stdout, p.stderr
    st = os.lstat(squat)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700
    assert any(f.endswith("_300000") for _, _, fs in os.walk(squat) for f in fs)
    aside = moved_aside(shared, "0")
    assert len(aside) == 1, os.listdir(shared)
    assert os.lstat(os.path.join(shared, aside[0])).st_uid == other
    assert os.listdir(os.path.join(shared, aside[0])) == []


def test_a_squatted_uid_directory_is_refused_to_a_user_naming_its_owner(env, smallvol):
    shared = shared_cache_root(env)
    other = helpers.pwd.getpwnam(OTHER).pw_uid
    uid = helpers.pwd.getpwnam(USER).pw_uid
    # OTHER makes USER's directory first: an ordinary user cannot move it out of a sticky root,
    # so USER is told whose it is and what to do, and nothing of USER's goes into it.
    squat = os.path.join(shared, str(uid))
    run_as(OTHER, os.mkdir, squat)
    run_as(OTHER, os.chmod, squat, 0o777)
    p = env.stagefs("stage", "--meta", smallvol, "--cache-dir", shared, "/f", check=False)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert f"{squat} is a directory of uid {other} ({OTHER}), not yours" in p.stderr, p.stderr
    assert "ask them or root to remove it" in p.stderr and "Fatal error" not in p.stderr
    assert os.listdir(squat) == [] and os.stat(squat).st_uid == other


def test_a_linked_uid_directory_is_moved_aside_by_root_and_never_followed(env, smallvol, links_followed_anywhere):
    shared = shared_cache_root(env)
    other = helpers.pwd.getpwnam(OTHER).pw_uid
    # OTHER plants root's name as a link to a directory of root's: root must neither chmod it
    # nor write its cache into it; the link is moved aside and a real directory made.
    target = env.dir_for("root", "root-only")
    os.chmod(target, 0o755)
    link = os.path.join(shared, "0")
    run_as(OTHER, os.symlink, target, link)
    p = env.stagefs("stage", "--meta", smallvol, "--cache-dir", shared, "/f", user="root", check=False)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o755 and os.listdir(target) == []
    assert p.returncode == 0 and "status ok" in p.stdout, p.stderr
    st = os.lstat(link)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700
    aside = moved_aside(shared, "0")
    assert len(aside) == 1, os.listdir(shared)
    assert os.path.islink(os.path.join(shared, aside[0])) and os.lstat(os.path.join(shared, aside[0])).st_uid == other


def test_a_linked_uid_directory_is_refused_to_a_user_and_not_followed(env, smallvol, links_followed_anywhere):
    shared = shared_cache_root(env)
    other = helpers.pwd.getpwnam(OTHER).pw_uid
    uid = helpers.pwd.getpwnam(USER).pw_uid
    # OTHER plants USER's name as a link to a directory of USER's (one USER shares with a team):
    # USER's stage refuses it, naming its owner, and leaves that directory as it was.
    mine = env.dir_for(USER, "team-share")
    os.chmod(mine, 0o755)
    link = os.path.join(shared, str(uid))
    run_as(OTHER, os.symlink, mine, link)
    p = env.stagefs("stage", "--meta", smallvol, "--cache-dir", shared, "/f", check=False)
    assert stat.S_IMODE(os.stat(mine).st_mode) == 0o755 and os.listdir(mine) == []
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert f"{link} is a symbolic link of uid {other} ({OTHER}), not yours" in p.stderr, p.stderr
    assert os.path.islink(link)


def cached_blocks(cache):
    return sum(1 for _, _, fs in os.walk(cache) for f in fs if "_" in f and ".tmp" not in f)


def test_ctrl_c_stops_cleanly(env, redis):
    """Ctrl-C in the middle of staging: the S3 server is paused once some blocks are cached, so
    staging cannot finish first however fast the machine; then SIGINT."""
    moto = helpers.Moto()
    try:
        url = redis.url(40)
        env.stagefs("format", url, "interrupt", "--storage", "s3", "--bucket", moto.bucket("interrupt"),
                    "--access-key", moto.access_key, "--secret-key", moto.secret_key, "--block-size", "256")
        w = env.dir_for(USER, "w")
        env.stagefs("mount", "-d", url, w, "--cache-size", "0")
        run_as(USER, lambda: open(os.path.join(w, "big"), "wb").write(os.urandom(96 << 20)))
        env.stagefs("umount", w)
        cache = env.dir_for(USER, "c")
        for attempt in range(5):
            env.stagefs("stage", "--meta", url, "--cache-dir", cache, "/big", "--evict")
            p = subprocess.Popen(["runuser", "-u", USER, "--", env.bin, "stage", "--meta", url, "--cache-dir", cache, "--threads", "1",
                                  "--io-timeout", "2", "--io-retries", "1", "/big"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            deadline = time.time() + 60
            while cached_blocks(cache) < 10 and p.poll() is None and time.time() < deadline:
                time.sleep(0.01)
            os.kill(moto.proc.pid, signal.SIGSTOP)
            if p.poll() is None:
                break
            # It finished in the instant between the check and the pause: again.
            os.kill(moto.proc.pid, signal.SIGCONT)
            p.communicate()
        else:
            pytest.fail("staging always finished before the store could be paused")
        try:
            subprocess.run(["pkill", "-INT", "-f", f"stage --meta {url} --cache-dir {cache} --threads 1"], check=True)
            out, err = p.communicate(timeout=60)
        finally:
            os.kill(moto.proc.pid, signal.SIGCONT)
        assert p.returncode == 130, (out, err)
        assert "interrupted" in err
        # The summary counts what is in the cache, not the size of what it walked.
        assert "staged 0 of 1 files" in out and "96.0 MiB of 96.0 MiB" not in out, out
        kept = out.split("files, ")[1].split(" in the cache")[0]
        leftovers = [f for _, _, fs in os.walk(cache) for f in fs if ".tmp" in f]
        assert leftovers == []
        r = env.stagefs("stage", "--meta", url, "--cache-dir", cache, "/big", "--check", check=False)
        assert "% cached" in r.stdout and "100.0% cached" not in r.stdout
        assert r.stdout.split("files, ")[1].strip() == kept, (out, r.stdout)
        again = env.stagefs("stage", "--meta", url, "--cache-dir", cache, "/big")
        assert "status ok" in again.stdout and ", 0 already cached" not in again.stdout, again.stdout
        assert "100.0% cached" in env.stagefs("stage", "--meta", url, "--cache-dir", cache, "/big", "--check").stdout
    finally:
        moto.stop()


@pytest.mark.parametrize("ttl", ["0", "30"])
def test_metadata_cache_saves_round_trips(env, redis, ttl):
    url = redis.url(41 + int(ttl == "30"))
    env.stagefs("format", url, f"metacache{ttl}", "--bucket", env.dir_for(USER, "b"))
    m = env.dir_for(USER, "m")
    env.stagefs("mount", "-d", url, m)
    run_as(USER, lambda: [open(os.path.join(m, f"f{i}"), "w").close() for i in range(200)])
    env.stagefs("umount", m)
    env.stagefs("mount", "-d", url, m, "--attr-cache", ttl, "--entry-cache", ttl, "--dir-entry-cache", ttl)
    try:
        def list_then_stat():
            names = os.listdir(m)
            for _ in range(3):
                for n in names:
                    os.stat(os.path.join(m, n))
            return len(names)

        counter = helpers.RoundTrips(redis.port)
        assert run_as(USER, list_then_stat) == 200
        seen = [c for c in counter.stop() if "ZADD" not in c]  # heartbeats aside
        calls = len(seen)
        if ttl == "0":
            assert calls >= 200, f"{calls} metadata round trips without caches"
        else:
            # (About 6 here: the root's attributes and the listing's pages; the mount's
            # background work, its sessions and deletions, may add a few on a loaded machine.)
            assert calls < 40, f"{calls} metadata round trips with caches for 600 stats after a listing:\n" + "\n".join(c[:200] for c in seen)
    finally:
        env.stagefs("umount", m)


def test_progress_on_a_terminal_summary_otherwise(env, s3vol):
    # On a terminal (script(1) gives the command a pty) a progress line is drawn; piped, one summary.
    cmd = f"{env.bin} stage --meta {s3vol.url} --cache-dir {s3vol.cache} /datasets/small"
    p = subprocess.run(["runuser", "-u", USER, "--", "script", "-qec", cmd, "/dev/null"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "files 30/30" in p.stdout and "ETA" in p.stdout, p.stdout
    stage(env, s3vol, "/datasets/small", "--evict")
    piped = stage(env, s3vol, "/datasets/small")
    assert "ETA" not in piped.stdout + piped.stderr
    assert len(piped.stdout.strip().splitlines()) == 1 and "staged 30 of 30 files" in piped.stdout
