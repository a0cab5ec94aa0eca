/*
 * probe SCENARIO: drives socket calls through the interposer and prints one
 * line per step, "what result [ERRNO]", for tests/preload/test_interposer.py
 * to compare against the trace it expects.  The stack's address comes from
 * PROBE_IP.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/select.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void out(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void out(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    fflush(stdout);
}

/* "what N" or "what -1 ENAME". */
static long step(const char *what, long result)
{
    if (result < 0)
        out("%s -1 %s", what, strerrorname_np(errno));
    else
        out("%s %ld", what, result);
    return result;
}

static void die(const char *what)
{
    out("FATAL %s: %s", what, strerrorname_np(errno));
    exit(2);
}

struct bit_name {
    uint32_t bit;
    const char *name;
};

/* The names of the bits set in `bits`, "|"-joined, or "0". */
static const char *bits_text(uint32_t bits, const struct bit_name *names, size_t count)
{
    static char texts[2][128]; /* two calls may share one printf */
    static int turn;
    char *text = texts[turn ^= 1];
    text[0] = 0;
    for (size_t i = 0; i < count; i++)
        if (bits & names[i].bit)
            snprintf(text + strlen(text), sizeof(texts[0]) - strlen(text), "%s%s", text[0] ? "|" : "", names[i].name);
    return text[0] ? text : "0";
}

static const char *poll_bits(short revents)
{
    static const struct bit_name names[] = {
        {POLLIN, "IN"}, {POLLOUT, "OUT"}, {POLLERR, "ERR"}, {POLLHUP, "HUP"}, {POLLNVAL, "NVAL"}};
    return bits_text((uint16_t)revents, names, sizeof(names) / sizeof(names[0]));
}

static const char *epoll_bits(uint32_t events)
{
    static const struct bit_name names[] = {
        {EPOLLIN, "IN"}, {EPOLLOUT, "OUT"}, {EPOLLERR, "ERR"}, {EPOLLHUP, "HUP"}, {EPOLLRDHUP, "RDHUP"}};
    return bits_text(events, names, sizeof(names) / sizeof(names[0]));
}

static struct sockaddr_in stack_addr(uint16_t port)
{
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons(port)};
    const char *ip = getenv("PROBE_IP");
    inet_pton(AF_INET, ip ? ip : "198.18.0.2", &sin.sin_addr);
    return sin;
}

static uint16_t local_port(int fd)
{
    struct sockaddr_storage name;
    socklen_t len = sizeof(name);
    if (getsockname(fd, (struct sockaddr *)&name, &len) < 0)
        die("getsockname");
    /* sin_port and sin6_port are at the same place */
    return ntohs(((struct sockaddr_in *)&name)->sin_port);
}

static int listener(int flags)
{
    int fd = socket(AF_INET, SOCK_STREAM | flags, 0);
    struct sockaddr_in any = {.sin_family = AF_INET};
    if (fd < 0 || bind(fd, (struct sockaddr *)&any, sizeof(any)) < 0 || listen(fd, 16) < 0)
        die("listener");
    return fd;
}

/* A connected pair over the stack: *client connected, *server accepted. */
static void connected_pair(int *client, int *server, int flags)
{
    int l = listener(0);
    struct sockaddr_in to = stack_addr(local_port(l));
    *client = socket(AF_INET, SOCK_STREAM | flags, 0);
    if (connect(*client, (struct sockaddr *)&to, sizeof(to)) < 0 && errno != EINPROGRESS)
        die("connect");
    *server = accept4(l, NULL, NULL, flags);
    if (*server < 0)
        die("accept");
    close(l);
}

static int wait_readable(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    return poll(&p, 1, 5000);
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000};
    nanosleep(&ts, NULL);
}

/* ---- scenarios --------------------------------------------------------------- */

static void handshake(void)
{
    int l = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    step("setsockopt_reuseaddr", setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)));
    struct sockaddr_in any = {.sin_family = AF_INET};
    step("bind", bind(l, (struct sockaddr *)&any, sizeof(any)));
    uint16_t port = local_port(l);
    out("port_assigned %d", port != 0);
    step("listen", listen(l, 16));
    step("accept", accept4(l, NULL, NULL, 0));
    int c = socket(AF_INET, SOCK_STREAM, 0);
    fcntl(c, F_SETFL, fcntl(c, F_GETFL) | O_NONBLOCK);
    struct sockaddr_in to = stack_addr(port);
    step("connect", connect(c, (struct sockaddr *)&to, sizeof(to)));
    struct pollfd p = {.fd = c, .events = POLLOUT};
    step("poll_client", poll(&p, 1, 5000));
    out("revents %s", poll_bits(p.revents));
    int err = -1;
    socklen_t len = sizeof(err);
    step("getsockopt_so_error", getsockopt(c, SOL_SOCKET, SO_ERROR, &err, &len));
    out("so_error %d", err);
    step("connect_again", connect(c, (struct sockaddr *)&to, sizeof(to)));
    p = (struct pollfd){.fd = l, .events = POLLIN};
    step("poll_listener", poll(&p, 1, 5000));
    out("revents %s", poll_bits(p.revents));
    struct sockaddr_in peer;
    socklen_t peer_len = sizeof(peer);
    int a = accept4(l, (struct sockaddr *)&peer, &peer_len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    out("accepted %d", a >= 0);
    out("peer_is_client %d", peer_len == sizeof(peer) && ntohs(peer.sin_port) == local_port(c));
    out("cloexec %d", (fcntl(a, F_GETFD) & FD_CLOEXEC) != 0);
    out("nonblock %d", (fcntl(a, F_GETFL) & O_NONBLOCK) != 0);
    int type = 0;
    len = sizeof(type);
    getsockopt(a, SOL_SOCKET, SO_TYPE, &type, &len);
    out("so_type_stream %d", type == SOCK_STREAM);
    struct tcp_info info;
    len = sizeof(info);
    step("tcp_info", getsockopt(a, IPPROTO_TCP, TCP_INFO, &info, &len));
    out("tcpi_state_established %d", info.tcpi_state == TCP_ESTABLISHED);
    step("setsockopt_nodelay", setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)));
    step("setsockopt_congestion", setsockopt(c, IPPROTO_TCP, TCP_CONGESTION, "reno", 4));
    step("setsockopt_congestion_missing", setsockopt(c, IPPROTO_TCP, TCP_CONGESTION, "vegas", 5));
    char congestion[16] = "";
    len = sizeof(congestion);
    step("getsockopt_congestion", getsockopt(c, IPPROTO_TCP, TCP_CONGESTION, congestion, &len));
    out("congestion %s", congestion);
    step("setsockopt_unknown", setsockopt(c, IPPROTO_TCP, TCP_ULP, "tls", 3));
    step("close_client", close(c));
    step("close_accepted", close(a));
    step("close_listener", close(l));
}

struct reader {
    int fd;
    size_t want;
    size_t got;
    int pattern_ok;
};

static void *read_all(void *arg)
{
    struct reader *r = arg;
    char buf[8192];
    r->pattern_ok = 1;
    while (r->got < r->want) {
        ssize_t n = read(r->fd, buf, sizeof(buf));
        if (n <= 0)
            break;
        for (ssize_t i = 0; i < n; i++)
            if (buf[i] != (char)((r->got + (size_t)i) % 251))
                r->pattern_ok = 0;
        r->got += (size_t)n;
    }
    return NULL;
}

static void data(void)
{
    int c, a;
    connected_pair(&c, &a, 0);
    step("write", write(c, "hello", 5));
    step("poll", wait_readable(a));
    int pending = -1;
    step("ioctl_fionread", ioctl(a, FIONREAD, &pending));
    out("fionread %d", pending);
    char buf[64] = {0};
    step("recv_peek", recv(a, buf, 3, MSG_PEEK));
    out("peeked %s", buf);
    memset(buf, 0, sizeof(buf));
    step("read", read(a, buf, sizeof(buf)));
    out("data %s", buf);
    struct iovec out_iov[2] = {{"ab", 2}, {"cde", 3}};
    step("writev", writev(a, out_iov, 2));
    step("poll", wait_readable(c));
    char first[2], second[10] = {0};
    struct iovec in_iov[2] = {{first, 2}, {second, sizeof(second)}};
    step("readv", readv(c, in_iov, 2));
    out("data %.2s|%s", first, second);
    step("recv_dontwait", recv(c, buf, sizeof(buf), MSG_DONTWAIT));

    /* Several times the ring size through a blocking write. */
    enum { BIG = 300000 };
    char *big = malloc(BIG);
    for (size_t i = 0; i < BIG; i++)
        big[i] = (char)(i % 251);
    struct reader r = {.fd = a, .want = BIG};
    pthread_t thread;
    pthread_create(&thread, NULL, read_all, &r);
    step("write_big", write(c, big, BIG));
    pthread_join(thread, NULL);
    out("read_big %zu pattern_ok %d", r.got, r.pattern_ok);
    free(big);
    close(c);
    close(a);
}

