/*
 * spank_stagefs: stage a job's StageFS datasets into the node-local cache before it starts.
 *
 *   sbatch --storage-stage=/datasets/imagenet[,VOLUME:/path...] [--storage-stage-policy=fail|warn]
 *          [--storage-no-mount] job.sh
 *
 * plugstack.conf arguments (all optional but volume= and cache_root=):
 *   stagefs=PATH         the stagefs binary (default /usr/local/bin/stagefs)
 *   volume=META-URL      the site's default volume
 *   volume.NAME=META-URL more volumes, named in specs as NAME:/path
 *   cache_root=DIR       node-local cache root (per-user subdirectories; root-owned, sticky
 *                        when users may write it)
 *   mount_root=DIR       per-job mounts are made at DIR/<jobid> (root-owned, not writable by users)
 *   state_dir=DIR        root-only directory for the per-job status files (default /run/stagefs)
 *   timeout=SECONDS      limit for staging (default 3600)
 *   mount_options=OPTS   FUSE options of the job's mount, from a safe list (allow_root for
 *                        setuid-mode container runtimes, allow_other, ro, noatime, noexec,
 *                        nosuid, nodev); anything else is refused when the plugin loads
 *   cache_size=MIB       MiB of the node's cache a job's user may fill (default 102400)
 *   free_space_ratio=R   fraction of the cache file system kept free (default 0.1)
 *   log_root=DIR         job reports and logs go to DIR/<uid>/jobs/<jobid>/ (default cache_root)
 *   keep_logs=DURATION   how long those are kept after the job (default 7d; 0: removed at once)
 *   flush_timeout=DURATION  time the job's mount gets to flush buffered writes and exit at the
 *                        end of the job before it is killed (default 60s)
 *   hooks=no             leave the job prolog/epilog to slurm/prolog.d and epilog.d (Prolog=,
 *                        Epilog= in slurm.conf); the plugin then only registers the options and
 *                        sets up the job's environment in task_init
 *
 * Root never works in a place a user can write by path. In the job prolog (root, every node of
 * the allocation; PrologFlags=Alloc) it makes <cache_root>/<uid> and <mount_root>/<jobid>
 * through directory descriptors opened with O_NOFOLLOW (a link planted there fails the job with
 * the reason, the node is not drained), then runs `stagefs job prolog` in a child that has
 * switched to the job's uid, gid and groups: that child does all work in the user's directories
 * (staging, reports, the job's mount). The child's exit status is the outcome (0 ok, 3 partial,
 * 4 failed); root writes it with the reasons to <state_dir>/<jobid>, where only root can write,
 * and task_init fails the job with them. Only node faults (binary missing, cache_root,
 * log_root or state_dir unusable) fail the prolog. The epilog runs `stagefs job epilog` as the
 * user (it detaches the job's mount, gives the mount process flush_timeout to flush buffered
 * writes and exit, then kills it; releases the pins; keeps the job's logs for keep_logs), then
 * aborts and kills whatever is left of the mount as root and removes the mount directory
 * through its parent's descriptor.
 *
 * The plugin does not link Swift: it runs the stagefs binary. Between fork and exec the child
 * makes only async-signal-safe calls (everything it needs is prepared before the fork); the
 * parent waits on that pid only, with a time limit. Every symbol but the SPANK entry points is
 * static (a global named like one of sbatch's, such as `opt`, would silently bind to it).
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <slurm/spank.h>

SPANK_PLUGIN(stagefs, 1);

#define MAX_VOLUMES 16
#define MAX_SPECS 64
#define MAX_SPEC_TEXT 4096 /* the whole --storage-stage value */

struct volume {
    char name[64];
    char url[1024];
};

static char sf_binary[PATH_MAX] = "/usr/local/bin/stagefs";
static char sf_cache_root[PATH_MAX] = "";
static char sf_mount_root[PATH_MAX] = "";
static char sf_state_dir[PATH_MAX] = "/run/stagefs";
static int sf_hooks = 1; /* 0: the site runs slurm/prolog.d and epilog.d instead of the plugin's */
static struct volume sf_volumes[MAX_VOLUMES];
static int sf_nvolumes = 0;
static int sf_default_volume = -1;
static int sf_timeout = 3600;
static char sf_mount_options[256] = "";
static char sf_cache_size[32] = "";       /* MiB, as given; empty: stagefs's default */
static char sf_free_space_ratio[32] = ""; /* as given; empty: stagefs's default */
static char sf_log_root[PATH_MAX] = "";   /* empty: cache_root */
static char sf_keep_logs[32] = "7d";
static int sf_flush_timeout = 60;

/* What a job asked for (parsed from the option's value). */
struct spec {
    int volume;
    char path[PATH_MAX];
};

static int sf_opt_stage(int val, const char *optarg, int remote);
static int sf_opt_policy(int val, const char *optarg, int remote);
static int sf_opt_nomount(int val, const char *optarg, int remote);

static struct spank_option sf_options[] = {
    {"storage-stage", "SPEC[,SPEC...]",
     "Stage StageFS datasets into the node-local cache before the job starts: absolute paths in the "
     "site volume (/datasets/imagenet) or VOLUME:PATH.",
     1, 0, sf_opt_stage},
    {"storage-stage-policy", "fail|warn",
     "What a dataset that cannot be staged does to the job: fail it (default) or run it anyway.", 1, 0, sf_opt_policy},
    {"storage-no-mount", NULL, "Stage only; do not mount the volume for the job.", 0, 0, sf_opt_nomount},
    SPANK_OPTIONS_TABLE_END};

/* ---- configuration ---- */

static int sf_find_volume(const char *name) {
    for (int i = 0; i < sf_nvolumes; i++)
        if (strcmp(sf_volumes[i].name, name) == 0) return i;
    return -1;
}

static int sf_add_volume(const char *name, const char *url) {
    if (sf_nvolumes >= MAX_VOLUMES) {
        slurm_error("stagefs: more than %d volumes in plugstack.conf", MAX_VOLUMES);
        return -1;
    }
    snprintf(sf_volumes[sf_nvolumes].name, sizeof(sf_volumes[0].name), "%s", name);
    snprintf(sf_volumes[sf_nvolumes].url, sizeof(sf_volumes[0].url), "%s", url);
    return sf_nvolumes++;
}

