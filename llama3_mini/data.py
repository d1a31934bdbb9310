"""Corpora, none downloaded, and token batches. The stories come from a seeded grammar whose
every choice shows in the text, so a story parses back into its choices and the corpus's
exact entropy (bits per byte), the floor under any model's loss, is known. Any UTF-8 file or
folder, and Python's standard library (code), are the others. Documents are joined with
<|begin_of_text|> ... <|end_of_text|>, tokenized once (a memory-mapped token file), split by
document into train and validation, and cut into fixed-length sequences."""
from __future__ import annotations

import bisect
import math
import os
import random
import sysconfig
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

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
    return ("an " if word[0] in "aeiou" else "a ") + word


def _tell(ch) -> None:
    """The grammar: `ch.pick(label, options, weights)` makes a choice and `ch.say(text)`
    writes text. Generation and parsing both run this one function; each choice is written
    out right after it is made, so that a parser can reject a wrong guess at once."""
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
    problem = ch.pick("problem", ["fell", "wind", "lost", "took", "broke"])
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


class _Generate:
    """Makes each choice with a seeded `random.Random` and records it with its probability."""

    def __init__(self, rng: random.Random):
        self.rng, self.parts, self.choices, self.bits = rng, [], [], 0.0

    def pick(self, label, options, weights=None):
        if weights is None:
            i = self.rng.randrange(len(options))
        else:
            cumulative = list(accumulate(weights))
            i = min(bisect.bisect_right(cumulative, self.rng.random() * sum(weights)),
                    len(options) - 1)
        self.choices.append((label, options[i]))
        self.bits -= math.log2(_probability(i, options, weights))
        return options[i]

    def say(self, text):
        self.parts.append(text)


def _probability(i: int, options, weights) -> float:
    return 1 / len(options) if weights is None else weights[i] / sum(weights)


@dataclass
class Story:
    text: str
    choices: list = field(default_factory=list)  # [(label, option), ...] in the order made
    bits: float = 0.0  # -log2 P(story): the information in its choices

    @property
    def n_bytes(self) -> int:
        return len(self.text.encode("utf-8"))


def make_story(rng: random.Random) -> Story:
    _tell(gen := _Generate(rng))
    return Story("".join(gen.parts), gen.choices, gen.bits)


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


class _Mismatch(Exception):
    """The replayed text stopped matching the target."""


class _NeedChoice(Exception):
    """The replay ran out of given choices; args[0] is how many options the next one has."""


class _Replay:
    """Replays given choices and checks that every piece of text matches the target."""

    def __init__(self, target: str, forced: list[int]):
        self.target, self.forced, self.pos, self.choices, self.bits = target, forced, 0, [], 0.0

    def pick(self, label, options, weights=None):
        if len(self.choices) == len(self.forced):
            raise _NeedChoice(len(options))
        i = self.forced[len(self.choices)]
        self.choices.append((label, options[i]))
        self.bits -= math.log2(_probability(i, options, weights))
        return options[i]

    def say(self, text):
        if not self.target.startswith(text, self.pos):
            raise _Mismatch
        self.pos += len(text)


def parse_story_all(text: str, limit: int = 2) -> list[Story]:
    """Every way (up to `limit`) the grammar can produce exactly `text`, found by replaying
    the grammar and pruning each branch as soon as its text stops matching."""
    found, stack = [], [[]]
    while stack and len(found) < limit:
        forced = stack.pop()
        replay = _Replay(text, forced)
        try:
            _tell(replay)
        except _Mismatch:
            continue
        except _NeedChoice as need:
            stack.extend(forced + [i] for i in reversed(range(need.args[0])))
            continue
        if replay.pos == len(text):
            found.append(Story(text, replay.choices, replay.bits))
    return found


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


# Text files and folders, and Python's standard library.
def read_text_file(path, errors: str = "strict") -> str:
    """A UTF-8 file as text. errors="strict" names the file and byte offset of the first bad
    byte; errors="replace" puts U+FFFD in its place instead."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        bad = raw[e.start:e.start + 4]
        raise ValueError(f"{path}: invalid UTF-8 at byte offset {e.start} ({bad!r}); fix the "
                         "file or pass errors='replace'") from None


def read_text_corpus(path, errors: str = "strict", suffixes=(".txt", ".md", ".py", ".rst"),
                     max_files: int | None = None) -> list[str]:
    """Documents from a UTF-8 file (one document) or a folder (one per file, files whose names
    end with `suffixes`, sorted, searched recursively)."""
    path = Path(path)
    if path.is_file():
        return [read_text_file(path, errors)]
    if not path.is_dir():
        raise FileNotFoundError(f"no such file or folder: {path}")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(tuple(suffixes)))
    if not files:
        raise ValueError(f"no files ending with {', '.join(suffixes)} in {path}")
    return [text for text in (read_text_file(p, errors) for p in files[:max_files]) if text]


def python_stdlib_corpus(max_files: int | None = 200) -> list[str]:
    """Python source files of the standard library on this machine (code, no download)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [read_text_file(p, errors="replace") for p in sorted(stdlib.glob("*.py"))[:max_files]]


# Tokens: documents joined with special tokens, a token file, train/validation, batches.
def encode_documents(docs: list[str], tokenizer, progress: bool = False) -> list[np.ndarray]:
    """Each document as <|begin_of_text|> tokens <|end_of_text|>."""
    dtype = np.uint16 if tokenizer.n_words <= 65536 else np.uint32
    return [np.asarray(tokenizer.encode(d, bos=True, eos=True), dtype=dtype)
            for d in tqdm(docs, desc="tokenizing", disable=not progress)]


