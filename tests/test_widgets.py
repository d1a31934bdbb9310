"""The widgets, driven from Python: move a control, check the numbers and the image they
show against independent computations (config arithmetic written out, RoPE by rotation,
attention by hand from the model's weights)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llama3_mini.config import GiB, get_preset
from llama3_mini.model import Transformer, causal_mask
from llama3_mini.rope import apply_rotary_emb, precompute_freqs_cis
from llama3_mini.widgets import (
    attention_explorer,
    attention_weights,
    kv_cache_calculator,
    rope_explorer,
)


class ByteTokenizer:
    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    args = get_preset("tiny").replace(vocab_size=256, dim=64, n_layers=2, n_heads=4,
                                      n_kv_heads=2, max_seq_len=64)
    return Transformer(args).eval()


# ------------------------------------------------------------------------ KV-cache calculator
def cache_bytes_by_hand(args, seq, batch, bytes_per, kv_heads):
    return 2 * args.n_layers * kv_heads * (args.dim // args.n_heads) * seq * batch * bytes_per


PRESETS = ["llama3-8b", "llama3-70b", "llama3.1-405b", "llama3.2-1b", "llama3.2-3b", "tiny"]
CALCULATOR = kv_cache_calculator()  # one widget, driven through many settings


@settings(max_examples=15, deadline=None)
@given(preset=st.sampled_from(PRESETS), heads=st.sampled_from(["MHA", "GQA", "MQA"]),
       context=st.sampled_from([2 ** k for k in range(7, 18)]),
       dtype=st.sampled_from([("float32", 4), ("bfloat16", 2), ("fp8", 1), ("int4", 0.5)]),
       batch=st.integers(1, 64))
def test_calculator_numbers_follow_every_control(preset, heads, context, dtype, batch):
    w, args = CALCULATOR, get_preset(preset)
    kv = {"MHA": args.n_heads, "GQA": args.n_kv_heads, "MQA": 1}[heads]
    w.set(preset=preset, heads=heads, context=context, dtype=dtype[0], batch=batch)
    expected = cache_bytes_by_hand(args, context, batch, dtype[1], kv)
    assert w.result["cache_bytes"] == expected
    assert w.result["n_kv_heads"] == kv
    assert f"{expected:,.0f} bytes" in w.readout.value
    assert f"{expected / GiB:,.3f} GiB" in w.readout.value


def test_calculator_llama3_8b_known_values():
    # Llama 3 8B, 8K tokens, bf16: 32 layers x 8 KV heads x 128 x 2 (K, V) x 2 bytes = 128 KiB
    # per token, so 1 GiB for 8192 tokens; MHA would need 4x that. Weights: 8.03B x 2 bytes.
    w = kv_cache_calculator("llama3-8b", context=8192, dtype="bfloat16", heads="GQA")
    assert w.result["cache_gib"] == 1.0
    assert "128.0 KiB per token" in w.readout.value
    assert w.result["weight_bytes"] == 8_030_261_248 * 2
    w.controls["heads"].value = "MHA"
    assert w.result["cache_gib"] == 4.0


def test_calculator_redraws_bars():
    w = kv_cache_calculator("llama3-8b")
    before = w.image.value
    bars = [p.get_width() for p in w.figure.axes[0].patches]
    assert bars == pytest.approx([1.0, 16_060_522_496 / GiB])
    w.controls["context"].value = 131072
    assert w.image.value != before
    assert [p.get_width() for p in w.figure.axes[0].patches][0] == pytest.approx(16.0)
    assert "128K tokens" in w.figure.axes[0].get_title()


def test_calculator_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown preset 'llama2'"):
        kv_cache_calculator("llama2")
    with pytest.raises(ValueError, match=r"context \(1000\) must be a power of two"):
        kv_cache_calculator(context=1000)


# ----------------------------------------------------------------------------- RoPE explorer
def rotated_dot(head_dim, theta, m, n):
    """<q at m, k at n> for q = k = ones, by rotating with the package's apply_rotary_emb."""
    fc = precompute_freqs_cis(head_dim, max(m, n) + 1, theta)
    ones = torch.ones(1, 1, 1, head_dim)
    q, _ = apply_rotary_emb(ones, ones, fc[m: m + 1])
    k, _ = apply_rotary_emb(ones, ones, fc[n: n + 1])
    return (q * k).sum().item() / head_dim


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_dot_product_matches_rotation(theta):
    w = rope_explorer(head_dim=64, theta=theta, max_distance=4096)
    distances, dots = w.result["distances"], w.result["dots"]
    for i in (0, 5, 50, len(distances) - 1):
        d = int(distances[i])
        for m in (0, 37):
            assert dots[i].item() == pytest.approx(rotated_dot(64, theta, m, m + d), abs=2e-3)


def test_rope_controls_change_angle_and_wavelength():
    w = rope_explorer(head_dim=128, theta=500000.0, position=100, pair=16)
    freq = 500000.0 ** (-32 / 128)
    assert w.result["freq"] == pytest.approx(freq)
    assert w.result["angle"] == pytest.approx((100 * freq) % (2 * math.pi))
    image = w.image.value
    w.controls["position"].value = 101
    assert w.result["angle"] == pytest.approx((101 * freq) % (2 * math.pi))
    assert w.image.value != image
    assert f"turned {math.degrees((101 * freq) % (2 * math.pi)):.1f}°" in w.readout.value
    w.controls["theta"].value = 10000.0
    assert w.result["wavelength"] == pytest.approx(2 * math.pi * 10000.0 ** (32 / 128))


