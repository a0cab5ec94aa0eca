/*
 * Attaching to the stack, the real functions, the fd table, commands to the
 * stack, waiting for it, and fork.
 */
#include "shim.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/sendfile.h>
#include <sys/stat.h>

#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#else
#define cpu_relax() __asm__ __volatile__("" ::: "memory")
#endif

#define DEFAULT_SPIN_US 20
/* Largest fd table we map (8 MiB of address space, touched lazily). */
#define FD_TABLE_MAX (1u << 20)
/* A full command queue: retry for about a second before giving up. */
#define PUSH_SPIN_ATTEMPTS 200
#define PUSH_SLEEP_ATTEMPTS 20000
#define PUSH_SLEEP_NS 50000
/* Waits on a futex or the death pipe are cut into slices this long so a
 * stack that stopped without closing its pipe is noticed too. */
#define LIVENESS_SLICE_MS 100

struct shim_state shim = {.shm_fd = -1, .ctl_fd = -1, .wake_fd = -1, .death_fd = -1};
int shim_init_done;
__thread int shim_busy __attribute__((tls_model("initial-exec")));

uint64_t *shim_fd_table;
uint32_t shim_fd_capacity;
static int fd_highest = -1;

/* ---- direct system calls, used until dlsym has answered ------------------ */

