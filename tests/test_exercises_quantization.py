"""Chapter 11b's checker: the right q4_0 block passes, and each likely mistake is named."""
import pytest
import torch

from llama3_mini.exercises import check_q4_0_block


def _right(q):
    u = q.to(torch.int16) + 8
    return (u[:16] | (u[16:] << 4)).to(torch.uint8)


def _pairs(q):
    u = q.to(torch.int16) + 8
    return (u[0::2] | (u[1::2] << 4)).to(torch.uint8)


def _twos_complement(q):
    u = q.to(torch.int16) & 0x0F
    return (u[:16] | (u[16:] << 4)).to(torch.uint8)


def _swapped(q):
    u = q.to(torch.int16) + 8
    return (u[16:] | (u[:16] << 4)).to(torch.uint8)


def test_the_right_block_passes(capsys):
    assert check_q4_0_block(_right)
    assert "right on all 8 cases" in capsys.readouterr().out


def test_a_list_of_ints_is_accepted():
    assert check_q4_0_block(lambda q: _right(q).tolist())


@pytest.mark.parametrize("wrong, named", [(_pairs, "packs neighbours"),
                                          (_twos_complement, "two's-complement"),
                                          (_swapped, "halves are swapped")])
def test_each_mistake_is_named(wrong, named, capsys):
    assert not check_q4_0_block(wrong)
    assert named in capsys.readouterr().out


def test_the_reference_is_ggufs_layout():
    gguf = pytest.importorskip("gguf")
    torch.manual_seed(0)
    w = torch.randn(1, 32)
    raw = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_0)[0, 2:]  # no scale
    from llama3_mini.quantization import q4_0
    assert _right(q4_0(w)[0][0]).tolist() == raw.tolist()
