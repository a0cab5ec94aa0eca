/*
 * Internal interface of the interposer (libmtcpshim_preload.so).
 *
 * The interposer keeps a program's file descriptor numbers real: a socket the
 * stack serves is an eventfd placeholder in the kernel's table, and an
 * fd-indexed table here says which slot of the shared region it names.
 * Everything not marked in that table goes to the kernel untouched.
 *
 * Files: shim_core.c (attach, fd table, own descriptors, logging, exit,
 * fork), shim_real.c (the real functions), shim_cmd.c (liveness, commands,
 * time), shim_wait.c (waiters, spinning, blocking on a slot),
 * shim_socket.c (socket calls and options), shim_io.c (data path),
 * shim_fd.c (close, dup, fcntl, ioctl), shim_epoll.c, shim_poll.c.
 */
#ifndef MTS_SHIM_H
#define MTS_SHIM_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>

#include "mts_shm.h"

#pragma GCC visibility push(hidden)

/* The next definitions of the interposed functions, resolved once with
 * dlsym(RTLD_NEXT).  Until then (and while dlsym itself runs, in case it
 * re-enters us through another interposer's malloc) each pointer holds a
 * direct system call, so no pointer is ever NULL. */
struct shim_real {
    int (*socket)(int, int, int);
    int (*bind)(int, const struct sockaddr *, socklen_t);
    int (*listen)(int, int);
    int (*accept)(int, struct sockaddr *, socklen_t *);
    int (*accept4)(int, struct sockaddr *, socklen_t *, int);
    int (*connect)(int, const struct sockaddr *, socklen_t);
    int (*shutdown)(int, int);
    int (*getsockname)(int, struct sockaddr *, socklen_t *);
    int (*getpeername)(int, struct sockaddr *, socklen_t *);
    int (*getsockopt)(int, int, int, void *, socklen_t *);
    int (*setsockopt)(int, int, int, const void *, socklen_t);
    ssize_t (*read)(int, void *, size_t);
    ssize_t (*readv)(int, const struct iovec *, int);
    ssize_t (*recv)(int, void *, size_t, int);
    ssize_t (*recvfrom)(int, void *, size_t, int, struct sockaddr *, socklen_t *);
    ssize_t (*recvmsg)(int, struct msghdr *, int);
    ssize_t (*write)(int, const void *, size_t);
    ssize_t (*writev)(int, const struct iovec *, int);
    ssize_t (*send)(int, const void *, size_t, int);
    ssize_t (*sendto)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);
    ssize_t (*sendmsg)(int, const struct msghdr *, int);
    int (*sendmmsg)(int, struct mmsghdr *, unsigned int, int);
    int (*fstat)(int, struct stat *);
    int (*__fxstat)(int, int, struct stat *);
    ssize_t (*splice)(int, loff_t *, int, loff_t *, size_t, unsigned int);
    ssize_t (*tee)(int, int, size_t, unsigned int);
    int (*recvmmsg)(int, struct mmsghdr *, unsigned int, int, struct timespec *);
    ssize_t (*sendfile)(int, int, off_t *, size_t);
    int (*close)(int);
    int (*close_range)(unsigned int, unsigned int, int);
    int (*dup)(int);
    int (*dup2)(int, int);
    int (*dup3)(int, int, int);
    int (*fcntl)(int, int, ...);
    int (*ioctl)(int, unsigned long, ...);
    int (*epoll_create)(int);
    int (*epoll_create1)(int);
    int (*epoll_ctl)(int, int, int, struct epoll_event *);
    int (*epoll_pwait)(int, struct epoll_event *, int, int, const sigset_t *);
    int (*epoll_pwait2)(int, struct epoll_event *, int, const struct timespec *, const sigset_t *);
    int (*ppoll)(struct pollfd *, nfds_t, const struct timespec *, const sigset_t *);
    int (*select)(int, fd_set *, fd_set *, fd_set *, struct timeval *);
    int (*pselect)(int, fd_set *, fd_set *, fd_set *, const struct timespec *, const sigset_t *);
    pid_t (*fork)(void);
};
extern struct shim_real shim_real;
/* Points shim_real at the next definitions (shim_real.c); until then it
 * holds direct system calls. */
