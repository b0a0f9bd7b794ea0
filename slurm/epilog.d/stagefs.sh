#!/bin/sh
# Slurm Epilog companion of prolog.d/stagefs.sh: unmounts the job's mount (lazily, aborting a
# dead FUSE connection), stops its mount process, releases the job's pins and removes the
# per-job files. Idempotent: it does nothing harmful where the prolog did not run.
set -u
. "${STAGEFS_SLURM_ENV:-/etc/stagefs/slurm.env}"
JOB=${SLURM_JOB_ID:?}
USER_NAME=${SLURM_JOB_USER:?}
UID_N=$(id -u "$USER_NAME" 2>/dev/null) || exit 0

if [ -n "${STAGEFS_MOUNT_ROOT:-}" ]; then
    MNT="$STAGEFS_MOUNT_ROOT/$JOB"
    DEV=$(awk -v m="$MNT" '$5 == m { print $3 }' /proc/self/mountinfo | head -1)
    if [ -n "$DEV" ]; then
        [ -w "/sys/fs/fuse/connections/${DEV#*:}/abort" ] && echo 1 > "/sys/fs/fuse/connections/${DEV#*:}/abort"
        fusermount3 -u -z "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true
    fi
    pkill -TERM -u "$UID_N" -f "stagefs mount .*$MNT( |\$)" 2>/dev/null || true
    sleep 1
    pkill -KILL -u "$UID_N" -f "stagefs mount .*$MNT( |\$)" 2>/dev/null || true
    rmdir "$MNT" 2>/dev/null || true
fi
if [ -x "$STAGEFS_BIN" ] && [ -d "$STAGEFS_CACHE_ROOT/$UID_N" ]; then
    "$STAGEFS_BIN" stage --release "$JOB" --cache-dir "$STAGEFS_CACHE_ROOT" --as-user "$USER_NAME" >/dev/null 2>&1 || true
fi
rm -rf "$STAGEFS_CACHE_ROOT/$UID_N/jobs/$JOB"
exit 0
