"""The Redis engine on a shared server: no operation stalls Redis for other tenants."""
import os
import socket
import threading
import time

import helpers
from helpers import USER, run_as


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


def wait_for(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_deleting_huge_files_never_stalls_redis(env, redis):
    """A file of the largest size and a file with 2,500 written chunks are truncated and
    deleted while another tenant pings the same Redis: its worst reply stays under 100 ms, the
    mount keeps answering, and every chunk record goes."""
    db = redis.new_db()
    base = env.dir_for(USER, "huge")
    url = redis.url(db)
    env.stagefs("format", url, "huge", "--bucket", os.path.join(base, "data"))
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
        assert int(redis_cli(redis, db, "EVAL", "return #redis.call('KEYS', 'c*')", "0")) >= 2500
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
        wait_for(lambda: redis_cli(redis, db, "ZCARD", "delfiles") == "0" and redis_cli(redis, db, "LLEN", "delslices") == "0",
                 120, "the background deletion")
        pings = probe.count
        worst = probe.finish()
        probe = None
        left = int(redis_cli(redis, db, "EVAL", "return #redis.call('KEYS', 'c*') + #redis.call('KEYS', 'k*')", "0"))
        assert left == 0, f"{left} chunk records left"
        assert worst < 0.1, f"another tenant waited {worst * 1000:.0f} ms for Redis"
        assert max(answers) < 5
        print(f"worst reply to another tenant: {worst * 1000:.1f} ms over {pings} pings")
    finally:
        if probe:
            probe.finish()
        env.stagefs("umount", m)
