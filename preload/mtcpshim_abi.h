/*
 * mtcpshim shared-memory ABI: the single source of truth for every structure
 * the application side (preload/ interposer, C) and the stack side (Python,
 * through cffi) both touch.  mtcpshim/abi_source.py hands this text to cffi
 * for mtcpshim/_build_shm.py, minus every preprocessor line that is not an
 * integer #define (string #defines are compiled into the module as a table
 * instead), so this file must stay within what cffi's cdef parser accepts:
 * integer #defines, structs of fixed-width integers, no attributes, no
 * functions.  Layout checks and the shared inline operations live in
 * mts_shm.h; docs/architecture.md explains the region and its protocols.
 *
 * The region is a memfd created by the launcher and mapped by every process
 * at its own address, so structures hold offsets, never pointers:
 *
 *   [mts_header][mts_worker x nworkers][mts_waiter x nwaiters]
 *   [per worker: mts_cmdq + mts_cmd x cmd_capacity]
 *   [per worker: mts_changes + uint32 slot id x changes_capacity]
 *   [mts_slot x nslots][per slot: RX ring data (rx_size), TX ring data (tx_size)]
 *
 * One stack worker per core (mtcpshim run --cores N) serves the region: worker
 * w owns the slots [w * nslots / nworkers, (w + 1) * nslots / nworkers) and
 * alone runs their commands, through its own command queue, and logs their
 * changes in its own change log.  Nothing on the data path is shared between
 * workers: a thread queues a socket's command to the worker that owns it.
 *
 * All integers are host byte order, addresses included.
 */

#define MTS_MAGIC 0x314d485350435453
#define MTS_VERSION 8

/* Name of the environment variable that carries the inherited descriptors:
 * "SHM_FD,CTL_FD,WAKE_FD,DEATH_FD" (see mtcpshim/launcher.py), to which the
 * interposer appends ",TABLE_FD", its fd table's memfd, for the images its
 * process exec's. */
#define MTS_ENV_FDS "MTCPSHIM_FDS"
/* Set to a non-empty value to log the interposer's decisions to stderr. */
#define MTS_ENV_DEBUG "MTCPSHIM_DEBUG"

#define MTS_CACHELINE 64

/* Bounds a header must respect to be attached (mts_geom_attach), so that no
 * offset computed from the geometry can overflow. */
#define MTS_MAX_SLOTS 1048576
#define MTS_MAX_WORKERS 16
/* Which worker a TCP flow's frames reach: the high half of a multiplicative
 * hash of its two ports' XOR, modulo the workers (mts_worker_of_ports; the
 * packet sockets' filter, stack/io/steer.py, computes the same). */
#define MTS_STEER_MULTIPLIER 2654435761
#define MTS_STEER_SHIFT 16
#define MTS_MAX_WAITERS 65536
#define MTS_MAX_CMD_CAPACITY 1048576
#define MTS_MIN_CHANGES 16
#define MTS_MAX_CHANGES 4194304
#define MTS_MIN_RING 4096
#define MTS_MAX_RING 1073741824

/*
 * A process's own copy of the region's layout: NOT in the region.  Each side
 * fills one once, at attach, from a header it validates (mts_geom_attach);
 * the stack does so before the program starts.  Every operation in mts_shm.h
 * computes addresses from it and never from the header again, so nothing a
 * program writes into the region decides where the stack reads or writes.
 */
struct mts_geom {
    uint8_t *base;
    uint64_t size;
    uint32_t nslots;
    uint32_t nworkers;
    uint32_t slots_per_worker;
    uint32_t nwaiters;
    uint32_t cmd_capacity;
    uint32_t rx_size;
    uint32_t tx_size;
    uint32_t accept_capacity; /* slot ids a listener's RX area holds */
    uint32_t changes_capacity;
    uint64_t workers_off;
    uint64_t waiters_off;
    uint64_t cmdq_off;     /* worker w's queue at cmdq_off + w * cmdq_stride */
    uint64_t cmdq_stride;
    uint64_t changes_off;  /* worker w's change log at changes_off + w * changes_stride */
    uint64_t changes_stride;
    uint64_t slots_off;
    uint64_t data_off;
};

/* mts_header.stack_state */
#define MTS_STACK_STARTING 0
#define MTS_STACK_RUNNING 1
#define MTS_STACK_STOPPED 2 /* orderly shutdown */
#define MTS_STACK_DEAD 3    /* crashed; mts_header.fault says why */

