#!/bin/sh
# Slurm Epilog companion of prolog.d/stagefs.sh: has `stagefs job epilog`, as the job's user,
# detach the job's mount and give its process STAGEFS_FLUSH_TIMEOUT to flush buffered writes
# and exit (then kill it), release the job's pins and keep the job's logs for STAGEFS_KEEP_LOGS;
# then, as root, aborts and stops whatever is left of the mount and removes the mount
# directory (root removes nothing inside the user's directories). Idempotent: it does nothing
# harmful where the prolog did not run.
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

MNT=
# mount_root is root's alone (the prolog checks): the user cannot put a link at $MNT.
[ -n "${STAGEFS_MOUNT_ROOT:-}" ] && MNT="$STAGEFS_MOUNT_ROOT/$JOB"
# flush_timeout in seconds (a duration: 90, 90s, 5m, 1h, 1d).
F=${STAGEFS_FLUSH_TIMEOUT:-60}
case $F in *[smhd]) N=${F%?} U=${F#"$N"} ;; *) N=$F U=s ;; esac
case $N in '' | *[!0-9]*)
    echo "stagefs: job $JOB: STAGEFS_FLUSH_TIMEOUT '$F' is not a duration (90, 90s, 5m, 1h); using 60 s" >&2
    N=60 U=s ;;
esac
case $U in s) FLUSH=$N ;; m) FLUSH=$((N * 60)) ;; h) FLUSH=$((N * 3600)) ;; *) FLUSH=$((N * 86400)) ;; esac
if [ -x "$STAGEFS_BIN" ]; then
    # As the user: the job's mount is detached and its process gets the flush timeout to write
    # out what it buffered and exit (then it is killed); pins are released; the job's logs are
    # marked ended and kept for STAGEFS_KEEP_LOGS, older ones removed. What it did is in the
    # job's epilog.log and on this script's standard error.
    timeout $((FLUSH + 60)) env -i PATH="$PATH" HOME="$HOME_DIR" USER="$USER_NAME" LOGNAME="$USER_NAME" \
        setpriv --reuid="$UID_N" --regid="$GID_N" --init-groups -- \
        "$STAGEFS_BIN" job epilog --job "$JOB" --cache-dir "$STAGEFS_CACHE_ROOT" --log-dir "${STAGEFS_LOG_ROOT:-$STAGEFS_CACHE_ROOT}" \
        --keep-logs "${STAGEFS_KEEP_LOGS:-7d}" --flush-timeout "$FLUSH" ${MNT:+--mount-dir "$MNT"} 2>&1 >/dev/null | grep '^stagefs: ' | head -c 8192 >&2 ||
        true
fi
if [ -n "$MNT" ]; then
    # What the user's epilog could not end: root aborts the connection, then the processes.
    DEV=$(awk -v m="$MNT" '$5 == m { print $3 }' /proc/self/mountinfo | head -1)
    if [ -n "$DEV" ]; then
        echo "stagefs: job $JOB: $MNT is still mounted after the job's epilog: aborting its FUSE connection" >&2
        [ -w "/sys/fs/fuse/connections/${DEV#*:}/abort" ] && echo 1 > "/sys/fs/fuse/connections/${DEV#*:}/abort"
        fusermount3 -u -z -- "$MNT" 2>/dev/null || true
    fi
    # The job's mount processes left get SIGTERM at once, then 5 s in all, then SIGKILL.
    if pkill -TERM -u "$UID_N" -f "stagefs mount .*$MNT( |\$)" 2>/dev/null; then
        echo "stagefs: job $JOB: stopping mount processes of $MNT left after the job's epilog" >&2
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            pgrep -u "$UID_N" -f "stagefs mount .*$MNT( |\$)" >/dev/null 2>&1 || break
            sleep 0.5
        done
        pkill -KILL -u "$UID_N" -f "stagefs mount .*$MNT( |\$)" 2>/dev/null || true
    fi
    rmdir -- "$MNT" 2>/dev/null || true
fi
rm -f -- "$STATE_DIR/$JOB"
exit 0
