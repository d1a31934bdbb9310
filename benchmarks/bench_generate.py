"""Generation speed: our KV cache against recomputing every step, against Hugging Face
`generate` (its own cache) on the same weights, and the chat path (chat.Conversation: the
prompt in the chat format, the reply streamed as text, token by token). Tiny preset (with the
story tokenizer's vocabulary), batch 1, a 16-token prompt (the chat's own: one short user
message in the chat format, its length printed), greedy decoding; one run of each, tokens per
second and ratios side by side.

    .venv/bin/python benchmarks/bench_generate.py [--lengths 128 512 1024] [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import torch

from llama3_mini.chat import Conversation
from llama3_mini.checkpoint import ASSETS, to_hf_model
from llama3_mini.config import get_preset, pick_device
from llama3_mini.generate import generate
from llama3_mini.model import Transformer
from llama3_mini.tokenizer import Tokenizer


def timed(fn):
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for all three (a tiny model decodes fastest on one)")
    parser.add_argument("--no-cache-max", type=int, default=1024,
                        help="skip recomputation above this many new tokens (it is quadratic)")
    parser.add_argument("--device", default=None)
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    device = pick_device(opts.device)
    torch.manual_seed(0)
    tokenizer = Tokenizer.load(ASSETS / "story-model" / "tokenizer.tiktoken")
    tokenizer.stop_tokens = set()  # a random model may say <|eot_id|>: every row makes n tokens
    args = get_preset("tiny").replace(max_seq_len=2048, vocab_size=tokenizer.n_words)
    model = Transformer(args).to(device).eval()
    hf = to_hf_model(model).to(device)
    prompt = torch.randint(0, args.vocab_size, (16,)).tolist()
    hf_ids = torch.tensor([prompt], device=device)
    hf_opts = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    generate(model, [prompt], 8)  # warm-up: first calls allocate and pick kernels
    generate(model, [prompt], 8, use_cache=False)
    hf.generate(hf_ids, max_new_tokens=8, min_new_tokens=8, **hf_opts)
    chat = Conversation(model, tokenizer, max_new_tokens=8)
    message = "Who is the hero of the story?"
    chat.reply(message)

    def chat_reply(n):
        chat.reset()  # the same short prompt every time
        chat.max_new_tokens = n
        for _piece in chat.send(message):  # streamed: each piece as its tokens complete
            pass
        return len(chat.reply_ids)

    print(f"tiny preset ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters), "
          f"batch 1, 16-token prompt ({len(chat.prompt_ids(message)[0])} in the chat format), "
          f"greedy; device {device}, {opts.threads} CPU thread(s); tokens per second, one run "
          "each")
    head = (f"{'new tokens':>10} | {'ours, cache':>11} | {'no cache':>9} | {'HF generate':>11} | "
            f"{'chat, streamed':>14} | {'cache/no cache':>14} | {'ours/HF':>7} | "
            f"{'chat/ours':>9} | {'chat/HF':>7} | same tokens as HF")
    print(head)
    print("-" * len(head))
    for n in opts.lengths:
        ours, t_cache = timed(lambda n=n: generate(model, [prompt], n)[0])
        theirs, t_hf = timed(lambda n=n: hf.generate(hf_ids, max_new_tokens=n, min_new_tokens=n,
                                                     **hf_opts)[0, 16:].tolist())
        n_chat, t_chat = timed(lambda n=n: chat_reply(n))
        assert n_chat == n, f"the chat made {n_chat} tokens, not {n}"
        if n <= opts.no_cache_max:
            _, t_none = timed(lambda n=n: generate(model, [prompt], n, use_cache=False))
            none_tps, ratio = f"{n / t_none:9.0f}", f"{t_none / t_cache:13.1f}x"
        else:
            none_tps, ratio = f"{'skipped':>9}", f"{'':>14}"
        print(f"{n:>10} | {n / t_cache:11.0f} | {none_tps} | {n / t_hf:11.0f} | "
              f"{n / t_chat:14.0f} | {ratio} | {t_hf / t_cache:6.1f}x | "
              f"{t_cache / t_chat:8.2f}x | {t_hf / t_chat:6.1f}x | {ours == theirs}")
    print("targets: cache/no cache >= 10x at 512 new tokens; ours/HF >= 1.5x; chat/ours >= 0.9x "
          "(streaming text costs little beside the model). Timings on a busy machine are "
          "noisy: compare ratios from one run only.")


if __name__ == "__main__":
    main()