struct mts_header {
    uint64_t magic;
    uint32_t version;
    uint32_t header_size;
    uint64_t region_size;

    /* The geometry as created; read once at attach, into struct mts_geom. */
    uint32_t nslots;       /* a multiple of nworkers */
    uint32_t nworkers;
    uint32_t nwaiters;
    uint32_t cmd_capacity; /* power of two */
    uint32_t rx_size;      /* power of two, bytes of each slot's RX ring */
    uint32_t tx_size;      /* power of two, bytes of each slot's TX ring */
    uint32_t changes_capacity; /* power of two, entries of the change log */
    uint32_t pad0;

    uint64_t workers_off;
    uint64_t waiters_off;
    uint64_t cmdq_off;
    uint64_t changes_off;
    uint64_t slots_off;
    uint64_t data_off;

    /* The stack's address: sockets bound to it (or to 0.0.0.0) and
     * connections to destinations it routes belong to the stack. */
    uint32_t ip;
    uint32_t prefix_len;
    uint32_t gateway; /* 0: none, only the on-link prefix is routed */

    uint32_t stack_state;
    int32_t stack_pid; /* worker 0's */
    uint8_t pad1[16];

    /* NUL-terminated reason the stack died, written by the launcher. */
    char fault[256];

    /* The TCP_CONGESTION names the stack offers, space-separated, its
     * default first: written at creation from stack/cc.py, the one list. */
    char congestion[64]; /* MTS_CONGESTION_LIST_MAX */
    uint8_t pad2[48];
};

/* A stack worker's own words. */
struct mts_worker {
    /* Its own cache line: written by the worker every time it sleeps.  A
     * thread that queued a command writes the worker's wake eventfd only
     * while this is set. */
    uint32_t sleeping;
    uint8_t pad0[60];
    /* Messages the interposers have sent on the worker's control socket:
     * it reads the socket when this moves (or poll() says so), not every
     * loop. */
    uint32_t ctl_posted;
    uint32_t slot_hint; /* where the next search of the worker's slots starts */
    int32_t pid;
    int32_t cpu;        /* the core it is pinned to; -1: none */
    uint8_t pad1[48];
};

/* A slot's waiter_interest: bit (waiter id % MTS_INTEREST_BITS) for each
 * waiter that may sleep until the slot changes. */
#define MTS_INTEREST_BITS 256

/*
 * Waiters: an application thread that must block (epoll_wait, poll, select,
 * a blocking accept/connect/read/write) owns a waiter whose eventfd it has
 * handed to the stack (MTS_CTL_REGISTER_WAITER).  Protocol: set armed = 1,
 * re-check readiness, then sleep in the kernel on the eventfd.  Before it
 * arms to sleep until a slot changes, a waiter sets its bit in the slot's
 * waiter_interest.  At the end of every loop that changed some socket's
 * readiness, a worker takes each waiter whose bit is in the interest of a
 * slot it published: it exchanges armed to 0 and, if it was 1, writes the
 * eventfd.
 */
struct mts_waiter {
    uint32_t in_use;     /* 0 free, 1 owned (claimed by compare-and-swap) */
    uint32_t armed;
    /* Futex word: worker w sets bit w once it holds the eventfd, and clears
     * it when it lets the eventfd go (MTS_OP_WAITER_FREE, which goes to
     * every worker); the last to clear it frees the waiter. */
    uint32_t registered;
    int32_t owner_pid;
};

/* Control datagrams on a worker's inherited SOCK_DGRAM Unix socket (its
 * CTL_FD), each carrying descriptors with SCM_RIGHTS.  Waiters and processes
 * register with every worker; a file goes to its slot's worker. */
#define MTS_CTL_REGISTER_WAITER 1 /* id: the waiter; the fd: its eventfd */
#define MTS_CTL_SEND_FILE 2       /* id: a slot, arg: a file number (MTS_OP_FILE); the fd: the file */
/* A process of the program (each image: at attach, in a fork child, after
 * exec).  arg: the words of its fd table; two fds: the table (a memfd) and a
 * pidfd of the process.  When the pidfd says the process ended, the stack
 * drops the references its table still names, as the kernel closes a dead
 * process's descriptors (a normal exit has let go of them already). */
#define MTS_CTL_REGISTER_PROCESS 3

/* The interposer's fd table: one 64-bit word per descriptor number, the kind
 * in bits 24-31 and a 24-bit payload below; for a stack socket
 * (MTS_FD_STACK) the payload is the slot id and bits 32-63 the slot's
 * generation when the descriptor was made. */
