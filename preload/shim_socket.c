/*
 * Socket calls: which sockets move to the stack, and the control path of
 * those that did (bind, listen, accept, connect, shutdown, names, options).
 */
#include "shim.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stddef.h>
#include <linux/capability.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>

#define SOCK_TYPE_MASK 0xf
#define MAX_BACKLOG 4096
/* Reported before the stack knows better (MTU 1500, no options). */
#define DEFAULT_MSS 1460

/* ---- which sockets belong to the stack ----------------------------------- */

static int is_loopback(uint32_t ip) { return ip >> 24 == 127; }
static int is_multicast(uint32_t ip) { return ip >> 28 == 14; }

/* A local address the stack serves. */
static int stack_serves(uint32_t ip) { return ip == INADDR_ANY || ip == shim.hdr->ip; }

/* A destination the stack routes: its prefix, or anything not local when it
 * has a gateway. */
static int stack_routes(uint32_t ip)
{
    if (ip == INADDR_ANY || is_loopback(ip) || is_multicast(ip) || ip == INADDR_BROADCAST)
        return 0;
    uint32_t prefix = shim.hdr->prefix_len;
    uint32_t mask = prefix == 0 ? 0 : prefix >= 32 ? ~0u : ~0u << (32 - prefix);
    return (ip & mask) == (shim.hdr->ip & mask) || shim.hdr->gateway != 0;
}

/* The namespace's privileged-port rule, as the kernel applies it at bind:
 * below net.ipv4.ip_unprivileged_port_start a port needs
 * CAP_NET_BIND_SERVICE (a worker that dropped to nobody cannot take 80). */
static int port_needs_privilege(uint16_t port)
{
    if (port == 0)
        return 0;
    long start = 1024;
    shim_busy++;
    int fd = open("/proc/sys/net/ipv4/ip_unprivileged_port_start", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        char text[16] = {0};
        if (shim_real.read(fd, text, sizeof(text) - 1) > 0)
            start = strtol(text, NULL, 10);
        shim_real.close(fd);
    }
    shim_busy--;
    if (port >= start)
        return 0;
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct caps[_LINUX_CAPABILITY_U32S_3];
    if (shim_raw_syscall(SYS_capget, &header, caps) != 0)
        return 1;
    return !(caps[CAP_TO_INDEX(CAP_NET_BIND_SERVICE)].effective & CAP_TO_MASK(CAP_NET_BIND_SERVICE));
}

/* The smallest sockaddr_in6 Linux takes (without sin6_scope_id). */
#define SIN6_LEN_RFC2133 24

/* The IPv4 address and port that `addr` names, in the family the program
 * made the socket with: a sockaddr_in, or for AF_INET6 a sockaddr_in6
 * holding `::` (any) or an IPv4-mapped address.  Returns 0; the errno Linux
 * gives a malformed address of that family; or -1 for a real IPv6 address,
 * which only the kernel can serve. */
static int ipv4_of(const struct sockaddr *addr, socklen_t len, int inet6, uint32_t *ip, uint16_t *port)
{
    if (!inet6) {
        struct sockaddr_in sin;
        if (!addr || len < (socklen_t)sizeof(sin))
            return EINVAL;
        memcpy(&sin, addr, sizeof(sin));
        if (sin.sin_family != AF_INET)
            return EAFNOSUPPORT;
        *ip = ntohl(sin.sin_addr.s_addr);
        *port = ntohs(sin.sin_port);
        return 0;
    }
    struct sockaddr_in6 sin6;
    if (!addr || len < SIN6_LEN_RFC2133)
        return EINVAL;
    memcpy(&sin6, addr, SIN6_LEN_RFC2133);
    if (sin6.sin6_family != AF_INET6)
        return EAFNOSUPPORT;
    *port = ntohs(sin6.sin6_port);
    if (IN6_IS_ADDR_UNSPECIFIED(&sin6.sin6_addr)) {
        *ip = INADDR_ANY;
        return 0;
    }
    if (!IN6_IS_ADDR_V4MAPPED(&sin6.sin6_addr))
        return -1;
    uint32_t mapped;
    memcpy(&mapped, &sin6.sin6_addr.s6_addr[12], sizeof(mapped));
    *ip = ntohl(mapped);
    return 0;
}

/* An AF_INET6 kernel socket that refuses IPv4 peers (IPV6_V6ONLY, whose
 * default is net.ipv6.bindv6only) stays the kernel's. */
static int kernel_v6only(int fd)
{
    int v6only = 0;
    socklen_t len = sizeof(v6only);
    return shim_real.getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &len) == 0 && v6only;
}

/* Whether a candidate (its fd word) is an AF_INET6 socket that cannot be
 * ours because it takes IPv6 peers only. */
static int candidate_v6only(int fd, uint64_t word)
{
    return (shim_fd_payload(word) & SHIM_CANDIDATE_INET6) && kernel_v6only(fd);
}

static int slot_inet6(uint32_t slot)
{
    return (__atomic_load_n(&shim_slot(slot)->app_flags, __ATOMIC_RELAXED) & MTS_AF_INET6) != 0;
}

static void ip_text(uint32_t ip, char out[16])
{
    struct in_addr a = {htonl(ip)};
    inet_ntop(AF_INET, &a, out, 16);
}

static int fail(int err)
{
    errno = err;
    return -1;
}

static uint32_t timeval_ms(const struct timeval *tv)
{
    uint64_t ms = (uint64_t)tv->tv_sec * 1000 + (uint64_t)(tv->tv_usec + 999) / 1000;
    return ms > UINT32_MAX ? UINT32_MAX : (uint32_t)ms;
}

/* ---- integer options ------------------------------------------------------ */

/* How setsockopt checks a value and getsockopt reads it back, as Linux. */
enum int_option_kind {
    OPT_FLAG,          /* any value, stored as 0 or 1 */
    OPT_RANGE,         /* lo..hi, else EINVAL */
    OPT_MSS,           /* 0 (unset) or lo..hi, else EINVAL; reads back the MSS in use */
    OPT_DEFER_SECONDS, /* negative is 0; read back as the SYN-ACK schedule covers it */
};