/* SO_SNDBUF bounds what a send queues, as Linux's; a transfer of many times
 * that still goes through. */
static void sndbuf(void)
{
    int c, a, size = 8192;
    connected_pair(&c, &a, 0);
    step("setsockopt_sndbuf", setsockopt(c, SOL_SOCKET, SO_SNDBUF, &size, sizeof(size)));
    enum { BIG = 300000 };
    char *big = malloc(BIG);
    for (size_t i = 0; i < BIG; i++)
        big[i] = (char)(i % 251);
    step("send_dontwait", send(c, big, BIG, MSG_DONTWAIT));
    struct reader r = {.fd = a, .want = BIG};
    pthread_t thread;
    pthread_create(&thread, NULL, read_all, &r);
    step("write_rest", write(c, big + 8192, BIG - 8192));
    pthread_join(thread, NULL);
    out("read %zu pattern_ok %d", r.got, r.pattern_ok);
    free(big);
    close(c);
    close(a);
}

static volatile sig_atomic_t sigpipes;
static void count_sigpipe(int sig) { (void)sig, sigpipes++; }

static void eof(void)
{
    signal(SIGPIPE, count_sigpipe);
    int c, a;
    connected_pair(&c, &a, 0);
    step("shutdown_wr", shutdown(c, SHUT_WR));
    char buf[16];
    step("read_eof", read(a, buf, sizeof(buf)));
    step("send_nosignal", send(c, "x", 1, MSG_NOSIGNAL));
    out("sigpipes %d", (int)sigpipes);
    step("write", write(c, "x", 1));
    out("sigpipes %d", (int)sigpipes);
    step("write_back", write(a, "y", 1));
    step("read_back", read(c, buf, sizeof(buf)));
    struct tcp_info info;
    socklen_t len = sizeof(info);
    getsockopt(a, IPPROTO_TCP, TCP_INFO, &info, &len);
    out("tcpi_state_close_wait %d", info.tcpi_state == TCP_CLOSE_WAIT);
    step("close_server", close(a));
    step("read_after_peer_close", read(c, buf, sizeof(buf)));
    close(c);
    int fresh = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in any = {.sin_family = AF_INET};
    bind(fresh, (struct sockaddr *)&any, sizeof(any));
    step("read_unconnected", read(fresh, buf, sizeof(buf)));
    close(fresh);
}

/* A file through sendfile twice, from an offset and from the file's own
 * position: the reader sees one pattern (the second call starts where the
 * pattern repeats). */
static void sendfile_scenario(void)
{
    enum { SIZE = 300000, SECOND_FROM = SIZE % 251 };
    char path[] = "/tmp/probe-sendfile-XXXXXX";
    int file = mkstemp(path);
    unlink(path);
    char *content = malloc(SIZE);
    for (size_t i = 0; i < SIZE; i++)
        content[i] = (char)(i % 251);
    if (write(file, content, SIZE) != SIZE)
        die("write file");
    free(content);
    int c, a;
    connected_pair(&c, &a, 0);
    struct reader r = {.fd = a, .want = 2 * SIZE - SECOND_FROM};
    pthread_t thread;
    pthread_create(&thread, NULL, read_all, &r);
    off_t offset = 0;
    step("sendfile", sendfile(c, file, &offset, SIZE));
    out("offset %ld", (long)offset);
    lseek(file, SECOND_FROM, SEEK_SET);
    ssize_t sent = 0, n;
    while (sent < SIZE - SECOND_FROM && (n = sendfile(c, file, NULL, SIZE)) > 0)
        sent += n;
    out("sendfile_position %zd", sent);
    out("file_position %ld", (long)lseek(file, 0, SEEK_CUR));
    pthread_join(thread, NULL);
    out("received %zu pattern_ok %d", r.got, r.pattern_ok);
    close(file);
    close(c);
    close(a);
}

/* Two files, each sent whole in turn, A B A, on one connection: the
 * interposer registers each once (their size is a multiple of the
 * pattern's, so the reader sees one pattern). */
static void sendfile_files_scenario(void)
{
    enum { SIZE = 251 * 1200 };
    int files[2];
    char *content = malloc(SIZE);
    for (size_t i = 0; i < SIZE; i++)
        content[i] = (char)(i % 251);
    for (int f = 0; f < 2; f++) {
        char path[] = "/tmp/probe-sendfile-XXXXXX";
        files[f] = mkstemp(path);
        unlink(path);
        if (write(files[f], content, SIZE) != SIZE)
            die("write file");
    }
    free(content);
    int c, a;
    connected_pair(&c, &a, 0);
    struct reader r = {.fd = a, .want = 3 * SIZE};
    pthread_t thread;
    pthread_create(&thread, NULL, read_all, &r);
    for (int turn = 0; turn < 3; turn++) {
        off_t offset = 0;
        step("sendfile", sendfile(c, files[turn % 2], &offset, SIZE));
    }
    pthread_join(thread, NULL);
    out("received %zu pattern_ok %d", r.got, r.pattern_ok);
    close(files[0]);
    close(files[1]);
    close(c);
    close(a);
}

static int wait_events(int ep, int timeout, const char *what)
{
    struct epoll_event events[8];
    int n = epoll_wait(ep, events, 8, timeout);
    if (n < 0) {
        step(what, n);
        return n;
    }
    char line[256];
    snprintf(line, sizeof(line), "%s %d", what, n);
    for (int i = 0; i < n; i++)
        snprintf(line + strlen(line), sizeof(line) - strlen(line), " fd%d:%s", (int)events[i].data.u32 == 0 ? 0 : 1,
                 epoll_bits(events[i].events));
    out("%s", line);
    return n;
}

static void epoll_scenario(void)
{
    int c, a;
    connected_pair(&c, &a, SOCK_NONBLOCK);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    char buf[16];
    /* data.u32 = 0 names the socket, 1 the pipe in the printed trace. */
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = 0};
    step("ctl_add", epoll_ctl(ep, EPOLL_CTL_ADD, a, &ev));
    step("ctl_add_again", epoll_ctl(ep, EPOLL_CTL_ADD, a, &ev));
    step("ctl_del_unknown", epoll_ctl(ep, EPOLL_CTL_DEL, c, NULL));
    wait_events(ep, 0, "idle");

    write(c, "1", 1);
    wait_events(ep, 5000, "level");
    wait_events(ep, 0, "level_unread");
    read(a, buf, sizeof(buf));
    wait_events(ep, 0, "level_after_read");

    ev.events = EPOLLIN | EPOLLET;
    step("ctl_mod_edge", epoll_ctl(ep, EPOLL_CTL_MOD, a, &ev));
    write(c, "2", 1);
    wait_events(ep, 5000, "edge");
    wait_events(ep, 0, "edge_unread");
    write(c, "3", 1);
    wait_events(ep, 5000, "edge_more_data");
    read(a, buf, sizeof(buf));

    ev.events = EPOLLIN | EPOLLONESHOT;
    step("ctl_mod_oneshot", epoll_ctl(ep, EPOLL_CTL_MOD, a, &ev));
    write(c, "4", 1);
    wait_events(ep, 5000, "oneshot");
    wait_events(ep, 0, "oneshot_disabled");
    step("ctl_mod_rearm", epoll_ctl(ep, EPOLL_CTL_MOD, a, &ev));
    wait_events(ep, 0, "oneshot_rearmed");
    read(a, buf, sizeof(buf));

    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP;
    step("ctl_mod_out", epoll_ctl(ep, EPOLL_CTL_MOD, a, &ev));
    wait_events(ep, 0, "writable");
    int pipe_fds[2];
    pipe(pipe_fds);
    struct epoll_event pev = {.events = EPOLLIN, .data.u32 = 1};
    step("ctl_add_pipe", epoll_ctl(ep, EPOLL_CTL_ADD, pipe_fds[0], &pev));
    write(pipe_fds[1], "p", 1);
    wait_events(ep, 0, "socket_and_pipe");
    shutdown(c, SHUT_WR);
    read(pipe_fds[0], buf, 1);
    ev.events = EPOLLIN | EPOLLRDHUP;
    epoll_ctl(ep, EPOLL_CTL_MOD, a, &ev);
    wait_events(ep, 5000, "peer_fin");
    step("close_socket", close(a));
    write(pipe_fds[1], "p", 1);
    wait_events(ep, 0, "after_close");
    close(ep);
    close(c);
}

