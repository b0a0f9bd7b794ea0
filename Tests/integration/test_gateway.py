"""The multi-tenant gateway (issue 19): a real `stagefs gateway` holding a Redis password (the
server runs with requirepass) and a bucket's keys, two ordinary users mounting through its Unix
socket, and a raw client of the protocol (gwproto.py) playing the hostile user. Every claim is
checked as the second user would try to break it."""
import errno
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest

import gwproto
import helpers
from helpers import OTHER, USER, Gateway, run_as, wait_until


PASSWORD = "pw-" + os.urandom(12).hex()
S3_SECRET = "s3secret-" + os.urandom(12).hex()
S3_KEY = "s3key-" + os.urandom(6).hex()


@pytest.fixture(scope="module")
def site(env, moto):
    """Redis with a password, a `file` volume and an S3 volume, a gateway for each."""
    r = helpers.Redis(env.root, "--requirepass", PASSWORD)
    secret_url = f"redis://:{PASSWORD}@127.0.0.1:{r.port}"
    base = env.dir_for("root", "site")
    bucket = os.path.join(base, "bucket")
    # (The file volume keeps no trash, so that the request-id tests see files freed; the S3
    # volume keeps the default one.)
    env.stagefs("format", f"{secret_url}/1", "gwfile", "--bucket", bucket, "--trash-days", "0", user="root")
    os.chmod(bucket, 0o700)
    env.stagefs("format", f"{secret_url}/2", "gws3", "--storage", "s3", "--bucket", moto.bucket("gws3"), "--access-key", S3_KEY,
                "--secret-key", S3_SECRET, user="root")
    sockets = env.dir_for("root", "run")
    os.chmod(sockets, 0o755)
    # Gateways and mounts ask whether the volume has quotas every 0.2 s (5 s by default), so
    # that a quota set by a test holds at the next write.
    os.environ["STAGEFS_QUOTA_INTERVAL"] = "0.2"
    gf = Gateway(env, f"{secret_url}/1", os.path.join(sockets, "gwfile.sock"))
    gs = Gateway(env, f"{secret_url}/2", os.path.join(sockets, "gws3.sock"))
    logs = env.dir_for("root", "logs")
    os.chmod(logs, 0o1777)
    s = dict(redis=r, file=gf, s3=gs, bucket=bucket, logs=logs, mounts=[])
    yield s
    for m in s["mounts"]:
        if helpers.is_mounted(m):
            subprocess.run(["fusermount3", "-u", "-z", m], capture_output=True)
    gf.stop()
    gs.stop()
    r.stop()
    del os.environ["STAGEFS_QUOTA_INTERVAL"]


def mount(env, site, user, gw, *extra):
    mnt = env.dir_for(user, f"gm-{user}")
    log = os.path.join(site["logs"], f"{os.path.basename(mnt)}.log")
    env.stagefs("mount", "-d", gw.url, mnt, "--log", log, *extra, user=user)
    assert helpers.is_mounted(mnt)
    site["mounts"].append(mnt)
    return mnt


def private_tree(root):
    """As USER: a 0700 directory holding a 0600 file and a directory USER owns, 0777."""
    def make():
        os.mkdir(os.path.join(root, "a"), 0o700)
        with open(os.path.join(root, "a", "f"), "w") as f:
            f.write("A's secret\n")
        os.chmod(os.path.join(root, "a", "f"), 0o600)
        os.mkdir(os.path.join(root, "open"), 0o777)
        os.chmod(os.path.join(root, "open"), 0o777)
        with open(os.path.join(root, "open", "g"), "w") as f:
            f.write("A's file in an open directory\n")
        os.chmod(os.path.join(root, "open", "g"), 0o600)
    run_as(USER, make)


def attempts(root):
    """What the second user tries on the first user's files; errno of each."""
    f, g = os.path.join(root, "a", "f"), os.path.join(root, "open", "g")
    return {
        "read": gwproto.code(lambda: open(f).read()),
        "read-open-dir": gwproto.code(lambda: open(g).read()),
        "chmod": gwproto.code(os.chmod, g, 0o666),
        "chown": gwproto.code(os.chown, g, os.getuid(), -1),
        "rename": gwproto.code(os.rename, f, os.path.join(root, "open", "stolen")),
        "truncate": gwproto.code(os.truncate, g, 0),
        "unlink": gwproto.code(os.unlink, f),
        "setxattr": gwproto.code(os.setxattr, g, "user.x", b"1"),
        "list": gwproto.code(os.listdir, os.path.join(root, "a")),
    }


def redis_reads(site):
    """Read scripts and plain reads the site's Redis ran since the last call (counts reset)."""
    cli = ["redis-cli", "-p", str(site["redis"].port), "-a", PASSWORD, "--no-auth-warning"]
    out = subprocess.run(cli + ["INFO", "commandstats"], capture_output=True, text=True, check=True).stdout
    subprocess.run(cli + ["CONFIG", "RESETSTAT"], capture_output=True, check=True)
    calls = {m.group(1): int(m.group(2)) for m in re.finditer(r"cmdstat_(\w+):calls=(\d+)", out)}
    return sum(calls.get(c, 0) for c in ("evalsha", "eval", "get", "hget", "hlen"))


def test_the_gateways_cache_answers_stats_and_sees_other_clients_changes(env, site):
    """With --tracked-cache the gateway answers lookups and stats from its cache, kept by Redis's client tracking:
    stats of files it knows cost Redis nothing, and a change made by another client of the
    volume (a direct mount) is seen through the gateway at once after Redis's invalidation, in
    both directions (both mounts without kernel caches, so every stat reaches its engine)."""
    nocache = ("--attr-cache", "0", "--entry-cache", "0", "--dir-entry-cache", "0")
    tracked = Gateway(env, f"redis://:{PASSWORD}@127.0.0.1:{site['redis'].port}/1",
                      os.path.join(os.path.dirname(site["file"].socket), "tracked.sock"), "--tracked-cache")
    try:
        tracked_gateway_sees_other_clients(env, site, tracked, nocache)
    finally:
        tracked.stop()


def tracked_gateway_sees_other_clients(env, site, tracked, nocache):
    gw = mount(env, site, USER, tracked, *nocache)
    direct = env.dir_for("root", "direct-of-gwfile")
    env.stagefs("mount", "-d", f"redis://:{PASSWORD}@127.0.0.1:{site['redis'].port}/1", direct, "--log",
                os.path.join(site["logs"], "direct-of-gwfile.log"), *nocache, user="root")
    site["mounts"].append(direct)
    base = "coherent"

    def make():
        os.mkdir(os.path.join(gw, base))
        for i in range(50):
            with open(os.path.join(gw, base, f"f{i}"), "w") as f:
                f.write("x" * i)
    run_as(USER, make)

    def stats():
        return [os.stat(os.path.join(gw, base, f"f{i}")).st_size for i in range(50)]
    assert run_as(USER, stats) == list(range(50))
    redis_reads(site)
    for _ in range(3):
        assert run_as(USER, stats) == list(range(50))
    reads = redis_reads(site)
    assert reads <= 5, f"150 stats through the gateway of files it knows cost Redis {reads} reads"

    # The direct mount (another client of Redis) changes what the gateway holds.
    d = os.path.join(direct, base)
    os.chmod(os.path.join(d, "f1"), 0o600)
    with open(os.path.join(d, "f2"), "a") as f:
        f.write("more")
    os.rename(os.path.join(d, "f3"), os.path.join(d, "g3"))
    os.unlink(os.path.join(d, "f4"))
    with open(os.path.join(d, "new"), "w") as f:
        f.write("n")

    def seen():
        def look():
            def st(name):
                try:
                    return os.stat(os.path.join(gw, base, name))
                except FileNotFoundError:
                    return None
            f1, f2, f3, g3, f4, new = (st(x) for x in ("f1", "f2", "f3", "g3", "f4", "new"))
            return (f1.st_mode & 0o777 == 0o600 and f2.st_size == 6 and f3 is None and g3 is not None and f4 is None
                    and new is not None and new.st_size == 1)
        return run_as(USER, look)
    wait_until(seen, 2, "the direct mount's changes seen through the gateway")
    # And the other way: what the gateway changes, the direct mount sees.
    run_as(USER, lambda: os.chmod(os.path.join(gw, base, "f5"), 0o640))
    wait_until(lambda: os.stat(os.path.join(d, "f5")).st_mode & 0o777 == 0o640, 2, "the gateway's chmod seen directly")
    subprocess.run(["fusermount3", "-u", direct], check=True)
    subprocess.run(["fusermount3", "-u", gw], check=True)


def test_each_user_gets_what_ext4_gives_on_the_others_files(env, site):
    """User B, mounted through the gateway, cannot read, chmod, chown, rename, truncate, unlink
    or setxattr user A's 0600 file in a 0700 directory, and gets the errno ext4 gives."""
    a = mount(env, site, USER, site["file"])
    b = mount(env, site, OTHER, site["file"])
    oracle = env.dir_for("root", "oracle")
    os.chmod(oracle, 0o777)
    private_tree(a)
    private_tree(oracle)
    want = run_as(OTHER, attempts, oracle)
    got = run_as(OTHER, attempts, b)
    assert got == want, (got, want)
    assert want["read"] == errno.EACCES and want["chown"] == errno.EPERM
    # And A still has their file, untouched.
    assert run_as(USER, lambda: open(os.path.join(a, "a", "f")).read()) == "A's secret\n"
    # Files each one makes are theirs.
    run_as(OTHER, lambda: open(os.path.join(b, "open", "bfile"), "w").write("b"))
    st = run_as(USER, os.stat, os.path.join(a, "open", "bfile"))
    assert st.st_uid == helpers.pwd.getpwnam(OTHER).pw_uid


