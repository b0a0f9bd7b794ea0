"""Mount records as a second, hostile user would attack them (issue 18, finding 1).

A mount records itself (mountpoint, META-URL, pid, cache settings) so that umount, info, stage
and bind-config can find it. Records once went to /tmp/stagefs-<uid> when XDG_RUNTIME_DIR was
unusable (root under cron or sudo, every job mount, since the hooks run `env -i`): a name any user
could make first. Each test here plants what an attacker could, and fails on that code:
  - a 0777 /tmp/stagefs-<victim uid> holding a link named after the victim's next record;
  - a directory of the attacker's bind-mounted where root keeps its records (unshare -m);
  - a record whose pid names another root process (umount --force must not signal it);
  - a FIFO in place of a record (umount must not hang);
  - and a record must never hold the metadata password.
"""
import json
import os
import pwd
import signal
import socket
import subprocess

import pytest

import helpers
from helpers import OTHER, USER, is_mounted, run_as, wait_until


def record_name(mnt):
    """The CLI's name for the record of `mnt`: its readable part and FNV-1a 64 of the path."""
    h = 0xcbf29ce484222325
    for b in mnt.encode():
        h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    readable = "".join(chr(b) if chr(b).isascii() and (chr(b).isalnum() or chr(b) in "-.") else "_" for b in mnt.encode())
    return f"{readable[-180:]}-{h:016x}.json"


def old_record_name(mnt):
    """Where the code before issue 18 put it (/tmp/stagefs-<uid>/NAME): the attacks plant there."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "-.") else "_" for c in mnt) + ".json"


def record_dirs(user):
    """Where a record of `user` may be, without XDG_RUNTIME_DIR (the order the CLI tries)."""
    pw = pwd.getpwnam(user)
    if pw.pw_uid == 0:
        return ["/run/stagefs"]
    host = "".join(c if c.isascii() and (c.isalnum() or c in "-.") else "_" for c in socket.gethostname()[:64])
    return [f"/run/user/{pw.pw_uid}/stagefs", os.path.join(pw.pw_dir, ".stagefs", "run", host or "node")]


def find_record(user, mnt):
    for d in record_dirs(user):
        p = os.path.join(d, record_name(mnt))
        if os.path.lexists(p):
            return p
    return None


def cli(env, user, *args, timeout=60, extra_env=()):
    """The CLI as `user` with the environment a Slurm hook gives it (`env -i`: no XDG_RUNTIME_DIR)."""
    base = ["env", "-i", "PATH=/usr/bin:/bin", *extra_env, env.bin, *args]
    cmd = base if user == "root" else ["runuser", "-u", user, "--", *base]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def sqlite_volume(env, user, name):
    base = env.dir_for(user, "rvol")
    url = f"sqlite3://{base}/meta.db"
    p = cli(env, user, "format", url, name, "--bucket", f"{base}/data")
    assert p.returncode == 0, p.stderr
    return url, base


def mount(env, user, url, base, mnt, *extra):
    p = cli(env, user, "mount", "-d", url, mnt, "--cache-dir", f"{base}/cache", "--log", f"{base}/mount.log", *extra)
    assert p.returncode == 0, p.stderr
    assert is_mounted(mnt)


def umount(env, user, mnt, *extra):
    if is_mounted(mnt):
        return cli(env, user, "umount", mnt, *extra)
    return None


def plant_in_tmp(env, victim, mnt, text):
    """A file of the victim's holding `text`; the attacker's 0777 /tmp/stagefs-<victim uid> with
    a link to it named after the victim's record for `mnt`. Returns (file, directory)."""
    precious = os.path.join(env.dir_for(USER, "home"), "precious")
    run_as(USER, lambda: open(precious, "w").write(text))
    squat = f"/tmp/stagefs-{victim.pw_uid}"
    subprocess.run(["rm", "-rf", squat], check=True)

    def plant():
        os.mkdir(squat)
        os.chmod(squat, 0o777)
        os.symlink(precious, os.path.join(squat, old_record_name(mnt)))

    run_as(OTHER, plant)
    return precious, squat


