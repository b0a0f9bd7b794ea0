"""Metrics (issue 22, part 3): `mount --metrics` and `gateway --metrics` serve Prometheus' text
format through swift-prometheus, read here with the `prometheus_client` package's parser (not by
eye); the counters of a busy mount move by what it did; a mount without --metrics opens no port;
`stagefs stats` shows live numbers under a pty to the mount's user, and nothing to another user;
the server answers what is not a scrape with an error and is not held by an idle client."""
import errno
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import helpers
from helpers import OTHER, USER, run_as, wait_until

MiB = 1 << 20


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse(r.read().decode())


def parse(text):
    """{(sample name, frozenset(labels)): value}, through prometheus_client's parser; also checks
    each histogram's buckets: cumulative, and the +Inf bucket equal to its count."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            # (The parser names a counter's samples NAME_total; our counters are named as
            # JuiceFS's, without the suffix.)
            name = family.name if family.type == "counter" and s.name == family.name + "_total" else s.name
            out[(name, frozenset(s.labels.items()))] = s.value
        if family.type == "histogram":
            series = {}
            for s in family.samples:
                if s.name.endswith("_bucket"):
                    key = frozenset((k, v) for k, v in s.labels.items() if k != "le")
                    series.setdefault(key, []).append((float(s.labels["le"]), s.value))
            for key, buckets in series.items():
                values = [v for _, v in sorted(buckets)]
                assert values == sorted(values), f"{family.name} {dict(key)}: buckets not cumulative"
                count = out[(family.name + "_count", key)]
                assert sorted(buckets)[-1] == (float("inf"), count), f"{family.name} {dict(key)}: +Inf bucket is not the count"
    return out


def value(m, name, **labels):
    return m.get((name, frozenset(labels.items())), 0.0)


def total(m, name):
    return sum(v for (n, _), v in m.items() if n == name)


def listening_ports(pid):
    """TCP ports the process listens on (its socket inodes among /proc/net/tcp{,6}'s LISTEN rows)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def work(mnt, n=20):
    """A little of everything: files written, read back, listed, stat'ed, removed."""
    os.makedirs(f"{mnt}/w", exist_ok=True)
    payload = os.urandom(6 * MiB)
    with open(f"{mnt}/w/big", "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    for i in range(n):
        with open(f"{mnt}/w/s{i}", "wb") as f:
            f.write(b"x" * 4096)
    with open(f"{mnt}/w/big", "rb") as f:
        assert f.read() == payload
    names = os.listdir(f"{mnt}/w")
    for name in names:
        os.stat(f"{mnt}/w/{name}")
    for i in range(n):
        os.unlink(f"{mnt}/w/s{i}")
    return len(payload) + n * 4096


@pytest.mark.parametrize("kind", ["sqlite-local", "redis-s3"])
def test_a_busy_mounts_metrics_parse_and_move(env, redis, moto, kind):
    port = helpers.free_port()
    v = helpers.make_volume(env, kind, redis, moto, f"it-metrics-{kind[:5]}")
    mnt = v.mount("--metrics", str(port), "--cache-large-write")
    before = scrape(port)
    written = run_as(USER, work, mnt)
    after = scrape(port)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    fuse = "stagefs_fuse_ops_durations_histogram_seconds"
    for method in ("create", "write", "read", "lookup", "unlink", "fsync"):
        assert moved(fuse + "_count", method=method) > 0, method
    assert moved(fuse + "_sum", method="write") > 0
    assert moved("stagefs_fuse_written_size_bytes_sum") >= written
    assert moved("stagefs_fuse_read_size_bytes_sum") >= 6 * MiB
    assert moved("stagefs_object_request_data_bytes", method="PUT") >= 6 * MiB
    assert moved("stagefs_object_request_durations_histogram_seconds_count", method="PUT") >= 2
    assert moved("stagefs_transaction_durations_histogram_seconds_count", kind="write") >= 40
    if kind == "redis-s3":
        assert moved("stagefs_redis_round_trip_durations_histogram_seconds_count") > 0
    # The big file read back from the caches (it was just written), none of it from the store.
    assert moved("stagefs_blockcache_hit_bytes", level="memory") + moved("stagefs_blockcache_hit_bytes", level="disk") >= 6 * MiB
    assert moved("stagefs_blockcache_miss_bytes") == 0
    # (Usage is asked of the metadata at most every 5 s: the root at least.)
    assert value(after, "stagefs_used_inodes") >= 1 and value(after, "stagefs_memory") > 1 * MiB
    assert value(after, "stagefs_uptime") > 0 and value(after, "stagefs_cpu_usage") > 0
    # Counters only grow.
    for key, v0 in before.items():
        if key[0].endswith(("_count", "_sum", "_total")) or key[0] in ("stagefs_transaction_restart", "stagefs_blockcache_hits"):
            assert after.get(key, v0) >= v0, key
    # A cold read of the big file from another mount without a disk cache: misses, from the
    # store (GET).
    cold_port = helpers.free_port()
    cold = v.mount("--metrics", str(cold_port), "--cache-size", "0")
    run_as(USER, lambda: open(f"{cold}/w/big", "rb").read())
    m = scrape(cold_port)
    assert value(m, "stagefs_object_request_data_bytes", method="GET") >= 6 * MiB
    assert value(m, "stagefs_blockcache_miss_bytes") >= 6 * MiB
    v.umount(cold)


def test_the_metrics_server_refuses_what_is_not_a_scrape_and_an_idle_client_holds_nothing(env, redis, moto):
    port = helpers.free_port()
    v = helpers.make_volume(env, "sqlite-local", redis, moto, "it-metrics-http")
    mnt = v.mount("--metrics", f"127.0.0.1:{port}")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10)
    assert e.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/metrics", data=b"x", method="POST"), timeout=10)
    assert e.value.code == 405
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"\x00\x01garbage\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    # A head that never ends is cut at 8 KiB, refused, and closed.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000)
        got = b""
        while True:
            b = s.recv(65536)
            if not b:
                break
            got += b
        assert got.startswith(b"HTTP/1.1 431"), got[:100]
    # HEAD: the status and headers, no body.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"HEAD /metrics HTTP/1.0\r\n\r\n")
        got = b""
        while b := s.recv(65536):
            got += b
        assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"\r\n\r\n"), got[-100:]
    # Clients that connect and say nothing, or trickle a byte at a time, do not stop a scrape,
    # nor the mount's user reading it through the socket: each is cut off 2 s after it came.
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
    slow = socket.create_connection(("127.0.0.1", port), timeout=10)
    t = time.monotonic()
    p = env.stagefs("stats", mnt, "--count", "1", "--interval", "0.2", timeout=30)
    assert "stagefs stats: " in p.stdout and time.monotonic() - t < 5, (p.stdout, time.monotonic() - t)
    m = scrape(port)
    assert value(m, "stagefs_uptime") > 0
    assert time.monotonic() - t < 8, "a scrape waited for idle clients"
    closed_at = None
    for b in b"GET /metrics HTTP/1.1\r\nX: y\r\n":
        try:
            slow.sendall(bytes([b]))
            time.sleep(0.3)
        except OSError:
            closed_at = time.monotonic()
            break
    if closed_at is None:
        slow.settimeout(5)
        assert slow.recv(100) == b"", "a client trickling its head is cut off"
        closed_at = time.monotonic()
    assert closed_at - t < 8, closed_at - t
    for s in idle + [slow]:
        s.close()


