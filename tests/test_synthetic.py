"""Chapter 10: the grammar's bits by kind of choice, a model's bits on the same tokens,
the graded grammaticality, copy accuracy and diversity (the chapter's checker: test_exercises)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llama3_mini.config import ModelArgs
from llama3_mini.model import Transformer
from llama3_mini.stories import (
    NAMES,
    choice_spans,
    grammatical_prefix,
    is_grammatical,
    make_stories,
)
from llama3_mini.synthetic import (
    bits_by_kind,
    choice_kind,
    copy_accuracy,
    copying_probe,
    diversity,
    name_entropy_bits,
    name_mentions,
    wilson_interval,
)
from llama3_mini.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    text = "\n".join(s.text for s in make_stories(300, 0))
    return Tokenizer.train(text, 700, progress=False)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_spans_add_up_to_the_story_and_show_the_options(seed):
    story = make_stories(1, seed)[0]
    spans = choice_spans(story)
    assert len(spans) == len(story.choices)
    assert abs(sum(b for *_, b in spans) - story.bits) < 1e-9
    for (start, end, label, _), (label2, option) in zip(spans, story.choices, strict=True):
        assert label == label2
        assert 0 <= start < end <= len(story.text) + 1
        if label in ("hero", "friend", "place", "color", "thing", "spot", "feeling"):
            # a printed option is told where it is printed, or by its article just before it
            # (" a" or " an" tells whether the word starts with a vowel: "an orange" is told by "n")
            found = [i for i in range(len(story.text)) if story.text.startswith(option, i)]
            assert any(i - 2 <= start < i + len(option) for i in found), (label, option, start)


def test_spans_refuse_a_story_whose_choices_do_not_make_its_text():
    story = make_stories(1, 3)[0]
    story.text = story.text.replace(".", "!", 1)
    with pytest.raises(ValueError, match="do not make its text"):
        choice_spans(story)


def test_choice_kinds():
    assert choice_kind("hero") == choice_kind("friend") == "names"
    assert choice_kind("place") == "places" and choice_kind("more") == "structure"
    assert choice_kind("color") == "other words"


def test_bits_by_kind_grammar_and_a_uniform_model(tokenizer):
    stories = make_stories(12, 4)
    grammar = bits_by_kind(None, tokenizer, stories)
    assert abs(sum(v["grammar"] for v in grammar.values())
               - sum(s.bits for s in stories) / len(stories)) < 1e-9
    assert grammar["function words"]["grammar"] == 0.0

    class Uniform(torch.nn.Module):  # every token costs log2(vocab) bits
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.zeros(*x.shape, tokenizer.n_words)

    scored = bits_by_kind(Uniform(), tokenizer, stories)
    n_predicted = sum(len(tokenizer.encode(s.text, bos=True, eos=True)) - 1 for s in stories)
    expected = n_predicted * math.log2(tokenizer.n_words) / len(stories)
    assert abs(sum(v["model"] for v in scored.values()) - expected) < 1e-6 * expected


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), cut=st.floats(0.05, 0.95))
def test_grammatical_prefix(seed, cut):
    text = make_stories(1, seed)[0].text
    k = int(len(text) * cut)
    assert grammatical_prefix(text) == 1.0
    assert grammatical_prefix(text[:k]) == 1.0  # a prefix of a story is grammatical so far
    broken = text[:k] + "\x00" + text[k:]  # a byte the grammar never writes
    assert grammatical_prefix(broken) == pytest.approx(k / len(broken))
    assert not is_grammatical(broken)
    assert grammatical_prefix("") == 0.0


class _Oracle(torch.nn.Module):
    """Predicts each story's true next token (right=True) or always token 0."""

    def __init__(self, tokenizer, stories, right):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.n = tokenizer.n_words
        self.right = right

    def forward(self, x):
        logits = torch.zeros(*x.shape, self.n)
        if self.right:
            logits[0, :-1].scatter_(1, x[0, 1:, None], 1.0)  # position i predicts token i+1
        else:
            logits[..., 0] = 1.0
        return logits


def test_copy_accuracy_with_an_oracle_and_a_constant(tokenizer):
    stories = make_stories(8, 9)
    assert copy_accuracy(_Oracle(tokenizer, stories, True), tokenizer, stories) == 1.0
    assert copy_accuracy(_Oracle(tokenizer, stories, False), tokenizer, stories) == 0.0