/* Waits (5 s at most) until the entries named `want` (data.u32, bit i for
 * entry i) have all been reported, at most `max` per epoll_wait, and prints
 * which were, in order of their number (each once, whatever the number of
 * waits). */
static void collect_events(int ep, int max, uint64_t want, const char *what)
{
    struct epoll_event events[64];
    uint64_t seen = 0;
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (now = start; (seen & want) != want && now.tv_sec - start.tv_sec < 5; clock_gettime(CLOCK_MONOTONIC, &now)) {
        int n = epoll_wait(ep, events, max, 10);
        for (int i = 0; i < n; i++)
            seen |= 1ULL << events[i].data.u32;
    }
    char line[512];
    snprintf(line, sizeof(line), "%s", what);
    for (int i = 0; i < 64; i++)
        if (seen & (1ULL << i))
            snprintf(line + strlen(line), sizeof(line) - strlen(line), " %d", i);
    out("%s", line);
}

/* Many stack sockets in one epoll, few of them ready: a wait reports those
 * and only those, a socket registered twice (dup) twice, level-triggered
 * ones again while ready, in turn when the caller takes one at a time, and
 * all of them when more changed than the change log holds. */
static void epoll_many_scenario(void)
{
    enum { PAIRS = 20, DUP = 40 };
    int c[PAIRS], a[PAIRS];
    char buf[64];
    int ep = epoll_create1(0);
    for (int i = 0; i < PAIRS; i++) {
        connected_pair(&c[i], &a[i], SOCK_NONBLOCK);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, a[i], &ev);
    }
    int dup_fd = dup(a[5]);
    struct epoll_event dev = {.events = EPOLLIN, .data.u32 = DUP};
    step("ctl_add_dup", epoll_ctl(ep, EPOLL_CTL_ADD, dup_fd, &dev));
    wait_events(ep, 0, "idle");

    write(c[3], "x", 1);
    write(c[17], "x", 1);
    collect_events(ep, 64, 1ULL << 3 | 1ULL << 17, "two_ready");
    collect_events(ep, 64, 1ULL << 3 | 1ULL << 17, "still_ready");
    write(c[5], "x", 1);
    collect_events(ep, 64, 1ULL << 3 | 1ULL << 5 | 1ULL << 17 | 1ULL << DUP, "dup_ready");
    collect_events(ep, 1, 1ULL << 3 | 1ULL << 5 | 1ULL << 17 | 1ULL << DUP, "one_at_a_time");
    step("ctl_del_dup", epoll_ctl(ep, EPOLL_CTL_DEL, dup_fd, NULL));
    close(dup_fd);
    collect_events(ep, 64, 1ULL << 3 | 1ULL << 5 | 1ULL << 17, "after_del");
    read(a[3], buf, sizeof(buf));
    read(a[5], buf, sizeof(buf));
    read(a[17], buf, sizeof(buf));
    wait_events(ep, 0, "drained");

    close(a[17]); /* leaves the epoll; the entry moved into its place still works */
    write(c[16], "x", 1);
    write(c[19], "x", 1);
    collect_events(ep, 64, 1ULL << 16 | 1ULL << 19, "after_close");
    read(a[16], buf, sizeof(buf));
    read(a[19], buf, sizeof(buf));

    uint64_t all = 0;
    for (int i = 0; i < PAIRS; i++)
        if (i != 17) {
            write(c[i], "y", 1);
            all |= 1ULL << i;
        }
    sleep_ms(200); /* the stack logs them all before we look */
    collect_events(ep, 64, all, "every_one");
    for (int i = 0; i < PAIRS; i++) {
        close(c[i]);
        if (i != 17)
            close(a[i]);
    }
    close(ep);
}

struct delayed_write {
    int fd;
    long ms;
};

static void *write_later(void *arg)
{
    struct delayed_write *d = arg;
    sleep_ms(d->ms);
    write(d->fd, "w", 1);
    return NULL;
}

static void pollmix(void)
{
    int c, a, pipe_fds[2];
    connected_pair(&c, &a, 0);
    pipe(pipe_fds);
    char buf[16];
    struct pollfd p[2] = {{.fd = pipe_fds[0], .events = POLLIN}, {.fd = a, .events = POLLIN}};
    step("poll_idle", poll(p, 2, 0));
    write(pipe_fds[1], "p", 1);
    step("poll_pipe", poll(p, 2, 5000));
    out("revents pipe=%s socket=%s", poll_bits(p[0].revents), poll_bits(p[1].revents));
    read(pipe_fds[0], buf, 1);
    write(c, "s", 1);
    step("poll_socket", poll(p, 2, 5000));
    out("revents pipe=%s socket=%s", poll_bits(p[0].revents), poll_bits(p[1].revents));
    write(pipe_fds[1], "p", 1);
    step("poll_both", poll(p, 2, 5000));
    out("revents pipe=%s socket=%s", poll_bits(p[0].revents), poll_bits(p[1].revents));

    fd_set readable;
    FD_ZERO(&readable);
    FD_SET(pipe_fds[0], &readable);
    FD_SET(a, &readable);
    int high = (a > pipe_fds[0] ? a : pipe_fds[0]) + 1;
    struct timeval tv = {5, 0};
    step("select_both", select(high, &readable, NULL, NULL, &tv));
    out("selected pipe=%d socket=%d", FD_ISSET(pipe_fds[0], &readable) != 0, FD_ISSET(a, &readable) != 0);
    read(pipe_fds[0], buf, 1);
    read(a, buf, sizeof(buf));
    FD_ZERO(&readable);
    FD_SET(pipe_fds[0], &readable);
    FD_SET(a, &readable);
    tv = (struct timeval){0, 0};
    step("select_idle", select(high, &readable, NULL, NULL, &tv));
    fd_set writable;
    FD_ZERO(&writable);
    FD_SET(a, &writable);
    tv = (struct timeval){0, 0};
    step("select_writable", select(a + 1, NULL, &writable, NULL, &tv));

    /* A sleeping poll wakes for the stack socket, and for the pipe. */
    pthread_t thread;
    struct delayed_write later = {c, 50};
    pthread_create(&thread, NULL, write_later, &later);
    step("poll_wakes_for_socket", poll(p, 2, -1));
    out("revents pipe=%s socket=%s", poll_bits(p[0].revents), poll_bits(p[1].revents));
    pthread_join(thread, NULL);
    read(a, buf, sizeof(buf));
    later = (struct delayed_write){pipe_fds[1], 50};
    pthread_create(&thread, NULL, write_later, &later);
    step("poll_wakes_for_pipe", poll(p, 2, -1));
    out("revents pipe=%s socket=%s", poll_bits(p[0].revents), poll_bits(p[1].revents));
    pthread_join(thread, NULL);
    step("poll_timeout", poll(&p[1], 1, 30));
}

struct late_client {
    uint16_t port;
    int fd, connect_result, connect_errno;
    ssize_t write_result;
};

/* Connects after the main thread is (most likely) blocked in accept, and
 * writes after it is blocked in read; it reports after the join, so the
 * trace does not depend on the interleaving. */
static void *connect_later(void *arg)
{
    struct late_client *client = arg;
    sleep_ms(50);
    client->fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in to = stack_addr(client->port);
    client->connect_result = connect(client->fd, (struct sockaddr *)&to, sizeof(to));
    client->connect_errno = errno;
    sleep_ms(50);
    client->write_result = write(client->fd, "ping", 4);
    return NULL;
}

