"""stagefs dump and load through real mounts: a volume written by two users (modes, owners, times,
extended attributes, symlinks, hard links, a fifo, a name that is not UTF-8, a clone, a quota, the
trash) dumped and loaded into the other engine mounts as the same tree with the same bytes and
usage, over the same objects; a dump taken while a writer runs loads into a volume whose files
all read back and whose counts agree; a dump of a million files stays far below its memory bound."""
import hashlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time

import pytest

import helpers
from helpers import OTHER, USER, run_as

MiB = 1 << 20


def pytest_generate_tests(metafunc):
    if "kind" in metafunc.fixturenames:
        from conftest import VOLUME_KINDS
        metafunc.parametrize("kind", VOLUME_KINDS)


def other_engine(env, kind, redis):
    """An empty engine of the other kind: where the dump of a `kind` volume is loaded."""
    if kind == "sqlite-local":
        return redis.url(redis.new_db())
    return f"sqlite3://{env.dir_for('root', 'loaded')}/meta.db"


def load(env, target, dump):
    """`stagefs load` as root (the dump is root's), then a SQLite target given to the user who
    mounts it, as an admin would."""
    p = env.stagefs("load", target, dump, user="root")
    if target.startswith("sqlite3://"):
        d = os.path.dirname(target[len("sqlite3://"):])
        for f in [d] + [os.path.join(d, x) for x in os.listdir(d)]:
            os.chown(f, helpers.pwd.getpwnam(USER).pw_uid, -1)
    return p


def snapshot(root):
    """Everything a reader sees under `root` (as root): each path with its type, mode, owner,
    link count, size, times, extended attributes, link target and contents' digest."""
    out = {}
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            p = os.path.join(d, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root).encode("utf-8", "surrogateescape")
            item = {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "nlink": st.st_nlink, "size": st.st_size,
                    "mtime": st.st_mtime_ns, "ino": st.st_ino}
            if not os.path.islink(p):
                item["xattrs"] = {x: os.getxattr(p, x) for x in sorted(os.listxattr(p))}
            if os.path.islink(p):
                item["target"] = os.readlink(p)
            elif os.path.isfile(p):
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    for b in iter(lambda: f.read(MiB), b""):
                        h.update(b)
                item["sha"] = h.hexdigest()
            out[rel] = item
    return out


def object_count(v, moto):
    return len(helpers.volume_keys(v, moto))


def populate(v):
    m = v.mnt

    def as_user():
        os.makedirs(f"{m}/proj/data/deep")
        os.chmod(f"{m}/proj", 0o750)
        with open(f"{m}/proj/data/big.bin", "wb") as f:
            f.write(os.urandom(9 * MiB + 123))
        with open(f"{m}/proj/data/small.txt", "w") as f:
            f.write("small\n")
        os.link(f"{m}/proj/data/small.txt", f"{m}/proj/data/deep/hard.txt")
        os.symlink("../big.bin", f"{m}/proj/data/deep/sym")
        os.setxattr(f"{m}/proj/data/small.txt", "user.tag", b"\x00\xffbinary")
        os.mkfifo(f"{m}/proj/fifo")
        with open(os.path.join(m.encode(), b"proj/bad\xffname"), "wb") as f:
            f.write(b"not utf-8")
        os.utime(f"{m}/proj/data/small.txt", ns=(1_600_000_000_123_456_789, 1_600_000_001_987_654_321))
        with open(f"{m}/proj/gone.txt", "wb") as f:
            f.write(os.urandom(5000))
        os.unlink(f"{m}/proj/gone.txt")  # into the trash
        os.makedirs(f"{m}/quota")
        with open(f"{m}/quota/q.bin", "wb") as f:
            f.write(os.urandom(100_000))

    run_as(USER, as_user)

    def as_other():
        os.makedirs(f"{m}/other", mode=0o700)
        with open(f"{m}/other/mine", "w") as f:
            f.write("other's\n")
    run_as(OTHER, as_other)
    v.env.stagefs("clone", f"{m}/proj/data/big.bin", f"{m}/proj/data/big-clone.bin")
    v.env.stagefs("quota", "set", v.meta_url, "--path", "/quota", "--capacity", "1G", "--inodes", "100", user="root")


