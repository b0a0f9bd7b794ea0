"""Compressed volumes (`format --compress lz4|zstd`): fewer bytes in the bucket for compressible
data, every byte read back equal (whole files, random ranged reads from a cold mount, data
fuzzing), the node's disk cache holding the blocks as the bucket holds them, `status` and `gc`
counting the bytes stored beside the bytes of the blocks, and a gateway's clients reading and
writing them (the client compresses, the gateway stores what it is sent)."""
import errno
import glob
import hashlib
import os
import pwd
import random
import re
import shutil
import signal
import tempfile

import pytest

import datafuzz
import gwproto
import helpers
from helpers import USER, run_as

MiB = 1 << 20
CASES = [("sqlite-local", "lz4"), ("redis-s3", "zstd")]


def text(n):
    """`n` bytes of compressible text (numbered lines)."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += b"row %09d: the quick brown fox jumps over the lazy dog\n" % i
        i += 1
    return bytes(out[:n])


def objects(v, moto):
    """{block key: stored bytes} of the volume's blocks in its bucket."""
    if v.kind == "sqlite-local":
        root = v.fmt_args[v.fmt_args.index("--bucket") + 1]
        return {os.path.relpath(p, root): os.path.getsize(p) for p in glob.glob(f"{root}/{v.name}/chunks/**/*_*_*", recursive=True)}
    bucket = v.fmt_args[v.fmt_args.index("--bucket") + 1].rsplit("/", 1)[1]
    out = {}
    for page in moto.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{v.name}/chunks/"):
        for o in page.get("Contents", []):
            out[o["Key"]] = o["Size"]
    return out


def object_bytes(v, moto, key):
    if v.kind == "sqlite-local":
        root = v.fmt_args[v.fmt_args.index("--bucket") + 1]
        return open(os.path.join(root, key), "rb").read()
    bucket = v.fmt_args[v.fmt_args.index("--bucket") + 1].rsplit("/", 1)[1]
    return moto.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def stored_line(env, v):
    out = env.stagefs("status", v.meta_url).stdout
    return re.search(r"^Stored:\s+(.*)$", out, re.M).group(1)


def make(env, redis, moto, kind, codec, name):
    v = helpers.make_volume(env, kind, redis, moto, name, trash_days=0, more=["--compress", codec])
    return v


