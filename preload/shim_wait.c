/*
 * Waiting for the stack: a thread that must block owns a waiter, an eventfd
 * registered with the stack once; it arms the waiter, re-checks, and sleeps
 * on the eventfd and the death pipe.  Before sleeping it spins briefly.
 */
#include "shim.h"

#include <fcntl.h>
#include <stdlib.h>
#include <sys/eventfd.h>

/* Waiters by id, so a waiter whose eventfd the program wants to overwrite
 * can be moved. */
static struct shim_waiter **waiters_by_id;
static pthread_key_t thread_waiter_key;
static __thread struct shim_waiter thread_waiter __attribute__((tls_model("initial-exec"))) = {.id = -1, .efd = -1};

static void thread_waiter_exit(void *arg) { shim_waiter_close(arg); }

int shim_waiters_init(void)
{
    waiters_by_id = calloc(shim.geom.nwaiters, sizeof(*waiters_by_id));
    if (!waiters_by_id || pthread_key_create(&thread_waiter_key, thread_waiter_exit) != 0)
        return -1;
    return 0;
}

int shim_waiter_relocate(int fd)
{
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
        return 1;
    }
    return 0;
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
    if (efd < 0 || shim_ctl_send_all(MTS_CTL_REGISTER_WAITER, (uint32_t)id, 0, &efd, 1) < 0) {
        SHIM_DEBUG("waiter %d not registered: %s", id, strerror(errno));
        if (efd >= 0)
            shim_real.close(efd);
        mts_waiter_free(&shim.geom, (uint32_t)id, MTS_MAX_WORKERS); /* no worker holds it for good */
        return -1;
    }
    /* Every worker wakes it: each must hold the eventfd before we sleep. */
    uint32_t all = (uint32_t)((1ull << shim.geom.nworkers) - 1), seen;
    for (uint32_t worker = 0; worker < shim.geom.nworkers; worker++)
        shim_wake_stack(worker);
    while ((seen = __atomic_load_n(&w->registered, __ATOMIC_ACQUIRE)) != all) {
        mts_futex_wait(&w->registered, seen, SHIM_LIVENESS_SLICE_MS);
        if (__atomic_load_n(&w->registered, __ATOMIC_ACQUIRE) != all && !shim_stack_alive(1)) {
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
    if (shim_cmd_waiter_free((uint32_t)sw->id) < 0)
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

struct shim_waiter *shim_thread_waiter(void)
{
    if (thread_waiter.id >= 0)
        return &thread_waiter;
    if (shim_waiter_open(&thread_waiter) < 0)
        return NULL;
    pthread_setspecific(thread_waiter_key, &thread_waiter);
    return &thread_waiter;
}

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
            shim_cpu_relax();
        }
    } while (shim_now_ns() < end);
    return 0;
}

/* A thread asleep on a socket holds it until its call returns, as the
 * kernel's call holds its file: another thread's close of the last
 * descriptor meanwhile closes the socket only then (shim_call_done). */
static __thread struct {
    uint32_t slot, generation;
    int held;
} call_hold;

static int hold_for_call(uint32_t slot)
{
    struct mts_slot *s = shim_slot(slot);
    uint32_t generation = __atomic_load_n(&s->generation, __ATOMIC_ACQUIRE);
    uint32_t refs = __atomic_load_n(&s->refcnt, __ATOMIC_ACQUIRE);
    do {
        if (!refs) { /* its last descriptor is closed already */
            errno = EBADF;
            return -1;
        }
    } while (!__atomic_compare_exchange_n(&s->refcnt, &refs, refs + 1, 1, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE));
    uint32_t now = __atomic_load_n(&s->generation, __ATOMIC_ACQUIRE);
    if (now != generation) { /* freed and handed out between the two reads: not ours to hold */
        shim_slot_unref(slot, now);
        errno = EBADF;
        return -1;
    }
    call_hold.slot = slot;
    call_hold.generation = generation;
    call_hold.held = 1;
    return 0;
}

void shim_call_done(void)
{
    if (!call_hold.held)
        return;
    int err = errno;
    call_hold.held = 0;
    shim_slot_unref(call_hold.slot, call_hold.generation);
    errno = err;
}

int shim_wait_slot(uint32_t slot, uint32_t mask, int64_t deadline)
{
    mask |= EPOLLERR | EPOLLHUP;
    if (shim_spin_slot(slot, mask))
        return 0;
    if (!call_hold.held && hold_for_call(slot) < 0)
        return -1;
    struct shim_waiter *sw = shim_thread_waiter();
    if (sw)
        mts_slot_interest_add(&shim.geom, slot, (uint32_t)sw->id);
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

/* The child's inherited waiter belongs to the parent (same eventfd, same id). */
void shim_waiter_forget_in_child(void)
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
