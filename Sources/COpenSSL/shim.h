#ifndef COPENSSL_SHIM_H
#define COPENSSL_SHIM_H
/* OpenSSL (Debian's libssl) for rediss:// connections and SHA-1 (the Redis commit checks);
   only the Metadata module imports it. */
#include <openssl/err.h>
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
#endif
