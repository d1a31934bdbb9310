"""Checkers for the course's exercises. Each runs a learner's function against the
package's reference on many cases, edge cases included, and says in a line or two either
that it is right or which input gave which wrong output and what was expected.

A wrong answer never shows a traceback; an exception raised by the learner's own code is
left to propagate, so its traceback points at their line."""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterable

import torch


def _short(value: Any, limit: int = 160) -> str:
    if isinstance(value, torch.Tensor):
        text = f"tensor(shape={tuple(value.shape)}, {value.flatten()[:8].tolist()}...)" \
            if value.numel() > 8 else f"tensor({value.tolist()})"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def same(got: Any, expected: Any, atol: float = 1e-5) -> bool:
    """Equality that understands tensors (shape and values within atol) and nests."""
    if isinstance(expected, torch.Tensor):
        return (isinstance(got, torch.Tensor) and got.shape == expected.shape
                and torch.allclose(got.double(), expected.double(), atol=atol, rtol=1e-5))
    if isinstance(expected, (list, tuple)):
        return (isinstance(got, (list, tuple)) and len(got) == len(expected)
                and all(same(g, e, atol) for g, e in zip(got, expected, strict=True)))
    if isinstance(expected, float):
        return isinstance(got, (int, float)) and abs(got - expected) <= atol * max(1, abs(expected))
    return got == expected


def run_checks(name: str, fn: Callable, reference: Callable, cases: Iterable[tuple],
               compare: Callable[[Any, Any], bool] = same, quiet: bool = False) -> bool:
    """Call fn(*case) and reference(*case) for each case; report the first difference.

    Returns True when every case matches, so a notebook can `assert check_x(my_x)`."""
    cases = list(cases)
    for case in cases:
        expected = reference(*copy.deepcopy(case))
        got = fn(*copy.deepcopy(case))  # the learner's exception propagates, on their line
        if not compare(got, expected):
            args = ", ".join(_short(a, 80) for a in case)
            print(f"✗ {name}({args})\n  returned {_short(got)}\n  expected {_short(expected)}")
            return False
    if not quiet:
        print(f"✓ {name}: right on all {len(cases)} cases")
    return True


# --- Chapter 00: counting parameters -------------------------------------------------------

def _config_cases():
    from .config import PRESETS, ModelArgs

    cases = [(args.replace(),) for args in PRESETS.values()]
    cases += [(ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=kv, vocab_size=100,
                         multiple_of=16, max_seq_len=32, tie_word_embeddings=tie),)
              for kv in (1, 2, 8) for tie in (False, True)]
    return cases


def check_count_params(fn) -> bool:
    """fn(args) -> the model's total parameter count, from its shapes alone."""
    from .config import num_params

    return run_checks("count_params", fn, num_params, _config_cases())


def count_params_with_qkv_bias(args) -> int:
    """The parameter count of args's model with a bias vector added to each layer's wq, wk
    and wv (as Qwen2 does; Llama has none): wq's bias has dim entries, wk's and wv's one per
    output, n_kv_heads * head_dim each; wo keeps no bias."""
    from .config import num_params

    return num_params(args) + args.n_layers * (args.dim + 2 * args.kv_heads * args.head_dim)


def check_count_params_qkv_bias(fn) -> bool:
    """fn(args) -> the total parameter count of args's model if wq, wk and wv each had a
    bias (wo none), from the shapes alone."""
    return run_checks("count_params_qkv_bias", fn, count_params_with_qkv_bias, _config_cases())


# --- Chapter 04: the SwiGLU hidden size ----------------------------------------------------

def check_ffn_hidden_dim(fn) -> bool:
    """fn(dim, multiple_of, ffn_dim_multiplier) -> Meta's SwiGLU hidden size."""
    from .config import ModelArgs

    def reference(dim, multiple_of, multiplier):
        return ModelArgs(dim=dim, n_heads=2, n_layers=1, multiple_of=multiple_of,
                         ffn_dim_multiplier=multiplier).hidden_dim

    cases = [(4096, 1024, 1.3), (8192, 4096, 1.3), (16384, 4096, 1.2), (2048, 256, 1.5),
             (3072, 256, 1.0), (256, 32, None), (100, 1, None), (96, 7, 0.9), (4096, 256, None)]
    return run_checks("ffn_hidden_dim", fn, reference, cases)


def ffn_params(dim: int, multiple_of: int, ffn_dim_multiplier) -> int:
    """Weights in one SwiGLU feed-forward: w1 and w3 (hidden x dim) and w2 (dim x hidden),
    no biases, with hidden from Meta's rule: (4096, 1024, 1.3) -> 3 * 4096 * 14336."""
    from .config import ModelArgs

    hidden = ModelArgs(dim=dim, n_heads=1, n_layers=1, multiple_of=multiple_of,
                       ffn_dim_multiplier=ffn_dim_multiplier).hidden_dim
    return 3 * dim * hidden


