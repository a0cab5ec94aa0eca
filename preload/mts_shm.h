/*
 * Operations on the shared region, compiled into both sides: the interposer
 * includes this header, and the stack's cffi module (mtcpshim/_build_shm.py)
 * wraps the functions listed between the cdef markers below.  Keeping the
 * ring, queue and allocation logic in one place means the two sides cannot
 * disagree on a memory order or an index.
 */
#ifndef MTS_SHM_H
#define MTS_SHM_H

#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <limits.h>
#include <time.h>
#include <unistd.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <linux/futex.h>

#include "mtcpshim_abi.h"

_Static_assert(sizeof(struct mts_header) == 512, "mts_header layout");
_Static_assert(sizeof(((struct mts_header *)0)->congestion) == MTS_CONGESTION_LIST_MAX, "congestion list");
_Static_assert(sizeof(struct mts_worker) == 2 * MTS_CACHELINE, "mts_worker layout");
_Static_assert(sizeof(((struct mts_slot *)0)->siblings) == MTS_MAX_WORKERS * sizeof(uint32_t), "siblings");
_Static_assert(sizeof(((struct mts_slot *)0)->waiter_interest) * 8 == MTS_INTEREST_BITS, "interest bits");
_Static_assert(sizeof(struct mts_waiter) == 16, "mts_waiter layout");
_Static_assert(sizeof(struct mts_cmd) == 32, "mts_cmd layout");
_Static_assert(sizeof(struct mts_cmdq) == 128, "mts_cmdq layout");
_Static_assert(sizeof(struct mts_changes) == MTS_CACHELINE, "mts_changes layout");
_Static_assert(MTS_MAX_RING <= UINT32_MAX / 2 + 1, "ring sizes fit uint32_t");
_Static_assert(sizeof(struct mts_ring) == 128, "mts_ring layout");
_Static_assert(offsetof(struct mts_slot, rx) == 512, "mts_slot rings aligned");
_Static_assert(sizeof(struct mts_slot) == 768, "mts_slot layout");
_Static_assert(sizeof(struct mts_span) == 24, "mts_span layout");
_Static_assert(sizeof(struct mts_ctl_msg) == 16, "mts_ctl_msg layout");

/* The functions cffi wraps for the stack: mtcpshim/abi_source.py hands the
 * lines between the markers to cffi.  C compilers skip them. */
#ifdef MTS_CFFI_PROTOTYPES /* cdef-begin */
uint64_t mts_region_size(uint32_t nslots, uint32_t nworkers, uint32_t nwaiters, uint32_t cmd_capacity,
                         uint32_t changes_capacity, uint32_t rx_size, uint32_t tx_size);
int mts_region_init(void *base, uint64_t mapped_size, uint32_t nslots, uint32_t nworkers, uint32_t nwaiters,
                    uint32_t cmd_capacity, uint32_t changes_capacity, uint32_t rx_size, uint32_t tx_size);
int mts_geom_attach(struct mts_geom *g, void *base, uint64_t mapped_size);
struct mts_slot *mts_slot_at(const struct mts_geom *g, uint32_t id);
uint8_t *mts_rx_data(const struct mts_geom *g, uint32_t id);
uint8_t *mts_tx_data(const struct mts_geom *g, uint32_t id);
struct mts_waiter *mts_waiter_at(const struct mts_geom *g, uint32_t id);
struct mts_worker *mts_worker_at(const struct mts_geom *g, uint32_t worker);
uint32_t mts_slot_worker(const struct mts_geom *g, uint32_t id);
uint32_t mts_worker_of_ports(uint32_t port_a, uint32_t port_b, uint32_t workers);
int32_t mts_slot_alloc(const struct mts_geom *g, uint32_t worker, const uint8_t *skip);
int mts_slots_available(const struct mts_geom *g, uint32_t worker, const uint8_t *skip, uint32_t wanted);
void mts_slot_free(const struct mts_geom *g, uint32_t id);
int32_t mts_waiter_alloc(const struct mts_geom *g, int32_t pid);
void mts_waiter_registered(struct mts_waiter *w, uint32_t worker);
void mts_waiter_free(const struct mts_geom *g, uint32_t id, uint32_t worker);
uint32_t mts_waiter_disarm(struct mts_waiter *w);
int mts_cmd_push(const struct mts_geom *g, uint32_t worker, uint32_t op, uint32_t slot, uint32_t generation,
                 uint64_t arg);
int mts_cmd_pop(const struct mts_geom *g, uint32_t worker, uint64_t *pos, struct mts_cmd *out);
int mts_cmd_pending(const struct mts_geom *g, uint32_t worker, uint64_t pos);
uint64_t mts_ring_used(const struct mts_ring *r);
uint32_t mts_buffer_limit(uint32_t ring_size, uint32_t opt);
uint64_t mts_ring_write(struct mts_ring *r, uint8_t *data, uint32_t cap, const void *src, uint64_t n);
uint64_t mts_ring_read(struct mts_ring *r, const uint8_t *data, uint32_t cap, void *dst, uint64_t n);
uint64_t mts_ring_peek(const struct mts_ring *r, const uint8_t *data, uint32_t cap,
                       uint64_t offset, void *dst, uint64_t n);
void mts_ring_consume(struct mts_ring *r, uint64_t n);
uint64_t mts_index_load(const uint64_t *index);
void mts_index_store(uint64_t *index, uint64_t value);
void mts_copy_in(uint8_t *data, uint32_t cap, uint64_t pos, const void *src, uint64_t n);
int64_t mts_ring_produce(struct mts_ring *r, struct mts_ring_pages *pages, uint8_t *data, uint32_t cap,
                         uint64_t head, const void *src, uint64_t n);