/* The integer options the slot keeps: each one's check, its field, what
 * getsockopt shows while the field is 0 (Linux's default) and the MTS_OPT_*
 * change the stack must hear of.  docs/socket-options.md says which the
 * stack honours. */
static const struct int_option {
    int level, name;
    enum int_option_kind kind;
    int lo, hi;
    size_t field;
    uint32_t unset;
    uint32_t change;
} int_options[] = {
#define FIELD(name) offsetof(struct mts_slot, name)
    {SOL_SOCKET, SO_REUSEADDR, OPT_FLAG, 0, 0, FIELD(opt_reuseaddr), 0, 0},
    {SOL_SOCKET, SO_REUSEPORT, OPT_FLAG, 0, 0, FIELD(opt_reuseport), 0, 0},
    {SOL_SOCKET, SO_KEEPALIVE, OPT_FLAG, 0, 0, FIELD(opt_keepalive), 0, MTS_OPT_KEEPALIVE},
    {IPPROTO_TCP, TCP_NODELAY, OPT_FLAG, 0, 0, FIELD(opt_nodelay), 0, MTS_OPT_NODELAY},
    {IPPROTO_TCP, TCP_CORK, OPT_FLAG, 0, 0, FIELD(opt_cork), 0, MTS_OPT_CORK},
    {IPPROTO_TCP, TCP_QUICKACK, OPT_FLAG, 0, 0, FIELD(opt_quickack), 0, 0},
    {IPPROTO_TCP, TCP_KEEPIDLE, OPT_RANGE, 1, 32767, FIELD(opt_keepidle), 7200, MTS_OPT_KEEPALIVE},
    {IPPROTO_TCP, TCP_KEEPINTVL, OPT_RANGE, 1, 32767, FIELD(opt_keepintvl), 75, MTS_OPT_KEEPALIVE},
    {IPPROTO_TCP, TCP_KEEPCNT, OPT_RANGE, 1, 127, FIELD(opt_keepcnt), 9, MTS_OPT_KEEPALIVE},
    {IPPROTO_TCP, TCP_USER_TIMEOUT, OPT_RANGE, 0, INT_MAX, FIELD(opt_user_timeout_ms), 0, MTS_OPT_USER_TIMEOUT},
    {IPPROTO_TCP, TCP_MAXSEG, OPT_MSS, 88, 32767, FIELD(opt_maxseg), 0, 0},
    {IPPROTO_TCP, TCP_DEFER_ACCEPT, OPT_DEFER_SECONDS, 0, 0, FIELD(opt_defer_accept), 0, 0},
#undef FIELD
};

static const struct int_option *int_option(int level, int name)
{
    for (size_t i = 0; i < sizeof(int_options) / sizeof(int_options[0]); i++)
        if (int_options[i].level == level && int_options[i].name == name)
            return &int_options[i];
    return NULL;
}

static uint32_t *int_option_field(struct mts_slot *s, const struct int_option *o)
{
    return (uint32_t *)((char *)s + o->field);
}

/* Linux keeps TCP_DEFER_ACCEPT as a count of SYN-ACK retransmissions
 * (1 s, doubling, at most 120 s apart) and reads back the seconds they
 * cover. */
static uint32_t defer_seconds_covered(uint32_t seconds)
{
    if (seconds == 0)
        return 0;
    uint32_t timeout = 1, covered = 1;
    for (int retransmits = 1; seconds > covered && retransmits < 255; retransmits++) {
        timeout = timeout * 2 > 120 ? 120 : timeout * 2;
        covered += timeout;
    }
    return covered;
}

/* setsockopt's value into the slot: 0, or -1 with errno. */
static int int_option_set(struct mts_slot *s, const struct int_option *o, int value)
{
    uint32_t *field = int_option_field(s, o);
    switch (o->kind) {
    case OPT_FLAG:
        *field = value != 0;
        return 0;
    case OPT_MSS:
        if (value == 0) {
            *field = 0;
            return 0;
        }
        /* fall through */
    case OPT_RANGE:
        if (value < o->lo || value > o->hi)
            return fail(EINVAL);
        *field = (uint32_t)value;
        return 0;
    case OPT_DEFER_SECONDS:
        *field = value > 0 ? (uint32_t)value : 0;
        return 0;
    }
    return fail(EINVAL);
}

static int int_option_get(struct mts_slot *s, const struct int_option *o)
{
    uint32_t value = *int_option_field(s, o);
    switch (o->kind) {
    case OPT_DEFER_SECONDS:
        return (int)defer_seconds_covered(value);
    case OPT_MSS: {
        /* Unconnected, Linux shows the setting or RFC 9293's default MSS. */
        uint32_t state = __atomic_load_n(&s->state, __ATOMIC_ACQUIRE);
        if (state != MTS_ST_CONNECTING && state != MTS_ST_CONNECTED)
            return value ? (int)value : 536;
        return value && value < DEFAULT_MSS ? (int)value : DEFAULT_MSS;
    }
    default:
        return (int)(value ? value : o->unset);
    }
}

static int congestion_known(const char *wanted);

/* Options the program set while the socket was still the kernel's. */
static void copy_kernel_options(int fd, uint32_t candidate, struct mts_slot *s)
{
    int v;
    socklen_t len;
    for (size_t i = 0; i < sizeof(int_options) / sizeof(int_options[0]); i++) {
        const struct int_option *o = &int_options[i];
        /* The kernel reads back its current MSS there, not a setting. */
        if (o->level == IPPROTO_TCP && o->name == TCP_MAXSEG)
            continue;
        len = sizeof(v);
        if (shim_real.getsockopt(fd, o->level, o->name, &v, &len) == 0)
            int_option_set(s, o, v);
    }
    struct linger linger;
    len = sizeof(linger);
    if (shim_real.getsockopt(fd, SOL_SOCKET, SO_LINGER, &linger, &len) == 0) {
        s->opt_linger_on = linger.l_onoff != 0;
        s->opt_linger_sec = linger.l_linger > 0 ? (uint32_t)linger.l_linger : 0;
    }
    struct timeval tv;
    len = sizeof(tv);
    if (shim_real.getsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, &len) == 0)
        s->opt_rcvtimeo_ms = timeval_ms(&tv);
    len = sizeof(tv);
    if (shim_real.getsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, &len) == 0)
        s->opt_sndtimeo_ms = timeval_ms(&tv);
    if (candidate & SHIM_CANDIDATE_CONGESTION) {
        char name[MTS_CONGESTION_NAME_MAX] = "";
        len = sizeof(name) - 1;
        if (shim_real.getsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, name, &len) == 0 && congestion_known(name))
            memcpy(s->opt_congestion, name, sizeof(name));
    }
}

