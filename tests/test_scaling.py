"""scaling.py: FLOP counts against torch's FlopCounterMode, fits that recover the constants of
known laws (Chinchilla's closed form for the optimum among them), the shape picker, errors."""
import math

import numpy as np
import pytest
import torch

from llama3_mini.config import num_params, param_counts
from llama3_mini.model import Transformer
from llama3_mini.scaling import (
    DIMS,
    ScalingLaw,
    family_shape,
    fit_law,
    fit_loss,
    fit_parabola,
    fit_power_law,
    flops_6nd,
    flops_per_token,
    measure_speed,
    non_embedding_params,
    plan_for_minutes,
    shape_for_budget,
    shape_for_minutes,
    shape_for_params,
    step_flops,
)


@pytest.mark.parametrize("dim,vocab,seq", [(16, 1216, 32), (64, 1216, 32), (96, 300, 16)])
def test_flops_per_token_equals_flop_counter(dim, vocab, seq):
    """Our count of a training step equals what torch's FlopCounterMode counts when it runs
    (explicit attention: torch's CPU flash kernel is not in FlopCounterMode's table)."""
    args = family_shape(dim, vocab)
    torch.manual_seed(0)
    model = Transformer(args).set_fast_attention(False)
    batch = torch.randint(0, vocab, (3, seq + 1))
    counted = step_flops(model, batch[:, :-1], batch[:, 1:])
    assert counted == pytest.approx(flops_per_token(args, seq) * 3 * seq, rel=1e-9)


@pytest.mark.slow
def test_6nd_misses_most_at_small_sizes_and_little_at_large():
    """6ND (non-embedding N) against FlopCounterMode: about half of a dim-64 model's step
    with a 1,216-token vocabulary (the output layer and attention it leaves out), within 1% for
    a wide, deep model with a small vocabulary and short context, where 6N is the work."""
    ratios = {}
    for dim, vocab, seq in ((64, 1216, 32), (512, 64, 8)):
        args = family_shape(dim, vocab)
        torch.manual_seed(0)
        model = Transformer(args).set_fast_attention(False)
        batch = torch.randint(0, vocab, (1, seq + 1))
        ratios[dim] = flops_6nd(non_embedding_params(args), seq) / step_flops(
            model, batch[:, :-1], batch[:, 1:])
    assert 0.4 < ratios[64] < 0.65
    assert ratios[512] == pytest.approx(1.0, abs=0.01)


def test_non_embedding_params_is_the_body():
    args = family_shape(64, 1216)
    model = Transformer(args)
    body = sum(p.numel() for n, p in model.named_parameters()
               if not n.startswith(("tok_embeddings", "output.")))
    assert non_embedding_params(args) == body
    assert num_params(args) == body + 2 * param_counts(args)["tok_embeddings"]


def test_fit_power_law_recovers_llama3_constants_from_noisy_points():
    rng = np.random.default_rng(0)
    c = np.geomspace(6e18, 1e22, 8)  # section 3.2.1's budget range
    tokens = 0.29 * c ** 0.53 * np.exp(rng.normal(0, 0.02, len(c)))
    a, alpha = fit_power_law(c, tokens)
    assert alpha == pytest.approx(0.53, abs=0.01)
    assert math.log(a) == pytest.approx(math.log(0.29), abs=0.5)  # A rides on alpha's error


def test_fit_parabola_finds_the_minimum_of_noisy_points():
    rng = np.random.default_rng(1)
    n = np.geomspace(1e4, 1e6, 7)
    loss = 1.0 + 0.3 * (np.log10(n) - 5.2) ** 2 + rng.normal(0, 0.003, len(n))
    n_opt, l_opt, coef = fit_parabola(n, loss)
    assert math.log10(n_opt) == pytest.approx(5.2, abs=0.03)
    assert l_opt == pytest.approx(1.0, abs=0.01)
    assert coef[0] == pytest.approx(0.3, rel=0.05)


