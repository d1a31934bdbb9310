"""Chapter 10's exercise: one generation of model collapse. The checker accepts a right answer
written independently of the package (sampling simulated by counting draws) and names each
likely mistake."""
import pytest
import torch

from llama3_mini.exercises import check_next_names
from llama3_mini.synthetic import next_name_distribution


def by_hand(p, temperature, real_share, real_p):
    weights = [float(q) ** (1 / temperature) for q in p]
    total = sum(weights)
    mixed = [(1 - real_share) * w / total for w in weights]
    if real_share:
        mixed = [m + real_share * float(r) for m, r in zip(mixed, real_p, strict=True)]
    return torch.tensor(mixed, dtype=torch.float64)


def test_the_reference_is_what_sampling_at_a_temperature_gives():
    # independent of the formula: draw names with torch.multinomial from softmax(logits / T)
    # of a model's logits, count them, and compare with the reference on p = softmax(logits)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, generator=g, dtype=torch.float64)
    draws = torch.multinomial(torch.softmax(logits / 0.8, -1), 100_000, replacement=True,
                              generator=g)
    counted = torch.bincount(draws, minlength=6).double() / 100_000
    real = torch.full((6,), 1 / 6, dtype=torch.float64)
    expected = next_name_distribution(torch.softmax(logits, -1), 0.8, 0.5, real)
    torch.testing.assert_close(0.5 * counted + 0.5 * real, expected, atol=5e-3, rtol=0)


def test_accepts_a_right_answer_and_the_packages_own(capsys):
    assert check_next_names(by_hand)
    assert check_next_names(next_name_distribution)
    assert "✓ next_names: right on all" in capsys.readouterr().out


def _sharp(p, t):
    q = p ** (1 / t)
    return q / q.sum()


MISTAKES = {
    "raising p to the temperature flattens": lambda p, t, s, r: _mix(_norm(p ** t), s, r),
    "p / T renormalised is p again": lambda p, t, s, r: _mix(_norm(p / t), s, r),
    "is not a distribution yet": lambda p, t, s, r: _mix(p ** (1 / t), s, r),
    "sharpens the real stories too": lambda p, t, s, r: _sharp(_mix(p, s, r), t),
    "the weights are swapped":
        lambda p, t, s, r: _mix(_sharp(p, t), 1 - s, r) if s else _sharp(p, t),
    "the real stories are left out": lambda p, t, s, r: _sharp(p, t),
}


def _norm(q):
    return q / q.sum()


def _mix(q, s, r):
    return q if not s else (1 - s) * q + s * r


@pytest.mark.parametrize("why", MISTAKES)
def test_names_each_likely_mistake(why, capsys):
    assert not check_next_names(MISTAKES[why])
    assert why in capsys.readouterr().out


def test_a_list_is_accepted_and_none_is_a_wrong_answer(capsys):
    assert check_next_names(lambda *case: by_hand(*case).tolist())
    assert not check_next_names(lambda *case: None)
    assert "returned None" in capsys.readouterr().out
