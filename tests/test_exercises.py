"""Checkers whose chapters have no checker tests of their own (00, 04, 10): each accepts a right
answer written here independently of the package, and rejects plausible wrong answers with
a message naming the input, what came back and what was expected. Published parameter
counts are Meta's (model cards / Hugging Face safetensors metadata)."""
import math

import pytest

from llama3_mini.exercises import check_count_params, check_ffn_hidden_dim, check_name_entropy
from llama3_mini.synthetic import name_entropy_bits


# ------------------------------------------------------------- chapter 00: counting parameters
def count_by_hand(args, kv_heads=None, tied=None, final_norm=True):
    head_dim = args.dim // args.n_heads
    kv_heads = args.n_kv_heads or args.n_heads if kv_heads is None else kv_heads
    hidden = 4 * args.dim * 2 // 3
    if args.ffn_dim_multiplier is not None:
        hidden = int(args.ffn_dim_multiplier * hidden)
    hidden = args.multiple_of * math.ceil(hidden / args.multiple_of)
    wq_wo = 2 * args.dim * args.n_heads * head_dim
    wk_wv = 2 * args.dim * kv_heads * head_dim
    w1_w2_w3 = 3 * args.dim * hidden
    norms = 2 * args.dim
    tied = args.tie_word_embeddings if tied is None else tied
    embeddings = args.vocab_size * args.dim * (1 if tied else 2)
    return (embeddings + args.n_layers * (wq_wo + wk_wv + w1_w2_w3 + norms)
            + (args.dim if final_norm else 0))


def test_count_params_accepts_a_right_answer(capsys):
    assert check_count_params(count_by_hand)
    assert "✓ count_params: right on all" in capsys.readouterr().out


def test_count_params_rejects_ignoring_grouped_query_attention(capsys):
    assert not check_count_params(lambda a: count_by_hand(a, kv_heads=a.n_heads))
    out = capsys.readouterr().out
    assert "✗ count_params(ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8" in out
    # Llama 3 8B with a K and V head per query head: 2 * 32 * 4096 * 3072 more weights
    assert "returned 8835567616" in out and "expected 8030261248" in out
    assert "→ this gives wk and wv one head per query head" in out


def test_count_params_rejects_always_untied_embeddings(capsys):
    assert not check_count_params(lambda a: count_by_hand(a, tied=False))
    out = capsys.readouterr().out
    # Llama 3.2 1B shares its embedding and output matrix: 128256 * 2048 counted twice
    assert "✗ count_params(ModelArgs(dim=2048, n_layers=16" in out
    assert "returned 1498482688" in out and "expected 1235814400" in out
    assert "→ this counts the output matrix although it is tied" in out


def test_count_params_rejects_forgetting_the_final_norm(capsys):
    assert not check_count_params(lambda a: count_by_hand(a, final_norm=False))
    out = capsys.readouterr().out
    assert "returned 8030257152\n  expected 8030261248" in out
    assert "→ this leaves out the final norm" in out


def test_count_params_lets_the_learners_own_error_through():
    def broken(args):
        return args.n_kv_head  # a typo: the learner should see their own traceback

    with pytest.raises(AttributeError, match="n_kv_head"):
        check_count_params(broken)


# ---------------------------------------------------------- chapter 04: the SwiGLU hidden size
def hidden_by_hand(dim, multiple_of, multiplier, round_up=True, use_multiplier=True,
                   two_thirds=True):
    hidden = int(2 * 4 * dim / 3) if two_thirds else 4 * dim
    if multiplier is not None and use_multiplier:
        hidden = int(multiplier * hidden)
    steps = -(-hidden // multiple_of) if round_up else hidden // multiple_of
    return multiple_of * steps


def test_ffn_hidden_dim_accepts_a_right_answer(capsys):
    assert check_ffn_hidden_dim(hidden_by_hand)
    assert "✓ ffn_hidden_dim: right on all 9 cases" in capsys.readouterr().out


@pytest.mark.parametrize("mistake, returned", [
    ({"round_up": False}, 13312),  # 14198 rounded down to a multiple of 1024
    ({"use_multiplier": False}, 11264),  # 10922 rounded up, without the 1.3
    ({"two_thirds": False}, 21504),  # 1.3 * 16384 = 21299, rounded up
])
def test_ffn_hidden_dim_rejects_plausible_mistakes_on_llama3_8b(capsys, mistake, returned):
    assert not check_ffn_hidden_dim(lambda d, m, f: hidden_by_hand(d, m, f, **mistake))
    out = capsys.readouterr().out
    assert f"✗ ffn_hidden_dim(4096, 1024, 1.3)\n  returned {returned}\n  expected 14336" in out
    named = {"round_up": "→ this rounds down", "two_thirds": "→ this starts from 4 * dim",
             "use_multiplier": "→ this leaves out ffn_dim_multiplier"}
    assert named[next(iter(mistake))] in out



# ------------------------------------------------------- chapter 10: the entropy of choices
def entropy_by_hand(names, log=math.log2, distinct_only=False):
    if not names:
        return 0.0
    counts = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    if distinct_only:  # as if every name seen were equally likely
        return log(len(counts))
    return -sum(c / len(names) * log(c / len(names)) for c in counts.values())


def test_name_entropy_accepts_a_right_answer_and_the_packages_own(capsys):
    assert check_name_entropy(entropy_by_hand)
    assert "✓ name_entropy: right on all" in capsys.readouterr().out
    assert check_name_entropy(name_entropy_bits)


def test_name_entropy_rejects_nats_for_bits(capsys):
    assert not check_name_entropy(lambda names: entropy_by_hand(names, log=math.log))
    out = capsys.readouterr().out
    assert "✗ name_entropy(['Lily', 'Tom'])\n  returned 0.693" in out and "expected 1.0" in out
    assert "→ this is in nats (natural logarithm)" in out


def test_name_entropy_rejects_counting_distinct_names_only(capsys):
    assert not check_name_entropy(lambda names: entropy_by_hand(names, distinct_only=True))
    out = capsys.readouterr().out
    # two Lilys, one Tom, one Mia: 1.5 bits, not log2(3) = 1.585
    assert "✗ name_entropy(['Lily', 'Lily', 'Tom', 'Mia'])\n  returned 1.58" in out
    assert "expected 1.5" in out
    assert "→ this is log2 of the number of distinct names" in out


def test_name_entropy_rejects_nan_for_the_empty_list(capsys):
    assert not check_name_entropy(lambda names: entropy_by_hand(names) if names else math.nan)
    out = capsys.readouterr().out
    assert "✗ name_entropy([])\n  returned nan" in out
    assert "an empty list has no names to choose between: its entropy is 0.0" in out


def test_name_entropy_lets_a_crash_on_the_empty_list_through(capsys):
    def divides_by_zero(names):
        share = 1 / len(names)  # the learner forgot the empty list
        return -sum(names.count(n) * share * math.log2(names.count(n) * share)
                    for n in set(names))

    with pytest.raises(ZeroDivisionError):
        check_name_entropy(divides_by_zero)
    # the mistake is named before the learner's own traceback
    assert "your function raised ZeroDivisionError\n  → an empty list has no names" in \
        capsys.readouterr().out