/* FUSE options a job's mount may be given: what container runtimes and other users need, and
 * options that only take rights away. The same list as `stagefs job prolog --mount-options`. */
static const char *const sf_safe_mount_options[] = {"allow_root", "allow_other", "ro", "noatime", "noexec", "nosuid", "nodev", NULL};

static int sf_check_mount_options(const char *text) {
    char copy[sizeof(sf_mount_options)];
    if (strlen(text) >= sizeof(copy)) {
        slurm_error("stagefs: mount_options= is longer than %zu characters", sizeof(copy) - 1);
        return -1;
    }
    snprintf(copy, sizeof(copy), "%s", text);
    int root = 0, other = 0;
    char *save = NULL;
    for (char *o = strtok_r(copy, ",", &save); o; o = strtok_r(NULL, ",", &save)) {
        int ok = 0;
        for (int i = 0; sf_safe_mount_options[i]; i++)
            if (strcmp(o, sf_safe_mount_options[i]) == 0) ok = 1;
        if (!ok) {
            slurm_error("stagefs: mount option '%s' in mount_options= is not allowed for a job's mount (allowed: allow_root, allow_other, "
                        "ro, noatime, noexec, nosuid, nodev)",
                        o);
            return -1;
        }
        root |= strcmp(o, "allow_root") == 0;
        other |= strcmp(o, "allow_other") == 0;
    }
    if (root && other) {
        slurm_error("stagefs: mount_options= allow_root and allow_other exclude each other: allow_other already lets root in");
        return -1;
    }
    return 0;
}

/* Seconds of "N", "Ns", "Nm", "Nh" or "Nd"; -1 when it is not one. */
static long sf_duration(const char *text) {
    char *end = NULL;
    if (!isdigit((unsigned char)text[0])) return -1;
    errno = 0;
    long n = strtol(text, &end, 10);
    if (errno || n < 0 || n > 100L * 365 * 86400) return -1;
    long unit = 1;
    if (*end == 's') unit = 1, end++;
    else if (*end == 'm') unit = 60, end++;
    else if (*end == 'h') unit = 3600, end++;
    else if (*end == 'd') unit = 86400, end++;
    if (*end) return -1;
    return n * unit;
}

static int sf_parse_args(int ac, char **av) {
    sf_nvolumes = 0;
    sf_default_volume = -1;
    for (int i = 0; i < ac; i++) {
        const char *a = av[i];
        if (strncmp(a, "stagefs=", 8) == 0) {
            snprintf(sf_binary, sizeof(sf_binary), "%s", a + 8);
        } else if (strncmp(a, "volume=", 7) == 0) {
            sf_default_volume = sf_add_volume("", a + 7);
            if (sf_default_volume < 0) return -1;
        } else if (strncmp(a, "volume.", 7) == 0 && strchr(a, '=')) {
            const char *eq = strchr(a, '=');
            char name[64];
            size_t n = (size_t)(eq - (a + 7));
            if (n == 0 || n >= sizeof(name)) {
                slurm_error("stagefs: bad plugstack argument '%s'", a);
                return -1;
            }
            memcpy(name, a + 7, n);
            name[n] = 0;
            if (strpbrk(name, ":=,/ ")) {
                slurm_error("stagefs: volume name '%s' may not contain ':', '=', ',', '/' or spaces", name);
                return -1;
            }
            if (sf_add_volume(name, eq + 1) < 0) return -1;
        } else if (strncmp(a, "cache_root=", 11) == 0) {
            snprintf(sf_cache_root, sizeof(sf_cache_root), "%s", a + 11);
        } else if (strncmp(a, "mount_root=", 11) == 0) {
            snprintf(sf_mount_root, sizeof(sf_mount_root), "%s", a + 11);
        } else if (strcmp(a, "hooks=no") == 0 || strcmp(a, "hooks=yes") == 0) {
            sf_hooks = a[6] == 'y';
        } else if (strncmp(a, "state_dir=", 10) == 0) {
            snprintf(sf_state_dir, sizeof(sf_state_dir), "%s", a + 10);
        } else if (strncmp(a, "timeout=", 8) == 0) {
            sf_timeout = atoi(a + 8);
            if (sf_timeout <= 0) sf_timeout = 3600;
        } else if (strncmp(a, "mount_options=", 14) == 0) {
            if (sf_check_mount_options(a + 14) < 0) return -1;
            snprintf(sf_mount_options, sizeof(sf_mount_options), "%s", a + 14);
        } else if (strncmp(a, "cache_size=", 11) == 0) {
            char *end = NULL;
            long mib = strtol(a + 11, &end, 10);
            if (!isdigit((unsigned char)a[11]) || *end || mib <= 0 || strlen(a + 11) >= sizeof(sf_cache_size)) {
                slurm_error("stagefs: cache_size= takes a positive number of MiB, not '%s'", a + 11);
                return -1;
            }
            snprintf(sf_cache_size, sizeof(sf_cache_size), "%ld", mib);
        } else if (strncmp(a, "free_space_ratio=", 17) == 0) {
            char *end = NULL;
            double r = strtod(a + 17, &end);
            if (end == a + 17 || *end || !(r >= 0 && r < 1) || strlen(a + 17) >= sizeof(sf_free_space_ratio)) {
                slurm_error("stagefs: free_space_ratio= takes a fraction from 0 to below 1, not '%s'", a + 17);
                return -1;
            }
            snprintf(sf_free_space_ratio, sizeof(sf_free_space_ratio), "%s", a + 17);
        } else if (strncmp(a, "log_root=", 9) == 0) {
            if (a[9] != '/') {
                slurm_error("stagefs: log_root= takes an absolute directory, not '%s'", a + 9);
                return -1;
            }
            snprintf(sf_log_root, sizeof(sf_log_root), "%s", a + 9);
        } else if (strncmp(a, "keep_logs=", 10) == 0) {
            if (sf_duration(a + 10) < 0 || strlen(a + 10) >= sizeof(sf_keep_logs)) {
                slurm_error("stagefs: keep_logs= takes a duration such as 7d, 12h, 30m, 90s or 0, not '%s'", a + 10);
                return -1;
            }
            snprintf(sf_keep_logs, sizeof(sf_keep_logs), "%s", a + 10);
        } else if (strncmp(a, "flush_timeout=", 14) == 0) {
            long t = sf_duration(a + 14);
            if (t <= 0 || t > 86400) {
                slurm_error("stagefs: flush_timeout= takes a duration from 1s to 1d such as 60 or 5m, not '%s'", a + 14);
                return -1;
            }
            sf_flush_timeout = (int)t;
        } else {
            slurm_error("stagefs: unknown plugstack argument '%s'", a);
            return -1;
        }
    }
    return 0;
}