def check_ffn_params(fn) -> bool:
    """fn(dim, multiple_of, ffn_dim_multiplier) -> the number of weights in one SwiGLU
    feed-forward (w1, w2, w3; no biases), the hidden size by Meta's rule."""
    cases = [(4096, 1024, 1.3), (8192, 4096, 1.3), (16384, 4096, 1.2), (2048, 256, 1.5),
             (3072, 256, 1.0), (256, 32, None), (100, 1, None), (96, 7, 0.9), (4096, 256, None)]
    return run_checks("ffn_params", fn, ffn_params, cases)


# --- Chapter 07: the loss mask of supervised fine-tuning -----------------------------------

def _same_mask(got, expected) -> bool:
    try:
        got = torch.as_tensor(got).bool()
    except (TypeError, ValueError, RuntimeError):
        return False
    return got.shape == expected.shape and bool(torch.equal(got, expected))


def check_loss_mask(fn) -> bool:
    """fn(n_prompt, n_total) -> (n_total - 1,) booleans: True where the next-token target
    is a reply token (counts in the loss), False where it is a prompt token."""
    from .finetune import loss_mask

    cases = [(1, 2), (2, 2), (3, 7), (5, 6), (1, 9), (12, 20), (30, 31), (4, 40)]
    return run_checks("loss_mask", fn, loss_mask, cases, compare=_same_mask)


# --- Chapter 09: merging Meta's model-parallel shards --------------------------------------

class _Shards(list):
    """Shards that print as a one-line summary rather than as every tensor."""

    def __repr__(self) -> str:
        return f"<{len(self)} shard(s) of {len(self[0])} tensors>"


def _shard_cases():
    from .config import ModelArgs
    from .hub import split_meta_shards
    from .model import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=64,
                                  multiple_of=16, max_seq_len=16))
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    return [(_Shards(split_meta_shards(sd, n)),) for n in (1, 2, 4)]


def _same_tensors(got, expected) -> bool:
    if not isinstance(got, dict) or got.keys() != expected.keys():
        missing = sorted(set(expected) - set(got)) if isinstance(got, dict) else "all"
        print(f"  the tensor names differ: missing {missing}")
        return False
    for name, want in expected.items():
        if not same(got[name], want):
            shape = tuple(got[name].shape) if isinstance(got[name], torch.Tensor) else "?"
            print(f"  {name}: got shape {shape}, expected {tuple(want.shape)} "
                  "(or the same shape with the pieces in the wrong place)")
            return False
    return True


def check_merge_shards(fn) -> bool:
    """fn(shards: list of state dicts) -> one state dict, each tensor's pieces joined along
    the dimension Meta's model parallelism split it (norms: one copy)."""
    from .hub import merge_meta_shards

    return run_checks("merge_shards", fn, merge_meta_shards, _shard_cases(),
                      compare=_same_tensors)


# --- Chapter 01: the tokenizer -------------------------------------------------------------

def _merge_cases():
    cases = [([1, 2, 3, 1, 2], (1, 2), 256), ([], (1, 2), 256), ([1], (1, 2), 256),
             ([1, 2], (2, 1), 256), ([2, 1, 2, 1], (1, 2), 300), ([7, 7, 7], (7, 7), 256),
             ([7, 7, 7, 7], (7, 7), 256), ([3, 4, 3, 4, 3], (3, 4), 999), ([5, 1, 2], (1, 2), 256)]
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        ids = torch.randint(0, 3, (40,), generator=generator).tolist()
        cases.append((ids, (ids[0], ids[1]), 256))
    return cases


def check_merge(fn) -> bool:
    """fn(ids, pair, new_id) -> a new list: ids with each occurrence of pair, scanning left
    to right, replaced by new_id ([7, 7, 7] with (7, 7) -> [new_id, 7])."""
    from .tokenizer import merge

    return run_checks("merge", fn, merge, _merge_cases())


def check_count_pairs(fn) -> bool:
    """fn(ids) -> {pair: how often it occurs as adjacent ids} ([7, 7, 7] -> {(7, 7): 2})."""
    from .tokenizer import count_pairs

    return run_checks("count_pairs", fn, lambda ids: count_pairs(ids),
                      [(ids,) for ids, _, _ in _merge_cases()])


# --- Chapter 02: rotary position embeddings ------------------------------------------------

def _rope_reference(x, position, theta):
    from .rope import apply_rotary_emb, precompute_freqs_cis

    head_dim = x.shape[-1]
    freqs_cis = precompute_freqs_cis(head_dim, position + 1, theta)[position: position + 1]
    rotated, _ = apply_rotary_emb(x[None, None, None], x[None, None, None], freqs_cis)
    return rotated[0, 0, 0]  # (head_dim,)


