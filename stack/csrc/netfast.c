/* netfast: see netfast.h for the contract of every function. */
#define _GNU_SOURCE /* sendmmsg */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <endian.h>
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <linux/if_packet.h>

#include "netfast.h"
#include "wire_bytes.h"

#define IPV4_FLAG_DF 0x4000
#define IPV4_MF_AND_OFFSET 0x3fff
#define DEFAULT_TTL 64
/* struct virtio_net_hdr: 10 bytes, hdr_len (little-endian) at offset 2. */
#define VNET_HEADER_LEN 10
#define VNET_HDR_LEN_AT 2
#define MTU_FRAME_LEN (ETH_HEADER_LEN + 4 + 1500)  /* with one VLAN tag */

/* Where a TPACKET_V2 slot's packet data starts on TX (without
 * PACKET_TX_HAS_OFF), and where its struct sockaddr_ll sits on RX. */
#define TPACKET2_HEADER_ALIGNED TPACKET_ALIGN(sizeof(struct tpacket2_hdr))

static inline uint64_t rotl64(uint64_t x, int bits) { return x << bits | x >> (64 - bits); }

#define SIP_ROUND(v0, v1, v2, v3) do {                                    \
        v0 += v1; v1 = rotl64(v1, 13) ^ v0; v0 = rotl64(v0, 32);          \
        v2 += v3; v3 = rotl64(v3, 16) ^ v2;                                \
        v0 += v3; v3 = rotl64(v3, 21) ^ v0;                                \
        v2 += v1; v1 = rotl64(v1, 17) ^ v2; v2 = rotl64(v2, 32);          \
    } while (0)

uint64_t nf_siphash24(const uint8_t *key, const uint8_t *data, size_t len)
{
    uint64_t k0, k1;
    memcpy(&k0, key, 8);
    memcpy(&k1, key + 8, 8);
    k0 = le64toh(k0);
    k1 = le64toh(k1);
    uint64_t v0 = k0 ^ 0x736f6d6570736575ULL, v1 = k1 ^ 0x646f72616e646f6dULL;
    uint64_t v2 = k0 ^ 0x6c7967656e657261ULL, v3 = k1 ^ 0x7465646279746573ULL;
    const size_t whole = len & ~(size_t)7;
    uint64_t word;
    for (size_t at = 0; at < whole; at += 8) {
        memcpy(&word, data + at, 8);
        word = le64toh(word);
        v3 ^= word;
        SIP_ROUND(v0, v1, v2, v3);
        SIP_ROUND(v0, v1, v2, v3);
        v0 ^= word;
    }
    /* The last word: the leftover bytes, the length's low byte on top. */
    word = (uint64_t)(len & 0xff) << 56;
    for (size_t i = 0; i < len - whole; i++)
        word |= (uint64_t)data[whole + i] << (8 * i);
    v3 ^= word;
    SIP_ROUND(v0, v1, v2, v3);
    SIP_ROUND(v0, v1, v2, v3);
    v0 ^= word;
    v2 ^= 0xff;
    for (int i = 0; i < 4; i++)
        SIP_ROUND(v0, v1, v2, v3);
    return v0 ^ v1 ^ v2 ^ v3;
}

static inline uint64_t fold16(uint64_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return sum;
}

/* One's-complement sums do not depend on byte order (RFC 1071 2(B)): add
 * native-order 32-bit words into a 64-bit accumulator (2^32 words before it
 * could overflow), fold, and swap the two bytes once at the end on a
 * little-endian machine.  The word loop is a plain reduction that the
 * compiler vectorizes; the AVX2 clone, picked at load time where the CPU
 * has it, sums a 64 KB merged frame about four times faster than 64-bit
 * scalar steps did. */
__attribute__((target_clones("avx2", "default")))
static uint64_t native_word_sum(const uint8_t *data, size_t len)
{
    uint64_t sum = 0;
    uint32_t word32;
    uint16_t word16;
    size_t words = len / 4;

    for (size_t i = 0; i < words; i++) {
        memcpy(&word32, data + 4 * i, 4);
        sum += word32;
    }
    data += 4 * words;
    len -= 4 * words;
    if (len >= 2) {
        memcpy(&word16, data, 2);
        sum += word16;
        data += 2;
        len -= 2;
    }
    if (len) {
        uint8_t tail[2] = {data[0], 0};
        memcpy(&word16, tail, 2);
        sum += word16;
    }
    return sum;
}

static uint16_t big_endian_sum(const uint8_t *data, size_t len)
{
    uint16_t sum = (uint16_t)fold16(native_word_sum(data, len));
#if __BYTE_ORDER == __LITTLE_ENDIAN
    sum = (uint16_t)(sum << 8 | sum >> 8);
#endif
    return sum;
}