/* Parses "SPEC[,SPEC...]"; on error writes the reason to `why`. Returns the number of specs. */
static int sf_parse_specs(const char *text, struct spec *specs, int max, char *why, size_t whylen) {
    int n = 0;
    const char *p = text;
    if (!text || !*text) {
        snprintf(why, whylen, "empty --storage-stage");
        return -1;
    }
    if (strlen(text) > MAX_SPEC_TEXT) {
        snprintf(why, whylen, "--storage-stage is longer than %d characters (use a manifest directory instead)", MAX_SPEC_TEXT);
        return -1;
    }
    while (1) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        char item[PATH_MAX + 80];
        if (len == 0) {
            snprintf(why, whylen, "empty item in --storage-stage=%s", text);
            return -1;
        }
        if (len >= sizeof(item)) {
            snprintf(why, whylen, "item too long in --storage-stage");
            return -1;
        }
        memcpy(item, p, len);
        item[len] = 0;
        if (n >= max) {
            snprintf(why, whylen, "more than %d items in --storage-stage", max);
            return -1;
        }
        const char *path = item;
        int vol = sf_default_volume;
        if (item[0] != '/') {
            char *colon = strchr(item, ':');
            if (!colon) {
                snprintf(why, whylen, "'%s' is not an absolute path in the volume (or VOLUME:/path)", item);
                return -1;
            }
            *colon = 0;
            vol = sf_find_volume(item);
            if (vol < 0 || item[0] == 0) {
                char names[256] = "";
                for (int i = 0; i < sf_nvolumes; i++) {
                    if (!sf_volumes[i].name[0]) continue;
                    size_t used = strlen(names);
                    snprintf(names + used, sizeof(names) - used, "%s%s", used ? ", " : "", sf_volumes[i].name);
                }
                snprintf(why, whylen, "unknown volume '%s' in --storage-stage (configured: %s)", item, names[0] ? names : "none");
                return -1;
            }
            path = colon + 1;
            if (path[0] != '/') {
                snprintf(why, whylen, "'%s' is not an absolute path in volume %s", path, item);
                return -1;
            }
        }
        if (vol < 0) {
            snprintf(why, whylen, "no default volume is configured: name one as VOLUME:%s", path);
            return -1;
        }
        specs[n].volume = vol;
        snprintf(specs[n].path, sizeof(specs[n].path), "%s", path);
        n++;
        if (!end) break;
        p = end + 1;
    }
    return n;
}

/* ---- option callbacks (sbatch/salloc/srun: validation at submit time) ---- */

/* The values given at submit time, for the job control environment (init_post_opt). */
static char sf_given_stage[8192];
static char sf_given_policy[16];
static int sf_given_nomount;

static int sf_opt_stage(int val, const char *optarg, int remote) {
    struct spec specs[MAX_SPECS];
    char why[512];
    if (sf_parse_specs(optarg, specs, MAX_SPECS, why, sizeof(why)) < 0) {
        slurm_error("stagefs: %s", why);
        return -1;
    }
    snprintf(sf_given_stage, sizeof(sf_given_stage), "%s", optarg);
    return 0;
}

static int sf_opt_policy(int val, const char *optarg, int remote) {
    if (!optarg || (strcmp(optarg, "fail") && strcmp(optarg, "warn"))) {
        slurm_error("stagefs: --storage-stage-policy takes fail or warn, not '%s'", optarg ? optarg : "");
        return -1;
    }
    snprintf(sf_given_policy, sizeof(sf_given_policy), "%s", optarg);
    return 0;
}

static int sf_opt_nomount(int val, const char *optarg, int remote) {
    sf_given_nomount = 1;
    return 0;
}

int slurm_spank_init(spank_t sp, int ac, char **av) {
    if (sf_parse_args(ac, av) < 0) return -1;
    for (struct spank_option *o = sf_options; o->name; o++) {
        spank_err_t rc = spank_option_register(sp, o);
        if (rc != ESPANK_SUCCESS) {
            slurm_error("stagefs: cannot register --%s: %s", o->name, spank_strerror(rc));
            return -1;
        }
    }
    return 0;
}

/* ---- submit time: hand the options to Prolog=/Epilog= scripts ---- */

/*
 * In sbatch/salloc (the allocator context), after the options are parsed: put their values in
 * the job control environment, which Slurm gives the prolog and epilog as SPANK_STAGEFS_*
 * (slurm/prolog.d reads them; the plugin's own job prolog reads the options directly).
 */
int slurm_spank_init_post_opt(spank_t sp, int ac, char **av) {
    if (spank_context() != S_CTX_ALLOCATOR && spank_context() != S_CTX_LOCAL) return 0;
    if (!sf_given_stage[0]) return 0;
    if (spank_job_control_setenv(sp, "STAGEFS_STORAGE_STAGE", sf_given_stage, 1) != ESPANK_SUCCESS) {
        slurm_error("stagefs: cannot pass --storage-stage to the job's prolog");
        return -1;
    }
    if (sf_given_policy[0]) spank_job_control_setenv(sp, "STAGEFS_STORAGE_STAGE_POLICY", sf_given_policy, 1);
    if (sf_given_nomount) spank_job_control_setenv(sp, "STAGEFS_NO_MOUNT", "1", 1);
    return 0;
}

