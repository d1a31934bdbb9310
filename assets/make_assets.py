"""Make the course's pretrained assets (`make assets`), deterministically, on a CPU:

- assets/story-model/: a BPE tokenizer and a small Llama 3 trained on the story corpus (about
  half an hour: its card records 1,620 s on one thread); chapters 03 and 06 on load it with
  `load_pretrained()`;
- assets/byte-model/: a byte-level Llama 3 that has memorised one paragraph about llamas
  (under a minute); chapter 05 generates with it: `load_pretrained("byte-model")`;
- assets/qa-full/ and assets/qa-lora/: the story model fine-tuned for 1,500 steps to answer
  questions, fully and with LoRA (make_qa_finetunes.py, ten to fifteen minutes); chapter 07;
- assets/pretraining-lengths/: a small model's checkpoints at 1 to 64 pre-training tokens per
  parameter, each fine-tuned alike (make_pretraining_lengths.py, about twelve minutes);
  chapter 07;
- assets/qa-mix-0/ and assets/qa-mix-25/: the story model trained on with 0% and 25% of its
  documents question-answer dialogs (make_qa_finetunes.py, `mixture`, two minutes);
  lab 10_lab_qa_mixture;
- assets/lora-token-rows/: qa-lora's recipe with the output rows of the reply tokens the
  stories never contain trainable too (make_token_rows.py, three to five minutes);
  lab 07b_lab_output_rows;
- assets/long-recall/: the story model stretched to 2,048 positions and fine-tuned to carry a
  name far (make_long_recall.py, two minutes); chapter 08;
- assets/collapse-seeds/: chapter 10's model-collapse chains for five more seeds, numbers only
  (make_collapse_seeds.py, five to ten minutes); chapter 10;
- assets/preference/: a post-training round (rejection sampling, DPO with Meta's formatting
  mask and NLL term, their ablations) from a 100-step SFT of the story model, and qa-lora
  after DPO (make_preference.py, ten minutes); chapter 07c;
- assets/scaling-laws/: an IsoFLOP sweep on the stories, the fitted law and a tested forecast,
  numbers only (make_scaling.py; its card gives the time); chapter 06c, and the law that
  `llama3-mini train --max-minutes` sizes its model by;
- assets/document-mask/: Llama 3's document mask, training with and without it at equal steps
  in pre-training and in chapter 08's continued training at 2,048 tokens, numbers only
  (make_document_mask.py, about fifteen minutes); chapter 08;
- assets/quantization/: quality against size, every quantization scheme of quantization.py
  and llama.cpp's GGUF types on the story model and qa-full, numbers only
  (make_quantization.py, about a minute of CPU); chapter 11b.

Each folder holds model.safetensors (float16), config.json, tokenizer.tiktoken, card.json and
README.md (the card). `--only byte-model` remakes one of them (the fine-tunes start from the
story model, so remaking it remakes them too)."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import make_collapse_seeds  # noqa: E402  (beside this file)
import make_document_mask  # noqa: E402
import make_long_recall  # noqa: E402
import make_preference  # noqa: E402
import make_pretraining_lengths  # noqa: E402
import make_qa_finetunes  # noqa: E402
import make_quantization  # noqa: E402
import make_scaling  # noqa: E402
import make_token_rows  # noqa: E402

from llama3_mini.checkpoint import load_model, save_model  # noqa: E402
from llama3_mini.config import get_preset, num_params  # noqa: E402
from llama3_mini.data import prepare_data, split_documents  # noqa: E402
from llama3_mini.generate import generate  # noqa: E402
from llama3_mini.model import Transformer  # noqa: E402
from llama3_mini.stories import entropy_bits_per_byte, is_grammatical, make_stories  # noqa: E402
from llama3_mini.tokenizer import Tokenizer  # noqa: E402
from llama3_mini.train import TrainConfig, Trainer, evaluate_bpb  # noqa: E402

N_STORIES = 40_000
VOCAB = 960  # BPE ranks; the stories have no pair left to merge beyond ~964
SEQ_LEN = 256


def model_args(n_words: int):
    """The asset's shape: the tiny preset at half the width (1.1M parameters), which learns
    more in ten CPU minutes than the full tiny preset does."""
    return get_preset("tiny").replace(dim=128, n_heads=4, n_kv_heads=2, n_layers=4,
                                      vocab_size=n_words)


# Chapter 05's paragraph: sentences that share beginnings ("The llama " goes on with "eats",
# "sleeps", "walks" or "emoji"), so the next-token distributions are split, plus an emoji and
# Chinese characters, whose UTF-8 bytes are several tokens each.
BYTE_TEXT = ("The llama eats grass on the hill. The alpaca sleeps in the barn. The llama walks "
             "to the river at dawn. The alpaca eats hay. The llama sleeps on the hill. The llama "
             "emoji is 🦙. A llama says hello, 你好! The alpaca walks to the barn at night. ")
BYTE_STEPS, BYTE_WINDOW = 300, 128


def byte_model(out: Path, threads: int) -> None:
    """A byte-level tokenizer (256 byte tokens, then Llama 3's special tokens) and a 0.9M-
    parameter Llama 3 (4 layers, 4 query heads, 2 KV heads) trained to memorise BYTE_TEXT.
    Every training window starts with <|begin_of_text|> at the start of a sentence, as every
    prompt in chapter 05 does: a model that never saw that token after training would not
    know what follows it."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tok = Tokenizer({bytes([b]): b for b in range(256)})
    text = BYTE_TEXT * 4
    data = torch.tensor(tok.encode(text))
    starts = [i for i in range(len(text.encode()) - BYTE_WINDOW)
              if i == 0 or text.encode()[i - 2:i] in (b". ", b"! ")]
    args = get_preset("tiny").replace(dim=128, n_layers=4, n_heads=4, n_kv_heads=2,
                                      vocab_size=tok.n_words, multiple_of=32)
    model = Transformer(args)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    bos = torch.full((16, 1), tok.bos_id)
    start = time.perf_counter()
    for step in range(BYTE_STEPS):
        i = torch.tensor(starts)[torch.randint(0, len(starts), (16,), generator=g)]
        window = torch.stack([data[j:j + BYTE_WINDOW] for j in i])  # (16, 128) bytes
        x = torch.cat([bos, window[:, :-1]], dim=1)  # <|begin_of_text|>, then the sentence
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), window.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == BYTE_STEPS - 1:
            print(f"byte-model step {step}: loss {loss.item():.4f} nats per byte", flush=True)
    seconds = time.perf_counter() - start
    work = out.with_name(".make-byte-model")
    save_model(model, work, dtype=torch.float16, tokenizer="tokenizer.tiktoken")
    tok.save(work / "tokenizer.tiktoken")
    card = {"model_args": args.to_dict(), "parameters": num_params(args),
            "weights_dtype": "float16", "corpus": "BYTE_TEXT in assets/make_assets.py",
            "text": BYTE_TEXT, "steps": BYTE_STEPS, "batch_size": 16,
            "window": f"<|begin_of_text|> + {BYTE_WINDOW - 1} bytes from a sentence start",
            "optimizer": "AdamW lr 3e-3, no weight decay, no schedule",
            "final_train_loss_nats": round(loss.item(), 4), "training_seconds": round(seconds, 1),
            "torch_threads": threads}
    (work / "card.json").write_text(json.dumps(card, indent=1, ensure_ascii=False))
    (work / "README.md").write_text(f"""# byte-model: chapter 05's model

A Llama 3 architecture ({card['parameters']:,} parameters: dim 128, 4 layers, 4 query heads,
2 KV heads) with a byte-level vocabulary (256 bytes + 256 special tokens), trained by
`make assets` (assets/make_assets.py, `byte_model`) for {BYTE_STEPS} steps of 16 windows to
memorise one paragraph:

> {BYTE_TEXT.strip()}

Every window starts with `<|begin_of_text|>` at a sentence start. Final training loss
{card['final_train_loss_nats']} nats per byte; {card['training_seconds']} s on
{threads} CPU thread(s). Weights in float16.
Load with `model, tokenizer = llama3_mini.checkpoint.load_pretrained("byte-model")`.
""")
    shutil.rmtree(out, ignore_errors=True)
    work.rename(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; the weights are reproducible for a fixed count "
                             "(1 is also the fastest on a shared 2-core machine)")
    parser.add_argument("--out", default=str(ROOT / "assets" / "story-model"))
    parser.add_argument("--samples", type=int, default=40, help="samples to score")
    parser.add_argument("--only", choices=["story-model", "byte-model", "qa-finetunes",
                                           "pretraining-lengths", "long-recall",
                                           "lora-token-rows", "collapse-seeds",
                                           "preference", "scaling-laws", "document-mask",
                                           "quantization"],
                        help="remake only this asset (default: both)")
    args = parser.parse_args(argv)
    if args.only != "story-model":
        byte_model(Path(args.out).with_name("byte-model"), args.threads)
    if args.only == "byte-model":
        return
    if args.only == "qa-finetunes":
        make_qa_finetunes.main(args.threads)
        return make_qa_finetunes.mixture(args.threads)
    one = {"pretraining-lengths": make_pretraining_lengths.main,
           "long-recall": make_long_recall.main, "collapse-seeds": make_collapse_seeds.main,
           "lora-token-rows": make_token_rows.main, "preference": make_preference.main,
           "scaling-laws": make_scaling.main, "document-mask": make_document_mask.main,
           "quantization": make_quantization.main}
    if args.only in one:
        one[args.only](args.threads)
        return
    torch.set_num_threads(args.threads)  # the same arithmetic, so the same weights
    torch.manual_seed(0)
    work = Path(args.out).with_name(".make-assets")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    stories = make_stories(N_STORIES, seed=0)
    docs = [s.text for s in stories]
    tokenizer = Tokenizer.train("\n".join(docs[:2000]), VOCAB, progress=True)
    tokenizer.save(work / "tokenizer.tiktoken")
    floor = entropy_bits_per_byte(split_documents(stories, 0.01)[1])
    data = prepare_data(docs, tokenizer, SEQ_LEN, val_fraction=0.01, floor=floor,
                        token_file=work / "train.bin", progress=True)
    cfg = TrainConfig(steps=args.steps, batch_size=16, seq_len=SEQ_LEN, lr=3e-3, min_lr=3e-4,
                      warmup_steps=30, eval_every=150, seed=0)
    trainer = Trainer(Transformer(model_args(tokenizer.n_words)), data, cfg, out_dir=work / "run",
                      device="cpu")
    start = time.perf_counter()
    trainer.fit(progress=True, callback=_print_evals)
    seconds = time.perf_counter() - start

    out = Path(args.out)
    save_model(trainer.model, work / "story-model", dtype=torch.float16,
               tokenizer="tokenizer.tiktoken")
    shutil.copy(work / "tokenizer.tiktoken", work / "story-model" / "tokenizer.tiktoken")
    model, _ = load_model(work / "story-model", device="cpu")  # what learners will load
    val = evaluate_bpb(model, data.val_rows, data.token_bytes)
    outs = generate(model, [[tokenizer.bos_id]] * args.samples, 300, temperature=1.0, seed=0,
                    stop_tokens=[tokenizer.eos_id])
    good = sum(is_grammatical(tokenizer.decode(o)) for o in outs)
    card = {"model_args": model.params.to_dict(), "parameters": num_params(model.params),
            "weights_dtype": "float16", "corpus": f"make_stories({N_STORIES}, seed=0)",
            "tokenizer_ranks": tokenizer.n_ranks, "train_config": cfg.__dict__,
            "tokens_seen": trainer.tokens_seen, "training_seconds": round(seconds, 1),
            "torch_threads": args.threads, "val_bits_per_byte": round(val["val_bpb"], 5),
            "floor_bits_per_byte": round(floor, 5),
            "val_over_floor": round(val["val_bpb"] / floor, 4),
            "grammatical_samples": f"{good}/{args.samples} at temperature 1.0",
            "sample": tokenizer.decode(outs[0])}
    (work / "story-model" / "card.json").write_text(json.dumps(card, indent=1))
    (work / "story-model" / "README.md").write_text(_card_markdown(card))
    shutil.rmtree(out, ignore_errors=True)
    (work / "story-model").rename(out)
    shutil.rmtree(work)
    print(json.dumps({k: v for k, v in card.items() if k not in ("model_args", "train_config")},
                     indent=1))
    make_qa_finetunes.main(args.threads)  # they start from the story model just made
    make_qa_finetunes.mixture(args.threads)
    make_token_rows.main(args.threads)
    make_pretraining_lengths.main(args.threads)  # with its tokenizer
    make_long_recall.main(args.threads)
    make_collapse_seeds.main(args.threads)
    make_preference.main(args.threads)  # from the story model and qa-lora
    make_scaling.main(args.threads)
    make_document_mask.main(args.threads)  # from the story model
    make_quantization.main(args.threads)  # from the story model and qa-full


