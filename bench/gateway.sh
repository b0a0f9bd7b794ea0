#!/bin/sh
# A mount through a node-local gateway against a direct mount, same machine, same redis-server
# (two databases, with a password as a multi-tenant site has), a local-directory bucket each.
# Prints figures and ratios (gateway / direct; above 1 means the gateway is faster).
#   bench/gateway.sh [path/to/stagefs]
# Environment: SIZE_MIB (big file, default 512), FILES (small files per round, default 5000),
# DIRS (50), ROUNDS (rounds of every figure, alternating, default 3; medians are reported),
# BENCH_DIR (where the buckets and sockets go, default /tmp; /dev/shm takes the disk out),
# GATEWAY_ARGS (more options of the gateway, e.g. --tracked-cache).
set -eu
BIN=$(readlink -f "${1:-.build/release/stagefs}")
SIZE_MIB=${SIZE_MIB:-512}
FILES=${FILES:-5000}
DIRS=${DIRS:-50}
ROUNDS=${ROUNDS:-3}
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=$(mktemp -d "${BENCH_DIR:-/tmp}/stagefs-gwbench-XXXXXX")
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
PW=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
redis-server --port "$PORT" --bind 127.0.0.1 --requirepass "$PW" --save "" --appendonly no --dir "$WORK" --daemonize yes --pidfile "$WORK/redis.pid" >/dev/null
GW_PID=
cleanup() {
    for m in direct gw; do grep -qs " $WORK/$m " /proc/mounts && fusermount3 -uz "$WORK/$m" 2>/dev/null || true; done
    [ -n "$GW_PID" ] && kill "$GW_PID" 2>/dev/null || true
    [ -f "$WORK/redis.pid" ] && kill "$(cat "$WORK/redis.pid")" 2>/dev/null || true
    sleep 0.5
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM
mkdir -p "$WORK/direct" "$WORK/gw"
export META_PASSWORD="$PW"
"$BIN" format "redis://127.0.0.1:$PORT/1" direct --bucket "$WORK/direct-data" >/dev/null
"$BIN" format "redis://127.0.0.1:$PORT/2" viagw --bucket "$WORK/gw-data" >/dev/null
chmod 700 "$WORK/gw-data"
printf 'META_URL=redis://:%s@127.0.0.1:%s/2\n' "$PW" "$PORT" > "$WORK/gw.conf"
chmod 600 "$WORK/gw.conf"
# shellcheck disable=SC2086
env -u META_PASSWORD "$BIN" gateway --config "$WORK/gw.conf" --socket "$WORK/gw.sock" ${GATEWAY_ARGS:-} 2>"$WORK/gw.log" &
GW_PID=$!
i=0; while [ ! -S "$WORK/gw.sock" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done

mount_direct() { "$BIN" mount -d "redis://127.0.0.1:$PORT/1" "$WORK/direct" --cache-size 0 --log "$WORK/direct.log" >/dev/null; }
mount_gw() { env -u META_PASSWORD "$BIN" mount -d "stagefs+unix://$WORK/gw.sock" "$WORK/gw" --cache-size 0 --log "$WORK/gw-mount.log" >/dev/null; }
. "$HERE/settle.sh"
run() { settle; python3 "$HERE/bench.py" --mount "$1" --size-mib "$SIZE_MIB" --files "$FILES" --dirs "$DIRS" --phase "$2" ${3:+--tag "$3"}; }

D="["; G="["
r=1
while [ "$r" -le "$ROUNDS" ]; do
    [ "$r" -gt 1 ] && { D="$D,"; G="$G,"; }
    mount_direct; mount_gw
    # Alternate which goes first.
    if [ $((r % 2)) -eq 1 ]; then
        DW=$(run "$WORK/direct" write "w$r"); GWW=$(run "$WORK/gw" write "w$r")
    else
        GWW=$(run "$WORK/gw" write "w$r"); DW=$(run "$WORK/direct" write "w$r")
    fi
    # Cold read: remount (empty client caches) and drop the page cache.
    "$BIN" umount "$WORK/direct"; "$BIN" umount "$WORK/gw"; mount_direct; mount_gw
    if [ $((r % 2)) -eq 1 ]; then
        DR=$(run "$WORK/direct" read "w$r"); GR=$(run "$WORK/gw" read "w$r")
        DS=$(run "$WORK/direct" small "s$r"); GS=$(run "$WORK/gw" small "s$r")
    else
        GR=$(run "$WORK/gw" read "w$r"); DR=$(run "$WORK/direct" read "w$r")
        GS=$(run "$WORK/gw" small "s$r"); DS=$(run "$WORK/direct" small "s$r")
    fi
    D="$D[$DW,$DR,$DS]"; G="$G[$GWW,$GR,$GS]"
    "$BIN" umount "$WORK/direct"; "$BIN" umount "$WORK/gw"
    r=$((r + 1))
done
D="$D]"; G="$G]"

python3 - "$D" "$G" "$SIZE_MIB" "$FILES" <<'PY'
import json, sys, statistics
d, g = json.loads(sys.argv[1]), json.loads(sys.argv[2])
size, files = sys.argv[3], sys.argv[4]
def merged(rounds):
    return [{k: v for part in r for k, v in part.items()} for r in rounds]
d, g = merged(d), merged(g)
rows = [(f"big file write (MiB/s, {size} MiB, fsync)", "write_mibs"), ("big file cold read (MiB/s)", "read_mibs"),
        (f"4 KiB file create+write+close (files/s, {files} per round)", "create_per_s"), ("stat (files/s)", "stat_per_s"),
        ("4 KiB file open+read+close (files/s)", "read_per_s"), ("unlink (files/s)", "unlink_per_s")]
print(f"| figure | direct (median; min–max) | gateway (median; min–max) | gateway / direct |")
print("|---|---:|---:|---:|")
for label, k in rows:
    dv, gv = [r[k] for r in d], [r[k] for r in g]
    dm, gm = statistics.median(dv), statistics.median(gv)
    print(f"| {label} | {dm:.1f} ({min(dv):.0f}–{max(dv):.0f}) | {gm:.1f} ({min(gv):.0f}–{max(gv):.0f}) | {gm / dm:.2f} |")
PY
