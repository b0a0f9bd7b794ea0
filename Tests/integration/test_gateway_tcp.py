"""The gateway over TCP (issue 19, part 1): `stagefs gateway --listen`, each connection
authenticated by a MUNGE credential bound to it (a munged of the test's own, on its own socket
and key). Users mount through stagefs://127.0.0.1:PORT; a raw client (gwproto.py over TCP,
credentials from the `munge` CLI) presents credentials made for another connection, replayed,
expired or none at all; root acts as nobody unless the gateway trusts it."""
import errno
import os
import pwd
import signal
import socket
import struct
import subprocess
import time

import pytest

import gwproto
import helpers
from helpers import OTHER, SHARED_GROUP, USER, run_as, wait_until

PASSWORD = "pw-" + os.urandom(12).hex()
AUTH = 8  # the auth op
NOBODY = 65534


def uid_of(user):
    return pwd.getpwnam(user).pw_uid


class Munged:
    """munged on its own socket and key, in a directory other users may traverse."""

    def __init__(self, env):
        self.dir = env.dir_for("root", "munge")
        os.chmod(self.dir, 0o755)
        key = os.path.join(self.dir, "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        self.socket = os.path.join(self.dir, "munge.sock")
        self.proc = subprocess.Popen(
            ["munged", "-F", "-f", f"--socket={self.socket}", f"--key-file={key}", f"--pid-file={self.dir}/munged.pid",
             f"--seed-file={self.dir}/munged.seed", f"--log-file={self.dir}/munged.log"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: os.path.exists(self.socket) or self.proc.poll() is not None, 20, "munged to start")
        assert self.proc.poll() is None, "munged started"

    def credential(self, payload, user="root", ttl=60):
        """A credential of `user` carrying `payload`, made by the `munge` CLI."""
        cmd = ["munge", "-S", self.socket, "-t", str(ttl)]
        if user != "root":
            cmd = ["runuser", "-u", user, "--", *cmd]
        return subprocess.run(cmd, input=payload, capture_output=True, check=True).stdout.strip()

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def binding(nonce):
    """What a credential for a connection with this nonce carries (MungeAuth's ConnectionBinding)."""
    return b"stagefs-gateway-v1\0connect\0" + nonce


class TCPGateway:
    """A `stagefs gateway` listening on a loopback port (and a Unix socket when given)."""

    def __init__(self, env, meta_url, munged, *extra, socket_path=None, ipv6=False):
        self.env, self.munged = env, munged
        self.port = helpers.free_port()
        self.dir = env.dir_for("root", "gwtcp")
        os.chmod(self.dir, 0o700)
        self.config = os.path.join(self.dir, "gw.conf")
        fd = os.open(self.config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, f"META_URL={meta_url}\n".encode())
        os.close(fd)
        self.log = os.path.join(self.dir, "gateway.log")
        self.socket = socket_path
        args = [env.bin, "gateway", "--config", self.config, "--listen", f"127.0.0.1:{self.port}", "--munge-socket", munged.socket, *extra]
        if socket_path:
            args += ["--socket", socket_path]
        if ipv6:
            args += ["--listen", f"[::1]:{self.port}"]
        with open(self.log, "a") as logf:
            self.proc = subprocess.Popen(args, stdout=logf, stderr=logf, env={"PATH": os.environ["PATH"]})

        def up():
            assert self.proc.poll() is None, open(self.log).read()
            return helpers.wait_port(self.port, 0.2)
        wait_until(up, 30, "the gateway to listen")

    @property
    def url(self):
        return f"stagefs://127.0.0.1:{self.port}"

    def log_text(self):
        return open(self.log).read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class RawTCP(gwproto.Raw):
    """gwproto's raw client over TCP; hello keeps the connection's nonce."""

    def __init__(self, port, hello=True, timeout=20):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.next = 1
        self.nonce = None
        if hello:
            self.hello()

    def hello(self, **kw):
        rest = super().hello(**kw)
        (n,) = struct.unpack_from(">I", rest, 2)  # after u16 version: string volume, data nonce
        off = 6 + n
        (m,) = struct.unpack_from(">I", rest, off)
        self.nonce = rest[off + 4:off + 4 + m]
        return rest

    def auth(self, credential):
        """Sends auth; (uid, gid) the gateway acts as, or raises GatewayError."""
        self.frame(struct.pack(">QH", 99, AUTH) + gwproto.data(credential))
        rid, status, rest = self.recv()
        if status:
            raise gwproto.GatewayError(status, rest[4:].decode(errors="replace"))
        assert rid == 99
        return struct.unpack(">II", rest[:8])

    def closed(self):
        """Whether the gateway closes the connection (EOF or reset, after whatever it still
        sends) within the socket's timeout."""
        try:
            while self.s.recv(4096):
                pass
            return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False


def refused(fn, *args):
    """(errno, message) of a GatewayError from fn(*args); fails when fn succeeds."""
    try:
        fn(*args)
    except gwproto.GatewayError as e:
        return e.errno, e.message
    raise AssertionError(f"{fn.__name__} was not refused")


@pytest.fixture(scope="module")
def site(env):
    """Redis with a password, a `file` volume (bucket root's, 0700), a munged, a gateway on TCP
    and a Unix socket, and a second gateway of the volume on TCP only that trusts root."""
    r = helpers.Redis(env.root, "--requirepass", PASSWORD)
    secret_url = f"redis://:{PASSWORD}@127.0.0.1:{r.port}/1"
    base = env.dir_for("root", "tcpsite")
    bucket = os.path.join(base, "bucket")
    env.stagefs("format", secret_url, "gwtcp", "--bucket", bucket, user="root")
    os.chown(bucket, 0, 0)
    os.chmod(bucket, 0o700)
    munged = Munged(env)
    run = env.dir_for("root", "tcprun")
    os.chmod(run, 0o755)
    gw = TCPGateway(env, secret_url, munged, socket_path=os.path.join(run, "gwtcp.sock"))
    trusting = TCPGateway(env, secret_url, munged, "--trust-root", "--auth-timeout", "2", "--max-unauthenticated", "2", ipv6=True)
    logs = env.dir_for("root", "tcplogs")
    os.chmod(logs, 0o1777)
    s = dict(redis=r, url=secret_url, gw=gw, trusting=trusting, munged=munged, logs=logs, mounts=[])
    yield s
    for m in s["mounts"]:
        if helpers.is_mounted(m):
            subprocess.run(["fusermount3", "-u", "-z", m], capture_output=True)
    gw.stop()
    trusting.stop()
    munged.stop()
    r.stop()


def stagefs(env, site, *args, user=USER, check=True, munge_socket=None):
    """The CLI as `user`, its credentials from the test's munged."""
    sock = munge_socket or site["munged"].socket
    cmd = [env.bin, *args]
    if user != "root":
        cmd = ["runuser", "-u", user, "--", *cmd]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "STAGEFS_MUNGE_SOCKET": sock})
    if check and p.returncode != 0:
        raise RuntimeError(f"stagefs {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def mount(env, site, user, url):
    mnt = env.dir_for(user, f"tm-{user}")
    cache = env.dir_for(user, "tcache")
    stagefs(env, site, "mount", "-d", url, mnt, "--cache-dir", cache, "--log", os.path.join(site["logs"], f"{os.path.basename(mnt)}.log"), user=user)
    assert helpers.is_mounted(mnt)
    site["mounts"].append(mnt)
    return mnt


def umount(mnt):
    subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)