def test_a_lookup_after_a_listing_needs_search_permission_only(env, site):
    """Through the gateway a listing needs read permission and a lookup only search, as on
    ext4: a mount that listed a large directory, whose owner then made it 0711, still finds
    the names in it after its cache's time (a lookup there reads on from a listed name's
    position, and falls back to the lookup alone when the gateway refuses the listing)."""
    a = mount(env, site, USER, site["file"])
    b = mount(env, site, OTHER, site["file"])
    d = os.path.join(a, "searchable")
    n = 3000

    run_as(USER, helpers.empty_files, d, n)
    there = os.path.join(b, "searchable")
    # (Lists it all, plain pages after the first: each name's position is kept.)
    listed = run_as(OTHER, lambda: subprocess.run(["find", there, "-name", "f0*"], check=True, capture_output=True, text=True).stdout)
    assert len(listed.split()) == 1000
    run_as(USER, os.chmod, d, 0o711)

    def look():
        import time
        time.sleep(1.5)  # the records of the listing expire
        missing = []
        for i in range(n):
            try:
                os.lstat(os.path.join(there, f"f{i:04}"))
            except OSError as e:
                missing.append((i, e.errno))
        return missing
    missing = run_as(OTHER, look)
    assert not missing, f"{len(missing)} names not found with search permission, e.g. {missing[:3]}"
    with pytest.raises(PermissionError):
        run_as(OTHER, os.listdir, there)


def test_differential_through_a_root_mount_of_the_gateway(env, site):
    """The differential test (two users and root against ext4) through a root mount with
    allow_other: the gateway honours the callers a root client names."""
    import posixdiff
    mnt = env.dir_for("root", "gm-root")
    env.stagefs("mount", "-d", site["file"].url, mnt, "-o", "allow_other", "--log", os.path.join(site["logs"], "root.log"), user="root")
    site["mounts"].append(mnt)
    top = os.path.join(mnt, "diff")
    os.mkdir(top)
    os.chmod(top, 0o777)
    oracle = env.dir_for("root", "oracle-gw")
    os.chmod(oracle, 0o777)
    d = posixdiff.Driver(oracle, top, [USER, OTHER], helpers.SHARED_GROUP, 4 << 20)
    n = int(os.environ.get("STAGEFS_GW_DIFF_SEQUENCES", "60"))
    failures = posixdiff.run_seeds(d, range(1, n + 1), 40)
    assert not failures, "\n\n".join(failures)
    assert d.ops_run >= n * 40


def memory_holds(pid, needles):
    """Which of `needles` (bytes) appear anywhere in the readable memory of `pid` (read as root
    through /proc/PID/mem), its command line or its environment."""
    found = set()
    for name in ("cmdline", "environ"):
        with open(f"/proc/{pid}/{name}", "rb") as f:
            blob = f.read()
        found |= {n for n in needles if n in blob}
    overlap = max(len(n) for n in needles)
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            addr, perms = line.split()[:2]
            if not perms.startswith("r"):
                continue
            lo, hi = (int(x, 16) for x in addr.split("-"))
            tail = b""
            pos = lo
            while pos < hi:
                n = min(16 << 20, hi - pos)
                try:
                    mem.seek(pos)
                    blob = mem.read(n)
                except (OSError, ValueError, OverflowError):
                    break
                found |= {x for x in needles if x in tail + blob}
                tail = blob[-overlap:]
                pos += n
    return found


def test_no_secret_reaches_a_user_mount(env, site):
    """B's mount of an S3 volume through the gateway: its memory (read as root through
    /proc/PID/mem), arguments and environment hold neither the Redis password nor the S3 keys;
    the gateway's memory does (so the search works); no file B can read holds them."""
    mnt = mount(env, site, OTHER, site["s3"], "--cache-size", "0")
    payload = os.urandom(5 << 20)
    run_as(OTHER, lambda: open(os.path.join(mnt, "data"), "wb").write(payload))
    # Read cold, from URLs the gateway signs (they name the access key id, which is no secret).
    env.stagefs("umount", mnt, user=OTHER)
    env.stagefs("mount", "-d", site["s3"].url, mnt, "--cache-size", "0", "--log", os.path.join(site["logs"], "cold.log"), user=OTHER)
    assert run_as(OTHER, lambda: open(os.path.join(mnt, "data"), "rb").read()) == payload
    needles = {PASSWORD.encode(), S3_SECRET.encode()}
    pid = helpers.mount_pid(mnt)
    assert pid, "the mount's process"
    assert memory_holds(pid, needles) == set()
    assert memory_holds(site["s3"].proc.pid, {PASSWORD.encode(), S3_SECRET.encode()}) == {PASSWORD.encode(), S3_SECRET.encode()}
    # Files: the gateway's settings are root's 0600; status shows no key or password.
    assert run_as(OTHER, gwproto.code, lambda: open(site["s3"].config).read()) == errno.EACCES
    out = env.stagefs("status", site["s3"].url, user=OTHER).stdout
    assert "gws3" in out and PASSWORD not in out and S3_SECRET not in out, out
    for d, _, files in os.walk(f"/home/{OTHER}"):
        for name in files:
            p = os.path.join(d, name)
            try:
                blob = run_as(OTHER, lambda: open(p, "rb").read())
            except OSError:
                continue
            assert PASSWORD.encode() not in blob and S3_SECRET.encode() not in blob, p


def a_private_file(env, site):
    """A's mount, a 0600 file in a 0700 directory, its inode number and the keys of its blocks."""
    a = mount(env, site, USER, site["file"])
    name = f"p{os.urandom(3).hex()}"

    def make():
        os.mkdir(os.path.join(a, name), 0o700)
        with open(os.path.join(a, name, "f"), "wb") as f:
            f.write(os.urandom(300000))
        os.chmod(os.path.join(a, name, "f"), 0o600)
        return os.stat(os.path.join(a, name, "f")).st_ino, os.stat(os.path.join(a, name)).st_ino
    ino, dino = run_as(USER, make)
    keys = sorted(os.path.relpath(os.path.join(d, f), site["bucket"]) for d, _, fs in os.walk(site["bucket"]) for f in fs)
    return a, name, ino, dino, keys


def test_a_raw_client_reaches_nothing_it_was_not_given(env, site):
    """B speaks the protocol directly: naming A's inodes, sessions, blocks or slice ids it
    was never given is refused; a uid sent in a request changes nothing."""
    _, name, ino, dino, keys = a_private_file(env, site)
    sock = site["file"].socket

    def attack():
        c = gwproto.Raw(sock)
        out = {}

        code = gwproto.code
        # An inode never looked up: refused whatever tag is guessed.
        out["getattr"] = code(c.getattr, ino, 0)
        out["getattr-guess"] = code(c.getattr, ino, 0x1234567890ABCDEF)
        out["readchunks"] = code(c.read_chunks, ino, 0)
        # The path: the directory is found (search in the root is allowed), the file not.
        d, dtag, _ = c.lookup(1, 0, name.encode())
        out["lookup-in-0700"] = code(c.lookup, d, dtag, b"f")
        # Blocks of A's file: no tag, a guessed tag; the bucket itself is not B's.
        out["blocks"] = [code(c.get_block, k, 4096, 0) for k in keys]
        out["block-guess"] = code(c.get_block, keys[-1], 4096, 42)
        out["descriptors"] = [code(c.open_block, k, 0) for k in keys]
        # B's own slice ids let B write new blocks, never one of A's, never twice.
        first, stag = c.new_slice_ids(8)
        out["put-other"] = code(c.put_block, keys[-1], first, 8, stag, b"x" * int(keys[-1].rsplit("_", 1)[1]))
        mine = f"gwfile/chunks/{first // 1000000}/{first // 1000}/{first}_0_5"
        out["put-own"] = code(c.put_block, mine, first, 8, stag, b"hello")
        out["put-own-again"] = code(c.put_block, mine, first, 8, stag, b"HELLO")
        out["put-forged-range"] = code(c.put_block, mine.replace(f"{first}_", f"{first + 100}_"), first + 100, 8, stag, b"hello")
        # A's session (1): heartbeats and closes need its tag.
        out["session"] = code(c.heartbeat, 1, 0)
        # A create that says "I am uid 0 / uid A": the file is B's, and chown to A is refused.
        sid, sid_tag = c.new_session()
        fino, ftag, a_ = c.create(1, 0, f"b{os.urandom(3).hex()}".encode(), 0o644, sid, sid_tag,
                                  on_behalf=(0, 0, [0]))
        out["owner"] = a_["uid"]
        out["chown"] = code(c.chown, fino, ftag, helpers.pwd.getpwnam(USER).pw_uid, helpers.pwd.getpwnam(USER).pw_gid)
        c.close()
        out["bucket"] = gwproto.code(os.listdir, site["bucket"])
        return out

    out = run_as(OTHER, attack)
    assert out["getattr"] == errno.EACCES and out["getattr-guess"] == errno.EACCES and out["readchunks"] == errno.EACCES, out
    assert out["lookup-in-0700"] == errno.EACCES, out
    assert out["blocks"] and set(out["blocks"]) == {errno.EACCES} and out["block-guess"] == errno.EACCES, out
    assert set(out["descriptors"]) == {errno.EACCES}, out
    assert out["put-other"] == errno.EACCES and out["put-own"] == 0 and out["put-own-again"] == errno.EEXIST, out
    assert out["put-forged-range"] == errno.EACCES, out
    assert out["session"] == errno.EACCES, out
    assert out["owner"] == helpers.pwd.getpwnam(OTHER).pw_uid and out["chown"] == errno.EPERM, out
    assert out["bucket"] == errno.EACCES, out
    log = open(site["file"].log).read()
    assert f"named inode {ino} without having reached it" in log, log[-2000:]


