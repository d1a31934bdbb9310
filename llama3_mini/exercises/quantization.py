"""Checker for chapter 11b, small and fast: one q4_0 block's nibbles, packed as GGUF stores
them. A wrong answer is compared with the usual mistakes, and the one it matches is named."""
from __future__ import annotations

import torch

from .checking import run_checks


def _cases():
    """Blocks of 32 int4 values in [-8, 7]: the two ends, a ramp, and random blocks."""
    g = torch.Generator().manual_seed(11)
    ramp = (torch.arange(32) % 16 - 8).to(torch.int8)
    blocks = [ramp, torch.full((32,), -8, dtype=torch.int8), torch.full((32,), 7,
                                                                          dtype=torch.int8)]
    blocks += [torch.randint(-8, 8, (32,), generator=g).to(torch.int8) for _ in range(5)]
    return [(b,) for b in blocks]


def _pack(q, pairs=False, offset=True, swap=False):
    """The answer written out, with the switches for the likely mistakes."""
    u = (q.to(torch.int16) + 8) if offset else (q.to(torch.int16) & 0x0F)
    first, second = (u[0::2], u[1::2]) if pairs else (u[:16], u[16:])
    if swap:
        first, second = second, first
    return (first | (second << 4)).to(torch.uint8)


def _reference(q):
    from ..quantization import pack_nibbles

    return pack_nibbles(q.reshape(1, 32))[0]


def _same_bytes(got, expected) -> bool:
    try:
        got = torch.as_tensor(got).to(torch.int64).flatten()
    except (TypeError, ValueError, RuntimeError):
        return False
    return got.shape == expected.shape and torch.equal(got, expected.to(torch.int64))


def check_q4_0_block(fn) -> bool:
    """fn(q) -> 16 bytes (uint8): one q4_0 block of 32 int4 values q (int8, in [-8, 7]).
    Each value is stored as q + 8 (0..15); byte j holds value j in its low 4 bits and value
    j + 16 in its high 4 bits (quantization.pack_nibbles; GGUF's block_q4_0)."""
    return run_checks("q4_0_block", fn, _reference, _cases(), compare=_same_bytes, mistakes=[
        ("this packs neighbours (values 2j and 2j + 1) into byte j, as Meta's pack_int4 does "
         "for its int4 kernels; GGUF's q4_0 puts value j and value j + 16 in byte j",
         lambda q: _pack(q, pairs=True)),
        ("this stores each value's two's-complement low bits (q & 0xF): q4_0 stores q + 8, "
         "0 to 15, and subtracts 8 when it reads the block back",
         lambda q: _pack(q, offset=False)),
        ("the halves are swapped: value j goes in the low 4 bits (byte & 0xF), value j + 16 "
         "in the high 4 bits (byte >> 4)", lambda q: _pack(q, swap=True))])