def test_a_dump_loaded_into_the_other_engine_is_the_same_volume_over_the_same_objects(env, redis, moto, kind):
    v = helpers.make_volume(env, kind, redis, moto, f"it-dump-{kind}", trash_days=1)
    populate(v)
    before = snapshot(v.mnt)
    df_before = os.statvfs(v.mnt)
    quota_before = env.stagefs("quota", "get", v.meta_url, "--path", "/quota", user="root").stdout
    assert any(k.startswith(b".trash/") and k.endswith(b"-gone.txt") for k in before), "the deleted file is in the trash"
    v.umount(v.mnt)
    objects = object_count(v, moto)
    dump = os.path.join(env.dir_for("root", "dump"), "vol.json.zst")
    # Not through a gateway, not to a terminal-less stdout of a user who cannot read the volume's keys.
    p = env.stagefs("dump", v.meta_url, dump, "--keep-secret-key", user="root")
    assert "dumped" in p.stderr and oct(os.stat(dump).st_mode & 0o777) == "0o600"
    with open(dump, "rb") as f:
        assert f.read(4) == b"\x28\xb5\x2f\xfd", "a .zst name gives a zstd file"
    target = other_engine(env, kind, redis)
    p = load(env, target, dump)
    assert "loaded" in p.stderr, p.stderr
    # A second load into the same engine is refused: it holds a volume now.
    p = env.stagefs("load", target, dump, user="root", check=False)
    assert p.returncode == 1 and "is not empty" in p.stderr, p.stderr
    v.meta_url = target
    v.mnt = v.mount()
    after = snapshot(v.mnt)
    assert after == before
    df_after = os.statvfs(v.mnt)
    assert (df_after.f_blocks - df_after.f_bfree, df_after.f_files - df_after.f_ffree) == \
        (df_before.f_blocks - df_before.f_bfree, df_before.f_files - df_before.f_ffree)
    assert env.stagefs("quota", "get", target, "--path", "/quota", user="root").stdout == quota_before
    assert object_count(v, moto) == objects, "a load writes no object"
    # The loaded volume works: new files, the clone still shares, the trash restores.
    run_as(USER, lambda: open(f"{v.mnt}/proj/new.txt", "w").write("new\n"))
    assert run_as(USER, lambda: open(f"{v.mnt}/proj/data/big-clone.bin", "rb").read()) == \
        run_as(USER, lambda: open(f"{v.mnt}/proj/data/big.bin", "rb").read())
    v.umount(v.mnt)


# What writes while the volume is dumped: files written whole under a temporary name and renamed
# into place, some moved between directories, some deleted, hard links made and dropped.
WRITER = """
import os, sys
m = sys.argv[1]
n = 0
while not os.path.exists(m + "/w/stop"):
    d, other = ("a", "b") if n % 2 else ("b", "a")
    data = ("file %d " % n).encode() * (n % 500 + 1)
    with open("%s/w/%s/.tmp-%d" % (m, d, n), "wb") as f:
        f.write(data)
    os.rename("%s/w/%s/.tmp-%d" % (m, d, n), "%s/w/%s/f-%d" % (m, d, n))
    if n % 7 == 3:
        os.rename("%s/w/%s/f-%d" % (m, d, n), "%s/w/%s/f-%d" % (m, other, n))
        d = other
    if n % 5 == 4 and os.path.exists("%s/w/a/f-%d" % (m, n - 1)):
        os.unlink("%s/w/a/f-%d" % (m, n - 1))
    if n % 11 == 0:
        os.link("%s/w/%s/f-%d" % (m, d, n), "%s/w/%s/link-%d" % (m, d, n))
    if n % 13 == 0 and os.path.exists("%s/w/b/link-%d" % (m, n - 13)):
        os.unlink("%s/w/b/link-%d" % (m, n - 13))
    n += 1
"""