@pytest.mark.parametrize("floor", [0.17, 1.69])
def test_fit_loss_with_the_floor_fixed_and_guessed(floor):
    rng = np.random.default_rng(2)
    c = np.geomspace(1e10, 1e12, 6)
    loss = floor + 40.0 * c ** -0.15 * np.exp(rng.normal(0, 0.002, len(c)))
    e, b, beta = fit_loss(c, loss, floor=floor)
    assert (e, beta) == (floor, pytest.approx(0.15, abs=0.01))
    assert b == pytest.approx(40.0, rel=0.3)
    e_guess, _, beta_guess = fit_loss(c, loss)
    assert e_guess == pytest.approx(floor, abs=0.25)  # a guess, not a measurement
    assert e_guess < loss.min()


def test_fit_law_recovers_chinchillas_closed_form_optimum():
    """Rows from Chinchilla's loss L = E + A/N^a + B/D^b at D = C / 6N: the fitted exponent of
    N*(C) is b / (a + b) and N* = G (C/6)^(b/(a+b)), G = (aA / bB)^(1/(a+b)) (Hoffmann et al.
    2022, equation 4), here with their fitted constants."""
    e, big_a, big_b, a, b = 1.69, 406.4, 410.7, 0.34, 0.28
    rows = []
    for c in np.geomspace(1e18, 1e21, 4):
        n_center = (a * big_a / (b * big_b)) ** (1 / (a + b)) * (c / 6) ** (b / (a + b))
        for n in n_center * np.geomspace(0.25, 4, 9):
            d = c / (6 * n)
            rows.append({"budget": c, "params": n, "tokens": d,
                         "val_bpb": e + big_a / n ** a + big_b / d ** b})
    law, optima = fit_law(rows, floor=e)
    assert law.alpha_params == pytest.approx(b / (a + b), abs=0.005)
    assert law.alpha_tokens == pytest.approx(a / (a + b), abs=0.005)
    g = (a * big_a / (b * big_b)) ** (1 / (a + b))
    assert law.params_for(1e20) == pytest.approx(g * (1e20 / 6) ** (b / (a + b)), rel=0.03)
    assert len(optima) == 4


def test_shape_for_params_and_budget_are_monotone():
    sizes = [non_embedding_params(shape_for_params(n, 1216)) for n in np.geomspace(3e3, 3e6, 30)]
    assert sizes == sorted(sizes)
    law = ScalingLaw(0.05, 0.5, 3.0, 0.5, 0.17, 30.0, 0.15)
    picks = [shape_for_budget(c, law) for c in np.geomspace(1e10, 1e14, 12)]
    assert [non_embedding_params(a) for a, _ in picks] == sorted(
        non_embedding_params(a) for a, _ in picks)
    args, tokens = picks[-1]
    assert tokens * flops_per_token(args, law.seq_len) == pytest.approx(1e14, rel=1e-6)
    assert shape_for_params(98_624, 1216).dim == 64


def test_plan_for_minutes_uses_the_chosen_shapes_speed():
    law = ScalingLaw(0.05, 0.5, 3.0, 0.5, 0.17, 30.0, 0.15)
    seen = []

    def speed(args):  # a fake machine: wider models run faster, as on a CPU
        seen.append(args.dim)
        return 1e8 * args.dim

    plans = [plan_for_minutes(m, law, speed, 1216) for m in (1, 2, 5, 20)]
    assert [p["params"] for p in plans] == sorted(p["params"] for p in plans)
    last = plans[-1]
    assert last["flops"] == pytest.approx(20 * 60 * 1e8 * seen[-1])
    assert last["predicted_bpb"] == pytest.approx(law.loss_for(last["flops"]))


