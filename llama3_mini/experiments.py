"""Measurements for chapters 08 (long context) and 10 (synthetic data), kept small so the
notebooks can build each idea by hand and then call these.

Chapter 08: a trained model's RoPE table stretched to a longer context (plain or with
Llama 3.1 scaling), loss by position, a name-recall probe at a chosen distance, and the
price of a long context. Chapter 10: the grammar's information by kind of choice, set
against a model's loss on the same bytes, and the diversity of a set of stories."""
from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from .data import (
    NAMES,
    PIECES,
    SPOTS,
    WHEN,
    _tell,
    encode_documents,
    make_stories,
)
from .model import Transformer


# ---------------------------------------------------------------------------------------------
# Chapter 08: long context.
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
    device = next(model.parameters()).device
    new = Transformer(old.replace(**changes))
    new.load_state_dict(model.state_dict())
    return new.to(device).eval()


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
    device = next(model.parameters()).device
    model.eval()
    total = torch.zeros(rows.shape[1] - 1)
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
        intro = (f"Once upon a time, there was a little fox named {hero}. {hero} lived in a "
                 f"big forest. {hero} had a {color} {thing}. The {thing} was shiny.")
        ids = tokenizer.encode(intro, bos=True)
        start = len(ids)
        while True:
            sentence = _nameless_sentence(rng, color, thing)
            more = tokenizer.encode(sentence)
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


def _nameless_sentence(rng: random.Random, color: str, thing: str) -> str:
    kind = rng.randrange(4)
    when = rng.choice(WHEN)
    if kind == 0:
        return f" {when} the {thing} fell into {rng.choice(SPOTS)}."
    if kind == 1:
        return f" {when} a strong wind blew the {color} {thing} into {rng.choice(SPOTS)}."
    if kind == 2:
        return f" {when} a naughty crow took the {color} {thing} away."
    return f" {when} the {thing} broke into {rng.choice(PIECES)} pieces."


@torch.no_grad()
def recall_accuracy(model, tokens: torch.Tensor, query: torch.Tensor,
                    answer: torch.Tensor) -> float:
    """Share of prompts whose greedy next token at the query position is the name."""
    device = next(model.parameters()).device
    model.eval()
    logits = model(tokens.to(device))  # (n, longest, vocab); padding after the query is unseen
    guess = logits[torch.arange(len(query)), query.to(device)].argmax(-1).cpu()
    return (guess == answer).float().mean().item()


def attention_flops(args, seq_len: int) -> float:
    """Floating-point operations of the attention scores and the weighted sum for one
    sequence of seq_len tokens, all layers: 2 matmuls of (seq x head_dim) by (head_dim x seq)
    per head, 2 flops per multiply-add, halved by the causal mask."""
    return 2 * 2 * args.n_layers * args.n_heads * args.head_dim * seq_len * seq_len / 2


# ---------------------------------------------------------------------------------------------
# Chapter 10: what a model learns from synthetic data.
KIND_OF_CHOICE = {
    "names": ("hero", "friend"),
    "places": ("place", "spot", "found at"),
    "structure": ("opening", "friend form", "problem", "more", "moral?"),
}
"""Kinds of choice; every other label (trait, kind, color, thing, ...) is "other words"."""


def choice_kind(label: str) -> str:
    for kind, labels in KIND_OF_CHOICE.items():
        if label in labels:
            return kind
    return "other words"


class _Record:
    """Replays a story's choices, recording each one's label, number of options, index of
    the option taken, bits, and how much text had been said when it was made."""

    def __init__(self, choices):
        self.choices, self.made, self.text = choices, [], ""

    def pick(self, label, options, weights=None):
        option = self.choices[len(self.made)][1]
        i = options.index(option)
        p = 1 / len(options) if weights is None else weights[i] / sum(weights)
        self.made.append((label, len(options), i, -math.log2(p), len(self.text)))
        return option

    def say(self, text):
        self.text += text


