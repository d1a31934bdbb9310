"""Checker for chapter 06c, scaling laws: the compute-optimal size of one IsoFLOP curve, the
minimum of a parabola fitted in log N, as Llama 3's Figure 2 fits each budget ("a second
degree polynomial"). A wrong answer is compared with the usual mistakes, and the one it
matches is named."""
from __future__ import annotations

import math

import numpy as np

from .checking import run_checks, same


def _cases():
    """(params, losses) of one budget: five to seven sizes around a known optimum, the losses
    a parabola in log10 N plus a little noise, so that the measured minimum is not the
    parabola's. The last is chapter 06c's largest budget as the card records it."""
    rng = np.random.default_rng(0)
    cases = []
    for n_opt, curvature, sizes, low, high in ((3e3, 0.12, 5, 1e3, 6e4), (2e4, 0.09, 5, 4e3, 1e5),
                                                 (7e5, 0.3, 6, 1e5, 8e6), (4e7, 0.05, 7, 4e6, 2e9),
                                                 (1.5e4, 0.2, 5, 1.2e3, 9e4)):
        n = np.geomspace(low, high, sizes)
        loss = 0.3 + curvature * (np.log10(n) - math.log10(n_opt)) ** 2
        cases.append(([float(v) for v in n],
                      [float(v) for v in loss + rng.normal(0, 0.004, sizes)]))
    cases.append(([4144.0, 12384.0, 55536.0, 98624.0, 159120.0],
                  [0.314, 0.2554, 0.2858, 0.3199, 0.3219]))
    return cases


def _reference(params, losses):
    from ..scaling import fit_parabola

    n_opt, loss, _ = fit_parabola(params, losses)
    return n_opt, loss


def _wrong(params, losses, x=np.log10, back=lambda v: 10 ** v, vertex=2.0, measured=False):
    """The answer written out, with the switches for the likely mistakes."""
    if measured:
        i = int(np.argmin(losses))
        return params[i], losses[i]
    coef = np.polyfit(x(np.asarray(params, float)), np.asarray(losses, float), 2)
    x_opt = -coef[1] / (vertex * coef[0])
    return back(x_opt), float(np.polyval(coef, x_opt))


def _close(got, expected) -> bool:
    try:
        n, loss = (float(v) for v in got)
    except (TypeError, ValueError):
        return False
    return same(n / expected[0], 1.0, atol=1e-6) and same(loss, expected[1], atol=1e-6)


MISTAKES = [
    ("the measured minimum: the compute-optimal size is the parabola's minimum, which lies "
     "between the sizes tried (or beyond them), not the best model trained",
     lambda p, lo: _wrong(p, lo, measured=True)),
    ("a parabola in N itself: the curves are parabolas in log N (the sizes are spread "
     "geometrically, and Figure 2's axis is logarithmic); fit against log10 N, then undo it",
     lambda p, lo: _wrong(p, lo, x=lambda v: v, back=lambda v: v)),
    ("the vertex at -b / a: a x^2 + b x + c is lowest where its slope 2 a x + b is zero, at "
     "x = -b / (2 a)", lambda p, lo: _wrong(p, lo, vertex=1.0)),
    ("log10 N returned: the fit's x is log10 N, so the size is 10 ** x",
     lambda p, lo: _wrong(p, lo, back=lambda v: v)),
    ("mixed log bases: a fit in natural log N is undone with exp, not with 10 **",
     lambda p, lo: _wrong(p, lo, x=np.log)),
]


def check_isoflop_optimum(fn) -> bool:
    """fn(params, losses) -> (the compute-optimal number of parameters, the loss there) for
    one IsoFLOP curve: the minimum of loss = a x^2 + b x + c fitted through the points in
    x = log10 N (scaling.fit_parabola). On a wrong answer, names the mistake it matches."""
    return run_checks("isoflop_optimum", fn, _reference, _cases(), compare=_close,
                      mistakes=MISTAKES)
