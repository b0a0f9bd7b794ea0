#!/bin/sh
# Redis commands per small file on a StageFS mount, counted with MONITOR (commands run inside
# the server-side scripts left out): create+write+close, stat, open+read+close, unlink. A read
# pipelined after a commit is counted although it shares that commit's round trip.
#   bench/roundtrips.sh [path/to/stagefs]      (N=2000 files)
set -eu
BIN=$(readlink -f "${1:-.build/release/stagefs}")
N=${N:-2000}
W=$(mktemp -d /tmp/stagefs-roundtrips-XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes --pidfile "$W/r.pid" >/dev/null
cleanup() {
    grep -qs " $W/m " /proc/mounts && { fusermount3 -uz "$W/m" 2>/dev/null || umount -l "$W/m" 2>/dev/null || true; }
    [ -f "$W/r.pid" ] && kill "$(cat "$W/r.pid")" 2>/dev/null || true
    sleep 0.5
    rm -rf "$W"
}
trap cleanup EXIT INT TERM
sleep 0.5
mkdir "$W/m"
"$BIN" format "redis://127.0.0.1:$PORT/1" roundtrips --bucket "$W/data" >/dev/null 2>&1
"$BIN" mount -d "redis://127.0.0.1:$PORT/1" "$W/m" --cache-size 0 --log "$W/log" >/dev/null
mkdir "$W/m/d"
sleep 2
phase() {
    redis-cli -p "$PORT" monitor >"$W/mon.txt" &
    MP=$!
    sleep 0.5
    python3 - "$W/m" "$N" "$1" <<'PY'
import os, sys
m, n, what = sys.argv[1], int(sys.argv[2]), sys.argv[3]
for i in range(n):
    p = f"{m}/d/f{i}"
    if what == "create":
        with open(p, "wb") as f:
            f.write(b"x" * 4096)
    elif what == "stat":
        os.stat(p)
    elif what == "read":
        with open(p, "rb") as f:
            f.read()
    else:
        os.unlink(p)
PY
    sleep 3  # the deleter's last batch, a heartbeat
    kill "$MP"
    echo "$1: $(grep -v 'lua\]' "$W/mon.txt" | grep -c '"' | awk -v n="$N" '{printf "%.2f", $1/n}') commands per file:" \
        $(grep -v 'lua\]' "$W/mon.txt" | grep -oE '\] "[A-Za-z]+"' | sort | uniq -c | tr -d '"]' | tr '\n' ' ')
}
phase create; sleep 2; phase stat; sleep 2; phase read; sleep 2; phase unlink
"$BIN" umount "$W/m"