def test_a_dump_taken_while_a_writer_runs_loads_into_a_volume_that_reads_back(env, redis, moto, kind):
    # With the trash on: what the writer deletes after a dump keeps its objects (README).
    v = helpers.make_volume(env, kind, redis, moto, f"it-dumplive-{kind}", trash_days=1)
    m = v.mnt
    run_as(USER, os.makedirs, f"{m}/w/a")
    run_as(USER, os.makedirs, f"{m}/w/b")
    def content(n):
        return (f"file {n} ".encode() * (n % 500 + 1))

    # The writer: files written whole under a temporary name and renamed into place, moved
    # between directories, some deleted, hard links made and dropped.
    script = os.path.join(env.dir_for(USER, "writer"), "writer.py")
    with open(script, "w") as f:
        f.write(WRITER)
    writer = subprocess.Popen(["runuser", "-u", USER, "--", "/usr/bin/python3", script, m])
    try:
        helpers.wait_until(lambda: writer.poll() is not None or len(os.listdir(f"{m}/w/a")) > 600, 120, "the writer writes")
        assert writer.poll() is None, "the writer runs"
        # (More than a page of a directory, 500 names, so that a directory is read in steps.)
        dumps = []
        for i in range(3):
            path = os.path.join(env.dir_for("root", "dump"), f"live-{i}.json.gz")
            env.stagefs("dump", v.meta_url, path, "--keep-secret-key", user="root")
            dumps.append(path)
    finally:
        run_as(USER, lambda: open(f"{m}/w/stop", "w").close())
        writer.wait(timeout=60)
    assert writer.returncode == 0
    assert len({os.path.getsize(p) for p in dumps}) > 1, "the volume changed between the dumps"
    v.umount(m)
    for path in dumps:
        target = other_engine(env, kind, redis)
        load(env, target, path)
        v.meta_url = target
        mnt = v.mount()
        try:
            files = dirs = 0
            links = {}
            for d, ds, fs in os.walk(mnt):
                dirs += 1
                assert os.stat(d).st_nlink == 2 + len(ds), f"{d}: its link count counts its subdirectories"
                for name in fs:
                    p = os.path.join(d, name)
                    st = os.lstat(p)
                    in_trash = p.startswith(f"{mnt}/.trash/")
                    links.setdefault(st.st_ino, [0 if in_trash else st.st_nlink, 0])[1] += 0 if in_trash else 1
                    files += 1
                    number = re.search(r"(f|link|\.tmp)-(\d+)$", name)
                    if not number:
                        continue
                    n = int(number.group(2))
                    data = open(p, "rb").read()
                    if number.group(1) == ".tmp":
                        assert content(n).startswith(data), f"{p} (being written) reads back what was written"
                    else:
                        assert data == content(n), f"{p} reads back whole"
            for ino, (nlink, names) in links.items():
                assert nlink == names, f"inode {ino}: its link count is its names in the loaded volume"
            sv = os.statvfs(mnt)
            assert sv.f_files - sv.f_ffree == dirs + len(links), "inodes in use are the directories and files found"
        finally:
            v.umount(mnt)