void mts_copy_out(const uint8_t *data, uint32_t cap, uint64_t pos, void *dst, uint64_t n);
int mts_ring_release(uint8_t *data, uint32_t cap, uint64_t from, uint64_t to);
void mts_ring_pages_before_write(struct mts_ring_pages *p, uint8_t *data, uint32_t cap, uint64_t head,
                                 uint64_t held);
void mts_ring_pages_wrote(struct mts_ring_pages *p, uint64_t held);
int64_t mts_rx_sink_write(void *sink, const void *src, uint64_t n);
void mts_accept_put(const struct mts_geom *g, uint32_t listener, uint64_t pos, uint32_t child);
int64_t mts_accept_take(const struct mts_geom *g, uint32_t listener, uint64_t head);
int32_t mts_accept_pop(const struct mts_geom *g, uint32_t listener, uint32_t first_worker);
uint32_t mts_accept_pending(const struct mts_geom *g, uint32_t listener);
int64_t mts_listener_part(const struct mts_geom *g, uint32_t listener, uint32_t worker);
void mts_slot_interest_add(const struct mts_geom *g, uint32_t id, uint32_t waiter);
void mts_publish(const struct mts_geom *g, uint32_t worker, uint64_t *logged, uint64_t *interest, uint32_t id,
                 uint32_t logged_id, uint32_t state, uint32_t events,
                 int32_t so_error);
void mts_complete(struct mts_slot *s, int32_t result);
void mts_rx_arm_notify(struct mts_slot *s);
void mts_tx_clear_pending(struct mts_slot *s);
int mts_rx_take_notify(struct mts_slot *s);
int mts_stack_try_sleep(const struct mts_geom *g, uint32_t worker, uint64_t pos);
void mts_stack_awake(const struct mts_geom *g, uint32_t worker);
void mts_ctl_post(const struct mts_geom *g, uint32_t worker);
uint32_t mts_ctl_posted(const struct mts_geom *g, uint32_t worker);
uint32_t mts_slot_poll(const struct mts_geom *g, uint32_t id);
void mts_futex_wake(uint32_t *word);
int mts_futex_wait(uint32_t *word, uint32_t expected, int timeout_ms);
uint32_t mts_release_fd_table(const struct mts_geom *g, uint32_t worker, const uint64_t *table, uint64_t words,
                              uint32_t *closed, uint32_t max);
#endif /* cdef-end */

#define MTS_LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define MTS_STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)

static inline uint64_t mts_align(uint64_t n, uint64_t to) { return (n + to - 1) & ~(to - 1); }

static inline int mts_pow2(uint32_t n) { return n && !(n & (n - 1)); }

static inline struct mts_header *mts_hdr(const struct mts_geom *g) { return (struct mts_header *)g->base; }

#ifdef MTS_AUDIT
#include <stdio.h>
#include <stdlib.h>
/* Test builds: every address an operation derives from the geometry must
 * lie inside the region, or the process aborts with the culprit. */
#define MTS_IN_REGION(g, p, n) mts_audit((g), (const uint8_t *)(p), (n), __func__)
static inline void mts_audit(const struct mts_geom *g, const uint8_t *p, uint64_t n, const char *where)
{
    if (p && (p < g->base || n > g->size || p - g->base > (ptrdiff_t)(g->size - n))) {
        fprintf(stderr, "mts_audit: %s: %llu bytes at offset %lld, outside the %llu-byte region\n", where,
                (unsigned long long)n, (long long)(p - g->base), (unsigned long long)g->size);
        abort();
    }
}
#else
#define MTS_IN_REGION(g, p, n) ((void)0)
#endif

