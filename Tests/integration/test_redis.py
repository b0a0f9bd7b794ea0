"""The Redis engine on a shared server: no operation stalls Redis for other tenants."""
import os
import re
import socket
import subprocess
import threading
import time

import pytest

import helpers
from helpers import OTHER, USER, run_as


def key_prefix(db):
    """A volume's keys carry the hash tag {db}."""
    return "{%d}" % db


class LatencyProbe:
    """Another tenant of the Redis server: PINGs it on its own connection (and database) and
    records the slowest reply."""

    def __init__(self, port, db):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.settimeout(30)
        self.command(b"SELECT", str(db).encode())
        self.worst = 0.0
        self.count = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def command(self, *args):
        out = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
        self.sock.sendall(out)
        reply = b""
        while not reply.endswith(b"\r\n"):
            reply += self.sock.recv(4096)
        return reply

    def run(self):
        while not self.stop.is_set():
            t0 = time.monotonic()
            self.command(b"PING")
            self.worst = max(self.worst, time.monotonic() - t0)
            self.count += 1
            self.stop.wait(0.002)

    def finish(self):
        self.stop.set()
        self.thread.join()
        self.sock.close()
        return self.worst


def redis_cli(redis, db, *args):
    import subprocess
    return subprocess.run(["redis-cli", "-p", str(redis.port), "-n", str(db), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_deleting_huge_files_never_stalls_redis(env, redis):
    """A file of the largest size and a file with 2,500 written chunks are truncated and
    deleted while another tenant pings the same Redis: its worst reply stays under 100 ms, the
    mount keeps answering, and every chunk record goes."""
    db = redis.new_db()
    base = env.dir_for(USER, "huge")
    url = redis.url(db)
    p = key_prefix(db)
    env.stagefs("format", url, "huge", "--bucket", os.path.join(base, "data"), "--trash-days", "0")
    m = env.dir_for(USER, "m")
    env.stagefs("mount", "-d", url, m, "--log", os.path.join(base, "mount.log"))
    probe = None
    try:
        sparse = os.path.join(m, "sparse")
        dense = os.path.join(m, "dense")

        def make():
            with open(sparse, "wb") as f:
                f.truncate(1 << 50)
            fd = os.open(dense, os.O_WRONLY | os.O_CREAT, 0o644)
            for i in range(2500):
                os.pwrite(fd, b"x", i * (64 << 20))
            os.close(fd)

        run_as(USER, make)
        # (Chunk 0's one record is kept with the file's attributes.)
        assert int(redis_cli(redis, db, "EVAL", f"return #redis.call('KEYS', '{p}c*')", "0")) >= 2499
        probe = LatencyProbe(redis.port, redis.new_db())
        answers = []

        def mount_answers():
            t0 = time.monotonic()
            os.listdir(m)
            os.stat(dense)
            return time.monotonic() - t0

        run_as(USER, os.truncate, dense, 1)
        answers.append(run_as(USER, mount_answers))
        run_as(USER, os.unlink, sparse)
        run_as(USER, os.unlink, dense)
        run_as(USER, lambda: os.listdir(m))
        helpers.wait_until(lambda: redis_cli(redis, db, "ZCARD", p + "delfiles") == "0" and redis_cli(redis, db, "LLEN", p + "delslices") == "0",
                 120, "the background deletion")
        pings = probe.count
        worst = probe.finish()
        probe = None
        left = int(redis_cli(redis, db, "EVAL", f"return #redis.call('KEYS', '{p}c*') + #redis.call('KEYS', '{p}k*')", "0"))
        assert left == 0, f"{left} chunk records left"
        assert worst < 0.1, f"another tenant waited {worst * 1000:.0f} ms for Redis"
        assert max(answers) < 5
        print(f"worst reply to another tenant: {worst * 1000:.1f} ms over {pings} pings")
    finally:
        if probe:
            probe.finish()
        env.stagefs("umount", m)


class ReplyDropper:
    """A TCP proxy in front of Redis that, when armed, lets the next metadata-changing script
    reach the server and then cuts the connection instead of passing the reply on: the client
    cannot know whether its request was carried out."""

    # A commit has the client's request-id hash ({db}rq<id>) as its first key and a request id
    # "<slot>:<number>" as its first argument.
    TXN_MARK = re.compile(rb"\r\n\{\d+\}rq[0-9a-f]+\r\n(?:\$\d+\r\n[^\r]*\r\n)*?\$\d+\r\n\d+:\d+\r\n")

    def __init__(self, upstream_port):
        self.upstream = upstream_port
        self.port = helpers.free_port()
        self.armed = threading.Event()
        self.dropped = 0
        self.lock = threading.Lock()
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("127.0.0.1", self.port))
        self.srv.listen(64)
        self.stopping = False
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while not self.stopping:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.upstream))
            state = {"drop": False}
            threading.Thread(target=self.up, args=(c, u, state), daemon=True).start()
            threading.Thread(target=self.down, args=(u, c, state), daemon=True).start()

    def up(self, c, u, state):
        try:
            while True:
                b = c.recv(65536)
                if not b:
                    break
                changing = self.TXN_MARK.search(b)
                if changing and self.armed.is_set():
                    with self.lock:
                        if self.armed.is_set():
                            self.armed.clear()
                            state["drop"] = True
                u.sendall(b)
        except OSError:
            pass
        self.close(c, u)

    @staticmethod
    def close(*socks):
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def down(self, u, c, state):
        try:
            while True:
                b = u.recv(65536)
                if not b:
                    break
                if state["drop"]:
                    with self.lock:
                        self.dropped += 1
                    break
                c.sendall(b)
        except OSError:
            pass
        self.close(c, u)

    def stop(self):
        self.stopping = True
        self.srv.close()


