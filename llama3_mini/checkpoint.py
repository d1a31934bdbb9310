"""Checkpoints: our names <-> Hugging Face's (tensors, config.json, tokenizer.json), and our
own folders (config.json marked "format": "llama3-mini", model.safetensors), saved and loaded.

Meta's checkpoints and ours share names (`layers.0.attention.wq.weight`). Hugging Face
renames every tensor and, for queries and keys, reorders rows: Meta rotates adjacent
dimension pairs (0,1), (2,3), ... while Hugging Face's `rotate_half` pairs dimension i with
i + head_dim/2. `permute_to_hf` / `permute_from_hf` move rows between the two layouts, per
head, so that both models compute the same attention."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

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


_FROM_HF = {}  # filled lazily: Hugging Face name pattern -> ours


def our_name(name: str) -> str:
    """Hugging Face's parameter name -> ours (the inverse of `hf_name`)."""
    if not _FROM_HF:
        _FROM_HF.update({v: k for k, v in _TOP_NAMES.items()})
        _FROM_HF.update({v: k for k, v in _LAYER_NAMES.items()})
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


def hf_config(args: ModelArgs, **extra):
    """A transformers `LlamaConfig` describing the same model as `args`."""
    from transformers import LlamaConfig  # a test/interop dependency, imported when needed

    return LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
        num_key_value_heads=args.kv_heads, head_dim=args.head_dim, hidden_act="silu",
        max_position_embeddings=args.max_seq_len, rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta, rope_scaling=hf_rope_scaling(args),
        tie_word_embeddings=args.tie_word_embeddings, attention_bias=False, mlp_bias=False,
        **extra)


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


def from_hf_model(hf_model):
    """Our `Transformer` with a Hugging Face `LlamaForCausalLM`'s weights."""
    from .model import Transformer

    args = args_from_hf_config(hf_model.config)
    model = Transformer(args).to(next(hf_model.parameters()).dtype)
    model.load_state_dict(from_hf_state_dict(hf_model.state_dict(), args))
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Our own folders: config.json ({"format": "llama3-mini", "model_args": ..., ...}) and
# model.safetensors in our names, written under a temporary name and renamed when complete.
FORMAT = "llama3-mini"  # config.json's mark: a Hugging Face config says "model_type": "llama"


def is_our_config(config: dict) -> bool:
    """True for a config.json that save_model or the trainer wrote (older ones lack the
    "format" mark but hold "model_args"); False for a Hugging Face one."""
    return config.get("format") == FORMAT or "model_args" in config


def model_weights(model, dtype=None) -> dict:
    """The state dict to save: on the CPU, contiguous, without the tied output layer."""
    state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    if model.params.tie_word_embeddings:
        state.pop("output.weight")  # the same tensor as tok_embeddings.weight
    return state


def replace_dir(tmp: Path, folder: Path) -> None:
    """Make the complete folder `tmp` become `folder` (flushed to disk, then renamed)."""
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if folder.exists():
        old = folder.with_name(f".old-{folder.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(folder, old)
        os.rename(tmp, folder)
        shutil.rmtree(old)
    else:
        os.rename(tmp, folder)


def save_model(model, folder, dtype=None, **info) -> Path:
    """Weights (safetensors) and config.json (model args plus `info`) into `folder`,
    atomically: written beside it under a temporary name, then renamed."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(model_weights(model, dtype), str(tmp / "model.safetensors"))
    config = {"format": FORMAT, "model_args": model.params.to_dict(), **info}
    (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str))
    replace_dir(tmp, folder)
    return folder


def load_model(folder, device=None, dtype=torch.float32):
    """A model saved by `save_model` (or a training checkpoint) and its config.json:
    (model, info). A damaged or half-written model.safetensors is named, not a traceback."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .model import Transformer, pick_device

    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} has no config.json: not a checkpoint folder")
    info = json.loads((folder / "config.json").read_text())
    if not is_our_config(info):
        raise ValueError(f"{folder}/config.json is not a llama3-mini checkpoint (no "
                         "'model_args'); load Hugging Face or Meta folders with "
                         "llama3_mini.hub.Llama.from_pretrained")
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{folder} has config.json but no model.safetensors")
    try:
        state = {k: v.to(dtype) for k, v in load_file(str(weights)).items()}
    except SafetensorError as e:
        raise ValueError(f"{weights} is damaged or incomplete ({e}); it was not written to the "
                         f"end: use another checkpoint of the run, or train again") from None
    model = Transformer(ModelArgs.from_dict(info["model_args"]))
    if model.params.tie_word_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state)
    return model.to(pick_device(device)), info


