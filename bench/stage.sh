#!/bin/sh
# `stagefs stage` vs `juicefs warmup` (1.4.2) on the same machine, the same redis-server and the
# same kind of bucket (a local directory each), from a cold cache both times:
#   - 4 files of 256 MiB;
#   - 10,000 files of 4 KiB in 100 directories.
#   bench/stage.sh [path/to/stagefs]        (BIG_FILES, BIG_MIB, SMALL_FILES, SMALL_DIRS to change sizes)
set -eu
BIN=$(readlink -f "${1:-.build/release/stagefs}")
BIG_FILES=${BIG_FILES:-4}
BIG_MIB=${BIG_MIB:-256}
SMALL_FILES=${SMALL_FILES:-10000}
SMALL_DIRS=${SMALL_DIRS:-100}
HERE=$(cd "$(dirname "$0")" && pwd)
BENCH_PREFIX=stagefs-stagebench
BENCH_MOUNTS="sfs jfs"
. "$HERE/lib.sh"
mkdir -p "$WORK/src"
"$BIN" format "$SFS_META" sfsstage --bucket "$WORK/sfs-data" >/dev/null
juicefs format "$JFS_META" jfsstage --storage file --bucket "$WORK/jfs-data/" >/dev/null 2>&1

# The same dataset into both volumes, through mounts without a disk cache.
python3 - "$WORK/src" "$BIG_FILES" "$BIG_MIB" "$SMALL_FILES" "$SMALL_DIRS" <<'PY'
import os, sys
root, nbig, mib, nsmall, ndirs = sys.argv[1], *map(int, sys.argv[2:])
os.makedirs(f"{root}/big"); os.makedirs(f"{root}/small")
for i in range(nbig):
    with open(f"{root}/big/f{i}", "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
for d in range(ndirs):
    os.makedirs(f"{root}/small/d{d}")
for i in range(nsmall):
    with open(f"{root}/small/d{i % ndirs}/f{i}", "wb") as f:
        f.write(os.urandom(4096))
PY
"$BIN" mount -d "$SFS_META" "$WORK/sfs" --cache-size 0 --log "$WORK/sfs.log" >/dev/null
juicefs mount -d "$JFS_META" "$WORK/jfs" --cache-size 0 --no-usage-report --log "$WORK/jfs.log" >/dev/null 2>&1
cp -r "$WORK/src/big" "$WORK/src/small" "$WORK/sfs/"
cp -r "$WORK/src/big" "$WORK/src/small" "$WORK/jfs/"
rm -rf "$WORK/src"
"$BIN" umount "$WORK/sfs"
juicefs umount "$WORK/jfs" >/dev/null 2>&1
# JuiceFS warms up through a mount, with a disk cache this time.
juicefs mount -d "$JFS_META" "$WORK/jfs" --cache-dir "$WORK/jfs-cache" --no-usage-report --log "$WORK/jfs.log" >/dev/null 2>&1

now() { python3 -c 'import time; print(time.time())'; }
timed() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; t0=$(now); "$@" >/dev/null 2>&1; t1=$(now); python3 -c "print($t1 - $t0)"; }

S_BIG=$(timed "$BIN" stage --quiet --meta "$SFS_META" --cache-dir "$WORK/sfs-cache" /big)
J_BIG=$(timed juicefs warmup "$WORK/jfs/big")
S_SMALL=$(timed "$BIN" stage --quiet --meta "$SFS_META" --cache-dir "$WORK/sfs-cache" /small)
J_SMALL=$(timed juicefs warmup "$WORK/jfs/small")
# Check both caches hold the data (not a silent no-op).
"$BIN" stage --meta "$SFS_META" --cache-dir "$WORK/sfs-cache" /big /small --check
du -sh "$WORK/sfs-cache" "$WORK/jfs-cache" | sed 's|'"$WORK"'/||'

python3 - "$S_BIG" "$J_BIG" "$S_SMALL" "$J_SMALL" "$BIG_FILES" "$BIG_MIB" "$SMALL_FILES" <<'PY'
import sys
sb, jb, ss, js = map(float, sys.argv[1:5])
nbig, mib, nsmall = map(int, sys.argv[5:8])
mb = nbig * mib
print("| dataset, cold cache | stagefs stage | juicefs warmup | ratio |")
print("|---|---:|---:|---:|")
print(f"| {nbig} x {mib} MiB (MiB/s) | {mb / sb:.1f} | {mb / jb:.1f} | {jb / sb:.2f} |")
print(f"| {nsmall} x 4 KiB in 100 dirs (files/s) | {nsmall / ss:.0f} | {nsmall / js:.0f} | {js / ss:.2f} |")
print(f"| seconds, big / small | {sb:.2f} / {ss:.2f} | {jb:.2f} / {js:.2f} | |")
PY
