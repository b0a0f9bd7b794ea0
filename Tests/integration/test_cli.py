"""The command line: bad input fails in one clear line with nothing left mounted, two clients
share a Redis volume, SIGTERM and umount flush, memory stays bounded."""
import os
import signal
import socket
import subprocess
import threading
import time

import pytest

import helpers
from helpers import USER, run_as


def one_line_error(p, *needles):
    err = p.stderr.strip()
    assert p.returncode != 0
    assert err.startswith("stagefs: "), err
    assert len(err.splitlines()) <= 2, err
    assert "Traceback" not in err and "Fatal error" not in err and "0x" not in err, err
    for n in needles:
        assert n in err, err
    return err


@pytest.fixture
def mnt(env):
    m = env.dir_for(USER, "mnt")
    yield m
    if helpers.is_mounted(m):
        subprocess.run(["fusermount3", "-uz", m])


def test_unreachable_redis(env, mnt):
    port = helpers.free_port()
    p = env.stagefs("mount", "-d", f"redis://127.0.0.1:{port}/1", mnt, check=False)
    one_line_error(p, f"127.0.0.1:{port}", "connection refused")
    assert p.returncode == 1
    assert not helpers.is_mounted(mnt)
    p = env.stagefs("format", f"redis://127.0.0.1:{port}/1", "vol", check=False)
    one_line_error(p, "cannot reach Redis", f"127.0.0.1:{port}", "connection refused", "redis-server running")


def test_unformatted_volume(env, redis, mnt):
    p = env.stagefs("mount", "-d", redis.url(15), mnt, check=False)
    one_line_error(p, "stagefs format")
    assert not helpers.is_mounted(mnt)
    p = env.stagefs("mount", "-d", f"sqlite3://{mnt}-nothing/meta.db", mnt, check=False)
    one_line_error(p, "does not exist")


def test_missing_mountpoint(env, redis):
    env.stagefs("format", redis.url(14), "missing-mp", "--bucket", env.dir_for(USER, "b"))
    p = env.stagefs("mount", "-d", redis.url(14), "/nonexistent/mountpoint", check=False)
    one_line_error(p, "/nonexistent/mountpoint", "does not exist")
    assert not helpers.is_mounted("/nonexistent/mountpoint")


def test_a_mistyped_meta_url_says_what_was_meant(env, mnt):
    forms = ("sqlite3:///abs/path.db", "redis://[[user]:password@]host[:port][/db]", "rediss://", "MASTER,SENTINEL")
    for bad, meant in [("redis:/127.0.0.1:6379/1", "redis://127.0.0.1:6379/1"), ("redis//127.0.0.1", "redis://127.0.0.1"),
                       ("redis:127.0.0.1:6379", "redis://127.0.0.1:6379"), ("sqlite3:/var/lib/x.db", "sqlite3:///var/lib/x.db"),
                       ("sqlite3://var/lib/x.db", "sqlite3:///var/lib/x.db"), ("127.0.0.1:6379/1", "redis://127.0.0.1:6379/1"),
                       ("redsi://h:6379/0", "redis://h:6379/0"),
                       ("stagefs+unix:/run/stagefs/v.sock", "stagefs+unix:///run/stagefs/v.sock"),
                       ("stagefs+unix://run/stagefs/v.sock", "stagefs+unix:///run/stagefs/v.sock"),
                       ("stagefs:/gw1", "stagefs://gw1:PORT"), ("stagefs:/gw1:7000", "stagefs://gw1:7000")]:
        p = env.stagefs("mount", bad, mnt, check=False)
        one_line_error(p, f"malformed META-URL '{bad}'", f"did you mean '{meant}'?", *forms)
        assert p.returncode == 2, (bad, p.stderr)
    p = env.stagefs("status", "redis://h:6379:1", check=False)
    one_line_error(p, "more than one ':'", "host:port/db")
    # A password in a URL that does not parse is not echoed.
    p = env.stagefs("status", "redis:/:hunter2@h/0", check=False)
    one_line_error(p, "did you mean 'redis://:****@h/0'?")
    assert "hunter2" not in p.stderr


