"""Slurm end to end: a local cluster (munged, slurmctld, slurmd on loopback ports, a temporary
configuration with the built SPANK plugin in its plugstack) stages jobs' datasets before they
start and gives them a mount; the shell prolog/epilog do the same for sites that prefer them."""
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time

import pytest

import helpers
from helpers import OTHER, USER, run_as

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def wait_for(pred, timeout=60, step=0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(step)
    return False


class Cluster:
    """`nodes` slurmd daemons on this host. Node 1 runs in the host's mount namespace; every other
    node runs in its own, where its own cache and mount directories are bound over the
    configured cache_root and mount_root: node-local storage, as on a real cluster."""

    def __init__(self, env, redis, nodes=1, db=50, shell_hooks=False, gateway=None):
        """gateway: the volume's own META-URL (with its password); the cluster then runs a
        gateway and every job setting names only the gateway's URL."""
        self.procs = []
        self.gateway = None
        try:
            self.setup(env, redis, nodes, db, shell_hooks, gateway)
        except BaseException:
            self.stop()  # never leave daemons behind a cluster that did not come up
            raise

    def setup(self, env, redis, nodes, db, shell_hooks, gateway):
        self.env = env
        self.nodes = nodes
        self.dir = env.dir_for("root", "slurm")
        os.chmod(self.dir, 0o755)
        d = self.dir
        for sub in ("state", "log", "out", "cache", "mnt", "jobstate"):
            os.makedirs(f"{d}/{sub}", exist_ok=True)
        for k in range(1, nodes + 1):
            os.makedirs(f"{d}/spool/n{k}", exist_ok=True)
            if k > 1:
                os.makedirs(f"{d}/n{k}-cache", exist_ok=True)
                os.makedirs(f"{d}/n{k}-mnt", exist_ok=True)
                os.chmod(f"{d}/n{k}-cache", 0o1777)
                os.chmod(f"{d}/n{k}-mnt", 0o755)
        os.chmod(f"{d}/out", 0o1777)
        os.chmod(f"{d}/cache", 0o1777)
        os.chmod(f"{d}/mnt", 0o755)
        # The volume the site stages from.
        self.meta = gateway or redis.url(db)
        if gateway:
            # The bucket is the gateway's alone.
            env.stagefs("format", self.meta, "slurmvol", "--bucket", f"{d}/data", user="root")
            os.chmod(f"{d}/data", 0o700)
        else:
            env.stagefs("format", self.meta, "slurmvol", "--bucket", f"{d}/data", "--bucket-group", helpers.SHARED_GROUP, user="root")
        rootmnt = f"{d}/rootmnt"
        os.makedirs(rootmnt)
        env.stagefs("mount", "-d", self.meta, rootmnt, "--cache-size", "0", user="root")
        os.makedirs(f"{rootmnt}/datasets/small")
        os.makedirs(f"{rootmnt}/private")
        self.sums = {}
        import hashlib
        for i in range(12):
            data = os.urandom(i * 7000 + (5 << 20 if i == 11 else 0))
            with open(f"{rootmnt}/datasets/small/f{i}", "wb") as f:
                f.write(data)
            self.sums[f"f{i}"] = hashlib.sha256(data).hexdigest()
        with open(f"{rootmnt}/private/secret", "w") as f:
            f.write("root only")
        os.chmod(f"{rootmnt}/private", 0o700)
        env.stagefs("umount", rootmnt, user="root")
        if gateway:
            self.gateway = helpers.Gateway(env, gateway, f"{d}/gw.sock")
            self.meta = self.gateway.url
        with open(f"{d}/small.sha256", "w") as f:
            for name, s in sorted(self.sums.items()):
                f.write(f"{s}  {name}\n")
        # The plugin, readable by users (sbatch loads it too).
        subprocess.run(["make", "-s", "-C", f"{REPO}/slurm/spank"], check=True)
        self.plugin = f"{d}/spank_stagefs.so"
        shutil.copy(f"{REPO}/slurm/spank/spank_stagefs.so", self.plugin)
        os.chmod(self.plugin, 0o755)
        # munged on its own socket with its own key.
        with open(f"{d}/munge.key", "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(f"{d}/munge.key", 0o400)
        self.start(["munged", "-F", "-f", f"--socket={d}/munge.sock", f"--key-file={d}/munge.key",
                    f"--pid-file={d}/munged.pid", f"--seed-file={d}/munged.seed", f"--log-file={d}/log/munged.log"])
        assert wait_for(lambda: os.path.exists(f"{d}/munge.sock"), 20), "munged started"
        ctld = helpers.free_port()
        node_lines = "".join(
            f"NodeName=n{k} NodeHostname=localhost NodeAddr=127.0.0.1 Port={helpers.free_port()} CPUs=1 RealMemory=500 State=UNKNOWN\n"
            for k in range(1, nodes + 1))
        names = ",".join(f"n{k}" for k in range(1, nodes + 1))
        self.conf = f"{d}/slurm.conf"
        hooks = ""
        if shell_hooks:
            # The site's way without the plugin's own prolog/epilog: Prolog=/Epilog= scripts,
            # settings from stagefs.env (slurmd gives a prolog a bare environment).
            with open(f"{d}/stagefs.env", "w") as f:
                f.write(f"STAGEFS_BIN={env.bin}\nSTAGEFS_VOLUME={self.meta}\nSTAGEFS_CACHE_ROOT={d}/cache\n"
                        f"STAGEFS_MOUNT_ROOT={d}/mnt\nSTAGEFS_STATE_DIR={d}/jobstate\nSTAGEFS_TIMEOUT=300\n")
            for kind in ("prolog", "epilog"):
                with open(f"{d}/{kind}.sh", "w") as f:
                    f.write(f"#!/bin/sh\nenv > {d}/log/{kind}-env-$SLURM_JOB_ID\n"
                            f"STAGEFS_SLURM_ENV={d}/stagefs.env exec {REPO}/slurm/{kind}.d/stagefs.sh\n")
                os.chmod(f"{d}/{kind}.sh", 0o755)
            hooks = f"Prolog={d}/prolog.sh\nEpilog={d}/epilog.sh\n"
        with open(self.conf, "w") as f:
            f.write(f"""ClusterName=stagefs
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld}
AuthType=auth/munge
AuthInfo=socket={d}/munge.sock
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
PrologFlags=Alloc
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
PlugStackConfig={d}/plugstack.conf
{hooks}{node_lines}PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP
""")
        with open(f"{d}/cgroup.conf", "w") as f:
            f.write("CgroupPlugin=cgroup/v1\n")
        # plugstack.conf names the plugin's file with an include line, as the README says.
        os.makedirs(f"{d}/plugstack.conf.d")
        self.plugstack = f"{d}/plugstack.conf.d/stagefs.conf"
        with open(self.plugstack, "w") as f:
            f.write(f"required {self.plugin} stagefs={env.bin} volume={self.meta} cache_root={d}/cache "
                    f"mount_root={d}/mnt state_dir={d}/jobstate timeout=300{' hooks=no' if shell_hooks else ''}\n")
        with open(f"{d}/plugstack.conf", "w") as f:
            f.write(f"include {self.plugstack}\n")
        self.start(["slurmctld", "-D", "-f", self.conf])
        assert helpers.wait_port(ctld, 30), "slurmctld listens"
        self.start(["slurmd", "-D", "-f", self.conf, "-N", "n1"])
        for k in range(2, nodes + 1):
            self.start(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        f"mount --bind {d}/n{k}-cache {d}/cache && mount --bind {d}/n{k}-mnt {d}/mnt && "
                        f"exec slurmd -D -f {self.conf} -N n{k}"])
        assert wait_for(lambda: self.sinfo().split().count("idle") == nodes, 60), f"the nodes came up: {self.sinfo()}"

    def start(self, cmd):
        self.procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return self.procs[-1]

    def restart_slurmd(self):
        """slurmd reads plugstack.conf when it starts: restart node 1's."""
        for p in self.procs:
            if p.args[:1] == ["slurmd"] and p.poll() is None:
                p.terminate()
                p.wait(20)
        self.procs = [p for p in self.procs if p.poll() is None]
        log = f"{self.dir}/log/slurmd-n1.log"
        started = open(log).read().count(" started") if os.path.exists(log) else 0
        self.start(["slurmd", "-D", "-f", self.conf, "-N", "n1"])
        # slurmd logs "slurmd version ... started" once it serves (and has read the plugstack).
        assert wait_for(lambda: os.path.exists(log) and open(log).read().count(" started") > started, 60), "slurmd restarted"

    def slurm(self, *cmd, user=USER, check=False):
        return subprocess.run(["runuser", "-u", user, "--", "env", f"SLURM_CONF={self.conf}", *cmd], capture_output=True, text=True)

    def sinfo(self):
        return subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env={**os.environ, "SLURM_CONF": self.conf}, capture_output=True, text=True).stdout

    def submit(self, script, *args, name="job"):
        path = f"{self.dir}/out/{name}.sh"
        with open(path, "w") as f:
            f.write(script)
        os.chmod(path, 0o755)
        p = self.slurm("sbatch", "--parsable", "-o", f"{self.dir}/out/{name}-%j.out", "-e", f"{self.dir}/out/{name}-%j.err", *args, path)
        return p

    def wait_job(self, jobid, timeout=120):
        def done():
            out = subprocess.run(["scontrol", "show", "job", jobid], env={**os.environ, "SLURM_CONF": self.conf},
                                 capture_output=True, text=True).stdout
            return any(f"JobState={s}" in out for s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"))
        assert wait_for(done, timeout), f"job {jobid} finished"
        out = subprocess.run(["scontrol", "show", "job", jobid], env={**os.environ, "SLURM_CONF": self.conf},
                             capture_output=True, text=True).stdout
        state = out.split("JobState=")[1].split()[0]
        # The epilog runs after the job is done; give it a moment.
        wait_for(lambda: not os.path.exists(f"{self.dir}/mnt/{jobid}"), 30)
        return state

    def output(self, name, jobid):
        def read(ext):
            p = f"{self.dir}/out/{name}-{jobid}.{ext}"
            return open(p).read() if os.path.exists(p) else ""
        return read("out"), read("err")

    def stop(self):
        if self.gateway:
            self.gateway.stop()
        if not hasattr(self, "dir"):
            return
        # Mount processes the epilogs did not get to keep other nodes' namespaces alive.
        subprocess.run(["pkill", "-KILL", "-f", f"stagefs mount .*{self.dir}/mnt/"], capture_output=True)
        for p in reversed(self.procs):
            p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for m in os.listdir(f"{self.dir}/mnt") if os.path.isdir(f"{self.dir}/mnt") else []:
            subprocess.run(["fusermount3", "-uz", f"{self.dir}/mnt/{m}"], capture_output=True)


@pytest.fixture(scope="module")
def cluster(env, redis):
    c = Cluster(env, redis)
    yield c
    c.stop()


def pins_of(cluster, job):
    uid = helpers.pwd.getpwnam(USER).pw_uid
    db = f"{cluster.dir}/cache/{uid}/index.db"
    if not os.path.exists(db):
        return 0
    with sqlite3.connect(db) as c:
        return c.execute("SELECT COUNT(*) FROM pins WHERE job=?", (str(job),)).fetchone()[0]


def assert_cleaned_up(cluster, jobid):
    mnt = f"{cluster.dir}/mnt/{jobid}"
    assert not helpers.is_mounted(mnt), "no FUSE mount of the job remains"
    assert not os.path.exists(mnt)
    procs = subprocess.run(["pgrep", "-f", f"stagefs mount .*{mnt}"], capture_output=True, text=True).stdout.strip()
    assert procs == "", "no process of the job remains"
    assert pins_of(cluster, jobid) == 0, "no pin of the job remains"
    uid = helpers.pwd.getpwnam(USER).pw_uid
    jobdir = f"{cluster.dir}/cache/{uid}/jobs/{jobid}"
    if os.path.lexists(jobdir):
        # Kept for keep_logs (7 days by default) with what happened in it, marked ended.
        assert os.path.isdir(jobdir) and not os.path.islink(jobdir)
        assert os.path.exists(f"{jobdir}/ended") and os.path.exists(f"{jobdir}/epilog.log"), os.listdir(jobdir)
    assert not os.path.exists(f"{cluster.dir}/jobstate/{jobid}"), "the status file is gone"


JOB = """#!/bin/bash
echo "STATUS=$STAGEFS_STAGE_STATUS"
echo "MOUNT=$STAGEFS_MOUNT"
echo "CACHE=$STAGEFS_CACHE_DIR"
echo "REPORT=$STAGEFS_STAGE_REPORT"
test -s "$STAGEFS_STAGE_REPORT" && echo "REPORT_READABLE"
{bin} stage --meta {meta} --cache-dir "$STAGEFS_CACHE_DIR" /datasets/small --check
cd "$STAGEFS_MOUNT/datasets/small" && sha256sum -c {sums} | grep -c ': OK$'
"""


def test_sbatch_help_lists_the_options(cluster):
    p = cluster.slurm("sbatch", "--help")
    assert "--storage-stage=SPEC" in p.stdout and "--storage-stage-policy" in p.stdout and "--storage-no-mount" in p.stdout


@pytest.mark.parametrize("how", ["option", "sbatch-line"])
def test_a_job_finds_its_dataset_cached_and_mounted(cluster, env, how):
    script = JOB.format(bin=env.bin, meta=cluster.meta, sums=f"{cluster.dir}/small.sha256")
    args = []
    if how == "option":
        args = ["--storage-stage=/datasets/small"]
    else:
        script = script.replace("#!/bin/bash\n", "#!/bin/bash\n#SBATCH --storage-stage=/datasets/small\n")
    p = cluster.submit(script, *args, name=f"ok-{how}")
    assert p.returncode == 0, p.stderr
    jobid = p.stdout.strip().split(";")[0]
    state = cluster.wait_job(jobid)
    out, err = cluster.output(f"ok-{how}", jobid)
    assert state == "COMPLETED", (out, err)
    assert "STATUS=ok" in out
    assert f"MOUNT={cluster.dir}/mnt/{jobid}" in out
    assert f"CACHE={cluster.dir}/cache" in out and "REPORT_READABLE" in out
    assert "/datasets/small: 100.0% cached, 12 of 12 files" in out, "fully cached before the job's first line"
    assert out.strip().endswith("12"), "every file read through the mount with its checksum"
    assert_cleaned_up(cluster, jobid)


def test_a_malformed_spec_is_refused_at_submit(cluster):
    before = subprocess.run(["squeue", "-h"], env={**os.environ, "SLURM_CONF": cluster.conf}, capture_output=True, text=True).stdout
    for spec, why in [("datasets/small", "not an absolute path"), ("nosuch:/x", "unknown volume 'nosuch'"),
                      ("/a,,/b", "empty item"), (",".join(["/" + "d" * 3000] * 3), "longer than 4096 characters")]:
        p = cluster.slurm("sbatch", f"--storage-stage={spec}", "--wrap", "true")
        assert p.returncode != 0 and "stagefs: " in p.stderr and why in p.stderr, (spec, p.stderr)
    p = cluster.slurm("sbatch", "--storage-stage-policy=maybe", "--storage-stage=/datasets/small", "--wrap", "true")
    assert p.returncode != 0 and "stagefs: --storage-stage-policy takes fail or warn" in p.stderr
    after = subprocess.run(["squeue", "-h"], env={**os.environ, "SLURM_CONF": cluster.conf}, capture_output=True, text=True).stdout
    assert after == before, "no job was queued"


def test_a_dataset_the_user_may_not_read_fails_the_job_not_the_node(cluster, env):
    p = cluster.submit("#!/bin/bash\necho RAN\n", "--storage-stage=/private,/datasets/small", name="denied")
    jobid = p.stdout.strip().split(";")[0]
    state = cluster.wait_job(jobid)
    out, err = cluster.output("denied", jobid)
    assert state == "FAILED"
    assert "RAN" not in out
    assert "stagefs: /private: permission denied" in err
    assert cluster.sinfo().split() == ["idle"], "the node is not drained"
    assert_cleaned_up(cluster, jobid)
    # The next job runs.
    p = cluster.submit("#!/bin/bash\necho NEXT\n", "--storage-stage=/datasets/small", name="next")
    jobid = p.stdout.strip().split(";")[0]
    assert cluster.wait_job(jobid) == "COMPLETED"
    assert "NEXT" in cluster.output("next", jobid)[0]


def test_warn_policy_runs_the_job_and_says_what_is_missing(cluster):
    p = cluster.submit("#!/bin/bash\necho STATUS=$STAGEFS_STAGE_STATUS\n", "--storage-stage=/private,/datasets/small",
                       "--storage-stage-policy=warn", "--storage-no-mount", name="warn")
    jobid = p.stdout.strip().split(";")[0]
    assert cluster.wait_job(jobid) == "COMPLETED"
    out, err = cluster.output("warn", jobid)
    assert "STATUS=partial" in out
    assert "/private: permission denied" in err
    assert_cleaned_up(cluster, jobid)


def test_shell_prolog_and_epilog(cluster, env):
    """The scripts for sites that prefer Prolog=/Epilog=, run as slurmd would run them."""
    conf = f"{cluster.dir}/stagefs.env"
    with open(conf, "w") as f:
        f.write(f"STAGEFS_BIN={env.bin}\nSTAGEFS_VOLUME={cluster.meta}\nSTAGEFS_CACHE_ROOT={cluster.dir}/cache\n"
                f"STAGEFS_MOUNT_ROOT={cluster.dir}/mnt\nSTAGEFS_STATE_DIR={cluster.dir}/jobstate\nSTAGEFS_TIMEOUT=300\n")
    job = "990001"
    base = {**os.environ, "STAGEFS_SLURM_ENV": conf, "SLURM_JOB_ID": job, "SLURM_JOB_USER": USER}
    env_pro = {**base, "SPANK__SLURM_SPANK_OPTION_stagefs_storage_stage": "/datasets/small"}
    p = subprocess.run([f"{REPO}/slurm/prolog.d/stagefs.sh"], env=env_pro, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    status = open(f"{cluster.dir}/jobstate/{job}").read()
    assert status.startswith("ok\n") and f"mount={cluster.dir}/mnt/{job}" in status
    st = os.stat(f"{cluster.dir}/jobstate/{job}")
    uid = helpers.pwd.getpwnam(USER).pw_uid
    assert (st.st_uid, st.st_mode & 0o777) == (uid, 0o400), "the status is the job user's to read, nobody else's"
    assert pins_of(cluster, job) > 0
    assert run_as(USER, lambda: sorted(os.listdir(f"{cluster.dir}/mnt/{job}/datasets/small")))[0] == "f0"
    p = subprocess.run([f"{REPO}/slurm/epilog.d/stagefs.sh"], env=base, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert_cleaned_up(cluster, job)
    # A named volume (STAGEFS_VOLUMES), named in the spec as NAME:/path.
    with open(conf, "a") as f:
        f.write(f"STAGEFS_VOLUMES='site={cluster.meta}'\n")
    p = subprocess.run([f"{REPO}/slurm/prolog.d/stagefs.sh"],
                       env={**base, "SPANK_STAGEFS_STORAGE_STAGE": "site:/datasets/small", "SPANK_STAGEFS_NO_MOUNT": "1"},
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    status = open(f"{cluster.dir}/jobstate/{job}").read()
    assert status.startswith("ok\n") and "mount=" not in status, status
    assert os.path.exists(f"{cluster.dir}/cache/{uid}/jobs/{job}/report-site.json")
    subprocess.run([f"{REPO}/slurm/epilog.d/stagefs.sh"], env=base, check=True)
    # A user-caused failure does not fail the prolog; the status says why.
    env_bad = {**base, "SPANK__SLURM_SPANK_OPTION_stagefs_storage_stage": "/private"}
    p = subprocess.run([f"{REPO}/slurm/prolog.d/stagefs.sh"], env=env_bad, capture_output=True, text=True)
    assert p.returncode == 0
    status = open(f"{cluster.dir}/jobstate/{job}").read()
    assert status.startswith("failed\n") and "/private: permission denied" in status
    subprocess.run([f"{REPO}/slurm/epilog.d/stagefs.sh"], env=base, check=True)
    # A file system mounted over the user's cache directory (a user's FUSE mount could make
    # root wait forever): the job fails, root does not go in.
    userdir = f"{cluster.dir}/cache/{uid}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "none", userdir], check=True)
    try:
        p = subprocess.run([f"{REPO}/slurm/prolog.d/stagefs.sh"], env=env_pro, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        status = open(f"{cluster.dir}/jobstate/{job}").read()
        assert status.startswith("failed\n") and "is a mount point" in status, status
    finally:
        subprocess.run(["umount", userdir], check=True)
    subprocess.run([f"{REPO}/slurm/epilog.d/stagefs.sh"], env=base, check=True)
    # A mount_root others may write is a node fault (a user could put links there).
    loose = f"{cluster.dir}/loose-mnt"
    os.makedirs(loose)
    os.chmod(loose, 0o1777)
    with open(conf, "a") as f:
        f.write(f"STAGEFS_MOUNT_ROOT={loose}\n")
    p = subprocess.run([f"{REPO}/slurm/prolog.d/stagefs.sh"], env=env_pro, capture_output=True, text=True)
    assert p.returncode == 1 and "writable by root alone" in p.stderr, p.stderr
    with open(conf, "a") as f:
        f.write(f"STAGEFS_MOUNT_ROOT={cluster.dir}/mnt\n")
    # A node fault does: the binary is missing.
    with open(conf, "a") as f:
        f.write("STAGEFS_BIN=/nonexistent/stagefs\n")
    p = subprocess.run([f"{REPO}/slurm/prolog.d/stagefs.sh"], env=env_pro, capture_output=True, text=True)
    assert p.returncode == 1 and "cannot be run" in p.stderr
    subprocess.run([f"{REPO}/slurm/epilog.d/stagefs.sh"], env=base, check=True)


class Victims:
    """What a planted link points at: a root-owned 0700 directory with a file, and a
    root-owned 0600 file. They must keep content, owner and mode."""

    def __init__(self, cluster, tag):
        self.dir = f"{cluster.dir}/victim-{tag}-dir"
        self.file = f"{cluster.dir}/victim-{tag}-file"
        os.makedirs(self.dir)
        with open(f"{self.dir}/keep", "w") as f:
            f.write("root's own")
        os.chmod(self.dir, 0o700)
        with open(self.file, "w") as f:
            f.write("secret")
        os.chmod(self.file, 0o600)

    def assert_intact(self):
        d, f = os.lstat(self.dir), os.lstat(self.file)
        assert (d.st_uid, d.st_gid, stat_mode(d)) == (0, 0, 0o700), f"{self.dir} changed: {d}"
        assert os.listdir(self.dir) == ["keep"] and open(f"{self.dir}/keep").read() == "root's own"
        assert (f.st_uid, f.st_gid, stat_mode(f)) == (0, 0, 0o600), f"{self.file} changed: {f}"
        assert open(self.file).read() == "secret"


def stat_mode(st):
    return st.st_mode & 0o7777


def next_job_id(cluster):
    """Slurm numbers jobs one after another: run one, the next gets its id + 1."""
    p = cluster.submit("#!/bin/bash\ntrue\n", name="probe")
    jobid = p.stdout.strip().split(";")[0]
    cluster.wait_job(jobid)
    return int(jobid) + 1


def user_jobs_dir(cluster, cache="cache"):
    uid = helpers.pwd.getpwnam(USER).pw_uid
    jobs = f"{cluster.dir}/{cache}/{uid}/jobs"
    run_as(USER, os.makedirs, jobs, 0o700, True)
    return jobs


def hooks_cluster(request, hooks):
    return request.getfixturevalue("cluster" if hooks == "plugin" else "shell_cluster")


@pytest.mark.parametrize("hooks", ["plugin", "shell"])
@pytest.mark.parametrize("plant", ["job-dir-link", "report-link", "cache-dir-link"])
def test_links_planted_for_root_touch_nothing_of_root(request, hooks, plant):
    """A user plants links where root's prolog and epilog work (the plugin's, or the shell
    scripts run by slurmd as Prolog=/Epilog=): the job fails with the reason, the node stays
    idle, and root's files keep content, owner and mode."""
    cluster = hooks_cluster(request, hooks)
    v = Victims(cluster, f"{hooks}-{plant}")
    jobs = user_jobs_dir(cluster)
    uid = helpers.pwd.getpwnam(USER).pw_uid
    userdir = f"{cluster.dir}/cache/{uid}"
    nxt = next_job_id(cluster)
    if plant == "job-dir-link":
        run_as(USER, os.symlink, v.dir, f"{jobs}/{nxt}")
        expect = f"jobs/{nxt} is a symbolic link"
    elif plant == "report-link":
        run_as(USER, os.mkdir, f"{jobs}/{nxt}")
        for name in ("report.json", "status", "mount.log"):
            run_as(USER, os.symlink, v.file, f"{jobs}/{nxt}/{name}")
        expect = "report.json is a symbolic link"
    else:
        run_as(USER, os.rename, userdir, userdir + ".moved")
        run_as(USER, os.symlink, v.dir, userdir)
        expect = f"{userdir} is a symbolic link or not a directory"
    try:
        p = cluster.submit("#!/bin/bash\necho RAN\n", "--storage-stage=/datasets/small", name=f"plant-{hooks}-{plant}")
        jobid = p.stdout.strip().split(";")[0]
        assert int(jobid) == nxt, "the planted id was the job's"
        state = cluster.wait_job(jobid)
        out, err = cluster.output(f"plant-{hooks}-{plant}", jobid)
        assert state == "FAILED" and "RAN" not in out, (state, out, err)
        assert expect in err, err
        assert cluster.sinfo().split() == ["idle"], "the node is not drained"
        v.assert_intact()
    finally:
        if plant == "cache-dir-link":
            os.unlink(userdir)
            os.rename(userdir + ".moved", userdir)
        helpers.shutil.rmtree(f"{jobs}/{nxt}", ignore_errors=True) if not os.path.islink(f"{jobs}/{nxt}") else os.unlink(f"{jobs}/{nxt}")
    v.assert_intact()


@pytest.mark.parametrize("hooks", ["plugin", "shell"])
def test_a_job_that_swaps_its_directory_for_a_link_does_not_reach_root(request, hooks):
    """The job replaces its per-job directory with a link to a root directory before the
    epilog runs: the epilog (as the user) removes the link, never what it points to."""
    cluster = hooks_cluster(request, hooks)
    v = Victims(cluster, f"swap-{hooks}")
    uid = helpers.pwd.getpwnam(USER).pw_uid
    script = (f"#!/bin/bash\nd={cluster.dir}/cache/{uid}/jobs/$SLURM_JOB_ID\n"
              f"mv $d $d.gone && ln -s {v.dir} $d && echo SWAPPED\n")
    p = cluster.submit(script, "--storage-stage=/datasets/small", name=f"swap-{hooks}")
    jobid = p.stdout.strip().split(";")[0]
    assert cluster.wait_job(jobid) == "COMPLETED"
    assert "SWAPPED" in cluster.output(f"swap-{hooks}", jobid)[0]
    assert not os.path.lexists(f"{cluster.dir}/cache/{uid}/jobs/{jobid}"), "the link itself is gone"
    v.assert_intact()
    run_as(USER, helpers.shutil.rmtree, f"{cluster.dir}/cache/{uid}/jobs/{jobid}.gone")


@pytest.mark.parametrize("hooks", ["plugin", "shell"])
def test_another_users_directory_under_my_name_is_moved_aside(request, hooks):
    """The cache root is open to all (1777): another user makes a directory named like this
    user's uid there before this user's first job on the node. The prolog moves it aside and
    the job runs."""
    cluster = hooks_cluster(request, hooks)
    uid = helpers.pwd.getpwnam(USER).pw_uid
    userdir = f"{cluster.dir}/cache/{uid}"
    saved = f"{cluster.dir}/saved-{uid}-{hooks}"
    if os.path.exists(userdir):
        os.rename(userdir, saved)
    try:
        run_as(OTHER, os.mkdir, userdir, 0o755)
        p = cluster.submit("#!/bin/bash\necho RAN\n", "--storage-stage=/datasets/small", name=f"squat-{hooks}")
        jobid = p.stdout.strip().split(";")[0]
        assert cluster.wait_job(jobid) == "COMPLETED", cluster.output(f"squat-{hooks}", jobid)
        assert "RAN" in cluster.output(f"squat-{hooks}", jobid)[0]
        assert os.stat(userdir).st_uid == uid
        moved = [n for n in os.listdir(f"{cluster.dir}/cache") if n.startswith(f".stagefs-moved-{uid}-")]
        assert moved and os.stat(f"{cluster.dir}/cache/{moved[0]}").st_uid == helpers.pwd.getpwnam(OTHER).pw_uid
        for n in moved:
            helpers.shutil.rmtree(f"{cluster.dir}/cache/{n}")
    finally:
        if os.path.exists(saved):
            helpers.shutil.rmtree(userdir, ignore_errors=True)
            os.rename(saved, userdir)


def test_a_node_fault_fails_the_prolog(cluster, env):
    """A missing stagefs binary is the node's fault: the prolog fails and Slurm drains the node."""
    conf = cluster.plugstack
    good = open(conf).read()
    with open(conf, "w") as f:
        f.write(good.replace(f"stagefs={env.bin}", "stagefs=/nonexistent/stagefs"))
    try:
        cluster.restart_slurmd()
        p = cluster.submit("#!/bin/bash\necho RAN\n", "--storage-stage=/datasets/small", name="fault")
        jobid = p.stdout.strip().split(";")[0]
        assert wait_for(lambda: "drain" in cluster.sinfo(), 60), cluster.sinfo()
        reason = subprocess.run(["sinfo", "-h", "-R", "-o", "%E"], env={**os.environ, "SLURM_CONF": cluster.conf},
                                capture_output=True, text=True).stdout
        assert "prolog" in reason.lower() or "Prolog" in reason, reason
        log = open(f"{cluster.dir}/log/slurmd-n1.log").read()
        assert "stagefs: job" in log and "/nonexistent/stagefs cannot be run" in log
        subprocess.run(["scancel", jobid], env={**os.environ, "SLURM_CONF": cluster.conf})
    finally:
        with open(conf, "w") as f:
            f.write(good)
        cluster.restart_slurmd()
        subprocess.run(["scontrol", "update", "nodename=n1", "state=resume"], env={**os.environ, "SLURM_CONF": cluster.conf})
        assert wait_for(lambda: cluster.sinfo().split() == ["idle"], 60), cluster.sinfo()

def test_every_node_of_a_job_stages_into_its_own_cache(env, redis):
    c = Cluster(env, redis, nodes=2, db=51)
    try:
        script = (
            "#!/bin/bash\n"
            "srun -N2 -n2 bash -c 'echo \"$SLURMD_NODENAME $STAGEFS_STAGE_STATUS $(ls $STAGEFS_MOUNT/datasets/small | wc -l) "
            f"$({env.bin} stage --meta {c.meta} --cache-dir $STAGEFS_CACHE_DIR /datasets/small --check)\"'\n")
        p = c.submit(script, "-N2", "--storage-stage=/datasets/small", name="two")
        assert p.returncode == 0, p.stderr
        jobid = p.stdout.strip().split(";")[0]
        assert c.wait_job(jobid) == "COMPLETED"
        out, err = c.output("two", jobid)
        lines = sorted(l for l in out.splitlines() if l.startswith("n"))
        assert len(lines) == 2, (out, err)
        for node, line in zip(["n1", "n2"], lines):
            assert line.startswith(f"{node} ok 12 ") and "100.0% cached" in line, line
        uid = helpers.pwd.getpwnam(USER).pw_uid
        sizes = []
        for cache in (f"{c.dir}/cache/{uid}", f"{c.dir}/n2-cache/{uid}"):
            sizes.append(sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(cache) for f in fs if "index" not in f))
        assert all(s > 5 << 20 for s in sizes), f"each node's own cache holds the dataset: {sizes}"
    finally:
        c.stop()


@pytest.fixture(scope="module")
def shell_cluster(env, redis):
    c = Cluster(env, redis, db=52, shell_hooks=True)
    yield c
    c.stop()


def test_shell_hooks_under_slurmd(shell_cluster, env):
    """Prolog=/Epilog= scripts run by slurmd itself (the plugin registers the options only)."""
    c = shell_cluster
    script = JOB.format(bin=env.bin, meta=c.meta, sums=f"{c.dir}/small.sha256")
    p = c.submit(script, "--storage-stage=/datasets/small", name="shell-ok")
    assert p.returncode == 0, p.stderr
    jobid = p.stdout.strip().split(";")[0]
    state = c.wait_job(jobid)
    out, err = c.output("shell-ok", jobid)
    assert state == "COMPLETED", (out, err, open(f"{c.dir}/log/prolog-env-{jobid}").read())
    assert "STATUS=ok" in out and f"MOUNT={c.dir}/mnt/{jobid}" in out
    assert "/datasets/small: 100.0% cached, 12 of 12 files" in out and out.strip().endswith("12")
    assert_cleaned_up(c, jobid)


# ---- Site settings: mount options, the job's cache size, kept logs, flushing at the end, gc ----

GC_USER = "stagefs-gc"  # a user of no other test: gc judges users by their processes on the node


def job_id(p):
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def wait_output(cluster, name, jobid, text, timeout=120):
    helpers.wait_until(lambda: text in cluster.output(name, jobid)[0], timeout, f"'{text}' in the output of job {jobid}")


def mount_options_of(path):
    """The per-mount and the super-block options of the mount at `path` (mountinfo)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if parts[4] == path:
                dash = parts.index("-")
                return set(parts[5].split(",")) | set(parts[dash + 3].split(","))
    return None


def cmdline_of_mount(path):
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                args = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if b"mount" in args and path.encode() in args:
                return [a.decode() for a in args if a]
    return None


def cache_check(cluster, env, path, user=USER):
    return env.stagefs("stage", "--meta", cluster.meta, "--cache-dir", f"{cluster.dir}/cache", path, "--check", user=user, check=False).stdout


@pytest.fixture(scope="module")
def gc_user():
    pw = helpers.ensure_user(GC_USER)
    # A user of the volume, so a member of the group its file bucket is shared with.
    subprocess.run(["usermod", "-a", "-G", helpers.SHARED_GROUP, GC_USER], check=True)
    return pw


def test_cache_gc_frees_stale_caches_keeps_pinned_blocks_and_follows_no_link(cluster, env, gc_user):
    """`stagefs cache gc` as root: the cache of a user with no process on the node and unused
    for longer than --older-than goes; a running job's pinned blocks stay while the user's
    unpinned blocks are evicted for a free-space target; links users planted in the cache root
    and in their cache directories are never followed (root's files keep content and mode)."""
    d = cluster.dir
    uid = helpers.pwd.getpwnam(USER).pw_uid
    v = Victims(cluster, "gc")
    # A user long gone: blocks last used 10 days ago, a link to root's files among them.
    gcdir = f"{d}/cache/{gc_user.pw_uid}"
    env.stagefs("stage", "--meta", cluster.meta, "--cache-dir", f"{d}/cache", "/datasets/small", user=GC_USER)
    run_as(GC_USER, lambda: sqlite3.connect(f"{gcdir}/index.db").execute("UPDATE blocks SET atime = atime - 864000").connection.commit())
    run_as(GC_USER, os.symlink, v.dir, f"{gcdir}/planted-dir")
    run_as(GC_USER, os.symlink, v.file, f"{gcdir}/planted-file")
    # A link named like a user in the shared cache root.
    planted_root = f"{d}/cache/4242424"
    run_as(USER, os.symlink, v.dir, planted_root)
    # This user: unpinned blocks (f0..f10), and a running job with f11 pinned.
    env.stagefs("stage", "--meta", cluster.meta, "--cache-dir", f"{d}/cache", *[f"/datasets/small/f{i}" for i in range(11)])
    run_as(USER, os.symlink, v.dir, f"{d}/cache/{uid}/planted-dir")
    release = f"{d}/out/gc-release"
    p = cluster.submit(f"#!/bin/bash\necho READY\nwhile [ ! -e {release} ]; do sleep 0.2; done\n",
                       "--storage-stage=/datasets/small/f11", "--storage-no-mount", name="gc-pinned")
    jobid = job_id(p)
    try:
        wait_output(cluster, "gc-pinned", jobid, "READY")
        assert pins_of(cluster, jobid) > 0
        args = ["cache", "gc", "--cache-dir", f"{d}/cache", "--older-than", "7d", "--free-space-ratio", "0.999"]
        dry = env.stagefs(*args, "--dry-run", user="root")
        assert f"uid {gc_user.pw_uid} ({GC_USER}): no process or mount on this node and last used 10 day(s) ago: would remove" in dry.stdout, dry.stdout
        assert os.path.exists(f"{gcdir}/index.db"), "a dry run changes nothing"
        dry = env.stagefs("cache", "gc", "--cache-dir", f"{d}/cache", "--target", "1000000T", "--dry-run", user="root").stdout
        mine = next(l for l in dry.splitlines() if l.startswith(f"uid {uid} ({USER}): "))
        assert "would free" in mine and f"pinned by job(s) {jobid}" in mine, dry
        assert "100.0% cached" in cache_check(cluster, env, "/datasets/small/f1")
        out = env.stagefs(*args, user="root").stdout
        assert f"uid {gc_user.pw_uid} ({GC_USER}): no process or mount on this node and last used 10 day(s) ago: removed its cache, freed 5." in out, out
        mine = next(l for l in out.splitlines() if l.startswith(f"uid {uid} ({USER}): "))
        assert "least recently used block(s)" in mine and f"pinned by job(s) {jobid}" in mine, mine
        assert f"skipped {planted_root}: a symbolic link or not a directory owned by uid 4242424 (not followed)" in out, out
        assert not os.path.lexists(gcdir), "the stale user's cache is gone"
        assert os.path.islink(planted_root), "root left the planted link alone"
        v.assert_intact()
        assert "100.0% cached" in cache_check(cluster, env, "/datasets/small/f11"), "the running job's pinned blocks stay"
        assert "0.0% cached" in cache_check(cluster, env, "/datasets/small/f1"), "unpinned blocks were evicted"
        assert pins_of(cluster, jobid) > 0
    finally:
        open(release, "w").close()
        os.unlink(planted_root)
        if os.path.lexists(f"{d}/cache/{uid}/planted-dir"):
            os.unlink(f"{d}/cache/{uid}/planted-dir")
    assert cluster.wait_job(jobid) == "COMPLETED"
    os.unlink(release)
    v.assert_intact()


# The settings the next tests run with: on the plugin's plugstack line, or in stagefs.env.
PLUGIN_SETTINGS = "mount_options=allow_root cache_size=5 free_space_ratio=0.05 keep_logs=3s flush_timeout=30 log_root={d}/logs"
SHELL_SETTINGS = ("STAGEFS_MOUNT_OPTIONS=allow_root\nSTAGEFS_CACHE_SIZE=5\nSTAGEFS_FREE_SPACE_RATIO=0.05\n"
                  "STAGEFS_KEEP_LOGS=3s\nSTAGEFS_FLUSH_TIMEOUT=30\n")


@pytest.fixture(scope="module")
def plugin_settings(cluster):
    """The plugin cluster with the settings (slurmd restarted once; put back at the end)."""
    d = cluster.dir
    os.makedirs(f"{d}/logs", exist_ok=True)
    os.chmod(f"{d}/logs", 0o1777)
    good = open(cluster.plugstack).read()
    with open(cluster.plugstack, "w") as f:
        f.write(good.rstrip("\n") + " " + PLUGIN_SETTINGS.format(d=d) + "\n")
    cluster.restart_slurmd()
    yield cluster, f"{d}/logs"
    with open(cluster.plugstack, "w") as f:
        f.write(good)
    cluster.restart_slurmd()


@pytest.fixture(scope="module")
def shell_settings(shell_cluster):
    conf = f"{shell_cluster.dir}/stagefs.env"
    good = open(conf).read()
    with open(conf, "a") as f:
        f.write(SHELL_SETTINGS)
    yield shell_cluster, f"{shell_cluster.dir}/cache"
    with open(conf, "w") as f:
        f.write(good)


def configured(request, hooks):
    return request.getfixturevalue("plugin_settings" if hooks == "plugin" else "shell_settings")


def test_a_bad_mount_option_is_refused_with_its_name(env, cluster):
    p = env.stagefs("job", "prolog", "--job", "1", "--cache-dir", f"{cluster.dir}/cache", "--mount-options", "allow_root,suid",
                    "--spec", "/x", check=False)
    assert p.returncode == 4 and "stagefs: mount option 'suid' is not allowed for a job's mount (allowed: allow_root" in p.stderr, p.stderr
    # The plugin refuses it when it loads: sbatch says why and queues nothing.
    conf = f"{cluster.dir}/plugstack-bad.conf"
    with open(conf, "w") as f:
        f.write(open(cluster.plugstack).read().rstrip("\n") + " mount_options=dev\n")
    os.chmod(conf, 0o644)
    slurm_conf = f"{cluster.dir}/slurm-bad.conf"
    with open(slurm_conf, "w") as f:
        f.write(open(cluster.conf).read().replace(f"PlugStackConfig={cluster.dir}/plugstack.conf", f"PlugStackConfig={conf}"))
    os.chmod(slurm_conf, 0o644)
    p = subprocess.run(["runuser", "-u", USER, "--", "env", f"SLURM_CONF={slurm_conf}", "sbatch", "--storage-stage=/datasets/small",
                        "--wrap", "true"], capture_output=True, text=True)
    assert p.returncode != 0 and "stagefs: mount option 'dev' in mount_options= is not allowed" in p.stderr, p.stderr


@pytest.mark.parametrize("hooks", ["plugin", "shell"])
def test_job_settings_reach_the_mount_and_the_cache(request, env, hooks):
    """mount_options=allow_root reaches the job's mount (root may enter it, another user may
    not), and the job's cache is cache_size MiB: a dataset larger than that fails the job
    with the size named."""
    c, logs = configured(request, hooks)
    uid = helpers.pwd.getpwnam(USER).pw_uid
    release = f"{c.dir}/out/settings-release-{hooks}"
    script = (f"#!/bin/bash\necho REPORT=$STAGEFS_STAGE_REPORT\necho READY\n"
              f"while [ ! -e {release} ]; do sleep 0.2; done\n")
    name = f"settings-{hooks}"
    jobid = job_id(c.submit(script, "--storage-stage=/datasets/small/f1,/datasets/small/f2", name=name))
    mnt = f"{c.dir}/mnt/{jobid}"
    try:
        wait_output(c, name, jobid, "READY")
        opts = mount_options_of(mnt)
        assert opts is not None and "allow_other" in opts, f"the kernel lets others reach the mount (libfuse checks allow_root): {opts}"
        args = cmdline_of_mount(mnt)
        assert args and "-o" in args and args[args.index("-o") + 1] == "allow_root", args
        assert args[args.index("--cache-size") + 1] == "5" and args[args.index("--free-space-ratio") + 1] == "0.05", args
        assert sorted(os.listdir(f"{mnt}/datasets/small"))[:2] == ["f0", "f1"], "root may enter the job's mount"
        with pytest.raises(PermissionError):
            run_as(OTHER, os.listdir, mnt)
        out = c.output(name, jobid)[0]
        assert f"REPORT={logs}/{uid}/jobs/{jobid}/report.json" in out, out
        assert os.path.exists(f"{logs}/{uid}/jobs/{jobid}/report.json") and os.path.exists(f"{logs}/{uid}/jobs/{jobid}/mount.log")
    finally:
        open(release, "w").close()
    assert c.wait_job(jobid) == "COMPLETED"
    os.unlink(release)
    # The whole dataset (5.5 MiB) does not fit a 5 MiB cache.
    name = f"toobig-{hooks}"
    jobid = job_id(c.submit("#!/bin/bash\necho RAN\n", "--storage-stage=/datasets/small", "--storage-no-mount", name=name))
    state = c.wait_job(jobid)
    out, err = c.output(name, jobid)
    assert state == "FAILED" and "RAN" not in out and "the cache is too small for the set: it needs" in err, (state, out, err)


@pytest.mark.parametrize("hooks", ["plugin", "shell"])
def test_a_failed_jobs_report_and_logs_are_kept_then_expire(request, env, hooks):
    """The epilog keeps the report, the mount log and its own log for keep_logs (3 s here);
    the user's next job on the node removes them once that time has passed."""
    c, logs = configured(request, hooks)
    uid = helpers.pwd.getpwnam(USER).pw_uid
    name = f"kept-{hooks}"
    jobid = job_id(c.submit("#!/bin/bash\necho FAILING\nexit 3\n", "--storage-stage=/datasets/small/f1", name=name))
    assert c.wait_job(jobid) == "FAILED"
    jobdir = f"{logs}/{uid}/jobs/{jobid}"
    helpers.wait_until(lambda: os.path.exists(f"{jobdir}/ended"), 30, "the epilog to mark the job ended")
    assert sorted(os.listdir(jobdir)) == ["ended", "epilog.log", "mount.log", "report.json"], os.listdir(jobdir)
    assert json.load(open(f"{jobdir}/report.json"))["status"] == "ok"
    epilog = open(f"{jobdir}/epilog.log").read()
    assert f"unmounted {c.dir}/mnt/{jobid}; its mount process flushed and exited in" in epilog, epilog
    assert "kept until" in epilog and "keep_logs=3s" in epilog
    assert "unmounted" in open(f"{jobdir}/mount.log").read()
    ended = int(open(f"{jobdir}/ended").read())
    helpers.wait_until(lambda: time.time() > ended + 3, 10, "keep_logs to pass")
    nxt = job_id(c.submit("#!/bin/bash\ntrue\n", "--storage-stage=/datasets/small/f1", "--storage-no-mount", name=f"after-{hooks}"))
    assert c.wait_job(nxt) == "COMPLETED"
    assert not os.path.exists(jobdir), "the next job's prolog or epilog removed the expired logs"


FILES = 200
RECORD = 4096
WRITER = r"""
import os, sys, time
top, progress, files, record = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
os.mkdir(top)
fds = [os.open(f"{top}/f{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) for i in range(files)]
rounds = 0
while True:
    try:
        for i, fd in enumerate(fds):
            os.write(fd, (b"%08d" % rounds) * (record // 8))
    except OSError:
        break
    rounds += 1
    with open(progress + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {rounds}\n")
    os.rename(progress + ".tmp", progress)
"""


@pytest.mark.parametrize("hooks", ["plugin", "shell"])
def test_the_epilog_lets_the_mount_flush_a_jobs_buffered_writes(request, env, hooks):
    """A process the job left behind still writes to a file in the job's mount when the job
    ends (the mount holds the last seconds of it in its write buffer). The epilog unmounts
    and lets the mount process flush before anything is killed: every write that returned is
    in the volume afterwards."""
    c, logs = configured(request, hooks)
    uid = helpers.pwd.getpwnam(USER).pw_uid
    subprocess.run(["chown", "-R", USER, f"{c.dir}/data"], check=True)  # jobs may write to the volume
    writer = f"{c.dir}/out/writer.py"
    with open(writer, "w") as f:
        f.write(WRITER)
    progress = f"{c.dir}/out/progress-{hooks}"
    name = f"flush-{hooks}"
    top = f"/flush-{hooks}-{os.urandom(3).hex()}"
    script = (f"#!/bin/bash\nsetsid python3 {writer} $STAGEFS_MOUNT{top} {progress} {FILES} {RECORD} </dev/null >/dev/null 2>&1 &\n"
              f"while [ ! -e {progress} ] || [ $(cut -d' ' -f2 {progress}) -lt 3 ]; do sleep 0.05; done\necho WRITING\n")
    jobid = job_id(c.submit(script, "--storage-stage=/datasets/small/f1", name=name))
    assert c.wait_job(jobid) == "COMPLETED"
    assert "WRITING" in c.output(name, jobid)[0]
    pid, rounds = map(int, open(progress).read().split())
    helpers.wait_until(lambda: not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z", 60,
                       "the writer to stop once the mount is gone")
    helpers.kill_quietly(pid)
    pid, rounds = map(int, open(progress).read().split())
    os.unlink(progress)
    assert rounds >= 3
    # The volume, read through a fresh mount: every write that returned is there.
    look = env.dir_for("root", "look")
    env.stagefs("mount", "-d", c.meta, look, "--cache-size", "0", user="root")
    try:
        short = []
        for i in range(FILES):
            data = open(f"{look}{top}/f{i}", "rb").read()
            if len(data) < rounds * RECORD or any(data[r * RECORD:r * RECORD + 8] != b"%08d" % r for r in range(rounds)):
                short.append((i, len(data)))
    finally:
        env.stagefs("umount", look, user="root")
    jobdir = f"{logs}/{uid}/jobs/{jobid}"
    epilog, mount_log = open(f"{jobdir}/epilog.log").read(), open(f"{jobdir}/mount.log").read()
    assert not short, f"{len(short)} of {FILES} files lack writes that returned ({rounds} rounds): {short[:5]}\n{epilog}\n{mount_log}"
    assert "its mount process flushed and exited" in epilog, epilog
    assert "ERROR" not in mount_log, mount_log


def test_the_epilog_waits_for_a_slow_flush_up_to_flush_timeout(cluster, env, redis, moto):
    """The object store stalls while the job's mount flushes at the job's end (moto stopped
    with SIGSTOP): the epilog (the shell script, as slurmd runs it; the plugin runs the same
    `stagefs job epilog`) waits past the old 5 s for the flush instead of killing the mount,
    and the writes reach the store once it answers again. With a short flush_timeout it kills
    the mount at that limit and says so."""
    d = cluster.dir
    meta = redis.url(redis.new_db())
    env.stagefs("format", meta, "stallvol", "--storage", "s3", "--bucket", moto.bucket("stall-bucket"),
                "--access-key", moto.access_key, "--secret-key", moto.secret_key, user="root")
    conf = f"{d}/stall.env"
    with open(conf, "w") as f:
        f.write(f"STAGEFS_BIN={env.bin}\nSTAGEFS_VOLUME={meta}\nSTAGEFS_CACHE_ROOT={d}/cache\nSTAGEFS_MOUNT_ROOT={d}/mnt\n"
                f"STAGEFS_STATE_DIR={d}/jobstate\nSTAGEFS_TIMEOUT=300\n")
    writer = f"{d}/out/writer.py"
    with open(writer, "w") as f:
        f.write(WRITER)
    uid = helpers.pwd.getpwnam(USER).pw_uid
    for job, flush in (("990101", 30), ("990102", 1)):
        base = {**os.environ, "STAGEFS_SLURM_ENV": conf, "SLURM_JOB_ID": job, "SLURM_JOB_USER": USER, "STAGEFS_FLUSH_TIMEOUT": str(flush)}
        p = subprocess.run([f"{REPO}/slurm/prolog.d/stagefs.sh"], env={**base, "SPANK_STAGEFS_STORAGE_STAGE": "/"}, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        mnt = f"{d}/mnt/{job}"
        assert open(f"{d}/jobstate/{job}").read().startswith("ok\n") and helpers.is_mounted(mnt)
        progress = f"{d}/out/progress-{job}"
        w = subprocess.Popen(["runuser", "-u", USER, "--", "python3", writer, f"{mnt}/out-{job}", progress, "50", "4096"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        helpers.wait_until(lambda: os.path.exists(progress) and int(open(progress).read().split()[1]) >= 2, 60, "the writer to write")
        os.kill(moto.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            epilog = subprocess.Popen([f"{REPO}/slurm/epilog.d/stagefs.sh"], env=base, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            if flush > 5:
                helpers.wait_until(lambda: not helpers.is_mounted(mnt), 30, "the epilog to detach the mount")
                # Past the 5 s after which the old epilog killed the mount.
                helpers.wait_until(lambda: time.monotonic() > started + 6, 10, "6 s to pass")
                assert epilog.poll() is None, "the epilog still waits for the flush"
                assert subprocess.run(["pgrep", "-f", f"stagefs mount .*{mnt}"], capture_output=True).returncode == 0, "the mount process runs"
            os.kill(moto.proc.pid, signal.SIGCONT) if flush > 5 else None
            _, err = epilog.communicate(timeout=120)
        finally:
            os.kill(moto.proc.pid, signal.SIGCONT)
        assert epilog.returncode == 0, err
        w.wait(60)
        rounds = int(open(progress).read().split()[1])
        os.unlink(progress)
        assert not helpers.is_mounted(mnt) and not os.path.exists(mnt)
        assert subprocess.run(["pgrep", "-f", f"stagefs mount .*{mnt}"], capture_output=True).returncode != 0, "no mount process is left"
        if flush > 5:
            assert f"unmounted {mnt}; its mount process flushed and exited in" in err, err
            look = env.dir_for("root", "look")
            env.stagefs("mount", "-d", meta, look, "--cache-size", "0", user="root")
            try:
                sizes = [os.path.getsize(f"{look}/out-{job}/f{i}") for i in range(50)]
            finally:
                env.stagefs("umount", look, user="root")
            assert all(s >= rounds * 4096 for s in sizes), f"every write that returned reached the store: {sizes} < {rounds * 4096}"
        else:
            assert f"the mount at {mnt} did not finish flushing within 1 s (flush_timeout): killed pid" in err, err
        assert "flush" in open(f"{d}/cache/{uid}/jobs/{job}/epilog.log").read()


@pytest.fixture(scope="module")
def gateway_cluster(env):
    password = "slurm-pw-" + os.urandom(8).hex()
    r = helpers.Redis(env.root, "--requirepass", password)
    c = Cluster(env, r, gateway=f"redis://:{password}@127.0.0.1:{r.port}/3")
    c.password = password
    yield c
    c.stop()
    r.stop()


def test_a_job_stages_and_mounts_through_the_gateway(gateway_cluster, env):
    """plugstack.conf names only the gateway: the job's staging and mount run as the job's user
    through it, no file the user reads and no process's command line holds the password, and a
    dataset the user may not read fails the job with the reason."""
    c = gateway_cluster
    assert c.password not in open(c.plugstack).read() and "stagefs+unix://" in open(c.plugstack).read()
    script = JOB.format(bin=env.bin, meta=c.meta, sums=f"{c.dir}/small.sha256") + "ps -ww -eo args > $HOME/ps-during-job.txt\n"
    p = c.submit(script, "--storage-stage=/datasets/small", name="gw-ok")
    assert p.returncode == 0, p.stderr
    jobid = p.stdout.strip().split(";")[0]
    state = c.wait_job(jobid)
    out, err = c.output("gw-ok", jobid)
    assert state == "COMPLETED", (out, err)
    assert "/datasets/small: 100.0% cached, 12 of 12 files" in out and out.strip().endswith("12"), (out, err)
    ps = run_as(USER, lambda: open(os.path.expanduser("~/ps-during-job.txt")).read())
    assert f"mount {c.meta} {c.dir}/mnt/{jobid}" in ps and c.password not in ps, ps
    assert_cleaned_up(c, jobid)
    p = c.submit("#!/bin/bash\necho ran\n", "--storage-stage=/private/secret", name="gw-denied")
    jobid = p.stdout.strip().split(";")[0]
    assert c.wait_job(jobid) == "FAILED"
    out, err = c.output("gw-denied", jobid)
    assert "ran" not in out and "permission denied" in err.lower(), (out, err)

