#!/bin/sh
# One round of small writes to a local-directory bucket: formats a fresh SQLite volume, mounts it
# without a disk cache, writes FILES 4 KiB files, unmounts (every block flushed). For comparing
# two builds pair by pair:
#   farm-bench -n 10 --timeout 900 --vs "bench/local-bucket.sh OLD/stagefs" -- bench/local-bucket.sh NEW/stagefs
set -eu
bin=$1
files=${FILES:-2000}
d=$(mktemp -d /tmp/stagefs-lb-XXXXXX)
trap 'rm -rf "$d"' EXIT
mkdir "$d/m"
"$bin" format "sqlite3://$d/meta.db" lbvol --bucket "$d/data" >/dev/null 2>&1
"$bin" mount -d "sqlite3://$d/meta.db" "$d/m" --cache-size 0 --log "$d/log" >/dev/null
python3 -c "
import os, sys
b = os.urandom(4096)
for i in range(int(sys.argv[2])):
    with open(os.path.join(sys.argv[1], 'f%d' % i), 'wb') as f:
        f.write(b)
" "$d/m" "$files"
"$bin" umount "$d/m"
