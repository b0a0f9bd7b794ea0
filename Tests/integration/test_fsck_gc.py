"""stagefs fsck and gc through real mounts: fsck is clean on a healthy volume, finds injected
damage and a mount killed with SIGKILL mid-write, and is clean after --repair; gc finds a
planted orphan block and deletes only it; gc --delete run again and again while a writer
writes, clones are made and the trash is purged deletes nothing that anything references."""
import glob
import hashlib
import os
import sqlite3
import subprocess
import time

import pytest

import helpers
from helpers import USER, run_as
from test_dump import object_count, populate, put_object

MiB = 1 << 20


def pytest_generate_tests(metafunc):
    if "kind" in metafunc.fixturenames:
        from conftest import VOLUME_KINDS
        metafunc.parametrize("kind", VOLUME_KINDS)


def fsck(env, v, *args):
    return env.stagefs("fsck", v.meta_url, *args, user="root", check=False, timeout=300)


def gc(env, v, *args):
    return env.stagefs("gc", v.meta_url, *args, user="root", check=False, timeout=300)


def keys(v, moto):
    """The block keys of the volume's bucket."""
    return helpers.volume_keys(v, moto, f"{v.name}/chunks/")


def test_fsck_is_clean_on_a_healthy_volume_and_repairs_a_mount_killed_mid_write(env, redis, moto, kind):
    v = helpers.make_volume(env, kind, redis, moto, f"it-fsck-{kind}", trash_days=1)
    populate(v)
    quota_set = time.time()
    p = fsck(env, v, "--check-objects")
    assert p.returncode == 0 and "0 problem(s)" in p.stderr, p.stdout + p.stderr
    # A writer into the quota directory (the mount reserves quota ahead of its writes) that
    # also holds a file it unlinked; the mount is killed under it.
    m = v.mnt
    writer = subprocess.Popen(["runuser", "-u", USER, "--", "/usr/bin/python3", "-c", f"""
import os, time
held = open({m!r} + '/quota/held', 'wb')
held.write(os.urandom(300000)); held.flush()
os.unlink({m!r} + '/quota/held')
with open({m!r} + '/quota/stream', 'wb') as f:
    while True:
        f.write(os.urandom(1 << 20))
        f.flush()
        time.sleep(0.05)
"""], stderr=subprocess.DEVNULL)
    # (A mount learns that the volume has quotas within 5 s, then reserves ahead of its writes.)
    helpers.wait_until(lambda: os.path.exists(f"{m}/quota/stream") and os.stat(f"{m}/quota/stream").st_size > 8 * MiB
                       and time.time() - quota_set > 6, 60, "the writer writes into the quota")
    pid = helpers.mount_pid(m)
    helpers.kill_quietly(pid)
    subprocess.run(["fusermount3", "-u", "-z", m], capture_output=True)
    writer.kill()
    writer.wait()
    time.sleep(2)
    p = fsck(env, v, "--stale-after", "1s")
    assert p.returncode == 3, p.stdout + p.stderr
    assert "has been silent" in p.stdout, p.stdout
    assert "the quota of directory inode" in p.stdout, p.stdout
    p = fsck(env, v, "--stale-after", "1s", "--repair")
    assert "repaired" in p.stderr, p.stderr
    p = fsck(env, v, "--stale-after", "1s", "--check-objects")
    assert p.returncode == 0 and "0 problem(s)" in p.stderr, p.stdout + p.stderr
    # What the killed mount uploaded and never committed is gc's (if anything).
    gc(env, v, "--delete", "--older-than", "1s")
    v.mnt = v.mount()
    assert run_as(USER, lambda: len(open(f"{v.mnt}/proj/data/big.bin", "rb").read())) == 9 * MiB + 123
    v.umount(v.mnt)


