"""Chapter 08: Llama 3.1's RoPE scaling by band, against hand-computed values and Hugging
Face's implementation; factor 1 changes nothing; the long-context helpers; the checker."""
import math
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from llama3_mini.config import ModelArgs, get_preset
from llama3_mini.exercises import check_rope_scaling
from llama3_mini.long_context import (
    attention_flops,
    loss_by_position,
    name_recall_probe,
    recall_accuracy,
    weight_flops,
    window_mask,
    with_context,
)
from llama3_mini.model import Transformer
from llama3_mini.rope import apply_scaling, rope_frequencies
from llama3_mini.stories import grammatical_prefix
from llama3_mini.tokenizer import Tokenizer

SMALL = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=16,
                  max_seq_len=32)


def test_scaling_bands_by_hand():
    # original 8192, low 1, high 4: wavelengths below 2048 kept, above 8192 divided by s.
    wavelengths = torch.tensor([100.0, 2000.0, 4096.0, 6000.0, 8500.0, 50000.0])
    freqs = 2 * math.pi / wavelengths
    got = apply_scaling(freqs, 8.0, 1.0, 4.0, 8192)
    t_4096 = (8192 / 4096 - 1) / 3  # = 1/3
    t_6000 = (8192 / 6000 - 1) / 3
    expected = [freqs[0], freqs[1],  # high-frequency band: unchanged
                (1 - t_4096) * freqs[2] / 8 + t_4096 * freqs[2],  # blend: f * 10/24
                (1 - t_6000) * freqs[3] / 8 + t_6000 * freqs[3],
                freqs[4] / 8, freqs[5] / 8]  # low-frequency band: divided by 8
    torch.testing.assert_close(got, torch.stack([torch.as_tensor(e) for e in expected]))
    assert abs(got[2].item() - freqs[2].item() * 10 / 24) < 1e-9

    # Llama 3.1's own frequencies (head_dim 128, theta 500,000): each band by the same rule
    freqs = rope_frequencies(128, 500000.0)
    scaled = apply_scaling(freqs, scale_factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_seq_len=8192)
    wavelen = 2 * torch.pi / freqs
    high, low = wavelen < 8192 / 4, wavelen > 8192 / 1
    mid = ~high & ~low
    assert high.any() and mid.any() and low.any()  # all three bands are present
    torch.testing.assert_close(scaled[high], freqs[high])
    torch.testing.assert_close(scaled[low], freqs[low] / 8)
    smooth = (8192 / wavelen[mid] - 1) / (4 - 1)
    torch.testing.assert_close(scaled[mid], (1 - smooth) * freqs[mid] / 8 + smooth * freqs[mid])
    # factor 1, with the default bands, leaves every frequency as it was
    torch.testing.assert_close(apply_scaling(freqs, scale_factor=1.0), freqs)


