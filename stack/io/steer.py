"""Which stack worker a frame belongs to, when N workers share an interface
(issue 14, one stack per core).

Every frame of a TCP flow goes to the worker `worker_of_ports` names: a
multiplicative hash of port_a ^ port_b, modulo N.  The XOR makes it
symmetric, so both directions of a flow and the TCP header an ICMP error
quotes land on the same worker, and a worker opening a connection can pick
its local port so that the flow comes back to itself (mTCP's RSS-aware
port choice; TcpHost.connect_ephemeral).  The hash's high bits make it
spread: Linux gives connect() even ports, so (port ^ port) % 2 alone sent
every connection from a Linux client to a server on an even port to
worker 0.  ARP goes to
every worker, as each keeps its own neighbour table; everything else
(ICMP echo, fragments past the first, other EtherTypes, frames too short
to tell) goes to worker 0.

`worker_of_frame` is the reference; `steering_program` is the same decision
as a classic BPF filter that each worker attaches to its own packet
sockets.  The program checks the frame's length before every load whose
offset it does not already know to be inside: a load past the end would
make the kernel return 0 (drop) in every worker's filter, where the
reference sends such a frame to worker 0.
"""
from __future__ import annotations

from mtcpshim._shm import lib
from mtcpshim.stack.wire.ethernet import ETHERTYPE_ARP, ETHERTYPE_IPV4
from mtcpshim.stack.wire.icmp import TYPE_DEST_UNREACHABLE
from mtcpshim.stack.wire.ipv4 import PROTO_ICMP, PROTO_TCP

#: worker_of_frame's answer for a frame every worker takes (ARP).
ALL_WORKERS = -1

_TYPE_TIME_EXCEEDED = 11
_TYPE_PARAMETER_PROBLEM = 12
_ICMP_ERRORS = (TYPE_DEST_UNREACHABLE, _TYPE_TIME_EXCEEDED, _TYPE_PARAMETER_PROBLEM)
_ETH = 14                     # the IPv4 header's offset in the frame
_MIN_IPV4_FRAME = _ETH + 20   # shorter: worker 0 without looking
_FRAGMENT_OFFSET = 0x1FFF
# Offsets in an ICMP error message: the quoted IPv4 header and its protocol.
# The error is read only if its header and 20 quoted bytes are in the frame.
_QUOTE = 8
_QUOTE_PROTOCOL = _QUOTE + 9
_ICMP_WITH_QUOTE = _QUOTE + 20

# Classic BPF opcodes (linux/filter.h).
_LD_W_LEN = 0x80     # A = frame length
_LD_H_ABS = 0x28     # A = halfword at k
_LD_B_ABS = 0x30     # A = byte at k
_LD_H_IND = 0x48     # A = halfword at X + k
_LD_B_IND = 0x50     # A = byte at X + k
_LDX_MEM = 0x61      # X = M[k]
_LDX_B_MSH = 0xB1    # X = 4 * (byte at k & 0xf)
_ST = 0x02           # M[k] = A
_JMP_CLASS = 0x05
_ALU_ADD_K = 0x04
_ALU_ADD_X = 0x0C
_ALU_AND_K = 0x54
_ALU_LSH_K = 0x64
_ALU_MOD_K = 0x94
_ALU_MUL_K = 0x24
_ALU_RSH_K = 0x74
_ALU_XOR_X = 0xAC
_JMP_JA = 0x05
_JMP_JEQ_K = 0x15
_JMP_JGE_K = 0x35
_JMP_JGE_X = 0x3D
_JMP_JSET_K = 0x45
_RET_K = 0x06
_TAX = 0x07
_TXA = 0x87


# Knuth's multiplicative hash (the ABI's, which the interposer computes
# too): its high half mixes every bit of the ports.
_HASH_MULTIPLIER = lib.MTS_STEER_MULTIPLIER
_HASH_SHIFT = lib.MTS_STEER_SHIFT


def worker_of_ports(port_a: int, port_b: int, workers: int) -> int:
    """The worker of a TCP flow between these ports, either way round."""
    return (((port_a ^ port_b) * _HASH_MULTIPLIER & 0xFFFFFFFF) >> _HASH_SHIFT) % workers


def worker_of_frame(frame, workers: int) -> int:
    """The worker that takes this Ethernet frame, or ALL_WORKERS."""
    length = len(frame)
    if length < _MIN_IPV4_FRAME:
        return 0
    ethertype = frame[12] << 8 | frame[13]
    if ethertype == ETHERTYPE_ARP:
        return ALL_WORKERS
    if ethertype != ETHERTYPE_IPV4 or (frame[20] << 8 | frame[21]) & _FRAGMENT_OFFSET:
        return 0
    ihl = 4 * (frame[_ETH] & 0xF)   # unchecked, as in the filter: the stack drops bad headers
    protocol = frame[23]
    if protocol == PROTO_TCP:
        ports = _ETH + ihl
    elif protocol == PROTO_ICMP:
        icmp = _ETH + ihl
        if (length < icmp + _ICMP_WITH_QUOTE or frame[icmp] not in _ICMP_ERRORS
                or frame[icmp + _QUOTE_PROTOCOL] != PROTO_TCP):
            return 0
        ports = icmp + _QUOTE + 4 * (frame[icmp + _QUOTE] & 0xF)
    else:
        return 0
    if length < ports + 4:
        return 0
    return worker_of_ports(frame[ports] << 8 | frame[ports + 1],
                           frame[ports + 2] << 8 | frame[ports + 3], workers)


