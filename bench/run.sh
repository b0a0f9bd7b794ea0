#!/bin/sh
# StageFS vs JuiceFS 1.4.2 on the same machine, the same redis-server (two databases) and the
# same kind of bucket (a local directory each). Prints a table of figures and ratios.
#   bench/run.sh [path/to/stagefs]
# Environment: SIZE_MIB (big file, default 1024), FILES (small files per round, default 10000),
# DIRS (100), ROUNDS (small-file rounds, default 3; medians are reported).
set -eu
BIN=$(readlink -f "${1:-.build/release/stagefs}")
SIZE_MIB=${SIZE_MIB:-1024}
FILES=${FILES:-10000}
DIRS=${DIRS:-100}
HERE=$(cd "$(dirname "$0")" && pwd)
BENCH_PREFIX=stagefs-bench
BENCH_MOUNTS="sfs jfs"
. "$HERE/lib.sh"
"$BIN" format "$SFS_META" sfsbench --bucket "$WORK/sfs-data" >/dev/null
juicefs format "$JFS_META" jfsbench --storage file --bucket "$WORK/jfs-data/" --no-update >/dev/null 2>&1 ||
    juicefs format "$JFS_META" jfsbench --storage file --bucket "$WORK/jfs-data/" >/dev/null 2>&1

mount_sfs() { "$BIN" mount -d "$SFS_META" "$WORK/sfs" --cache-size 0 --log "$WORK/sfs.log" >/dev/null; }
mount_jfs() { juicefs mount -d "$JFS_META" "$WORK/jfs" --cache-size 0 --no-usage-report --log "$WORK/jfs.log" >/dev/null 2>&1; }
umount_sfs() { "$BIN" umount "$WORK/sfs"; }
umount_jfs() { juicefs umount "$WORK/jfs" >/dev/null 2>&1; }
rss_kib() { ps -o rss= -p "$1" | tr -d ' '; }
sfs_pid() { pgrep -f "stagefs mount .*$WORK/sfs" | head -1; }
jfs_pid() { pgrep -f "juicefs mount .*$WORK/jfs" | tail -1; }

run() { settle; python3 "$HERE/bench.py" --mount "$1" --size-mib "$SIZE_MIB" --files "$FILES" --dirs "$DIRS" --phase "$2" ${3:+--tag "$3"}; }

mount_sfs; mount_jfs
S_W=$(run "$WORK/sfs" write); J_W=$(run "$WORK/jfs" write)
# Cold read: remount (empty client caches; JuiceFS without disk cache) and drop the page cache.
umount_sfs; umount_jfs; mount_sfs; mount_jfs
S_R=$(run "$WORK/sfs" read); J_R=$(run "$WORK/jfs" read)
# Small files: ROUNDS rounds, alternating, each in a fresh directory; the median is reported.
S_S="["; J_S="["
r=1
while [ "$r" -le "${ROUNDS:-3}" ]; do
    [ "$r" -gt 1 ] && { S_S="$S_S,"; J_S="$J_S,"; }
    S_S="$S_S$(run "$WORK/sfs" small "round$r")"; J_S="$J_S$(run "$WORK/jfs" small "round$r")"
    r=$((r + 1))
done
S_S="$S_S]"; J_S="$J_S]"
S_RSS=$(rss_kib "$(sfs_pid)"); J_RSS=$(rss_kib "$(jfs_pid)")

python3 - "$S_W" "$J_W" "$S_R" "$J_R" "$S_S" "$J_S" "$S_RSS" "$J_RSS" "$SIZE_MIB" "$FILES" <<'PY'
import json, sys
import statistics
sw, jw, sr, jr, ss, js = (json.loads(x) for x in sys.argv[1:7])
ss = {k: statistics.median(r[k] for r in ss) for k in ss[0]}
js = {k: statistics.median(r[k] for r in js) for k in js[0]}
srss, jrss, size, files = (int(x) for x in sys.argv[7:11])
s = {**sw, **sr, **ss}
j = {**jw, **jr, **js}
rows = [("big file write (MiB/s, %d MiB, fsync)" % size, "write_mibs"),
        ("big file cold read (MiB/s)", "read_mibs"),
        ("4 KiB file create+write+close (files/s, %d per round, median)" % files, "create_per_s"),
        ("stat (files/s)", "stat_per_s"),
        ("4 KiB file open+read+close (files/s)", "read_per_s"),
        ("unlink (files/s)", "unlink_per_s")]
print("| figure | StageFS | JuiceFS 1.4.2 | ratio |")
print("|---|---:|---:|---:|")
for label, k in rows:
    print(f"| {label} | {s[k]:.1f} | {j[k]:.1f} | {s[k] / j[k]:.2f} |")
print(f"| mount RSS after the run (MiB, lower is better) | {srss / 1024:.0f} | {jrss / 1024:.0f} | {jrss / max(srss, 1):.2f} |")
PY
