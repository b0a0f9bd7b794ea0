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
 *   cache_root=DIR       node-local cache root (per-user subdirectories)
 *   mount_root=DIR       per-job mounts are made at DIR/<jobid>
 *   timeout=SECONDS      limit for staging (default 3600)
 *
 * In the job prolog (root, every node of the allocation; PrologFlags=Alloc) the plugin runs
 * `stagefs stage --as-user USER --job JOBID` and, unless --storage-no-mount, mounts the volume
 * as the job's user. User-caused failures go to a per-job status file and fail the job in
 * task_init with the reason on its stderr; only node faults fail the prolog. The epilog
 * unmounts, stops the mount process, releases the job's pins and removes the per-job files.
 *
 * The plugin does not link Swift: it runs the stagefs binary (fork/exec with a timeout, signals
 * reset in the child, waiting on that pid only). Every symbol but the SPANK entry points is
 * static (a global named like one of sbatch's, such as `opt`, would silently bind to it).
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <slurm/spank.h>

SPANK_PLUGIN(stagefs, 1);

#define MAX_VOLUMES 16
#define MAX_SPECS 64

struct volume {
    char name[64];
    char url[1024];
};

static char sf_binary[PATH_MAX] = "/usr/local/bin/stagefs";
static char sf_cache_root[PATH_MAX] = "";
static char sf_mount_root[PATH_MAX] = "";
static struct volume sf_volumes[MAX_VOLUMES];
static int sf_nvolumes = 0;
static int sf_default_volume = -1;
static int sf_timeout = 3600;

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
            if (sf_add_volume(name, eq + 1) < 0) return -1;
        } else if (strncmp(a, "cache_root=", 11) == 0) {
            snprintf(sf_cache_root, sizeof(sf_cache_root), "%s", a + 11);
        } else if (strncmp(a, "mount_root=", 11) == 0) {
            snprintf(sf_mount_root, sizeof(sf_mount_root), "%s", a + 11);
        } else if (strncmp(a, "timeout=", 8) == 0) {
            sf_timeout = atoi(a + 8);
            if (sf_timeout <= 0) sf_timeout = 3600;
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

static int sf_opt_stage(int val, const char *optarg, int remote) {
    struct spec specs[MAX_SPECS];
    char why[512];
    if (sf_parse_specs(optarg, specs, MAX_SPECS, why, sizeof(why)) < 0) {
        slurm_error("stagefs: %s", why);
        return -1;
    }
    return 0;
}

static int sf_opt_policy(int val, const char *optarg, int remote) {
    if (!optarg || (strcmp(optarg, "fail") && strcmp(optarg, "warn"))) {
        slurm_error("stagefs: --storage-stage-policy takes fail or warn, not '%s'", optarg ? optarg : "");
        return -1;
    }
    return 0;
}

static int sf_opt_nomount(int val, const char *optarg, int remote) { return 0; }

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

/* ---- helpers for prolog/epilog ---- */

struct job {
    uint32_t id;
    uid_t uid;
    gid_t gid;
    char user[256];
    char home[PATH_MAX];
    char dir[PATH_MAX]; /* <cache_root>/<uid>/jobs/<jobid> */
    char mount[PATH_MAX];
};

static int sf_job(spank_t sp, struct job *j) {
    memset(j, 0, sizeof(*j));
    if (spank_get_item(sp, S_JOB_ID, &j->id) != ESPANK_SUCCESS) return -1;
    if (spank_get_item(sp, S_JOB_UID, &j->uid) != ESPANK_SUCCESS) return -1;
    if (spank_get_item(sp, S_JOB_GID, &j->gid) != ESPANK_SUCCESS) j->gid = (gid_t)-1;
    struct passwd pw, *res = NULL;
    char buf[4096];
    if (getpwuid_r(j->uid, &pw, buf, sizeof(buf), &res) != 0 || !res) {
        slurm_error("stagefs: job %u: no passwd entry for uid %u", j->id, (unsigned)j->uid);
        return -1;
    }
    snprintf(j->user, sizeof(j->user), "%s", pw.pw_name);
    snprintf(j->home, sizeof(j->home), "%s", pw.pw_dir);
    if (j->gid == (gid_t)-1) j->gid = pw.pw_gid;
    snprintf(j->dir, sizeof(j->dir), "%s/%u/jobs/%u", sf_cache_root, (unsigned)j->uid, j->id);
    if (sf_mount_root[0]) snprintf(j->mount, sizeof(j->mount), "%s/%u", sf_mount_root, j->id);
    return 0;
}

/* mkdir with owner and mode (existing directories get them too). */
static int sf_mkdir_owned(const char *path, uid_t uid, gid_t gid, mode_t mode) {
    if (mkdir(path, mode) != 0 && errno != EEXIST) return -1;
    if (chown(path, uid, gid) != 0) return -1;
    return chmod(path, mode);
}

static void sf_write_file(const char *path, const char *text, uid_t uid, gid_t gid) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return;
    size_t n = strlen(text);
    while (n > 0) {
        ssize_t w = write(fd, text, n);
        if (w <= 0) break;
        text += w;
        n -= (size_t)w;
    }
    if (fchown(fd, uid, gid) != 0) { /* the job then cannot read it; reported in task_init */
    }
    close(fd);
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

/*
 * Runs argv[0] with argv; as the job's user when `as_user`. Output (stdout and stderr) goes to
 * `out` (up to outlen-1 bytes kept). Waits on that child only, at most `timeout` seconds (then
 * kills its process group). Returns the exit status, 124 on timeout, 127 when it could not run.
 */
static int sf_run(char *const argv[], const struct job *j, int as_user, int timeout, char *out, size_t outlen) {
    int pfd[2];
    if (out && outlen) out[0] = 0;
    if (pipe2(pfd, O_CLOEXEC) != 0) return 127;
    pid_t pid = fork();
    if (pid < 0) {
        close(pfd[0]);
        close(pfd[1]);
        return 127;
    }
    if (pid == 0) {
        sigset_t all;
        sigemptyset(&all);
        sigprocmask(SIG_SETMASK, &all, NULL);
        for (int s = 1; s < NSIG; s++) signal(s, SIG_DFL);
        setpgid(0, 0);
        dup2(pfd[1], 1);
        dup2(pfd[1], 2);
        int devnull = open("/dev/null", O_RDONLY);
        if (devnull >= 0) dup2(devnull, 0);
        if (as_user) {
            if (initgroups(j->user, j->gid) != 0 || setgid(j->gid) != 0 || setuid(j->uid) != 0) {
                dprintf(2, "stagefs: cannot switch to user %s: %s\n", j->user, strerror(errno));
                _exit(127);
            }
        }
        char home[PATH_MAX + 8], user[300], path[] = "PATH=/usr/local/bin:/usr/bin:/bin";
        snprintf(home, sizeof(home), "HOME=%s", as_user ? j->home : "/root");
        snprintf(user, sizeof(user), "USER=%s", as_user ? j->user : "root");
        char *envp[] = {path, home, user, NULL};
        execve(argv[0], argv, envp);
        dprintf(2, "stagefs: cannot run %s: %s\n", argv[0], strerror(errno));
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

/* Keeps the lines of `text` that start with "stagefs: " (the binary's error lines). */
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
    char *value = NULL;
    if (spank_option_getopt(sp, &sf_options[0], &value) != ESPANK_SUCCESS || !value) return 0;
    char *policy = NULL;
    int warn = spank_option_getopt(sp, &sf_options[1], &policy) == ESPANK_SUCCESS && policy && strcmp(policy, "warn") == 0;
    int no_mount = spank_option_getopt(sp, &sf_options[2], NULL) == ESPANK_SUCCESS;

    struct job j;
    if (sf_job(sp, &j) < 0) {
        slurm_error("stagefs: cannot read the job's id and user");
        return -1;
    }
    /* Node faults: the prolog fails (Slurm drains the node). */
    struct stat st;
    if (access(sf_binary, X_OK) != 0) {
        slurm_error("stagefs: job %u: the stagefs binary %s cannot be run: %s", j.id, sf_binary, strerror(errno));
        return -1;
    }
    if (!sf_cache_root[0] || stat(sf_cache_root, &st) != 0 || !S_ISDIR(st.st_mode)) {
        slurm_error("stagefs: job %u: cache_root %s is missing", j.id, sf_cache_root[0] ? sf_cache_root : "(not set)");
        return -1;
    }
    if (!no_mount && sf_mount_root[0] && (stat(sf_mount_root, &st) != 0 || !S_ISDIR(st.st_mode))) {
        slurm_error("stagefs: job %u: mount_root %s is missing", j.id, sf_mount_root);
        return -1;
    }
    char userdir[PATH_MAX], jobsdir[PATH_MAX];
    snprintf(userdir, sizeof(userdir), "%s/%u", sf_cache_root, (unsigned)j.uid);
    snprintf(jobsdir, sizeof(jobsdir), "%s/jobs", userdir);
    if (sf_mkdir_owned(userdir, j.uid, j.gid, 0700) != 0 || sf_mkdir_owned(jobsdir, j.uid, j.gid, 0700) != 0 ||
        sf_mkdir_owned(j.dir, j.uid, j.gid, 0700) != 0) {
        slurm_error("stagefs: job %u: cannot prepare %s: %s", j.id, j.dir, strerror(errno));
        return -1;
    }

    char status[16384] = "";
    char reasons[8192] = "";
    const char *state = "ok";
    struct spec specs[MAX_SPECS];
    char why[512];
    int n = sf_parse_specs(value, specs, MAX_SPECS, why, sizeof(why));
    if (n < 0) {
        state = "failed";
        snprintf(reasons, sizeof(reasons), "stagefs: %s\n", why);
        n = 0;
    }
    /* One stagefs run per volume named. */
    int any_staged = 0, mount_volume = sf_default_volume;
    for (int v = 0; v < sf_nvolumes; v++) {
        char *argv[MAX_SPECS + 20];
        int a = 0, count = 0;
        char jobid[32], timeout[32], report[PATH_MAX + 32];
        snprintf(jobid, sizeof(jobid), "%u", j.id);
        snprintf(timeout, sizeof(timeout), "%d", sf_timeout);
        snprintf(report, sizeof(report), "%s/report%s%s.json", j.dir, sf_volumes[v].name[0] ? "-" : "", sf_volumes[v].name);
        argv[a++] = sf_binary;
        argv[a++] = "stage";
        argv[a++] = "--quiet";
        argv[a++] = "--meta";
        argv[a++] = sf_volumes[v].url;
        argv[a++] = "--cache-dir";
        argv[a++] = sf_cache_root;
        argv[a++] = "--as-user";
        argv[a++] = j.user;
        argv[a++] = "--job";
        argv[a++] = jobid;
        argv[a++] = "--report";
        argv[a++] = report;
        for (int i = 0; i < n; i++)
            if (specs[i].volume == v) {
                argv[a++] = specs[i].path;
                count++;
            }
        argv[a] = NULL;
        if (count == 0) continue;
        if (mount_volume < 0) mount_volume = v;
        char out[16384];
        int rc = sf_run(argv, &j, 0, sf_timeout, out, sizeof(out));
        char lines[8192];
        sf_lines_prefixed(out, lines, sizeof(lines));
        if (rc == 0) {
            any_staged = 1;
        } else if (rc == 127) {
            slurm_error("stagefs: job %u: cannot run %s: %s", j.id, sf_binary, out);
            return -1;
        } else {
            if (rc == 124) snprintf(lines + strlen(lines), sizeof(lines) - strlen(lines), "stagefs: staging timed out after %d s\n", sf_timeout);
            strncat(reasons, lines, sizeof(reasons) - strlen(reasons) - 1);
            /* Partial when something was staged (the report says so), failed otherwise. */
            char rep[65536];
            int partial = sf_read_file(report, rep, sizeof(rep)) > 0 && strstr(rep, "\"status\" : \"partial\"");
            if (partial) any_staged = 1;
            state = partial && strcmp(state, "failed") ? "partial" : "failed";
        }
    }
    if (strcmp(state, "ok") != 0 && any_staged && strcmp(state, "failed") == 0) state = "partial";

    /* The job's mount, made as the job's user. */
    char mountline[PATH_MAX + 16] = "";
    if (!no_mount && j.mount[0] && mount_volume >= 0) {
        if (sf_mkdir_owned(j.mount, j.uid, j.gid, 0700) == 0 && !sf_mounted(j.mount)) {
            char log[PATH_MAX + 16];
            snprintf(log, sizeof(log), "%s/mount.log", j.dir);
            char *argv[] = {sf_binary, "mount", "-d", sf_volumes[mount_volume].url, j.mount, "--cache-dir", sf_cache_root, "--log", log, NULL};
            char out[8192];
            int rc = sf_run(argv, &j, 1, 120, out, sizeof(out));
            if (rc == 0) {
                snprintf(mountline, sizeof(mountline), "mount=%s\n", j.mount);
            } else {
                char lines[4096];
                sf_lines_prefixed(out, lines, sizeof(lines));
                strncat(reasons, lines[0] ? lines : "stagefs: the job's mount failed\n", sizeof(reasons) - strlen(reasons) - 1);
                if (strcmp(state, "ok") == 0) state = "partial";
            }
        }
    }
    snprintf(status, sizeof(status), "%s\npolicy=%s\n%s%s", state, warn ? "warn" : "fail", mountline, reasons);
    char path[PATH_MAX + 16];
    snprintf(path, sizeof(path), "%s/status", j.dir);
    sf_write_file(path, status, j.uid, j.gid);
    if (strcmp(state, "ok") != 0) slurm_info("stagefs: job %u: staging %s for %s", j.id, state, j.user);
    return 0;
}

/* ---- task_init: environment, and failing the job with the reason ---- */

int slurm_spank_task_init(spank_t sp, int ac, char **av) {
    if (sf_parse_args(ac, av) < 0) return -1;
    char *value = NULL;
    if (spank_option_getopt(sp, &sf_options[0], &value) != ESPANK_SUCCESS || !value) return 0;
    uint32_t jobid = 0;
    if (spank_get_item(sp, S_JOB_ID, &jobid) != ESPANK_SUCCESS) return 0;
    char dir[PATH_MAX], path[PATH_MAX + 16], status[16384];
    snprintf(dir, sizeof(dir), "%s/%u/jobs/%u", sf_cache_root, (unsigned)getuid(), jobid);
    snprintf(path, sizeof(path), "%s/status", dir);
    spank_setenv(sp, "STAGEFS_CACHE_DIR", sf_cache_root, 1);
    if (sf_read_file(path, status, sizeof(status)) < 0) {
        /* The prolog did not run here (PrologFlags=Alloc missing?) or its file is unreadable. */
        spank_setenv(sp, "STAGEFS_STAGE_STATUS", "none", 1);
        fprintf(stderr, "stagefs: no staging status for job %u on this node (%s): is PrologFlags=Alloc set?\n", jobid, path);
        return 0;
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
        if (!warn && strcmp(state, "failed") == 0) return -1;
        if (!warn && strcmp(state, "partial") == 0) return -1;
    }
    return 0;
}

/* ---- epilog: unmount, stop the mount process, release pins, remove per-job files ---- */

static void sf_kill_mount_processes(const char *mount, uid_t uid) {
    DIR *d = opendir("/proc");
    struct dirent *e;
    while (d && (e = readdir(d))) {
        if (!isdigit((unsigned char)e->d_name[0])) continue;
        char path[300], cmd[8192];
        snprintf(path, sizeof(path), "/proc/%s/cmdline", e->d_name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue;
        ssize_t n = read(fd, cmd, sizeof(cmd) - 1);
        close(fd);
        if (n <= 0) continue;
        cmd[n] = 0;
        /* argv is NUL-separated: look for an argument equal to the mountpoint after "mount". */
        int saw_mount = 0, match = 0;
        for (ssize_t i = 0; i < n; i += (ssize_t)strlen(cmd + i) + 1) {
            if (strcmp(cmd + i, "mount") == 0) saw_mount = 1;
            else if (saw_mount && strcmp(cmd + i, mount) == 0) match = 1;
        }
        struct stat st;
        snprintf(path, sizeof(path), "/proc/%s", e->d_name);
        if (match && stat(path, &st) == 0 && st.st_uid == uid) {
            pid_t pid = (pid_t)atoi(e->d_name);
            kill(pid, SIGTERM);
            for (int i = 0; i < 50 && kill(pid, 0) == 0; i++) {
                struct timespec ts = {0, 100 * 1000 * 1000};
                nanosleep(&ts, NULL);
            }
            kill(pid, SIGKILL);
        }
    }
    if (d) closedir(d);
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
                int fd = open(path, O_WRONLY);
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

static void sf_remove_tree(const char *path) {
    DIR *d = opendir(path);
    if (!d) {
        unlink(path);
        return;
    }
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char sub[PATH_MAX];
        snprintf(sub, sizeof(sub), "%s/%s", path, e->d_name);
        struct stat st;
        if (lstat(sub, &st) == 0 && S_ISDIR(st.st_mode)) sf_remove_tree(sub);
        else unlink(sub);
    }
    closedir(d);
    rmdir(path);
}

int slurm_spank_job_epilog(spank_t sp, int ac, char **av) {
    if (sf_parse_args(ac, av) < 0) return 0;
    struct job j;
    if (sf_job(sp, &j) < 0) return 0;
    if (j.mount[0]) {
        if (sf_mounted(j.mount)) {
            char *argv[] = {"/bin/fusermount3", "-u", "-z", j.mount, NULL};
            char out[1024];
            if (access(argv[0], X_OK) != 0) argv[0] = "/usr/bin/fusermount3";
            sf_abort_connection(j.mount);
            sf_run(argv, &j, 0, 30, out, sizeof(out));
        }
        sf_kill_mount_processes(j.mount, j.uid);
        rmdir(j.mount);
    }
    if (sf_cache_root[0] && access(sf_binary, X_OK) == 0) {
        char jobid[32];
        snprintf(jobid, sizeof(jobid), "%u", j.id);
        char *argv[] = {sf_binary, "stage", "--release", jobid, "--cache-dir", sf_cache_root, "--as-user", j.user, NULL};
        char out[4096];
        int rc = sf_run(argv, &j, 0, 120, out, sizeof(out));
        if (rc != 0) slurm_info("stagefs: job %u: releasing pins: %s", j.id, out);
    }
    if (sf_cache_root[0]) sf_remove_tree(j.dir);
    return 0;
}