def test_a_planted_link_in_a_premade_tmp_directory_is_never_written_through(env):
    """The attacker makes /tmp/stagefs-<victim uid> (0777) first and plants links named after the
    victim's next mount; the victim mounts (as a job's mount runs: env -i) and stages through the
    mount. The file the link names is untouched, nothing is written into the attacker's directory,
    and the victim's umount, info and stage find the real record."""
    victim = pwd.getpwnam(USER)
    url, base = sqlite_volume(env, USER, "planted")
    mnt = env.dir_for(USER, "m")
    precious, squat = plant_in_tmp(env, victim, mnt, "# the victim's own\n")
    try:
        mount(env, USER, url, base, mnt)
        assert open(precious).read() == "# the victim's own\n", "the planted link was written through"
        assert os.listdir(squat) == [old_record_name(mnt)], os.listdir(squat)
        rec = find_record(USER, mnt)
        assert rec and os.stat(os.path.dirname(rec)).st_uid == victim.pw_uid, rec
        assert os.stat(os.path.dirname(rec)).st_mode & 0o777 == 0o700
        assert json.load(open(rec))["mountPoint"] == mnt
        run_as(USER, lambda: open(os.path.join(mnt, "f"), "w").write("data\n"))
        p = cli(env, USER, "info", mnt)
        assert p.returncode == 0 and "directory" in p.stdout, p.stderr
        p = cli(env, USER, "stage", os.path.join(mnt, "f"))
        assert p.returncode == 0, p.stderr
        pid = json.load(open(rec))["pid"]
        p = umount(env, USER, mnt)
        assert p.returncode == 0, p.stderr
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/cmdline").read() == "", "umount waited for the mount process"
        assert not os.path.lexists(rec), "the record is removed at umount"
        assert open(precious).read() == "# the victim's own\n"
    finally:
        umount(env, USER, mnt, "--force")
        subprocess.run(["rm", "-rf", squat])


def test_the_job_prolog_mount_writes_no_record_through_a_planted_link(env):
    """The same attack through `stagefs job prolog`, as the Slurm hooks run it (as the user,
    under env -i): the job's mount records itself only in the user's own directory."""
    victim = pwd.getpwnam(USER)
    url, base = sqlite_volume(env, USER, "jobplant")
    cache = env.dir_for("root", "jobcache")
    os.chmod(cache, 0o1777)
    os.mkdir(os.path.join(cache, str(victim.pw_uid)), 0o700)  # what the hook prepares as root
    os.chown(os.path.join(cache, str(victim.pw_uid)), victim.pw_uid, victim.pw_gid)
    mnt = env.dir_for(USER, "jobm")
    precious, squat = plant_in_tmp(env, victim, mnt, "keep\n")
    try:
        p = cli(env, USER, "job", "prolog", "--job", "4242", "--cache-dir", cache, "--volume", url, "--mount-dir", mnt)
        assert p.returncode == 0, p.stderr
        assert is_mounted(mnt)
        assert open(precious).read() == "keep\n", "the planted link was written through by the job's mount"
        assert find_record(USER, mnt), "the job's mount is recorded in the user's own directory"
        p = cli(env, USER, "job", "epilog", "--job", "4242", "--cache-dir", cache, "--mount-dir", mnt, "--keep-logs", "0")
        assert p.returncode == 0, p.stderr
        wait_until(lambda: not is_mounted(mnt), 10, "the job's mount to go")
    finally:
        umount(env, USER, mnt, "--force")
        subprocess.run(["rm", "-rf", squat])


def test_root_keeps_no_record_in_a_directory_another_user_owns(env):
    """In a private mount namespace, directories of the attacker are bind-mounted where root's
    records go (/tmp/stagefs-0 once, /run/stagefs now), each with a link named after root's next
    record pointing at a root 0600 file. Root's mount must not write through either, and its
    umount still works (the mount process is found through /proc, not the record)."""
    url, base = sqlite_volume(env, "root", "rootbind")
    mnt = env.dir_for("root", "rm")
    secret = os.path.join(env.dir_for("root", "secret"), "shadow")
    with open(secret, "w") as f:
        f.write("root:only\n")
    os.chmod(secret, 0o600)
    evil = env.dir_for(OTHER, "evil")
    for name in (record_name(mnt), old_record_name(mnt)):
        run_as(OTHER, os.symlink, secret, os.path.join(evil, name))
    os.makedirs("/run/stagefs", mode=0o700, exist_ok=True)
    os.makedirs("/tmp/stagefs-0", mode=0o700, exist_ok=True)
    script = f"""set -e
mount --bind {evil} /tmp/stagefs-0
mount --bind {evil} /run/stagefs
env -i PATH=/usr/bin:/bin {env.bin} mount -d {url} {mnt} --cache-dir {base}/cache --log {base}/mount.log
grep -q " {mnt} " /proc/self/mountinfo
env -i PATH=/usr/bin:/bin {env.bin} umount {mnt}
! grep -q " {mnt} " /proc/self/mountinfo
"""
    p = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    try:
        assert open(secret).read() == "root:only\n", "root's mount wrote its record through the attacker's link"
        assert p.returncode == 0, p.stderr
        assert sorted(os.listdir(evil)) == sorted([record_name(mnt), old_record_name(mnt)])
    finally:
        subprocess.run(["pkill", "-f", f"{env.bin} mount -d {url}"], capture_output=True)


