"""What every checker shares: run a learner's function against the package's reference on
many cases and report the first difference. Each checker runs a learner's function against the
package's reference on many cases, edge cases included, and says in a few lines either
that it is right or which input gave which wrong output and what was expected, then what the
difference is (for a tensor, the first index that differs and a small case built by hand) and,
when the answer is one of the likely wrong ones the checker knows, which mistake it is.

A wrong answer never shows a traceback into the package: the checker returns False, and the
check cell's `assert` stops the notebook at that cell. An exception raised by the learner's own
code is left to propagate, so its traceback points at their line (with a hint first, when the
checker knows the mistake that raises it)."""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Sequence

import torch


def _rounded(t: torch.Tensor):
    """t's values as nested lists, floats to 4 decimals: tensor([0.54030231]) -> [0.5403]."""
    values = t.detach().tolist()

    def walk(v):
        return [walk(x) for x in v] if isinstance(v, list) else \
            round(v, 4) if isinstance(v, float) else v
    return walk(values)


def _short(value: Any, limit: int = 160) -> str:
    if isinstance(value, torch.Tensor):
        text = f"tensor(shape={tuple(value.shape)}, {_rounded(value.flatten()[:8])}...)" \
            if value.numel() > 8 else f"tensor({_rounded(value)})"
    elif isinstance(value, torch.nn.Module):  # a model prints as its name and size
        text = f"<{type(value).__name__}, {sum(p.numel() for p in value.parameters()):,} weights>"
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


def first_difference(got: Any, expected: torch.Tensor, atol: float = 1e-5) -> str:
    """Where two tensors first differ, as one line.

    tensor([1., 2., 3.]) against tensor([1., 2., 4.]) -> 'first difference at [2]: 3.0
    instead of 4.0'"""
    if not isinstance(got, torch.Tensor):
        return f"a {type(got).__name__} instead of a tensor"
    if got.shape != expected.shape:
        return f"shape {tuple(got.shape)} instead of {tuple(expected.shape)}"
    g, e = got.detach().double(), expected.detach().double()
    far = ~torch.isclose(g, e, atol=atol, rtol=1e-5)
    if not far.any():
        return "every value within tolerance"
    index = [int(i) for i in far.nonzero()[0]]
    return (f"first difference at {index}: {g[tuple(index)].item():.4g} instead of "
            f"{e[tuple(index)].item():.4g} ({int(far.sum())} of {far.numel()} values differ)")


def run_checks(name: str, fn: Callable, reference: Callable, cases: Iterable[tuple],
               compare: Callable[[Any, Any], bool] = same, quiet: bool = False,
               mistakes: Sequence[tuple[str, Callable]] = (), explain: Callable | None = None,
               example: tuple | None = None, on_error: Callable | None = None) -> bool:
    """Call fn(*case) and reference(*case) for each case; report the first difference.

    mistakes: (why, wrong) pairs, the likely wrong answers: when the learner's answer on the
    failing case equals wrong(*case), the line "→ why" names the mistake (the first that
    matches). explain(got, expected, case) -> extra lines (tokens decoded, fields compared);
    tensors get their first differing index. example: (text, case, view), a small case built
    by hand where the error is visible: both answers are printed through view. on_error(case,
    exception) -> a hint printed before the learner's own exception propagates, or None.

    Returns True when every case matches, so a notebook can `assert check_x(my_x)`."""
    cases = list(cases)
    for case in cases:
        expected = reference(*copy.deepcopy(case))
        try:
            got = fn(*copy.deepcopy(case))  # the learner's exception propagates, on their line
        except Exception as error:
            hint = on_error(case, error) if on_error else None
            if hint:
                print(f"✗ {name}: your function raised {type(error).__name__}\n  → {hint}")
            raise
        if compare(got, expected):
            continue
        args = ", ".join(_short(a, 80) for a in case)
        print(f"✗ {name}({args})\n  returned {_short(got)}\n  expected {_short(expected)}")
        lines = explain(got, expected, case) if explain else []
        if isinstance(expected, torch.Tensor):
            lines = [first_difference(got, expected)] + list(lines)
            if example is not None and example[1] is not case:  # not when it failed there
                text, small, view = example
                try:
                    mine = view(fn(*copy.deepcopy(small)))
                except Exception as error:  # the small case is a hint: never a crash here
                    mine = f"raised {type(error).__name__}: {error}"
                right = view(reference(*copy.deepcopy(small)))
                lines += [f"on a small case ({text}):", f"  yours    {mine}",
                          f"  expected {right}"]
        for line in lines:
            print(f"  {line}")
        why = _which_mistake(fn, [case] + [c for c in cases if c is not case], got, compare,
                             mistakes)
        if why:
            print(f"  → {why}")
        return False
    if not quiet:
        print(f"✓ {name}: right on all {len(cases)} cases")
    return True


def _which_mistake(fn, cases, got, compare, mistakes) -> str | None:
    """The mistake whose answers equal the learner's on the failing case (cases[0], whose
    answer is `got`) and on the most other cases (the first listed, on a tie); None when no
    mistake gives the failing case's answer."""
    answers = {0: got}

    def answer(i):
        if i not in answers:
            try:
                answers[i] = fn(*copy.deepcopy(cases[i]))
            except Exception:  # the learner's function failing elsewhere: no match there
                answers[i] = _FAILED
        return answers[i]

    def agrees(wrong, i):
        try:
            return answer(i) is not _FAILED and compare(answer(i), wrong(*copy.deepcopy(cases[i])))
        except Exception:  # a mistake that cannot run on this case is not the one
            return False
    best, best_count = None, 0
    for why, wrong in mistakes:
        if agrees(wrong, 0):
            count = sum(agrees(wrong, i) for i in range(len(cases)))
            if count > best_count:
                best, best_count = why, count
    return best


_FAILED = object()


def story_tokenizer():
    """The course's story tokenizer (960 ranks), for checkers whose cases need a tokenizer:
    it ships with the package, so no checker trains one."""
    from ..checkpoint import ASSETS
    from ..tokenizer import Tokenizer

    return Tokenizer.load(ASSETS / "story-model" / "tokenizer.tiktoken")
