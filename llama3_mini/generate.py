"""Generation: prefill the prompt in one forward pass, then decode one token at a time
from the KV cache; choose each token greedily or by sampling (temperature, top-k, top-p);
stop at a stop token or at the token budget; stream text without splitting a character.

Prompts of different lengths share a batch by left-padding: every prompt ends at the same
position, a mask hides the padding from every real query, and since RoPE depends only on
the distance between positions, a padded prompt sees exactly what it would see alone."""
from __future__ import annotations

import codecs
from typing import Iterator, NamedTuple

import torch
from tqdm.auto import tqdm

from .kv_cache import make_cache
from .model import causal_mask


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th kept), -inf elsewhere."""
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most probable tokens whose probabilities, summed in
    decreasing order, first reach p (always at least one); -inf elsewhere."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
    drop_sorted = mass_before >= p  # the set already reached p without this token
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def _check_sampling(temperature, top_k, top_p) -> None:
    if temperature < 0:
        raise ValueError(f"temperature ({temperature}) must be >= 0; 0 means greedy")
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise ValueError(f"top_k ({top_k}) must be a positive integer, or None for no limit")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p ({top_p}) must be in (0, 1], or None for no limit")


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None):
    """Next token ids from logits (batch, vocab) -> (batch,) (or (vocab,) -> a 0-d tensor).

    temperature 0 is greedy (argmax); otherwise divide the logits by the temperature, keep
    the top_k largest, then the top_p nucleus, and draw from the softmax."""
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, int(top_k))
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])  # (batch, vocab)
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def _fit_prompts(prompts, max_new_tokens: int, max_seq_len: int, truncate: bool):
    """Check each prompt plus the budget fits in max_seq_len; keep the last tokens of the
    prompts that do not when truncate is True."""
    if isinstance(prompts, (str, bytes)) or not all(
            isinstance(p, (list, tuple, torch.Tensor)) for p in prompts):
        raise TypeError("prompts must be a list of token-id lists, e.g. [[128000, 9906]]; "
                        "encode text with the tokenizer first")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: pass at least one prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be at least 1")
    prompts = [[int(t) for t in p] for p in prompts]
    fitted = []
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty: start it with at least one token (BOS)")
        if len(p) + max_new_tokens > max_seq_len:
            room = max_seq_len - max_new_tokens
            if not truncate or room < 1:
                what = ("pass truncate=True to keep only the prompt's last tokens, or lower "
                        "max_new_tokens") if room >= 1 else "lower max_new_tokens"
                raise ValueError(f"prompt {i} of {len(p)} tokens plus max_new_tokens "
                                 f"({max_new_tokens}) is {len(p) + max_new_tokens} tokens, more "
                                 f"than max_seq_len ({max_seq_len}); {what}")
            p = p[-room:]
        fitted.append(p)
    return fitted


def padding_mask(pads: torch.Tensor, start: int, end: int, dtype=torch.float32) -> torch.Tensor:
    """Additive mask of left-padded prompts, for queries start..end-1 over keys 0..end-1:
    (batch, 1, end - start, end), given pads (batch,), the padding before each prompt.

    pads [1, 0], start 0, end 3 -> row 0 (one pad): [[0, -inf, -inf],
                                                      [-inf, 0, -inf],
                                                      [-inf, 0, 0]]
                                   row 1 (none):     [[0, -inf, -inf],
                                                      [0, 0, -inf],
                                                      [0, 0, 0]]
    pads [1, 0], start 2, end 3 -> row 0: [[-inf, 0, 0]], row 1: [[0, 0, 0]]"""
    # Every prompt ends at the same position, so a row with p pads holds its own tokens
    # from column p on: columns 0..p-1 are no part of its text, and every query of the row
    # is masked from them, on top of the causal mask (the future). A padding query would
    # then see no key at all: softmax over only -inf is NaN, and NaN reaches the real
    # queries even through a weight of 0 (0 * NaN = NaN), so it sees itself instead; no
    # real token ever looks at it. One query (a decode step) is the newest token: it may
    # see every real key, so it needs no causal part (the shape Meta's mask has then).
    device = pads.device
    is_pad = torch.arange(end, device=device)[None, :] < pads[:, None]  # (batch, end)
    mask = torch.zeros((len(pads), 1, 1, end), dtype=dtype, device=device)
    mask.masked_fill_(is_pad[:, None, None, :], float("-inf"))  # (batch, 1, 1, end)
    if end - start == 1:
        return mask
    mask = mask + causal_mask(end - start, start, device=device).to(dtype)  # (batch, 1, seq, end)
    idx = torch.arange(start, end, device=device)
    mask[:, :, idx - start, idx] = 0.0  # each query sees at least itself
    return mask


def generate_steps(model, prompts, max_new_tokens: int, *, temperature: float = 0.0,
                   top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                   stop_tokens=(), use_cache: bool = True, truncate: bool = False,
                   progress: bool = False, cache=None):
    """The generation loop, one step at a time: yields (tokens (batch,), logits (batch, vocab),
    done (batch,)) after each step, where `done` marks the prompts that have produced a stop
    token (at this step or before). `generate` and `stream` are built on it. It runs on the
    model's device (move the model to change it).

    cache: an existing `make_cache(...)` to fill (reset first), e.g. to watch it grow."""
    _check_sampling(temperature, top_k, top_p)
    prompts = _fit_prompts(prompts, max_new_tokens, model.params.max_seq_len, truncate)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    bsz, plen = len(prompts), max(len(p) for p in prompts)
    total = plen + max_new_tokens
    tokens = torch.zeros((bsz, total), dtype=torch.long, device=device)  # left-padded
    pads = torch.tensor([plen - len(p) for p in prompts], device=device)  # (batch,)
    for b, p in enumerate(prompts):
        tokens[b, plen - len(p):plen] = torch.tensor(p, dtype=torch.long)
    padded = bool((pads > 0).any())

    def mask_for(start: int, end: int):
        """The model's own causal mask (None) unless some prompt is padded."""
        return padding_mask(pads, start, end, dtype) if padded else None

    if use_cache:
        if cache is None:
            cache = make_cache(model, batch_size=bsz, max_seq_len=total, device=device)
        else:
            cache.reset()
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    stops = torch.tensor(sorted({int(t) for t in stop_tokens}), dtype=torch.long, device=device)
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    for step in tqdm(range(max_new_tokens), disable=not progress, desc="generating"):
        cur = plen + step  # tokens 0 .. cur-1 are known
        # Inference mode for the step's arithmetic only: the caller's loop body, which runs
        # at each `yield`, keeps whatever mode the caller had (a `with` around the yield
        # would switch autograd off in the caller's code too).
        with torch.inference_mode():
            if not use_cache:  # recompute every position, every step
                logits = model(tokens[:, :cur], mask=mask_for(0, cur))[:, -1]
            elif step == 0:  # prefill: the whole prompt in one pass
                logits = model(tokens[:, :cur], 0, cache, mask_for(0, cur))[:, -1]
            else:  # decode: only the newest token, its past read from the cache
                logits = model(tokens[:, cur - 1:cur], cur - 1, cache, mask_for(cur - 1, cur))
                logits = logits[:, -1]
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (batch,)
            tokens[:, cur] = nxt
            if len(stops):
                done = done | torch.isin(nxt, stops)
        yield nxt, logits, done
        if len(stops) and bool(done.all()):
            return


