/*
 * Talking to the stack: whether it still serves, commands through the
 * shared queue (asynchronous, or synchronous with a completion word), and
 * the clock and deadlines the blocking calls share.
 */
#include "shim.h"

#include <sched.h>

/* A full command queue: retry for about a second before giving up. */
#define PUSH_SPIN_ATTEMPTS 200
#define PUSH_SLEEP_ATTEMPTS 20000
#define PUSH_SLEEP_NS 50000

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

void shim_wake_stack(uint32_t worker)
{
    /* Our queue write must be visible before we read the flag the worker
     * sets before it re-checks its queue (store-load ordering). */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(&mts_worker_at(&shim.geom, worker)->sleeping, __ATOMIC_RELAXED)) {
        uint64_t one = 1;
        shim_real.write(shim.wake_fd[worker % shim.geom.nworkers], &one, sizeof(one));
    }
}

uint32_t shim_current_worker(void)
{
    uint32_t n = shim.geom.nworkers;
    if (n == 1)
        return 0;
    int cpu = sched_getcpu();
    for (uint32_t w = 0; w < n; w++)
        if (__atomic_load_n(&mts_worker_at(&shim.geom, w)->cpu, __ATOMIC_RELAXED) == cpu)
            return w;
    return cpu < 0 ? 0 : (uint32_t)cpu % n;
}

static void sleep_ns(long ns)
{
    struct timespec ts = {0, ns};
    nanosleep(&ts, NULL);
}

static int push_command(uint32_t worker, uint32_t op, uint32_t slot, uint32_t generation, uint64_t arg)
{
    for (int attempt = 0; attempt < PUSH_SPIN_ATTEMPTS + PUSH_SLEEP_ATTEMPTS; attempt++) {
        if (mts_cmd_push(&shim.geom, worker, op, slot, generation, arg) == 0) {
            shim_wake_stack(worker);
            return 0;
        }
        shim_wake_stack(worker);
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

/* The generation a command for `slot` carries: the stack drops it if the
 * slot is handed out again before the command is run. */
static uint32_t generation_of(uint32_t op, uint32_t slot)
{
    return op == MTS_OP_WAITER_FREE ? 0 : __atomic_load_n(&shim_slot(slot)->generation, __ATOMIC_RELAXED);
}

static int cmd_async(uint32_t worker, uint32_t op, uint32_t slot, uint32_t generation, uint64_t arg)
{
    if (!shim_stack_alive(0)) {
        errno = ENETDOWN;
        return -1;
    }
    return push_command(worker, op, slot, generation, arg);
}

int shim_cmd_async(uint32_t op, uint32_t slot, uint64_t arg)
{
    return cmd_async(mts_slot_worker(&shim.geom, slot), op, slot, generation_of(op, slot), arg);
}

int shim_cmd_waiter_free(uint32_t waiter)
{
    int result = 0;
    for (uint32_t w = 0; w < shim.geom.nworkers; w++)
        result |= cmd_async(w, MTS_OP_WAITER_FREE, waiter, 0, 0);
    return result;
}

/* The stack's answer; -EBADF if the slot was handed to another socket
 * meanwhile (the program marked it free under us: the stack drops the
 * command as queued for an earlier holder). */
static int await_completion(struct mts_slot *s, uint32_t generation)
{
    int64_t spin_end = shim_now_ns() + shim.spin_ns;
    while (!__atomic_load_n(&s->op_done, __ATOMIC_ACQUIRE) && shim_now_ns() < spin_end)
        for (int i = 0; i < 32; i++)
            shim_cpu_relax();
    while (!__atomic_load_n(&s->op_done, __ATOMIC_ACQUIRE)) {
        mts_futex_wait(&s->op_done, 0, SHIM_LIVENESS_SLICE_MS);
        if (__atomic_load_n(&s->op_done, __ATOMIC_ACQUIRE))
            break;
        if (!shim_stack_alive(1))
            return -ENETDOWN;
        if (__atomic_load_n(&s->generation, __ATOMIC_RELAXED) != generation)
            return -EBADF;
    }
    return s->op_result;
}

int shim_ctl_send_fds(uint32_t worker, uint32_t op, uint32_t id, uint64_t arg, const int *fds, unsigned count)
{
    struct mts_ctl_msg msg = {.op = op, .id = id, .arg = arg};
    struct iovec iov = {.iov_base = &msg, .iov_len = sizeof(msg)};
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(2 * sizeof(int))];
    } control;
    if (count < 1 || count > 2) {
        errno = EINVAL;
        return -1;
    }
    memset(&control, 0, sizeof(control));
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                        .msg_controllen = CMSG_SPACE(count * sizeof(int))};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(count * sizeof(int));
    memcpy(CMSG_DATA(cm), fds, count * sizeof(int));
    ssize_t sent;
    do
        sent = shim_real.sendmsg(shim.ctl_fd[worker % shim.geom.nworkers], &mh, MSG_NOSIGNAL);
    while (sent < 0 && errno == EINTR);
    if (sent != (ssize_t)sizeof(msg))
        return -1;
    mts_ctl_post(&shim.geom, worker);
    return 0;
}

