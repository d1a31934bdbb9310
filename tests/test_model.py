"""The model's pieces against independent references and their own invariants."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llama3_mini.config import ModelArgs, get_preset
from llama3_mini.model import (
    RMSNorm,
    Transformer,
    attention,
    causal_mask,
    evaluating,
    in_mode,
    model_device,
    repeat_kv,
)
from llama3_mini.rope import apply_rotary_emb, precompute_freqs_cis, rotate_pairs


def test_rmsnorm_equals_torch_rmsnorm():
    torch.manual_seed(0)
    ours, theirs = RMSNorm(48, eps=1e-5), torch.nn.RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_()
        theirs.weight.copy_(ours.weight)
    x = torch.randn(3, 7, 48) * 5
    torch.testing.assert_close(ours(x), theirs(x))


def test_explicit_attention_equals_torch_sdpa_with_causal_mask():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 9, 16).unbind(0)
    out, weights = attention(q, k, v, causal_mask(9))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, expected)
    assert torch.all(weights.triu(diagonal=1) == 0)  # nothing from the future
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 9))


def test_causal_mask_with_cached_prefix():
    mask = causal_mask(2, start_pos=3)
    assert mask.shape == (2, 5)
    assert torch.isinf(mask).tolist() == [[False] * 4 + [True], [False] * 5]
    inf = float("-inf")  # the docstring's example
    assert causal_mask(2, start_pos=1).tolist() == [[0, 0, inf], [0, 0, 0]]


def test_repeat_kv_groups_heads_in_order():
    x = torch.arange(2 * 3 * 2 * 4.0).view(2, 3, 2, 4)  # two KV heads
    y = repeat_kv(x, 3)
    assert y.shape == (2, 3, 6, 4)
    for h in range(6):
        assert torch.equal(y[:, :, h], x[:, :, h // 3])


@settings(max_examples=20, deadline=None)
@given(n_kv_heads=st.sampled_from([1, 2, 4]), group=st.sampled_from([1, 2]),
       seq=st.integers(1, 12), scaled=st.booleans())
def test_fast_attention_path_equals_explicit_path(n_kv_heads, group, seq, scaled):
    torch.manual_seed(seq)
    args = ModelArgs(dim=8 * n_kv_heads * group, n_layers=2, n_heads=n_kv_heads * group,
                     n_kv_heads=n_kv_heads, vocab_size=50, multiple_of=8, max_seq_len=16,
                     use_scaled_rope=scaled, rope_original_max_seq_len=4)
    model = Transformer(args).eval()
    tokens = torch.randint(0, 50, (2, seq))
    fast = model.set_fast_attention(True)(tokens)
    explicit = model.set_fast_attention(False)(tokens)
    torch.testing.assert_close(fast, explicit, atol=1e-5, rtol=1e-5)


def _to_hf_halves(x):
    """Meta's adjacent pairs (2i, 2i + 1) -> Hugging Face's layout, pair i = (i, i + d/2)."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


@pytest.mark.parametrize("scaled", [False, True])
def test_rotary_emb_equals_transformers_rotation(scaled):
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama as hf

    torch.manual_seed(0)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    config = LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, rope_theta=500000.0,
                         rope_scaling=scaling if scaled else None)
    xq, xk = torch.randn(2, 40, 4, 64), torch.randn(2, 40, 2, 64)  # (batch, seq, heads, hd)
    start = 50  # positions 50..89, as with a cache
    freqs = precompute_freqs_cis(64, 128, 500000.0, use_scaled=scaled,
                                 original_max_seq_len=16)[start:start + 40]
    rq, rk = apply_rotary_emb(xq, xk, freqs)
    positions = torch.arange(start, start + 40)[None].expand(2, 40)
    cos, sin = hf.LlamaRotaryEmbedding(config)(xq, positions)
    hq, hk = hf.apply_rotary_pos_emb(_to_hf_halves(xq).transpose(1, 2),
                                     _to_hf_halves(xk).transpose(1, 2), cos, sin)
    torch.testing.assert_close(_to_hf_halves(rq).transpose(1, 2), hq, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(_to_hf_halves(rk).transpose(1, 2), hk, atol=2e-5, rtol=1e-5)


def test_rotate_pairs_docstring_example():
    x = torch.tensor([1.0, 0.0, 2.0, 0.0]).view(1, 1, 1, 4)
    out = rotate_pairs(x, torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]]))
    assert out.flatten().tolist() == [0.0, 1.0, 2.0, 0.0]


