#!/bin/sh
# The StageFS demo: an embedded SQLite + local-directory volume, mounted by an ordinary user
# (no root in the mount); a sample dataset written through it, staged into the node-local cache
# without a mount, then read back with the object store taken away: served from the cache.
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

say "mount as user $DEMO_USER (uid $(id -u "$DEMO_USER")) at $DIR/mnt, without a disk cache"
as_user "$SFS" mount -d "$META" "$DIR/mnt" --cache-size 0 --log "$DIR/mount.log"
grep " $DIR/mnt " /proc/mounts

say "write a sample dataset: 2,000 files of 4 KiB and one 64 MiB file"
as_user sh -c "
    mkdir -p '$DIR/mnt/datasets/sample/shards'
    cd '$DIR/mnt/datasets/sample/shards' && python3 -c 'import os
for i in range(2000):
    open(\"part-%d\" % i, \"wb\").write(os.urandom(4096))'
    head -c 64M /dev/urandom > '$DIR/mnt/datasets/sample/train.bin'
    cd '$DIR/mnt/datasets/sample' && sha256sum train.bin > '$DIR/train.sha256' && cat shards/* | sha256sum > '$DIR/shards.sha256'
"
du -sh "$DIR/data"
as_user "$SFS" info "$DIR/mnt/datasets/sample/shards/part-0"
as_user "$SFS" umount "$DIR/mnt"

say "stage it into the node-local cache, with no mount (as a Slurm prolog does)"
as_user "$SFS" stage --meta "$META" --cache-dir "$DIR/cache" /datasets/sample --job demo
as_user "$SFS" stage --meta "$META" --cache-dir "$DIR/cache" /datasets/sample --check

say "take the object store away, mount with the cache, and read everything back"
mv "$DIR/data" "$DIR/data.away"
as_user "$SFS" mount -d "$META" "$DIR/mnt" --cache-dir "$DIR/cache" --log "$DIR/mount.log" --io-retries 1
as_user sh -c "cd '$DIR/mnt/datasets/sample' && sha256sum -c '$DIR/train.sha256' && cat shards/* | sha256sum | cmp -s - '$DIR/shards.sha256' && echo 'shards: OK (2000 files)'"
echo "served from the cache in $DIR/cache: the bucket directory was not there"
mv "$DIR/data.away" "$DIR/data"
as_user "$SFS" stage --release demo --cache-dir "$DIR/cache"
as_user "$SFS" status "$META"

if [ "${KEEP:-0}" = 1 ]; then
    say "left mounted at $DIR/mnt; unmount with: runuser -u $DEMO_USER -- $SFS umount $DIR/mnt"
else
    say "unmount"
    as_user "$SFS" umount "$DIR/mnt"
    echo "demo done; everything is under $DIR (KEEP=1 leaves the volume mounted)"
fi
