/*
 * The real functions: until dlsym has answered (libraries call read, write
 * and close from their constructors, and dlsym itself may call malloc) every
 * call goes straight to the kernel; then to the next definition in the
 * link order, libc's or another preload's.
 */
#include "shim.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <sys/ioctl.h>
#include <sys/sendfile.h>

static int direct_socket(int d, int t, int p) { return (int)shim_raw_syscall(SYS_socket, d, t, p); }
static int direct_bind(int fd, const struct sockaddr *a, socklen_t l) { return (int)shim_raw_syscall(SYS_bind, fd, a, l); }
static int direct_listen(int fd, int b) { return (int)shim_raw_syscall(SYS_listen, fd, b); }
static int direct_accept(int fd, struct sockaddr *a, socklen_t *l) { return (int)shim_raw_syscall(SYS_accept, fd, a, l); }
static int direct_accept4(int fd, struct sockaddr *a, socklen_t *l, int f)
{
    return (int)shim_raw_syscall(SYS_accept4, fd, a, l, f);
}
static int direct_connect(int fd, const struct sockaddr *a, socklen_t l) { return (int)shim_raw_syscall(SYS_connect, fd, a, l); }
static int direct_shutdown(int fd, int how) { return (int)shim_raw_syscall(SYS_shutdown, fd, how); }
static int direct_getsockname(int fd, struct sockaddr *a, socklen_t *l) { return (int)shim_raw_syscall(SYS_getsockname, fd, a, l); }
static int direct_getpeername(int fd, struct sockaddr *a, socklen_t *l) { return (int)shim_raw_syscall(SYS_getpeername, fd, a, l); }
static int direct_getsockopt(int fd, int level, int name, void *v, socklen_t *l)
{
    return (int)shim_raw_syscall(SYS_getsockopt, fd, level, name, v, l);
}
static int direct_setsockopt(int fd, int level, int name, const void *v, socklen_t l)
{
    return (int)shim_raw_syscall(SYS_setsockopt, fd, level, name, v, l);
}
static ssize_t direct_read(int fd, void *b, size_t n) { return shim_raw_syscall(SYS_read, fd, b, n); }
static ssize_t direct_readv(int fd, const struct iovec *v, int n) { return shim_raw_syscall(SYS_readv, fd, v, n); }
static ssize_t direct_recv(int fd, void *b, size_t n, int f) { return shim_raw_syscall(SYS_recvfrom, fd, b, n, f, NULL, NULL); }
static ssize_t direct_recvfrom(int fd, void *b, size_t n, int f, struct sockaddr *a, socklen_t *l)
{
    return shim_raw_syscall(SYS_recvfrom, fd, b, n, f, a, l);
}
static ssize_t direct_recvmsg(int fd, struct msghdr *m, int f) { return shim_raw_syscall(SYS_recvmsg, fd, m, f); }
static ssize_t direct_write(int fd, const void *b, size_t n) { return shim_raw_syscall(SYS_write, fd, b, n); }
static ssize_t direct_writev(int fd, const struct iovec *v, int n) { return shim_raw_syscall(SYS_writev, fd, v, n); }
static ssize_t direct_send(int fd, const void *b, size_t n, int f) { return shim_raw_syscall(SYS_sendto, fd, b, n, f, NULL, 0); }
static ssize_t direct_sendto(int fd, const void *b, size_t n, int f, const struct sockaddr *a, socklen_t l)
{
    return shim_raw_syscall(SYS_sendto, fd, b, n, f, a, l);
}
static ssize_t direct_sendmsg(int fd, const struct msghdr *m, int f) { return shim_raw_syscall(SYS_sendmsg, fd, m, f); }
static int direct_fstat(int fd, struct stat *st) { return (int)shim_raw_syscall(SYS_fstat, fd, st); }
static int direct_fxstat(int ver, int fd, struct stat *st) { return (void)ver, direct_fstat(fd, st); }
static ssize_t direct_splice(int in, loff_t *off_in, int out, loff_t *off_out, size_t n, unsigned int f)
{
    return shim_raw_syscall(SYS_splice, in, off_in, out, off_out, n, f);
}
static ssize_t direct_tee(int in, int out, size_t n, unsigned int f) { return shim_raw_syscall(SYS_tee, in, out, n, f); }
static int direct_sendmmsg(int fd, struct mmsghdr *v, unsigned int n, int f)
{
    return (int)shim_raw_syscall(SYS_sendmmsg, fd, v, n, f);
}
static int direct_recvmmsg(int fd, struct mmsghdr *v, unsigned int n, int f, struct timespec *t)
{
    return (int)shim_raw_syscall(SYS_recvmmsg, fd, v, n, f, t);
}
static ssize_t direct_sendfile(int out, int in, off_t *off, size_t n) { return shim_raw_syscall(SYS_sendfile, out, in, off, n); }
static int direct_close(int fd) { return (int)shim_raw_syscall(SYS_close, fd); }
static int direct_close_range(unsigned int first, unsigned int last, int flags)
{
    return (int)shim_raw_syscall(SYS_close_range, first, last, flags);
}
static int direct_dup(int fd) { return (int)shim_raw_syscall(SYS_dup, fd); }
static int direct_dup2(int fd, int to) { return (int)shim_raw_syscall(SYS_dup2, fd, to); }
static int direct_dup3(int fd, int to, int flags) { return (int)shim_raw_syscall(SYS_dup3, fd, to, flags); }
static int direct_fcntl(int fd, int cmd, ...)
{
    va_list ap;
    va_start(ap, cmd);
    long arg = va_arg(ap, long);
    va_end(ap);
    return (int)shim_raw_syscall(SYS_fcntl, fd, cmd, arg);
}
static int direct_ioctl(int fd, unsigned long req, ...)
{
    va_list ap;
    va_start(ap, req);
    long arg = va_arg(ap, long);
    va_end(ap);
    return (int)shim_raw_syscall(SYS_ioctl, fd, req, arg);
}
static int direct_epoll_create(int size) { return size <= 0 ? (errno = EINVAL, -1) : (int)shim_raw_syscall(SYS_epoll_create1, 0); }
static int direct_epoll_create1(int flags) { return (int)shim_raw_syscall(SYS_epoll_create1, flags); }
static int direct_epoll_ctl(int ep, int op, int fd, struct epoll_event *ev) { return (int)shim_raw_syscall(SYS_epoll_ctl, ep, op, fd, ev); }
static int direct_epoll_pwait(int ep, struct epoll_event *ev, int n, int timeout, const sigset_t *mask)
{
    return (int)shim_raw_syscall(SYS_epoll_pwait, ep, ev, n, timeout, mask, _NSIG / 8);
}
static int direct_epoll_pwait2(int ep, struct epoll_event *ev, int n, const struct timespec *ts, const sigset_t *mask)
{
    return (int)shim_raw_syscall(SYS_epoll_pwait2, ep, ev, n, ts, mask, _NSIG / 8);
}
static int direct_ppoll(struct pollfd *fds, nfds_t n, const struct timespec *ts, const sigset_t *mask)
{
    struct timespec copy, *tp = NULL;
    if (ts) {
        copy = *ts;
        tp = &copy;
    }
    return (int)shim_raw_syscall(SYS_ppoll, fds, n, tp, mask, _NSIG / 8);
}
static int direct_select(int n, fd_set *r, fd_set *w, fd_set *e, struct timeval *tv)
{
    return (int)shim_raw_syscall(SYS_select, n, r, w, e, tv);
}
static int direct_pselect(int n, fd_set *r, fd_set *w, fd_set *e, const struct timespec *ts, const sigset_t *mask)
{
    struct timespec copy, *tp = NULL;
    if (ts) {
        copy = *ts;
        tp = &copy;
    }
    struct {
        const sigset_t *set;
        size_t size;
    } sig = {mask, _NSIG / 8};
    return (int)shim_raw_syscall(SYS_pselect6, n, r, w, e, tp, mask ? &sig : NULL);
}
static pid_t direct_fork(void) { return (pid_t)shim_raw_syscall(SYS_fork); }