def _print_evals(trainer) -> None:
    row = trainer.history[-1]
    if "val_bpb" in row:
        print(f"step {row['step']}: val {row['val_bpb']:.4f} bits per byte "
              f"(floor {trainer.data.floor:.4f}), {row['seconds']:.0f} s", flush=True)


def _card_markdown(card: dict) -> str:
    a = card["model_args"]
    return f"""# story-model: the course's pretrained Llama 3

A Llama 3 architecture ({card['parameters']:,} parameters: dim {a['dim']}, {a['n_layers']}
layers, {a['n_heads']} query heads, {a['n_kv_heads']} KV heads, vocabulary {a['vocab_size']})
trained from scratch on the synthetic story corpus ({card['corpus']}), made by
`make assets` (assets/make_assets.py) with {card['torch_threads']} CPU thread(s).

| | |
| --- | --- |
| tokens seen | {card['tokens_seen']:,} |
| training time | {card['training_seconds']} s |
| validation bits per byte | {card['val_bits_per_byte']} |
| entropy floor (bits per byte) | {card['floor_bits_per_byte']} |
| validation / floor | {card['val_over_floor']} |
| grammatical samples | {card['grammatical_samples']} |

Weights are stored in float16 (the numbers above are measured after that rounding).
Load with `model, tokenizer = llama3_mini.checkpoint.load_pretrained()`.

A sample: {card['sample']}
"""


if __name__ == "__main__":
    main()
