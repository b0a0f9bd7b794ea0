#!/bin/sh
# The StageFS demo: an embedded SQLite + local-directory volume, mounted by an ordinary user
# (no root in the mount), a sample dataset written and read back through it.
#   ./scripts/demo.sh [path/to/stagefs]      (KEEP=1 leaves the volume mounted)
set -eu
BIN=${1:-.build/release/stagefs}
DIR=${STAGEFS_DEMO_DIR:-/tmp/stagefs-demo}
DEMO_USER=${STAGEFS_DEMO_USER:-stagefs-demo}

say() { printf '\n==> %s\n' "$*"; }
as_user() { runuser -u "$DEMO_USER" -- "$@"; }

[ -x "$BIN" ] || { echo "demo: $BIN is missing; run 'make build' first" >&2; exit 1; }
id "$DEMO_USER" >/dev/null 2>&1 || useradd --create-home --shell /bin/sh "$DEMO_USER"
chmod 0666 /dev/fuse

if grep -qs " $DIR/mnt fuse.stagefs " /proc/mounts; then fusermount3 -uz "$DIR/mnt" || true; fi
rm -rf "$DIR"
mkdir -p "$DIR/mnt"
cp "$BIN" "$DIR/stagefs"
chown -R "$DEMO_USER" "$DIR"
chmod 0755 "$DIR"
SFS="$DIR/stagefs"
META="sqlite3://$DIR/meta.db"

say "format: metadata in $DIR/meta.db, blocks in $DIR/data"
as_user "$SFS" format "$META" demo --bucket "$DIR/data"

say "mount as user $DEMO_USER (uid $(id -u "$DEMO_USER")) at $DIR/mnt"
as_user "$SFS" mount -d "$META" "$DIR/mnt" --log "$DIR/mount.log"
grep " $DIR/mnt " /proc/mounts

say "write a sample dataset: 200 small files and one 64 MiB file"
as_user sh -c "
    mkdir -p '$DIR/mnt/datasets/sample/shards'
    i=0
    while [ \$i -lt 200 ]; do
        head -c 4096 /dev/urandom > '$DIR/mnt/datasets/sample/shards/part-'\$i
        i=\$((i + 1))
    done
    head -c 64M /dev/urandom > '$DIR/mnt/datasets/sample/train.bin'
    cd '$DIR/mnt/datasets/sample' && sha256sum train.bin > '$DIR/train.sha256'
"
as_user ls -l "$DIR/mnt/datasets/sample" | head -5
du -sh "$DIR/data"

say "read it back through the mount and compare"
as_user sh -c "cd '$DIR/mnt/datasets/sample' && sha256sum -c '$DIR/train.sha256'"
as_user sh -c "cat '$DIR/mnt/datasets/sample/shards/'* | wc -c"

say "where the bytes live"
as_user "$SFS" info "$DIR/mnt/datasets/sample/shards/part-0"
as_user "$SFS" status "$META"
df -h "$DIR/mnt" 2>/dev/null || true

if [ "${KEEP:-0}" = 1 ]; then
    say "left mounted at $DIR/mnt; unmount with: runuser -u $DEMO_USER -- $SFS umount $DIR/mnt"
else
    say "unmount"
    as_user "$SFS" umount "$DIR/mnt"
    echo "demo done; everything is under $DIR (KEEP=1 leaves the volume mounted)"
fi
