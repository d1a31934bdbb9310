"""Helpers shared by the model, cache and generation tests."""
import pytest
import torch

from llama3_mini.config import ModelArgs
from llama3_mini.model import Transformer


def attention_configs(max_seq_len: int, vocab_size: int = 97) -> dict[str, ModelArgs]:
    """Small models with each kind of attention, and one with Llama 3.1's RoPE scaling."""
    common = dict(n_layers=2, vocab_size=vocab_size, multiple_of=32, max_seq_len=max_seq_len)
    return {
        "gqa": ModelArgs(dim=64, n_heads=8, n_kv_heads=2, **common),
        "mqa": ModelArgs(dim=64, n_heads=4, n_kv_heads=1, **common),
        "mha": ModelArgs(dim=48, n_heads=4, rope_theta=10000.0, **common),
        "gqa-scaled-rope": ModelArgs(dim=64, n_heads=4, n_kv_heads=2, use_scaled_rope=True,
                                     rope_scaling_factor=4.0, rope_original_max_seq_len=16,
                                     **common),
    }


def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """Larger random weights than the init, and norms away from 1, in place: logits that
    are peaked and well separated, so that a wrong mapping or a wrong cache shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 0.08)
    return model


def random_model(args: ModelArgs, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return randomize_(Transformer(args).eval())


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models decode fastest on one thread (and far faster on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