void shim_resolve_real_functions(void);

struct shim_state {
    int active; /* attached to a valid region; otherwise everything passes through */
    int debug;
    struct mts_header *hdr;
    struct mts_geom geom; /* the layout, read once at attach */
    /* The inherited descriptors, moved to high numbers at attach (a control
     * socket and a wake eventfd per stack worker), and the fd table's memfd
     * (kept across exec: shim_core.c). */
    int shm_fd, death_fd, table_fd;
    int ctl_fd[MTS_MAX_WORKERS], wake_fd[MTS_MAX_WORKERS];
    int internal_fd_base; /* our own descriptors live at or above this number */
    int64_t spin_ns;      /* busy-wait before sleeping (MTCPSHIM_SPIN_US) */
    int stack_dead;       /* sticky: the death pipe fired or the stack stopped */
};
extern struct shim_state shim;

/* Attaches on first use; the constructor normally did it already. */
extern int shim_init_done;
void shim_init_slow(void);
static inline void shim_ensure_init(void)
{
    if (__builtin_expect(!__atomic_load_n(&shim_init_done, __ATOMIC_ACQUIRE), 0))
        shim_init_slow();
}

/* Non-zero while the interposer runs its own code on this thread: a call
 * that comes back into an interposed function then goes straight through. */
extern __thread int shim_busy __attribute__((tls_model("initial-exec")));

void shim_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#define SHIM_DEBUG(...)                                                                            \
    do {                                                                                           \
        if (__builtin_expect(shim.debug, 0))                                                       \
            shim_log(__VA_ARGS__);                                                                 \
    } while (0)

/* ---- the fd table ----------------------------------------------------- */

enum shim_fd_kind {
    SHIM_FD_KERNEL = 0,    /* not ours: pass through */
    SHIM_FD_CANDIDATE = 1, /* TCP socket still in the kernel, undecided; payload: SHIM_CANDIDATE_* */
    SHIM_FD_STACK = MTS_FD_STACK, /* placeholder of a stack socket; payload = slot id */
    SHIM_FD_EPOLL = 3,     /* epoll instance (shim_epoll.c keeps its state by fd) */
    SHIM_FD_INTERNAL = 4,  /* the interposer's own descriptor: close() pretends success */
};

/* A candidate's payload: the program chose a TCP_CONGESTION on the kernel's
 * socket, which the stack socket must keep (the kernel reads back its own
 * default otherwise, not necessarily the stack's). */
#define SHIM_CANDIDATE_CONGESTION 1u
/* ... and it is AF_INET6: ours only as a dual-stack socket whose address is
 * `::` or IPv4-mapped (see shim_socket.c). */
#define SHIM_CANDIDATE_INET6 2u

/* One 64-bit word per fd, so a lookup is a single atomic load, laid out as
 * mtcpshim_abi.h says (MTS_FD_*; slot ids stay below MTS_MAX_SLOTS): a
 * stack socket's word keeps its slot's generation, so a descriptor whose
 * slot was handed to another socket since (the program marked it free under
 * us) must not act on that socket.  The table lives in a memfd the stack
 * holds too (MTS_CTL_REGISTER_PROCESS), each process its own. */
extern uint64_t *shim_fd_table;
extern uint32_t shim_fd_capacity;

static inline uint64_t shim_fd_word(int fd)
{
    if ((unsigned)fd >= shim_fd_capacity)
        return 0;
    return __atomic_load_n(&shim_fd_table[fd], __ATOMIC_ACQUIRE);
}
static inline enum shim_fd_kind shim_fd_kind_of(uint64_t word)
{
    return (enum shim_fd_kind)(word >> MTS_FD_KIND_SHIFT & 0xFF);
}
static inline uint32_t shim_fd_payload(uint64_t word) { return (uint32_t)word & MTS_FD_PAYLOAD_MASK; }
static inline uint32_t shim_fd_generation(uint64_t word) { return (uint32_t)(word >> 32); }
_Static_assert(MTS_MAX_SLOTS <= 1 << 24, "slot ids fit an fd word's payload");

