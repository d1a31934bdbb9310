"""The story grammar and its readings: a story parses back into exactly its choices (so the
corpus's entropy is exact), grammaticality, the facts the fine-tuning questions ask for,
the hero as the grammar reads it, and the recall probe's sentences, told by the grammar."""
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama3_mini.stories import (
    NAMELESS_PROBLEMS,
    NAMES,
    PROBLEMS,
    entropy_bits_per_byte,
    first_choices,
    grammatical_prefix,
    hero_of,
    is_grammatical,
    make_stories,
    make_story,
    nameless_sentence,
    parse_story,
    parse_story_all,
    story_answers,
    story_opening,
    story_start,
)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_every_story_parses_back_into_exactly_its_choices(seed):
    story = make_story(random.Random(seed))
    parses = parse_story_all(story.text, limit=2)
    assert len(parses) == 1, f"{len(parses)} parses of {story.text!r}"
    assert parses[0].choices == story.choices
    assert parses[0].bits == pytest.approx(story.bits, abs=1e-9)


# How many options each label has, and the weighted ones, written out independently of data.py.
SIZES = {"trait": 16, "kind": 16, "hero": 32, "place": 16, "have": 8, "color": 8, "thing": 16,
         "thing was": 8, "friend form": 2, "friend trait": 16, "friend kind": 16, "friend": 31,
         "when": 8, "problem": 5, "spot": 8, "pieces": 4, "feeling": 8, "reaction": 4,
         "saying": 8, "fix": 8, "search": 8, "how long": 8, "found at": 8, "glad": 4,
         "ending": 8, "moral": 8}
WEIGHTED = {("opening", "there was"): 0.5, ("opening", "lived in"): 0.3,
            ("opening", "long ago"): 0.2, ("moral?", "no"): 0.5, ("moral?", "yes"): 0.5}


def test_entropy_floor_equals_the_information_in_the_parsed_choices():
    stories = make_stories(60, seed=1)
    total_bits = 0.0
    for s in stories:
        more = [c for c in s.choices if c[0] == "more"]
        for label, option in parse_story(s.text).choices:
            if label == "more":
                continue
            total_bits += (-math.log2(WEIGHTED[label, option]) if (label, option) in WEIGHTED
                           else math.log2(SIZES[label]))
        # after episode 1: stop 0.6 / more 0.4; after episode 2: stop 0.7 / more 0.3
        probs = [{"stop": 0.6, "more": 0.4}, {"stop": 0.7, "more": 0.3}]
        total_bits += sum(-math.log2(probs[i][opt]) for i, (_, opt) in enumerate(more))
    n_bytes = sum(len(s.text.encode()) for s in stories)
    assert entropy_bits_per_byte(stories) == pytest.approx(total_bits / n_bytes, rel=1e-12)
    assert 0.05 < total_bits / n_bytes < 1.0


def test_opening_frequencies_follow_the_grammar_weights():
    counts = {}
    for s in make_stories(3000, seed=2):
        form = s.choices[0][1]  # the generator's record (parsing gives the same, above)
        counts[form] = counts.get(form, 0) + 1
    for form, p in [("there was", 0.5), ("lived in", 0.3), ("long ago", 0.2)]:
        assert abs(counts[form] / 3000 - p) < 0.03, counts


def test_names_recur_so_a_model_must_copy_them():
    for s in make_stories(100, seed=3):
        choices = dict(s.choices)
        assert s.text.count(choices["hero"]) >= 4, s.text
        assert s.text.count(choices["friend"]) >= 2, s.text
        assert choices["hero"] != choices["friend"]


def test_is_grammatical_accepts_stories_and_rejects_broken_ones():
    for s in make_stories(20, seed=4):
        hero, friend = dict(s.choices)["hero"], dict(s.choices)["friend"]
        assert is_grammatical(s.text)
        assert not is_grammatical(s.text[:-1]), "a truncated story"
        assert not is_grammatical(s.text + " The end."), "text after the end"
        # the hero's name changed in one place only: the copy is broken
        first = s.text.index(hero)
        second = s.text.index(hero, first + len(hero))
        other = "Zoe" if hero != "Zoe" and friend != "Zoe" else "Tom"
        assert not is_grammatical(s.text[:second] + other + s.text[second + len(hero):])
    assert not is_grammatical("")
    assert not is_grammatical("Once upon a time, there was a purple dragon named Tom.")
    with pytest.raises(ValueError, match="not a story of this grammar"):
        parse_story("Once upon a time.")


