"""Checker for chapter 11a, training at scale: the positions one rank holds under Llama 3's
context parallelism ("The Llama 3 Herd of Models", section 3.3.2: the sequence cut into
2 x CP chunks, rank i taking chunks i and 2 x CP - 1 - i). A wrong answer is compared with
the usual mistakes, and the one it matches is named."""
from __future__ import annotations

import torch

from .checking import run_checks


def _cases():
    """(seq_len, cp_rank, cp_size): the paper's rule at CP = 1, 2, 3, 4 and 8, every rank."""
    shapes = [(8, 1), (8, 2), (16, 4), (24, 3), (12, 2), (64, 8)]
    return [(seq, r, cp) for seq, cp in shapes for r in range(cp)]


def _chunks(seq_len, cp_size, picks):
    size = seq_len // (2 * cp_size)
    return [p for c in picks for p in range(c * size, (c + 1) * size)]


def _as_positions(got):
    try:
        return [int(x) for x in torch.as_tensor(got).flatten().tolist()]
    except (TypeError, ValueError, RuntimeError):
        return None


def _same(got, expected) -> bool:
    return _as_positions(got) == [int(x) for x in expected]


def _reference(seq_len, cp_rank, cp_size):
    from ..parallel.context import chunk_positions

    return chunk_positions(seq_len, cp_rank, cp_size).tolist()


def check_cp_chunks(fn) -> bool:
    """fn(seq_len, cp_rank, cp_size) -> the token positions rank cp_rank holds, in rising
    order: the sequence cut into 2 cp_size equal chunks, the rank taking chunk cp_rank and
    chunk 2 cp_size - 1 - cp_rank (fn(8, 0, 2) -> [0, 1, 6, 7])."""
    return run_checks("cp_chunks", fn, _reference, _cases(), compare=_same, mistakes=[
        ("one slice of seq_len / CP consecutive positions per rank: under the causal mask a "
         "late query attends to many more keys than an early one, so the last rank gets most "
         "of the work; cut 2 x CP chunks and give rank i chunks i and 2 x CP - 1 - i",
         lambda s, r, cp: list(range(r * s // cp, (r + 1) * s // cp))),
        ("this pairs chunk i with chunk i + CP: every rank gets an early and a late chunk, but "
         "the work still grows with i; the partner is the mirror image, 2 x CP - 1 - i",
         lambda s, r, cp: _chunks(s, cp, [r, r + cp])),
        ("off by one: the partner of chunk i is 2 x CP - 1 - i (chunks are numbered from 0, "
         "the last is 2 x CP - 1), not 2 x CP - i",
         lambda s, r, cp: _chunks(s, cp, [r, 2 * cp - r]) if r else _chunks(s, cp, [r])),
        ("these are the chunk numbers [i, 2 x CP - 1 - i]: return the token positions inside "
         "those two chunks", lambda s, r, cp: [r, 2 * cp - 1 - r]),
        ("the right positions, late chunk first: return them in rising order (chunk i, then "
         "chunk 2 x CP - 1 - i), so that position t's key lands at index t once gathered",
         lambda s, r, cp: _chunks(s, cp, [2 * cp - 1 - r, r]))])