/* ---- the job and its user ---- */

#define MAX_GROUPS 65536 /* NGROUPS_MAX */

struct job {
    uint32_t id;
    uid_t uid;
    gid_t gid;
    char user[256];
    char home[PATH_MAX];
    gid_t *groups; /* the user's groups, read before any fork */
    int ngroups;
    char jobid[32];
    char mount[PATH_MAX]; /* <mount_root>/<jobid>, or empty */
};

static int sf_job(spank_t sp, struct job *j) {
    memset(j, 0, sizeof(*j));
    if (spank_get_item(sp, S_JOB_ID, &j->id) != ESPANK_SUCCESS) return -1;
    if (spank_get_item(sp, S_JOB_UID, &j->uid) != ESPANK_SUCCESS) return -1;
    if (spank_get_item(sp, S_JOB_GID, &j->gid) != ESPANK_SUCCESS) j->gid = (gid_t)-1;
    struct passwd pw, *res = NULL;
    static char buf[1 << 16];
    if (getpwuid_r(j->uid, &pw, buf, sizeof(buf), &res) != 0 || !res) {
        slurm_error("stagefs: job %u: no passwd entry for uid %u", j->id, (unsigned)j->uid);
        return -1;
    }
    snprintf(j->user, sizeof(j->user), "%s", pw.pw_name);
    snprintf(j->home, sizeof(j->home), "%s", pw.pw_dir);
    if (j->gid == (gid_t)-1) j->gid = pw.pw_gid;
    static gid_t groups[MAX_GROUPS];
    j->groups = groups;
    j->ngroups = MAX_GROUPS;
    if (getgrouplist(j->user, j->gid, j->groups, &j->ngroups) < 0) {
        slurm_error("stagefs: job %u: user %s is in more than %d groups", j->id, j->user, MAX_GROUPS);
        return -1;
    }
    snprintf(j->jobid, sizeof(j->jobid), "%u", j->id);
    if (sf_mount_root[0]) snprintf(j->mount, sizeof(j->mount), "%s/%u", sf_mount_root, j->id);
    return 0;
}

/* ---- directories: root works through descriptors, never by a path a user can change ---- */

/* A directory root keeps for the site: owned by root and, when others may write it, sticky
 * (so nobody removes or replaces what root created there); with `root_only`, writable by root
 * alone (mount_root, state_dir: users never create entries there). */
static int sf_site_dir_ok(const char *path, const char *what, uint32_t jobid, int root_only) {
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode)) {
        slurm_error("stagefs: job %u: %s %s is missing", jobid, what, path);
        return 0;
    }
    if (root_only && (st.st_uid != 0 || (st.st_mode & 0022))) {
        slurm_error("stagefs: job %u: %s %s must be owned by root and writable by root alone (chmod 755)", jobid, what, path);
        return 0;
    }
    if (st.st_uid != 0 || ((st.st_mode & 0022) && !(st.st_mode & S_ISVTX))) {
        slurm_error("stagefs: job %u: %s %s must be owned by root and, if others may write it, sticky (chmod 1777)", jobid, what, path);
        return 0;
    }
    return 1;
}

/*
 * Makes <parent>/<name> a directory owned by the job's user with mode 0700, as root, without
 * following links: mkdirat, then openat(O_NOFOLLOW|O_DIRECTORY), then fchown/fchmod on that
 * descriptor. An existing entry is accepted only when it is a real directory owned by the user
 * (or still by root, which users cannot replace in a sticky directory). Returns 0, or -1 with a
 * reason for the job in `why`.
 */
static int sf_mounted(const char *path);

