#!/bin/sh
# Slurm Prolog for sites that prefer scripts to the SPANK plugin's job prolog: stages the
# datasets a job asked for (sbatch --storage-stage=..., registered by the plugin, or the job's
# STAGEFS_STAGE variable passed by the site's job_submit) into this node's cache as the job's
# user, pinned for the job, and mounts the volume for the job. Runs as root on every node of the
# allocation (PrologFlags=Alloc). User-caused failures are written to the job's status file and
# do not fail the prolog (the node is not drained); node faults exit 1.
set -u
. "${STAGEFS_SLURM_ENV:-/etc/stagefs/slurm.env}"
SPEC=${SPANK__SLURM_SPANK_OPTION_stagefs_storage_stage:-${SPANK_STAGEFS_STORAGE_STAGE:-${STAGEFS_STAGE:-}}}
[ -n "$SPEC" ] || exit 0
POLICY=${SPANK__SLURM_SPANK_OPTION_stagefs_storage_stage_policy:-fail}
NO_MOUNT=${SPANK__SLURM_SPANK_OPTION_stagefs_storage_no_mount+yes}
JOB=${SLURM_JOB_ID:?}
USER_NAME=${SLURM_JOB_USER:?}
UID_N=$(id -u "$USER_NAME") || { echo "stagefs: no such user $USER_NAME" >&2; exit 1; }
GID_N=$(id -g "$USER_NAME")

[ -x "$STAGEFS_BIN" ] || { echo "stagefs: $STAGEFS_BIN cannot be run" >&2; exit 1; }
[ -d "$STAGEFS_CACHE_ROOT" ] || { echo "stagefs: cache root $STAGEFS_CACHE_ROOT is missing" >&2; exit 1; }

JOBDIR="$STAGEFS_CACHE_ROOT/$UID_N/jobs/$JOB"
install -d -m 0700 -o "$UID_N" -g "$GID_N" "$STAGEFS_CACHE_ROOT/$UID_N" "$STAGEFS_CACHE_ROOT/$UID_N/jobs" "$JOBDIR"

PATHS=$(printf '%s' "$SPEC" | tr ',' ' ')
STATE=ok
REASONS=$(timeout "${STAGEFS_TIMEOUT:-3600}" "$STAGEFS_BIN" stage --quiet --meta "$STAGEFS_VOLUME" \
    --cache-dir "$STAGEFS_CACHE_ROOT" --as-user "$USER_NAME" --job "$JOB" --report "$JOBDIR/report.json" $PATHS 2>&1 >/dev/null)
RC=$?
case $RC in
    0) ;;
    124) STATE=failed; REASONS="stagefs: staging timed out after ${STAGEFS_TIMEOUT:-3600} s" ;;
    126|127) echo "stagefs: cannot run $STAGEFS_BIN" >&2; exit 1 ;;
    *) if grep -q '"status" : "partial"' "$JOBDIR/report.json" 2>/dev/null; then STATE=partial; else STATE=failed; fi ;;
esac

MOUNTLINE=
if [ -z "$NO_MOUNT" ] && [ -n "${STAGEFS_MOUNT_ROOT:-}" ]; then
    MNT="$STAGEFS_MOUNT_ROOT/$JOB"
    install -d -m 0700 -o "$UID_N" -g "$GID_N" "$MNT"
    if OUT=$(runuser -u "$USER_NAME" -- "$STAGEFS_BIN" mount -d "$STAGEFS_VOLUME" "$MNT" \
        --cache-dir "$STAGEFS_CACHE_ROOT" --log "$JOBDIR/mount.log" 2>&1); then
        MOUNTLINE="mount=$MNT"
    else
        REASONS="$REASONS
$OUT"
        [ "$STATE" = ok ] && STATE=partial
    fi
fi

{
    echo "$STATE"
    echo "policy=$POLICY"
    [ -n "$MOUNTLINE" ] && echo "$MOUNTLINE"
    printf '%s\n' "$REASONS" | grep '^stagefs: ' || true
} > "$JOBDIR/status"
chown "$UID_N:$GID_N" "$JOBDIR/status"
exit 0