/* Moves a candidate to the stack: a slot, and an eventfd placeholder under
 * the same fd number (the kernel socket is closed by the dup3). */
/* Sockets the program closed free their slots once the stack has served
 * the close (asynchronously): a socket() right after closing many waits up
 * to this long for that, as the kernel would have freed them at once. */
#define SLOT_WAIT_NS (20 * 1000 * 1000)

/* A slot of the worker of the core we run on: its commands and its
 * segments stay on this core.  When that worker has none free, another's. */
static int32_t alloc_slot(void)
{
    uint32_t first = shim_current_worker(), n = shim.geom.nworkers;
    int32_t id = -1;
    for (uint32_t i = 0; i < n && id < 0; i++)
        id = mts_slot_alloc(&shim.geom, (first + i) % n, NULL);
    if (id >= 0 || !shim_stack_alive(0))
        return id;
    shim_wake_stack(first);
    int64_t deadline = shim_now_ns() + SLOT_WAIT_NS;
    while (id < 0 && shim_now_ns() < deadline) {
        struct timespec pause = {0, 200 * 1000};
        nanosleep(&pause, NULL);
        id = mts_slot_alloc(&shim.geom, first, NULL);
    }
    return id;
}

/* Puts slot `id`'s placeholder (an eventfd whose count names the slot)
 * under descriptor number `fd`, keeping its close-on-exec flag, and marks
 * the number in our table.  0, or -1 with errno (fd untouched). */
static int place_stack_socket(int fd, uint32_t id, int nonblock)
{
    int fd_flags = shim_real.fcntl(fd, F_GETFD);
    int placeholder = eventfd(MTS_PLACEHOLDER_TAG | id, EFD_CLOEXEC | (nonblock ? EFD_NONBLOCK : 0));
    if (placeholder < 0 ||
        shim_real.dup3(placeholder, fd, fd_flags >= 0 && (fd_flags & FD_CLOEXEC) ? O_CLOEXEC : 0) < 0) {
        int err = errno;
        if (placeholder >= 0)
            shim_real.close(placeholder);
        errno = err;
        return -1;
    }
    shim_real.close(placeholder);
    shim_fd_set_stack(fd, id, shim_slot(id)->generation);
    return 0;
}

static int become_stack_socket(int fd, uint32_t *slot_out)
{
    int32_t id = alloc_slot();
    if (id < 0) {
        SHIM_DEBUG("fd %d: no free slot", fd);
        errno = ENOBUFS;
        return -1;
    }
    struct mts_slot *s = shim_slot((uint32_t)id);
    __atomic_store_n(&s->refcnt, 1, __ATOMIC_RELEASE);
    uint32_t candidate = shim_fd_payload(shim_fd_word(fd));
    copy_kernel_options(fd, candidate, s);
    int status = shim_real.fcntl(fd, F_GETFL);
    int nonblock = status >= 0 && (status & O_NONBLOCK);
    s->app_flags = (nonblock ? MTS_AF_NONBLOCK : 0) | (candidate & SHIM_CANDIDATE_INET6 ? MTS_AF_INET6 : 0);
    if (place_stack_socket(fd, (uint32_t)id, nonblock) < 0) {
        int err = errno;
        shim_slot_unref((uint32_t)id, s->generation);
        errno = err;
        return -1;
    }
    *slot_out = (uint32_t)id;
    SHIM_DEBUG("fd %d: stack socket, slot %d%s", fd, id, nonblock ? ", nonblocking" : "");
    return 0;
}

static int stack_bind(int fd, uint32_t slot, uint32_t ip, uint16_t port)
{
    int result = shim_cmd_sync(MTS_OP_BIND, slot, (uint64_t)ip << 16 | port);
    struct mts_slot *s = shim_slot(slot);
    SHIM_DEBUG("fd %d: bind port %u -> %d (local port %u)", fd, port, result, s->local_port);
    return result < 0 ? fail(-result) : 0;
}

/* ---- socket, bind, listen, connect ---------------------------------------- */

int socket(int domain, int type, int protocol)
{
    shim_ensure_init();
    int fd = shim_real.socket(domain, type, protocol);
    if (fd < 0 || !shim.active || shim_busy)
        return fd;
    if ((domain == AF_INET || domain == AF_INET6) && (type & SOCK_TYPE_MASK) == SOCK_STREAM &&
        (protocol == 0 || protocol == IPPROTO_TCP)) {
        shim_fd_set(fd, SHIM_FD_CANDIDATE, domain == AF_INET6 ? SHIM_CANDIDATE_INET6 : 0);
        SHIM_DEBUG("fd %d: TCP%s socket, undecided", fd, domain == AF_INET6 ? "v6" : "");
    } else {
        shim_fd_clear(fd); /* a number whose earlier life we missed */
    }
    return fd;
}

int bind(int fd, const struct sockaddr *addr, socklen_t len)
{
    shim_ensure_init();
    uint64_t word = shim_busy ? 0 : shim_fd_word(fd);
    enum shim_fd_kind kind = shim_fd_kind_of(word);
    if (kind != SHIM_FD_CANDIDATE && kind != SHIM_FD_STACK)
        return shim_real.bind(fd, addr, len);
    uint32_t slot = shim_fd_payload(word);
    int inet6 = kind == SHIM_FD_CANDIDATE ? (slot & SHIM_CANDIDATE_INET6) != 0 : slot_inet6(slot);
    uint32_t ip = 0;
    uint16_t port = 0;
    int bad = ipv4_of(addr, len, inet6, &ip, &port);
    if (kind == SHIM_FD_CANDIDATE) {
        if (bad || !stack_serves(ip) || candidate_v6only(fd, word)) {
            int result = shim_real.bind(fd, addr, len);
            if (result == 0) {
                shim_fd_clear(fd);
                SHIM_DEBUG("fd %d: bound to a kernel address, stays in the kernel", fd);
            }
            return result;
        }
        if (port_needs_privilege(port))
            return fail(EACCES);
        if (become_stack_socket(fd, &slot) < 0)
            return -1;
    } else if (bad) {
        return fail(bad > 0 ? bad : EINVAL); /* bound already, as Linux says of any second bind */
    } else if (port_needs_privilege(port)) {
        return fail(EACCES);
    }
    return stack_bind(fd, slot, ip, port);
}

