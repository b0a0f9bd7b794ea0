#ifndef CLZ4_SHIM_H
#define CLZ4_SHIM_H
/* liblz4 (Debian's liblz4-dev): LZ4 block compression of a volume's data blocks. Only the
   Compress module imports it. */
#include <lz4.h>
#endif
