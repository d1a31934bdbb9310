"""Chapter 08b's checker: the document mask built from a packed row passes, and each likely
mistake is named. The right answer here is written from the paper's sentence ("The Llama 3
Herd of Models", section 3.2: "an attention mask that prevents self-attention between
different documents within the same sequence"), with causal attention inside a document, as
loops over query and key, not from the package."""
import pytest
import torch

from llama3_mini.exercises import check_document_mask


def _right(tokens, bos_id):
    t = tokens.tolist()
    n = len(t)
    # query i may read key j: j at or before i, and no document starts after j up to i
    return torch.tensor([[j <= i and bos_id not in t[j + 1: i + 1] for j in range(n)]
                         for i in range(n)])


def _causal_only(tokens, bos_id):
    return torch.ones(len(tokens), len(tokens), dtype=torch.bool).tril()


def _whole_document(tokens, bos_id):
    doc = torch.cumsum(tokens == bos_id, 0)
    return doc[:, None] == doc[None, :]


def _transposed(tokens, bos_id):
    return _right(tokens, bos_id).T


def _no_diagonal(tokens, bos_id):
    return _right(tokens, bos_id) & ~torch.eye(len(tokens), dtype=torch.bool)


def _start_in_previous(tokens, bos_id):
    doc = torch.cumsum(tokens == bos_id, 0) - (tokens == bos_id).long()
    return (doc[:, None] == doc[None, :]).tril()


def _additive(tokens, bos_id):
    return torch.zeros(len(tokens), len(tokens)).masked_fill(~_right(tokens, bos_id), -torch.inf)


def _batched(tokens, bos_id):
    return _right(tokens, bos_id)[None, None]


def test_the_papers_mask_passes(capsys):
    assert check_document_mask(_right)
    assert "right on all 7 cases" in capsys.readouterr().out


def test_zeros_and_ones_are_accepted():
    assert check_document_mask(lambda t, b: _right(t, b).long())


@pytest.mark.parametrize("wrong, named", [
    (_causal_only, "the causal mask alone"), (_whole_document, "its future included"),
    (_transposed, "rows and columns are swapped"), (_no_diagonal, "the diagonal is left out"),
    (_start_in_previous, "in the document before it"), (_additive, "the additive mask"),
    (_batched, "shape (1, 1, seq, seq)")])
def test_each_mistake_is_named(wrong, named, capsys):
    assert not check_document_mask(wrong)
    out = capsys.readouterr().out
    assert "→" in out and named in out.split("→")[-1]
