"""Installing on a cluster: `make install`/`uninstall`, `module load fs-client` with Environment
Modules and with Lmod, `mount -t stagefs` and fstab lines, and `stagefs bind-config` checked by
real binds in bwrap (bubblewrap) namespaces."""
import csv
import os
import shlex
import shutil
import subprocess

import pytest

import helpers
from helpers import USER, run_as

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LMOD = "/opt/stagefs-test/lmod/usr/share/lmod/lmod/libexec/lmod"


@pytest.fixture(scope="module")
def prefix(env):
    p = env.dir_for("root", "prefix")
    os.chmod(p, 0o755)
    r = make_install("install", f"PREFIX={p}", f"BIN={os.path.abspath(env.bin)}")
    assert r.returncode == 0, r.stderr
    yield p
    subprocess.run(["make", "-s", "-C", REPO, "uninstall", f"PREFIX={p}"], capture_output=True)


def make_install(*args):
    """`make install` of the binary the tests run (BIN=...): nothing is built (the plugin is
    made only when missing), so the install is quick and races no build."""
    return subprocess.run(["make", "-s", "-C", REPO, *args], capture_output=True, text=True)


# Installed files that name paths of the install (templates with @PREFIX@).
TEMPLATED = ["lib/systemd/system/stagefs@.service", "lib/systemd/system/stagefs-gateway@.service", "share/stagefs/modulefiles/fs-client/0.1.0",
             "share/stagefs/slurm/plugstack.conf.d/stagefs.conf", "share/stagefs/slurm/slurm.conf.snippet",
             "share/stagefs/slurm/stagefs.env", "share/stagefs/slurm/prolog.d/stagefs.sh",
             "share/stagefs/slurm/epilog.d/stagefs.sh"]