def test_same_seed_same_stories_different_seed_different():
    assert [s.text for s in make_stories(5, 7)] == [s.text for s in make_stories(5, 7)]
    assert [s.text for s in make_stories(5, 7)] != [s.text for s in make_stories(5, 8)]


def test_first_choices_keep_each_labels_first_option():
    assert first_choices([("when", "Later,"), ("hero", "Zoe"), ("when", "One day,")]) == \
        {"when": "Later,", "hero": "Zoe"}


def test_story_answers_and_opening_hold_every_fact():
    for s in make_stories(300, seed=5):
        answers, opening = story_answers(s), story_opening(s)
        first = first_choices(s.choices)
        article = "an" if first["color"][0] in "aeiou" else "a"
        assert answers == {"hero": first["hero"], "place": first["place"],
                           "thing": f"{article} {first['color']} {first['thing']}",
                           "friend": first["friend"]}
        assert s.text.startswith(opening) and opening.endswith(".")
        # it ends with the sentence that names the friend, and the friend's name first
        # appears in that sentence (the text reading and the grammar's reading agree)
        assert opening == s.text[:s.text.index(".", s.text.index(answers["friend"])) + 1]
        for fact in ("hero", "place", "friend"):
            assert answers[fact] in opening
        assert f"{first['color']} {first['thing']}" in opening
        assert 2 * len(opening) < len(s.text)


def test_hero_of_reads_the_hero_the_grammar_chose():
    for s in make_stories(100, seed=6):
        hero = story_answers(s)["hero"]
        assert hero_of(s.text) == hero
        end = s.text.index(hero) + len(hero)
        sentence_end = s.text.index(".", end) + 1
        assert hero_of(s.text[:sentence_end]) == hero  # a sample cut after the hero's sentence
        assert hero_of(s.text[:sentence_end] + " Then a dragon came.") == hero
        assert hero_of(s.text[:end - 1]) is None  # cut inside the name: not told in full
        assert hero_of("Once upon a time, a cat" + s.text[end:]) is None
    assert hero_of("") is None
    assert hero_of("Otto was a brave fox who lived in a sunny farm.") == "Otto"


def test_the_probes_sentences_are_the_grammars():
    """The recall probe's text comes from the grammar: its intro is a story's start, and
    each sentence that names nobody goes on from a story's start up to where the grammar's
    next word is the hero's name."""
    intro = story_start([("opening", "there was"), ("trait", "little"), ("kind", "fox"),
                         ("hero", "Lily"), ("place", "a big forest"), ("have", "had"),
                         ("color", "red"), ("thing", "kite"), ("thing was", "shiny")])
    assert intro == ("Once upon a time, there was a little fox named Lily. Lily lived in a "
                     "big forest. Lily had a red kite. The kite was shiny.")
    assert NAMELESS_PROBLEMS == [p for p in PROBLEMS if p != "lost"]
    start = story_start([("opening", "lived in"), ("hero", "Lily"), ("trait", "shy"),
                         ("kind", "owl"), ("place", "a cold pond"), ("have", "had"),
                         ("color", "red"), ("thing", "kite"), ("thing was", "shiny"),
                         ("friend form", "named"), ("friend", "Max"),
                         ("friend trait", "kind"), ("friend kind", "cat")])
    assert start.endswith("Max, a kind cat.")
    rng, seen = random.Random(0), set()
    for _ in range(200):
        sentence = nameless_sentence(rng, "red", "kite")
        assert sentence.endswith(".") and not any(name in sentence for name in NAMES)
        assert grammatical_prefix(start + sentence + " Lily felt") == 1.0
        assert grammatical_prefix(start + sentence + " Max felt") < 1.0
        seen.add(sentence.split(",")[1].split()[1])  # the problem's first word
    assert seen == {"kite", "strong", "naughty"}  # "the kite fell/broke", "a strong wind", ...
