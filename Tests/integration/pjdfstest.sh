#!/bin/bash
# pjdfstest (https://github.com/pjd/pjdfstest) against StageFS with the trash on, on SQLite and
# on Redis, mounted by root (the suite switches users itself). Not part of `make test`: Debian
# does not package pjdfstest and CI may not reach GitHub, so give a checkout of its source:
#
#     Tests/integration/pjdfstest.sh /path/to/pjdfstest [.build/release/stagefs]
#
# It builds the suite's one C file (no autotools needed), formats two volumes (trash kept one
# day, the default), runs `prove -r tests` in each and says how many tests passed.
set -euo pipefail
src=${1:?give a checkout of pjdfstest}
bin=$(readlink -f "${2:-.build/release/stagefs}")
[ "$(id -u)" = 0 ] || { echo "pjdfstest.sh: run as root (pjdfstest switches users)" >&2; exit 2; }
command -v prove >/dev/null || { apt-get update -qq && apt-get install -y -qq perl >/dev/null; }
command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }
work=$(mktemp -d /tmp/stagefs-pjd.XXXXXX)
port=$((20000 + RANDOM % 20000))
cleanup() {
    for m in "$work"/mnt-*; do "$bin" umount "$m" >/dev/null 2>&1 || fusermount3 -u -z "$m" 2>/dev/null || true; done
    redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
cp -r "$src" "$work/pjd"
echo '#include <sys/sysmacros.h>' > "$work/pjd/config.h"
defs="-D_GNU_SOURCE -DHAVE_FACCESSAT -DHAVE_FCHMODAT -DHAVE_FCHOWNAT -DHAVE_FSTATAT -DHAVE_LINKAT -DHAVE_MKDIRAT -DHAVE_MKFIFOAT
 -DHAVE_MKNODAT -DHAVE_OPENAT -DHAVE_POSIX_FALLOCATE -DHAVE_READLINKAT -DHAVE_RENAMEAT -DHAVE_SYMLINKAT -DHAVE_UTIMENSAT
 -DHAVE_STRUCT_STAT_ST_ATIM -DHAVE_STRUCT_STAT_ST_MTIM -DHAVE_STRUCT_STAT_ST_CTIM"
gcc -O1 -w $defs -include "$work/pjd/config.h" -o "$work/pjd/pjdfstest" "$work/pjd/pjdfstest.c"
chmod 0666 /dev/fuse
redis-server --port "$port" --bind 127.0.0.1 --dir "$work" --save '' --appendonly yes --daemonize yes >/dev/null
for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
status=0
for kind in sqlite redis; do
    if [ $kind = sqlite ]; then url="sqlite3://$work/$kind.db"; else url="redis://127.0.0.1:$port/1"; fi
    "$bin" format "$url" "pjd-$kind" --bucket "$work/data-$kind" >/dev/null
    mkdir "$work/mnt-$kind"
    "$bin" mount -d "$url" "$work/mnt-$kind" --log "$work/$kind.log" --cache-dir "$work/cache-$kind" >/dev/null
    mkdir "$work/mnt-$kind/run"
    if (cd "$work/mnt-$kind/run" && prove -r "$work/pjd/tests" >"$work/$kind.prove" 2>&1); then r=PASS; else r=FAIL; status=1; fi
    echo "$kind (trash on): $(grep -E '^Files=' "$work/$kind.prove") $r"
    [ $r = PASS ] || grep -E '^/|Failed' "$work/$kind.prove" | grep -v ' ok$' | head -40
    "$bin" status "$url" | grep Trash
done
exit $status
