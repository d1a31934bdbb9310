"""The `llama3-mini` command: train-tokenizer, train, generate, info, export, chat.

    llama3-mini train-tokenizer --out runs/tok.tiktoken      # BPE on the story corpus
    llama3-mini train --out-dir runs/story --steps 300       # a model on the stories
    llama3-mini generate --checkpoint runs/story --prompt "Once upon a time"
    llama3-mini info --seq-len 8192                          # presets, params, KV cache
    llama3-mini export runs/story runs/story-hf              # a Hugging Face folder
    llama3-mini export --format gguf runs/story story.gguf   # one file for llama.cpp, Ollama
    llama3-mini chat                                         # talk to the QA fine-tune
    llama3-mini serve --port 8000                            # an OpenAI-compatible server
    python -m llama3_mini info                               # any command, the same way
    torchrun --nproc_per_node=8 -m llama3_mini.cli train ... # the same on 8 GPUs"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

STORY_VOCAB = 960  # BPE ranks: the story corpus has no pair left to merge beyond ~964
# `train --corpus FILE`'s defaults for a text of your own, chosen by the sweep in
# benchmarks/bench_train.py: the lowest validation bits per byte after 2 minutes on 2 CPU
# cores on 1 MB of English prose (2.24, against 2.56 for the tiny preset's shape at 256-token
# sequences; on 1 MB of Python 1.82 against 2.08). Flags on the command line override each.
TEXT_DEFAULTS = dict(shape=dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2), seq_len=128,
                     batch_size=16, vocab=2048, lr=3e-3)


def _positive(kind):
    """An argparse type: a number of `kind` above 0 (`--steps -5` is a usage error)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"expected a {'whole ' * (kind is int)}number "
                                             f"above 0, got {text!r}")
        return value
    return parse


def _corpus(args) -> tuple[list[str], object]:
    """(documents, stories or None) for --corpus: stories, stdlib, or a file/folder path."""
    from . import data

    if args.corpus == "stories":
        stories = data.make_stories(args.n_stories, args.seed)
        return [s.text for s in stories], stories
    if args.corpus == "stdlib":
        return data.python_stdlib_corpus(args.max_files), None
    errors = "replace" if args.replace_bad_bytes else "strict"
    docs = data.read_text_corpus(args.corpus, errors=errors, max_files=args.max_files)
    if not any(d.strip() for d in docs):
        raise ValueError(f"{args.corpus} is empty (or only white space): no text to train on")
    return docs, None


def _add_corpus_args(p) -> None:
    p.add_argument("--corpus", default="stories",
                   help="'stories' (the synthetic grammar, default), 'stdlib' (Python's own "
                        "source) or a UTF-8 text file or folder")
    p.add_argument("--n-stories", type=int, default=4000, help="stories to generate")
    p.add_argument("--max-files", type=int, default=None, help="at most this many files")
    p.add_argument("--replace-bad-bytes", action="store_true",
                   help="replace invalid UTF-8 with U+FFFD instead of stopping")
    p.add_argument("--seed", type=int, default=0, help="seed of the stories and the weights")


def _add_model_args(p, default: str, which: str) -> None:
    p.add_argument("--checkpoint", default=None,
                   help="a checkpoint or training folder, or Meta's or Hugging Face's "
                        "(anything llama3_mini.load reads; default: a pretrained model)")
    p.add_argument("--model", default=default,
                   help=f"the pretrained model to use without --checkpoint: {which}")


def _train_tokenizer(docs, vocab_size, out, progress=True):
    from .tokenizer import Tokenizer

    tokenizer = Tokenizer.train("\n".join(docs), vocab_size, progress=progress)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out)
    return tokenizer


def cmd_train_tokenizer(args) -> None:
    docs, _ = _corpus(args)
    vocab = args.vocab_size or (STORY_VOCAB if args.corpus == "stories" else 1024)
    tok = _train_tokenizer(docs, vocab, args.out, not args.quiet)
    n_bytes = sum(len(d.encode()) for d in docs[:200])
    n_tokens = sum(len(tok.encode(d)) for d in docs[:200])
    print(f"{tok!r} saved to {args.out}; {n_bytes / n_tokens:.2f} bytes per token")