@settings(max_examples=50, deadline=None)
@given(counts=st.lists(st.integers(1, 20), min_size=1, max_size=8))
def test_name_entropy_equals_torch_s_categorical_entropy_and_bounds_the_orders(counts):
    names = [NAMES[i] for i, c in enumerate(counts) for _ in range(c)]
    n, bits = sum(counts), name_entropy_bits(names)
    # torch's own entropy of the distribution (in nats), not the formula retyped
    probs = torch.tensor(counts, dtype=torch.float64) / n
    assert bits == pytest.approx(torch.distributions.Categorical(probs=probs).entropy().item()
                                 / math.log(2), abs=1e-9)
    # an independent count: the list's distinct orders, n! / (c1! c2! ...), number at most
    # 2 ** (n * H) and at least 2 ** (n * H) / (n + 1) ** (k - 1) (the method of types)
    orders = math.factorial(n) // math.prod(math.factorial(c) for c in counts)
    assert math.log2(orders) <= n * bits + 1e-9
    assert math.log2(orders) >= n * bits - (len(counts) - 1) * math.log2(n + 1) - 1e-9


@pytest.mark.parametrize("k, each", [(1, 5), (2, 3), (4, 1), (8, 7)])
def test_name_entropy_of_k_equally_frequent_names_is_log2_k(k, each):
    assert name_entropy_bits(NAMES[:k] * each) == pytest.approx(math.log2(k), abs=1e-12)
    assert name_entropy_bits(["Lily", "Lily", "Tom", "Mia"]) == 1.5  # the docstring's example


def test_diversity():
    stories = [s.text for s in make_stories(40, 2)]
    d = diversity(stories + stories[:10])
    assert d["distinct"] == pytest.approx(40 / 50) and d["n"] == 50
    heroes = [dict(reversed(s.choices))["hero"] for s in make_stories(40, 2)]
    heroes += heroes[:10]
    # torch's entropy of the heroes' shares, not name_entropy_bits (which diversity calls)
    shares = torch.tensor([heroes.count(h) for h in set(heroes)], dtype=torch.float64)
    expected = torch.distributions.Categorical(probs=shares / len(heroes)).entropy().item()
    assert d["name_entropy"] == pytest.approx(expected / math.log(2), rel=1e-12)
    assert 0 < d["name_entropy"] < math.log2(len(NAMES))


# ------------------------------------------- attribution against a model whose answer is known
class _Prob(Exception):
    pass


class _GrammarPrefix:
    """Replays forced option indices with their probabilities; stops where its text leaves
    the target (reach = characters matched) or where it runs out of forced choices."""

    def __init__(self, target, forced):
        self.target, self.forced, self.k, self.pos, self.p = target, forced, 0, 0, 1.0
        self.ended, self.need = False, None

    def pick(self, label, options, weights=None):
        if self.k == len(self.forced):
            self.need = [1 / len(options)] * len(options) if weights is None else \
                [w / sum(weights) for w in weights]
            raise _Prob
        i = self.forced[self.k]
        self.k += 1
        self.p *= 1 / len(options) if weights is None else weights[i] / sum(weights)
        return options[i]

    def say(self, text):
        rest = self.target[self.pos:self.pos + len(text)]
        if rest != text:
            common = next((i for i, (a, b) in enumerate(zip(rest, text, strict=False))
                           if a != b), len(rest))
            self.pos += common
            raise _Prob
        self.pos += len(text)


def grammar_prefix_probabilities(text):
    """P(the grammar's story starts with text[:j]) for j = 0..len(text), and P(the story is
    exactly text), by enumerating every way of making the choices until the text leaves it."""
    from llama3_mini.stories import tell  # the grammar itself, enumerated here by hand

    reach_mass = [0.0] * (len(text) + 2)  # reach_mass[r]: probability of matching exactly r chars
    exact, stack = 0.0, [[]]
    while stack:
        forced = stack.pop()
        g = _GrammarPrefix(text, forced)
        try:
            tell(g)
            if g.pos == len(text):
                exact += g.p  # the story ends exactly here
            reach_mass[g.pos] += g.p
        except _Prob:
            if g.need is not None:
                stack.extend(forced + [i] for i, q in enumerate(g.need) if q > 0)
                continue
            reach_mass[g.pos] += g.p
    at_least = [sum(reach_mass[j:]) for j in range(len(text) + 1)]
    return at_least, exact


