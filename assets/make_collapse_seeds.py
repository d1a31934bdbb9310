"""Chapter 10's model-collapse chains over several seeds (`make assets`, or
`python assets/make_collapse_seeds.py`): the notebook runs one seed live; this runs the same
two chains for SEEDS other seeds, so the notebook can show the spread before it reads an
ordering into one run.

Each chain starts from the story model. Every generation writes N_SAMPLES stories
(temperature TEMPERATURE); the next generation is the previous one trained for STEPS more
steps (8 rows of 256 tokens, AdamW at 1e-3 to 1e-4 after 5 warm-up steps) on those stories
alone ("own samples only"), or on N_REAL of them replaced by fresh stories from the grammar
("half real stories"). Per generation: the entropy of the heroes' names, the share of
distinct stories and the grammatical prefix of the samples. No weights are kept.

assets/collapse-seeds/: card.json (the recipe and every seed's rows), README.md."""
from __future__ import annotations

import copy
import json
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama3_mini.checkpoint import load_pretrained  # noqa: E402
from llama3_mini.data import TokenData, encode_documents, pack_documents, token_bytes  # noqa: E402
from llama3_mini.generate import generate  # noqa: E402
from llama3_mini.stories import grammatical_prefix, make_stories  # noqa: E402
from llama3_mini.synthetic import diversity  # noqa: E402
from llama3_mini.train import TrainConfig, Trainer  # noqa: E402

SEEDS = range(1, 6)  # the notebook's live run is seed 0
GENERATIONS, N_SAMPLES, N_REAL, STEPS, TEMPERATURE = 4, 64, 32, 20, 0.8
CHAINS = {"own samples only": 0, "half real stories": N_REAL}


def _train(model, tokenizer, texts, seed):
    encoded = encode_documents(texts, tokenizer)
    random.Random(seed).shuffle(encoded)
    data = TokenData(np.concatenate(encoded), pack_documents(encoded[:4], 256),
                     token_bytes(tokenizer))
    cfg = TrainConfig(steps=STEPS, batch_size=8, seq_len=256, lr=1e-3, min_lr=1e-4,
                      warmup_steps=5, eval_every=0, seed=seed)
    m = copy.deepcopy(model)
    Trainer(m, data, cfg, device="cpu").fit(progress=False)
    return m.eval()


def chain(base, tokenizer, n_real: int, seed: int) -> list[dict]:
    real = [s.text for s in make_stories(N_SAMPLES, seed=1000 + seed)]
    rows, m = [], base
    for generation in range(GENERATIONS):
        out = generate(m, [[tokenizer.bos_id]] * N_SAMPLES, 250, temperature=TEMPERATURE,
                       seed=100 * seed + generation, stop_tokens=[tokenizer.eos_id])
        texts = [tokenizer.decode(ids) for ids in out]
        d = diversity(texts)
        rows.append({"name_entropy": round(d["name_entropy"], 4),
                     "distinct": round(d["distinct"], 4),
                     "prefix": round(float(np.mean([grammatical_prefix(t) for t in texts])), 4)})
        if generation < GENERATIONS - 1:
            docs = texts[: N_SAMPLES - n_real] + real[:n_real]
            m = _train(m, tokenizer, docs, 100 * seed + generation)
    return rows


def main(threads: int = 1) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    base, tokenizer = load_pretrained("story-model", device="cpu")
    start, runs = time.perf_counter(), {name: {} for name in CHAINS}
    for seed in SEEDS:
        for name, n_real in CHAINS.items():
            runs[name][seed] = chain(base, tokenizer, n_real, seed)
            print(seed, name, [r["name_entropy"] for r in runs[name][seed]],
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    card = {"from": "story-model", "seeds": list(SEEDS), "generations": GENERATIONS,
            "samples": N_SAMPLES, "temperature": TEMPERATURE, "steps_per_generation": STEPS,
            "real_in_half_real_chain": N_REAL, "torch_threads": threads,
            "seconds": round(time.perf_counter() - start, 1), "runs": runs}
    out, work = ROOT / "assets" / "collapse-seeds", ROOT / "assets" / ".make-collapse-seeds"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "card.json").write_text(json.dumps(card, indent=1))
    lines = "\n".join(f"| {name} | " + " | ".join(
        f"{min(r[g]['name_entropy'] for r in rows.values()):.2f} to "
        f"{max(r[g]['name_entropy'] for r in rows.values()):.2f}" for g in range(GENERATIONS))
        + " |" for name, rows in runs.items())
    title = f"collapse-seeds: chapter 10's collapse chains, {len(SEEDS)} seeds"
    (work / "README.md").write_text(f"""# {title}

Made by `make assets` (assets/make_collapse_seeds.py) in {card['seconds']} s on {threads} CPU
thread(s). From the story model, {GENERATIONS} generations of {N_SAMPLES} samples at temperature
{TEMPERATURE:g}, each next generation trained {STEPS} steps on the last one's samples alone or
with {N_REAL} of them replaced by fresh real stories; seeds {SEEDS[0]} to {SEEDS[-1]} (the
notebook runs seed 0 live). No weights: card.json holds every seed's rows. The range of the
heroes' name entropy (bits) over the seeds, by generation:

| chain | {' | '.join(f'generation {g}' for g in range(GENERATIONS))} |
| --- | {' | '.join('---' for _ in range(GENERATIONS))} |
{lines}
""")
    shutil.rmtree(out, ignore_errors=True)
    work.rename(out)


if __name__ == "__main__":
    main()
