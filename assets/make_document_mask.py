"""Llama 3's document mask, measured for chapter 08 (`make assets --only document-mask`, or
`python assets/make_document_mask.py`): training with and without the mask at equal steps.

Meta's finding ("The Llama 3 Herd of Models", section 3.2) is the hypothesis: the mask "had
limited impact during standard pre-training", but was "important in continued pre-training on
very long sequences". Three experiments, each run with and without the mask from the same
initial weights on the same batches (the seed decides both), so that the difference between
the two runs of one seed is the mask's alone:

1. "pretrain": the story model's shape from scratch on the story corpus, windows of 256 tokens
   (2 to 3 stories each), 150 steps of 16 windows (a shorter schedule than the asset's);
2. "continue": chapter 08's recipe, the story model (trained at 256) stretched to 2,048 tokens
   with Llama 3.1's RoPE scaling (factor 8), then 16 steps of 2 windows of 2,048 tokens (about
   13 stories each) of fresh stories;
3. "long": as 2, 24 steps, with long documents mixed in as a long-context stage has them:
   chapter 08's name-carrying documents (a hero named, 300 to 1,800 tokens naming nobody, the
   name again), about 40% of the tokens.

Each run is scored on held-out stories: bits per byte with each story alone (the mask on at
evaluation: what the corpus's entropy floor measures) and packed as the trainer scores today
(validation rows of whole stories, no mask); for 2 and 3 also the loss at positions 1,024 to
2,048 of long packed rows without the mask, and chapter 08's name recall at 500, 1,000 and
1,500 tokens. assets/document-mask/: card.json (every score per run and seed) and README.md;
numbers only. About 15 minutes of one core for 3 seeds; the card is rewritten after each seed.
The runs are reproducible for a fixed thread count (1 by default)."""
from __future__ import annotations

import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama3_mini.checkpoint import load_pretrained  # noqa: E402
from llama3_mini.config import ModelArgs  # noqa: E402
from llama3_mini.data import prepare_data, split_documents, story_data  # noqa: E402
from llama3_mini.long_context import (  # noqa: E402
    loss_by_position,
    name_recall_probe,
    recall_accuracy,
    story_rows,
    with_context,
)
from llama3_mini.model import Transformer  # noqa: E402
from llama3_mini.stories import make_stories  # noqa: E402
from llama3_mini.train import TrainConfig, Trainer, evaluate_bpb  # noqa: E402

SEQ_LEN, LONG, FACTOR = 256, 2048, 8.0  # the story model's window; chapter 08's
STEPS = {"pretrain": 150, "continue": 16, "long": 24}
BATCH = {"pretrain": 16, "continue": 2, "long": 2}
OUT = ROOT / "assets" / "document-mask"