@pytest.mark.parametrize("kind,codec", CASES)
def test_a_compressed_volume_stores_less_and_reads_back_equal(env, redis, moto, kind, codec):
    v = make(env, redis, moto, kind, codec, f"it-comp-{codec}")
    out = env.stagefs("status", v.meta_url).stdout
    assert f"Compression: {codec}" in out and "Format:      version 5" in out, out
    data = text(9 * MiB + 12345)  # three blocks, the last one short
    noise = os.urandom(5 * MiB + 7)  # incompressible: stored a little larger, read back the same
    small = text(3000)

    def write():
        os.makedirs(f"{v.mnt}/d")
        for name, b in (("text", data), ("noise", noise), ("small", small)):
            with open(f"{v.mnt}/d/{name}", "wb") as f:
                f.write(b)
        # An overwrite in the middle of a compressed block, and an append.
        with open(f"{v.mnt}/d/text", "r+b") as f:
            f.seek(5 * MiB + 3)
            f.write(b"X" * 1000)
            f.seek(0, 2)
            f.write(b"tail\n")
    run_as(USER, write)
    want_text = bytearray(data)
    want_text[5 * MiB + 3:5 * MiB + 1003] = b"X" * 1000
    want_text = bytes(want_text) + b"tail\n"
    # info: each block's stored size, and the file's total beside its blocks' bytes.
    out = env.stagefs("info", f"{v.mnt}/d/text").stdout
    assert len(re.findall(r"_\d+  \(\d+ bytes stored\)$", out, re.M)) == 5, out
    m = re.search(r"^  stored: .* \(([\d.]+):1\), compression (\w+)$", out, re.M)
    assert m and float(m.group(1)) > 3 and m.group(2) == codec, out
    v.umount(v.mnt)

    stored = objects(v, moto)
    logical = sum(int(k.rsplit("_", 1)[1]) for k in stored)
    assert logical == len(data) + len(noise) + len(small) + 1000 + 5, "every block is there once"
    text_ids = set()
    # The text's blocks take a fraction of their length; the noise's about their length.
    for key, size in stored.items():
        length = int(key.rsplit("_", 1)[1])
        assert size <= length + length // 100 + 64, (key, size)
    assert sum(stored.values()) < len(noise) + len(data) // 3, "compressible data takes less room"

    # A cold mount without a cache: whole files, then random ranged reads, equal.
    v.mnt = v.mount("--cache-size", "0")
    try:
        def read_all():
            return {n: hashlib.sha256(open(f"{v.mnt}/d/{n}", "rb").read()).hexdigest() for n in ("text", "noise", "small")}
        got = run_as(USER, read_all)
        assert got == {"text": hashlib.sha256(want_text).hexdigest(), "noise": hashlib.sha256(noise).hexdigest(),
                       "small": hashlib.sha256(small).hexdigest()}
    finally:
        v.umount(v.mnt)
    v.mnt = v.mount("--cache-size", "0")
    try:
        rng = random.Random(7)
        reads = [(n, rng.randrange(0, len(b)), rng.randrange(1, 70_000)) for n, b in (("text", want_text), ("noise", noise)) for _ in range(200)]

        def ranged():
            out = []
            fds = {n: os.open(f"{v.mnt}/d/{n}", os.O_RDONLY) for n in ("text", "noise")}
            for n, off, ln in reads:
                out.append(os.pread(fds[n], ln, off))
            for fd in fds.values():
                os.close(fd)
            return out
        got = run_as(USER, ranged)
        for (n, off, ln), g in zip(reads, got):
            src = want_text if n == "text" else noise
            assert g == src[off:off + ln], (n, off, ln)
    finally:
        v.umount(v.mnt)

    # The counters: what the bucket holds, as gc lists it, once the mounts are gone.
    line = stored_line(env, v)
    p = env.stagefs("gc", v.meta_url)
    assert f"bucket: {line}" in p.stdout, (line, p.stdout)
    ratio = float(re.search(r"\(([\d.]+):1\)", line).group(1))
    assert ratio > 1.3, line


def set_objects(v, moto, blobs):
    """Puts back (or, with None, deletes) objects of the volume's bucket."""
    for key, body in blobs.items():
        if v.kind == "sqlite-local":
            root = v.fmt_args[v.fmt_args.index("--bucket") + 1]
            path = os.path.join(root, key)
            if body is None:
                os.unlink(path)
            else:
                open(path, "wb").write(body)
        else:
            bucket = v.fmt_args[v.fmt_args.index("--bucket") + 1].rsplit("/", 1)[1]
            if body is None:
                moto.client().delete_object(Bucket=bucket, Key=key)
            else:
                moto.client().put_object(Bucket=bucket, Key=key, Body=body)


