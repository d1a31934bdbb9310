"""LoRA: the adapter's formula, frozen base weights, exact merge and unmerge."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from llama3_mini.config import ModelArgs
from llama3_mini.lora import (
    LoRALinear,
    add_lora,
    lora_layers,
    lora_state_dict,
    merge_lora,
    remove_lora,
    train_token_rows,
    trainable_parameters,
    unmerge_lora,
)
from llama3_mini.model import Transformer

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16,
                 max_seq_len=32)


def tiny(seed=0, **changes):
    torch.manual_seed(seed)
    return Transformer(ARGS.replace(**changes)).eval()


def randomize_adapters(model, seed=1):
    """B starts at zero (the adapter does nothing); give it values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


@settings(max_examples=30, deadline=None)
@given(inp=st.integers(1, 24), out=st.integers(1, 24), rank=st.integers(1, 8),
       alpha=st.floats(0.5, 64), seed=st.integers(0, 10_000))
def test_adapter_computes_x_wt_plus_scaled_x_at_bt(inp, out, rank, alpha, seed):
    torch.manual_seed(seed)
    base = torch.nn.Linear(inp, out, bias=False)
    layer = LoRALinear(base, rank=rank, alpha=alpha)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, inp)
    w, a, b = base.weight.detach(), layer.lora_A.detach(), layer.lora_B.detach()
    expected = F.linear(x, w) + F.linear(F.linear(x, a), b) * (alpha / rank)  # Hu et al. eq. 3
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    # merging gives one matrix that computes the same thing
    layer.merge()
    torch.testing.assert_close(base(x), expected, atol=1e-5, rtol=1e-5)


def test_fresh_adapters_leave_the_model_unchanged():
    model = tiny()
    tokens = torch.randint(0, 97, (2, 12))
    before = model(tokens)
    add_lora(model, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"), rank=4)
    assert torch.equal(model(tokens), before)


@pytest.mark.parametrize("targets", [("wq", "wv"), ("wo", "w2"), ("w1", "w3", "wk")])
def test_merged_logits_equal_adapter_logits_and_unmerge_is_exact(targets):
    model = tiny()
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, targets=targets, rank=4, alpha=8)
    randomize_adapters(model)
    tokens = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        adapted = model(tokens)
        merged = merge_lora(model)(tokens)
        torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
        assert all(layer.merged for layer in lora_layers(model).values())
        unmerge_lora(model)
    for name, layer in lora_layers(model).items():
        assert torch.equal(layer.base.weight, base_weights[f"{name}.weight"]), name
    torch.testing.assert_close(model(tokens), adapted)


def test_unmerge_by_subtraction_is_close():
    model = add_lora(tiny(), targets=("wq", "w2"), rank=2)
    randomize_adapters(model)
    layer = next(iter(lora_layers(model).values()))
    original = layer.base.weight.clone()
    layer.merge(keep_original=False)
    assert not torch.equal(layer.base.weight, original)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, original, atol=1e-6, rtol=0)


def test_only_adapters_get_gradients_and_change():
    model = add_lora(tiny(), targets=("wq", "wv"), rank=4)
    randomize_adapters(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = torch.randint(0, 97, (2, 12))
    loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name
    opt.step()
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]) != ("lora_" in name), name


def test_trainable_count_is_rank_times_in_plus_out():
    model = add_lora(tiny(), targets=("wq", "wv", "w1"), rank=3)
    kv_dim = ARGS.kv_heads * ARGS.head_dim
    per_block = 3 * (32 + 32) + 3 * (32 + kv_dim) + 3 * (32 + ARGS.hidden_dim)
    trainable, total = trainable_parameters(model)
    assert trainable == per_block * ARGS.n_layers
    assert total == sum(p.numel() for p in tiny().parameters()) + trainable
    assert sum(v.numel() for v in lora_state_dict(model).values()) == trainable


def test_remove_lora_gives_back_a_plain_model_with_the_update_merged():
    model = add_lora(tiny(), targets=("wq", "wo", "w3"), rank=2)
    randomize_adapters(model)
    tokens = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        adapted = model(tokens)
    plain = remove_lora(model)
    assert not lora_layers(plain)
    fresh = tiny(seed=5)
    fresh.load_state_dict(plain.state_dict())  # the original names again
    torch.testing.assert_close(fresh(tokens), adapted, atol=1e-5, rtol=1e-5)


