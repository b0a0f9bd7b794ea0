#!/bin/sh
# Slurm Prolog for sites that prefer scripts to the SPANK plugin's job prolog: stages the
# datasets a job asked for (sbatch --storage-stage=..., passed by the plugin at hooks=no as
# SPANK_STAGEFS_*, or STAGEFS_STAGE set by the site's job_submit) into this node's cache as the
# job's user, pinned for the job, and mounts the volume for the job. Runs as root on every node
# of the allocation (PrologFlags=Alloc).
#
# Root does no work by path in a place a user can write: it makes <cache_root>/<uid> and
# <mount_root>/<jobid> with mkdir (a new entry is root's, which nobody can replace in a sticky
# directory) and hands them over with chown -h, or accepts an existing entry only when it is a
# real directory of the user (checked without following links); another user's entry under
# that name is moved aside. Everything else runs as the user, in a clean environment:
# `stagefs job prolog`, whose exit status is the outcome (0 ok, 3 partial, 4 failed). The status
# goes to $STAGEFS_STATE_DIR/<jobid> (root's own directory), readable by the job's user only.
# User-caused failures do not fail the prolog (the node is not drained); node faults exit 1.
set -u
# slurmd gives scripts a bare environment; root's script chooses its own PATH (make install
# writes its prefix for @PREFIX@).
PATH=@PREFIX@/sbin:@PREFIX@/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
. "${STAGEFS_SLURM_ENV:-/etc/stagefs/slurm.env}"
: "${STAGEFS_BIN:=@PREFIX@/bin/stagefs}"
# slurmd gives a prolog the job's options as SPANK_STAGEFS_* (the plugin passes them at submit).
SPEC=${SPANK_STAGEFS_STORAGE_STAGE:-${SPANK__SLURM_SPANK_OPTION_stagefs_storage_stage:-${STAGEFS_STAGE:-}}}
[ -n "$SPEC" ] || exit 0
POLICY=${SPANK_STAGEFS_STORAGE_STAGE_POLICY:-${SPANK__SLURM_SPANK_OPTION_stagefs_storage_stage_policy:-fail}}
[ "$POLICY" = warn ] || POLICY=fail
NO_MOUNT=${SPANK_STAGEFS_NO_MOUNT:-${SPANK__SLURM_SPANK_OPTION_stagefs_storage_no_mount+yes}}
JOB=${SLURM_JOB_ID:?}
USER_NAME=${SLURM_JOB_USER:?}
STATE_DIR=${STAGEFS_STATE_DIR:-/run/stagefs}
case $JOB in '' | *[!0-9]*) echo "stagefs: SLURM_JOB_ID '$JOB' is not a job id" >&2; exit 1 ;; esac
UID_N=$(id -u -- "$USER_NAME") || { echo "stagefs: no such user $USER_NAME" >&2; exit 1; }
GID_N=$(id -g -- "$USER_NAME")
HOME_DIR=$(getent passwd "$UID_N" | cut -d: -f6)

# A site directory: owned by root and, when others may write it, sticky; "root-only": writable
# by root alone.
site_dir_ok() {
    if [ -d "$1" ] && [ ! -L "$1" ] && [ "$(stat -c %u -- "$1")" = 0 ]; then
        if [ "${3:-}" = root-only ]; then
            [ -z "$(find "$1" -maxdepth 0 -perm /022)" ] && return 0
        else
            [ -z "$(find "$1" -maxdepth 0 -perm /022 ! -perm -1000)" ] && return 0
        fi
    fi
    if [ "${3:-}" = root-only ]; then
        echo "stagefs: job $JOB: $2 $1 is missing, or not owned by root and writable by root alone (chmod 755)" >&2
    else
        echo "stagefs: job $JOB: $2 $1 is missing, or not owned by root and sticky (chmod 1777)" >&2
    fi
    return 1
}
mounted() { awk -v m="$1" '$5 == m { found = 1 } END { exit !found }' /proc/self/mountinfo; }
# <parent>/<name> as a directory of the job's user (0700), never following a link.
prepare_dir() {
    if mounted "$1/$2"; then
        REASONS="${REASONS}stagefs: $1/$2 is a mount point: unmount it
"
        return 1
    fi
    owner=$(stat -c %u -- "$1/$2" 2>/dev/null)
    if [ -n "$owner" ] && [ "$owner" != "$UID_N" ] && [ "$owner" != 0 ]; then
        # Another user's entry under this user's name: moved aside (mv renames a link itself).
        mv -T -- "$1/$2" "$1/.stagefs-moved-$2-$(date +%s)-uid$owner" || {
            REASONS="${REASONS}stagefs: $1/$2 belongs to uid $owner and cannot be moved aside
"
            return 1
        }
        echo "stagefs: job $JOB: moved $1/$2 (uid $owner's) aside" >&2
    fi
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
# Named volumes: STAGEFS_VOLUMES="scratch=stagefs+unix:///run/stagefs/scratch.sock models=..." (no spaces in a URL).
VOLUMES=
for v in ${STAGEFS_VOLUMES:-}; do
    case $v in *=*) VOLUMES="$VOLUMES --volume $v" ;; *) echo "stagefs: job $JOB: STAGEFS_VOLUMES item '$v' is not NAME=META-URL" >&2; exit 1 ;; esac