int listen(int fd, int backlog)
{
    shim_ensure_init();
    uint64_t word = shim_busy ? 0 : shim_fd_word(fd);
    enum shim_fd_kind kind = shim_fd_kind_of(word);
    if (kind != SHIM_FD_CANDIDATE && kind != SHIM_FD_STACK)
        return shim_real.listen(fd, backlog);
    uint32_t slot = shim_fd_payload(word);
    /* An unbound socket is bound to 0.0.0.0 and an ephemeral port first, as
     * Linux does; that address is the stack's. */
    if (kind == SHIM_FD_CANDIDATE && candidate_v6only(fd, word)) {
        shim_fd_clear(fd);
        return shim_real.listen(fd, backlog);
    }
    if (kind == SHIM_FD_CANDIDATE) {
        if (become_stack_socket(fd, &slot) < 0 || stack_bind(fd, slot, INADDR_ANY, 0) < 0)
            return -1;
    } else {
        uint32_t state = __atomic_load_n(&shim_slot(slot)->state, __ATOMIC_ACQUIRE);
        if (state == MTS_ST_FRESH && stack_bind(fd, slot, INADDR_ANY, 0) < 0)
            return -1;
        if (state != MTS_ST_FRESH && state != MTS_ST_BOUND && state != MTS_ST_LISTENING)
            return fail(EINVAL);
    }
    if (backlog < 0 || backlog > MAX_BACKLOG)
        backlog = MAX_BACKLOG;
    shim_slot(slot)->backlog = (uint32_t)backlog;
    int result = shim_cmd_sync(MTS_OP_LISTEN, slot, (uint64_t)backlog);
    /* Then every other worker opens a sibling listener, so that the SYNs
     * it receives for the port find one. */
    uint32_t owner = mts_slot_worker(&shim.geom, slot);
    for (uint32_t worker = 0; worker < shim.geom.nworkers && result == 0; worker++)
        if (worker != owner)
            result = shim_cmd_sync_on(worker, MTS_OP_LISTEN, slot, (uint64_t)backlog);
    SHIM_DEBUG("fd %d: listen backlog %d -> %d", fd, backlog, result);
    return result < 0 ? fail(-result) : 0;
}

static int finish_blocking_connect(int fd, uint32_t slot)
{
    struct mts_slot *s = shim_slot(slot);
    int64_t deadline = s->opt_sndtimeo_ms ? shim_deadline_ms(s->opt_sndtimeo_ms) : SHIM_FOREVER;
    for (;;) {
        uint32_t state = __atomic_load_n(&s->state, __ATOMIC_ACQUIRE);
        if (state == MTS_ST_CONNECTED)
            return 0;
        if (state == MTS_ST_CLOSED || __atomic_load_n(&s->so_error, __ATOMIC_ACQUIRE)) {
            int err = __atomic_exchange_n(&s->so_error, 0, __ATOMIC_ACQ_REL);
            SHIM_DEBUG("fd %d: connect failed: %s", fd, strerror(err ? err : ECONNREFUSED));
            return fail(err ? err : ECONNREFUSED);
        }
        if (shim_wait_slot(slot, EPOLLOUT, deadline) < 0)
            return fail(errno == EAGAIN ? EINPROGRESS : errno);
    }
}

/* A socket bound before connect() keeps its port, so its flow's frames
 * reach the worker that port and the destination's steer to
 * (mts_worker_of_ports), which must own it.  Another worker's socket moves
 * there first: a slot of that worker takes its options and its port (bound
 * there before the old slot lets it go), and a new placeholder takes the
 * descriptor.  Only a socket that this one descriptor names can move; for
 * another, connect fails with EADDRNOTAVAIL rather than open a flow whose
 * replies would reach a worker that does not know it.  Returns the slot
 * to connect, or -1 with errno. */
static int64_t steer_bound_socket(int fd, uint32_t slot, uint16_t remote_port)
{
    struct mts_slot *s = shim_slot(slot);
    uint32_t want = mts_worker_of_ports(s->local_port, remote_port, shim.geom.nworkers);
    if (shim.geom.nworkers == 1 || want == mts_slot_worker(&shim.geom, slot) ||
        __atomic_load_n(&s->state, __ATOMIC_ACQUIRE) != MTS_ST_BOUND)
        return slot;
    if (__atomic_load_n(&s->refcnt, __ATOMIC_ACQUIRE) != 1) {
        shim_log("connect: fd %d is bound to port %u, whose flow to port %u another worker serves, and it is "
                 "shared (dup or fork), so it cannot move there", fd, s->local_port, remote_port);
        return fail(EADDRNOTAVAIL);
    }
    int32_t moved = mts_slot_alloc(&shim.geom, want, NULL);
    struct mts_slot *t = moved < 0 ? NULL : shim_slot((uint32_t)moved);
    if (!t)
        return fail(ENOBUFS);
    size_t first = offsetof(struct mts_slot, opt_nodelay), options = offsetof(struct mts_slot, info) - first;
    memcpy((char *)t + first, (const char *)s + first, options);
    t->app_flags = s->app_flags;
    __atomic_store_n(&t->refcnt, 1, __ATOMIC_RELEASE);
    int result = shim_cmd_sync(MTS_OP_BIND, (uint32_t)moved, (uint64_t)s->local_ip << 16 | s->local_port);
    if (result < 0 || place_stack_socket(fd, (uint32_t)moved, (t->app_flags & MTS_AF_NONBLOCK) != 0) < 0) {
        int err = result < 0 ? -result : errno;
        shim_slot_unref((uint32_t)moved, t->generation);
        return fail(err);
    }
    shim_slot_unref(slot, s->generation);
    SHIM_DEBUG("fd %d: bound to port %u, moved from slot %u to slot %d of worker %u", fd, t->local_port, slot,
               moved, want);
    return moved;
}

