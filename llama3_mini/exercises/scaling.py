"""Checker for chapter 06c, scaling laws: the compute-optimal model for a budget from fitted
constants. A wrong answer is compared with the usual mistakes, and the one it matches is named."""
from __future__ import annotations

import math

from .checking import run_checks, same


def _cases():
    """(flops, a_params, alpha_params): our sweep's range, Chinchilla's exponent and
    Llama 3's budget, with exponents away from 0.5 so that swapping tokens and parameters
    shows."""
    return [(3e12, 0.05, 0.55), (1e10, 0.4, 0.45), (6e20, 0.1, 0.5), (3.8e25, 0.08, 0.52),
            (1e14, 0.02, 0.6), (5e11, 1.0, 0.4)]


def _compute_optimal(flops, a, alpha, tokens_per=6, swap=False, base=False):
    """The answer written out, with the switches for the likely mistakes. (Reading the law as
    tokens, D = a C^alpha and N = C / 6D, gives the swapped pair exactly.)"""
    n = a * 10 ** (alpha * math.log(flops)) if base else a * flops ** alpha
    d = flops / (tokens_per * n)
    return (d, n) if swap else (n, d)


def _close(got, expected) -> bool:
    try:
        n, d = (float(v) for v in got)
    except (TypeError, ValueError):
        return False
    return all(same(g / e, 1.0, atol=1e-6) for g, e in zip((n, d), expected, strict=True))


def check_compute_optimal(fn) -> bool:
    """fn(flops, a_params, alpha_params) -> (parameters, training tokens) of the
    compute-optimal model: N = a_params * flops ** alpha_params, and the tokens that spend
    the budget on it, C = 6 N D (scaling.compute_optimal)."""
    from ..scaling import compute_optimal

    return run_checks("compute_optimal", fn, compute_optimal, _cases(), compare=_close,
                      mistakes=[
        ("this counts 2 FLOPs per parameter per token (the forward pass only): training adds "
         "the backward pass, twice the forward, so C = 6 N D",
         lambda c, a, al: _compute_optimal(c, a, al, tokens_per=2)),
        ("this swaps tokens and parameters: the answer is (parameters, tokens), and these "
         "constants give parameters (Llama 3's N*(C) counts tokens); the tokens follow from "
         "C = 6 N D", lambda c, a, al: _compute_optimal(c, a, al, swap=True)),
        ("this mixes log bases: 10 ** (alpha * ln C) is not C ** alpha; undo a natural log "
         "with exp, a log10 with 10 **",
         lambda c, a, al: _compute_optimal(c, a, al, base=True))])