@pytest.mark.parametrize("kind,codec", CASES)
def test_the_disk_cache_holds_blocks_as_the_bucket_does(env, redis, moto, kind, codec, request):
    v = make(env, redis, moto, kind, codec, f"it-compcache-{codec}")
    data = text(6 * MiB) + os.urandom(300_000)  # a compressible block and a larger stored one
    want = hashlib.sha256(data).hexdigest()
    run_as(USER, lambda: open(f"{v.mnt}/f", "wb").write(data))
    v.umount(v.mnt)
    cache = env.dir_for(USER, f"compcache-{codec}")
    if kind.endswith("-local"):
        # (A directory bucket's blocks are cached only from another file system than the
        # cache's: BlockStore.cachesReads. /dev/shm is a tmpfs.)
        if os.stat("/dev/shm").st_dev == os.stat(env.root).st_dev:
            pytest.skip("/dev/shm is not another file system here")
        cache = tempfile.mkdtemp(prefix="stagefs-compcache-", dir="/dev/shm")
        os.chown(cache, pwd.getpwnam(USER).pw_uid, pwd.getpwnam(USER).pw_gid)
        request.addfinalizer(lambda: shutil.rmtree(cache, ignore_errors=True))
    v.mnt = v.mount("--cache-dir", cache, "--cache-size", "512")
    try:
        assert run_as(USER, lambda: hashlib.sha256(open(f"{v.mnt}/f", "rb").read()).hexdigest()) == want
    finally:
        v.umount(v.mnt)
    stored = objects(v, moto)
    assert len(stored) == 2
    blobs = {key: object_bytes(v, moto, key) for key in stored}
    packs = b"".join(open(p, "rb").read() for p in glob.glob(f"{cache}/**/packs/*", recursive=True))
    for key, body in blobs.items():
        name = key.rsplit("/", 1)[1]
        found = [p for p in glob.glob(f"{cache}/**/{name}", recursive=True) if ".tmp" not in p]
        if found:
            # A block file: the stored bytes, then a checksum per 64 KiB and the trailer.
            assert open(found[0], "rb").read()[:len(body)] == body, "the cache holds what the bucket holds"
        else:
            # A small stored block: in a pack file, with its checksum.
            assert body in packs, name
        assert len(body) < int(name.rsplit("_", 1)[1]) // 3 + 400_000
    assert sum(len(b) for b in blobs.values()) < 2 * MiB
    # Read from the cache alone (the bucket's copies gone meanwhile): decompressed as written.
    set_objects(v, moto, {k: None for k in blobs})
    try:
        v.mnt = v.mount("--cache-dir", cache, "--cache-size", "512")
        try:
            assert run_as(USER, lambda: hashlib.sha256(open(f"{v.mnt}/f", "rb").read()).hexdigest()) == want
        finally:
            v.umount(v.mnt)
    finally:
        set_objects(v, moto, blobs)


@pytest.mark.parametrize("kind,codec", CASES)
def test_staging_a_compressed_volume(env, redis, moto, kind, codec):
    """stage fetches blocks as stored, checks them, and a mount reads them from the cache alone."""
    v = make(env, redis, moto, kind, codec, f"it-compstage-{codec}")
    data = text(9 * MiB)
    run_as(USER, lambda: open(f"{v.mnt}/f", "wb").write(data))
    v.umount(v.mnt)
    cache = env.dir_for(USER, f"compstage-{codec}")
    v.mnt = v.mount("--cache-dir", cache, "--cache-size", "512")
    try:
        p = env.stagefs("stage", f"{v.mnt}/f", check=False)
        assert p.returncode == 0, p.stdout + p.stderr
        assert env.stagefs("stage", "--check", f"{v.mnt}/f", check=False).returncode == 0
        blobs = {key: object_bytes(v, moto, key) for key in objects(v, moto)}
        set_objects(v, moto, {k: None for k in blobs})
        try:
            assert run_as(USER, lambda: open(f"{v.mnt}/f", "rb").read()) == data
        finally:
            set_objects(v, moto, blobs)
    finally:
        v.umount(v.mnt)


@pytest.mark.parametrize("kind,codec", CASES)
@pytest.mark.parametrize("seed", [11])
def test_data_fuzz_on_a_compressed_volume(env, redis, moto, kind, codec, seed):
    """datafuzz.py (writes, truncates, fallocate, copies, clones, mmap) against its model on a
    compressed volume."""
    v = make(env, redis, moto, kind, codec, f"it-compfuzz-{codec}")
    try:
        d = os.path.join(v.mnt, "fuzz")
        run_as(USER, os.mkdir, d)
        run_as(USER, datafuzz.run, d, seed, 120, True, v.env.bin, v.meta_url)
    finally:
        v.umount(v.mnt)