static int sf_prepare_dir(const char *parent, const char *name, const struct job *j, char *why, size_t whylen) {
    char full[PATH_MAX + 64];
    snprintf(full, sizeof(full), "%s/%s", parent, name);
    if (sf_mounted(full)) {
        /* A file system mounted there (FUSE by a user) could make root wait forever. */
        snprintf(why, whylen, "stagefs: %s is a mount point: unmount it", full);
        return -1;
    }
    int pfd = open(parent, O_RDONLY | O_DIRECTORY | O_CLOEXEC); /* the site's own setting */
    if (pfd < 0) {
        snprintf(why, whylen, "stagefs: cannot open %s: %s", parent, strerror(errno));
        return -1;
    }
    /* Another user's entry under this user's name (a directory, a link): move it aside. The
     * user's own link or file stays and fails the job: it is theirs to remove. */
    struct stat lst;
    if (fstatat(pfd, name, &lst, AT_SYMLINK_NOFOLLOW) == 0 && lst.st_uid != j->uid && lst.st_uid != 0) {
        char aside[96];
        snprintf(aside, sizeof(aside), ".stagefs-moved-%s-%ld-uid%u", name, (long)time(NULL), (unsigned)lst.st_uid);
        if (renameat(pfd, name, pfd, aside) != 0) {
            snprintf(why, whylen, "stagefs: %s belongs to uid %u and cannot be moved aside: %s", full, (unsigned)lst.st_uid, strerror(errno));
            close(pfd);
            return -1;
        }
        slurm_info("stagefs: job %u: moved %s (uid %u's) aside to %s/%s", j->id, full, (unsigned)lst.st_uid, parent, aside);
    }
    if (mkdirat(pfd, name, 0700) != 0 && errno != EEXIST) {
        snprintf(why, whylen, "stagefs: cannot create %s/%s: %s", parent, name, strerror(errno));
        close(pfd);
        return -1;
    }
    int fd = openat(pfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    int e = errno;
    close(pfd);
    if (fd < 0) {
        if (e == ELOOP || e == ENOTDIR)
            snprintf(why, whylen, "stagefs: %s/%s is a symbolic link or not a directory: remove it", parent, name);
        else
            snprintf(why, whylen, "stagefs: cannot open %s/%s: %s", parent, name, strerror(e));
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || (st.st_uid != j->uid && st.st_uid != 0)) {
        snprintf(why, whylen, "stagefs: %s/%s belongs to uid %u, not to %s: remove it", parent, name, (unsigned)st.st_uid, j->user);
        close(fd);
        return -1;
    }
    int rc = 0;
    if ((st.st_uid != j->uid || st.st_gid != j->gid) && fchown(fd, j->uid, j->gid) != 0) rc = -1;
    if (rc == 0 && (st.st_mode & 07777) != 0700 && fchmod(fd, 0700) != 0) rc = -1;
    if (rc != 0) snprintf(why, whylen, "stagefs: cannot hand %s/%s to %s: %s", parent, name, j->user, strerror(errno));
    close(fd);
    return rc;
}

/* Writes the job's status file in state_dir (root's own directory), reporting what failed. */
static int sf_write_status(uint32_t jobid, uid_t uid, gid_t gid, const char *text) {
    if (mkdir(sf_state_dir, 0755) != 0 && errno != EEXIST) {
        slurm_error("stagefs: job %u: cannot create state_dir %s: %s", jobid, sf_state_dir, strerror(errno));
        return -1;
    }
    if (!sf_site_dir_ok(sf_state_dir, "state_dir", jobid, 1)) return -1;
    int dfd = open(sf_state_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) {
        slurm_error("stagefs: job %u: cannot open state_dir %s: %s", jobid, sf_state_dir, strerror(errno));
        return -1;
    }
    char name[32];
    snprintf(name, sizeof(name), "%u", jobid);
    int fd = openat(dfd, name, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
    close(dfd);
    if (fd < 0) {
        slurm_error("stagefs: job %u: cannot write %s/%s: %s", jobid, sf_state_dir, name, strerror(errno));
        return -1;
    }
    size_t n = strlen(text);
    while (n > 0) {
        ssize_t w = write(fd, text, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            slurm_error("stagefs: job %u: writing %s/%s failed: %s", jobid, sf_state_dir, name, w < 0 ? strerror(errno) : "short write");
            close(fd);
            return -1;
        }
        text += w;
        n -= (size_t)w;
    }
    /* Readable by the job's user only (task_init runs as the user); root's directory, so the
     * user cannot replace it, and changing it would only change their own job. */
    if (fchown(fd, uid, gid) != 0 || fchmod(fd, 0400) != 0 || close(fd) != 0) {
        slurm_error("stagefs: job %u: writing %s/%s failed: %s", jobid, sf_state_dir, name, strerror(errno));
        return -1;
    }
    return 0;
}

static int sf_read_file(const char *path, char *buf, size_t len) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, len - 1);
    close(fd);
    if (n < 0) return -1;
    buf[n] = 0;
    return (int)n;
}

/* ---- running stagefs ---- */

/*
 * Runs argv[0] with argv; as the job's user when `as_user`. Output (stdout and stderr) goes to
 * `out` (up to outlen-1 bytes kept). Everything the child needs is prepared here, before the
 * fork: between fork and exec it calls only async-signal-safe functions. Waits on that child
 * only, at most `timeout` seconds (then kills its process group). Returns the exit status, 124
 * on timeout, 127 when it could not run.
 */
