/*
 * Descriptor calls on stack sockets and on the interposer's own fds: close,
 * close_range, dup in all its forms, fcntl and ioctl.  The kernel still does
 * the descriptor work on the placeholder; the table follows it.
 */
#include "shim.h"

#include <fcntl.h>
#include <linux/close_range.h>
#include <linux/sockios.h>
#include <stdarg.h>
#include <sys/ioctl.h>

/* Takes the references a new descriptor number adds to what `word` names. */
static void add_reference(int from_fd, int to_fd, uint64_t word)
{
    switch (shim_fd_kind_of(word)) {
    case SHIM_FD_STACK:
        if (shim_fd_current(word)) /* a descriptor of a socket gone since holds nothing */
            __atomic_add_fetch(&shim_slot(shim_fd_payload(word))->refcnt, 1, __ATOMIC_ACQ_REL);
        shim_fd_set_stack(to_fd, shim_fd_payload(word), shim_fd_generation(word));
        break;
    case SHIM_FD_EPOLL:
        shim_epoll_ref(from_fd, to_fd);
        shim_fd_set(to_fd, SHIM_FD_EPOLL, 0);
        break;
    default:
        shim_fd_clear(to_fd); /* a number whose earlier life we missed */
        break;
    }
}

/* Drops what `old_word` held through fd, whose table entry is already clear. */
static void drop_references(int fd, uint64_t old_word)
{
    switch (shim_fd_kind_of(old_word)) {
    case SHIM_FD_STACK:
        shim_epoll_forget_fd(fd);
        shim_slot_unref(shim_fd_payload(old_word), shim_fd_generation(old_word));
        break;
    case SHIM_FD_EPOLL:
        shim_epoll_unref(fd);
        break;
    default:
        break;
    }
}

void shim_fd_release(int fd, uint64_t old_word)
{
    shim_fd_clear(fd);
    drop_references(fd, old_word);
}

static int tracked(uint64_t word)
{
    enum shim_fd_kind kind = shim_fd_kind_of(word);
    return kind == SHIM_FD_STACK || kind == SHIM_FD_EPOLL || kind == SHIM_FD_CANDIDATE;
}

/* Closes a tracked fd, the fd lock held.  Its table entry goes before the
 * number: once the kernel has freed it, another thread may get it back
 * (accept's eventfd, socket) and record it without our lock; a clear after
 * the close would wipe that record, and the new stack socket would pass for
 * a kernel fd (found by the hostile-region fuzzer: an accepted connection's
 * reads went to the placeholder eventfd, and the download hung). */