def _train_defaults(args) -> None:
    """Fill in the flags left out. A text file or folder of your own gets TEXT_DEFAULTS (the
    tiny preset at that shape, unless --preset is given); the story corpus and the standard
    library keep the tiny preset with 256-token sequences. Each run has its own folder,
    runs/<corpus name>, and a folder is never resumed on another corpus."""
    own = args.corpus not in ("stories", "stdlib")
    d = TEXT_DEFAULTS if own else dict(shape={}, seq_len=256, batch_size=16, lr=2e-3,
                                        vocab=STORY_VOCAB if args.corpus == "stories" else 1024)
    for name, value in d["shape"].items():
        if getattr(args, name) is None and args.preset is None:
            setattr(args, name, value)
    for flag, key in (("seq_len", "seq_len"), ("batch_size", "batch_size"), ("lr", "lr"),
                      ("vocab_size", "vocab")):
        if getattr(args, flag) is None:
            setattr(args, flag, d[key])
    args.preset = args.preset or "tiny"
    name = "story" if args.corpus == "stories" else Path(args.corpus).stem or "corpus"
    args.out_dir = Path(args.out_dir or Path("runs") / name)
    corpus = args.corpus if not own else str(Path(args.corpus).resolve())
    mark = args.out_dir / "corpus.txt"
    if mark.exists() and mark.read_text().strip() != corpus:
        raise ValueError(f"{args.out_dir} holds a run on {mark.read_text().strip()}, not on "
                         f"{corpus}: pass another --out-dir for a new run")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    mark.write_text(corpus + "\n")


