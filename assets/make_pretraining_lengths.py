"""Chapter 07's "harder to fine-tune?" experiment (`make assets`, or
`python assets/make_pretraining_lengths.py`): one small Llama 3 pre-trained on the stories
with a constant learning rate, a checkpoint kept at each of TOKENS_PER_PARAM (pre-training
tokens per parameter), and each checkpoint fine-tuned with one recipe, chapter 07's
(the QA dialogs, full fine-tuning, FT_STEPS steps at FT_LR). For each: story bits per byte
before and after fine-tuning (what fine-tuning costs) and held-out exact match and answer
bits after it (what it gains).

The constant rate keeps the checkpoints comparable (a cosine schedule would leave the later
ones annealed and the earlier ones not). A small shape reaches tens of tokens per
parameter in minutes on a CPU; the story model, at 2.3, never gets there.

assets/pretraining-lengths/: checkpoints.safetensors (every checkpoint, float16, its keys
prefixed "<tokens per parameter>."), card.json (the table and the recipe), README.md."""
from __future__ import annotations

import copy
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama3_mini.checkpoint import load_pretrained, model_weights  # noqa: E402
from llama3_mini.config import get_preset, num_params  # noqa: E402
from llama3_mini.data import encode_documents, pack_documents, prepare_data, token_bytes  # noqa: E402
from llama3_mini.finetune import (  # noqa: E402
    encode_example,
    exact_match,
    finetune,
    make_batch,
    make_qa,
    sft_loss,
    split_qa,
)
from llama3_mini.model import Transformer  # noqa: E402
from llama3_mini.stories import make_stories  # noqa: E402
from llama3_mini.tokenizer import ChatFormat  # noqa: E402
from llama3_mini.train import TrainConfig, Trainer, evaluate_bpb  # noqa: E402

TOKENS_PER_PARAM = (1, 2, 4, 8, 16, 32, 64)
BATCH, SEQ_LEN, LR = 16, 256, 3e-3
FT_STEPS, FT_LR = 300, 1e-3


def shape(n_words: int):
    """dim 64, 2 layers: 0.25M parameters, most of them the embedding and output layers."""
    return get_preset("tiny").replace(dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                      vocab_size=n_words)


def main(threads: int = 1) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    _, tokenizer = load_pretrained("story-model", device="cpu")  # its tokenizer only
    chat = ChatFormat(tokenizer)
    args = shape(tokenizer.n_words)
    n_params = num_params(args)
    step_tokens = BATCH * SEQ_LEN
    saves = {t: round(t * n_params / step_tokens) for t in TOKENS_PER_PARAM}
    docs = [s.text for s in make_stories(40_000, seed=0)]
    data = prepare_data(docs, tokenizer, SEQ_LEN, val_fraction=0.01)
    cfg = TrainConfig(steps=max(saves.values()), batch_size=BATCH, seq_len=SEQ_LEN, lr=LR,
                      min_lr=LR, warmup_steps=30, eval_every=0, seed=0)
    trainer = Trainer(Transformer(args), data, cfg, device="cpu")
    stories = pack_documents(encode_documents([s.text for s in make_stories(24, seed=2)],
                                              tokenizer), 256)  # chapter 07's story check
    tbytes = token_bytes(tokenizer)
    train, held = split_qa(make_qa(2000, seed=1), n_heldout_stories=15)  # chapter 07's split
    encoded = [encode_example(e, tokenizer, chat) for e in train]
    checkpoints, rows, start = {}, [], time.perf_counter()
    while trainer.step < cfg.steps:
        trainer.train_step()
        for t, step in saves.items():
            if trainer.step == step:
                checkpoints[t] = copy.deepcopy(trainer.model).eval()
                print(f"{t} tokens per parameter at step {step}, "
                      f"{time.perf_counter() - start:.0f} s", flush=True)
    for t, model in checkpoints.items():
        before = evaluate_bpb(model, stories, tbytes)["val_bpb"]
        tuned = copy.deepcopy(model)
        torch.manual_seed(0)
        finetune(tuned, encoded, steps=FT_STEPS, batch_size=16, lr=FT_LR, progress=False)
        tuned.eval()
        inputs, targets = make_batch([encode_example(e, tokenizer, chat) for e in held])
        with torch.no_grad():
            bits = sft_loss(tuned, inputs, targets).item() / 0.6931471805599453
        rows.append({"tokens_per_param": t, "steps": saves[t], "story_bpb_before": round(before, 4),
                     "story_bpb_after": round(evaluate_bpb(tuned, stories, tbytes)["val_bpb"], 4),
                     "answer_bits_after": round(bits, 4),
                     "exact_match_after": exact_match(tuned, tokenizer, chat, held)})
        print(json.dumps(rows[-1]), flush=True)
    _save(checkpoints, rows, args, n_params, threads)


def _save(checkpoints, rows, args, n_params, threads) -> None:
    from safetensors.torch import save_file

    out = ROOT / "assets" / "pretraining-lengths"
    work = out.with_name(".make-pretraining-lengths")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tensors = {f"{t}.{k}": v for t, m in checkpoints.items()
               for k, v in model_weights(m, torch.float16).items()}
    save_file(tensors, str(work / "checkpoints.safetensors"))
    card = {"model_args": args.to_dict(), "parameters": n_params,
            "pretraining": f"make_stories(40000, seed=0), batch {BATCH} x {SEQ_LEN} tokens, "
                           f"AdamW at a constant {LR:g} after 30 warm-up steps",
            "finetuning": f"chapter 07's QA dialogs (make_qa(2000, seed=1) less 15 held-out "
                          f"stories), full fine-tuning, {FT_STEPS} steps of 16 at {FT_LR:g}",
            "torch_threads": threads, "rows": rows}
    (work / "card.json").write_text(json.dumps(card, indent=1))
    table = "\n".join(f"| {r['tokens_per_param']} | {r['story_bpb_before']} | "
                      f"{r['story_bpb_after']} | {r['answer_bits_after']} | "
                      f"{r['exact_match_after']:.0%} |" for r in rows)
    (work / "README.md").write_text(f"""# pretraining-lengths: checkpoints, fine-tuned alike

Made by `make assets` (assets/make_pretraining_lengths.py). A Llama 3 of {n_params:,}
parameters ({card['pretraining']}), kept at several pre-training lengths and each fine-tuned
with {card['finetuning']}. Weights in float16, one file.

| tokens per parameter | story bits per byte before | after | answer bits/token after | \
exact match after |
| --- | --- | --- | --- | --- |
{table}
""")
    shutil.rmtree(out, ignore_errors=True)
    work.rename(out)


if __name__ == "__main__":
    main()
