"""Checkers for chapters 06 to 10: training and what follows it (the schedule, bits per
byte, the loss mask, long context, shards, the entropy of choices)."""
from __future__ import annotations

import torch

from .checking import run_checks, same, story_tokenizer

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
    from ..train import lr_at

    return run_checks("lr_schedule", fn, lr_at, _lr_cases(), compare=lambda g, e: same(
        float(g), e, atol=1e-9))


def _bpb_cases():
    from ..config import get_preset
    from ..model import Transformer

    tok = story_tokenizer()
    args = get_preset("tiny").replace(dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                      vocab_size=tok.n_words, max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(args).eval()
    texts = ["The for statement", "a", "Öl 日本 🦙", "repeats a block.\n" * 2, "x = [1, 2, 3]"]
    return [(model, tok, text) for text in texts]


def check_text_bits_per_byte(fn) -> bool:
    """fn(model, tok, text) -> the model's bits per byte on text: the bits it pays for each
    token after <|begin_of_text|>, over the text's UTF-8 bytes (train.text_bits_per_byte)."""
    from ..train import text_bits_per_byte

    return run_checks("text_bits_per_byte", fn, text_bits_per_byte, _bpb_cases(),
                      compare=lambda got, exp: same(float(got), exp, atol=1e-4))


# --- Chapter 07: the loss mask of supervised fine-tuning; what LoRA trains ------------------

def _same_mask(got, expected) -> bool:
    try:
        got = torch.as_tensor(got).bool()
    except (TypeError, ValueError, RuntimeError):
        return False
    return got.shape == expected.shape and bool(torch.equal(got, expected))


def check_loss_mask(fn) -> bool:
    """fn(n_prompt, n_total) -> (n_total - 1,) booleans: True where the next-token target
    is a reply token (counts in the loss), False where it is a prompt token."""
    from ..finetune import loss_mask

    cases = [(1, 2), (2, 2), (3, 7), (5, 6), (1, 9), (12, 20), (30, 31), (4, 40)]
    return run_checks("loss_mask", fn, loss_mask, cases, compare=_same_mask)


def _lora_cases():
    from ..config import PRESETS

    every = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    tiny = PRESETS["tiny"].replace(dim=128, n_heads=4, n_kv_heads=2, vocab_size=1216)
    return [(tiny, every, 16), (tiny, every, 2), (tiny, ("wq", "wv"), 8),
            (PRESETS["llama3-8b"], ("wq", "wv"), 16), (PRESETS["llama3-8b"], every, 8),
            (PRESETS["llama3-70b"], ("wk",), 4), (PRESETS["llama3.2-1b"], ("w2", "wo"), 32)]


def check_lora_params(fn) -> bool:
    """fn(args, targets, rank) -> how many parameters add_lora(model, targets, rank) trains:
    rank * (in + out) for each adapted projection, in every layer (lora.lora_param_count)."""
    from ..lora import lora_param_count

    return run_checks("lora_params", fn, lora_param_count, _lora_cases())


# --- Chapter 08: Llama 3.1's RoPE scaling --------------------------------------------------

def _scaling_cases():
    from ..rope import rope_frequencies

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
    from ..rope import apply_scaling

    def reference(freqs, factor, low, high, original):
        return apply_scaling(freqs, factor, low, high, original)

    return run_checks("rope_scaling", fn, reference, _scaling_cases())


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
    Llama 3.1's RoPE scaling (long_context.stretch_context), trained on args.max_seq_len."""
    from ..config import get_preset
    from ..long_context import stretch_context

    course = get_preset("tiny").replace(dim=128, n_heads=4, n_kv_heads=2, max_seq_len=256)
    cases = [(course, 2048), (course, 1024), (course, 4096),
             (get_preset("llama3-8b"), 131072), (get_preset("llama3-8b"), 32768),
             (get_preset("tiny").replace(max_seq_len=1000), 3000),
             (get_preset("tiny").replace(max_seq_len=64, rope_theta=10000.0), 512)]

    def call(f):
        return lambda wrapped, target: f(wrapped.args, target)

    return run_checks("stretch_context", call(fn), call(stretch_context),
                      [(_Args(a), n) for a, n in cases], compare=_same_stretch)


# --- Chapter 09: merging Meta's model-parallel shards --------------------------------------

class _Shards(list):
    """Shards that print as a one-line summary rather than as every tensor."""

    def __repr__(self) -> str:
        return f"<{len(self)} shard(s) of {len(self[0])} tensors>"


def _shard_cases():
    from ..config import ModelArgs
    from ..hub import split_meta_shards
    from ..model import Transformer

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
    from ..hub import merge_meta_shards

    return run_checks("merge_shards", fn, merge_meta_shards, _shard_cases(),
                      compare=_same_tensors)


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
    from ..synthetic import name_entropy_bits

    return run_checks("name_entropy", fn, name_entropy_bits, _entropy_cases())