def test_malformed_frames_get_errors_and_nobody_else_waits(env, site):
    """Truncated frames, a 4 GiB length, unknown ops, garbage, a wrong version and a flood of
    stalled half-sent frames: each gets an error reply (or the connection ends), the gateway's
    memory stays bounded and another user's operations keep their pace."""
    a = mount(env, site, USER, site["file"])
    gw = site["file"]
    sock = gw.socket
    rss0 = gw.rss_kib()

    def answers(send):
        c = gwproto.Raw(sock, hello=False)
        try:
            send(c)
            return c.recv()[1]
        except EOFError:
            return "closed"
        finally:
            c.close()

    hello = struct.pack(">QH", 0, 1) + gwproto.data(gwproto.MAGIC) + struct.pack(">H", gwproto.VERSION)

    def hello_then(body):
        def send(c):
            c.frame(hello)
            assert c.recv()[1] == 0
            c.send_raw(body)
        return send
    results = {
        "4GiB": answers(lambda c: c.send_raw(struct.pack(">I", 0xFFFFFFFF) + b"x" * 100)),
        "4GiB-after-hello": answers(hello_then(struct.pack(">I", 0xFFFFFFF0))),
        "unknown-op": answers(hello_then(struct.pack(">IQH", 11, 7, 999) + b"\0")),
        "garbage": answers(lambda c: c.send_raw(struct.pack(">I", 40) + os.urandom(40))),
        "no-hello": answers(lambda c: c.frame(struct.pack(">QHB", 5, gwproto.OPS["getattr"], 0) + gwproto.ref(1))),
        "short-field": answers(hello_then(struct.pack(">IQHB", 11 + 3, 9, gwproto.OPS["getattr"], 0) + b"\0\0\0")),
    }
    for k, v in results.items():
        assert v == errno.EPROTO, (k, v, results)
    try:
        gwproto.Raw(sock, hello=False).hello(version=99)
        raise AssertionError("a client of another protocol version was served")
    except gwproto.GatewayError as e:
        assert e.errno == errno.EPROTO and f"protocol {gwproto.VERSION}" in e.message and "protocol 99" in e.message, e.message
    # A truncated frame: the length says 100, 10 bytes come, then the client goes.
    c = gwproto.Raw(sock)
    c.send_raw(struct.pack(">I", 100) + b"0123456789")
    c.close()

    # B opens many connections, each starting a 16 MiB frame and sending 8 MiB of it, then
    # stalls; meanwhile A writes and stats.
    stalled = []

    def stall():
        # Past B's own budget the gateway stops reading B's frames: those sends block, which
        # is the point (they time out here).
        for _ in range(12):
            s = gwproto.Raw(sock, timeout=1)
            try:
                s.send_raw(struct.pack(">I", 16 << 20) + b"\0" * (8 << 20))
            except OSError:
                pass
            stalled.append(s)
    t = threading.Thread(target=lambda: run_as(OTHER, lambda: (stall(), time.sleep(8))))
    t.start()
    time.sleep(2)
    worst = 0.0
    data = os.urandom(9 << 20)
    t0 = time.time()
    run_as(USER, lambda: open(os.path.join(a, "during-attack"), "wb").write(data))
    write_s = time.time() - t0
    for _ in range(50):
        t1 = time.time()
        run_as(USER, os.stat, os.path.join(a, "during-attack"))
        worst = max(worst, time.time() - t1)
    rss = gw.rss_kib()
    t.join()
    assert run_as(USER, lambda: open(os.path.join(a, "during-attack"), "rb").read()) == data
    assert write_s < 10 and worst < 1.0, (write_s, worst)
    # The stalled user holds at most its own budget (64 MiB), not 12 x 8 MiB.
    assert rss - rss0 < 160 * 1024, (rss0, rss)
    assert gw.proc.poll() is None


def test_a_restarted_gateway_costs_an_idle_mount_nothing(env, site):
    """A gateway killed and started again three times: the mount, idle meanwhile, goes on; an
    operation made while the gateway is away waits for it and succeeds."""
    a = mount(env, site, USER, site["file"])
    gw = site["file"]
    run_as(USER, lambda: open(os.path.join(a, "before"), "w").write("x" * 1000))
    for i in range(3):
        gw.restart()
        run_as(USER, lambda: open(os.path.join(a, f"after-{i}"), "w").write(str(i)))
        assert run_as(USER, lambda: open(os.path.join(a, "before")).read()) == "x" * 1000
    gw.stop()
    box = {}

    def during():
        box["r"] = run_as(USER, lambda: (open(os.path.join(a, "while-away"), "w").write("w"), sorted(os.listdir(a)))[1])
    t = threading.Thread(target=during)
    t.start()
    time.sleep(2)
    assert t.is_alive(), "the operation waits for the gateway"
    gw.start()
    t.join(60)
    assert "after-2" in box.get("r", []) and "while-away" in box["r"], box


def churn(root, stop_file, tag):
    """Creates, writes, renames and unlinks files under `root` until `stop_file` exists; returns
    (what the tree must hold, the operations that failed)."""
    import random
    rnd = random.Random(tag)
    model, failed, i = {}, [], 0
    # What was done to each name, with when (to tell a failure's story: which operation and
    # which gateway restart it met).
    history = {}

    def note(name, what):
        history.setdefault(name, []).append(f"op {i} {what} at {time.time():.3f}")
    os.makedirs(root, exist_ok=True)
    while not os.path.exists(stop_file) or i < 50:
        i += 1
        try:
            k = rnd.random()
            if k < 0.5 or not model:
                name, body = f"f{i}", os.urandom(rnd.choice([10, 5000, 70000]))
                with open(os.path.join(root, name), "wb") as f:
                    f.write(body)
                model[name] = body
                note(name, f"created ({len(body)} bytes)")
            elif k < 0.7:
                old = rnd.choice(sorted(model))
                new = f"r{i}"
                os.rename(os.path.join(root, old), os.path.join(root, new))
                model[new] = model.pop(old)
                note(old, f"renamed to {new}")
                note(new, f"renamed from {old}")
            elif k < 0.85:
                old = rnd.choice(sorted(model))
                os.unlink(os.path.join(root, old))
                del model[old]
                note(old, "unlinked")
            else:
                old = rnd.choice(sorted(model))
                with open(os.path.join(root, old), "ab") as f:
                    f.write(b"+")
                model[old] += b"+"
                note(old, "appended")
        except OSError as e:
            failed.append(f"op {i}: {e}")
    return model, failed, history


def tree(root):
    return {n: open(os.path.join(root, n), "rb").read() for n in os.listdir(root)}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill"])
def test_gateway_restarts_under_load_fail_no_operation(env, site, sig):
    """Two users create, write, rename, append and unlink through their mounts while the gateway
    is restarted three times (SIGTERM, as systemd restarts it; or SIGKILL, killed whatever it
    was doing: changes it carried out are answered from their request ids' records): no
    operation fails, and each tree is exactly what its user did."""
    a = mount(env, site, USER, site["file"])
    b = mount(env, site, OTHER, site["file"])
    gw = site["file"]
    stop_file = os.path.join(env.dir_for("root", "stop"), "stop")
    results = {}

    def worker(user, root, tag):
        results[user] = run_as(user, churn, root, stop_file, tag)
    da, db = os.path.join(a, "churn-a"), os.path.join(b, "churn-b")
    threads = [threading.Thread(target=worker, args=(USER, da, 1)), threading.Thread(target=worker, args=(OTHER, db, 2))]
    for t in threads:
        t.start()
    restarts = []
    for _ in range(3 if sig == signal.SIGTERM else 6):
        time.sleep(1.5)
        t0 = time.time()
        gw.stop(sig)
        gw.start()
        restarts.append(f"{t0:.3f}-{time.time():.3f}")
    time.sleep(1.5)
    open(stop_file, "w").close()
    for t in threads:
        t.join(120)
    for user, root in ((USER, da), (OTHER, db)):
        model, failed, history = results[user]
        assert failed == [], failed[:5]
        assert len(model) > 5
        got = run_as(user, tree, root)
        if got != model:
            # The story of each name that differs, the restarts, and the logs' ends.
            wrong = sorted(n for n in set(got) | set(model) if got.get(n) != model.get(n))
            logs = [gw.log] + [os.path.join(site["logs"], f) for f in os.listdir(site["logs"])]
            tails = {p: open(p, errors="replace").read()[-3000:] for p in logs if os.path.exists(p)}
            pytest.fail(f"{user}'s tree differs at {wrong[:5]} (in the tree: {[n in got for n in wrong[:5]]}, "
                        f"sizes {[len(got.get(n, b'')) for n in wrong[:5]]}); what was done: "
                        f"{ {n: history.get(n) for n in wrong[:5]} }; gateway restarts {restarts}; logs: {tails}")
    if sig == signal.SIGTERM:
        assert "stopped" in open(gw.log).read()