def test_a_port_that_is_not_redis_says_so(env, mnt):
    port = helpers.free_port()
    http = subprocess.Popen(["python3", "-m", "http.server", "--bind", "127.0.0.1", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert helpers.wait_port(port)
        for args in (["status", f"redis://127.0.0.1:{port}/1"], ["mount", "-d", f"redis://127.0.0.1:{port}/1", mnt]):
            p = env.stagefs(*args, check=False)
            one_line_error(p, f"127.0.0.1:{port} is not a Redis server (it answered '<!DOCTYPE HTML>')", "META-URL")
            assert p.returncode == 1
        assert not helpers.is_mounted(mnt)
    finally:
        http.kill()
        http.wait()
    # A port that accepts and closes at once (a TLS-only Redis port does that to plain text).
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def close_one():
            conn, _ = listener.accept()
            conn.close()

        t = threading.Thread(target=close_one, daemon=True)
        t.start()
        p = env.stagefs("status", f"redis://127.0.0.1:{port}/1", check=False)
        t.join(10)
    one_line_error(p, f"127.0.0.1:{port} closed the connection without answering", "rediss://")


def test_malformed_meta_url_is_a_usage_error(env, mnt):
    for bad in ["mysql://x", "redis://host:notaport/0", "sqlite3://relative.db", "nonsense"]:
        p = env.stagefs("mount", bad, mnt, check=False)
        one_line_error(p, "META-URL")
        assert p.returncode == 2, (bad, p.stderr)
    p = env.stagefs("format", "redis://127.0.0.1:1/0", "BAD_NAME", check=False)
    assert p.returncode == 2 and "invalid volume name" in p.stderr


def test_wrong_s3_secret(env, redis, mnt):
    moto = helpers.Moto(auth=True)
    try:
        p = env.stagefs("format", redis.url(13), "authvol", "--storage", "s3", "--bucket", moto.bucket("authvol"),
                        "--access-key", moto.access_key, "--secret-key", "wrong-secret", check=False)
        one_line_error(p, "SignatureDoesNotMatch")
        env.stagefs("format", redis.url(13), "authvol", "--storage", "s3", "--bucket", moto.bucket("authvol"),
                    "--access-key", moto.access_key, "--secret-key", moto.secret_key)
        p = env.stagefs("mount", "-d", redis.url(13), mnt, "--secret-key", "wrong-secret", check=False)
        one_line_error(p, "access denied")
        assert not helpers.is_mounted(mnt)
        env.stagefs("mount", "-d", redis.url(13), mnt)
        assert helpers.is_mounted(mnt)
        env.stagefs("umount", mnt)
    finally:
        moto.stop()


def test_reformat_with_other_settings_is_refused(env, redis):
    bucket = env.dir_for(USER, "b")
    env.stagefs("format", redis.url(12), "refmt", "--bucket", bucket)
    env.stagefs("format", redis.url(12), "refmt", "--bucket", bucket)  # same settings: fine
    p = env.stagefs("format", redis.url(12), "refmt", "--bucket", bucket, "--block-size", "1024", check=False)
    # The differences, and what --force would do about them.
    one_line_error(p, "volume 'refmt'", "block size 4096 KiB -> 1024 KiB", "--force", "moves no data", "unreadable")
    assert p.returncode == 1
    assert "Block size:  4096 KiB" in env.stagefs("status", redis.url(12)).stdout
    env.stagefs("format", redis.url(12), "refmt", "--bucket", bucket, "--block-size", "1024", "--force")
    assert "Block size:  1024 KiB" in env.stagefs("status", redis.url(12)).stdout


def test_two_mounts_of_one_redis_volume(env, redis, moto):
    url = redis.url(11)
    env.stagefs("format", url, "shared", "--storage", "s3", "--bucket", moto.bucket("shared"),
                "--access-key", moto.access_key, "--secret-key", moto.secret_key)
    a, b = env.dir_for(USER, "a"), env.dir_for(USER, "b")
    env.stagefs("mount", "-d", url, a)
    env.stagefs("mount", "-d", url, b)
    try:
        def writer():
            with open(os.path.join(a, "note"), "w") as f:
                f.write("from a")

        def reader():
            with open(os.path.join(b, "note")) as f:
                return f.read()

        run_as(USER, writer)
        assert run_as(USER, reader) == "from a"

        def rewrite():
            with open(os.path.join(b, "note"), "w") as f:
                f.write("b was here")

        run_as(USER, rewrite)
        assert run_as(USER, lambda: open(os.path.join(a, "note")).read()) == "b was here"
        status = env.stagefs("status", url).stdout
        assert a in status and b in status and "alive" in status
        info = env.stagefs("info", os.path.join(a, "note")).stdout
        assert "shared/chunks/" in info and "inode:" in info
    finally:
        env.stagefs("umount", a)
        env.stagefs("umount", b)
    assert "Sessions:    0" in env.stagefs("status", url).stdout


def test_sigterm_flushes_buffered_data(env, redis):
    url = redis.url(10)
    env.stagefs("format", url, "sigterm", "--bucket", env.dir_for(USER, "b"))
    m = env.dir_for(USER, "m")
    env.stagefs("mount", "-d", url, m)
    path = os.path.join(m, "open-file")
    # A writer that keeps the file open while the mount is told to stop.
    code = f"import os,time\nf=open({path!r},'wb')\nf.write(b'z'*(3<<20))\nf.flush()\nopen({path!r}+'.ready','w').close()\ntime.sleep(30)\n"
    w = subprocess.Popen(["runuser", "-u", USER, "--", "python3", "-c", code])
    try:
        deadline = time.time() + 20
        while not os.path.exists(path + ".ready") and time.time() < deadline:
            time.sleep(0.05)
        pid = helpers.mount_pid(m)
        os.kill(pid, signal.SIGTERM)
        deadline = time.time() + 30
        while helpers.is_mounted(m) and time.time() < deadline:
            time.sleep(0.1)
        assert not helpers.is_mounted(m), "SIGTERM unmounted"
    finally:
        w.kill()
        w.wait()
    env.stagefs("mount", "-d", url, m)
    try:
        assert run_as(USER, os.path.getsize, path) == 3 << 20
        assert run_as(USER, lambda: open(path, "rb").read() == b"z" * (3 << 20))
    finally:
        env.stagefs("umount", m)


def test_sigterm_the_moment_a_mount_is_ready_unmounts_it_cleanly(env, redis):
    """A job that ends at once: its epilog's SIGTERM can come before the FUSE loop runs (while
    the mount starts its backups); it still unmounts, flushes and says so, never dies silently."""
    url = redis.url(redis.new_db())
    env.stagefs("format", url, "sigready", "--bucket", env.dir_for(USER, "b"))
    m = env.dir_for(USER, "m")
    logs = env.dir_for(USER, "logs")
    for i in range(5):
        log = os.path.join(logs, f"m{i}.log")
        env.stagefs("mount", "-d", url, m, "--log", log)
        pid = helpers.mount_pid(m)
        os.kill(pid, signal.SIGTERM)
        helpers.wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 30, "the mount process to exit")
        assert not helpers.is_mounted(m)
        assert "unmounted" in open(log).read(), open(log).read()


def test_umount_force_detaches_a_dead_mount(env, redis):
    url = redis.url(9)
    env.stagefs("format", url, "deadmount", "--bucket", env.dir_for(USER, "b"))
    m = env.dir_for(USER, "m")
    env.stagefs("mount", "-d", url, m)
    pid = helpers.mount_pid(m)
    os.kill(pid, signal.SIGKILL)
    helpers.wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 10, "the killed mount process to be gone")
    with pytest.raises(OSError):
        run_as(USER, os.listdir, m)  # ENOTCONN: the mount is dead
    env.stagefs("umount", "--force", m)
    assert not helpers.is_mounted(m)
    assert run_as(USER, os.listdir, m) == []
    p = env.stagefs("umount", m, check=False)
    one_line_error(p, "not a StageFS mount")