def direct_stat(env, site, *paths):
    """Owners as the volume records them: a root mount of the volume itself (its Redis URL),
    not through any gateway."""
    mnt = env.dir_for("root", "tdirect")
    env.stagefs("mount", "-d", site["url"], mnt, "--cache-size", "0", user="root")
    try:
        return [(st.st_uid, st.st_gid) for st in (os.stat(os.path.join(mnt, p)) for p in paths)]
    finally:
        env.stagefs("umount", mnt, user="root")


def test_a_user_mounts_over_tcp_as_themselves_with_their_nss_groups(env, site):
    """stagefs-t2 mounts stagefs://127.0.0.1:PORT: the files it makes are its own (ls -ln in the
    mount, and the volume's own records); a supplementary group comes from the gateway's NSS
    (a 0770 directory of the shared group admits it, one of another group does not)."""
    t2 = mount(env, site, OTHER, site["gw"].url)
    t1 = mount(env, site, USER, f"stagefs+unix://{site['gw'].socket}")
    shared_gid = helpers.grp.getgrnam(SHARED_GROUP).gr_gid

    def dirs():
        for name, gid in (("team", shared_gid), ("own", pwd.getpwnam(USER).pw_gid)):
            os.mkdir(os.path.join(t1, name), 0o770)
            os.chown(os.path.join(t1, name), -1, gid)
            os.chmod(os.path.join(t1, name), 0o770)
    run_as(USER, dirs)

    def work():
        os.mkdir(os.path.join(t2, "d2"))
        with open(os.path.join(t2, "d2", "f2"), "w") as f:
            f.write("t2 over TCP\n")
        with open(os.path.join(t2, "team", "from-t2"), "w") as f:
            f.write("group member\n")
        try:
            open(os.path.join(t2, "own", "x"), "w").close()
            other = 0
        except OSError as e:
            other = e.errno
        return other, subprocess.run(["ls", "-ln", os.path.join(t2, "d2")], capture_output=True, text=True, check=True).stdout
    other_group, listing = run_as(OTHER, work)
    t2uid = uid_of(OTHER)
    assert other_group == errno.EACCES
    line = next(l for l in listing.splitlines() if l.endswith(" f2"))
    assert line.split()[2] == str(t2uid), listing
    assert run_as(OTHER, lambda: open(os.path.join(t2, "d2", "f2")).read()) == "t2 over TCP\n"
    owners = direct_stat(env, site, "d2", "d2/f2", "team/from-t2")
    assert [o[0] for o in owners] == [t2uid] * 3, owners
    assert owners[1][1] == pwd.getpwnam(OTHER).pw_gid, owners
    # The first user sees it through the Unix socket too.
    assert run_as(USER, os.stat, os.path.join(t1, "team", "from-t2")).st_uid == t2uid
    umount(t2)
    umount(t1)