static int direct_socket(int d, int t, int p) { return (int)syscall(SYS_socket, d, t, p); }
static int direct_bind(int fd, const struct sockaddr *a, socklen_t l) { return (int)syscall(SYS_bind, fd, a, l); }
static int direct_listen(int fd, int b) { return (int)syscall(SYS_listen, fd, b); }
static int direct_accept(int fd, struct sockaddr *a, socklen_t *l) { return (int)syscall(SYS_accept, fd, a, l); }
static int direct_accept4(int fd, struct sockaddr *a, socklen_t *l, int f)
{
    return (int)syscall(SYS_accept4, fd, a, l, f);
}
static int direct_connect(int fd, const struct sockaddr *a, socklen_t l) { return (int)syscall(SYS_connect, fd, a, l); }
static int direct_shutdown(int fd, int how) { return (int)syscall(SYS_shutdown, fd, how); }
static int direct_getsockname(int fd, struct sockaddr *a, socklen_t *l) { return (int)syscall(SYS_getsockname, fd, a, l); }
static int direct_getpeername(int fd, struct sockaddr *a, socklen_t *l) { return (int)syscall(SYS_getpeername, fd, a, l); }
static int direct_getsockopt(int fd, int level, int name, void *v, socklen_t *l)
{
    return (int)syscall(SYS_getsockopt, fd, level, name, v, l);
}
static int direct_setsockopt(int fd, int level, int name, const void *v, socklen_t l)
{
    return (int)syscall(SYS_setsockopt, fd, level, name, v, l);
}
static ssize_t direct_read(int fd, void *b, size_t n) { return syscall(SYS_read, fd, b, n); }
static ssize_t direct_readv(int fd, const struct iovec *v, int n) { return syscall(SYS_readv, fd, v, n); }
static ssize_t direct_recv(int fd, void *b, size_t n, int f) { return syscall(SYS_recvfrom, fd, b, n, f, NULL, NULL); }
static ssize_t direct_recvfrom(int fd, void *b, size_t n, int f, struct sockaddr *a, socklen_t *l)
{
    return syscall(SYS_recvfrom, fd, b, n, f, a, l);
}
static ssize_t direct_recvmsg(int fd, struct msghdr *m, int f) { return syscall(SYS_recvmsg, fd, m, f); }
static ssize_t direct_write(int fd, const void *b, size_t n) { return syscall(SYS_write, fd, b, n); }
static ssize_t direct_writev(int fd, const struct iovec *v, int n) { return syscall(SYS_writev, fd, v, n); }
static ssize_t direct_send(int fd, const void *b, size_t n, int f) { return syscall(SYS_sendto, fd, b, n, f, NULL, 0); }
static ssize_t direct_sendto(int fd, const void *b, size_t n, int f, const struct sockaddr *a, socklen_t l)
{
    return syscall(SYS_sendto, fd, b, n, f, a, l);
}
static ssize_t direct_sendmsg(int fd, const struct msghdr *m, int f) { return syscall(SYS_sendmsg, fd, m, f); }
static ssize_t direct_sendfile(int out, int in, off_t *off, size_t n) { return syscall(SYS_sendfile, out, in, off, n); }
static int direct_close(int fd) { return (int)syscall(SYS_close, fd); }
static int direct_close_range(unsigned int first, unsigned int last, int flags)
{
    return (int)syscall(SYS_close_range, first, last, flags);
}
static int direct_dup(int fd) { return (int)syscall(SYS_dup, fd); }
static int direct_dup2(int fd, int to) { return (int)syscall(SYS_dup2, fd, to); }
static int direct_dup3(int fd, int to, int flags) { return (int)syscall(SYS_dup3, fd, to, flags); }
static int direct_fcntl(int fd, int cmd, ...)
{
    va_list ap;
    va_start(ap, cmd);
    long arg = va_arg(ap, long);
    va_end(ap);
    return (int)syscall(SYS_fcntl, fd, cmd, arg);
}
static int direct_ioctl(int fd, unsigned long req, ...)
{
    va_list ap;
    va_start(ap, req);
    long arg = va_arg(ap, long);
    va_end(ap);
    return (int)syscall(SYS_ioctl, fd, req, arg);
}
static int direct_epoll_create(int size) { return size <= 0 ? (errno = EINVAL, -1) : (int)syscall(SYS_epoll_create1, 0); }
static int direct_epoll_create1(int flags) { return (int)syscall(SYS_epoll_create1, flags); }
static int direct_epoll_ctl(int ep, int op, int fd, struct epoll_event *ev) { return (int)syscall(SYS_epoll_ctl, ep, op, fd, ev); }
static int direct_epoll_pwait(int ep, struct epoll_event *ev, int n, int timeout, const sigset_t *mask)
{
    return (int)syscall(SYS_epoll_pwait, ep, ev, n, timeout, mask, _NSIG / 8);
}
static int direct_epoll_pwait2(int ep, struct epoll_event *ev, int n, const struct timespec *ts, const sigset_t *mask)
{
    return (int)syscall(SYS_epoll_pwait2, ep, ev, n, ts, mask, _NSIG / 8);
}
static int direct_ppoll(struct pollfd *fds, nfds_t n, const struct timespec *ts, const sigset_t *mask)
{
    struct timespec copy, *tp = NULL;
    if (ts) {
        copy = *ts;
        tp = &copy;
    }
    return (int)syscall(SYS_ppoll, fds, n, tp, mask, _NSIG / 8);
}
static int direct_select(int n, fd_set *r, fd_set *w, fd_set *e, struct timeval *tv)
{
    return (int)syscall(SYS_select, n, r, w, e, tv);
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
    return (int)syscall(SYS_pselect6, n, r, w, e, tp, mask ? &sig : NULL);
}
static pid_t direct_fork(void) { return (pid_t)syscall(SYS_fork); }

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

static void resolve_real_functions(void)
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

/* ---- logging -------------------------------------------------------------- */

void shim_log(const char *fmt, ...)
{
    char line[512];
    shim_busy++;
    int n = snprintf(line, sizeof(line), "mtcpshim[%d]: ", (int)getpid());
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (m < 0)
        m = 0;
    n += m < (int)(sizeof(line) - (size_t)n - 1) ? m : (int)(sizeof(line) - (size_t)n - 2);
    line[n++] = '\n';
    shim_real.write(STDERR_FILENO, line, (size_t)n);
    shim_busy--;
}

