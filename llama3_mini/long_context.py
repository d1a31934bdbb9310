"""Chapter 08, long context: a trained model's RoPE table stretched to a longer context
(plain, or with Llama 3.1's scaling), the loss at each position (optionally with attention
limited to a window of recent tokens, so that it meets only the offsets it was trained on),
name-recall probes at a chosen distance (the hero, and a transfer probe: the friend, in
another template), and the price of a long context in FLOPs (attention's, the weights')."""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F

from .config import param_counts
from .data import encode_documents
from .model import Transformer, evaluating, model_device
from .stories import (
    FEELINGS,
    KINDS,
    NAMES,
    PLACES,
    REACTIONS,
    TRAITS,
    make_stories,
    nameless_sentence,
    story_start,
)


def stretch_context(args, target_len: int):
    """args for a model trained on windows of args.max_seq_len tokens, stretched to
    target_len with Llama 3.1's scaling: the factor target_len / trained length (the slowest
    pairs then turn no further over target_len than they did in training), the bands set
    by the trained length, Meta's low and high frequency factors (1 and 4)."""
    return args.replace(use_scaled_rope=True, rope_scaling_factor=target_len / args.max_seq_len,
                        rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                        rope_original_max_seq_len=args.max_seq_len, max_seq_len=target_len)


def with_context(model: Transformer, max_seq_len: int, scaling_factor: float | None = None,
                 original_max_seq_len: int | None = None, low_freq_factor: float = 1.0,
                 high_freq_factor: float = 4.0) -> Transformer:
    """The same weights behind a RoPE table of max_seq_len positions. With scaling_factor,
    Llama 3.1's scaling is on, relative to original_max_seq_len (default: the model's
    max_seq_len, the length it was trained at). RoPE has no weights, so nothing else changes."""
    old = model.params
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len ({max_seq_len}) must be positive")
    changes = dict(max_seq_len=max_seq_len, use_scaled_rope=scaling_factor is not None)
    if scaling_factor is not None:
        changes.update(rope_scaling_factor=scaling_factor, rope_low_freq_factor=low_freq_factor,
                       rope_high_freq_factor=high_freq_factor,
                       rope_original_max_seq_len=original_max_seq_len or old.max_seq_len)
    new = Transformer(old.replace(**changes))
    new.load_state_dict(model.state_dict())
    return new.to(model_device(model)).eval()


def story_rows(tokenizer, n_rows: int, length: int, seed: int = 1) -> torch.Tensor:
    """n_rows windows of length + 1 tokens, each starting at a story's <|begin_of_text|>
    and running on through the following stories (as in packed training data).
    Returns (n_rows, length + 1), int64."""
    per_row = length // 60 + 2  # stories are 80 to 230 tokens long: enough to fill a row
    stories = make_stories(n_rows * per_row, seed)
    encoded = encode_documents([s.text for s in stories], tokenizer)
    rows = []
    for r in range(n_rows):
        stream = np.concatenate(encoded[r * per_row:(r + 1) * per_row])
        rows.append(torch.from_numpy(stream[:length + 1].astype(np.int64)))
    return torch.stack(rows)


def window_mask(seqlen: int, window: int) -> torch.Tensor:
    """Additive causal mask (seqlen, seqlen) that lets each query see only the `window` most
    recent tokens, itself included: every offset it sees is below `window`.
    window_mask(3, 2) -> [[0, -inf, -inf], [0, 0, -inf], [-inf, 0, 0]]."""
    if window < 1:
        raise ValueError(f"window ({window}) must be at least 1")
    offset = torch.arange(seqlen)[:, None] - torch.arange(seqlen)[None, :]  # query - key
    return torch.zeros(seqlen, seqlen).masked_fill((offset < 0) | (offset >= window),
                                                   float("-inf"))


@torch.no_grad()
def loss_by_position(model, rows: torch.Tensor, batch_size: int = 8,
                     window: int | None = None) -> torch.Tensor:
    """Mean next-token loss (nats) at each position over rows (n, seq + 1): (seq,).
    With `window`, attention sees only the last `window` tokens (window_mask): the position
    grows, the largest offset attention meets does not."""
    device = model_device(model)
    total = torch.zeros(rows.shape[1] - 1)
    mask = None if window is None else window_mask(rows.shape[1] - 1, window).to(device)
    with evaluating(model):
        for chunk in rows.split(batch_size):
            chunk = chunk.to(device)
            logits = model(chunk[:, :-1], mask=mask)  # (batch, seq, vocab)
            loss = F.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="none")
            total += loss.sum(0).cpu()  # (seq,)
    return total / len(rows)