int shim_ctl_send_fd(uint32_t worker, uint32_t op, uint32_t id, uint64_t arg, int fd)
{
    return shim_ctl_send_fds(worker, op, id, arg, &fd, 1);
}

int shim_ctl_send_all(uint32_t op, uint32_t id, uint64_t arg, const int *fds, unsigned count)
{
    for (uint32_t w = 0; w < shim.geom.nworkers; w++)
        if (shim_ctl_send_fds(w, op, id, arg, fds, count) < 0)
            return -1;
    return 0;
}

int shim_cmd_sync(uint32_t op, uint32_t slot, uint64_t arg)
{
    return shim_cmd_sync_on(mts_slot_worker(&shim.geom, slot), op, slot, arg);
}

int shim_cmd_sync_on(uint32_t worker, uint32_t op, uint32_t slot, uint64_t arg)
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
        uint32_t generation = generation_of(op, slot);
        result = push_command(worker, op, slot, generation, arg) < 0 ? -errno : await_completion(s, generation);
    }
    __atomic_store_n(&s->op_lock, 0, __ATOMIC_RELEASE);
    return result;
}

void shim_slot_unref(uint32_t slot, uint32_t generation)
{
    struct mts_slot *s = shim_slot(slot);
    if (__atomic_load_n(&s->generation, __ATOMIC_RELAXED) != generation) {
        SHIM_DEBUG("slot %u: handed to another socket since, nothing of ours to let go", slot);
        return;
    }
    if (__atomic_sub_fetch(&s->refcnt, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    /* SO_LINGER on with a zero timeout: close aborts with a reset. */
    uint64_t abort = s->opt_linger_on && s->opt_linger_sec == 0;
    SHIM_DEBUG("slot %u: last reference gone, %s", slot, abort ? "abort" : "close");
    uint32_t owner = mts_slot_worker(&shim.geom, slot);
    if (cmd_async(owner, MTS_OP_CLOSE, slot, generation, abort) < 0)
        SHIM_DEBUG("slot %u: close not delivered: %s", slot, strerror(errno));
    /* A listener's siblings close too, each in its worker's queue ahead of
     * what this thread queues next there: a listen() on the same port right
     * after must not find the old sibling holding it.  (The owner tells the
     * workers as well, for closes that never pass here: a killed process.) */
    if (shim.geom.nworkers > 1 && __atomic_load_n(&s->state, __ATOMIC_ACQUIRE) == MTS_ST_LISTENING)
        for (uint32_t worker = 0; worker < shim.geom.nworkers; worker++)
            if (worker != owner && cmd_async(worker, MTS_OP_CLOSE, slot, generation, abort) < 0)
                SHIM_DEBUG("slot %u: close not delivered to worker %u: %s", slot, worker, strerror(errno));
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