def _reach(text: str, forced: list[int]) -> int:
    """How far into text (in characters) the grammar can still follow it after the forced
    choices, over every way of making the choices after them; len(text) when some way
    reaches the end of text (the next token, <|end_of_text|>, decides)."""
    best, stack = 0, [list(forced)]
    while stack:
        prefix = stack.pop()
        replay = _Prefix(text, prefix)
        try:
            _tell(replay)
        except _Stop:
            pass
        except _Need as need:
            stack.extend(prefix + [i] for i in range(need.n_options))
            continue
        best = max(best, replay.pos)
        if best >= len(text):
            break
    return best


def choice_spans(story) -> list[tuple[int, int, str, float]]:
    """(start, end, label, bits) of each choice of a story: the characters of its text over
    which the choice becomes known. start is the first character at which some other option
    of the choice can no longer produce the text (the first that tells anything about it),
    end - 1 the first at which none can (from there on the choice is certain). A choice
    first told by the story's end has the span (len(text), len(text) + 1): the end-of-text
    token shows it. Example: "Otto was a ..." against "Once upon a time, ..." and
    "Long ago, ...": the opening is known from the characters "Ot" (start 0, end 2)."""
    record = _Record(story.choices)
    _tell(record)
    if record.text != story.text:
        raise ValueError("the story's choices do not make its text; pass a Story from "
                         "make_stories or parse_story")
    text, taken = story.text, [i for _, _, i, _, _ in record.made]
    spans = []
    for k, (label, n_options, i, bits, said) in enumerate(record.made):
        reach = [_reach(text, taken[:k] + [j]) for j in range(n_options) if j != i]
        first, last = (min(reach), max(reach)) if reach else (said, said)
        spans.append((first, last + 1, label, bits))
    return spans


@torch.no_grad()
def bits_by_kind(model, tokenizer, stories) -> dict[str, dict[str, float]]:
    """For each kind of choice: the grammar's information (bits) and the model's loss
    (bits) on the tokens that show those choices, summed over the stories, per story.
    A choice is shown by the tokens over which it becomes known (see choice_spans), so a
    model with the grammar's own probabilities pays each kind what the grammar gives it.
    Tokens that show no choice are "function words": the grammar gives them 0 bits.
    The end-of-text token shows the choices made last (no moral, no more episodes)."""
    device = next(model.parameters()).device if model is not None else None
    out: dict[str, dict[str, float]] = {}

    def add(kind, key, value):
        out.setdefault(kind, {"grammar": 0.0, "model": 0.0})[key] += value / len(stories)

    for story in stories:
        spans = choice_spans(story)
        for _, _, label, bits in spans:
            add(choice_kind(label), "grammar", bits)
        ids = tokenizer.encode(story.text, bos=True, eos=True)
        if model is None:
            continue
        x = torch.tensor([ids], device=device)
        logits = model(x[:, :-1])[0]  # (len - 1, vocab)
        nats = F.cross_entropy(logits, x[0, 1:], reduction="none").cpu()
        pos = 0
        for i, tid in enumerate(ids[1:]):
            n = len(tokenizer.decode_bytes([tid])) if tid != tokenizer.eos_id else 1
            hit = [s for s in spans if s[0] < pos + n and s[1] > pos]
            token_bits = nats[i].item() / math.log(2)
            # a token that shows several choices at once shares its loss between them by
            # their density, bits per character of their spans: a choice told in one
            # character takes more of that character's loss than one told over a word
            weight = [h[3] / (h[1] - h[0]) for h in hit]
            if sum(weight) == 0:  # it shows no choice that carries information
                add("function words", "model", token_bits)
            for s, w in zip(hit, weight, strict=True):
                if w:
                    add(choice_kind(s[2]), "model", token_bits * w / sum(weight))
            pos += n if tid != tokenizer.eos_id else 0
    out.setdefault("function words", {"grammar": 0.0, "model": 0.0})
    return out


def name_entropy_bits(names) -> float:
    """Entropy (bits) of the empirical distribution of a list of names."""
    counts = Counter(names)
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return -sum(c / total * math.log2(c / total) for c in counts.values())