static void blocking(void)
{
    int l = listener(0);
    struct late_client client = {.port = local_port(l)};
    pthread_t thread;
    pthread_create(&thread, NULL, connect_later, &client);
    int a = accept(l, NULL, NULL);
    out("accepted %d", a >= 0);
    char buf[16] = {0};
    step("read_blocks", read(a, buf, sizeof(buf)));
    out("data %s", buf);
    pthread_join(thread, NULL);
    errno = client.connect_errno;
    step("thread_connect", client.connect_result);
    step("thread_write", client.write_result);
    struct timeval tv = {0, 100000};
    step("set_rcvtimeo", setsockopt(a, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)));
    step("read_times_out", read(a, buf, sizeof(buf)));
    close(client.fd);
    step("read_eof", read(a, buf, sizeof(buf)));
    close(a);
    close(l);
}

static int is_kernel_socket(int fd)
{
    char path[64], target[64] = {0};
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    readlink(path, target, sizeof(target) - 1);
    return strncmp(target, "socket:", 7) == 0;
}

static void passthrough(void)
{
    int u = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in lo = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    step("udp_bind", bind(u, (struct sockaddr *)&lo, sizeof(lo)));
    lo.sin_port = htons(local_port(u));
    step("udp_sendto", sendto(u, "u", 1, 0, (struct sockaddr *)&lo, sizeof(lo)));
    char buf[16];
    step("udp_recv", recv(u, buf, sizeof(buf), 0));
    out("udp_kernel %d", is_kernel_socket(u));

    int l = socket(AF_INET, SOCK_STREAM, 0);
    lo.sin_port = 0;
    step("tcp_bind_loopback", bind(l, (struct sockaddr *)&lo, sizeof(lo)));
    step("tcp_listen", listen(l, 4));
    lo.sin_port = htons(local_port(l));
    int c = socket(AF_INET, SOCK_STREAM, 0);
    step("tcp_connect_loopback", connect(c, (struct sockaddr *)&lo, sizeof(lo)));
    int a = accept(l, NULL, NULL);
    step("tcp_write", write(c, "k", 1));
    step("tcp_read", read(a, buf, sizeof(buf)));
    out("tcp_kernel %d %d %d", is_kernel_socket(l), is_kernel_socket(c), is_kernel_socket(a));

    int s = listener(0);
    out("stack_listener_kernel %d", is_kernel_socket(s));
    close(s);
    close(a);
    close(c);
    close(l);
    close(u);
}

static void death(void)
{
    int c, a;
    connected_pair(&c, &a, 0);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = 0};
    epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
    out("blocked");
    char buf[16];
    step("read", read(a, buf, sizeof(buf)));
    wait_events(ep, 5000, "epoll");
    step("write", write(c, "x", 1));
    step("close", close(a));
}

static void refused(void)
{
    int l = listener(0);
    uint16_t port = local_port(l);
    close(l);
    struct sockaddr_in to = stack_addr(port);
    int c = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    step("connect_nonblocking", connect(c, (struct sockaddr *)&to, sizeof(to)));
    struct pollfd p = {.fd = c, .events = POLLOUT};
    step("poll", poll(&p, 1, 5000));
    out("revents %s", poll_bits(p.revents));
    int err = 0;
    socklen_t len = sizeof(err);
    getsockopt(c, SOL_SOCKET, SO_ERROR, &err, &len);
    out("so_error %s", strerrorname_np(err));
    close(c);
    c = socket(AF_INET, SOCK_STREAM, 0);
    step("connect_blocking", connect(c, (struct sockaddr *)&to, sizeof(to)));
    close(c);
}

static void forkdup(void)
{
    int c, a;
    connected_pair(&c, &a, 0);
    int b = dup(a);
    step("close_original", close(a));
    step("write", write(c, "d", 1));
    char buf[16] = {0};
    step("read_dup", read(b, buf, sizeof(buf)));
    int high = fcntl(b, F_DUPFD_CLOEXEC, 500);
    out("dupfd_at_least_500 %d", high >= 500);
    step("close_dupfd", close(high));
    pid_t child = fork();
    if (child == 0) {
        write(b, "child", 5);
        exit(0);
    }
    int status;
    waitpid(child, &status, 0);
    out("child_exit %d", WEXITSTATUS(status));
    memset(buf, 0, sizeof(buf));
    step("read_from_child", read(c, buf, sizeof(buf)));
    out("data %s", buf);
    step("write_after_child", write(b, "p", 1));
    step("read_parent", read(c, buf, sizeof(buf)));
    int target = dup2(b, 100);
    out("dup2 %d", target);
    step("close_dup", close(b));
    step("write_via_dup2", write(target, "q", 1));
    step("read_dup2", read(c, buf, sizeof(buf)));
    step("close_last", close(target));
    step("read_eof", read(c, buf, sizeof(buf)));
    close(c);
}

static void protect(void)
{
    const char *fds = getenv("MTCPSHIM_FDS");
    int shm, ctl, wake, dead, table;
    if (!fds || sscanf(fds, "%d,%d,%d,%d,%d", &shm, &dead, &table, &ctl, &wake) != 5)
        die("MTCPSHIM_FDS");
    out("moved_high %d", shm >= 500 && ctl >= 500 && wake >= 500 && dead >= 500);
    step("close_inherited", close(ctl));
    step("close_range", close_range(3, ~0u, 0));
    int devnull = open("/dev/null", O_RDONLY);
    step("dup2_onto_inherited", dup2(devnull, wake));
    close(devnull);
    int c, a;
    connected_pair(&c, &a, 0);
    step("write", write(c, "still", 5));
    char buf[16] = {0};
    step("read", read(a, buf, sizeof(buf)));
    out("data %s", buf);
}

/* The privileged-port rule: root binds 80; once it drops to nobody (as a
 * server's worker does), 81 is refused and 8081 is not. */
static void privport(void)
{
    struct sockaddr_in addr = stack_addr(80);
    int first = socket(AF_INET, SOCK_STREAM, 0);
    step("bind_80_as_root", bind(first, (struct sockaddr *)&addr, sizeof(addr)));
    step("setuid_nobody", setuid(65534));
    int second = socket(AF_INET, SOCK_STREAM, 0);
    addr = stack_addr(81);
    step("bind_81_as_nobody", bind(second, (struct sockaddr *)&addr, sizeof(addr)));
    addr = stack_addr(8081);
    step("bind_8081_as_nobody", bind(second, (struct sockaddr *)&addr, sizeof(addr)));
}

/* "R" for a call that returned R, "-1 ENAME" for one that failed. */
static const char *result_text(long result, char *text, size_t size)
{
    if (result < 0)
        snprintf(text, size, "-1 %s", strerrorname_np(errno));
    else
        snprintf(text, size, "%ld", result);
    return text;
}

/* getsockopt's int, or its failure. */
static const char *int_option_text(int fd, int level, int name, char *text, size_t size)
{
    int value = 0;
    socklen_t len = sizeof(value);
    if (getsockopt(fd, level, name, &value, &len) < 0)
        return result_text(-1, text, size);
    snprintf(text, size, "%d", value);
    return text;
}

/* The same option calls on a kernel socket (bound to loopback) and a
 * stack socket (bound to the stack's address), one line per call:
 * "what value: set KERNEL | STACK, get KERNEL | STACK". */
