"""Rotary position embeddings (RoPE) as Llama 3 uses them.

Each pair of adjacent dimensions (0, 1), (2, 3), ... of a query or key is a point in a
plane, rotated by an angle proportional to the token's position. Pair i turns at
frequency theta ** (-2i / head_dim): fast for the first pairs, slow for the last.
Llama 3 raised theta from 10,000 to 500,000; Llama 3.1 added `apply_scaling` to stretch
the slow frequencies for a 128K context."""
from __future__ import annotations

import math

import torch


def rope_frequencies(head_dim: int, theta: float = 500000.0) -> torch.Tensor:
    """Angular frequency of each dimension pair, in radians per position: (head_dim // 2,)."""
    if head_dim % 2:
        raise ValueError(f"head_dim ({head_dim}) must be even: RoPE rotates pairs of dimensions")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64)[: head_dim // 2] / head_dim
    return (1.0 / theta ** exponents).float()


def apply_scaling(freqs: torch.Tensor, scale_factor: float = 8.0, low_freq_factor: float = 1.0,
                  high_freq_factor: float = 4.0, original_max_seq_len: int = 8192) -> torch.Tensor:
    """Llama 3.1's frequency scaling, in three bands by wavelength (2 pi / freq):

    - shorter than original_max_seq_len / high_freq_factor: unchanged (local detail);
    - longer than original_max_seq_len / low_freq_factor: divided by scale_factor;
    - in between: a smooth blend of the two, linear in original_max_seq_len / wavelength.
    """
    if scale_factor <= 0 or high_freq_factor <= low_freq_factor:
        raise ValueError(f"need scale_factor > 0 ({scale_factor}) and high_freq_factor "
                         f"({high_freq_factor}) > low_freq_factor ({low_freq_factor})")
    low_freq_wavelen = original_max_seq_len / low_freq_factor
    high_freq_wavelen = original_max_seq_len / high_freq_factor
    wavelen = 2 * math.pi / freqs
    band = high_freq_factor - low_freq_factor
    smooth = (original_max_seq_len / wavelen - low_freq_factor) / band
    blended = (1 - smooth) * freqs / scale_factor + smooth * freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / scale_factor, blended)
    return torch.where(wavelen < high_freq_wavelen, freqs, scaled)


def precompute_freqs_cis(head_dim: int, end: int, theta: float = 500000.0,
                         use_scaled: bool = False, **scaling) -> torch.Tensor:
    """Unit complex numbers e^(i * position * freq): (end, head_dim // 2), complex64.

    `scaling` takes apply_scaling's keyword arguments when `use_scaled` is True."""
    freqs = rope_frequencies(head_dim, theta)
    if use_scaled:
        freqs = apply_scaling(freqs, **scaling)
    angles = torch.outer(torch.arange(end, dtype=torch.float32), freqs)  # (end, head_dim // 2)
    return torch.polar(torch.ones_like(angles), angles)


def freqs_cis_for(args) -> torch.Tensor:
    """`precompute_freqs_cis` for a `ModelArgs`, covering positions 0 .. max_seq_len - 1."""
    return precompute_freqs_cis(
        args.head_dim, args.max_seq_len, args.rope_theta, args.use_scaled_rope,
        scale_factor=args.rope_scaling_factor, low_freq_factor=args.rope_low_freq_factor,
        high_freq_factor=args.rope_high_freq_factor,
        original_max_seq_len=args.rope_original_max_seq_len)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Turn every adjacent pair (x[..., 2i], x[..., 2i + 1]) = (a, b) of the last dimension by
    the angle whose cosine and sine are given: (a, b) -> (a cos - b sin, a sin + b cos), the 2-D
    rotation of notebook 02. x: (batch, seq, heads, head_dim); cos, sin: (seq, head_dim // 2).
    [1, 0, 2, 0] with cos [0, 1] and sin [1, 0] (pair 0 a quarter turn, pair 1 none)
    -> [0, 1, 2, 0]. The sums are done in float32 and the result has x's dtype."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # (1, seq, 1, hd/2): every head
    a, b = x[..., 0::2].float(), x[..., 1::2].float()  # (batch, seq, heads, head_dim // 2)
    turned = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)  # (..., hd/2, 2)
    return turned.flatten(-2).type_as(x)  # the pairs adjacent again: (..., head_dim)


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor):
    """Queries (batch, seq, n_heads, head_dim) and keys (batch, seq, n_kv_heads, head_dim)
    turned by their positions' angles; freqs_cis: (seq, head_dim // 2), from
    precompute_freqs_cis.

    Why complex numbers: read a pair (a, b) as the complex number a + ib. Multiplying it by
    e^(i angle) = cos + i sin gives (a cos - b sin) + i (a sin + b cos): the same rotation. So
    a table of e^(i * position * freq) is a table of cosines (its real parts) and sines (its
    imaginary parts), and Meta's reference rotates by one complex product per pair. Here the
    table is read as cosines and sines and the rotation is done as the real arithmetic above;
    tests/test_parity.py checks it equals transformers' rotation (after Hugging Face's
    permutation of wq and wk)."""
    cos, sin = freqs_cis.real, freqs_cis.imag
    return rotate_pairs(xq, cos, sin), rotate_pairs(xk, cos, sin)
