#!/bin/sh
# Slurm Prolog for sites that prefer scripts to the SPANK plugin's job prolog: stages the
# datasets a job asked for (sbatch --storage-stage=..., registered by the plugin, or the job's
# STAGEFS_STAGE variable passed by the site's job_submit) into this node's cache as the job's
# user, pinned for the job, and mounts the volume for the job. Runs as root on every node of the
# allocation (PrologFlags=Alloc).
#
# Root does no work by path in a place a user can write: it makes <cache_root>/<uid> and
# <mount_root>/<jobid> with mkdir (a new entry is root's, which nobody can replace in a sticky
# directory) and hands them over with chown -h, or accepts an existing entry only when it is a
# real directory of the user (checked without following links). Everything else runs as the
# user: `stagefs job prolog`, whose exit status is the outcome (0 ok, 3 partial, 4 failed).
# The status goes to $STAGEFS_STATE_DIR/<jobid> (root's own directory). User-caused failures
# do not fail the prolog (the node is not drained); node faults exit 1.
set -u
# slurmd gives scripts a bare environment; root's script chooses its own PATH.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
. "${STAGEFS_SLURM_ENV:-/etc/stagefs/slurm.env}"
# slurmd gives a prolog the job's options as SPANK_STAGEFS_* (the plugin passes them at submit).
SPEC=${SPANK_STAGEFS_STORAGE_STAGE:-${SPANK__SLURM_SPANK_OPTION_stagefs_storage_stage:-${STAGEFS_STAGE:-}}}
[ -n "$SPEC" ] || exit 0
POLICY=${SPANK_STAGEFS_STORAGE_STAGE_POLICY:-${SPANK__SLURM_SPANK_OPTION_stagefs_storage_stage_policy:-fail}}
NO_MOUNT=${SPANK_STAGEFS_NO_MOUNT:-${SPANK__SLURM_SPANK_OPTION_stagefs_storage_no_mount+yes}}
JOB=${SLURM_JOB_ID:?}
USER_NAME=${SLURM_JOB_USER:?}
STATE_DIR=${STAGEFS_STATE_DIR:-/run/stagefs}
case $JOB in '' | *[!0-9]*) echo "stagefs: SLURM_JOB_ID '$JOB' is not a job id" >&2; exit 1 ;; esac
UID_N=$(id -u -- "$USER_NAME") || { echo "stagefs: no such user $USER_NAME" >&2; exit 1; }
GID_N=$(id -g -- "$USER_NAME")

# A site directory: owned by root and, when others may write it, sticky.
site_dir_ok() {
    [ -d "$1" ] && [ "$(stat -L -c %u -- "$1")" = 0 ] && [ -z "$(find "$1" -maxdepth 0 -perm /022 ! -perm -1000)" ] && return 0
    echo "stagefs: job $JOB: $2 $1 is missing, or not owned by root and sticky (chmod 1777)" >&2
    return 1
}
# <parent>/<name> as a directory of the job's user (0700), never following a link.
prepare_dir() {
    if mkdir -m 0700 -- "$1/$2" 2>/dev/null; then
        chown -h -- "$UID_N:$GID_N" "$1/$2" && return 0
        REASONS="${REASONS}stagefs: cannot hand $1/$2 to $USER_NAME
"
        return 1
    fi
    [ "$(stat -c '%F:%u' -- "$1/$2" 2>/dev/null)" = "directory:$UID_N" ] && return 0
    REASONS="${REASONS}stagefs: $1/$2 is a symbolic link or not a directory of $USER_NAME: remove it
"
    return 1
}
mounted() { awk -v m="$1" '$5 == m { found = 1 } END { exit !found }' /proc/self/mountinfo; }

[ -x "$STAGEFS_BIN" ] || { echo "stagefs: job $JOB: $STAGEFS_BIN cannot be run" >&2; exit 1; }
site_dir_ok "$STAGEFS_CACHE_ROOT" cache_root || exit 1
MNT=
if [ -z "$NO_MOUNT" ] && [ -n "${STAGEFS_MOUNT_ROOT:-}" ]; then
    site_dir_ok "$STAGEFS_MOUNT_ROOT" mount_root || exit 1
    MNT="$STAGEFS_MOUNT_ROOT/$JOB"
fi

STATE=failed
REASONS=
if prepare_dir "$STAGEFS_CACHE_ROOT" "$UID_N"; then
    [ -n "$MNT" ] && ! prepare_dir "$STAGEFS_MOUNT_ROOT" "$JOB" && MNT=
    OUT=$(timeout $((${STAGEFS_TIMEOUT:-3600} + 120)) runuser -u "$USER_NAME" -- "$STAGEFS_BIN" job prolog --job "$JOB" \
        --cache-dir "$STAGEFS_CACHE_ROOT" --volume "$STAGEFS_VOLUME" --spec "$SPEC" --timeout "${STAGEFS_TIMEOUT:-3600}" \
        ${MNT:+--mount-dir "$MNT"} 2>&1)
    RC=$?
    case $RC in
        0) STATE=ok ;;
        3) STATE=partial ;;
        4) STATE=failed ;;
        124) STATE=failed; OUT="$OUT
stagefs: staging did not end within $((${STAGEFS_TIMEOUT:-3600} + 120)) s" ;;
        126 | 127) echo "stagefs: job $JOB: cannot run $STAGEFS_BIN as $USER_NAME: $OUT" >&2; exit 1 ;;
        *) STATE=failed ;;
    esac
    REASONS="$REASONS$(printf '%s\n' "$OUT" | grep '^stagefs: ')
"
fi
MOUNTLINE=
if [ -n "$MNT" ] && mounted "$MNT"; then MOUNTLINE="mount=$MNT"; elif [ -n "$MNT" ] && [ "$STATE" = ok ]; then STATE=partial; fi

mkdir -p -m 0755 -- "$STATE_DIR" && site_dir_ok "$STATE_DIR" state_dir || exit 1
{
    echo "$STATE"
    echo "policy=$POLICY"
    [ -n "$MOUNTLINE" ] && echo "$MOUNTLINE"
    printf '%s' "$REASONS" | grep '^stagefs: ' || true
} > "$STATE_DIR/$JOB.new" && chmod 0644 -- "$STATE_DIR/$JOB.new" && mv -f -- "$STATE_DIR/$JOB.new" "$STATE_DIR/$JOB" || {
    echo "stagefs: job $JOB: cannot write $STATE_DIR/$JOB" >&2
    exit 1
}
exit 0