/* ---- the fd table --------------------------------------------------------- */

void shim_fd_set(int fd, enum shim_fd_kind kind, uint32_t payload)
{
    if ((unsigned)fd >= shim_fd_capacity)
        return;
    __atomic_store_n(&shim_fd_table[fd], (uint64_t)kind << 32 | payload, __ATOMIC_RELEASE);
    int high = __atomic_load_n(&fd_highest, __ATOMIC_RELAXED);
    while (fd > high && !__atomic_compare_exchange_n(&fd_highest, &high, fd, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        ;
}

void shim_fd_clear(int fd)
{
    if ((unsigned)fd < shim_fd_capacity)
        __atomic_store_n(&shim_fd_table[fd], 0, __ATOMIC_RELEASE);
}

int shim_fd_highest(void) { return __atomic_load_n(&fd_highest, __ATOMIC_RELAXED); }

/* A recursive spin lock whose owner is a thread-local address rather than a
 * thread id: the same after fork, so the forking thread's child still owns
 * it, and other libraries' fork handlers may close fds while we hold it. */
static uint32_t fd_lock_word;
static void *fd_lock_owner;
static uint32_t fd_lock_depth;
static __thread char fd_lock_token __attribute__((tls_model("initial-exec")));

void shim_fd_lock(void)
{
    if (__atomic_load_n(&fd_lock_owner, __ATOMIC_RELAXED) == &fd_lock_token) {
        fd_lock_depth++;
        return;
    }
    uint32_t expected = 0;
    while (!__atomic_compare_exchange_n(&fd_lock_word, &expected, 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
        expected = 0;
        sched_yield();
    }
    __atomic_store_n(&fd_lock_owner, &fd_lock_token, __ATOMIC_RELAXED);
    fd_lock_depth = 1;
}

void shim_fd_unlock(void)
{
    if (--fd_lock_depth)
        return;
    __atomic_store_n(&fd_lock_owner, NULL, __ATOMIC_RELAXED);
    __atomic_store_n(&fd_lock_word, 0, __ATOMIC_RELEASE);
}

/* ---- internal descriptors ---------------------------------------------------- */

/* Waiters by id, so a waiter whose eventfd the program wants to overwrite
 * can be moved. */
static struct shim_waiter **waiters_by_id;

int shim_internal_fd(int fd, int cloexec)
{
    if (fd < shim.internal_fd_base) {
        int moved = shim_real.fcntl(fd, cloexec ? F_DUPFD_CLOEXEC : F_DUPFD, shim.internal_fd_base);
        if (moved >= 0) {
            shim_real.close(fd);
            fd = moved;
        }
    }
    shim_fd_set(fd, SHIM_FD_INTERNAL, 0);
    return fd;
}

static void publish_inherited_fds(void)
{
    char value[64];
    snprintf(value, sizeof(value), "%d,%d,%d,%d", shim.shm_fd, shim.ctl_fd, shim.wake_fd, shim.death_fd);
    setenv(MTS_ENV_FDS, value, 1);
}

int shim_internal_relocate(int fd)
{
    int *inherited[] = {&shim.shm_fd, &shim.ctl_fd, &shim.wake_fd, &shim.death_fd};
    for (size_t i = 0; i < sizeof(inherited) / sizeof(inherited[0]); i++) {
        if (*inherited[i] != fd)
            continue;
        int moved = shim_real.fcntl(fd, F_DUPFD, fd + 1);
        if (moved < 0)
            return -1;
        shim_fd_set(moved, SHIM_FD_INTERNAL, 0);
        *inherited[i] = moved;
        shim_fd_clear(fd);
        shim_busy++;
        publish_inherited_fds();
        shim_busy--;
        SHIM_DEBUG("moved inherited fd %d to %d", fd, moved);
        return 0;
    }
    for (uint32_t id = 0; waiters_by_id && id < shim.geom.nwaiters; id++) {
        struct shim_waiter *sw = __atomic_load_n(&waiters_by_id[id], __ATOMIC_ACQUIRE);
        if (!sw || sw->efd != fd)
            continue;
        int moved = shim_real.fcntl(fd, F_DUPFD_CLOEXEC, fd + 1);
        if (moved < 0)
            return -1;
        shim_fd_set(moved, SHIM_FD_INTERNAL, 0);
        sw->efd = moved;
        shim_fd_clear(fd);
        SHIM_DEBUG("moved waiter %u eventfd %d to %d", id, fd, moved);
        return 0;
    }
    shim_fd_clear(fd);
    return 0;
}

/* ---- attaching ------------------------------------------------------------------ */

static pthread_once_t attach_once = PTHREAD_ONCE_INIT;
static pthread_key_t thread_waiter_key;
static void thread_waiter_exit(void *arg);

static int parse_inherited_fds(const char *value, int fds[4])
{
    const char *p = value;
    for (int i = 0; i < 4; i++) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < 0 || v > INT_MAX || (i < 3 ? *end != ',' : *end != '\0'))
            return -1;
        fds[i] = (int)v;
        p = end + 1;
    }
    return 0;
}

static void setup_fd_table(void)
{
    struct rlimit lim;
    rlim_t hard = getrlimit(RLIMIT_NOFILE, &lim) == 0 ? lim.rlim_max : 1024;
    uint32_t capacity = hard == RLIM_INFINITY || hard > FD_TABLE_MAX ? FD_TABLE_MAX : (uint32_t)hard;
    void *table = mmap(NULL, (size_t)capacity * sizeof(uint64_t), PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (table == MAP_FAILED)
        return;
    shim_fd_table = table;
    shim_fd_capacity = capacity;
    rlim_t soft = getrlimit(RLIMIT_NOFILE, &lim) == 0 ? lim.rlim_cur : 1024;
    if (soft == RLIM_INFINITY || soft > capacity)
        soft = capacity;
    shim.internal_fd_base = soft * 3 / 4 < 1000 ? (int)(soft * 3 / 4) : 1000;
}

static void attach(void)
{
    const char *debug = getenv(MTS_ENV_DEBUG);
    shim.debug = debug && *debug;
    const char *spin = getenv("MTCPSHIM_SPIN_US");
    shim.spin_ns = (spin && *spin ? strtol(spin, NULL, 10) : DEFAULT_SPIN_US) * 1000;
    const char *value = getenv(MTS_ENV_FDS);
    if (!value) {
        SHIM_DEBUG("%s not set: every call goes to the kernel", MTS_ENV_FDS);
        return;
    }
    int fds[4];
    struct stat st;
    if (parse_inherited_fds(value, fds) < 0 || fstat(fds[0], &st) < 0) {
        SHIM_DEBUG("%s=%s unusable: every call goes to the kernel", MTS_ENV_FDS, value);
        return;
    }
    void *base = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0);
    if (base == MAP_FAILED || mts_geom_attach(&shim.geom, base, (uint64_t)st.st_size) != 0) {
        SHIM_DEBUG("shared region on fd %d is invalid: every call goes to the kernel", fds[0]);
        if (base != MAP_FAILED)
            munmap(base, (size_t)st.st_size);
        return;
    }
    setup_fd_table();
    waiters_by_id = calloc(shim.geom.nwaiters, sizeof(*waiters_by_id));
    if (!shim_fd_table || !waiters_by_id || pthread_key_create(&thread_waiter_key, thread_waiter_exit) != 0) {
        SHIM_DEBUG("out of memory at attach: every call goes to the kernel");
        munmap(base, (size_t)st.st_size);
        return;
    }
    shim.hdr = base;
    shim.shm_fd = shim_internal_fd(fds[0], 0);
    shim.ctl_fd = shim_internal_fd(fds[1], 0);
    shim.wake_fd = shim_internal_fd(fds[2], 0);
    shim.death_fd = shim_internal_fd(fds[3], 0);
    publish_inherited_fds();
    shim.active = 1;
    SHIM_DEBUG("attached: stack %u.%u.%u.%u/%u, %u slots, fds %d,%d,%d,%d", shim.hdr->ip >> 24,
               shim.hdr->ip >> 16 & 255, shim.hdr->ip >> 8 & 255, shim.hdr->ip & 255, shim.hdr->prefix_len,
               shim.geom.nslots, shim.shm_fd, shim.ctl_fd, shim.wake_fd, shim.death_fd);
}

void shim_init_slow(void)
{
    /* Re-entered from our own initialisation (dlsym's malloc, say): the
     * direct system calls serve until it is done. */
    if (shim_busy)
        return;
    shim_busy++;
    resolve_real_functions();
    pthread_once(&attach_once, attach);
    shim_busy--;
    __atomic_store_n(&shim_init_done, 1, __ATOMIC_RELEASE);
}

__attribute__((constructor)) static void shim_constructor(void) { shim_ensure_init(); }

/* Exit closes every descriptor, so the process's references to stack
 * sockets go too.  Streams are flushed first: a FILE on a socket would
 * otherwise be flushed after we let go of it. */
__attribute__((destructor)) static void shim_destructor(void)
{
    if (!shim.active)
        return;
    fflush(NULL);
    shim_fd_lock();
    int high = shim_fd_highest();
    for (int fd = 0; fd <= high; fd++) {
        uint64_t word = shim_fd_word(fd);
        if (shim_fd_kind_of(word) == SHIM_FD_STACK) {
            shim_fd_clear(fd);
            shim_slot_unref(shim_fd_payload(word));
        }
    }
    shim_fd_unlock();
}

/* ---- liveness and commands -------------------------------------------------- */

void shim_mark_stack_dead(const char *why)
{
    if (!__atomic_exchange_n(&shim.stack_dead, 1, __ATOMIC_ACQ_REL))
        SHIM_DEBUG("stack gone (%s): stack sockets now fail with ENETDOWN", why);
}

int shim_stack_alive(int check_pipe)
{
    if (__atomic_load_n(&shim.stack_dead, __ATOMIC_ACQUIRE))
        return 0;
    uint32_t state = __atomic_load_n(&shim.hdr->stack_state, __ATOMIC_ACQUIRE);
    if (state == MTS_STACK_STOPPED || state == MTS_STACK_DEAD) {
        shim_mark_stack_dead(state == MTS_STACK_DEAD ? shim.hdr->fault : "stopped");
        return 0;
    }
    if (check_pipe) {
        struct pollfd death = {.fd = shim.death_fd, .events = POLLIN};
        struct timespec zero = {0, 0};
        if (shim_real.ppoll(&death, 1, &zero, NULL) > 0) {
            shim_mark_stack_dead("death pipe");
            return 0;
        }
    }
    return 1;
}

void shim_wake_stack(void)
{
    /* Our queue write must be visible before we read the flag the stack
     * sets before it re-checks the queue (store-load ordering). */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(&shim.hdr->stack_sleeping, __ATOMIC_RELAXED)) {
        uint64_t one = 1;
        shim_real.write(shim.wake_fd, &one, sizeof(one));
    }
}