static int connect_slot(int fd, uint32_t slot, const struct sockaddr *addr, socklen_t len)
{
    struct mts_slot *s = shim_slot(slot);
    uint32_t ip = 0;
    uint16_t port = 0;
    int bad = ipv4_of(addr, len, slot_inet6(slot), &ip, &port);
    if (bad > 0)
        return fail(bad);
    if (bad < 0) {
        shim_log("connect: fd %d is the stack's (IPv4 only); an IPv6 destination is not supported", fd);
        return fail(ENETUNREACH);
    }
    if (!shim_stack_alive(0))
        return fail(ENETDOWN);
    switch (__atomic_load_n(&s->state, __ATOMIC_ACQUIRE)) {
    case MTS_ST_CONNECTING:
        return fail(EALREADY);
    case MTS_ST_CONNECTED:
        return fail(EISCONN);
    case MTS_ST_LISTENING:
        return fail(EINVAL);
    case MTS_ST_CLOSED: {
        int err = __atomic_exchange_n(&s->so_error, 0, __ATOMIC_ACQ_REL);
        return fail(err ? err : EISCONN);
    }
    default:
        break;
    }
    int64_t steered = steer_bound_socket(fd, slot, port);
    if (steered < 0)
        return -1;
    slot = (uint32_t)steered;
    s = shim_slot(slot);
    int result = shim_cmd_sync(MTS_OP_CONNECT, slot, (uint64_t)ip << 16 | port);
    if (shim.debug) {
        char text[16];
        ip_text(ip, text);
        SHIM_DEBUG("fd %d: connect %s:%u -> %d", fd, text, port, result);
    }
    if (result < 0)
        return fail(-result);
    if (__atomic_load_n(&s->app_flags, __ATOMIC_RELAXED) & MTS_AF_NONBLOCK)
        return fail(EINPROGRESS);
    return finish_blocking_connect(fd, slot);
}

static int stack_connect(int fd, uint32_t slot, const struct sockaddr *addr, socklen_t len)
{
    int result = connect_slot(fd, slot, addr, len);
    shim_call_done();
    return result;
}

int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    shim_ensure_init();
    uint64_t word = shim_busy ? 0 : shim_fd_word(fd);
    enum shim_fd_kind kind = shim_fd_kind_of(word);
    uint32_t slot = shim_fd_payload(word);
    if (kind == SHIM_FD_CANDIDATE) {
        uint32_t ip = 0;
        uint16_t port;
        if (ipv4_of(addr, len, (slot & SHIM_CANDIDATE_INET6) != 0, &ip, &port) || !stack_routes(ip) ||
            candidate_v6only(fd, word)) {
            shim_fd_clear(fd);
            SHIM_DEBUG("fd %d: connect to a kernel destination, stays in the kernel", fd);
            return shim_real.connect(fd, addr, len);
        }
        if (become_stack_socket(fd, &slot) < 0)
            return -1;
    } else if (kind != SHIM_FD_STACK) {
        return shim_real.connect(fd, addr, len);
    }
    return stack_connect(fd, slot, addr, len);
}

/* ---- accept ----------------------------------------------------------------- */

/* A socket's address as its program sees it: a sockaddr_in, or for an
 * AF_INET6 socket a sockaddr_in6 with the IPv4-mapped address (`::` for
 * any), truncated to *len as the kernel truncates it. */
static void fill_address(struct sockaddr *addr, socklen_t *len, int inet6, uint32_t ip, uint16_t port)
{
    if (!addr || !len)
        return;
    union {
        struct sockaddr_in v4;
        struct sockaddr_in6 v6;
    } name;
    memset(&name, 0, sizeof(name));
    socklen_t size;
    if (inet6) {
        name.v6.sin6_family = AF_INET6;
        name.v6.sin6_port = htons(port);
        if (ip != INADDR_ANY) {
            uint32_t mapped = htonl(ip);
            name.v6.sin6_addr.s6_addr[10] = name.v6.sin6_addr.s6_addr[11] = 0xff;
            memcpy(&name.v6.sin6_addr.s6_addr[12], &mapped, sizeof(mapped));
        }
        size = sizeof(name.v6);
    } else {
        name.v4.sin_family = AF_INET;
        name.v4.sin_port = htons(port);
        name.v4.sin_addr.s_addr = htonl(ip);
        size = sizeof(name.v4);
    }
    memcpy(addr, &name, *len < size ? *len : size);
    *len = size;
}

static int accept_from_slot(int fd, uint32_t slot, struct sockaddr *addr, socklen_t *len, int flags)
{
    struct mts_slot *listener = shim_slot(slot);
    if (flags & ~(SOCK_NONBLOCK | SOCK_CLOEXEC))
        return fail(EINVAL);
    if (__atomic_load_n(&listener->state, __ATOMIC_ACQUIRE) != MTS_ST_LISTENING)
        return fail(EINVAL);
    int64_t deadline = listener->opt_rcvtimeo_ms ? shim_deadline_ms(listener->opt_rcvtimeo_ms) : SHIM_FOREVER;
    int32_t child;
    while ((child = mts_accept_pop(&shim.geom, slot, shim_current_worker())) < 0) {
        if (!shim_stack_alive(0))
            return fail(ENETDOWN);
        if (__atomic_load_n(&listener->app_flags, __ATOMIC_RELAXED) & MTS_AF_NONBLOCK)
            return fail(EAGAIN);
        if (shim_wait_slot(slot, EPOLLIN, deadline) < 0)
            return -1;
        if (__atomic_load_n(&listener->state, __ATOMIC_ACQUIRE) != MTS_ST_LISTENING)
            return fail(EINVAL);
    }
    struct mts_slot *s = shim_slot((uint32_t)child);
    __atomic_store_n(&s->refcnt, 1, __ATOMIC_RELEASE);
    uint32_t family = __atomic_load_n(&listener->app_flags, __ATOMIC_RELAXED) & MTS_AF_INET6;
    __atomic_store_n(&s->app_flags, (flags & SOCK_NONBLOCK ? MTS_AF_NONBLOCK : 0) | family, __ATOMIC_RELEASE);
    int nfd = eventfd(MTS_PLACEHOLDER_TAG | (uint32_t)child,
                      (flags & SOCK_NONBLOCK ? EFD_NONBLOCK : 0) | (flags & SOCK_CLOEXEC ? EFD_CLOEXEC : 0));
    if (nfd < 0) {
        int err = errno;
        s->opt_linger_on = 1; /* nobody will ever read it: reset */
        s->opt_linger_sec = 0;
        shim_slot_unref((uint32_t)child, s->generation);
        return fail(err);
    }
    shim_fd_set_stack(nfd, (uint32_t)child, s->generation);
    fill_address(addr, len, family != 0, s->remote_ip, s->remote_port);
    if (shim.debug) {
        char text[16];
        ip_text(s->remote_ip, text);
        SHIM_DEBUG("fd %d: accepted fd %d, slot %d, from %s:%u", fd, nfd, child, text, s->remote_port);
    }
    return nfd;
}

