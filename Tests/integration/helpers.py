"""Services and helpers for StageFS's end-to-end tests: real redis-server, moto_server (S3),
real FUSE mounts made by an unprivileged user."""
import grp
import os
import pickle
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

USER = "stagefs-t1"
OTHER = "stagefs-t2"
# A group both test users belong to (group permissions, set-group-ID directories).
SHARED_GROUP = "stagefs-tg"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def wait_until(pred, timeout, what):
    """Waits for a condition (checked every 20 ms); fails naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def processes_in(path):
    """Pids of processes whose working directory is `path`."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.readlink(f"/proc/{pid}/cwd") == path:
                    out.append(int(pid))
            except OSError:
                pass
    return out


def ensure_user(name):
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", name], check=True)
        return pwd.getpwnam(name)


def empty_files(d, n):
    """Makes directory `d` (umask 022) holding `n` empty files f0000, f0001, ... (as the
    caller: pass it to `run_as`)."""
    os.umask(0o022)
    os.mkdir(d)
    for i in range(n):
        open(os.path.join(d, f"f{i:04}"), "w").close()


def run_as(user, fn, *args, **kwargs):
    """Runs fn(*args) in a forked child with the uid, gid and groups of `user`; returns its
    result or raises its exception."""
    pw = pwd.getpwnam(user)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        res = None
        try:
            os.close(r)
            os.setgroups(os.getgrouplist(user, pw.pw_gid))
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            os.environ["HOME"] = pw.pw_dir
            res = ("ok", fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
            res = ("err", e)
        try:
            data = pickle.dumps(res)
        except Exception:  # noqa: BLE001
            data = pickle.dumps(("err", RuntimeError(repr(res))))
        view = memoryview(data)
        while view:
            n = os.write(w, view)
            view = view[n:]
        os._exit(0)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 1 << 16)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    os.waitpid(pid, 0)
    status, value = pickle.loads(b"".join(chunks))
    if status == "err":
        raise value
    return value


class Redis:
    def __init__(self, workdir, *extra):
        """extra: more redis-server options (`--maxmemory`, ...)."""
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--databases", "1000", "--dir", workdir,
             *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_port(self.port):
            self.stop()
            raise RuntimeError("redis-server did not start")

        self.next_db = 99

    def url(self, db=0):
        return f"redis://127.0.0.1:{self.port}/{db}"

    def new_db(self):
        """A database number no other test uses (tests that name one use numbers below 64)."""
        self.next_db += 1
        return self.next_db

    def stop(self):
        self.proc.kill()
        self.proc.wait()


class S3Server:
    """An S3 endpoint on loopback at `self.port`."""

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.port}"

    def bucket(self, name):
        return f"{self.endpoint}/{name}"

    def client(self):
        """A boto3 S3 client of this endpoint with its keys."""
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key)


def bucket_keys(local, bucket, s3server, prefix=""):
    """The keys of a bucket under `prefix`, as it lists them: a `file` bucket's directory
    (`local`) or an S3 bucket URL of `s3server`."""
    if local:
        return {k for k in (os.path.relpath(os.path.join(d, f), bucket) for d, _, fs in os.walk(bucket) for f in fs) if k.startswith(prefix)}
    name = bucket.rstrip("/").rsplit("/", 1)[1]
    pages = s3server.client().get_paginator("list_objects_v2").paginate(Bucket=name, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def volume_keys(v, s3server, prefix=""):
    """The keys of a `Volume`'s bucket under `prefix`."""
    return bucket_keys(v.kind == "sqlite-local", v.fmt_args[v.fmt_args.index("--bucket") + 1], s3server, prefix)


class Moto(S3Server):
    """moto_server on loopback. With auth, signatures are checked and keys of an IAM user
    with an s3:* policy are created."""

    def __init__(self, auth=False):
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        if auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "4"
        self.proc = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(self.port)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_port(self.port):
            self.stop()
            raise RuntimeError("moto_server did not start")
        self.access_key, self.secret_key = "testing", "testing"
        if auth:
            import json
            import boto3
            iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1",
                               aws_access_key_id="x", aws_secret_access_key="x")
            iam.create_user(UserName="stagefs")
            iam.put_user_policy(UserName="stagefs", PolicyName="s3", PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
            key = iam.create_access_key(UserName="stagefs")["AccessKey"]
            self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]

    def stop(self):
        self.proc.kill()
        self.proc.wait()