#define MTS_FD_KIND_SHIFT 24
#define MTS_FD_PAYLOAD_MASK 0xFFFFFF
#define MTS_FD_STACK 2
#define MTS_FD_TABLE_MAX 1048576 /* words: descriptor numbers the table covers at most */

/* A stack socket's placeholder in the kernel's fd table is an eventfd whose
 * count says which socket it stands for: MTS_PLACEHOLDER_TAG | slot id,
 * set when it is made and never read or written after.  A process handed
 * one over an AF_UNIX socket (SCM_RIGHTS) reads it (/proc/self/fdinfo) to
 * know which socket it was given. */
#define MTS_PLACEHOLDER_TAG 0x6D000000
#define MTS_PLACEHOLDER_SLOT_MASK 0x00FFFFFF

struct mts_ctl_msg {
    uint32_t op;
    uint32_t id;
    uint64_t arg;
};

/*
 * Command queues: one per worker, a bounded multi-producer queue (Vyukov
 * style: each cell carries a sequence number) from every application thread
 * and process (and the other workers) to the worker.  A slot's commands go
 * to the worker that owns it.  After pushing, the application writes that
 * worker's WAKE_FD if mts_worker.sleeping is set.  The worker sets sleeping,
 * re-checks its queue, and only then sleeps.
 *
 * A listener is shared by every worker: MTS_OP_LISTEN goes to its owner
 * first, then to each other worker, which opens a sibling listener in a slot
 * of its own (recorded in the listener's siblings[]) whose accept queue
 * takes the connections that worker receives.  Its last close goes to
 * every worker (the interposer queues it; the owner repeats it for a close
 * the interposer never saw), and the others close their siblings.
 */
#define MTS_OP_BIND 1     /* sync; arg = ip << 16 | port */
#define MTS_OP_LISTEN 2   /* sync; arg = backlog */
#define MTS_OP_CONNECT 3  /* sync start, completes asynchronously; arg = ip << 16 | port */
#define MTS_OP_TX 4       /* async: the TX ring has new data (deduplicated by slot.tx_pending) */
#define MTS_OP_RXWIN 5    /* async: the app read from RX after the stack set slot.rx_notify */
#define MTS_OP_SHUTDOWN 6 /* async; arg = SHUT_RD / SHUT_WR / SHUT_RDWR */
#define MTS_OP_CLOSE 7    /* async: the last application reference is gone; arg = 1 to abort (RST) */
#define MTS_OP_SETOPT 8   /* async; arg = MTS_OPT_* that changed */
#define MTS_OP_WAITER_FREE 9 /* async; slot field holds the waiter id */
#define MTS_OP_FILE 10    /* sync; arg = a file number whose fd went ahead on CTL_FD (sendfile spans) */
#define MTS_OP_INFO 11    /* sync: the stack fills slot.info (TCP_INFO) */

struct mts_cmd {
    uint64_t seq;
    uint32_t op;
    uint32_t slot;
    uint64_t arg;
    /* The slot's generation when the command was queued (0 for
     * MTS_OP_WAITER_FREE): a command still queued when its slot was freed
     * and handed to another socket is dropped, never run on that one. */
    uint32_t generation;
    uint32_t pad;
};

struct mts_cmdq {
    uint64_t enqueue_pos;
    uint8_t pad0[56];
    uint8_t pad1[64];    /* the dequeue position is the stack's own, never shared */
    /* followed by cmd_capacity struct mts_cmd */
};

/*
 * The change log: how readiness reaches epoll in O(ready).  Every time the
 * stack publishes a slot (mts_publish) it appends the slot's id here, then
 * moves head (entries ever written; entry i sits at i % changes_capacity).
 * An epoll instance keeps its own position in the log and looks only at the
 * slots logged since, so a wait costs what changed, not what is registered.
 * One that fell more than changes_capacity behind has lost entries and looks
 * at every fd it holds instead.  The stack keeps its own count of entries
 * and never reads the log: a program that scribbles on it misleads only
 * its own epoll.
 */
struct mts_changes {
    uint64_t head;
    uint8_t pad[56];
    /* followed by changes_capacity uint32_t slot ids */
};

