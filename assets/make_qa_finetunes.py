"""Chapter 07's long fine-tunes (`make assets`, or `python assets/make_qa_finetunes.py`):
the story model fine-tuned to answer questions about a story, fully and with LoRA, for
STEPS steps each, long enough to answer every kind of question. Too long for the notebook
(a few minutes each on a CPU), so made here, deterministically, and loaded there.

- assets/qa-full/: the fully fine-tuned model (float16), `load_pretrained("qa-full")`;
- assets/qa-lora/: LoRA adapters (rank 16 on all seven projections, float16) for the story
  model, adapters.safetensors, loaded onto `add_lora(base, TARGETS, RANK, ALPHA)`;
- assets/qa-mix-0/ and assets/qa-mix-25/: the mixtures of the lab notebooks/labs/10_lab_qa_mixture,
  the story model trained on for MIX_STEPS more steps on fresh stories with 0% and 25% of the
  documents question-answer dialogs (`mixture()`), `load_pretrained("qa-mix-25")`.

Each method's learning rate is chosen among LRS[method] by exact match on validation
questions about VAL_STORIES stories set apart from the training stories (the notebook's
held-out stories are never seen here, not even to choose). card.json in each folder records
every run: the learning rate, validation exact match by kind of question, the story bits per
byte after fine-tuning, and the seconds it took."""
from __future__ import annotations

import copy
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama3_mini.checkpoint import load_pretrained, save_model  # noqa: E402
from llama3_mini.data import (  # noqa: E402
    TokenData,
    encode_documents,
    pack_documents,
    token_bytes,
)
from llama3_mini.finetune import (  # noqa: E402
    QUESTIONS,
    answer,
    encode_example,
    finetune,
    make_qa,
    split_qa,
)
from llama3_mini.lora import add_lora, lora_state_dict  # noqa: E402
from llama3_mini.stories import make_stories  # noqa: E402
from llama3_mini.tokenizer import ChatFormat  # noqa: E402
from llama3_mini.train import TrainConfig, Trainer, evaluate_bpb  # noqa: E402

# The notebook's data: make_qa(N_STORIES, seed=1) split with HELD_OUT stories held out.
N_STORIES, HELD_OUT, VAL_STORIES = 2000, 15, 30
STEPS, BATCH = 1500, 16
TARGETS, RANK, ALPHA = ("wq", "wk", "wv", "wo", "w1", "w2", "w3"), 16, 32
LRS = {"full": (1e-3, 3e-3), "lora": (1e-3, 3e-3)}
MIX_STEPS, MIX_STORIES, MIX_FRACTIONS = 300, 3000, (0.0, 0.25)


def by_kind(model, tokenizer, chat, examples) -> dict[str, float]:
    """Exact match of the greedy replies, per kind of question."""
    replies = answer(model, tokenizer, chat, examples)
    return {kind: sum(r == e.answer for r, e in zip(replies, examples, strict=True)
                      if e.kind == kind) / sum(e.kind == kind for e in examples)
            for kind in QUESTIONS}


def main(threads: int = 1) -> None:
    torch.set_num_threads(threads)
    base, tokenizer = load_pretrained("story-model", device="cpu")
    chat = ChatFormat(tokenizer)
    train, _ = split_qa(make_qa(N_STORIES, seed=1), n_heldout_stories=HELD_OUT)
    train, val = split_qa(train, n_heldout_stories=VAL_STORIES, seed=1)
    encoded = [encode_example(e, tokenizer, chat) for e in train]
    stories = pack_documents(encode_documents([s.text for s in make_stories(24, seed=2)],
                                              tokenizer), 256)  # the notebook's story check
    runs = {}
    for method, lrs in LRS.items():
        for lr in lrs:
            torch.manual_seed(0)
            model = copy.deepcopy(base)
            if method == "lora":
                model = add_lora(model, TARGETS, rank=RANK, alpha=ALPHA)
            start = time.perf_counter()
            run = finetune(model, encoded, steps=STEPS, batch_size=BATCH, lr=lr, progress=True)
            row = {"lr": lr, "seconds": round(time.perf_counter() - start, 1),
                   "trainable": run["trainable"], "val_exact_by_kind": by_kind(
                       model.eval(), tokenizer, chat, val),
                   "story_bpb": round(evaluate_bpb(model, stories, token_bytes(tokenizer))[
                       "val_bpb"], 4), "final_loss": round(sum(run["losses"][-50:]) / 50, 5)}
            print(method, json.dumps(row), flush=True)
            runs.setdefault(method, []).append((row, model))
    for method, tried in runs.items():  # the best worst kind, then the least forgetting
        row, model = max(tried, key=lambda t: (min(t[0]["val_exact_by_kind"].values()),
                                               -t[0]["story_bpb"]))
        card = {"method": method, "chosen_lr": row["lr"], "steps": STEPS, "batch_size": BATCH,
                "data": f"make_qa({N_STORIES}, seed=1) less {HELD_OUT} held-out and "
                        f"{VAL_STORIES} validation stories: {len(train)} dialogs",
                "torch_threads": threads, "runs": [r for r, _ in tried]}
        if method == "lora":
            card.update(targets=TARGETS, rank=RANK, alpha=ALPHA)
        _save(method, model, tokenizer, card)