def test_fsck_reports_and_repairs_injected_damage(env, redis, moto):
    v = helpers.make_volume(env, "sqlite-local", redis, moto, "it-fsck-damage", trash_days=0)
    m = v.mnt
    run_as(USER, os.makedirs, f"{m}/d")
    for name in ("a", "b", "c"):
        run_as(USER, lambda name=name: open(f"{m}/d/{name}", "w").write(name))
    ino_a, ino_b = os.stat(f"{m}/d/a").st_ino, os.stat(f"{m}/d/b").st_ino
    v.umount(m)
    db = sqlite3.connect(v.meta_url[len("sqlite3://"):])
    db.execute("DELETE FROM node WHERE ino=?", (ino_a,))  # a name of a gone inode
    attr = bytearray(db.execute("SELECT attr FROM node WHERE ino=?", (ino_b,)).fetchone()[0])
    attr[11:15] = (5).to_bytes(4, "big")  # link count 5 (type, mode, uid, gid come first)
    db.execute("UPDATE node SET attr=? WHERE ino=?", (bytes(attr), ino_b))
    db.commit()
    db.close()
    p = fsck(env, v)
    assert p.returncode == 3, p.stderr
    assert f"/d/a names inode {ino_a}, which does not exist" in p.stdout, p.stdout
    assert f"inode {ino_b} has link count 5, but 1 name(s)" in p.stdout, p.stdout
    assert "run again with --repair" in p.stderr
    p = fsck(env, v, "--repair")
    assert p.returncode == 0, p.stdout + p.stderr
    p = fsck(env, v)
    assert p.returncode == 0 and "0 problem(s)" in p.stderr, p.stdout + p.stderr
    v.mnt = v.mount()
    assert sorted(os.listdir(f"{v.mnt}/d")) == ["b", "c"] and os.stat(f"{v.mnt}/d/b").st_nlink == 1
    v.umount(v.mnt)


def test_gc_finds_a_planted_orphan_and_deletes_only_it(env, redis, moto, kind):
    v = helpers.make_volume(env, kind, redis, moto, f"it-gc-{kind}", trash_days=0)
    m = v.mnt
    run_as(USER, os.makedirs, f"{m}/g")
    data = {f"f{i}": os.urandom(100_000 + i) for i in range(5)}
    for name, b in data.items():
        run_as(USER, lambda name=name, b=b: open(f"{m}/g/{name}", "wb").write(b))
    # A block whose file is gone but whose deletion failed: its slice id is below the counter
    # and nothing records it.
    run_as(USER, lambda: open(f"{m}/g/doomed", "wb").write(b"x" * 5000))
    info = env.stagefs("info", f"{m}/g/doomed").stdout
    doomed = next(w for w in info.split() if "/chunks/" in w)
    run_as(USER, os.unlink, f"{m}/g/doomed")
    helpers.wait_until(lambda: doomed not in keys(v, moto), 60, "the deleter removes the file's block")
    before = keys(v, moto)
    put_object(v, moto, doomed, b"x" * 5000)
    time.sleep(2)
    p = gc(env, v, "--older-than", "1s")
    assert p.returncode == 0 and f"leaked {doomed}" in p.stdout and "1 leaked" in p.stderr, p.stdout + p.stderr
    assert doomed in keys(v, moto), "without --delete nothing goes"
    p = gc(env, v, "--delete", "--older-than", "1s")
    assert f"deleted {doomed}" in p.stdout and "1 deleted" in p.stderr, p.stdout + p.stderr
    assert keys(v, moto) == before
    # A block newer than the window stays.
    put_object(v, moto, doomed, b"x" * 5000)
    p = gc(env, v, "--delete")
    assert "0 leaked" in p.stderr and doomed in keys(v, moto), p.stderr
    for name, b in data.items():
        assert run_as(USER, lambda name=name: open(f"{m}/g/{name}", "rb").read()) == b
    v.umount(m)


