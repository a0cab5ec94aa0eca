/* Byte-order helpers and header sizes shared by the C files of the stack
 * (not for cffi: netfast.h and fastpath.h are its declarations). */
#ifndef WIRE_BYTES_H
#define WIRE_BYTES_H

#include <stdint.h>

#define ETH_HEADER_LEN 14
#define ETHERTYPE_IPV4 0x0800
#define IPV4_MIN_HEADER_LEN 20
#define IPPROTO_TCP_ 6
#define IPPROTO_UDP_ 17
#define TCP_MIN_HEADER_LEN 20
#define TCP_CHECKSUM_AT 16
#define UDP_HEADER_LEN 8
#define UDP_CHECKSUM_AT 6

static inline uint16_t load_be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }

static inline uint32_t load_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static inline void store_le16(uint8_t *p, uint16_t v) { p[0] = v & 0xff; p[1] = v >> 8; }

static inline void store_be16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = v & 0xff; }

static inline void store_be32(uint8_t *p, uint32_t v)
{
    p[0] = v >> 24; p[1] = (v >> 16) & 0xff; p[2] = (v >> 8) & 0xff; p[3] = v & 0xff;
}

#endif
