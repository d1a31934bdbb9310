"""Training on a CPU, measured side by side in one run:

1. throughput (tokens per second) of the tiny preset, explicit attention against
   scaled_dot_product_attention, steps interleaved so that machine noise hits both;
2. validation bits per byte reached after 5 and 10 minutes (times --minutes) of training the
   asset's shape on the story corpus, against the corpus's entropy floor;
3. your own text: bits per byte after 2 minutes (times --minutes), by shape, sequence length,
   batch size, vocabulary and learning rate, on 1 MB of English prose and 1 MB of Python that
   every Python install has; the sweep that chose `llama3-mini train`'s defaults for a text
   file (llama3_mini.cli.TEXT_DEFAULTS), printed beside the best run of the sweep;
4. sized by the law (`--section sized`): at 1, 2 and 5 minutes on prose and on code, the shape
   the scaling law picks (as `llama3-mini train --max-minutes` does, chapter 06c) against the
   best shape of a sweep of the law's family and against TEXT_DEFAULTS' fixed shape.

    python benchmarks/bench_train.py                 # everything at full length (~50 min)
    python benchmarks/bench_train.py --minutes 0.3   # shorter runs
    python benchmarks/bench_train.py --section own-text
    python benchmarks/bench_train.py --section sized --budgets 1 2 --texts prose"""
from __future__ import annotations

import argparse
import ast
import sys
import sysconfig
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "assets"))

from make_assets import SEQ_LEN, VOCAB, model_args  # noqa: E402

from llama3_mini.cli import TEXT_DEFAULTS  # noqa: E402
from llama3_mini.config import get_preset, num_params  # noqa: E402
from llama3_mini.data import prepare_data, sample_text, split_documents  # noqa: E402
from llama3_mini.model import Transformer  # noqa: E402
from llama3_mini.scaling import family_shape, load_law, measure_speed, plan_for_minutes  # noqa: E402
from llama3_mini.stories import entropy_bits_per_byte, make_stories  # noqa: E402
from llama3_mini.tokenizer import Tokenizer  # noqa: E402
from llama3_mini.train import TrainConfig, Trainer, evaluate_bpb  # noqa: E402


def throughput(data, steps: int) -> dict:
    """Tokens per second of training steps, explicit and fast attention, interleaved."""
    args = get_preset("tiny").replace(vocab_size=len(data.token_bytes))
    times = {True: [], False: []}
    trainers = {}
    for fast in (True, False):
        torch.manual_seed(0)
        cfg = TrainConfig(steps=10**6, batch_size=8, seq_len=SEQ_LEN, fast_attention=fast)
        trainers[fast] = Trainer(Transformer(args), data, cfg, device="cpu")
    for i in range(steps + 1):
        for fast in (True, False):
            start = time.perf_counter()
            trainers[fast].train_step()
            if i:  # the first step warms up
                times[fast].append(time.perf_counter() - start)
    tokens = 8 * SEQ_LEN
    return {fast: tokens / sorted(t)[len(t) // 2] for fast, t in times.items()}  # median


def bpb_after(data, minutes: float) -> dict:
    """Train for `minutes` (cosine schedule sized to it from a measured step time), recording
    validation bits per byte at half time and at the end."""
    torch.manual_seed(0)
    probe = Trainer(Transformer(model_args(len(data.token_bytes))), data,
                    TrainConfig(steps=10**6, seq_len=SEQ_LEN), device="cpu")
    start = time.perf_counter()
    for _ in range(5):
        probe.train_step()
    per_step = (time.perf_counter() - start) / 5
    steps = max(20, int(minutes * 60 / per_step))
    torch.manual_seed(0)
    cfg = TrainConfig(steps=steps, seq_len=SEQ_LEN, lr=3e-3, min_lr=3e-4, warmup_steps=30,
                      eval_every=0, max_minutes=minutes)
    trainer = Trainer(Transformer(model_args(len(data.token_bytes))), data, cfg, device="cpu")
    marks = {}

    def at_half(t):
        if "half" not in marks and t.seconds >= minutes * 30:
            marks["half"] = (t.seconds, evaluate_bpb(t.model, data.val_rows,
                                                     data.token_bytes)["val_bpb"])
    trainer.fit(progress=False, callback=at_half)
    marks["end"] = (trainer.seconds, trainer.history[-1]["val_bpb"])
    marks["steps"] = trainer.step
    return marks


# ---------------------------------------------------------------------------------------------
# Your own text. Each run trains from scratch for a budget of CPU time: the clock given to the
# Trainer is this process's CPU seconds divided by the threads, so "2 minutes" means 2 minutes
# of 2 busy cores however loaded the machine is while the sweep runs (wall time would charge
# a run for its neighbours). The tokenizer is trained first, on the training part only, and
# not counted. One axis at a time around a base, then the winners of each axis together.
# A wider first sweep (dim 256, sequences of 256, batches of 32, lr 6e-3, vocabulary 512), run
# while the machine was shared, put none of those values ahead; this is the idle-machine one.
SWEEP = {
    "shape": [dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2),
              dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2)],
    "seq_len": [64, 128],
    "batch_size": [16],
    "vocab": [1024, 2048],
    "lr": [3e-3],
}
BASE = dict(shape=SWEEP["shape"][1], seq_len=128, batch_size=16, vocab=1024, lr=3e-3)
OLD_DEFAULTS = dict(shape=dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=2), seq_len=256,
                    batch_size=16, vocab=1024, lr=2e-3)  # the tiny preset, before the sweep