def test_busy_mount_is_not_unmounted_without_force(env, redis):
    url = redis.url(8)
    env.stagefs("format", url, "busy", "--bucket", env.dir_for(USER, "b"))
    m = env.dir_for(USER, "m")
    env.stagefs("mount", "-d", url, m)
    holder = subprocess.Popen(["runuser", "-u", USER, "--", "bash", "-c", f"cd {m} && exec sleep 30"], start_new_session=True)
    try:
        helpers.wait_until(lambda: helpers.processes_in(m), 10, "a process working in the mount")
        p = env.stagefs("umount", m, check=False)
        one_line_error(p, f"the working directory {m} of process")
        assert helpers.is_mounted(m)
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    helpers.wait_until(lambda: not helpers.processes_in(m), 10, "the process in the mount to be gone")
    env.stagefs("umount", m)
    assert not helpers.is_mounted(m)


def test_memory_stays_bounded_under_a_10_gib_write(env, redis):
    url = redis.url(7)
    base = env.dir_for(USER, "big")
    env.stagefs("format", url, "tengig", "--bucket", os.path.join(base, "data"), "--trash-days", "0")
    m = env.dir_for(USER, "m")
    env.stagefs("mount", "-d", url, m, "--buffer-size", "64", "--memory-cache-size", "64")
    try:
        pid = helpers.mount_pid(m)
        path = os.path.join(m, "ten")
        subprocess.run(["runuser", "-u", USER, "--", "dd", "if=/dev/zero", f"of={path}", "bs=4M", "count=2560", "status=none"],
                       check=True, timeout=900)
        assert run_as(USER, os.path.getsize, path) == 10 << 30
        hwm = helpers.vm_hwm_kib(pid)
        print(f"peak RSS of the mount: {hwm} KiB")
        assert hwm < 400 << 10, f"peak RSS {hwm} KiB"
        run_as(USER, os.unlink, path)
        # The objects of the deleted file are removed in the background.
        deadline = time.time() + 120
        while time.time() < deadline:
            n = sum(len(fs) for _, _, fs in os.walk(os.path.join(base, "data", "tengig", "chunks")))
            if n == 0:
                break
            time.sleep(0.2)
        assert n == 0, f"{n} objects left after unlink"
    finally:
        env.stagefs("umount", m)


