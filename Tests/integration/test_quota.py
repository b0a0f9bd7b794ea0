"""Quotas through real mounts, as ordinary users: a write crossing a directory quota fails with
EDQUOT from write() itself and what was written stays intact; appends to a full quota fail; a
--uid quota holds; two mounts writing into one quota end with usage equal to du; an unlinked
open file counts until closed; `quota check --repair` fixes drift; df in a quota directory and
on a --subdir mount shows the quota."""
import errno
import os
import subprocess
import threading

import pytest

import helpers
from helpers import OTHER, USER, run_as

MiB = 1 << 20


@pytest.fixture(scope="module")
def qvol(env, redis, moto, request):
    # Mounts ask whether the volume has quotas every 0.2 s (5 s by default), so a quota set
    # by a test holds at the next write; the volume keeps no trash, so a deleted file is gone.
    os.environ["STAGEFS_QUOTA_INTERVAL"] = "0.2"
    try:
        kind = request.param if hasattr(request, "param") else "sqlite-local"
        v = helpers.make_volume(env, kind, redis, moto, f"it-quota-{kind}", trash_days=0)
    finally:
        del os.environ["STAGEFS_QUOTA_INTERVAL"]
    yield v
    v.umount(v.mnt)


def pytest_generate_tests(metafunc):
    if "qvol" in metafunc.fixturenames:
        from conftest import VOLUME_KINDS
        metafunc.parametrize("qvol", VOLUME_KINDS, indirect=True, scope="module")


def quota(v, *args, check=True):
    return v.env.stagefs("quota", args[0], v.meta_url, *args[1:], user="root", check=check)


def qdir(v, name):
    """A directory owned by the test user at the volume's root."""
    path = v.path(name)
    run_as(USER, os.mkdir, path, 0o755)
    return path


def write_until_full(path, total, chunk=MiB, mode="wb"):
    """Writes `total` bytes in `chunk`s; returns (bytes accepted, errno of the failing write
    or 0, errno of close or 0)."""
    data = os.urandom(chunk)
    done, err = 0, 0
    f = open(path, mode, buffering=0)
    try:
        while done < total:
            try:
                done += f.write(data)
            except OSError as e:
                err = e.errno
                break
    finally:
        cerr = 0
        try:
            f.close()
        except OSError as e:
            cerr = e.errno
    return done, err, cerr


def test_a_write_crossing_a_directory_quota_fails_at_write_and_keeps_what_was_written(qvol):
    d = qdir(qvol, "q10")
    out = quota(qvol, "set", "--path", "/q10", "--capacity", "10M").stdout
    assert "10.0 MiB" in out, out
    path = os.path.join(d, "big")

    def write():
        payload = []
        data = [os.urandom(MiB) for _ in range(20)]
        f = open(path, "wb", buffering=0)
        n, err = 0, 0
        for block in data:
            try:
                n += f.write(block)
                payload.append(block)
            except OSError as e:
                err = e.errno
                break
        f.close()  # must not fail: nothing accepted was refused later
        with open(path, "rb") as r:
            back = r.read()
        return n, err, back == b"".join(payload)
    n, err, same = run_as(USER, write)
    assert err == errno.EDQUOT, err
    # The directory itself takes 4 KiB of the 10 MiB: nine whole MiB fit.
    assert n == 9 * MiB and same, n
    # An append to the full quota fails at its write too.
    assert run_as(USER, write_until_full, path, MiB, 4096, "ab")[1] == errno.EDQUOT
    # df in the directory shows the quota.
    st = os.statvfs(d)
    assert st.f_blocks * st.f_frsize == 10 * MiB, (st.f_blocks, st.f_frsize)
    assert (st.f_blocks - st.f_bfree) * st.f_frsize >= 9 * MiB
    # Made room (the file cut), writing works again.
    run_as(USER, os.truncate, path, 0)
    assert run_as(USER, write_until_full, path, 2 * MiB)[1:] == (0, 0)


def test_a_uid_quota_holds_everywhere(qvol):
    import pwd
    uid = pwd.getpwnam(OTHER).pw_uid
    a, b = qdir(qvol, "ua"), qdir(qvol, "ub")
    for d in (a, b):
        os.chmod(d, 0o777)
    quota(qvol, "set", "--uid", str(uid), "--capacity", "3M")
    try:
        assert run_as(OTHER, write_until_full, os.path.join(a, "x"), 2 * MiB)[1:] == (0, 0)
        n, err, cerr = run_as(OTHER, write_until_full, os.path.join(b, "y"), 2 * MiB)
        assert err == errno.EDQUOT and cerr == 0 and n < 2 * MiB, (n, err, cerr)
        # Another user's writes do not count.
        assert run_as(USER, write_until_full, os.path.join(a, "z"), 4 * MiB)[1:] == (0, 0)
        out = quota(qvol, "get", "--uid", str(uid)).stdout
        assert f"uid {uid}" in out
    finally:
        quota(qvol, "delete", "--uid", str(uid))