def test_repeat_kv_equals_transformers_repeat_kv():
    from transformers.models.llama.modeling_llama import repeat_kv as hf_repeat_kv

    x = torch.randn(2, 7, 3, 8)  # (batch, seq, n_kv_heads, head_dim); HF's puts heads first
    for n_rep in (1, 2, 4):
        expected = hf_repeat_kv(x.transpose(1, 2), n_rep).transpose(1, 2)
        assert torch.equal(repeat_kv(x, n_rep), expected)


def test_rope_rotation_preserves_norms_and_depends_on_relative_position():
    torch.manual_seed(0)
    freqs = precompute_freqs_cis(16, 64, theta=10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        qm, _ = apply_rotary_emb(q, q, freqs[m:m + 1])
        _, kn = apply_rotary_emb(k, k, freqs[n:n + 1])
        return (qm * kn).sum()

    qr, _ = apply_rotary_emb(q, q, freqs[37:38])
    torch.testing.assert_close(qr.norm(), q.norm())
    torch.testing.assert_close(score(10, 3), score(50, 43))
    assert not torch.isclose(score(10, 3), score(10, 4))


def test_sequence_longer_than_max_seq_len_is_refused():
    model = Transformer(get_preset("tiny").replace(max_seq_len=8, n_layers=1))
    with pytest.raises(ValueError, match=r"sequence of 9 positions.*max_seq_len \(8\)"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"start_pos 6 \+ 3 tokens"):
        model(torch.zeros(1, 3, dtype=torch.long), start_pos=6)


def test_model_trains_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny").replace(n_layers=2, vocab_size=64))
    tokens = torch.randint(0, 64, (2, 10))
    loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1),
                                             tokens[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_bf16_model_keeps_rope_angles_in_float32():
    model = Transformer(get_preset("tiny").replace(n_layers=1)).to(torch.bfloat16)
    assert model.freqs_cis.dtype == torch.complex64
    assert model(torch.zeros(1, 4, dtype=torch.long)).dtype == torch.float32


BF16_STEP = """
import torch
import torch.nn.functional as F
from llama3_mini.config import get_preset
from llama3_mini.model import Transformer
torch.manual_seed(0)
model = Transformer(get_preset("tiny").replace(n_layers=1, vocab_size=64))
tokens = torch.randint(0, 64, (2, 257))
with torch.autocast("cpu", dtype=torch.bfloat16):
    loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
loss.backward()
with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
    model(tokens)  # a forward of 257 tokens, as an evaluation runs
print(torch.backends.cpu.get_cpu_capability(), loss.item(),
      all(torch.isfinite(p.grad).all() for p in model.parameters()))
"""


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_bf16_training_step_runs_on_a_cpu_without_avx512(capability):
    """torch 2.13's fused attention in bfloat16 raises on CPUs without AVX-512 ('pack_vnni2 is
    only supported when avx512 is supported', in every backward and in longer forwards): most
    laptops. The model's
    fused_attention then runs it in float32; here the step runs in a process that sees such a
    CPU (ATEN_CPU_CAPABILITY), and its loss is the one computed on this machine's kernels to
    bfloat16's precision."""
    import os
    import subprocess
    import sys

    def run(env):
        out = subprocess.run([sys.executable, "-c", BF16_STEP], capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.split()

    cap, loss, finite = run({"ATEN_CPU_CAPABILITY": capability})
    assert cap == capability.upper() and finite == "True"
    _, native, _ = run({})
    assert abs(float(loss) - float(native)) < 0.02 * float(native)


def test_fused_attention_in_bf16_without_avx512_equals_float32_attention(monkeypatch):
    from llama3_mini.model import fused_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, h, 16, 8).bfloat16().requires_grad_() for h in (4, 2, 2))
    mask = causal_mask(16)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    out = fused_attention(q, k, v, mask, enable_gqa=True)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, want.bfloat16())
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in (q, k, v))


def test_functions_given_a_model_use_its_device_and_never_move_it():
    model = Transformer(get_preset("tiny").replace(n_layers=1))
    assert model_device(model) == torch.device("cpu")
    assert model_device(model, "cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"the model is on cpu, not meta; move it first "
                                         r"\(model.to\('meta'\)\) or leave device out"):
        model_device(model, "meta")
    assert next(model.parameters()).device == torch.device("cpu")


def test_evaluating_restores_every_submodule_mode_even_after_an_error():
    model = Transformer(get_preset("tiny").replace(n_layers=2))
    model.train()
    model.layers[1].eval()  # a part the caller keeps in eval mode
    found = [m.training for m in model.modules()]
    with evaluating(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == found
    with pytest.raises(RuntimeError, match="inside"), in_mode(model, True):
        assert all(m.training for m in model.modules())
        raise RuntimeError("inside")
    assert [m.training for m in model.modules()] == found
