#ifndef CCHECKSUM_SHIM_H
#define CCHECKSUM_SHIM_H
/* CRC-32C with the SSE 4.2 crc32 instruction, for verifying cache files at memory speed.
   Callers check cchecksum_has_hw() first and fall back to a table-driven CRC otherwise. */
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#if defined(__x86_64__)
static inline int cchecksum_has_hw(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("sse4.2");
}

/* Continues a CRC-32C (pre- and post-inversion done by the caller). */
__attribute__((target("sse4.2")))
static inline uint32_t cchecksum_crc32c_update(uint32_t crc, const void *data, size_t n) {
    const unsigned char *p = (const unsigned char *)data;
    uint64_t c = crc;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = __builtin_ia32_crc32di(c, v);
        p += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (n > 0) {
        c32 = __builtin_ia32_crc32qi(c32, *p);
        p++;
        n--;
    }
    return c32;
}
#else
static inline int cchecksum_has_hw(void) { return 0; }
static inline uint32_t cchecksum_crc32c_update(uint32_t crc, const void *data, size_t n) { (void)data; (void)n; return crc; }
#endif
#endif
