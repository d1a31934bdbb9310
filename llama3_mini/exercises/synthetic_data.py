"""Checker for chapter 10, synthetic data: one generation of model collapse written out. A
model whose names follow p writes part of the next generation's data by sampling at a
temperature; real stories make up the rest. The learner's function returns the names'
distribution in that data (`synthetic.next_name_distribution`), and a wrong answer is compared
with the likely mistakes about temperature and mixing."""
from __future__ import annotations

import torch

from .checking import run_checks, same


def _cases():
    """(p, temperature, real_share, real_p): skewed and uniform name distributions, the
    course's sampling temperature 0.8 and others, with and without real stories."""
    g = torch.Generator().manual_seed(0)
    uniform4 = torch.full((4,), 0.25, dtype=torch.float64)
    cases = [(torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64), 0.5, 0.0, None),
             (torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64), 0.8, 0.0, None),
             (uniform4, 0.8, 0.0, None),  # uniform stays uniform
             (torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64), 0.8, 0.5, uniform4),
             (torch.tensor([0.7, 0.2, 0.1, 0.0], dtype=torch.float64), 0.8, 0.25, uniform4),
             (torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64), 1.0, 0.5, uniform4)]
    for n, t, share in ((32, 0.8, 0.0), (32, 0.8, 0.5), (8, 0.6, 0.75), (31, 1.3, 0.2)):
        p = torch.softmax(torch.randn(n, generator=g, dtype=torch.float64), -1)
        real = torch.softmax(0.3 * torch.randn(n, generator=g, dtype=torch.float64), -1)
        cases.append((p, t, share, real if share else None))
    return cases


def _normal(x):
    return x / x.sum()


def _mix(sampled, share, real_p):
    return sampled if share == 0 else (1 - share) * sampled + share * real_p


def check_next_names(fn) -> bool:
    """fn(p, temperature, real_share, real_p) -> the names' distribution in the next
    generation's training data (a tensor summing to 1)."""
    from ..synthetic import next_name_distribution

    def ref(p, t, share, real_p):
        return next_name_distribution(p, t, share, real_p)

    def answer(got, expected):
        return isinstance(got, (torch.Tensor, list, tuple)) and \
            same(torch.as_tensor(got, dtype=torch.float64), expected, atol=1e-6)

    return run_checks("next_names", fn, ref, _cases(), compare=answer, mistakes=[
        ("this is p ** T: raising p to the temperature flattens where it should sharpen. "
         "Temperature divides the logits: exp(log p / T) = p ** (1 / T)",
         lambda p, t, s, r: _mix(_normal(p ** t), s, r)),
        ("this divides the probabilities by T; temperature divides the logits (log p), and "
         "p / T renormalised is p again: sampling at T < 1 would change nothing",
         lambda p, t, s, r: _mix(_normal(p / t), s, r)),
        ("p ** (1 / T) is not a distribution yet: divide by its sum before mixing",
         lambda p, t, s, r: _mix(p ** (1 / t), s, r)),
        ("this sharpens the real stories too: they come from the grammar, not from the model's "
         "sampling, so mix them in after the temperature",
         lambda p, t, s, r: _normal(_mix(p, s, r) ** (1 / t))),
        ("the weights are swapped: the model writes (1 - real_share) of the data, the real "
         "stories real_share",
         lambda p, t, s, r: _mix(_normal(p ** (1 / t)), 1 - s, r)),
        ("the real stories are left out: real_share of the data is theirs",
         lambda p, t, s, r: _normal(p ** (1 / t)))])
