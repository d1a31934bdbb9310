"""Checkers for chapters 02 to 04: the model's layers (RoPE, grouped-query attention, the
SwiGLU feed-forward). Each names the likely mistakes (TEACHING.md lists them, exercise by
exercise) by computing them here, written out with a switch per mistake."""
from __future__ import annotations

import torch

from .checking import run_checks, same

# --- Chapter 02: rotary position embeddings ------------------------------------------------

def _rope_by_hand(x, position, theta, half=False, exponent=2.0, sign=1.0):
    """x (head_dim,) turned as RoPE does at `position`, with the switches for the likely
    mistakes: pairs (i, i + d/2) instead of (2i, 2i + 1), frequency theta ** (-exponent * i /
    d), turned by sign * position."""
    d = x.shape[-1]
    i = torch.arange(d // 2, dtype=torch.float64)
    angle = sign * position * theta ** (-exponent * i / d)  # (head_dim / 2,)
    a, b = (x[..., : d // 2], x[..., d // 2:]) if half else (x[..., 0::2], x[..., 1::2])
    a, b = a.double(), b.double()
    turned = (a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos())
    if half:
        return torch.cat(turned, -1).to(x.dtype)
    return torch.stack(turned, -1).flatten(-2).to(x.dtype)  # pairs adjacent again


_ROPE_MISTAKES = [
    ("this pairs dimension i with i + head_dim/2 (Hugging Face's storage order); Meta's "
     "pairs are adjacent: (0, 1), (2, 3), ...", dict(half=True)),
    ("this uses the frequency theta ** (-i / head_dim); pair i turns at theta ** (-2i / "
     "head_dim), one frequency per pair", dict(exponent=1.0)),
]


def _rope_reference(x, position, theta):
    from ..rope import apply_rotary_emb, precompute_freqs_cis

    head_dim = x.shape[-1]
    freqs_cis = precompute_freqs_cis(head_dim, position + 1, theta)[position: position + 1]
    rotated, _ = apply_rotary_emb(x[None, None, None], x[None, None, None], freqs_cis)
    return rotated[0, 0, 0]  # (head_dim,)


def check_rope_rotate(fn) -> bool:
    """fn(x, position, theta) -> x rotated as RoPE does at `position`: x is (head_dim,), its
    adjacent pairs (x[2i], x[2i+1]) each turned by position * theta ** (-2i / head_dim)."""
    generator = torch.Generator().manual_seed(2)
    cases = [(torch.tensor([1.0, 0.0]), 1, 10000.0), (torch.tensor([1.0, 0.0, 0.0, 1.0]), 3, 100.0)]
    for head_dim, position, theta in ((8, 0, 10000.0), (8, 5, 10000.0), (16, 17, 500000.0),
                                      (64, 1000, 500000.0), (128, 4095, 500000.0)):
        cases.append((torch.randn(head_dim, generator=generator), position, theta))

    def wrong(**how):
        return lambda x, p, t: _rope_by_hand(x, p, t, **how)
    mistakes = [(why, wrong(**how)) for why, how in _ROPE_MISTAKES] + [
        ("this turns the wrong way (by -position * omega): the transposed rotation",
         wrong(sign=-1.0))]
    return run_checks("rope_rotate", fn, _rope_reference, cases,
                      compare=lambda got, exp: same(got, exp, atol=1e-3), mistakes=mistakes,
                      example=("x = [1, 0, 0, 1], position 3, theta 100", cases[1],
                               lambda t: [round(v, 4) for v in t.tolist()]))


def _scores_reference(q, k, max_offset, theta):
    """The score of q at position d with k at position 0, for d = 0..max_offset, by the
    package's RoPE: (max_offset + 1,)."""
    from ..rope import apply_rotary_emb, precompute_freqs_cis

    end, head_dim = max_offset + 1, q.shape[-1]
    freqs_cis = precompute_freqs_cis(head_dim, end, theta)  # (end, head_dim / 2)
    rq, rk = apply_rotary_emb(q.expand(1, end, 1, head_dim), k.expand(1, end, 1, head_dim),
                              freqs_cis)  # each (1, end, 1, head_dim)
    return rq[0, :, 0] @ rk[0, 0, 0]  # (end,): q moved d positions on, k left at 0


def _scores_by_hand(q, k, max_offset, theta, both=False, **how):
    """Scores at offsets 0..max_offset with q turned by d steps, with the likely mistakes."""
    rows = [_rope_by_hand(q.double(), d, theta, **how) @ (
        _rope_by_hand(k.double(), d, theta, **how) if both else k.double())
        for d in range(max_offset + 1)]
    return torch.stack(rows).float()


def check_rope_scores(fn) -> bool:
    """fn(q, k, max_offset, theta) -> (max_offset + 1,): entry d is the score (dot product)
    after RoPE of query q at any position m with key k at position m - d. q, k: (head_dim,).

    From the relative-position property, no positions are needed: turn q by d steps
    (pair i by d * theta ** (-2i / head_dim)) and take its dot product with k."""
    generator = torch.Generator().manual_seed(2)

    def unit(n):  # unit vectors: every score lies in [-1, 1]
        v = torch.randn(n, generator=generator)
        return v / v.norm()
    small = (torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 0.0, 1.0]), 3, 100.0)
    cases = [(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 2, 10000.0), small]
    for head_dim, max_offset, theta in ((8, 0, 10000.0), (8, 12, 10000.0), (16, 40, 500000.0),
                                        (64, 300, 500000.0), (128, 64, 500000.0),
                                        (32, 1000, 10000.0)):
        cases.append((unit(head_dim), unit(head_dim), max_offset, theta))

    def wrong(**how):
        return lambda q, k, n, t: _scores_by_hand(q, k, n, t, **how)
    mistakes = [
        ("this turns the key forward instead of the query: that is the score at offset -d. "
         "The key is the earlier token (position m - d), so q is turned d steps more than k",
         wrong(sign=-1.0)),
        ("this turns q and k by the same angle, so the score never changes with the offset "
         "(it stays q . k); only the difference of positions counts: turn q by d steps alone",
         wrong(both=True))]
    mistakes += [(why, wrong(**how)) for why, how in _ROPE_MISTAKES]
    return run_checks("rope_scores", fn, _scores_reference, cases,
                      compare=lambda got, exp: same(got, exp, atol=5e-4), mistakes=mistakes,
                      example=("q = [1, 0, 1, 0], k = [0, 1, 0, 1], theta 100, offsets 0 to 3: "
                               "pair i adds sin(d * omega_i)", small,
                               lambda t: [round(v, 4) for v in t.tolist()]))


# --- Chapter 03: grouped-query attention ---------------------------------------------------

def _gqa_reference(q, k, v):
    from ..model import attention, causal_mask, repeat_kv

    n_rep = q.shape[1] // k.shape[1]
    keys = repeat_kv(k.transpose(1, 2), n_rep).transpose(1, 2)  # (batch, n_heads, seq, hd)
    values = repeat_kv(v.transpose(1, 2), n_rep).transpose(1, 2)
    return attention(q, keys, values, causal_mask(q.shape[2]))[0]


def _gqa_by_hand(q, k, v, tiled=False, causal=True, scale=True):
    """Grouped-query attention written out, with the switches for the likely mistakes."""
    n_rep, seq = q.shape[1] // k.shape[1], q.shape[2]
    if tiled:  # query head h reads KV head h % n_kv_heads
        k, v = k.repeat(1, n_rep, 1, 1), v.repeat(1, n_rep, 1, 1)
    else:  # query head h reads KV head h // n_rep
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    scores = q @ k.transpose(-2, -1) / (q.shape[-1] ** 0.5 if scale else 1.0)
    if causal:
        scores = scores.masked_fill(torch.ones(seq, seq).triu(1).bool(), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v  # (batch, n_heads, seq, head_dim)


def _gqa_small_case():
    """4 query heads, 2 KV heads, 2 positions: KV head g at position j holds the value 10g + j
    and only position 1's key scores (2 after the scaling), so each output names what it read."""
    q = torch.ones(1, 4, 2, 4)
    k = torch.stack([torch.zeros(4), torch.ones(4)]).expand(1, 2, 2, 4)
    v = (10 * torch.arange(2.0)[:, None] + torch.arange(2.0)).view(1, 2, 2, 1).expand(1, 2, 2, 4)
    return q, k.clone(), v.clone()


def check_gqa_attention(fn) -> bool:
    """fn(q, k, v) -> causal grouped-query attention output (batch, n_heads, seq, head_dim).
    q: (batch, n_heads, seq, head_dim); k, v: (batch, n_kv_heads, seq, head_dim); query head
    h uses KV head h // (n_heads // n_kv_heads)."""
    generator = torch.Generator().manual_seed(3)
    cases = []
    for batch, n_heads, n_kv_heads, seq, head_dim in ((1, 1, 1, 1, 2), (1, 2, 1, 3, 4),
                                                      (2, 4, 2, 5, 8), (1, 8, 2, 7, 16),
                                                      (2, 6, 3, 4, 8), (1, 4, 4, 6, 8)):
        q = torch.randn(batch, n_heads, seq, head_dim, generator=generator)
        k = torch.randn(batch, n_kv_heads, seq, head_dim, generator=generator)
        v = torch.randn(batch, n_kv_heads, seq, head_dim, generator=generator)
        cases.append((q, k, v))

    def wrong(**how):
        return lambda q, k, v: _gqa_by_hand(q, k, v, **how)
    return run_checks("gqa_attention", fn, _gqa_reference, cases, mistakes=[
        ("this tiles the KV heads with `repeat` (query head h reads KV head h % n_kv_heads); "
         "GQA groups neighbouring query heads: `repeat_interleave` (head h reads h // n_rep)",
         wrong(tiled=True)),
        ("this has no causal mask: position i also reads the positions after it; add -inf "
         "above the diagonal before the softmax", wrong(causal=False)),
        ("this leaves out the 1 / sqrt(head_dim): the scores grow with the head size and the "
         "softmax saturates", wrong(scale=False))],
        example=("4 query heads, 2 KV heads; KV head g holds 10g at position 0 and 10g + 1 at "
                 "position 1; rows: query heads, columns: positions", _gqa_small_case(),
                 lambda t: [[round(x, 2) for x in row] for row in t[0, :, :, 0].tolist()]))


# --- Chapter 03, the exercise: an MHA checkpoint converted to GQA ---------------------------

def _pool_reference(w, n_heads, n_kv_heads):
    """KV head g of the GQA layer: the mean of the MHA heads g * n_rep ... (g + 1) * n_rep - 1,
    the query heads that will read it (the order repeat_kv copies in)."""
    head_dim, n_rep = w.shape[0] // n_heads, n_heads // n_kv_heads
    heads = w.view(n_heads, head_dim, w.shape[1])  # rows h * head_dim ... are head h
    return torch.cat([heads[g * n_rep:(g + 1) * n_rep].mean(0) for g in range(n_kv_heads)])


def _pool_by_hand(w, n_heads, n_kv_heads, how):
    head_dim, n_rep, dim = w.shape[0] // n_heads, n_heads // n_kv_heads, w.shape[1]
    if how == "tiled":  # heads g, g + n_kv_heads, ...: the order `repeat` would read
        return w.view(n_rep, n_kv_heads, head_dim, dim).mean(0).reshape(-1, dim)
    if how == "rows":  # neighbouring rows averaged, not whole heads
        return w.view(-1, n_rep, dim).mean(1)
    grouped = w.view(n_kv_heads, n_rep, head_dim, dim)
    return (grouped.sum(1) if how == "sum" else grouped[:, 0]).reshape(-1, dim)


def check_mean_pool_kv(fn) -> bool:
    """fn(w, n_heads, n_kv_heads) -> w's heads mean-pooled in groups: w (n_heads * head_dim,
    dim) is an MHA layer's wk or wv weight (head h is rows h * head_dim to (h + 1) * head_dim);
    the answer (n_kv_heads * head_dim, dim) gives KV head g the mean of heads g * n_rep to
    (g + 1) * n_rep - 1, n_rep = n_heads // n_kv_heads (Ainslie et al. 2023, section 2.1)."""
    generator = torch.Generator().manual_seed(3)
    cases = [(torch.randn(n_heads * head_dim, dim, generator=generator), n_heads, n_kv)
             for n_heads, n_kv, head_dim, dim in ((1, 1, 1, 1), (2, 1, 2, 3), (4, 2, 2, 3),
                                                  (8, 2, 4, 8), (6, 3, 2, 5), (4, 4, 2, 3),
                                                  (8, 1, 2, 4), (32, 8, 4, 6))]
    small = (torch.tensor([10.0 * h + r for h in range(4) for r in range(2)])[:, None], 4, 2)

    def wrong(how):
        return lambda w, n, k: _pool_by_hand(w, n, k, how)
    return run_checks("mean_pool_kv", fn, _pool_reference, cases, mistakes=[
        ("this pools heads g, g + n_kv_heads, g + 2 n_kv_heads, ...; a GQA group is "
         "neighbouring query heads (head h reads KV head h // n_rep, as repeat_kv copies), so "
         "pool heads g * n_rep to (g + 1) * n_rep - 1", wrong("tiled")),
        ("this averages neighbouring rows, not whole heads: head h is the head_dim rows "
         "h * head_dim to (h + 1) * head_dim - 1; view w as (n_kv_heads, n_rep, head_dim, dim)",
         wrong("rows")),
        ("this sums the group: the keys come out n_rep times too large (and the scores with "
         "them); mean-pool", wrong("sum")),
        ("this keeps the first head of each group; Ainslie et al. tried that too, and mean "
         "pooling did better (their Figure 4): average the group's heads", wrong("first"))],
        example=("4 heads of 2 rows, 2 KV heads: row r of head h holds 10h + r", small,
                 lambda t: [round(x, 2) for x in t[:, 0].tolist()]))


# --- Chapter 04: SwiGLU: the hidden size, its cost, one fused projection -------------------

_FFN_CASES = [(4096, 1024, 1.3), (8192, 4096, 1.3), (16384, 4096, 1.2), (2048, 256, 1.5),
              (3072, 256, 1.0), (256, 32, None), (100, 1, None), (96, 7, 0.9), (4096, 256, None)]


def _ffn_layer(dim, multiple_of, ffn_dim_multiplier):
    """One layer of width dim, Meta's SwiGLU rule for its hidden size."""
    from ..config import ModelArgs

    return ModelArgs(dim=dim, n_heads=1, n_layers=1, multiple_of=multiple_of,
                     ffn_dim_multiplier=ffn_dim_multiplier)


def _hidden_by_hand(dim, multiple_of, multiplier, two_thirds=True, up=True, scaled=True):
    hidden = int(2 * 4 * dim / 3) if two_thirds else 4 * dim
    hidden = int(multiplier * hidden) if multiplier is not None and scaled else hidden
    return multiple_of * (-(-hidden // multiple_of) if up else hidden // multiple_of)


_HIDDEN_MISTAKES = [
    ("this starts from 4 * dim without the 2/3 (SwiGLU's three matrices are sized to cost "
     "what two 4 * dim matrices cost)", dict(two_thirds=False)),
    ("this rounds down to a multiple of multiple_of; Meta's rule rounds up", dict(up=False)),
    ("this leaves out ffn_dim_multiplier (1.3 for Llama 3 8B); None means 1",
     dict(scaled=False))]


def check_ffn_hidden_dim(fn) -> bool:
    """fn(dim, multiple_of, ffn_dim_multiplier) -> Meta's SwiGLU hidden size."""
    return run_checks("ffn_hidden_dim", fn, lambda *c: _ffn_layer(*c).hidden_dim, _FFN_CASES,
                      mistakes=[(why, lambda *c, how=how: _hidden_by_hand(*c, **how))
                                for why, how in _HIDDEN_MISTAKES])


def ffn_params(dim: int, multiple_of: int, ffn_dim_multiplier) -> int:
    """Weights in one SwiGLU feed-forward: w1 and w3 (hidden x dim) and w2 (dim x hidden),
    no biases, with hidden from Meta's rule: (4096, 1024, 1.3) -> 3 * 4096 * 14336."""
    from ..config import param_counts

    return param_counts(_ffn_layer(dim, multiple_of, ffn_dim_multiplier))["feed_forward"]


def check_ffn_params(fn) -> bool:
    """fn(dim, multiple_of, ffn_dim_multiplier) -> the number of weights in one SwiGLU
    feed-forward (w1, w2, w3; no biases), the hidden size by Meta's rule."""
    return run_checks("ffn_params", fn, ffn_params, _FFN_CASES, mistakes=[
        ("this counts two matrices: SwiGLU has three, the gate w1 as well as w3 and w2",
         lambda d, m, f: 2 * d * _hidden_by_hand(d, m, f))] + [
        (why, lambda d, m, f, how=how: 3 * d * _hidden_by_hand(d, m, f, **how))
        for why, how in _HIDDEN_MISTAKES])


def _fused_reference(x, w13, w2):
    from ..model import FeedForward

    ffn = FeedForward(w2.shape[0], w2.shape[1])
    w1, w3 = w13.chunk(2, dim=0)  # gate rows first, then up (as torch.cat([w1, w3]))
    with torch.no_grad():
        for linear, weight in ((ffn.w1, w1), (ffn.w2, w2), (ffn.w3, w3)):
            linear.weight.copy_(weight)
        return ffn(x)


def _fused_by_hand(x, w13, w2, swap=False, alternate=False, after=False, gate="silu",
                   down=True):
    """The fused SwiGLU written out, with the switches for the likely mistakes."""
    h = x @ w13.T  # (..., 2 * hidden)
    a, b = (h[..., 0::2], h[..., 1::2]) if alternate else h.chunk(2, dim=-1)
    a, b = (b, a) if swap else (a, b)
    act = torch.sigmoid if gate == "sigmoid" else torch.nn.functional.silu
    h = act(a * b) if after else act(a) * b  # (..., hidden)
    return h @ w2.T if down else h


def check_fused_swiglu(fn) -> bool:
    """fn(x, w13, w2) -> Llama's feed-forward w2(silu(w1 x) * w3 x) from one up-projection:
    w13 is torch.cat([w1, w3]), (2 * hidden, dim); x (..., dim); w2 (dim, hidden)."""
    generator = torch.Generator().manual_seed(4)
    small = (torch.tensor([1.0, -1.0]), torch.tensor([[1.0, 0], [0, 1], [2, 0], [0, 2]]),
             torch.eye(2))  # w1 = I (the gate), w3 = 2I, w2 = I: out = silu(x) * 2x
    cases = [small]
    for shape, dim, hidden in (((3,), 3, 2), ((2, 5), 8, 12), ((2, 4, 16), 16, 48),
                               ((1, 3, 32), 32, 96)):
        cases.append((torch.randn(*shape[:-1], dim, generator=generator),
                      torch.randn(2 * hidden, dim, generator=generator) / dim ** 0.5,
                      torch.randn(dim, hidden, generator=generator) / hidden ** 0.5))

    def wrong(**how):
        return lambda x, w13, w2: _fused_by_hand(x, w13, w2, **how)
    return run_checks("fused_swiglu", fn, _fused_reference, cases, mistakes=[
        ("this puts SiLU on the second half, w3's rows; the gate w1 is the first half of w13: "
         "silu(x @ w1.T) * (x @ w3.T)", wrong(swap=True)),
        ("this takes alternate rows as gate and up; w13 is w1's rows, then w3's "
         "(torch.cat([w1, w3])): split it in two halves", wrong(alternate=True)),
        ("this applies SiLU after multiplying the halves; SwiGLU applies it to the gate "
         "alone, then multiplies", wrong(after=True)),
        ("this gates with sigmoid (the original GLU); Llama's gate is SiLU, z * sigmoid(z)",
         wrong(gate="sigmoid")),
        ("this stops at the hidden size: w2 projects back down to dim", wrong(down=False))],
        example=("x = [1, -1], w1 = I, w3 = 2I, w2 = I: the answer is silu(x) * 2x", small,
                 lambda t: [round(v, 4) for v in t.tolist()]))
