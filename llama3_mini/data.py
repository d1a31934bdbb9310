"""Corpora, none downloaded, and token batches. The stories come from a seeded grammar
(stories.py) whose exact entropy, the floor under any model's loss, is known. Any UTF-8 file
or folder, and Python's standard library (code), are the others. Documents are joined with
<|begin_of_text|> ... <|end_of_text|>, tokenized once (a memory-mapped token file), split by
document into train and validation, and cut into fixed-length sequences. Where each document
starts is kept beside the stream, for Llama 3's document mask (model.document_mask)."""
from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .stories import entropy_bits_per_byte, make_stories


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


def _stdlib_sources():
    """The standard library's Python files (Lib/*.py) in sorted order, read one at a time."""
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        yield read_text_file(path, errors="replace")


def tokenizer_corpus() -> str:
    """The fixed text chapter 01 trains its tokenizer on (577,473 bytes: a frozen snapshot of
    the course's own prose and code, assets/tokenizer-corpus/), the same on every machine and
    every Python, whatever the course has become since."""
    try:
        from importlib import resources
        folder = Path(str(resources.files("llama3_mini.assets")))
    except ModuleNotFoundError:  # a checkout put on sys.path by hand, never installed
        folder = Path(__file__).resolve().parent.parent / "assets"
    path = folder / "tokenizer-corpus" / "corpus.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall the package (pip install -e .) "
                                "or restore assets/tokenizer-corpus/ from the course's repository")
    return read_text_file(path)


def python_stdlib_corpus(max_files: int | None = 200) -> list[str]:
    """Python source files of the standard library on this machine (code, no download)."""
    return list(islice(_stdlib_sources(), max_files))


def sample_text(kind: str, max_bytes: int = 300_000) -> str:
    """Text every Python install has, as one string of at most max_bytes UTF-8 bytes: "code"
    (the standard library's source: python_stdlib_corpus's files, joined), "prose" (the
    Python docs' topics, English) or "cjk" (Chinese, Japanese and Korean test texts from
    Lib/test, empty where a distribution leaves Lib/test out)."""
    if kind == "code":
        parts = _stdlib_sources()
    elif kind == "prose":
        from pydoc_data.topics import topics
        parts = (topics[k] for k in sorted(topics))
    elif kind == "cjk":
        lib = Path(sysconfig.get_paths()["stdlib"])
        files = sorted((lib / "test" / "cjkencodings").glob("*-utf8.txt"))
        parts = iter(dict.fromkeys(p.read_text("utf-8") for p in files))  # each text once
    else:
        raise ValueError(f"unknown kind {kind!r}; choose 'code', 'prose' or 'cjk'")
    out = []
    while sum(len(o) for o in out) < max_bytes and (part := next(parts, None)) is not None:
        out.append(part.encode("utf-8") + b"\n")
    return b"".join(out)[:max_bytes].decode("utf-8", "ignore")


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


def pack_documents(encoded: list[np.ndarray], seq_len: int, pad_id: int = -100,
                   doc_ids: bool = False):
    """Whole documents packed greedily into rows of seq_len + 1 tokens (a document longer
    than a row is cut into pieces); the rest of a row is pad_id. For evaluation, so that
    every token is predicted once, with its document's start in view: (rows, seq_len + 1).
    doc_ids=True returns (rows, ids) with ids (rows, seq_len + 1) the index of each token's
    document (pads -1), for the document mask: ([[1, 2], [3]], 3) -> [[0, 0, 1, -1]]."""
    rows, row, ids, row_ids = [], [], [], []

    def close(row, row_ids):
        rows.append(row + [pad_id] * (seq_len + 1 - len(row)))
        ids.append(row_ids + [-1] * (seq_len + 1 - len(row_ids)))

    for d, doc in enumerate(encoded):
        doc = doc.tolist()
        if row and len(row) + len(doc) > seq_len + 1:
            close(row, row_ids)
            row, row_ids = [], []
        while len(doc) > seq_len + 1:
            close(doc[:seq_len + 1], [d] * (seq_len + 1))
            doc = doc[seq_len:]  # the piece's last token is the next piece's first input
        row, row_ids = row + doc, row_ids + [d] * len(doc)
    if row:
        close(row, row_ids)
    rows = torch.tensor(rows, dtype=torch.long)
    return (rows, torch.tensor(ids, dtype=torch.long)) if doc_ids else rows


def document_starts(encoded: list[np.ndarray]) -> np.ndarray:
    """Where each document starts in the stream that concatenates them (write_token_file's,
    prepare_data's): [[1, 2], [3], [4, 5, 6]] -> [0, 2, 3]. The document mask's boundaries."""
    return np.cumsum([0] + [len(doc) for doc in encoded[:-1]], dtype=np.int64)


