"""Checker for chapter 11c, the attention kernel: one step of the online softmax with its
output (FlashAttention's inner loop, Dao et al. 2022). A row's running maximum m, running sum
l and running output o take in one more tile of scores s and values v. A wrong answer is
compared with the usual mistakes, and the one it matches is named."""
from __future__ import annotations

import torch

from .checking import run_checks, same


def _tile(seed, rows, cols, d, scale, first):
    """(m, l, o, s, v): the state after some earlier tile (or the empty state), and a tile."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, cols, generator=g, dtype=torch.float64) * scale
    v = torch.randn(cols, d, generator=g, dtype=torch.float64)
    if first:  # nothing seen yet: m = -inf, l = 0, o = 0
        f64 = torch.float64
        return (torch.full((rows, 1), float("-inf"), dtype=f64), torch.zeros(rows, 1, dtype=f64),
                torch.zeros(rows, d, dtype=f64), s, v)
    earlier = torch.randn(rows, cols, generator=g, dtype=torch.float64) * scale
    earlier[0] -= 3 * scale  # row 0: the new tile brings a larger maximum
    earlier[-1] += 3 * scale  # the last row: the old maximum stays
    m = earlier.amax(-1, keepdim=True)
    p = torch.exp(earlier - m)
    o = p @ torch.randn(cols, d, generator=g, dtype=torch.float64)
    return m, p.sum(-1, keepdim=True), o, s, v


def _cases():
    shapes = [(2, 3, 2, 1.0), (4, 5, 3, 4.0), (3, 8, 4, 20.0), (1, 1, 1, 1.0), (5, 2, 6, 0.1)]
    return [_tile(i, r, c, d, sc, first) for i, (r, c, d, sc) in enumerate(shapes)
            for first in (False, True)]


def _reference(m, l, o, s, v):
    m_new = torch.maximum(m, s.amax(-1, keepdim=True))
    p = torch.exp(s - m_new)
    rescale = torch.exp(m - m_new)
    return m_new, l * rescale + p.sum(-1, keepdim=True), o * rescale + p @ v


def _same(got, expected) -> bool:
    return (isinstance(got, (tuple, list)) and len(got) == 3
            and all(isinstance(g, torch.Tensor) for g in got)
            and same(tuple(g.double() for g in got), expected, atol=1e-9))


def _no_o_rescale(m, l, o, s, v):
    m_new, l_new, _ = _reference(m, l, o, s, v)
    return m_new, l_new, o + torch.exp(s - m_new) @ v


def _no_l_rescale(m, l, o, s, v):
    m_new, _, o_new = _reference(m, l, o, s, v)
    return m_new, l + torch.exp(s - m_new).sum(-1, keepdim=True), o_new


def _inverted(m, l, o, s, v):
    m_new = torch.maximum(m, s.amax(-1, keepdim=True))
    p, rescale = torch.exp(s - m_new), torch.exp(m_new - m)
    return m_new, l * rescale + p.sum(-1, keepdim=True), o * rescale + p @ v


def _old_max(m, l, o, s, v):
    m_new = torch.maximum(m, s.amax(-1, keepdim=True))
    p = torch.exp(s - m)
    return m_new, l + p.sum(-1, keepdim=True), o + p @ v


def _tile_max(m, l, o, s, v):
    m_new = s.amax(-1, keepdim=True)
    p, rescale = torch.exp(s - m_new), torch.exp(m - m_new)
    return m_new, l * rescale + p.sum(-1, keepdim=True), o * rescale + p @ v


def _divided(m, l, o, s, v):
    m_new, l_new, o_new = _reference(m, l, o, s, v)
    return m_new, l_new, o_new / l_new


def _explain(got, expected, case):
    if not (isinstance(got, (tuple, list)) and len(got) == 3):
        return ["return three tensors: (m_new, l_new, o_new)"]
    names = ("m_new", "l_new", "o_new")
    return [f"{name}: " + ("right" if isinstance(g, torch.Tensor) and same(g.double(), e, 1e-9)
                           else "differs") for name, g, e in zip(names, got, expected, strict=True)]


def check_online_softmax_step(fn) -> bool:
    """fn(m, l, o, s, v) -> (m_new, l_new, o_new): one tile taken into a running softmax.
    m, l: (rows, 1), the running maximum and the running sum of exp(score - m); o: (rows, d),
    the running sum of exp(score - m) * value; s: (rows, cols), the tile's scores; v: (cols, d),
    its values. Before the first tile m = -inf, l = 0, o = 0; after the last, o / l is the
    attention output."""
    return run_checks("online_softmax_step", fn, _reference, _cases(), compare=_same,
                      explain=_explain, mistakes=[
        ("o is not rescaled: what it summed was weighted by exp(score - m), and the new tile's "
         "terms by exp(score - m_new); multiply o by exp(m - m_new) before adding p @ v, as "
         "for l", _no_o_rescale),
        ("l is not rescaled: the old sum counts exp(score - m); multiply it by "
         "exp(m - m_new) before adding the tile's sum", _no_l_rescale),
        ("the rescale is upside down: m_new >= m, so the factor exp(m - m_new) is at most 1 "
         "(the old terms shrink); exp(m_new - m) makes them grow", _inverted),
        ("the tile's exponentials use the old maximum m: take m_new = max(m, the tile's "
         "maximum) first, then p = exp(s - m_new) and rescale the old l and o", _old_max),
        ("m_new is the tile's own maximum: the running maximum is max(m, the tile's maximum), "
         "or a later tile with smaller scores lowers it", _tile_max),
        ("o is divided by l at every step: keep o unnormalised (a sum) and divide once, "
         "after the last tile; a divided o cannot be rescaled and added to", _divided)])