/*
 * A byte ring: head counts bytes ever produced, tail bytes ever consumed;
 * used = head - tail.  Each index is written by one side only and sits on its
 * own cache line.  The data area's offset is derived from the slot id.
 * The stack keeps its own copy of the index it writes and reads the other
 * side's as untrusted: used > capacity (a tail ahead of the head, say) is
 * corruption, and that socket is reset.
 * TX ring: the application produces; the stack advances tail only when the
 * peer has acknowledged the bytes, so the ring doubles as the retransmission
 * buffer.  A listener's RX area holds its accept queue: uint32 slot ids of
 * established connections, consumed by compare-and-swap on tail (several
 * processes may accept from one listener); its siblings' queues hold those
 * the other workers received.
 */
/*
 * Sendfile spans: bytes of the TX stream that stay in a file instead of the
 * ring.  The application registers the file with the stack once per socket
 * (its fd over CTL_FD with MTS_CTL_SEND_FILE, then the sync MTS_OP_FILE
 * under a file number it took from tx_file_next), writes a span record for
 * stream bytes [pos, pos + len) at tx_spans[tx_span_head % MTS_TX_SPANS],
 * bumps tx_span_head, then advances tx.head past the span without writing
 * its ring bytes.  A record is free again once tx.tail has passed its end.
 * The stack reads the head before the span count, and takes bytes from the
 * file only through the kernel (a gather send) or pread, never from a
 * mapping in user space, so a file truncated under it is a reset, not a
 * fault.  The stack keeps a socket's newest MTS_TX_FILES files (and any
 * a span still needs); an interposer remembers as many, replaced oldest
 * first, so that it never names one the stack let go.
 */
#define MTS_TX_SPANS 8
#define MTS_TX_FILES 4

struct mts_span {
    uint64_t pos;
    uint64_t offset; /* in the file */
    uint32_t len;
    uint32_t file;   /* a file number registered for this socket */
};

/* A ring producer's page bookkeeping (mts_ring_pages_before_write). */
struct mts_ring_pages {
    uint64_t released;  /* head when pages were last given back */
    uint64_t held_most; /* the most bytes the ring held after a write, since */
};

struct mts_ring {
    uint64_t head;
    /* In the producer's cache line: the program's, for TX.  The stack keeps
     * RX's in its own memory, never reading this one. */
    struct mts_ring_pages pages;
    uint8_t pad0[40];
    uint64_t tail;
    uint8_t pad1[56];
};

/* Never in the region: the stack's own view of a socket's RX ring, in its
 * private memory, with the write index it keeps to itself (the region's
 * copy is only ever written), so that C (mts_rx_sink_write) and Python
 * (mtcpshim/shmbuf.py) append through the same one. */
struct mts_rx_sink {
    struct mts_ring *ring;
    uint8_t *data;
    uint64_t head;
    struct mts_ring_pages pages;
    uint32_t cap;
};

/* A ring's pages are given back once it is empty, has taken this many bytes
 * since they last were, and never held more than MTS_RING_SMALL_FLOW since:
 * a connection that moves small messages walks its ring round and would
 * otherwise keep every page it has written until it closes, while a bulk
 * flow's pages would only be faulted straight back. */
#define MTS_RING_RELEASE_AFTER 32768
#define MTS_RING_SMALL_FLOW 16384

/* mts_slot.in_use */
#define MTS_SLOT_FREE 0
#define MTS_SLOT_USED 1

/* mts_slot.state, published by the stack */
#define MTS_ST_FRESH 0      /* allocated, no command seen yet */
#define MTS_ST_BOUND 1
#define MTS_ST_LISTENING 2
#define MTS_ST_CONNECTING 3
#define MTS_ST_CONNECTED 4  /* established (may since have received FIN) */
#define MTS_ST_CLOSED 5     /* reset, refused, timed out or finished */

/* mts_slot.events, sticky bits published by the stack */
#define MTS_EV_CONNECTED 0x1 /* handshake completed */
#define MTS_EV_RDHUP 0x2     /* peer sent FIN: EOF once RX is drained */
#define MTS_EV_HUP 0x4       /* no more traffic in either direction */
/* A pending error is so_error != 0 (EPOLLERR); reading SO_ERROR clears it. */

/* mts_slot.app_flags, set by the application */
#define MTS_AF_NONBLOCK 0x1
#define MTS_AF_SHUT_RD 0x2
#define MTS_AF_SHUT_WR 0x4
/* The program made the socket AF_INET6 (a dual-stack socket): it sees its
 * IPv4 addresses as IPv4-mapped IPv6 ones (::ffff:a.b.c.d), as on Linux. */
#define MTS_AF_INET6 0x8

