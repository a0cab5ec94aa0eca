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
#include <sys/syscall.h>
#include <linux/futex.h>

#include "mtcpshim_abi.h"

_Static_assert(sizeof(struct mts_header) == 448, "mts_header layout");
_Static_assert(offsetof(struct mts_header, stack_sleeping) % MTS_CACHELINE == 0, "sleep flag line");
_Static_assert(sizeof(struct mts_waiter) == 16, "mts_waiter layout");
_Static_assert(sizeof(struct mts_cmd) == 32, "mts_cmd layout");
_Static_assert(sizeof(struct mts_cmdq) == 128, "mts_cmdq layout");
_Static_assert(sizeof(struct mts_ring) == 128, "mts_ring layout");
_Static_assert(offsetof(struct mts_slot, rx) == 256, "mts_slot rings aligned");
_Static_assert(sizeof(struct mts_slot) == 512, "mts_slot layout");

/* The functions cffi wraps for the stack: mtcpshim/abi_source.py hands the
 * lines between the markers to cffi.  C compilers skip them. */
#ifdef MTS_CFFI_PROTOTYPES /* cdef-begin */
uint64_t mts_region_size(uint32_t nslots, uint32_t nwaiters, uint32_t cmd_capacity,
                         uint32_t rx_size, uint32_t tx_size);
void mts_region_init(void *base, uint32_t nslots, uint32_t nwaiters, uint32_t cmd_capacity,
                     uint32_t rx_size, uint32_t tx_size);
int mts_region_valid(const struct mts_header *h, uint64_t mapped_size);
struct mts_slot *mts_slot_at(struct mts_header *h, uint32_t id);
uint8_t *mts_rx_data(struct mts_header *h, uint32_t id);
uint8_t *mts_tx_data(struct mts_header *h, uint32_t id);
struct mts_waiter *mts_waiter_at(struct mts_header *h, uint32_t id);
int32_t mts_slot_alloc(struct mts_header *h);
void mts_slot_free(struct mts_header *h, uint32_t id);
int32_t mts_waiter_alloc(struct mts_header *h, int32_t pid);
void mts_waiter_free(struct mts_header *h, uint32_t id);
uint32_t mts_waiter_disarm(struct mts_waiter *w);
int mts_cmd_push(struct mts_header *h, uint32_t op, uint32_t slot, uint64_t arg);
int mts_cmd_pop(struct mts_header *h, struct mts_cmd *out);
int mts_cmd_pending(struct mts_header *h);
uint64_t mts_ring_used(const struct mts_ring *r);
uint64_t mts_ring_write(struct mts_ring *r, uint8_t *data, uint32_t cap, const void *src, uint64_t n);
uint64_t mts_ring_read(struct mts_ring *r, const uint8_t *data, uint32_t cap, void *dst, uint64_t n);
uint64_t mts_ring_peek(const struct mts_ring *r, const uint8_t *data, uint32_t cap,
                       uint64_t offset, void *dst, uint64_t n);
void mts_ring_consume(struct mts_ring *r, uint64_t n);
int mts_accept_push(struct mts_header *h, uint32_t listener, uint32_t child);
int32_t mts_accept_pop(struct mts_header *h, uint32_t listener);
uint32_t mts_accept_pending(struct mts_header *h, uint32_t listener);
void mts_publish(struct mts_slot *s, uint32_t state, uint32_t events, int32_t so_error);
void mts_complete(struct mts_slot *s, int32_t result);
void mts_rx_arm_notify(struct mts_slot *s);
void mts_tx_clear_pending(struct mts_slot *s);
int mts_rx_take_notify(struct mts_slot *s);
int mts_stack_try_sleep(struct mts_header *h);
void mts_stack_awake(struct mts_header *h);
uint32_t mts_slot_poll(struct mts_header *h, uint32_t id);
void mts_futex_wake(uint32_t *word);
int mts_futex_wait(uint32_t *word, uint32_t expected, int timeout_ms);
#endif /* cdef-end */

#define MTS_LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define MTS_STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)

static inline uint64_t mts_align(uint64_t n, uint64_t to) { return (n + to - 1) & ~(to - 1); }

