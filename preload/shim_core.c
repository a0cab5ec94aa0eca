/*
 * The interposer's life: attaching to the stack's region at start, the fd
 * table, the interposer's own descriptors, logging, exit and fork.  The
 * real functions are in shim_real.c, commands to the stack in shim_cmd.c,
 * waiting for it in shim_wait.c.
 */
#include "shim.h"

#include <fcntl.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>

#define DEFAULT_SPIN_US 20

struct shim_state shim = {.shm_fd = -1, .death_fd = -1, .table_fd = -1};
int shim_init_done;
__thread int shim_busy __attribute__((tls_model("initial-exec")));

uint64_t *shim_fd_table;
uint32_t shim_fd_capacity;
static int fd_highest = -1;

/* ---- direct system calls, used until dlsym has answered ------------------ */

/* ---- logging -------------------------------------------------------------- */

void shim_log(const char *fmt, ...)
{
    char line[512];
    shim_busy++;
    int n = snprintf(line, sizeof(line), "mtcpshim[%d]: ", (int)getpid());
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (m < 0)
        m = 0;
    n += m < (int)(sizeof(line) - (size_t)n - 1) ? m : (int)(sizeof(line) - (size_t)n - 2);
    line[n++] = '\n';
    shim_real.write(STDERR_FILENO, line, (size_t)n);
    shim_busy--;
}

/* ---- the fd table --------------------------------------------------------- */

