"""Chapter 08's long-context fine-tune (`make assets`, or `python assets/make_long_recall.py`):
the story model stretched to 2,048 positions with Llama 3.1's RoPE scaling (factor 8 over its
256 trained positions), then fine-tuned on documents in which a name must be carried far:
a hero introduced by name, then 100 to 1,800 tokens of the grammar's sentences that name
nobody, then the hero's name again, the one token the loss counts (`finetune` with the
prompt masked). The probes of notebook 08 use seed 0; these documents use seeds 1000 on.

assets/long-recall/: model.safetensors (float16), config.json (with the scaling settings),
tokenizer.tiktoken, card.json, README.md; `load_pretrained("long-recall")`."""
from __future__ import annotations

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
from llama3_mini.finetune import finetune  # noqa: E402
from llama3_mini.long_context import name_recall_probe, with_context  # noqa: E402

LONG, TRAINED, FACTOR = 2048, 256, 8.0
STEPS, BATCH, LR, GAPS = 60, 4, 5e-4, (100, 1800)


def main(threads: int = 1) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    base, tokenizer = load_pretrained("story-model", device="cpu")
    model = with_context(base, LONG, scaling_factor=FACTOR, original_max_seq_len=TRAINED)
    rng, encoded = random.Random(1), []
    for i in range(STEPS * BATCH // 4 + 8):  # four documents per seed and gap
        tokens, query, answer = name_recall_probe(tokenizer, rng.randint(*GAPS), n=4,
                                                  seed=1000 + i)
        for r in range(4):
            prompt = tokens[r, : query[r] + 1].tolist()
            encoded.append((prompt + [answer[r].item()], len(prompt)))
    start = time.perf_counter()
    run = finetune(model, encoded, steps=STEPS, batch_size=BATCH, lr=LR, progress=True)
    card = {"from": "story-model", "max_seq_len": LONG, "rope_scaling_factor": FACTOR,
            "rope_original_max_seq_len": TRAINED, "documents": len(encoded),
            "gap_tokens": GAPS, "steps": STEPS, "batch_size": BATCH, "lr": LR,
            "seconds": round(time.perf_counter() - start, 1), "torch_threads": threads,
            "final_loss": round(sum(run["losses"][-10:]) / 10, 4)}
    out, work = ROOT / "assets" / "long-recall", ROOT / "assets" / ".make-long-recall"
    shutil.rmtree(work, ignore_errors=True)
    save_model(model, work, dtype=torch.float16, tokenizer="tokenizer.tiktoken")
    shutil.copy(ROOT / "assets" / "story-model" / "tokenizer.tiktoken", work)
    (work / "card.json").write_text(json.dumps(card, indent=1))
    (work / "README.md").write_text(f"""# long-recall: the story model, tuned to carry a name far

Made by `make assets` (assets/make_long_recall.py): the story model with Llama 3.1's RoPE
scaling (factor {FACTOR:g} over {TRAINED} trained positions, {LONG} positions in all), then
{STEPS} steps of {BATCH} documents in which the hero's name returns after {GAPS[0]} to
{GAPS[1]} tokens that name nobody, the loss on that name only; AdamW at {LR:g} with the
Trainer's warm-up and cosine, {card['seconds']} s on {threads} CPU thread(s). Weights in
float16. Notebook 08 loads it with `load_pretrained("long-recall")`.
""")
    shutil.rmtree(out, ignore_errors=True)
    work.rename(out)
    print(json.dumps(card))


if __name__ == "__main__":
    main()