def test_a_change_sent_again_is_answered_from_its_record(env, site):
    """A change carries a request id (the client's session, a slot, a number). Sent again after
    a lost reply (a gateway killed after its commit, a broken connection), it is answered with
    what its first sending did, not done twice; a session's records are its owner's alone."""
    sock = site["file"].socket

    def client():
        c = gwproto.Raw(sock)
        sid, stag = c.new_session()

        def m(slot, n, resend=True):
            return gwproto.mark(sid, stag, slot, n, resend)
        out = {}
        name = f"rq{os.urandom(3).hex()}".encode()
        create = gwproto.ref(1, 0) + gwproto.data(name) + struct.pack(">HQQ", 0o644, sid, stag)
        first = c.call("create", create, mark=m(0, 1, False))
        ino, itag = struct.unpack_from(">QQ", first)
        wtag = struct.unpack_from(">Q", first, 16 + 71 + 8)[0]
        # The same request again: the first sending's answer, not EEXIST. (Answers compared
        # without the changed directories' attributes at their ends, which only a change sends.)
        out["create"] = c.call("create", create, mark=m(0, 1))[:103] == first[:103]
        # A new number in that slot is a new request.
        out["create-new"] = gwproto.code(lambda: c.call("create", create, mark=m(0, 2, False)))
        # A slice committed twice is one slice record.
        sl, rtag = c.new_slice_ids(1)
        ws = gwproto.write_slice_fields(ino, itag, sl, 5, wtag, sl, rtag, sid, stag)
        w1 = c.call("writeSlice", ws, mark=m(1, 3, False))
        # (Not flagged as sent again, it is found at its commit.)
        out["write"] = [c.call("writeSlice", ws, mark=m(1, 3)) == w1, c.call("writeSlice", ws, mark=m(1, 3, False)) == w1]
        out["slices"] = struct.unpack_from(">I", c.read_chunks(ino, itag, 0, 0, sid, stag), 4)[0]
        # Opened a second time, then one close sent twice: still open once, so an unlink
        # frees nothing yet; the last close frees it.
        openf = gwproto.ref(ino, itag) + struct.pack(">iQQ", os.O_RDONLY, sid, stag)
        c.call("open", openf, mark=m(2, 4, False))
        out["open"] = len(c.call("open", openf, mark=m(2, 4))) > 71
        close = gwproto.ref(ino, itag) + struct.pack(">QQ", sid, stag)
        out["close"] = [c.call("close", close, mark=m(3, 5, False)), c.call("close", close, mark=m(3, 5))]
        unlink = gwproto.ref(1, 0) + gwproto.data(name)
        u1 = c.call("unlink", unlink, mark=m(4, 6, False))
        out["unlink-freed"] = u1[79]
        # Unlinked twice: the first answer again, not ENOENT.
        out["unlink"] = c.call("unlink", unlink, mark=m(4, 6))[:80] == u1[:80]
        out["last-close-frees"] = c.call("close", close, mark=m(3, 7, False))
        # A directory made twice, a rename done twice.
        d = f"rqd{os.urandom(3).hex()}".encode()
        mkdir = gwproto.ref(1, 0) + gwproto.data(d) + struct.pack(">BHI", 2, 0o755, 0) + b"\0"
        k1 = c.call("mknod", mkdir, mark=m(5, 8, False))
        out["mkdir"] = c.call("mknod", mkdir, mark=m(5, 8))[:87] == k1[:87]
        ren = gwproto.ref(1, 0) + gwproto.data(d) + gwproto.ref(1, 0) + gwproto.data(d + b"-moved") + struct.pack(">I", 0)
        r1 = c.call("rename", ren, mark=m(6, 9, False))
        out["rename"] = c.call("rename", ren, mark=m(6, 9))[:25] == r1[:25]
        out["renamed"] = gwproto.code(c.lookup, 1, 0, d + b"-moved")
        # An answer from a record grants nothing the caller does not hold now: an old create
        # sent again after its close and a chmod to 0444 gets its answer, whose write tag
        # writes nothing.
        name2 = f"rq{os.urandom(3).hex()}".encode()
        create2 = gwproto.ref(1, 0) + gwproto.data(name2) + struct.pack(">HQQ", 0o644, sid, stag)
        ino2, itag2 = struct.unpack_from(">QQ", c.call("create", create2, mark=m(7, 20, False)))
        c.call("close", gwproto.ref(ino2, itag2) + struct.pack(">QQ", sid, stag), mark=m(8, 21, False))
        chmod = gwproto.ref(ino2, itag2) + struct.pack(">IHIIQ", 1, 0o444, 0, 0, 0) + struct.pack(">qIqIqI", 0, 0, 0, 0, 0, 0) + b"\0" + struct.pack(">QQQ", 0, 0, 0)
        c.call("setattr", chmod, mark=m(9, 22, False))
        replay = c.call("create", create2, mark=m(7, 20))
        wtag2 = struct.unpack_from(">Q", replay, 16 + 71 + 8)[0]
        sl2, rtag2 = c.new_slice_ids(1)
        out["replayed-write"] = gwproto.code(lambda: c.call("writeSlice", gwproto.write_slice_fields(ino2, itag2, sl2, 5, wtag2, sl2, rtag2, sid, stag)))
        c.close()
        return out, (sid, stag, create)
    out, (sid, stag, create) = run_as(USER, client)
    assert out["create"] and out["create-new"] == errno.EEXIST, out
    assert out["write"] == [True, True] and out["slices"] == 1, out
    assert out["open"] and out["close"] == [b"\0", b"\0"], out
    assert out["unlink-freed"] == 0 and out["unlink"] and out["last-close-frees"] == b"\1", out
    assert out["mkdir"] and out["rename"] and out["renamed"] == 0, out
    assert out["replayed-write"] == errno.EBADF, out

    # Another user cannot name A's session in a request id: neither to be answered from A's
    # records nor to leave records there.
    def other():
        c = gwproto.Raw(sock)
        return gwproto.code(lambda: c.call("create", create, mark=gwproto.mark(sid, stag, 0, 1, True)))
    assert run_as(OTHER, other) == errno.EACCES