def test_a_lost_reply_is_answered_with_the_first_outcome(env, redis):
    """Each changing operation's reply is lost once after Redis carried it out: the client
    sends it again, and gets the first outcome: no EEXIST for its own create, no ENOENT for
    its own unlink, no second copy of anything."""
    proxy = ReplyDropper(redis.port)
    db = redis.new_db()
    base = env.dir_for(USER, "lost")
    url = f"redis://127.0.0.1:{proxy.port}/{db}"
    env.stagefs("format", url, "lostreply", "--bucket", os.path.join(base, "data"))
    m = env.dir_for(USER, "m")
    env.stagefs("mount", "-d", url, m, "--log", os.path.join(base, "mount.log"), "--attr-cache", "0", "--entry-cache", "0",
                "--dir-entry-cache", "0")
    try:
        steps = [
            ("mkdir", lambda: os.mkdir(os.path.join(m, "d"))),
            ("create", lambda: os.close(os.open(os.path.join(m, "d", "f"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))),
            ("write", lambda: open(os.path.join(m, "d", "f"), "wb").write(b"x" * 100)),
            ("link", lambda: os.link(os.path.join(m, "d", "f"), os.path.join(m, "d", "h"))),
            ("rename", lambda: os.rename(os.path.join(m, "d", "f"), os.path.join(m, "g"))),
            ("setxattr", lambda: os.setxattr(os.path.join(m, "g"), "user.k", b"v", os.XATTR_CREATE)),
            ("removexattr", lambda: os.removexattr(os.path.join(m, "g"), "user.k")),
            ("unlink", lambda: os.unlink(os.path.join(m, "d", "h"))),
            ("symlink", lambda: os.symlink("g", os.path.join(m, "s"))),
        ]
        for name, step in steps:
            before = proxy.dropped
            proxy.armed.set()
            run_as(USER, step)
            assert proxy.dropped == before + 1, f"{name}: a reply was dropped"
        tree = run_as(USER, lambda: sorted(os.listdir(m)) + sorted(os.listdir(os.path.join(m, "d"))))
        assert tree == ["d", "g", "s"], tree
        st = run_as(USER, os.stat, os.path.join(m, "g"))
        assert st.st_size == 100 and st.st_nlink == 1
        assert run_as(USER, os.listxattr, os.path.join(m, "g")) == []
        assert run_as(USER, os.readlink, os.path.join(m, "s")) == "g"
        log = open(os.path.join(base, "mount.log")).read()
        assert "lost connection" in log, "the mount saw the connections cut"
    finally:
        env.stagefs("umount", m)
        proxy.stop()


class OwnRedis:
    """A redis-server of this test's own (AOF on), which the test stops and starts again."""

    def __init__(self, env, *extra):
        self.port = helpers.free_port()
        self.dir = env.dir_for("root", "redis")
        self.extra = list(extra)
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, "--appendonly", "yes",
             "--appendfsync", "always", "--save", "", *self.extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert helpers.wait_port(self.port), "redis-server started"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


@pytest.mark.parametrize("cache", ["plain", "tracked"])
def test_redis_restarts_under_load_cost_no_operation(env, cache):
    """Three processes create, write, rename and unlink while Redis (AOF on) restarts three
    times: not one operation fails, and the tree is exactly what the operations made. Also with
    the cache kept by client tracking (`--tracked-cache`): each restart ends what it trusted, and
    every name made or removed is looked up as it is."""
    r = OwnRedis(env)
    base = env.dir_for(USER, f"restart-{cache}")
    url = f"redis://127.0.0.1:{r.port}/1"
    env.stagefs("format", url, "restarts", "--bucket", os.path.join(base, "data"))
    m = env.dir_for(USER, f"m-{cache}")
    extra = ["--tracked-cache"] if cache == "tracked" else []
    env.stagefs("mount", "-d", url, m, "--log", os.path.join(base, "mount.log"), *extra)
    progress = [os.path.join(base, f"progress{w}") for w in range(3)]
    worker = '''
import os, sys, time
m, w, progress, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
d = os.path.join(m, f"w{w}")
os.mkdir(d)
errors = 0
i = 0
while not os.path.exists(stop) or i < 30:
    try:
        p = os.path.join(d, f"f{i}")
        with open(p, "wb") as f:
            f.write(b"%d" % i * 1000)
        os.rename(p, os.path.join(d, f"g{i}"))
        if i % 3 == 0:
            os.unlink(os.path.join(d, f"g{i}"))
        if i % 5 == 0:
            os.mkdir(os.path.join(d, f"dir{i}"))
    except OSError as e:
        errors += 1
        print(f"worker {w} step {i}: {e}", file=sys.stderr, flush=True)
    i += 1
    with open(progress, "w") as f:
        f.write(str(i))
print(i, errors)
'''
    stop = os.path.join(base, "stop")
    procs = [subprocess.Popen(["runuser", "-u", USER, "--", "python3", "-c", worker, m, str(w), progress[w], stop],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in range(3)]

    def steps():
        return [int(open(p).read() or 0) if os.path.exists(p) else 0 for p in progress]

    try:
        for restart in range(3):
            target = [s + 20 for s in steps()]
            helpers.wait_until(lambda: all(a >= b for a, b in zip(steps(), target)), 120, "the workers to make progress")
            noticed = open(os.path.join(base, "mount.log")).read().count("retrying for up to")
            r.stop()
            # Down until an operation of the mount has met the outage and is waiting it out.
            helpers.wait_until(lambda: open(os.path.join(base, "mount.log")).read().count("retrying for up to") > noticed, 60,
                     "the mount to notice the outage")
            r.start()
        target = [s + 20 for s in steps()]
        helpers.wait_until(lambda: all(a >= b for a, b in zip(steps(), target)), 120, "progress after the last restart")
        open(stop, "w").close()
        results = [p.communicate(timeout=300) for p in procs]
        for w, (out, err) in enumerate(results):
            n, errors = map(int, out.split())
            assert errors == 0, f"worker {w}: {err}"
            expected = sorted([f"g{i}" for i in range(n) if i % 3] + [f"dir{i}" for i in range(n) if i % 5 == 0])
            names = run_as(USER, lambda: sorted(os.listdir(os.path.join(m, f"w{w}"))))
            assert names == expected, f"worker {w}: {set(names) ^ set(expected)}"

            def looked_up():
                d = os.path.join(m, f"w{w}")
                present = [x for x in expected if not os.path.exists(os.path.join(d, x))]
                gone = [x for x in (f"g{i}" for i in range(0, n, 3)) if os.path.exists(os.path.join(d, x))]
                gone += [x for x in (f"f{i}" for i in range(n)) if os.path.exists(os.path.join(d, x))]
                return present, gone
            assert run_as(USER, looked_up) == ([], []), f"worker {w}: names looked up otherwise than listed"
            for i in (1, n - 1):
                if i % 3:
                    assert run_as(USER, lambda: open(os.path.join(m, f"w{w}", f"g{i}"), "rb").read()) == b"%d" % i * 1000
        log = open(os.path.join(base, "mount.log")).read()
        assert log.count("answers again") >= 3, "the mount rode out three outages"
    finally:
        open(stop, "w").close()
        for p in procs:
            if p.poll() is None:
                p.kill()
        env.stagefs("umount", m)
        r.stop()


def test_a_password_and_a_port_of_its_own(env):
    r = OwnRedis(env, "--requirepass", "s3cret")
    try:
        base = env.dir_for(USER, "pw")
        env.stagefs("format", f"redis://:s3cret@127.0.0.1:{r.port}/3", "password", "--bucket", os.path.join(base, "data"))
        m = env.dir_for(USER, "m")
        env.stagefs("mount", "-d", f"redis://:s3cret@127.0.0.1:{r.port}/3", m)
        run_as(USER, lambda: open(os.path.join(m, "x"), "w").write("x"))
        assert run_as(USER, os.listdir, m) == ["x"]
        env.stagefs("umount", m)
        p = env.stagefs("mount", "-d", f"redis://:wrong@127.0.0.1:{r.port}/3", m, check=False)
        assert p.returncode == 1 and "refused the password" in p.stderr and p.stderr.count("\n") == 1, p.stderr
        p = env.stagefs("status", f"redis://127.0.0.1:{r.port}/3", check=False)
        assert p.returncode == 1 and "password" in p.stderr, p.stderr
    finally:
        r.stop()


def test_tls(env, tmp_path):
    """rediss:// to a TLS-only Redis with a certificate from a CA of the test's own."""
    d = env.dir_for("root", "tls")
    os.chmod(d, 0o755)

    def sh(*cmd):
        subprocess.run(cmd, check=True, capture_output=True, cwd=d)

    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=stagefs test CA",
       "-keyout", "ca.key", "-out", "ca.pem")
    sh("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr")
    with open(f"{d}/san.cnf", "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\n")
    sh("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
       "-extfile", "san.cnf", "-out", "server.pem")
    for f in os.listdir(d):
        os.chmod(f"{d}/{f}", 0o644)
    port = helpers.free_port()
    proc = subprocess.Popen(["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--tls-cert-file", f"{d}/server.pem", "--tls-key-file", f"{d}/server.key",
                             "--tls-ca-cert-file", f"{d}/ca.pem", "--tls-auth-clients", "no", "--dir", d],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert helpers.wait_port(port)
        url = f"rediss://127.0.0.1:{port}/1?tls-ca-cert-file={d}/ca.pem"
        base = env.dir_for(USER, "tlsvol")
        env.stagefs("format", url, "tlsvol", "--bucket", os.path.join(base, "data"))
        m = env.dir_for(USER, "m")
        env.stagefs("mount", "-d", url, m)
        run_as(USER, lambda: open(os.path.join(m, "over-tls"), "w").write("secret"))
        assert run_as(USER, lambda: open(os.path.join(m, "over-tls")).read()) == "secret"
        env.stagefs("umount", m)
        # Without the CA: refused, with the reason.
        p = env.stagefs("status", f"rediss://127.0.0.1:{port}/1", check=False)
        assert p.returncode == 1 and "not trusted" in p.stderr, p.stderr
        # A plain connection to a TLS port: said so.
        p = env.stagefs("status", f"redis://127.0.0.1:{port}/1", check=False)
        assert p.returncode == 1 and "stagefs: " in p.stderr and p.stderr.count("\n") == 1, p.stderr
        assert "Volume" in env.stagefs("status", f"rediss://127.0.0.1:{port}/1?insecure-skip-verify=true").stdout
    finally:
        proc.kill()
        proc.wait()


def test_sentinel_failover(env):
    """A master, two replicas and a Sentinel on loopback; the volume's URL names the master
    through the Sentinel and waits for one replica per commit. The master is killed while a
    writer keeps creating files: the Sentinel promotes a replica (the other one follows it), the
    mount follows the new master, no write fails and none is lost."""
    master = OwnRedis(env)
    replicas = [OwnRedis(env, "--replicaof", "127.0.0.1", str(master.port)) for _ in range(2)]
    sport = helpers.free_port()
    sdir = env.dir_for("root", "sentinel")
    with open(f"{sdir}/sentinel.conf", "w") as f:
        f.write(f"port {sport}\nbind 127.0.0.1\ndir {sdir}\n"
                f"sentinel monitor vol 127.0.0.1 {master.port} 1\n"
                "sentinel down-after-milliseconds vol 1000\nsentinel failover-timeout vol 5000\n")
    sentinel = subprocess.Popen(["redis-server", f"{sdir}/sentinel.conf", "--sentinel"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    assert helpers.wait_port(sport)
    m = None
    try:
        def replica_linked():
            info = subprocess.run(["redis-cli", "-p", str(master.port), "INFO", "replication"], capture_output=True, text=True).stdout
            return info.count("state=online") == 2
        helpers.wait_until(replica_linked, 30, "the replicas")
        url = f"redis://vol,127.0.0.1:{sport}/1?wait-replicas=1&wait-timeout=10000"
        base = env.dir_for(USER, "failover")
        env.stagefs("format", url, "failover", "--bucket", os.path.join(base, "data"))
        m = env.dir_for(USER, "m")
        env.stagefs("mount", "-d", url, m, "--log", os.path.join(base, "mount.log"))
        progress = os.path.join(base, "progress")
        stop = os.path.join(base, "stop")
        writer = subprocess.Popen(["runuser", "-u", USER, "--", "python3", "-c", f'''
import os, sys
i = errors = 0
while not os.path.exists({stop!r}) or i < 10:
    try:
        with open(os.path.join({m!r}, f"f{{i}}"), "w") as f:
            f.write(str(i))
    except OSError as e:
        errors += 1
        print(e, file=sys.stderr, flush=True)
    i += 1
    open({progress!r}, "w").write(str(i))
print(i, errors)
'''], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def done():
            return int(open(progress).read() or 0) if os.path.exists(progress) else 0
        helpers.wait_until(lambda: done() >= 20, 60, "writes before the failover")
        master.proc.kill()
        master.proc.wait()

        def promoted():
            out = subprocess.run(["redis-cli", "-p", str(sport), "SENTINEL", "get-master-addr-by-name", "vol"], capture_output=True,
                                 text=True).stdout.split()
            return len(out) == 2 and out[1] in [str(r.port) for r in replicas]
        helpers.wait_until(promoted, 60, "the Sentinel to promote the replica")
        after = done()
        helpers.wait_until(lambda: done() >= after + 20, 60, "writes after the failover")
        open(stop, "w").close()
        out, err = writer.communicate(timeout=120)
        n, errors = map(int, out.split())
        assert errors == 0, err
        names = run_as(USER, os.listdir, m)
        assert sorted(names, key=lambda s: int(s[1:])) == [f"f{i}" for i in range(n)], "every acknowledged file is there"
        log = open(os.path.join(base, "mount.log")).read()
        assert "answers again" in log
    finally:
        if m and helpers.is_mounted(m):
            env.stagefs("umount", m)
        sentinel.kill()
        sentinel.wait()
        for r in replicas:
            r.stop()
        if master.proc.poll() is None:
            master.stop()


def test_waiting_for_replicas_that_are_not_there_fails_with_the_reason(env, redis):
    base = env.dir_for(USER, "noreplica")
    url = f"redis://127.0.0.1:{redis.port}/{redis.new_db()}?wait-replicas=1&wait-timeout=200"
    p = env.stagefs("format", url, "noreplica", "--bucket", os.path.join(base, "data"), check=False)
    assert p.returncode == 1 and "reached 0 of the 1 replica(s)" in p.stderr, p.stderr


def test_an_outage_longer_than_the_limit_fails_operations_not_the_mount(env):
    r = OwnRedis(env)
    base = env.dir_for(USER, "outage")
    url = f"redis://127.0.0.1:{r.port}/1"
    env.stagefs("format", url, "outage", "--bucket", os.path.join(base, "data"))
    m = env.dir_for(USER, "m")
    env.stagefs("mount", "-d", url, m, "--meta-timeout", "2", "--attr-cache", "0", "--entry-cache", "0", "--dir-entry-cache", "0",
                "--log", os.path.join(base, "mount.log"))
    try:
        pid = helpers.mount_pid(m)
        r.stop()

        def attempt():
            t0 = time.monotonic()
            try:
                os.mkdir(os.path.join(m, "during"))
                return ("ok", time.monotonic() - t0)
            except OSError as e:
                return (e.errno, time.monotonic() - t0)

        code, took = run_as(USER, attempt)
        assert code == 5 and 1.5 < took < 30, (code, took)  # EIO once --meta-timeout is spent
        assert helpers.is_mounted(m) and os.path.exists(f"/proc/{pid}"), "the mount is still there"
        assert "unreachable for" in open(os.path.join(base, "mount.log")).read()
        r.start()
        run_as(USER, os.mkdir, os.path.join(m, "after"))
        assert run_as(USER, os.listdir, m) == ["after"]
    finally:
        env.stagefs("umount", m)
        if r.proc.poll() is None:
            r.stop()


def test_round_trips_per_file_on_a_mount(env, redis):
    """What the README's table says a mount costs per small file, as upper bounds (kernel
    caches may save more): create+write+close 4 round trips, stat 1, open+read+close 3 (and a
    read sent with the open's commit), unlink 2, the deleter's batches included."""
    db = redis.new_db()
    url = redis.url(db)
    base = env.dir_for(USER, "rt")
    env.stagefs("format", url, "roundtrips", "--bucket", os.path.join(base, "data"))
    m = env.dir_for(USER, "m")
    env.stagefs("mount", "-d", url, m, "--log", os.path.join(base, "mount.log"))
    n = 200
    d = os.path.join(m, "d")
    try:
        run_as(USER, os.mkdir, d)

        def create():
            for i in range(n):
                with open(os.path.join(d, f"f{i}"), "wb") as f:
                    f.write(b"x" * 4096)

        def stat():
            for i in range(n):
                os.stat(os.path.join(d, f"f{i}"))

        def read():
            for i in range(n):
                with open(os.path.join(d, f"f{i}"), "rb") as f:
                    assert f.read() == b"x" * 4096

        def unlink():
            for i in range(n):
                os.unlink(os.path.join(d, f"f{i}"))

        def gone():
            return redis_cli(redis, db, "ZCARD", "{%d}delfiles" % db) == "0"

        counts = {}
        for name, fn, most in [("create", create, 4), ("stat", stat, 1), ("read", read, 4), ("unlink", unlink, 2.1)]:
            counter = helpers.RoundTrips(redis.port)
            run_as(USER, fn)
            if name == "unlink":
                helpers.wait_until(gone, 30, "the deleter finished")
            ours = [c for c in counter.stop() if f"[{db} " in c and '"ZCARD"' not in c]
            counts[name] = len(ours) / n
            print(f"{name}: {counts[name]:.2f} commands per file")
            # A few more: heartbeats, id ranges (every 1000 inodes), the deleter's last step.
            assert len(ours) <= most * n + n // 10, f"{name}: {len(ours)} commands for {n} files"
        assert run_as(USER, os.listdir, d) == []
    finally:
        env.stagefs("umount", m)


def test_a_capability_goes_when_a_user_writes_as_on_ext4(env, redis):
    """The kernel asks for security.capability before each write to drop it; the mount
    remembers its absence like an attribute, but a capability set since is seen and dropped,
    as ext4 drops it (checked through a second client, which remembers nothing)."""
    # A version-2 capability: cap_net_raw, permitted and effective.
    cap = (0x02000001).to_bytes(4, "little") + (1 << 13).to_bytes(4, "little") + bytes(12)
    db = redis.new_db()
    url = redis.url(db)
    base = env.dir_for(USER, "cap")
    env.stagefs("format", url, "capability", "--bucket", os.path.join(base, "data"))
    m1, m2 = env.dir_for(USER, "m1"), env.dir_for(USER, "m2")
    # Root sets the capability (allow_root lets it into the user's mounts).
    env.stagefs("mount", "-d", url, m1, "-o", "allow_root", "--log", os.path.join(base, "m1.log"))
    env.stagefs("mount", "-d", url, m2, "-o", "allow_root", "--log", os.path.join(base, "m2.log"))
    oracle = env.dir_for(USER, "ext4")
    try:
        results = []
        for root in (oracle, m1):
            f = os.path.join(root, "tool")

            def write(data):
                with open(f, "ab") as h:
                    h.write(data)

            run_as(USER, write, b"first")  # the mount now knows: no capability
            os.chmod(f, 0o666)
            os.setxattr(f, "security.capability", cap)
            assert os.getxattr(f, "security.capability") == cap
            run_as(USER, write, b"second")
            try:
                results.append(os.getxattr(f, "security.capability"))
            except OSError as e:
                results.append(e.errno)
        assert results[0] == results[1], f"ext4: {results[0]}, StageFS: {results[1]}"
        # The other client reads the metadata itself.
        try:
            other = os.getxattr(os.path.join(m2, "tool"), "security.capability")
        except OSError as e:
            other = e.errno
        assert other == results[0]
    finally:
        env.stagefs("umount", m1)
        env.stagefs("umount", m2)


def test_a_volume_runs_on_a_redis_cluster(env):
    """Three cluster nodes on loopback. The URL names a node that does not serve the volume's
    slot: the client finds the one that does, and every key of the volume lands there (one
    slot, the hash tag {DB}). The slot then moves to another node under the mount, which finds
    it again and goes on."""
    # The cluster bus port is given (by default it is the port + 10000, past 65535 for a high
    # free port).
    nodes = [OwnRedis(env, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000",
                      "--cluster-port", str(helpers.free_port())) for _ in range(3)]

    def cli(n, *args):
        return subprocess.run(["redis-cli", "-p", str(n.port), *map(str, args)], capture_output=True, text=True, check=True).stdout.strip()

    base = env.dir_for(USER, "cluster")
    m = env.dir_for(USER, "m")
    try:
        subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in nodes], "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True, text=True)
        helpers.wait_until(lambda: all("cluster_state:ok" in cli(n, "CLUSTER", "INFO") for n in nodes), 30, "the cluster is up")
        db = 1
        slot = int(cli(nodes[0], "CLUSTER", "KEYSLOT", "{%d}" % db))

        def serves(n):
            for line in cli(n, "CLUSTER", "NODES").splitlines():
                f = line.split()
                if "myself" in f[2]:
                    for r in f[8:]:
                        lo, _, hi = r.partition("-")
                        if not r.startswith("[") and int(lo) <= slot <= int(hi or lo):
                            return True
            return False

        owner = next(n for n in nodes if serves(n))
        others = [n for n in nodes if n is not owner]
        url = f"redis://127.0.0.1:{others[0].port}/{db}"
        env.stagefs("format", url, "clustered", "--bucket", os.path.join(base, "data"))
        env.stagefs("mount", "-d", url, m, "--log", os.path.join(base, "mount.log"))

        def write(names):
            os.makedirs(os.path.join(m, "d"), exist_ok=True)
            for name in names:
                with open(os.path.join(m, "d", name), "w") as f:
                    f.write(name * 100)

        def check(names):
            return sorted(os.listdir(os.path.join(m, "d"))) == sorted(names) and all(
                open(os.path.join(m, "d", n)).read() == n * 100 for n in names)

        first = [f"a{i}" for i in range(50)]
        run_as(USER, write, first)
        assert run_as(USER, check, first)
        keys = cli(owner, "KEYS", "*").split()
        assert keys and all(k.startswith("{%d}" % db) for k in keys), keys[:10]
        assert all(cli(n, "DBSIZE") == "0" for n in others), "no key of the volume on the other nodes"

        # Move the slot to another node, as a resharding does.
        target = others[1]
        tid, oid = cli(target, "CLUSTER", "MYID"), cli(owner, "CLUSTER", "MYID")
        cli(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", oid)
        cli(owner, "CLUSTER", "SETSLOT", slot, "MIGRATING", tid)
        while True:
            batch = cli(owner, "CLUSTER", "GETKEYSINSLOT", slot, 100).split()
            if not batch:
                break
            cli(owner, "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *batch)
        for n in nodes:
            cli(n, "CLUSTER", "SETSLOT", slot, "NODE", tid)
        assert cli(owner, "DBSIZE") == "0" and int(cli(target, "DBSIZE")) > 0

        second = [f"b{i}" for i in range(50)]
        run_as(USER, write, second)
        assert run_as(USER, check, first + second), "the mount went on after the slot moved"
        assert cli(owner, "DBSIZE") == "0", "nothing written to the node that gave the slot away"
    finally:
        if helpers.is_mounted(m):
            env.stagefs("umount", m)
        for n in nodes:
            n.stop()


def test_a_directory_counts_right_right_after_concurrent_changes(env, redis):
    """Four processes make and remove subdirectories of one directory at once on one mount:
    its link count and times, asked right after (the mount answers from what its own changes
    committed when no other change overlapped), are what another client reads from Redis."""
    db = redis.new_db()
    url = redis.url(db)
    base = env.dir_for(USER, "nlink")
    env.stagefs("format", url, "nlinks", "--bucket", os.path.join(base, "data"))
    m1, m2 = env.dir_for(USER, "m1"), env.dir_for(USER, "m2")
    env.stagefs("mount", "-d", url, m1, "--log", os.path.join(base, "m1.log"))
    env.stagefs("mount", "-d", url, m2, "--log", os.path.join(base, "m2.log"), "--attr-cache", "0", "--entry-cache", "0")
    try:
        d = os.path.join(m1, "d")
        run_as(USER, os.mkdir, d)
        work = """
import os, sys
d, w = sys.argv[1], sys.argv[2]
for i in range(40):
    os.mkdir(os.path.join(d, f"{w}-{i}"))
for i in range(0, 40, 2):
    os.rmdir(os.path.join(d, f"{w}-{i}"))
"""
        procs = [subprocess.Popen(["runuser", "-u", USER, "--", "python3", "-c", work, d, str(w)]) for w in range(4)]
        assert all(p.wait(120) == 0 for p in procs)
        here = run_as(USER, os.stat, d)
        there = run_as(USER, os.stat, os.path.join(m2, "d"))
        assert here.st_nlink == 2 + 4 * 20 == there.st_nlink, (here.st_nlink, there.st_nlink)
        assert (here.st_mtime_ns, here.st_ctime_ns) == (there.st_mtime_ns, there.st_ctime_ns)
    finally:
        env.stagefs("umount", m1)
        env.stagefs("umount", m2)


def used_memory(redis):
    """Redis's used_memory (INFO memory), what maxmemory is compared with."""
    info = subprocess.run(["redis-cli", "-p", str(redis.port), "INFO", "memory"], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"^used_memory:(\d+)", info, re.M).group(1))


def test_an_attribute_flood_is_refused_early_and_redis_stays_usable(env):
    """Issue 18, finding 3: a user writes 64 MiB of extended attributes over two files (512
    attributes of 65,472 bytes each) on a shared Redis run as the README says (maxmemory,
    noeviction; 48 MiB here, below the flood). Each file takes one, about 64 KiB of names and
    values, and every attribute after it is refused with ENOSPC; Redis grows by little; another
    user's volume on the same server (mkdir, write, cat) keeps working."""
    import errno
    r = helpers.Redis(env.root, "--maxmemory", "48mb", "--maxmemory-policy", "noeviction")
    m1 = env.dir_for(USER, "flood")
    m2 = env.dir_for(OTHER, "victim")
    mounted = []
    try:
        b1, b2 = env.dir_for(USER, "flood-vol"), env.dir_for(OTHER, "victim-vol")
        env.stagefs("format", r.url(1), "flood", "--bucket", os.path.join(b1, "data"))
        env.stagefs("format", r.url(2), "victim", "--bucket", os.path.join(b2, "data"), user=OTHER)
        env.stagefs("mount", "-d", r.url(1), m1, "--log", os.path.join(b1, "mount.log"))
        mounted.append((m1, USER))
        env.stagefs("mount", "-d", r.url(2), m2, "--log", os.path.join(b2, "mount.log"), user=OTHER)
        mounted.append((m2, OTHER))

        def victim(tag):
            """The other user's everyday work; returns what failed."""
            failed = []
            for what, step in (("mkdir", lambda: os.mkdir(os.path.join(m2, f"d-{tag}"))),
                               ("write", lambda: open(os.path.join(m2, f"f-{tag}"), "wb").write(b"data " * 1000)),
                               ("cat", lambda: open(os.path.join(m2, f"f-{tag}"), "rb").read() == b"data " * 1000 or 1 / 0)):
                try:
                    step()
                except Exception as e:  # noqa: BLE001 - reported below
                    failed.append(f"{what}: {e!r}")
            return failed

        assert run_as(OTHER, victim, "before") == []
        before = used_memory(r)
        value = b"v" * 65472

        def flood():
            out = []
            for name in ("a", "b"):
                path = os.path.join(m1, name)
                open(path, "wb").close()
                accepted, errnos = [], []
                for i in range(512):
                    try:
                        os.setxattr(path, f"user.flood{i:04d}", value)
                        accepted.append(i)
                    except OSError as e:
                        errnos.append(e.errno)
                out.append((accepted, errnos))
            return out

        t0 = time.monotonic()
        results = run_as(USER, flood)
        took = time.monotonic() - t0
        after = used_memory(r)
        failed = run_as(OTHER, victim, "after")
        grown = after - before
        print(f"flood of {2 * 512 * len(value) / 2**20:.0f} MiB in {took:.1f} s: accepted per file "
              f"{[len(a) for a, _ in results]}, refusals {[sorted(set(e)) for _, e in results]}; "
              f"used_memory {before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB (+{grown / 2**10:.0f} KiB); victim: {failed or 'all worked'}")
        for accepted, errnos in results:
            assert accepted == [0], f"accepted attributes {accepted[:5]}... ({len(accepted)}): past 64 KiB per inode"
            assert set(errnos) == {errno.ENOSPC} and len(errnos) == 511, f"refusals: {sorted(set(errnos))}"
        assert grown < 2 << 20, f"Redis grew by {grown} bytes"
        assert failed == [], f"the other user's volume: {failed}"
        assert run_as(USER, lambda: len(os.getxattr(os.path.join(m1, "a"), "user.flood0000"))) == len(value)
    finally:
        for m, u in mounted:
            env.stagefs("umount", m, user=u, check=False)
        r.stop()


def test_a_full_redis_refuses_changes_with_enospc_and_says_why(env):
    """What users see once Redis reaches maxmemory (noeviction; the README's Redis memory
    paragraph): every metadata change, opening and removing a file included, fails with ENOSPC
    (not EIO), the mount log names the cause, stat, listing and reading what is open still work,
    and all works again once Redis has room."""
    import errno
    r = helpers.Redis(env.root, "--maxmemory-policy", "noeviction")
    m = env.dir_for(USER, "full")
    base = env.dir_for(USER, "full-vol")
    log = os.path.join(base, "mount.log")
    url = r.url(1)
    env.stagefs("format", url, "full", "--bucket", os.path.join(base, "data"))
    env.stagefs("mount", "-d", url, m, "--log", log, "--attr-cache", "0", "--entry-cache", "0", "--dir-entry-cache", "0")
    try:
        path = os.path.join(m, "f")
        run_as(USER, lambda: open(path, "wb").write(b"kept\n"))

        def when_full():
            fd = os.open(path, os.O_RDONLY)
            subprocess.run(["redis-cli", "-p", str(r.port), "CONFIG", "SET", "maxmemory", "1"], check=True, capture_output=True)
            seen = {"read open file": os.pread(fd, 100, 0)}
            os.close(fd)
            for what, step in (("mkdir", lambda: os.mkdir(os.path.join(m, "d"))),
                               ("create", lambda: open(os.path.join(m, "g"), "wb").close()),
                               ("cat", lambda: open(path, "rb").read()),
                               ("setxattr", lambda: os.setxattr(path, "user.x", b"1")),
                               ("rm", lambda: os.unlink(path))):
                try:
                    step()
                    seen[what] = "ok"
                except OSError as e:
                    seen[what] = errno.errorcode.get(e.errno, e.errno)
            seen["stat"] = os.stat(path).st_size
            seen["ls"] = sorted(os.listdir(m))
            return seen

        seen = run_as(USER, when_full)
        print(f"with Redis full: {seen}")
        changes = ("mkdir", "create", "cat", "setxattr", "rm")
        assert {k: seen[k] for k in changes} == dict.fromkeys(changes, "ENOSPC"), seen
        assert seen["stat"] == 5 and seen["ls"] == ["f"] and seen["read open file"] == b"kept\n", seen
        text = open(log).read()
        assert "out of memory (maxmemory reached)" in text, text[-2000:]
        print("\n".join(line for line in text.splitlines() if "maxmemory reached" in line))
        subprocess.run(["redis-cli", "-p", str(r.port), "CONFIG", "SET", "maxmemory", "0"], check=True, capture_output=True)
        run_as(USER, os.mkdir, os.path.join(m, "d"))
        assert run_as(USER, lambda: open(path, "rb").read()) == b"kept\n"
    finally:
        env.stagefs("umount", m, check=False)
        r.stop()
