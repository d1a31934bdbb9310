"""The story grammar and every reading of it. `tell` is the grammar: it asks a teller for
each choice (`ch.pick(label, options, weights)`) and hands it each piece of text
(`ch.say(text)`). Every reading is one `_Teller` with its own way of choosing: at random
(`make_stories`), each option in turn against a text (`parse_story`, `grammatical_prefix`,
`hero_of`), a story's recorded choices (`choice_spans`, `story_opening`), or given ones (the
recall probe's sentences)."""
from __future__ import annotations

import bisect
import math
import random
from collections import namedtuple
from dataclasses import dataclass, field
from itertools import accumulate, islice

# The story grammar. Each list is a set of options a story picks from uniformly unless
# weights are given. No option is a prefix of another where they can meet in the same place,
# so a story's text decides its choices (tests/test_data.py parses stories back to prove it).
NAMES = ("Lily Tom Mia Ben Sam Anna Max Zoe Leo Emma Jack Lucy Finn Ruby Noah Ivy Owen Rosa "
         "Hugo Nora Eli Maya Otto Kate Dan Pia Gus Tess Carl Wendy Bo Jude").split()
KINDS = "girl boy rabbit fox bear cat dog mouse duck owl frog pig goat lion hen bee".split()
TRAITS = ("little brave kind happy shy clever small gentle funny quiet tall young busy silly old "
          "sleepy").split()
PLACES = ["a small village", "a big forest", "a sunny farm", "an old castle", "a quiet town",
          "a green valley", "a busy city", "a tiny island", "a snowy mountain", "a sandy beach",
          "a dark cave", "a pretty garden", "a tall tree", "a wide river", "a warm house",
          "a cold pond"]
COLORS = "red blue green yellow purple orange pink white".split()
THINGS = "ball kite hat boat book drum cup box bell shell coin key doll sock lamp map".split()
HAVE = "loved wanted had found made got kept lost".split()
THING_WAS = ["very old", "brand new", "soft", "shiny", "big", "tiny", "heavy", "light"]
WHEN = ["One day,", "One morning,", "One evening,", "Then one day,", "Later,", "After lunch,",
        "On a rainy day,", "On a windy day,"]
PROBLEMS = ["fell", "wind", "lost", "took", "broke"]  # what goes wrong in an episode
SPOTS = ["a deep hole", "the river", "a muddy puddle", "a thick bush", "the tall grass",
         "a big box", "the old well", "a pile of leaves"]
PIECES = ["two", "three", "four", "many"]
FEELINGS = "sad scared angry worried upset lonely cross tired".split()
REACTIONS = ["cried", "sat down", "looked around", "called for help"]
SAYINGS = ["Do not worry, I will help you!", "Let us look together.", "I know what to do!",
           "We can fix this.", "Come with me!", "Be brave, we will find a way.",
           "I have an idea!", "Let us try again."]
SEARCH = "searched looked walked asked ran waited dug climbed".split()
HOW_LONG = ["all day", "for a long time", "until dark", "very fast", "very slowly",
            "again and again", "with care", "side by side"]
FOUND_AT = ["under a rock", "behind a tree", "in the mud", "near the door", "on a hill",
            "by the water", "under the bed", "in a nest"]
FIX_WITH = ["glue", "string", "tape", "a nail", "a ribbon", "some wire", "a button", "wax"]
GLAD = ["happy", "glad", "proud", "thankful"]
ENDINGS = ["played with the {thing} all day", "went home for dinner", "sang a song",
           "shared a big cake", "watched the stars", "laughed and laughed", "took a nap",
           "danced in the sun"]
MORALS = ["friends help each other", "it is good to be kind", "you should never give up",
          "sharing makes people happy", "being careful matters", "asking for help is brave",
          "patience is important", "every problem has an answer"]