def test_a_dump_of_a_million_files_stays_far_below_its_memory_bound(env, tmp_path):
    """1,000 directories of 1,000 files each, loaded from a generated dump into SQLite, dumped
    again: the dumping process's peak RSS (measured by the kernel) stays under 500 MiB."""
    src = tmp_path / "million.json"
    dirs, per = 1000, 1000
    t = '"a":[1796579623,0],"mt":[1796579623,0],"ct":[1796579623,0]'
    with open(src, "w") as out:
        w = out.write
        w('{"stagefs_dump":{"version":1,"volume":"million","uuid":"00000000-0000-4000-8000-000000000001"},\n')
        w('"format":{"blockSizeKiB":4096,"bucket":"%s","createdAt":1796579623,"name":"million","storage":"file",'
          '"trashDays":0,"uuid":"00000000-0000-4000-8000-000000000001","version":2},\n"records":[\n' % (tmp_path / "bucket"))
        w('{"i":1,"t":"d","m":493,"u":0,"g":0,"n":%d,"s":4096,%s,"p":1}' % (dirs + 2, t))
        for d in range(dirs):
            w(',\n{"i":%d,"t":"d","m":493,"u":1001,"g":1001,"n":2,"s":4096,%s,"p":1}' % (2 + d, t))
        w(',\n{"e":1,"n":[%s]}' % ",".join('["d%d",%d,"d"]' % (d, 2 + d) for d in range(dirs)))
        w(',\n{"z":1,"k":%d}' % dirs)
        ino, sl = 2 + dirs, 1
        for d in range(dirs):
            names = []
            for f in range(per):
                w(',\n{"i":%d,"t":"f","m":420,"u":1001,"g":1001,"n":1,"s":4096,%s,"p":%d,"k":[[0,[[0,%d,4096,0,4096]]]]}'
                  % (ino, t, 2 + d, sl))
                names.append('["f%d",%d,"f"]' % (f, ino))
                ino, sl = ino + 1, sl + 1
            w(',\n{"e":%d,"n":[%s]}' % (2 + d, ",".join(names)))
            w(',\n{"z":%d,"k":0}' % (2 + d))
        w('\n],\n"quotas":[],"counters":{"nextInode":%d,"nextSlice":%d},\n"summary":{"inodes":%d,"entries":%d}}\n'
          % (ino, sl, 1 + dirs + dirs * per, dirs + dirs * per))
    meta = f"sqlite3://{tmp_path}/million.db"
    start = time.time()
    env.stagefs("load", meta, str(src), user="root", timeout=600)
    load_secs = time.time() - start
    # The dump runs in a child of a fresh interpreter, so that the children's peak RSS is its own.
    out = tmp_path / "again.json.zst"
    probe = subprocess.run([sys.executable, "-c", """
import resource, subprocess, sys, time
t = time.time()
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.time() - t)
print(p.stderr, file=sys.stderr)
""", env.bin, "dump", meta, str(out)], capture_output=True, text=True, timeout=600)
    rc, rss_kib, secs = probe.stdout.split()
    assert rc == "0", probe.stderr
    assert "dumped 1001001 inodes" in probe.stderr, probe.stderr
    print(f"1M files: load {load_secs:.1f} s, dump {float(secs):.1f} s, dump peak RSS {int(rss_kib) / 1024:.1f} MiB")
    assert int(rss_kib) < 500 * 1024, f"the dump's peak RSS is {rss_kib} KiB"


