"""Chapter 06c's scaling study (`make assets`, or `python assets/make_scaling.py`): an
IsoFLOP sweep on the story corpus and a tested forecast, as "The Llama 3 Herd of Models"
(section 3.2.1) sized its 405B.

For each budget of PLAN (training FLOPs, scaling.flops_per_token's count; 4 budgets spanning
31.6x), models of the family `scaling.family_shape` at the widths PLAN gives are trained from
scratch on exactly that budget (cosine schedule over the steps that spend it) and their
validation bits per byte recorded. Then the law is fitted (scaling.fit_law, the floor fixed at
the validation stories' exact entropy), and at FORECAST_BUDGET, larger than any in the sweep,
the law's shape and the two family widths beside it are trained: the predicted loss and size
against the measured. Then the sweep and the forecast's three runs again with each seed of
EXTRA_SEEDS (other initial weights and batch order, the same corpus): the law stays the one
fitted to seed 0, and the card's "seeds" give the spread a single run hides.

assets/scaling-laws/: card.json (the recipe, every run, the optima, the law, the forecast),
README.md. Numbers only (no weights); the law in card.json is what `llama3-mini train
--max-minutes` sizes its model by."""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama3_mini.checkpoint import load_pretrained  # noqa: E402
from llama3_mini.data import story_data  # noqa: E402
from llama3_mini.scaling import (  # noqa: E402
    DIMS,
    family_shape,
    fit_law,
    non_embedding_params,
    shape_for_budget,
    train_for_budget,
)

N_STORIES, VAL_FRACTION, SEQ_LEN, BATCH, LR = 40_000, 0.0025, 64, 4, 3e-3
# 4 budgets 10^0.5 apart (31.7x from first to last), 5 widths each around the optimum.
# Batches of 4 windows of 64 tokens: at these budgets more steps beat longer windows and
# bigger batches. Pilots: at 2e10 FLOPs dim 16 reached 0.57 bits per byte with 4 x 64 tokens
# per step, 0.85 with 8 x 64; with 2 x 256 (whole stories in view) the smallest width tried
# won at 1.26e10, 4e10 and 1.26e11 FLOPs: no minimum to fit. The price of 64-token windows: a name
# introduced earlier than 64 tokens back is out of view, so the loss levels off above the
# corpus's entropy (chapter 06c measures by how much).
PLAN = {1.26e10: [8, 16, 32, 48, 64], 4e10: [8, 16, 32, 48, 64],
        1.26e11: [16, 32, 48, 64, 80], 4e11: [16, 32, 48, 64, 80]}
FORECAST_BUDGET = 8e11  # twice the largest budget of the sweep
EXTRA_SEEDS = (1, 2)  # the sweep and forecast again: about 9 more CPU minutes on one thread


def main(threads: int = 1) -> None:
    torch.set_num_threads(threads)
    start = time.process_time()
    _, tokenizer = load_pretrained("story-model", device="cpu")  # its tokenizer only
    data = story_data(tokenizer, N_STORIES, SEQ_LEN, seed=0, val_fraction=VAL_FRACTION)
    saved = Path(tempfile.gettempdir()) / "llama3-mini-scaling-rows.json"  # --reuse: resume
    cache = json.loads(saved.read_text()) if saved.exists() and "--reuse" in sys.argv else []

    def run(budget: float, dim: int, seed: int = 0) -> dict:  # a run, or its cached row
        row = next((r for r in cache if (r["budget"], r["dim"], r.get("seed", 0))
                    == (budget, dim, seed)), None)
        if row is None:
            args = family_shape(dim, tokenizer.n_words)
            row = {"budget": budget,
                   **train_for_budget(args, data, budget, SEQ_LEN, BATCH, LR, seed=seed)}
            if seed:
                row["seed"] = seed
            cache.append(row)
            saved.write_text(json.dumps(cache))
        print(json.dumps(row), flush=True)
        return row

    rows = [run(c, d) for c, dims in PLAN.items() for d in tqdm(dims, desc=f"{c:.3g} FLOPs")]
    sweep = dict(seq_len=SEQ_LEN, batch_size=BATCH, lr=LR, vocab_size=tokenizer.n_words)
    law, optima = fit_law(rows, data.floor, **sweep)
    guessed, _ = fit_law(rows, None, **sweep)
    args, _ = shape_for_budget(FORECAST_BUDGET, law)
    i = DIMS.index(args.dim)
    forecast = {"budget": FORECAST_BUDGET, "predicted_params": law.params_for(FORECAST_BUDGET),
                "predicted_tokens": law.tokens_for(FORECAST_BUDGET),
                "predicted_bpb": law.loss_for(FORECAST_BUDGET), "chosen_dim": args.dim,
                "chosen_params": non_embedding_params(args), "runs": []}
    around = (DIMS[max(i - 1, 0)], DIMS[i], DIMS[i + 1])  # the pick, the family either side
    forecast["runs"] = [run(FORECAST_BUDGET, d) for d in around]
    seeds = {}
    for seed in EXTRA_SEEDS:
        again = [run(c, d, seed) for c, dims in PLAN.items() for d in dims]
        seed_law, seed_optima = fit_law(again, data.floor, **sweep)
        seeds[str(seed)] = {"rows": again, "optima": seed_optima, "law": seed_law.to_dict(),
                            "forecast_runs": [run(FORECAST_BUDGET, d, seed) for d in around]}
    card = {"corpus": f"story_data(story-model tokenizer, {N_STORIES}, seq_len={SEQ_LEN}, "
                      f"seed=0, val_fraction={VAL_FRACTION})",
            "recipe": f"AdamW, batch {BATCH} x {SEQ_LEN} tokens, lr {LR:g} with a cosine to "
                      f"{LR / 10:g}, warm-up min(30, steps / 10); the budget is "
                      "scaling.flops_per_token x tokens",
            "floor_bpb": data.floor, "plan": {str(k): v for k, v in PLAN.items()},
            "rows": rows, "optima": optima, "law": law.to_dict(),
            "law_floor_guessed": guessed.to_dict(), "forecast": forecast, "seeds": seeds,
            "torch_threads": threads, "cpu_seconds": round(time.process_time() - start, 1),
            "training_cpu_seconds": round(sum(r["cpu_seconds"] for r in cache), 1)}
    _save(card)
    print(json.dumps({k: card[k] for k in ("law", "law_floor_guessed", "cpu_seconds")},
                     indent=1))


