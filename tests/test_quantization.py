"""quantization.py against references we did not write: llama.cpp's `gguf.quants` (q8_0 and
q4_0 blocks, bit for bit, both ways), torch's own quantized tensors (per-tensor and per-channel
qint8), torch's float8_e4m3fn cast and torch._scaled_mm (Llama 3's FP8 row-wise product), and
torch's kl_div. A quantized model's logits equal the float model's run on the weights the
quantized one reads back."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_support import one_thread, random_model  # noqa: F401

from llama3_mini.config import ModelArgs
from llama3_mini.quantization import (
    FP8_ACTIVATION_CAP,
    SCHEMES,
    Fp8Linear,
    QuantLinear,
    absmax,
    dequantize,
    dequantized_model,
    fp8_per_token,
    fp8_rowwise,
    gguf_blocks,
    kl_per_token,
    linear_bits_per_weight,
    pack_nibbles,
    q4_0,
    quantize_model,
    round_e4m3,
    round_half_away,
    stored_bytes,
    unpack_nibbles,
)

gguf = pytest.importorskip("gguf")


def _matrices():
    """Weights as training leaves them, and the awkward cases: an all-zero group, one
    outlier, values on rounding ties, a group whose largest magnitude is positive."""
    torch.manual_seed(0)
    out = [torch.randn(48, 128) * 0.05, torch.randn(8, 64) * 3]
    w = torch.randn(16, 96) * 0.02
    w[0, :32] = 0
    w[1, 7] = 1.5
    w[2, :32] = torch.arange(32) / 2 - 8  # q = x * 127 / 8: exact halves among them
    w[3, :32] = torch.linspace(-0.1, 0.7, 32)
    return out + [w]


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_blocks_equal_gguf_quants_bit_for_bit(kind):
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    for w in _matrices():
        q, scale = absmax(w, "group") if kind == "q8_0" else q4_0(w)
        ref = gguf.quants.quantize(w.numpy(), qtype)
        ours = gguf_blocks(q, scale, kind)
        assert np.array_equal(ours, ref.reshape(ours.shape)), kind
        back = gguf.quants.dequantize(ref, qtype)
        assert torch.equal(dequantize(q, scale), torch.from_numpy(back))


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_int8_per_tensor_and_row_equal_torchs_qint8():
    """torch.quantize_per_tensor/per_channel with zero point 0 and our absmax scale give the
    same integers (away from exact ties, where torch rounds to even and ggml away from 0)."""
    w = _matrices()[0]
    q, s = absmax(w, "tensor")
    ref = torch.quantize_per_tensor(w, s.item(), 0, torch.qint8)
    assert torch.equal(q, ref.int_repr())
    q, s = absmax(w, "row")
    ref = torch.quantize_per_channel(w, s[:, 0].double(), torch.zeros(len(w), dtype=torch.long),
                                     0, torch.qint8)
    assert torch.equal(q, ref.int_repr())
    assert torch.equal(dequantize(q, s), ref.dequantize())


def test_round_half_away_and_nibble_layout():
    assert round_half_away(torch.tensor([0.5, 1.5, -2.5, 2.4999])).tolist() == [1, 2, -3, 2]
    q = torch.cat([torch.full((1, 16), -8), torch.full((1, 16), 7)], 1).to(torch.int8)
    assert pack_nibbles(q)[0].tolist() == [0xF0] * 16  # low nibble value j, high j + 16
    q = torch.randint(-8, 8, (4, 64), dtype=torch.int8)
    assert torch.equal(unpack_nibbles(pack_nibbles(q)), q)


def test_e4m3_rounding_equals_torchs_float8_cast():
    torch.manual_seed(0)
    for scale in (1e-3, 0.05, 1.0, 30.0, 300.0):
        x = torch.randn(20000) * scale
        assert torch.equal(round_e4m3(x), x.to(torch.float8_e4m3fn).float()), scale
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = grid[grid.isfinite()]  # every float8 value rounds to itself
    assert torch.equal(round_e4m3(finite), finite)
    assert round_e4m3(torch.tensor([500.0, -1e4])).tolist() == [448.0, -448.0]


def test_fp8_layer_equals_torch_scaled_mm():
    """torch._scaled_mm with row-wise scales (one per token of x, one per row of w) is
    torch's own FP8 matrix product; our layer must give its result."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96, bias=False)
    x = torch.randn(2, 5, 64)
    x[0, 1, 3] = 5000.0  # over the cap: this token's scale is capped, the value saturates
    layer = Fp8Linear(linear)
    xq, xs = fp8_per_token(x.reshape(-1, 64))
    try:
        ref = torch._scaled_mm(xq, layer.weight_fp8.t(), scale_a=xs, scale_b=layer.scale.t(),
                               out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"this torch build has no CPU float8 matmul ({e}); the CPU wheel of "
                    "torch 2.13 in constraints.txt has one")
    torch.testing.assert_close(layer(x).reshape(-1, 96), ref, rtol=1e-5, atol=1e-5)
    assert xs[1, 0] == FP8_ACTIVATION_CAP / 448  # capped: 5000 counts as 1200
    assert xq[1, 3].float() == 448.0
    wq, ws = fp8_rowwise(linear.weight)
    assert torch.equal(wq.float(), round_e4m3(linear.weight / ws))


