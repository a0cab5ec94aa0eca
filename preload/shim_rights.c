/*
 * Stack sockets passed over AF_UNIX sockets (SCM_RIGHTS): socket
 * activation, zero-downtime reloads, privilege-separated servers.
 *
 * The kernel carries the placeholder eventfd; its count names the slot
 * (MTS_PLACEHOLDER_TAG).  The sender takes a reference for each stack
 * socket in flight, as the kernel's in-flight file does, so that closing
 * its own copy at once cannot close the socket; the receiver's new
 * descriptor takes that reference over.
 */
#include "shim.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

/* Calls `each(fd)` for every descriptor the SCM_RIGHTS messages of `msg`
 * carry. */
static void for_each_right(const struct msghdr *msg, void (*each)(int fd, void *arg), void *arg)
{
    for (struct cmsghdr *cm = CMSG_FIRSTHDR((struct msghdr *)msg); cm; cm = CMSG_NXTHDR((struct msghdr *)msg, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS || cm->cmsg_len < CMSG_LEN(0))
            continue;
        const unsigned char *data = CMSG_DATA(cm);
        const unsigned char *end = (const unsigned char *)msg->msg_control + msg->msg_controllen;
        size_t count = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        if (data > end)
            return;
        if (count > (size_t)(end - data) / sizeof(int)) /* a length past the buffer: the kernel refuses it */
            count = (size_t)(end - data) / sizeof(int);
        for (size_t i = 0; i < count; i++) {
            int fd;
            memcpy(&fd, data + i * sizeof(int), sizeof(int)); /* CMSG_DATA need not be int-aligned */
            each(fd, arg);
        }
    }
}

static void count_stack_socket(int fd, void *found)
{
    uint64_t word = shim_fd_word(fd);
    if (shim_fd_kind_of(word) == SHIM_FD_STACK && shim_fd_current(word))
        (*(int *)found)++;
}

static void take_flight_reference(int fd, void *arg)
{
    (void)arg;
    uint64_t word = shim_fd_word(fd);
    if (shim_fd_kind_of(word) == SHIM_FD_STACK && shim_fd_current(word))
        __atomic_add_fetch(&shim_slot(shim_fd_payload(word))->refcnt, 1, __ATOMIC_ACQ_REL);
}

static void drop_flight_reference(int fd, void *arg)
{
    (void)arg;
    uint64_t word = shim_fd_word(fd);
    if (shim_fd_kind_of(word) == SHIM_FD_STACK && shim_fd_current(word))
        shim_slot_unref(shim_fd_payload(word), shim_fd_generation(word));
}

ssize_t shim_send_rights(int fd, const struct msghdr *msg, int flags)
{
    int stack_sockets = 0;
    for_each_right(msg, count_stack_socket, &stack_sockets);
    if (!stack_sockets)
        return shim_real.sendmsg(fd, msg, flags);
    /* Under the table's lock: another thread's close of one of them waits
     * until its flight reference is taken (or dropped again). */
    shim_fd_lock();
    for_each_right(msg, take_flight_reference, NULL);
    ssize_t sent = shim_real.sendmsg(fd, msg, flags);
    int err = errno;
    if (sent < 0)
        for_each_right(msg, drop_flight_reference, NULL);
    shim_fd_unlock();
    SHIM_DEBUG("sendmsg(%d): %d stack socket(s) in flight: %zd", fd, stack_sockets, sent);
    errno = err;
    return sent;
}

/* The count of eventfd `fd`, from its fdinfo; -1 if fd is no eventfd. */
static int64_t eventfd_count(int fd)
{
    char path[64], text[512];
    snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", fd);
    int info = open(path, O_RDONLY | O_CLOEXEC);
    if (info < 0)
        return -1;
    ssize_t n = shim_real.read(info, text, sizeof(text) - 1);
    shim_real.close(info);
    if (n <= 0)
        return -1;
    text[n] = 0;
    const char *line = strstr(text, "eventfd-count:");
    return line ? (int64_t)strtoull(line + strlen("eventfd-count:"), NULL, 16) : -1; /* printed in hex */
}

/* A received descriptor that is a placeholder of a live stack socket
 * becomes that socket here, with the reference its sender put in flight. */
static void adopt_right(int fd, void *arg)
{
    (void)arg;
    int64_t count = eventfd_count(fd);
    if (count < 0 || ((uint64_t)count & ~(uint64_t)MTS_PLACEHOLDER_SLOT_MASK) != MTS_PLACEHOLDER_TAG)
        return;
    uint32_t slot = (uint32_t)count & MTS_PLACEHOLDER_SLOT_MASK;
    if (slot >= shim.geom.nslots || !__atomic_load_n(&shim_slot(slot)->refcnt, __ATOMIC_ACQUIRE))
        return;
    shim_fd_set_stack(fd, slot, __atomic_load_n(&shim_slot(slot)->generation, __ATOMIC_ACQUIRE));
    SHIM_DEBUG("received fd %d: stack socket, slot %u", fd, slot);
}

void shim_adopt_rights(const struct msghdr *msg)
{
    shim_fd_lock();
    for_each_right(msg, adopt_right, NULL);
    shim_fd_unlock();
}