def own_text_bpb(text: str, run: dict, minutes: float, threads: int,
                 tokenizers: dict) -> tuple[float, int, int]:
    """(validation bits per byte, steps, parameters) after `minutes` of CPU time."""
    cut = text.rindex("\n", 0, int(len(text) * 0.9)) + 1  # as --corpus FILE: the last 10%
    if run["vocab"] not in tokenizers:
        tokenizers[run["vocab"]] = Tokenizer.train(text[:cut], run["vocab"], progress=False)
    tok = tokenizers[run["vocab"]]
    data = prepare_data([text], tok, run["seq_len"], val_fraction=0.1)
    args = get_preset("tiny").replace(vocab_size=tok.n_words,
                                      max_seq_len=max(512, run["seq_len"]), **run["shape"])
    torch.manual_seed(0)
    cfg = TrainConfig(steps=None, max_minutes=minutes, batch_size=run["batch_size"],
                      seq_len=run["seq_len"], lr=run["lr"], min_lr=run["lr"] / 10,
                      warmup_steps=30, eval_every=0, seed=0)
    trainer = Trainer(Transformer(args), data, cfg, device="cpu",
                      clock=lambda: time.process_time() / threads)
    trainer.fit(progress=False)
    return trainer.history[-1]["val_bpb"], trainer.step, num_params(args)


def _label(run: dict) -> str:
    s = run["shape"]
    return (f"dim {s['dim']}, {s['n_layers']} layers, {s['n_heads']}/{s['n_kv_heads']} heads | "
            f"{run['seq_len']} | {run['batch_size']} | {run['vocab']} | {run['lr']:g}")


def english_prose(n_bytes: int = 1_000_000) -> str:
    """About n_bytes of English every Python install has: the docs' topics (~470 KB), then
    the standard library's longer docstrings, file by file."""
    parts = [sample_text("prose", n_bytes)]
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            nodes = ast.walk(ast.parse(path.read_text("utf-8", "replace")))
        except SyntaxError:
            continue
        kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        parts += [d for n in nodes if isinstance(n, kinds)
                  and len(d := ast.get_docstring(n) or "") > 200]
    return "\n\n".join(parts).encode()[:n_bytes].decode("utf-8", "ignore")


