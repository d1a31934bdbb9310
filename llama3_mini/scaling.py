"""Scaling laws as Llama 3 sized its 405B ("The Llama 3 Herd of Models", section 3.2.1):
count training FLOPs, sweep model sizes at fixed compute budgets (IsoFLOP curves), fit a
parabola to each curve for its compute-optimal size, fit power laws N*(C) = A C^alpha across
budgets, and pick the shape for a budget that was never trained.

FLOPs are counted as Chinchilla (Hoffmann et al. 2022, appendix F) and Kaplan et al. (2020)
count them: C = 6 N D for N parameters and D training tokens (2 per weight forward, 4
backward). At our sizes that misses a lot, so `flops_per_token` adds what 6N leaves out: the
output layer (vocab x dim, often more than the whole body here) and attention's scores and
weighted sum (12 n_layers dim seq_len per token, which grows with the context, not with N).
`step_flops` counts a real step with torch's FlopCounterMode, the independent check.

N in the laws is the non-embedding parameter count (attention, feed-forward, norms), as
Kaplan et al. do; the budgets C are the full count, so a budget turns into seconds through
the measured speed of the machine (`measure_speed`)."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import ModelArgs, get_preset, param_counts
from .data import TokenData
from .model import Transformer
from .train import TrainConfig, Trainer

DIMS = (8, *range(16, 513, 16))  # the family's widths: 8, then multiples of 16 to 512


# --------------------------------------------------------------------------- counting FLOPs
def non_embedding_params(args: ModelArgs) -> int:
    """Parameters outside the embedding and output layers: attention, feed-forward, norms.
    dim 64, 2 layers, 4/2 heads, multiple_of 32: 2 x (12,288 + 36,864 + 128) + 64 = 98,624."""
    counts = param_counts(args)
    return counts["attention"] + counts["feed_forward"] + counts["norms"]


def flops_6nd(n_params: float, tokens: float) -> float:
    """Chinchilla's and Llama 3's count: 6 FLOPs per parameter per training token.
    flops_6nd(1e6, 2e7) -> 1.2e14."""
    return 6.0 * n_params * tokens


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token, forward and backward (3 x forward): 2 per weight of every
    matrix product (attention, feed-forward and the output layer; the input embedding is a
    lookup) and attention's two products with the whole window, 2 x 2 x dim x seq_len per
    layer, counted in full as Chinchilla does (a causal kernel could skip half).
    dim 64, 2 layers, vocab 1216, seq_len 128: 6 x (98,304 + 77,824) + 12 x 2 x 64 x 128
    = 1,253,376."""
    counts = param_counts(args)
    weights = counts["attention"] + counts["feed_forward"] + args.vocab_size * args.dim
    attention = 2 * 2 * args.dim * seq_len * args.n_layers
    return 3.0 * (2 * weights + attention)


