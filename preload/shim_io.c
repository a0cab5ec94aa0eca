/*
 * The data path of stack sockets: bytes move between the program's buffers
 * and the slot's rings in this thread, without a system call unless the
 * call has to wait.
 */
#include "shim.h"

#include <fcntl.h>
#include <stdlib.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <unistd.h>

extern void __chk_fail(void) __attribute__((noreturn));

static ssize_t fail(int err)
{
    errno = err;
    return -1;
}

/* Total length of an iovec array, or -1 if it does not fit an ssize_t. */
static ssize_t iov_total(const struct iovec *iov, int iovcnt)
{
    if (iovcnt < 0 || iovcnt > IOV_MAX)
        return -1;
    size_t total = 0;
    for (int i = 0; i < iovcnt; i++) {
        if (iov[i].iov_len > (size_t)SSIZE_MAX - total)
            return -1;
        total += iov[i].iov_len;
    }
    return (ssize_t)total;
}

static int nonblocking(struct mts_slot *s, int flags)
{
    return (flags & MSG_DONTWAIT) || (__atomic_load_n(&s->app_flags, __ATOMIC_RELAXED) & MTS_AF_NONBLOCK);
}

static int64_t deadline_for(uint32_t timeout_ms) { return timeout_ms ? shim_deadline_ms(timeout_ms) : SHIM_FOREVER; }

/* Moves bytes between a ring and iov minus its first `skip` bytes, one
 * element at a time, until `move` falls short.  `move` moves up to `want`
 * bytes at `at`, `done` bytes into the transfer, and returns how many. */
static size_t walk_iov(uint32_t slot, const struct iovec *iov, int iovcnt, size_t skip,
                       size_t (*move)(uint32_t slot, uint8_t *at, size_t want, size_t done))
{
    size_t done = 0;
    for (int i = 0; i < iovcnt; i++) {
        size_t len = iov[i].iov_len;
        if (skip >= len) {
            skip -= len;
            continue;
        }
        size_t want = len - skip;
        size_t moved = move(slot, (uint8_t *)iov[i].iov_base + skip, want, done);
        skip = 0;
        done += moved;
        if (moved < want)
            break;
    }
    return done;
}

/* ---- receiving --------------------------------------------------------------- */

static size_t peek_rx(uint32_t slot, uint8_t *at, size_t want, size_t done)
{
    return mts_ring_peek(&shim_slot(slot)->rx, mts_rx_data(&shim.geom, slot), shim.geom.rx_size, done, at, want);
}

/* Copies RX bytes into iov, skipping the first `skip` bytes of iov (already
 * filled); consumes them unless peeking.  Returns the bytes copied. */
static size_t copy_from_rx(uint32_t slot, const struct iovec *iov, int iovcnt, size_t skip, int peek)
{
    struct mts_slot *s = shim_slot(slot);
    size_t copied = walk_iov(slot, iov, iovcnt, skip, peek_rx);
    if (!peek && copied) {
        mts_ring_consume(&s->rx, copied);
        /* The stack asked to hear when the window reopens. */
        if (mts_rx_take_notify(s))
            shim_cmd_async(MTS_OP_RXWIN, slot, 0);
    }
    return copied;
}

static ssize_t recv_from_slot(uint32_t slot, const struct iovec *iov, int iovcnt, int flags)
{
    struct mts_slot *s = shim_slot(slot);
    ssize_t want = iov_total(iov, iovcnt);
    if (want < 0)
        return fail(EINVAL);
    if (flags & MSG_OOB)
        return fail(EINVAL);
    int peek = flags & MSG_PEEK, wait_all = (flags & MSG_WAITALL) && !peek;
    int64_t deadline = 0; /* computed at the first wait */
    size_t done = 0;
    for (;;) {
        uint32_t state = __atomic_load_n(&s->state, __ATOMIC_ACQUIRE);
        if (state == MTS_ST_FRESH || state == MTS_ST_BOUND || state == MTS_ST_LISTENING)
            return fail(ENOTCONN);
        if (want == 0)
            return 0;
        /* events before the ring: data the stack queued before the FIN it
         * reports is visible once the FIN is. */
        uint32_t events = __atomic_load_n(&s->events, __ATOMIC_ACQUIRE);
        if (mts_ring_used(&s->rx)) {
            done += copy_from_rx(slot, iov, iovcnt, done, peek);
            if (done == (size_t)want || !wait_all)
                return (ssize_t)done;
            continue;
        }
        if (!shim_stack_alive(0))
            return done ? (ssize_t)done : fail(ENETDOWN);
        if (__atomic_load_n(&s->so_error, __ATOMIC_ACQUIRE)) {
            if (done)
                return (ssize_t)done; /* the error waits for the next call */
            int err = __atomic_exchange_n(&s->so_error, 0, __ATOMIC_ACQ_REL);
            if (err)
                return fail(err);
        }
        if ((events & (MTS_EV_RDHUP | MTS_EV_HUP)) || state == MTS_ST_CLOSED ||
            (__atomic_load_n(&s->app_flags, __ATOMIC_RELAXED) & MTS_AF_SHUT_RD))
            return (ssize_t)done; /* end of stream */
        if (nonblocking(s, flags))
            return done ? (ssize_t)done : fail(EAGAIN);
        if (!deadline)
            deadline = deadline_for(s->opt_rcvtimeo_ms);
        if (shim_wait_slot(slot, EPOLLIN | EPOLLRDHUP, deadline) < 0)
            return done ? (ssize_t)done : -1;
    }
}