def cmd_train(args) -> None:
    import torch

    from .config import get_preset
    from .data import prepare_data, require_windows, split_documents
    from .model import Transformer
    from .scaling import law_for_train
    from .stories import entropy_bits_per_byte
    from .tokenizer import Tokenizer
    from .train import TrainConfig

    docs, stories = _corpus(args)
    shape = ("preset", "dim", "n_layers", "n_heads", "n_kv_heads")
    given = any(getattr(args, k) is not None for k in shape)
    law, recipe = law_for_train(args.max_minutes, given, args.corpus)
    for flag in (f for f in recipe if getattr(args, f) is None):  # the law's recipe fills in
        setattr(args, flag, recipe[flag])
    _train_defaults(args)
    out_dir = args.out_dir
    if args.tokenizer:
        tok_path = Path(args.tokenizer)
        if not tok_path.exists():
            raise SystemExit(f"error: tokenizer file {tok_path} not found; make one with "
                             "`llama3-mini train-tokenizer --out PATH` or leave --tokenizer out")
        tokenizer = Tokenizer.load(tok_path)
    else:
        tok_path = out_dir / "tokenizer.tiktoken"
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not tok_path.exists():
            raise SystemExit("error: under torchrun, train the tokenizer first (`llama3-mini "
                             "train-tokenizer --out PATH`) and pass --tokenizer PATH")
        train_docs = split_documents(docs, args.val_fraction)[0]  # validation stays unseen
        tokenizer = (Tokenizer.load(tok_path) if tok_path.exists() else _train_tokenizer(
            train_docs[:2000], args.vocab_size, tok_path, not args.quiet))
    if law is not None:  # the shape for --max-minutes at this machine's speed (kept on resume)
        from .scaling import resumed_shape, shape_for_minutes

        a = resumed_shape(out_dir) or shape_for_minutes(
            law, args.max_minutes, tokenizer.n_words, args.seq_len, args.batch_size,
            args.device, own_text=stories is None)
        args.dim, args.n_layers, args.n_heads, args.n_kv_heads = (a.dim, a.n_layers, a.n_heads,
                                                                  a.kv_heads)
    floor = (entropy_bits_per_byte(split_documents(stories, args.val_fraction)[1])
             if stories is not None else None)
    token_file = out_dir / f"train.rank{os.environ.get('RANK', '0')}.bin"
    data = prepare_data(docs, tokenizer, args.seq_len, args.val_fraction, token_file=token_file,
                        floor=floor, progress=not args.quiet)
    require_windows(len(data.train), args.seq_len, args.corpus,
                    sum(len(d.encode()) for d in docs), args.val_fraction)
    changes = {k: getattr(args, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads")
               if getattr(args, k) is not None}
    margs = get_preset(args.preset).replace(vocab_size=tokenizer.n_words, **changes)
    margs = margs.replace(max_seq_len=max(margs.max_seq_len, args.seq_len))
    torch.manual_seed(args.seed)
    steps = args.steps or (None if args.max_minutes else 300)  # --max-minutes alone: by time
    cfg = TrainConfig(steps=steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      seq_len=args.seq_len, lr=args.lr, min_lr=args.lr / 10,
                      warmup_steps=min(args.warmup_steps, steps or args.warmup_steps),
                      grad_clip=args.grad_clip,
                      eval_every=args.eval_every, save_every=args.save_every, seed=args.seed,
                      bf16=args.bf16, max_minutes=args.max_minutes,
                      fast_attention=not args.explicit_attention)
    from .parallel.trainer import make_trainer  # Trainer, or split by --tp/--cp/--dp-shard

    trainer = make_trainer(args, Transformer(margs), data, cfg, out_dir=out_dir,
                           tokenizer_path=tok_path.resolve(), device=args.device)
    if trainer.rank == 0 and trainer.step:
        print(f"resuming from {trainer.last_checkpoint} (step {trainer.step})")
    history = trainer.fit(progress=not args.quiet)
    if trainer.rank == 0:
        print(trainer.summary(history))


def _load(args):
    from .loader import load

    return load(args.checkpoint or args.model, device=args.device)


def cmd_generate(args) -> None:
    from .generate import generate
    from .stories import is_grammatical

    model, tokenizer = _load(args)
    prompt = [tokenizer.bos_id] + tokenizer.encode(args.prompt)
    outs = generate(model, [prompt] * args.num_samples, args.max_new_tokens,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    seed=args.seed, stop_tokens=[tokenizer.eos_id], truncate=True)
    for i, new in enumerate(outs):
        text = args.prompt + tokenizer.decode(new)
        mark = " [grammatical]" if args.check and is_grammatical(text) else ""
        print(f"--- sample {i + 1}{mark}\n{text}")


def cmd_info(args) -> None:
    from .config import PRESETS, GiB, get_preset, kv_cache_bytes, num_params, weight_bytes

    names = [args.preset] if args.preset else list(PRESETS)
    print(f"{'preset':<14}{'params':>16}{'weights ' + args.dtype:>18}"
          f"{'KV cache @ ' + str(args.seq_len):>20}")
    for name in names:
        a = get_preset(name)
        print(f"{name:<14}{num_params(a):>16,}{weight_bytes(a, args.dtype) / GiB:>14.3f} GiB"
              f"{kv_cache_bytes(a, args.seq_len, args.batch_size, args.dtype) / GiB:>16.3f} GiB")


def cmd_chat(args) -> None:
    from .chat import Conversation, run_chat

    model, tokenizer = _load(args)
    run_chat(Conversation(model, tokenizer, system=args.system, temperature=args.temperature,
                          top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                          seed=args.seed))


def cmd_serve(args) -> None:
    from .serve import serve  # an ImportError says which extra to install (main prints it)

    serve(args.checkpoint, host=args.host, port=args.port, model_id=args.model_id,
          device=args.device, max_queue=args.max_queue)  # None: the default


def cmd_export(args) -> None:
    if args.format == "gguf":
        from .gguf_export import export_gguf

        out = export_gguf(args.checkpoint, args.out_dir, dtype=args.dtype or "f16",
                          progress=not args.quiet)
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): run it with llama.cpp "
              f"(llama-cli -m {out}) or Ollama (a Modelfile with FROM {out})")
        return
    from .hub import export_hf

    out = export_hf(args.checkpoint, args.out_dir, dtype=args.dtype or "float32")
    print(f"wrote {out}: load it with transformers' LlamaForCausalLM.from_pretrained({str(out)!r})"
          " and AutoTokenizer.from_pretrained(...)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="llama3-mini", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer")
    _add_corpus_args(p)
    p.add_argument("--vocab-size", type=int, default=None,
                   help=f"BPE ranks (default {STORY_VOCAB} for stories, else 1024)")
    p.add_argument("--out", default="runs/tokenizer.tiktoken", help="the tokenizer file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train_tokenizer)

    p = sub.add_parser("train", help="train a model (resumes if --out-dir has a checkpoint)")
    _add_corpus_args(p)
    p.add_argument("--out-dir", default=None,
                   help="checkpoints and metrics.jsonl (default: runs/<corpus name>)")
    p.add_argument("--tokenizer", default=None,
                   help="a tokenizer file (default: train one into --out-dir)")
    p.add_argument("--vocab-size", type=_positive(int), default=None,
                   help=f"BPE ranks of the tokenizer trained into --out-dir (default "
                        f"{STORY_VOCAB} for stories, {TEXT_DEFAULTS['vocab']} otherwise)")
    p.add_argument("--preset", default=None,
                   help="model preset (see `llama3-mini info`; default: tiny, at the shape "
                        "chosen for your own text when --corpus is a file or folder)")
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"override the preset's {name}")
    p.add_argument("--steps", type=_positive(int), default=None,
                   help="optimizer steps (default 300; with --max-minutes alone, as many as fit)")
    p.add_argument("--batch-size", type=_positive(int), default=None,
                   help="sequences per step, all processes (default 16)")
    p.add_argument("--grad-accum", type=_positive(int), default=1, help="micro-batches per step")
    p.add_argument("--seq-len", type=_positive(int), default=None,
                   help=f"tokens per sequence (default 256; {TEXT_DEFAULTS['seq_len']} for "
                        "your own text)")
    p.add_argument("--lr", type=_positive(float), default=None,
                   help=f"peak learning rate (default 2e-3; {TEXT_DEFAULTS['lr']:g} for your "
                        "own text)")
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--max-minutes", type=_positive(float), default=None,
                   help="a time budget: the warm-up and the cosine decay are laid over it, and "
                        "the run ends at the floor learning rate when it is spent (evaluation "
                        "is not counted); a resumed run continues the same schedule. With no "
                        "shape flag (--preset, --dim, ...) the scaling law of chapter 06c "
                        "picks the shape for the budget at this machine's measured speed")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--explicit-attention", action="store_true",
                   help="the written-out attention instead of scaled_dot_product_attention")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best there is)")
    for flag, what in (("tp", "tensor"), ("cp", "context"), ("pp", "pipeline"),
                       ("dp-shard", "fully sharded data")):  # llama3_mini/parallel/
        p.add_argument("--" + flag, type=_positive(int), default=1,
                       help=f"{what}-parallel degree under torchrun (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="sample text from a checkpoint")
    _add_model_args(p, "story-model", "story-model (default) or byte-model")
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true", help="mark grammatical stories")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="presets: parameters, weight and KV-cache memory")
    p.add_argument("--preset", default=None, help="one preset (default: all)")
    p.add_argument("--seq-len", type=int, default=8192, help="tokens in the KV cache")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face folder or a GGUF "
                                      "file (llama.cpp, Ollama, LM Studio)")
    p.add_argument("checkpoint", help="a checkpoint folder, or a training run's (its newest)")
    p.add_argument("out_dir", help="the Hugging Face folder (or, with --format gguf, the "
                                   ".gguf file) to write")
    p.add_argument("--format", default="hf", choices=["hf", "gguf"],
                   help="hf: a Hugging Face folder (default); gguf: one file for llama.cpp")
    p.add_argument("--dtype", default=None,
                   choices=["float32", "bfloat16", "float16", "f32", "f16", "bf16", "q8_0",
                            "q5_0", "q4_0"],
                   help="the type the weights are stored in (hf: float32 by default; gguf: "
                        "f16 by default, or f32, bf16, q8_0, q5_0, q4_0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("chat", help="talk to a model in the terminal (Llama 3's chat format)")
    _add_model_args(p, "qa-full", "qa-full (default: it answers questions about a story "
                                  "given in your message), or any of `load_pretrained`'s")
    p.add_argument("--system", default=None, help="a system prompt (default: none)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling's p")
    p.add_argument("--max-new-tokens", type=_positive(int), default=128)
    p.add_argument("--seed", type=int, default=None, help="seed of the sampled replies")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="serve a model to OpenAI-compatible clients (chat API)")
    p.add_argument("--checkpoint", default=None,
                   help="a checkpoint or training folder (default: the pretrained qa-full)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; any "
                        "other exposes the model, unauthenticated, to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-id", default=None,
                   help="the model name clients ask for (default: the checkpoint's folder)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="requests that may wait while one is answered; past it, 429 "
                        "(default: serve.MAX_QUEUE, 16)")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as e:  # ImportError: a missing extra
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
