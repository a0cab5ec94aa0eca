/*
 * poll, ppoll, select and pselect over a mix of stack and kernel fds.
 *
 * Stack fds are answered from the slots; the kernel fds go to the real ppoll
 * (with a zero timeout when a stack fd is ready already).  To sleep, the
 * thread's waiter eventfd and the death pipe join the kernel set.
 */
#include "shim.h"

#include <stdlib.h>

extern void __chk_fail(void) __attribute__((noreturn));

/* Linux gives poll and epoll the same bit values, so a slot's epoll mask is
 * its poll mask. */
_Static_assert(POLLIN == EPOLLIN && POLLPRI == EPOLLPRI && POLLOUT == EPOLLOUT && POLLERR == EPOLLERR &&
                   POLLHUP == EPOLLHUP && POLLRDNORM == EPOLLRDNORM && POLLWRNORM == EPOLLWRNORM &&
                   POLLRDHUP == EPOLLRDHUP,
               "poll and epoll bits agree");

#define LOCAL_POLLFDS 64

/* Whether a stack fd is among fds.  An epoll set among them is nested from
 * now on: readable while it holds a ready stack fd (shim_epoll.c). */
static int has_stack_fd(const struct pollfd *fds, nfds_t nfds)
{
    int stack = 0;
    for (nfds_t i = 0; i < nfds; i++) {
        enum shim_fd_kind kind = shim_fd_kind_of(shim_fd_word(fds[i].fd));
        stack |= kind == SHIM_FD_STACK;
        if (kind == SHIM_FD_EPOLL)
            shim_epoll_nest(fds[i].fd);
    }
    return stack;
}

/* Fills revents of the stack fds; returns how many are ready. */
static int stack_revents(struct pollfd *fds, const struct pollfd *kernel, nfds_t nfds)
{
    int ready = 0;
    for (nfds_t i = 0; i < nfds; i++) {
        if (kernel[i].fd >= 0 || fds[i].fd < 0)
            continue;
        uint64_t word = shim_fd_word(fds[i].fd);
        uint32_t mask = shim_slot_ready(shim_fd_payload(word));
        fds[i].revents = (short)(mask & ((uint16_t)fds[i].events | POLLERR | POLLHUP));
        ready += fds[i].revents != 0;
    }
    return ready;
}

/* Copies the kernel's answers back; returns how many kernel fds are ready. */
static int kernel_revents(struct pollfd *fds, const struct pollfd *kernel, nfds_t nfds)
{
    int ready = 0;
    for (nfds_t i = 0; i < nfds; i++) {
        if (kernel[i].fd < 0 && fds[i].fd >= 0)
            continue; /* a stack fd */
        fds[i].revents = kernel[i].revents;
        ready += kernel[i].revents != 0;
    }
    return ready;
}