/* Returns 1 and the slot id if fd is a stack socket of an attached shim. */
static inline int shim_stack_fd(int fd, uint32_t *slot_id)
{
    shim_ensure_init();
    if (shim_busy)
        return 0;
    uint64_t word = shim_fd_word(fd);
    if (shim_fd_kind_of(word) != SHIM_FD_STACK)
        return 0;
    *slot_id = shim_fd_payload(word);
    return 1;
}

void shim_fd_set(int fd, enum shim_fd_kind kind, uint32_t payload);
void shim_fd_set_stack(int fd, uint32_t slot, uint32_t generation);
void shim_fd_clear(int fd);
/* Serialises compound updates (close, dup, fork) of the table. */
void shim_fd_lock(void);
void shim_fd_unlock(void);
/* Highest fd number ever marked, bounds table scans. */
int shim_fd_highest(void);

/* An internal descriptor the program is about to overwrite (dup2 target):
 * move it out of the way first.  Returns 0, or -1 if it could not. */
int shim_internal_relocate(int fd);
/* Moves a descriptor of ours to the internal range (>= internal_fd_base). */
int shim_internal_fd(int fd, int cloexec);

static inline struct mts_slot *shim_slot(uint32_t id) { return mts_slot_at(&shim.geom, id); }

/* ---- stack liveness and commands --------------------------------------- */

/* 0 once the stack stopped or died (sticky).  check_pipe also polls the
 * death pipe (a system call). */
int shim_stack_alive(int check_pipe);
void shim_mark_stack_dead(const char *why);
void shim_wake_stack(uint32_t worker);
/* The stack worker of the core this thread runs on: where its new sockets
 * go, and whose accept queue it looks at first. */
uint32_t shim_current_worker(void);
/* Queues an asynchronous command to the slot's worker.  Returns 0, or -1
 * with errno. */
int shim_cmd_async(uint32_t op, uint32_t slot, uint64_t arg);
/* Queues MTS_OP_WAITER_FREE to every worker. */
int shim_cmd_waiter_free(uint32_t waiter);
/* Runs a synchronous command on the slot's worker, or on `worker`; returns
 * its result, 0 or -errno. */
int shim_cmd_sync(uint32_t op, uint32_t slot, uint64_t arg);
int shim_cmd_sync_on(uint32_t worker, uint32_t op, uint32_t slot, uint64_t arg);
/* Sends descriptors to a worker over its CTL_FD (a struct mts_ctl_msg with
 * SCM_RIGHTS) and counts it in the worker's words.  0, or -1 with errno. */
int shim_ctl_send_fd(uint32_t worker, uint32_t op, uint32_t id, uint64_t arg, int fd);
int shim_ctl_send_fds(uint32_t worker, uint32_t op, uint32_t id, uint64_t arg, const int *fds, unsigned count);
/* The same message to every worker. */
int shim_ctl_send_all(uint32_t op, uint32_t id, uint64_t arg, const int *fds, unsigned count);

/* The application drops one reference; the last one closes the socket. */
void shim_slot_unref(uint32_t slot, uint32_t generation);
/* Whether a stack fd's word still names its slot's socket. */
int shim_fd_current(uint64_t word);

/* ---- stack sockets over AF_UNIX (shim_rights.c) -------------------------- */

/* sendmsg on a kernel socket whose message carries descriptors. */
ssize_t shim_send_rights(int fd, const struct msghdr *msg, int flags);
/* After a kernel recvmsg with control data: the stack sockets received. */
void shim_adopt_rights(const struct msghdr *msg);

/* ---- waiting ------------------------------------------------------------ */

struct shim_waiter {
    int32_t id; /* -1: none */
    int efd;
    struct mts_waiter *w;
};

/* Allocates and registers a waiter with the stack.  0, or -1 (none free,
 * stack gone): callers then sleep in short slices instead. */