def own_text(minutes: float, threads: int) -> None:
    torch.set_num_threads(threads)
    texts = {"prose": english_prose(), "code": sample_text("code", 1_000_000)}
    chosen, best = dict(TEXT_DEFAULTS), dict(BASE)
    for name, text in texts.items():
        tokenizers, rows = {}, []
        runs = [dict(BASE, **{axis: v}) for axis, values in SWEEP.items() for v in values]
        if name == "code":  # the prose sweep chose; code checks its choice on other text
            runs = [best]
        for run in [r for i, r in enumerate(runs) if r not in runs[:i]]:
            bpb, steps, params = own_text_bpb(text, run, minutes, threads, tokenizers)
            rows.append((run, bpb, steps, params))
            print(f"  {name}: {_label(run)} -> {bpb:.4f} bits/byte, {steps} steps", flush=True)
        if name == "prose":
            for axis in SWEEP:  # each axis's best value, the others at the base
                on_axis = [(bpb, r[axis]) for r, bpb, _, _ in rows
                           if all(r[a] == BASE[a] for a in SWEEP if a != axis)]
                best[axis] = min(on_axis, key=lambda t: t[0])[1]
        for run in (best, chosen, OLD_DEFAULTS):
            if run not in [r for r, *_ in rows]:
                rows.append((run, *own_text_bpb(text, run, minutes, threads, tokenizers)))
                print(f"  {name}: {_label(run)} -> {rows[-1][1]:.4f} bits/byte", flush=True)
        by_run = {_label(r): (bpb, steps, params) for r, bpb, steps, params in rows}
        print(f"\nYour own text ({name}, {len(text.encode()):,} bytes; last 10% validation): "
              f"bits per byte after {minutes:.1f} min of {threads} cores, by setting")
        print("| shape | seq_len | batch | vocab | lr | params | steps | val bits/byte |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for label, (bpb, steps, params) in sorted(by_run.items(), key=lambda kv: kv[1][0]):
            print(f"| {label} | {params:,} | {steps} | {bpb:.4f} |")
        top = min(by_run.values())[0]
        print(f"best of the sweep: {top:.4f}; the defaults ({_label(chosen)}): "
              f"{by_run[_label(chosen)][0]:.4f}; the tiny preset's old defaults: "
              f"{by_run[_label(OLD_DEFAULTS)][0]:.4f}")


# ---------------------------------------------------------------------------------------------
# Sized by the law. The law was fitted on the stories (assets/scaling-laws); here it picks the
# shape for your own text at TEXT_DEFAULTS' recipe (sequence length, batch, vocabulary, lr),
# from this machine's speed measured in the same CPU-time clock as the runs. Each budget's
# sweep trains the family's widths SIZED_DIMS at that recipe; the pick and the defaults run
# beside them, and the best of all is the sweep's best. Measured (one thread, CPU-time
# minutes, a shared machine; sweep widths 32, 64, 128 besides the pick and the defaults):
#   prose 1 min: pick dim 96 2.3335, best dim 64 2.2850 (1.021), defaults 2.4619 (0.948)
#   prose 2 min: pick dim 112 2.2718, best the defaults 2.2614 (1.005)
#   prose 5 min: pick dim 160 2.2510, the best (1.000), defaults 2.2956 (0.981)
#   code 1 min: pick dim 80 1.8521, best dim 64 1.8521 (1.000), defaults 1.9440 (0.953)
#   code 2 min: pick dim 96 1.8241, the best (1.000), defaults 1.8474 (0.987)
#   code 5 min: pick dim 160 1.8309, the best (1.000), defaults 1.9286 (0.949); the small
#     widths got worse with time (dim 64: 1.8911 at 2 min, 2.1286 at 5): many passes over
#     1 MB, so they overfit, which the law (fitted on endless stories) does not model
SIZED_DIMS = (32, 64, 96, 128, 192)


def sized(budgets, threads: int, texts: list[str], dims=SIZED_DIMS) -> None:
    torch.set_num_threads(threads)
    law = load_law()
    clock = lambda: time.process_time() / threads  # noqa: E731
    every = {"prose": english_prose, "code": lambda: sample_text("code", 1_000_000)}
    rows = []
    for name in texts:
        text, tokenizers = every[name](), {}
        own_text_bpb(text, dict(TEXT_DEFAULTS), 0.01, threads, tokenizers)  # train the tokenizer
        n_words = tokenizers[TEXT_DEFAULTS["vocab"]].n_words
        speed = lambda a: measure_speed(a, TEXT_DEFAULTS["seq_len"],  # noqa: E731
                                        TEXT_DEFAULTS["batch_size"], 2.0, clock=clock)
        for minutes in budgets:
            a = plan_for_minutes(minutes, law, speed, n_words, TEXT_DEFAULTS["seq_len"])["args"]
            shape = lambda a: dict(dim=a.dim, n_layers=a.n_layers,  # noqa: E731
                                   n_heads=a.n_heads, n_kv_heads=a.kv_heads)
            runs = {"law": shape(a), "defaults": TEXT_DEFAULTS["shape"]}
            runs |= {f"dim {d}": shape(family_shape(d, n_words)) for d in dims if d != a.dim}
            bpb = {k: own_text_bpb(text, dict(TEXT_DEFAULTS, shape=v), minutes, threads,
                                   tokenizers)[0] for k, v in runs.items()}
            best = min(bpb, key=bpb.get)
            rows.append((name, minutes, a.dim, bpb["law"], best, bpb[best], bpb["defaults"]))
            print(f"  {name}, {minutes:g} min: " + ", ".join(f"{k} {v:.4f}" for k, v in
                                                            bpb.items()), flush=True)
    print(f"\nSized by the law ({threads} thread(s), CPU-time budgets; sweep: the law's pick, "
          f"TEXT_DEFAULTS' shape and widths {', '.join(map(str, dims))})")
    print("| text | minutes | law's pick | its bits/byte | sweep's best | its bits/byte | "
          "defaults' bits/byte | pick / best | pick / defaults |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, minutes, dim, law_bpb, best, best_bpb, default_bpb in rows:
        print(f"| {name} | {minutes:g} | dim {dim} | {law_bpb:.4f} | {best} | {best_bpb:.4f} | "
              f"{default_bpb:.4f} | {law_bpb / best_bpb:.3f} | {law_bpb / default_bpb:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=1.0, help="scale of 5 and 10 minutes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--throughput-steps", type=int, default=6)
    parser.add_argument("--section", choices=["throughput", "stories", "own-text", "sized"],
                        default=None, help="run one section (default: all four)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0, 2.0, 5.0],
                        help="minutes of the sized section")
    parser.add_argument("--texts", nargs="+", default=["prose", "code"],
                        choices=["prose", "code"], help="texts of the sized section")
    parser.add_argument("--dims", type=int, nargs="+", default=list(SIZED_DIMS),
                        help="the sized section's sweep: the family's widths")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.section in (None, "sized"):
        sized(args.budgets, args.threads, args.texts, args.dims)
        torch.set_num_threads(args.threads)
        if args.section:
            return
    if args.section in (None, "own-text"):
        own_text(2 * args.minutes, threads=2)  # the learner's case: 2 cores
        torch.set_num_threads(args.threads)
        if args.section:
            return
    stories = make_stories(40_000, seed=0)
    docs = [s.text for s in stories]
    tokenizer = Tokenizer.train("\n".join(docs[:2000]), VOCAB, progress=False)
    floor = entropy_bits_per_byte(split_documents(stories, 0.01)[1])
    data = prepare_data(docs, tokenizer, SEQ_LEN, val_fraction=0.01, floor=floor)

    tps = throughput(data, args.throughput_steps)
    tiny = num_params(get_preset("tiny").replace(vocab_size=tokenizer.n_words))
    print(f"\nTraining throughput, tiny preset ({tiny:,} params), batch 8 x {SEQ_LEN}, "
          f"{args.threads} thread(s), median step")
    print("| attention | tokens/s | ratio |\n| --- | --- | --- |")
    print(f"| explicit (softmax(QK^T)V) | {tps[False]:,.0f} | 1.00 |")
    print(f"| fast (scaled_dot_product_attention) | {tps[True]:,.0f} | "
          f"{tps[True] / tps[False]:.2f} |")

    minutes = 10 * args.minutes
    marks = bpb_after(data, minutes)
    shape = model_args(tokenizer.n_words)
    print(f"\nValidation bits per byte, asset shape ({num_params(shape):,} params), "
          f"{marks['steps']} steps planned for {minutes:.1f} min; floor {floor:.4f}")
    print("| after | seconds | val bits/byte | floor | val / floor |")
    print("| --- | --- | --- | --- | --- |")
    for label, key in ((f"{minutes / 2:.1f} min", "half"), (f"{minutes:.1f} min", "end")):
        if key in marks:
            seconds, bpb = marks[key]
            print(f"| {label} | {seconds:.0f} | {bpb:.4f} | {floor:.4f} | {bpb / floor:.3f} |")


if __name__ == "__main__":
    main()
