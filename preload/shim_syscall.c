/*
 * syscall(2): a program (or a library: libuv, older OpenSSL, language
 * runtimes on glibc) that makes a socket or descriptor call through
 * syscall(SYS_...) reaches the same interposed function as through its
 * libc wrapper.  Every other number goes to the kernel unchanged.
 */
#include "shim.h"

#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <sys/ioctl.h>
#include <sys/select.h>
#include <sys/sendfile.h>
#include <sys/uio.h>

/* syscall(2)'s six argument words, as it reads them whatever the number. */
static void take_arguments(va_list ap, long a[6])
{
    for (int i = 0; i < 6; i++)
        a[i] = va_arg(ap, long);
}

/* The system call itself: the kernel's answer, or -1 with errno. */
static long raw(long number, const long a[6])
{
    long result;
#if defined(__x86_64__)
    register long r10 __asm__("r10") = a[3], r8 __asm__("r8") = a[4], r9 __asm__("r9") = a[5];
    __asm__ volatile("syscall"
                     : "=a"(result)
                     : "a"(number), "D"(a[0]), "S"(a[1]), "d"(a[2]), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
#elif defined(__aarch64__)
    register long x8 __asm__("x8") = number, x0 __asm__("x0") = a[0], x1 __asm__("x1") = a[1];
    register long x2 __asm__("x2") = a[2], x3 __asm__("x3") = a[3], x4 __asm__("x4") = a[4], x5 __asm__("x5") = a[5];
    __asm__ volatile("svc 0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2), "r"(x3), "r"(x4), "r"(x5) : "memory");
    result = x0;
#else
#error "shim_raw_syscall: no system call sequence for this architecture"
#endif
    if (result < 0 && result > -4096) {
        errno = (int)-result;
        return -1;
    }
    return result;
}

long shim_raw_syscall(long number, ...)
{
    long a[6];
    va_list ap;
    va_start(ap, number);
    take_arguments(ap, a);
    va_end(ap);
    return raw(number, a);
}

#define P(type, arg) ((type)(uintptr_t)(arg))

long syscall(long number, ...)
{
    long a[6];
    va_list ap;
    va_start(ap, number);
    take_arguments(ap, a);
    va_end(ap);
    long a1 = a[0], a2 = a[1], a3 = a[2], a4 = a[3], a5 = a[4], a6 = a[5];
    /* Never attaches from here: an allocator makes system calls through
     * syscall(2) while it holds its own locks (jemalloc opens files so as it
     * starts, from a library's constructor), and attaching allocates. */
    if (!__atomic_load_n(&shim_init_done, __ATOMIC_ACQUIRE) || !shim.active || shim_busy)
        return raw(number, a);
    int fd = (int)a1;
    switch (number) {
    case SYS_socket: return socket(fd, (int)a2, (int)a3);
    case SYS_bind: return bind(fd, P(const struct sockaddr *, a2), (socklen_t)a3);
    case SYS_listen: return listen(fd, (int)a2);
#ifdef SYS_accept
    case SYS_accept: return accept(fd, P(struct sockaddr *, a2), P(socklen_t *, a3));
#endif
    case SYS_accept4: return accept4(fd, P(struct sockaddr *, a2), P(socklen_t *, a3), (int)a4);
    case SYS_connect: return connect(fd, P(const struct sockaddr *, a2), (socklen_t)a3);
    case SYS_shutdown: return shutdown(fd, (int)a2);
    case SYS_getsockname: return getsockname(fd, P(struct sockaddr *, a2), P(socklen_t *, a3));
    case SYS_getpeername: return getpeername(fd, P(struct sockaddr *, a2), P(socklen_t *, a3));
    case SYS_getsockopt: return getsockopt(fd, (int)a2, (int)a3, P(void *, a4), P(socklen_t *, a5));
    case SYS_setsockopt: return setsockopt(fd, (int)a2, (int)a3, P(const void *, a4), (socklen_t)a5);
    case SYS_read: return read(fd, P(void *, a2), (size_t)a3);
    case SYS_readv: return readv(fd, P(const struct iovec *, a2), (int)a3);
    case SYS_recvfrom:
        return recvfrom(fd, P(void *, a2), (size_t)a3, (int)a4, P(struct sockaddr *, a5), P(socklen_t *, a6));
    case SYS_recvmsg: return recvmsg(fd, P(struct msghdr *, a2), (int)a3);
    case SYS_write: return write(fd, P(const void *, a2), (size_t)a3);
    case SYS_writev: return writev(fd, P(const struct iovec *, a2), (int)a3);
    case SYS_sendto:
        return sendto(fd, P(const void *, a2), (size_t)a3, (int)a4, P(const struct sockaddr *, a5), (socklen_t)a6);
    case SYS_sendmsg: return sendmsg(fd, P(const struct msghdr *, a2), (int)a3);
    case SYS_sendmmsg: return sendmmsg(fd, P(struct mmsghdr *, a2), (unsigned int)a3, (int)a4);
    case SYS_recvmmsg:
        return recvmmsg(fd, P(struct mmsghdr *, a2), (unsigned int)a3, (int)a4, P(struct timespec *, a5));
    case SYS_sendfile: return sendfile(fd, (int)a2, P(off_t *, a3), (size_t)a4);
    case SYS_close: return close(fd);
    case SYS_close_range: return close_range((unsigned int)a1, (unsigned int)a2, (int)a3);
    case SYS_dup: return dup(fd);
#ifdef SYS_dup2
    case SYS_dup2: return dup2(fd, (int)a2);
#endif
    case SYS_dup3: return dup3(fd, (int)a2, (int)a3);
    case SYS_fcntl: return fcntl(fd, (int)a2, a3);
    case SYS_ioctl: return ioctl(fd, (unsigned long)a2, a3);
#ifdef SYS_epoll_create
    case SYS_epoll_create: return epoll_create(fd);
#endif
    case SYS_epoll_create1: return epoll_create1(fd);
    case SYS_epoll_ctl: return epoll_ctl(fd, (int)a2, (int)a3, P(struct epoll_event *, a4));
#ifdef SYS_epoll_wait
    case SYS_epoll_wait: return epoll_wait(fd, P(struct epoll_event *, a2), (int)a3, (int)a4);
#endif
    case SYS_epoll_pwait:
        return epoll_pwait(fd, P(struct epoll_event *, a2), (int)a3, (int)a4, P(const sigset_t *, a5));
#ifdef SYS_poll
    case SYS_poll: return poll(P(struct pollfd *, a1), (nfds_t)a2, (int)a3);
#endif
    case SYS_ppoll:
        return ppoll(P(struct pollfd *, a1), (nfds_t)a2, P(const struct timespec *, a3), P(const sigset_t *, a4));
#ifdef SYS_select
    case SYS_select:
        return select(fd, P(fd_set *, a2), P(fd_set *, a3), P(fd_set *, a4), P(struct timeval *, a5));
#endif
    default:
        return raw(number, a);
    }
}