OPENINGS = [0.5, 0.3, 0.2]  # weights of the three ways a story begins
MORE = [[0.6, 0.4], [0.7, 0.3]]  # P(stop), P(another episode) after episode 1 and 2
MORAL = [0.5, 0.5]  # P(no moral), P(moral)


def _a(word: str) -> str:
    """The word with its article: "owl" -> "an owl", "red" -> "a red"."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def tell(ch) -> None:
    """The grammar: `ch.pick(label, options, weights)` makes a choice and `ch.say(text)`
    writes text. Every interpreter runs this one function; each choice is written out right
    after it is made, so that a parser can reject a wrong guess at once."""
    form = ch.pick("opening", ["there was", "lived in", "long ago"], OPENINGS)
    if form == "long ago":
        ch.say(f"Long ago, in {ch.pick('place', PLACES)}, there lived ")
    elif form == "there was":
        ch.say("Once upon a time, there was ")
    if form == "lived in":
        hero = ch.pick("hero", NAMES)
        ch.say(f"{hero} was ")
    ch.say(_a(ch.pick("trait", TRAITS)))
    kind = ch.pick("kind", KINDS)
    if form == "lived in":
        ch.say(f" {kind} who lived in {ch.pick('place', PLACES)}.")
    else:
        ch.say(f" {kind} {'named' if form == 'there was' else 'called'} ")
        hero = ch.pick("hero", NAMES)
        ch.say(f"{hero}.")
    if form == "there was":
        ch.say(f" {hero} lived in {ch.pick('place', PLACES)}.")
    ch.say(f" {hero} {ch.pick('have', HAVE)} ")
    color = ch.pick("color", COLORS)
    ch.say(_a(color))
    thing = ch.pick("thing", THINGS)
    ch.say(f" {thing}. The {thing} was {ch.pick('thing was', THING_WAS)}.")
    others = [n for n in NAMES if n != hero]  # a friend never shares the hero's name
    if ch.pick("friend form", ["named", "best friend"]) == "named":
        friend = ch.pick("friend", others)
        ch.say(f" {hero} had a friend named {friend}, ")
        ch.say(_a(ch.pick("friend trait", TRAITS)))
        ch.say(f" {ch.pick('friend kind', KINDS)}.")
    else:
        ch.say(f" {hero}'s best friend was ")
        ch.say(_a(ch.pick("friend trait", TRAITS)))
        ch.say(f" {ch.pick('friend kind', KINDS)} called ")
        friend = ch.pick("friend", others)
        ch.say(f"{friend}.")
    for episode in range(3):
        _episode(ch, hero, friend, color, thing)
        if episode == 2 or ch.pick("more", ["stop", "more"], MORE[episode]) == "stop":
            break
    ch.say(f" In the end, {hero} was {ch.pick('glad', GLAD)} and they ")
    ch.say(ch.pick("ending", ENDINGS).format(thing=thing) + ".")
    if ch.pick("moral?", ["no", "yes"], MORAL) == "yes":
        ch.say(f" {hero} learned that {ch.pick('moral', MORALS)}.")


def _episode(ch, hero: str, friend: str, color: str, thing: str) -> None:
    ch.say(f" {ch.pick('when', WHEN)} ")
    problem = ch.pick("problem", PROBLEMS)
    if problem == "fell":
        ch.say(f"the {thing} fell into ")
        ch.say(f"{ch.pick('spot', SPOTS)}.")
    elif problem == "wind":
        ch.say(f"a strong wind blew the {color} {thing} into ")
        ch.say(f"{ch.pick('spot', SPOTS)}.")
    elif problem == "lost":
        ch.say(f"{hero} could not find the {thing}.")
    elif problem == "took":
        ch.say(f"a naughty crow took the {color} {thing} away.")
    else:
        ch.say(f"the {thing} broke into ")
        ch.say(f"{ch.pick('pieces', PIECES)} pieces.")
    ch.say(f" {hero} felt {ch.pick('feeling', FEELINGS)} and ")
    ch.say(f"{ch.pick('reaction', REACTIONS)}.")
    ch.say(f' {friend} said, "{ch.pick("saying", SAYINGS)}"')
    if problem == "broke":
        ch.say(f" So {friend} fixed the {thing} with {ch.pick('fix', FIX_WITH)}.")
    else:
        ch.say(f" So {hero} and {friend} {ch.pick('search', SEARCH)} ")
        ch.say(f"{ch.pick('how long', HOW_LONG)}.")
        ch.say(f" At last, they found the {color} {thing} {ch.pick('found at', FOUND_AT)}.")


# The one replay mechanism: a teller, and the ways it can choose.
class _Stop(Exception):
    """A run stops: its text left the target, or it has no option (of args[0]) to take."""


# One choice as made: its label, the option taken and its index among n_options, its
# information (bits), and `at`, how many characters had been told when it was made.
_Made = namedtuple("_Made", "label option index n_options bits at")


class _Teller:
    """Runs the grammar once. `choose(teller, label, options, weights)` gives the index of
    each choice's option, or raises _Stop(len(options)) to stop there. With a `target`, each
    piece of text must continue it; at the first character that differs the run stops, `pos`
    counting the characters matched ("Once upon a" against "Once upon a time, ...": 11)."""

    def __init__(self, choose, target: str | None = None):
        self.choose, self.target = choose, target
        self.made, self.parts = [], []  # [_Made, ...], [piece of text, ...]
        self.pos, self.bits, self.n_told, self.ended, self.need = 0, 0.0, 0, False, 0

    def pick(self, label, options, weights=None):
        i = self.choose(self, label, options, weights)
        p = 1 / len(options) if weights is None else weights[i] / sum(weights)
        bits = -math.log2(p)  # adding -x is subtracting x, bit for bit
        self.made.append(_Made(label, options[i], i, len(options), bits, self.pos))
        self.bits += bits
        return options[i]

    def say(self, text):
        if self.target is not None and not self.target.startswith(text, self.pos):
            rest = self.target[self.pos:self.pos + len(text)]  # shorter at the target's end
            self.pos += next((i for i, (a, b) in enumerate(zip(rest, text, strict=False))
                              if a != b), len(rest))
            raise _Stop
        self.parts.append(text)
        self.pos += len(text)
        self.n_told = len(self.made)  # the choices made so far are all in the text told

    def run(self, grammar=tell) -> _Teller:
        """Tell the grammar (or a part of it) to its end (`ended`) or to where it stops:
        `need` is then the number of options of the choice it had none for, 0 otherwise."""
        try:
            grammar(self)
            self.ended = True
        except _Stop as stop:
            self.need = stop.args[0] if stop.args else 0
        return self

    def story(self) -> Story:
        return Story("".join(self.parts), [(m.label, m.option) for m in self.made], self.bits)


def _draw(rng: random.Random):
    """Choose at random with the grammar's probabilities."""
    def choose(teller, label, options, weights):
        if weights is None:
            return rng.randrange(len(options))
        cumulative = list(accumulate(weights))
        return min(bisect.bisect_right(cumulative, rng.random() * sum(weights)), len(options) - 1)
    return choose


