"""Checkers for chapters 06 to 10: training and what follows it (the schedule, bits per
byte, the loss mask, long context, shards, the entropy of choices)."""
from __future__ import annotations

import math

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

    def late_floor(step, max_lr, warmup, total, min_lr):  # reaches min_lr at total_steps
        if step < warmup:
            return lr_at(step, max_lr, warmup, total, min_lr)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * progress))

    return run_checks("lr_schedule", fn, lr_at, _lr_cases(), compare=lambda g, e: same(
        float(g), e, atol=1e-9), mistakes=[
        ("this starts the warm-up at 0, so step 0 learns nothing; step s of the warm-up gets "
         "max_lr * (s + 1) / warmup_steps",
         lambda s, m, w, t, f: m * s / w if s < w else lr_at(s, m, w, t, f)),
        ("this decays to zero; the cosine ends at the floor min_lr",
         lambda s, m, w, t, f: lr_at(s, m, w, t, 0.0)),
        ("this reaches min_lr one step late, at total_steps; the last step is total_steps - 1",
         late_floor)])


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


def _bpb_by_hand(model, tok, text, per="byte", shift=True, bos=True, bits=True):
    """Bits per byte written out, with the switches for the likely mistakes."""
    ids = torch.tensor([tok.encode(text, bos=bos)])
    with torch.no_grad():
        logits = model(ids[:, :-1])[0].float()  # (n - 1, vocab_size)
    targets = ids[0, 1:] if shift else ids[0, :-1]  # no shift: <|begin_of_text|> scored
    nats = torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
    size = {"byte": len(text.encode()), "token": len(targets), "character": len(text)}[per]
    return nats / (math.log(2) if bits else 1.0) / size