struct shim_real shim_real = {
    .socket = direct_socket,
    .bind = direct_bind,
    .listen = direct_listen,
    .accept = direct_accept,
    .accept4 = direct_accept4,
    .connect = direct_connect,
    .shutdown = direct_shutdown,
    .getsockname = direct_getsockname,
    .getpeername = direct_getpeername,
    .getsockopt = direct_getsockopt,
    .setsockopt = direct_setsockopt,
    .read = direct_read,
    .readv = direct_readv,
    .recv = direct_recv,
    .recvfrom = direct_recvfrom,
    .recvmsg = direct_recvmsg,
    .write = direct_write,
    .writev = direct_writev,
    .send = direct_send,
    .sendto = direct_sendto,
    .sendmsg = direct_sendmsg,
    .sendmmsg = direct_sendmmsg,
    .fstat = direct_fstat,
    .__fxstat = direct_fxstat,
    .splice = direct_splice,
    .tee = direct_tee,
    .recvmmsg = direct_recvmmsg,
    .sendfile = direct_sendfile,
    .close = direct_close,
    .close_range = direct_close_range,
    .dup = direct_dup,
    .dup2 = direct_dup2,
    .dup3 = direct_dup3,
    .fcntl = direct_fcntl,
    .ioctl = direct_ioctl,
    .epoll_create = direct_epoll_create,
    .epoll_create1 = direct_epoll_create1,
    .epoll_ctl = direct_epoll_ctl,
    .epoll_pwait = direct_epoll_pwait,
    .epoll_pwait2 = direct_epoll_pwait2,
    .ppoll = direct_ppoll,
    .select = direct_select,
    .pselect = direct_pselect,
    .fork = direct_fork,
};