ssize_t shim_stack_recv(uint32_t slot, const struct iovec *iov, int iovcnt, int flags)
{
    ssize_t result = recv_from_slot(slot, iov, iovcnt, flags);
    shim_call_done();
    return result;
}

/* ---- sending ---------------------------------------------------------------- */

static ssize_t broken_pipe(int flags)
{
    if (!(flags & MSG_NOSIGNAL))
        raise(SIGPIPE);
    return fail(EPIPE);
}

/* Tells the stack the TX ring has new bytes, once per batch it has not yet
 * picked up.  The exchange is a full barrier after our head store. */
static void notify_tx(uint32_t slot)
{
    struct mts_slot *s = shim_slot(slot);
    if (__atomic_exchange_n(&s->tx_pending, 1, __ATOMIC_SEQ_CST) == 0 && shim_cmd_async(MTS_OP_TX, slot, 0) < 0)
        __atomic_store_n(&s->tx_pending, 0, __ATOMIC_RELEASE);
}

/* Whether the socket can take bytes now.  Returns 1 (send), 0 (wait until
 * connected) or -1 with errno (and SIGPIPE where due). */
static int send_allowed(struct mts_slot *s, int flags)
{
    uint32_t state = __atomic_load_n(&s->state, __ATOMIC_ACQUIRE);
    uint32_t events = __atomic_load_n(&s->events, __ATOMIC_ACQUIRE);
    if (__atomic_load_n(&s->app_flags, __ATOMIC_RELAXED) & MTS_AF_SHUT_WR)
        return (int)broken_pipe(flags);
    if (!shim_stack_alive(0))
        return (int)fail(ENETDOWN);
    if (state == MTS_ST_CLOSED || (events & MTS_EV_HUP)) {
        int err = __atomic_exchange_n(&s->so_error, 0, __ATOMIC_ACQ_REL);
        return err ? (int)fail(err) : (int)broken_pipe(flags);
    }
    if (state == MTS_ST_CONNECTING)
        return 0;
    if (state != MTS_ST_CONNECTED)
        return (int)broken_pipe(flags); /* Linux answers EPIPE on an unconnected TCP socket */
    return 1;
}

/* What the program may still queue: its SO_SNDBUF, at most the ring. */
static uint64_t tx_room(const struct mts_slot *s)
{
    uint64_t limit = mts_buffer_limit(shim.geom.tx_size, s->opt_sndbuf);
    uint64_t used = mts_ring_used(&s->tx);
    return used < limit ? limit - used : 0;
}

static size_t write_tx(uint32_t slot, uint8_t *at, size_t want, size_t done)
{
    (void)done; /* the ring's head says where */
    struct mts_slot *s = shim_slot(slot);
    uint64_t room = tx_room(s);
    return mts_ring_write(&s->tx, mts_tx_data(&shim.geom, slot), shim.geom.tx_size, at,
                          want < room ? want : room);
}

/* Around each write to the TX ring, the producer's page rule
 * (mts_ring_pages_before_write), its bookkeeping in the slot. */
static void tx_before_write(struct mts_slot *s, uint32_t slot)
{
    mts_ring_pages_before_write(&s->tx.pages, mts_tx_data(&shim.geom, slot), shim.geom.tx_size, s->tx.head,
                                mts_ring_used_bounded(&s->tx, shim.geom.tx_size));
}