def name_recall_probe(tokenizer, distance: int, n: int = 32, seed: int = 0,
                      fact: str = "hero"):
    """n prompts that introduce a name, then about `distance` tokens of sentences from the
    grammar that name nobody ("One day, the kite fell into the river."), ending where the
    grammar's next word is that name.

    fact="hero" (the probe of chapter 08): "Once upon a time, there was a little fox named
    Lily. Lily lived in a big forest. Lily had a red kite. The kite was shiny." ... then the
    hero's name (" Lily felt ..."). fact="friend" (a transfer probe: another fact, another
    template): "Lily was a shy cat who lived in a dark cave. Lily had a red kite. The kite was
    shiny. Lily's best friend was a kind owl called Max." ... " Lily felt sad and cried."
    then the friend's name (" Max said, ..."), with the hero named just before the query.

    Returns (tokens, query, answer): tokens (n, longest) right-padded with 0; query (n,)
    the position whose next-token prediction should be the name; answer (n,) the name's
    first token. The name was last seen about `distance` tokens before the query."""
    if fact not in ("hero", "friend"):
        raise ValueError(f"fact must be 'hero' or 'friend', not {fact!r}")
    rng = random.Random(f"{seed}-{distance}" if fact == "hero" else f"{seed}-{distance}-{fact}")
    prompts, answers = [], []
    for _ in range(n):
        hero, thing = rng.choice(NAMES), rng.choice(["ball", "kite", "hat", "boat", "book"])
        color = rng.choice(["red", "blue", "green", "yellow"])
        if fact == "hero":
            intro = story_start([("opening", "there was"), ("trait", "little"), ("kind", "fox"),
                                 ("hero", hero), ("place", "a big forest"), ("have", "had"),
                                 ("color", color), ("thing", thing), ("thing was", "shiny")])
            name, last = hero, ""
        else:
            name = rng.choice([x for x in NAMES if x != hero])
            intro = story_start([
                ("opening", "lived in"), ("hero", hero), ("trait", rng.choice(TRAITS)),
                ("kind", rng.choice(KINDS)), ("place", rng.choice(PLACES)), ("have", "had"),
                ("color", color), ("thing", thing), ("thing was", "shiny"),
                ("friend form", "best friend"), ("friend trait", rng.choice(TRAITS)),
                ("friend kind", rng.choice(KINDS)), ("friend", name)])
            last = f" {hero} felt {rng.choice(FEELINGS)} and {rng.choice(REACTIONS)}."
        ids = tokenizer.encode(intro, bos=True)
        start, tail = len(ids), tokenizer.encode(last)
        while True:
            more = tokenizer.encode(nameless_sentence(rng, color, thing))
            if len(ids) + len(more) + len(tail) - start > distance and len(ids) > start:
                break
            ids += more
            if len(ids) + len(tail) - start >= distance:
                break
        prompts.append(ids + tail)
        answers.append(tokenizer.encode(f" {name}")[0])
    longest = max(len(p) for p in prompts)
    tokens = torch.zeros(n, longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p)
    query = torch.tensor([len(p) - 1 for p in prompts])
    return tokens, query, torch.tensor(answers)


@torch.no_grad()
def recall_accuracy(model, tokens: torch.Tensor, query: torch.Tensor,
                    answer: torch.Tensor) -> float:
    """Share of prompts whose greedy next token at the query position is the name."""
    device = model_device(model)
    with evaluating(model):
        logits = model(tokens.to(device))  # (n, longest, vocab); padding after the query unseen
    guess = logits[torch.arange(len(query)), query.to(device)].argmax(-1).cpu()
    return (guess == answer).float().mean().item()


def attention_flops(args, seq_len: int) -> float:
    """Floating-point operations of the attention scores and the weighted sum for one
    sequence of seq_len tokens, all layers: 2 matmuls of (seq x head_dim) by (head_dim x seq)
    per head, 2 flops per multiply-add, halved by the causal mask."""
    return 2 * 2 * args.n_layers * args.n_heads * args.head_dim * seq_len * seq_len / 2


def weight_flops(args, seq_len: int) -> float:
    """Floating-point operations of the weight matrices for one sequence of seq_len tokens:
    2 per weight of every matrix product (wq, wk, wv, wo, w1, w2, w3 in each layer, and the
    output layer, vocab x dim, tied to the embedding or not), as notebook 05 counts them. The
    input embedding is a lookup (no multiply-add) and the norms are not matrix products:
    neither is counted. Llama 3 8B: 2 x 7.50e9 = 1.50e10 per token, of 8.03e9 parameters."""
    counts = param_counts(args)
    output = args.vocab_size * args.dim
    return 2 * seq_len * (counts["attention"] + counts["feed_forward"] + output)