def test_credentials_not_made_for_this_connection_are_refused(env, site):
    """A raw client (running as root, its credentials stagefs-t2's): a good credential is
    accepted and its uid is the one served; the same credential on a second connection
    (replay), one made for another connection's nonce, an expired one, garbage, an empty one
    and none at all (a request before auth, after hello or without it) are each refused with the reason, logged once, and
    the connection closed."""
    gw, munged = site["gw"], site["munged"]
    t2 = uid_of(OTHER)
    before = gw.log_text().count("refused TCP connection")

    # Accepted: the uid is the credential's, whoever runs the client.
    a = RawTCP(gw.port)
    assert len(a.nonce) == 32
    good = munged.credential(binding(a.nonce), user=OTHER)
    assert a.auth(good) == (t2, pwd.getpwnam(OTHER).pw_gid)
    assert a.getattr(1, 0)["type"] != 0
    # What it says of itself changes nothing: a create "on behalf of root" is t2's.
    sid, sid_tag = a.new_session()
    _, _, made = a.create(1, 0, f"raw-{os.urandom(3).hex()}".encode(), 0o644, sid, sid_tag, on_behalf=(0, 0, [0]))
    assert made["uid"] == t2, made
    a.close()

    results = {}
    # Replayed: the good credential again, on a new connection.
    b = RawTCP(gw.port)
    results["replayed"] = refused(b.auth, good)
    assert b.closed()
    # Made for another connection: a fresh credential for b's nonce, presented on c.
    c = RawTCP(gw.port)
    results["other-connection"] = refused(c.auth, munged.credential(binding(b.nonce), user=OTHER))
    assert c.closed()
    # Expired: a credential with a time to live of 1 s, presented once the clock is past it.
    d = RawTCP(gw.port)
    short = munged.credential(binding(d.nonce), user=OTHER, ttl=1)
    made_by = int(time.time())
    # munged's time(2) is the kernel's coarse clock, a tick behind time.time(): a margin past
    # the second in which it is expired (now > made + ttl).
    wait_until(lambda: time.time() >= made_by + 2.1, 5, "the credential to expire")
    results["expired"] = refused(d.auth, short)
    assert d.closed()
    # Garbage, empty, none at all.
    e = RawTCP(gw.port)
    results["garbage"] = refused(e.auth, b"MUNGE:" + os.urandom(30).hex().encode() + b":")
    f = RawTCP(gw.port)
    results["empty"] = refused(f.auth, b"")
    g = RawTCP(gw.port)
    results["none"] = refused(g.getattr, 1, 0)
    assert g.closed()
    h = RawTCP(gw.port, hello=False)
    results["none-before-hello"] = refused(h.getattr, 1, 0)
    assert h.closed()

    assert {k: v[0] for k, v in results.items()} == {k: errno.EACCES for k in results}, results
    assert "replayed" in results["replayed"][1], results
    assert "another connection" in results["other-connection"][1], results
    assert "expired" in results["expired"][1], results
    assert "invalid" in results["garbage"][1], results
    assert "no MUNGE credential" in results["empty"][1], results
    assert "getattr before auth" in results["none"][1] and "getattr before auth" in results["none-before-hello"][1], results
    # One log line for each refusal, naming the reason.
    wait_until(lambda: gw.log_text().count("refused TCP connection") - before >= len(results), 5, "the refusals in the log")
    lines = [l for l in gw.log_text().splitlines() if "refused TCP connection from 127.0.0.1:" in l][before:]
    assert len(lines) == len(results), lines
    for word, n in (("replayed", 1), ("another connection", 1), ("expired", 1), ("invalid", 1), ("no MUNGE credential", 1),
                    ("getattr before auth", 2)):
        assert sum(word in l for l in lines) == n, (word, lines)


