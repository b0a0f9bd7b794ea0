#ifndef COPENSSL_SHIM_H
#define COPENSSL_SHIM_H
/* OpenSSL (Debian's libssl) for rediss:// connections and SHA-1 (the Redis commit checks) in the
   RedisWire module, and SHA-256/HMAC-SHA256 in the ObjectStorage module (the S3 pre-signer). */
#include <limits.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/sha.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

/* Macros, as functions Swift can call. */
static inline long copenssl_set_sni(SSL *ssl, const char *name) { return SSL_set_tlsext_host_name(ssl, name); }
static inline int copenssl_min_tls12(SSL_CTX *ctx) { return (int)SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION); }
/* The name or IP address the server's certificate must be for. */
static inline int copenssl_expect_peer(SSL *ssl, const char *host) {
    X509_VERIFY_PARAM *p = SSL_get0_param(ssl);
    if (X509_VERIFY_PARAM_set1_ip_asc(p, host) == 1) return 1;
    return X509_VERIFY_PARAM_set1_host(p, host, 0);
}
/* SHA-256 of `len` bytes at `data` into `out` (32 bytes); 1 on success, 0 on failure. */
static inline int copenssl_sha256(const void *data, size_t len, unsigned char *out) {
    unsigned int n = 0;
    return EVP_Digest(data, len, out, &n, EVP_sha256(), NULL) == 1 && n == 32;
}
/* HMAC-SHA256 of `len` bytes at `data` under `key` into `out` (32 bytes); 1 on success, 0 on failure. */
static inline int copenssl_hmac_sha256(const void *key, size_t keylen, const void *data, size_t len, unsigned char *out) {
    unsigned int n = 0;
    if (keylen > INT_MAX) return 0;
    return HMAC(EVP_sha256(), key, (int)keylen, data, len, out, &n) != NULL && n == 32;
}
#endif
