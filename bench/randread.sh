#!/bin/bash
# fio random 4 KiB reads in one file larger than the memory cache, StageFS beside JuiceFS 1.4.2:
# the same Redis (a database each), a local-directory bucket each, each round cold (fresh mounts,
# fresh disk caches, the page cache dropped), ROUNDS rounds alternating, medians and the ratio.
#   sudo bench/randread.sh .build/release/stagefs     # SIZE_MIB=256 RUNTIME=20 ROUNDS=3
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=$(realpath "${1:-$HERE/../.build/release/stagefs}")
SIZE_MIB=${SIZE_MIB:-256}
RUNTIME=${RUNTIME:-20}
ROUNDS=${ROUNDS:-3}
[ "$(id -u)" = 0 ] || { echo "randread: run as root (it drops the page cache)" >&2; exit 2; }
command -v fio >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q fio >/dev/null; }
BENCH_PREFIX=stagefs-randread
BENCH_MOUNTS="sfs jfs"
. "$HERE/lib.sh"

"$BIN" format "$SFS_META" rrsfs --bucket "$WORK/sfs-bucket" >/dev/null 2>&1
juicefs format "$JFS_META" rrjfs --storage file --bucket "$WORK/jfs-bucket/" --no-update >/dev/null 2>&1

# (The mount's warnings, such as Redis keeping no AOF here, go to a file; shown if it fails.)
mount_sfs() { "$BIN" mount -d "$SFS_META" "$WORK/sfs" --cache-dir "$WORK/sfs-cache" --log "$WORK/sfs.log" >/dev/null 2>"$WORK/sfs.err" || { cat "$WORK/sfs.err" >&2; exit 1; }; }
mount_jfs() { juicefs mount -d "$JFS_META" "$WORK/jfs" --cache-dir "$WORK/jfs-cache" --no-usage-report --log "$WORK/jfs.log" >/dev/null 2>&1; }
umount_sfs() { "$BIN" umount "$WORK/sfs" >/dev/null; }
umount_jfs() { juicefs umount "$WORK/jfs" >/dev/null 2>&1; }

# The file, written once through each mount.
for fs in sfs jfs; do
    mount_$fs
    head -c "${SIZE_MIB}M" /dev/urandom > "$WORK/$fs/f"
    umount_$fs
done

one() {  # fs -> IOPS of one cold run
    local fs=$1
    rm -rf "$WORK/$fs-cache"; sync; echo 3 > /proc/sys/vm/drop_caches; settle
    mount_$fs
    fio --name=r --filename="$WORK/$fs/f" --rw=randread --bs=4k --size="${SIZE_MIB}M" --runtime="$RUNTIME" --time_based \
        --ioengine=psync --output-format=json > "$WORK/fio.json" 2>/dev/null
    umount_$fs
    python3 -c "import json; print(round(json.load(open('$WORK/fio.json'))['jobs'][0]['read']['iops']))"
}

S=(); J=()
for r in $(seq 1 "$ROUNDS"); do
    S+=("$(one sfs)"); J+=("$(one jfs)")
    echo "round $r: StageFS ${S[-1]} IOPS, JuiceFS ${J[-1]} IOPS" >&2
done
python3 - "${S[*]}" "${J[*]}" "$SIZE_MIB" "$RUNTIME" <<'EOF'
import statistics, sys
s, j = [list(map(int, a.split())) for a in sys.argv[1:3]]
ms, mj = statistics.median(s), statistics.median(j)
print(f"| fio random 4 KiB reads, {sys.argv[3]} MiB file, {sys.argv[4]} s, cold (IOPS, median of {len(s)}) | "
      f"{ms:.0f} ({min(s)}-{max(s)}) | {mj:.0f} ({min(j)}-{max(j)}) | {ms / mj:.2f} |")
EOF