def generate(model, prompts, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop_tokens=(), use_cache: bool = True, truncate: bool = False,
             progress: bool = False) -> list[list[int]]:
    """New tokens for each prompt (a list of token-id lists), at most max_new_tokens each,
    ending before the first stop token (which is not included).

    temperature 0 is greedy; seed makes sampling reproducible; use_cache=False recomputes
    the whole sequence at every step (slow: for comparison). A prompt plus max_new_tokens
    longer than the model's max_seq_len raises, unless truncate=True keeps the prompt's
    last tokens. It runs on the model's device: place the model first, e.g.
    `model.to(pick_device())`."""
    steps = []
    for nxt, _, _ in generate_steps(
            model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            seed=seed, stop_tokens=stop_tokens, use_cache=use_cache, truncate=truncate,
            progress=progress):
        steps.append(nxt)
    rows = torch.stack(steps, dim=1).tolist()  # (batch, steps)
    stops = {int(t) for t in stop_tokens}
    out = []
    for row in rows:
        end = next((i for i, t in enumerate(row) if t in stops), len(row))
        out.append(row[:end])
    return out


class Piece(NamedTuple):
    """One step of a streamed reply: the token made, the text it completes (often "": bytes
    of an unfinished character, or what may begin a stop string, wait for later tokens) and,
    on the last piece only, why the reply ended: "stop" (a stop token or stop string) or
    "length" (max_new_tokens reached)."""
    token: int
    text: str
    finish_reason: str | None = None


