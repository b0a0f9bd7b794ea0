#ifndef CZLIB_SHIM_H
#define CZLIB_SHIM_H
/* zlib (Debian's zlib1g-dev): gzip streams for metadata dumps. Only the Compress module
   imports it. deflateInit2 and inflateInit2 are macros that pass the library's version and
   the stream's size: wrapped here as functions Swift can call. */
#include <zlib.h>

/* A gzip (not raw, not zlib) encoder at `level`. */
static inline int czlib_deflate_init_gzip(z_stream *s, int level) {
    return deflateInit2(s, level, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY);
}

/* A decoder of gzip streams (members one after another are read as one). */
static inline int czlib_inflate_init_gzip(z_stream *s) {
    return inflateInit2(s, 15 + 16);
}
#endif
