"""The chapter 02 and 03 checkers accept a right answer written independently of the package
and reject plausible wrong ones, naming the failing case, the first index that differs, a
small case where the error shows, and the mistake."""
import math

import pytest
import torch

from llama3_mini.exercises import (
    check_gqa_attention,
    check_mean_pool_kv,
    check_rope_rotate,
    check_rope_scores,
)


# ---------------------------------------------------------------------- chapter 02: RoPE
def rope_by_hand(x, position, theta, layout="adjacent", exponent=2, sign=1):
    head_dim, out = x.shape[0], x.clone()
    for i in range(head_dim // 2):
        angle = sign * position * theta ** (-exponent * i / head_dim)
        a, b = (2 * i, 2 * i + 1) if layout == "adjacent" else (i, i + head_dim // 2)
        c, s = math.cos(angle), math.sin(angle)
        out[a], out[b] = x[a] * c - x[b] * s, x[a] * s + x[b] * c
    return out


def test_rope_checker_accepts_a_right_answer(capsys):
    assert check_rope_rotate(rope_by_hand)
    assert "✓ rope_rotate: right on all" in capsys.readouterr().out


def test_rope_checker_rejects_the_half_split_layout(capsys):
    assert not check_rope_rotate(lambda x, p, t: rope_by_hand(x, p, t, layout="half"))
    assert "✗ rope_rotate(tensor([1.0, 0.0, 0.0, 1.0]), 3, 100.0)" in capsys.readouterr().out


def test_rope_checker_rejects_a_wrong_frequency(capsys):
    assert not check_rope_rotate(lambda x, p, t: rope_by_hand(x, p, t, exponent=1))
    assert "✗ rope_rotate(tensor([1.0, 0.0, 0.0, 1.0]), 3, 100.0)" in capsys.readouterr().out


def test_rope_checker_rejects_the_wrong_direction(capsys):
    assert not check_rope_rotate(lambda x, p, t: rope_by_hand(x, p, t, sign=-1))
    out = capsys.readouterr().out
    assert "✗ rope_rotate(tensor([1.0, 0.0]), 1, 10000.0)" in out
    assert "expected tensor([0.540" in out


# ----------------------------------------------------------------------- chapter 03: GQA
def gqa_by_hand(q, k, v, order="grouped", causal=True, scale=True):
    n_rep = q.shape[1] // k.shape[1]
    if order == "grouped":  # query head h uses KV head h // n_rep
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    else:  # tiled: query head h uses KV head h % n_kv_heads, a plausible mistake
        k, v = k.repeat(1, n_rep, 1, 1), v.repeat(1, n_rep, 1, 1)
    scores = q @ k.transpose(-2, -1) / (math.sqrt(q.shape[-1]) if scale else 1.0)
    if causal:
        seq = q.shape[2]
        scores = scores.masked_fill(torch.ones(seq, seq).triu(1).bool(), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def test_gqa_checker_accepts_a_right_answer(capsys):
    assert check_gqa_attention(gqa_by_hand)
    assert "✓ gqa_attention: right on all 6 cases" in capsys.readouterr().out


def test_gqa_checker_rejects_tiled_heads(capsys):
    assert not check_gqa_attention(lambda q, k, v: gqa_by_hand(q, k, v, order="tiled"))
    assert "✗ gqa_attention(tensor(shape=(2, 4, 5, 8)" in capsys.readouterr().out


def test_gqa_checker_rejects_a_missing_mask(capsys):
    assert not check_gqa_attention(lambda q, k, v: gqa_by_hand(q, k, v, causal=False))
    assert "✗ gqa_attention(tensor(shape=(1, 2, 3, 4)" in capsys.readouterr().out


def test_gqa_checker_rejects_a_missing_scale(capsys):
    assert not check_gqa_attention(lambda q, k, v: gqa_by_hand(q, k, v, scale=False))
    assert "✗ gqa_attention(tensor(shape=(1, 2, 3, 4)" in capsys.readouterr().out


def test_gqa_checker_names_tiling_at_its_first_differing_index_with_a_small_case(capsys):
    """Tiled and grouped heads agree on query head 0, so the first 8 values printed are equal:
    the checker must point at the head where they part, and show a case small enough to read."""
    assert not check_gqa_attention(lambda q, k, v: gqa_by_hand(q, k, v, order="tiled"))
    out = capsys.readouterr().out
    assert "first difference at [0, 1, 0, 0]" in out  # batch 0, query head 1, position 0
    assert "→ this tiles the KV heads with `repeat`" in out
    # KV head g holds 10g + position: tiled, head 1 reads KV head 1 (10, ...), grouped KV head 0
    assert "yours    [[0.0, 0.88], [10.0, 10.88], [0.0, 0.88], [10.0, 10.88]]" in out
    assert "expected [[0.0, 0.88], [0.0, 0.88], [10.0, 10.88], [10.0, 10.88]]" in out


def test_gqa_checker_names_a_missing_mask_and_a_missing_scale(capsys):
    assert not check_gqa_attention(lambda q, k, v: gqa_by_hand(q, k, v, causal=False))
    out = capsys.readouterr().out
    assert "→ this has no causal mask" in out
    assert "yours    [[0.88, 0.88]," in out  # position 0 read position 1's value
    assert not check_gqa_attention(lambda q, k, v: gqa_by_hand(q, k, v, scale=False))
    out = capsys.readouterr().out
    assert "→ this leaves out the 1 / sqrt(head_dim)" in out
    assert "yours    [[0.0, 0.98]," in out  # softmax([0, 4]) instead of softmax([0, 2])


# ------------------------------------------- chapter 02: the score at an offset, from RoPE
def scores_by_hand(q, k, max_offset, theta, turn="q", layout="adjacent", exponent=2):
    """Complex numbers, as in Meta's reference: pair (a, b) is a + ib, turned by e^(i d w)."""
    head_dim = q.shape[0]

    def pairs(x):
        if layout == "adjacent":
            return torch.complex(x[0::2].double(), x[1::2].double())
        return torch.complex(x[: head_dim // 2].double(), x[head_dim // 2:].double())
    omega = theta ** (-exponent * torch.arange(head_dim // 2, dtype=torch.float64) / head_dim)
    out = []
    for d in range(max_offset + 1):
        turn_by = torch.polar(torch.ones_like(omega), d * omega)
        zq = pairs(q) * turn_by if turn in ("q", "both") else pairs(q)
        zk = pairs(k) * turn_by if turn in ("k", "both") else pairs(k)
        out.append((zq * zk.conj()).real.sum())  # Re(zq conj(zk)) = the real dot product
    return torch.stack(out)


def test_rope_scores_checker_accepts_a_right_answer(capsys):
    assert check_rope_scores(scores_by_hand)
    assert "✓ rope_scores: right on all 8 cases" in capsys.readouterr().out


@pytest.mark.parametrize("mistake, named", [
    ({"turn": "k"}, "→ this turns the key forward instead of the query"),
    ({"turn": "both"}, "→ this turns q and k by the same angle"),
    ({"layout": "half"}, "→ this pairs dimension i with i + head_dim/2"),
    ({"exponent": 1}, "→ this uses the frequency theta ** (-i / head_dim)"),
])
def test_rope_scores_checker_names_each_mistake(capsys, mistake, named):
    assert not check_rope_scores(lambda q, k, n, t: scores_by_hand(q, k, n, t, **mistake))
    out = capsys.readouterr().out
    assert named in out and "first difference at [" in out
    # the small case: pair i adds sin(d * omega_i), with omega 1 and 0.1 at theta 100
    # (shown as the failing input, or beside another failing input)
    assert all(str(round(math.sin(d) + math.sin(0.1 * d), 4)) in out for d in range(1, 4))


def test_rope_rotate_checker_names_its_mistakes(capsys):
    assert not check_rope_rotate(lambda x, p, t: rope_by_hand(x, p, t, layout="half"))
    assert "→ this pairs dimension i with i + head_dim/2" in capsys.readouterr().out
    assert not check_rope_rotate(lambda x, p, t: rope_by_hand(x, p, t, sign=-1))
    assert "→ this turns the wrong way" in capsys.readouterr().out
    assert not check_rope_rotate(lambda x, p, t: rope_by_hand(x, p, t, exponent=1))
    assert "→ this uses the frequency theta ** (-i / head_dim)" in capsys.readouterr().out


# ------------------------------------------- chapter 03's exercise: MHA mean-pooled to GQA
def pool_by_hand(w, n_heads, n_kv_heads, how="grouped"):
    """Written out head by head, independently of the package's reshapes."""
    head_dim, n_rep = w.shape[0] // n_heads, n_heads // n_kv_heads
    head = [w[h * head_dim:(h + 1) * head_dim] for h in range(n_heads)]
    out = []
    for g in range(n_kv_heads):
        if how == "tiled":  # a plausible mistake: heads g, g + n_kv_heads, ...
            members = [head[g + i * n_kv_heads] for i in range(n_rep)]
        else:
            members = head[g * n_rep:(g + 1) * n_rep]
        if how == "first":
            out.append(members[0])
        elif how == "sum":
            out.append(sum(members))
        else:
            out.append(sum(members) / n_rep)
    if how == "rows":  # neighbouring rows averaged: n_rep rows at a time
        return torch.stack([w[i:i + n_rep].mean(0) for i in range(0, w.shape[0], n_rep)])
    return torch.cat(out)


def test_mean_pool_checker_accepts_a_right_answer(capsys):
    assert check_mean_pool_kv(pool_by_hand)
    assert "✓ mean_pool_kv: right on all 8 cases" in capsys.readouterr().out


@pytest.mark.parametrize("how, why, yours", [
    ("tiled", "→ this pools heads g, g + n_kv_heads", "[10.0, 11.0, 20.0, 21.0]"),
    ("rows", "→ this averages neighbouring rows, not whole heads", "[0.5, 10.5, 20.5, 30.5]"),
    ("sum", "→ this sums the group", "[10.0, 12.0, 50.0, 52.0]"),
    ("first", "→ this keeps the first head of each group", "[0.0, 1.0, 20.0, 21.0]")])
def test_mean_pool_checker_names_each_mistake_with_a_small_case(capsys, how, why, yours):
    assert not check_mean_pool_kv(lambda w, n, k: pool_by_hand(w, n, k, how))
    out = capsys.readouterr().out
    assert why in out
    assert f"yours    {yours}" in out and "expected [5.0, 6.0, 25.0, 26.0]" in out