def _forced(indices: list[int]):
    """Take the given option indices in order, then stop."""
    def choose(teller, label, options, weights):
        k = len(teller.made)
        if k == len(indices):
            raise _Stop(len(options))
        return indices[k]
    return choose


def _following(choices: list[tuple[str, str]]):
    """Take recorded (label, option) choices in order, then stop."""
    def choose(teller, label, options, weights):
        k = len(teller.made)
        if k == len(choices):
            raise _Stop(len(options))
        if choices[k][0] != label or choices[k][1] not in options:
            raise ValueError(f"choice {k} is {choices[k]!r} where the grammar asks for {label!r}:"
                             " pass a Story from make_stories or parse_story")
        return options.index(choices[k][1])
    return choose


def _follow(text: str, forced: list[int] = ()):
    """Every run of the grammar that follows `text` from the forced choices on, each option
    of a choice in turn, depth first, pruned where it leaves `text`: each as it stopped."""
    stack = [list(forced)]
    while stack:
        indices = stack.pop()
        teller = _Teller(_forced(indices), text).run()
        yield teller
        if teller.need:  # the forced choices ran out: try each option of the next one
            stack.extend(indices + [i] for i in reversed(range(teller.need)))


# Generate.
@dataclass
class Story:
    text: str
    choices: list = field(default_factory=list)  # [(label, option), ...] in the order made
    bits: float = 0.0  # -log2 P(story): the information in its choices

    @property
    def n_bytes(self) -> int:
        return len(self.text.encode("utf-8"))


