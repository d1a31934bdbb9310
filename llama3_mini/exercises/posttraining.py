"""Checkers for chapter 07c, post-training: the DPO loss with Meta's formatting mask. A wrong
answer is compared with the usual mistakes too, and the one it matches is named."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .checking import run_checks, same


def _dpo_cases():
    """(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_mask, rejected_mask,
    beta): per-token log-probs (batch, seq), masks True on the reply tokens that count (the
    prompt and the formatting tokens False)."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for batch, seq, beta in ((1, 6, 0.1), (3, 8, 0.1), (2, 5, 0.5), (4, 10, 1.0), (2, 7, 2.0)):
        logps = [-torch.rand(batch, seq, generator=g) * 4 for _ in range(4)]
        masks = []
        for _ in range(2):
            mask = torch.zeros(batch, seq, dtype=torch.bool)
            for b in range(batch):
                start = int(torch.randint(1, seq - 2, (), generator=g))  # the prompt before it
                mask[b, start: seq - 1] = True  # the last position: <|eot_id|>, masked
            masks.append(mask)
        cases.append((*logps, *masks, beta))
    return cases


def _dpo(pc, pr, rc, rr, mc, mr, beta, sign=1.0, ref=True, pick=lambda m: m, reduce="sum"):
    def total(logps, mask):
        kept = logps * pick(mask)
        return kept.sum(-1) if reduce == "sum" else kept.sum(-1) / pick(mask).sum(-1)

    ratio_c = total(pc, mc) - (total(rc, mc) if ref else 0)
    ratio_r = total(pr, mr) - (total(rr, mr) if ref else 0)
    return -F.logsigmoid(sign * beta * (ratio_c - ratio_r)).mean()


def _per_pair(pc, pr, rc, rr, mc, mr, beta):
    from ..preference import dpo_loss

    return dpo_loss((pc * mc).sum(-1), (pr * mr).sum(-1), (rc * mc).sum(-1), (rr * mr).sum(-1),
                    beta)[0]


def _reference(*case):
    return _per_pair(*case).mean()


MISTAKES = [
    ("the sign: the loss must fall as the chosen response gains, -log sigmoid(+beta * "
     "(chosen log-ratio - rejected log-ratio)); yours rewards the rejected one",
     lambda *c: _dpo(*c, sign=-1.0)),
    ("no reference model: each response's reward is beta * (log pi - log ref), the policy's "
     "log-prob minus the frozen reference's; yours leaves the reference out",
     lambda *c: _dpo(*c, ref=False)),
    ("the mask applied to the prompt: True marks the reply tokens to keep; yours sums the "
     "prompt and the formatting tokens instead", lambda *c: _dpo(*c, pick=lambda m: ~m)),
    ("no mask: sum the log-probs only where the mask is True (the reply, formatting tokens "
     "out); yours sums every position, prompt included",
     lambda *c: _dpo(*c, pick=torch.ones_like)),
    ("averaged log-probs: a response's log-prob is the sum over its tokens, not the mean",
     lambda *c: _dpo(*c, reduce="mean")),
    ("beta forgotten: the log-ratios are scaled by beta before the sigmoid",
     lambda *c: _dpo(*c[:6], 1.0)),
    ("one loss per pair: return their mean, a single number",
     lambda pc, pr, rc, rr, mc, mr, beta: _per_pair(pc, pr, rc, rr, mc, mr, beta)),
]


def _same_number(got, expected) -> bool:
    if isinstance(expected, torch.Tensor) and expected.numel() > 1:  # a wrong answer's shape
        return same(got, expected)
    try:
        return same(float(got), float(expected), atol=1e-5)
    except (TypeError, ValueError, RuntimeError):  # not one number: a tensor of several
        return False


def check_dpo_loss(fn) -> bool:
    """fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_mask,
    rejected_mask, beta) -> the mean DPO loss over the pairs, each response's log-prob the sum
    of its per-token log-probs where its mask is True (preference.dpo_loss). On a wrong
    answer, names the mistake it matches: the sign, a missing reference, the mask."""
    return run_checks("dpo_loss", fn, _reference, _dpo_cases(), compare=_same_number,
                      mistakes=MISTAKES)
