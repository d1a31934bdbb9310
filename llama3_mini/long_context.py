"""Chapter 08, long context: a trained model's RoPE table stretched to a longer context
(plain, or with Llama 3.1's scaling), the loss at each position, a name-recall probe at a
chosen distance, and the price of a long context in attention FLOPs."""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F

from .data import encode_documents
from .model import Transformer, evaluating, model_device
from .stories import NAMES, make_stories, nameless_sentence, story_start


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


@torch.no_grad()
def loss_by_position(model, rows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Mean next-token loss (nats) at each position over rows (n, seq + 1): (seq,)."""
    device = model_device(model)
    total = torch.zeros(rows.shape[1] - 1)
    with evaluating(model):
        for chunk in rows.split(batch_size):
            chunk = chunk.to(device)
            logits = model(chunk[:, :-1])  # (batch, seq, vocab)
            loss = F.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="none")
            total += loss.sum(0).cpu()  # (seq,)
    return total / len(rows)


def name_recall_probe(tokenizer, distance: int, n: int = 32, seed: int = 0):
    """n prompts that introduce a hero by name, then about `distance` tokens of sentences
    from the grammar that name nobody ("One day, the kite fell into the river."), ending
    where the grammar's next word is the hero's name (" Lily felt ...").

    Returns (tokens, query, answer): tokens (n, longest) right-padded with 0; query (n,)
    the position whose next-token prediction should be the name; answer (n,) the name's
    first token. The name was last seen about `distance` tokens before the query."""
    rng = random.Random(f"{seed}-{distance}")
    prompts, answers = [], []
    for _ in range(n):
        hero, thing = rng.choice(NAMES), rng.choice(["ball", "kite", "hat", "boat", "book"])
        color = rng.choice(["red", "blue", "green", "yellow"])
        # "Once upon a time, there was a little fox named Lily. Lily lived in a big forest.
        # Lily had a red kite. The kite was shiny."
        intro = story_start([("opening", "there was"), ("trait", "little"), ("kind", "fox"),
                             ("hero", hero), ("place", "a big forest"), ("have", "had"),
                             ("color", color), ("thing", thing), ("thing was", "shiny")])
        ids = tokenizer.encode(intro, bos=True)
        start = len(ids)
        while True:
            more = tokenizer.encode(nameless_sentence(rng, color, thing))
            if len(ids) + len(more) - start > distance and len(ids) > start:
                break
            ids += more
            if len(ids) - start >= distance:
                break
        prompts.append(ids)
        answers.append(tokenizer.encode(f" {hero}")[0])
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