uint16_t nf_ones_complement_sum(const uint8_t *data, size_t len, uint64_t initial)
{
    return (uint16_t)fold16((uint64_t)big_endian_sum(data, len) + fold16(initial));
}

static uint64_t pseudo_header_sum(uint32_t src_ip, uint32_t dst_ip, uint8_t protocol,
                                  size_t length)
{
    return (src_ip >> 16) + (src_ip & 0xffff) + (dst_ip >> 16) + (dst_ip & 0xffff)
           + protocol + length;
}

uint64_t nf_match_tcp_frame(const uint8_t *frame, size_t len,
                            const uint8_t *our_mac, uint32_t our_ip, int tcp_checksum_vouched)
{
    if (len < ETH_HEADER_LEN + IPV4_MIN_HEADER_LEN)
        return 0;
    if (memcmp(frame, our_mac, 6) != 0 || load_be16(frame + 12) != ETHERTYPE_IPV4)
        return 0;
    const uint8_t *ip = frame + ETH_HEADER_LEN;
    size_t header_len = (size_t)(ip[0] & 0x0f) * 4;
    size_t total_len = load_be16(ip + 2);
    if ((ip[0] >> 4) != 4 || header_len < IPV4_MIN_HEADER_LEN
            || total_len < header_len + TCP_MIN_HEADER_LEN
            || ETH_HEADER_LEN + total_len > len)
        return 0;
    if ((load_be16(ip + 6) & IPV4_MF_AND_OFFSET) || ip[9] != IPPROTO_TCP_
            || load_be32(ip + 16) != our_ip)
        return 0;
    if (nf_ones_complement_sum(ip, header_len, 0) != 0xffff)
        return 0;
    uint32_t src_ip = load_be32(ip + 12);
    size_t tcp_len = total_len - header_len;
    uint64_t pseudo = pseudo_header_sum(src_ip, our_ip, IPPROTO_TCP_, tcp_len);
    if (!tcp_checksum_vouched && nf_ones_complement_sum(ip + header_len, tcp_len, pseudo) != 0xffff)
        return 0;
    return (uint64_t)src_ip << 32 | (uint64_t)(ETH_HEADER_LEN + header_len) << 16 | tcp_len;
}

void nf_build_tcp_headers(uint8_t *frame, const uint8_t *dst_mac, const uint8_t *src_mac,
                          uint32_t src_ip, uint32_t dst_ip, uint16_t ident,
                          const uint8_t *header, size_t header_len,
                          const uint8_t *payload, size_t payload_len, int partial_checksum)
{
    uint8_t *ip = frame + ETH_HEADER_LEN;
    uint8_t *tcp = ip + IPV4_MIN_HEADER_LEN;
    size_t segment_len = header_len + payload_len;

    memcpy(frame, dst_mac, 6);
    memcpy(frame + 6, src_mac, 6);
    store_be16(frame + 12, ETHERTYPE_IPV4);

    ip[0] = 0x45;
    ip[1] = 0;
    store_be16(ip + 2, (uint16_t)(IPV4_MIN_HEADER_LEN + segment_len));
    store_be16(ip + 4, ident);
    store_be16(ip + 6, IPV4_FLAG_DF);
    ip[8] = DEFAULT_TTL;
    ip[9] = IPPROTO_TCP_;
    store_be16(ip + 10, 0);
    store_be32(ip + 12, src_ip);
    store_be32(ip + 16, dst_ip);
    store_be16(ip + 10, (uint16_t)~nf_ones_complement_sum(ip, IPV4_MIN_HEADER_LEN, 0));

    memcpy(tcp, header, header_len);
    uint64_t pseudo = pseudo_header_sum(src_ip, dst_ip, IPPROTO_TCP_, segment_len);
    if (partial_checksum) {
        store_be16(tcp + TCP_CHECKSUM_AT, (uint16_t)fold16(pseudo));
        return;
    }
    store_be16(tcp + TCP_CHECKSUM_AT, 0);
    /* The TCP header is a whole number of 32-bit words, so the payload's
     * 16-bit words stay aligned when summed on their own. */
    uint64_t sum = nf_ones_complement_sum(tcp, header_len, pseudo);
    store_be16(tcp + TCP_CHECKSUM_AT,
               (uint16_t)~nf_ones_complement_sum(payload, payload_len, sum));
}

void nf_build_tcp_frame(uint8_t *frame, const uint8_t *dst_mac, const uint8_t *src_mac,
                        uint32_t src_ip, uint32_t dst_ip, uint16_t ident,
                        const uint8_t *header, size_t header_len,
                        const uint8_t *payload, size_t payload_len)
{
    nf_build_tcp_headers(frame, dst_mac, src_mac, src_ip, dst_ip, ident,
                         header, header_len, payload, payload_len, 0);
    memcpy(frame + NF_TCP_FRAME_HEADROOM + header_len, payload, payload_len);
}