def installed_text_files(root):
    """Every installed file that is text (no NUL byte), relative to `root`."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            data = open(path, "rb").read()
            if b"\0" not in data:
                out[os.path.relpath(path, root)] = data.decode()
    return out


def test_install_layout_and_uninstall_leaves_nothing(env):
    p = env.dir_for("root", "prefix-roundtrip")
    r = make_install("install", f"PREFIX={p}", f"BIN={os.path.abspath(env.bin)}")
    assert r.returncode == 0, r.stderr
    assert "Build" not in r.stdout + r.stderr, "nothing was built"
    for f in ["bin/stagefs", "sbin/mount.stagefs", "lib/stagefs/spank_stagefs.so", "lib/systemd/system/stagefs@.service",
              "lib/systemd/system/stagefs-gateway@.service",
              "share/stagefs/modulefiles/fs-client/0.1.0", "share/stagefs/modulefiles/fs-client/.version",
              "share/stagefs/singularity/README.md", "share/stagefs/singularity/apptainer.conf.snippet",
              "share/stagefs/slurm/README.md", "share/stagefs/slurm/prolog.d/stagefs.sh", "share/stagefs/slurm/epilog.d/stagefs.sh",
              "share/stagefs/slurm/plugstack.conf.d/stagefs.conf", "share/stagefs/slurm/slurm.conf.snippet",
              "share/stagefs/slurm/stagefs.env"]:
        assert os.path.exists(os.path.join(p, f)), f
    assert f"{p}/bin/stagefs" in open(f"{p}/lib/systemd/system/stagefs@.service").read()
    assert f"ExecStart={p}/bin/stagefs gateway --config /etc/stagefs/%i.conf" in open(f"{p}/lib/systemd/system/stagefs-gateway@.service").read()
    assert f"set prefix      {p}" in open(f"{p}/share/stagefs/modulefiles/fs-client/0.1.0").read()
    assert subprocess.run([f"{p}/bin/stagefs", "--version"], capture_output=True, text=True).stdout.strip()
    r = subprocess.run(["make", "-s", "-C", REPO, "uninstall", f"PREFIX={p}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert os.listdir(p) == [], os.listdir(p)


def test_installed_files_name_the_prefix_they_were_installed_in(env):
    """After `make install PREFIX=<dir>` the plugstack line, the slurm.conf snippet, stagefs.env,
    the modulefile, the systemd unit and the scripts name <dir>; no installed text file names
    /usr/local (the default prefix) or an @PREFIX@ left over."""
    p = env.dir_for("root", "prefix-opt")
    r = make_install("install", f"PREFIX={p}", f"BIN={os.path.abspath(env.bin)}")
    assert r.returncode == 0, r.stderr
    try:
        texts = installed_text_files(p)
        for f in TEMPLATED:
            assert p in texts[f], f"{f} names {p}"
        for f, text in texts.items():
            assert "/usr/local" not in text, f"{f} still names /usr/local"
            assert "@PREFIX@" not in text, f"{f} has an unreplaced @PREFIX@"
        conf = texts["share/stagefs/slurm/plugstack.conf.d/stagefs.conf"]
        line = next(l for l in conf.splitlines() if l.startswith("required "))
        assert line.split()[1] == f"{p}/lib/stagefs/spank_stagefs.so" and os.path.exists(line.split()[1])
        assert f"stagefs={p}/bin/stagefs" in line.split()
        assert f"include {p}/share/stagefs/slurm/plugstack.conf.d/stagefs.conf" in conf, "the include line to copy"
        env_file = texts["share/stagefs/slurm/stagefs.env"]
        assert f"STAGEFS_BIN={p}/bin/stagefs" in env_file.splitlines()
        snippet = texts["share/stagefs/slurm/slurm.conf.snippet"]
        assert f"#Prolog={p}/share/stagefs/slurm/prolog.d/stagefs.sh" in snippet
        assert os.path.exists(f"{p}/share/stagefs/slurm/prolog.d/stagefs.sh")
        # The installed scripts are valid sh and still executable.
        for kind in ("prolog", "epilog"):
            script = f"{p}/share/stagefs/slurm/{kind}.d/stagefs.sh"
            assert os.access(script, os.X_OK)
            assert subprocess.run(["sh", "-n", script]).returncode == 0
        # The unit, linked the way the README says for a prefix systemd does not read.
        sysroot = env.dir_for("root", "sysroot")
        unit = f"{p}/lib/systemd/system/stagefs@.service"
        os.makedirs(f"{sysroot}/etc/systemd/system")
        os.makedirs(os.path.dirname(f"{sysroot}{unit}"))
        shutil.copy(unit, f"{sysroot}{unit}")
        r = subprocess.run(["systemctl", f"--root={sysroot}", "link", unit], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        r = subprocess.run(["systemctl", f"--root={sysroot}", "enable", "stagefs@mnt-data"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert os.readlink(f"{sysroot}/etc/systemd/system/stagefs@mnt-data.service") == unit
    finally:
        make_install("uninstall", f"PREFIX={p}")


def test_a_packagers_install_lands_under_destdir_and_names_prefix_only(env):
    destdir = env.dir_for("root", "pkg")
    r = make_install("install", f"DESTDIR={destdir}", "PREFIX=/usr", f"BIN={os.path.abspath(env.bin)}")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(destdir)) == ["usr"], "every file lands under DESTDIR/PREFIX"
    for f in ["bin/stagefs", "lib/stagefs/spank_stagefs.so", *TEMPLATED]:
        assert os.path.exists(f"{destdir}/usr/{f}"), f
    texts = installed_text_files(destdir)
    assert texts
    for f, text in texts.items():
        assert destdir not in text, f"{f} names DESTDIR"
        assert "/usr/local" not in text and "@PREFIX@" not in text, f
    for f in TEMPLATED:
        assert "/usr" in texts[f"usr/{f}"], f
    assert "ExecStart=/usr/bin/stagefs mount" in texts["usr/lib/systemd/system/stagefs@.service"]
    assert "systemctl link" not in r.stdout, "/usr/lib/systemd/system is where systemd looks"
    r = make_install("uninstall", f"DESTDIR={destdir}", "PREFIX=/usr")
    assert r.returncode == 0, r.stderr
    assert [d for d, _, files in os.walk(destdir) if files] == [], "uninstall removes every file"


MODULE_SCRIPT = r"""
set -e
{init}
before_path=$PATH
before_a=${{APPTAINER_BINDPATH-unset}}
before_s=${{SINGULARITY_BINDPATH-unset}}
module use {modules}
module load fs-client
echo "VERSION=$(stagefs --version)"
echo "VOLUME=$STAGEFS_VOLUME"
echo "CACHE=$STAGEFS_CACHE_ROOT"
echo "MOUNTROOT=$STAGEFS_MOUNT_ROOT"
echo "A=$APPTAINER_BINDPATH"
echo "S=$SINGULARITY_BINDPATH"
echo "WHICH=$(command -v stagefs)"
module unload fs-client
module unuse {modules}
[ "$PATH" = "$before_path" ] && echo PATH_RESTORED
[ "${{APPTAINER_BINDPATH-unset}}" = "$before_a" ] && echo A_RESTORED
[ "${{SINGULARITY_BINDPATH-unset}}" = "$before_s" ] && echo S_RESTORED
[ -z "${{STAGEFS_VOLUME-}}" ] && echo VOLUME_UNSET
module use {modules}
echo ---help
module help fs-client 2>&1
echo ---whatis
module whatis fs-client 2>&1
"""

ENV_MODULES = "source /usr/share/modules/init/bash"
LMOD_INIT = f'module() {{ eval "$({LMOD} bash "$@")"; }}'


@pytest.mark.parametrize("tool", ["environment-modules", "lmod"])
def test_module_load_and_unload(prefix, tool):
    init = ENV_MODULES if tool == "environment-modules" else LMOD_INIT
    script = MODULE_SCRIPT.format(init=init, modules=f"{prefix}/share/stagefs/modulefiles")
    env = {"HOME": "/tmp", "PATH": "/usr/bin:/bin", "APPTAINER_BINDPATH": "/site/data"}
    p = subprocess.run(["runuser", "-u", USER, "--", "env", "-i", *[f"{k}={v}" for k, v in env.items()], "bash", "-c", script],
                       capture_output=True, text=True)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "VERSION=0.1.0" in out
    assert f"WHICH={prefix}/bin/stagefs" in out
    assert "VOLUME=stagefs+unix:///run/stagefs/data.sock" in out and "CACHE=/local/stagefs/cache" in out and "MOUNTROOT=/local/stagefs/mnt" in out
    assert "A=/site/data,/local/stagefs/cache,/local/stagefs/mnt" in out, "appended to what was there, comma-separated"
    assert "S=/local/stagefs/cache,/local/stagefs/mnt" in out
    for marker in ("PATH_RESTORED", "A_RESTORED", "S_RESTORED", "VOLUME_UNSET"):
        assert marker in out, (marker, out)
    help_text = out.split("---help")[1].split("---whatis")[0]
    assert "the StageFS file system client" in help_text
    assert "StageFS client 0.1.0: mount volumes without root" in out.split("---whatis")[1]


def test_module_test_runs_the_binary(prefix):
    p = subprocess.run(["bash", "-c", f"{ENV_MODULES}; module use {prefix}/share/stagefs/modulefiles; module test fs-client"],
                       capture_output=True, text=True)
    assert "stagefs 0.1.0 runs" in p.stderr and "PASS" in p.stderr, p.stderr


@pytest.fixture
def mount_helper(prefix):
    """mount(8) finds helpers in /sbin only: link ours there for the test."""
    link = "/sbin/mount.stagefs"
    existed = os.path.lexists(link)
    if not existed:
        os.symlink(f"{prefix}/sbin/mount.stagefs", link)
    yield
    if not existed:
        os.unlink(link)


def test_mount_t_stagefs_and_an_fstab_line(env, mount_helper):
    base = env.dir_for("root", "mt")
    meta = f"sqlite3://{base}/meta.db"
    env.stagefs("format", meta, "mtvol", "--bucket", f"{base}/data", user="root")
    m = f"{base}/m"
    os.makedirs(m)
    p = subprocess.run(["mount", "-t", "stagefs", meta, m, "-o", f"_netdev,allow_other,cache-dir={base}/cache,attr-cache=2"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert helpers.is_mounted(m)
    with open(f"{m}/hello", "w") as f:
        f.write("through mount -t")
    assert run_as(USER, lambda: open(f"{m}/hello").read()) == "through mount -t", "allow_other was passed"
    assert subprocess.run(["umount", m]).returncode == 0
    assert not helpers.is_mounted(m) and not os.path.exists(f"{m}/hello")
    fstab = f"{base}/fstab"
    with open(fstab, "w") as f:
        f.write(f"# StageFS\n{meta}  {m}  stagefs  _netdev,cache-dir={base}/cache  0 0\n")
    p = subprocess.run(["mount", "--fstab", fstab, m], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert open(f"{m}/hello").read() == "through mount -t"
    assert subprocess.run(["umount", m]).returncode == 0
    assert not helpers.is_mounted(m)
    # umount(8) detaches at once; the mount process then flushes, ends its session and exits.
    helpers.wait_until(lambda: subprocess.run(["pgrep", "-f", f"stagefs mount .*{m}"], capture_output=True).returncode != 0, 30,
                       "the mount process to exit after umount")


@pytest.fixture
def user_mount(env, redis):
    """A user's mount with a file, a disk cache with blocks in it, and a scratch directory."""
    base = env.dir_for(USER, "bind")
    user_mount.db = getattr(user_mount, "db", 44) + 1
    url = redis.url(user_mount.db)
    env.stagefs("format", url, "bindvol", "--bucket", f"{base}/data")
    m, cache = f"{base}/m", f"{base}/cache"
    run_as(USER, os.makedirs, m)
    env.stagefs("mount", "-d", url, m, "--cache-dir", cache)
    run_as(USER, lambda: open(f"{m}/data.txt", "w").write("inside and outside"))
    yield base, m, cache
    env.stagefs("umount", m)


