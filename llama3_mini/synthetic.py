"""Chapter 10, what a model learns from synthetic data: the grammar's information by kind
of choice set against a model's loss on the same bytes, how well a model copies names from
context and which heads do it (chapter 03's probe, for every head), the diversity of a set of
stories (distinct texts, the entropy of the heroes' names), Wilson's interval for a share
measured on n samples, and the names a next generation trains on when a model writes its data
(model collapse, in its simplest form)."""
from __future__ import annotations

import math
from collections import Counter

import torch
import torch.nn.functional as F

from .model import evaluating, model_device
from .stories import choice_spans, first_choices, hero_of

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


@torch.no_grad()
def bits_by_kind(model, tokenizer, stories) -> dict[str, dict[str, float]]:
    """For each kind of choice: the grammar's information (bits) and the model's loss
    (bits) on the tokens that show those choices, summed over the stories, per story.
    A choice is shown by the tokens over which it becomes known (see choice_spans), so a
    model with the grammar's own probabilities pays each kind what the grammar gives it.
    Tokens that show no choice are "function words": the grammar gives them 0 bits.
    The end-of-text token shows the choices made last (no moral, no more episodes)."""
    out: dict[str, dict[str, float]] = {}

    def add(kind, key, value):
        out.setdefault(kind, {"grammar": 0.0, "model": 0.0})[key] += value / len(stories)

    for story in stories:
        spans = choice_spans(story)
        for _, _, label, bits in spans:
            add(choice_kind(label), "grammar", bits)
        if model is None:
            continue
        ids = tokenizer.encode(story.text, bos=True, eos=True)
        x = torch.tensor([ids], device=model_device(model))
        with evaluating(model):
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
    """Entropy (bits) of the empirical distribution of a list of names:
    ["Lily", "Lily", "Tom", "Mia"] -> 1.5 (0.0 for an empty list)."""
    counts = Counter(names)
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return -sum(c / total * math.log2(c / total) for c in counts.values())


def diversity(texts) -> dict[str, float]:
    """Share of distinct texts and the entropy (bits) of the heroes' names (those the
    grammar can read: see stories.hero_of)."""
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
    device = model_device(model)
    right = total = 0
    for story in stories:
        first = first_choices(story.choices)
        names = {first["hero"], first["friend"]}
        ids = tokenizer.encode(story.text, bos=True)
        starts = _token_starts(tokenizer, ids[1:])
        at = {s: i + 1 for i, s in enumerate(starts)}  # character offset -> index in ids
        with evaluating(model):
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
    """Where `word` starts as a whole word: ("Bo and Bob", "Bo") -> [0]."""
    out, pos = [], text.find(word)
    while pos >= 0:
        end = pos + len(word)
        if (pos == 0 or not text[pos - 1].isalpha()) and (end == len(text)
                                                          or not text[end].isalpha()):
            out.append(pos)
        pos = text.find(word, pos + 1)
    return out


# ------------------------------------------------ when things are learned (pretraining-lengths)
def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's score interval for a share k / n (95% with z = 1.96): the range of true shares
    that k successes in n draws do not rule out. Unlike k/n ± z·sqrt(p(1-p)/n) it stays inside
    [0, 1] and is not empty at k = 0: (0, 20) -> (0.0, 0.161); (81, 263) -> (0.255, 0.366)."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k ({k}) <= n ({n}) and n > 0")
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def name_mentions(tokenizer, ids, text: str, word: str) -> list[list[int]]:
    """For each occurrence of `word` in `text` (which `ids` encode, without <|begin_of_text|>):
    the indices of the tokens that hold part of it. ("Bo met Bo", " Bo") -> [[2]] when the
    tokens are "Bo", " met", " Bo"."""
    ends, pos = [], 0
    for tid in ids:
        pos += len(tokenizer.decode_bytes([tid]))
        ends.append(pos)
    raw, w, out = text.encode(), word.encode(), []
    starts = [0, *ends[:-1]]
    at = raw.find(w)
    while at >= 0:
        out.append([i for i, (s, e) in enumerate(zip(starts, ends, strict=True))
                    if e > at and s < at + len(w)])
        at = raw.find(w, at + 1)
    return out


def copying_probe(model, tokenizer, stories, attention_weights, min_gap: int = 8) -> dict:
    """Chapter 03's probe of copying heads, for every head at once. The query is the token just
    before a later mention of the hero's friend (it must predict the name), at least `min_gap`
    tokens after the friend's previous mention; each head's attention from it is summed over
    the friend's earlier mentions ("friend": copying), the hero's mentions so far ("hero": a
    name, the wrong one), the token before the query ("previous") and the first token
    ("first"), then averaged over the queries. `attention_weights(model, tokens)` gives
    (n_layers, n_heads, seq, seq) (widgets.attention_weights).
    Returns {"friend", "hero", "previous", "first": (n_layers, n_heads), "queries": n}."""
    p = model.params
    probe = {k: torch.zeros(p.n_layers, p.n_heads) for k in ("friend", "hero", "previous", "first")}
    n = 0
    for story in stories:
        first = first_choices(story.choices)
        ids = tokenizer.encode(story.text)
        weights = attention_weights(model, torch.tensor(ids))  # (layers, heads, seq, seq)
        friend = name_mentions(tokenizer, ids, story.text, " " + first["friend"])
        hero = name_mentions(tokenizer, ids, story.text, first["hero"])
        for k in range(1, len(friend)):
            query = friend[k][0] - 1  # its next token is the friend's name
            earlier = sorted({i for m in friend[:k] for i in m})
            if query - earlier[-1] < min_gap:
                continue
            heroes = sorted({i for m in hero for i in m if i < query})
            probe["friend"] += weights[:, :, query, earlier].sum(-1)
            probe["hero"] += weights[:, :, query, heroes].sum(-1)
            probe["previous"] += weights[:, :, query, query - 1]
            probe["first"] += weights[:, :, query, 0]
            n += 1
    if n == 0:
        raise ValueError("no query: give stories whose friend is named again "
                         f"at least {min_gap} tokens after a mention")
    return {**{k: v / n for k, v in probe.items()}, "queries": n}


def next_name_distribution(p: torch.Tensor, temperature: float, real_share: float = 0.0,
                           real_p: torch.Tensor | None = None) -> torch.Tensor:
    """The distribution of names in the next generation's training data, when a model whose
    names follow p writes (1 - real_share) of it by sampling at `temperature` and real stories
    (names following real_p) make up the rest. Sampling at temperature T divides the logits,
    log p, by T, so the model's share follows p ** (1 / T), renormalised; the real share is
    mixed in as it is. A model that learned its data exactly would follow the result.

    p = [0.5, 0.25, 0.25], T = 0.5, no real data -> [0.667, 0.167, 0.167] (the likely name
    gains); the same with half real, uniform stories -> [0.5, 0.25, 0.25]."""
    p = torch.as_tensor(p, dtype=torch.float64)
    sampled = torch.softmax(torch.log(p) / temperature, dim=-1)  # exp(log p / T), normalised
    if real_share == 0.0:
        return sampled
    if real_p is None:
        raise ValueError("real_share > 0 needs real_p, the names' distribution in real stories")
    return (1 - real_share) * sampled + real_share * torch.as_tensor(real_p, dtype=torch.float64)