def test_scaling_matches_hugging_face():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for factor, original, theta in ((8.0, 256, 500000.0), (32.0, 8192, 500000.0),
                                    (4.0, 64, 10000.0)):
        config = LlamaConfig(hidden_size=256, num_attention_heads=8,
                             max_position_embeddings=int(original * factor),
                             rope_parameters={"rope_type": "llama3", "rope_theta": theta,
                                              "factor": factor, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": original})
        inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, None)
        ours = apply_scaling(rope_frequencies(32, theta), factor, 1.0, 4.0, original)
        torch.testing.assert_close(ours, inv_freq.float(), rtol=1e-5, atol=0)


@settings(max_examples=60, deadline=None)
@given(head_dim=st.sampled_from([8, 16, 32, 64, 128]),
       theta=st.floats(100.0, 1e6), low=st.floats(0.5, 2.0), gap=st.floats(0.5, 8.0),
       original=st.integers(16, 200000))
def test_factor_one_changes_nothing(head_dim, theta, low, gap, original):
    freqs = rope_frequencies(head_dim, theta)
    torch.testing.assert_close(apply_scaling(freqs, 1.0, low, low + gap, original), freqs)


def test_with_context_keeps_short_positions_and_factor_one():
    torch.manual_seed(0)
    model = Transformer(SMALL).eval()
    x = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        long = with_context(model, 128)
        torch.testing.assert_close(long(x), model(x))
        one = with_context(model, 128, scaling_factor=1.0)
        y = torch.randint(0, 300, (1, 128))
        torch.testing.assert_close(one(y), long(y))
        eight = with_context(model, 128, scaling_factor=8.0)
        assert not torch.allclose(eight(y), long(y))
    assert eight.params.rope_original_max_seq_len == 32 and eight.params.use_scaled_rope
    with pytest.raises(ValueError, match="max_seq_len"):
        with_context(model, 0)


def test_loss_by_position_matches_cross_entropy_row_by_row():
    torch.manual_seed(1)
    model = Transformer(SMALL).eval()
    rows = torch.randint(0, 300, (5, 17))
    with torch.no_grad():
        per_row = torch.stack([F.cross_entropy(model(r[None, :-1])[0], r[1:], reduction="none")
                               for r in rows])  # (5, 16)
    torch.testing.assert_close(loss_by_position(model, rows, batch_size=2), per_row.mean(0))


def test_window_mask_by_hand_and_a_full_window_changes_nothing():
    inf = float("-inf")
    assert window_mask(3, 2).tolist() == [[0, inf, inf], [0, 0, inf], [inf, 0, 0]]
    torch.manual_seed(1)
    model = Transformer(SMALL).eval()
    rows = torch.randint(0, 300, (3, 21))
    torch.testing.assert_close(loss_by_position(model, rows, window=20),
                               loss_by_position(model, rows))
    with pytest.raises(ValueError, match="window"):
        window_mask(4, 0)


def test_windowed_logits_equal_the_last_window_alone():
    """RoPE sees offsets only: with a window of w, one layer's logits at position p equal
    those of the last w tokens run alone from position 0 (another absolute position). (With
    more layers the window compounds: position p reaches back layers x (w - 1) tokens.)"""
    torch.manual_seed(2)
    model = Transformer(SMALL.replace(n_layers=1)).double().eval()
    x = torch.randint(0, 300, (2, 30))
    w = 7
    with torch.no_grad():
        windowed = model(x, mask=window_mask(30, w).double())  # (2, 30, vocab)
        for p in (w - 1, 15, 29):
            alone = model(x[:, p - w + 1: p + 1])[:, -1]  # positions 0..w-1
            torch.testing.assert_close(windowed[:, p], alone)
        full = model(x)[:, 29]
    assert (full - windowed[:, 29]).abs().max() > 1e-3  # the window did change something


def test_weight_flops_match_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    for args in (SMALL, SMALL.replace(tie_word_embeddings=True)):
        model = Transformer(args).eval().set_fast_attention(False)  # explicit matmuls
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 20, dtype=torch.long))
        # the counter sees the full square of scores (4 x dim per query-key pair and layer),
        # attention_flops halves it for the causal mask; the embedding lookup counts nothing
        assert counter.get_total_flops() == weight_flops(args, 20) + 2 * attention_flops(args, 20)


@pytest.fixture(scope="module")
def tokenizer():
    from llama3_mini.stories import make_stories

    text = "\n".join(s.text for s in make_stories(200, 0))
    return Tokenizer.train(text, 600, progress=False)


def test_name_recall_probe(tokenizer):
    for distance in (10, 80, 300):
        tokens, query, answer = name_recall_probe(tokenizer, distance, n=6, seed=2)
        for row, q, a in zip(tokens, query, answer, strict=True):
            text = tokenizer.decode(row[: q + 1].tolist())
            hero = text.split("named ")[1].split(".")[0]
            assert tokenizer.encode(f" {hero}")[0] == a.item()
            assert text.count(hero) == 3  # named X. X lived in ... X had ...; then nobody
            assert text.endswith(".")
            # the grammar's own text: a story's start, each sentence after it one the grammar
            # tells before the hero's name comes back (" Lily felt ...")
            intro, rest = text.removeprefix("<|begin_of_text|>").split(" shiny.", 1)
            friend = "Max" if hero != "Max" else "Tom"
            start = f"{intro} shiny. {hero} had a friend named {friend}, a kind cat."
            assert grammatical_prefix(start) == 1.0
            for sentence in re.findall(r" [^.]*\.", rest):
                assert grammatical_prefix(f"{start}{sentence} {hero} felt") == 1.0
            last = len(tokenizer.encode(text[: text.rindex(hero)], bos=True))
            gap = q.item() + 1 - last
            assert distance - 25 <= gap <= distance + 30, (distance, gap)
            assert (row[q + 1:] == 0).all()