static int close_tracked(int fd, uint64_t word)
{
    shim_fd_clear(fd);
    int result = shim_real.close(fd);
    int err = errno;
    /* Linux frees the number even when close reports an I/O error. */
    if (result == 0 || err != EBADF) {
        drop_references(fd, word);
    } else {
        uint64_t clear = 0; /* not open: the entry as it was, unless the number is taken already */
        __atomic_compare_exchange_n(&shim_fd_table[fd], &clear, word, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
    }
    errno = err;
    return result;
}

int close(int fd)
{
    shim_ensure_init();
    uint64_t word = shim_busy ? 0 : shim_fd_word(fd);
    if (shim_fd_kind_of(word) == SHIM_FD_INTERNAL) {
        SHIM_DEBUG("close(%d): the interposer's own fd, kept open", fd);
        return 0;
    }
    if (!tracked(word))
        return shim_real.close(fd);
    shim_fd_lock();
    int result = close_tracked(fd, shim_fd_word(fd));
    shim_fd_unlock();
    return result;
}

int close_range(unsigned int first, unsigned int last, int flags)
{
    shim_ensure_init();
    if (!shim.active || shim_busy || first > last)
        return shim_real.close_range(first, last, flags);
    /* Cut the range around our own descriptors, which must survive. */
    shim_fd_lock();
    unsigned int high = (unsigned int)shim_fd_highest(), from = first;
    int result = 0;
    if (!flags) {
        /* Ours one by one first, entry before number (see close_tracked). */
        for (unsigned int fd = first; fd <= last && fd <= high; fd++) {
            uint64_t word = shim_fd_word((int)fd);
            if (tracked(word))
                close_tracked((int)fd, word);
        }
    }
    for (unsigned int fd = first; fd <= last && fd <= high && result == 0; fd++) {
        if (shim_fd_kind_of(shim_fd_word((int)fd)) != SHIM_FD_INTERNAL)
            continue;
        if (from < fd)
            result = shim_real.close_range(from, fd - 1, flags);
        from = fd + 1;
    }
    if (result == 0 && from <= last)
        result = shim_real.close_range(from, last, flags);
    int err = errno;
    if (result == 0 && !(flags & CLOSE_RANGE_CLOEXEC)) {
        for (unsigned int fd = first; fd <= last && fd <= high; fd++) {
            uint64_t word = shim_fd_word((int)fd);
            if (tracked(word))
                shim_fd_release((int)fd, word);
        }
    }
    shim_fd_unlock();
    errno = err;
    return result;
}

void closefrom(int lowfd)
{
    close_range(lowfd < 0 ? 0 : (unsigned int)lowfd, ~0u, 0);
}

int dup(int fd)
{
    shim_ensure_init();
    if (!shim.active || shim_busy)
        return shim_real.dup(fd);
    shim_fd_lock();
    uint64_t word = shim_fd_word(fd);
    int copy = shim_real.dup(fd);
    if (copy >= 0)
        add_reference(fd, copy, word);
    shim_fd_unlock();
    return copy;
}

/* dup2 and dup3: the target number is closed first if it was in use. */
static int dup_onto(int fd, int target, int flags, int three)
{
    shim_ensure_init();
    if (!shim.active || shim_busy || fd == target)
        return three ? shim_real.dup3(fd, target, flags) : shim_real.dup2(fd, target);
    if (shim_fd_kind_of(shim_fd_word(target)) == SHIM_FD_INTERNAL && shim_internal_relocate(target) < 0) {
        errno = EBUSY;
        return -1;
    }
    shim_fd_lock();
    uint64_t word = shim_fd_word(fd), replaced = shim_fd_word(target);
    int result = three ? shim_real.dup3(fd, target, flags) : shim_real.dup2(fd, target);
    if (result >= 0) {
        if (tracked(replaced))
            shim_fd_release(target, replaced);
        add_reference(fd, target, word);
        if (shim_fd_kind_of(word) == SHIM_FD_STACK)
            SHIM_DEBUG("dup %d onto %d", fd, target);
    }
    shim_fd_unlock();
    return result;
}

int dup2(int fd, int target) { return dup_onto(fd, target, 0, 0); }
int dup3(int fd, int target, int flags) { return dup_onto(fd, target, flags, 1); }

static int shim_fcntl(int fd, int cmd, uintptr_t arg)
{
    shim_ensure_init();
    if (!shim.active || shim_busy)
        return shim_real.fcntl(fd, cmd, arg);
    uint64_t word = shim_fd_word(fd);
    switch (cmd) {
    case F_DUPFD:
    case F_DUPFD_CLOEXEC: {
        shim_fd_lock();
        word = shim_fd_word(fd);
        int copy = shim_real.fcntl(fd, cmd, arg);
        if (copy >= 0)
            add_reference(fd, copy, word);
        shim_fd_unlock();
        return copy;
    }
    case F_SETFD:
        /* Ours must survive exec (the inherited four) or stay as they are. */
        if (shim_fd_kind_of(word) == SHIM_FD_INTERNAL)
            return 0;
        return shim_real.fcntl(fd, cmd, arg);
    case F_SETFL: {
        int result = shim_real.fcntl(fd, cmd, arg);
        if (result == 0 && shim_fd_kind_of(word) == SHIM_FD_STACK) {
            struct mts_slot *s = shim_slot(shim_fd_payload(word));
            if (arg & O_NONBLOCK)
                __atomic_or_fetch(&s->app_flags, MTS_AF_NONBLOCK, __ATOMIC_ACQ_REL);
            else
                __atomic_and_fetch(&s->app_flags, ~(uint32_t)MTS_AF_NONBLOCK, __ATOMIC_ACQ_REL);
        }
        return result;
    }
    default:
        return shim_real.fcntl(fd, cmd, arg);
    }
}

/* Every fcntl argument is an int or a pointer: both travel in one register. */
int fcntl(int fd, int cmd, ...)
{
    va_list ap;
    va_start(ap, cmd);
    uintptr_t arg = va_arg(ap, uintptr_t);
    va_end(ap);
    return shim_fcntl(fd, cmd, arg);
}

/* Large-file builds call fcntl64: the same function on a 64-bit system. */
int fcntl64(int fd, int cmd, ...) __attribute__((alias("fcntl")));

int ioctl(int fd, unsigned long request, ...)
{
    va_list ap;
    va_start(ap, request);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    uint32_t slot;
    if (!shim_stack_fd(fd, &slot))
        return shim_real.ioctl(fd, request, arg);
    struct mts_slot *s = shim_slot(slot);
    switch (request) {
    case FIONBIO: {
        int result = shim_real.ioctl(fd, request, arg); /* the placeholder's O_NONBLOCK too */
        if (result == 0) {
            if (*(int *)arg)
                __atomic_or_fetch(&s->app_flags, MTS_AF_NONBLOCK, __ATOMIC_ACQ_REL);
            else
                __atomic_and_fetch(&s->app_flags, ~(uint32_t)MTS_AF_NONBLOCK, __ATOMIC_ACQ_REL);
        }
        return result;
    }
    case FIONREAD: /* == SIOCINQ */
        if (__atomic_load_n(&s->state, __ATOMIC_ACQUIRE) == MTS_ST_LISTENING) {
            errno = EINVAL;
            return -1;
        }
        *(int *)arg = (int)mts_ring_used_bounded(&s->rx, shim.geom.rx_size);
        return 0;
    case SIOCOUTQ:
        *(int *)arg = (int)mts_ring_used_bounded(&s->tx, shim.geom.tx_size);
        return 0;
    default:
        return shim_real.ioctl(fd, request, arg);
    }
}

/* ---- what the kernel would say of a socket --------------------------------- */

/* A stack socket's placeholder is an eventfd: fstat says what it says of a
 * socket (S_IFSOCK), as a program that checks S_ISSOCK expects (socket
 * activation, inetd-style servers checking their stdin). */
static int as_socket(int fd, struct stat *st, int result)
{
    uint32_t slot;
    if (result == 0 && shim_stack_fd(fd, &slot)) {
        st->st_mode = S_IFSOCK | 0777;
        st->st_size = 0;
        st->st_blocks = 0;
    }
    return result;
}

int fstat(int fd, struct stat *st) { return as_socket(fd, st, shim_real.fstat(fd, st)); }

_Static_assert(sizeof(struct stat) == sizeof(struct stat64), "fstat64 aliases fstat");
int fstat64(int fd, struct stat64 *st) { return fstat(fd, (struct stat *)st); }

/* What binaries built against glibc before 2.33 call. */
int __fxstat(int ver, int fd, struct stat *st) { return as_socket(fd, st, shim_real.__fxstat(ver, fd, st)); }
int __fxstat64(int ver, int fd, struct stat64 *st) { return __fxstat(ver, fd, (struct stat *)st); }

/* ---- not supported on stack sockets: one line, and the kernel's errno --------- */

static ssize_t unsupported(const char *call, int fd, int *said)
{
    if (!__atomic_exchange_n(said, 1, __ATOMIC_RELAXED))
        shim_log("%s: fd %d is a stack socket, which %s does not support: EINVAL", call, fd, call);
    errno = EINVAL;
    return -1;
}

ssize_t splice(int in, loff_t *off_in, int out, loff_t *off_out, size_t len, unsigned int flags)
{
    static int said;
    uint32_t slot;
    if (shim_stack_fd(in, &slot) || shim_stack_fd(out, &slot))
        return unsupported("splice", shim_stack_fd(in, &slot) ? in : out, &said);
    return shim_real.splice(in, off_in, out, off_out, len, flags);
}

ssize_t tee(int in, int out, size_t len, unsigned int flags)
{
    static int said;
    uint32_t slot;
    if (shim_stack_fd(in, &slot) || shim_stack_fd(out, &slot))
        return unsupported("tee", shim_stack_fd(in, &slot) ? in : out, &said);
    return shim_real.tee(in, out, len, flags);
}