def test_a_record_answers_only_the_request_that_made_it(env, site):
    """A request id's record is bound to its request (op, caller, fields): B cannot send a
    rename "again" with the id of an open of a shared directory, whose saved attributes would
    read as the rename's result and name (with a fresh tag) an inode B never reached."""
    sock = site["file"].socket
    # The admin (root) makes a shared, world-writable directory, as /tmp is: root:root 1777.
    c = gwproto.Raw(sock)
    shared = f"shared{os.urandom(3).hex()}".encode()
    c.call("mknod", gwproto.ref(1, 0) + gwproto.data(shared) + struct.pack(">BHI", 2, 0o1777, 0) + b"\0")
    c.close()

    # USER: a 0700 directory holding 0644 files (safe: nobody can search the directory); one of
    # them, whose inode number is a multiple of 256, holds a secret.
    def victim():
        c = gwproto.Raw(sock)
        sid, stag = c.new_session()
        d = f"priv{os.urandom(3).hex()}".encode()
        rest = c.call("mknod", gwproto.ref(1, 0) + gwproto.data(d) + struct.pack(">BHI", 2, 0o700, 0) + b"\0")
        dino, dtag = struct.unpack_from(">QQ", rest)
        for i in range(600):
            rest = c.call("create", gwproto.ref(dino, dtag) + gwproto.data(b"f%d" % i) + struct.pack(">HQQ", 0o644, sid, stag))
            ino, itag = struct.unpack_from(">QQ", rest)
            wtag = struct.unpack_from(">Q", rest, 16 + 71 + 8)[0]
            if ino % 256 == 0 and ino >= 512:
                break
        first, rtag = c.new_slice_ids(1)
        key = f"gwfile/chunks/{first // 1000000}/{first // 1000}/{first}_0_6"
        c.put_block(key, first, 1, rtag, b"SECRET")
        c.call("writeSlice", gwproto.write_slice_fields(ino, itag, first, 6, wtag, first, rtag, sid, stag))
        return ino
    target = run_as(USER, victim)
    assert target % 256 == 0

    def attack():
        c = gwproto.Raw(sock)
        out = {"before": gwproto.code(c.getattr, target, 0)}
        sid, stag = c.new_session()
        s, st, _ = c.lookup(1, 0, shared)
        # Subdirectories of the shared directory set its link count to target / 256.
        for i in range(target // 256 - 2):
            c.call("mknod", gwproto.ref(s, st) + gwproto.data(b"d%d" % i) + struct.pack(">BHI", 2, 0o755, 0) + b"\0")
        # An open of the shared directory records its attributes (gid 0, nlink) under an id ...
        c.call("open", gwproto.ref(s, st) + struct.pack(">iQQ", os.O_RDONLY, sid, stag), mark=gwproto.mark(sid, stag, 0, 1))
        # ... which a "rename sent again" with that id reads as (moved, other, ...): the gateway
        # signs an inode tag for `other` = bytes 8..16 of the attributes = nlink << 8.
        ren = gwproto.ref(1, 0) + gwproto.data(b"nothing") + gwproto.ref(1, 0) + gwproto.data(b"nothing2") + struct.pack(">I", 0)
        out["refused"] = gwproto.code(lambda: c.call("rename", ren, mark=gwproto.mark(sid, stag, 0, 1, resend=True)))
        if out["refused"]:
            return out
        rest = c.call("rename", ren, mark=gwproto.mark(sid, stag, 0, 1, resend=True))
        moved, other, otag = struct.unpack_from(">QQQ", rest)
        out["other"] = other
        out["getattr"] = c.getattr(other, otag)
        a, slices = c.open(other, otag, os.O_RDONLY, sid, stag)
        out["data"] = [c.get_block(f"gwfile/chunks/{i // 1000000}/{i // 1000}/{i}_0_{n}", n, t) for i, n, t in slices]
        return out
    out = run_as(OTHER, attack)
    assert out["before"] == errno.EACCES
    # (Without records bound to their request: other == target, data == [b"SECRET"].)
    assert out["refused"] == errno.EINVAL, out


def test_a_late_older_request_in_a_slot_is_not_applied(env, site):
    """A client frees a slot when it gives up on a request (EIO after its retry time) though a
    gateway may still hold it: that older request, arriving after a newer one of the slot, is
    refused (ESTALE), so the newer one's record stays and its resend is not done twice."""
    sock = site["file"].socket

    def client():
        c = gwproto.Raw(sock)
        sid, stag = c.new_session()
        rest = c.call("create", gwproto.ref(1, 0) + gwproto.data(f"late{os.urandom(3).hex()}".encode()) + struct.pack(">HQQ", 0o644, sid, stag))
        ino, itag = struct.unpack_from(">QQ", rest)
        wtag = struct.unpack_from(">Q", rest, 16 + 71 + 8)[0]
        first, rtag = c.new_slice_ids(2)
        new = gwproto.write_slice_fields(ino, itag, first, 5, wtag, first, rtag, sid, stag).replace(struct.pack(">QQQQ", wtag, first, 1, rtag), struct.pack(">QQQQ", wtag, first, 2, rtag))
        old = gwproto.write_slice_fields(ino, itag, first + 1, 5, wtag, first, rtag, sid, stag).replace(struct.pack(">QQQQ", wtag, first, 1, rtag), struct.pack(">QQQQ", wtag, first, 2, rtag))
        c.call("writeSlice", new, mark=gwproto.mark(sid, stag, 1, 10))
        stale = gwproto.code(lambda: c.call("writeSlice", old, mark=gwproto.mark(sid, stag, 1, 3)))   # the late, older request
        c.call("writeSlice", new, mark=gwproto.mark(sid, stag, 1, 10, resend=True))  # reply of 10 lost
        return stale, struct.unpack_from(">I", c.read_chunks(ino, itag, 0, 0, sid, stag), 4)[0]
    stale, slices = run_as(USER, client)
    assert stale == errno.ESTALE and slices == 1, (stale, slices)


def test_a_close_answered_from_its_record_keeps_the_other_open(env, site):
    """A file open twice for writing, one close sent again and answered from its record: the
    other open still writes after a chmod to 0444 (the gateway's note of it stays)."""
    sock = site["file"].socket

    def client(replay):
        c = gwproto.Raw(sock)
        sid, stag = c.new_session()
        rest = c.call("create", gwproto.ref(1, 0) + gwproto.data(f"cl{os.urandom(3).hex()}".encode()) + struct.pack(">HQQ", 0o644, sid, stag))
        ino, itag = struct.unpack_from(">QQ", rest)
        wtag = struct.unpack_from(">Q", rest, 16 + 71 + 8)[0]
        c.call("open", gwproto.ref(ino, itag) + struct.pack(">iQQ", os.O_WRONLY, sid, stag), mark=gwproto.mark(sid, stag, 2, 4))
        close = gwproto.ref(ino, itag) + struct.pack(">QQ", sid, stag)
        c.call("close", close, mark=gwproto.mark(sid, stag, 3, 5))
        if replay:
            c.call("close", close, mark=gwproto.mark(sid, stag, 3, 5, resend=True))  # reply of the close lost
        chmod = gwproto.ref(ino, itag) + struct.pack(">IHIIQ", 1, 0o444, 0, 0, 0) + struct.pack(">qIqIqI", 0, 0, 0, 0, 0, 0) + b"\0" + struct.pack(">QQQ", 0, 0, 0)
        c.call("setattr", chmod)
        first, rtag = c.new_slice_ids(1)
        return gwproto.code(lambda: c.call("writeSlice", gwproto.write_slice_fields(ino, itag, first, 5, wtag, first, rtag, sid, stag)))
    assert run_as(USER, client, False) == 0
    assert run_as(USER, client, True) == 0, "the open still held lost its right to write"


def test_closes_in_one_request_sent_again_are_not_done_twice(env, site):
    """A mount's last closes go many in one request (one commit). Sent again after a lost reply,
    the batch is answered from its record: a file opened twice and closed once in it stays open
    (it still writes after a chmod to 0444) and an unlinked file closed in it was freed once (a
    second carrying out would answer "not freed"); the next close ends the right to write."""
    sock = site["file"].socket

    def client():
        c = gwproto.Raw(sock)
        sid, stag = c.new_session()
        tag = os.urandom(3).hex()

        def make(name):
            rest = c.call("create", gwproto.ref(1, 0) + gwproto.data(name) + struct.pack(">HQQ", 0o644, sid, stag))
            ino, itag = struct.unpack_from(">QQ", rest)
            return ino, itag, struct.unpack_from(">Q", rest, 16 + 71 + 8)[0]
        a, atag, awtag = make(f"ba{tag}".encode())
        b, btag, _ = make(f"bb{tag}".encode())
        c.call("open", gwproto.ref(a, atag) + struct.pack(">iQQ", os.O_WRONLY, sid, stag))
        c.call("unlink", gwproto.ref(1, 0) + gwproto.data(f"bb{tag}".encode()))

        def closes(*files):
            return struct.pack(">I", len(files)) + b"".join(gwproto.ref(i, t) + struct.pack(">QQ", sid, stag) for i, t in files)
        batch = closes((a, atag), (b, btag))
        first = c.call("closes", batch, mark=gwproto.mark(sid, stag, 3, 5))
        again = c.call("closes", batch, mark=gwproto.mark(sid, stag, 3, 5, resend=True))
        chmod = gwproto.ref(a, atag) + struct.pack(">IHIIQ", 1, 0o444, 0, 0, 0) + struct.pack(">qIqIqI", 0, 0, 0, 0, 0, 0) + b"\0" + struct.pack(">QQQ", 0, 0, 0)
        c.call("setattr", chmod)

        def write():
            f, rtag = c.new_slice_ids(1)
            return gwproto.code(lambda: c.call("writeSlice", gwproto.write_slice_fields(a, atag, f, 5, awtag, f, rtag, sid, stag)))
        still = write()
        last = c.call("closes", closes((a, atag)), mark=gwproto.mark(sid, stag, 3, 6))
        return first, again, still, last, write()
    first, again, still, last, after = run_as(USER, client)
    assert first == again == b"\0\1", (first, again)
    assert still == 0, "the open still held lost its right to write"
    assert last == b"\0" and after == errno.EBADF, (last, after)


def test_a_user_stages_through_the_gateway_only_what_they_may_read(env, site):
    a, name, _, _, _ = a_private_file(env, site)
    run_as(USER, lambda: open(os.path.join(a, "shared.dat"), "wb").write(os.urandom(1 << 20)))
    run_as(USER, os.chmod, os.path.join(a, "shared.dat"), 0o644)
    cache_a, cache_b = env.dir_for(USER, "cache"), env.dir_for(OTHER, "cache")
    url = site["file"].url
    p = env.stagefs("stage", "--meta", url, "--cache-dir", cache_a, f"/{name}/f", "/shared.dat", user=USER, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    p = env.stagefs("stage", "--meta", url, "--cache-dir", cache_b, f"/{name}/f", "/shared.dat", user=OTHER, check=False)
    assert p.returncode == 3 and "permission denied" in (p.stdout + p.stderr).lower(), p.stdout + p.stderr
    cached_b = [f for _, _, fs in os.walk(cache_b) for f in fs if "_" in f]
    assert cached_b, "B staged the file B may read"


def test_the_gateway_refuses_settings_or_a_bucket_others_can_read(env, site):
    gw = site["file"]
    conf = os.path.join(env.dir_for("root", "badconf"), "gw.conf")
    with open(conf, "w") as f:
        f.write(open(gw.config).read())
    os.chmod(conf, 0o644)
    p = subprocess.run([env.bin, "gateway", "--config", conf, "--socket", conf + ".sock"], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "chmod 600" in p.stderr, p.stderr
    os.chmod(conf, 0o600)
    os.chmod(site["bucket"], 0o755)
    try:
        p = subprocess.run([env.bin, "gateway", "--config", conf, "--socket", conf + ".sock"], capture_output=True, text=True, timeout=60)
        assert p.returncode != 0 and "mode 0700" in p.stderr, p.stderr
    finally:
        os.chmod(site["bucket"], 0o700)
    # Nothing of the secret in its messages.
    assert PASSWORD not in p.stderr


def test_the_modules_volume_is_the_default_url(env, site):
    """`module load fs-client` sets STAGEFS_VOLUME (a gateway URL): mount DIR and status need no URL."""
    mnt = env.dir_for(USER, "gm-default")
    cache = env.dir_for(USER, "gm-default-cache")
    log = os.path.join(site["logs"], "default.log")

    def run(*args, volume=site["file"].url):
        e = {"PATH": os.environ["PATH"], "HOME": f"/home/{USER}"}
        if volume:
            e["STAGEFS_VOLUME"] = volume
        return subprocess.run(["runuser", "-u", USER, "--", env.bin, *args], capture_output=True, text=True, env=e, timeout=120)
    p = run("mount", "-d", mnt, "--cache-dir", cache, "--log", log)
    assert p.returncode == 0 and helpers.is_mounted(mnt), p.stderr
    site["mounts"].append(mnt)
    p = run("status")
    assert p.returncode == 0 and "gwfile" in p.stdout, p.stdout + p.stderr
    p = run("mount", "-d", env.dir_for(USER, "gm-none"), volume=None)
    assert p.returncode == 2 and "STAGEFS_VOLUME" in p.stderr, p.stderr


def test_blocks_of_a_file_bucket_come_as_read_only_descriptors(env, site):
    """Through the Unix socket a reader gets a descriptor of the block's file (no copy through
    the gateway): it reads, it cannot write; a mount's reads use it."""
    b = mount(env, site, OTHER, site["file"])
    payload = os.urandom(6 << 20)
    run_as(OTHER, lambda: open(os.path.join(b, "own"), "wb").write(payload))

    def probe():
        c = gwproto.Raw(site["file"].socket)
        sid, sid_tag = c.new_session()
        ino, tag, _ = c.lookup(1, 0, b"own")
        _, slices = c.open(ino, tag, os.O_RDONLY, sid, sid_tag)
        sid_, size, btag = slices[0]
        key = f"gwfile/chunks/{sid_ // 1000000}/{sid_ // 1000}/{sid_}_0_{min(size, 4 << 20)}"
        fd = c.open_block(key, btag)
        try:
            head = os.pread(fd, 64, 0)
            try:
                os.pwrite(fd, b"overwrite", 0)
                wrote = True
            except OSError as e:
                wrote = e.errno
        finally:
            os.close(fd)
        return head, wrote
    head, wrote = run_as(OTHER, probe)
    assert head == payload[:64] and wrote == errno.EBADF, (head[:8], wrote)
    assert run_as(OTHER, lambda: open(os.path.join(b, "own"), "rb").read()) == payload



def integrity_work(root, local, seed):
    """Random writes, appends, truncates, small files and copies in `root`, the same in `local`
    (the machine's own file system); returns the names checked."""
    import random
    import shutil
    rnd = random.Random(seed)
    os.makedirs(root, exist_ok=True)
    os.makedirs(local, exist_ok=True)
    names = [f"f{i}" for i in range(12)]
    for step in range(400):
        name = rnd.choice(names)
        p, q = os.path.join(root, name), os.path.join(local, name)
        k = rnd.random()
        if k < 0.45:
            off = rnd.choice([0, rnd.randrange(0, 9 << 20), rnd.randrange(0, 4096)])
            n = rnd.choice([1, 100, 4096, 5000, 70000, 1 << 20, (4 << 20) + 3])
            buf = rnd.randbytes(n)
            for path in (p, q):
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                os.pwrite(fd, buf, off)
                if rnd.random() < 0.3:
                    os.fsync(fd)
                os.close(fd)
        elif k < 0.6:
            size = rnd.choice([0, 1, 4095, 4096, 300000, 5 << 20])
            for path in (p, q):
                with open(path, "ab"):
                    pass
                os.truncate(path, size)
        elif k < 0.75:
            body = rnd.randbytes(rnd.choice([0, 1, 10, 4096, 9000]))
            for path in (p, q):
                with open(path, "wb") as f:
                    f.write(body)
        elif k < 0.85 and os.path.exists(q):
            other = rnd.choice([x for x in names if x != name])
            shutil.copyfile(p, os.path.join(root, other))
            shutil.copyfile(q, os.path.join(local, other))
        elif os.path.exists(q):
            off = rnd.randrange(0, max(1, os.path.getsize(q)))
            n = rnd.choice([1, 4096, 1 << 20])
            with open(p, "rb") as f, open(q, "rb") as g:
                f.seek(off)
                g.seek(off)
                assert f.read(n) == g.read(n), (step, name, off, n)
    return sorted(n for n in names if os.path.exists(os.path.join(local, n)))


@pytest.mark.parametrize("bucket", ["file", "s3"])
def test_data_through_the_gateway_matches_a_local_copy(env, site, bucket):
    """Random writes, truncates, small files and copies through a gateway mount (small blocks
    sent with their commits, blocks read as descriptors or through the gateway), checked byte for
    byte against the same on the machine's file system, again after a remount (cold)."""
    gw = site[bucket]
    mnt = mount(env, site, USER, gw, "--cache-size", "0")
    local = env.dir_for(USER, "integrity-local")
    root = os.path.join(mnt, f"integrity-{bucket}")
    names = run_as(USER, integrity_work, root, local, 5 if bucket == "file" else 6)
    assert len(names) >= 6

    def compare():
        return [n for n in names if open(os.path.join(root, n), "rb").read() != open(os.path.join(local, n), "rb").read()]
    assert run_as(USER, compare) == []
    env.stagefs("umount", mnt)
    env.stagefs("mount", "-d", gw.url, mnt, "--cache-size", "0", "--log", os.path.join(site["logs"], f"integrity-{bucket}.log"))
    assert run_as(USER, compare) == []


def test_s3_blocks_are_read_from_urls_signed_for_their_readers(env, site):
    """Behind an S3 gateway a reader gets a short-lived pre-signed URL for exactly the block it
    holds a tag for, and reads the bucket itself; another user's block gets no URL."""
    import urllib.request
    a = mount(env, site, USER, site["s3"])
    secret = os.urandom(5000)
    run_as(USER, lambda: (os.mkdir(os.path.join(a, "p3"), 0o700), open(os.path.join(a, "p3", "f"), "wb").write(secret)))
    pub = os.urandom(7000)
    run_as(USER, lambda: open(os.path.join(a, "pub3"), "wb").write(pub))
    run_as(USER, os.chmod, os.path.join(a, "pub3"), 0o644)
    a_ino = run_as(USER, lambda: os.stat(os.path.join(a, "p3", "f")).st_ino)

    def probe():
        c = gwproto.Raw(site["s3"].socket)
        sid, sid_tag = c.new_session()
        ino, tag, _ = c.lookup(1, 0, b"pub3")
        _, slices = c.open(ino, tag, os.O_RDONLY, sid, sid_tag)
        sid_, size, btag = slices[0]
        key = f"gws3/chunks/{sid_ // 1000000}/{sid_ // 1000}/{sid_}_0_{size}"
        url = c.presign_block(key, btag)
        body = urllib.request.urlopen(url, timeout=20).read()
        try:
            c.presign_block(key.replace(f"/{sid_}_", f"/{sid_ - 1}_"), btag)
            other = 0
        except gwproto.GatewayError as e:
            other = e.errno
        try:
            c.read_chunks(a_ino, 0)
            hidden = 0
        except gwproto.GatewayError as e:
            hidden = e.errno
        return url, body, other, hidden
    url, body, other, hidden = run_as(OTHER, probe)
    assert body == pub and "X-Amz-Signature=" in url and "X-Amz-Expires=300" in url and S3_SECRET not in url, url
    assert other == errno.EACCES and hidden == errno.EACCES



def test_requests_no_kernel_would_send_are_refused(env, site):
    """What a raw client can say that a kernel never would (the review of the gateway found each):
    a set-user-ID bit dropped or a ctime of its choosing set on another's file, a device node, a lock on a file
    not open, tags from a directory one may not search, a hard link to another's file, chunks
    asked twice, a flood of sessions, and other users' sessions listed."""
    a = mount(env, site, USER, site["file"])
    name = f"r{os.urandom(3).hex()}"

    def make():
        top = os.path.join(a, name)
        os.mkdir(top, 0o755)
        with open(os.path.join(top, "tool"), "w") as f:
            f.write("x")
        os.chmod(os.path.join(top, "tool"), 0o6755)
        with open(os.path.join(top, "secret"), "w") as f:
            f.write("s")
        os.chmod(os.path.join(top, "secret"), 0o600)
        os.mkdir(os.path.join(top, "listonly"), 0o704)
        os.chmod(os.path.join(top, "listonly"), 0o704)
        with open(os.path.join(top, "listonly", "report"), "w") as f:
            f.write("r")
        return os.stat(os.path.join(top, "tool")).st_ctime_ns
    ctime0 = run_as(USER, make)
    uid_a = helpers.pwd.getpwnam(USER).pw_uid

    def attack():
        c = gwproto.Raw(site["file"].socket)
        out = {}

        code = gwproto.code
        top, ttag, _ = c.lookup(1, 0, name.encode())
        tool, tooltag, _ = c.lookup(top, ttag, b"tool")
        secret, stag, _ = c.lookup(top, ttag, b"secret")
        setattr_fields = lambda mask, ctime: (gwproto.ref(tool, tooltag) + struct.pack(">IHIIQ", mask, 0, 0, 0, 0)
                                              + struct.pack(">qIqIqI", 0, 0, 0, 0, ctime, 0) + b"\0" + struct.pack(">QQQ", 0, 0, 0))
        out["ctime"] = code(c.call, "setattr", setattr_fields(1 << 10, 123456789))
        out["killpriv"] = code(c.call, "setattr", setattr_fields(1 << 20, 0))
        out["empty"] = code(c.call, "setattr", setattr_fields(0, 0))
        dev = gwproto.ref(top, ttag) + gwproto.data(b"disk") + struct.pack(">BHI", 5, 0o666, 0x800) + b"\0"
        out["mknod-dev"] = code(c.call, "mknod", dev)
        sid, sid_tag = c.new_session()
        lock = gwproto.ref(secret, stag) + struct.pack(">QQQIIQQQQ", sid, sid_tag, 7, 1, 1, 0, 10, 0, 0)
        out["setlk"] = code(c.call, "setlk", lock)
        lo, lotag, _ = c.lookup(top, ttag, b"listonly")
        rest = c.call("readdir", gwproto.ref(lo, lotag) + struct.pack(">QIB", 0, 100, 1))
        (n,) = struct.unpack_from(">I", rest)
        off, tags = 4, []
        for _ in range(n):
            (ln,) = struct.unpack_from(">I", rest, off)
            off += 4 + ln
            ino, tag = struct.unpack_from(">QQ", rest, off)
            off += 16 + 1 + 8
            has = rest[off]
            off += 1 + (71 if has else 0)
            tags.append((ino, tag, has))
        out["readdir"] = tags
        out["link"] = code(c.call, "link", gwproto.ref(secret, stag) + gwproto.ref(top, ttag) + gwproto.data(b"stolen"))
        out["twice"] = code(c.call, "readChunks", struct.pack(">QQI", 0, 0, 2) + (gwproto.ref(secret, stag) + struct.pack(">IQ", 0, 0)) * 2)
        made, refused, mine = 0, 0, []
        for _ in range(300):
            try:
                mine.append(c.new_session())
                made += 1
            except gwproto.GatewayError as e:
                refused = e.errno
                break
        out["sessions"] = (made, refused)
        rest = c.call("listSessions")
        (n,) = struct.unpack_from(">I", rest)
        off, uids = 4, []
        for _ in range(n):
            off += 8
            for _ in range(3):
                (ln,) = struct.unpack_from(">I", rest, off)
                off += 4 + ln + (4 if _ == 0 else 0)  # host, then pid; mountpoint; version
            off += 16
            uids.append(struct.unpack_from(">I", rest, off)[0])
            off += 4
        out["listed"] = uids
        for s, t in mine:
            c.call("closeSession", struct.pack(">QQ", s, t))
        c.close()
        return out
    out = run_as(OTHER, attack)
    # A ctime alone is what chown(f, -1, -1) sends: it would drop the set-id bits, which ext4
    # refuses a non-owner (on a file without them it is allowed, with the gateway's now).
    assert out["ctime"] == errno.EPERM and out["killpriv"] == errno.EPERM and out["empty"] == errno.EPERM, out
    st = run_as(USER, os.stat, os.path.join(a, name, "tool"))
    assert st.st_mode & 0o7777 == 0o6755 and st.st_ctime_ns == ctime0, (oct(st.st_mode), st.st_ctime_ns, ctime0)
    assert out["mknod-dev"] == errno.EPERM and out["setlk"] == errno.EBADF, out
    assert out["readdir"] and all(tag == 0 and not has for _, tag, has in out["readdir"]), out["readdir"]
    assert out["link"] == errno.EPERM and out["twice"] == errno.EINVAL, out
    made, refused = out["sessions"]
    assert refused == errno.EAGAIN and made < 300, out["sessions"]
    listed = out["listed"]
    assert made + 1 <= len(listed) <= 256 and set(listed) == {helpers.pwd.getpwnam(OTHER).pw_uid}, (made, listed[:5])
    # Root sees every session; A's mount is among them.
    p = env.stagefs("status", site["file"].url, user="root")
    assert a in p.stdout and "version raw" in p.stdout, p.stdout[-500:]
    # B sees B's own only.
    p = env.stagefs("status", site["file"].url, user=OTHER)
    assert a not in p.stdout and "version raw" in p.stdout, p.stdout[-500:]


def test_the_right_of_an_open_ends_with_it(env, site):
    """B opens A's 0666 file for reading and writing, closes it; A makes it 0600. B's tags from
    that open no longer read, write or truncate it: the right ends with the open."""
    a = mount(env, site, USER, site["file"])
    name = f"s{os.urandom(3).hex()}"
    run_as(USER, lambda: (open(os.path.join(a, name), "w").write("shared\n"), os.chmod(os.path.join(a, name), 0o666)))

    def phase1():
        c = gwproto.Raw(site["file"].socket)
        sid, sid_tag = c.new_session()
        ino, tag, _ = c.lookup(1, 0, name.encode())
        rest = c.call("open", gwproto.ref(ino, tag) + struct.pack(">iQQ", os.O_RDWR, sid, sid_tag))
        read_tag, write_tag = struct.unpack_from(">QQ", rest, 71)
        ok = c.read_chunks(ino, tag, 0, read_tag, sid, sid_tag) is not None
        c.call("close", gwproto.ref(ino, tag) + struct.pack(">QQ", sid, sid_tag))
        return sid, sid_tag, ino, tag, read_tag, write_tag, ok
    sid, sid_tag, ino, tag, read_tag, write_tag, ok = run_as(OTHER, phase1)
    assert ok
    run_as(USER, os.chmod, os.path.join(a, name), 0o600)

    def phase2():
        c = gwproto.Raw(site["file"].socket)
        out = {}

        code = gwproto.code
        out["read"] = code(c.read_chunks, ino, tag, 0, read_tag, sid, sid_tag)
        first, rtag = c.new_slice_ids(1)
        out["write"] = code(c.call, "writeSlice", gwproto.write_slice_fields(ino, tag, first, 5, write_tag, first, rtag, sid, sid_tag))
        out["truncate"] = code(c.call, "setattr", gwproto.truncate_fields(ino, tag, 1, write_tag, sid, sid_tag))
        return out
    out = run_as(OTHER, phase2)
    assert out == {"read": errno.EACCES, "write": errno.EBADF, "truncate": errno.EACCES}, out
    assert run_as(USER, lambda: open(os.path.join(a, name)).read()) == "shared\n"



def test_opens_survive_a_gateway_restart_and_old_rights_do_not(env, site):
    """A file a user holds open for writing goes on being written, synced and locked across a
    gateway restart; another user's write right from an earlier open does not come back with
    the restart (a read-only open held meanwhile, the file made 0644)."""
    import fcntl
    a = mount(env, site, USER, site["file"])
    gw = site["file"]
    name = f"o{os.urandom(3).hex()}"
    run_as(USER, lambda: (open(os.path.join(a, name), "w").write("0123456789"), os.chmod(os.path.join(a, name), 0o666)))
    ready, go, done = (os.path.join(env.dir_for("root", "sync"), n) for n in ("ready", "go", "done"))
    os.chmod(os.path.dirname(ready), 0o777)

    def holder():
        fd = os.open(os.path.join(a, name), os.O_RDWR)
        os.pwrite(fd, b"AB", 0)
        os.fsync(fd)
        open(ready, "w").close()
        while not os.path.exists(go):
            time.sleep(0.05)
        os.pwrite(fd, b"CD", 2)
        os.fsync(fd)
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
        os.ftruncate(fd, 6)
        os.close(fd)
        return open(os.path.join(a, name), "rb").read()

    def attacker_before():
        c = gwproto.Raw(gw.socket)
        sid, sid_tag = c.new_session()
        ino, tag, _ = c.lookup(1, 0, name.encode())
        rest = c.call("open", gwproto.ref(ino, tag) + struct.pack(">iQQ", os.O_RDWR, sid, sid_tag))
        write_tag = struct.unpack_from(">QQ", rest, 71)[1]
        c.call("close", gwproto.ref(ino, tag) + struct.pack(">QQ", sid, sid_tag))
        return sid, sid_tag, ino, tag, write_tag
    sid, sid_tag, ino, tag, write_tag = run_as(OTHER, attacker_before)
    run_as(USER, os.chmod, os.path.join(a, name), 0o644)
    box = {}
    t = threading.Thread(target=lambda: box.update(r=run_as(USER, holder)))
    t.start()
    wait_until(lambda: os.path.exists(ready), 30, "the holder's first write")

    def attacker_after(phase):
        c = gwproto.Raw(gw.socket)
        if phase == 1:
            c.call("open", gwproto.ref(ino, tag) + struct.pack(">iQQ", os.O_RDONLY, sid, sid_tag))  # held open
            return None
        first, rtag = c.new_slice_ids(1)
        return (gwproto.code(c.call, "writeSlice", gwproto.write_slice_fields(ino, tag, first, 5, write_tag, first, rtag, sid, sid_tag)),
                gwproto.code(c.call, "setattr", gwproto.truncate_fields(ino, tag, 1, write_tag, sid, sid_tag)))
    run_as(OTHER, attacker_after, 1)
    gw.stop(signal.SIGTERM)
    gw.start()
    open(go, "w").close()
    t.join(120)
    assert box.get("r") == b"ABCD45", box
    assert run_as(OTHER, attacker_after, 2) == (errno.EBADF, errno.EACCES)
    assert run_as(USER, lambda: open(os.path.join(a, name), "rb").read()) == b"ABCD45"


def test_parallel_sessions_stay_within_the_bound(env, site):
    """Eight connections of one user asking for sessions at once never pass the bound of 256 per
    user and host."""
    def flood():
        made = []

        def worker(_):
            c = gwproto.Raw(site["file"].socket)
            mine = []
            try:
                for _ in range(80):
                    mine.append(c.new_session())
            except gwproto.GatewayError as e:
                assert e.errno == errno.EAGAIN, e
            return c, mine
        results = [None] * 8

        def run(i):
            results[i] = worker(i)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        c = results[0][0]
        rest = c.call("listSessions")
        (n,) = struct.unpack_from(">I", rest)
        for conn, mine in results:
            made += mine
            for s, t in mine:
                conn.call("closeSession", struct.pack(">QQ", s, t))
            conn.close()
        return len(made), n
    made, listed = run_as(OTHER, flood)
    assert 200 <= made and listed <= 256, (made, listed)


def test_a_mount_fails_operations_with_eio_while_the_gateway_is_away_and_goes_on(env, site):
    """Past --meta-timeout without its gateway a mount answers EIO, stays mounted and alive, and
    works again once the gateway is back."""
    gw = site["file"]
    a = mount(env, site, USER, gw, "--meta-timeout", "3")
    run_as(USER, lambda: open(os.path.join(a, "before-outage"), "w").write("x"))
    pid = helpers.mount_pid(a)
    gw.stop()
    try:
        t0 = time.time()
        got = run_as(USER, gwproto.code, lambda: open(os.path.join(a, f"during-{os.urandom(3).hex()}"), "w").write("y"))
        waited = time.time() - t0
    finally:
        gw.start()
    assert got == errno.EIO and 2.5 <= waited < 30, (got, waited)
    assert helpers.is_mounted(a) and pid and os.path.exists(f"/proc/{pid}")
    run_as(USER, lambda: open(os.path.join(a, "after-outage"), "w").write("z"))
    assert run_as(USER, lambda: sorted(n for n in os.listdir(a) if n.endswith("outage"))) == ["after-outage", "before-outage"]


def test_deleted_files_wait_in_the_trash_through_a_gateway(env, site):
    """Through a gateway (the S3 volume keeps the default trash): a user's deleted file waits in
    /.trash/<hour>/<uid>/, where its owner reads it and another user cannot look."""
    a = mount(env, site, USER, site["s3"])
    d = os.path.join(a, f"tr{os.urandom(3).hex()}")
    payload = os.urandom(100_000)

    def make_and_remove():
        os.mkdir(d)
        with open(os.path.join(d, "gone"), "wb") as f:
            f.write(payload)
        os.unlink(os.path.join(d, "gone"))
        uid = os.getuid()
        found = []
        for hour in os.listdir(os.path.join(a, ".trash")):
            own = os.path.join(a, ".trash", hour, str(uid))
            if os.path.isdir(own):
                found += [os.path.join(own, n) for n in os.listdir(own) if n.endswith("-gone")]
        return found, [open(p, "rb").read() == payload for p in found]
    found, same = run_as(USER, make_and_remove)
    assert len(found) >= 1 and all(same), (found, same)
    b = mount(env, site, OTHER, site["s3"])

    def other_looks():
        try:
            os.listdir(os.path.dirname(found[0].replace(a, b, 1)))
            return "listed"
        except PermissionError:
            return "refused"
    assert run_as(OTHER, other_looks) == "refused"
    # Through the gateway each user lists, restores and purges their own deleted files only.
    entry_b = found[0].replace(a, b, 1)
    p = env.stagefs("trash", "restore", entry_b, user=OTHER, check=False)
    assert p.returncode == 1 and "permission denied" in p.stderr, p.stderr
    # A raw client naming the file's inode gets no further.
    ino = int(os.path.basename(found[0]).split("-")[0])

    def raw_restore():
        c = gwproto.Raw(site["s3"].socket)
        return [gwproto.code(lambda: c.call("trash", struct.pack(">BQB", 5, ino, 0))),
                gwproto.code(lambda: c.call("trash", struct.pack(">BQ", 4, ino)))]
    assert run_as(OTHER, raw_restore) == [errno.EPERM, errno.EPERM]
    p = env.stagefs("trash", "list", os.path.join(b, ".trash"), user=OTHER)
    assert "-gone" not in p.stdout and "gone" not in p.stdout.replace("files", ""), p.stdout
    p = env.stagefs("trash", "list", found[0], user=USER)
    assert "gone" in p.stdout and "uid" in p.stdout, p.stdout
    p = env.stagefs("trash", "restore", found[0], user=USER)
    assert p.stdout.startswith("restored "), p.stdout
    assert run_as(USER, lambda: open(os.path.join(d, "gone"), "rb").read() == payload)

    def remove_again():
        os.unlink(os.path.join(d, "gone"))
        uid = os.getuid()
        return [os.path.join(a, ".trash", h, str(uid), n) for h in os.listdir(os.path.join(a, ".trash"))
                if os.path.isdir(os.path.join(a, ".trash", h, str(uid)))
                for n in os.listdir(os.path.join(a, ".trash", h, str(uid))) if n.endswith("-gone")]
    again = run_as(USER, remove_again)
    assert len(again) == 1, again
    p = env.stagefs("trash", "purge", *again, user=USER)
    assert p.stdout.startswith("purged 1 file"), p.stdout


def test_a_quota_holds_through_a_gateway_at_the_write_that_crosses_it(env, site):
    """An admin's directory quota (set with the volume's META-URL) holds for a user mounting
    through the gateway: EDQUOT at the write() that crosses it, nothing accepted is lost, and df
    in the directory shows the quota."""
    a = mount(env, site, USER, site["file"])
    name = f"gq{os.urandom(3).hex()}"
    d = os.path.join(a, name)
    run_as(USER, os.mkdir, d)
    url = f"redis://:{PASSWORD}@127.0.0.1:{site['redis'].port}/1"
    env.stagefs("quota", "set", url, "--path", "/" + name, "--capacity", "3M", user="root")
    try:
        def fill():
            block = os.urandom(1 << 20)
            f = open(os.path.join(d, "big"), "wb", buffering=0)
            n, err = 0, 0
            for _ in range(5):
                try:
                    n += f.write(block)
                except OSError as e:
                    err = e.errno
                    break
            f.close()
            st = os.statvfs(d)
            return n, err, os.path.getsize(os.path.join(d, "big")), st.f_blocks * st.f_frsize
        n, err, size, total = run_as(USER, fill)
        assert (n, err, size, total) == (2 << 20, errno.EDQUOT, 2 << 20, 3 << 20)
        # Users read quotas through the gateway; setting them takes the volume's META-URL.
        out = env.stagefs("quota", "get", site["file"].url, "--path", "/" + name, user=USER).stdout
        assert f"/{name} (inode" in out and "3.0 MiB" in out, out
        p = env.stagefs("quota", "set", site["file"].url, "--path", "/" + name, "--capacity", "1T", user=USER, check=False)
        assert p.returncode == 1 and "META-URL" in p.stderr, p.stderr
    finally:
        env.stagefs("quota", "delete", url, "--path", "/" + name, user="root")


def test_clones_and_cp_through_a_gateway_store_nothing_and_check_the_caller(env, site):
    """Through the gateway: `stagefs clone` and `cp` (copy_file_range) add no block to the bucket
    and read back equal; the second user cannot clone what they cannot read."""
    a = mount(env, site, USER, site["file"])
    b = mount(env, site, OTHER, site["file"])
    name = f"cl{os.urandom(3).hex()}"
    d = os.path.join(a, name)
    payload = os.urandom(9 << 20)

    def make():
        os.mkdir(d, 0o755)
        with open(os.path.join(d, "f"), "wb") as f:
            f.write(payload)
        os.chmod(os.path.join(d, "f"), 0o600)
    run_as(USER, make)
    blocks = lambda: sum(len(fs) for _, _, fs in os.walk(site["bucket"]))  # noqa: E731
    before = blocks()
    env.stagefs("clone", os.path.join(d, "f"), os.path.join(d, "g"), user=USER)
    subprocess.run(["runuser", "-u", USER, "--", "cp", os.path.join(d, "f"), os.path.join(d, "h")], check=True)
    assert blocks() == before
    assert run_as(USER, lambda: [open(os.path.join(d, n), "rb").read() == payload for n in "fgh"]) == [True] * 3
    p = env.stagefs("clone", os.path.join(b, name, "f"), os.path.join(b, "stolen"), user=OTHER, check=False)
    assert p.returncode == 1 and "permission denied" in p.stderr.lower(), p.stderr
