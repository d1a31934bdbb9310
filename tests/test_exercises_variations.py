"""Checkers of the exercises that ask for the next step of a chapter's idea (00: biases on
the attention projections; 04: the feed-forward's weights; 08: scaling settings for a new
length). Each accepts a right answer written here independently of the package, and
rejects plausible mistakes with a message naming the failing input and what differs."""
import math

import pytest

from llama3_mini.config import get_preset
from llama3_mini.exercises import (
    check_count_params_qkv_bias,
    check_ffn_params,
    check_stretch_context,
)


# ----------------------------------------------- chapter 00: biases on wq, wk and wv (Qwen2's)
def qkv_bias_by_hand(args, kv_bias_width=None, on_wo=False, per_layer=True):
    head_dim = args.dim // args.n_heads
    kv_dim = (args.n_kv_heads or args.n_heads) * head_dim
    hidden = 4 * args.dim * 2 // 3
    if args.ffn_dim_multiplier is not None:
        hidden = int(args.ffn_dim_multiplier * hidden)
    hidden = args.multiple_of * math.ceil(hidden / args.multiple_of)
    layer = (2 * args.dim * args.dim + 2 * args.dim * kv_dim + 3 * args.dim * hidden
             + 2 * args.dim)
    kv_bias = kv_dim if kv_bias_width is None else kv_bias_width(args)
    biases = args.dim + 2 * kv_bias + (args.dim if on_wo else 0)
    embeddings = args.vocab_size * args.dim * (1 if args.tie_word_embeddings else 2)
    total = embeddings + args.n_layers * layer + args.dim
    return total + (args.n_layers * biases if per_layer else biases)


def test_qkv_bias_accepts_a_right_answer(capsys):
    assert check_count_params_qkv_bias(qkv_bias_by_hand)
    assert "✓ count_params_qkv_bias: right on all 12 cases" in capsys.readouterr().out


def test_qkv_bias_rejects_key_and_value_biases_as_wide_as_dim(capsys):
    def as_wide_as_dim(a):
        return qkv_bias_by_hand(a, kv_bias_width=lambda a: a.dim)

    assert not check_count_params_qkv_bias(as_wide_as_dim)
    out = capsys.readouterr().out
    assert "✗ count_params_qkv_bias(ModelArgs(dim=4096, n_layers=32" in out
    # 8B: wk and wv have 8 * 128 = 1024 outputs, not 4096: 2 * 3072 * 32 too many
    assert "returned 8030654464" in out and "expected 8030457856" in out
    assert "→ this makes every bias as wide as dim" in out


def test_qkv_bias_rejects_a_bias_on_wo_too(capsys):
    assert not check_count_params_qkv_bias(lambda a: qkv_bias_by_hand(a, on_wo=True))
    out = capsys.readouterr().out
    assert "returned 8030588928\n  expected 8030457856" in out
    assert "→ this gives wo a bias too" in out


def test_qkv_bias_rejects_biases_counted_once_not_per_layer(capsys):
    assert not check_count_params_qkv_bias(lambda a: qkv_bias_by_hand(a, per_layer=False))
    out = capsys.readouterr().out
    assert "returned 8030267392\n  expected 8030457856" in out
    assert "→ this counts the biases once" in out


def test_qkv_bias_on_llama3_8b_is_196608_more_than_without():
    args = get_preset("llama3-8b")
    assert qkv_bias_by_hand(args) - 8_030_261_248 == 32 * (4096 + 2 * 1024) == 196_608


