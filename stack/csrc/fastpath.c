/* The receive fast path: see fastpath.h for the contract, and stack/tcp.py's
 * TcpConnection.on_segment for the behaviour it must match, which the
 * differential tests (tests/unit/test_fastpath.py) hold it to. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "netfast.h"
#include "fastpath.h"
#include "wire_bytes.h"

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_PSH 0x08
#define TCP_ACK 0x10
#define TCP_URG 0x20
#define NOP_NOP_TIMESTAMP 0x0101080Au   /* NOP, NOP, kind 8, length 10 */
#define TIMESTAMP_HEADER_LEN (TCP_MIN_HEADER_LEN + 12)
#define PAWS_IDLE_SECONDS (24.0 * 24 * 3600)  /* RFC 7323 5.5: TS.Recent too old to compare with */

enum { FLOW_EMPTY, FLOW_LIVE, FLOW_REMOVED };

static inline uint32_t flow_index(const struct nf_flows *flows, uint64_t key)
{
    /* splitmix64's finalizer over the key and the secret */
    uint64_t h = key ^ flows->seed;
    h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ULL;
    h = (h ^ (h >> 27)) * 0x94d049bb133111ebULL;
    return (uint32_t)(h ^ (h >> 31)) & flows->mask;
}

static struct nf_flow *flow_find(const struct nf_flows *flows, uint64_t key)
{
    for (uint32_t i = flow_index(flows, key);; i = (i + 1) & flows->mask) {
        struct nf_flow *entry = &flows->entries[i];
        if (entry->used == FLOW_EMPTY)
            return NULL;
        if (entry->used == FLOW_LIVE && entry->key == key)
            return entry;
    }
}

int nf_flows_add(struct nf_flows *flows, uint64_t key, struct nf_tcb *tcb, uint32_t conn)
{
    if (flow_find(flows, key))
        return -1;
    uint32_t i = flow_index(flows, key);
    while (flows->entries[i].used == FLOW_LIVE)
        i = (i + 1) & flows->mask;
    struct nf_flow *entry = &flows->entries[i];
    if (entry->used == FLOW_REMOVED)
        flows->tombstones--;
    entry->key = key;
    entry->tcb = tcb;
    entry->conn = conn;
    entry->used = FLOW_LIVE;
    flows->live++;
    return 0;
}

int64_t nf_flows_remove(struct nf_flows *flows, uint64_t key)
{
    struct nf_flow *entry = flow_find(flows, key);
    if (!entry)
        return -1;
    entry->used = FLOW_REMOVED;
    entry->tcb = NULL;
    flows->live--;
    flows->tombstones++;
    return entry->conn;
}

void nf_flows_move(struct nf_flows *to, const struct nf_flows *from)
{
    for (uint32_t i = 0; i <= from->mask; i++) {
        const struct nf_flow *entry = &from->entries[i];
        if (entry->used == FLOW_LIVE)
            nf_flows_add(to, entry->key, entry->tcb, entry->conn);
    }
}

int64_t nf_byte_ring_write(void *ring_, const void *bytes, uint64_t n)
{
    struct nf_byte_ring *ring = ring_;
    uint64_t room = ring->capacity - ring->length;
    if (n > room)
        n = room;
    uint64_t tail = (ring->head + ring->length) % ring->capacity;
    uint64_t first = ring->capacity - tail < n ? ring->capacity - tail : n;
    memcpy(ring->data + tail, bytes, first);
    memcpy(ring->data, (const uint8_t *)bytes + first, n - first);
    ring->length += n;
    return (int64_t)n;
}

static inline int32_t seq_diff(uint32_t a, uint32_t b) { return (int32_t)(a - b); }

/* The segment at `tcp` (tcp_len bytes, its checksum already verified) when
 * header prediction covers it on `tcb`: fills `record` and returns 1 after
 * taking its payload; 0, with nothing changed, when the core must take it. */