class Radosgw(S3Server):
    """Ceph's S3 gateway (radosgw, Debian's packages) on loopback: a one-node cluster made for the
    test (a monitor, one OSD keeping its objects in memory, no cephx between them), a user with
    these keys. Unlike moto it checks what a request is signed with, pre-signed URLs included: a
    signature that does not match and a URL past its X-Amz-Expires are refused (403)."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="stagefs-rgw-")
        self.port, mon_port = free_port(), free_port()
        self.access_key, self.secret_key = "RGW" + os.urandom(8).hex().upper(), os.urandom(20).hex()
        self.procs = []
        d = self.dir
        for sub in ("mon", "osd", "rgw"):
            os.mkdir(os.path.join(d, sub))
        fsid = str(uuid.uuid4())
        self.conf = os.path.join(d, "ceph.conf")
        with open(self.conf, "w") as f:
            f.write(f"""[global]
fsid = {fsid}
mon_host = v2:127.0.0.1:{mon_port}
public_addr = 127.0.0.1
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
ms_mon_client_mode = crc
ms_client_mode = crc
keyring = /dev/null
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
osd_objectstore = memstore
memstore_device_bytes = 1073741824
run_dir = {d}
admin_socket = {d}/$name.asok
log_file = {d}/$name.log
mon_data = {d}/mon
osd_data = {d}/osd
rgw_data = {d}/rgw
rgw_frontends = beast endpoint=127.0.0.1:{self.port}
""")
        try:
            subprocess.run(["monmaptool", "--create", "--add", "a", f"v2:127.0.0.1:{mon_port}", "--fsid", fsid, f"{d}/monmap"],
                           check=True, capture_output=True)
            self._run("ceph-mon", "--mkfs", "-i", "a", "--monmap", f"{d}/monmap")
            self._daemon("ceph-mon", "-i", "a")
            osd_uuid = str(uuid.uuid4())
            self._run("ceph", "--connect-timeout", "30", "osd", "create", osd_uuid)
            self._run("ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", osd_uuid)
            self._daemon("ceph-osd", "-i", "0")
            self._daemon("radosgw", "-n", "client.rgw")
            if not wait_port(self.port, 60):
                raise RuntimeError("radosgw did not start:\n" + self.logs())
            self._run("radosgw-admin", "-n", "client.rgw", "user", "create", "--uid", "stagefs", "--display-name", "stagefs",
                      "--access-key", self.access_key, "--secret-key", self.secret_key)
        except BaseException:
            self.stop()
            raise

    def _run(self, *cmd):
        p = subprocess.run([cmd[0], "-c", self.conf, *cmd[1:]], capture_output=True, text=True, timeout=60)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}\n{self.logs()}")

    def logs(self):
        """The last lines of each daemon's log (they go when stop() removes the directory)."""
        out = []
        for name in sorted(os.listdir(self.dir)):
            if name.endswith(".log"):
                with open(os.path.join(self.dir, name), errors="replace") as f:
                    out.append(f"--- {name}\n" + "".join(f.readlines()[-15:]))
        return "\n".join(out)

    def _daemon(self, *cmd):
        # -f: in the foreground, so that stop() ends exactly the processes started here.
        self.procs.append(subprocess.Popen([cmd[0], "-f", "-c", self.conf, *cmd[1:]],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def requests(self):
        """The requests radosgw answered so far, as its log has them: `"GET /bucket/key?query
        HTTP/1.1" 200 ...`."""
        with open(os.path.join(self.dir, "client.rgw.log"), errors="replace") as f:
            return [line.split(" beast: ", 1)[1] for line in f if " beast: " in line]

    def stop(self):
        for p in reversed(self.procs):
            p.kill()
            p.wait()
        self.procs = []
        shutil.rmtree(self.dir, ignore_errors=True)


class Env:
    """A scratch area readable by the test users, holding a copy of the stagefs binary."""

    def __init__(self, binary):
        self.root = tempfile.mkdtemp(prefix="stagefs-it-")
        os.chmod(self.root, 0o755)
        self.bin = os.path.join(self.root, "stagefs")
        shutil.copy(binary, self.bin)
        os.chmod(self.bin, 0o755)
        self.counter = 0

    def dir_for(self, user, name):
        self.counter += 1
        path = os.path.join(self.root, f"{name}-{self.counter}")
        os.makedirs(path)
        pw = pwd.getpwnam(user)
        os.chown(path, pw.pw_uid, pw.pw_gid)
        return path

    def stagefs(self, *args, user=USER, check=True, timeout=120):
        """Runs the CLI as `user`; returns CompletedProcess (text)."""
        if args and args[0] == "mount" and "--cache-dir" not in args and "--cache-size" not in args:
            # Keep each run's cache inside its scratch area.
            cache = os.path.join(self.root, "cache")
            os.makedirs(cache, mode=0o1777, exist_ok=True)
            os.chmod(cache, 0o1777)
            args = (*args, "--cache-dir", cache)
        cmd = ["runuser", "-u", user, "--", self.bin, *args] if user != "root" else [self.bin, *args]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError(f"stagefs {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
        return p

    def cleanup(self):
        # A test that failed half-way may leave a mount behind: detach every mount under the
        # scratch area and end its process before removing it.
        with open("/proc/self/mountinfo") as f:
            left = [mountinfo_unescape(line.split()[4]) for line in f]
        for path in sorted((p for p in left if p.startswith(self.root + "/")), key=len, reverse=True):
            subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True)
        subprocess.run(["pkill", "-f", f"{self.bin} mount"], capture_output=True)
        # (STAGEFS_TEST_KEEP=1 keeps the logs, volumes and buckets of a run to look at.)
        if os.environ.get("STAGEFS_TEST_KEEP"):
            print(f"kept {self.root}", file=sys.stderr)
            return
        shutil.rmtree(self.root, ignore_errors=True)


def mountinfo_unescape(field):
    """mountinfo escapes space, tab, newline and backslash as octal."""
    return field.encode().decode("unicode_escape") if "\\" in field else field


def is_mounted(path):
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if parts[4] == path:
                return True
    return False


def mount_pid(path):
    """The pid of the stagefs process serving `path`, from its runtime record."""
    out = subprocess.run(["pgrep", "-f", f"stagefs mount .*{path}( |$)"], capture_output=True, text=True).stdout.split()
    return int(out[0]) if out else None


def vm_hwm_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def group_of(user):
    return grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name


def kill_quietly(pid, sig=signal.SIGKILL):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def host_setup():
    """What a normal host has: /dev/fuse usable by all, user_allow_other, and the test users
    (both also in a shared group)."""
    os.chmod("/dev/fuse", 0o666)
    conf = "/etc/fuse.conf"
    text = open(conf).read() if os.path.exists(conf) else ""
    if not any(line.strip() == "user_allow_other" for line in text.splitlines()):
        with open(conf, "a") as f:
            f.write("\nuser_allow_other\n")
    ensure_user(USER)
    ensure_user(OTHER)
    try:
        members = grp.getgrnam(SHARED_GROUP).gr_mem
    except KeyError:
        subprocess.run(["groupadd", SHARED_GROUP], check=True)
        members = []
    for u in (USER, OTHER):
        if u not in members:
            subprocess.run(["usermod", "-a", "-G", SHARED_GROUP, u], check=True)


def standalone(binary, who):
    """For a test script run by hand (posixdiff.py, datafuzz.py): checks it runs as root, sets
    the host up and returns an Env over `binary` (the caller cleans it up)."""
    if os.geteuid() != 0:
        sys.exit(f"{who}: run as root (it mounts as the test users and switches between them)")
    host_setup()
    return Env(os.path.abspath(binary))


def stop_all(env, *servers):
    """Stops what a test script started (None for what it did not) and cleans `env` up."""
    for s in servers:
        if s:
            s.stop()
    env.cleanup()


class Volume:
    """A formatted and mounted volume, mounted by the unprivileged test user."""

    def __init__(self, env, kind, meta_url, fmt_args, name):
        self.env, self.kind, self.meta_url, self.name = env, kind, meta_url, name
        self.base = env.dir_for(USER, kind)
        self.fmt_args = fmt_args
        self.block_size = 4 << 20
        env.stagefs("format", meta_url, name, *fmt_args)
        self.mnt = self.mount()

    def mount(self, *extra):
        mnt = self.env.dir_for(USER, f"mnt-{self.kind}")
        self.env.stagefs("mount", "-d", self.meta_url, mnt, "-o", "allow_other", "--log", os.path.join(self.base, "mount.log"), *extra)
        assert is_mounted(mnt)
        return mnt

    def umount(self, mnt):
        if is_mounted(mnt):
            self.env.stagefs("umount", mnt)

    def path(self, *parts):
        return os.path.join(self.mnt, *parts)


def make_volume(env, kind, redis, moto, name, trash_days=None, more=()):
    """kind: sqlite-local or redis-s3; `trash_days`: format --trash-days (default: the format's);
    `more`: other format options."""
    more = list(more) + ([] if trash_days is None else ["--trash-days", str(trash_days)])
    if kind == "sqlite-local":
        base = env.dir_for(USER, "vol")
        return Volume(env, kind, f"sqlite3://{base}/meta.db", ["--bucket", f"{base}/data", *more], name)
    url = redis.url(redis.new_db())
    return Volume(env, kind, url, ["--storage", "s3", "--bucket", moto.bucket(f"{name}-bucket"),
                                            "--access-key", moto.access_key, "--secret-key", moto.secret_key, *more], name)


class RoundTrips:
    """Counts the commands clients send to Redis (MONITOR lines; commands run inside the
    scripts are not round trips and are left out)."""

    def __init__(self, port):
        self.port = port
        self.proc = subprocess.Popen(["redis-cli", "-p", str(port), "monitor"], stdout=subprocess.PIPE, text=True)
        # MONITOR answers OK once it is attached: only then is every command seen.
        assert self.proc.stdout.readline().strip() == "OK", "MONITOR attached"

    def stop(self):
        # A marker command: once MONITOR shows it, it has shown everything sent before.
        marker = f"stagefs-marker-{os.getpid()}"
        subprocess.run(["redis-cli", "-p", str(self.port), "ECHO", marker], check=True, capture_output=True)
        lines = []
        for line in self.proc.stdout:
            if marker in line:
                break
            lines.append(line)
        self.proc.terminate()
        self.proc.communicate()
        return [l for l in lines if '"' in l and "lua]" not in l]


def passed_on():
    """What a test module sets in the environment for the servers it starts too."""
    return {k: os.environ[k] for k in ("STAGEFS_QUOTA_INTERVAL",) if k in os.environ}


class Gateway:
    """A `stagefs gateway` for one volume; the settings file (0600, root's) holds its secrets."""

    def __init__(self, env, meta_url, socket_path, *extra):
        self.env, self.socket = env, socket_path
        self.dir = env.dir_for("root", "gw")
        os.chmod(self.dir, 0o700)
        self.config = os.path.join(self.dir, "gw.conf")
        fd = os.open(self.config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, f"# the volume's secrets\nMETA_URL={meta_url}\n".encode())
        os.close(fd)
        self.extra = extra
        self.log = os.path.join(self.dir, "gateway.log")
        self.proc = None
        # A command the next start() runs the gateway under (`faketime -f -600`: signing in the
        # past) and more environment for it.
        self.wrapper, self.environment = [], {}
        self.start()

    def start(self):
        logf = open(self.log, "a")
        self.proc = subprocess.Popen([*self.wrapper, self.env.bin, "gateway", "--config", self.config, "--socket", self.socket,
                                      *self.extra], stdout=logf, stderr=logf, env={"PATH": os.environ["PATH"], **passed_on(), **self.environment})
        logf.close()

        def up():
            assert self.proc.poll() is None, open(self.log).read()
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(self.socket)
                s.close()
                return True
            except OSError:
                return False
        wait_until(up, 30, "the gateway to serve its socket")

    def stop(self, sig=signal.SIGKILL):
        if self.proc and self.proc.poll() is None:
            if self.wrapper:
                # The gateway is the wrapper's child; the wrapper ends (and cleans up) after it.
                with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                    for pid in f.read().split():
                        os.kill(int(pid), sig)
            else:
                self.proc.send_signal(sig)
            self.proc.wait()

    def restart(self):
        self.stop()
        self.start()

    @property
    def url(self):
        return f"stagefs+unix://{self.socket}"

    def rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0
