"""Hugging Face's Llama format: our names (Meta's) <-> Hugging Face's, and its config.json.

Meta's checkpoints and ours share names (`layers.0.attention.wq.weight`). Hugging Face
renames every tensor and, for queries and keys, reorders rows: Meta rotates adjacent
dimension pairs (0,1), (2,3), ... while Hugging Face's `rotate_half` pairs dimension i with
i + head_dim/2. `permute_to_hf` / `permute_from_hf` move rows between the two layouts, per
head, so that both models compute the same attention. hub.py reads and writes whole Hugging
Face folders with these; hf_tokenizer.py holds its tokenizer.json."""
from __future__ import annotations

import torch

from .config import ModelArgs

# Our (Meta's) name inside a block -> Hugging Face's name inside `model.layers.{i}`.
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight",
              "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq/wk from Meta's interleaved pairs to Hugging Face's halves, per head."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_to_hf`."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_name(name: str) -> str:
    """Our parameter name -> Hugging Face's (`layers.3.attention.wq.weight` ->
    `model.layers.3.self_attn.q_proj.weight`)."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    _, i, rest = name.split(".", 2)
    if rest not in _LAYER_NAMES:
        raise KeyError(f"no Hugging Face name for {name!r}")
    return f"model.layers.{i}.{_LAYER_NAMES[rest]}"


_FROM_HF = {hf: ours for ours, hf in (_TOP_NAMES | _LAYER_NAMES).items()}


def our_name(name: str) -> str:
    """Hugging Face's parameter name -> ours (the inverse of `hf_name`)."""
    if name in _FROM_HF:
        return _FROM_HF[name]
    if name.startswith("model.layers."):
        _, _, i, rest = name.split(".", 3)
        if rest in _FROM_HF:
            return f"layers.{i}.{_FROM_HF[rest]}"
    raise KeyError(f"unexpected tensor {name!r} in a Hugging Face Llama checkpoint")


def to_hf_state_dict(state_dict: dict, args: ModelArgs) -> dict:
    """Our state dict -> a Hugging Face `LlamaForCausalLM` state dict (q/k rows permuted)."""
    out = {}
    for name, w in state_dict.items():
        if name.endswith("attention.wq.weight"):
            w = permute_to_hf(w, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            w = permute_to_hf(w, args.kv_heads)
        out[hf_name(name)] = w
    return out


def from_hf_state_dict(hf_state_dict: dict, args: ModelArgs) -> dict:
    """A Hugging Face Llama state dict -> ours. With no `lm_head.weight` (tied embeddings,
    as `save_pretrained` writes them) the output layer shares the input embedding."""
    out = {}
    for name, w in hf_state_dict.items():
        if name.endswith("rotary_emb.inv_freq"):  # a buffer some versions save; we recompute it
            continue
        ours = our_name(name)
        if ours.endswith("attention.wq.weight"):
            w = permute_from_hf(w, args.n_heads)
        elif ours.endswith("attention.wk.weight"):
            w = permute_from_hf(w, args.kv_heads)
        out[ours] = w
    if "output.weight" not in out and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def hf_config_dict(args: ModelArgs, tokenizer=None, dtype=torch.float32) -> dict:
    """config.json of a Hugging Face Llama folder, in the fields Meta's own folders write."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "vocab_size": args.vocab_size, "hidden_size": args.dim,
              "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
              "num_attention_heads": args.n_heads, "num_key_value_heads": args.kv_heads,
              "head_dim": args.head_dim, "hidden_act": "silu",
              "max_position_embeddings": args.max_seq_len, "rms_norm_eps": args.norm_eps,
              "rope_theta": args.rope_theta, "rope_scaling": hf_rope_scaling(args),
              "tie_word_embeddings": args.tie_word_embeddings, "attention_bias": False,
              "mlp_bias": False, "torch_dtype": str(dtype).removeprefix("torch."),
              "use_cache": True}
    if tokenizer is not None:
        config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    return config


def hf_config(args: ModelArgs, **extra):
    """A transformers `LlamaConfig` for `args`: the fields of `hf_config_dict`, and `extra`."""
    from transformers import LlamaConfig  # a test/interop dependency, imported when needed

    return LlamaConfig(**{**hf_config_dict(args), **extra})


def hf_rope_scaling(args: ModelArgs) -> dict | None:
    """Llama 3.1's RoPE scaling as Hugging Face's config writes it (None when off)."""
    if not args.use_scaled_rope:
        return None
    return {"rope_type": "llama3", "factor": args.rope_scaling_factor,
            "low_freq_factor": args.rope_low_freq_factor,
            "high_freq_factor": args.rope_high_freq_factor,
            "original_max_position_embeddings": args.rope_original_max_seq_len}


def args_from_hf_config(config) -> ModelArgs:
    """`ModelArgs` from a Hugging Face Llama config (a dict from config.json or a
    `LlamaConfig`). Reads `rope_scaling` (transformers 4) or `rope_parameters` (5)."""
    cfg = config if isinstance(config, dict) else config.to_dict()
    dim, hidden = cfg["hidden_size"], cfg["intermediate_size"]
    n_heads = cfg["num_attention_heads"]
    if cfg.get("head_dim") not in (None, dim // n_heads):
        raise ValueError(f"head_dim ({cfg['head_dim']}) must equal hidden_size / "
                         f"num_attention_heads ({dim // n_heads}) in a Llama 3 model")
    # Express intermediate_size through Meta's rule: either rounding 8*dim/3 up to a
    # multiple of `hidden` itself, or a multiplier that lands on it exactly.
    base = int(2 * 4 * dim / 3)
    multiple_of, multiplier = (hidden, None) if hidden >= base else (1, (hidden + 0.5) / base)
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or rope
    scaled = scaling.get("rope_type", scaling.get("type")) == "llama3"
    args = ModelArgs(
        dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads, vocab_size=cfg["vocab_size"],
        multiple_of=multiple_of, ffn_dim_multiplier=multiplier,
        norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=cfg.get("rope_theta") or rope.get("rope_theta", 500000.0),
        use_scaled_rope=scaled, max_seq_len=cfg.get("max_position_embeddings", 8192),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    if scaled:
        args = args.replace(
            rope_scaling_factor=scaling["factor"], rope_low_freq_factor=scaling["low_freq_factor"],
            rope_high_freq_factor=scaling["high_freq_factor"],
            rope_original_max_seq_len=scaling["original_max_position_embeddings"])
    if args.hidden_dim != hidden:
        raise ValueError(f"cannot express intermediate_size {hidden} for dim {dim}")
    return args


def to_hf_model(model):
    """A Hugging Face `LlamaForCausalLM` with our model's weights (same dtype)."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(hf_config(model.params)).to(next(model.parameters()).dtype)
    hf.load_state_dict(to_hf_state_dict(model.state_dict(), model.params))
    return hf.eval()