static void sleep_ns(long ns)
{
    struct timespec ts = {0, ns};
    nanosleep(&ts, NULL);
}

static int push_command(uint32_t op, uint32_t slot, uint64_t arg)
{
    for (int attempt = 0; attempt < PUSH_SPIN_ATTEMPTS + PUSH_SLEEP_ATTEMPTS; attempt++) {
        if (mts_cmd_push(&shim.geom, op, slot, arg) == 0) {
            shim_wake_stack();
            return 0;
        }
        shim_wake_stack();
        if (!shim_stack_alive(attempt % 64 == 63)) {
            errno = ENETDOWN;
            return -1;
        }
        if (attempt < PUSH_SPIN_ATTEMPTS)
            sched_yield();
        else
            sleep_ns(PUSH_SLEEP_NS);
    }
    SHIM_DEBUG("command queue full: op %u on slot %u dropped", op, slot);
    errno = ENOBUFS;
    return -1;
}

int shim_cmd_async(uint32_t op, uint32_t slot, uint64_t arg)
{
    if (!shim_stack_alive(0)) {
        errno = ENETDOWN;
        return -1;
    }
    return push_command(op, slot, arg);
}

static int await_completion(struct mts_slot *s)
{
    int64_t spin_end = shim_now_ns() + shim.spin_ns;
    while (!__atomic_load_n(&s->op_done, __ATOMIC_ACQUIRE) && shim_now_ns() < spin_end)
        for (int i = 0; i < 32; i++)
            cpu_relax();
    while (!__atomic_load_n(&s->op_done, __ATOMIC_ACQUIRE)) {
        mts_futex_wait(&s->op_done, 0, LIVENESS_SLICE_MS);
        if (!__atomic_load_n(&s->op_done, __ATOMIC_ACQUIRE) && !shim_stack_alive(1))
            return -ENETDOWN;
    }
    return s->op_result;
}

