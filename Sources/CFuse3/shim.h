#ifndef CFUSE3_SHIM_H
#define CFUSE3_SHIM_H
/* The libfuse3 low-level API at version 3.5, as StageFS uses it. */
#define FUSE_USE_VERSION 35
#include <fuse3/fuse_lowlevel.h>
#include <stdlib.h>
#include <string.h>

/* Runs the multi-threaded session loop (a macro over versioned symbols in C). */
static inline int cfuse3_session_loop_mt(struct fuse_session *se, unsigned int max_idle_threads) {
    struct fuse_loop_config config;
    memset(&config, 0, sizeof(config));
    config.clone_fd = 0;
    config.max_idle_threads = max_idle_threads;
    return fuse_session_loop_mt(se, &config);
}

/* fuse_args owns argv; these build one from C strings copied in. */
static inline struct fuse_args *cfuse3_args_new(void) {
    struct fuse_args *args = calloc(1, sizeof(struct fuse_args));
    return args;
}

static inline int cfuse3_args_add(struct fuse_args *args, const char *arg) {
    return fuse_opt_add_arg(args, arg);
}

static inline void cfuse3_args_free(struct fuse_args *args) {
    fuse_opt_free_args(args);
    free(args);
}

/* Sets capability flags in the init callback. */
static inline void cfuse3_conn_want(struct fuse_conn_info *conn, unsigned int flags) {
    conn->want |= (conn->capable & flags);
}
static inline void cfuse3_conn_unwant(struct fuse_conn_info *conn, unsigned int flags) {
    conn->want &= ~flags;
}
#endif