int shim_waiter_open(struct shim_waiter *sw);
void shim_waiter_close(struct shim_waiter *sw);
/* Arms: from now on the stack writes the eventfd at its next change. */
void shim_waiter_arm(struct shim_waiter *sw);
/* Disarms and drains the eventfd. */
void shim_waiter_settle(struct shim_waiter *sw);
/* This thread's waiter for blocking calls and poll/select, or NULL. */
struct shim_waiter *shim_thread_waiter(void);
/* At attach: the table of waiters by id and the key that closes a thread's
 * waiter when it exits.  0, or -1 out of memory. */
int shim_waiters_init(void);
/* `fd` is a waiter's eventfd that the program wants: move it elsewhere.
 * 1 moved, 0 not a waiter's, -1 with errno. */
int shim_waiter_relocate(int fd);
/* In a fork child: this thread's waiter is the parent's, forget it. */
void shim_waiter_forget_in_child(void);

/* Waits on a futex or the death pipe are cut into slices this long so a
 * stack that stopped without closing its pipe is noticed too. */
#define SHIM_LIVENESS_SLICE_MS 100

static inline void shim_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

/* Monotonic deadlines in nanoseconds; SHIM_FOREVER = no deadline. */
#define SHIM_FOREVER INT64_MAX
int64_t shim_now_ns(void);
int64_t shim_deadline_ms(int64_t timeout_ms);
int64_t shim_deadline_ts(const struct timespec *ts);
/* Time left until a deadline for the real ppoll: NULL for none. */
const struct timespec *shim_remaining(int64_t deadline, struct timespec *out);

/* Spins for the configured time while the slot is not ready. */
uint32_t shim_spin_slot(uint32_t slot, uint32_t mask);
/* Blocks until mts_slot_poll(slot) & (mask | EPOLLERR | EPOLLHUP).  Returns
 * 0, or -1 with errno EAGAIN (deadline passed), EINTR or ENETDOWN. */
int shim_wait_slot(uint32_t slot, uint32_t mask, int64_t deadline);
/* The interposed call that waited in shim_wait_slot is over: the socket it
 * held while asleep is let go (closed, if another thread closed its last
 * descriptor meanwhile). */
void shim_call_done(void);

/* Readiness of a stack socket as seen by epoll/poll; a dead stack makes
 * every socket report an error and hang-up so the program notices. */
static inline uint32_t shim_slot_ready(uint32_t slot)
{
    if (__builtin_expect(shim.stack_dead, 0))
        return EPOLLERR | EPOLLHUP | EPOLLIN | EPOLLOUT | EPOLLRDNORM | EPOLLWRNORM;
    return mts_slot_poll(&shim.geom, slot);
}

/* The system call itself, as syscall(2) makes it, without going through
 * our own syscall() (shim_syscall.c), which the program's calls reach. */
long shim_raw_syscall(long number, ...);

/* ---- cross-file hooks ---------------------------------------------------- */

/* A stack fd is being closed: forget it in every epoll instance. */
void shim_epoll_forget_fd(int fd);
/* An epoll fd is closed, or duplicated (from_fd's instance now also has
 * the number to_fd). */
void shim_epoll_unref(int fd);
void shim_epoll_ref(int from_fd, int to_fd);
/* After fork in the child. */
void shim_epoll_after_fork_child(void);
/* epfd, if an epoll set of ours, is inside another wait (epoll, poll,
 * select): from now on its own fd is readable while a stack fd in it is. */
void shim_epoll_nest(int epfd);

/* Drops the fd's table entry and what it held (slot reference, epoll
 * instance), after the real close or dup2 over it succeeded. */
void shim_fd_release(int fd, uint64_t old_word);

/* The data path, shared by read/recv/... and write/send/... */
ssize_t shim_stack_recv(uint32_t slot, const struct iovec *iov, int iovcnt, int flags);
ssize_t shim_stack_send(uint32_t slot, const struct iovec *iov, int iovcnt, int flags);

/* poll over a mixed set; used by poll, ppoll, select and pselect. */
int shim_poll_mixed(struct pollfd *fds, nfds_t nfds, int64_t deadline, const sigset_t *sigmask);

#pragma GCC visibility pop

#endif