int shim_cmd_sync(uint32_t op, uint32_t slot, uint64_t arg)
{
    struct mts_slot *s = shim_slot(slot);
    for (unsigned spins = 0;; spins++) {
        uint32_t expected = 0;
        if (__atomic_compare_exchange_n(&s->op_lock, &expected, 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
            break;
        if (!shim_stack_alive(spins % 1024 == 1023))
            return -ENETDOWN;
        sched_yield();
    }
    int result;
    if (!shim_stack_alive(0)) {
        result = -ENETDOWN;
    } else {
        __atomic_store_n(&s->op_done, 0, __ATOMIC_RELAXED);
        result = push_command(op, slot, arg) < 0 ? -errno : await_completion(s);
    }
    __atomic_store_n(&s->op_lock, 0, __ATOMIC_RELEASE);
    return result;
}

void shim_slot_unref(uint32_t slot)
{
    struct mts_slot *s = shim_slot(slot);
    if (__atomic_sub_fetch(&s->refcnt, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    /* SO_LINGER on with a zero timeout: close aborts with a reset. */
    uint64_t abort = s->opt_linger_on && s->opt_linger_sec == 0;
    SHIM_DEBUG("slot %u: last reference gone, %s", slot, abort ? "abort" : "close");
    if (shim_cmd_async(MTS_OP_CLOSE, slot, abort) < 0)
        SHIM_DEBUG("slot %u: close not delivered: %s", slot, strerror(errno));
}

/* ---- time ------------------------------------------------------------------- */

int64_t shim_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int64_t shim_deadline_ms(int64_t timeout_ms)
{
    if (timeout_ms < 0)
        return SHIM_FOREVER;
    return shim_now_ns() + timeout_ms * 1000000;
}

int64_t shim_deadline_ts(const struct timespec *ts)
{
    if (!ts)
        return SHIM_FOREVER;
    if (ts->tv_sec > INT64_MAX / 1000000000 / 2)
        return SHIM_FOREVER;
    return shim_now_ns() + (int64_t)ts->tv_sec * 1000000000 + ts->tv_nsec;
}

const struct timespec *shim_remaining(int64_t deadline, struct timespec *out)
{
    if (deadline == SHIM_FOREVER)
        return NULL;
    int64_t left = deadline - shim_now_ns();
    if (left < 0)
        left = 0;
    out->tv_sec = left / 1000000000;
    out->tv_nsec = left % 1000000000;
    return out;
}

/* ---- waiters ---------------------------------------------------------------- */

static int send_waiter_fd(int32_t id, int efd)
{
    struct mts_ctl_msg msg = {.op = MTS_CTL_REGISTER_WAITER, .waiter = (uint32_t)id};
    struct iovec iov = {.iov_base = &msg, .iov_len = sizeof(msg)};
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int))];
    } control;
    memset(&control, 0, sizeof(control));
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                        .msg_controllen = sizeof(control.buf)};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &efd, sizeof(int));
    ssize_t sent;
    do
        sent = shim_real.sendmsg(shim.ctl_fd, &mh, MSG_NOSIGNAL);
    while (sent < 0 && errno == EINTR);
    return sent == (ssize_t)sizeof(msg) ? 0 : -1;
}

