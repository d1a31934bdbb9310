"""Parity with Hugging Face transformers: random tiny `LlamaForCausalLM` models, built by
transformers itself, converted into our `Transformer`, must give the same logits."""
import pytest
import torch

transformers = pytest.importorskip("transformers")  # a test dependency: always installed by make

from model_support import randomize_  # noqa: E402

from llama3_mini.checkpoint import (  # noqa: E402
    args_from_hf_config,
    from_hf_state_dict,
    hf_config,
    to_hf_state_dict,
)
from llama3_mini.config import ModelArgs  # noqa: E402
from llama3_mini.model import Transformer  # noqa: E402

SCALING = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

CASES = {
    # name: (hidden, heads, kv_heads, intermediate, rope_theta, rope_scaling, tied)
    "mqa": (64, 4, 1, 176, 500000.0, None, False),
    "gqa-2": (64, 8, 2, 160, 500000.0, None, False),
    "mha": (48, 4, 4, 128, 10000.0, None, False),
    "gqa-scaled": (64, 4, 2, 176, 10000.0, SCALING, False),
    "mha-scaled-tied": (48, 4, 4, 128, 500000.0, SCALING, True),
    "odd-dim-tied": (120, 5, 5, 328, 500000.0, None, True),
    "odd-dim-gqa-scaled": (72, 6, 3, 200, 10000.0, SCALING, False),
}


def random_hf_model(hidden, heads, kv_heads, intermediate, theta, scaling, tied, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_theta=theta, rope_scaling=scaling, tie_word_embeddings=tied)
    return randomize_(transformers.LlamaForCausalLM(config).eval())


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_hugging_face(case):
    hf = random_hf_model(*CASES[case])
    args = args_from_hf_config(hf.config)
    ours = Transformer(args).eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), args))
    tokens = torch.randint(0, 97, (2, 64))
    with torch.no_grad():
        expected = hf(tokens).logits
        torch.testing.assert_close(ours(tokens), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.set_fast_attention(False)(tokens), expected,
                                   atol=1e-5, rtol=1e-5)
    assert ours.params.tie_word_embeddings == CASES[case][-1]
    assert ours.params.use_scaled_rope == (CASES[case][5] is not None)


def test_rope_scaling_changes_the_logits_so_the_parity_above_means_something():
    hf = random_hf_model(*CASES["gqa-scaled"])
    args = args_from_hf_config(hf.config)
    plain = Transformer(args.replace(use_scaled_rope=False)).eval()
    plain.load_state_dict(from_hf_state_dict(hf.state_dict(), args))
    tokens = torch.randint(0, 97, (1, 64))
    with torch.no_grad():
        assert (plain(tokens) - hf(tokens).logits).abs().max() > 1e-3


@pytest.mark.parametrize("case", ["gqa-2", "mha-scaled-tied", "odd-dim-gqa-scaled"])
def test_round_trips_are_exact(case):
    hf = random_hf_model(*CASES[case])
    args = args_from_hf_config(hf.config)
    hf_sd = {k: v for k, v in hf.state_dict().items() if "rotary_emb" not in k}
    back = to_hf_state_dict(from_hf_state_dict(hf_sd, args), args)
    assert set(back) >= set(hf_sd)
    for name, tensor in hf_sd.items():
        assert torch.equal(back[name], tensor), name
    # ours -> theirs -> ours
    ours = Transformer(args).state_dict()
    again = from_hf_state_dict(to_hf_state_dict(ours, args), args)
    assert all(torch.equal(again[k], v) for k, v in ours.items())


def test_our_config_converts_to_an_equal_hugging_face_model():
    torch.manual_seed(1)
    args = ModelArgs(dim=96, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=120,
                     multiple_of=32, ffn_dim_multiplier=1.3, max_seq_len=48,
                     use_scaled_rope=True, rope_original_max_seq_len=16, rope_theta=10000.0)
    ours = Transformer(args).eval()
    hf = transformers.LlamaForCausalLM(hf_config(args)).eval()
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), args))
    assert args_from_hf_config(hf.config).hidden_dim == args.hidden_dim
    tokens = torch.randint(0, 120, (3, 48))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-5, rtol=1e-5)


def test_q_and_k_permutation_is_needed():
    """Without the permutation the models disagree: the test above would catch its loss."""
    hf = random_hf_model(*CASES["gqa-2"])
    args = args_from_hf_config(hf.config)
    ours = Transformer(args).eval()
    sd = from_hf_state_dict(hf.state_dict(), args)
    for name in sd:
        if name.endswith(("wq.weight", "wk.weight")):
            sd[name] = hf.state_dict()[name.replace("layers", "model.layers")
                                       .replace("attention.wq", "self_attn.q_proj")
                                       .replace("attention.wk", "self_attn.k_proj")]
    ours.load_state_dict(sd)
    tokens = torch.randint(0, 97, (1, 32))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max() > 1e-3