static int stack_accept(int fd, uint32_t slot, struct sockaddr *addr, socklen_t *len, int flags)
{
    int result = accept_from_slot(fd, slot, addr, len, flags);
    shim_call_done();
    return result;
}

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
    uint32_t slot;
    if (!shim_stack_fd(fd, &slot))
        return shim_real.accept4(fd, addr, len, flags);
    return stack_accept(fd, slot, addr, len, flags);
}

int accept(int fd, struct sockaddr *addr, socklen_t *len)
{
    uint32_t slot;
    if (!shim_stack_fd(fd, &slot))
        return shim_real.accept(fd, addr, len);
    return stack_accept(fd, slot, addr, len, 0);
}

/* ---- shutdown and names ------------------------------------------------------ */

int shutdown(int fd, int how)
{
    uint32_t slot;
    if (!shim_stack_fd(fd, &slot))
        return shim_real.shutdown(fd, how);
    struct mts_slot *s = shim_slot(slot);
    uint32_t flags = how == SHUT_RD ? MTS_AF_SHUT_RD : how == SHUT_WR ? MTS_AF_SHUT_WR
                   : how == SHUT_RDWR ? MTS_AF_SHUT_RD | MTS_AF_SHUT_WR : 0;
    if (!flags)
        return fail(EINVAL);
    uint32_t state = __atomic_load_n(&s->state, __ATOMIC_ACQUIRE);
    if (state == MTS_ST_FRESH || state == MTS_ST_BOUND || state == MTS_ST_CLOSED)
        return fail(ENOTCONN);
    __atomic_or_fetch(&s->app_flags, flags, __ATOMIC_ACQ_REL);
    SHIM_DEBUG("fd %d: shutdown %d", fd, how);
    return shim_cmd_async(MTS_OP_SHUTDOWN, slot, (uint64_t)how);
}

/* A stack socket's own address (getsockname) or its peer's (getpeername). */
static int stack_address(uint32_t slot, struct sockaddr *addr, socklen_t *len, int peer)
{
    if (!addr || !len)
        return fail(EFAULT);
    struct mts_slot *s = shim_slot(slot);
    if (!peer) {
        fill_address(addr, len, slot_inet6(slot), s->local_ip, s->local_port);
        return 0;
    }
    if (__atomic_load_n(&s->state, __ATOMIC_ACQUIRE) != MTS_ST_CONNECTED)
        return fail(ENOTCONN);
    fill_address(addr, len, slot_inet6(slot), s->remote_ip, s->remote_port);
    return 0;
}

int getsockname(int fd, struct sockaddr *addr, socklen_t *len)
{
    uint32_t slot;
    if (!shim_stack_fd(fd, &slot))
        return shim_real.getsockname(fd, addr, len);
    return stack_address(slot, addr, len, 0);
}

int getpeername(int fd, struct sockaddr *addr, socklen_t *len)
{
    uint32_t slot;
    if (!shim_stack_fd(fd, &slot))
        return shim_real.getpeername(fd, addr, len);
    return stack_address(slot, addr, len, 1);
}

/* ---- options -------------------------------------------------------------------- */

/* The i-th TCP_CONGESTION name of the header's list (stack/cc.py's, the
 * default first) into `name`; 0 past the end.  The list is read through a
 * copy, ended by us: the program may have written anything there. */
static int congestion_name(unsigned i, char name[MTS_CONGESTION_NAME_MAX])
{
    char list[MTS_CONGESTION_LIST_MAX];
    memcpy(list, shim.hdr->congestion, sizeof(list));
    list[sizeof(list) - 1] = '\0';
    char *saved = NULL;
    for (char *word = strtok_r(list, " ", &saved); word; word = strtok_r(NULL, " ", &saved)) {
        if (i-- == 0) {
            snprintf(name, MTS_CONGESTION_NAME_MAX, "%s", word);
            return 1;
        }
    }
    return 0;
}

static int congestion_known(const char *wanted)
{
    char name[MTS_CONGESTION_NAME_MAX];
    for (unsigned i = 0; congestion_name(i, name); i++)
        if (strcmp(wanted, name) == 0)
            return 1;
    return 0;
}

static int put_value(void *val, socklen_t *len, const void *value, socklen_t size)
{
    if (!val || !len)
        return fail(EFAULT);
    if ((int)*len < 0)
        return fail(EINVAL);
    if (*len > size)
        *len = size;
    memcpy(val, value, *len);
    return 0;
}

static int put_int(void *val, socklen_t *len, int value) { return put_value(val, len, &value, sizeof(value)); }

static int put_timeval(void *val, socklen_t *len, uint32_t ms)
{
    struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000};
    return put_value(val, len, &tv, sizeof(tv));
}

static int tcp_state_of(struct mts_slot *s);

/* TCP_INFO: the stack's figures for the connection, asked for at once
 * (MTS_OP_INFO), in the layout of glibc's struct tcp_info. */