def _model():
    args = ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=96,
                     multiple_of=32, max_seq_len=32)
    return random_model(args, seed=1)


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s != "fp8"])
def test_quantized_logits_equal_the_float_model_at_dequantized_weights(scheme):
    model = _model()
    qmodel = quantize_model(model, scheme)
    assert all(isinstance(b.feed_forward.w2, QuantLinear) for b in qmodel.layers)
    ref = dequantized_model(qmodel)
    tokens = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(qmodel(tokens), ref(tokens), rtol=0, atol=1e-5)
        gap = (qmodel(tokens) - model(tokens)).abs().max()
    assert gap > 0  # the weights did change
    assert isinstance(model.output, torch.nn.Linear)  # the original is untouched


def test_fp8_follows_meta_layers():
    model = _model()
    qmodel = quantize_model(model, "fp8")
    kinds = {n: type(m).__name__ for n, m in qmodel.named_modules()}
    for i in range(4):
        for w in ("w1", "w2", "w3"):
            want = "Fp8Linear" if i in (1, 2) else "Linear"
            assert kinds[f"layers.{i}.feed_forward.{w}"] == want
        assert kinds[f"layers.{i}.attention.wq"] == "Linear"
    assert kinds["output"] == "Linear"
    tokens = torch.randint(0, 96, (1, 16))
    with torch.no_grad():
        gap = (qmodel(tokens) - model(tokens)).abs().max().item()
    assert 0 < gap < 0.5


def test_memory_is_measured_from_the_stored_tensors():
    """The bytes measured from the buffers are the format's arithmetic: int8 one byte a
    weight plus a float32 scale per tensor or row; q8_0 34 bytes per 32 weights; q4_0 18."""
    model = _model()
    shapes = [m.weight.shape for m in model.modules() if isinstance(m, torch.nn.Linear)]
    per_layer = {"int8-tensor": lambda o, i: o * i + 4, "int8-row": lambda o, i: o * i + 4 * o,
                 "q8_0": lambda o, i: o * i // 32 * 34, "q4_0": lambda o, i: o * i // 32 * 18,
                 "int4-tensor": lambda o, i: o * i // 2 + 4,
                 "int4-row": lambda o, i: o * i // 2 + 4 * o}
    n = sum(o * i for o, i in shapes)
    for scheme, size in per_layer.items():
        q = quantize_model(model, scheme)
        saved = stored_bytes(model) - stored_bytes(q)
        assert saved == sum(4 * o * i - size(o, i) for o, i in shapes), scheme
        assert linear_bits_per_weight(q) == sum(8 * size(o, i) for o, i in shapes) / n
    assert linear_bits_per_weight(model) == 32
    assert linear_bits_per_weight(quantize_model(model, "q4_0")) == 4.5


def test_kl_per_token_equals_torchs_kl_div():
    torch.manual_seed(0)
    a, b = torch.randn(3, 7, 50), torch.randn(3, 7, 50)
    ref = F.kl_div(F.log_softmax(b, -1), F.log_softmax(a, -1), log_target=True,
                   reduction="none").sum(-1)
    torch.testing.assert_close(kl_per_token(a, b), ref)


def test_errors_say_what_to_do():
    with pytest.raises(ValueError, match="whole groups of 32: quantize this layer per row"):
        q4_0(torch.randn(4, 40))
    with pytest.raises(ValueError, match="unknown scheme 'int3'"):
        quantize_model(_model(), "int3")
    with pytest.raises(ValueError, match="per must be"):
        absmax(torch.randn(2, 32), "column")