def test_friend_probe_asks_for_the_friend_after_the_hero(tokenizer):
    for distance in (20, 150):
        tokens, query, answer = name_recall_probe(tokenizer, distance, n=6, seed=3,
                                                  fact="friend")
        for row, q, a in zip(tokens, query, answer, strict=True):
            text = tokenizer.decode(row[: q + 1].tolist()).removeprefix("<|begin_of_text|>")
            hero = text.split(" was ")[0]
            friend = text.split(" called ")[1].split(".")[0]
            assert friend != hero and tokenizer.encode(f" {friend}")[0] == a.item()
            assert text.count(friend) == 1  # introduced once, never again before the query
            assert re.search(rf" {hero} felt \w+ and [a-z ]+\.$", text)
            # the grammar's text: the start, and each sentence then the friend's reply
            start, rest = text.split(f" called {friend}.", 1)
            start += f" called {friend}."
            assert grammatical_prefix(start) == 1.0
            *fillers, last = re.findall(r" [^.]*\.", rest)
            assert fillers and last.startswith(f" {hero} felt")
            for sentence in fillers:  # an episode's start, the hero's feeling, then the friend
                assert grammatical_prefix(f"{start}{sentence}{last} {friend} said,") == 1.0
            first = len(tokenizer.encode(text[: text.index(" called ") + 8], bos=True))
            assert distance - 25 <= q.item() + 1 - first <= distance + 40
    with pytest.raises(ValueError, match="fact"):
        name_recall_probe(tokenizer, 20, fact="place")


def test_recall_accuracy_reads_the_query_position(tokenizer):
    tokens, query, answer = name_recall_probe(tokenizer, 40, n=5, seed=0)

    class Oracle(torch.nn.Module):
        def __init__(self, right):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.right = right

        def forward(self, x):
            logits = torch.zeros(*x.shape, tokenizer.n_words)
            for i in range(len(x)):
                target = answer[i] if self.right[i] else (answer[i] + 1) % tokenizer.n_words
                logits[i, query[i], target] = 1.0
            return logits

    assert recall_accuracy(Oracle([1, 1, 1, 1, 1]), tokens, query, answer) == 1.0
    assert recall_accuracy(Oracle([1, 0, 1, 0, 0]), tokens, query, answer) == pytest.approx(0.4)


def test_attention_flops_quadratic_and_8b_value():
    a = get_preset("llama3-8b")
    assert attention_flops(a, 2048) == 4 * attention_flops(a, 1024)
    # 32 layers, 4096 = 32 x 128 per layer; QK^T and AV: 2 x 2 x 4096 x n^2, halved (causal)
    assert attention_flops(a, 1000) == 32 * 2 * 4096 * 1000 ** 2


def _hand(freqs, s, low, high, original):
    wavelength = 2 * math.pi / freqs
    t = (original / wavelength - low) / (high - low)
    blend = (1 - t) * freqs / s + t * freqs
    out = torch.where(wavelength > original / low, freqs / s, blend)
    return torch.where(wavelength < original / high, freqs, out)


def test_checker_accepts_reference_and_rejects_wrong_answers(capsys):
    assert check_rope_scaling(_hand)
    assert check_rope_scaling(apply_scaling)

    def no_blend(freqs, s, low, high, original):  # a step at the low-frequency edge
        return torch.where(2 * math.pi / freqs > original / low, freqs / s, freqs)

    def divide_all(freqs, s, low, high, original):
        return freqs / s

    def swapped(freqs, s, low, high, original):  # low and high factors the wrong way round
        return _hand(freqs, s, high, low, original)

    capsys.readouterr()
    for wrong in (no_blend, divide_all, swapped):
        assert not check_rope_scaling(wrong)
        assert "✗ rope_scaling(" in capsys.readouterr().out
