"""Training on a CPU, measured side by side in one run:

1. throughput (tokens per second) of the tiny preset, explicit attention against
   scaled_dot_product_attention, steps interleaved so that machine noise hits both;
2. validation bits per byte reached after 5 and 10 minutes (times --minutes) of training the
   asset's shape on the story corpus, against the corpus's entropy floor.

    python benchmarks/bench_train.py                 # the full 10 minutes
    python benchmarks/bench_train.py --minutes 0.3   # 1.5 and 3 minutes instead"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "assets"))

from make_assets import SEQ_LEN, VOCAB, model_args  # noqa: E402

from llama3_mini.config import get_preset, num_params  # noqa: E402
from llama3_mini.data import entropy_bits_per_byte, make_stories, prepare_data, split_documents  # noqa: E402,E501
from llama3_mini.model import Transformer  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=1.0, help="scale of 5 and 10 minutes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--throughput-steps", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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