def test_disk_cache_serves_blocks_when_the_store_is_gone(env, redis):
    moto = helpers.Moto()
    url = redis.url(6)
    cache = env.dir_for(USER, "cache")
    try:
        env.stagefs("format", url, "cached", "--storage", "s3", "--bucket", moto.bucket("cached"),
                    "--access-key", moto.access_key, "--secret-key", moto.secret_key)
        # B is written by a client without a disk cache, A by one with it that keeps the full
        # blocks it writes too (--cache-large-write).
        plain = env.dir_for(USER, "plain")
        env.stagefs("mount", "-d", url, plain, "--cache-size", "0")
        run_as(USER, lambda: open(os.path.join(plain, "b"), "wb").write(os.urandom(1 << 20)))
        env.stagefs("umount", plain)
        # Without it, only the last, smaller block of a 9 MiB file is kept.
        small_cache = env.dir_for(USER, "small-cache")
        m = env.dir_for(USER, "m")
        env.stagefs("mount", "-d", url, m, "--cache-dir", small_cache)
        run_as(USER, lambda: open(os.path.join(m, "c"), "wb").write(os.urandom(9 << 20)))
        env.stagefs("umount", m)
        kept = [f for _, _, fs in os.walk(small_cache) for f in fs if not f.startswith("index.db")]
        assert [b.split("_", 1)[1] for b in kept] == ["2_1048576"], kept
        env.stagefs("mount", "-d", url, m, "--cache-dir", cache, "--io-retries", "2", "--io-timeout", "2", "--cache-large-write")
        data = os.urandom(9 << 20)
        run_as(USER, lambda: open(os.path.join(m, "a"), "wb").write(data))
        env.stagefs("umount", m)
        uid = helpers.pwd.getpwnam(USER).pw_uid
        user_dir = os.path.join(cache, str(uid))
        assert os.stat(user_dir).st_mode & 0o777 == 0o700
        blocks = [f for _, _, fs in os.walk(user_dir) for f in fs if not f.startswith("index.db")]
        assert sorted(b.split("_", 1)[1] for b in blocks) == ["0_4194304", "1_4194304", "2_1048576"], blocks
        env.stagefs("mount", "-d", url, m, "--cache-dir", cache, "--io-retries", "2", "--io-timeout", "2")
        moto.stop()
        moto = None
        assert run_as(USER, lambda: open(os.path.join(m, "a"), "rb").read()) == data
        start = time.time()
        with pytest.raises(OSError) as e:
            run_as(USER, lambda: open(os.path.join(m, "b"), "rb").read())
        assert e.value.errno == 5  # EIO, not a hang
        assert time.time() - start < 30
        env.stagefs("umount", m)
    finally:
        if moto:
            moto.stop()