static int predict_and_take(struct nf_tcb *tcb, const uint8_t *tcp, uint32_t tcp_len, double now,
                            struct nf_fast_record *record)
{
    uint32_t header_len = (uint32_t)(tcp[12] >> 4) * 4;
    uint8_t flags = tcp[13];
    if ((flags & ~TCP_PSH) != TCP_ACK || header_len > tcp_len)
        return 0;
    uint32_t tsval = 0, tsecr = 0;
    if (tcb->ts_enabled) {
        if (header_len != TIMESTAMP_HEADER_LEN || load_be32(tcp + TCP_MIN_HEADER_LEN) != NOP_NOP_TIMESTAMP)
            return 0;
        tsval = load_be32(tcp + TCP_MIN_HEADER_LEN + 4);
        tsecr = load_be32(tcp + TCP_MIN_HEADER_LEN + 8);
        /* PAWS (RFC 7323 5.3): an older timestamp marks an old duplicate. */
        if (seq_diff(tsval, tcb->ts_recent) < 0 && now - tcb->ts_recent_at <= PAWS_IDLE_SECONDS)
            return 0;
    } else if (header_len != TCP_MIN_HEADER_LEN) {
        return 0;
    }
    uint32_t seq = load_be32(tcp + 4), ack = load_be32(tcp + 8);
    if (seq != tcb->rcv_nxt || ack - tcb->snd_una > tcb->snd_max - tcb->snd_una)
        return 0;
    uint32_t payload_len = tcp_len - header_len;
    int32_t window = seq_diff(tcb->rcv_adv, tcb->rcv_nxt);
    if (payload_len && (int64_t)payload_len > (window > 0 ? window : 0))
        return 0;
    int64_t taken = 0;
    if (payload_len) {
        taken = tcb->fp_rx_write(tcb->fp_rx_sink, tcp + header_len, payload_len);
        if (taken < 0)
            return 0;   /* a corrupt ring: the core's own write reports it */
    }
    /* RFC 7323 4.3: the timestamp of a segment covering the left edge of
     * what we last acknowledged. */
    if (tcb->ts_enabled && seq_diff(tcb->last_ack_sent, seq) >= 0) {
        tcb->ts_recent = tsval;
        tcb->ts_recent_at = now;
    }
    tcb->rcv_nxt = seq + (uint32_t)taken;
    record->seq = seq;
    record->ack = ack;
    record->tsval = tsval;
    record->tsecr = tsecr;
    record->payload_len = payload_len;
    record->taken = (uint32_t)taken;
    record->window = load_be16(tcp + 14);
    record->flags = flags;
    record->has_timestamp = tcb->ts_enabled != 0;
    return 1;
}

unsigned nf_fast_rx(struct nf_flows *flows, const uint8_t *our_mac, uint32_t our_ip,
                    uint8_t *const *frames, const uint32_t *lengths, const uint8_t *vouched,
                    unsigned count, uint32_t batch, double now,
                    struct nf_fast_record *records, uint8_t *slow)
{
    unsigned taken = 0;
    for (unsigned i = 0; i < count; i++) {
        slow[i] = 1;
        uint64_t match = nf_match_tcp_frame(frames[i], lengths[i], our_mac, our_ip, vouched[i]);
        if (!match)
            continue;
        const uint8_t *tcp = frames[i] + ((match >> 16) & 0xffff);
        uint32_t tcp_len = match & 0xffff;
        uint64_t key = (uint64_t)load_be16(tcp + 2) << 48 | (match >> 32) << 16 | load_be16(tcp);
        struct nf_flow *flow = flow_find(flows, key);
        if (!flow)
            continue;
        struct nf_tcb *tcb = flow->tcb;
        int seen = tcb->fp_batch == batch;
        tcb->fp_batch = batch;
        if (seen || !tcb->fp_predict || !tcb->fp_rx_write
                || !predict_and_take(tcb, tcp, tcp_len, now, &records[taken]))
            continue;
        records[taken].frame = i;
        records[taken].conn = flow->conn;
        taken++;
        slow[i] = 0;
    }
    return taken;
}