static inline uint64_t mts_region_size(uint32_t nslots, uint32_t nwaiters, uint32_t cmd_capacity,
                                       uint32_t rx_size, uint32_t tx_size)
{
    uint64_t off = mts_align(sizeof(struct mts_header), 4096);
    off = mts_align(off + (uint64_t)nwaiters * sizeof(struct mts_waiter), MTS_CACHELINE);
    off = mts_align(off + sizeof(struct mts_cmdq) + (uint64_t)cmd_capacity * sizeof(struct mts_cmd), 4096);
    off = mts_align(off + (uint64_t)nslots * sizeof(struct mts_slot), 4096);
    return off + (uint64_t)nslots * ((uint64_t)rx_size + tx_size);
}

/* Lays out a zero-filled region (a fresh memfd is). */
static inline void mts_region_init(void *base, uint32_t nslots, uint32_t nwaiters, uint32_t cmd_capacity,
                                   uint32_t rx_size, uint32_t tx_size)
{
    struct mts_header *h = base;
    uint64_t off = mts_align(sizeof(struct mts_header), 4096);
    h->waiters_off = off;
    off = mts_align(off + (uint64_t)nwaiters * sizeof(struct mts_waiter), MTS_CACHELINE);
    h->cmdq_off = off;
    off = mts_align(off + sizeof(struct mts_cmdq) + (uint64_t)cmd_capacity * sizeof(struct mts_cmd), 4096);
    h->slots_off = off;
    off = mts_align(off + (uint64_t)nslots * sizeof(struct mts_slot), 4096);
    h->data_off = off;
    h->region_size = mts_region_size(nslots, nwaiters, cmd_capacity, rx_size, tx_size);
    h->header_size = sizeof(struct mts_header);
    h->nslots = nslots;
    h->nwaiters = nwaiters;
    h->cmd_capacity = cmd_capacity;
    h->rx_size = rx_size;
    h->tx_size = tx_size;
    struct mts_cmd *cells = (struct mts_cmd *)((char *)base + h->cmdq_off + sizeof(struct mts_cmdq));
    for (uint32_t i = 0; i < cmd_capacity; i++)
        cells[i].seq = i;
    h->version = MTS_VERSION;
    MTS_STORE(&h->magic, (uint64_t)MTS_MAGIC);
}

static inline int mts_region_valid(const struct mts_header *h, uint64_t mapped_size)
{
    return mapped_size >= sizeof(*h) && MTS_LOAD(&h->magic) == (uint64_t)MTS_MAGIC &&
           h->version == MTS_VERSION && h->header_size == sizeof(*h) && h->region_size <= mapped_size;
}

static inline struct mts_slot *mts_slot_at(struct mts_header *h, uint32_t id)
{
    return (struct mts_slot *)((char *)h + h->slots_off) + id;
}

static inline uint8_t *mts_rx_data(struct mts_header *h, uint32_t id)
{
    return (uint8_t *)h + h->data_off + (uint64_t)id * ((uint64_t)h->rx_size + h->tx_size);
}

static inline uint8_t *mts_tx_data(struct mts_header *h, uint32_t id)
{
    return mts_rx_data(h, id) + h->rx_size;
}

static inline struct mts_waiter *mts_waiter_at(struct mts_header *h, uint32_t id)
{
    return (struct mts_waiter *)((char *)h + h->waiters_off) + id;
}

/* Claims a free slot by compare-and-swap (both sides allocate: the
 * application at bind/connect, the stack for accepted connections) and resets
 * it.  Only the stack frees slots. */