def make_story(rng: random.Random) -> Story:
    return _Teller(_draw(rng)).run().story()


def make_stories(n: int, seed: int = 0) -> list[Story]:
    """n stories from the grammar, the same for the same seed."""
    rng = random.Random(seed)
    return [make_story(rng) for _ in range(n)]


def entropy_bits_per_byte(stories: list[Story]) -> float:
    """The corpus's exact entropy: -log2 P(corpus) over its UTF-8 bytes. Because each story's
    text decides its choices, no model can assign these texts a higher probability than the
    grammar does, so no model's bits per byte on them can be lower (in expectation)."""
    n_bytes = sum(s.n_bytes for s in stories)
    if n_bytes == 0:
        raise ValueError("no stories given: the entropy of an empty corpus is undefined")
    return sum(s.bits for s in stories) / n_bytes


# Parse: the choices that made a text, and how much of a text the grammar can make.
def parse_story_all(text: str, limit: int = 2) -> list[Story]:
    """Every way (up to `limit`) the grammar can produce exactly `text`, found by replaying
    the grammar and pruning each branch as soon as its text stops matching."""
    whole = (teller for teller in _follow(text) if teller.ended and teller.pos == len(text))
    return [teller.story() for teller in islice(whole, limit)]


def parse_story(text: str) -> Story:
    """The choices that made `text`. Raises ValueError if the grammar cannot make it."""
    parses = parse_story_all(text)
    if not parses:
        raise ValueError(f"not a story of this grammar: {text[:80]!r}...")
    if len(parses) > 1:
        raise ValueError(f"ambiguous story, {len(parses)} parses: {text[:80]!r}...")
    return parses[0]


def is_grammatical(text: str) -> bool:
    """True if the grammar can make exactly this text (to score a model's samples)."""
    return bool(text.strip()) and bool(parse_story_all(text.strip(), limit=1))


def _reach(text: str, forced: list[int] = ()) -> int:
    """How far into text (characters) the grammar can follow it after the forced choices, by
    any choices after them; len(text) if some reach its end (<|end_of_text|> decides)."""
    best = 0
    for teller in _follow(text, forced):
        best = max(best, teller.pos)
        if best >= len(text):
            break
    return best


def grammatical_prefix(text: str) -> float:
    """Share of a text's characters, from its start, that the grammar can produce: 1.0 for
    a grammatical story, less where a sample first goes wrong (a graded is_grammatical)."""
    return _reach(text) / len(text) if text else 0.0


def choice_spans(story: Story) -> list[tuple[int, int, str, float]]:
    """(start, end, label, bits) of each choice of a story: the characters of its text over
    which the choice becomes known. start is the first character at which some other option
    of the choice can no longer produce the text (the first that tells anything about it),
    end - 1 the first at which none can (from there on the choice is certain). A choice
    first told by the story's end has the span (len(text), len(text) + 1): the end-of-text
    token shows it. Example: "Otto was a ..." against "Once upon a time, ..." and
    "Long ago, ...": the opening is known from the characters "Ot" (start 0, end 2)."""
    record = _Teller(_following(story.choices)).run()
    if "".join(record.parts) != story.text:
        raise ValueError("the story's choices do not make its text; pass a Story from "
                         "make_stories or parse_story")
    taken, spans = [m.index for m in record.made], []
    for k, m in enumerate(record.made):
        reach = [_reach(story.text, taken[:k] + [j]) for j in range(m.n_options) if j != m.index]
        first, last = (min(reach), max(reach)) if reach else (m.at, m.at)
        spans.append((first, last + 1, m.label, m.bits))
    return spans