# ------------------------------------------------ chapter 04: weights of one SwiGLU feed-forward
def ffn_by_hand(dim, multiple_of, multiplier, matrices=3, two_thirds=True, round_up=True):
    hidden = int(2 * 4 * dim / 3) if two_thirds else 4 * dim
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    steps = -(-hidden // multiple_of) if round_up else hidden // multiple_of
    return matrices * dim * multiple_of * steps


def test_ffn_params_accepts_a_right_answer(capsys):
    assert check_ffn_params(ffn_by_hand)
    assert "✓ ffn_params: right on all 9 cases" in capsys.readouterr().out


@pytest.mark.parametrize("mistake, returned", [
    ({"matrices": 2}, 2 * 4096 * 14336),  # a two-matrix MLP: forgets the gate w3
    ({"two_thirds": False}, 3 * 4096 * 21504),  # no 2/3: 4 * dim * 1.3 rounded up
    ({"round_up": False}, 3 * 4096 * 13312),  # rounds down to a multiple of 1024
])
def test_ffn_params_rejects_plausible_mistakes_on_llama3_8b(capsys, mistake, returned):
    assert not check_ffn_params(lambda d, m, f: ffn_by_hand(d, m, f, **mistake))
    out = capsys.readouterr().out
    assert "✗ ffn_params(4096, 1024, 1.3)" in out
    assert f"returned {returned}\n  expected {3 * 4096 * 14336}" in out
    named = {"matrices": "→ this counts two matrices", "two_thirds": "→ this starts from 4 * dim",
             "round_up": "→ this rounds down"}
    assert named[next(iter(mistake))] in out


# ----------------------------------- chapter 08: Llama 3.1 scaling settings for a new length
def stretch_by_hand(args, target, invert=False, keep_original=False, keep_window=False,
                    flag=True):
    trained = args.max_seq_len
    factor = trained / target if invert else target / trained
    return args.replace(use_scaled_rope=flag, rope_scaling_factor=factor,
                        rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                        rope_original_max_seq_len=(args.rope_original_max_seq_len
                                                   if keep_original else trained),
                        max_seq_len=trained if keep_window else target)


def test_stretch_accepts_a_right_answer(capsys):
    assert check_stretch_context(stretch_by_hand)
    assert "✓ stretch_context: right on all 7 cases" in capsys.readouterr().out


@pytest.mark.parametrize("mistake, message, named", [
    ({"invert": True}, "rope_scaling_factor: got 0.125, expected 8.0", "the wrong way up"),
    # the bands must be set by the window the model was trained on (256), not the default 8192
    ({"keep_original": True}, "rope_original_max_seq_len: got 8192, expected 256",
     "keeps rope_original_max_seq_len at its default"),
    ({"keep_window": True}, "max_seq_len: got 256, expected 2048", "leaves the window"),
    ({"flag": False}, "use_scaled_rope: got False, expected True", "scaling switched off"),
])
def test_stretch_rejects_plausible_mistakes_naming_the_field(capsys, mistake, message, named):
    assert not check_stretch_context(lambda a, n: stretch_by_hand(a, n, **mistake))
    out = capsys.readouterr().out
    assert message in out
    assert "→ " in out and named in out.split("→ ")[1]
    assert "✗ stretch_context(<model of dim 128, theta 500000, trained on 256 tokens>, 2048)" in out


def test_stretch_keeps_the_slowest_pair_within_its_trained_angle():
    """The rule's reason: with the factor target / trained, the slowest pair turns no further
    over the target length than it did over the trained one."""
    from llama3_mini.long_context import stretch_context
    from llama3_mini.rope import apply_scaling, rope_frequencies

    base = get_preset("tiny").replace(max_seq_len=256)
    for target in (512, 2048, 8192):
        a = stretch_context(base, target)
        freqs = rope_frequencies(a.head_dim, a.rope_theta)
        scaled = apply_scaling(freqs, a.rope_scaling_factor, a.rope_low_freq_factor,
                               a.rope_high_freq_factor, a.rope_original_max_seq_len)
        assert math.isclose(target * scaled[-1].item(), 256 * freqs[-1].item(), rel_tol=1e-5)


def test_stretch_lets_the_learners_own_error_through():
    with pytest.raises(AttributeError, match="max_seq"):
        check_stretch_context(lambda a, n: a.max_seq)
