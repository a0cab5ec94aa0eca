/*
 * epoll over stack sockets and kernel fds together.
 *
 * The program's epoll fd stays a real kernel epoll: kernel fds live in it as
 * usual.  Stack fds live in a list here, and a wait looks only at its ready
 * list, as the kernel's does: the entries added or modified since, those
 * whose slots the stack logged in the region's change log since (struct
 * mts_changes), and the level-triggered ones still ready at the last look.
 * A wait costs O(ready), not O(registered); one that fell behind the log
 * looks at every entry once.  When nothing is ready it sleeps in the real
 * epoll_pwait, in whose set the instance keeps its waiter's eventfd and the
 * death pipe, so timeouts, signal masks and EINTR stay the kernel's.
 *
 * An instance inside another epoll set, or in poll or select, is "nested":
 * the outer waiter sees only its kernel fd, so while a stack entry is ready
 * the instance keeps that fd readable (its waiter's eventfd signalled), and
 * otherwise keeps its waiter armed, so that the stack's next change makes
 * it readable.  The outer wait may then find it readable once more than
 * the kernel's would: the next wait on the instance itself settles that.
 */
#include "shim.h"

#include <stdlib.h>
#include <sys/mman.h>

/* data.u64 of our own fds in the real set; a program would have to pick
 * these exact values to be confused with them. */
#define WAKE_TAG 0x6d7473686d2d776bULL  /* "mtshm-wk" */
#define DEATH_TAG 0x6d7473686d2d6464ULL /* "mtshm-dd" */
#define EP_MAX_EVENTS ((int)(INT_MAX / sizeof(struct epoll_event)))
/* A ready list position whose entry left it (compacted at the next look). */
#define LEFT UINT32_MAX

