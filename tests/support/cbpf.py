"""A classic BPF interpreter for the filters the packet I/O attaches
(stack/io/steer.py, afpacket.receive_filter), written from linux/filter.h
and the kernel's semantics, not from the code under test: it decodes each
opcode's class, size, mode and operation fields and refuses any it does not
know.  As in the kernel, a load past the frame's end ends the program with
verdict 0; reading a scratch cell no path stored to is refused (the
kernel's checker rejects such a program)."""
from __future__ import annotations

LD, LDX, ST, STX, ALU, JMP, RET, MISC = range(8)
W, H, B = 0x00, 0x08, 0x10
ABS, IND, MEM, LEN, MSH = 0x20, 0x40, 0x60, 0x80, 0xA0
K, X = 0x00, 0x08
ADD, MUL, AND, LSH, RSH, MOD, XOR = 0x00, 0x20, 0x50, 0x60, 0x70, 0x90, 0xA0
JA, JEQ, JGT, JGE, JSET = 0x00, 0x10, 0x20, 0x30, 0x40
TAX, TXA = 0x00, 0x80
_SIZES = {W: 4, H: 2, B: 1}
_MASK = 0xFFFFFFFF


class OutOfBounds(Exception):
    pass


def run(program: list[tuple[int, int, int, int]], frame: bytes) -> int:
    """The verdict of `program` on `frame`."""
    try:
        return _run(program, frame)
    except OutOfBounds:
        return 0


def _load(frame: bytes, offset: int, size: int) -> int:
    if offset + size > len(frame):
        raise OutOfBounds
    return int.from_bytes(frame[offset:offset + size], "big")


def _run(program, frame) -> int:
    a = x = 0
    memory: dict[int, int] = {}
    pc = 0
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        kind = code & 0x07
        if kind in (LD, LDX):
            size, mode = code & 0x18, code & 0xE0
            if kind == LD and mode == ABS:
                a = _load(frame, k, _SIZES[size])
            elif kind == LD and mode == IND:
                a = _load(frame, (x + k) & _MASK, _SIZES[size])
            elif mode == LEN and size == W:
                value = len(frame)
                a, x = (value, x) if kind == LD else (a, value)
            elif mode == MEM and size == W:
                value = memory[k]               # KeyError: never stored
                a, x = (value, x) if kind == LD else (a, value)
            elif kind == LDX and mode == MSH and size == B:
                x = 4 * (_load(frame, k, 1) & 0xF)
            else:
                raise ValueError(f"unknown load {code:#x}")
        elif kind == ST and code == ST:
            memory[k] = a
        elif kind == ALU:
            operand = x if code & X else k
            op = code & 0xF0
            if op == ADD:
                a = (a + operand) & _MASK
            elif op == AND:
                a &= operand
            elif op == MUL:
                a = (a * operand) & _MASK
            elif op == LSH:
                a = (a << operand) & _MASK
            elif op == RSH:
                a >>= operand
            elif op == MOD:
                if operand == 0:
                    return 0
                a %= operand
            elif op == XOR:
                a ^= operand
            else:
                raise ValueError(f"unknown ALU operation {code:#x}")
        elif kind == JMP:
            operand = x if code & X else k
            op = code & 0xF0
            if op == JA and not code & X:
                pc += k
                continue
            if op == JEQ:
                taken = a == operand
            elif op == JGT:
                taken = a > operand
            elif op == JGE:
                taken = a >= operand
            elif op == JSET:
                taken = bool(a & operand)
            else:
                raise ValueError(f"unknown jump {code:#x}")
            pc += jt if taken else jf
        elif kind == RET and code == RET:      # RET | K
            return k
        elif kind == MISC and code & 0xF8 in (TAX, TXA):
            if code & 0xF8 == TAX:
                x = a
            else:
                a = x
        else:
            raise ValueError(f"unknown instruction {code:#x}")