static int get_tcp_info(uint32_t slot, struct mts_slot *s, void *val, socklen_t *len)
{
    struct tcp_info info;
    memset(&info, 0, sizeof(info));
    info.tcpi_state = (uint8_t)tcp_state_of(s);
    int result = shim_cmd_sync(MTS_OP_INFO, slot, 0);
    if (result < 0)
        return fail(-result);
    const struct mts_tcp_info *from = &s->info;
    info.tcpi_rto = from->rto_us;
    info.tcpi_rtt = from->rtt_us;
    info.tcpi_rttvar = from->rttvar_us;
    info.tcpi_snd_mss = from->snd_mss;
    info.tcpi_rcv_mss = from->rcv_mss;
    info.tcpi_advmss = from->advmss;
    info.tcpi_snd_cwnd = from->snd_cwnd;
    info.tcpi_snd_ssthresh = from->snd_ssthresh;
    info.tcpi_unacked = from->unacked;
    info.tcpi_total_retrans = from->total_retrans;
    info.tcpi_retransmits = (uint8_t)from->retransmits;
    info.tcpi_options = (uint8_t)(from->options & 0xFF);
    info.tcpi_snd_wscale = (from->options >> 8) & 0xF;
    info.tcpi_rcv_wscale = (from->options >> 12) & 0xF;
    return put_value(val, len, &info, sizeof(info));
}

/* The Linux TCP state a program would see (lighttpd checks CLOSE_WAIT). */
static int tcp_state_of(struct mts_slot *s)
{
    uint32_t events = __atomic_load_n(&s->events, __ATOMIC_ACQUIRE);
    uint32_t shut_wr = __atomic_load_n(&s->app_flags, __ATOMIC_RELAXED) & MTS_AF_SHUT_WR;
    switch (__atomic_load_n(&s->state, __ATOMIC_ACQUIRE)) {
    case MTS_ST_LISTENING:
        return TCP_LISTEN;
    case MTS_ST_CONNECTING:
        return TCP_SYN_SENT;
    case MTS_ST_CONNECTED:
        if (events & MTS_EV_HUP)
            return TCP_CLOSE;
        if (events & MTS_EV_RDHUP)
            return shut_wr ? TCP_LAST_ACK : TCP_CLOSE_WAIT;
        return shut_wr ? TCP_FIN_WAIT1 : TCP_ESTABLISHED;
    default:
        return TCP_CLOSE;
    }
}

static int stack_getsockopt(uint32_t slot, int level, int name, void *val, socklen_t *len)
{
    struct mts_slot *s = shim_slot(slot);
    const struct int_option *option = int_option(level, name);
    if (option)
        return put_int(val, len, int_option_get(s, option));
    if (level == SOL_SOCKET) {
        switch (name) {
        case SO_ERROR:
            return put_int(val, len, __atomic_exchange_n(&s->so_error, 0, __ATOMIC_ACQ_REL));
        case SO_TYPE:
            return put_int(val, len, SOCK_STREAM);
        case SO_DOMAIN:
            return put_int(val, len, slot_inet6(slot) ? AF_INET6 : AF_INET);
        case SO_PROTOCOL:
            return put_int(val, len, IPPROTO_TCP);
        case SO_ACCEPTCONN:
            return put_int(val, len, __atomic_load_n(&s->state, __ATOMIC_ACQUIRE) == MTS_ST_LISTENING);
        case SO_LINGER: {
            struct linger linger = {.l_onoff = (int)s->opt_linger_on, .l_linger = (int)s->opt_linger_sec};
            return put_value(val, len, &linger, sizeof(linger));
        }
        case SO_RCVBUF:
            return put_int(val, len, (int)(s->opt_rcvbuf ? s->opt_rcvbuf : shim.geom.rx_size));
        case SO_SNDBUF:
            return put_int(val, len, (int)(s->opt_sndbuf ? s->opt_sndbuf : shim.geom.tx_size));
        case SO_RCVTIMEO:
            return put_timeval(val, len, s->opt_rcvtimeo_ms);
        case SO_SNDTIMEO:
            return put_timeval(val, len, s->opt_sndtimeo_ms);
        case SO_RCVLOWAT:
        case SO_SNDLOWAT:
            return put_int(val, len, 1);
        case SO_PRIORITY:
        case SO_OOBINLINE:
        case SO_DONTROUTE:
        case SO_BROADCAST:
            return put_int(val, len, 0);
        default:
            return fail(ENOPROTOOPT);
        }
    }
    if (level == IPPROTO_TCP) {
        switch (name) {
        case TCP_CONGESTION: {
            char name[MTS_CONGESTION_NAME_MAX] = "";
            if (s->opt_congestion[0])
                memcpy(name, s->opt_congestion, sizeof(name) - 1);
            else
                congestion_name(0, name);
            return put_value(val, len, name, strlen(name) + 1);
        }
        case TCP_INFO:
            return get_tcp_info(slot, s, val, len);
        default:
            return fail(ENOPROTOOPT);
        }
    }
    if (level == IPPROTO_IP) {
        switch (name) {
        case IP_TOS:
            return put_int(val, len, 0);
        case IP_TTL:
            return put_int(val, len, 64);
        default:
            return fail(ENOPROTOOPT);
        }
    }
    if (level == IPPROTO_IPV6 && slot_inet6(slot)) {
        switch (name) {
        case IPV6_V6ONLY: /* a dual-stack socket, or it would be the kernel's */
        case IPV6_TCLASS:
            return put_int(val, len, 0);
        case IPV6_UNICAST_HOPS:
            return put_int(val, len, 64);
        default:
            return fail(ENOPROTOOPT);
        }
    }
    return fail(ENOPROTOOPT);
}

/* Linux's smallest socket buffers (SOCK_MIN_RCVBUF, SOCK_MIN_SNDBUF: one
 * and two minimal skbs' truesize on x86-64). */
#define SOCK_MIN_RCVBUF 2304
#define SOCK_MIN_SNDBUF 4608

/* What Linux makes of SO_RCVBUF/SO_SNDBUF `value` (sock_setsockopt): at most
 * net.core.<sysctl_max> (none for the *FORCE variants), doubled, at least
 * `floor`.  This is what getsockopt then reports. */