def test_without_metrics_a_mount_listens_on_no_port_and_a_taken_port_is_taken_once_free(env, redis, moto):
    v = helpers.make_volume(env, "sqlite-local", redis, moto, "it-metrics-off")
    pid = helpers.mount_pid(v.mnt)
    assert listening_ports(pid) == set()
    # Another user holds the port first: the mount starts anyway, says so, and serves the
    # metrics there once the port is free.
    holder = subprocess.Popen(["runuser", "-u", OTHER, "--", "python3", "-c",
                               "import socket, sys, time; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(1); "
                               "print(s.getsockname()[1], flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    port = int(holder.stdout.readline())
    mnt = env.dir_for(USER, "mnt-taken")
    p = env.stagefs("mount", "-d", v.meta_url, mnt, "--metrics", str(port), "--log", os.path.join(v.base, "taken.log"))
    assert f"127.0.0.1:{port}" in p.stderr and "another process listens there" in p.stderr and "once it is free" in p.stderr, p.stderr
    assert helpers.is_mounted(mnt)
    holder.stdin.close()
    holder.wait(10)

    def served():
        try:
            return value(scrape(port), "stagefs_uptime") > 0
        except OSError:
            return False
    wait_until(served, 30, "the mount to take the freed port")
    assert port in listening_ports(helpers.mount_pid(mnt))
    v.umount(mnt)
    p = env.stagefs("mount", "-d", v.meta_url, mnt, "--metrics", "127.0.0.1:99999", check=False)
    assert p.returncode == 2 and "--metrics '127.0.0.1:99999'" in p.stderr and "1 to 65535" in p.stderr, p.stderr


def run_in_pty(argv, seconds, while_running=None):
    """Runs argv on a pseudo-terminal; returns everything it printed (ends by itself or after `seconds`)."""
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp(argv[0], argv)
    if while_running:
        while_running()
    out = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            try:
                b = os.read(fd, 65536)
            except OSError:
                break
            if not b:
                break
            out += b
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def test_stats_shows_live_numbers_under_a_pty_to_the_mounts_user_only(env, redis, moto):
    v = helpers.make_volume(env, "redis-s3", redis, moto, "it-metrics-stats")
    # A writer while stats runs: bounded, and its whole process group ended after (a loop left
    # running fills the S3 server's memory).
    writer = subprocess.Popen(
        ["runuser", "-u", USER, "--", "sh", "-c", f"for i in $(seq 1 100); do dd if=/dev/zero of={v.mnt}/busy bs=1M count=2 status=none conv=fsync; done"],
        start_new_session=True)
    try:
        rc, out = run_in_pty(["runuser", "-u", USER, "--", env.bin, "stats", v.mnt, "--interval", "0.5", "--count", "4"], 60)
    finally:
        try:
            os.killpg(writer.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        writer.wait()
    assert rc == 0, out
    assert "\x1b[H\x1b[2J" in out, "a terminal gets the screen redrawn"
    screens = [s for s in out.split("\x1b[H\x1b[2J") if s.strip()]
    assert len(screens) == 4, out
    assert all(f"stagefs stats: {v.mnt} (volume it-metrics-stats" in s for s in screens), out
    writes = [float(m.group(1)) for m in re.finditer(r"fuse .* write ([0-9.]+) MiB/s", out)]
    assert writes and max(writes) > 0, out
    assert re.search(r"objects +get [0-9.]+/s .* put [0-9.]+/s", out) and re.search(r"redis [0-9.]+ round trips/s", out), out
    # Into a pipe: views one after the other, no terminal codes.
    p = env.stagefs("stats", v.mnt, "--count", "2", "--interval", "0.2")
    assert "\x1b" not in p.stdout and p.stdout.count("stagefs stats: ") == 2, p.stdout
    # Another user sees nothing of it: no record, no socket they can reach.
    p = env.stagefs("stats", v.mnt, "--count", "1", user=OTHER, check=False)
    assert p.returncode == 1 and "another user's" in p.stderr, p.stderr
    sockets = []
    for d in (f"/run/user/{helpers.ensure_user(USER).pw_uid}/stagefs", os.path.join(helpers.ensure_user(USER).pw_dir, ".stagefs", "run")):
        for root, _, files in os.walk(d):
            sockets += [os.path.join(root, f) for f in files if f.startswith("metrics-") and f.endswith(".sock")]
    assert sockets, "the mount's metrics socket"

    def reach(path):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return "connected"
        except OSError as e:
            return e.errno
        finally:
            s.close()
    for path in sockets:
        assert run_as(OTHER, reach, path) != "connected", path
    # Not a mount: said so.
    p = env.stagefs("stats", env.root, "--count", "1", check=False)
    assert p.returncode == 1 and "is not in a StageFS mount" in p.stderr, p.stderr


def test_a_gateway_serves_its_own_metrics(env, redis, moto):
    url = redis.url(redis.new_db())
    name = "it-metrics-gw"
    env.stagefs("format", url, name, "--storage", "s3", "--bucket", moto.bucket(f"{name}-bucket"), "--access-key", moto.access_key,
                "--secret-key", moto.secret_key, user="root")
    port = helpers.free_port()
    sock = os.path.join(env.dir_for("root", "gwsock"), "gw.sock")
    os.chmod(os.path.dirname(sock), 0o755)
    gw = helpers.Gateway(env, url, sock, "--metrics", str(port))
    try:
        mnt = env.dir_for(USER, "mnt-gw")
        client_port = helpers.free_port()
        env.stagefs("mount", "-d", gw.url, mnt, "--metrics", str(client_port), "--log", os.path.join(env.dir_for(USER, "gwlog"), "mount.log"))
        run_as(USER, work, mnt, 5)
        g = scrape(port)
        req = "stagefs_gateway_request_durations_histogram_seconds_count"
        for op in ("create", "lookup", "writeSlice", "unlink"):
            assert value(g, req, op=op) > 0, op
        assert value(g, "stagefs_gateway_connections") >= 1
        assert value(g, "stagefs_transaction_durations_histogram_seconds_count", kind="write") > 0
        assert value(g, "stagefs_redis_round_trip_durations_histogram_seconds_count") > 0
        assert value(g, "stagefs_object_request_data_bytes", method="PUT") >= 6 * MiB
        c = scrape(client_port)
        assert value(c, "stagefs_gateway_round_trip_durations_histogram_seconds_count") > 0
        assert value(c, "stagefs_object_request_data_bytes", method="PUT") >= 6 * MiB
        # `stats` reads a metrics port too.
        p = env.stagefs("stats", f"127.0.0.1:{port}", "--count", "1", "--interval", "0.2")
        assert re.search(r"^gateway +[0-9.]+ requests/s .* [0-9]+ connections", p.stdout, re.M), p.stdout
        env.stagefs("umount", mnt)
    finally:
        gw.stop()


def test_clients_that_reset_their_connection_do_not_kill_a_gateway(env):
    """A gateway of a `file` bucket (nothing there ignores SIGPIPE for it) and a client that
    resets its connection before the answer goes out: the gateway lives on."""
    base = env.dir_for("root", "gwfile")
    os.chmod(base, 0o755)
    bucket = os.path.join(base, "bucket")
    os.makedirs(bucket, mode=0o700)
    url = f"sqlite3://{base}/meta.db"
    env.stagefs("format", url, "it-metrics-gwf", "--bucket", bucket, user="root")
    port = helpers.free_port()
    gw = helpers.Gateway(env, url, os.path.join(base, "gw.sock"), "--metrics", str(port))
    try:
        wait_until(lambda: helpers.wait_port(port, 1), 30, "the gateway's metrics port")
        linger = struct.pack("ii", 1, 0)
        for request in (b"GET /metrics HTTP/1.1\r\n", b"GET /metrics HTTP/1.1\r\n\r\n", b"x" * 9000):
            for _ in range(5):
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                s.sendall(request)
                time.sleep(0.05)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                s.close()  # a reset: the server's next send fails
        time.sleep(0.5)
        assert gw.proc.poll() is None, open(gw.log).read()[-2000:]
        assert value(scrape(port), "stagefs_uptime") > 0
    finally:
        gw.stop()


@pytest.mark.parametrize("kind", ["sqlite-local", "redis-s3"])
def test_listing_with_attributes_answers_security_names_without_a_round_trip(env, redis, moto, kind):
    """`ls -l` asks security.selinux of every file: a mount that listed the directory with
    attributes knows which files have no extended attribute and answers for them itself (the
    metadata transactions do not grow with the files); a file with an attribute is asked of
    the engine; another mount's new security attribute shows once the attribute cache's
    second has passed."""
    v = helpers.make_volume(env, kind, redis, moto, f"it-xattr-{kind[:5]}")
    writer = v.mount()
    d = f"{writer}/many"
    os.mkdir(d)
    n = 300
    for i in range(n):
        open(f"{d}/f{i}", "w").close()
    os.setxattr(f"{d}/f7", "user.tag", b"x")
    port = helpers.free_port()
    lister = v.mount("--metrics", str(port))
    txns = "stagefs_transaction_durations_histogram_seconds_count"
    before = value(scrape(port), txns, kind="read")
    names = os.listdir(f"{lister}/many")
    assert len(names) == n
    missing = 0
    for name in names:
        os.lstat(f"{lister}/many/{name}")
        try:
            os.getxattr(f"{lister}/many/{name}", "security.selinux", follow_symlinks=False)
        except OSError as e:
            assert e.errno == errno.ENODATA, (name, e)
            missing += 1
    after = value(scrape(port), txns, kind="read")
    assert missing == n
    assert after - before < 40, f"{after - before:.0f} metadata reads for {n} files listed and asked"
    # The file with an attribute lists it.
    assert os.listxattr(f"{lister}/many/f7") == ["user.tag"]
    assert os.listxattr(f"{lister}/many/f8") == []
    # Root gives f9 a security attribute through the other mount: shown within the cache's time.
    os.setxattr(f"{writer}/many/f9", "security.stagefs-test", b"v")

    def shown():
        try:
            return os.getxattr(f"{lister}/many/f9", "security.stagefs-test") == b"v"
        except OSError as e:
            assert e.errno == errno.ENODATA
            return False
    wait_until(shown, timeout=10, what="the other mount's security attribute")
    v.umount(lister)
    v.umount(writer)