def check_rope_rotate(fn) -> bool:
    """fn(x, position, theta) -> x rotated as RoPE does at `position`: x is (head_dim,), its
    adjacent pairs (x[2i], x[2i+1]) each turned by position * theta ** (-2i / head_dim)."""
    generator = torch.Generator().manual_seed(2)
    cases = [(torch.tensor([1.0, 0.0]), 1, 10000.0), (torch.tensor([1.0, 0.0, 0.0, 1.0]), 3, 100.0)]
    for head_dim, position, theta in ((8, 0, 10000.0), (8, 5, 10000.0), (16, 17, 500000.0),
                                      (64, 1000, 500000.0), (128, 4095, 500000.0)):
        cases.append((torch.randn(head_dim, generator=generator), position, theta))
    return run_checks("rope_rotate", fn, _rope_reference, cases,
                      compare=lambda got, exp: same(got, exp, atol=1e-3))


# --- Chapter 03: grouped-query attention ---------------------------------------------------

def _gqa_reference(q, k, v):
    from .model import attention, causal_mask, repeat_kv

    n_rep = q.shape[1] // k.shape[1]
    keys = repeat_kv(k.transpose(1, 2), n_rep).transpose(1, 2)  # (batch, n_heads, seq, hd)
    values = repeat_kv(v.transpose(1, 2), n_rep).transpose(1, 2)
    return attention(q, keys, values, causal_mask(q.shape[2]))[0]


def check_gqa_attention(fn) -> bool:
    """fn(q, k, v) -> causal grouped-query attention output (batch, n_heads, seq, head_dim).
    q: (batch, n_heads, seq, head_dim); k, v: (batch, n_kv_heads, seq, head_dim); query head
    h uses KV head h // (n_heads // n_kv_heads)."""
    generator = torch.Generator().manual_seed(3)
    cases = []
    for batch, n_heads, n_kv_heads, seq, head_dim in ((1, 1, 1, 1, 2), (1, 2, 1, 3, 4),
                                                      (2, 4, 2, 5, 8), (1, 8, 2, 7, 16),
                                                      (2, 6, 3, 4, 8), (1, 4, 4, 6, 8)):
        q = torch.randn(batch, n_heads, seq, head_dim, generator=generator)
        k = torch.randn(batch, n_kv_heads, seq, head_dim, generator=generator)
        v = torch.randn(batch, n_kv_heads, seq, head_dim, generator=generator)
        cases.append((q, k, v))
    return run_checks("gqa_attention", fn, _gqa_reference, cases)


# --- Chapter 06: the learning-rate schedule ------------------------------------------------

def _lr_cases():
    cases = []
    for warmup, total, max_lr, min_lr in [(10, 100, 3e-3, 3e-4), (1, 20, 1.0, 0.0),
                                          (5, 6, 0.5, 0.1), (30, 600, 2e-3, 2e-4)]:
        for step in sorted({0, 1, warmup - 1, warmup, warmup + 1, (warmup + total) // 2,
                            total - 2, total - 1, total + 3}):
            if step >= 0:
                cases.append((step, max_lr, warmup, total, min_lr))
    return cases


def check_lr_schedule(fn) -> bool:
    """fn(step, max_lr, warmup_steps, total_steps, min_lr) -> learning rate: linear warm-up
    to max_lr at step warmup_steps - 1, then a half cosine down to min_lr at total_steps - 1,
    min_lr after. Compared with llama3_mini.train.lr_at."""
    from .train import lr_at

    return run_checks("lr_schedule", fn, lr_at, _lr_cases(), compare=lambda g, e: same(
        float(g), e, atol=1e-9))


# --- Chapter 05: generation, the top-p (nucleus) filter ------------------------------------

def check_top_p(fn) -> bool:
    """fn(logits, p) -> the logits with -inf outside the nucleus: the most probable tokens
    whose probabilities, summed from the largest down, first reach p (at least one token is
    always kept). logits: (vocab,) or (batch, vocab); the kept logits are unchanged."""
    from .generate import top_p_filter

    generator = torch.Generator().manual_seed(5)
    cases = [(torch.tensor([2.0, 1.0, 0.0, -1.0]), 0.5),  # the top token alone is 0.64
             (torch.tensor([2.0, 1.0, 0.0, -1.0]), 0.8),  # needs the second one to reach 0.8
             (torch.tensor([0.0, 3.0, 1.0, 2.0]), 0.9),  # not sorted: order must come back
             (torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.6),  # uniform: 3 tokens reach 0.75
             (torch.tensor([5.0, -5.0, 0.0]), 0.001),  # tiny p: greedy
             (torch.tensor([0.3, -0.2, 0.1]), 1.0)]  # p = 1 keeps everything
    for vocab, p in ((10, 0.3), (50, 0.9), (100, 0.95)):
        cases.append((torch.randn(vocab, generator=generator) * 2, p))
    cases.append((torch.randn(3, 20, generator=generator) * 2, 0.7))  # a batch: row by row
    return run_checks("top_p", fn, top_p_filter, cases)


