#!/bin/sh
# Slurm Epilog companion of prolog.d/stagefs.sh: unmounts the job's mount (lazily, aborting a
# dead FUSE connection), stops its mount process, removes the mount directory, and has
# `stagefs job epilog` release the job's pins and remove its per-job files as the job's user
# (root removes nothing inside the user's directories). Idempotent: it does nothing harmful
# where the prolog did not run.
set -u
# slurmd gives scripts a bare environment; root's script chooses its own PATH (make install
# writes its prefix for @PREFIX@).
PATH=@PREFIX@/sbin:@PREFIX@/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
. "${STAGEFS_SLURM_ENV:-/etc/stagefs/slurm.env}"
: "${STAGEFS_BIN:=@PREFIX@/bin/stagefs}"
JOB=${SLURM_JOB_ID:?}
USER_NAME=${SLURM_JOB_USER:?}
STATE_DIR=${STAGEFS_STATE_DIR:-/run/stagefs}
case $JOB in '' | *[!0-9]*) exit 0 ;; esac
UID_N=$(id -u -- "$USER_NAME" 2>/dev/null) || exit 0
GID_N=$(id -g -- "$USER_NAME")
HOME_DIR=$(getent passwd "$UID_N" | cut -d: -f6)

if [ -n "${STAGEFS_MOUNT_ROOT:-}" ]; then
    # mount_root is root's alone (the prolog checks): the user cannot put a link at $MNT.
    MNT="$STAGEFS_MOUNT_ROOT/$JOB"
    DEV=$(awk -v m="$MNT" '$5 == m { print $3 }' /proc/self/mountinfo | head -1)
    if [ -n "$DEV" ]; then
        [ -w "/sys/fs/fuse/connections/${DEV#*:}/abort" ] && echo 1 > "/sys/fs/fuse/connections/${DEV#*:}/abort"
        fusermount3 -u -z -- "$MNT" 2>/dev/null || true
    fi
    # All of the job's mount processes get SIGTERM at once, then 5 s in all, then SIGKILL.
    pkill -TERM -u "$UID_N" -f "stagefs mount .*$MNT( |\$)" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        pgrep -u "$UID_N" -f "stagefs mount .*$MNT( |\$)" >/dev/null 2>&1 || break
        sleep 0.5
    done
    pkill -KILL -u "$UID_N" -f "stagefs mount .*$MNT( |\$)" 2>/dev/null || true
    rmdir -- "$MNT" 2>/dev/null || true
fi
if [ -x "$STAGEFS_BIN" ]; then
    env -i PATH="$PATH" HOME="$HOME_DIR" USER="$USER_NAME" LOGNAME="$USER_NAME" \
        setpriv --reuid="$UID_N" --regid="$GID_N" --init-groups -- \
        "$STAGEFS_BIN" job epilog --job "$JOB" --cache-dir "$STAGEFS_CACHE_ROOT" >/dev/null 2>&1 ||
        echo "stagefs: job $JOB: cleaning up as $USER_NAME failed" >&2
fi
rm -f -- "$STATE_DIR/$JOB"
exit 0