def write_token_file(encoded: list[np.ndarray], path) -> np.memmap:
    """Concatenate documents into a token file (atomically) and open it memory-mapped, so a
    large corpus is tokenized once and never held in memory."""
    dtype, tmp = (encoded[0].dtype if encoded else np.uint16), Path(f"{path}.tmp")
    with open(tmp, "wb") as f:
        f.writelines(doc.astype(dtype).tobytes() for doc in encoded)
    os.replace(tmp, path)
    return np.memmap(path, dtype=dtype, mode="r")


def split_documents(docs: list, val_fraction: float = 0.05):
    """Train and validation, no document in both: the last `val_fraction` of the documents,
    or of one text alone, cut at a line start: (["a\\nb\\nc\\n"], 0.3) -> ["a\\nb\\n"], ["c\\n"]."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction ({val_fraction}) must be between 0 and 1")
    if len(docs) == 1 and isinstance(text := docs[0], str):
        cut = text.rfind("\n", 0, min(int(len(text) * (1 - val_fraction)), len(text.rstrip()))) + 1
        if text[:cut].strip() and text[cut:].strip():
            return [text[:cut]], [text[cut:]]
    n_val = max(1, int(round(len(docs) * val_fraction)))
    if n_val >= len(docs):
        raise ValueError(f"{len(docs)} documents are too few to keep {n_val} for validation: "
                         "give more, or one text of several lines (cut at a line break)")
    return docs[:-n_val], docs[-n_val:]


def token_bytes(tokenizer) -> torch.Tensor:
    """UTF-8 bytes each token id stands for (0 for special tokens): bits per byte divides a
    loss by these, which makes losses of different tokenizers comparable."""
    specials = set(getattr(tokenizer, "special_tokens", {}).values())
    lengths = [0 if i in specials else len(tokenizer.decode_bytes([i]))
               for i in range(tokenizer.n_words)]
    return torch.tensor(lengths, dtype=torch.float32)


def pack_documents(encoded: list[np.ndarray], seq_len: int, pad_id: int = -100) -> torch.Tensor:
    """Whole documents packed greedily into rows of seq_len + 1 tokens (a document longer
    than a row is cut into pieces); the rest of a row is pad_id. For evaluation, so that
    every token is predicted once, with its document's start in view: (rows, seq_len + 1)."""
    rows, row = [], []
    for doc in encoded:
        doc = doc.tolist()
        if row and len(row) + len(doc) > seq_len + 1:
            rows.append(row + [pad_id] * (seq_len + 1 - len(row)))
            row = []
        while len(doc) > seq_len + 1:
            rows.append(doc[:seq_len + 1])
            doc = doc[seq_len:]  # the piece's last token is the next piece's first input
        row += doc
    if row:
        rows.append(row + [pad_id] * (seq_len + 1 - len(row)))
    return torch.tensor(rows, dtype=torch.long)


def batch_at(tokens: np.ndarray, step: int, batch_size: int, seq_len: int, seed: int = 0,
             rank: int = 0, world_size: int = 1):
    """The training batch of one step: batch_size windows of seq_len + 1 tokens at random
    offsets in the packed token stream, decided by (seed, step) alone, so that a resumed run
    sees the same batches. Under torchrun each rank takes its share of the global batch.
    Returns inputs and targets, each (batch_size // world_size, seq_len), int64."""
    if batch_size % world_size:
        raise ValueError(f"batch_size ({batch_size}) must be a multiple of the number of "
                         f"processes ({world_size})")
    if len(tokens) < seq_len + 2:
        raise ValueError(f"{len(tokens)} tokens are too few for sequences of {seq_len}; "
                         "use more data or a smaller seq_len")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)[rank::world_size]
    rows = np.stack([np.asarray(tokens[s: s + seq_len + 1], dtype=np.int64) for s in starts])
    rows = torch.from_numpy(rows)  # (batch_size // world_size, seq_len + 1)
    return rows[:, :-1], rows[:, 1:]


@dataclass
class TokenData:
    """What the trainer needs: a training token stream, validation rows, bytes per token."""

    train: np.ndarray  # the training documents' tokens, one stream (a memmap when large)
    val_rows: torch.Tensor  # (rows, seq_len + 1) whole validation documents, pad -100
    token_bytes: torch.Tensor  # (n_words,) UTF-8 bytes of each token id
    floor: float | None = None  # the validation set's entropy in bits per byte, if known


def prepare_data(docs: list[str], tokenizer, seq_len: int, val_fraction: float = 0.05,
                 token_file=None, floor: float | None = None, progress: bool = False) -> TokenData:
    """Tokenize documents once, split by document, write the training stream to `token_file`
    (memory-mapped) if one is given, and pack validation documents into rows."""
    train, val = (encode_documents(part, tokenizer, progress)
                  for part in split_documents(docs, val_fraction))
    stream = write_token_file(train, token_file) if token_file else np.concatenate(train)
    return TokenData(stream, pack_documents(val, seq_len), token_bytes(tokenizer), floor)


def story_data(tokenizer, n_stories: int = 4000, seq_len: int = 256, seed: int = 0,
               val_fraction: float = 0.05, token_file=None, progress: bool = False) -> TokenData:
    """The story corpus as TokenData, with the validation stories' exact entropy as floor."""
    stories = make_stories(n_stories, seed)
    _, val_stories = split_documents(stories, val_fraction)
    return prepare_data([s.text for s in stories], tokenizer, seq_len, val_fraction, token_file,
                        floor=entropy_bits_per_byte(val_stories), progress=progress)