int shim_poll_mixed(struct pollfd *fds, nfds_t nfds, int64_t deadline, const sigset_t *sigmask)
{
    struct pollfd local[LOCAL_POLLFDS], *kernel = local;
    if (nfds + 2 > LOCAL_POLLFDS && !(kernel = malloc((nfds + 2) * sizeof(*kernel)))) {
        errno = ENOMEM;
        return -1;
    }
    /* The kernel's copy: stack fds blanked out (poll skips negative fds),
     * then the death pipe and the waiter's eventfd. */
    for (nfds_t i = 0; i < nfds; i++) {
        kernel[i] = fds[i];
        kernel[i].revents = 0;
        if (shim_fd_kind_of(shim_fd_word(fds[i].fd)) == SHIM_FD_STACK)
            kernel[i].fd = -1;
    }
    kernel[nfds] = (struct pollfd){.fd = shim.death_fd, .events = POLLIN};
    kernel[nfds + 1] = (struct pollfd){.fd = -1, .events = POLLIN};
    struct timespec zero = {0, 0}, left;
    int result;
    int ready = stack_revents(fds, kernel, nfds);
    int expired = deadline != SHIM_FOREVER && shim_now_ns() >= deadline;
    if (!ready && !expired && shim.spin_ns > 0) {
        int64_t end = shim_now_ns() + shim.spin_ns;
        while (!(ready = stack_revents(fds, kernel, nfds)) && shim_now_ns() < end)
            ;
    }
    struct shim_waiter *sw = ready || expired ? NULL : shim_thread_waiter();
    for (nfds_t i = 0; sw && i < nfds; i++) {
        uint64_t word = shim_fd_word(fds[i].fd);
        if (shim_fd_kind_of(word) == SHIM_FD_STACK)
            mts_slot_interest_add(&shim.geom, shim_fd_payload(word), (uint32_t)sw->id);
    }
    for (;;) {
        if (sw) {
            kernel[nfds + 1].fd = sw->efd;
            shim_waiter_arm(sw);
            ready = stack_revents(fds, kernel, nfds);
        }
        if (ready) {
            if (sw)
                __atomic_store_n(&sw->w->armed, 0, __ATOMIC_RELEASE);
            /* The kernel fds' answers too, if only to clear stale revents. */
            result = shim_real.ppoll(kernel, nfds, &zero, NULL) < 0 ? -1 : ready + kernel_revents(fds, kernel, nfds);
            break;
        }
        const struct timespec *tp = shim_remaining(deadline, &left);
        struct timespec slice = {0, 1000000};
        if (!sw && (!tp || tp->tv_sec > 0 || tp->tv_nsec > slice.tv_nsec))
            tp = &slice; /* no waiter: nobody wakes us, look again soon */
        int n = shim_real.ppoll(kernel, nfds + 2, tp, sigmask);
        int err = errno;
        if (sw)
            shim_waiter_settle(sw);
        if (n < 0) {
            errno = err;
            result = -1;
            break;
        }
        if (kernel[nfds].revents)
            shim_mark_stack_dead("death pipe");
        result = kernel_revents(fds, kernel, nfds) + (ready = stack_revents(fds, kernel, nfds));
        if (result || (deadline != SHIM_FOREVER && shim_now_ns() >= deadline))
            break;
    }
    if (kernel != local)
        free(kernel);
    return result;
}

int ppoll(struct pollfd *fds, nfds_t nfds, const struct timespec *timeout, const sigset_t *sigmask)
{
    shim_ensure_init();
    if (!shim.active || shim_busy || !has_stack_fd(fds, nfds))
        return shim_real.ppoll(fds, nfds, timeout, sigmask);
    return shim_poll_mixed(fds, nfds, shim_deadline_ts(timeout), sigmask);
}

int poll(struct pollfd *fds, nfds_t nfds, int timeout)
{
    shim_ensure_init();
    if (!shim.active || shim_busy || !has_stack_fd(fds, nfds)) {
        struct timespec ts = {timeout / 1000, (long)(timeout % 1000) * 1000000};
        return shim_real.ppoll(fds, nfds, timeout < 0 ? NULL : &ts, NULL);
    }
    return shim_poll_mixed(fds, nfds, shim_deadline_ms(timeout), NULL);
}

int __poll_chk(struct pollfd *fds, nfds_t nfds, int timeout, size_t fdslen)
{
    if (fdslen / sizeof(*fds) < nfds)
        __chk_fail();
    return poll(fds, nfds, timeout);
}

int __ppoll_chk(struct pollfd *fds, nfds_t nfds, const struct timespec *timeout, const sigset_t *sigmask,
                size_t fdslen)
{
    if (fdslen / sizeof(*fds) < nfds)
        __chk_fail();
    return ppoll(fds, nfds, timeout, sigmask);
}

/* ---- select ---------------------------------------------------------------------- */