struct epoll_entry {
    int fd;
    uint32_t slot;
    uint32_t events;    /* what the program asked for, flags included */
    uint32_t seen_seq;  /* EPOLLET: slot event_seq at the last report */
    epoll_data_t data;
    uint32_t next_of_slot; /* index + 1 of the next entry on the same slot (dup'd fds); 0: none */
    uint32_t ready_pos;    /* position + 1 in the ready list; 0: not in it */
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
    uint32_t *first_of_slot; /* by slot id: entry index + 1, 0 = none */
    uint32_t slot_capacity;
    /* Entry indexes that may be ready, in the order they are looked at; as
     * long as the entries array (capacity), each entry at most once. */
    uint32_t *ready;
    uint32_t ready_count;
    uint32_t ready_start; /* round robin, so no stack fd starves */
    uint64_t log_pos[MTS_MAX_WORKERS]; /* each worker's change log is read up to here */
    uint8_t death_seen;   /* every entry was queued once the stack died */
    uint8_t nested;       /* in another epoll set, or polled: see the top */
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
    free(inst->first_of_slot);
    free(inst->ready);
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

/* The ready list.  Entries leave it by a mark (LEFT), so positions stay put
 * while a look walks it; compaction closes the gaps, keeping the order and
 * the round-robin start (`next`: the position to look at first next time). */
static void compact_ready(struct epoll_instance *inst, uint32_t next)
{
    uint32_t kept = 0, start = 0;
    for (uint32_t pos = 0; pos < inst->ready_count; pos++) {
        uint32_t index = inst->ready[pos];
        if (index == LEFT)
            continue;
        if (pos < next)
            start = kept + 1;
        inst->ready[kept] = index;
        inst->entries[index].ready_pos = ++kept;
    }
    inst->ready_count = kept;
    inst->ready_start = start < kept ? start : 0;
}

static void enqueue(struct epoll_instance *inst, uint32_t index)
{
    struct epoll_entry *e = &inst->entries[index];
    if (e->ready_pos)
        return;
    if (inst->ready_count == inst->capacity) /* some left: the list is as long as the entries */
        compact_ready(inst, inst->ready_start);
    inst->ready[inst->ready_count] = index;
    e->ready_pos = ++inst->ready_count;
}

static void leave_ready(struct epoll_instance *inst, struct epoll_entry *e)
{
    if (e->ready_pos)
        inst->ready[e->ready_pos - 1] = LEFT;
    e->ready_pos = 0;
}

static void enqueue_all(struct epoll_instance *inst)
{
    for (uint32_t index = 0; index < inst->count; index++)
        enqueue(inst, index);
}

/* The link (in first_of_slot or an entry) that holds index + 1. */
static uint32_t *slot_link(struct epoll_instance *inst, uint32_t index)
{
    uint32_t *link = &inst->first_of_slot[inst->entries[index].slot];
    while (*link != index + 1)
        link = &inst->entries[*link - 1].next_of_slot;
    return link;
}

static int grow(void **array, uint32_t *capacity, uint32_t wanted, size_t item, int zero)
{
    if (wanted <= *capacity)
        return 0;
    uint32_t grown = *capacity ? *capacity : 16;
    while (grown < wanted)
        grown *= 2;
    void *larger = realloc(*array, (size_t)grown * item);
    if (!larger)
        return fail(ENOMEM);
    if (zero)
        memset((char *)larger + (size_t)*capacity * item, 0, (size_t)(grown - *capacity) * item);
    *array = larger;
    *capacity = grown;
    return 0;
}

static int append(struct epoll_instance *inst, int fd, uint32_t slot, const struct epoll_event *event)
{
    uint32_t ready_capacity = inst->capacity; /* the ready list grows first, to the entries' new length */
    if (grow((void **)&inst->index_of_fd, &inst->index_capacity, (uint32_t)fd + 1, sizeof(uint32_t), 1) ||
        grow((void **)&inst->first_of_slot, &inst->slot_capacity, slot + 1, sizeof(uint32_t), 1) ||
        grow((void **)&inst->ready, &ready_capacity, inst->count + 1, sizeof(uint32_t), 0) ||
        grow((void **)&inst->entries, &inst->capacity, inst->count + 1, sizeof(struct epoll_entry), 0))
        return -1;
    uint32_t index = inst->count;
    struct epoll_entry *e = &inst->entries[index];
    memset(e, 0, sizeof(*e));
    e->fd = fd;
    e->slot = slot;
    e->events = event->events;
    e->data = event->data;
    e->seen_seq = initial_seen_seq(slot, event->events);
    e->next_of_slot = inst->first_of_slot[slot];
    inst->first_of_slot[slot] = index + 1;
    if (inst->waiter.id >= 0)
        mts_slot_interest_add(&shim.geom, slot, (uint32_t)inst->waiter.id);
    __atomic_store_n(&inst->count, index + 1, __ATOMIC_RELEASE);
    inst->index_of_fd[fd] = index + 1;
    enqueue(inst, index);
    return 0;
}

static void remove_entry(struct epoll_instance *inst, struct epoll_entry *e)
{
    uint32_t index = (uint32_t)(e - inst->entries), last = inst->count - 1;
    leave_ready(inst, e);
    *slot_link(inst, index) = e->next_of_slot;
    inst->index_of_fd[e->fd] = 0;
    if (index != last) { /* the last entry moves into the hole */
        *slot_link(inst, last) = index + 1;
        *e = inst->entries[last];
        inst->index_of_fd[e->fd] = index + 1;
        if (e->ready_pos)
            inst->ready[e->ready_pos - 1] = index;
    }
    __atomic_store_n(&inst->count, last, __ATOMIC_RELEASE);
}

/* Queues the entries of every slot a worker logged since the last look.
 * Entries are read before the head is checked again: if the worker lapped
 * us meanwhile, some were overwritten, and every entry is queued instead. */
static void read_changes(struct epoll_instance *inst)
{
    const struct mts_geom *g = &shim.geom;
    for (uint32_t worker = 0; worker < g->nworkers; worker++) {
        struct mts_changes *log = mts_changes_at(g, worker);
        uint64_t head = MTS_LOAD(&log->head), from = inst->log_pos[worker];
        if (head == from)
            continue;
        inst->log_pos[worker] = head;
        if (head - from <= g->changes_capacity) {
            for (uint64_t pos = from; pos != head; pos++) {
                uint32_t slot = __atomic_load_n(mts_change_entry(g, worker, pos), __ATOMIC_RELAXED);
                if (slot < inst->slot_capacity)
                    for (uint32_t i = inst->first_of_slot[slot]; i; i = inst->entries[i - 1].next_of_slot)
                        enqueue(inst, i - 1);
            }
            if (MTS_LOAD(&log->head) - from <= g->changes_capacity)
                continue;
        }
        SHIM_DEBUG("epoll: %llu slots logged by worker %u since the last look, more than the log holds: "
                   "looking at all %u", (unsigned long long)(head - from), worker, inst->count);
        enqueue_all(inst);
    }
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
    /* It wakes for every stack fd in the set: these, and (under the same
     * lock, the id set before) those append adds later. */
    instance_lock(inst);
    for (uint32_t i = 0; i < inst->count; i++)
        mts_slot_interest_add(&shim.geom, inst->entries[i].slot, (uint32_t)inst->waiter.id);
    instance_unlock(inst);
    struct epoll_event wake = {.events = EPOLLIN | EPOLLET, .data.u64 = WAKE_TAG};
    if (shim_real.epoll_ctl(epfd, EPOLL_CTL_ADD, inst->waiter.efd, &wake) < 0 && errno != EEXIST) {
        SHIM_DEBUG("epoll %d: waiter not added: %s", epfd, strerror(errno));
        shim_waiter_close(&inst->waiter);
        return;
    }
    inst->waiter_in_set = 1;
}

/* Whether a stack entry would be reported now; nothing changes but the ready
 * list's contents (entries the change log names join it). */
static int any_ready(struct epoll_instance *inst)
{
    int dead = __atomic_load_n(&shim.stack_dead, __ATOMIC_ACQUIRE), ready = dead;
    instance_lock(inst);
    read_changes(inst);
    for (uint32_t pos = 0; pos < inst->ready_count && !ready; pos++) {
        if (inst->ready[pos] == LEFT)
            continue;
        const struct epoll_entry *e = &inst->entries[inst->ready[pos]];
        uint32_t seq = __atomic_load_n(&shim_slot(e->slot)->event_seq, __ATOMIC_ACQUIRE);
        ready = !e->disabled && !((e->events & EPOLLET) && seq == e->seen_seq) &&
                (shim_slot_ready(e->slot) & (e->events | EPOLLERR | EPOLLHUP));
    }
    instance_unlock(inst);
    return ready;
}

/* A nested instance's kernel fd: readable while a stack entry is ready,
 * else readable at the stack's next change (see the top). */
static void keep_nested_readable(struct epoll_instance *inst, int epfd)
{
    if (!inst->nested || !__atomic_load_n(&inst->count, __ATOMIC_ACQUIRE))
        return;
    ensure_waiter(inst, epfd);
    if (!inst->waiter_in_set)
        return;
    shim_waiter_arm(&inst->waiter);
    if (any_ready(inst)) {
        uint64_t one = 1;
        __atomic_store_n(&inst->waiter.w->armed, 0, __ATOMIC_RELEASE);
        shim_real.write(inst->waiter.efd, &one, sizeof(one));
    }
}

void shim_epoll_nest(int epfd)
{
    struct epoll_instance *inst = instance_of(epfd);
    if (!inst)
        return;
    if (!inst->nested)
        SHIM_DEBUG("epoll %d: nested in another wait", epfd);
    inst->nested = 1;
    keep_nested_readable(inst, epfd);
}

int epoll_ctl(int epfd, int op, int fd, struct epoll_event *event)
{
    uint32_t slot;
    if (!shim_stack_fd(fd, &slot)) {
        if ((op == EPOLL_CTL_ADD || op == EPOLL_CTL_MOD) && !shim_busy)
            shim_epoll_nest(fd); /* an epoll set holding stack sockets, inside this one */
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
        enqueue(inst, (uint32_t)(e - inst->entries));
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

/* Reports the ready stack fds, at most max: looks at the ready list only.
 * An entry leaves it when it is not ready, when it was reported and is
 * edge-triggered or one-shot, or when it is disabled; level-triggered ones
 * stay while ready, as in the kernel. */
static int scan(struct epoll_instance *inst, struct epoll_event *out, int max)
{
    if (!__atomic_load_n(&inst->count, __ATOMIC_ACQUIRE) || max <= 0)
        return 0;
    instance_lock(inst);
    int dead = __atomic_load_n(&shim.stack_dead, __ATOMIC_ACQUIRE), found = 0;
    if (dead && !inst->death_seen) {
        inst->death_seen = 1;
        enqueue_all(inst);
    }
    read_changes(inst);
    uint32_t count = inst->ready_count, start = inst->ready_start < count ? inst->ready_start : 0, looked;
    for (looked = 0; looked < count && found < max; looked++) {
        uint32_t pos = start + looked < count ? start + looked : start + looked - count;
        if (inst->ready[pos] == LEFT)
            continue;
        struct epoll_entry *e = &inst->entries[inst->ready[pos]];
        int edge = (e->events & EPOLLET) != 0;
        uint32_t seq = __atomic_load_n(&shim_slot(e->slot)->event_seq, __ATOMIC_ACQUIRE);
        uint32_t ready = e->disabled || (edge && !dead && seq == e->seen_seq)
                             ? 0 : shim_slot_ready(e->slot) & (e->events | EPOLLERR | EPOLLHUP);
        if (!ready || (edge && dead && e->death_told)) {
            leave_ready(inst, e);
            continue;
        }
        if (edge) {
            e->death_told = (uint8_t)dead;
            e->seen_seq = seq;
        }
        if (e->events & EPOLLONESHOT)
            e->disabled = 1;
        if (edge || e->disabled)
            leave_ready(inst, e);
        out[found].events = ready;
        out[found].data = e->data;
        found++;
    }
    compact_ready(inst, count ? (start + looked) % count : 0);
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

static int wait_for_events(int epfd, struct epoll_instance *inst, struct epoll_event *events, int max,
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

static int instance_wait(int epfd, struct epoll_instance *inst, struct epoll_event *events, int max,
                         int64_t deadline, const sigset_t *sigmask)
{
    int found = wait_for_events(epfd, inst, events, max, deadline, sigmask);
    int err = errno;
    keep_nested_readable(inst, epfd);
    errno = err;
    return found;
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
