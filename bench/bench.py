#!/usr/bin/env python3
"""Side-by-side file-system benchmark: runs the same workload in each mountpoint and prints
figures and ratios (StageFS / JuiceFS; above 1 means StageFS is faster).

Usage: bench.py --name stagefs:/mnt/a --name juicefs:/mnt/b [--remount-cmd ...]
The caller (run.sh) mounts and remounts; this script only does file operations and timing.
"""
import argparse
import json
import os
import subprocess
import sys
import time


def drop_caches():
    subprocess.run(["sync"])
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def big_write(root, size_mib):
    path = os.path.join(root, "big.bin")
    block = os.urandom(1 << 20)
    os.sync()
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for i in range(size_mib):
        os.write(fd, block[i % 7:] + block[:i % 7])
    os.fsync(fd)
    os.close(fd)
    return size_mib / (time.perf_counter() - start)


def big_read(root, size_mib):
    path = os.path.join(root, "big.bin")
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    total = 0
    while True:
        b = os.read(fd, 1 << 20)
        if not b:
            break
        total += len(b)
    os.close(fd)
    assert total == size_mib << 20, total
    return size_mib / (time.perf_counter() - start)


def small_files(root, count, dirs):
    base = os.path.join(root, "small")
    os.makedirs(base, exist_ok=True)
    for d in range(dirs):
        os.makedirs(os.path.join(base, f"d{d}"), exist_ok=True)
    paths = [os.path.join(base, f"d{i % dirs}", f"f{i}") for i in range(count)]
    payload = os.urandom(4096)
    out = {}
    os.sync()
    start = time.perf_counter()
    for p in paths:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, payload)
        os.close(fd)
    out["create"] = count / (time.perf_counter() - start)
    time.sleep(1.5)  # let kernel attribute caches expire so stat reaches the file system
    start = time.perf_counter()
    for p in paths:
        os.stat(p)
    out["stat"] = count / (time.perf_counter() - start)
    drop_caches()
    start = time.perf_counter()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.read(fd, 8192)
        os.close(fd)
    out["read"] = count / (time.perf_counter() - start)
    os.sync()
    start = time.perf_counter()
    for p in paths:
        os.unlink(p)
    out["unlink"] = count / (time.perf_counter() - start)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mount", required=True, help="mountpoint to run in")
    ap.add_argument("--phase", choices=["write", "read", "small"], required=True)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--dirs", type=int, default=100)
    ap.add_argument("--tag", default="", help="subdirectory for this round")
    a = ap.parse_args()
    if a.tag:
        a.mount = os.path.join(a.mount, a.tag)
        os.makedirs(a.mount, exist_ok=True)
    if a.phase == "write":
        res = {"write_mibs": big_write(a.mount, a.size_mib)}
    elif a.phase == "read":
        drop_caches()
        res = {"read_mibs": big_read(a.mount, a.size_mib)}
    else:
        res = {f"{k}_per_s": v for k, v in small_files(a.mount, a.files, a.dirs).items()}
    json.dump(res, sys.stdout)


if __name__ == "__main__":
    main()