def latest_checkpoint(out_dir) -> Path | None:
    """The newest complete checkpoint under out_dir, or None."""
    pointer = Path(out_dir) / "latest"
    if not pointer.exists():
        return None
    return Path(out_dir) / pointer.read_text().strip()


def load_checkpoint(folder, device=None, dtype=torch.float32):
    """A course checkpoint and its tokenizer: (model in eval mode, Tokenizer, info). A
    training run's folder (one with `latest`) gives its newest checkpoint. The tokenizer is
    the file config.json names, else one of that name beside the checkpoint or its run."""
    from .tokenizer import Tokenizer

    folder = Path(folder)
    if (folder / "latest").exists():
        folder = latest_checkpoint(folder)
    model, info = load_model(folder, device, dtype)
    named = Path(info.get("tokenizer") or "tokenizer.tiktoken")
    candidates = [named if named.is_absolute() else folder / named,
                  folder / named.name, folder.parent / named.name]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"the checkpoint's tokenizer {candidates[0]} is missing")
    return model.eval(), Tokenizer.load(path), info


# ---------------------------------------------------------------------------------------------
# Export: a folder that Hugging Face's `transformers` (and any tool reading its folders) loads
# with LlamaForCausalLM.from_pretrained and AutoTokenizer.from_pretrained.
# Meta-Llama-3-8B-Instruct's chat template: the same ids as tokenizer.ChatFormat.
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>"
    "assistant<|end_header_id|>\n\n' }}{% endif %}")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, which tokenizer.json vocabularies use:
    printable bytes stand for themselves, the others for chr(256 + n) (b' ' -> 'Ġ')."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    others = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(others)) for b in range(256)}


def tokenizer_json(tokenizer) -> dict:
    """Our tokenizer as a `tokenizers` byte-level BPE (the tokenizer.json of Meta's Hugging
    Face folders). A token's id is its rank; the merges are every split of a token into two
    tokens, ordered by the token's rank (as transformers converts tiktoken files), so that
    BPE merges in tiktoken's order. {b"ab": 256} -> vocab {"a": 97, ..., "ab": 256},
    merges ["a b"]."""
    chars = bytes_to_unicode()
    ranks = tokenizer.mergeable_ranks

    def text(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    merges = []
    for token in sorted(ranks, key=ranks.get):
        splits = [(token[:i], token[i:]) for i in range(1, len(token))
                  if token[:i] in ranks and token[i:] in ranks]
        merges += sorted(splits, key=lambda s: (ranks[s[0]], ranks[s[1]]))
    special = [{"id": i, "content": name, "single_word": False, "lstrip": False,
                "rstrip": False, "normalized": False, "special": True}
               for name, i in tokenizer.special_tokens.items()]
    bos = "<|begin_of_text|>"
    template = {"type": "TemplateProcessing",  # encode(text) starts with <|begin_of_text|>
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                         {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [tokenizer.bos_id], "tokens": [bos]}}}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tokenizer.pattern}, "behavior": "Isolated",
             "invert": False}, byte_level]},
        "post_processor": {"type": "Sequence", "processors": [
            {**byte_level, "trim_offsets": False}, template]},
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": True,  # a piece that is a token is taken whole (tiktoken)
                  "vocab": {text(t): r for t, r in ranks.items()},
                  "merges": [f"{text(a)} {text(b)}" for a, b in merges]}}


def ranks_from_tokenizer_json(path) -> tuple[dict[bytes, int], dict[str, int]]:
    """Hugging Face's tokenizer.json -> (mergeable ranks as tiktoken keeps them, special
    tokens). In a byte-level BPE a token's id is its merge rank, so no merge is needed."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    decode = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {bytes(decode[c] for c in token): i for token, i in data["model"]["vocab"].items()}
    special = {t["content"]: t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    return ranks, special


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