int shim_waiter_open(struct shim_waiter *sw)
{
    sw->id = -1;
    sw->efd = -1;
    sw->w = NULL;
    if (!shim_stack_alive(0))
        return -1;
    int32_t id = mts_waiter_alloc(&shim.geom, (int32_t)getpid());
    if (id < 0) {
        SHIM_DEBUG("no free waiter: blocking calls poll in 1 ms slices");
        return -1;
    }
    struct mts_waiter *w = mts_waiter_at(&shim.geom, (uint32_t)id);
    int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (efd < 0 || send_waiter_fd(id, efd) < 0) {
        SHIM_DEBUG("waiter %d not registered: %s", id, strerror(errno));
        if (efd >= 0)
            shim_real.close(efd);
        mts_waiter_free(&shim.geom, (uint32_t)id); /* the stack never saw it */
        return -1;
    }
    shim_wake_stack();
    while (!__atomic_load_n(&w->registered, __ATOMIC_ACQUIRE)) {
        mts_futex_wait(&w->registered, 0, LIVENESS_SLICE_MS);
        if (!__atomic_load_n(&w->registered, __ATOMIC_ACQUIRE) && !shim_stack_alive(1)) {
            shim_real.close(efd);
            return -1;
        }
    }
    sw->id = id;
    sw->efd = shim_internal_fd(efd, 1);
    sw->w = w;
    __atomic_store_n(&waiters_by_id[id], sw, __ATOMIC_RELEASE);
    SHIM_DEBUG("waiter %d registered, eventfd %d", id, sw->efd);
    return 0;
}