def test_read_only_mount_refuses_writes(env, redis):
    url = redis.url(5)
    env.stagefs("format", url, "readonly", "--bucket", env.dir_for(USER, "b"))
    m = env.dir_for(USER, "m")
    env.stagefs("mount", "-d", url, m)
    run_as(USER, lambda: open(os.path.join(m, "kept"), "w").write("data"))
    env.stagefs("umount", m)
    env.stagefs("mount", "-d", url, m, "-o", "ro")
    try:
        assert run_as(USER, lambda: open(os.path.join(m, "kept")).read()) == "data"
        for attempt in (lambda: open(os.path.join(m, "new"), "w"), lambda: os.mkdir(os.path.join(m, "d")),
                        lambda: os.unlink(os.path.join(m, "kept")), lambda: open(os.path.join(m, "kept"), "a")):
            with pytest.raises(OSError) as e:
                run_as(USER, attempt)
            assert e.value.errno == 30  # EROFS
    finally:
        env.stagefs("umount", m)


def test_a_mistyped_command_gets_a_suggestion(env):
    for args, typed, meant in [(["moutn", "redis://h/1", "/mnt"], "moutn", "mount"), (["stauts"], "stauts", "status' or 'stats"),
                               (["job", "prolgo", "--job", "1"], "job prolgo", "job prolog"), (["bind"], "bind", "bind-config")]:
        p = env.stagefs(*args, check=False)
        one_line_error(p, f"unknown command '{typed}': did you mean '{meant}'?")
        assert p.returncode == 2
    p = env.stagefs("frobnicate", check=False)
    one_line_error(p, "unknown command 'frobnicate'", "format, mount, umount")


HELP_COMMANDS = ([], ["format"], ["mount"], ["umount"], ["status"], ["info"], ["stage"], ["bind-config"], ["job"], ["job", "prolog"],
                 ["job", "epilog"])


@pytest.mark.parametrize("width", [60, 80, 120])
def test_help_fits_the_terminal_without_ragged_lines(env, width):
    for cmd in HELP_COMMANDS:
        p = subprocess.run([env.bin, *cmd, "--help"], capture_output=True, text=True, env={**os.environ, "COLUMNS": str(width)})
        assert p.returncode == 0, (cmd, p.stderr)
        lines = p.stdout.splitlines()
        assert "USAGE: stagefs" in p.stdout
        for line in lines:
            assert len(line) <= width, (cmd, width, line)
        # A paragraph line ends where the next word would not have fit: no line broken by hand.
        for a, b in zip(lines, lines[1:]):
            if a and b and not a[0].isspace() and not b[0].isspace() and not a.endswith(":"):
                assert len(a) + 1 + len(b.split()[0]) >= width, (cmd, width, a, b)


def test_status_shows_only_what_exists(env):
    base = env.dir_for(USER, "plainvol")
    url = f"sqlite3://{base}/meta.db"
    env.stagefs("format", url, "plainvol", "--bucket", f"{base}/data", "--trash-days", "3")
    out = env.stagefs("status", url).stdout
    assert "Volume:      plainvol" in out and "Block size:" in out
    assert "Access key" not in out
    assert "Trash:       deleted files kept 3 days; holds 0 files, 0 B" in out, out
    assert "--trash-days" in env.stagefs("format", "--help").stdout
    # Formatting again without it keeps the recorded value instead of refusing a difference.
    env.stagefs("format", url, "plainvol", "--bucket", f"{base}/data")
    assert "kept 3 days" in env.stagefs("status", url).stdout
    env.stagefs("format", url, "plainvol", "--bucket", f"{base}/data", "--trash-days", "0", "--force")
    assert "Trash:       off" in env.stagefs("status", url).stdout