def test_gc_delete_during_writes_clones_and_trash_purges_deletes_nothing_referenced(env, redis, moto, kind):
    v = helpers.make_volume(env, kind, redis, moto, f"it-gclive-{kind}", trash_days=1)
    m = v.mnt
    run_as(USER, os.makedirs, f"{m}/old")
    run_as(USER, os.makedirs, f"{m}/new")

    def content(name):
        return hashlib.sha256(name.encode()).digest() * (2000 + len(name) * 97)

    for i in range(12):
        run_as(USER, lambda i=i: open(f"{m}/old/f{i}", "wb").write(content(f"f{i}")))
    # Blocks whose deletion failed, for gc to find among the rest: files deleted and purged,
    # their blocks put back.
    doomed = []
    for i in range(3):
        run_as(USER, lambda i=i: open(f"{m}/old/doomed{i}", "wb").write(content(f"doomed{i}")))
        doomed += [w for w in env.stagefs("info", f"{m}/old/doomed{i}").stdout.split() if "/chunks/" in w]
        run_as(USER, os.unlink, f"{m}/old/doomed{i}")
    for t in glob.glob(f"{m}/.trash/*/*/*-doomed*"):
        env.stagefs("trash", "purge", "--meta", v.meta_url, t, user="root")
    helpers.wait_until(lambda: not set(doomed) & keys(v, moto), 60, "the deleter removes the purged files' blocks")
    for k in doomed:
        put_object(v, moto, k, b"lost")
    # Old enough for gc's window by the time it runs.
    window = 8
    time.sleep(window + 1)
    activity = subprocess.Popen(["runuser", "-u", USER, "--", "/usr/bin/python3", "-c", f"""
import hashlib, os, subprocess, sys, time
m, bin = {m!r}, {env.bin!r}
def content(name):
    return hashlib.sha256(name.encode()).digest() * (2000 + len(name) * 97)
for i in range(12):
    subprocess.run([bin, 'clone', f'{{m}}/old/f{{i}}', f'{{m}}/new/c{{i}}'], check=True, capture_output=True)
    os.unlink(f'{{m}}/old/f{{i}}')
    with open(f'{{m}}/new/w{{i}}', 'wb') as f:
        f.write(content(f'w{{i}}'))
    time.sleep(0.3)
"""])
    purged = 0
    runs = 0
    deleted = 0
    while activity.poll() is None or runs < 2:
        p = gc(env, v, "--delete", "--older-than", f"{window}s")
        assert p.returncode == 0, p.stderr
        deleted += sum(1 for line in p.stdout.splitlines() if line.startswith("deleted "))
        runs += 1
        # Purge what was deleted into the trash (the clones keep the data).
        for t in glob.glob(f"{m}/.trash/*/*/*"):
            if env.stagefs("trash", "purge", "--meta", v.meta_url, t, user="root", check=False).returncode == 0:
                purged += 1
    assert activity.wait() == 0
    assert purged >= 12 and runs >= 2
    assert deleted == len(doomed) and not set(doomed) & keys(v, moto), "the planted blocks, and only they, went"
    for i in range(12):
        assert run_as(USER, lambda i=i: open(f"{m}/new/c{i}", "rb").read()) == content(f"f{i}"), f"clone c{i}"
        assert run_as(USER, lambda i=i: open(f"{m}/new/w{i}", "rb").read()) == content(f"w{i}"), f"file w{i}"
    v.umount(m)
    p = fsck(env, v, "--check-objects")
    assert "is missing from the bucket" not in p.stdout, p.stdout


def slices_of(env, path):
    """The slice records of a file, as `stagefs info` lists them."""
    out = env.stagefs("info", path).stdout
    return sum(int(line.split(":")[1].split()[0]) for line in out.splitlines() if line.strip().startswith("chunk ") and "slice(s)" in line)


def test_a_mount_compacts_a_chunk_of_many_appends_and_gc_compacts_overwrites(env, redis, moto, kind):
    v = helpers.make_volume(env, kind, redis, moto, f"it-compact-{kind}", trash_days=0)
    m = v.mnt
    before = len(keys(v, moto))

    def appends():
        fd = os.open(f"{m}/log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        for i in range(1000):
            os.write(fd, bytes([65 + i % 26]))
            os.fsync(fd)
        os.close(fd)
    run_as(USER, appends)
    want = bytes(65 + i % 26 for i in range(1000))
    # The mount merges a chunk once it has 100 records, and deletes what it replaced.
    helpers.wait_until(lambda: len(keys(v, moto)) <= before + 100, 60, "the appends' objects merged")
    assert slices_of(env, f"{m}/log") < 100
    t = time.time()
    assert run_as(USER, lambda: open(f"{m}/log", "rb").read()) == want
    print(f"compacted 1,000 appends: a cold read of the file took {(time.time() - t) * 1000:.1f} ms")

    # 1,000 overwrites at random places of a 3 MiB file, each made durable.
    import random
    rng = random.Random(7)
    model = bytearray(os.urandom(3 << 20))
    run_as(USER, lambda: open(f"{m}/over", "wb").write(model))

    def overwrite():
        fd = os.open(f"{m}/over", os.O_WRONLY)
        for _ in range(1000):
            off, data = rng.randrange(0, len(model) - 5000), os.urandom(rng.randrange(1, 5000))
            os.pwrite(fd, data, off)
            model[off:off + len(data)] = data
            os.fsync(fd)
        os.close(fd)
        return model
    # (run_as runs it in a child: the model comes back from there.)
    model = run_as(USER, overwrite)
    v.umount(m)
    v.mnt = m = v.mount()
    many = slices_of(env, f"{m}/over")
    assert many > 1
    assert run_as(USER, lambda: open(f"{m}/over", "rb").read()) == bytes(model), "before gc --compact"
    p = env.stagefs("gc", v.meta_url, "--compact", "--min-slices", "2", user="root", timeout=300)
    assert "compacted" in p.stderr, p.stderr
    assert slices_of(env, f"{m}/over") == 1 < many
    assert run_as(USER, lambda: open(f"{m}/over", "rb").read()) == bytes(model)
    assert run_as(USER, lambda: open(f"{m}/log", "rb").read()) == want
    v.umount(m)
    p = fsck(env, v, "--check-objects")
    assert p.returncode == 0, p.stdout + p.stderr
