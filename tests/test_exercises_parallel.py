"""Chapter 11a's checker: the paper's chunk assignment passes, and each likely mistake is
named. The right answer here is written from the paper's sentence ("The Llama 3 Herd of
Models", section 3.3.2: "The i-th CP rank received both the i-th and the (2 x CP - 1 - i)-th
chunks"), not from the package."""
import pytest

from llama3_mini.exercises import check_cp_chunks


def _chunk(seq_len, cp, c):
    size = seq_len // (2 * cp)
    return list(range(c * size, (c + 1) * size))


def _right(seq_len, i, cp):
    return _chunk(seq_len, cp, i) + _chunk(seq_len, cp, 2 * cp - 1 - i)


def _slices(seq_len, i, cp):
    return list(range(i * seq_len // cp, (i + 1) * seq_len // cp))


def _plus_cp(seq_len, i, cp):
    return _chunk(seq_len, cp, i) + _chunk(seq_len, cp, i + cp)


def _off_by_one(seq_len, i, cp):
    return _chunk(seq_len, cp, i) + (_chunk(seq_len, cp, 2 * cp - i) if i else [])


def _chunk_numbers(seq_len, i, cp):
    return [i, 2 * cp - 1 - i]


def _late_first(seq_len, i, cp):
    return _chunk(seq_len, cp, 2 * cp - 1 - i) + _chunk(seq_len, cp, i)


def test_the_papers_assignment_passes(capsys):
    assert check_cp_chunks(_right)
    assert "right on all" in capsys.readouterr().out


def test_a_tensor_is_accepted():
    import torch
    assert check_cp_chunks(lambda s, i, cp: torch.tensor(_right(s, i, cp)))


@pytest.mark.parametrize("wrong, named", [
    (_slices, "one slice of seq_len / CP"), (_plus_cp, "pairs chunk i with chunk i + CP"),
    (_off_by_one, "off by one"), (_chunk_numbers, "chunk numbers"),
    (_late_first, "late chunk first")])
def test_each_mistake_is_named(wrong, named, capsys):
    assert not check_cp_chunks(wrong)
    assert named in capsys.readouterr().out