def batch_at(tokens: np.ndarray, step: int, batch_size: int, seq_len: int, seed: int = 0,
             rank: int = 0, world_size: int = 1, doc_starts: np.ndarray | None = None):
    """The training batch of one step: batch_size windows of seq_len + 1 tokens at random
    offsets in the packed token stream, decided by (seed, step) alone, so that a resumed run
    sees the same batches. Under torchrun each rank takes its share of the global batch.
    Returns inputs and targets, each (batch_size // world_size, seq_len), int64. With
    doc_starts (document_starts of the stream) it returns the inputs' document ids too, the
    same shape, numbered from 0 in each window: documents starting at [0, 3] and a window
    over stream positions 2 to 5 -> [0, 1, 1, 1]."""
    if batch_size % world_size:
        raise ValueError(f"batch_size ({batch_size}) must be a multiple of the number of "
                         f"processes ({world_size})")
    if len(tokens) < seq_len + 1:
        raise ValueError(f"{len(tokens)} tokens are too few for sequences of {seq_len}: a "
                         f"window needs seq_len + 1 = {seq_len + 1}; use more data or a "
                         "smaller seq_len")
    rng = np.random.default_rng([seed, step])
    # every start from 0 to len - (seq_len + 1) inclusive: integers' upper bound is exclusive
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)[rank::world_size]
    rows = np.stack([np.asarray(tokens[s: s + seq_len + 1], dtype=np.int64) for s in starts])
    rows = torch.from_numpy(rows)  # (batch_size // world_size, seq_len + 1)
    if doc_starts is None:
        return rows[:, :-1], rows[:, 1:]
    # the document of stream position p: how many documents start at or before p, less one
    ids = np.searchsorted(doc_starts, starts[:, None] + np.arange(seq_len), side="right")
    return rows[:, :-1], rows[:, 1:], torch.from_numpy(ids - ids[:, :1])  # (b, seq_len)


@dataclass
class TokenData:
    """What the trainer needs: a training token stream, validation rows, bytes per token."""

    train: np.ndarray  # the training documents' tokens, one stream (a memmap when large)
    val_rows: torch.Tensor  # (rows, seq_len + 1) whole validation documents, pad -100
    token_bytes: torch.Tensor  # (n_words,) UTF-8 bytes of each token id
    floor: float | None = None  # the validation set's entropy in bits per byte, if known
    doc_starts: np.ndarray | None = None  # where each training document starts in `train`
    val_doc_ids: torch.Tensor | None = None  # (rows, seq_len + 1) val_rows' documents, pad -1


def prepare_data(docs: list[str], tokenizer, seq_len: int, val_fraction: float = 0.05,
                 token_file=None, floor: float | None = None, progress: bool = False) -> TokenData:
    """Tokenize documents once, split by document, write the training stream to `token_file`
    (memory-mapped) if one is given, and pack validation documents into rows."""
    train, val = (encode_documents(part, tokenizer, progress)
                  for part in split_documents(docs, val_fraction))
    stream = write_token_file(train, token_file) if token_file else np.concatenate(train)
    val_rows, val_doc_ids = pack_documents(val, seq_len, doc_ids=True)
    return TokenData(stream, val_rows, token_bytes(tokenizer), floor,
                     document_starts(train), val_doc_ids)


def require_windows(n_tokens: int, seq_len: int, name: str, n_bytes: int,
                    val_fraction: float) -> None:
    """Raise a ValueError that says what to do when a training stream of `n_tokens` cannot
    hold one window of seq_len + 1 tokens (batch_at's), suggesting a shorter --seq-len."""
    if n_tokens >= seq_len + 1:
        return
    shorter = 2 ** (((n_tokens - 2) // 2).bit_length() - 1) if n_tokens >= 4 else None
    raise ValueError(
        f"{name} is too short for sequences of {seq_len} tokens: it is {n_bytes:,} bytes, and "
        f"once the last {val_fraction:.0%} is kept for validation, {n_tokens} tokens are left "
        f"to train on, where one training sequence needs {seq_len + 1}. Give a longer text"
        + (f", or shorter sequences: --seq-len {shorter}" if shorter else ""))


def story_data(tokenizer, n_stories: int = 4000, seq_len: int = 256, seed: int = 0,
               val_fraction: float = 0.05, token_file=None, progress: bool = False) -> TokenData:
    """The story corpus as TokenData, with the validation stories' exact entropy as floor."""
    stories = make_stories(n_stories, seed)
    _, val_stories = split_documents(stories, val_fraction)
    return prepare_data([s.text for s in stories], tokenizer, seq_len, val_fraction, token_file,
                        floor=entropy_bits_per_byte(val_stories), progress=progress)