def check_text_bits_per_byte(fn) -> bool:
    """fn(model, tok, text) -> the model's bits per byte on text: the bits it pays for each
    token after <|begin_of_text|>, over the text's UTF-8 bytes (train.text_bits_per_byte)."""
    from ..train import text_bits_per_byte

    def wrong(**how):
        return lambda model, tok, text: _bpb_by_hand(model, tok, text, **how)
    return run_checks("text_bits_per_byte", fn, text_bits_per_byte, _bpb_cases(),
                      compare=lambda got, exp: same(float(got), exp, atol=1e-4), mistakes=[
        ("this divides by the number of tokens (bits per token); divide by the text's UTF-8 "
         "bytes, len(text.encode())", wrong(per="token")),
        ("this divides by the number of characters; divide by the UTF-8 bytes (one character "
         "is one to four bytes)", wrong(per="character")),
        ("this scores each position's own token, <|begin_of_text|> included (no shift by "
         "one): the target at position i is the id after it, so the logits of ids[:-1] "
         "predict ids[1:]", wrong(shift=False)),
        ("this encodes without <|begin_of_text|>, so the text's first token is never scored; "
         "start from it and score every token after it", wrong(bos=False)),
        ("this is in nats (natural logarithm); bits divide by ln 2", wrong(bits=False))])


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
    per_token = ("this has one entry per token; there are n_total - 1 next-token targets, "
                 "and target i is token i + 1")
    return run_checks("loss_mask", fn, loss_mask, cases, compare=_same_mask, mistakes=[
        (per_token, lambda p, n: torch.arange(n) >= p),
        (per_token, lambda p, n: torch.arange(n) >= p - 1),
        ("this starts one target late and never trains on the reply's first token: target i "
         "is token i + 1, so the reply starts at target n_prompt - 1",
         lambda p, n: torch.arange(n - 1) >= p),
        ("this masks the reply and keeps the prompt: the model would learn to write questions",
         lambda p, n: ~loss_mask(p, n))])


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

    def mha(args, targets, rank):  # wk and wv as wide as dim
        return lora_param_count(args.replace(n_kv_heads=args.n_heads), targets, rank)

    def b_only(args, targets, rank):
        full, kv = args.dim, args.kv_heads * args.head_dim
        out = {"wk": kv, "wv": kv, "w1": args.hidden_dim, "w3": args.hidden_dim}
        return args.n_layers * rank * sum(out.get(t, full) for t in targets)

    return run_checks("lora_params", fn, lora_param_count, _lora_cases(), mistakes=[
        ("this makes wk and wv as wide as dim; with grouped-query attention they produce "
         "n_kv_heads * head_dim (1,024 for Llama 3 8B, not 4,096)", mha),
        ("this counts B only (rank * out); each adapter is A (rank x in) and B (out x rank)",
         b_only),
        ("this counts one layer; every layer has its own adapters: times n_layers",
         lambda a, t, r: lora_param_count(a, t, r) // a.n_layers)])


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


def _stretch_difference(got, expected) -> str | None:
    """The first setting that differs, as one line; None when all agree."""
    for name in _STRETCH_FIELDS:
        value = getattr(got, name, "(missing)")
        want = getattr(expected, name)
        if not same(value, want):
            return f"{name}: got {value!r}, expected {want!r}"
    if not same(getattr(got, "rope_theta", None), expected.rope_theta):
        return "rope_theta changed: scaling leaves theta alone"
    return None


def _same_stretch(got, expected) -> bool:
    return _stretch_difference(got, expected) is None


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

    def wrong(**fields):  # stretch_context, then the fields as the mistake sets them
        return call(lambda a, n: stretch_context(a, n).replace(
            **{k: v(a, n) if callable(v) else v for k, v in fields.items()}))
    return run_checks("stretch_context", call(fn), call(stretch_context),
                      [(_Args(a), n) for a, n in cases], compare=_same_stretch,
                      explain=lambda got, exp, case: [_stretch_difference(got, exp)], mistakes=[
        ("the factor is the wrong way up: trained length / target length; the frequencies "
         "are divided by target / trained (8.0 for 256 to 2,048)",
         wrong(rope_scaling_factor=lambda a, n: a.max_seq_len / n)),
        ("this keeps rope_original_max_seq_len at its default; the bands are measured against "
         "the length the model was trained on (args.max_seq_len)",
         wrong(rope_original_max_seq_len=lambda a, n: a.rope_original_max_seq_len)),
        ("this leaves the window (max_seq_len) at the trained length; raise it to target_len",
         wrong(max_seq_len=lambda a, n: a.max_seq_len)),
        ("this leaves the scaling switched off: use_scaled_rope=True",
         wrong(use_scaled_rope=False))])


# --- Chapter 09: merging Meta's model-parallel shards --------------------------------------

class _Shards(list):
    """Shards that print as a one-line summary rather than as every tensor."""

    def __repr__(self) -> str:
        return f"<{len(self)} shard(s) of {len(self[0])} tensors>"


def _shard_cases():
    from ..config import ModelArgs
    from ..hub import split_meta_shards
    from ..model import Transformer

    # split_meta_shards cuts as fairscale's own parallel layers do (tests/test_meta_shards.py)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=64,
                                  multiple_of=16, max_seq_len=16))
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    return [(_Shards(split_meta_shards(sd, n)),) for n in (1, 2, 4)]


def _same_tensors(got, expected) -> bool:
    return (isinstance(got, dict) and got.keys() == expected.keys()
            and all(same(got[name], want) for name, want in expected.items()))


def _merge_mistake(got, expected, case) -> list[str]:
    """The first wrong tensor, and which likely mistake made it, in one line."""
    from ..hub import shard_dim

    shards = case[0]
    if not isinstance(got, dict) or got.keys() != expected.keys():
        missing = sorted(set(expected) - set(got)) if isinstance(got, dict) else "all"
        return [f"the tensor names differ: missing {missing}"]
    name = next(k for k, want in expected.items() if not same(got[k], want))
    pieces, dim = [s[name] for s in shards], shard_dim(name)
    short = name.split(".", 2)[-1] if name.startswith("layers.") else name
    if dim is None:
        if same(got[name], torch.cat(pieces)):
            return [f"→ {short}: {len(pieces)} copies of a norm joined; norms are whole on "
                    "every shard, so take one: shards[0][name]"]
    elif same(got[name], torch.cat(pieces, dim=1 - dim)):
        if name == "tok_embeddings.weight":
            return ["→ tok_embeddings joined along dim 1, as Llama 2's ParallelEmbedding was "
                    "split; Llama 3's VocabParallelEmbedding splits the vocabulary (Meta's "
                    "llama/model.py line 258): join along dim 0"]
        if dim == 1:
            return [f"→ {short} joined along dim 0 like wq; wo and w2 are row-parallel (each "
                    "GPU holds some input columns, llama/model.py lines 121, 211): dim 1"]
        return [f"→ {short} joined along dim 1; wq, wk, wv, w1, w3 and output are column-"
                "parallel (each GPU makes some output rows): dim 0"]
    elif same(got[name], torch.cat(pieces[::-1], dim=dim)):
        return [f"→ {short}: the pieces are in reverse order; shard i (consolidated.0i.pth) "
                "holds the i-th piece"]
    shape = tuple(got[name].shape) if isinstance(got[name], torch.Tensor) else "?"
    return [f"{name}: got shape {shape}, expected {tuple(expected[name].shape)} "
            "(or the same shape with the pieces in the wrong place)"]


def check_merge_shards(fn) -> bool:
    """fn(shards: list of state dicts) -> one state dict, each tensor's pieces joined along
    the dimension Meta's model parallelism split it (norms: one copy)."""
    from ..hub import merge_meta_shards

    return run_checks("merge_shards", fn, merge_meta_shards, _shard_cases(),
                      compare=_same_tensors, explain=_merge_mistake)


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

    empty = ("an empty list has no names to choose between: its entropy is 0.0 (return it "
             "before dividing by len(names))")
    return run_checks("name_entropy", fn, name_entropy_bits, _entropy_cases(), mistakes=[
        ("this is in nats (natural logarithm); bits use log2 (two equal names: 1.0, not 0.693)",
         lambda names: name_entropy_bits(names) * math.log(2)),
        ("this is log2 of the number of distinct names, the entropy only when all are equally "
         "frequent; weigh each name by its frequency: -sum p log2 p",
         lambda names: math.log2(len(set(names))) if names else 0.0)],
        explain=lambda got, exp, case: [empty] if not case[0] else [],
        on_error=lambda case, error: empty if not case[0] else None)
