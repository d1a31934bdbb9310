"""The likely wrong answers TEACHING.md records for chapters 01a, 04, 05, 06a and 07a, each
written here without the package: every one is rejected with the line that names it, and the
right answer passes. (00, 01b, 02, 03, 06b, 07b, 08 and 10: the other test_exercises files.)"""
import math

import pytest
import torch
import torch.nn.functional as F

from llama3_mini.exercises import (
    check_count_pairs,
    check_fused_swiglu,
    check_loss_mask,
    check_lr_schedule,
    check_merge,
    check_top_p,
)


# ------------------------------------------------------------------ 01a: merge one pair
def merge_by_hand(ids, pair, new_id, once=False, skip=2, stop_early=False):
    out, i, merged = [], 0, False
    end = len(ids) - 1 if stop_early else len(ids)  # stop_early: loop to len(ids) - 1
    while i < end:
        if ids[i:i + 2] == list(pair) and not (once and merged):
            out.append(new_id)
            i, merged = i + skip, True
        else:
            out.append(ids[i])
            i += 1
    return out


def test_merge_accepts_a_right_answer(capsys):
    assert check_merge(merge_by_hand)
    assert "✓ merge: right on all 14 cases" in capsys.readouterr().out


@pytest.mark.parametrize("mistake, named", [
    ({"once": True}, "→ this replaces only the first occurrence"),
    ({"skip": 1}, "→ this does not step over a merged pair"),
    ({"stop_early": True}, "→ this drops the last id"),
])
def test_merge_names_each_mistake(capsys, mistake, named):
    assert not check_merge(lambda ids, pair, new: merge_by_hand(ids, pair, new, **mistake))
    assert named in capsys.readouterr().out


def test_count_pairs_names_counting_each_pair_once(capsys):
    assert not check_count_pairs(lambda ids: {p: 1 for p in zip(ids, ids[1:], strict=False)})
    assert "→ this gives every pair the count 1" in capsys.readouterr().out


# --------------------------------------------------- 04: SwiGLU from one fused projection
def fused_by_hand(x, w13, w2, gate_half=0, split="halves", act=F.silu, after=False, down=True):
    h = x @ w13.T  # (..., 2 * hidden)
    halves = list(h.chunk(2, dim=-1)) if split == "halves" else [h[..., 0::2], h[..., 1::2]]
    gate, up = halves[gate_half], halves[1 - gate_half]
    h = act(gate * up) if after else act(gate) * up
    return h @ w2.T if down else h


def test_fused_swiglu_accepts_a_right_answer(capsys):
    assert check_fused_swiglu(fused_by_hand)
    assert "✓ fused_swiglu: right on all 5 cases" in capsys.readouterr().out


@pytest.mark.parametrize("mistake, named", [
    ({"gate_half": 1}, "→ this puts SiLU on the second half"),
    ({"split": "alternate"}, "→ this takes alternate rows as gate and up"),
    ({"after": True}, "→ this applies SiLU after multiplying the halves"),
    ({"act": torch.sigmoid}, "→ this gates with sigmoid"),
    ({"down": False}, "→ this stops at the hidden size"),
])
def test_fused_swiglu_names_each_mistake_with_a_small_case(capsys, mistake, named):
    assert not check_fused_swiglu(lambda x, w13, w2: fused_by_hand(x, w13, w2, **mistake))
    out = capsys.readouterr().out
    assert named in out
    # x = [1, -1], w1 = I, w3 = 2I, w2 = I: silu(x) * 2x
    # (the first case: shown once, as the failing input, or as the small case when another fails)
    silu = [1 / (1 + math.exp(-v)) * v for v in (1.0, -1.0)]
    assert all(str(round(2 * s * v, 4)) in out for s, v in zip(silu, (1, -1), strict=True))


# ------------------------------------------------------------------ 05: the top-p filter
def top_p_by_hand(logits, p, reach=True, ordered=True, as_probs=False):
    probs = torch.softmax(logits.double(), dim=-1)
    out = torch.full_like(logits, float("-inf"))
    keep_probs = torch.zeros_like(probs)
    for row in range(logits.shape[0]) if logits.dim() == 2 else [None]:
        pr = probs[row] if row is not None else probs
        order = sorted(range(len(pr)), key=lambda i: -pr[i].item()) if ordered else range(len(pr))
        total, kept = 0.0, []
        for i in order:
            if kept and (total >= p if reach else total + pr[i].item() > p):
                break
            kept.append(i)
            total += pr[i].item()
        for i in kept:
            if row is None:
                out[i], keep_probs[i] = logits[i], pr[i]
            else:
                out[row, i], keep_probs[row, i] = logits[row, i], pr[i]
    return keep_probs.float() if as_probs else out


def test_top_p_accepts_a_right_answer(capsys):
    assert check_top_p(top_p_by_hand)
    assert "✓ top_p: right on all" in capsys.readouterr().out


@pytest.mark.parametrize("mistake, named", [
    ({"reach": False}, "→ this keeps tokens while the running sum stays <= p"),
    ({"ordered": False}, "→ this sums the probabilities in vocabulary order"),
    ({"as_probs": True}, "→ this returns probabilities"),
])
def test_top_p_names_each_mistake(capsys, mistake, named):
    assert not check_top_p(lambda logits, p: top_p_by_hand(logits, p, **mistake))
    out = capsys.readouterr().out
    assert named in out and "first difference at [" in out


# ---------------------------------------------------------- 06a: the learning-rate schedule
def lr_by_hand(step, max_lr, warmup, total, min_lr, from_zero=False, floor=True, last=None):
    if step < warmup:
        return max_lr * (step if from_zero else step + 1) / warmup
    end = (total - 1) if last is None else last
    t = min(1.0, (step - warmup) / max(1, end - warmup))
    low = min_lr if floor else 0.0
    return low + (max_lr - low) * (1 + math.cos(math.pi * t)) / 2


def test_lr_schedule_accepts_a_right_answer(capsys):
    assert check_lr_schedule(lr_by_hand)


@pytest.mark.parametrize("mistake, named", [
    ({"from_zero": True}, "→ this starts the warm-up at 0"),
    ({"floor": False}, "→ this decays to zero"),
    ({"last": "total"}, "→ this reaches min_lr one step late"),
])
def test_lr_schedule_names_each_mistake(capsys, mistake, named):
    def wrong(step, max_lr, warmup, total, min_lr):
        how = dict(mistake, last=total) if mistake.get("last") == "total" else mistake
        return lr_by_hand(step, max_lr, warmup, total, min_lr, **how)

    assert not check_lr_schedule(wrong)
    assert named in capsys.readouterr().out


# -------------------------------------------------------------- 07a: the SFT loss mask
def mask_by_hand(n_prompt, n_total, per_token=False, late=False, inverted=False):
    n = n_total if per_token else n_total - 1
    first = n_prompt if late or per_token else n_prompt - 1  # target i is token i + 1
    mask = [i >= first for i in range(n)]
    return [not m for m in mask] if inverted else mask


def test_loss_mask_accepts_a_right_answer(capsys):
    assert check_loss_mask(mask_by_hand)


@pytest.mark.parametrize("mistake, named", [
    ({"per_token": True}, "→ this has one entry per token"),
    ({"late": True}, "→ this starts one target late"),
    ({"inverted": True}, "→ this masks the reply and keeps the prompt"),
])
def test_loss_mask_names_each_mistake(capsys, mistake, named):
    assert not check_loss_mask(lambda p, n: mask_by_hand(p, n, **mistake))
    assert named in capsys.readouterr().out