/* As has_stack_fd, for select's sets. */
static int sets_have_stack_fd(int nfds, fd_set *r, fd_set *w, fd_set *e)
{
    int high = shim_fd_highest(), stack = 0;
    for (int fd = 0; fd < nfds && fd <= high && fd < FD_SETSIZE; fd++) {
        if (!((r && FD_ISSET(fd, r)) || (w && FD_ISSET(fd, w)) || (e && FD_ISSET(fd, e))))
            continue;
        enum shim_fd_kind kind = shim_fd_kind_of(shim_fd_word(fd));
        stack |= kind == SHIM_FD_STACK;
        if (kind == SHIM_FD_EPOLL)
            shim_epoll_nest(fd);
    }
    return stack;
}

/* select as a poll over the same fds, with the kernel's readiness sets. */
static int select_mixed(int nfds, fd_set *r, fd_set *w, fd_set *e, int64_t deadline, const sigset_t *sigmask)
{
    if (nfds < 0 || nfds > FD_SETSIZE) {
        errno = EINVAL;
        return -1;
    }
    struct pollfd fds[FD_SETSIZE];
    nfds_t count = 0;
    for (int fd = 0; fd < nfds; fd++) {
        short events = (short)((r && FD_ISSET(fd, r) ? POLLIN : 0) | (w && FD_ISSET(fd, w) ? POLLOUT : 0) |
                               (e && FD_ISSET(fd, e) ? POLLPRI : 0));
        if (events)
            fds[count++] = (struct pollfd){.fd = fd, .events = events};
    }
    int n = shim_poll_mixed(fds, count, deadline, sigmask);
    if (n < 0)
        return -1;
    for (nfds_t i = 0; i < count; i++)
        if (fds[i].revents & POLLNVAL) {
            errno = EBADF;
            return -1;
        }
    int bits = 0;
    for (nfds_t i = 0; i < count; i++) {
        int fd = fds[i].fd;
        short got = fds[i].revents;
        if (r && FD_ISSET(fd, r) && !(got & (POLLIN | POLLRDNORM | POLLHUP | POLLERR)))
            FD_CLR(fd, r);
        if (w && FD_ISSET(fd, w) && !(got & (POLLOUT | POLLWRNORM | POLLERR)))
            FD_CLR(fd, w);
        if (e && FD_ISSET(fd, e) && !(got & POLLPRI))
            FD_CLR(fd, e);
        bits += (r && FD_ISSET(fd, r)) + (w && FD_ISSET(fd, w)) + (e && FD_ISSET(fd, e));
    }
    return bits;
}

int select(int nfds, fd_set *r, fd_set *w, fd_set *e, struct timeval *timeout)
{
    shim_ensure_init();
    if (!shim.active || shim_busy || !sets_have_stack_fd(nfds, r, w, e))
        return shim_real.select(nfds, r, w, e, timeout);
    if (timeout && (timeout->tv_sec < 0 || timeout->tv_usec < 0)) {
        errno = EINVAL;
        return -1;
    }
    int64_t deadline = timeout ? shim_deadline_ms((int64_t)timeout->tv_sec * 1000 + timeout->tv_usec / 1000)
                               : SHIM_FOREVER;
    int n = select_mixed(nfds, r, w, e, deadline, NULL);
    if (timeout) { /* Linux reports the time left */
        struct timespec left;
        shim_remaining(deadline, &left);
        timeout->tv_sec = left.tv_sec;
        timeout->tv_usec = left.tv_nsec / 1000;
    }
    return n;
}

int pselect(int nfds, fd_set *r, fd_set *w, fd_set *e, const struct timespec *timeout, const sigset_t *sigmask)
{
    shim_ensure_init();
    if (!shim.active || shim_busy || !sets_have_stack_fd(nfds, r, w, e))
        return shim_real.pselect(nfds, r, w, e, timeout, sigmask);
    if (timeout && (timeout->tv_sec < 0 || timeout->tv_nsec < 0 || timeout->tv_nsec >= 1000000000)) {
        errno = EINVAL;
        return -1;
    }
    return select_mixed(nfds, r, w, e, shim_deadline_ts(timeout), sigmask);
}