def test_dropout_acts_in_training_only():
    model = add_lora(tiny(), targets=("wq",), rank=4, dropout=0.5)
    randomize_adapters(model)
    tokens = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        a, b = model(tokens), model(tokens)
        assert torch.equal(a, b)
        model.train()
        assert not torch.equal(model(tokens), a)


def test_tied_model_keeps_its_tie_and_counts_it_once():
    model = add_lora(tiny(tie_word_embeddings=True), targets=("wv",), rank=2)
    assert model.output.weight is model.tok_embeddings.weight
    trainable, total = trainable_parameters(model)
    assert total - trainable == sum(p.numel() for p in tiny(tie_word_embeddings=True).parameters())


def test_bad_requests_say_what_to_do():
    with pytest.raises(ValueError, match="cannot put adapters on \\['wz'\\]: choose among wq"):
        add_lora(tiny(), targets=("wq", "wz"))
    with pytest.raises(ValueError, match=r"rank \(0\) must be at least 1"):
        add_lora(tiny(), rank=0)
    model = add_lora(tiny())
    with pytest.raises(ValueError, match="already has adapters; call remove_lora"):
        add_lora(model)
    with pytest.raises(ValueError, match="no linear layer named wq"):
        add_lora(torch.nn.Sequential(torch.nn.ReLU()), targets=("wq",))


ROWS = [3, 40, 96]  # token ids whose embedding and output rows train


def test_token_rows_start_as_the_base_and_get_the_plain_models_row_gradients():
    """The reference is autograd on the unwrapped model: the gradient of each trainable row
    equals that row of the full weight's gradient, for the embedding and the output."""
    plain = tiny()
    model = train_token_rows(add_lora(tiny(), targets=("wq",), rank=2), ROWS)
    tokens = torch.tensor([[3, 5, 40, 96, 3, 7, 40, 1]])
    loss = [F.cross_entropy(m(tokens[:, :-1]).flatten(0, 1), tokens[0, 1:]) for m in (plain, model)]
    torch.testing.assert_close(loss[1], loss[0], atol=0, rtol=0)  # zero rows change nothing
    for t in loss:
        t.backward()
    for name in ("tok_embeddings", "output"):
        full_grad = getattr(plain, name).weight.grad
        torch.testing.assert_close(getattr(model, name).lora_rows.grad, full_grad[ROWS])
        assert getattr(model, name).base.weight.grad is None  # the rest stays frozen


def test_token_rows_change_only_their_rows_and_merge_back():
    model = train_token_rows(add_lora(tiny(), targets=("wv",), rank=2), ROWS)
    trainable, _ = trainable_parameters(model)
    assert trainable == ARGS.n_layers * 2 * (32 + ARGS.kv_heads * ARGS.head_dim) + 2 * 3 * 32
    assert {k for k in lora_state_dict(model) if "rows" in k} == {
        "tok_embeddings.lora_rows", "output.lora_rows"}
    randomize_adapters(model)
    with torch.no_grad():
        model.output.lora_rows.normal_()
        model.tok_embeddings.lora_rows.normal_()
    tokens = torch.tensor([[3, 5, 40, 96, 2, 7]])
    with torch.no_grad():
        adapted = model(tokens)
    plain = remove_lora(model)
    base = tiny()
    changed = (plain.output.weight != base.output.weight).any(dim=1).nonzero().flatten()
    assert changed.tolist() == ROWS  # only the chosen rows moved
    fresh = tiny(seed=5)
    fresh.load_state_dict(plain.state_dict())
    torch.testing.assert_close(fresh(tokens), adapted, atol=1e-5, rtol=1e-5)


def test_token_rows_bad_requests_say_what_to_do():
    with pytest.raises(ValueError, match=r"token ids must be a non-empty set in \[0, 97\)"):
        train_token_rows(tiny(), [97])
    with pytest.raises(ValueError, match="no embedding or output layer named 'lm_head'"):
        train_token_rows(tiny(), [1], modules=("lm_head",))
    with pytest.raises(ValueError, match="ties its embeddings to its output"):
        train_token_rows(tiny(tie_word_embeddings=True), [1])
