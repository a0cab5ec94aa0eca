/*
 * netfast: the stack's per-byte and per-packet work in C, called through cffi
 * (stack/_build_netfast.py builds it as stack._netfast).
 *
 * This header is handed to cffi's cdef verbatim, so it holds only
 * declarations cffi understands: no includes, no macros with expressions.
 * Addresses are host-order integers, as everywhere in the stack.
 */

/* RFC 1071 one's-complement sum of `data` (big-endian 16-bit words, an odd
 * tail byte padded with zero) added to the partial sum `initial`, folded to
 * 16 bits.  Same result as stack.checksum.ones_complement_sum. */
uint16_t nf_ones_complement_sum(const uint8_t *data, size_t len, uint64_t initial);

/* SipHash-2-4 of `data` under the 16-byte `key`: the same 64-bit value as
 * stack.siphash.siphash24. */
uint64_t nf_siphash24(const uint8_t *key, const uint8_t *data, size_t len);

/* Fast receive path.  If `frame` is Ethernet to `our_mac`, IPv4 with a valid
 * header (version, IHL, lengths, header checksum), not a fragment, TCP, to
 * `our_ip`, with a correct TCP checksum (not summed when
 * `tcp_checksum_vouched`: see nf_rx_collect), returns
 *     src_ip << 32 | tcp_offset << 16 | tcp_len
 * (tcp_offset is where the TCP header starts in the frame; tcp_len excludes
 * Ethernet padding).  Returns 0 for anything else: the caller then takes its
 * slow path, which finds out what the frame is and why it is dropped. */
uint64_t nf_match_tcp_frame(const uint8_t *frame, size_t len,
                            const uint8_t *our_mac, uint32_t our_ip, int tcp_checksum_vouched);

/* A frame whose TCP/UDP checksum its sender left to offload
 * (CHECKSUM_PARTIAL: the field holds only the pseudo-header sum) gets the
 * real checksum, as a NIC would compute it.  Returns 1 if it did, 0 if the
 * frame is not IPv4 TCP/UDP in one piece. */
int nf_complete_checksum(uint8_t *frame, size_t len);

/* Size of the Ethernet + IPv4 headers the frame builders put in front. */
#define NF_TCP_FRAME_HEADROOM 34

/* Writes the headers of a TCP frame into `frame`: Ethernet and IPv4 (TTL 64,
 * DF, no options, total length counting `payload_len` payload bytes after
 * the TCP header), then the TCP header `header` (header_len bytes, its own
 * checksum field ignored), with the IPv4 header checksum and the TCP
 * checksum over header and `payload` stored.  With `partial_checksum`, the
 * TCP checksum field gets only the folded pseudo-header sum, for the device
 * to complete (CHECKSUM_PARTIAL), and the payload is not read.  `frame`
 * holds NF_TCP_FRAME_HEADROOM + header_len bytes; the payload is not copied:
 * a gather send puts it after them.
 * 20 <= header_len <= 60, header_len + payload_len <= 65515. */
void nf_build_tcp_headers(uint8_t *frame, const uint8_t *dst_mac, const uint8_t *src_mac,
                          uint32_t src_ip, uint32_t dst_ip, uint16_t ident,
                          const uint8_t *header, size_t header_len,
                          const uint8_t *payload, size_t payload_len, int partial_checksum);

/* nf_build_tcp_headers with the full checksum, then the payload copied
 * after the headers: one whole frame of NF_TCP_FRAME_HEADROOM + header_len
 * + payload_len bytes. */
void nf_build_tcp_frame(uint8_t *frame, const uint8_t *dst_mac, const uint8_t *src_mac,
                        uint32_t src_ip, uint32_t dst_ip, uint16_t ident,
                        const uint8_t *header, size_t header_len,
                        const uint8_t *payload, size_t payload_len);

/* One datagram from `count` parts (at most NF_MAX_PARTS), gathered by the
 * kernel (sendmsg with MSG_DONTWAIT) to the socket address `address`: no
 * part is copied in user space.  Returns the bytes sent, or -errno. */