def test_every_command_explains_itself(env):
    for cmd in ([], ["format"], ["mount"], ["umount"], ["status"], ["info"]):
        p = env.stagefs(*cmd, "--help")
        assert p.returncode == 0 and "USAGE" in p.stdout.upper(), (cmd, p.stdout)
    assert env.stagefs("--version").stdout.strip()
    p = env.stagefs("mount", "--no-such-flag", check=False)
    assert p.returncode == 2 and p.stderr.startswith("stagefs: ")


def test_a_client_cleaned_up_as_stale_registers_again_and_keeps_its_open_files(env, redis):
    db = 3
    url = redis.url(db)
    env.stagefs("format", url, "stale", "--bucket", env.dir_for(USER, "b"))
    a, b = env.dir_for(USER, "a"), env.dir_for(USER, "b")
    env.stagefs("mount", "-d", url, a, "--heartbeat", "1", "--cache-size", "0")
    env.stagefs("mount", "-d", url, b, "--heartbeat", "1", "--cache-size", "0")
    try:
        payload = os.urandom(3 << 20)
        run_as(USER, lambda: open(os.path.join(b, "kept"), "wb").write(payload))
        flag = os.path.join(env.dir_for(USER, "flags"), "go")
        code = (f"import os,time\nf=open({os.path.join(a, 'kept')!r},'rb')\nopen({flag!r}+'.ready','w').close()\n"
                f"while not os.path.exists({flag!r}): time.sleep(0.05)\nimport hashlib,sys\n"
                f"d=f.read()\nprint(len(d), hashlib.sha256(d).hexdigest())\n")
        holder = subprocess.Popen(["runuser", "-u", USER, "--", "python3", "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 20
        while not os.path.exists(flag + ".ready") and time.time() < deadline:
            time.sleep(0.05)

        def sessions():
            out = env.stagefs("status", url).stdout
            return {line.split()[0].rstrip(":"): line for line in out.splitlines() if line.startswith("  ") and ":" in line}

        sid_a = next(s for s, line in sessions().items() if f" {a} " in line)
        # A is suspended and looks silent for a long time: B cleans its session up (its opens
        # go); resumed, A notices and registers again with its open files.
        pid_a = helpers.mount_pid(a)
        os.kill(pid_a, signal.SIGSTOP)
        try:
            subprocess.run(["redis-cli", "-p", str(redis.port), "-n", str(db), "ZADD", "{%d}sessions" % db, "1", sid_a], check=True, capture_output=True)
            deadline = time.time() + 30
            while sid_a in sessions() and time.time() < deadline:
                time.sleep(0.2)
            assert sid_a not in sessions(), "B cleaned up A's session"
        finally:
            os.kill(pid_a, signal.SIGCONT)
        deadline = time.time() + 30
        new_a = None
        while time.time() < deadline:
            found = [s for s, line in sessions().items() if f" {a} " in line]
            if found and found[0] != sid_a:
                new_a = found[0]
                break
            time.sleep(0.3)
        assert new_a, "A registered again under a new session"
        ino = run_as(USER, os.stat, os.path.join(b, "kept")).st_ino
        run_as(USER, os.unlink, os.path.join(b, "kept"))
        # The unlink decides at once whether the inode is freed: A's open (recorded again) keeps
        # it, so it is not queued for deletion and its record stays.
        def redis_cli(*args):
            return subprocess.run(["redis-cli", "-p", str(redis.port), "-n", str(db), *args], capture_output=True, text=True).stdout.strip()
        assert redis_cli("ZCARD", "{%d}delfiles" % db) == "0", "nothing queued for deletion while A holds the file"
        assert redis_cli("EXISTS", f"{{{db}}}i{ino}") == "1", "the inode is kept"
        open(flag, "w").close()
        out, err = holder.communicate(60)
        import hashlib
        assert out.split() == [str(len(payload)), hashlib.sha256(payload).hexdigest()], (out, err)
    finally:
        if "holder" in locals() and holder.poll() is None:
            holder.kill()
            holder.wait()
        env.stagefs("umount", a)
        env.stagefs("umount", b)


def test_what_a_new_user_stumbled_on(env, redis, mnt, tmp_path):
    """Each of these was met by a new user on an earlier main: now one clear line each."""
    base = env.dir_for(USER, "newuser")
    url = f"sqlite3://{base}/meta.db"
    env.stagefs("format", url, "newuser", "--bucket", f"{base}/data")
    # An unknown -o option is named whole, not in libfuse's pieces.
    p = env.stagefs("mount", "-d", url, mnt, "-o", "bogusopt", check=False)
    err = one_line_error(p, "unknown mount option 'bogusopt'", "stagefs mount --help")
    assert "`" not in err and not helpers.is_mounted(mnt)
    # Swapped arguments.
    p = env.stagefs("mount", mnt, url, check=False)
    one_line_error(p, "the META-URL comes first, then the mountpoint", f"stagefs mount {url} {mnt}")
    assert p.returncode == 2
    # A relative --bucket is refused, with the absolute one it would have been.
    p = env.stagefs("format", f"sqlite3://{base}/other.db", "other", "--bucket", "relative-bucket", check=False)
    one_line_error(p, "--bucket takes an absolute directory", "did you mean --bucket /")
    assert p.returncode == 2
    # sqlite3://relative.db means a file here, not in /.
    p = subprocess.run([env.bin, "status", "sqlite3://relative.db"], cwd=tmp_path, capture_output=True, text=True)
    one_line_error(p, f"did you mean 'sqlite3://{tmp_path}/relative.db'?")
    # `gc` is a volume's; a node's cache has its own.
    one_line_error(env.stagefs("gc", check=False), "name the volume", "stagefs cache gc")
    # One inode, not "1 inodes".
    assert "in 1 inode\n" in env.stagefs("status", url).stdout
    # A Redis that keeps nothing on disk (the tests' own) is named as such.
    p = env.stagefs("format", redis.url(redis.new_db()), "volatile", "--bucket", f"{base}/vdata")
    assert "neither appends to an AOF nor saves snapshots" in p.stderr and "appendonly yes" in p.stderr, p.stderr
    # The modulefile's cache root on a node without it: said on the terminal, the mount still made.
    p = subprocess.run(["runuser", "-u", USER, "--", "env", "STAGEFS_CACHE_ROOT=/nonexistent-site/cache", env.bin, "mount", "-d", url, mnt],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "stagefs: warning: " in p.stderr and "running without a disk cache" in p.stderr and "/nonexistent-site/cache" in p.stderr, p.stderr
    try:
        run_as(USER, lambda: [open(os.path.join(mnt, f"f{i}"), "w").write("x" * 100) for i in range(3)])
    finally:
        env.stagefs("umount", mnt)
    # stage: an unwritable --report is found before anything is fetched.
    cache = env.dir_for(USER, "nucache")
    p = env.stagefs("stage", "--meta", url, "/", "--cache-dir", cache, "--report", "/nonexistent-dir/r.json", check=False)
    one_line_error(p, "cannot write the report to /nonexistent-dir/r.json")
    assert not any(files for _, _, files in os.walk(cache)), "nothing was staged"
    # stage by a user who cannot read the bucket at all: one line, not one per file.
    st = os.stat(f"{base}/data")
    os.chown(f"{base}/data", 0, 0)
    os.chmod(f"{base}/data", 0o700)
    try:
        p = env.stagefs("stage", "--meta", url, "/", "--cache-dir", cache, check=False)
        one_line_error(p, f"{base}/data is not readable by uid", "nothing can be staged")
    finally:
        os.chown(f"{base}/data", st.st_uid, st.st_gid)
        os.chmod(f"{base}/data", st.st_mode & 0o7777)


def test_a_root_mount_is_every_users(env, mnt):
    """A mount made by root gets allow_other (each user still gets what permissions give);
    -o noallow_other keeps it root's alone."""
    base = env.dir_for("root", "rootvol")
    url = f"sqlite3://{base}/meta.db"
    env.stagefs("format", url, "rootvol", "--bucket", f"{base}/data", user="root")
    for opts, reachable in (([], True), (["-o", "noallow_other"], False)):
        env.stagefs("mount", "-d", url, mnt, *opts, user="root")
        try:
            def look():
                try:
                    return sorted(os.listdir(mnt)) is not None
                except PermissionError:
                    return False
            assert run_as(USER, look) is reachable, opts
        finally:
            env.stagefs("umount", mnt, user="root")
