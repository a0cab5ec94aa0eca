/*
 * epoll over stack sockets and kernel fds together.
 *
 * The program's epoll fd stays a real kernel epoll: kernel fds live in it as
 * usual.  Stack fds live in a list here; epoll_wait scans them (no system
 * call when some are ready) and otherwise sleeps in the real epoll_pwait, in
 * whose set the instance keeps its waiter's eventfd and the death pipe, so
 * timeouts, signal masks and EINTR stay the kernel's.
 */
#include "shim.h"

#include <stdlib.h>
#include <sys/mman.h>

/* data.u64 of our own fds in the real set; a program would have to pick
 * these exact values to be confused with them. */
#define WAKE_TAG 0x6d7473686d2d776bULL  /* "mtshm-wk" */
#define DEATH_TAG 0x6d7473686d2d6464ULL /* "mtshm-dd" */
#define EP_MAX_EVENTS ((int)(INT_MAX / sizeof(struct epoll_event)))

struct epoll_entry {
    int fd;
    uint32_t slot;
    uint32_t events;    /* what the program asked for, flags included */
    uint32_t seen_seq;  /* EPOLLET: slot event_seq at the last report */
    epoll_data_t data;
    uint8_t disabled;   /* EPOLLONESHOT fired; EPOLL_CTL_MOD re-enables */
    uint8_t death_told; /* EPOLLET: the dead stack was reported once */
};

struct epoll_instance {
    struct epoll_instance *next; /* every instance of this process */
    uint32_t lock;
    uint32_t refs;       /* fd numbers naming this instance */
    uint32_t kernel_fds; /* kernel fds added (not decremented by implicit removal) */
    uint8_t stack_ready; /* the death pipe is in the real set */
    uint8_t waiter_in_set;
    struct shim_waiter waiter;
    struct epoll_entry *entries;
    uint32_t count, capacity;
    uint32_t *index_of_fd; /* entry index + 1, 0 = absent */
    uint32_t index_capacity;
    uint32_t scan_start; /* round robin, so no stack fd starves */
};

/* Registry, changed under the fd table lock. */
static struct epoll_instance **instance_by_fd;
static struct epoll_instance *all_instances;

static int fail(int err)
{
    errno = err;
    return -1;
}