#define NF_MAX_PARTS 16
long nf_send_parts(int fd, const uint8_t *address, uint32_t address_len,
                   uint8_t *const *parts, const size_t *lengths, int count);

/* memcpy that survives a source in a file mapping whose file was truncated
 * under it: the SIGBUS such a read raises ends the copy instead of the
 * process (the first call installs the handler; a SIGBUS outside a guarded
 * copy goes to the handler that was there before).  0, or -1 if the source
 * faulted. */
int nf_copy_guarded(uint8_t *dst, const uint8_t *src, size_t n);

/* A TPACKET_V2 ring inside a PACKET_MMAP mapping: frame_count frames of
 * frame_size bytes, frames_per_block of them at the start of each
 * block_size block (frames never span blocks).  `cursor` is the slot the
 * next walk starts at; `held` counts RX slots walked but not yet handed back. */
struct nf_ring {
    uint8_t *base;
    uint32_t frame_size;
    uint32_t frame_count;
    uint32_t cursor;
    uint32_t held;
    uint32_t frames_per_block;
    uint32_t block_size;
};

/* Counters the ring walks keep (the backend reports them). */
struct nf_ring_stats {
    uint64_t rx_truncated;    /* frame bigger than a ring slot */
    uint64_t rx_merged;       /* frame bigger than an MTU: GRO or a local sender's GSO */
    uint64_t rx_csum_vouched; /* checksum left to offload or checked by the NIC: not summed */
    uint64_t tx_busy;         /* the device queue was full (EAGAIN, ENOBUFS): frame dropped */
    uint64_t tx_rejected;     /* the kernel refused a frame (EMSGSIZE, EINVAL) */
    uint64_t tx_syscalls;     /* sendmmsg calls made */
};

/* Walks two RX rings from their cursors over slots the kernel has handed to
 * user space, up to `max_frames` deliverable frames, in the order the kernel
 * stamped them: `small` takes frames up to an MTU, `large` the rest (GRO and
 * GSO frames; each socket's filter sorts them), so that many small frames
 * need not each take a slot sized for 64 KB.  Frame i is in ring
 * ring_of[i] (0: small, 1: large), at [spans[2i], spans[2i+1]) from that
 * ring's base, valid until nf_rx_release of it.  Frames this host sent
 * (PACKET_OUTGOING) and truncated frames are skipped.  vouched[i] is 1 when the kernel vouches for frame i's
 * TCP/UDP checksum, as it does itself (skb_csum_unnecessary): a local
 * sender left it to offload (TP_STATUS_CSUMNOTREADY: veth; the field holds
 * only the pseudo-header sum, and nothing on the way can have damaged the
 * bytes), or the NIC verified it (TP_STATUS_CSUM_VALID).  Returns the number
 * of frames; when that is 0, the walked slots are already released. */
unsigned nf_rx_collect(struct nf_ring *small, struct nf_ring *large, unsigned max_frames,
                       uint32_t *spans, uint8_t *ring_of, uint8_t *vouched,
                       struct nf_ring_stats *stats);

/* Hands the slots the last walk held back to the kernel. */
void nf_rx_release(struct nf_ring *ring);

/* Sends `count` frames, `frames[i]` of `lengths[i]` bytes, each as one datagram to the socket address `address`, a batch
 * of them per sendmmsg (MSG_DONTWAIT).  With `vnet` (a PACKET_VNET_HDR
 * socket), each goes after a virtio_net_hdr that asks for no offload and
 * declares the whole frame its header, so the kernel copies it into the
 * skb's linear part: a frame that takes a page of its own (as a TX ring
 * slot's does) costs a page allocation, and one more copy where a veth hands
 * it to another namespace.  Frames the device queue has no room for are
 * counted in tx_busy, frames the kernel refuses in tx_rejected; both are
 * dropped, as a NIC drops what its full ring cannot take, and TCP resends.
 * Returns the frames sent, or -errno for any other error (the device went
 * down or away). */
long nf_send_frames(int fd, const uint8_t *address, uint32_t address_len, int vnet,
                    const uint8_t *const *frames, const uint32_t *lengths, unsigned count,
                    struct nf_ring_stats *stats);