done
[ -x "$STAGEFS_BIN" ] || { echo "stagefs: job $JOB: $STAGEFS_BIN cannot be run" >&2; exit 1; }
site_dir_ok "$STAGEFS_CACHE_ROOT" cache_root || exit 1
# Job settings (stagefs.env): checked by `stagefs job prolog`, which refuses a mount option
# outside its safe list (the job then fails with the reason).
LOG_ROOT=${STAGEFS_LOG_ROOT:-$STAGEFS_CACHE_ROOT}
[ "$LOG_ROOT" = "$STAGEFS_CACHE_ROOT" ] || site_dir_ok "$LOG_ROOT" log_root || exit 1
# (as arguments of `stagefs job prolog`, each one word whatever it holds)
set -- --keep-logs "${STAGEFS_KEEP_LOGS:-7d}" --log-dir "$LOG_ROOT"
[ -n "${STAGEFS_CACHE_SIZE:-}" ] && set -- "$@" --cache-size "$STAGEFS_CACHE_SIZE"
[ -n "${STAGEFS_FREE_SPACE_RATIO:-}" ] && set -- "$@" --free-space-ratio "$STAGEFS_FREE_SPACE_RATIO"
[ -n "${STAGEFS_MOUNT_OPTIONS:-}" ] && set -- "$@" --mount-options "$STAGEFS_MOUNT_OPTIONS"
mkdir -p -m 0755 -- "$STATE_DIR" && site_dir_ok "$STATE_DIR" state_dir root-only || exit 1
MNT=
if [ -z "$NO_MOUNT" ] && [ -n "${STAGEFS_MOUNT_ROOT:-}" ]; then
    site_dir_ok "$STAGEFS_MOUNT_ROOT" mount_root root-only || exit 1
    MNT="$STAGEFS_MOUNT_ROOT/$JOB"
fi

STATE=failed
REASONS=
LIMIT=$((${STAGEFS_TIMEOUT:-3600} + 120))
if [ "${#SPEC}" -gt 4096 ]; then
    REASONS="stagefs: --storage-stage is longer than 4096 characters
"
elif prepare_dir "$STAGEFS_CACHE_ROOT" "$UID_N" && { [ "$LOG_ROOT" = "$STAGEFS_CACHE_ROOT" ] || prepare_dir "$LOG_ROOT" "$UID_N"; }; then
    [ -n "$MNT" ] && ! prepare_dir "$STAGEFS_MOUNT_ROOT" "$JOB" && MNT=
    # As the job's user (its uid, gid and groups, a clean environment). Of what it prints, the
    # first 16 KiB are kept (the first reasons matter) and the rest is read and dropped.
    RCFILE="$STATE_DIR/$JOB.rc"
    OUT=$( {
        timeout "$LIMIT" env -i PATH="$PATH" HOME="$HOME_DIR" USER="$USER_NAME" LOGNAME="$USER_NAME" \
            setpriv --reuid="$UID_N" --regid="$GID_N" --init-groups -- "$STAGEFS_BIN" job prolog --job "$JOB" \
            --cache-dir "$STAGEFS_CACHE_ROOT" --volume "$STAGEFS_VOLUME" $VOLUMES --spec "$SPEC" --timeout "${STAGEFS_TIMEOUT:-3600}" \
            "$@" ${MNT:+--mount-dir "$MNT"} 2>&1
        echo $? > "$RCFILE"
    } | { head -c 16384; cat > /dev/null; })
    RC=$(cat -- "$RCFILE" 2>/dev/null)
    rm -f -- "$RCFILE"
    case $RC in
        0) STATE=ok ;;
        3) STATE=partial ;;
        124) OUT="$OUT
stagefs: staging did not end within $LIMIT s" ;;
    esac
    # Any other status of the user's process is the job's failure, never the node's.
    REASONS="$REASONS$(printf '%s\n' "$OUT" | grep '^stagefs: ' | head -c 8192)
"
fi
MOUNTLINE=
if [ -n "$MNT" ] && mounted "$MNT"; then MOUNTLINE="mount=$MNT"; elif [ -n "$MNT" ] && [ "$STATE" = ok ]; then STATE=partial; fi

{
    echo "$STATE"
    echo "policy=$POLICY"
    [ -n "$MOUNTLINE" ] && echo "$MOUNTLINE"
    printf '%s' "$REASONS" | grep '^stagefs: ' || true
} > "$STATE_DIR/$JOB.new" && chown -- "$UID_N:$GID_N" "$STATE_DIR/$JOB.new" && chmod 0400 -- "$STATE_DIR/$JOB.new" &&
    mv -f -- "$STATE_DIR/$JOB.new" "$STATE_DIR/$JOB" || {
    echo "stagefs: job $JOB: cannot write $STATE_DIR/$JOB" >&2
    exit 1
}
exit 0