static void tx_wrote(struct mts_slot *s)
{
    mts_ring_pages_wrote(&s->tx.pages, mts_ring_used_bounded(&s->tx, shim.geom.tx_size));
}

/* Copies iov (minus its first `skip` bytes) into the TX ring as far as it
 * fits.  Returns the bytes taken. */
static size_t copy_to_tx(uint32_t slot, const struct iovec *iov, int iovcnt, size_t skip)
{
    return walk_iov(slot, iov, iovcnt, skip, write_tx);
}

static ssize_t send_to_slot(uint32_t slot, const struct iovec *iov, int iovcnt, int flags)
{
    struct mts_slot *s = shim_slot(slot);
    ssize_t want = iov_total(iov, iovcnt);
    if (want < 0)
        return fail(EINVAL);
    int64_t deadline = 0;
    size_t done = 0;
    for (;;) {
        int allowed = send_allowed(s, flags);
        if (allowed < 0)
            return done ? (ssize_t)done : -1;
        if (allowed) {
            if (want == 0)
                return 0;
            tx_before_write(s, slot);
            size_t put = copy_to_tx(slot, iov, iovcnt, done);
            if (put) {
                tx_wrote(s);
                done += put;
                notify_tx(slot);
            }
            if (done == (size_t)want)
                return (ssize_t)done;
        }
        if (nonblocking(s, flags))
            return done ? (ssize_t)done : fail(EAGAIN);
        if (!deadline)
            deadline = deadline_for(s->opt_sndtimeo_ms);
        if (shim_wait_slot(slot, EPOLLOUT, deadline) < 0)
            return done ? (ssize_t)done : -1;
    }
}

ssize_t shim_stack_send(uint32_t slot, const struct iovec *iov, int iovcnt, int flags)
{
    ssize_t result = send_to_slot(slot, iov, iovcnt, flags);
    shim_call_done();
    return result;
}

/* ---- sendfile --------------------------------------------------------------- */

/* Reads up to `count` bytes of in_fd straight into the free part of the TX
 * ring (two pieces when it wraps).  Returns bytes read, 0 at end of file,
 * -1 with errno. */
static ssize_t file_to_tx(uint32_t slot, int in_fd, off_t *pos, size_t count)
{
    struct mts_slot *s = shim_slot(slot);
    uint8_t *data = mts_tx_data(&shim.geom, slot);
    uint32_t cap = shim.geom.tx_size;
    uint64_t head = s->tx.head;
    uint64_t room = tx_room(s);
    if (count > room)
        count = room;
    size_t total = 0;
    while (total < count) {
        uint64_t at = (head + total) & (cap - 1);
        size_t piece = count - total < cap - at ? count - total : cap - at;
        ssize_t got = pos ? pread(in_fd, data + at, piece, *pos + (off_t)total)
                          : shim_real.read(in_fd, data + at, piece);
        if (got < 0) {
            if (total)
                break;
            return -1;
        }
        total += (size_t)got;
        if ((size_t)got < piece)
            break;
    }
    __atomic_store_n(&s->tx.head, head + total, __ATOMIC_RELEASE);
    if (pos)
        *pos += (off_t)total;
    return (ssize_t)total;
}

/* Spans pay for their system calls (an fstat per call, a registration per
 * file and socket: a descriptor over the control socket and a command the
 * stack answers) only where they save copying many bytes: a span takes at
 * least SPAN_MIN bytes, and a file is registered for a send of at least
 * SPAN_REGISTER_MIN. */
#define SPAN_MIN (16 << 10)
#define SPAN_REGISTER_MIN (256 << 10)

/* This process's registrations of files with the stack for one socket's
 * sendfile spans (see struct mts_span): the last MTS_TX_FILES, replaced
 * oldest first, as the stack forgets them. */
struct span_file {
    uint32_t generation; /* the slot's at registration: a reused slot starts over */
    uint32_t file;       /* its file number; SPAN_FILE_REFUSED: the stack will not map it */
    dev_t dev;
    ino_t ino;
};
struct socket_span_files {
    struct span_file known[MTS_TX_FILES];
    uint32_t registered; /* registrations kept so far: the next replaces known[registered % MTS_TX_FILES] */
};
#define SPAN_FILE_REFUSED UINT32_MAX

static struct socket_span_files *span_files; /* by slot id, allocated at first use */
static int spans_unsupported;                /* the stack takes no spans (capture, impairment, TAP) */