def test_two_mounts_writing_into_one_quota_end_with_usage_equal_to_du(qvol):
    d = qdir(qvol, "shared")
    quota(qvol, "set", "--path", "/shared", "--capacity", "1G", "--inodes", "100000")
    second = qvol.mount()
    try:
        other_d = os.path.join(second, "shared")

        def writer(base, tag):
            # 4 KiB multiples: du's apparent size then equals what quotas count.
            for i in range(40):
                p = os.path.join(base, f"{tag}-{i}")
                with open(p, "wb") as f:
                    f.write(os.urandom(4096 * (1 + i % 7)))
                if i % 5 == 4:
                    os.unlink(p)
                if i % 9 == 0:
                    with open(p if os.path.exists(p) else os.path.join(base, f"{tag}-0"), "ab") as f:
                        f.write(os.urandom(8192))

        def both():
            errs = []

            def run(base, tag):
                try:
                    writer(base, tag)
                except Exception as e:  # noqa: BLE001 (reported below)
                    errs.append(repr(e))
            ts = [threading.Thread(target=run, args=(d, "a")), threading.Thread(target=run, args=(other_d, "b"))]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            return errs
        assert run_as(USER, both) == []
        du = subprocess.run(["du", "-sb", d], capture_output=True, text=True, check=True).stdout.split()[0]
        files = sum(len(fs) + len(ds) for _, ds, fs in os.walk(d)) + 1
        p = quota(qvol, "check", "--path", "/shared")
        assert p.returncode == 0 and "ok" in p.stdout, p.stdout
        # `check` says what the records hold equals what the walk counts; du agrees with both.
        assert f"({helpers_human(int(du))}, {files} inodes)" in p.stdout, (du, files, p.stdout)
    finally:
        qvol.umount(second)


def helpers_human(n):
    """humanBytes of the CLI."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    if n < 1024:
        return f"{n} B"
    v, i = float(n), 0
    while v >= 1024 and i < len(units) - 1:
        v /= 1024
        i += 1
    return f"{v:.1f} {units[i]}"


def test_an_unlinked_open_file_counts_until_closed(qvol):
    d = qdir(qvol, "held")
    quota(qvol, "set", "--path", "/held", "--capacity", "4M")
    path = os.path.join(d, "f")

    def hold():
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(fd, os.urandom(3 * MiB))
        os.fsync(fd)
        os.unlink(path)
        # Still counted: 2 MiB more does not fit.
        try:
            with open(os.path.join(d, "g"), "wb", buffering=0) as g:
                g.write(os.urandom(2 * MiB))
            full = 0
        except OSError as e:
            full = e.errno
        os.unlink(os.path.join(d, "g"))
        os.close(fd)
        return full
    assert run_as(USER, hold) == errno.EDQUOT
    out = quota(qvol, "get", "--path", "/held").stdout
    # Closed: only the directory is left, never below that.
    assert " 4.0 KiB" in out.splitlines()[1], out
    assert run_as(USER, write_until_full, os.path.join(d, "h"), 3 * MiB)[1:] == (0, 0)


def test_check_repair_fixes_injected_drift(qvol):
    d = qdir(qvol, "drift")
    run_as(USER, lambda: open(os.path.join(d, "a"), "wb").write(os.urandom(5000)))
    quota(qvol, "set", "--path", "/drift", "--capacity", "1G")
    ino = os.stat(d).st_ino
    key = f"q_d{ino}_space"
    if qvol.meta_url.startswith("sqlite3://"):
        db = qvol.meta_url[len("sqlite3://"):]
        # The mount writes to the database too (heartbeats, counters): wait for its lock.
        subprocess.run(["sqlite3", "-cmd", ".timeout 15000", db, f"UPDATE counter SET value=value+777777 WHERE name='{key}'"], check=True)
    else:
        port, db = qvol.meta_url.rsplit(":", 1)[1].split("/")
        subprocess.run(["redis-cli", "-p", port, "-n", db, "INCRBY", f"{{{db}}}{key}", "777777"], check=True, capture_output=True)
    p = quota(qvol, "check", "--path", "/drift", check=False)
    assert p.returncode == 1 and "--repair" in p.stdout, p.stdout
    p = quota(qvol, "check", "--path", "/drift", "--repair")
    assert "repaired" in p.stdout, p.stdout
    p = quota(qvol, "check", "--path", "/drift")
    assert "ok (12.0 KiB, 2 inodes)" in p.stdout, p.stdout


def test_df_on_a_subdir_mount_shows_its_quota(qvol):
    qdir(qvol, "sub")
    quota(qvol, "set", "--path", "/sub", "--capacity", "7M", "--inodes", "1000")
    mnt = qvol.mount("--subdir", "/sub")
    try:
        st = os.statvfs(mnt)
        assert st.f_blocks * st.f_frsize == 7 * MiB and st.f_files == 1000, (st.f_blocks, st.f_frsize, st.f_files)
        df = subprocess.run(["df", "-B1", mnt], capture_output=True, text=True, check=True).stdout.splitlines()[1].split()
        assert int(df[1]) == 7 * MiB, df
        out = quota(qvol, "list").stdout
        assert "/sub (inode" in out and "7.0 MiB" in out, out
    finally:
        qvol.umount(mnt)


def test_quota_usage_errors_are_clear(qvol):
    p = quota(qvol, "set", "--path", "/nope", "--capacity", "1G", check=False)
    assert p.returncode == 1 and "/nope does not exist" in p.stderr, p.stderr
    p = quota(qvol, "set", "--path", "/sub", "--capacity", "ten", check=False)
    assert p.returncode == 2 and "--capacity" in p.stderr, p.stderr
    p = quota(qvol, "get", "--uid", "4242", check=False)
    assert p.returncode == 1 and "no quota for uid 4242" in p.stderr, p.stderr
    p = qvol.env.stagefs("quota", "get", qvol.meta_url, "--uid", "1", "--gid", "2", user="root", check=False)
    assert p.returncode == 2 and "name one quota" in p.stderr, p.stderr