@pytest.mark.parametrize("kind,codec", CASES)
def test_deletions_count_down_what_the_bucket_holds(env, redis, moto, kind, codec):
    v = make(env, redis, moto, kind, codec, f"it-compdel-{codec}")
    run_as(USER, lambda: open(f"{v.mnt}/a", "wb").write(text(5 * MiB)))
    run_as(USER, lambda: open(f"{v.mnt}/b", "wb").write(text(3 * MiB)))
    v.umount(v.mnt)
    before = stored_line(env, v)
    v.mnt = v.mount()
    try:
        run_as(USER, os.unlink, f"{v.mnt}/a")
        helpers.wait_until(lambda: len(objects(v, moto)) == 1, 30, "a's blocks deleted")
    finally:
        v.umount(v.mnt)
    after = stored_line(env, v)
    assert after != before
    p = env.stagefs("gc", v.meta_url)
    assert f"bucket: {after}" in p.stdout, (after, p.stdout)


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_a_gateway_client_reads_and_writes_a_compressed_volume(env, redis, moto, kind):
    """The client compresses and decompresses; the gateway stores what it is sent (of a length
    the codec allows), serves it by descriptor (file), by signed URL (s3), and counts it."""
    url = redis.url(redis.new_db())
    name = f"it-compgw-{kind}"
    if kind == "file":
        bucket = env.dir_for("root", f"compgw-bucket-{kind}")
        env.stagefs("format", url, name, "--bucket", bucket, "--trash-days", "0", "--compress", "zstd", user="root")
        os.chmod(bucket, 0o700)
    else:
        bucket = moto.bucket(f"{name}-bucket")
        env.stagefs("format", url, name, "--storage", "s3", "--bucket", bucket, "--access-key", moto.access_key, "--secret-key",
                    moto.secret_key, "--trash-days", "0", "--compress", "zstd", user="root")
    sockdir = env.dir_for("root", f"compgw-run-{kind}")
    os.chmod(sockdir, 0o755)
    gw = helpers.Gateway(env, url, os.path.join(sockdir, "gw.sock"))
    mnt = env.dir_for(USER, f"compgw-mnt-{kind}")
    logs = env.dir_for(USER, f"compgw-logs-{kind}")
    data, small = text(7 * MiB + 99), text(2000)
    try:
        env.stagefs("mount", "-d", gw.url, mnt, "--log", os.path.join(logs, "m.log"), "--cache-size", "0", user=USER)

        def write():
            os.mkdir(f"{mnt}/u")
            open(f"{mnt}/u/big", "wb").write(data)
            open(f"{mnt}/u/small", "wb").write(small)
        run_as(USER, write)
        env.stagefs("umount", mnt, user=USER)
        env.stagefs("mount", "-d", gw.url, mnt, "--log", os.path.join(logs, "m.log"), "--cache-size", "0", user=USER)

        def read():
            fd = os.open(f"{mnt}/u/big", os.O_RDONLY)
            part = os.pread(fd, 5000, 4 * MiB + 17)
            os.close(fd)
            return open(f"{mnt}/u/big", "rb").read(), open(f"{mnt}/u/small", "rb").read(), part
        big, sm, part = run_as(USER, read)
        assert big == data and sm == small and part == data[4 * MiB + 17:4 * MiB + 5017]
        env.stagefs("umount", mnt, user=USER)

        def hostile():
            # Blocks that do not make the length their key names are refused (the counters
            # hold what the blocks are): garbage, an empty block, more than the codec's bound.
            c = gwproto.Raw(gw.socket)
            first, stag = c.new_slice_ids(8)
            key = lambda length: f"{name}/chunks/{first // 1000000}/{first // 1000}/{first}_0_{length}"
            out = [gwproto.code(c.put_block, key(4 << 20), first, 8, stag, b"\x28\xb5\x2f\xfd" + os.urandom(100)),
                   gwproto.code(c.put_block, key(4 << 20), first, 8, stag, b""),
                   gwproto.code(c.put_block, key(100), first, 8, stag, os.urandom(300))]
            c.close()
            return out
        assert run_as(USER, hostile) == [errno.EINVAL] * 3
    finally:
        if helpers.is_mounted(mnt):
            env.stagefs("umount", mnt, user=USER, check=False)
        gw.stop(signal.SIGTERM)
    if kind == "file":
        sizes = [os.path.getsize(p) for p in glob.glob(f"{bucket}/{name}/chunks/**/*_*_*", recursive=True)]
    else:
        b = bucket.rsplit("/", 1)[1]
        sizes = [o["Size"] for page in moto.client().get_paginator("list_objects_v2").paginate(Bucket=b, Prefix=f"{name}/chunks/")
                 for o in page.get("Contents", [])]
    assert len(sizes) == 3 and sum(sizes) < len(data) // 3, sizes
    out = env.stagefs("status", url, user="root").stdout
    assert re.search(r"^Stored:\s+.* in the bucket for 7\.0 MiB of blocks", out, re.M), out
