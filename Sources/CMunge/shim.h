#ifndef CMUNGE_SHIM_H
#define CMUNGE_SHIM_H
/* libmunge (Debian's libmunge-dev): MUNGE credentials, made and checked by the local munged.
   Only the MungeAuth module imports it. munge_ctx_set and munge_ctx_get are variadic, which
   Swift cannot call: the options we use are wrapped here, one typed function each. */
#include <munge.h>
#include <time.h>

/* MUNGE_OPT_SOCKET: talk to the munged listening on `path` instead of the default socket. */
static inline munge_err_t cmunge_ctx_set_socket(munge_ctx_t ctx, const char *path) {
    return munge_ctx_set(ctx, MUNGE_OPT_SOCKET, path);
}

/* MUNGE_OPT_TTL: seconds a new credential stays valid (MUNGE_TTL_DEFAULT: munged's default,
   MUNGE_TTL_MAXIMUM: its maximum). */
static inline munge_err_t cmunge_ctx_set_ttl(munge_ctx_t ctx, int ttl) {
    return munge_ctx_set(ctx, MUNGE_OPT_TTL, ttl);
}

/* After a decode: the credential's time to live, in seconds. */
static inline munge_err_t cmunge_ctx_get_ttl(munge_ctx_t ctx, int *ttl) {
    return munge_ctx_get(ctx, MUNGE_OPT_TTL, ttl);
}

/* After a decode: when the credential was made (seconds since the epoch). */
static inline munge_err_t cmunge_ctx_get_encode_time(munge_ctx_t ctx, time_t *t) {
    return munge_ctx_get(ctx, MUNGE_OPT_ENCODE_TIME, t);
}

/* The socket path the context talks to (libmunge's default until one is set); the string
   belongs to the context. */
static inline munge_err_t cmunge_ctx_get_socket(munge_ctx_t ctx, const char **path) {
    return munge_ctx_get(ctx, MUNGE_OPT_SOCKET, path);
}
#endif