/* The number under which the stack holds in_fd's file for this socket,
 * registering it for a send of `total` bytes or more; 0 when the bytes must
 * be copied instead. */
static uint32_t span_file_for(uint32_t slot, int in_fd, const struct stat *st, uint64_t total)
{
    if (__atomic_load_n(&spans_unsupported, __ATOMIC_RELAXED))
        return 0;
    struct socket_span_files *table = __atomic_load_n(&span_files, __ATOMIC_ACQUIRE);
    if (!table) {
        struct socket_span_files *fresh = calloc(shim.geom.nslots, sizeof(*fresh));
        if (!fresh)
            return 0;
        if (__atomic_compare_exchange_n(&span_files, &table, fresh, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            table = fresh;
        else
            free(fresh);
    }
    struct mts_slot *s = shim_slot(slot);
    struct socket_span_files *mine = &table[slot];
    uint32_t generation = __atomic_load_n(&s->generation, __ATOMIC_RELAXED);
    for (int i = 0; i < MTS_TX_FILES; i++) {
        struct span_file *known = &mine->known[i];
        if (known->generation == generation && known->dev == st->st_dev && known->ino == st->st_ino && known->file)
            return known->file == SPAN_FILE_REFUSED ? 0 : known->file;
    }
    if (total < SPAN_REGISTER_MIN)
        return 0;
    uint32_t file;
    do
        file = __atomic_add_fetch(&s->tx_file_next, 1, __ATOMIC_RELAXED);
    while (file == 0 || file == SPAN_FILE_REFUSED);
    int result = shim_ctl_send_fd(mts_slot_worker(&shim.geom, slot), MTS_CTL_SEND_FILE, slot, file, in_fd) < 0 ? -errno
                                                                           : shim_cmd_sync(MTS_OP_FILE, slot, file);
    SHIM_DEBUG("slot %u: file %u for sendfile spans: %s", slot, file, result ? strerror(-result) : "taken");
    if (result == -EOPNOTSUPP)
        __atomic_store_n(&spans_unsupported, 1, __ATOMIC_RELAXED);
    if (result == 0 || result == -EBADF)  /* other refusals (EAGAIN: not established) are for now only */
        mine->known[mine->registered++ % MTS_TX_FILES] = (struct span_file){
            .generation = generation, .file = result ? SPAN_FILE_REFUSED : file, .dev = st->st_dev, .ino = st->st_ino};
    return result ? 0 : file;
}

/* Queues up to `count` bytes of in_fd's file from *pos (or its offset) as a
 * span: the ring's room is taken, its bytes are not written.  Returns the
 * bytes queued; 0 when a span does not pay or cannot be had (too short, not
 * a regular file, no free record, refused): the caller copies instead. */
static size_t file_span_to_tx(uint32_t slot, int in_fd, off_t *pos, size_t count)
{
    struct mts_slot *s = shim_slot(slot);
    uint64_t len = tx_room(s);
    if (count < SPAN_MIN || len < SPAN_MIN)
        return 0;
    uint32_t spans = s->tx_span_head;
    struct mts_span *record = &s->tx_spans[spans % MTS_TX_SPANS];
    if (record->pos + record->len > __atomic_load_n(&s->tx.tail, __ATOMIC_ACQUIRE))
        return 0; /* every record still describes unacknowledged bytes */
    struct stat st;
    off_t at = pos ? *pos : lseek(in_fd, 0, SEEK_CUR);
    if (at < 0 || fstat(in_fd, &st) < 0 || !S_ISREG(st.st_mode) || st.st_size <= at)
        return 0;
    uint64_t total = count < (uint64_t)(st.st_size - at) ? count : (uint64_t)(st.st_size - at);
    if (len > total)
        len = total;
    if (len < SPAN_MIN)
        return 0;
    uint32_t file = span_file_for(slot, in_fd, &st, total);
    if (!file || (!pos && lseek(in_fd, at + (off_t)len, SEEK_SET) < 0))
        return 0;
    uint64_t head = s->tx.head;
    *record = (struct mts_span){.pos = head, .offset = (uint64_t)at, .len = (uint32_t)len, .file = file};
    __atomic_store_n(&s->tx_span_head, spans + 1, __ATOMIC_RELEASE);
    __atomic_store_n(&s->tx.head, head + len, __ATOMIC_RELEASE);
    if (pos)
        *pos += (off_t)len;
    return len;
}

static ssize_t sendfile_to_slot(uint32_t slot, int in_fd, off_t *offset, size_t count)
{
    struct mts_slot *s = shim_slot(slot);
    int64_t deadline = 0;
    size_t done = 0;
    if (count > (size_t)SSIZE_MAX)
        count = (size_t)SSIZE_MAX;
    while (done < count) {
        int allowed = send_allowed(s, 0);
        if (allowed < 0)
            return done ? (ssize_t)done : -1;
        if (allowed && tx_room(s)) {
            tx_before_write(s, slot);
            ssize_t got = (ssize_t)file_span_to_tx(slot, in_fd, offset, count - done);
            if (!got)
                got = file_to_tx(slot, in_fd, offset, count - done);
            if (got < 0)
                return done ? (ssize_t)done : -1;
            if (got == 0)
                break; /* end of file */
            tx_wrote(s);
            done += (size_t)got;
            notify_tx(slot);
            continue;
        }
        if (nonblocking(s, 0))
            return done ? (ssize_t)done : fail(EAGAIN);
        if (!deadline)
            deadline = deadline_for(s->opt_sndtimeo_ms);
        if (shim_wait_slot(slot, EPOLLOUT, deadline) < 0)
            return done ? (ssize_t)done : -1;
    }
    return (ssize_t)done;
}

static ssize_t stack_sendfile(uint32_t slot, int in_fd, off_t *offset, size_t count)
{
    ssize_t result = sendfile_to_slot(slot, in_fd, offset, count);
    shim_call_done();
    return result;
}

/* ---- the interposed calls ------------------------------------------------------ */

ssize_t read(int fd, void *buf, size_t n)
{
    uint32_t slot;
    if (!shim_stack_fd(fd, &slot))
        return shim_real.read(fd, buf, n);
    struct iovec iov = {buf, n};
    return shim_stack_recv(slot, &iov, 1, 0);
}

ssize_t __read_chk(int fd, void *buf, size_t n, size_t buflen)
{
    if (n > buflen)
        __chk_fail();
    return read(fd, buf, n);
}

ssize_t readv(int fd, const struct iovec *iov, int iovcnt)
{
    uint32_t slot;
    if (!shim_stack_fd(fd, &slot))
        return shim_real.readv(fd, iov, iovcnt);
    return shim_stack_recv(slot, iov, iovcnt, 0);
}

ssize_t recv(int fd, void *buf, size_t n, int flags)
{
    uint32_t slot;
    if (!shim_stack_fd(fd, &slot))
        return shim_real.recv(fd, buf, n, flags);
    struct iovec iov = {buf, n};
    return shim_stack_recv(slot, &iov, 1, flags);
}

ssize_t __recv_chk(int fd, void *buf, size_t n, size_t buflen, int flags)
{
    if (n > buflen)
        __chk_fail();
    return recv(fd, buf, n, flags);
}

ssize_t recvfrom(int fd, void *buf, size_t n, int flags, struct sockaddr *addr, socklen_t *addrlen)
{
    uint32_t slot;
    if (!shim_stack_fd(fd, &slot))
        return shim_real.recvfrom(fd, buf, n, flags, addr, addrlen);
    struct iovec iov = {buf, n};
    ssize_t got = shim_stack_recv(slot, &iov, 1, flags);
    if (got >= 0 && addr && addrlen)
        *addrlen = 0; /* a TCP socket reports no source address */
    return got;
}

ssize_t __recvfrom_chk(int fd, void *buf, size_t n, size_t buflen, int flags, struct sockaddr *addr,
                       socklen_t *addrlen)
{
    if (n > buflen)
        __chk_fail();
    return recvfrom(fd, buf, n, flags, addr, addrlen);
}

ssize_t recvmsg(int fd, struct msghdr *msg, int flags)
{
    uint32_t slot;
    if (!shim_stack_fd(fd, &slot)) {
        ssize_t got = shim_real.recvmsg(fd, msg, flags);
        if (got >= 0 && msg->msg_controllen && shim.active && !shim_busy)
            shim_adopt_rights(msg);
        return got;
    }
    ssize_t got = shim_stack_recv(slot, msg->msg_iov, (int)msg->msg_iovlen, flags);
    if (got >= 0) {
        msg->msg_namelen = 0;
        msg->msg_controllen = 0;
        msg->msg_flags = 0;
    }
    return got;
}

ssize_t write(int fd, const void *buf, size_t n)
{
    uint32_t slot;
    if (!shim_stack_fd(fd, &slot))
        return shim_real.write(fd, buf, n);
    struct iovec iov = {(void *)buf, n};
    return shim_stack_send(slot, &iov, 1, 0);
}

ssize_t writev(int fd, const struct iovec *iov, int iovcnt)
{
    uint32_t slot;
    if (!shim_stack_fd(fd, &slot))
        return shim_real.writev(fd, iov, iovcnt);
    return shim_stack_send(slot, iov, iovcnt, 0);
}

ssize_t send(int fd, const void *buf, size_t n, int flags)
{
    uint32_t slot;
    if (!shim_stack_fd(fd, &slot))
        return shim_real.send(fd, buf, n, flags);
    struct iovec iov = {(void *)buf, n};
    return shim_stack_send(slot, &iov, 1, flags);
}

/* A connected TCP socket ignores the destination, as Linux does. */
ssize_t sendto(int fd, const void *buf, size_t n, int flags, const struct sockaddr *addr, socklen_t addrlen)
{
    uint32_t slot;
    if (!shim_stack_fd(fd, &slot))
        return shim_real.sendto(fd, buf, n, flags, addr, addrlen);
    struct iovec iov = {(void *)buf, n};
    return shim_stack_send(slot, &iov, 1, flags);
}

ssize_t sendmsg(int fd, const struct msghdr *msg, int flags)
{
    uint32_t slot;
    if (!shim_stack_fd(fd, &slot))
        return msg && msg->msg_controllen && shim.active && !shim_busy ? shim_send_rights(fd, msg, flags)
                                                                      : shim_real.sendmsg(fd, msg, flags);
    return shim_stack_send(slot, msg->msg_iov, (int)msg->msg_iovlen, flags);
}

/* sendmmsg and recvmmsg on a stream socket: one message after another,
 * as Linux does (each message whole, or the count so far). */
int sendmmsg(int fd, struct mmsghdr *vec, unsigned int n, int flags)
{
    uint32_t slot;
    if (!shim_stack_fd(fd, &slot))
        return shim_real.sendmmsg(fd, vec, n, flags);
    unsigned int sent = 0;
    for (; sent < n && sent < UIO_MAXIOV; sent++) {
        ssize_t got = shim_stack_send(slot, vec[sent].msg_hdr.msg_iov, (int)vec[sent].msg_hdr.msg_iovlen, flags);
        if (got < 0)
            return sent ? (int)sent : -1;
        vec[sent].msg_len = (unsigned int)got;
    }
    return (int)sent;
}

int recvmmsg(int fd, struct mmsghdr *vec, unsigned int n, int flags, struct timespec *timeout)
{
    uint32_t slot;
    if (!shim_stack_fd(fd, &slot))
        return shim_real.recvmmsg(fd, vec, n, flags, timeout);
    unsigned int got = 0;
    for (; got < n && got < UIO_MAXIOV; got++) {
        /* After the first message, MSG_WAITFORONE takes only what is there. */
        int these = got && (flags & MSG_WAITFORONE) ? flags | MSG_DONTWAIT : flags;
        ssize_t size = shim_stack_recv(slot, vec[got].msg_hdr.msg_iov, (int)vec[got].msg_hdr.msg_iovlen,
                                       these & ~MSG_WAITFORONE);
        if (size < 0)
            return got ? (int)got : -1;
        vec[got].msg_hdr.msg_namelen = 0;
        vec[got].msg_hdr.msg_controllen = 0;
        vec[got].msg_hdr.msg_flags = 0;
        vec[got].msg_len = (unsigned int)size;
        if (size == 0)
            return (int)got + 1; /* end of stream */
    }
    return (int)got;
}

ssize_t sendfile(int out_fd, int in_fd, off_t *offset, size_t count)
{
    uint32_t slot;
    if (!shim_stack_fd(out_fd, &slot))
        return shim_real.sendfile(out_fd, in_fd, offset, count);
    return stack_sendfile(slot, in_fd, offset, count);
}

/* off_t is 64 bits on every target this builds for (LP64). */
_Static_assert(sizeof(off_t) == sizeof(off64_t), "sendfile64 aliases sendfile");
ssize_t sendfile64(int out_fd, int in_fd, off64_t *offset, size_t count)
{
    return sendfile(out_fd, in_fd, (off_t *)offset, count);
}