class _GrammarModel(torch.nn.Module):
    """A byte-level model that predicts each story's next byte with the grammar's own
    probability: it pays, on every token, exactly the information that token reveals."""

    def __init__(self, tokenizer, stories):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.n, self.table = tokenizer.n_words, {}
        for s in stories:
            at_least, exact = grammar_prefix_probabilities(s.text)
            probs = [at_least[j + 1] / at_least[j] for j in range(len(s.text))]
            probs.append(exact / at_least[-1])  # <|end_of_text|>
            ids = tokenizer.encode(s.text, bos=True, eos=True)
            self.table[tuple(ids[:-1])] = (ids[1:], probs)

    def forward(self, x):
        targets, probs = self.table[tuple(x[0].tolist())]
        logits = torch.full((1, x.shape[1], self.n), -1e9, dtype=torch.float64)
        for i, (t, p) in enumerate(zip(targets, probs, strict=True)):
            logits[0, i, :] = math.log(max(1 - p, 1e-300) / (self.n - 1)) if p < 1 else -1e9
            logits[0, i, t] = math.log(p)
        return logits


def test_bits_by_kind_charges_a_grammar_perfect_model_what_the_grammar_says():
    """The known answer: a model with the grammar's own next-byte probabilities pays, in
    total, exactly the stories' information; attributed right, it also pays each kind of
    choice what the grammar says that kind carries, and nothing on function words. (The first
    attribution, which charged a choice whose option is not printed to the first word of the
    text after it, charged this model half the structure's bits and put about 5 bits per
    story on function words.)"""
    byte_tokenizer = Tokenizer({bytes([i]): i for i in range(256)})
    stories = make_stories(6, 21)
    model = _GrammarModel(byte_tokenizer, stories)
    scored = bits_by_kind(model, byte_tokenizer, stories)
    total_model = sum(v["model"] for v in scored.values())
    total_grammar = sum(s.bits for s in stories) / len(stories)
    assert total_model == pytest.approx(total_grammar, rel=1e-6)
    for kind, v in scored.items():
        assert v["model"] == pytest.approx(v["grammar"], abs=0.1), (kind, scored)
    assert scored["function words"]["model"] < 0.05


def test_wilson_interval_against_newcombe():
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Statistics
    # in Medicine 17: Table I, method 3 (the score interval, no continuity correction)
    for (k, n), (lo, hi) in {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605),
                             (0, 20): (0.0, 0.1611), (1, 29): (0.0061, 0.1718)}.items():
        got = wilson_interval(k, n)
        assert abs(got[0] - lo) < 6e-5 and abs(got[1] - hi) < 6e-5, (k, n, got)
    assert wilson_interval(20, 20)[1] == 1.0
    with pytest.raises(ValueError, match="n"):
        wilson_interval(3, 2)


def test_name_mentions_hold_the_name(tokenizer):
    for story in make_stories(20, 4):
        ids = tokenizer.encode(story.text)
        friend = " " + dict(story.choices)["friend"]
        found = name_mentions(tokenizer, ids, story.text, friend)
        assert len(found) == story.text.count(friend) > 0
        for m in found:  # the tokens cover the name, and drop one at either end and they do not
            text = tokenizer.decode([ids[i] for i in m])
            assert friend.strip() in text and m == list(range(m[0], m[-1] + 1))
            assert friend.strip() not in tokenizer.decode([ids[i] for i in m[1:]])
            assert friend.strip() not in tokenizer.decode([ids[i] for i in m[:-1]])


def test_copying_probe_finds_a_head_that_looks_at_the_friend(tokenizer):
    """Head 0 puts all its attention on the tokens that spell the friend's name earlier (found
    by decoding each token, not by name_mentions); head 1 spreads it evenly over the past."""
    stories = [s for s in make_stories(40, 7)  # friends whose name is one token
               if len(tokenizer.encode(" " + dict(s.choices)["friend"])) == 1][:12]
    friends = {tuple(tokenizer.encode(s.text)): dict(s.choices)["friend"] for s in stories}

    def fake_attention(model, tokens):
        ids = tokens.tolist()
        n = len(ids)
        named = torch.tensor([tokenizer.decode([t]) == " " + friends[tuple(ids)] for t in ids])
        w = torch.zeros(1, 2, n, n)
        w[0, 1] = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]
        for q in range(n):
            past = named & (torch.arange(n) < q)
            w[0, 0, q] = past / past.sum() if past.any() else w[0, 1, q]
        return w

    model = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=700,
                                  multiple_of=16, max_seq_len=32))
    probe = copying_probe(model, tokenizer, stories, fake_attention)
    assert probe["queries"] > 5
    assert probe["friend"][0, 0].item() == pytest.approx(1.0)
    assert probe["hero"][0, 0].item() == pytest.approx(0.0)
    assert probe["friend"][0, 1] < 0.2
    # the even head gives the previous token and the first token the same share
    assert probe["previous"][0, 1].item() == pytest.approx(probe["first"][0, 1].item())
    with pytest.raises(ValueError, match="no query"):
        copying_probe(model, tokenizer, stories, fake_attention, min_gap=10_000)