static inline void mts_futex_wake(uint32_t *word)
{
    syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/* Waits while *word == expected, at most timeout_ms (negative: forever). */
static inline int mts_futex_wait(uint32_t *word, uint32_t expected, int timeout_ms)
{
    struct timespec ts = {timeout_ms / 1000, (long)(timeout_ms % 1000) * 1000000L};
    return (int)syscall(SYS_futex, word, FUTEX_WAIT, expected, timeout_ms < 0 ? NULL : &ts, NULL, 0);
}

/* The one layout rule: fills g's offsets and size from its counts and sizes.
 * Returns 0, or -1 for counts or sizes outside the ABI's bounds. */
static inline int mts_layout(struct mts_geom *g)
{
    if (!g->nslots || g->nslots > MTS_MAX_SLOTS || !g->nworkers || g->nworkers > MTS_MAX_WORKERS ||
        g->nslots % g->nworkers || !g->nwaiters || g->nwaiters > MTS_MAX_WAITERS ||
        !mts_pow2(g->cmd_capacity) || g->cmd_capacity > MTS_MAX_CMD_CAPACITY ||
        !mts_pow2(g->changes_capacity) || g->changes_capacity < MTS_MIN_CHANGES ||
        g->changes_capacity > MTS_MAX_CHANGES || !mts_pow2(g->rx_size) || g->rx_size < MTS_MIN_RING || g->rx_size > MTS_MAX_RING ||
        !mts_pow2(g->tx_size) || g->tx_size < MTS_MIN_RING || g->tx_size > MTS_MAX_RING)
        return -1;
    g->slots_per_worker = g->nslots / g->nworkers;
    uint64_t off = mts_align(sizeof(struct mts_header), 4096);
    g->workers_off = off;
    off += (uint64_t)g->nworkers * sizeof(struct mts_worker);
    g->waiters_off = off;
    off = mts_align(off + (uint64_t)g->nwaiters * sizeof(struct mts_waiter), 4096);
    g->cmdq_off = off;
    g->cmdq_stride = mts_align(sizeof(struct mts_cmdq) + (uint64_t)g->cmd_capacity * sizeof(struct mts_cmd), 4096);
    off += g->nworkers * g->cmdq_stride;
    g->changes_off = off;
    g->changes_stride = mts_align(sizeof(struct mts_changes) + (uint64_t)g->changes_capacity * sizeof(uint32_t), 4096);
    off += g->nworkers * g->changes_stride;
    g->slots_off = off;
    off = mts_align(off + (uint64_t)g->nslots * sizeof(struct mts_slot), 4096);
    g->data_off = off;
    g->size = off + (uint64_t)g->nslots * ((uint64_t)g->rx_size + g->tx_size);
    g->accept_capacity = g->rx_size / sizeof(uint32_t);
    return 0;
}

static inline uint64_t mts_region_size(uint32_t nslots, uint32_t nworkers, uint32_t nwaiters, uint32_t cmd_capacity,
                                       uint32_t changes_capacity, uint32_t rx_size, uint32_t tx_size)
{
    struct mts_geom g = {.nslots = nslots, .nworkers = nworkers, .nwaiters = nwaiters, .cmd_capacity = cmd_capacity,
                         .changes_capacity = changes_capacity, .rx_size = rx_size, .tx_size = tx_size};
    return mts_layout(&g) ? 0 : g.size;
}

/* Lays out a zero-filled region (a fresh memfd is).  Returns 0, or -1 if the
 * geometry is out of bounds or does not fit mapped_size. */
static inline int mts_region_init(void *base, uint64_t mapped_size, uint32_t nslots, uint32_t nworkers,
                                  uint32_t nwaiters, uint32_t cmd_capacity, uint32_t changes_capacity,
                                  uint32_t rx_size, uint32_t tx_size)
{
    struct mts_geom g = {.nslots = nslots, .nworkers = nworkers, .nwaiters = nwaiters, .cmd_capacity = cmd_capacity,
                         .changes_capacity = changes_capacity, .rx_size = rx_size, .tx_size = tx_size};
    if (mts_layout(&g) || g.size > mapped_size)
        return -1;
    struct mts_header *h = base;
    h->workers_off = g.workers_off;
    h->waiters_off = g.waiters_off;
    h->cmdq_off = g.cmdq_off;
    h->changes_off = g.changes_off;
    h->slots_off = g.slots_off;
    h->data_off = g.data_off;
    h->region_size = g.size;
    h->header_size = sizeof(struct mts_header);
    h->nslots = nslots;
    h->nworkers = nworkers;
    h->nwaiters = nwaiters;
    h->cmd_capacity = cmd_capacity;
    h->changes_capacity = changes_capacity;
    h->rx_size = rx_size;
    h->tx_size = tx_size;
    for (uint32_t w = 0; w < nworkers; w++) {
        struct mts_cmd *cells = (struct mts_cmd *)((char *)base + g.cmdq_off + w * g.cmdq_stride + sizeof(struct mts_cmdq));
        for (uint32_t i = 0; i < cmd_capacity; i++)
            cells[i].seq = i;
        struct mts_worker *worker = (struct mts_worker *)((char *)base + g.workers_off) + w;
        worker->slot_hint = w * g.slots_per_worker;
        worker->cpu = -1;
    }
    h->version = MTS_VERSION;
    MTS_STORE(&h->magic, (uint64_t)MTS_MAGIC);
    return 0;
}

/* Reads the header's geometry once into g, recomputing every offset by the
 * layout rule.  Returns 0, or -1 if the header is not a region this ABI made
 * or claims more than mapped_size. */
static inline int mts_geom_attach(struct mts_geom *g, void *base, uint64_t mapped_size)
{
    const volatile struct mts_header *h = base;
    memset(g, 0, sizeof(*g));
    if (mapped_size < sizeof(struct mts_header) || h->magic != (uint64_t)MTS_MAGIC ||
        h->version != MTS_VERSION || h->header_size != sizeof(struct mts_header))
        return -1;
    g->nslots = h->nslots;
    g->nworkers = h->nworkers;
    g->nwaiters = h->nwaiters;
    g->cmd_capacity = h->cmd_capacity;
    g->changes_capacity = h->changes_capacity;
    g->rx_size = h->rx_size;
    g->tx_size = h->tx_size;
    if (mts_layout(g) || g->size > mapped_size || g->size != h->region_size || g->workers_off != h->workers_off ||
        g->waiters_off != h->waiters_off || g->cmdq_off != h->cmdq_off || g->changes_off != h->changes_off ||
        g->slots_off != h->slots_off || g->data_off != h->data_off)
        return -1;
    g->base = base;
    return 0;
}

/* Address helpers: NULL for an id outside the geometry. */
static inline struct mts_slot *mts_slot_at(const struct mts_geom *g, uint32_t id)
{
    struct mts_slot *s = id < g->nslots ? (struct mts_slot *)(g->base + g->slots_off) + id : NULL;
    MTS_IN_REGION(g, s, sizeof(*s));
    return s;
}

static inline uint8_t *mts_rx_data(const struct mts_geom *g, uint32_t id)
{
    uint8_t *data = id < g->nslots ? g->base + g->data_off + (uint64_t)id * ((uint64_t)g->rx_size + g->tx_size)
                                   : NULL;
    MTS_IN_REGION(g, data, g->rx_size);
    return data;
}

static inline uint8_t *mts_tx_data(const struct mts_geom *g, uint32_t id)
{
    uint8_t *data = id < g->nslots ? mts_rx_data(g, id) + g->rx_size : NULL;
    MTS_IN_REGION(g, data, g->tx_size);
    return data;
}

static inline struct mts_waiter *mts_waiter_at(const struct mts_geom *g, uint32_t id)
{
    struct mts_waiter *w = id < g->nwaiters ? (struct mts_waiter *)(g->base + g->waiters_off) + id : NULL;
    MTS_IN_REGION(g, w, sizeof(*w));
    return w;
}

/* Worker `worker`'s own words; callers pass a worker below nworkers (taken
 * modulo otherwise, so that no value reaches outside the array). */
static inline struct mts_worker *mts_worker_at(const struct mts_geom *g, uint32_t worker)
{
    struct mts_worker *w = (struct mts_worker *)(g->base + g->workers_off) + worker % g->nworkers;
    MTS_IN_REGION(g, w, sizeof(*w));
    return w;
}

/* The worker that owns slot `id` (ids past the geometry: nworkers). */
static inline uint32_t mts_slot_worker(const struct mts_geom *g, uint32_t id)
{
    return id < g->nslots ? id / g->slots_per_worker : g->nworkers;
}

static inline uint32_t mts_worker_of_ports(uint32_t port_a, uint32_t port_b, uint32_t workers)
{
    return ((uint32_t)((port_a ^ port_b) * (uint32_t)MTS_STEER_MULTIPLIER) >> MTS_STEER_SHIFT) % workers;
}

/* Claims a free slot of `worker`'s range by compare-and-swap (both sides
 * allocate: the application at bind/connect, a worker for the connections
 * it accepts) and resets it.  Only the owning worker frees slots.  `skip`
 * (the stack's, NULL for the application) marks slots the caller knows to
 * be live whatever their in_use word says: a program that marks a live
 * slot free cannot make the stack hand it out twice. */
static inline int32_t mts_slot_alloc(const struct mts_geom *g, uint32_t worker, const uint8_t *skip)
{
    struct mts_worker *wk = mts_worker_at(g, worker);
    uint32_t first = worker % g->nworkers * g->slots_per_worker, count = g->slots_per_worker;
    uint32_t start = MTS_LOAD(&wk->slot_hint) - first;
    for (uint32_t i = 0; i < count; i++) {
        uint32_t id = first + (start + i) % count;
        struct mts_slot *s = mts_slot_at(g, id);
        uint32_t expected = MTS_SLOT_FREE;
        if ((skip && skip[id]) || MTS_LOAD(&s->in_use) != MTS_SLOT_FREE ||
            !__atomic_compare_exchange_n(&s->in_use, &expected, MTS_SLOT_USED, 0,
                                         __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
            continue;
        uint32_t generation = s->generation + 1;
        memset((char *)s + offsetof(struct mts_slot, refcnt), 0,
               sizeof(*s) - offsetof(struct mts_slot, refcnt));
        s->generation = generation;
        MTS_STORE(&wk->slot_hint, first + (id - first + 1) % count);
        return (int32_t)id;
    }
    return -1;
}

/* Whether mts_slot_alloc would find `wanted` slots of `worker` now (same
 * rules, nothing taken): the search stops at the wanted-th free one. */
static inline int mts_slots_available(const struct mts_geom *g, uint32_t worker, const uint8_t *skip, uint32_t wanted)
{
    uint32_t first = worker % g->nworkers * g->slots_per_worker, count = g->slots_per_worker;
    uint32_t start = MTS_LOAD(&mts_worker_at(g, worker)->slot_hint) - first;
    for (uint32_t i = 0; i < count && wanted; i++) {
        uint32_t id = first + (start + i) % count;
        if (!(skip && skip[id]) && MTS_LOAD(&mts_slot_at(g, id)->in_use) == MTS_SLOT_FREE)
            wanted--;
    }
    return wanted == 0;
}

/* Frees a slot, and points its worker's next allocation search at it if it
 * is lower than where that search would start: slots are reused from the
 * bottom, and with them the ring pages a short exchange left in its slot
 * (which keeps them: SocketTable._maybe_release), instead of new pages in
 * every slot of a large region in turn. */
static inline void mts_slot_free(const struct mts_geom *g, uint32_t id)
{
    struct mts_slot *s = mts_slot_at(g, id);
    if (!s)
        return;
    MTS_STORE(&s->in_use, (uint32_t)MTS_SLOT_FREE);
    uint32_t worker = mts_slot_worker(g, id), first = worker * g->slots_per_worker;
    struct mts_worker *wk = mts_worker_at(g, worker);
    if (id - first < (MTS_LOAD(&wk->slot_hint) - first) % g->slots_per_worker)
        MTS_STORE(&wk->slot_hint, id);
}

static inline int32_t mts_waiter_alloc(const struct mts_geom *g, int32_t pid)
{
    for (uint32_t id = 0; id < g->nwaiters; id++) {
        struct mts_waiter *w = mts_waiter_at(g, id);
        uint32_t expected = 0;
        if (MTS_LOAD(&w->in_use) == 0 &&
            __atomic_compare_exchange_n(&w->in_use, &expected, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
            w->armed = 0;
            w->registered = 0;
            w->owner_pid = pid;
            return (int32_t)id;
        }
    }
    return -1;
}

/* A worker holds the waiter's eventfd now. */
static inline void mts_waiter_registered(struct mts_waiter *w, uint32_t worker)
{
    __atomic_or_fetch(&w->registered, 1u << worker, __ATOMIC_ACQ_REL);
    mts_futex_wake(&w->registered);
}

/* Called by a worker once it has closed its copy of the waiter's eventfd
 * (the application, for a waiter no worker saw, passes every worker's bit
 * by calling it with worker = MTS_MAX_WORKERS): the last copy to go frees
 * the waiter. */
static inline void mts_waiter_free(const struct mts_geom *g, uint32_t id, uint32_t worker)
{
    struct mts_waiter *w = mts_waiter_at(g, id);
    if (!w)
        return;
    uint32_t bit = worker < MTS_MAX_WORKERS ? 1u << worker : ~0u;
    if (__atomic_and_fetch(&w->registered, ~bit, __ATOMIC_ACQ_REL) == 0)
        MTS_STORE(&w->in_use, 0u);
}

/* Returns 1 if the waiter was armed (its owner sleeps or is about to). */
static inline uint32_t mts_waiter_disarm(struct mts_waiter *w)
{
    return MTS_LOAD(&w->armed) && __atomic_exchange_n(&w->armed, 0u, __ATOMIC_ACQ_REL);
}

static inline struct mts_cmdq *mts_cmdq(const struct mts_geom *g, uint32_t worker)
{
    return (struct mts_cmdq *)(g->base + g->cmdq_off + worker % g->nworkers * g->cmdq_stride);
}

static inline struct mts_cmd *mts_cmd_cell(const struct mts_geom *g, uint32_t worker, uint64_t pos)
{
    struct mts_cmd *cell = (struct mts_cmd *)(mts_cmdq(g, worker) + 1) + (pos & (g->cmd_capacity - 1));
    MTS_IN_REGION(g, cell, sizeof(*cell));
    return cell;
}

/* Queues a command for `worker`.  Returns 0, or -1 when its queue is full. */
static inline int mts_cmd_push(const struct mts_geom *g, uint32_t worker, uint32_t op, uint32_t slot,
                               uint32_t generation, uint64_t arg)
{
    struct mts_cmdq *q = mts_cmdq(g, worker);
    uint64_t pos = __atomic_load_n(&q->enqueue_pos, __ATOMIC_RELAXED);
    for (;;) {
        struct mts_cmd *cell = mts_cmd_cell(g, worker, pos);
        int64_t lag = (int64_t)(MTS_LOAD(&cell->seq) - pos);
        if (lag == 0) {
            if (__atomic_compare_exchange_n(&q->enqueue_pos, &pos, pos + 1, 1,
                                            __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
                cell->op = op;
                cell->slot = slot;
                cell->arg = arg;
                cell->generation = generation;
                MTS_STORE(&cell->seq, pos + 1);
                return 0;
            }
        } else if (lag < 0) {
            return -1;
        } else {
            pos = __atomic_load_n(&q->enqueue_pos, __ATOMIC_RELAXED);
        }
    }
}

/* Single consumer (the worker), whose own *pos says where it is.  Returns 1
 * and fills *out (every field still to be checked), or 0. */
static inline int mts_cmd_pop(const struct mts_geom *g, uint32_t worker, uint64_t *pos, struct mts_cmd *out)
{
    struct mts_cmd *cell = mts_cmd_cell(g, worker, *pos);
    if (MTS_LOAD(&cell->seq) != *pos + 1)
        return 0;
    out->op = cell->op;
    out->slot = cell->slot;
    out->arg = cell->arg;
    out->generation = cell->generation;
    MTS_STORE(&cell->seq, *pos + g->cmd_capacity);
    *pos += 1;
    return 1;
}

static inline int mts_cmd_pending(const struct mts_geom *g, uint32_t worker, uint64_t pos)
{
    return MTS_LOAD(&mts_cmd_cell(g, worker, pos)->seq) == pos + 1;
}

static inline uint64_t mts_ring_used(const struct mts_ring *r)
{
    return MTS_LOAD(&r->head) - MTS_LOAD(&r->tail);
}

static inline uint64_t mts_index_load(const uint64_t *index) { return MTS_LOAD(index); }

static inline void mts_index_store(uint64_t *index, uint64_t value) { MTS_STORE(index, value); }

/* Copies n <= cap bytes at ring position pos (wrapping); more is clamped, so
 * no index, however wrong, copies outside the data area. */
static inline void mts_copy_in(uint8_t *data, uint32_t cap, uint64_t pos, const void *src, uint64_t n)
{
    if (n > cap)
        n = cap;
    uint64_t at = pos & (cap - 1), first = cap - at < n ? cap - at : n;
    memcpy(data + at, src, first);
    memcpy(data, (const uint8_t *)src + first, n - first);
}

static inline void mts_copy_out(const uint8_t *data, uint32_t cap, uint64_t pos, void *dst, uint64_t n)
{
    if (n > cap)
        n = cap;
    uint64_t at = pos & (cap - 1), first = cap - at < n ? cap - at : n;
    memcpy(dst, data + at, first);
    memcpy((uint8_t *)dst + first, data, n - first);
}

/* Gives back the pages that ring positions [from, to) touched: MADV_REMOVE
 * punches them out of the memfd, for every process, and the next write
 * there finds a zeroed page.  Only the ring's producer may call it, with
 * the ring empty at `to`: its consumer reads nothing outside [tail, head),
 * and nobody else writes.  Ring data is page-aligned (mts_layout). */
static inline int mts_ring_release(uint8_t *data, uint32_t cap, uint64_t from, uint64_t to)
{
    const uint64_t page = 4096;
    uint64_t start = from & ~(page - 1), end = mts_align(to, page);
    if (end - start >= cap)
        return madvise(data, cap, MADV_REMOVE);
    uint64_t off = start & (cap - 1), len = end - start;
    if (off + len <= cap)
        return madvise(data + off, len, MADV_REMOVE);
    return madvise(data + off, cap - off, MADV_REMOVE) | madvise(data, off + len - cap, MADV_REMOVE);
}

/* The producer's rule, before it writes at `head` with `held` bytes in the
 * ring (MTS_RING_RELEASE_AFTER says when), and after: what it holds now. */
static inline void mts_ring_pages_before_write(struct mts_ring_pages *p, uint8_t *data, uint32_t cap,
                                               uint64_t head, uint64_t held)
{
    if (held || head - p->released < MTS_RING_RELEASE_AFTER)
        return;
    if (p->held_most <= MTS_RING_SMALL_FLOW)
        mts_ring_release(data, cap, p->released, head);
    p->released = head;
    p->held_most = 0;
}

static inline void mts_ring_pages_wrote(struct mts_ring_pages *p, uint64_t held)
{
    if (held > p->held_most)
        p->held_most = held;
}

/* The stack's producer side of an RX ring: it passes its own head and page
 * bookkeeping, and reads the application's tail as untrusted.  Copies as
 * much of src as fits and publishes the new head; returns the bytes taken,
 * or -1 if the tail is impossible (more in use than the ring holds). */
static inline int64_t mts_ring_produce(struct mts_ring *r, struct mts_ring_pages *pages, uint8_t *data,
                                       uint32_t cap, uint64_t head, const void *src, uint64_t n)
{
    uint64_t used = head - MTS_LOAD(&r->tail);
    if (used > cap)
        return -1;
    mts_ring_pages_before_write(pages, data, cap, head, used);
    if (n > cap - used)
        n = cap - used;
    mts_copy_in(data, cap, head, src, n);
    MTS_STORE(&r->head, head + n);
    mts_ring_pages_wrote(pages, used + n);
    return (int64_t)n;
}

/* Appends to an RX ring through the stack's view of it (struct
 * mts_rx_sink): the bytes taken, or -1 if the program's tail is impossible
 * (nothing taken).  Takes a void pointer to serve as the TCP core's
 * rx_write (stack/csrc/fastpath.h). */
static inline int64_t mts_rx_sink_write(void *sink, const void *src, uint64_t n)
{
    struct mts_rx_sink *s = sink;
    int64_t taken = mts_ring_produce(s->ring, &s->pages, s->data, s->cap, s->head, src, n);
    if (taken > 0)
        s->head += (uint64_t)taken;
    return taken;
}

/* The application's side of a byte ring.  An impossible used count (written
 * by a misbehaving process of the program) reads as a full ring. */
static inline uint64_t mts_ring_used_bounded(const struct mts_ring *r, uint32_t cap)
{
    uint64_t used = mts_ring_used(r);
    return used > cap ? cap : used;
}

/* The bytes a socket may hold one way: its ring's size, or what the program
 * asked for if less.  `opt` is the slot's opt_rcvbuf or opt_sndbuf, which
 * holds what Linux reports, twice the request; the request is the data
 * allowance (socket(7): the kernel doubles it for bookkeeping).  Any value
 * the program wrote gives a limit within the ring. */
static inline uint32_t mts_buffer_limit(uint32_t ring_size, uint32_t opt)
{
    uint32_t asked = opt / 2;
    return asked && asked < ring_size ? asked : ring_size;
}

/* Producer side: copies as much of src as fits, returns the bytes taken. */
static inline uint64_t mts_ring_write(struct mts_ring *r, uint8_t *data, uint32_t cap, const void *src, uint64_t n)
{
    uint64_t head = r->head, used = head - MTS_LOAD(&r->tail), room = used > cap ? 0 : cap - used;
    if (n > room)
        n = room;
    mts_copy_in(data, cap, head, src, n);
    MTS_STORE(&r->head, head + n);
    return n;
}

/* Consumer side: copies out and consumes up to n bytes. */
static inline uint64_t mts_ring_read(struct mts_ring *r, const uint8_t *data, uint32_t cap, void *dst, uint64_t n)
{
    uint64_t tail = r->tail, used = MTS_LOAD(&r->head) - tail;
    if (n > used)
        n = used;
    if (n > cap)
        n = cap;
    mts_copy_out(data, cap, tail, dst, n);
    MTS_STORE(&r->tail, tail + n);
    return n;
}

/* Consumer side: copies bytes [offset, offset + n) past tail without consuming. */
static inline uint64_t mts_ring_peek(const struct mts_ring *r, const uint8_t *data, uint32_t cap,
                                     uint64_t offset, void *dst, uint64_t n)
{
    uint64_t tail = r->tail, used = MTS_LOAD(&r->head) - tail;
    if (used > cap)
        used = cap;
    if (offset >= used)
        return 0;
    if (n > used - offset)
        n = used - offset;
    mts_copy_out(data, cap, tail + offset, dst, n);
    return n;
}

static inline void mts_ring_consume(struct mts_ring *r, uint64_t n)
{
    MTS_STORE(&r->tail, r->tail + n);
}

/* A listener's accept queue, in its RX area (see mtcpshim_abi.h).  The stack,
 * the only producer, keeps the head itself: it stores an entry at its own
 * position, then publishes head = pos + 1. */
static inline void mts_accept_put(const struct mts_geom *g, uint32_t listener, uint64_t pos, uint32_t child)
{
    uint32_t *queue = (uint32_t *)mts_rx_data(g, listener);
    if (!queue)
        return;
    MTS_IN_REGION(g, &queue[pos % g->accept_capacity], sizeof(uint32_t));
    __atomic_store_n(&queue[pos % g->accept_capacity], child, __ATOMIC_RELAXED);
}

/* Any number of consumers; returns a slot id, -1 when empty, or -2 when the
 * queue's indices are impossible.  The stack passes its own head; the
 * application the published one. */
static inline int64_t mts_accept_take(const struct mts_geom *g, uint32_t listener, uint64_t head)
{
    struct mts_slot *s = mts_slot_at(g, listener);
    const uint32_t *queue = (const uint32_t *)mts_rx_data(g, listener);
    if (!s)
        return -2;
    uint64_t tail = MTS_LOAD(&s->rx.tail);
    while (tail != head) {
        if (head - tail > g->accept_capacity)
            return -2;
        uint32_t child = __atomic_load_n(&queue[tail % g->accept_capacity], __ATOMIC_RELAXED);
        if (__atomic_compare_exchange_n(&s->rx.tail, &tail, tail + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return child;
    }
    return -1;
}

/* The slot whose accept queue holds the connections `worker` received for
 * `listener`: the listener itself for its owner, else the sibling that
 * worker opened, if the id recorded is one of that worker's slots; -1 for
 * none. */
static inline int64_t mts_listener_part(const struct mts_geom *g, uint32_t listener, uint32_t worker)
{
    struct mts_slot *s = mts_slot_at(g, listener);
    if (!s || worker >= g->nworkers)
        return -1;
    if (mts_slot_worker(g, listener) == worker)
        return listener;
    uint32_t sibling = MTS_LOAD(&s->siblings[worker]) - 1;
    return mts_slot_worker(g, sibling) == worker ? (int64_t)sibling : -1;
}

/* The application accepts: a slot id within the geometry, or -1.  It looks
 * at the queue of `first_worker` (the worker of the core it runs on) first,
 * then at the others'. */
static inline int32_t mts_accept_pop(const struct mts_geom *g, uint32_t listener, uint32_t first_worker)
{
    for (uint32_t i = 0; i < g->nworkers; i++) {
        int64_t part = mts_listener_part(g, listener, (first_worker + i) % g->nworkers);
        if (part < 0)
            continue;
        int64_t child = mts_accept_take(g, (uint32_t)part, MTS_LOAD(&mts_slot_at(g, (uint32_t)part)->rx.head));
        if (child >= 0 && child < g->nslots)
            return (int32_t)child;
    }
    return -1;
}

/* Connections waiting in the listener's queue and its siblings'. */
static inline uint32_t mts_accept_pending(const struct mts_geom *g, uint32_t listener)
{
    uint32_t pending = 0;
    for (uint32_t w = 0; w < g->nworkers; w++) {
        int64_t part = mts_listener_part(g, listener, w);
        uint64_t used = part < 0 ? 0 : mts_ring_used(&mts_slot_at(g, (uint32_t)part)->rx);
        pending += used > g->accept_capacity ? 0 : (uint32_t)used;
    }
    return pending;
}

static inline struct mts_changes *mts_changes_at(const struct mts_geom *g, uint32_t worker)
{
    struct mts_changes *c = (struct mts_changes *)(g->base + g->changes_off + worker % g->nworkers * g->changes_stride);
    MTS_IN_REGION(g, c, sizeof(*c) + (uint64_t)g->changes_capacity * sizeof(uint32_t));
    return c;
}

static inline uint32_t *mts_change_entry(const struct mts_geom *g, uint32_t worker, uint64_t pos)
{
    return (uint32_t *)(mts_changes_at(g, worker) + 1) + (pos & (g->changes_capacity - 1));
}

/* A waiter is about to sleep until slot `id` changes: its bit goes into
 * the slot's interest first (then the waiter arms, then it re-checks). */
static inline void mts_slot_interest_add(const struct mts_geom *g, uint32_t id, uint32_t waiter)
{
    struct mts_slot *s = mts_slot_at(g, id);
    if (!s)
        return;
    uint32_t bit = waiter % MTS_INTEREST_BITS;
    uint64_t *word = &s->waiter_interest[bit / 64], mask = 1ull << (bit % 64);
    if (!(MTS_LOAD(word) & mask))
        __atomic_fetch_or(word, mask, __ATOMIC_SEQ_CST);
}

/* A worker publishes a slot's new state, then bumps event_seq, so a reader
 * that sees the new sequence number also sees the state behind it; then it
 * logs `logged_id` in its change log (*logged: its own count of entries),
 * so an epoll that reads the entry sees the state too.  A sibling listener
 * is logged as the listener the program holds, whose interest (after a
 * full fence: a waiter sets its bit, then re-checks the state) goes into
 * `interest`, the waiters to wake. */
static inline void mts_publish(const struct mts_geom *g, uint32_t worker, uint64_t *logged, uint64_t *interest,
                               uint32_t id, uint32_t logged_id, uint32_t state, uint32_t events, int32_t so_error)
{
    struct mts_slot *s = mts_slot_at(g, id);
    if (!s)
        return;
    if (so_error)
        MTS_STORE(&s->so_error, so_error);
    MTS_STORE(&s->events, events);
    MTS_STORE(&s->state, state);
    __atomic_add_fetch(&s->event_seq, 1, __ATOMIC_ACQ_REL);
    __atomic_store_n(mts_change_entry(g, worker, *logged), logged_id, __ATOMIC_RELAXED);
    MTS_STORE(&mts_changes_at(g, worker)->head, ++*logged);
    struct mts_slot *held = mts_slot_at(g, logged_id);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    for (unsigned i = 0; held && i < MTS_INTEREST_BITS / 64; i++)
        interest[i] |= MTS_LOAD(&held->waiter_interest[i]);
}

/* Completes a synchronous command on the slot and wakes its caller. */
static inline void mts_complete(struct mts_slot *s, int32_t result)
{
    s->op_result = result;
    MTS_STORE(&s->op_done, 1u);
    mts_futex_wake(&s->op_done);
}

/*
 * Receive-window updates.  The stack arms rx_notify before it reads the RX
 * ring's free space for a small advertised window; the application, after
 * consuming from the RX ring, takes the flag and sends MTS_OP_RXWIN.  The
 * full fences make each side see either the other's flag or its ring index
 * (a store followed by a load on both sides), so no window update is lost.
 */
static inline void mts_rx_arm_notify(struct mts_slot *s)
{
    __atomic_store_n(&s->rx_notify, 1u, __ATOMIC_SEQ_CST);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

static inline int mts_rx_take_notify(struct mts_slot *s)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return __atomic_load_n(&s->rx_notify, __ATOMIC_RELAXED) &&
           __atomic_exchange_n(&s->rx_notify, 0u, __ATOMIC_ACQ_REL);
}

/* The stack takes an MTS_OP_TX: clearing tx_pending with a full barrier
 * before it reads the TX ring's head pairs with the application's exchange
 * after its write, so either the stack sees the new bytes or the application
 * sees the flag clear and queues another MTS_OP_TX. */
static inline void mts_tx_clear_pending(struct mts_slot *s)
{
    __atomic_exchange_n(&s->tx_pending, 0u, __ATOMIC_SEQ_CST);
}

/* An interposer has sent a message on a worker's control socket (after the
 * send, so that a worker which sees the count move finds the message
 * queued). */
static inline void mts_ctl_post(const struct mts_geom *g, uint32_t worker)
{
    __atomic_add_fetch(&mts_worker_at(g, worker)->ctl_posted, 1u, __ATOMIC_RELEASE);
}

static inline uint32_t mts_ctl_posted(const struct mts_geom *g, uint32_t worker)
{
    return MTS_LOAD(&mts_worker_at(g, worker)->ctl_posted);
}

/* A worker announces it is about to sleep.  Returns 1 if it may (no command
 * arrived at its own dequeue position meanwhile), else clears the flag and
 * returns 0. */
static inline int mts_stack_try_sleep(const struct mts_geom *g, uint32_t worker, uint64_t pos)
{
    struct mts_worker *w = mts_worker_at(g, worker);
    __atomic_store_n(&w->sleeping, 1u, __ATOMIC_SEQ_CST);
    if (!mts_cmd_pending(g, worker, pos))
        return 1;
    __atomic_store_n(&w->sleeping, 0u, __ATOMIC_RELAXED);
    return 0;
}

/* A worker, for a process that ended without closing its descriptors
 * (killed, _exit): drops one reference for each word of its fd table
 * (MTS_CTL_REGISTER_PROCESS) that names a socket of the worker's whose slot
 * still has that generation, and writes to `closed` (at most `max`) the
 * slots whose last reference that was.  Returns how many it wrote.  The
 * table is the program's to write, so any word may hold anything. */
static inline uint32_t mts_release_fd_table(const struct mts_geom *g, uint32_t worker, const uint64_t *table,
                                            uint64_t words, uint32_t *closed, uint32_t max)
{
    uint32_t n = 0;
    for (uint64_t i = 0; i < words; i++) {
        uint64_t word = table[i];
        if ((word >> MTS_FD_KIND_SHIFT & 0xFF) != MTS_FD_STACK)
            continue;
        uint32_t id = (uint32_t)word & MTS_FD_PAYLOAD_MASK;
        if (mts_slot_worker(g, id) != worker)
            continue;
        struct mts_slot *s = mts_slot_at(g, id);
        if (MTS_LOAD(&s->generation) != (uint32_t)(word >> 32))
            continue;
        uint32_t refs = MTS_LOAD(&s->refcnt);
        while (refs && !__atomic_compare_exchange_n(&s->refcnt, &refs, refs - 1, 0, __ATOMIC_ACQ_REL,
                                                    __ATOMIC_ACQUIRE))
            ;
        if (refs == 1 && n < max)
            closed[n++] = id;
    }
    return n;
}

static inline void mts_stack_awake(const struct mts_geom *g, uint32_t worker)
{
    __atomic_store_n(&mts_worker_at(g, worker)->sleeping, 0u, __ATOMIC_RELAXED);
}

/* Readiness of a stack socket in epoll bits, derived from what both sides
 * publish: the interposer's poll/select/epoll all use this one rule. */
static inline uint32_t mts_slot_poll(const struct mts_geom *g, uint32_t id)
{
    struct mts_slot *s = mts_slot_at(g, id);
    if (!s)
        return EPOLLERR | EPOLLHUP;
    uint32_t state = MTS_LOAD(&s->state), events = MTS_LOAD(&s->events), mask = 0;
    if (MTS_LOAD(&s->so_error))
        mask |= EPOLLERR;
    switch (state) {
    case MTS_ST_LISTENING:
        if (mts_accept_pending(g, id))
            mask |= EPOLLIN | EPOLLRDNORM;
        return mask;
    case MTS_ST_CONNECTING:
        return mask;
    case MTS_ST_FRESH:
    case MTS_ST_BOUND:
        return mask | EPOLLOUT | EPOLLHUP;
    default:
        break;
    }
    if (mts_ring_used(&s->rx) || (events & (MTS_EV_RDHUP | MTS_EV_HUP)) || (s->app_flags & MTS_AF_SHUT_RD))
        mask |= EPOLLIN | EPOLLRDNORM;
    if (events & MTS_EV_RDHUP)
        mask |= EPOLLRDHUP;
    if (events & MTS_EV_HUP)
        mask |= EPOLLHUP | EPOLLOUT | EPOLLWRNORM;
    else if (state == MTS_ST_CONNECTED) {
        uint32_t limit = mts_buffer_limit(g->tx_size, s->opt_sndbuf);
        if (mts_ring_used_bounded(&s->tx, g->tx_size) + limit / 4 <= limit)
            mask |= EPOLLOUT | EPOLLWRNORM;
    }
    return mask;
}

#endif