static void instance_lock(struct epoll_instance *inst)
{
    uint32_t expected = 0;
    while (!__atomic_compare_exchange_n(&inst->lock, &expected, 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
        expected = 0;
        sched_yield();
    }
}

static void instance_unlock(struct epoll_instance *inst) { __atomic_store_n(&inst->lock, 0, __ATOMIC_RELEASE); }

static struct epoll_instance *instance_of(int epfd)
{
    if (!instance_by_fd || shim_fd_kind_of(shim_fd_word(epfd)) != SHIM_FD_EPOLL)
        return NULL;
    return __atomic_load_n(&instance_by_fd[epfd], __ATOMIC_ACQUIRE);
}

/* Starts tracking epfd.  kernel_fds: what we know of its kernel fds (an
 * instance adopted after the fact may have some). */
static struct epoll_instance *track(int epfd, uint32_t kernel_fds)
{
    if ((unsigned)epfd >= shim_fd_capacity)
        return NULL;
    struct epoll_instance *inst = calloc(1, sizeof(*inst));
    if (!inst)
        return NULL;
    inst->refs = 1;
    inst->kernel_fds = kernel_fds;
    inst->waiter.id = -1;
    inst->waiter.efd = -1;
    shim_fd_lock();
    if (!instance_by_fd) {
        void *table = mmap(NULL, (size_t)shim_fd_capacity * sizeof(*instance_by_fd), PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (table == MAP_FAILED) {
            shim_fd_unlock();
            free(inst);
            return NULL;
        }
        instance_by_fd = table;
    }
    inst->next = all_instances;
    all_instances = inst;
    __atomic_store_n(&instance_by_fd[epfd], inst, __ATOMIC_RELEASE);
    shim_fd_set(epfd, SHIM_FD_EPOLL, 0);
    shim_fd_unlock();
    return inst;
}

/* A new epoll fd from the kernel: tracked while the shim is active, passed on either way. */
static int track_created(int epfd)
{
    if (epfd >= 0 && shim.active && !shim_busy && !track(epfd, 0))
        shim_fd_clear(epfd);
    return epfd;
}

int epoll_create1(int flags)
{
    shim_ensure_init();
    return track_created(shim_real.epoll_create1(flags));
}

int epoll_create(int size)
{
    shim_ensure_init();
    return track_created(shim_real.epoll_create(size));
}

void shim_epoll_ref(int from_fd, int to_fd)
{
    struct epoll_instance *inst = instance_by_fd ? instance_by_fd[from_fd] : NULL;
    if (!inst || (unsigned)to_fd >= shim_fd_capacity)
        return;
    inst->refs++;
    __atomic_store_n(&instance_by_fd[to_fd], inst, __ATOMIC_RELEASE);
}

void shim_epoll_unref(int fd)
{
    struct epoll_instance *inst = instance_by_fd ? instance_by_fd[fd] : NULL;
    if (!inst)
        return;
    __atomic_store_n(&instance_by_fd[fd], NULL, __ATOMIC_RELEASE);
    if (--inst->refs)
        return;
    for (struct epoll_instance **link = &all_instances; *link; link = &(*link)->next)
        if (*link == inst) {
            *link = inst->next;
            break;
        }
    shim_waiter_close(&inst->waiter);
    free(inst->entries);
    free(inst->index_of_fd);
    free(inst);
}

/* ---- the stack fd list ------------------------------------------------------- */

static struct epoll_entry *find(struct epoll_instance *inst, int fd)
{
    if ((unsigned)fd >= inst->index_capacity || !inst->index_of_fd[fd])
        return NULL;
    return &inst->entries[inst->index_of_fd[fd] - 1];
}

/* EPOLLET at ADD and MOD, as in the kernel: an fd ready now is reported
 * once (a sequence number unlike any seen), else only after the stack's next
 * publication.  Always reporting once would report twice data that arrives
 * later: when it is in the ring, and again when the stack publishes it.  The
 * sequence number is read first, so a publication in between is not lost. */
static uint32_t initial_seen_seq(uint32_t slot, uint32_t events)
{
    uint32_t seq = __atomic_load_n(&shim_slot(slot)->event_seq, __ATOMIC_ACQUIRE);
    return shim_slot_ready(slot) & (events | EPOLLERR | EPOLLHUP) ? seq - 1 : seq;
}

static int append(struct epoll_instance *inst, int fd, uint32_t slot, const struct epoll_event *event)
{
    if ((unsigned)fd >= inst->index_capacity) {
        uint32_t capacity = inst->index_capacity ? inst->index_capacity : 64;
        while (capacity <= (unsigned)fd)
            capacity *= 2;
        uint32_t *index = realloc(inst->index_of_fd, capacity * sizeof(*index));
        if (!index)
            return fail(ENOMEM);
        memset(index + inst->index_capacity, 0, (capacity - inst->index_capacity) * sizeof(*index));
        inst->index_of_fd = index;
        inst->index_capacity = capacity;
    }
    if (inst->count == inst->capacity) {
        uint32_t capacity = inst->capacity ? inst->capacity * 2 : 16;
        struct epoll_entry *entries = realloc(inst->entries, capacity * sizeof(*entries));
        if (!entries)
            return fail(ENOMEM);
        inst->entries = entries;
        inst->capacity = capacity;
    }
    struct epoll_entry *e = &inst->entries[inst->count];
    memset(e, 0, sizeof(*e));
    e->fd = fd;
    e->slot = slot;
    e->events = event->events;
    e->data = event->data;
    e->seen_seq = initial_seen_seq(slot, event->events);
    __atomic_store_n(&inst->count, inst->count + 1, __ATOMIC_RELEASE);
    inst->index_of_fd[fd] = inst->count;
    return 0;
}

static void remove_entry(struct epoll_instance *inst, struct epoll_entry *e)
{
    uint32_t index = (uint32_t)(e - inst->entries), last = inst->count - 1;
    inst->index_of_fd[e->fd] = 0;
    if (index != last) {
        *e = inst->entries[last];
        inst->index_of_fd[e->fd] = index + 1;
    }
    __atomic_store_n(&inst->count, last, __ATOMIC_RELEASE);
}

void shim_epoll_forget_fd(int fd)
{
    shim_fd_lock();
    for (struct epoll_instance *inst = all_instances; inst; inst = inst->next) {
        instance_lock(inst);
        struct epoll_entry *e = find(inst, fd);
        if (e)
            remove_entry(inst, e);
        instance_unlock(inst);
    }
    shim_fd_unlock();
}

void shim_epoll_after_fork_child(void)
{
    for (struct epoll_instance *inst = all_instances; inst; inst = inst->next) {
        inst->lock = 0; /* a thread that held it does not exist here */
        if (inst->waiter.id < 0)
            continue;
        /* The waiter is the parent's; ours comes at the next sleep. */
        shim_fd_clear(inst->waiter.efd);
        shim_real.close(inst->waiter.efd);
        inst->waiter.id = -1;
        inst->waiter.efd = -1;
        inst->waiter.w = NULL;
        inst->waiter_in_set = 0;
    }
}

/* Puts the death pipe in the real set once the instance holds a stack fd, so
 * a sleeping epoll_wait hears at once when the stack dies. */
static int prepare_for_stack(struct epoll_instance *inst, int epfd)
{
    if (inst->stack_ready)
        return 0;
    struct epoll_event death = {.events = EPOLLIN, .data.u64 = DEATH_TAG};
    if (shim_real.epoll_ctl(epfd, EPOLL_CTL_ADD, shim.death_fd, &death) < 0 && errno != EEXIST)
        return -1;
    inst->stack_ready = 1;
    return 0;
}

/* The waiter's eventfd goes in edge-triggered: each stack wakeup is one
 * event, and a waiter of another process sharing this epoll (after fork)
 * cannot keep it spinning. */
static void ensure_waiter(struct epoll_instance *inst, int epfd)
{
    if (inst->waiter_in_set)
        return;
    if (inst->waiter.id < 0 && shim_waiter_open(&inst->waiter) < 0)
        return;
    struct epoll_event wake = {.events = EPOLLIN | EPOLLET, .data.u64 = WAKE_TAG};
    if (shim_real.epoll_ctl(epfd, EPOLL_CTL_ADD, inst->waiter.efd, &wake) < 0 && errno != EEXIST) {
        SHIM_DEBUG("epoll %d: waiter not added: %s", epfd, strerror(errno));
        shim_waiter_close(&inst->waiter);
        return;
    }
    inst->waiter_in_set = 1;
}

int epoll_ctl(int epfd, int op, int fd, struct epoll_event *event)
{
    uint32_t slot;
    if (!shim_stack_fd(fd, &slot)) {
        int result = shim_real.epoll_ctl(epfd, op, fd, event);
        struct epoll_instance *inst = result == 0 && shim.active && !shim_busy ? instance_of(epfd) : NULL;
        if (inst && op == EPOLL_CTL_ADD)
            __atomic_add_fetch(&inst->kernel_fds, 1, __ATOMIC_RELAXED);
        else if (inst && op == EPOLL_CTL_DEL && __atomic_load_n(&inst->kernel_fds, __ATOMIC_RELAXED))
            __atomic_sub_fetch(&inst->kernel_fds, 1, __ATOMIC_RELAXED);
        return result;
    }
    if (epfd == fd)
        return fail(EINVAL);
    if (op != EPOLL_CTL_DEL && !event)
        return fail(EFAULT);
    struct epoll_instance *inst = instance_of(epfd);
    if (!inst && !(inst = track(epfd, 1))) /* created before we attached */
        return fail(ENOMEM);
    if (prepare_for_stack(inst, epfd) < 0)
        return -1;
    instance_lock(inst);
    struct epoll_entry *e = find(inst, fd);
    int result = 0;
    switch (op) {
    case EPOLL_CTL_ADD:
        result = e ? fail(EEXIST) : append(inst, fd, slot, event);
        break;
    case EPOLL_CTL_MOD:
        if (!e) {
            result = fail(ENOENT);
            break;
        }
        e->events = event->events;
        e->data = event->data;
        e->disabled = 0;
        e->seen_seq = initial_seen_seq(slot, event->events);
        break;
    case EPOLL_CTL_DEL:
        if (e)
            remove_entry(inst, e);
        else
            result = fail(ENOENT);
        break;
    default:
        result = fail(EINVAL);
        break;
    }
    instance_unlock(inst);
    SHIM_DEBUG("epoll %d: op %d fd %d (slot %u) events %#x -> %d", epfd, op, fd, slot,
               event ? event->events : 0, result);
    return result;
}

/* ---- waiting ----------------------------------------------------------------- */

/* Reports the ready stack fds, at most max. */
static int scan(struct epoll_instance *inst, struct epoll_event *out, int max)
{
    if (!__atomic_load_n(&inst->count, __ATOMIC_ACQUIRE) || max <= 0)
        return 0;
    instance_lock(inst);
    uint32_t count = inst->count, index = inst->scan_start < count ? inst->scan_start : 0;
    int dead = __atomic_load_n(&shim.stack_dead, __ATOMIC_ACQUIRE), found = 0;
    for (uint32_t i = 0; i < count && found < max; i++, index = index + 1 == count ? 0 : index + 1) {
        struct epoll_entry *e = &inst->entries[index];
        if (e->disabled)
            continue;
        int edge = (e->events & EPOLLET) != 0;
        uint32_t seq = __atomic_load_n(&shim_slot(e->slot)->event_seq, __ATOMIC_ACQUIRE);
        if (edge && !dead && seq == e->seen_seq)
            continue;
        uint32_t ready = shim_slot_ready(e->slot) & (e->events | EPOLLERR | EPOLLHUP);
        if (!ready)
            continue;
        if (edge) {
            if (dead && e->death_told)
                continue;
            e->death_told = (uint8_t)dead;
            e->seen_seq = seq;
        }
        if (e->events & EPOLLONESHOT)
            e->disabled = 1;
        out[found].events = ready;
        out[found].data = e->data;
        found++;
        inst->scan_start = index + 1;
    }
    instance_unlock(inst);
    return found;
}

/* The real epoll_pwait, minus our own events (waiter, death pipe), which
 * it handles.  Returns the program's events or -1. */
static int kernel_wait(struct epoll_instance *inst, int epfd, struct epoll_event *events, int max, int timeout_ms,
                       const sigset_t *sigmask)
{
    int n = shim_real.epoll_pwait(epfd, events, max, timeout_ms, sigmask);
    if (n <= 0)
        return n;
    int kept = 0;
    for (int i = 0; i < n; i++) {
        if (events[i].data.u64 == WAKE_TAG) {
            if (inst->waiter.id >= 0)
                shim_waiter_settle(&inst->waiter);
        } else if (events[i].data.u64 == DEATH_TAG) {
            shim_mark_stack_dead("death pipe");
            /* Level-triggered and readable for good: out of the set. */
            shim_real.epoll_ctl(epfd, EPOLL_CTL_DEL, shim.death_fd, NULL);
            inst->stack_ready = 0;
        } else {
            events[kept++] = events[i];
        }
    }
    return kept;
}

/* Stack events were found: kernel fds that are ready too join them. */
static int with_kernel_events(struct epoll_instance *inst, int epfd, struct epoll_event *events, int max, int found)
{
    if (found < max && __atomic_load_n(&inst->kernel_fds, __ATOMIC_RELAXED)) {
        int more = kernel_wait(inst, epfd, events + found, max - found, 0, NULL);
        if (more > 0)
            found += more;
    }
    return found;
}

static int ms_until(int64_t deadline)
{
    if (deadline == SHIM_FOREVER)
        return -1;
    int64_t left = deadline - shim_now_ns();
    if (left <= 0)
        return 0;
    int64_t ms = (left + 999999) / 1000000;
    return ms > INT_MAX ? INT_MAX : (int)ms;
}

static int instance_wait(int epfd, struct epoll_instance *inst, struct epoll_event *events, int max,
                         int64_t deadline, const sigset_t *sigmask)
{
    if (max <= 0 || max > EP_MAX_EVENTS)
        return fail(EINVAL);
    int found = scan(inst, events, max);
    if (found)
        return with_kernel_events(inst, epfd, events, max, found);
    if (!__atomic_load_n(&inst->count, __ATOMIC_ACQUIRE))
        goto sleep;
    if (shim.spin_ns > 0 && ms_until(deadline) != 0) {
        int64_t end = shim_now_ns() + shim.spin_ns;
        do {
            if ((found = scan(inst, events, max)))
                return with_kernel_events(inst, epfd, events, max, found);
        } while (shim_now_ns() < end);
    }
sleep:
    for (;;) {
        int stack_fds = __atomic_load_n(&inst->count, __ATOMIC_ACQUIRE) != 0;
        if (stack_fds)
            ensure_waiter(inst, epfd);
        int armed = stack_fds && inst->waiter_in_set;
        if (armed) {
            shim_waiter_arm(&inst->waiter);
            if ((found = scan(inst, events, max))) {
                __atomic_store_n(&inst->waiter.w->armed, 0, __ATOMIC_RELEASE);
                return with_kernel_events(inst, epfd, events, max, found);
            }
        }
        int timeout = ms_until(deadline);
        if (stack_fds && !armed && (timeout < 0 || timeout > 1))
            timeout = 1; /* no waiter: nobody wakes us, look again soon */
        int n = kernel_wait(inst, epfd, events, max, timeout, sigmask);
        if (armed)
            __atomic_store_n(&inst->waiter.w->armed, 0, __ATOMIC_RELEASE);
        if (n < 0)
            return -1;
        if (stack_fds || n > 0)
            n += scan(inst, events + n, max - n);
        if (n > 0 || ms_until(deadline) == 0)
            return n;
    }
}

int epoll_pwait(int epfd, struct epoll_event *events, int max, int timeout, const sigset_t *sigmask)
{
    shim_ensure_init();
    struct epoll_instance *inst = shim_busy ? NULL : instance_of(epfd);
    if (!inst || (!inst->stack_ready && !inst->count))
        return shim_real.epoll_pwait(epfd, events, max, timeout, sigmask);
    return instance_wait(epfd, inst, events, max, shim_deadline_ms(timeout), sigmask);
}

int epoll_wait(int epfd, struct epoll_event *events, int max, int timeout)
{
    return epoll_pwait(epfd, events, max, timeout, NULL);
}

int epoll_pwait2(int epfd, struct epoll_event *events, int max, const struct timespec *timeout,
                 const sigset_t *sigmask)
{
    shim_ensure_init();
    struct epoll_instance *inst = shim_busy ? NULL : instance_of(epfd);
    if (!inst || (!inst->stack_ready && !inst->count))
        return shim_real.epoll_pwait2(epfd, events, max, timeout, sigmask);
    return instance_wait(epfd, inst, events, max, shim_deadline_ts(timeout), sigmask);
}
