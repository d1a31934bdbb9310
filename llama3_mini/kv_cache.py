"""The KV cache: keys and values of every position seen so far, kept so that generating
token t+1 does not recompute the keys and values of tokens 0 .. t.

One `KVCache` per layer holds two preallocated buffers of shape
(batch, max_seq_len, n_kv_heads, head_dim): keys after RoPE and values, at the KV-head
width, before `repeat_kv` copies them for the query heads. Grouped-query attention
(n_kv_heads < n_heads) is what keeps these buffers small. `make_cache` builds one per layer
and measures them: `nbytes` (memory held) and `filled` (positions written)."""
from __future__ import annotations

import torch

from .config import ModelArgs, pick_device


class KVCache:
    """One layer's cache: `cache_k`, `cache_v` of shape (batch, max_seq_len, n_kv_heads,
    head_dim), preallocated with zeros; `filled` counts the positions written so far."""

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype=torch.float32, device=None):
        if min(batch_size, max_seq_len, n_kv_heads, head_dim) <= 0:
            raise ValueError(f"batch_size ({batch_size}), max_seq_len ({max_seq_len}), "
                             f"n_kv_heads ({n_kv_heads}) and head_dim ({head_dim}) must all "
                             "be positive")
        shape = (batch_size, max_seq_len, n_kv_heads, head_dim)
        device = pick_device(device)
        self.cache_k = torch.zeros(shape, dtype=dtype, device=device)
        self.cache_v = torch.zeros(shape, dtype=dtype, device=device)
        self.filled = 0

    @property
    def shape(self) -> tuple:
        return tuple(self.cache_k.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held by the two buffers (allocated up front, whatever `filled` is)."""
        return self.cache_k.nbytes + self.cache_v.nbytes

    def update(self, start_pos: int, xk: torch.Tensor, xv: torch.Tensor):
        """Store xk, xv (batch, seq, n_kv_heads, head_dim) at positions start_pos ..
        start_pos + seq - 1, and return the keys and values of all positions 0 ..
        start_pos + seq - 1: two tensors (batch, start_pos + seq, n_kv_heads, head_dim),
        views into the buffers (no copy)."""
        bsz, seqlen = xk.shape[:2]
        max_bsz, max_len = self.cache_k.shape[:2]
        end = start_pos + seqlen
        if bsz > max_bsz or end > max_len or start_pos < 0:
            raise ValueError(f"cannot store {bsz} sequences at positions {start_pos}..{end - 1} "
                             f"in a cache of batch {max_bsz} and max_seq_len {max_len}; "
                             "make a larger cache with make_cache(..., batch_size=, max_seq_len=)")
        if start_pos > self.filled:
            raise ValueError(f"start_pos ({start_pos}) leaves a gap: only {self.filled} "
                             "positions are filled; continue from there or reset() the cache")
        self.cache_k[:bsz, start_pos:end] = xk
        self.cache_v[:bsz, start_pos:end] = xv
        self.filled = end  # writing at start_pos drops whatever came after it
        return self.cache_k[:bsz, :end], self.cache_v[:bsz, :end]

    def reset(self) -> None:
        """Forget every position (the memory stays allocated, ready for the next prompt)."""
        self.cache_k.zero_()
        self.cache_v.zero_()
        self.filled = 0


class LayerCaches:
    """The per-layer caches of a whole model: `caches[i]` is layer i's `KVCache`."""

    def __init__(self, layers: list[KVCache]):
        self.layers = list(layers)

    def __getitem__(self, i: int) -> KVCache:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    @property
    def nbytes(self) -> int:
        """Bytes held by every layer's keys and values."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def filled(self) -> int:
        """Positions written so far (the same in every layer after a full forward pass)."""
        return min(layer.filled for layer in self.layers) if self.layers else 0

    @property
    def bytes_per_position(self) -> int:
        """Bytes one more position adds, across layers and the batch: nbytes / max_seq_len."""
        return self.nbytes // self.layers[0].shape[1] if self.layers else 0

    @property
    def filled_nbytes(self) -> int:
        """Bytes of the positions filled so far: what a cache growing on demand would hold."""
        return self.filled * self.bytes_per_position

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    def __repr__(self) -> str:
        shape = self.layers[0].shape if self.layers else ()
        return (f"LayerCaches({len(self)} layers of {shape}, {self.filled} positions filled, "
                f"{self.nbytes / 2**20:.2f} MiB)")


def make_cache(model_or_args, batch_size: int = 1, max_seq_len: int | None = None,
               dtype=None, device=None) -> LayerCaches:
    """One `KVCache` per layer for a `Transformer` or a `ModelArgs`.

    max_seq_len defaults to the config's; dtype and device default to the model's
    parameters' (a `ModelArgs` has none: float32 on `pick_device()`, the best device)."""
    if isinstance(model_or_args, ModelArgs):
        args, param = model_or_args, None
    elif isinstance(getattr(model_or_args, "params", None), ModelArgs):
        args, param = model_or_args.params, next(model_or_args.parameters(), None)
    else:
        raise TypeError(f"make_cache needs a Transformer or a ModelArgs, not "
                        f"{type(model_or_args).__name__}")
    max_seq_len = args.max_seq_len if max_seq_len is None else max_seq_len
    if max_seq_len > args.max_seq_len:
        raise ValueError(f"max_seq_len ({max_seq_len}) is longer than the model's "
                         f"({args.max_seq_len}); RoPE has no angles past it")
    if dtype is None:
        dtype = param.dtype if param is not None else torch.float32
    if device is None and param is not None:
        device = param.device
    device = pick_device(device)
    return LayerCaches([KVCache(batch_size, max_seq_len, args.kv_heads, args.head_dim,
                                dtype=dtype, device=device) for _ in range(args.n_layers)])