def test_a_forged_pid_is_never_signalled(env):
    """A record naming another root process as the mount's pid (written where the attack could
    once put it, and, as defense in depth, in root's own record directory): root's
    `umount --force` stops its mount process and leaves the other process alone."""
    url, base = sqlite_volume(env, "root", "forged")
    mnt = env.dir_for("root", "fm")
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        mount(env, "root", url, base, mnt)
        mount_pid = helpers.mount_pid(mnt)
        assert mount_pid
        forged = {"mountPoint": mnt, "metaURL": url, "pid": bystander.pid, "volume": "forged"}
        for d, name in (("/tmp/stagefs-0", old_record_name(mnt)), ("/run/stagefs", record_name(mnt))):
            os.makedirs(d, mode=0o700, exist_ok=True)
            with open(os.path.join(d, name), "w") as f:
                json.dump(forged, f)
        p = umount(env, "root", mnt, "--force")
        assert p.returncode == 0, p.stderr
        assert bystander.poll() is None, "umount --force signalled the process the forged record named"
        wait_until(lambda: not os.path.exists(f"/proc/{mount_pid}") or open(f"/proc/{mount_pid}/cmdline").read() == "", 30,
                   "the real mount process to exit")
        assert os.stat("/run/stagefs").st_uid == 0 and os.stat("/run/stagefs").st_mode & 0o777 == 0o700
    finally:
        bystander.kill()
        bystander.wait()
        umount(env, "root", mnt, "--force")
        for d, name in (("/tmp/stagefs-0", old_record_name(mnt)), ("/run/stagefs", record_name(mnt))):
            try:
                os.unlink(os.path.join(d, name))
            except FileNotFoundError:
                pass