# Facts: what a story says, for questions (chapter 07) and for diversity (chapter 10).
def first_choices(choices: list[tuple[str, str]]) -> dict[str, str]:
    """The option first taken for each label (a later episode's choices come again):
    [("when", "Later,"), ("when", "One day,")] -> {"when": "Later,"}."""
    return dict(reversed(choices))


def story_answers(story: Story) -> dict[str, str]:
    """The fact each fine-tuning question asks for, read from the story's recorded choices:
    {"hero": "Zoe", "place": "a cold pond", "thing": "a white doll", "friend": "Max"}."""
    first = first_choices(story.choices)
    return {"hero": first["hero"], "place": first["place"],
            "thing": f"{_a(first['color'])} {first['thing']}", "friend": first["friend"]}


def story_opening(story: Story) -> str:
    """The story up to the end of the sentence that names the friend: three or four sentences
    that hold every answer, a fifth of the whole story (short prompts keep fine-tuning fast)."""
    record = _Teller(_following(story.choices)).run()
    at = next(m.at for m in record.made if m.label == "friend")  # its sentence starts by here
    return story.text[:story.text.index(".", at) + 1]


def hero_of(text: str) -> str | None:
    """The hero's name as the grammar reads it in a text (a story or a model's sample), None
    if the text leaves the grammar before it: "Once upon a time, there was a shy cat named
    Zoe. ..." -> "Zoe"; "Once upon a time, a cat named Zoe. ..." -> None."""
    for teller in _follow(text):
        told = first_choices([(m.label, m.option) for m in teller.made[:teller.n_told]])
        if "hero" in told:
            return told["hero"]
    return None


# The recall probe's text (chapter 08): the grammar's own sentences, with chosen names.
_NOBODY = "\x00"  # a name no text of the grammar contains


def _episode_opening(problem: str, choose, color: str, thing: str) -> str:
    """The first sentence of an episode about `thing` with `problem`, the other choices made
    by `choose`, the hero and friend named _NOBODY: " One day, the kite fell into the river."."""
    def until_a_full_stop(teller, label, options, weights):
        if teller.parts and teller.parts[-1].endswith("."):
            raise _Stop(len(options))  # the sentence is told: stop before the next choice
        if label == "problem":
            return options.index(problem)
        return choose(teller, label, options, weights)

    told = _Teller(until_a_full_stop).run(lambda ch: _episode(ch, _NOBODY, _NOBODY, color, thing))
    return "".join(told.parts)


# The problems whose sentence names nobody (not "lost": "Lily could not find the kite.")
NAMELESS_PROBLEMS = [p for p in PROBLEMS
                     if _NOBODY not in _episode_opening(p, lambda *_: 0, COLORS[0], THINGS[0])]


def story_start(choices: list[tuple[str, str]]) -> str:
    """The grammar's text from the given (label, option) choices, up to the first choice not
    given: [("opening", "there was"), ("trait", "little"), ("kind", "fox"), ("hero", "Zoe")]
    -> "Once upon a time, there was a little fox named Zoe."."""
    return "".join(_Teller(_following(choices)).run().parts)


def nameless_sentence(rng: random.Random, color: str, thing: str) -> str:
    """An episode's first sentence that names nobody, drawn with rng (the problem first, then
    the grammar's choices): " One day, a strong wind blew the red kite into the river."."""
    return _episode_opening(rng.choice(NAMELESS_PROBLEMS), _draw(rng), color, thing)
