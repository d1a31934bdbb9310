"""What every checker shares: run a learner's function against the package's reference on
many cases and report the first difference. Each checker runs a learner's function against the
package's reference on many cases, edge cases included, and says in a line or two either
that it is right or which input gave which wrong output and what was expected.

A wrong answer never shows a traceback; an exception raised by the learner's own code is
left to propagate, so its traceback points at their line."""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterable

import torch


def _short(value: Any, limit: int = 160) -> str:
    if isinstance(value, torch.Tensor):
        text = f"tensor(shape={tuple(value.shape)}, {value.flatten()[:8].tolist()}...)" \
            if value.numel() > 8 else f"tensor({value.tolist()})"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def same(got: Any, expected: Any, atol: float = 1e-5) -> bool:
    """Equality that understands tensors (shape and values within atol) and nests."""
    if isinstance(expected, torch.Tensor):
        return (isinstance(got, torch.Tensor) and got.shape == expected.shape
                and torch.allclose(got.double(), expected.double(), atol=atol, rtol=1e-5))
    if isinstance(expected, (list, tuple)):
        return (isinstance(got, (list, tuple)) and len(got) == len(expected)
                and all(same(g, e, atol) for g, e in zip(got, expected, strict=True)))
    if isinstance(expected, float):
        return isinstance(got, (int, float)) and abs(got - expected) <= atol * max(1, abs(expected))
    return got == expected


def run_checks(name: str, fn: Callable, reference: Callable, cases: Iterable[tuple],
               compare: Callable[[Any, Any], bool] = same, quiet: bool = False) -> bool:
    """Call fn(*case) and reference(*case) for each case; report the first difference.

    Returns True when every case matches, so a notebook can `assert check_x(my_x)`."""
    cases = list(cases)
    for case in cases:
        expected = reference(*copy.deepcopy(case))
        got = fn(*copy.deepcopy(case))  # the learner's exception propagates, on their line
        if not compare(got, expected):
            args = ", ".join(_short(a, 80) for a in case)
            print(f"✗ {name}({args})\n  returned {_short(got)}\n  expected {_short(expected)}")
            return False
    if not quiet:
        print(f"✓ {name}: right on all {len(cases)} cases")
    return True


def story_tokenizer():
    """The course's story tokenizer (960 ranks), for checkers whose cases need a tokenizer:
    it ships with the package, so no checker trains one."""
    from ..checkpoint import ASSETS
    from ..tokenizer import Tokenizer

    return Tokenizer.load(ASSETS / "story-model" / "tokenizer.tiktoken")