def test_a_fifo_in_place_of_a_record_hangs_nothing(env):
    """A FIFO where the record is looked for (in the victim's directory, and where another user
    could once plant it): mount, info and umount neither hang nor fail."""
    victim = pwd.getpwnam(USER)
    url, base = sqlite_volume(env, USER, "fifo")
    mnt = env.dir_for(USER, "fifo-m")
    squat = f"/tmp/stagefs-{victim.pw_uid}"
    subprocess.run(["rm", "-rf", squat], check=True)
    run_as(OTHER, lambda: (os.mkdir(squat), os.chmod(squat, 0o777), os.mkfifo(os.path.join(squat, old_record_name(mnt)), 0o666)))
    try:
        try:
            mount(env, USER, url, base, mnt)
        except subprocess.TimeoutExpired:
            pytest.fail("mount hung on a FIFO planted in place of its record")
        rec = find_record(USER, mnt)
        run_as(USER, os.unlink, rec)
        run_as(USER, os.mkfifo, rec, 0o600)
        try:
            p = cli(env, USER, "info", mnt, timeout=20)
            assert p.returncode == 1 and "no record of the mount" in p.stderr, p.stderr
            p = cli(env, USER, "umount", mnt, timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("a FIFO in place of the mount record hung the command")
        assert p.returncode == 0 and not is_mounted(mnt), p.stderr
    finally:
        umount(env, USER, mnt, "--force")
        subprocess.run(["rm", "-rf", squat])


def test_a_record_holds_no_password_and_stage_asks_for_it(env):
    """Mounted with a password in the META-URL, the record keeps the URL without it; stage and
    info through the mount say where to give it (META_PASSWORD or META_PASSWORD_FILE) and work
    with it."""
    port = helpers.free_port()
    workdir = env.dir_for("root", "redis-pw")
    srv = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                            "--requirepass", "hunter2-record", "--dir", workdir], stdout=subprocess.DEVNULL)
    assert helpers.wait_port(port)
    base = env.dir_for(USER, "pwvol")
    mnt = env.dir_for(USER, "pwm")
    url = f"redis://:hunter2-record@127.0.0.1:{port}/1"
    try:
        p = cli(env, USER, "format", url, "pwvol", "--bucket", f"{base}/data")
        assert p.returncode == 0, p.stderr
        mount(env, USER, url, base, mnt)
        rec = find_record(USER, mnt)
        text = open(rec).read()
        assert "hunter2" not in text, text
        assert json.loads(text)["metaURL"] == f"redis://127.0.0.1:{port}/1"
        run_as(USER, lambda: open(os.path.join(mnt, "f"), "w").write("x" * 5000))
        p = cli(env, USER, "stage", os.path.join(mnt, "f"))
        assert p.returncode == 1 and "META_PASSWORD" in p.stderr and "hunter2" not in p.stderr, p.stderr
        p = cli(env, USER, "stage", os.path.join(mnt, "f"), extra_env=("META_PASSWORD=hunter2-record",))
        assert p.returncode == 0, p.stderr
        pwfile = os.path.join(base, "pw")
        run_as(USER, lambda: open(pwfile, "w").write("hunter2-record\n"))
        p = cli(env, USER, "info", os.path.join(mnt, "f"), extra_env=(f"META_PASSWORD_FILE={pwfile}",))
        assert p.returncode == 0 and "regular" in p.stdout, p.stderr + p.stdout
    finally:
        umount(env, USER, mnt, "--force")
        srv.kill()
        srv.wait()