long nf_send_parts(int fd, const uint8_t *address, uint32_t address_len,
                   uint8_t *const *parts, const size_t *lengths, int count)
{
    struct iovec iov[NF_MAX_PARTS];
    if (count < 0 || count > NF_MAX_PARTS)
        return -EINVAL;
    for (int i = 0; i < count; i++) {
        iov[i].iov_base = parts[i];
        iov[i].iov_len = lengths[i];
    }
    struct msghdr message = {
        .msg_name = (void *)address, .msg_namelen = address_len,
        .msg_iov = iov, .msg_iovlen = (size_t)count,
    };
    ssize_t sent = sendmsg(fd, &message, MSG_DONTWAIT);
    return sent < 0 ? -errno : (long)sent;
}

/* ---- copies from file mappings ---- */

static __thread sigjmp_buf *volatile guarded_copy_exit;
static struct sigaction sigbus_before;
static pthread_once_t sigbus_once = PTHREAD_ONCE_INIT;

static void on_sigbus(int signo, siginfo_t *info, void *context)
{
    if (guarded_copy_exit)
        siglongjmp(*guarded_copy_exit, 1);
    /* Not ours: as it was; the faulting access runs again and meets it. */
    (void)signo, (void)info, (void)context;
    sigaction(SIGBUS, &sigbus_before, NULL);
}

static void install_sigbus_handler(void)
{
    struct sigaction action = {.sa_sigaction = on_sigbus, .sa_flags = SA_SIGINFO | SA_NODEFER};
    sigemptyset(&action.sa_mask);
    sigaction(SIGBUS, &action, &sigbus_before);
}

int nf_copy_guarded(uint8_t *dst, const uint8_t *src, size_t n)
{
    pthread_once(&sigbus_once, install_sigbus_handler);
    sigjmp_buf escape;
    if (sigsetjmp(escape, 0)) {
        guarded_copy_exit = NULL;
        return -1;
    }
    guarded_copy_exit = &escape;
    __asm__ __volatile__("" ::: "memory");   /* the copy stays between the two stores */
    memcpy(dst, src, n);
    __asm__ __volatile__("" ::: "memory");
    guarded_copy_exit = NULL;
    return 0;
}

int nf_complete_checksum(uint8_t *frame, size_t len)
{
    if (len < ETH_HEADER_LEN + IPV4_MIN_HEADER_LEN || load_be16(frame + 12) != ETHERTYPE_IPV4)
        return 0;
    uint8_t *ip = frame + ETH_HEADER_LEN;
    size_t header_len = (size_t)(ip[0] & 0x0f) * 4;
    size_t total_len = load_be16(ip + 2);
    if ((ip[0] >> 4) != 4 || header_len < IPV4_MIN_HEADER_LEN || total_len < header_len
            || ETH_HEADER_LEN + total_len > len || (load_be16(ip + 6) & IPV4_MF_AND_OFFSET))
        return 0;
    size_t l4_len = total_len - header_len;
    size_t checksum_at;
    if (ip[9] == IPPROTO_TCP_ && l4_len >= TCP_MIN_HEADER_LEN)
        checksum_at = TCP_CHECKSUM_AT;
    else if (ip[9] == IPPROTO_UDP_ && l4_len >= UDP_HEADER_LEN)
        checksum_at = UDP_CHECKSUM_AT;
    else
        return 0;
    uint8_t *l4 = ip + header_len;
    store_be16(l4 + checksum_at, 0);
    uint64_t pseudo = pseudo_header_sum(load_be32(ip + 12), load_be32(ip + 16), ip[9], l4_len);
    uint16_t checksum = (uint16_t)~nf_ones_complement_sum(l4, l4_len, pseudo);
    if (ip[9] == IPPROTO_UDP_ && checksum == 0)
        checksum = 0xffff;  /* RFC 768: zero means "no checksum" */
    store_be16(l4 + checksum_at, checksum);
    return 1;
}

static inline struct tpacket2_hdr *ring_slot(const struct nf_ring *ring, uint32_t index)
{
    return (struct tpacket2_hdr *)(ring->base + (size_t)(index / ring->frames_per_block) * ring->block_size +
                                   (size_t)(index % ring->frames_per_block) * ring->frame_size);
}

/* The next slot of `ring` the kernel has handed over that the stack is to
 * see, or NULL.  Slots it is not to see (its own outgoing frames, truncated
 * ones) are stepped over and held; the one returned is not held yet. */