def test_measure_speed_counts_steps_over_the_clock():
    ticks = iter(range(0, 10_000))
    args = family_shape(16, 64)
    speed = measure_speed(args, seq_len=8, batch_size=2, seconds=3, clock=lambda: next(ticks))
    # clock: 0 at the first timed step, then 1 per check: 3 steps in 3 "seconds" (4 calls)
    assert speed == pytest.approx(3 * 2 * 8 * flops_per_token(args, 8) / 4)


def test_errors_say_what_to_do():
    with pytest.raises(ValueError, match="do not bracket the optimum"):
        fit_parabola([1e3, 1e4, 1e5], [2, 3, 2])
    with pytest.raises(ValueError, match="3 sizes or more"):
        fit_parabola([1e3, 1e4], [2, 3])
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([1, 10], [1, -1])
    with pytest.raises(ValueError, match="below every loss"):
        fit_loss([1, 10], [1.0, 0.5], floor=0.6)
    with pytest.raises(ValueError, match="not a width of the family"):
        family_shape(40, 100)
    with pytest.raises(ValueError, match="above 0"):
        shape_for_params(0, 100)
    with pytest.raises(ValueError, match="above 0"):
        plan_for_minutes(0, ScalingLaw(1, 0.5, 1, 0.5, 0, 1, 0.1), lambda a: 1e9, 100)
    assert DIMS[:3] == (8, 16, 32)


def _learner(log=np.log10, undo=lambda x: 10 ** x, half=True, measured=False, linear=False):
    """A learner's IsoFLOP optimum written independently of the package's, with switches:
    the parabola's coefficients by solving the normal equations, its vertex by hand."""
    def fn(params, losses):
        if measured:
            return min(zip(params, losses, strict=True), key=lambda p: p[1])
        x = np.asarray(params, float) if linear else log(np.asarray(params, float))
        design = np.stack([x ** 2, x, np.ones_like(x)], axis=1)
        a, b, c = np.linalg.solve(design.T @ design, design.T @ np.asarray(losses, float))
        x_opt = -b / (2 * a) if half else -b / a
        return (x_opt if linear else undo(x_opt)), a * x_opt ** 2 + b * x_opt + c
    return fn


@pytest.mark.parametrize("wrong, named", [
    (_learner(measured=True), "the measured minimum"),
    (_learner(linear=True), "a parabola in N itself"),
    (_learner(half=False), "the vertex at -b / a"),
    (_learner(undo=lambda x: x), "log10 N returned"),
    (_learner(log=np.log), "mixed log bases"),
])
def test_check_isoflop_optimum_names_the_mistake(wrong, named, capsys):
    from llama3_mini.exercises import check_isoflop_optimum

    assert not check_isoflop_optimum(wrong)
    out = capsys.readouterr().out
    assert f"→ {named}" in out, out


def test_check_isoflop_optimum_accepts_the_right_answer(capsys):
    from llama3_mini.exercises import check_isoflop_optimum

    assert check_isoflop_optimum(_learner())
    assert "right on all 6 cases" in capsys.readouterr().out
    # on three points of a known parabola, the vertex exactly: loss = (log10 N - 4)^2 + 2
    n, loss = _learner()([1e3, 1e4, 1e5], [3.0, 2.0, 3.0])
    assert n == pytest.approx(1e4) and loss == pytest.approx(2.0)


def test_shape_for_minutes_says_why_and_where_the_loss_is_not_predicted(capsys):
    law = ScalingLaw(0.05, 0.5, 3.0, 0.5, 0.17, 30.0, 0.15)
    args = shape_for_minutes(law, 2, 2304, 128, 16, "cpu", own_text=True, speed=lambda a: 2e9)
    out = capsys.readouterr().out
    assert f"picks dim {args.dim}," in out and "assumed to transfer" in out
    assert "bits per byte" not in out
    shape_for_minutes(law, 2, 1216, 64, 4, "cpu", speed=lambda a: 2e9)
    assert f"predicted {law.loss_for(2 * 60 * 2e9):.3f} bits per byte" in capsys.readouterr().out