def test_records_of_similar_paths_and_of_a_later_login_are_found(env):
    """Two mountpoints whose names differ only in '/' against '_' get a record each; a record
    written by a job's mount (no /run/user/<uid>) is still found once a login has made
    /run/user/<uid>; a mount made through a link or with a trailing slash is still waited for
    by umount of its real path."""
    pw = pwd.getpwnam(USER)
    url, base = sqlite_volume(env, USER, "similar")
    top = env.dir_for(USER, "sim")
    a, b = os.path.join(top, "c_d"), os.path.join(top, "c", "d")
    run_as(USER, lambda: (os.mkdir(a), os.makedirs(b)))
    runtime = f"/run/user/{pw.pw_uid}"
    made_runtime = False
    try:
        mount(env, USER, url, base, a)
        mount(env, USER, url, base, b)
        for m in (a, b):
            p = cli(env, USER, "info", m)
            assert p.returncode == 0, p.stderr
        # A login session makes /run/user/<uid> after the job's mounts recorded themselves.
        if not os.path.exists(runtime):
            os.makedirs(runtime, mode=0o700)
            os.chown(runtime, pw.pw_uid, pw.pw_gid)
            made_runtime = True
        run_as(USER, os.mkdir, os.path.join(runtime, "stagefs"), 0o700)
        p = cli(env, USER, "info", a)
        assert p.returncode == 0, p.stderr
        for m in (a, b):
            pid = helpers.mount_pid(m)
            p = umount(env, USER, m)
            assert p.returncode == 0 and not is_mounted(m), p.stderr
            assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/cmdline").read() == "", "umount waited for its process"
        # Mounted through a link and with a trailing slash: umount of the real path waits too.
        link = os.path.join(top, "via")
        run_as(USER, os.symlink, top, link)
        for given in (os.path.join(link, "c_d"), a + "/"):
            p = cli(env, USER, "mount", "-d", url, given, "--cache-dir", f"{base}/cache", "--log", f"{base}/mount.log")
            assert p.returncode == 0 and is_mounted(a), p.stderr
            pid = helpers.mount_pid(given)
            p = umount(env, USER, a)
            assert p.returncode == 0 and not is_mounted(a), p.stderr
            assert pid and (not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/cmdline").read() == ""), \
                f"umount of {a} waited for the process mounted as {given}"
    finally:
        for m in (a, b):
            umount(env, USER, m, "--force")
        if made_runtime:
            subprocess.run(["rm", "-rf", runtime])
        else:
            subprocess.run(["rm", "-rf", os.path.join(runtime, "stagefs")])


def processes_showing(secret):
    """Pids whose command line (what `ps` shows any user) holds `secret`."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if secret.encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                    out.append(int(pid))
            except OSError:
                pass
    return out


def test_no_password_in_any_command_line(env):
    """A Redis password reaches no process's arguments: a root mount made with a password URL
    and an S3 secret key (-d: its mount process gets them through its environment), a
    foreground mount (its own arguments hidden at once), a job's mount; META_PASSWORD and
    META_PASSWORD_FILE give the password to a URL without one."""
    password = "hunter3-argv"
    port = helpers.free_port()
    workdir = env.dir_for("root", "redis-argv")
    srv = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                            "--requirepass", password, "--dir", workdir], stdout=subprocess.DEVNULL)
    assert helpers.wait_port(port)
    url = f"redis://:{password}@127.0.0.1:{port}/1"
    plain = f"redis://127.0.0.1:{port}/1"
    base = env.dir_for(USER, "argvvol")
    p = cli(env, USER, "format", url, "argvvol", "--bucket", f"{base}/data")
    assert p.returncode == 0, p.stderr
    root_mnt, fg_mnt, job_mnt = env.dir_for("root", "argv-r"), env.dir_for("root", "argv-f"), env.dir_for(USER, "argv-j")
    fg = None
    try:
        cache = env.dir_for("root", "argv-cache")
        os.chmod(cache, 0o1777)
        uid_dir = os.path.join(cache, str(pwd.getpwnam(USER).pw_uid))
        os.mkdir(uid_dir, 0o700)
        os.chown(uid_dir, pwd.getpwnam(USER).pw_uid, pwd.getpwnam(USER).pw_gid)
        p = cli(env, USER, "job", "prolog", "--job", "4343", "--cache-dir", cache, "--volume", url, "--mount-dir", job_mnt)
        assert p.returncode == 0 and is_mounted(job_mnt), p.stderr
        assert processes_showing(password) == [], "a job's mount process shows the password"
        run_as(USER, lambda: open(os.path.join(job_mnt, "f"), "w").write("through the password-less arguments\n"))

        p = cli(env, "root", "mount", "-d", url, root_mnt, "--cache-size", "0", "--log", f"{workdir}/r.log",
                "--secret-key", "s3-secret-argv")
        assert p.returncode == 0 and is_mounted(root_mnt), p.stderr
        assert processes_showing(password) == [] and processes_showing("s3-secret-argv") == []
        ps = subprocess.run(["ps", "-ewwo", "args"], capture_output=True, text=True).stdout
        assert password not in ps and f"stagefs mount {plain} {root_mnt}" in ps, ps
        assert open(os.path.join(root_mnt, "f")).read() == "through the password-less arguments\n"

        fg = subprocess.Popen([env.bin, "mount", url, fg_mnt, "--cache-size", "0", "--log", f"{workdir}/f.log"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: is_mounted(fg_mnt), 30, "the foreground mount")
        shown = open(f"/proc/{fg.pid}/cmdline", "rb").read().decode()
        assert password not in shown and "redis://:" + "*" * len(password) + "@" in shown, shown
        assert open(os.path.join(fg_mnt, "f")).read() == "through the password-less arguments\n"

        p = cli(env, USER, "status", plain)
        assert p.returncode == 1 and "META_PASSWORD" in p.stderr and password not in p.stderr, p.stderr
        p = cli(env, USER, "status", plain, extra_env=(f"META_PASSWORD={password}",))
        assert p.returncode == 0 and "argvvol" in p.stdout and password not in p.stdout, p.stderr
        pwfile = os.path.join(base, "pw")
        run_as(USER, lambda: open(pwfile, "w").write(password + "\n"))
        p = cli(env, USER, "status", plain, extra_env=(f"META_PASSWORD_FILE={pwfile}",))
        assert p.returncode == 0 and "argvvol" in p.stdout, p.stderr
    finally:
        umount(env, USER, job_mnt, "--force")
        umount(env, "root", fg_mnt, "--force")
        umount(env, "root", root_mnt, "--force")
        if fg:
            fg.wait(timeout=60)
        srv.kill()
        srv.wait()