static uint32_t linux_buffer_size(int value, const char *sysctl_max, uint32_t floor)
{
    uint64_t asked = value < 0 ? (sysctl_max ? UINT32_MAX : 0) : (uint64_t)value;
    if (sysctl_max) {
        char path[64];
        unsigned long max = 212992; /* the kernel's default where /proc cannot say */
        snprintf(path, sizeof(path), "/proc/sys/net/core/%s", sysctl_max);
        FILE *file = fopen(path, "re");
        if (file) {
            if (fscanf(file, "%lu", &max) != 1)
                max = 212992;
            fclose(file);
        }
        if (asked > max)
            asked = max;
    }
    if (asked > INT_MAX / 2)
        asked = INT_MAX / 2;
    return asked * 2 > floor ? (uint32_t)(asked * 2) : floor;
}

static int stack_setsockopt(int fd, uint32_t slot, int level, int name, const void *val, socklen_t len)
{
    struct mts_slot *s = shim_slot(slot);
    int value = 0;
    if (val && len >= (socklen_t)sizeof(int))
        memcpy(&value, val, sizeof(int));
    uint32_t changed = 0;
#define NEED(size)                                                                                 \
    do {                                                                                           \
        if (!val)                                                                                  \
            return fail(EFAULT);                                                                   \
        if (len < (socklen_t)(size))                                                               \
            return fail(EINVAL);                                                                   \
    } while (0)
    const struct int_option *option = int_option(level, name);
    if (option) {
        NEED(sizeof(int));
        if (int_option_set(s, option, value) < 0)
            return -1;
        changed = option->change;
    } else if (level == SOL_SOCKET) {
        switch (name) {
        case SO_LINGER: {
            NEED(sizeof(struct linger));
            struct linger linger;
            memcpy(&linger, val, sizeof(linger));
            s->opt_linger_sec = linger.l_linger > 0 ? (uint32_t)linger.l_linger : 0;
            s->opt_linger_on = linger.l_onoff != 0;
            changed = MTS_OPT_LINGER;
            break;
        }
        case SO_RCVBUF:
        case SO_RCVBUFFORCE:
        case SO_SNDBUF:
        case SO_SNDBUFFORCE:
            NEED(sizeof(int));
            if (name == SO_RCVBUF || name == SO_RCVBUFFORCE)
                s->opt_rcvbuf = linux_buffer_size(value, name == SO_RCVBUF ? "rmem_max" : NULL, SOCK_MIN_RCVBUF);
            else
                s->opt_sndbuf = linux_buffer_size(value, name == SO_SNDBUF ? "wmem_max" : NULL, SOCK_MIN_SNDBUF);
            changed = MTS_OPT_BUFFERS;
            break;
        case SO_RCVTIMEO:
        case SO_SNDTIMEO: {
            NEED(sizeof(struct timeval));
            struct timeval tv;
            memcpy(&tv, val, sizeof(tv));
            if (tv.tv_usec < 0 || tv.tv_usec >= 1000000)
                return fail(EDOM);
            /* A negative time means no timeout, as in Linux. */
            *(name == SO_RCVTIMEO ? &s->opt_rcvtimeo_ms : &s->opt_sndtimeo_ms) = tv.tv_sec < 0 ? 0 : timeval_ms(&tv);
            break;
        }
        case SO_RCVLOWAT:
        case SO_SNDLOWAT:
        case SO_PRIORITY:
        case SO_OOBINLINE:
        case SO_DONTROUTE:
        case SO_BROADCAST:
            NEED(sizeof(int));
            break; /* accepted, without effect on the stack */
        default:
            return fail(ENOPROTOOPT);
        }
    } else if (level == IPPROTO_TCP) {
        switch (name) {
        case TCP_CONGESTION: {
            if (!val)
                return fail(EFAULT);
            char wanted[MTS_CONGESTION_NAME_MAX] = {0};
            memcpy(wanted, val, len < sizeof(wanted) - 1 ? len : sizeof(wanted) - 1);
            if (!congestion_known(wanted))
                return fail(ENOENT); /* as Linux does for an algorithm it lacks */
            memcpy(s->opt_congestion, wanted, sizeof(wanted));
            changed = MTS_OPT_CONGESTION;
            break;
        }
        default:
            return fail(ENOPROTOOPT);
        }
    } else if (level == IPPROTO_IP) {
        /* IP_TOS, IP_TTL and friends: accepted, the stack does not use them. */
    } else if (level == IPPROTO_IPV6 && slot_inet6(slot)) {
        /* Bound already (a socket becomes the stack's at bind, listen or
         * connect), and Linux refuses a change of IPV6_V6ONLY then; the
         * rest, like the IPv4 options, do not affect the stack. */
        if (name == IPV6_V6ONLY)
            return fail(EINVAL);
    } else {
        return fail(ENOPROTOOPT);
    }
#undef NEED
    SHIM_DEBUG("fd %d: setsockopt level %d name %d value %d", fd, level, name, value);
    if (changed && shim_cmd_async(MTS_OP_SETOPT, slot, changed) < 0)
        SHIM_DEBUG("fd %d: option change not delivered: %s", fd, strerror(errno));
    return 0;
}

int getsockopt(int fd, int level, int name, void *val, socklen_t *len)
{
    uint32_t slot;
    if (!shim_stack_fd(fd, &slot))
        return shim_real.getsockopt(fd, level, name, val, len);
    return stack_getsockopt(slot, level, name, val, len);
}

int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
{
    uint32_t slot;
    if (shim_stack_fd(fd, &slot))
        return stack_setsockopt(fd, slot, level, name, val, len);
    int result = shim_real.setsockopt(fd, level, name, val, len);
    uint64_t word = shim_busy ? 0 : shim_fd_word(fd);
    if (result == 0 && level == IPPROTO_TCP && name == TCP_CONGESTION && shim_fd_kind_of(word) == SHIM_FD_CANDIDATE)
        shim_fd_set(fd, SHIM_FD_CANDIDATE, shim_fd_payload(word) | SHIM_CANDIDATE_CONGESTION);
    return result;
}
