#ifndef CLINUX_SHIM_H
#define CLINUX_SHIM_H
/* Linux system calls that glibc's Swift module does not export (no wrapper in its headers, or
   only through the variadic syscall(2), which Swift cannot call). Each returns -1 and sets errno
   on failure, as the system call does. */
#include <signal.h>
#include <sys/syscall.h>
#include <fcntl.h>
#include <unistd.h>

/* pidfd_open(2): a descriptor that refers to process `pid` for as long as it is open, even after
   the number is reused; it becomes readable when the process exits. */
static inline int clinux_pidfd_open(pid_t pid) {
    return (int)syscall(SYS_pidfd_open, pid, 0);
}

/* pidfd_send_signal(2): `sig` to the process the descriptor refers to (0 checks it is alive). */
static inline int clinux_pidfd_send_signal(int pidfd, int sig) {
    return (int)syscall(SYS_pidfd_send_signal, pidfd, sig, (void *)0, 0);
}
/* mremap(2) with MREMAP_MAYMOVE (glibc declares it only with _GNU_SOURCE, and variadic): grows
   an anonymous mapping, moving its pages rather than copying them when it cannot grow in place.
   Returns the new address, or (void *)-1 (MAP_FAILED) with errno set. */
#ifndef MREMAP_MAYMOVE
#define MREMAP_MAYMOVE 1
#endif
static inline void *clinux_mremap_grow(void *p, size_t old, size_t size) {
    return (void *)syscall(SYS_mremap, p, old, size, MREMAP_MAYMOVE);
}

/* sync_file_range(2) with SYNC_FILE_RANGE_WRITE over the whole file (glibc declares it only with
   _GNU_SOURCE): starts writeback of the dirty pages and returns without waiting for it. */
static inline int clinux_start_writeback(int fd) {
    return (int)syscall(SYS_sync_file_range, fd, (long long)0, (long long)0, 2u /* SYNC_FILE_RANGE_WRITE */);
}

/* O_PATH (glibc defines it only with _GNU_SOURCE): a descriptor that names a directory for the
   *at calls without opening it for reading. */
#ifndef O_PATH
#define O_PATH 010000000
#endif
static inline int clinux_o_path(void) { return O_PATH; }

/* O_DIRECT (glibc defines it only with _GNU_SOURCE; its own name for it, __O_DIRECT, always): a
   file's writes go from the caller's memory to the device, past the page cache. */
static inline int clinux_o_direct(void) { return __O_DIRECT; }

/* openat2(2) with RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS: `path` relative
   to `dirfd`, refused (EXDEV, ELOOP) when it would leave that directory or meet a symbolic link
   anywhere. ENOSYS before Linux 5.6. */
#include <linux/openat2.h>
#include <string.h>
static inline int clinux_open_beneath(int dirfd, const char *path, int flags, unsigned mode) {
    struct open_how how;
    memset(&how, 0, sizeof(how));
    how.flags = (unsigned long long)flags;
    how.mode = (flags & O_CREAT) ? mode : 0;
    how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
    return (int)syscall(SYS_openat2, dirfd, path, &how, sizeof(how));
}

/* SO_PEERCRED (struct ucred needs _GNU_SOURCE): the pid, uid and gid the kernel recorded for
   the other end of a Unix socket when it connected. 0 on success. */
#include <sys/socket.h>
static inline int clinux_peer_credential(int fd, pid_t *pid, uid_t *uid, gid_t *gid) {
    struct { pid_t pid; uid_t uid; gid_t gid; } c;
    socklen_t len = sizeof(c);
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &c, &len) != 0) return -1;
    *pid = c.pid;
    *uid = c.uid;
    *gid = c.gid;
    return 0;
}

/* accept4(2) with SOCK_CLOEXEC. */
static inline int clinux_accept_cloexec(int fd) {
    return (int)syscall(SYS_accept4, fd, (void *)0, (void *)0, SOCK_CLOEXEC);
}

/* renameat2(2) with RENAME_NOREPLACE: renames only when `newpath` does not exist (EEXIST
   otherwise), in one step. EINVAL where the file system does not support it, ENOSYS before 3.15. */
static inline int clinux_rename_noreplace(int olddirfd, const char *oldpath, int newdirfd, const char *newpath) {
    return (int)syscall(SYS_renameat2, olddirfd, oldpath, newdirfd, newpath, 1u /* RENAME_NOREPLACE */);
}

/* POLLRDHUP (glibc defines it only with _GNU_SOURCE): the other end shut down its writing. */
static inline short clinux_pollrdhup(void) { return 0x2000; }

/* getrandom(2) (<sys/random.h>, which Swift's Glibc module leaves out): `len` random bytes from
   the kernel's pool into `buf`; the count written, or -1 and errno. */
#include <sys/random.h>
static inline long clinux_getrandom(void *buf, unsigned long len) {
    return (long)getrandom(buf, len, 0);
}
/* SCM_RIGHTS (the CMSG_* macros are not callable from Swift): sends `len` bytes with descriptor
   `fd` attached (a copy of it arrives at the peer); the count sent, or -1 and errno. */
static inline long clinux_send_fd(int sock, const void *buf, unsigned long len, int fd) {
    struct iovec iov = { (void *)buf, len };
    union { struct cmsghdr h; char space[CMSG_SPACE(sizeof(int))]; } ctl;
    memset(&ctl, 0, sizeof(ctl));
    struct msghdr m;
    memset(&m, 0, sizeof(m));
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    m.msg_control = ctl.space;
    m.msg_controllen = sizeof(ctl.space);
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof(int));
    return (long)sendmsg(sock, &m, MSG_NOSIGNAL);
}

/* Receives up to `len` bytes and, when one came with them, a descriptor (close-on-exec) into
   `*fd` (-1 when none; any further ones are closed). The count, 0 at the end, or -1 and errno. */
static inline long clinux_recv_fd(int sock, void *buf, unsigned long len, int *fd) {
    struct iovec iov = { buf, len };
    union { struct cmsghdr h; char space[CMSG_SPACE(sizeof(int) * 4)]; } ctl;
    struct msghdr m;
    memset(&m, 0, sizeof(m));
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    m.msg_control = ctl.space;
    m.msg_controllen = sizeof(ctl.space);
    *fd = -1;
    long n = (long)recvmsg(sock, &m, MSG_CMSG_CLOEXEC);
    if (n < 0) return n;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c != NULL; c = CMSG_NXTHDR(&m, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (int i = 0; i < count; i++) {
            int got;
            memcpy(&got, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
            if (*fd < 0) *fd = got; else close(got);
        }
    }
    return n;
}
#endif
