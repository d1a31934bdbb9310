"""FlashAttention's idea in plain torch (notebook 11c): attention computed tile by tile, so
the (seq, total) matrix of scores never exists whole.

The explicit path (model.attention) makes every score, then the softmax over each row, then
the weighted sum of the values: its largest tensors are (batch, heads, seq, total), which
grow with the square of the sequence. Here the queries are cut into tiles of `block_q` rows
and the keys and values into tiles of `block_k` columns; one (block_q, block_k) tile of
scores exists at a time. The softmax over a whole row is assembled as the key tiles arrive
(the "online softmax", Milakov and Gimelshein 2018; used by FlashAttention, Dao et al. 2022):
each row keeps a running maximum m, a running sum l of exp(score - m) and a running output
o = sum exp(score - m) * value. When a tile brings a larger maximum m', what was summed so
far was scaled by exp(-m) and must be scaled by exp(-m') instead: both l and o are multiplied
by exp(m - m') before the tile's own terms are added. At the end o / l is the softmax-weighted
sum, equal to the explicit one up to rounding.

Tiles that a mask hides completely (under a causal mask, every key tile to the right of the
diagonal; under a document mask, tiles joining two documents) are skipped without computing
their scores: that is half of the work of causal attention at long sequences.

This is the algorithm, not the kernel: FlashAttention's speed comes from keeping each tile in
a GPU's fast on-chip memory, which plain torch cannot control. torch's fused call
(`F.scaled_dot_product_attention`, the model's default) runs such a kernel where one exists.
"""
from __future__ import annotations

import math
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None = None, causal: bool = False,
                    block_q: int = 64, block_k: int = 64, stats: dict | None = None
                    ) -> torch.Tensor:
    """Softmax(q k^T / sqrt(head_dim) + mask) v, one tile of scores at a time.

    q: (batch, n_heads, seq, head_dim); k, v: (batch, n_kv_heads, total, head_dim), with
    n_heads a multiple of n_kv_heads (grouped-query attention: query head h reads KV head
    h // (n_heads // n_kv_heads), as model.repeat_kv lays them out, without copying K or V).
    mask: an additive mask that broadcasts to (batch, n_heads, seq, total), e.g.
    model.causal_mask or model.document_mask. causal=True masks each query's future itself,
    aligned to the end as with a KV cache (query i sits at position total - seq + i).
    stats, if given, receives the number of score tiles computed and skipped.
    Returns (batch, n_heads, seq, v's head_dim) in q's dtype; accumulates in float32.
    A row that may see no key at all has no softmax; it comes out as zeros."""
    bsz, n_heads, seqlen, head_dim = q.shape
    n_kv_heads, total = k.shape[1], k.shape[2]
    if n_heads % n_kv_heads:
        raise ValueError(f"q's heads ({n_heads}) must be a multiple of k's heads "
                         f"({n_kv_heads})")
    if k.shape[:3] != v.shape[:3] or k.shape[0] != bsz or k.shape[3] != head_dim:
        raise ValueError(f"k {tuple(k.shape)} must be (batch, n_kv_heads, total, {head_dim}) "
                         f"and v {tuple(v.shape)} (batch, n_kv_heads, total, any) for q "
                         f"{tuple(q.shape)}")
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block sizes must be positive, got {block_q} and {block_k}")
    n_rep, offset = n_heads // n_kv_heads, total - seqlen
    if mask is not None:
        mask = mask.expand(bsz, n_heads, seqlen, total)
    kf, vf = k.float(), v.float()
    out = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    computed = skipped = 0
    for i0 in range(0, seqlen, block_q):
        i1 = min(i0 + block_q, seqlen)
        rows = i1 - i0
        # (b, kv, n_rep * rows, hd): the n_rep query heads that share one KV head, stacked
        qt = q[:, :, i0:i1].float().reshape(bsz, n_kv_heads, n_rep * rows, head_dim)
        qt = qt / math.sqrt(head_dim)
        m = torch.full((bsz, n_heads, rows, 1), float("-inf"), device=q.device)
        l = torch.zeros_like(m)
        o = torch.zeros(bsz, n_heads, rows, v.shape[-1], device=q.device)
        for j0 in range(0, total, block_k):
            j1 = min(j0 + block_k, total)
            if causal and j0 > i1 - 1 + offset:  # every key here is in every query's future
                skipped += 1
                continue
            tile_mask = None if mask is None else mask[:, :, i0:i1, j0:j1]
            if tile_mask is not None and torch.isneginf(tile_mask).all():
                skipped += 1
                continue
            computed += 1
            s = (qt @ kf[:, :, j0:j1].transpose(-2, -1)).view(bsz, n_heads, rows, j1 - j0)
            if tile_mask is not None:
                s = s + tile_mask
            if causal and j1 - 1 > i0 + offset:  # the tile crosses the diagonal
                qpos = torch.arange(i0, i1, device=q.device)[:, None] + offset
                kpos = torch.arange(j0, j1, device=q.device)[None, :]
                s = s.masked_fill(kpos > qpos, float("-inf"))
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            # A row that has seen only -inf so far keeps m = -inf: subtract 0 instead, so
            # that exp(-inf - 0) = 0 rather than exp(-inf + inf) = nan.
            safe = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - safe)  # (b, heads, rows, cols), at most 1
            rescale = torch.exp(m - safe)  # how much the old maximum overstated the new one
            l = l * rescale + p.sum(-1, keepdim=True)
            pv = p.view(bsz, n_kv_heads, n_rep * rows, j1 - j0) @ vf[:, :, j0:j1]
            o = o * rescale + pv.view(bsz, n_heads, rows, -1)
            m = m_new
        out[:, :, i0:i1] = torch.where(l > 0, o / l.clamp_min(1e-30), 0.0).to(q.dtype)
    if stats is not None:
        stats.update(computed=computed, skipped=skipped)
    return out


class PeakMemory(TorchDispatchMode):
    """Measures the peak bytes of tensor storage that torch operations create inside the
    `with` block (inputs made before it are not counted), on any device: every operation's
    outputs are followed until they are freed.
    with PeakMemory() as m: y = torch.ones(1024) * 2  ->  m.peak == 8192 (two 4 KiB tensors)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _free(self, key: int, nbytes: int) -> None:
        if self.live.pop(key, None) is not None:
            self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in tree_flatten(result)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes and key not in self.live:  # a view shares its base's storage
                self.live[key] = nbytes
                self.now += nbytes
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self._free, key, nbytes)
        return result


def peak_bytes(fn, *args, **kwargs) -> int:
    """The peak storage, in bytes, that fn(*args, **kwargs) creates (see PeakMemory)."""
    with PeakMemory() as meter:
        fn(*args, **kwargs)
    return meter.peak