def bwrap(binds, command):
    """Runs `command` in a new namespace where /tmp is empty but for the binds."""
    args = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    for src, dst, ro in binds:
        args += ["--ro-bind" if ro else "--bind", src, dst]
    return run_as(USER, lambda: subprocess.run(args + ["sh", "-c", command], capture_output=True, text=True))


def parse_b_specs(specs):
    out = []
    for spec in specs:
        parts = spec.split(":")
        src = parts[0]
        dst = parts[1] if len(parts) > 1 else src
        out.append((src, dst, len(parts) > 2 and parts[2] == "ro"))
    return out


@pytest.mark.parametrize("fmt", ["args", "env"])
def test_bind_config_binds_show_the_mount_and_the_cache(env, user_mount, fmt):
    base, m, cache = user_mount
    user_cache = f"{cache}/{helpers.pwd.getpwnam(USER).pw_uid}"
    out = env.stagefs("bind-config", "--format", fmt, m, user_cache).stdout.strip()
    if fmt == "args":
        words = shlex.split(out)
        assert words[0::2] == ["-B", "-B"]
        binds = parse_b_specs(words[1::2])
    else:
        binds = parse_b_specs(out.split(","))
    assert [b[0] for b in binds] == [m, user_cache]
    r = bwrap(binds, f"cat {m}/data.txt; ls {user_cache}; echo more > {m}/new.txt && echo WROTE")
    assert r.returncode == 0, r.stderr
    assert "inside and outside" in r.stdout and "index.db" in r.stdout and "WROTE" in r.stdout
    assert run_as(USER, lambda: open(f"{m}/new.txt").read()) == "more\n"
    # Read-only binds refuse writes.
    ro = env.stagefs("bind-config", "--format", fmt, "--read-only", m).stdout.strip()
    specs = shlex.split(ro)[1::2] if fmt == "args" else ro.split(",")
    binds = parse_b_specs(specs)
    assert binds == [(m, m, True)]
    r = bwrap(binds, f"cat {m}/data.txt; echo x > {m}/denied.txt")
    assert "inside and outside" in r.stdout
    assert r.returncode != 0 and "Read-only file system" in r.stderr
    # Paths these formats cannot carry are refused with a pointer to --format mount.
    odd = f"{base}/a,b"
    run_as(USER, os.makedirs, odd)
    p = env.stagefs("bind-config", "--format", fmt, odd, check=False)
    assert p.returncode == 2 and "--format mount" in p.stderr