def hero_of(text: str) -> str | None:
    """The hero's name in a story's first sentence, or None if it has none we know."""
    first = text.split(".")[0].replace(",", " ").split()
    names = [w for w in first if w in NAMES]
    return names[0] if names else None


def diversity(texts) -> dict[str, float]:
    """Share of distinct texts and the entropy (bits) of the heroes' names."""
    texts = list(texts)
    heroes = [h for h in map(hero_of, texts) if h is not None]
    return {"distinct": len(set(texts)) / max(1, len(texts)),
            "name_entropy": name_entropy_bits(heroes), "n": len(texts)}


def _token_starts(tokenizer, ids) -> list[int]:
    """Character offset where each token starts in the decoded text (ASCII stories)."""
    starts, pos = [], 0
    for tid in ids:
        starts.append(pos)
        pos += len(tokenizer.decode_bytes([tid]))
    return starts


@torch.no_grad()
def copy_accuracy(model, tokenizer, stories) -> float:
    """Share of the repeated mentions of the hero's and the friend's names (every mention
    after the first) whose first token the model predicts exactly (greedy). In this grammar
    each of those slots is decided by the story so far: the model has to copy the name."""
    device = next(model.parameters()).device
    model.eval()
    right = total = 0
    for story in stories:
        first = dict(reversed(story.choices))
        names = {first["hero"], first["friend"]}
        ids = tokenizer.encode(story.text, bos=True)
        starts = _token_starts(tokenizer, ids[1:])
        at = {s: i + 1 for i, s in enumerate(starts)}  # character offset -> index in ids
        logits = model(torch.tensor([ids], device=device))[0]  # (len, vocab)
        for name in names:
            for k, pos in enumerate(_word_offsets(story.text, name)):
                i = at.get(pos - 1 if pos > 0 and story.text[pos - 1] == " " else pos)
                if k == 0 or i is None:
                    continue  # the introduction is a choice, not a copy
                total += 1
                right += int(logits[i - 1].argmax().item() == ids[i])
    return right / max(1, total)


def _word_offsets(text: str, word: str) -> list[int]:
    out, pos = [], text.find(word)
    while pos >= 0:
        end = pos + len(word)
        if (pos == 0 or not text[pos - 1].isalpha()) and (end == len(text)
                                                          or not text[end].isalpha()):
            out.append(pos)
        pos = text.find(word, pos + 1)
    return out


class _Stop(Exception):
    pass


class _Need(Exception):
    def __init__(self, n_options: int):
        super().__init__(n_options)
        self.n_options = n_options


class _Prefix:
    """Replays forced choices, stopping at the first character that differs from target."""

    def __init__(self, target: str, forced: list[int]):
        self.target, self.forced, self.k, self.pos = target, forced, 0, 0

    def pick(self, label, options, weights=None):
        if self.k == len(self.forced):
            raise _Need(len(options))
        self.k += 1
        return options[self.forced[self.k - 1]]

    def say(self, text):
        rest = self.target[self.pos:self.pos + len(text)]
        if rest != text:
            pairs = zip(rest, text, strict=False)  # rest is shorter at the end of the target
            common = next((i for i, (a, b) in enumerate(pairs) if a != b), len(rest))
            self.pos += common
            raise _Stop
        self.pos += len(text)


def grammatical_prefix(text: str) -> float:
    """Share of a text's characters, from its start, that the grammar can produce: 1.0 for
    a grammatical story, less where a sample first goes wrong (a graded is_grammatical)."""
    if not text:
        return 0.0
    best, stack = 0, [[]]
    while stack:
        forced = stack.pop()
        replay = _Prefix(text, forced)
        try:
            _tell(replay)
        except _Stop:
            pass
        except _Need as need:
            stack.extend(forced + [i] for i in range(need.n_options))
            continue
        best = max(best, replay.pos)
        if best == len(text):
            break
    return best / len(text)