static struct tpacket2_hdr *next_frame(struct nf_ring *ring, struct nf_ring_stats *stats)
{
    while (ring->held < ring->frame_count) {
        uint32_t index = ring->cursor + ring->held;
        struct tpacket2_hdr *slot = ring_slot(ring, index < ring->frame_count ? index : index - ring->frame_count);
        if (!(__atomic_load_n(&slot->tp_status, __ATOMIC_ACQUIRE) & TP_STATUS_USER))
            return NULL;
        const struct sockaddr_ll *link =
            (const struct sockaddr_ll *)((uint8_t *)slot + TPACKET2_HEADER_ALIGNED);
        if (link->sll_pkttype != PACKET_OUTGOING) {
            if (slot->tp_snaplen >= slot->tp_len)
                return slot;
            stats->rx_truncated++;
        }
        ring->held++;
    }
    return NULL;
}

static int stamped_before(const struct tpacket2_hdr *a, const struct tpacket2_hdr *b)
{
    return a->tp_sec < b->tp_sec || (a->tp_sec == b->tp_sec && a->tp_nsec < b->tp_nsec);
}

unsigned nf_rx_collect(struct nf_ring *small, struct nf_ring *large, unsigned max_frames,
                       uint32_t *spans, uint8_t *ring_of, uint8_t *vouched,
                       struct nf_ring_stats *stats)
{
    struct nf_ring *rings[2] = {small, large};
    struct tpacket2_hdr *next[2] = {next_frame(small, stats), next_frame(large, stats)};
    unsigned frames = 0;

    while (frames < max_frames && (next[0] || next[1])) {
        int which = !next[0] || (next[1] && stamped_before(next[1], next[0]));
        struct tpacket2_hdr *slot = next[which];
        struct nf_ring *ring = rings[which];
        ring->held++;
        uint8_t *frame = (uint8_t *)slot + slot->tp_mac;
        if (slot->tp_snaplen > MTU_FRAME_LEN)
            stats->rx_merged++;
        ring_of[frames] = (uint8_t)which;
        vouched[frames] = (slot->tp_status & (TP_STATUS_CSUMNOTREADY | TP_STATUS_CSUM_VALID)) != 0;
        stats->rx_csum_vouched += vouched[frames];
        spans[2 * frames] = (uint32_t)(frame - ring->base);
        spans[2 * frames + 1] = spans[2 * frames] + slot->tp_snaplen;
        frames++;
        next[which] = next_frame(ring, stats);
    }
    if (!frames) {
        nf_rx_release(small);
        nf_rx_release(large);
    }
    return frames;
}

void nf_rx_release(struct nf_ring *ring)
{
    uint32_t index = ring->cursor;
    for (; ring->held; ring->held--) {
        __atomic_store_n(&ring_slot(ring, index)->tp_status, TP_STATUS_KERNEL, __ATOMIC_RELEASE);
        index = index + 1 == ring->frame_count ? 0 : index + 1;
    }
    ring->cursor = index;
}

#define SEND_BATCH 64

long nf_send_frames(int fd, const uint8_t *address, uint32_t address_len, int vnet,
                    const uint8_t *const *frames, const uint32_t *lengths, unsigned count,
                    struct nf_ring_stats *stats)
{
    struct mmsghdr messages[SEND_BATCH];
    struct iovec iov[SEND_BATCH][2];
    uint8_t headers[SEND_BATCH][VNET_HEADER_LEN];
    unsigned sent = 0, next = 0;

    while (next < count) {
        unsigned batch = count - next < SEND_BATCH ? count - next : SEND_BATCH;
        for (unsigned i = 0; i < batch; i++) {
            uint32_t len = lengths[next + i];
            int parts = 0;
            if (vnet) {
                memset(headers[i], 0, VNET_HEADER_LEN);
                store_le16(headers[i] + VNET_HDR_LEN_AT, (uint16_t)len);
                iov[i][parts++] = (struct iovec){headers[i], VNET_HEADER_LEN};
            }
            iov[i][parts++] = (struct iovec){(void *)frames[next + i], len};
            messages[i] = (struct mmsghdr){.msg_hdr = {
                .msg_name = (void *)address, .msg_namelen = address_len,
                .msg_iov = iov[i], .msg_iovlen = parts}};
        }
        int done = sendmmsg(fd, messages, batch, MSG_DONTWAIT);
        stats->tx_syscalls++;
        if (done > 0) {
            /* A short count: the next call meets the failing frame first. */
            sent += (unsigned)done;
            next += (unsigned)done;
            continue;
        }
        int error = done < 0 ? errno : EAGAIN;
        if (error == EAGAIN || error == ENOBUFS || error == EINTR) {
            stats->tx_busy += count - next;
            break;
        }
        if (error != EMSGSIZE && error != EINVAL)
            return -error;
        stats->tx_rejected++;
        next++;
    }
    return sent;
}