def _held_back(text: str, stops) -> int:
    """How many characters at the end of text could begin a stop string (not sent yet).

    'Hello Wo', ['World'] -> 2; 'Hello', ['World'] -> 0"""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


def stream_pieces(model, tokenizer, prompt_ids, max_new_tokens: int, *, stop=(),
                  **options) -> Iterator[Piece]:
    """The one streaming path: one Piece(token, text, finish_reason) per token generated
    from one prompt. `stream`, chat.Conversation (so the notebook's chat widget) and the
    server's replies are all built on it.

    tokenizer: anything with `decode_bytes(ids) -> bytes`. The text never splits a UTF-8
    character (an emoji's bytes wait for its last one) and never ends inside what may become
    a `stop` string; it ends before the first stop string, as OpenAI's API does. Stop tokens
    are `options["stop_tokens"]`, by default the tokenizer's `stop_tokens`; a stop token is
    the last piece's token, its text "" (or the tail held back before it). Other options
    are `generate`'s. Closing the iterator early stops the generation."""
    options.setdefault("stop_tokens", tuple(getattr(tokenizer, "stop_tokens", ())))
    stop_ids = {int(t) for t in options["stop_tokens"]}
    stop = [stop] if isinstance(stop, str) else [s for s in stop if s]
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text, sent = "", 0  # the reply's text so far, and how much of it was given out
    steps = generate_steps(model, [list(prompt_ids)], max_new_tokens, **options)
    try:
        for n, (nxt, _, _) in enumerate(steps, start=1):
            token = int(nxt[0])
            finish = "stop" if token in stop_ids else (
                "length" if n == max_new_tokens else None)
            if token not in stop_ids:
                text += decoder.decode(tokenizer.decode_bytes([token]))
            if finish:
                text += decoder.decode(b"", final=True)  # bytes of a character never finished
            cuts = [i for i in (text.find(s, max(0, sent - len(s))) for s in stop) if i >= 0]
            if cuts:
                text, finish = text[:min(cuts)], "stop"
            safe = len(text) if finish else len(text) - _held_back(text, stop)
            piece, sent = text[sent:max(safe, sent)], max(safe, sent)
            yield Piece(token, piece, finish)
            if finish:
                return
    finally:
        steps.close()


def stream(model, tokenizer, prompt_ids, max_new_tokens: int, **options) -> Iterator[str]:
    """Yield the text of one prompt's continuation as it is generated: `stream_pieces`'s
    text, without the empty pieces. No piece splits a UTF-8 character (an emoji, a CJK
    character): its bytes wait for the last one, so no replacement character appears
    mid-stream."""
    for piece in stream_pieces(model, tokenizer, prompt_ids, max_new_tokens, **options):
        if piece.text:
            yield piece.text