static void options(void)
{
    int kernel = socket(AF_INET, SOCK_STREAM, 0), stack = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in lo = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    struct sockaddr_in addr = stack_addr(0);
    if (bind(kernel, (struct sockaddr *)&lo, sizeof(lo)) < 0 || bind(stack, (struct sockaddr *)&addr, sizeof(addr)) < 0)
        die("bind");
    out("kernel_socket %d %d", is_kernel_socket(kernel), is_kernel_socket(stack));
    /* Per option, the values tried in turn; READ_ONLY reads the default. */
    enum { READ_ONLY = -99999, END = -99998 };
    static const struct {
        const char *what;
        int level, name;
        int values[5];
    } cases[] = {
        {"SO_REUSEADDR", SOL_SOCKET, SO_REUSEADDR, {READ_ONLY, 5, 0, END}},
        {"SO_REUSEPORT", SOL_SOCKET, SO_REUSEPORT, {1, END}},
        {"SO_KEEPALIVE", SOL_SOCKET, SO_KEEPALIVE, {READ_ONLY, -3, END}},
        {"TCP_NODELAY", IPPROTO_TCP, TCP_NODELAY, {READ_ONLY, 7, END}},
        {"TCP_CORK", IPPROTO_TCP, TCP_CORK, {1, 0, END}},
        {"TCP_QUICKACK", IPPROTO_TCP, TCP_QUICKACK, {READ_ONLY, 0, 2, END}},
        {"TCP_KEEPIDLE", IPPROTO_TCP, TCP_KEEPIDLE, {READ_ONLY, 0, 32768, 60, END}},
        {"TCP_KEEPINTVL", IPPROTO_TCP, TCP_KEEPINTVL, {READ_ONLY, -1, 32767, END}},
        {"TCP_KEEPCNT", IPPROTO_TCP, TCP_KEEPCNT, {READ_ONLY, 128, 127, END}},
        {"TCP_USER_TIMEOUT", IPPROTO_TCP, TCP_USER_TIMEOUT, {READ_ONLY, -1, 2500, END}},
        {"TCP_MAXSEG", IPPROTO_TCP, TCP_MAXSEG, {READ_ONLY, 87, 32768, 1200, END}},
        {"TCP_DEFER_ACCEPT", IPPROTO_TCP, TCP_DEFER_ACCEPT, {READ_ONLY, 5, 200, -4, END}},
        /* Not the defaults: a stack socket reports its ring, Linux tcp_rmem/wmem. */
        {"SO_RCVBUF", SOL_SOCKET, SO_RCVBUF, {1, 4096, 1 << 30, -1, END}},
        {"SO_SNDBUF", SOL_SOCKET, SO_SNDBUF, {1000, 65536, 1 << 30, -1, END}},
        {"unknown", IPPROTO_TCP, 9999, {1, END}},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        for (const int *value = cases[i].values; *value != END; value++) {
            char shown[16] = "read", set_k[32] = "-", set_s[32] = "-", get_k[32], get_s[32];
            int level = cases[i].level, name = cases[i].name;
            if (*value != READ_ONLY) {
                snprintf(shown, sizeof(shown), "%d", *value);
                result_text(setsockopt(kernel, level, name, value, sizeof(*value)), set_k, sizeof(set_k));
                result_text(setsockopt(stack, level, name, value, sizeof(*value)), set_s, sizeof(set_s));
            }
            out("%s %s: set %s | %s, get %s | %s", cases[i].what, shown, set_k, set_s,
                int_option_text(kernel, level, name, get_k, sizeof(get_k)),
                int_option_text(stack, level, name, get_s, sizeof(get_s)));
        }
    short one = 1;
    char k[32], st[32];
    out("short_optlen: set %s | %s", result_text(setsockopt(kernel, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)), k, sizeof(k)),
        result_text(setsockopt(stack, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)), st, sizeof(st)));
    out("null_value: set %s | %s", result_text(setsockopt(kernel, IPPROTO_TCP, TCP_NODELAY, NULL, sizeof(int)), k, sizeof(k)),
        result_text(setsockopt(stack, IPPROTO_TCP, TCP_NODELAY, NULL, sizeof(int)), st, sizeof(st)));
    close(kernel);
    close(stack);
}

/* ---- dual-stack: run once on the kernel (PROBE_IP=127.0.0.1, not
 * attached) and once on the stack; the traces must be equal ---------------- */

static struct sockaddr_in6 mapped(uint16_t port)
{
    struct sockaddr_in v4 = stack_addr(port);
    struct sockaddr_in6 v6 = {.sin6_family = AF_INET6, .sin6_port = v4.sin_port};
    v6.sin6_addr.s6_addr[10] = v6.sin6_addr.s6_addr[11] = 0xff;
    memcpy(&v6.sin6_addr.s6_addr[12], &v4.sin_addr, 4);
    return v6;
}

/* What a name is, relative to PROBE_IP, e.g. "AF_INET6 mapped port expected len 28". */
static void name_line(const char *what, int result, const struct sockaddr_storage *name, socklen_t len,
                      uint16_t expected_port)
{
    if (result < 0) {
        out("%s -1 %s", what, strerrorname_np(errno));
        return;
    }
    const char *family = name->ss_family == AF_INET6 ? "AF_INET6" : name->ss_family == AF_INET ? "AF_INET" : "other";
    const char *address = "other";
    uint16_t port = 0;
    if (name->ss_family == AF_INET6) {
        const struct sockaddr_in6 *v6 = (const struct sockaddr_in6 *)name;
        struct sockaddr_in6 ours = mapped(0);
        port = ntohs(v6->sin6_port);
        if (IN6_IS_ADDR_UNSPECIFIED(&v6->sin6_addr))
            address = "any";
        else if (memcmp(&v6->sin6_addr, &ours.sin6_addr, 16) == 0)
            address = "mapped";
        if (v6->sin6_flowinfo || v6->sin6_scope_id)
            address = "flow-or-scope-set";
    } else if (name->ss_family == AF_INET) {
        const struct sockaddr_in *v4 = (const struct sockaddr_in *)name;
        struct sockaddr_in ours = stack_addr(0);
        port = ntohs(v4->sin_port);
        address = v4->sin_addr.s_addr == ours.sin_addr.s_addr ? "ours" : v4->sin_addr.s_addr == 0 ? "any" : "other";
    }
    out("%s %s %s port %s len %u", what, family, address,
        expected_port ? (port == expected_port ? "expected" : "other") : (port ? "set" : "0"), (unsigned)len);
}

/* getsockname (peer 0) or getpeername into a buffer of `room` bytes. */
static void name_of(const char *what, int fd, int peer, socklen_t room, uint16_t expected_port)
{
    struct sockaddr_storage name;
    memset(&name, 0, sizeof(name));
    socklen_t len = room;
    int result = peer ? getpeername(fd, (struct sockaddr *)&name, &len) : getsockname(fd, (struct sockaddr *)&name, &len);
    name_line(what, result, &name, len, expected_port);
}

static void dualstack(void)
{
    struct sockaddr_storage name;
    socklen_t len;
    int value;
    int l = socket(AF_INET6, SOCK_STREAM, 0);
    int off = 0;
    step("v6only_off", setsockopt(l, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof(off)));
    struct sockaddr_in6 any = {.sin6_family = AF_INET6};
    struct sockaddr_in v4any = {.sin_family = AF_INET};
    step("bind_sockaddr_in", bind(l, (struct sockaddr *)&v4any, sizeof(v4any)));
    step("bind_short", bind(l, (struct sockaddr *)&any, 20));
    step("bind_any6", bind(l, (struct sockaddr *)&any, sizeof(any)));
    step("listen", listen(l, 8));
    out("listener_kernel %d", is_kernel_socket(l));
    name_of("listener_name", l, 0, sizeof(name), 0);
    uint16_t port = local_port(l);
    len = sizeof(value);
    step("so_domain", getsockopt(l, SOL_SOCKET, SO_DOMAIN, &value, &len));
    out("domain %s", value == AF_INET6 ? "AF_INET6" : "other");
    len = sizeof(value);
    value = -1;
    step("get_v6only", getsockopt(l, IPPROTO_IPV6, IPV6_V6ONLY, &value, &len));
    out("v6only %d", value);
    step("set_v6only_bound", setsockopt(l, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof(off)));

    /* An IPv4 client: its peer is the IPv4-mapped address. */
    int c = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in to = stack_addr(port);
    step("connect_v4", connect(c, (struct sockaddr *)&to, sizeof(to)));
    uint16_t client_port = local_port(c);
    len = sizeof(name);
    int a = accept(l, (struct sockaddr *)&name, &len);
    name_line("accepted_from", a, &name, len, client_port);
    name_of("accepted_name", a, 0, sizeof(name), port);
    name_of("accepted_peer", a, 1, sizeof(name), client_port);
    /* Too short: truncated, and the full length reported. */
    name_of("accepted_peer_short", a, 1, sizeof(struct sockaddr_in), client_port);
    len = sizeof(value);
    getsockopt(a, SOL_SOCKET, SO_DOMAIN, &value, &len);
    out("accepted_domain %s", value == AF_INET6 ? "AF_INET6" : "other");
    char buf[16] = {0};
    step("write_v4", write(c, "four", 4));
    step("read_v6", read(a, buf, sizeof(buf)));
    out("bytes %s", buf);
    close(a);
    close(c);

    /* An AF_INET6 client of an IPv4-mapped address. */
    c = socket(AF_INET6, SOCK_STREAM, 0);
    struct sockaddr_in6 to6 = mapped(port);
    step("connect_mapped", connect(c, (struct sockaddr *)&to6, sizeof(to6)));
    name_of("client_name", c, 0, sizeof(name), 0);
    client_port = local_port(c);
    name_of("client_peer", c, 1, sizeof(name), port);
    len = sizeof(name);
    a = accept(l, (struct sockaddr *)&name, &len);
    name_line("accepted_from", a, &name, len, client_port);
    memset(buf, 0, sizeof(buf));
    step("write_mapped", write(a, "six", 3));
    step("read_mapped", read(c, buf, sizeof(buf)));
    out("bytes %s", buf);
    step("connect_again", connect(c, (struct sockaddr *)&to6, sizeof(to6)));
    close(a);
    close(c);
    close(l);

    /* IPV6_V6ONLY takes no IPv4 peers: such a listener is the kernel's. */
    int k = socket(AF_INET6, SOCK_STREAM, 0);
    int on = 1;
    setsockopt(k, IPPROTO_IPV6, IPV6_V6ONLY, &on, sizeof(on));
    step("v6only_bind_any6", bind(k, (struct sockaddr *)&any, sizeof(any)));
    step("v6only_listen", listen(k, 1));
    out("v6only_listener_kernel %d", is_kernel_socket(k));
    close(k);
}

