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


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor):
    """Rotate queries and keys. xq: (batch, seq, n_heads, head_dim); xk: (batch, seq,
    n_kv_heads, head_dim); freqs_cis: (seq, head_dim // 2). Adjacent dimensions (2i, 2i+1)
    form the real and imaginary parts of one complex number, as in Meta's code."""
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))  # (b, s, h, hd/2)
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    rot = freqs_cis[None, :, None, :]  # (1, seq, 1, head_dim // 2): broadcast over batch, heads
    xq_out = torch.view_as_real(xq_ * rot).flatten(3)
    xk_out = torch.view_as_real(xk_ * rot).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)