# --- Chapter 08: Llama 3.1's RoPE scaling --------------------------------------------------

def _scaling_cases():
    from .rope import rope_frequencies

    cases = []
    for head_dim, theta in ((32, 500000.0), (16, 10000.0), (128, 500000.0)):
        for factor, low, high, original in ((8.0, 1.0, 4.0, 256), (8.0, 1.0, 4.0, 8192),
                                            (32.0, 1.0, 4.0, 8192), (4.0, 2.0, 8.0, 64),
                                            (1.0, 1.0, 4.0, 256)):
            cases.append((rope_frequencies(head_dim, theta), factor, low, high, original))
    return cases


def check_rope_scaling(fn) -> bool:
    """fn(freqs, scale_factor, low_freq_factor, high_freq_factor, original_max_seq_len) ->
    the frequencies after Llama 3.1's scaling (three bands by wavelength)."""
    from .rope import apply_scaling

    def reference(freqs, factor, low, high, original):
        return apply_scaling(freqs, factor, low, high, original)

    return run_checks("rope_scaling", fn, reference, _scaling_cases())


def stretch_context(args, target_len: int):
    """args for a model trained on windows of args.max_seq_len tokens, stretched to
    target_len with Llama 3.1's scaling: the factor target_len / trained length (the slowest
    pairs then turn no further over target_len than they did in training), the bands set
    by the trained length, Meta's low and high frequency factors (1 and 4)."""
    return args.replace(use_scaled_rope=True, rope_scaling_factor=target_len / args.max_seq_len,
                        rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                        rope_original_max_seq_len=args.max_seq_len, max_seq_len=target_len)


_STRETCH_FIELDS = ("max_seq_len", "use_scaled_rope", "rope_scaling_factor",
                   "rope_original_max_seq_len", "rope_low_freq_factor", "rope_high_freq_factor")


class _Args:
    """A ModelArgs that prints as the fields the exercise is about."""

    def __init__(self, args):
        self.args = args

    def __repr__(self) -> str:
        a = self.args
        return f"<model of dim {a.dim}, theta {a.rope_theta:g}, trained on {a.max_seq_len} tokens>"


def _same_stretch(got, expected) -> bool:
    for name in _STRETCH_FIELDS:
        value = getattr(got, name, "(missing)")
        want = getattr(expected, name)
        if not same(value, want):
            print(f"  {name}: got {value!r}, expected {want!r}")
            return False
    if not same(getattr(got, "rope_theta", None), expected.rope_theta):
        print("  rope_theta changed: scaling leaves theta alone")
        return False
    return True


def check_stretch_context(fn) -> bool:
    """fn(args, target_len) -> ModelArgs for the same model stretched to target_len with
    Llama 3.1's RoPE scaling (see stretch_context). args.max_seq_len is the trained window."""
    from .config import get_preset

    course = get_preset("tiny").replace(dim=128, n_heads=4, n_kv_heads=2, max_seq_len=256)
    cases = [(course, 2048), (course, 1024), (course, 4096),
             (get_preset("llama3-8b"), 131072), (get_preset("llama3-8b"), 32768),
             (get_preset("tiny").replace(max_seq_len=1000), 3000),
             (get_preset("tiny").replace(max_seq_len=64, rope_theta=10000.0), 512)]

    def call(f):
        return lambda wrapped, target: f(wrapped.args, target)

    return run_checks("stretch_context", call(fn), call(stretch_context),
                      [(_Args(a), n) for a, n in cases], compare=_same_stretch)


# --- Chapter 10: the entropy of choices ----------------------------------------------------

def _entropy_cases():
    import random

    rng = random.Random(0)
    names = ["Lily", "Tom", "Mia", "Ben", "Sam", "Anna", "Max", "Zoe"]
    cases = [(["Lily"],), (["Lily", "Tom"],), (["Lily", "Lily", "Tom", "Mia"],), ([],),
             (names,), (["Tom"] * 7 + ["Lily"],)]
    cases += [([rng.choice(names[:k]) for _ in range(rng.randrange(1, 60))],)
              for k in (2, 3, 5, 8) for _ in range(3)]
    return cases


def check_name_entropy(fn) -> bool:
    """fn(names) -> entropy in bits of the empirical distribution of a list of names
    (0.0 for an empty list)."""
    from .experiments import name_entropy_bits

    return run_checks("name_entropy", fn, name_entropy_bits, _entropy_cases())