/* ---- port rules: run on the kernel and on the stack, traces equal --------- */

/* bind() of a new socket to PROBE_IP:port, with SO_REUSEADDR or not; the
 * socket is closed again. */
static long try_bind(uint16_t port, int reuse)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &reuse, sizeof(reuse));
    struct sockaddr_in at = stack_addr(port);
    long result = bind(fd, (struct sockaddr *)&at, sizeof(at));
    int err = errno;
    close(fd);
    errno = err;
    return result;
}

static void portrules(void)
{
    int one = 1;
    int l = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in at = stack_addr(0);
    step("listener_bind", bind(l, (struct sockaddr *)&at, sizeof(at)));
    step("listen", listen(l, 4));
    uint16_t port = local_port(l);
    at = stack_addr(port);
    step("bind_while_listening", try_bind(port, 0));
    step("bind_while_listening_reuse", try_bind(port, 1));
    int c = socket(AF_INET, SOCK_STREAM, 0);
    step("connect", connect(c, (struct sockaddr *)&at, sizeof(at)));
    int a = accept(l, NULL, NULL);
    step("close_listener", close(l));
    /* The accepted connection holds the port, with the listener's SO_REUSEADDR. */
    step("bind_beside_connection", try_bind(port, 0));
    step("bind_beside_connection_reuse", try_bind(port, 1));
    /* The server closes first: its side of the connection waits in TIME_WAIT. */
    step("close_accepted", close(a));
    char buf[4];
    step("client_reads_eof", read(c, buf, sizeof(buf)));
    step("close_client", close(c));
    sleep_ms(200);
    step("bind_in_time_wait", try_bind(port, 0));
    step("bind_in_time_wait_reuse", try_bind(port, 1));
}

/* A listener on PROBE_IP:port with SO_REUSEPORT (or not); -1 if it cannot. */
static int reuseport_listener(uint16_t port, int reuse_port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &reuse_port, sizeof(reuse_port));
    struct sockaddr_in at = stack_addr(port);
    if (bind(fd, (struct sockaddr *)&at, sizeof(at)) < 0 || listen(fd, 64) < 0) {
        int err = errno;
        close(fd);
        errno = err;
        return -1;
    }
    return fd;
}

/* Connections accepted on `fd` until none waits (each closed again). */
static int accept_all(int fd)
{
    int n = 0, a;
    while ((a = accept(fd, NULL, NULL)) >= 0) {
        close(a);
        n++;
    }
    return n;
}

static void reuseport(void)
{
    enum { CLIENTS = 24 };
    int first = reuseport_listener(0, 1);
    step("first", first < 0 ? first : 0);
    uint16_t port = local_port(first);
    step("without_reuseport", reuseport_listener(port, 0));
    int second = reuseport_listener(port, 1);
    step("second", second < 0 ? second : 0);
    int clients[CLIENTS];
    struct sockaddr_in to = stack_addr(port);
    int connected = 0;
    for (int i = 0; i < CLIENTS; i++) {
        clients[i] = socket(AF_INET, SOCK_STREAM, 0);
        connected += connect(clients[i], (struct sockaddr *)&to, sizeof(to)) == 0;
    }
    out("connected %d", connected);
    sleep_ms(100);
    int on_first = accept_all(first), on_second = accept_all(second);
    out("accepted %d", on_first + on_second);
    out("both_listeners_got_some %d", on_first > 0 && on_second > 0);
    for (int i = 0; i < CLIENTS; i++)
        close(clients[i]);
    /* With one of them gone, the other takes every new connection. */
    close(first);
    int c = socket(AF_INET, SOCK_STREAM, 0);
    int ok = 0;
    for (int i = 0; i < 8; i++) {
        ok += connect(c, (struct sockaddr *)&to, sizeof(to)) == 0;
        close(c);
        c = socket(AF_INET, SOCK_STREAM, 0);
    }
    close(c);
    out("after_close_connected %d", ok);
    sleep_ms(100);
    out("after_close_accepted %d", accept_all(second));
    close(second);
    /* A port bound without SO_REUSEPORT is nobody else's. */
    int alone = reuseport_listener(0, 0);
    step("join_without_reuseport_holder", reuseport_listener(local_port(alone), 1));
    close(alone);
}

/* ---- a holder killed: run on the kernel and on the stack, traces equal ---- */

