"""The 07b lab's measurement of why LoRA stays unsure (`make assets`, or
`python assets/make_token_rows.py`): the qa-lora recipe (rank 16 on all seven projections,
alpha 32, 1,500 steps of 16 dialogs at 3e-3, seed 0) run again with the output rows of the
reply tokens the pre-training stories (almost) never contain made trainable too
(`lora.train_token_rows`; VARIANTS names which layers), everything else alike. Plain LoRA is
the shipped qa-lora asset, made by the same recipe.

The rare tokens: those of the training replies that occur fewer than RARE times in the first
COUNT_STORIES pre-training stories (make_stories(COUNT_STORIES, seed=0), the story model's
corpus): pieces such as 'he', 'r', 'o' of " The hero" and <|eot_id|>, which the story model
never learned to predict (its BPE merges were learned on these stories, but the words they
build never occur there).

assets/lora-token-rows/: adapters.safetensors (float16; each variant's keys prefixed with its
name, spaces as underscores), card.json (the rare tokens; each run's seconds, loss every 50
steps, held-out exact match and bits per answer token) and README.md."""
from __future__ import annotations

import collections
import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from make_qa_finetunes import ALPHA, BATCH, HELD_OUT, N_STORIES, RANK, STEPS, TARGETS  # noqa: E402

from llama3_mini.checkpoint import load_pretrained  # noqa: E402
from llama3_mini.finetune import (  # noqa: E402
    encode_example,
    exact_match,
    finetune,
    make_batch,
    make_qa,
    sft_loss,
    split_qa,
)
from llama3_mini.lora import add_lora, lora_state_dict, train_token_rows  # noqa: E402
from llama3_mini.stories import make_stories  # noqa: E402
from llama3_mini.tokenizer import ChatFormat  # noqa: E402

LR, VAL_STORIES = 3e-3, 30  # qa-lora's chosen learning rate and validation split
RARE, COUNT_STORIES = 20, 2000
VARIANTS = {"output rows": ("output",)}  # add ("tok_embeddings", "output") to train both


def rare_reply_tokens(tokenizer, encoded, stories) -> dict[int, int]:
    """{token id: count in the stories} for the reply tokens the stories have fewer than RARE
    times. encoded: [(tokens, n_prompt)]; the reply is tokens[n_prompt:]."""
    in_stories = collections.Counter(t for s in stories
                                     for t in tokenizer.encode(s, bos=False, eos=False))
    in_replies = {t for tokens, n_prompt in encoded for t in tokens[n_prompt:]}
    return {t: in_stories[t] for t in sorted(in_replies) if in_stories[t] < RARE}


@torch.no_grad()
def answer_bits(model, encoded) -> float:
    inputs, targets = make_batch(encoded)
    return sft_loss(model.eval(), inputs, targets).item() / math.log(2)


def main(threads: int = 1) -> None:
    torch.set_num_threads(threads)
    base, tokenizer = load_pretrained("story-model", device="cpu")
    chat = ChatFormat(tokenizer)
    train, held = split_qa(make_qa(N_STORIES, seed=1), n_heldout_stories=HELD_OUT)
    train, _ = split_qa(train, n_heldout_stories=VAL_STORIES, seed=1)  # qa-lora's training set
    encoded = [encode_example(e, tokenizer, chat) for e in train]
    held_encoded = [encode_example(e, tokenizer, chat) for e in held]
    rare = rare_reply_tokens(tokenizer, encoded,
                             [s.text for s in make_stories(COUNT_STORIES, seed=0)])
    print("rare reply tokens:", {tokenizer.decode([t]): c for t, c in rare.items()}, flush=True)
    card = {"recipe": f"qa-lora's: LoRA rank {RANK}, alpha {ALPHA}, on {', '.join(TARGETS)}; "
                      f"{STEPS} steps of {BATCH} dialogs at {LR:g}, seed 0",
            "rare_tokens": {str(t): {"text": tokenizer.decode([t]), "count_in_stories": c}
                            for t, c in rare.items()},
            "rare_rule": f"reply tokens seen fewer than {RARE} times in make_stories("
                         f"{COUNT_STORIES}, seed=0)", "torch_threads": threads, "runs": {}}
    tensors = {}
    for name, modules in VARIANTS.items():
        torch.manual_seed(0)
        model = train_token_rows(add_lora(copy.deepcopy(base), TARGETS, rank=RANK, alpha=ALPHA),
                                 list(rare), modules)
        start = time.perf_counter()
        run = finetune(model, encoded, steps=STEPS, batch_size=BATCH, lr=LR, progress=True)
        losses = run["losses"]
        row = {"modules": list(modules), "trainable": run["trainable"],
               "seconds": round(time.perf_counter() - start, 1),
               "loss_every_50": [round(sum(losses[i:i + 50]) / 50, 4)
                                 for i in range(0, len(losses), 50)],
               "held_out_exact_match": exact_match(model.eval(), tokenizer, chat, held),
               "held_out_answer_bits": round(answer_bits(model, held_encoded), 4)}
        print(name, json.dumps({k: v for k, v in row.items() if k != "loss_every_50"}),
              flush=True)
        card["runs"][name] = row
        prefix = name.replace(" ", "_") + "."
        tensors.update({prefix + k: v.to(torch.float16).contiguous()
                        for k, v in lora_state_dict(model).items()})
    _save(card, tensors)


def _save(card: dict, tensors: dict) -> None:
    from safetensors.torch import save_file

    out = ROOT / "assets" / "lora-token-rows"
    work = out.with_name(".make-lora-token-rows")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    save_file(tensors, str(work / "adapters.safetensors"))
    (work / "card.json").write_text(json.dumps(card, indent=1, ensure_ascii=False))
    rows = "\n".join(f"| {name} | {r['trainable']:,} | {r['seconds']} | "
                     f"{r['held_out_exact_match']:.0%} | {r['held_out_answer_bits']} |"
                     for name, r in card["runs"].items())
    rare = ", ".join(f"{v['text']!r} ({v['count_in_stories']})"
                     for v in card["rare_tokens"].values())
    (work / "README.md").write_text(f"""# lora-token-rows: LoRA plus rows the base never learned

Made by `make assets` (assets/make_token_rows.py) on {card['torch_threads']} CPU thread(s).
Recipe: {card['recipe']} (plain LoRA is assets/qa-lora). Here the output rows (and, for
a run that names it, the embedding rows) of the rare reply tokens train too
({card['rare_rule']}; count in brackets): {rare}.

| LoRA plus | trainable | seconds | held-out exact match | bits per answer token |
| --- | --- | --- | --- | --- |
{rows}

adapters.safetensors holds each run's adapters and rows (float16), keys prefixed with the
run's name (spaces as underscores). The lab 07b_lab_output_rows loads them onto
`train_token_rows(add_lora(base, TARGETS, RANK, ALPHA), ids, modules)`.
""")
    shutil.rmtree(out, ignore_errors=True)
    work.rename(out)


if __name__ == "__main__":
    main()
