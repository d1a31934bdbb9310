"""Chapter 01's fixed tokenizer corpus (assets/tokenizer-corpus/)."""
import hashlib
import json
import re
from pathlib import Path

from llama3_mini.data import tokenizer_corpus


def test_the_tokenizer_corpus_is_the_frozen_file_and_01b_asserts_01a_merges():
    """Chapter 01's corpus is the shipped snapshot its card describes (no edit of the course and
    no Python version changes it), and the digest 01b asserts is the one 01a's stored output
    prints (nbval replays 01a's printed digest, so both stand for the tokenizer trained now)."""
    root = Path(__file__).resolve().parent.parent
    card = json.loads((root / "assets" / "tokenizer-corpus" / "card.json").read_text())
    raw = tokenizer_corpus().encode("utf-8")
    assert len(raw) == card["bytes"] and hashlib.sha256(raw).hexdigest() == card["sha256"]
    a = (root / "notebooks" / "01a_tokenizer_bpe.ipynb").read_text()
    b = (root / "notebooks" / "01b_tokenizer_in_use.ipynb").read_text()
    printed = re.findall(r"merges' sha256: ([0-9a-f]{16})", a)
    asserted = re.findall(r'merges_digest\[:16\] == \\"([0-9a-f]{16})\\"', b)
    assert len(set(printed)) == 1 and asserted == printed[:1], (printed, asserted)