static void killed(void)
{
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in at = stack_addr(0);
    if (bind(l, (struct sockaddr *)&at, sizeof(at)) < 0 || listen(l, 4) < 0)
        die("listener");
    uint16_t port = local_port(l);
    at = stack_addr(port);
    int c = socket(AF_INET, SOCK_STREAM, 0);
    step("connect", connect(c, (struct sockaddr *)&at, sizeof(at)));
    int a = accept(l, NULL, NULL);
    pid_t child = fork();
    if (child == 0) {
        pause(); /* holds l and a until killed */
        _exit(0);
    }
    step("close_listener_in_parent", close(l));
    step("close_accepted_in_parent", close(a));
    /* The child holds both now, as a worker would: kill it. */
    step("kill_holder", kill(child, SIGKILL));
    int status;
    waitpid(child, &status, 0);
    out("holder_killed %d", WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
    /* Its references went with it: the connection closed (FIN), the
     * listener with it. */
    step("client_readable", wait_readable(c));
    char buf[16];
    step("client_reads_eof", read(c, buf, sizeof(buf)));
    int d = socket(AF_INET, SOCK_STREAM, 0);
    step("connect_to_the_gone_listener", connect(d, (struct sockaddr *)&at, sizeof(at)));
    close(d);
    close(c);
}

/* ---- an epoll set inside another, and in poll: kernel and stack ----------- */

static void nested(void)
{
    int c, a;
    connected_pair(&c, &a, 0);
    int inner = epoll_create1(0), outer = epoll_create1(0);
    struct epoll_event in = {.events = EPOLLIN, .data.fd = a}, of_inner = {.events = EPOLLIN, .data.fd = inner};
    step("inner_add_connection", epoll_ctl(inner, EPOLL_CTL_ADD, a, &in));
    step("outer_add_inner", epoll_ctl(outer, EPOLL_CTL_ADD, inner, &of_inner));
    struct epoll_event got[4];
    step("outer_before_data", epoll_wait(outer, got, 4, 0));
    step("write", write(c, "x", 1));
    int n = (int)step("outer_after_data", epoll_wait(outer, got, 4, 5000));
    out("outer_reports_inner %d", n == 1 && got[0].data.fd == inner);
    n = (int)step("inner_wait", epoll_wait(inner, got, 4, 0));
    out("inner_reports_connection %d", n == 1 && got[0].data.fd == a && got[0].events == EPOLLIN);
    /* Level-triggered and unread: the inner set stays readable. */
    step("outer_still", epoll_wait(outer, got, 4, 0));
    struct pollfd p = {.fd = inner, .events = POLLIN};
    step("poll_inner", poll(&p, 1, 0));
    out("poll_revents %s", poll_bits(p.revents));
    char buf[8];
    step("read", read(a, buf, sizeof(buf)));
    step("inner_after_read", epoll_wait(inner, got, 4, 0));
    step("outer_after_read", epoll_wait(outer, got, 4, 0));
    /* Asleep in the outer wait when data arrives: it wakes. */
    pid_t child = fork();
    if (child == 0) {
        sleep_ms(100);
        write(c, "y", 1);
        _exit(0);
    }
    n = (int)step("outer_wakes", epoll_wait(outer, got, 4, 5000));
    p.revents = 0;
    step("poll_inner_again", poll(&p, 1, 0));
    waitpid(child, NULL, 0);
    close(outer);
    close(inner);
    close(a);
    close(c);
}

/* ---- what fstat says of a socket; splice, not supported on the stack -------- */

static void fstat_splice(void)
{
    int c, a;
    connected_pair(&c, &a, 0);
    struct stat st;
    step("fstat", fstat(a, &st));
    out("is_socket %d", S_ISSOCK(st.st_mode));
    int pipefd[2];
    if (pipe(pipefd) < 0)
        die("pipe");
    step("write", write(c, "spliced", 7));
    sleep_ms(50);
    step("splice_to_pipe", splice(a, NULL, pipefd[1], NULL, 7, SPLICE_F_NONBLOCK));
    close(pipefd[0]);
    close(pipefd[1]);
    close(a);
    close(c);
}

/* ---- sendmmsg and recvmmsg on a stream: kernel and stack ------------------ */

static void mmsg(void)
{
    int c, a;
    connected_pair(&c, &a, 0);
    struct iovec out_iov[2] = {{"ab", 2}, {"cd", 2}};
    struct mmsghdr out_msgs[2] = {{.msg_hdr = {.msg_iov = &out_iov[0], .msg_iovlen = 1}},
                                  {.msg_hdr = {.msg_iov = &out_iov[1], .msg_iovlen = 1}}};
    step("sendmmsg", sendmmsg(c, out_msgs, 2, 0));
    out("sent_lens %u %u", out_msgs[0].msg_len, out_msgs[1].msg_len);
    sleep_ms(50);
    char first[2], second[8] = {0};
    struct iovec in_iov[2] = {{first, sizeof(first)}, {second, sizeof(second) - 1}};
    struct mmsghdr in_msgs[3] = {{.msg_hdr = {.msg_iov = &in_iov[0], .msg_iovlen = 1}},
                                 {.msg_hdr = {.msg_iov = &in_iov[1], .msg_iovlen = 1}},
                                 {.msg_hdr = {.msg_iov = &in_iov[1], .msg_iovlen = 1}}};
    step("recvmmsg_waitforone", recvmmsg(a, in_msgs, 3, MSG_WAITFORONE, NULL));
    out("received %.2s %s lens %u %u", first, second, in_msgs[0].msg_len, in_msgs[1].msg_len);
    close(a);
    close(c);
}

/* ---- a socket closed while another thread blocks on it: kernel and stack --- */

struct blocked_reader {
    int fd;
    ssize_t result;
    char data[16];
};

static void *read_blocked(void *arg)
{
    struct blocked_reader *r = arg;
    r->result = read(r->fd, r->data, sizeof(r->data) - 1);
    return NULL;
}

static void closeblocked(void)
{
    int c, a;
    connected_pair(&c, &a, 0);
    struct blocked_reader reader = {.fd = a};
    pthread_t thread;
    pthread_create(&thread, NULL, read_blocked, &reader);
    sleep_ms(100);
    /* Linux: the number goes, the socket stays while the read holds it. */
    step("close_under_the_reader", close(a));
    sleep_ms(100);
    step("peer_writes", write(c, "late", 4));
    pthread_join(thread, NULL);
    out("blocked_read %zd %s", reader.result, reader.data);
    char buf[8];
    step("peer_reads_eof", read(c, buf, sizeof(buf)));
    close(c);
}

/* ---- TCP_INFO's figures after a transfer: kernel and stack ----------------- */

static void tcpinfo(void)
{
    int c, a;
    connected_pair(&c, &a, 0);
    static char chunk[16 * 1024];
    long moved = 0;
    for (int i = 0; i < 256; i++) { /* 4 MB across, read as it goes: acknowledged, RTT sampled */
        ssize_t sent = write(c, chunk, sizeof(chunk));
        for (ssize_t got = 0; sent > 0 && got < sent;) {
            ssize_t n = read(a, chunk, sizeof(chunk));
            if (n <= 0)
                die("read");
            got += n;
        }
        moved += sent;
    }
    out("moved %ld", moved);
    sleep_ms(50); /* the last ACKs */
    struct tcp_info info;
    socklen_t len = sizeof(info);
    step("tcp_info", getsockopt(c, IPPROTO_TCP, TCP_INFO, &info, &len));
    out("len_full %d", len == sizeof(info));
    out("established %d", info.tcpi_state == TCP_ESTABLISHED);
    out("rtt_measured %d", info.tcpi_rtt > 0 && info.tcpi_rtt < 1000000 && info.tcpi_rto >= 200000);
    out("mss_set %d", info.tcpi_snd_mss >= 536 && info.tcpi_rcv_mss >= 536 && info.tcpi_advmss >= 536);
    out("cwnd_grown %d", info.tcpi_snd_cwnd >= 10);
    out("nothing_unacked %d", info.tcpi_unacked == 0);
    out("no_retransmissions %d", info.tcpi_total_retrans == 0 && info.tcpi_retransmits == 0);
    out("options_sack_timestamps_wscale %d", (info.tcpi_options & 7) == 7 && info.tcpi_snd_wscale > 0);
    len = 8;
    step("tcp_info_short", getsockopt(c, IPPROTO_TCP, TCP_INFO, &info, &len));
    out("len_short %d", len);
    close(a);
    close(c);
}

/* ---- the same calls through syscall(2): kernel and stack ------------------- */

static void rawsyscall(void)
{
    int l = (int)step("socket", syscall(SYS_socket, AF_INET, SOCK_STREAM, 0));
    struct sockaddr_in any = {.sin_family = AF_INET};
    step("bind", syscall(SYS_bind, l, &any, sizeof(any)));
    step("listen", syscall(SYS_listen, l, 4));
    out("listener_kernel %d", is_kernel_socket(l));
    struct sockaddr_in to = stack_addr(local_port(l));
    int c = socket(AF_INET, SOCK_STREAM, 0);
    step("connect", connect(c, (struct sockaddr *)&to, sizeof(to)));
    int a = (int)syscall(SYS_accept4, l, NULL, NULL, SOCK_CLOEXEC);
    out("accepted %d cloexec %d", a >= 0, fcntl(a, F_GETFD) == FD_CLOEXEC);
    step("write", syscall(SYS_write, c, "raw", 3));
    char buf[8] = {0};
    step("read", syscall(SYS_read, a, buf, sizeof(buf)));
    out("bytes %s", buf);
    struct sockaddr_in peer;
    socklen_t len = sizeof(peer);
    step("getpeername", syscall(SYS_getpeername, a, &peer, &len));
    out("peer_port_matches %d", ntohs(peer.sin_port) == local_port(c));
    int one = 1;
    step("setsockopt_nodelay", syscall(SYS_setsockopt, a, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)));
    step("fcntl_nonblock", syscall(SYS_fcntl, a, F_SETFL, O_NONBLOCK));
    step("read_nothing", syscall(SYS_read, a, buf, sizeof(buf)));
    int d = (int)syscall(SYS_dup, a);
    step("close_accepted", syscall(SYS_close, a));
    step("send_via_dup", syscall(SYS_sendto, d, "d", 1, 0, NULL, 0));
    step("read_client", read(c, buf, sizeof(buf)));
    step("shutdown_write", syscall(SYS_shutdown, d, SHUT_WR));
    step("client_reads_eof", read(c, buf, sizeof(buf)));
    step("close_dup", syscall(SYS_close, d));
    step("close_listener", syscall(SYS_close, l));
    close(c);
}