def test_rope_scaling_stretches_only_long_wavelengths():
    w = rope_explorer(head_dim=128, pair=0)
    plain = w.result["freqs"].clone()
    w.controls["scaled"].value = True
    scaled = w.result["freqs"]
    wavelen = 2 * math.pi / plain
    short, long = wavelen < 8192 / 4, wavelen > 8192
    assert torch.equal(scaled[short], plain[short])
    torch.testing.assert_close(scaled[long], plain[long] / 8)
    assert "scaled" in w.figure.axes[1].get_title()


def test_rope_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"head_dim \(7\) must be even"):
        rope_explorer(head_dim=7)
    with pytest.raises(ValueError, match=r"pair \(64\) must be between 0 and"):
        rope_explorer(head_dim=128, pair=64)


# ------------------------------------------------------------------------ attention explorer
def weights_by_hand(model, ids, layer, head):
    """Recompute one head's attention from the model's own projections."""
    args = model.params
    x = model.tok_embeddings(torch.tensor([ids]))
    fc = model.freqs_cis[: len(ids)]
    mask = causal_mask(len(ids))
    with torch.no_grad():
        for i, block in enumerate(model.layers):
            attn, h = block.attention, block.attention_norm(x)
            q = attn.wq(h).view(1, len(ids), args.n_heads, -1)
            k = attn.wk(h).view(1, len(ids), args.n_kv_heads, -1)
            q, k = apply_rotary_emb(q, k, fc)
            if i == layer:
                kv_head = head // (args.n_heads // args.n_kv_heads)
                scores = q[0, :, head] @ k[0, :, kv_head].T / math.sqrt(q.shape[-1]) + mask
                return torch.softmax(scores, -1)
            x = block(x, fc, mask)


def test_attention_explorer_heatmap_follows_layer_head_and_text(small_model):
    tok = ByteTokenizer()
    w = attention_explorer(small_model, tok, "Tom saw Ann. Tom ran.", device="cpu")
    ids = tok.encode("Tom saw Ann. Tom ran.")
    image = w.image.value
    w.controls["head"].value = 3  # one control at a time, as a learner moves them
    assert w.result["head"] == 3 and w.figure.axes[0].get_title() == "layer 0, head 3"
    for layer, head in ((1, 3), (0, 2)):
        w.set(layer=layer, head=head)
        expected = weights_by_hand(small_model, ids, layer, head)
        torch.testing.assert_close(w.result["weights"], expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(w.figure.axes[0].images[0].get_array()),
                                   expected, atol=1e-5, rtol=1e-4)
        assert w.figure.axes[0].get_title() == f"layer {layer}, head {head}"
    assert w.image.value != image
    w.controls["text"].value = "abc"
    assert w.result["labels"] == ["a", "b", "c"]
    assert w.controls["query"].options == (("0: a", 0), ("1: b", 1), ("2: c", 2))
    expected = weights_by_hand(small_model, [97, 98, 99], 0, 2)
    torch.testing.assert_close(w.result["weights"], expected)


def test_attention_explorer_query_shows_where_it_looks(small_model):
    w = attention_explorer(small_model, ByteTokenizer(), "a b a", layer=1, head=1, device="cpu")
    assert w.controls["query"].value == 4  # the last token by default
    row = w.result["weights"][2]
    w.controls["query"].value = 2
    top = int(row.argmax())
    assert w.result["top_key"] == top
    assert f"token 2 'b' looks most at token {top}" in w.readout.value
    heights = [p.get_height() for p in w.figure.axes[1].patches]
    assert heights == pytest.approx(row.tolist())
    assert sum(heights[3:]) == 0  # causal: nothing after the query


def test_attention_explorer_leaves_model_as_found(small_model):
    tokens = torch.tensor([[120, 121, 122]])
    before = small_model(tokens)
    small_model.train()
    try:
        attention_explorer(small_model, ByteTokenizer(), "xyz", device="cpu")
        assert small_model.training  # the caller's mode, given back
    finally:
        small_model.eval()
    # no hook left behind, the fused path still chosen, the same logits
    assert all(not b.attention._forward_hooks and b.attention.fused for b in small_model.layers)
    torch.testing.assert_close(small_model(tokens), before, atol=0, rtol=0)
    with pytest.raises(ValueError, match="the model is on cpu, not meta"):
        attention_weights(small_model, torch.tensor([1, 2]), device="meta")
    assert next(small_model.parameters()).device.type == "cpu"  # never moved


def test_attention_weights_are_the_explicit_paths(small_model):
    """The hook's weights are those the explicit path computes, for every layer at once."""
    ids = [84, 111, 109, 32, 115, 97, 119]
    weights = attention_weights(small_model, torch.tensor(ids))
    assert weights.shape == (2, 4, 7, 7) and weights.dtype == torch.float32
    for layer in range(2):
        for head in range(4):
            torch.testing.assert_close(weights[layer, head],
                                       weights_by_hand(small_model, ids, layer, head),
                                       atol=1e-5, rtol=1e-4)
    assert attention_weights(small_model, torch.tensor([5])).tolist() == [[[[1.0]]] * 4] * 2


def test_attention_explorer_rejects_bad_arguments(small_model):
    with pytest.raises(ValueError, match=r"head \(4\) must be between 0 and 3"):
        attention_explorer(small_model, ByteTokenizer(), "abc", head=4, device="cpu")
    with pytest.raises(ValueError, match="the text gives no tokens"):
        attention_explorer(small_model, ByteTokenizer(), "", device="cpu")