def put_object(v, moto, key, data):
    bucket = v.fmt_args[v.fmt_args.index("--bucket") + 1]
    if v.kind == "sqlite-local":
        path = os.path.join(bucket, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        os.chown(path, helpers.pwd.getpwnam(USER).pw_uid, -1)
        return
    moto.client().put_object(Bucket=bucket.rstrip("/").rsplit("/", 1)[1], Key=key, Body=data)


def backups(env, v):
    p = env.stagefs("backup", "list", v.meta_url, user="root")
    return [line.split()[0] for line in p.stdout.splitlines()[1:]]


def backup_times(log):
    """The times of the backups a mount's log says it took."""
    out = []
    for line in open(log).read().splitlines():
        m = re.search(r"metadata backup \S+/meta/dump-(\d{8}-\d{6})\.json\.zst", line)
        if m:
            out.append(time.mktime(time.strptime(m.group(1), "%Y%m%d-%H%M%S")))
    return out


def test_backups_appear_on_schedule_one_mount_at_a_time_thin_and_restore(env, redis, moto, kind):
    v = helpers.make_volume(env, kind, redis, moto, f"it-backup-{kind}", trash_days=0)
    v.umount(v.mnt)
    logs = [os.path.join(v.base, f"backup-{i}.log") for i in range(2)]
    mounts = [v.mount("--backup-meta", "2s", "--log", logs[0])]
    run_as(USER, os.makedirs, f"{mounts[0]}/data/sub")
    for i in range(20):
        run_as(USER, lambda i=i: open(f"{mounts[0]}/data/sub/f{i}", "wb").write(os.urandom(1000 * i)))
    written = time.time()
    helpers.wait_until(lambda: any(t > written for t in backup_times(logs[0])), 60, "a backup after the writes")
    # Two old backups of one week, a month ago: thinning keeps the first.
    old = int(time.time()) - 30 * 86400
    old -= old % (7 * 86400) - 3600
    names = [time.strftime("dump-%Y%m%d-%H%M%S.json.zst", time.gmtime(t)) for t in (old, old + 86400)]
    for n in names:
        put_object(v, moto, f"{v.name}/meta/{n}", b"old")
    # A second mount of the volume, backing up as often: a lease makes it one backup at a time.
    mounts.append(v.mount("--backup-meta", "2s", "--log", logs[1]))
    helpers.wait_until(lambda: names[1] not in backups(env, v), 60, "thinning of the old backups")
    listed = backups(env, v)
    assert names[0] in listed and names[1] not in listed, listed
    helpers.wait_until(lambda: len(backup_times(logs[0])) + len(backup_times(logs[1])) >= 6, 60, "more backups")
    for m in mounts:
        v.umount(m)
    times = sorted(backup_times(logs[0]) + backup_times(logs[1]))
    assert all(b - a >= 2 for a, b in zip(times, times[1:])), f"one backup every 2 s at most, by both mounts: {times}"
    # The latest backup, restored into an empty engine of the other kind, is the volume.
    v.meta_url_original = v.meta_url
    v.mnt = v.mount()
    before = snapshot(f"{v.mnt}/data")
    v.umount(v.mnt)
    target = other_engine(env, kind, redis)
    env_vars = {} if kind == "sqlite-local" else {"AWS_SECRET_ACCESS_KEY": moto.secret_key}
    p = subprocess.run([env.bin, "backup", "restore", v.meta_url, "latest", "--to", target], capture_output=True, text=True,
                       env={**os.environ, **env_vars}, timeout=120)
    assert p.returncode == 0 and "from backup dump-" in p.stderr, p.stderr
    if target.startswith("sqlite3://"):
        d = os.path.dirname(target[len("sqlite3://"):])
        for f in [d] + [os.path.join(d, x) for x in os.listdir(d)]:
            os.chown(f, helpers.pwd.getpwnam(USER).pw_uid, -1)
    v.meta_url = target
    v.mnt = v.mount()
    assert snapshot(f"{v.mnt}/data") == before
    v.umount(v.mnt)


def test_a_gateway_backs_its_volume_up_for_its_clients(env, redis, moto, kind):
    """Users mounting through a gateway take no backups; the gateway does (--backup-meta)."""
    v = helpers.make_volume(env, kind, redis, moto, f"it-gwbackup-{kind}", trash_days=0)
    run_as(USER, lambda: open(f"{v.mnt}/f", "w").write("through the gateway's backups\n"))
    v.umount(v.mnt)
    if kind == "sqlite-local":
        # (The gateway's bucket is its own: 0700, root's.)
        bucket = v.fmt_args[v.fmt_args.index("--bucket") + 1]
        for d, ds, fs in os.walk(bucket):
            for x in [d] + [os.path.join(d, f) for f in fs]:
                os.chown(x, 0, 0)
        os.chmod(bucket, 0o700)
    gw = helpers.Gateway(env, v.meta_url, os.path.join(env.dir_for("root", "gwsock"), "gw.sock"), "--backup-meta", "2s")
    try:
        helpers.wait_until(lambda: len(backups(env, v)) >= 1, 30, "a backup by the gateway")
    finally:
        gw.stop(signal.SIGTERM)