static int sf_run(char *const argv[], const struct job *j, int as_user, int timeout, char *out, size_t outlen) {
    int pfd[2];
    if (out && outlen) out[0] = 0;
    char home[PATH_MAX + 8], user[300], path[] = "PATH=/usr/local/bin:/usr/bin:/bin";
    snprintf(home, sizeof(home), "HOME=%s", as_user ? j->home : "/root");
    snprintf(user, sizeof(user), "USER=%s", as_user ? j->user : "root");
    char *envp[] = {path, home, user, NULL};
    static const char cannot_switch[] = "stagefs: cannot switch to the job's user\n";
    static const char cannot_run[] = "stagefs: cannot run the stagefs binary\n";
    if (pipe2(pfd, O_CLOEXEC) != 0) return 127;
    pid_t pid = fork();
    if (pid < 0) {
        close(pfd[0]);
        close(pfd[1]);
        return 127;
    }
    if (pid == 0) {
        /* Async-signal-safe calls only from here to execve. */
        sigset_t none;
        sigemptyset(&none);
        struct sigaction dfl;
        memset(&dfl, 0, sizeof(dfl));
        dfl.sa_handler = SIG_DFL;
        for (int s = 1; s < NSIG; s++) sigaction(s, &dfl, NULL);
        sigprocmask(SIG_SETMASK, &none, NULL);
        setpgid(0, 0);
        dup2(pfd[1], 1);
        dup2(pfd[1], 2);
        int devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
        if (devnull >= 0) dup2(devnull, 0);
        syscall(SYS_close_range, 3U, ~0U, 0U); /* no descriptor of root's reaches the user */
        if (as_user && (setgroups((size_t)j->ngroups, j->groups) != 0 || setgid(j->gid) != 0 || setuid(j->uid) != 0 ||
                        (j->uid != 0 && setuid(0) == 0))) {
            if (write(2, cannot_switch, sizeof(cannot_switch) - 1) < 0) { /* nothing more to do */
            }
            _exit(126);
        }
        execve(argv[0], argv, envp);
        if (write(2, cannot_run, sizeof(cannot_run) - 1) < 0) { /* nothing more to do */
        }
        _exit(127);
    }
    close(pfd[1]);
    fcntl(pfd[0], F_SETFL, O_NONBLOCK);
    size_t got = 0;
    int status = 0, done = 0;
    time_t deadline = time(NULL) + timeout;
    while (!done) {
        char tmp[4096];
        ssize_t n;
        while ((n = read(pfd[0], tmp, sizeof(tmp))) > 0) {
            if (out && got + 1 < outlen) {
                size_t take = (size_t)n < outlen - 1 - got ? (size_t)n : outlen - 1 - got;
                memcpy(out + got, tmp, take);
                got += take;
                out[got] = 0;
            }
        }
        pid_t r = waitpid(pid, &status, WNOHANG);
        if (r == pid) {
            done = 1;
            break;
        }
        if (r < 0 && errno != EINTR) break;
        if (time(NULL) >= deadline) {
            kill(-pid, SIGTERM);
            struct timespec ts = {2, 0};
            nanosleep(&ts, NULL);
            kill(-pid, SIGKILL);
            waitpid(pid, &status, 0);
            close(pfd[0]);
            return 124;
        }
        struct timespec ts = {0, 50 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    close(pfd[0]);
    if (!done) return 127;
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    return 128 + WTERMSIG(status);
}

/* Keeps the lines of `text` that start with "stagefs: " (the binary's messages, for people). */
static void sf_lines_prefixed(const char *text, char *dst, size_t len) {
    dst[0] = 0;
    size_t used = 0;
    const char *p = text;
    while (p && *p) {
        const char *e = strchr(p, '\n');
        size_t n = e ? (size_t)(e - p) : strlen(p);
        if (n > 9 && strncmp(p, "stagefs: ", 9) == 0 && used + n + 2 < len) {
            memcpy(dst + used, p, n);
            used += n;
            dst[used++] = '\n';
            dst[used] = 0;
        }
        p = e ? e + 1 : NULL;
    }
}

static int sf_mounted(const char *path) {
    FILE *f = fopen("/proc/self/mountinfo", "r");
    if (!f) return 0;
    char line[8192];
    int found = 0;
    while (fgets(line, sizeof(line), f)) {
        char *save = NULL, *tok;
        int field = 0;
        for (tok = strtok_r(line, " ", &save); tok; tok = strtok_r(NULL, " ", &save), field++) {
            if (field == 4) {
                if (strcmp(tok, path) == 0) found = 1;
                break;
            }
        }
        if (found) break;
    }
    fclose(f);
    return found;
}

/* ---- prolog ---- */

int slurm_spank_job_prolog(spank_t sp, int ac, char **av) {
    /* Each entry point gets the plugstack arguments; the prolog runs in its own process. */
    if (sf_parse_args(ac, av) < 0) return -1;
    if (!sf_hooks) return 0;
    char *value = NULL;
    if (spank_option_getopt(sp, &sf_options[0], &value) != ESPANK_SUCCESS || !value) return 0;
    char *policy = NULL;
    int warn = spank_option_getopt(sp, &sf_options[1], &policy) == ESPANK_SUCCESS && policy && strcmp(policy, "warn") == 0;
    int no_mount = spank_option_getopt(sp, &sf_options[2], NULL) == ESPANK_SUCCESS;

    static struct job j;
    if (sf_job(sp, &j) < 0) {
        slurm_error("stagefs: cannot read the job's id and user");
        return -1;
    }
    /* Node faults: the prolog fails (Slurm drains the node). */
    if (access(sf_binary, X_OK) != 0) {
        slurm_error("stagefs: job %u: the stagefs binary %s cannot be run: %s", j.id, sf_binary, strerror(errno));
        return -1;
    }
    if (!sf_cache_root[0]) {
        slurm_error("stagefs: job %u: cache_root is not set in plugstack.conf", j.id);
        return -1;
    }
    if (!sf_site_dir_ok(sf_cache_root, "cache_root", j.id, 0)) return -1;
    int own_log_root = sf_log_root[0] && strcmp(sf_log_root, sf_cache_root) != 0;
    if (own_log_root && !sf_site_dir_ok(sf_log_root, "log_root", j.id, 0)) return -1;
    if (!no_mount && j.mount[0] && !sf_site_dir_ok(sf_mount_root, "mount_root", j.id, 1)) return -1;

    const char *state = "ok";
    char reasons[8192] = "";
    char why[PATH_MAX + 256];
    char uidname[32];
    snprintf(uidname, sizeof(uidname), "%u", (unsigned)j.uid);
    int ready = sf_prepare_dir(sf_cache_root, uidname, &j, why, sizeof(why)) == 0;
    if (ready && own_log_root) ready = sf_prepare_dir(sf_log_root, uidname, &j, why, sizeof(why)) == 0;
    if (!ready) {
        state = "failed";
        snprintf(reasons, sizeof(reasons), "%s\n", why);
    }
    int mount_ready = 0;
    if (ready && !no_mount && j.mount[0]) {
        mount_ready = sf_prepare_dir(sf_mount_root, j.jobid, &j, why, sizeof(why)) == 0;
        if (!mount_ready) snprintf(reasons + strlen(reasons), sizeof(reasons) - strlen(reasons), "%s\n", why);
    }
    if (ready && strlen(value) > MAX_SPEC_TEXT) {
        ready = 0;
        state = "failed";
        snprintf(reasons + strlen(reasons), sizeof(reasons) - strlen(reasons), "stagefs: --storage-stage is longer than %d characters\n",
                 MAX_SPEC_TEXT);
    }
    if (ready) {
        /* Everything in the user's directories is done by stagefs, as the user. Whatever that
         * process ends with is the job's outcome: only root's own checks above are node faults. */
        static char volargs[MAX_VOLUMES][sizeof(((struct volume *)0)->url) + 80];
        char *argv[2 * MAX_VOLUMES + 32];
        int a = 0;
        char timeout[32];
        snprintf(timeout, sizeof(timeout), "%d", sf_timeout);
        argv[a++] = sf_binary;
        argv[a++] = "job";
        argv[a++] = "prolog";
        argv[a++] = "--job";
        argv[a++] = j.jobid;
        argv[a++] = "--cache-dir";
        argv[a++] = sf_cache_root;
        argv[a++] = "--timeout";
        argv[a++] = timeout;
        argv[a++] = "--keep-logs";
        argv[a++] = sf_keep_logs;
        if (sf_log_root[0]) {
            argv[a++] = "--log-dir";
            argv[a++] = sf_log_root;
        }
        if (sf_cache_size[0]) {
            argv[a++] = "--cache-size";
            argv[a++] = sf_cache_size;
        }
        if (sf_free_space_ratio[0]) {
            argv[a++] = "--free-space-ratio";
            argv[a++] = sf_free_space_ratio;
        }
        if (sf_mount_options[0]) {
            argv[a++] = "--mount-options";
            argv[a++] = sf_mount_options;
        }
        for (int v = 0; v < sf_nvolumes; v++) {
            snprintf(volargs[v], sizeof(volargs[v]), "%s=%s", sf_volumes[v].name, sf_volumes[v].url);
            argv[a++] = "--volume";
            argv[a++] = volargs[v];
        }
        argv[a++] = "--spec";
        argv[a++] = value;
        if (mount_ready) {
            argv[a++] = "--mount-dir";
            argv[a++] = j.mount;
        }
        argv[a] = NULL;
        static char out[16384];
        int rc = sf_run(argv, &j, 1, sf_timeout + 120, out, sizeof(out));
        char lines[8192];
        sf_lines_prefixed(out, lines, sizeof(lines));
        switch (rc) {
        case 0:
            break;
        case 3:
            state = "partial";
            break;
        case 4:
            state = "failed";
            break;
        case 124:
            state = "failed";
            snprintf(lines + strlen(lines), sizeof(lines) - strlen(lines), "stagefs: staging did not end within %d s\n", sf_timeout + 120);
            break;
        default:
            state = "failed";
            if (!lines[0]) snprintf(lines, sizeof(lines), "stagefs: the job's staging ended with status %d\n", rc);
            slurm_error("stagefs: job %u: stagefs job prolog as %s exited %d: %s", j.id, j.user, rc, out);
            break;
        }
        strncat(reasons, lines, sizeof(reasons) - strlen(reasons) - 1);
    }
    if (!no_mount && j.mount[0] && strcmp(state, "ok") == 0 && !sf_mounted(j.mount)) state = "partial";

    char status[16384];
    snprintf(status, sizeof(status), "%s\npolicy=%s\n%s%s%s%s", state, warn ? "warn" : "fail", sf_mounted(j.mount) ? "mount=" : "",
             sf_mounted(j.mount) ? j.mount : "", sf_mounted(j.mount) ? "\n" : "", reasons);
    if (sf_write_status(j.id, j.uid, j.gid, status) != 0) return -1;
    if (strcmp(state, "ok") != 0) slurm_info("stagefs: job %u: staging %s for %s", j.id, state, j.user);
    return 0;
}

/* ---- task_init: environment, and failing the job with the reason ---- */

int slurm_spank_task_init(spank_t sp, int ac, char **av) {
    if (sf_parse_args(ac, av) < 0) return -1;
    char *value = NULL;
    if (spank_option_getopt(sp, &sf_options[0], &value) != ESPANK_SUCCESS || !value) return 0;
    char *policy = NULL;
    int warn_opt = spank_option_getopt(sp, &sf_options[1], &policy) == ESPANK_SUCCESS && policy && strcmp(policy, "warn") == 0;
    uint32_t jobid = 0;
    if (spank_get_item(sp, S_JOB_ID, &jobid) != ESPANK_SUCCESS) return 0;
    char dir[PATH_MAX], path[PATH_MAX + 16], status[16384];
    snprintf(dir, sizeof(dir), "%s/%u/jobs/%u", sf_log_root[0] ? sf_log_root : sf_cache_root, (unsigned)getuid(), jobid);
    snprintf(path, sizeof(path), "%s/%u", sf_state_dir, jobid);
    spank_setenv(sp, "STAGEFS_CACHE_DIR", sf_cache_root, 1);
    if (sf_read_file(path, status, sizeof(status)) < 0) {
        /* The prolog did not run here (PrologFlags=Alloc missing?) or could not finish. */
        spank_setenv(sp, "STAGEFS_STAGE_STATUS", "none", 1);
        fprintf(stderr, "stagefs: no staging status for job %u on this node (%s): is PrologFlags=Alloc set? (the slurmd log says more)\n",
                jobid, path);
        return warn_opt ? 0 : -1;
    }
    char state[32] = "";
    sscanf(status, "%31s", state);
    spank_setenv(sp, "STAGEFS_STAGE_STATUS", state, 1);
    char report[PATH_MAX + 16];
    snprintf(report, sizeof(report), "%s/report.json", dir);
    if (access(report, R_OK) != 0) {
        /* Named volumes only: point at the first report there is. */
        DIR *d = opendir(dir);
        struct dirent *e;
        while (d && (e = readdir(d))) {
            if (strncmp(e->d_name, "report", 6) == 0) {
                snprintf(report, sizeof(report), "%s/%s", dir, e->d_name);
                break;
            }
        }
        if (d) closedir(d);
    }
    spank_setenv(sp, "STAGEFS_STAGE_REPORT", report, 1);
    char *m = strstr(status, "\nmount=");
    if (m) {
        char mount[PATH_MAX];
        if (sscanf(m + 7, "%4095s", mount) == 1) spank_setenv(sp, "STAGEFS_MOUNT", mount, 1);
    }
    int warn = strstr(status, "\npolicy=warn\n") != NULL;
    if (strcmp(state, "ok") != 0) {
        /* The reason lines, as the prolog recorded them. */
        const char *r = strstr(status, "\nstagefs: ");
        fprintf(stderr, "stagefs: staging for job %u %s:\n%s", jobid, state, r ? r + 1 : "(no reason recorded)\n");
        if (!warn) return -1;
    }
    return 0;
}

/* ---- epilog: unmount, stop the mount process, release pins, remove per-job files ---- */

/* Stops the job's mount processes: those of the job's user whose arguments name the mount
 * after "mount". Each is held by a pidfd from the moment it matched (no pid reuse race), all
 * get SIGTERM at once, then 5 s in all to exit, then SIGKILL. */
#define MAX_MOUNT_PROCS 256
static int sf_kill_mount_processes(const char *mount, uid_t uid) {
    int fds[MAX_MOUNT_PROCS];
    int n = 0;
    DIR *d = opendir("/proc");
    struct dirent *e;
    while (d && (e = readdir(d)) && n < MAX_MOUNT_PROCS) {
        if (!isdigit((unsigned char)e->d_name[0])) continue;
        pid_t pid = (pid_t)atoi(e->d_name);
        int pfd = (int)syscall(SYS_pidfd_open, pid, 0);
        if (pfd < 0) continue;
        char path[300], cmd[8192];
        snprintf(path, sizeof(path), "/proc/%s/cmdline", e->d_name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        ssize_t len = fd >= 0 ? read(fd, cmd, sizeof(cmd) - 1) : -1;
        if (fd >= 0) close(fd);
        struct stat st;
        snprintf(path, sizeof(path), "/proc/%s", e->d_name);
        int match = 0;
        if (len > 0 && stat(path, &st) == 0 && st.st_uid == uid) {
            cmd[len] = 0;
            /* argv is NUL-separated: an argument equal to the mountpoint after "mount". */
            int saw_mount = 0;
            for (ssize_t i = 0; i < len; i += (ssize_t)strlen(cmd + i) + 1) {
                if (strcmp(cmd + i, "mount") == 0) saw_mount = 1;
                else if (saw_mount && strcmp(cmd + i, mount) == 0) match = 1;
            }
        }
        if (match) fds[n++] = pfd;
        else close(pfd);
    }
    if (d) closedir(d);
    for (int i = 0; i < n; i++) syscall(SYS_pidfd_send_signal, fds[i], SIGTERM, NULL, 0);
    for (int waited = 0; waited < 50; waited++) {
        int alive = 0;
        for (int i = 0; i < n; i++) {
            struct pollfd p = {fds[i], POLLIN, 0};
            if (poll(&p, 1, 0) == 0) alive++; /* a pidfd becomes readable when its process exits */
        }
        if (!alive) break;
        struct timespec ts = {0, 100 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    for (int i = 0; i < n; i++) {
        syscall(SYS_pidfd_send_signal, fds[i], SIGKILL, NULL, 0);
        close(fds[i]);
    }
    return n;
}

static void sf_abort_connection(const char *mount) {
    FILE *f = fopen("/proc/self/mountinfo", "r");
    if (!f) return;
    char line[8192];
    while (fgets(line, sizeof(line), f)) {
        char dev[64], mp[PATH_MAX];
        if (sscanf(line, "%*s %*s %63s %*s %4095s", dev, mp) == 2 && strcmp(mp, mount) == 0) {
            char *colon = strchr(dev, ':');
            if (colon) {
                char path[128];
                snprintf(path, sizeof(path), "/sys/fs/fuse/connections/%s/abort", colon + 1);
                int fd = open(path, O_WRONLY | O_CLOEXEC);
                if (fd >= 0) {
                    if (write(fd, "1", 1) < 0) { /* best effort */
                    }
                    close(fd);
                }
            }
        }
    }
    fclose(f);
}

/* Removes <dir>/<name> (a directory, a file, or a link: never what it points to). */
static void sf_remove_entry(const char *dir, const char *name) {
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) return;
    if (unlinkat(dfd, name, AT_REMOVEDIR) != 0 && errno == ENOTDIR) unlinkat(dfd, name, 0);
    close(dfd);
}

int slurm_spank_job_epilog(spank_t sp, int ac, char **av) {
    if (sf_parse_args(ac, av) < 0) return 0;
    if (!sf_hooks) return 0;
    static struct job j;
    if (sf_job(sp, &j) < 0) return 0;
    if (sf_cache_root[0] && access(sf_binary, X_OK) == 0) {
        /* As the user: the job's mount is detached and its process gets flush_timeout to flush
         * buffered writes and exit (then it is killed); pins are released; the job's logs are
         * marked ended and kept for keep_logs, older ones removed. */
        char flush[32];
        snprintf(flush, sizeof(flush), "%d", sf_flush_timeout);
        char *argv[24];
        int a = 0;
        argv[a++] = sf_binary;
        argv[a++] = "job";
        argv[a++] = "epilog";
        argv[a++] = "--job";
        argv[a++] = j.jobid;
        argv[a++] = "--cache-dir";
        argv[a++] = sf_cache_root;
        argv[a++] = "--keep-logs";
        argv[a++] = sf_keep_logs;
        argv[a++] = "--flush-timeout";
        argv[a++] = flush;
        if (sf_log_root[0]) {
            argv[a++] = "--log-dir";
            argv[a++] = sf_log_root;
        }
        if (j.mount[0]) {
            argv[a++] = "--mount-dir";
            argv[a++] = j.mount;
        }
        argv[a] = NULL;
        static char out[8192];
        int rc = sf_run(argv, &j, 1, sf_flush_timeout + 60, out, sizeof(out));
        char lines[8192];
        sf_lines_prefixed(out, lines, sizeof(lines));
        char *save = NULL;
        for (char *line = strtok_r(lines, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) slurm_info("%s", line);
        if (rc != 0) slurm_info("stagefs: job %u: the epilog as %s exited %d", j.id, j.user, rc);
    }
    if (j.mount[0]) {
        /* What the user's epilog could not end: root aborts the connection and kills. */
        if (sf_mounted(j.mount)) {
            char *argv[] = {"/bin/fusermount3", "-u", "-z", j.mount, NULL};
            char out[1024];
            if (access(argv[0], X_OK) != 0) argv[0] = "/usr/bin/fusermount3";
            slurm_info("stagefs: job %u: %s is still mounted after the job's epilog: aborting its FUSE connection", j.id, j.mount);
            sf_abort_connection(j.mount);
            sf_run(argv, &j, 0, 30, out, sizeof(out));
        }
        int n = sf_kill_mount_processes(j.mount, j.uid);
        if (n > 0) slurm_info("stagefs: job %u: stopped %d mount process(es) of %s left after the job's epilog", j.id, n, j.mount);
        /* The mount directory: removed through mount_root's descriptor (empty directories only). */
        int dfd = open(sf_mount_root, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0) {
            unlinkat(dfd, j.jobid, AT_REMOVEDIR);
            close(dfd);
        }
    }
    sf_remove_entry(sf_state_dir, j.jobid);
    return 0;
}