def _save(method: str, model, tokenizer, card: dict) -> None:
    from safetensors.torch import save_file

    out = ROOT / "assets" / f"qa-{method}"
    work = out.with_name(f".make-qa-{method}")
    shutil.rmtree(work, ignore_errors=True)
    if method == "full":
        save_model(model, work, dtype=torch.float16, tokenizer="tokenizer.tiktoken")
        shutil.copy(ROOT / "assets" / "story-model" / "tokenizer.tiktoken", work)
    else:
        work.mkdir(parents=True)
        adapters = {k: v.to(torch.float16).contiguous() for k, v in lora_state_dict(model).items()}
        save_file(adapters, str(work / "adapters.safetensors"))
    (work / "card.json").write_text(json.dumps(card, indent=1))
    runs = "\n".join(f"| {r['lr']:g} | {r['seconds']} | " + " | ".join(
        f"{r['val_exact_by_kind'][k]:.0%}" for k in QUESTIONS) + f" | {r['story_bpb']} |"
        for r in card["runs"])
    (work / "README.md").write_text(f"""# qa-{method}: the story model fine-tuned to answer

Made by `make assets` (assets/make_qa_finetunes.py): {"full fine-tuning" if method == "full"
else f"LoRA, rank {RANK}, alpha {ALPHA}, on {', '.join(TARGETS)}"}, {STEPS} steps of {BATCH}
dialogs ({card['data']}), AdamW with the Trainer's warm-up and cosine schedule, on
{card['torch_threads']} CPU thread(s). Chosen learning rate: {card['chosen_lr']:g}.

| learning rate | seconds | {' | '.join(QUESTIONS)} (validation exact match) | story bits per byte |
| --- | --- | {' | '.join('---' for _ in QUESTIONS)} | --- |
{runs}

Weights in float16. Notebook 07 loads it and measures it on its own held-out questions.
""")
    shutil.rmtree(out, ignore_errors=True)
    work.rename(out)


def mixture(threads: int = 1) -> None:
    """Chapter 10: the story model trained MIX_STEPS more steps (8 rows of 256 tokens, AdamW
    at 1e-3 with the Trainer's warm-up and cosine) on MIX_STORIES fresh stories (seed 11)
    plus, as a fraction of all documents, the training dialogs of chapter 07's split; every
    document shuffled into one stream."""
    import numpy as np

    torch.set_num_threads(threads)
    base, tokenizer = load_pretrained("story-model", device="cpu")
    chat = ChatFormat(tokenizer)
    train, held = split_qa(make_qa(N_STORIES, seed=1), n_heldout_stories=HELD_OUT)
    dialogs = [np.asarray(encode_example(e, tokenizer, chat)[0], dtype=np.uint16) for e in train]
    stories = encode_documents([s.text for s in make_stories(MIX_STORIES, seed=11)], tokenizer)
    for fraction in MIX_FRACTIONS:
        n_dialogs = int(fraction * len(stories) / (1 - fraction))
        docs = stories + dialogs[:n_dialogs]
        random.Random(0).shuffle(docs)
        data = TokenData(np.concatenate(docs), pack_documents(docs[:4], 256),
                         token_bytes(tokenizer))
        cfg = TrainConfig(steps=MIX_STEPS, batch_size=8, seq_len=256, lr=1e-3, min_lr=1e-4,
                          warmup_steps=10, eval_every=0, seed=0)
        torch.manual_seed(0)
        model = copy.deepcopy(base)
        start = time.perf_counter()
        Trainer(model, data, cfg, device="cpu").fit(progress=True)
        card = {"fraction_dialogs": fraction, "dialogs": n_dialogs, "stories": len(stories),
                "steps": MIX_STEPS, "train_config": cfg.__dict__, "torch_threads": threads,
                "seconds": round(time.perf_counter() - start, 1),
                "held_out_exact_by_kind": by_kind(model.eval(), tokenizer, chat, held)}
        print(json.dumps(card), flush=True)
        name = f"qa-mix-{round(100 * fraction)}"
        out, work = ROOT / "assets" / name, ROOT / "assets" / f".make-{name}"
        shutil.rmtree(work, ignore_errors=True)
        save_model(model, work, dtype=torch.float16, tokenizer="tokenizer.tiktoken")
        shutil.copy(ROOT / "assets" / "story-model" / "tokenizer.tiktoken", work)
        (work / "card.json").write_text(json.dumps(card, indent=1))
        (work / "README.md").write_text(f"""# {name}: the story model with {fraction:.0%} dialogs

Made by `make assets` (assets/make_qa_finetunes.py, `mixture`): the story model trained
{MIX_STEPS} more steps of 8 rows of 256 tokens (AdamW, 1e-3, warm-up and cosine) on
{len(stories):,} fresh stories (seed 11) and {n_dialogs:,} question-answer dialogs from chapter
07's training split, shuffled into one stream; {card['seconds']} s on {threads} CPU thread(s).
Held-out exact match by kind: {card['held_out_exact_by_kind']}. Weights in float16. Notebook
10 loads it with `load_pretrained("{name}")`.
""")
        shutil.rmtree(out, ignore_errors=True)
        work.rename(out)


if __name__ == "__main__":
    main()
    mixture()