/* mts_slot option selectors for MTS_OP_SETOPT */
#define MTS_OPT_NODELAY 1
#define MTS_OPT_KEEPALIVE 2
#define MTS_OPT_LINGER 3
#define MTS_OPT_CORK 4
#define MTS_OPT_BUFFERS 5
#define MTS_OPT_USER_TIMEOUT 6
#define MTS_OPT_CONGESTION 7

/* The size of a TCP_CONGESTION name (mts_slot.opt_congestion) and of the
 * list of them in the header, NUL included. */
#define MTS_CONGESTION_NAME_MAX 16
#define MTS_CONGESTION_LIST_MAX 64

/* TCP_INFO's figures of a connection, as Linux's tcp_get_info reports them
 * (times in microseconds, windows in segments), written by the stack as it
 * serves MTS_OP_INFO. */
struct mts_tcp_info {
    uint32_t rto_us;
    uint32_t rtt_us; /* smoothed */
    uint32_t rttvar_us;
    uint32_t snd_mss;
    uint32_t rcv_mss;
    uint32_t advmss;
    uint32_t snd_cwnd;
    uint32_t snd_ssthresh;
    uint32_t unacked;       /* segments sent and not yet acknowledged */
    uint32_t total_retrans; /* segments retransmitted since the connection began */
    uint32_t retransmits;   /* retransmission timeouts in a row, now */
    uint32_t options;       /* TCPI_OPT_*, and the window scales: snd << 8 | rcv << 12 */
};

struct mts_slot {
    /* ownership */
    uint32_t in_use;
    uint32_t refcnt;     /* application descriptors (dup, fork) naming it */
    uint32_t generation; /* bumped at every allocation */
    uint32_t pad0;

    /* published by the stack */
    uint32_t state;
    uint32_t events;
    uint32_t event_seq; /* bumped at every readiness change: edge-triggered epoll */
    int32_t so_error;

    /* written by the application */
    uint32_t app_flags;
    uint32_t tx_pending; /* 1 while an MTS_OP_TX for this slot is queued */
    uint32_t rx_notify;  /* stack sets 1: send MTS_OP_RXWIN after the next read */

    /* synchronous commands */
    uint32_t op_lock;    /* serialises one slot's sync commands across threads */
    uint32_t op_done;    /* futex word: stack sets 1 and wakes */
    int32_t op_result;   /* 0 or -errno */

    /* addresses, host order */
    uint32_t local_ip;
    uint32_t remote_ip;
    uint16_t local_port;
    uint16_t remote_port;
    uint32_t backlog;

    /* sendfile spans, written by the application (see struct mts_span) */
    uint32_t tx_file_next; /* file numbers taken, by atomic increment */
    uint32_t tx_span_head; /* span records written */
    struct mts_span tx_spans[MTS_TX_SPANS];

    /* socket options: the application stores them, then sends MTS_OP_SETOPT */
    uint32_t opt_nodelay;
    uint32_t opt_cork;
    uint32_t opt_keepalive;
    uint32_t opt_keepidle;  /* seconds */
    uint32_t opt_keepintvl; /* seconds */
    uint32_t opt_keepcnt;
    uint32_t opt_linger_on;
    uint32_t opt_linger_sec;
    uint32_t opt_reuseaddr;
    uint32_t opt_reuseport;
    uint32_t opt_rcvbuf;    /* SO_RCVBUF as Linux reports it (twice the request, clamped); 0: unset */
    uint32_t opt_sndbuf;    /* SO_SNDBUF likewise; see mts_buffer_limit */
    uint32_t opt_maxseg;
    uint32_t opt_rcvtimeo_ms;
    uint32_t opt_sndtimeo_ms;
    uint32_t opt_user_timeout_ms;
    uint32_t opt_defer_accept;
    uint32_t opt_quickack;
    char opt_congestion[16]; /* MTS_CONGESTION_NAME_MAX; empty: the default */

    struct mts_tcp_info info;
    /* A listener's siblings: slot id + 1 of the listener worker w opened
     * for it, 0 for none (and at the owner's own index).  Written by the
     * workers, read by accept and poll, which check each id against the
     * worker's range. */
    uint32_t siblings[16]; /* MTS_MAX_WORKERS */
    /* Waiters that sleep until this slot changes (MTS_INTEREST_BITS): set by
     * the application, cleared only by the slot's next allocation, so a
     * stale bit (or two waiters' ids on one bit) costs a wakeup, never
     * loses one. */
    uint64_t waiter_interest[4];
    uint8_t pad1[8];

    struct mts_ring rx; /* stack produces, application consumes */
    struct mts_ring tx; /* application produces, stack consumes on ACK */
};