void shim_waiter_close(struct shim_waiter *sw)
{
    if (sw->id < 0)
        return;
    __atomic_store_n(&waiters_by_id[sw->id], NULL, __ATOMIC_RELEASE);
    if (shim_cmd_async(MTS_OP_WAITER_FREE, (uint32_t)sw->id, 0) < 0)
        SHIM_DEBUG("waiter %d not returned: %s", sw->id, strerror(errno));
    shim_fd_clear(sw->efd);
    shim_real.close(sw->efd);
    sw->id = -1;
    sw->efd = -1;
    sw->w = NULL;
}

void shim_waiter_arm(struct shim_waiter *sw)
{
    /* Sequentially consistent: the store must precede the readiness
     * re-check that follows, as the stack publishes before it disarms. */
    __atomic_store_n(&sw->w->armed, 1, __ATOMIC_SEQ_CST);
}

void shim_waiter_settle(struct shim_waiter *sw)
{
    __atomic_store_n(&sw->w->armed, 0, __ATOMIC_RELEASE);
    uint64_t count;
    shim_real.read(sw->efd, &count, sizeof(count));
}

static __thread struct shim_waiter thread_waiter __attribute__((tls_model("initial-exec"))) = {.id = -1, .efd = -1};

struct shim_waiter *shim_thread_waiter(void)
{
    if (thread_waiter.id >= 0)
        return &thread_waiter;
    if (shim_waiter_open(&thread_waiter) < 0)
        return NULL;
    pthread_setspecific(thread_waiter_key, &thread_waiter);
    return &thread_waiter;
}

static void thread_waiter_exit(void *arg) { shim_waiter_close(arg); }