def test_root_over_tcp_is_nobody_unless_trusted(env, site):
    """A root client over TCP acts as nobody (65534, no groups): a file a root mount creates is
    65534's and its "on behalf of" block is ignored. With --trust-root (the second gateway),
    root stays root and may act for another user."""
    gw, trusting, munged = site["gw"], site["trusting"], site["munged"]
    squashed = mount(env, site, "root", gw.url)
    with open(os.path.join(squashed, "by-root-squashed"), "w") as f:
        f.write("x")
    assert os.stat(os.path.join(squashed, "by-root-squashed")).st_uid == NOBODY
    trusted = mount(env, site, "root", trusting.url)
    with open(os.path.join(trusted, "by-root-trusted"), "w") as f:
        f.write("y")
    assert os.stat(os.path.join(trusted, "by-root-trusted")).st_uid == 0
    umount(squashed)
    umount(trusted)
    assert direct_stat(env, site, "by-root-squashed", "by-root-trusted") == [(NOBODY, NOBODY), (0, 0)]

    # The raw client as root: the gateway says whom it acts as; "on behalf of" t1 counts only
    # where root is trusted.
    t1 = uid_of(USER)
    owners = {}
    for name, g in (("squashed", gw), ("trusted", trusting)):
        c = RawTCP(g.port)
        owners[f"{name}-auth"] = c.auth(munged.credential(binding(c.nonce)))
        sid, sid_tag = c.new_session()
        owners[name] = c.create(1, 0, f"{name}-{os.urandom(3).hex()}".encode(), 0o644, sid, sid_tag,
                                on_behalf=(t1, pwd.getpwnam(USER).pw_gid, []))[2]["uid"]
        c.close()
    assert owners == {"squashed-auth": (NOBODY, NOBODY), "squashed": NOBODY, "trusted-auth": (0, 0), "trusted": t1}, owners


def test_unauthenticated_connections_are_bounded_in_time_and_number(env, site):
    """On the gateway with --auth-timeout 2 and --max-unauthenticated 2: two silent
    connections fill the allowance, a third is refused at once (EAGAIN); the silent ones are
    closed after about 2 s (so is one that said hello and stopped); then clients get in again."""
    g = site["trusting"]
    silent = [RawTCP(g.port, hello=False, timeout=10) for _ in range(2)]
    time.sleep(0.2)  # (accepted in order: the third is counted after them)
    third = RawTCP(g.port, hello=False, timeout=10)
    code, message = refused(third.hello)
    assert code == errno.EAGAIN and "authenticating" in message, message
    t0 = time.monotonic()
    assert all(s.closed() for s in silent)
    assert 0.8 < time.monotonic() - t0 < 6, time.monotonic() - t0
    half = RawTCP(g.port, timeout=10)
    t0 = time.monotonic()
    assert half.closed() and time.monotonic() - t0 < 6
    c = RawTCP(g.port)
    assert c.auth(site["munged"].credential(binding(c.nonce), user=OTHER))[0] == uid_of(OTHER)
    c.close()
    assert "not authenticated within 2 s" in g.log_text()


def test_client_errors_name_the_address_and_cause_and_the_gateway_survives(env, site):
    """A client whose munged is unreachable, one pointed at a port nothing listens on: the
    errors name host:port and the cause. After everything above, both gateways still serve a
    fresh client (the second also over IPv6)."""
    gw = site["gw"]
    p = stagefs(env, site, "status", gw.url, check=False, munge_socket="/nonexistent/munge.sock")
    assert p.returncode == 1 and f"stagefs://127.0.0.1:{gw.port}" in p.stderr and "cannot reach munged at /nonexistent/munge.sock" in p.stderr, p.stderr
    dead = helpers.free_port()
    p = stagefs(env, site, "status", f"stagefs://127.0.0.1:{dead}", check=False)
    assert p.returncode == 1 and f"127.0.0.1:{dead}" in p.stderr and "connection refused" in p.stderr, p.stderr
    p = subprocess.run([env.bin, "gateway", "--listen", "127.0.0.1"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--listen '127.0.0.1': no port" in p.stderr and "HOST:PORT" in p.stderr, p.stderr
    trusting = site["trusting"]
    for g, url in ((gw, gw.url), (trusting, trusting.url), (trusting, f"stagefs://[::1]:{trusting.port}")):
        assert g.proc.poll() is None
        out = stagefs(env, site, "status", url, user=USER).stdout
        assert "gwtcp" in out and PASSWORD not in out, out


def test_sigterm_stops_every_listener(env, site):
    """SIGTERM: the gateway serving TCP and a Unix socket closes an idle authenticated TCP
    connection, removes its socket file and exits 0 (after the tests above: it ran to the end)."""
    gw = site["gw"]
    c = RawTCP(gw.port, timeout=10)
    c.auth(site["munged"].credential(binding(c.nonce), user=USER))
    assert os.path.exists(gw.socket)
    gw.proc.send_signal(signal.SIGTERM)
    assert c.closed()
    assert gw.proc.wait(timeout=30) == 0, gw.log_text()[-2000:]
    assert not os.path.exists(gw.socket)
    assert "stopped" in gw.log_text()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", gw.port), timeout=2).close()