/* Stores the next definition of `name` over `*slot` when there is one; the
 * direct system call stays otherwise (e.g. close_range on an older libc). */
static void resolve_one(void *slot, const char *name)
{
    void *fn = dlsym(RTLD_NEXT, name);
    if (fn)
        __atomic_store_n((void **)slot, fn, __ATOMIC_RELEASE);
}

void shim_resolve_real_functions(void)
{
#define RESOLVE(field) resolve_one(&shim_real.field, #field)
    RESOLVE(socket);
    RESOLVE(bind);
    RESOLVE(listen);
    RESOLVE(accept);
    RESOLVE(accept4);
    RESOLVE(connect);
    RESOLVE(shutdown);
    RESOLVE(getsockname);
    RESOLVE(getpeername);
    RESOLVE(getsockopt);
    RESOLVE(setsockopt);
    RESOLVE(read);
    RESOLVE(readv);
    RESOLVE(recv);
    RESOLVE(recvfrom);
    RESOLVE(recvmsg);
    RESOLVE(write);
    RESOLVE(writev);
    RESOLVE(send);
    RESOLVE(sendto);
    RESOLVE(sendmsg);
    RESOLVE(sendmmsg);
    RESOLVE(fstat);
    RESOLVE(__fxstat);
    RESOLVE(splice);
    RESOLVE(tee);
    RESOLVE(recvmmsg);
    RESOLVE(sendfile);
    RESOLVE(close);
    RESOLVE(close_range);
    RESOLVE(dup);
    RESOLVE(dup2);
    RESOLVE(dup3);
    RESOLVE(fcntl);
    RESOLVE(ioctl);
    RESOLVE(epoll_create);
    RESOLVE(epoll_create1);
    RESOLVE(epoll_ctl);
    RESOLVE(epoll_pwait);
    RESOLVE(epoll_pwait2);
    RESOLVE(ppoll);
    RESOLVE(select);
    RESOLVE(pselect);
    RESOLVE(fork);
#undef RESOLVE
}
