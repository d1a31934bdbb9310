"""The corpora: text files with bad bytes, the standard library, the token plumbing (split,
pack, batches) and the story corpus as token data (the grammar itself: test_stories)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llama3_mini import data
from llama3_mini.data import (
    batch_at,
    pack_documents,
    read_text_corpus,
    read_text_file,
    split_documents,
    write_token_file,
)
from llama3_mini.stories import entropy_bits_per_byte, make_stories


class ByteTokenizer:
    """A stand-in tokenizer: one token per byte, then two special tokens."""

    n_words = 258
    special_tokens = {"<|begin_of_text|>": 256, "<|end_of_text|>": 257}

    def encode(self, s, bos=False, eos=False):
        return [256] * bos + list(s.encode("utf-8")) + [257] * eos

    def decode_bytes(self, ids):
        return bytes(i for i in ids if i < 256)


def test_bad_utf8_names_file_and_offset_or_is_replaced(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"hello \xff world")
    with pytest.raises(ValueError, match=r"bad\.txt: invalid UTF-8 at byte offset 6"):
        read_text_file(path)
    assert read_text_file(path, errors="replace") == "hello \ufffd world"
    with pytest.raises(ValueError, match="offset 6"):
        read_text_corpus(tmp_path)
    assert read_text_corpus(tmp_path, errors="replace") == ["hello \ufffd world"]


def test_folder_corpus_and_missing_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "sub" / "a.md").write_text("héllo", encoding="utf-8")
    (tmp_path / "skip.bin").write_bytes(b"\x00\xff")
    assert read_text_corpus(tmp_path) == ["second", "héllo"]
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        read_text_corpus(tmp_path / "nope")
    with pytest.raises(ValueError, match="no files ending with"):
        read_text_corpus(tmp_path / "sub", suffixes=(".py",))


def test_stdlib_corpus_is_python_code():
    docs = data.python_stdlib_corpus(max_files=5)
    assert len(docs) == 5 and all("import" in d or "def " in d for d in docs)


def test_split_keeps_documents_whole_and_apart():
    docs = [f"doc {i}" for i in range(100)]
    train, val = split_documents(docs, 0.1)
    assert len(val) == 10 and len(train) == 90 and not set(train) & set(val)
    with pytest.raises(ValueError, match="too few"):
        split_documents(["only one"], 0.5)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(st.characters(exclude_characters="\n"), max_size=30), min_size=2,
                max_size=60), st.floats(0.01, 0.5), st.booleans())
def test_one_text_is_cut_at_a_line_start_into_its_last_val_fraction(lines, fraction, end_nl):
    text = "\n".join(lines) + "\n" * end_nl
    target = int(len(text) * (1 - fraction))  # where the last `fraction` begins
    cuts = [i + 1 for i, c in enumerate(text) if c == "\n" and i + 1 <= target
            and text[:i + 1].strip() and text[i + 1:].strip()]  # text on both sides
    if not cuts:
        with pytest.raises(ValueError, match="too few .*one text of several lines"):
            split_documents([text], fraction)
        return
    (train,), (val,) = split_documents([text], fraction)
    assert train + val == text and train == text[:max(cuts)]  # the last line start before it
    assert len(val) >= len(text) * fraction - 1e-9  # at least the fraction; no overlap


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(2, 40), min_size=1, max_size=12), st.integers(4, 24))
def test_packing_predicts_every_token_once_in_order(lengths, seq_len):
    docs = [np.arange(1000 * i, 1000 * i + n) for i, n in enumerate(lengths)]
    rows = pack_documents(docs, seq_len)
    assert rows.shape[1] == seq_len + 1
    targets = [t for row in rows for t in row[1:].tolist() if t >= 0]
    starts = {d[0].item() for d in docs}
    unseen = {row[0].item() for row in rows} & starts  # a document starting a row
    # every token is predicted exactly once, in order, except documents' first tokens that
    # open a row (nothing comes before them to predict from)
    assert len(targets) == len(set(targets))
    assert set(targets) == {t for d in docs for t in d.tolist()} - unseen
    assert targets == sorted(targets)


def test_token_file_round_trip_and_batches(tmp_path):
    docs = [np.array(ByteTokenizer().encode(s.text, bos=True, eos=True), dtype=np.uint16)
            for s in make_stories(30, seed=5)]
    tokens = write_token_file(docs, tmp_path / "train.bin")
    assert isinstance(tokens, np.memmap) and not (tmp_path / "train.bin.tmp").exists()
    np.testing.assert_array_equal(tokens, np.concatenate(docs))
    x, y = batch_at(tokens, step=3, batch_size=4, seq_len=16, seed=0)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    x2, _ = batch_at(tokens, step=3, batch_size=4, seq_len=16, seed=0)
    torch.testing.assert_close(x, x2)
    assert not torch.equal(x, batch_at(tokens, step=4, batch_size=4, seq_len=16, seed=0)[0])
    shares = [batch_at(tokens, 3, 4, 16, 0, rank=r, world_size=2)[0] for r in range(2)]
    torch.testing.assert_close(torch.stack([shares[0], shares[1]], 1).flatten(0, 1), x)
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        batch_at(tokens, 0, 3, 16, world_size=2)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 40), seq_len=st.integers(1, 30), seed=st.integers(0, 10_000))
def test_batch_at_draws_every_valid_start_and_no_other(n, seq_len, seed):
    """A window of seq_len + 1 tokens may start anywhere from 0 to n - seq_len - 1: over
    many steps every such start is drawn (the last one included), and none past it."""
    if n < seq_len + 1:
        with pytest.raises(ValueError, match="too few for sequences"):
            batch_at(np.arange(n), 0, 4, seq_len, seed)
        return
    tokens = np.arange(n)  # a token's value is its position, so x[:, 0] is the start
    starts = set()
    for step in range(50):
        x, y = batch_at(tokens, step, batch_size=16, seq_len=seq_len, seed=seed)
        starts |= set(x[:, 0].tolist())
        torch.testing.assert_close(y, x + 1)  # targets: the next token of every input
    assert starts == set(range(n - seq_len))  # 800 draws from at most 40 starts


def test_batch_at_on_exactly_one_window():
    tokens = np.arange(17)  # seq_len + 1 tokens: one window, the whole stream
    x, y = batch_at(tokens, step=0, batch_size=3, seq_len=16)
    assert torch.equal(x, torch.arange(16).repeat(3, 1))
    assert torch.equal(y, torch.arange(1, 17).repeat(3, 1))
    with pytest.raises(ValueError, match=r"a window needs seq_len \+ 1 = 17"):
        batch_at(tokens[:16], step=0, batch_size=3, seq_len=16)


def test_story_data_floor_and_bytes():
    d = data.story_data(ByteTokenizer(), n_stories=40, seq_len=64)
    val = split_documents(make_stories(40, 0), 0.05)[1]
    assert d.floor == pytest.approx(entropy_bits_per_byte(val))
    real = d.val_rows[:, 1:][d.val_rows[:, 1:] >= 0]
    assert d.token_bytes[real].sum().item() == sum(len(s.text.encode()) for s in val)