/* ---- passing sockets over AF_UNIX: run on the kernel and on the stack ------ */

static int send_fds(int over, const int *fds, int count)
{
    char data = 'f';
    struct iovec iov = {&data, 1};
    union {
        char buf[CMSG_SPACE(4 * sizeof(int))];
        struct cmsghdr align;
    } control;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                         .msg_controllen = CMSG_SPACE((size_t)count * sizeof(int))};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN((size_t)count * sizeof(int));
    memcpy(CMSG_DATA(cm), fds, (size_t)count * sizeof(int));
    return (int)sendmsg(over, &msg, 0);
}

/* Receives up to `count` descriptors; returns how many came. */
static int receive_fds(int over, int *fds, int count)
{
    char data;
    struct iovec iov = {&data, 1};
    union {
        char buf[CMSG_SPACE(4 * sizeof(int))];
        struct cmsghdr align;
    } control;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                         .msg_controllen = sizeof(control.buf)};
    if (recvmsg(over, &msg, MSG_CMSG_CLOEXEC) != 1)
        return -1;
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    if (!cm || cm->cmsg_type != SCM_RIGHTS)
        return 0;
    int got = (int)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
    memcpy(fds, CMSG_DATA(cm), (size_t)(got < count ? got : count) * sizeof(int));
    return got;
}

/* The receiver: it gets a listener and a connection its sender has closed
 * already, and says what it found over the connection itself.  Its status
 * tells the sender what failed, if anything. */
static void passfd_receiver(int over, int go)
{
    char byte;
    if (read(go, &byte, 1) != 1)
        _exit(3);
    int fds[2];
    if (receive_fds(over, fds, 2) != 2)
        _exit(4);
    int types[2] = {0, 0};
    for (int i = 0; i < 2; i++) {
        socklen_t len = sizeof(types[i]);
        getsockopt(fds[i], SOL_SOCKET, SO_TYPE, &types[i], &len);
    }
    char line[64];
    int n = snprintf(line, sizeof(line), "stream %d %d cloexec %d", types[0] == SOCK_STREAM,
                     types[1] == SOCK_STREAM, fcntl(fds[1], F_GETFD) == FD_CLOEXEC);
    if (write(fds[1], line, (size_t)n) != n)
        _exit(5);
    int second = accept(fds[0], NULL, NULL);
    if (second < 0 || write(second, "accepted by the receiver", 24) != 24)
        _exit(6);
    _exit(0);
}

static void passfd(void)
{
    int pair[2], go[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, pair) < 0 || pipe(go) < 0)
        die("socketpair");
    pid_t child = fork();
    if (child == 0) {
        close(pair[0]);
        close(go[1]);
        passfd_receiver(pair[1], go[0]);
    }
    close(pair[1]);
    close(go[0]);
    int l = listener(0);
    struct sockaddr_in to = stack_addr(local_port(l));
    int c = socket(AF_INET, SOCK_STREAM, 0);
    step("connect", connect(c, (struct sockaddr *)&to, sizeof(to)));
    int a = accept(l, NULL, NULL);
    int fds[2] = {l, a};
    step("send_listener_and_connection", send_fds(pair[0], fds, 2));
    /* Only the message holds them now, as on the kernel. */
    step("close_both", close(l) | close(a));
    step("let_receiver_go", write(go[1], "g", 1));
    char buf[64] = {0};
    step("read_from_receiver", read(c, buf, sizeof(buf) - 1));
    out("bytes %s", buf);
    int c2 = socket(AF_INET, SOCK_STREAM, 0);
    step("connect_to_passed_listener", connect(c2, (struct sockaddr *)&to, sizeof(to)));
    memset(buf, 0, sizeof(buf));
    step("read_from_accepted", read(c2, buf, sizeof(buf) - 1));
    out("bytes %s", buf);
    int status;
    waitpid(child, &status, 0);
    out("receiver_exit %d", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
    step("after_its_exit_reads_eof", read(c, buf, sizeof(buf)));
    int c3 = socket(AF_INET, SOCK_STREAM, 0);
    step("connect_after_its_exit", connect(c3, (struct sockaddr *)&to, sizeof(to)));
    close(c3);
    close(c2);
    close(c);
}

/* ---- exec: run on the kernel and on the stack, traces equal ---------------- */

/* The image the "exec" scenario's child becomes: the socket it inherited
 * works, the one with FD_CLOEXEC is gone.  Exits non-zero if not. */
static void exec_image(void)
{
    int kept = atoi(getenv("PROBE_KEPT_FD")), closed = atoi(getenv("PROBE_CLOSED_FD"));
    if (fcntl(closed, F_GETFD) >= 0)
        _exit(3);
    int type = 0;
    socklen_t len = sizeof(type);
    if (getsockopt(kept, SOL_SOCKET, SO_TYPE, &type, &len) < 0 || type != SOCK_STREAM)
        _exit(4);
    if (write(kept, "from the new image", 18) != 18)
        _exit(5);
    char buf[8];
    if (read(kept, buf, sizeof(buf)) != 3)
        _exit(6);
    exit(0);
}

static void exec_scenario(void)
{
    int c, a, c2, a2;
    connected_pair(&c, &a, 0);
    connected_pair(&c2, &a2, 0);
    step("cloexec_on_second", fcntl(a2, F_SETFD, FD_CLOEXEC));
    char kept[16], closed[16];
    snprintf(kept, sizeof(kept), "%d", a);
    snprintf(closed, sizeof(closed), "%d", a2);
    pid_t child = fork();
    if (child == 0) {
        setenv("PROBE_KEPT_FD", kept, 1);
        setenv("PROBE_CLOSED_FD", closed, 1);
        execl("/proc/self/exe", "probe", "exec_image", (char *)NULL);
        _exit(127);
    }
    step("close_in_parent", close(a) | close(a2));
    char buf[32] = {0};
    step("read_from_new_image", read(c, buf, sizeof(buf) - 1));
    out("bytes %s", buf);
    /* The new image is still running: exec itself closed this one. */
    step("closed_by_exec_reads_eof", read(c2, buf, sizeof(buf)));
    step("write_to_new_image", write(c, "bye", 3));
    int status;
    waitpid(child, &status, 0);
    out("new_image_exit %d", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
    step("after_its_exit_reads_eof", read(c, buf, sizeof(buf)));
    close(c);
    close(c2);
}

int main(int argc, char **argv)
{
    const struct {
        const char *name;
        void (*run)(void);
    } scenarios[] = {
        {"handshake", handshake}, {"data", data}, {"sndbuf", sndbuf},         {"eof", eof},         {"sendfile", sendfile_scenario},
        {"sendfile_files", sendfile_files_scenario},
        {"epoll", epoll_scenario}, {"epoll_many", epoll_many_scenario}, {"pollmix", pollmix},  {"blocking", blocking}, {"passthrough", passthrough},
        {"death", death},         {"refused", refused},   {"forkdup", forkdup}, {"protect", protect},
        {"privport", privport},   {"options", options},     {"dualstack", dualstack},
        {"portrules", portrules}, {"reuseport", reuseport}, {"killed", killed},
        {"exec", exec_scenario},  {"exec_image", exec_image}, {"passfd", passfd},
        {"nested", nested}, {"rawsyscall", rawsyscall},
        {"tcpinfo", tcpinfo},     {"closeblocked", closeblocked},
        {"mmsg", mmsg},           {"fstat_splice", fstat_splice},
    };
    for (size_t i = 0; argc == 2 && i < sizeof(scenarios) / sizeof(scenarios[0]); i++)
        if (strcmp(argv[1], scenarios[i].name) == 0) {
            scenarios[i].run();
            return 0;
        }
    fprintf(stderr, "usage: probe SCENARIO\n");
    return 2;
}
