"""Chapter 11c's checker: a right online-softmax step passes, and each likely mistake is
named. The right step is checked here against the definition, not against the package: folded
over the tiles of a row and divided once at the end, it must give torch's softmax(s) @ v."""
import pytest
import torch

from llama3_mini.exercises import check_online_softmax_step


def right_step(m, l, o, s, v):
    top = torch.maximum(m, s.max(dim=-1, keepdim=True).values)
    shrink = (m - top).exp()
    weights = (s - top).exp()
    return top, shrink * l + weights.sum(-1, keepdim=True), shrink * o + weights @ v


def test_right_step_folded_over_tiles_is_softmax_attention():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 10, generator=g, dtype=torch.float64) * 5
    v = torch.randn(10, 4, generator=g, dtype=torch.float64)
    m = torch.full((3, 1), float("-inf"), dtype=torch.float64)
    l, o = torch.zeros(3, 1, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64)
    for j in range(0, 10, 3):  # tiles of 3, 3, 3 and 1 keys
        m, l, o = right_step(m, l, o, s[:, j:j + 3], v[j:j + 3])
    torch.testing.assert_close(o / l, torch.softmax(s, -1) @ v)


def test_the_right_step_passes(capsys):
    assert check_online_softmax_step(right_step)
    assert "right on all" in capsys.readouterr().out


# Each likely mistake, written here from its description (not taken from the checker).
def no_o_rescale(m, l, o, s, v):
    top, new_l, _ = right_step(m, l, o, s, v)
    return top, new_l, o + (s - top).exp() @ v


def no_l_rescale(m, l, o, s, v):
    top, _, new_o = right_step(m, l, o, s, v)
    return top, l + (s - top).exp().sum(-1, keepdim=True), new_o


def upside_down(m, l, o, s, v):
    top = torch.maximum(m, s.max(dim=-1, keepdim=True).values)
    grow, weights = (top - m).exp(), (s - top).exp()
    return top, grow * l + weights.sum(-1, keepdim=True), grow * o + weights @ v


def old_maximum(m, l, o, s, v):
    top = torch.maximum(m, s.max(dim=-1, keepdim=True).values)
    weights = (s - m).exp()
    return top, l + weights.sum(-1, keepdim=True), o + weights @ v


def tile_maximum(m, l, o, s, v):
    top = s.max(dim=-1, keepdim=True).values
    shrink, weights = (m - top).exp(), (s - top).exp()
    return top, shrink * l + weights.sum(-1, keepdim=True), shrink * o + weights @ v


def divided_each_step(m, l, o, s, v):
    top, new_l, new_o = right_step(m, l, o, s, v)
    return top, new_l, new_o / new_l


@pytest.mark.parametrize("wrong, named", [
    (no_o_rescale, "o is not rescaled"), (no_l_rescale, "l is not rescaled"),
    (upside_down, "upside down"), (old_maximum, "use the old maximum"),
    (tile_maximum, "the tile's own maximum"), (divided_each_step, "divided by l at every step")])
def test_each_mistake_is_named(wrong, named, capsys):
    assert not check_online_softmax_step(wrong)
    assert named in capsys.readouterr().out


def test_a_wrong_shape_fails_without_a_crash(capsys):
    assert not check_online_softmax_step(lambda m, l, o, s, v: o)
    assert "three tensors" in capsys.readouterr().out
