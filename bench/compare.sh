#!/bin/sh
# Two StageFS builds (before and after a change) and JuiceFS 1.4.2 on the same redis-server
# (three databases) and the same kind of bucket: the small-file rounds of run.sh, interleaved
# (old, new, JuiceFS, then new, old, JuiceFS, ...), so that a machine whose speed drifts treats
# all three alike.
# Prints medians, each build's ratio to JuiceFS, new/old, and new/old of each round with their
# median (the paired figure). Before each run the machine is left to settle (lib.sh).
#   bench/compare.sh OLD_STAGEFS NEW_STAGEFS
# Environment: FILES (per round, default 10000), DIRS (100), ROUNDS (default 6: an even number
# lets old and new go first equally often; on this machine whoever goes first gained up to 15%),
# JUICEFS=no to run the two builds only (their JuiceFS columns then show "-").
set -eu
[ $# -eq 2 ] || { echo "usage: bench/compare.sh OLD_STAGEFS NEW_STAGEFS" >&2; exit 2; }
OLD=$(readlink -f "$1")
NEW=$(readlink -f "$2")
FILES=${FILES:-10000}
DIRS=${DIRS:-100}
ROUNDS=${ROUNDS:-6}
HERE=$(cd "$(dirname "$0")" && pwd)
BENCH_PREFIX=stagefs-compare
JUICEFS=${JUICEFS:-yes}
BENCH_MOUNTS="old new jfs"
. "$HERE/lib.sh"
NEW_META="redis://127.0.0.1:$PORT/3"
"$OLD" format "$SFS_META" sfsold --bucket "$WORK/old-data" >/dev/null 2>&1
"$NEW" format "$NEW_META" sfsnew --bucket "$WORK/new-data" >/dev/null 2>&1
if [ "$JUICEFS" != no ]; then
    juicefs format "$JFS_META" jfscompare --storage file --bucket "$WORK/jfs-data/" --no-update >/dev/null 2>&1 ||
        juicefs format "$JFS_META" jfscompare --storage file --bucket "$WORK/jfs-data/" >/dev/null 2>&1
fi
"$OLD" mount -d "$SFS_META" "$WORK/old" --cache-size 0 --log "$WORK/old.log" >/dev/null
"$NEW" mount -d "$NEW_META" "$WORK/new" --cache-size 0 --log "$WORK/new.log" >/dev/null
[ "$JUICEFS" = no ] || juicefs mount -d "$JFS_META" "$WORK/jfs" --cache-size 0 --no-usage-report --log "$WORK/jfs.log" >/dev/null 2>&1

run() { settle; python3 "$HERE/bench.py" --mount "$1" --size-mib 1 --files "$FILES" --dirs "$DIRS" --phase small --tag "$2"; }
O="["; N="["; J="["
r=1
while [ "$r" -le "$ROUNDS" ]; do
    [ "$r" -gt 1 ] && { O="$O,"; N="$N,"; [ "$JUICEFS" = no ] || J="$J,"; }
    # Old and new take turns at going first.
    if [ $((r % 2)) -eq 1 ]; then
        O="$O$(run "$WORK/old" "round$r")"; N="$N$(run "$WORK/new" "round$r")"
    else
        N="$N$(run "$WORK/new" "round$r")"; O="$O$(run "$WORK/old" "round$r")"
    fi
    [ "$JUICEFS" = no ] || J="$J$(run "$WORK/jfs" "round$r")"
    r=$((r + 1))
done
O="$O]"; N="$N]"; J="$J]"

python3 - "$O" "$N" "$J" "$FILES" "$ROUNDS" <<'PY'
import json, statistics, sys
o, n, j = (json.loads(x) for x in sys.argv[1:4])
files, rounds = sys.argv[4], sys.argv[5]
med = lambda rs, k: statistics.median(r[k] for r in rs)
rows = [("4 KiB file create+write+close", "create_per_s"), ("stat", "stat_per_s"),
        ("4 KiB file open+read+close", "read_per_s"), ("unlink", "unlink_per_s")]
print(f"| files/s ({files} per round, median of {rounds}) | old | new | JuiceFS 1.4.2 | old/JuiceFS | new/JuiceFS | new/old | new/old per round (median; geometric mean) |")
print("|---|---:|---:|---:|---:|---:|---:|---|")
for label, k in rows:
    a, b = med(o, k), med(n, k)
    c = med(j, k) if j else None
    jcols = f"{c:.1f} | {a / c:.2f} | {b / c:.2f}" if c else "- | - | -"
    # Each round's old and new ran back to back: their ratio is the paired figure.
    per = [x[k] / y[k] for x, y in zip(n, o)]
    rounds_text = " ".join(f"{r:.2f}" for r in per)
    print(f"| {label} | {a:.1f} | {b:.1f} | {jcols} | {b / a:.2f} | {rounds_text} ({statistics.median(per):.2f}; {statistics.geometric_mean(per):.2f}) |")
PY