def step_flops(model: Transformer, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """The FLOPs torch's FlopCounterMode counts for one forward and backward pass (matrix
    products and attention kernels; norms, softmax and the optimizer are not counted).
    inputs, targets: (batch, seq) token ids."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        logits = model(inputs)  # (batch, seq, vocab)
        F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


# --------------------------------------------------------------------------- the shapes
def family_shape(dim: int, vocab_size: int, max_seq_len: int = 512) -> ModelArgs:
    """The sweep's family, one knob: width `dim` (one of DIMS); heads of 16 dimensions (one
    head of 8 at width 8), half as many KV heads (GQA) where the count is even, and one layer
    per 32 of width (at least one). family_shape(64, 1216) -> dim 64, 2 layers, 4 heads, 2 KV
    heads."""
    if dim not in DIMS:
        raise ValueError(f"dim ({dim}) is not a width of the family: 8, or a multiple of 16 "
                         "from 16 to 512")
    n_heads = max(1, dim // 16)
    n_kv = n_heads // 2 if n_heads % 2 == 0 else n_heads
    return get_preset("tiny").replace(dim=dim, n_layers=max(1, round(dim / 32)),
                                      n_heads=n_heads, n_kv_heads=n_kv,
                                      vocab_size=vocab_size, max_seq_len=max_seq_len)


def shape_for_params(n_params: float, vocab_size: int, max_seq_len: int = 512) -> ModelArgs:
    """The family's shape whose non-embedding parameter count is nearest `n_params` on a log
    scale. shape_for_params(9e4, 1216) -> dim 64, 2 layers (98,624)."""
    if not n_params > 0:
        raise ValueError(f"n_params must be above 0, got {n_params}")
    return min((family_shape(d, vocab_size, max_seq_len) for d in DIMS),
               key=lambda a: abs(math.log(non_embedding_params(a) / n_params)))


# --------------------------------------------------------------------------- the fits
def fit_parabola(n_params, losses) -> tuple[float, float, np.ndarray]:
    """(N_opt, loss at N_opt, coefficients) of the parabola loss = a x^2 + b x + c in
    x = log10 N through one budget's points, as section 3.2.1 fits each IsoFLOP curve.
    fit_parabola([1e3, 1e4, 1e5], [3, 2, 3]) -> (1e4, 2.0, [1, -8, 18])."""
    x, y = np.log10(np.asarray(n_params, float)), np.asarray(losses, float)
    if len(x) < 3:
        raise ValueError(f"a parabola needs 3 sizes or more, got {len(x)}")
    a, b, c = coef = np.polyfit(x, y, 2)
    if a <= 0:
        raise ValueError("the points curve downward or not at all: the sizes do not bracket "
                         "the optimum; add smaller and larger models to this budget")
    x_opt = -b / (2 * a)
    return float(10 ** x_opt), float(np.polyval(coef, x_opt)), coef


def fit_power_law(budgets, values) -> tuple[float, float]:
    """(A, alpha) of values = A budgets^alpha, least squares on log values against log
    budgets (natural logs; the base cancels in alpha). fit_power_law([1, 100], [0.29,
    0.29 * 100 ** 0.53]) -> (0.29, 0.53)."""
    c, v = np.asarray(budgets, float), np.asarray(values, float)
    if len(c) < 2 or (c <= 0).any() or (v <= 0).any():
        raise ValueError("a power law needs 2 or more positive budgets and values")
    alpha, log_a = np.polyfit(np.log(c), np.log(v), 1)
    return float(math.exp(log_a)), float(alpha)


def _excess_fit(c, loss, floor) -> tuple[float, float, float]:
    """(B, beta, squared error) of loss = floor + B C^-beta, the excess fitted in logs."""
    b, minus_beta = fit_power_law(c, loss - floor)
    return b, -minus_beta, float(((floor + b * c ** minus_beta - loss) ** 2).sum())


def fit_loss(budgets, losses, floor: float | None = None) -> tuple[float, float, float]:
    """(floor, B, beta) of L(C) = floor + B C^-beta through the compute-optimal losses. With
    `floor` given (our corpus's exact entropy) only B and beta are fitted; without, the floor
    is guessed too, by the least squared error over floors below the lowest loss (what every
    scaling-law fit on natural text must do). From L = 1 + 2 C^-0.5 at C = 1, 4, 16, 64:
    fit_loss(C, L, floor=1) -> (1, 2, 0.5), and fit_loss(C, L) finds about the same."""
    c, loss = np.asarray(budgets, float), np.asarray(losses, float)
    if floor is not None:
        if not floor < loss.min():
            raise ValueError(f"the floor ({floor}) must be below every loss ({loss.min()})")
        return (float(floor), *_excess_fit(c, loss, floor)[:2])
    top = loss.min()
    grid = top - np.geomspace(top, top * 1e-4, 400)  # floors from 0 up to just under the lowest
    errors = [_excess_fit(c, loss, e)[2] for e in grid]
    i = int(np.argmin(errors))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    for _ in range(60):  # golden-section search between the grid's neighbours
        m1, m2 = lo + 0.382 * (hi - lo), lo + 0.618 * (hi - lo)
        if _excess_fit(c, loss, m1)[2] < _excess_fit(c, loss, m2)[2]:
            hi = m2
        else:
            lo = m1
    floor = (lo + hi) / 2
    return (float(floor), *_excess_fit(c, loss, floor)[:2])


@dataclass
class ScalingLaw:
    """The fitted law: N*(C) = a_params C^alpha_params (non-embedding parameters), D*(C) =
    a_tokens C^alpha_tokens, and the compute-optimal loss floor + b C^-beta in bits per
    byte; with the sweep's seq_len, batch_size, lr and vocab_size, whose shapes it holds for."""
    a_params: float
    alpha_params: float
    a_tokens: float
    alpha_tokens: float
    floor: float
    b: float
    beta: float
    seq_len: int = 128
    batch_size: int = 8
    lr: float = 3e-3
    vocab_size: int = 1216

    def params_for(self, flops: float) -> float:
        return self.a_params * flops ** self.alpha_params

    def tokens_for(self, flops: float) -> float:
        return self.a_tokens * flops ** self.alpha_tokens

    def loss_for(self, flops: float) -> float:
        return self.floor + self.b * flops ** -self.beta

    def to_dict(self) -> dict:
        return asdict(self)


def fit_law(rows: list[dict], floor: float | None, **sweep) -> tuple[ScalingLaw, list[dict]]:
    """The law from an IsoFLOP sweep's rows (`isoflop_sweep`'s: budget, params, val_bpb, ...):
    a parabola per budget gives N_opt and its loss, D_opt the tokens a model of N_opt trains
    on at that budget (log tokens against log N is a line within a budget), and power laws
    across budgets. Returns (law, one optimum per budget; `inside`: the optimum lies between
    the budget's smallest and largest model, not extrapolated)."""
    optima = []
    for c in sorted({r["budget"] for r in rows}):
        points = [r for r in rows if r["budget"] == c]
        n_opt, loss, coef = fit_parabola([r["params"] for r in points],
                                         [r["val_bpb"] for r in points])
        line = np.polyfit(np.log([r["params"] for r in points]),
                          np.log([r["tokens"] for r in points]), 1)
        inside = min(r["params"] for r in points) <= n_opt <= max(r["params"] for r in points)
        optima.append({"budget": c, "params": n_opt, "inside": inside,
                       "tokens": float(np.exp(np.polyval(line, math.log(n_opt)))),
                       "val_bpb": loss, "parabola": [float(v) for v in coef]})
    budgets = [o["budget"] for o in optima]
    a_n, alpha_n = fit_power_law(budgets, [o["params"] for o in optima])
    a_d, alpha_d = fit_power_law(budgets, [o["tokens"] for o in optima])
    e, b, beta = fit_loss(budgets, [o["val_bpb"] for o in optima], floor)
    return ScalingLaw(a_n, alpha_n, a_d, alpha_d, e, b, beta, **sweep), optima


def compute_optimal(flops: float, a_params: float, alpha_params: float) -> tuple[float, float]:
    """(parameters, tokens) for a budget from a fitted N*(C) = a C^alpha in parameters, the
    tokens from C = 6 N D as section 3.2.1 and Chinchilla count them.
    compute_optimal(6e20, 0.1, 0.5) -> (2.449e9, 4.08e10)."""
    if not flops > 0:
        raise ValueError(f"the budget must be above 0 FLOPs, got {flops}")
    params = a_params * flops ** alpha_params
    return params, flops / (6 * params)


def shape_for_budget(flops: float, law: ScalingLaw, vocab_size: int | None = None,
                     seq_len: int | None = None) -> tuple[ModelArgs, int]:
    """(shape, training tokens) for a compute budget: the family's shape nearest the law's
    N*(C), and the tokens that spend the budget on it, flops / flops_per_token."""
    if not flops > 0:
        raise ValueError(f"the budget must be above 0 FLOPs, got {flops}")
    seq_len = seq_len or law.seq_len
    args = shape_for_params(law.params_for(flops), vocab_size or law.vocab_size,
                            max(512, seq_len))
    return args, int(flops / flops_per_token(args, seq_len))


# --------------------------------------------------------------------------- measuring
def measure_speed(args: ModelArgs, seq_len: int, batch_size: int, seconds: float = 3.0,
                  clock=time.perf_counter, device="cpu") -> float:
    """This machine's training speed in FLOPs per second (flops_per_token's count): AdamW
    steps of random tokens on `args` for about `seconds` after one warm-up step."""
    torch.manual_seed(0)
    model = Transformer(args).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(0, args.vocab_size, (batch_size, seq_len + 1), device=device)
    steps, start = -1, None
    while start is None or clock() - start < seconds:
        if steps == 0:
            start = clock()
        logits = model(batch[:, :-1])  # (batch, seq, vocab)
        F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
    return steps * batch_size * seq_len * flops_per_token(args, seq_len) / (clock() - start)


def plan_for_minutes(minutes: float, law: ScalingLaw, speed, vocab_size: int,
                     seq_len: int | None = None) -> dict:
    """The shape for a time budget: minutes x FLOPs per second = C, the law's shape for C,
    then again with the speed of that shape (small models run fewer FLOPs per second).
    speed(args) -> FLOPs per second, `measure_speed` or a stand-in."""
    if not minutes > 0:
        raise ValueError(f"minutes must be above 0, got {minutes}")
    seq_len = seq_len or law.seq_len
    args = shape_for_params(law.params_for(1e12), vocab_size)  # a first guess to time
    for _ in range(2):
        flops_per_second = speed(args)
        flops = minutes * 60 * flops_per_second
        args, tokens = shape_for_budget(flops, law, vocab_size, seq_len)
    return {"args": args, "flops": flops, "tokens": tokens, "flops_per_second":
            flops_per_second, "params": non_embedding_params(args),
            "predicted_bpb": law.loss_for(flops)}


def load_law(path=None, floor_guessed: bool = False, missing_ok: bool = False):
    """The law `make assets` fitted on the story corpus (assets/scaling-laws/card.json), or
    the one in the card at `path`. missing_ok: None (and a note printed) when there is none."""
    from .pretrained import ASSETS

    card = Path(path) if path else ASSETS / "scaling-laws" / "card.json"
    if not card.is_file() and missing_ok:
        print(f"no scaling law at {card} (`make assets` makes it): the fixed default shape")
        return None
    if not card.is_file():
        raise FileNotFoundError(f"no scaling law at {card}: run `make assets` (assets/"
                                "make_scaling.py), or give the model's shape (--dim ...)")
    return ScalingLaw(**json.loads(card.read_text())["law_floor_guessed" if floor_guessed
                                                       else "law"])


def law_for_train(max_minutes, shape_given: bool, corpus: str):
    """The scaling law that sizes `llama3-mini train`'s model when --max-minutes comes with no
    shape (--preset, --dim, --n-layers, --n-heads, --n-kv-heads), and its recipe: (law,
    {"seq_len", "batch_size", "lr"}) on the stories (the flags it fills where they were left
    out: cli.py applies them), (law, {}) on another corpus, (None, {}) when nothing is sized.
    It reads the command line's values and writes nothing back."""
    if (max_minutes is None or shape_given
            or int(os.environ.get("WORLD_SIZE", "1")) > 1):  # torchrun: one shape for all
        return None, {}
    law = load_law(missing_ok=True)
    recipe = {flag: getattr(law, flag) for flag in ("seq_len", "batch_size", "lr")} \
        if law and corpus == "stories" else {}
    return law, recipe


def describe_plan(plan: dict, minutes: float, law: ScalingLaw, own_text: bool) -> str:
    """What `llama3-mini train --max-minutes` prints before training: the shape, the predicted
    loss and why."""
    a = plan["args"]
    text = (f"sized for {minutes:g} min: this machine trains {plan['flops_per_second']:.3g} "
            f"FLOPs/s, so {plan['flops']:.3g} FLOPs; the scaling law N*(C) = "
            f"{law.a_params:.3g} C^{law.alpha_params:.3f} picks dim {a.dim}, {a.n_layers} "
            f"layer{'s' * (a.n_layers > 1)}, {a.n_heads}/{a.kv_heads} heads "
            f"({plan['params']:,} non-embedding parameters) on about {plan['tokens']:,} tokens")
    if own_text:
        return text + (" (the law was fitted on the story corpus and is assumed to transfer "
                       "to your text; its loss there is not predicted)")
    return text + f"; predicted {plan['predicted_bpb']:.3f} bits per byte (floor {law.floor:.3f})"


def resumed_shape(out_dir) -> ModelArgs | None:
    """The shape of the newest checkpoint in out_dir (a sized run resumes as it began), or
    None when there is none."""
    from .checkpoint import latest_checkpoint

    found = latest_checkpoint(out_dir) if out_dir else None
    if found is None:
        return None
    a = ModelArgs.from_dict(json.loads((found / "config.json").read_text())["model_args"])
    print(f"resuming a run sized for its budget: dim {a.dim}, {a.n_layers} layers", flush=True)
    return a


def shape_for_minutes(law: ScalingLaw, minutes: float, vocab_size: int, seq_len: int,
                      batch_size: int, device=None, own_text: bool = False,
                      speed=None) -> ModelArgs:
    """`llama3-mini train --max-minutes`'s shape: this machine's speed measured for 2 s per
    candidate (measure_speed, or `speed(args)`), the plan printed with its reason."""
    from .config import pick_device

    device = pick_device(device)
    speed = speed or (lambda a: measure_speed(a, seq_len, batch_size, 2.0, device=device))
    plan = plan_for_minutes(minutes, law, speed, vocab_size, seq_len)
    print(describe_plan(plan, minutes, law, own_text), flush=True)
    return plan["args"]


# --------------------------------------------------------------------------- the sweep
def train_for_budget(args: ModelArgs, data: TokenData, flops: float, seq_len: int = 128,
                     batch_size: int = 8, lr: float = 3e-3, seed: int = 0) -> dict:
    """Train `args` from scratch for `flops` (cosine schedule over the steps that spend it)
    and return its validation bits per byte with the steps, tokens and seconds."""
    tokens = flops / flops_per_token(args, seq_len)
    steps = max(1, round(tokens / (batch_size * seq_len)))
    torch.manual_seed(seed)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
                      min_lr=lr / 10, warmup_steps=min(30, max(1, steps // 10)),
                      eval_every=0, seed=seed)
    start = time.process_time()
    trainer = Trainer(Transformer(args), data, cfg, device="cpu")
    trainer.fit(progress=False)
    return {"dim": args.dim, "n_layers": args.n_layers, "params": non_embedding_params(args),
            "steps": steps, "tokens": steps * batch_size * seq_len,
            "val_bpb": trainer.history[-1]["val_bpb"],
            "cpu_seconds": round(time.process_time() - start, 2)}


def isoflop_sweep(data: TokenData, plan: dict, seq_len: int = 128, batch_size: int = 8,
                  lr: float = 3e-3, progress: bool = True) -> list[dict]:
    """Train every (budget, width) of `plan`, {budget FLOPs: [dims]}, and return one row per
    run: budget, dim, n_layers, params (non-embedding), steps, tokens, val_bpb, cpu_seconds."""
    from tqdm.auto import tqdm

    runs = [(c, d) for c, dims in sorted(plan.items()) for d in dims]
    rows = []
    for c, d in tqdm(runs, desc="IsoFLOP sweep", disable=not progress):
        args = family_shape(d, len(data.token_bytes), max(512, seq_len))
        rows.append({"budget": c, **train_for_budget(args, data, c, seq_len, batch_size, lr)})
    return rows