static inline int32_t mts_slot_alloc(struct mts_header *h)
{
    uint32_t start = MTS_LOAD(&h->slot_hint);
    for (uint32_t i = 0; i < h->nslots; i++) {
        uint32_t id = (start + i) % h->nslots;
        struct mts_slot *s = mts_slot_at(h, id);
        uint32_t expected = MTS_SLOT_FREE;
        if (MTS_LOAD(&s->in_use) != MTS_SLOT_FREE ||
            !__atomic_compare_exchange_n(&s->in_use, &expected, MTS_SLOT_USED, 0,
                                         __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
            continue;
        uint32_t generation = s->generation + 1;
        memset((char *)s + offsetof(struct mts_slot, refcnt), 0,
               sizeof(*s) - offsetof(struct mts_slot, refcnt));
        s->generation = generation;
        MTS_STORE(&h->slot_hint, (id + 1) % h->nslots);
        return (int32_t)id;
    }
    return -1;
}

static inline void mts_slot_free(struct mts_header *h, uint32_t id)
{
    MTS_STORE(&mts_slot_at(h, id)->in_use, (uint32_t)MTS_SLOT_FREE);
}

static inline int32_t mts_waiter_alloc(struct mts_header *h, int32_t pid)
{
    for (uint32_t id = 0; id < h->nwaiters; id++) {
        struct mts_waiter *w = mts_waiter_at(h, id);
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

/* Called by the stack once it has closed its copy of the waiter's eventfd. */
static inline void mts_waiter_free(struct mts_header *h, uint32_t id)
{
    struct mts_waiter *w = mts_waiter_at(h, id);
    w->registered = 0;
    MTS_STORE(&w->in_use, 0u);
}

/* Returns 1 if the waiter was armed (its owner sleeps or is about to). */
static inline uint32_t mts_waiter_disarm(struct mts_waiter *w)
{
    return MTS_LOAD(&w->armed) && __atomic_exchange_n(&w->armed, 0u, __ATOMIC_ACQ_REL);
}

static inline struct mts_cmdq *mts_cmdq(struct mts_header *h)
{
    return (struct mts_cmdq *)((char *)h + h->cmdq_off);
}

static inline struct mts_cmd *mts_cmd_cell(struct mts_header *h, uint64_t pos)
{
    return (struct mts_cmd *)(mts_cmdq(h) + 1) + (pos & (h->cmd_capacity - 1));
}

/* Returns 0, or -1 when the queue is full. */
static inline int mts_cmd_push(struct mts_header *h, uint32_t op, uint32_t slot, uint64_t arg)
{
    struct mts_cmdq *q = mts_cmdq(h);
    uint64_t pos = __atomic_load_n(&q->enqueue_pos, __ATOMIC_RELAXED);
    for (;;) {
        struct mts_cmd *cell = mts_cmd_cell(h, pos);
        int64_t lag = (int64_t)(MTS_LOAD(&cell->seq) - pos);
        if (lag == 0) {
            if (__atomic_compare_exchange_n(&q->enqueue_pos, &pos, pos + 1, 1,
                                            __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
                cell->op = op;
                cell->slot = slot;
                cell->arg = arg;
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

/* Single consumer (the stack thread).  Returns 1 and fills *out, or 0. */
static inline int mts_cmd_pop(struct mts_header *h, struct mts_cmd *out)
{
    struct mts_cmdq *q = mts_cmdq(h);
    uint64_t pos = q->dequeue_pos;
    struct mts_cmd *cell = mts_cmd_cell(h, pos);
    if (MTS_LOAD(&cell->seq) != pos + 1)
        return 0;
    *out = *cell;
    MTS_STORE(&cell->seq, pos + h->cmd_capacity);
    q->dequeue_pos = pos + 1;
    return 1;
}

static inline int mts_cmd_pending(struct mts_header *h)
{
    struct mts_cmdq *q = mts_cmdq(h);
    return MTS_LOAD(&mts_cmd_cell(h, q->dequeue_pos)->seq) == q->dequeue_pos + 1;
}

static inline uint64_t mts_ring_used(const struct mts_ring *r)
{
    return MTS_LOAD(&r->head) - MTS_LOAD(&r->tail);
}

static inline void mts_copy_in(uint8_t *data, uint32_t cap, uint64_t pos, const void *src, uint64_t n)
{
    uint64_t at = pos & (cap - 1), first = cap - at < n ? cap - at : n;
    memcpy(data + at, src, first);
    memcpy(data, (const uint8_t *)src + first, n - first);
}

static inline void mts_copy_out(const uint8_t *data, uint32_t cap, uint64_t pos, void *dst, uint64_t n)
{
    uint64_t at = pos & (cap - 1), first = cap - at < n ? cap - at : n;
    memcpy(dst, data + at, first);
    memcpy((uint8_t *)dst + first, data, n - first);
}

/* Producer side: copies as much of src as fits, returns the bytes taken. */
static inline uint64_t mts_ring_write(struct mts_ring *r, uint8_t *data, uint32_t cap, const void *src, uint64_t n)
{
    uint64_t head = r->head, room = cap - (head - MTS_LOAD(&r->tail));
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
    mts_copy_out(data, cap, tail, dst, n);
    MTS_STORE(&r->tail, tail + n);
    return n;
}

/* Consumer side: copies bytes [offset, offset + n) past tail without consuming. */
static inline uint64_t mts_ring_peek(const struct mts_ring *r, const uint8_t *data, uint32_t cap,
                                     uint64_t offset, void *dst, uint64_t n)
{
    uint64_t tail = r->tail, used = MTS_LOAD(&r->head) - tail;
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

/* A listener's accept queue, in its RX area (see mtcpshim_abi.h). */
static inline uint32_t mts_accept_capacity(struct mts_header *h) { return h->rx_size / sizeof(uint32_t); }

static inline int mts_accept_push(struct mts_header *h, uint32_t listener, uint32_t child)
{
    struct mts_ring *r = &mts_slot_at(h, listener)->rx;
    uint32_t *queue = (uint32_t *)mts_rx_data(h, listener);
    uint64_t head = r->head;
    if (head - MTS_LOAD(&r->tail) >= mts_accept_capacity(h))
        return -1;
    queue[head % mts_accept_capacity(h)] = child;
    MTS_STORE(&r->head, head + 1);
    return 0;
}

/* Any number of consumers; returns a slot id or -1 when empty. */
static inline int32_t mts_accept_pop(struct mts_header *h, uint32_t listener)
{
    struct mts_ring *r = &mts_slot_at(h, listener)->rx;
    const uint32_t *queue = (const uint32_t *)mts_rx_data(h, listener);
    uint64_t tail = MTS_LOAD(&r->tail);
    while (tail != MTS_LOAD(&r->head)) {
        uint32_t child = __atomic_load_n(&queue[tail % mts_accept_capacity(h)], __ATOMIC_RELAXED);
        if (__atomic_compare_exchange_n(&r->tail, &tail, tail + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return (int32_t)child;
    }
    return -1;
}

static inline uint32_t mts_accept_pending(struct mts_header *h, uint32_t listener)
{
    return (uint32_t)mts_ring_used(&mts_slot_at(h, listener)->rx);
}

/* The stack publishes a slot's new state, then bumps event_seq, so a reader
 * that sees the new sequence number also sees the state behind it. */
static inline void mts_publish(struct mts_slot *s, uint32_t state, uint32_t events, int32_t so_error)
{
    if (so_error)
        MTS_STORE(&s->so_error, so_error);
    MTS_STORE(&s->events, events);
    MTS_STORE(&s->state, state);
    __atomic_add_fetch(&s->event_seq, 1, __ATOMIC_ACQ_REL);
}

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

/* The stack announces it is about to sleep.  Returns 1 if it may (no command
 * arrived meanwhile), else clears the flag and returns 0. */
static inline int mts_stack_try_sleep(struct mts_header *h)
{
    __atomic_store_n(&h->stack_sleeping, 1u, __ATOMIC_SEQ_CST);
    if (!mts_cmd_pending(h))
        return 1;
    __atomic_store_n(&h->stack_sleeping, 0u, __ATOMIC_RELAXED);
    return 0;
}

static inline void mts_stack_awake(struct mts_header *h)
{
    __atomic_store_n(&h->stack_sleeping, 0u, __ATOMIC_RELAXED);
}

/* Readiness of a stack socket in epoll bits, derived from what both sides
 * publish: the interposer's poll/select/epoll all use this one rule. */
static inline uint32_t mts_slot_poll(struct mts_header *h, uint32_t id)
{
    struct mts_slot *s = mts_slot_at(h, id);
    uint32_t state = MTS_LOAD(&s->state), events = MTS_LOAD(&s->events), mask = 0;
    if (MTS_LOAD(&s->so_error))
        mask |= EPOLLERR;
    switch (state) {
    case MTS_ST_LISTENING:
        if (mts_accept_pending(h, id))
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
    else if (state == MTS_ST_CONNECTED && h->tx_size - mts_ring_used(&s->tx) >= h->tx_size / 4)
        mask |= EPOLLOUT | EPOLLWRNORM;
    return mask;
}

#endif