static void fd_store(int fd, uint64_t word)
{
    if ((unsigned)fd >= shim_fd_capacity)
        return;
    __atomic_store_n(&shim_fd_table[fd], word, __ATOMIC_RELEASE);
    int high = __atomic_load_n(&fd_highest, __ATOMIC_RELAXED);
    while (fd > high && !__atomic_compare_exchange_n(&fd_highest, &high, fd, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        ;
}

void shim_fd_set(int fd, enum shim_fd_kind kind, uint32_t payload)
{
    fd_store(fd, (uint64_t)kind << MTS_FD_KIND_SHIFT | (payload & MTS_FD_PAYLOAD_MASK));
}

void shim_fd_set_stack(int fd, uint32_t slot, uint32_t generation)
{
    fd_store(fd, (uint64_t)generation << 32 | (uint64_t)SHIM_FD_STACK << MTS_FD_KIND_SHIFT | slot);
}

int shim_fd_current(uint64_t word)
{
    return __atomic_load_n(&shim_slot(shim_fd_payload(word))->generation, __ATOMIC_RELAXED) ==
           shim_fd_generation(word);
}

void shim_fd_clear(int fd)
{
    if ((unsigned)fd < shim_fd_capacity)
        __atomic_store_n(&shim_fd_table[fd], 0, __ATOMIC_RELEASE);
}

int shim_fd_highest(void) { return __atomic_load_n(&fd_highest, __ATOMIC_RELAXED); }

/* A recursive spin lock whose owner is a thread-local address rather than a
 * thread id: the same after fork, so the forking thread's child still owns
 * it, and other libraries' fork handlers may close fds while we hold it. */
static uint32_t fd_lock_word;
static void *fd_lock_owner;
static uint32_t fd_lock_depth;
static __thread char fd_lock_token __attribute__((tls_model("initial-exec")));

void shim_fd_lock(void)
{
    if (__atomic_load_n(&fd_lock_owner, __ATOMIC_RELAXED) == &fd_lock_token) {
        fd_lock_depth++;
        return;
    }
    uint32_t expected = 0;
    while (!__atomic_compare_exchange_n(&fd_lock_word, &expected, 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
        expected = 0;
        sched_yield();
    }
    __atomic_store_n(&fd_lock_owner, &fd_lock_token, __ATOMIC_RELAXED);
    fd_lock_depth = 1;
}

void shim_fd_unlock(void)
{
    if (--fd_lock_depth)
        return;
    __atomic_store_n(&fd_lock_owner, NULL, __ATOMIC_RELAXED);
    __atomic_store_n(&fd_lock_word, 0, __ATOMIC_RELEASE);
}

/* ---- internal descriptors ---------------------------------------------------- */

int shim_internal_fd(int fd, int cloexec)
{
    if (fd < shim.internal_fd_base) {
        int moved = shim_real.fcntl(fd, cloexec ? F_DUPFD_CLOEXEC : F_DUPFD, shim.internal_fd_base);
        if (moved >= 0) {
            shim_real.close(fd);
            fd = moved;
        }
    }
    shim_fd_set(fd, SHIM_FD_INTERNAL, 0);
    return fd;
}

static void publish_inherited_fds(void)
{
    char value[16 * (3 + 2 * MTS_MAX_WORKERS)];
    int n = snprintf(value, sizeof(value), "%d,%d,%d", shim.shm_fd, shim.death_fd, shim.table_fd);
    for (uint32_t w = 0; w < shim.geom.nworkers; w++)
        n += snprintf(value + n, sizeof(value) - (size_t)n, ",%d,%d", shim.ctl_fd[w], shim.wake_fd[w]);
    setenv(MTS_ENV_FDS, value, 1);
}

/* The descriptor variables MTS_ENV_FDS names; returns how many it wrote. */
static size_t inherited_fds(int *fds[3 + 2 * MTS_MAX_WORKERS])
{
    size_t n = 0;
    fds[n++] = &shim.shm_fd;
    fds[n++] = &shim.death_fd;
    fds[n++] = &shim.table_fd;
    for (uint32_t w = 0; w < shim.geom.nworkers; w++) {
        fds[n++] = &shim.ctl_fd[w];
        fds[n++] = &shim.wake_fd[w];
    }
    return n;
}

int shim_internal_relocate(int fd)
{
    int *inherited[3 + 2 * MTS_MAX_WORKERS];
    size_t count = inherited_fds(inherited);
    for (size_t i = 0; i < count; i++) {
        if (*inherited[i] != fd)
            continue;
        int moved = shim_real.fcntl(fd, F_DUPFD, fd + 1);
        if (moved < 0)
            return -1;
        shim_fd_set(moved, SHIM_FD_INTERNAL, 0);
        *inherited[i] = moved;
        shim_fd_clear(fd);
        shim_busy++;
        publish_inherited_fds();
        shim_busy--;
        SHIM_DEBUG("moved inherited fd %d to %d", fd, moved);
        return 0;
    }
    int moved = shim_waiter_relocate(fd);
    if (moved < 0)
        return -1;
    if (!moved)
        shim_fd_clear(fd);
    return 0;
}

/* ---- attaching ------------------------------------------------------------------ */

static pthread_once_t attach_once = PTHREAD_ONCE_INIT;

/* MTS_ENV_FDS: "SHM,DEATH,TABLE" then "CTL,WAKE" of each worker.  TABLE is
 * -1 from the launcher; once an image of the program attached it is the fd
 * table's memfd, which an exec'd image takes over.  Returns the number of
 * workers, or -1. */
static int parse_inherited_fds(const char *value, int fds[3 + 2 * MTS_MAX_WORKERS])
{
    const char *p = value;
    for (int i = 0; i < 3 + 2 * MTS_MAX_WORKERS; i++) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < (i == 2 ? -1 : 0) || v > INT_MAX || (*end != ',' && *end != '\0'))
            return -1;
        fds[i] = (int)v;
        if (*end == '\0')
            return i >= 4 && i % 2 == 0 ? (i - 2) / 2 : -1;
        p = end + 1;
    }
    return -1;
}

/* The fd table is a memfd of capacity + 1 words: one per descriptor number,
 * then the pid of the process whose table it is.  The memfd stays open as
 * an internal descriptor without FD_CLOEXEC (its number in MTS_ENV_FDS), so
 * that an image the process exec's takes the table over, and the stack
 * holds it too (register_process). */
#define TABLE_BYTES(capacity) (((size_t)(capacity) + 1) * sizeof(uint64_t))
#define TABLE_NAME "mtcpshim-fd-table"

/* What setup_fd_table found. */
enum table_origin {
    TABLE_NEW,        /* a table of our own, empty: the stack must be told */
    TABLE_AFTER_EXEC, /* this process's, from before it exec'd */
    TABLE_SPAWNED,    /* new, and `parent_table` is the table of the process that spawned us */
    TABLE_PRIVATE,    /* private memory: no memfd to be had */
};
static uint64_t *parent_table;
static uint32_t parent_capacity;

/* Whether the table is a shared mapping (of a memfd), which a fork child
 * must replace with its own. */
static int fd_table_shared;

/* A memfd for a table of shim_fd_capacity words, holding the first `words`
 * words of ours; -1 when the kernel gives no memfd. */
static int fd_table_memfd(uint32_t words)
{
    int fd = memfd_create(TABLE_NAME, 0);
    if (fd < 0)
        return -1;
    if (ftruncate(fd, (off_t)TABLE_BYTES(shim_fd_capacity)) < 0 ||
        (words && pwrite(fd, shim_fd_table, (size_t)words * sizeof(uint64_t), 0) < 0)) {
        shim_real.close(fd);
        return -1;
    }
    return fd;
}

static void *map_table(int memfd, uint32_t capacity)
{
    return mmap(NULL, TABLE_BYTES(capacity), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, memfd, 0);
}

/* The table a process inherited through exec (`inherited`, the memfd an
 * earlier image named in MTS_ENV_FDS): its own if the owner word is our
 * pid, else the table of the process that spawned us (posix_spawn runs no
 * fork of ours), mapped at parent_table.  -1 if there is none. */
static int take_inherited_table(int inherited, uint64_t **table, uint32_t *capacity)
{
    static const char name[] = "/memfd:" TABLE_NAME;
    char path[32], target[64] = {0};
    snprintf(path, sizeof(path), "/proc/self/fd/%d", inherited);
    struct stat st;
    if (inherited < 0 || readlink(path, target, sizeof(target) - 1) < 0 || strncmp(target, name, sizeof(name) - 1) ||
        fstat(inherited, &st) < 0 || !S_ISREG(st.st_mode) || st.st_size % sizeof(uint64_t) ||
        st.st_size < (off_t)TABLE_BYTES(1) || st.st_size > (off_t)TABLE_BYTES(MTS_FD_TABLE_MAX))
        return -1;
    *capacity = (uint32_t)(st.st_size / sizeof(uint64_t) - 1);
    *table = map_table(inherited, *capacity);
    return *table == MAP_FAILED ? -1 : (*table)[*capacity] == (uint64_t)getpid();
}

/* Maps this image's fd table (see enum table_origin); shim.table_fd is its
 * memfd, or -1 for private memory. */
static enum table_origin setup_fd_table(int inherited)
{
    struct rlimit lim;
    rlim_t hard = getrlimit(RLIMIT_NOFILE, &lim) == 0 ? lim.rlim_max : 1024;
    uint32_t capacity = hard == RLIM_INFINITY || hard > MTS_FD_TABLE_MAX ? MTS_FD_TABLE_MAX : (uint32_t)hard;
    rlim_t soft = getrlimit(RLIMIT_NOFILE, &lim) == 0 ? lim.rlim_cur : 1024;
    if (soft == RLIM_INFINITY || soft > capacity)
        soft = capacity;
    shim.internal_fd_base = soft * 3 / 4 < 1000 ? (int)(soft * 3 / 4) : 1000;

    uint64_t *table;
    uint32_t inherited_capacity;
    int ours = take_inherited_table(inherited, &table, &inherited_capacity);
    if (ours == 1) {
        shim_fd_table = table;
        shim_fd_capacity = inherited_capacity;
        shim.table_fd = inherited;
        fd_table_shared = 1;
        return TABLE_AFTER_EXEC;
    }
    if (ours == 0) {
        parent_table = table;
        parent_capacity = inherited_capacity;
    }
    if (inherited >= 0)
        shim_real.close(inherited); /* another process's table, or none */

    shim_fd_capacity = capacity;
    int memfd = fd_table_memfd(0);
    table = memfd >= 0 ? map_table(memfd, capacity) : MAP_FAILED;
    if (table == MAP_FAILED) {
        if (memfd >= 0)
            shim_real.close(memfd);
        memfd = -1;
        table = mmap(NULL, TABLE_BYTES(capacity), PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (table == MAP_FAILED) {
            shim_fd_capacity = 0;
            return TABLE_PRIVATE;
        }
    }
    shim_fd_table = table;
    shim_fd_table[capacity] = (uint64_t)getpid();
    shim.table_fd = memfd;
    fd_table_shared = memfd >= 0;
    return memfd < 0 ? TABLE_PRIVATE : parent_table ? TABLE_SPAWNED : TABLE_NEW;
}

/* Whether descriptor fd, a stack socket's placeholder (an eventfd) in an
 * image before exec, still is one: exec closed it if it had FD_CLOEXEC. */
static int placeholder_survived(int fd)
{
    if (shim_real.fcntl(fd, F_GETFD) < 0)
        return 0;
    char path[32], target[32] = {0};
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    return readlink(path, target, sizeof(target) - 1) < 0 || strcmp(target, "anon_inode:[eventfd]") == 0;
}

/* Whether `word`, an earlier image's entry for fd, still holds in this one:
 * a stack socket or a kernel TCP socket still undecided, if exec left the
 * descriptor open.  What only that image's interposer knew (its epoll
 * instances, its own descriptors) is gone with it. */
static int entry_survived(int fd, uint64_t word)
{
    switch (shim_fd_kind_of(word)) {
    case SHIM_FD_STACK:
        return placeholder_survived(fd);
    case SHIM_FD_CANDIDATE:
        return shim_real.fcntl(fd, F_GETFD) >= 0;
    default:
        return 0;
    }
}

static int is_ours(int fd)
{
    int *inherited[3 + 2 * MTS_MAX_WORKERS];
    size_t count = inherited_fds(inherited);
    for (size_t i = 0; i < count; i++)
        if (*inherited[i] == fd)
            return 1;
    return 0;
}

/* This process exec'd: the table is the earlier image's.  A socket whose
 * placeholder exec closed (FD_CLOEXEC) loses that reference now, as the
 * kernel's socket would at exec. */
static void adopt_table_after_exec(void)
{
    for (uint32_t fd = 0; fd < shim_fd_capacity; fd++) {
        uint64_t word = shim_fd_table[fd];
        if (!word || is_ours((int)fd))
            continue;
        if (entry_survived((int)fd, word)) {
            fd_store((int)fd, word);
            continue;
        }
        shim_fd_clear((int)fd);
        if (shim_fd_kind_of(word) == SHIM_FD_STACK)
            shim_slot_unref(shim_fd_payload(word), shim_fd_generation(word));
    }
}

/* We were spawned (posix_spawn: a clone and exec that no fork of ours saw)
 * by a process whose table is parent_table: each of its sockets whose
 * placeholder we inherited gains a reference, as at fork. */
static void inherit_spawning_table(void)
{
    uint32_t words = parent_capacity < shim_fd_capacity ? parent_capacity : shim_fd_capacity;
    for (uint32_t fd = 0; fd < words; fd++) {
        uint64_t word = __atomic_load_n(&parent_table[fd], __ATOMIC_ACQUIRE);
        if (!word || is_ours((int)fd) || !entry_survived((int)fd, word))
            continue;
        if (shim_fd_kind_of(word) == SHIM_FD_STACK) {
            if (!shim_fd_current(word))
                continue;
            __atomic_add_fetch(&shim_slot(shim_fd_payload(word))->refcnt, 1, __ATOMIC_ACQ_REL);
        }
        fd_store((int)fd, word);
    }
    munmap(parent_table, TABLE_BYTES(parent_capacity));
    parent_table = NULL;
}

/* Hands process `pid`'s fd table (`memfd`) and a pidfd of it to the stack.
 * Without a memfd or a pidfd (kernels before 5.3) the stack learns
 * nothing: a killed process then keeps its references until the stack
 * stops. */
static void register_process(int memfd, pid_t pid)
{
    if (memfd < 0)
        return;
    int pidfd = (int)shim_raw_syscall(SYS_pidfd_open, pid, 0);
    int fds[2] = {memfd, pidfd};
    if (pidfd < 0 || shim_ctl_send_all(MTS_CTL_REGISTER_PROCESS, (uint32_t)pid, shim_fd_capacity, fds, 2) < 0)
        SHIM_DEBUG("process %d not registered with the stack: %s", (int)pid, strerror(errno));
    if (pidfd >= 0)
        shim_real.close(pidfd);
}

/* Spinning waits for the stack's answer, so it pays only while the stack can
 * run at the same time: confined with it to one CPU, each microsecond spun is
 * one the stack cannot use (iperf3 pinned beside its stack spent a fifth of
 * that CPU spinning).  MTCPSHIM_SPIN_US, when set, decides instead. */
static int64_t spin_ns(pid_t stack_pid)
{
    const char *spin = getenv("MTCPSHIM_SPIN_US");
    if (spin && *spin)
        return strtol(spin, NULL, 10) * 1000;
    cpu_set_t ours, stack;
    if (stack_pid <= 0 || sched_getaffinity(0, sizeof ours, &ours) < 0
        || sched_getaffinity(stack_pid, sizeof stack, &stack) < 0)
        return DEFAULT_SPIN_US * 1000;
    CPU_OR(&ours, &ours, &stack);
    return CPU_COUNT(&ours) > 1 ? DEFAULT_SPIN_US * 1000 : 0;
}

static void attach(void)
{
    const char *debug = getenv(MTS_ENV_DEBUG);
    shim.debug = debug && *debug;
    const char *value = getenv(MTS_ENV_FDS);
    if (!value) {
        SHIM_DEBUG("%s not set: every call goes to the kernel", MTS_ENV_FDS);
        return;
    }
    int fds[3 + 2 * MTS_MAX_WORKERS];
    int workers = parse_inherited_fds(value, fds);
    struct stat st;
    if (workers < 0 || fstat(fds[0], &st) < 0) {
        SHIM_DEBUG("%s=%s unusable: every call goes to the kernel", MTS_ENV_FDS, value);
        return;
    }
    void *base = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0);
    if (base == MAP_FAILED || mts_geom_attach(&shim.geom, base, (uint64_t)st.st_size) != 0 ||
        shim.geom.nworkers != (uint32_t)workers) {
        SHIM_DEBUG("shared region on fd %d is invalid: every call goes to the kernel", fds[0]);
        if (base != MAP_FAILED)
            munmap(base, (size_t)st.st_size);
        return;
    }
    enum table_origin origin = setup_fd_table(fds[2]);
    if (!shim_fd_table || shim_waiters_init() < 0) {
        SHIM_DEBUG("out of memory at attach: every call goes to the kernel");
        munmap(base, (size_t)st.st_size);
        return;
    }
    shim.hdr = base;
    shim.spin_ns = spin_ns(shim.hdr->stack_pid);
    shim.shm_fd = shim_internal_fd(fds[0], 0);
    shim.death_fd = shim_internal_fd(fds[1], 0);
    for (int w = 0; w < workers; w++) {
        shim.ctl_fd[w] = shim_internal_fd(fds[3 + 2 * w], 0);
        shim.wake_fd[w] = shim_internal_fd(fds[4 + 2 * w], 0);
    }
    if (shim.table_fd >= 0)
        shim.table_fd = shim_internal_fd(shim.table_fd, 0);
    publish_inherited_fds();
    shim.active = 1;
    if (origin == TABLE_AFTER_EXEC)
        adopt_table_after_exec();
    if (origin == TABLE_SPAWNED)
        inherit_spawning_table();
    if (origin == TABLE_NEW || origin == TABLE_SPAWNED)
        register_process(shim.table_fd, getpid());
    SHIM_DEBUG("attached: stack %u.%u.%u.%u/%u, %u slots, %u workers, fds %d,%d, fd table %d (%s), spin %lld us",
               shim.hdr->ip >> 24, shim.hdr->ip >> 16 & 255, shim.hdr->ip >> 8 & 255, shim.hdr->ip & 255,
               shim.hdr->prefix_len, shim.geom.nslots, shim.geom.nworkers, shim.shm_fd, shim.death_fd, shim.table_fd,
               origin == TABLE_AFTER_EXEC ? "after exec" : origin == TABLE_SPAWNED ? "spawned" :
               origin == TABLE_NEW ? "new" : "private", (long long)(shim.spin_ns / 1000));
}

void shim_init_slow(void)
{
    /* Re-entered from our own initialisation (dlsym's malloc, say): the
     * direct system calls serve until it is done. */
    if (shim_busy)
        return;
    shim_busy++;
    shim_resolve_real_functions();
    pthread_once(&attach_once, attach);
    shim_busy--;
    __atomic_store_n(&shim_init_done, 1, __ATOMIC_RELEASE);
}

__attribute__((constructor)) static void shim_constructor(void) { shim_ensure_init(); }

/* Exit closes every descriptor, so the process's references to stack
 * sockets go too.  Streams are flushed first: a FILE on a socket would
 * otherwise be flushed after we let go of it. */
__attribute__((destructor)) static void shim_destructor(void)
{
    if (!shim.active)
        return;
    fflush(NULL);
    shim_fd_lock();
    int high = shim_fd_highest();
    for (int fd = 0; fd <= high; fd++) {
        uint64_t word = shim_fd_word(fd);
        if (shim_fd_kind_of(word) == SHIM_FD_STACK) {
            shim_fd_clear(fd);
            shim_slot_unref(shim_fd_payload(word), shim_fd_generation(word));
        }
    }
    shim_fd_unlock();
}

/* ---- fork ---------------------------------------------------------------------- */

static void fork_adjust_references(int delta)
{
    int high = shim_fd_highest();
    for (int fd = 0; fd <= high; fd++) {
        uint64_t word = shim_fd_word(fd);
        if (shim_fd_kind_of(word) == SHIM_FD_STACK && shim_fd_current(word))
            __atomic_add_fetch(&shim_slot(shim_fd_payload(word))->refcnt, (uint32_t)delta, __ATOMIC_ACQ_REL);
    }
}

/* A fork child's own table: the memfd copy its parent made and registered
 * (`memfd`), put where the parent's table descriptor was so that
 * MTS_ENV_FDS still names it; else a private copy of the mapping it shares
 * with its parent, and then the registered copy is emptied, as nothing
 * would keep it true. */
static void own_table_in_child(int memfd)
{
    size_t size = TABLE_BYTES(shim_fd_capacity);
    if (memfd >= 0 &&
        mmap(shim_fd_table, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED | MAP_NORESERVE, memfd, 0) != MAP_FAILED &&
        shim_real.dup3(memfd, shim.table_fd, 0) >= 0) {
        shim_real.close(memfd);
        shim_fd_table[shim_fd_capacity] = (uint64_t)getpid();
        return;
    }
    if (memfd >= 0) {
        if (ftruncate(memfd, 0) < 0)
            SHIM_DEBUG("fd table copy not emptied: %s", strerror(errno));
        shim_real.close(memfd);
    }
    shim_real.close(shim.table_fd); /* the parent's: an exec here must not take it for ours */
    shim.table_fd = -1;
    void *copy = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (copy != MAP_FAILED) {
        memcpy(copy, shim_fd_table, (size_t)(shim_fd_highest() + 1) * sizeof(uint64_t));
        if (mremap(copy, size, size, MREMAP_MAYMOVE | MREMAP_FIXED, shim_fd_table) != MAP_FAILED)
            return;
    }
    shim_log("fork: process %d shares its parent's fd table: %s", (int)getpid(), strerror(errno));
}

pid_t fork(void)
{
    shim_ensure_init();
    if (!shim.active || shim_busy)
        return shim_real.fork();
    /* Every stack fd gains a holder in the child, as the kernel's open file
     * descriptions do; counted before the child can close any.  The child's
     * fd table is a copy of ours made now, in a memfd of its own that we
     * register for it before fork returns here: a child killed at once
     * still lets go of what it held. */
    shim_fd_lock();
    fork_adjust_references(+1);
    int child_table = fd_table_shared ? fd_table_memfd((uint32_t)(shim_fd_highest() + 1)) : -1;
    pid_t pid = shim_real.fork();
    if (pid == 0) {
        if (fd_table_shared)
            own_table_in_child(child_table);
        shim_waiter_forget_in_child();
        shim_epoll_after_fork_child();
        SHIM_DEBUG("forked from %d", (int)getppid());
    } else {
        int err = errno;
        if (pid > 0)
            register_process(child_table, pid);
        if (child_table >= 0)
            shim_real.close(child_table);
        if (pid < 0)
            fork_adjust_references(-1);
        errno = err;
    }
    shim_fd_unlock();
    return pid;
}

/* The child of vfork may do anything a fork child may, so a fork serves. */
pid_t vfork(void) { return fork(); }