def _save(card: dict) -> None:
    out = ROOT / "assets" / "scaling-laws"
    work = out.with_name(".make-scaling-laws")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "card.json").write_text(json.dumps(card, indent=1))
    law, g, f = card["law"], card["law_floor_guessed"], card["forecast"]
    table = "\n".join(f"| {o['budget']:.3g} | {o['params']:,.0f}"
                      f"{'' if o['inside'] else ' (extrapolated)'} | {o['tokens']:,.0f} | "
                      f"{o['val_bpb']:.4f} |" for o in card["optima"])
    seeds = card.get("seeds", {})
    n_runs = len(card["rows"]) + len(f["runs"]) + sum(
        len(s["rows"]) + len(s["forecast_runs"]) for s in seeds.values())
    runs = "\n".join(f"| {r['dim']} | {r['params']:,} | {r['val_bpb']:.4f} |"
                     + "".join(f" {s['forecast_runs'][k]['val_bpb']:.4f} |" for s in seeds.values())
                     for k, r in enumerate(f["runs"]))
    spread = "\n".join(f"| {seed} | {s['law']['alpha_params']:.3f} | "
                       f"{s['law']['alpha_tokens']:.3f} | "
                       + ", ".join(f"{o['params']:,.0f}" for o in s["optima"]) + " |"
                       for seed, s in {"0": {"law": law, "optima": card["optima"]},
                                       **seeds}.items())
    (work / "README.md").write_text(f"""# scaling-laws: an IsoFLOP sweep on the story corpus

Made by `make assets` (assets/make_scaling.py): its {n_runs}
training runs took {card['training_cpu_seconds']} CPU seconds on {card['torch_threads']} thread
(about {card['training_cpu_seconds'] / 60:.0f} minutes of one idle core, plus a few seconds to
tokenize the corpus); numbers only, no weights. Corpus: {card['corpus']}; exact entropy floor
{card['floor_bpb']:.4f} bits per byte. Recipe: {card['recipe']}. {len(card['rows'])} sweep
runs per seed, seeds 0{"".join(f", {k}" for k in seeds)}.

Compute-optimal points (a parabola in log N per budget):

| budget (FLOPs) | non-embedding params | tokens | val bits/byte |
| --- | --- | --- | --- |
{table}

Law (floor fixed): N* = {law['a_params']:.3g} C^{law['alpha_params']:.3f}, D* =
{law['a_tokens']:.3g} C^{law['alpha_tokens']:.3f}, loss = {law['floor']:.4f} +
{law['b']:.3g} C^-{law['beta']:.3f}. With the floor guessed: {g['floor']:.4f}.

Forecast at {f['budget']:.3g} FLOPs: {f['predicted_params']:,.0f} parameters, predicted
{f['predicted_bpb']:.4f} bits per byte; trained:

| dim | non-embedding params | val bits/byte, seed 0 |{"".join(f" seed {k} |" for k in seeds)}
| --- | --- | --- |{" --- |" * len(seeds)}
{runs}

The same sweep with other seeds (initial weights and batch order; the corpus is the same):

| seed | alpha, params | alpha, tokens | optima (non-embedding params) |
| --- | --- | --- | --- |
{spread}
""")
    shutil.rmtree(out, ignore_errors=True)
    work.rename(out)


if __name__ == "__main__":
    main()
