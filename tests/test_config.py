"""Presets' parameter counts, the arithmetic of memory, configurations that must fail, and
the device a new model is built on."""
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llama3_mini.config import (
    GiB,
    ModelArgs,
    get_preset,
    kv_cache_bytes,
    num_params,
    param_counts,
    pick_device,
    weight_bytes,
)
from llama3_mini.model import Transformer

# Published parameter counts of Meta's models (Hugging Face model cards / safetensors totals).
PUBLISHED = {
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "llama3.1-405b": 405_853_388_800,
    "llama3.2-1b": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts_match_meta(name):
    assert num_params(get_preset(name)) == PUBLISHED[name]


def test_swiglu_hidden_size_of_8b_is_14336():
    assert get_preset("llama3-8b").hidden_dim == 14336
    assert get_preset("llama3-70b").hidden_dim == 28672
    assert get_preset("llama3.2-1b").hidden_dim == 8192


@settings(max_examples=25, deadline=None)
@given(n_kv_heads=st.sampled_from([1, 2, 4]), group=st.integers(1, 3), head_half=st.integers(1, 6),
       n_layers=st.integers(1, 3), vocab=st.integers(8, 300), tie=st.booleans(),
       mult=st.sampled_from([None, 1.3, 0.7]), multiple_of=st.sampled_from([1, 16, 64]))
def test_count_equals_allocated_parameters(n_kv_heads, group, head_half, n_layers, vocab, tie,
                                           mult, multiple_of):
    n_heads = n_kv_heads * group
    args = ModelArgs(dim=n_heads * 2 * head_half, n_layers=n_layers, n_heads=n_heads,
                     n_kv_heads=n_kv_heads, vocab_size=vocab, tie_word_embeddings=tie,
                     ffn_dim_multiplier=mult, multiple_of=multiple_of, max_seq_len=16)
    model = Transformer(args)
    assert num_params(args) == sum(p.numel() for p in model.parameters())
    by_module = param_counts(args)
    assert by_module["tok_embeddings"] == model.tok_embeddings.weight.numel()
    assert by_module["feed_forward"] == sum(
        p.numel() for n, p in model.named_parameters() if ".feed_forward." in n)


def test_kv_cache_of_8b_at_128k_is_16_gib_with_gqa_and_64_with_mha():
    args = get_preset("llama3-8b")
    assert kv_cache_bytes(args, 131072, dtype="bfloat16") == 16 * GiB
    assert kv_cache_bytes(args, 131072, dtype=torch.bfloat16, n_kv_heads=32) == 64 * GiB
    assert kv_cache_bytes(args, 8192, batch_size=4, dtype="float32") == 4 * 2 * GiB


def test_weight_bytes_in_bf16():
    assert weight_bytes(get_preset("llama3-8b"), "bf16") == 2 * 8_030_261_248


@pytest.mark.parametrize("changes, message", [
    (dict(dim=96, n_heads=12, n_kv_heads=5),
     r"n_heads \(12\) must be a multiple of n_kv_heads \(5\)"),
    (dict(dim=100, n_heads=8), r"dim \(100\) must be divisible by n_heads \(8\)"),
    (dict(dim=24, n_heads=8, n_kv_heads=8), r"head_dim = dim / n_heads \(3\) must be even"),
    (dict(n_layers=0), r"n_layers \(0\) must be positive"),
    (dict(n_kv_heads=0), r"n_kv_heads \(0\) must be positive"),
    (dict(rope_theta=-1.0), r"rope_theta \(-1.0\) must be positive"),
])
def test_bad_configs_name_the_rule_and_values(changes, message):
    with pytest.raises(ValueError, match=message):
        get_preset("tiny").replace(**changes)


def test_unknown_preset_and_dtype_are_explained():
    with pytest.raises(ValueError, match="unknown preset 'llama2'.*tiny"):
        get_preset("llama2")
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        kv_cache_bytes(get_preset("tiny"), 10, dtype="int3")
    with pytest.raises(ValueError, match=r"n_heads \(8\) must be a multiple of n_kv_heads \(3\)"):
        kv_cache_bytes(get_preset("tiny"), 10, n_kv_heads=3)


def test_presets_are_frozen_and_replace_makes_a_validated_copy():
    a = get_preset("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.dim = 8
    assert get_preset("tiny").dim == 256
    assert a.replace(dim=512).dim == 512 and get_preset("tiny").dim == 256
    with pytest.raises(ValueError, match=r"dim \(100\) must be divisible by n_heads \(8\)"):
        a.replace(dim=100)


def test_pick_device_takes_the_one_asked_for_from_config_or_the_package(monkeypatch):
    import llama3_mini

    assert llama3_mini.pick_device is pick_device
    assert pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device() == torch.device("cuda")


def test_from_dict_reads_meta_params_json():
    params = {"dim": 2048, "ffn_dim_multiplier": 1.5, "multiple_of": 256, "n_heads": 32,
              "n_kv_heads": 8, "n_layers": 16, "norm_eps": 1e-05, "rope_theta": 500000.0,
              "use_scaled_rope": True, "vocab_size": 128256}
    args = ModelArgs.from_dict(params).replace(tie_word_embeddings=True)
    assert num_params(args) == PUBLISHED["llama3.2-1b"]
