#!/usr/bin/env python3
"""Data-integrity fuzz: random writes, truncates, fallocate (allocate, keep size, punch holes,
zero ranges), copy_file_range (within a file and between files), `stagefs clone` of one file
over another (given the binary), shared mmap writes, closes and reopens on a few files of a mount, every read and, after each sequence, every file
checked byte for byte against a model kept in memory (bytearrays: what POSIX says the files
hold). Sizes cross the 4 MiB block and the 64 MiB chunk, and holes are sparse.

`make test` runs a few fixed seeds (test_fuse.py); `make fuzz` many random ones:
    python3 Tests/integration/datafuzz.py --count 200 --stagefs-bin .build/release/stagefs
"""
import argparse
import ctypes
import mmap
import os
import random
import subprocess
import sys

BLOCK = 4 << 20
CHUNK = 64 << 20
KEEP, PUNCH, ZERO = 0x01, 0x02, 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def fallocate(fd, mode, off, length):
    if _libc.fallocate(fd, mode, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class Model:
    """What each file holds."""

    def __init__(self):
        self.files = {}

    def write(self, name, off, data):
        f = self.files[name]
        if off > len(f):
            f.extend(bytes(off - len(f)))
        f[off:off + len(data)] = data

    def truncate(self, name, size):
        f = self.files[name]
        if size < len(f):
            del f[size:]
        else:
            f.extend(bytes(size - len(f)))

    def zero(self, name, off, length, keep):
        f = self.files[name]
        end = off + length
        stop = min(end, len(f))
        if off < stop:
            f[off:stop] = bytes(stop - off)
        if not keep and end > len(f):
            f.extend(bytes(end - len(f)))


def offsets(rng, size):
    points = [0, size, max(0, size - 1), BLOCK, 2 * BLOCK, CHUNK, CHUNK - 3, rng.randrange(0, max(1, size + BLOCK))]
    return max(0, rng.choice(points) + rng.choice([-5, -1, 0, 0, 1, 7, rng.randrange(-4096, 4096)]))


def lengths(rng):
    return rng.choice([1, 13, 4096, 65537, BLOCK - 1, BLOCK + 5, rng.randrange(1, 300_000)])


def run(root, seed, steps=120, big=True, clone_bin=None, meta_url=None):
    """One sequence in directory `root`; raises AssertionError on the first difference.
    `clone_bin`: the stagefs binary, to clone files with (no clones without it); `meta_url`:
    the volume's, to compact its fragmented files with `stagefs gc --compact` (none without)."""
    rng = random.Random(seed)
    model = Model()
    names = [f"f{i}" for i in range(3)]
    fds = {}
    history = []

    def path(n):
        return os.path.join(root, n)

    def fd(n):
        if n not in fds:
            fds[n] = os.open(path(n), os.O_RDWR | os.O_CREAT, 0o644)
            model.files.setdefault(n, bytearray())
        return fds[n]

    def check(n, what):
        got = open(path(n), "rb").read() if n not in fds else os.pread(fds[n], len(model.files[n]) + 10, 0)
        want = bytes(model.files[n])
        if got != want:
            first = next((i for i in range(min(len(got), len(want))) if got[i] != want[i]), min(len(got), len(want)))
            raise AssertionError(f"seed {seed}: {n} differs after {what} (size {len(got)} vs model {len(want)}, first difference at {first})\n"
                                 + "\n".join(history[-12:]))

    for step in range(steps):
        n = rng.choice(names)
        f = fd(n)
        size = len(model.files[n])
        kind = rng.choices(["write", "truncate", "falloc", "punch", "zero", "copy", "mmap", "read", "reopen", "clone", "compact"],
                           weights=[8, 2, 2, 3, 3, 4, 2, 3, 2, 2 if clone_bin else 0, 1 if meta_url else 0])[0]
        if kind == "write":
            off, data = offsets(rng, size), rng.randbytes(lengths(rng))
            if not big:
                off %= 2 * BLOCK
            os.pwrite(f, data, off)
            model.write(n, off, data)
            what = f"pwrite {n} at {off}, {len(data)} bytes"
        elif kind == "truncate":
            new = offsets(rng, size) if rng.random() < 0.7 else (CHUNK + rng.randrange(BLOCK) if big else size // 2)
            os.ftruncate(f, new)
            model.truncate(n, new)
            what = f"truncate {n} to {new}"
        elif kind == "falloc":
            keep = rng.random() < 0.4
            off, length = offsets(rng, size), lengths(rng)
            fallocate(f, KEEP if keep else 0, off, length)
            if not keep and off + length > size:
                model.truncate(n, off + length)
            what = f"fallocate {n} {'keep ' if keep else ''}{off}+{length}"
        elif kind in ("punch", "zero"):
            keep = kind == "punch" or rng.random() < 0.5
            off, length = offsets(rng, size), lengths(rng)
            fallocate(f, (PUNCH | KEEP) if kind == "punch" else (ZERO | (KEEP if keep else 0)), off, length)
            model.zero(n, off, length, keep)
            what = f"{kind} {n} {'keep ' if keep else ''}{off}+{length}"
        elif kind == "copy":
            src = rng.choice(names)
            s = fd(src)
            ssize = len(model.files[src])
            off, dst_off, length = offsets(rng, ssize), offsets(rng, size), lengths(rng)
            if src == n:
                # Within one file: never overlapping (EINVAL), and never reading past the end
                # (a copy that grows the file would then copy the hole it made).
                length = min(length, max(0, ssize - off))
                if length == 0 or max(off, dst_off) < min(off, dst_off) + length:
                    continue
            copied = 0
            while copied < length:
                got = os.copy_file_range(s, f, length - copied, off + copied, dst_off + copied)
                if got == 0:
                    break
                copied += got
            data = bytes(model.files[src][off:off + copied])
            assert len(data) == copied, f"seed {seed}: copy_file_range copied {copied} bytes, the model has {len(data)}"
            if copied:
                model.write(n, dst_off, data)
            what = f"copy_file_range {src}@{off} -> {n}@{dst_off}, {length} asked, {copied} copied"
        elif kind == "mmap":
            if size == 0:
                continue
            off = rng.randrange(size)
            data = rng.randbytes(min(size - off, rng.choice([1, 100, 5000, 70_000])))
            m = mmap.mmap(f, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            m[off:off + len(data)] = data
            m.flush()
            m.close()
            model.write(n, off, data)
            what = f"mmap write {n} at {off}, {len(data)} bytes"
        elif kind == "clone":
            # A clone of another file (its writes made durable first: a clone reads what was
            # committed) renamed over this one; later writes to either change only that one.
            src = rng.choice([x for x in names if x != n])
            os.fsync(fd(src))
            os.close(fds.pop(n))
            tmp = path(n) + ".clone"
            p = subprocess.run([clone_bin, "clone", path(src), tmp], capture_output=True, text=True)
            if p.returncode != 0:
                raise AssertionError(f"seed {seed}: stagefs clone {src} failed: {p.stderr.strip()}")
            os.rename(tmp, path(n))
            model.files[n] = bytearray(model.files[src])
            what = f"clone {src} over {n}"
        elif kind == "compact":
            # Every file's chunks of two slices or more merged into one, by another process,
            # while the files stay open here (writes made durable first: it compacts what was
            # committed).
            for x in list(fds):
                os.fsync(fds[x])
            p = subprocess.run([clone_bin, "gc", meta_url, "--compact", "--min-slices", "2"], capture_output=True, text=True)
            if p.returncode != 0:
                raise AssertionError(f"seed {seed}: stagefs gc --compact failed: {p.stderr.strip()}")
            what = "gc --compact"
        elif kind == "read":
            off, length = offsets(rng, size), lengths(rng)
            got = os.pread(f, length, off)
            want = bytes(model.files[n][off:off + length])
            history.append(f"[{step}] pread {n} at {off}, {length}")
            if got != want:
                raise AssertionError(f"seed {seed}: pread {n} at {off}, {length}: {len(got)} bytes, model {len(want)}; differ\n" + "\n".join(history[-12:]))
            continue
        else:
            os.close(fds.pop(n))
            what = f"close {n}"
        history.append(f"[{step}] {what}")
        if rng.random() < 0.15:
            check(n, what)
    for n in list(fds):
        os.close(fds.pop(n))
    for n in model.files:
        check(n, "the last step (closed)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--start", type=int)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--stagefs-bin", default=".build/release/stagefs")
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import helpers

    env = helpers.standalone(args.stagefs_bin, "datafuzz")
    redis = moto = None
    failures = 0
    start = args.start if args.start is not None else random.randrange(1, 1 << 30)
    try:
        redis, moto = helpers.Redis(env.root), helpers.Moto()
        for kind in ("sqlite-local", "redis-s3"):
            vol = helpers.make_volume(env, kind, redis, moto, f"datafuzz-{kind}")
            try:
                for seed in range(start, start + args.count):
                    d = vol.path(f"s{seed}")
                    helpers.run_as(helpers.USER, os.mkdir, d)
                    try:
                        helpers.run_as(helpers.USER, run, d, seed, args.steps, True, env.bin, vol.meta_url)
                    except AssertionError as e:
                        failures += 1
                        print(f"{kind}: {e}\n", flush=True)
            finally:
                vol.umount(vol.mnt)
            print(f"{kind}: {args.count} sequences from seed {start}, {failures} failed so far", flush=True)
    finally:
        helpers.stop_all(env, redis, moto)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
