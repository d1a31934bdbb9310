"""The KV cache: its shape and size against config.kv_cache_bytes, and a model run through
it chunk by chunk gives the logits of one full forward pass (GQA, MQA, MHA, scaled RoPE)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from model_support import attention_configs, one_thread, random_model  # noqa: F401

from llama3_mini.config import get_preset, kv_cache_bytes
from llama3_mini.kv_cache import KVCache, make_cache
from llama3_mini.model import Transformer

CONFIGS = attention_configs(max_seq_len=48)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", ["tiny", "llama3.2-1b"])
def test_size_equals_the_config_arithmetic(preset, dtype):
    args = get_preset(preset).replace(max_seq_len=64)
    cache = make_cache(args, batch_size=3, dtype=dtype, device="cpu")
    assert len(cache) == args.n_layers
    assert cache[0].shape == (3, 64, args.kv_heads, args.head_dim)
    assert cache[0].cache_k.dtype == dtype
    assert cache.nbytes == kv_cache_bytes(args, 64, 3, str(dtype))
    assert cache.filled == 0 and cache.filled_nbytes == 0


def test_defaults_follow_the_model():
    model = Transformer(CONFIGS["gqa"]).to(torch.bfloat16)
    cache = make_cache(model, max_seq_len=10)
    assert cache[0].shape == (1, 10, 2, 8)
    assert cache[1].cache_v.dtype == torch.bfloat16
    assert cache[0].cache_k.device == next(model.parameters()).device


def test_update_returns_every_position_and_counts_them():
    cache = KVCache(2, 8, 3, 4, device="cpu")
    k1, v1 = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    keys, values = cache.update(0, k1, v1)
    assert keys.shape == (2, 5, 3, 4) and cache.filled == 5
    k2, v2 = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4)
    keys, values = cache.update(5, k2, v2)
    assert keys.shape == (2, 6, 3, 4) and cache.filled == 6
    torch.testing.assert_close(keys, torch.cat([k1, k2], 1), rtol=0, atol=0)
    torch.testing.assert_close(values, torch.cat([v1, v2], 1), rtol=0, atol=0)
    cache.reset()
    assert cache.filled == 0 and not cache.cache_k.any() and not cache.cache_v.any()


def test_clear_errors():
    cache = KVCache(1, 8, 2, 4, device="cpu")
    with pytest.raises(ValueError, match=r"positions 6\.\.9 .* max_seq_len 8"):
        cache.update(0, torch.zeros(1, 6, 2, 4), torch.zeros(1, 6, 2, 4))
        cache.update(6, torch.zeros(1, 4, 2, 4), torch.zeros(1, 4, 2, 4))
    with pytest.raises(ValueError, match=r"start_pos \(7\) leaves a gap: only 6"):
        cache.update(7, torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))
    with pytest.raises(ValueError, match=r"batch_size \(0\)"):
        KVCache(0, 8, 2, 4)
    with pytest.raises(ValueError, match=r"max_seq_len \(100\) is longer than the model's \(48\)"):
        make_cache(CONFIGS["gqa"], max_seq_len=100)
    with pytest.raises(TypeError, match="Transformer or a ModelArgs, not dict"):
        make_cache({"dim": 64})


@pytest.mark.parametrize("name", sorted(CONFIGS))
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_chunked_passes_through_the_cache_equal_one_full_pass(name, data):
    """Any split of a sequence into chunks (a prefill, then single tokens or several at a
    time) gives, chunk by chunk, the logits of one causal pass over the whole sequence."""
    model = random_model(CONFIGS[name])
    batch = data.draw(st.integers(1, 3), label="batch")
    seqlen = data.draw(st.integers(2, 48), label="seqlen")
    cuts = sorted(data.draw(st.sets(st.integers(1, seqlen - 1), max_size=6), label="cuts"))
    torch.manual_seed(seqlen)
    tokens = torch.randint(0, 97, (batch, seqlen))
    cache = make_cache(model, batch_size=batch, device="cpu")
    with torch.no_grad():
        full = model(tokens)
        pieces = []
        for start, end in zip([0] + cuts, cuts + [seqlen], strict=True):
            pieces.append(model(tokens[:, start:end], start, cache))
            assert cache.filled == end
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


def test_the_cache_holds_keys_after_rope_at_kv_head_width():
    args = CONFIGS["gqa"]
    model = random_model(args)
    tokens = torch.randint(0, 97, (1, 10))
    cache = make_cache(model, device="cpu")
    with torch.no_grad():
        model(tokens, 0, cache)
        attn = model.layers[0].attention
        x = model.layers[0].attention_norm(model.tok_embeddings(tokens))
        xk = attn.wk(x).view(1, 10, args.kv_heads, args.head_dim)
    # RoPE keeps each pair's length and turns it by position * frequency (HF-independent
    # check: the norms match, the raw keys do not, position 0 is unrotated).
    stored = cache[0].cache_k[:, :10]
    pair_norm = lambda t: t.reshape(*t.shape[:-1], -1, 2).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pair_norm(stored), pair_norm(xk))
    torch.testing.assert_close(stored[:, 0], xk[:, 0])
    assert not torch.allclose(stored[:, 1:], xk[:, 1:], atol=1e-3)
    assert cache[0].cache_k[:, 10:].abs().sum() == 0
