/*
 * The receive fast path: header prediction in C, one call per received
 * batch (stack/fastpath.py drives it; docs/architecture.md says why the
 * seam is where it is).
 *
 * Handed to cffi's cdef verbatim, like netfast.h: declarations only.
 */

/* The numbers of one connection that both the Python TCP core and the
 * fast path read or write.  stack/tcp.py's TcpConnection reads and writes
 * each field not named fp_ as its attribute of the same name; the rest of
 * its state stays in Python, where the fast path never needs it.  One
 * block per connection, in the stack's private memory.
 *
 * fp_ fields are the fast path's.  `fp_predict` is set by the TCP host each
 * time the core has handled the connection, when nothing but an in-order
 * segment can arrive that the fast path would handle differently from the
 * core (Linux's pred_flags; TcpConnection.predictable).
 * `fp_rx_write(fp_rx_sink, bytes, n)` appends in-order bytes to the
 * connection's receive buffer and returns how many it took, or -1 if it
 * found the buffer corrupt (then nothing was taken); NULL when the buffer
 * cannot be written from C, and the fast path leaves the connection alone. */
struct nf_tcb {
    uint32_t snd_una;
    uint32_t snd_max;
    uint32_t rcv_nxt;
    uint32_t rcv_adv;         /* right edge of the window we advertised */
    uint32_t last_ack_sent;   /* rcv_nxt of our last ACK (RFC 7323 Last.ACK.sent) */
    uint32_t ts_enabled;
    uint32_t ts_recent;
    double ts_recent_at;
    uint32_t fp_predict;
    uint32_t fp_batch;        /* the last batch that had a segment for it */
    int64_t (*fp_rx_write)(void *rx_sink, const void *bytes, uint64_t n);
    void *fp_rx_sink;
};

/* A byte ring in the stack's own memory (stack/storage.py's RingBuffer):
 * `length` bytes stored from offset `head` on, wrapping at `capacity`. */
struct nf_byte_ring {
    uint8_t *data;
    uint64_t capacity;
    uint64_t head;
    uint64_t length;
};

/* Appends as much of `bytes` as fits to the struct nf_byte_ring `ring`;
 * returns the count taken.  An fp_rx_write. */
int64_t nf_byte_ring_write(void *ring, const void *bytes, uint64_t n);

/* Connections by 4-tuple, for the fast path's demultiplexing: open
 * addressing over `mask + 1` entries (a power of two), keyed by
 * local_port << 48 | remote_ip << 16 | remote_port and hashed with a secret
 * `seed`, so that a peer cannot pick 4-tuples that collide.  `conn` is the
 * caller's number for the connection.  The caller grows the table (a new
 * one, nf_flows_move) before it is three-quarters full, counting
 * tombstones. */
struct nf_flow {
    uint64_t key;
    struct nf_tcb *tcb;
    uint32_t conn;
    uint32_t used;            /* 0 never, 1 live, 2 removed (a tombstone) */
};

struct nf_flows {
    struct nf_flow *entries;
    uint32_t mask;
    uint32_t live;
    uint32_t tombstones;
    uint64_t seed;
};

/* 0, or -1 if `key` is there already. */
int nf_flows_add(struct nf_flows *flows, uint64_t key, struct nf_tcb *tcb, uint32_t conn);
/* The removed entry's `conn`, or -1 if `key` is not there. */
int64_t nf_flows_remove(struct nf_flows *flows, uint64_t key);
/* The live entries of `from` into the empty table `to`. */
void nf_flows_move(struct nf_flows *to, const struct nf_flows *from);

/* A segment the fast path took, for the core to finish: its ACK field
 * and window (the core's own ACK processing, unchanged), the receive
 * bookkeeping of the `taken` payload bytes the buffer took (events, the
 * ACK owed or the delayed-ACK timer), and output.  `frame` is the
 * segment's index in the batch. */
struct nf_fast_record {
    uint32_t frame;
    uint32_t conn;
    uint32_t seq;
    uint32_t ack;
    uint32_t tsval;
    uint32_t tsecr;
    uint32_t payload_len;
    uint32_t taken;
    uint16_t window;
    uint8_t flags;
    uint8_t has_timestamp;
};

/* Takes from a batch of received frames the segments header prediction
 * covers (RFC 9293's processing reduced to its common case, as Linux's
 * tcp_rcv_established): a valid TCP frame to us (nf_match_tcp_frame) on a
 * connection in `flows` whose fp_predict is set and that has an fp_rx_write,
 * flags ACK and at most PSH besides, options exactly NOP NOP timestamp when
 * timestamps are on and none when off, seq = rcv_nxt, the ACK within
 * [snd_una, snd_max], a timestamp PAWS accepts, the payload within the
 * window.  For each it updates TS.Recent, appends the payload to the
 * receive buffer, advances rcv_nxt by what the buffer took, and writes a
 * record, in frame order; it returns the record count.  Every other frame gets slow[i] = 1 and must go through the
 * core, in order with the records; so must every later frame of a
 * connection in the batch once one went to the core, or once the fast path
 * took one (the core has not yet processed that one's ACK).  `batch`
 * differs from the last call's.  `now` is in seconds (the core's clock). */
unsigned nf_fast_rx(struct nf_flows *flows, const uint8_t *our_mac, uint32_t our_ip,
                    uint8_t *const *frames, const uint32_t *lengths, const uint8_t *vouched,
                    unsigned count, uint32_t batch, double now,
                    struct nf_fast_record *records, uint8_t *slow);