def scores(model, data, probes=None) -> dict:
    """Held-out bits per byte with each story alone and packed; with probes (late rows and
    recall prompts) the late loss and the recall."""
    out = {"alone_bpb": evaluate_bpb(model, data.val_rows, data.token_bytes,
                                     doc_ids=data.val_doc_ids)["val_bpb"],
           "packed_bpb": evaluate_bpb(model, data.val_rows, data.token_bytes)["val_bpb"]}
    if probes is not None:
        late_rows, recall = probes
        out["late_loss"] = loss_by_position(model, late_rows)[LONG // 2:].mean().item()
        for distance, probe in recall.items():
            out[f"recall@{distance}"] = recall_accuracy(model, *probe)
    return {k: round(v, 5) for k, v in out.items()}


def long_documents(tokenizer, n: int, seed: int = 2000) -> list[str]:
    """n texts that carry a name far: chapter 08's probe documents, seeds unlike its probes'."""
    rng, texts = random.Random(seed), []
    for i in range(n // 4):
        tokens, query, answer = name_recall_probe(tokenizer, rng.randint(300, 1800), n=4,
                                                  seed=seed + i)
        for r in range(4):  # without its <|begin_of_text|>, which packing puts back
            texts.append(tokenizer.decode(tokens[r, 1:query[r] + 1].tolist() + [answer[r]]))
    return texts


def pretrain(data, model_args: ModelArgs, seed: int, mask: bool,
             steps: int = STEPS["pretrain"]) -> dict:
    """Train the story model's shape from scratch (same weights and batches for one seed)."""
    torch.manual_seed(seed)
    model = Transformer(model_args)
    cfg = TrainConfig(steps=steps, batch_size=BATCH["pretrain"], seq_len=SEQ_LEN, lr=3e-3,
                      min_lr=3e-4, warmup_steps=min(30, steps // 5), eval_every=0, seed=seed,
                      document_mask=mask)
    Trainer(model, data, cfg, device="cpu").fit(progress=False)
    return scores(model, data)


def continued(data, pretrained, seed: int, mask: bool, steps: int, probes) -> dict:
    """Chapter 08's continued training: stretch to 2,048 positions, train at 2,048."""
    model = with_context(pretrained, LONG, scaling_factor=FACTOR, original_max_seq_len=SEQ_LEN)
    cfg = TrainConfig(steps=steps, batch_size=2, seq_len=LONG, lr=5e-4, min_lr=5e-5,
                      warmup_steps=5, eval_every=0, seed=seed, document_mask=mask)
    Trainer(model, data, cfg, device="cpu").fit(progress=False)
    return scores(model, data, probes)


def setup(tokenizer) -> dict:
    """The three experiments' data: stories at 256, fresh stories at 2,048, and those stories
    with long name-carrying documents mixed in (validation: the same stories)."""
    pre = story_data(tokenizer, n_stories=4000, seq_len=SEQ_LEN, seed=0)
    stories = story_data(tokenizer, n_stories=800, seq_len=LONG, seed=3)  # fresh stories
    short = [s.text for s in split_documents(make_stories(800, seed=3), 0.05)[0]]
    long = long_documents(tokenizer, 60)
    n_long, n_short = (sum(len(tokenizer.encode(t)) for t in texts) for texts in (long, short))
    mixed = short + long
    random.Random(0).shuffle(mixed)
    with_long = prepare_data(mixed, tokenizer, seq_len=LONG, floor=stories.floor)
    with_long.val_rows, with_long.val_doc_ids = stories.val_rows, stories.val_doc_ids
    probes = (story_rows(tokenizer, 6, LONG, seed=5),
              {d: name_recall_probe(tokenizer, d, n=32, seed=0) for d in (500, 1000, 1500)})
    return {"pretrain": pre, "continue": stories, "long": with_long, "probes": probes,
            "long_token_share": n_long / (n_long + n_short), "long_documents": len(long)}


def summary(runs: list[dict], key: str = "alone_bpb") -> dict:
    """Mean and sd over seeds of one score, off and on, and of the paired difference on - off."""
    off = [r["off"][key] for r in runs]
    on = [r["on"][key] for r in runs]
    diff = [b - a for a, b in zip(off, on, strict=True)]

    def ms(xs):
        return [round(statistics.mean(xs), 5), round(statistics.stdev(xs), 5) if len(xs) > 1
                else 0.0]
    return {"off": ms(off), "on": ms(on), "on_minus_off": ms(diff)}


def main(threads: int = 1, seeds: int = 3) -> dict:
    torch.set_num_threads(threads)  # the same arithmetic, so the same numbers
    from tqdm.auto import tqdm

    setup_start = time.process_time()

    pretrained, tokenizer = load_pretrained(device="cpu")
    pretrained.float()
    data = setup(tokenizer)
    base = scores(with_context(pretrained, LONG, FACTOR, SEQ_LEN), data["continue"],
                  data["probes"])
    card = {"hypothesis": "The Llama 3 Herd of Models, section 3.2", "seeds": [],
            "steps": STEPS, "batch_size": BATCH, "seq_len": {"pretrain": SEQ_LEN,
                                                             "continue": LONG, "long": LONG},
            "floor_bpb": {k: round(data[k].floor, 5) for k in STEPS},
            "long_token_share": round(data["long_token_share"], 3),
            "long_documents": data["long_documents"], "stretched_before_training": base,
            "torch_threads": threads, "cpu_seconds": 0.0,
            "setup_cpu_seconds": round(time.process_time() - setup_start, 1),
            "runs": {k: [] for k in STEPS}}
    start = time.process_time()
    for seed in tqdm(range(seeds), desc="seeds"):
        for name in STEPS:
            run = {"seed": seed}
            for mask in (False, True):
                if name == "pretrain":
                    run["on" if mask else "off"] = pretrain(data[name], pretrained.params,
                                                            seed, mask)
                else:
                    run["on" if mask else "off"] = continued(
                        data[name], pretrained, seed, mask, STEPS[name], data["probes"])
            card["runs"][name].append(run)
        card["seeds"].append(seed)
        card["cpu_seconds"] = round(time.process_time() - start, 1)
        card["summary"] = {k: summary(card["runs"][k]) for k in STEPS}
        write(card)
    return card


def write(card: dict) -> None:
    """card.json and README.md into assets/document-mask/ (rewritten after each seed)."""
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "card.json").write_text(json.dumps(card, indent=1))
    names = {"pretrain": f"pre-training at {SEQ_LEN}",
             "continue": f"continued training at {LONG}",
             "long": f"continued at {LONG}, long documents mixed in"}
    rows = []
    for k, s in card["summary"].items():
        floor = card["floor_bpb"][k]
        share = -s["on_minus_off"][0] / (s["off"][0] - floor)
        rows.append(f"| {names[k]}, {card['steps'][k]} steps x {card['batch_size'][k]} | "
                    f"{floor:.3f} | {s['off'][0]:.4f} ± {s['off'][1]:.4f} | "
                    f"{s['on'][0]:.4f} ± {s['on'][1]:.4f} | {s['on_minus_off'][0]:+.4f} ± "
                    f"{s['on_minus_off'][1]:.4f} | {share:.0%} |")
    (OUT / "README.md").write_text(f"""# document-mask: Llama 3's document mask at equal steps

Made by `make assets` (assets/make_document_mask.py, whose docstring gives the recipe):
each experiment trained with and without the mask from the same weights on the same
batches, seeds {", ".join(map(str, card["seeds"]))}. The training and scoring runs took
{card['cpu_seconds']:.0f} CPU seconds on {card['torch_threads']} thread(s) (about
{card['cpu_seconds'] / 60:.0f} minutes of one idle core), after
{card['setup_cpu_seconds']:.0f} CPU seconds to tokenize the corpora and score the stretched model
before training. Numbers only, no weights; notebook 08 loads card.json.

Bits per byte of held-out stories, each scored alone, mean ± sd over seeds; on − off is paired
by seed; the last column is the share of the excess over the entropy floor the mask removes.

| run | floor | mask off | mask on | on − off | excess removed |
| --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}

Long documents: {card['long_documents']}, {card['long_token_share']:.0%} of the tokens of run 3.
""")


if __name__ == "__main__":
    main()