uint32_t shim_spin_slot(uint32_t slot, uint32_t mask)
{
    if (shim.spin_ns <= 0)
        return 0;
    int64_t end = shim_now_ns() + shim.spin_ns;
    do {
        for (int i = 0; i < 16; i++) {
            uint32_t ready = shim_slot_ready(slot) & mask;
            if (ready)
                return ready;
            cpu_relax();
        }
    } while (shim_now_ns() < end);
    return 0;
}

int shim_wait_slot(uint32_t slot, uint32_t mask, int64_t deadline)
{
    mask |= EPOLLERR | EPOLLHUP;
    if (shim_spin_slot(slot, mask))
        return 0;
    struct shim_waiter *sw = shim_thread_waiter();
    for (;;) {
        if (!shim_stack_alive(0)) {
            errno = ENETDOWN;
            return -1;
        }
        if (sw)
            shim_waiter_arm(sw);
        if (shim_slot_ready(slot) & mask) {
            if (sw)
                __atomic_store_n(&sw->w->armed, 0, __ATOMIC_RELEASE);
            return 0;
        }
        struct timespec left, slice = {0, 1000000};
        const struct timespec *tp = shim_remaining(deadline, &left);
        if (tp && tp->tv_sec == 0 && tp->tv_nsec == 0) {
            if (sw)
                __atomic_store_n(&sw->w->armed, 0, __ATOMIC_RELEASE);
            errno = EAGAIN;
            return -1;
        }
        if (!sw && (!tp || tp->tv_sec > 0 || tp->tv_nsec > slice.tv_nsec))
            tp = &slice; /* no waiter: nobody will wake us */
        struct pollfd fds[2] = {{.fd = shim.death_fd, .events = POLLIN}, {.fd = sw ? sw->efd : -1, .events = POLLIN}};
        int n = shim_real.ppoll(fds, 2, tp, NULL);
        int err = errno;
        if (sw)
            shim_waiter_settle(sw);
        if (fds[0].revents)
            shim_mark_stack_dead("death pipe");
        if (n < 0 && err == EINTR) {
            errno = EINTR;
            return -1;
        }
    }
}

/* ---- fork ---------------------------------------------------------------------- */

static void fork_adjust_references(int delta)
{
    int high = shim_fd_highest();
    for (int fd = 0; fd <= high; fd++) {
        uint64_t word = shim_fd_word(fd);
        if (shim_fd_kind_of(word) == SHIM_FD_STACK)
            __atomic_add_fetch(&shim_slot(shim_fd_payload(word))->refcnt, (uint32_t)delta, __ATOMIC_ACQ_REL);
    }
}

/* The child starts with no waiter of its own: the inherited one belongs to
 * the parent (same eventfd, same id). */
static void forget_thread_waiter_in_child(void)
{
    if (thread_waiter.id < 0)
        return;
    shim_fd_clear(thread_waiter.efd);
    shim_real.close(thread_waiter.efd);
    thread_waiter.id = -1;
    thread_waiter.efd = -1;
    thread_waiter.w = NULL;
    pthread_setspecific(thread_waiter_key, NULL);
}

pid_t fork(void)
{
    shim_ensure_init();
    if (!shim.active || shim_busy)
        return shim_real.fork();
    /* Every stack fd gains a holder in the child, as the kernel's open file
     * descriptions do; counted before the child can close any. */
    shim_fd_lock();
    fork_adjust_references(+1);
    pid_t pid = shim_real.fork();
    if (pid == 0) {
        forget_thread_waiter_in_child();
        shim_epoll_after_fork_child();
        SHIM_DEBUG("forked from %d", (int)getppid());
    } else if (pid < 0) {
        int err = errno;
        fork_adjust_references(-1);
        errno = err;
    }
    shim_fd_unlock();
    return pid;
}

/* The child of vfork may do anything a fork child may, so a fork serves. */
pid_t vfork(void) { return fork(); }
