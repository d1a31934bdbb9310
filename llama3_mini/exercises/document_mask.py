"""Checker for chapter 08, part 2 (08b): Llama 3's document mask built from a packed row of
tokens alone ("The Llama 3 Herd of Models", section 3.2: "an attention mask that prevents
self-attention between different documents within the same sequence"), every document
starting at its <|begin_of_text|>. A wrong answer is compared with the usual mistakes, and
the one it matches is named."""
from __future__ import annotations

import torch

from .checking import run_checks

_B = 128000  # Llama 3's <|begin_of_text|>; one case uses another id, as the story tokenizer's


def _cases():
    """(tokens, bos_id): rows of one to several documents, with and without a start first."""
    g = torch.Generator().manual_seed(8)
    long_row = torch.randint(0, 500, (40,), generator=g)
    long_row[[0, 9, 10, 23, 31]] = 959  # a start first, two in a row, one near the end
    rows = [([_B, 5, 6, _B, 7, 8, 9], _B),  # two documents
            ([4, 5, _B, 6, 7, _B, 8], _B),  # the row starts part-way through a document
            ([_B, 3, 4, 5], _B),  # one document
            ([3, 4, 5, 6, 7], _B),  # a stretch of one long document: no start in the row
            ([_B, 3, _B], _B),  # a document starts on the last token
            ([_B, _B, 3, 4], _B)]  # an empty document: a start right after a start
    return [(torch.tensor(t), b) for t, b in rows] + [(long_row, 959)]


def _documents(tokens, bos_id):
    return torch.cumsum(tokens == bos_id, dim=0)  # (seq,): +1 at each document's start


def _allowed(doc):
    causal = torch.ones(len(doc), len(doc), dtype=torch.bool).tril()
    return causal & (doc[:, None] == doc[None, :])


def _reference(tokens, bos_id):
    from ..model import document_mask

    return document_mask(_documents(tokens, bos_id)[None])[0, 0] == 0  # (seq, seq)


def _view(mask):
    rows = torch.as_tensor(mask).tolist()
    return " ".join("".join("1" if x else "." for x in row) for row in rows)


def check_document_mask(fn) -> bool:
    """fn(tokens, bos_id) -> (seq, seq) booleans, True where the query at position i may attend
    to the key at position j: j <= i, and no <|begin_of_text|> in tokens[j + 1 : i + 1]
    (fn(tensor([B, 5, B, 6]), B) -> rows 1..., 11.., ..1., ..11)."""
    small = (torch.tensor([_B, 5, _B, 6]), _B)
    return run_checks("document_mask", fn, _reference, _cases(), example=(
        "[<|begin_of_text|>, 5, <|begin_of_text|>, 6], rows are queries", small, _view),
        mistakes=[
        ("this is the causal mask alone: a token may not read the documents packed before "
         "its own either; compare each token's document number",
         lambda t, b: torch.ones(len(t), len(t), dtype=torch.bool).tril()),
        ("a token reads its whole document here, its future included: keep only the keys at "
         "or before the query (j <= i)",
         lambda t, b: _documents(t, b)[:, None] == _documents(t, b)[None, :]),
        ("rows and columns are swapped: row i is the query and column j the key, so the "
         "allowed entries lie on and below the diagonal", lambda t, b: _reference(t, b).T),
        ("the diagonal is left out: a token reads itself too (j <= i, not j < i)",
         lambda t, b: _reference(t, b) & ~torch.eye(len(t), dtype=torch.bool)),
        ("this puts each <|begin_of_text|> in the document before it: a document starts at its "
         "<|begin_of_text|>, which belongs to it (a cumulative sum that counts the token itself)",
         lambda t, b: _allowed(_documents(t, b) - (t == b).long())),
        ("this is the additive mask the model adds to its scores (0 and -inf): return True "
         "where the query may read the key", lambda t, b: torch.zeros(len(t), len(t))
         .masked_fill(~_reference(t, b), float("-inf"))),
        ("shape (1, 1, seq, seq), the model's batch and head dimensions: return (seq, seq)",
         lambda t, b: _reference(t, b)[None, None])])