def test_mount_format_round_trips_awkward_paths(env, user_mount):
    base, m, cache = user_mount
    awkward = [f"{base}/with space", f"{base}/with,comma", f"{base}/with:colon", f"{base}/all of, them:too"]
    for i, d in enumerate(awkward):
        run_as(USER, os.makedirs, d)
        run_as(USER, lambda d=d, i=i: open(f"{d}/f", "w").write(f"file {i}"))
    out = env.stagefs("bind-config", "--format", "mount", "--read-only", *awkward).stdout.strip()
    words = shlex.split(out)
    assert words[0::2] == ["--mount"] * len(awkward)
    parsed = []
    for spec in words[1::2]:
        fields = next(csv.reader([spec]))
        kv = dict(f.split("=", 1) for f in fields if "=" in f)
        assert kv["type"] == "bind" and "ro" in fields
        assert kv["src"] == kv["dst"]
        parsed.append(kv["src"])
    assert parsed == awkward, "every path comes back as it went in"
    r = bwrap([(p, p, True) for p in parsed], "; ".join(f"cat '{p}/f'" for p in parsed))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "file 0file 1file 2file 3"
    conf = env.stagefs("bind-config", "--format", "conf", m).stdout
    assert conf.strip() == f"bind path = {m}"


def test_bind_config_defaults_to_the_jobs_mount_and_cache(env, user_mount):
    base, m, cache = user_mount
    uid = helpers.pwd.getpwnam(USER).pw_uid
    p = subprocess.run(["runuser", "-u", USER, "--", "env", f"STAGEFS_MOUNT={m}", f"STAGEFS_CACHE_DIR={cache}", env.bin, "bind-config"],
                       capture_output=True, text=True)
    assert p.stdout.strip() == f"{m},{cache}/{uid}"
    # Outside a job: the user's StageFS mounts and their caches.
    p = env.stagefs("bind-config")
    binds = p.stdout.strip().split(",")
    assert m in binds and f"{cache}/{uid}" in binds
