#ifndef CZSTD_SHIM_H
#define CZSTD_SHIM_H
/* libzstd (Debian's libzstd-dev): Zstandard streams (metadata dumps) and data blocks
   compression. Only the Compress module imports it. */
#include <zstd.h>
#endif