def steering_program(worker: int, workers: int, accept: int) -> list[tuple[int, int, int, int]]:
    """Classic BPF instructions (code, jt, jf, k) returning `accept` for
    the frames worker_of_frame gives `worker` or ALL_WORKERS, 0 for the
    rest.  With two workers or more, 47 instructions: length and
    EtherType, fragment offset, protocol; for ICMP the type and the quoted
    header's protocol and length; a length check up to the ports; then
    worker_of_ports.  One worker: a single return."""
    if not 0 <= worker < workers:
        raise ValueError(f"worker {worker} is not one of {workers}")
    if workers == 1:
        return [(_RET_K, 0, 0, accept)]
    rest = "take" if worker == 0 else "drop"   # frames that are worker 0's
    source = [
        (_LD_W_LEN, 0, 0, 0),
        (_JMP_JGE_K, None, rest, _MIN_IPV4_FRAME),
        (_LD_H_ABS, 0, 0, 12),
        (_JMP_JEQ_K, "take", None, ETHERTYPE_ARP),
        (_JMP_JEQ_K, None, rest, ETHERTYPE_IPV4),
        (_LD_H_ABS, 0, 0, 20),
        (_JMP_JSET_K, rest, None, _FRAGMENT_OFFSET),
        (_LDX_B_MSH, 0, 0, _ETH),                  # X = IHL
        (_LD_B_ABS, 0, 0, 23),
        (_JMP_JEQ_K, "tcp", None, PROTO_TCP),
        (_JMP_JEQ_K, None, rest, PROTO_ICMP),
        (_TXA, 0, 0, 0),
        (_ALU_ADD_K, 0, 0, _ETH + _ICMP_WITH_QUOTE),
        (_TAX, 0, 0, 0),
        (_LD_W_LEN, 0, 0, 0),
        (_JMP_JGE_X, None, rest, 0),
        (_LDX_B_MSH, 0, 0, _ETH),
        (_LD_B_IND, 0, 0, _ETH),                   # the ICMP type
        (_JMP_JEQ_K, "quote", None, _ICMP_ERRORS[0]),
        (_JMP_JEQ_K, "quote", None, _ICMP_ERRORS[1]),
        (_JMP_JEQ_K, None, rest, _ICMP_ERRORS[2]),
        "quote",
        (_LD_B_IND, 0, 0, _ETH + _QUOTE_PROTOCOL),
        (_JMP_JEQ_K, None, rest, PROTO_TCP),
        (_LD_B_IND, 0, 0, _ETH + _QUOTE),         # the quoted IHL: MSH has no X + k form
        (_ALU_AND_K, 0, 0, 0xF),
        (_ALU_LSH_K, 0, 0, 2),
        (_ALU_ADD_X, 0, 0, 0),
        (_ALU_ADD_K, 0, 0, _QUOTE),
        (_JMP_JA, None, None, "ports"),
        "tcp",
        (_TXA, 0, 0, 0),
        "ports",                                   # A: the ports' offset past the Ethernet header
        (_ST, 0, 0, 1),
        (_ALU_ADD_K, 0, 0, _ETH + 4),
        (_TAX, 0, 0, 0),
        (_LD_W_LEN, 0, 0, 0),
        (_JMP_JGE_X, None, rest, 0),
        (_LDX_MEM, 0, 0, 1),
        (_LD_H_IND, 0, 0, _ETH),
        (_ST, 0, 0, 0),
        (_LD_H_IND, 0, 0, _ETH + 2),
        (_LDX_MEM, 0, 0, 0),
        (_ALU_XOR_X, 0, 0, 0),
        (_ALU_MUL_K, 0, 0, _HASH_MULTIPLIER),    # A is 32 bits: the product wraps as the reference's mask
        (_ALU_RSH_K, 0, 0, _HASH_SHIFT),
        (_ALU_MOD_K, 0, 0, workers),
        (_JMP_JEQ_K, "take", "drop", worker),
        "drop",
        (_RET_K, 0, 0, 0),
        "take",
        (_RET_K, 0, 0, accept),
    ]
    return _assemble(source)


def _assemble(source: list) -> list[tuple[int, int, int, int]]:
    """Resolves the label names among `source`'s instructions into jump
    offsets (None: on to the next instruction)."""
    labels, count = {}, 0
    for item in source:
        if isinstance(item, str):
            labels[item] = count
        else:
            count += 1
    program = []
    for item in source:
        if isinstance(item, str):
            continue
        code, jt, jf, k = item
        if code & 0x07 == _JMP_CLASS:
            after = len(program) + 1
            jt, jf = (0 if label is None else labels[label] - after for label in (jt, jf))
            if code == _JMP_JA:
                k = labels[k] - after
        program.append((code, jt, jf, k))
    return program
