"""Checker for chapter 07c, post-training: Llama 3's whole DPO objective ("The Llama 3 Herd of
Models", section 4.1.4), from per-token log-probabilities and the targets: the formatting tokens
masked out of the DPO terms, and an NLL term with coefficient 0.2 on the chosen replies. A
wrong answer is compared with the usual mistakes too, and the one it matches is named."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .checking import run_checks, same

IGNORE = -100  # finetune.IGNORE: the prompt's targets


def _cases():
    """(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_targets,
    rejected_targets, first_special, beta, nll): per-token log-probs (batch, seq), nonzero on
    the prompt too (as a model gives them before any mask); targets IGNORE on the prompt, a
    reply of ordinary ids ending in one special id (<|eot_id|>, id >= first_special). Within
    a batch the chosen replies have one length, so a mean over their tokens and a mean of
    per-reply means agree."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for batch, seq, beta, nll in ((1, 6, 0.1, 0.2), (3, 9, 0.1, 0.2), (2, 7, 0.5, 0.2),
                                  (4, 10, 1.0, 0.5), (2, 8, 0.1, 1.0)):
        first_special = 50
        logps = [-torch.rand(batch, seq, generator=g) * 4 for _ in range(4)]
        chosen_len = int(torch.randint(3, seq - 1, (), generator=g))
        targets = []
        for which in ("chosen", "rejected"):
            t = torch.full((batch, seq), IGNORE, dtype=torch.long)
            for b in range(batch):
                n = chosen_len if which == "chosen" else int(
                    torch.randint(2, seq - 1, (), generator=g))
                start = seq - n - int(torch.randint(0, 2, (), generator=g))  # right padding
                t[b, start: start + n - 1] = torch.randint(0, first_special, (n - 1,),
                                                           generator=g)
                t[b, start + n - 1] = first_special + 3  # the reply's <|eot_id|>
            targets.append(t)
        cases.append((*logps, *targets, first_special, beta, nll))
    return cases


def _objective(pc, pr, rc, rr, tc, tr, first_special, beta, nll, dpo_keep="reply",
               nll_keep="reply", nll_on="chosen", nll_reduce="mean", nll_sign=1.0,
               per_pair=False):
    """The answer written out, with the switches for the likely mistakes."""
    def keep(t, which):
        reply = t != IGNORE
        return {"reply": reply & (t < first_special), "all reply": reply,
                "below special": t < first_special}[which]

    def summed(logps, t):
        return (logps * keep(t, dpo_keep)).sum(-1)

    ratio = (summed(pc, tc) - summed(rc, tc)) - (summed(pr, tr) - summed(rr, tr))
    losses = -F.logsigmoid(beta * ratio)
    nll_mask = {"reply": lambda t: t != IGNORE, "dpo": lambda t: keep(t, "reply")}[nll_keep]
    pairs = [(pc, tc)] + ([(pr, tr)] if nll_on == "both" else [])
    picked = torch.cat([logps[nll_mask(t)] for logps, t in pairs])
    nll_loss = -nll_sign * (picked.mean() if nll_reduce == "mean" else picked.sum())
    return (losses if per_pair else losses.mean()) + nll * nll_loss


def _reference(pc, pr, rc, rr, tc, tr, first_special, beta, nll):
    from ..preference import dpo_objective, mask_formatting

    keep = torch.cat([mask_formatting(tc, first_special), mask_formatting(tr, first_special)])
    loss, _ = dpo_objective(torch.cat([pc, pr]), torch.cat([rc, rr]), keep != IGNORE,
                            tc != IGNORE, beta, nll)
    return loss


MISTAKES = [
    ("the NLL term masked like the DPO terms: it trains every token of the chosen reply, "
     "<|eot_id|> included, as SFT does; that is what holds the ending where the DPO terms "
     "give the formatting tokens no gradient", lambda *c: _objective(*c, nll_keep="dpo")),
    ("formatting tokens left in the DPO terms: ids >= first_special (headers, <|eot_id|>) "
     "leave the DPO sums, as preference.mask_formatting sets them to IGNORE",
     lambda *c: _objective(*c, dpo_keep="all reply")),
    ("the prompt counted: IGNORE (-100) is below first_special too, so `targets < "
     "first_special` keeps the prompt and the padding; keep the reply's tokens, targets != "
     "IGNORE, that are not formatting tokens",
     lambda *c: _objective(*c, dpo_keep="below special")),
    ("the NLL term on the rejected replies too: Meta adds it on the chosen sequences only "
     "(training the rejected reply's tokens up would undo DPO)",
     lambda *c: _objective(*c, nll_on="both")),
    ("the NLL term summed: it is the mean negative log-probability of the chosen replies' "
     "tokens, so its size does not grow with the batch or the reply's length",
     lambda *c: _objective(*c, nll_reduce="sum")),
    ("the NLL term's sign: the negative log-likelihood is minus the mean log-prob; yours "
     "adds the log-prob, which rewards making the chosen reply less likely",
     lambda *c: _objective(*c, nll_sign=-1.0)),
    ("the NLL term forgotten, or its coefficient: loss = mean DPO loss + nll x mean NLL",
     lambda *c: _objective(*c[:8], 0.0)),
    ("one loss per pair: the DPO losses are averaged over the pairs, one number in all",
     lambda *c: _objective(*c, per_pair=True)),
]


def _same_number(got, expected) -> bool:
    try:
        return same(float(got), float(expected), atol=1e-5)
    except (TypeError, ValueError, RuntimeError):  # not one number: a tensor of several
        return False


def _same_answer(got, wrong) -> bool:  # a wrong answer may be a tensor of several numbers
    if isinstance(wrong, torch.Tensor) and wrong.numel() > 1:
        return isinstance(got, torch.Tensor) and same(got, wrong)
    return _same_number(got, wrong)


def check_llama3_dpo_loss(fn) -> bool:
    """fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_targets,
    rejected_targets, first_special, beta, nll) -> Llama 3's DPO objective, one number: the
    mean DPO loss over the pairs, each reply's log-prob summed over its tokens except the
    prompt and the formatting tokens (ids >= first_special), plus nll times the mean negative
    log-prob of all the chosen replies' tokens, formatting tokens included
    (preference.dpo_objective). On a wrong answer, names the mistake it matches."""
    return run_checks("llama3_dpo_loss", fn, _reference, _cases(), compare=_same_answer,
                      mistakes=MISTAKES)
