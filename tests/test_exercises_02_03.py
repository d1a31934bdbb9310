"""The chapter 02 and 03 checkers accept a right answer written independently of the package
and reject plausible wrong ones, naming the failing case."""
import math

import torch

from llama3_mini.exercises import check_gqa_attention, check_rope_rotate


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
