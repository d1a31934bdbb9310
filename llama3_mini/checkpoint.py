"""The course's own checkpoints, saved and loaded, and our names (Meta's) <-> Hugging Face's.

Our own folders: config.json (marked "format": "llama3-mini") and model.safetensors, written
atomically (`save_model`, `load_model`, `load_checkpoint`); a training run's checkpoints and
metrics (`save_checkpoint`, `latest_checkpoint`, `read_metrics`); the course's pretrained
models (`load_pretrained`). hub.py reads and writes Meta's and Hugging Face's whole folders
with the mapping below; hf_tokenizer.py holds Hugging Face's tokenizer.json.

Meta's checkpoints and ours share names (`layers.0.attention.wq.weight`). Hugging Face
renames every tensor and, for queries and keys, reorders rows: Meta rotates adjacent
dimension pairs (0,1), (2,3), ... while Hugging Face's `rotate_half` pairs dimension i with
i + head_dim/2. `permute_to_hf` / `permute_from_hf` move rows between the two layouts, per
head, so that both models compute the same attention."""
from __future__ import annotations

import json
import os
import shutil
from importlib import resources
from pathlib import Path

import torch

from .config import ModelArgs, pick_device

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


# ---------------------------------------------------------------------------------------------
# Our own folders: config.json ({"format": "llama3-mini", "model_args": ..., ...}) and
# model.safetensors in our names; a training checkpoint adds state.pt (optimizer, RNG, step).
# Each is written under a temporary name and renamed when complete. A training run's folder
# holds its checkpoints step_NNNNNN, `latest` (the newest complete one's name) and
# metrics.jsonl (one row per step and evaluation).
FORMAT = "llama3-mini"  # config.json's mark: a Hugging Face config says "model_type": "llama"
TRAINING_STATE = "state.pt"


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


def save_model(model, folder, dtype=None, state: dict | None = None, **info) -> Path:
    """Weights (safetensors) and config.json (model args plus `info`) into `folder`, and
    `state` as state.pt when given (a training checkpoint's optimizer, RNG, step...):
    atomically, written beside it under a temporary name, then renamed."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(model_weights(model, dtype), str(tmp / "model.safetensors"))
    config = {"format": FORMAT, "model_args": model.params.to_dict(), **info}
    (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str))
    if state is not None:
        torch.save(state, tmp / TRAINING_STATE)
    replace_dir(tmp, folder)
    return folder


def save_checkpoint(model, out_dir, step: int, state: dict, keep: int = 2, **info) -> Path:
    """Training checkpoint out_dir/step_NNNNNN (`save_model` with `state`); then `latest`
    names it (replaced by a rename, so it always names a complete checkpoint) and all but
    the newest `keep` checkpoints are deleted."""
    out_dir = Path(out_dir)
    folder = save_model(model, out_dir / f"step_{step:06d}", state=state, step=step, **info)
    pointer = out_dir / "latest.tmp"
    pointer.write_text(folder.name)
    os.replace(pointer, out_dir / "latest")
    for old in sorted(out_dir.glob("step_*"))[:-keep]:
        shutil.rmtree(old)
    return folder


def latest_checkpoint(out_dir) -> Path | None:
    """The newest complete checkpoint under out_dir, or None."""
    pointer = Path(out_dir) / "latest"
    return Path(out_dir) / pointer.read_text().strip() if pointer.exists() else None


def remove_unfinished(out_dir) -> None:
    """Delete what saves that were killed before their rename left: never a checkpoint."""
    for tmp in Path(out_dir).glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def load_weights(folder, dtype=torch.float32) -> tuple[dict, dict]:
    """The state dict (tied output layer included) and config.json of a folder that
    `save_model` wrote: (state, info). A damaged or half-written model.safetensors is named,
    not a traceback."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

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
    if ModelArgs.from_dict(info["model_args"]).tie_word_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return state, info


def load_training_state(folder) -> dict:
    """A training checkpoint's state.pt: optimizer, RNG, step, ... (`weights_only`)."""
    return torch.load(Path(folder) / TRAINING_STATE, weights_only=True, map_location="cpu")


def load_model(folder, device=None, dtype=torch.float32):
    """A model saved by `save_model` (or a training checkpoint) and its config.json:
    (model, info), on `device` (default: CUDA, then Apple MPS, then the CPU)."""
    from .model import Transformer

    state, info = load_weights(folder, dtype)
    model = Transformer(ModelArgs.from_dict(info["model_args"]))
    model.load_state_dict(state)
    return model.to(pick_device(device)), info


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


def read_metrics(path) -> list[dict]:
    """metrics.jsonl as one dict per step (a step's training and evaluation rows merged)."""
    rows: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows.setdefault(row["step"], {}).update(row)
    return [rows[k] for k in sorted(rows)]


# ---------------------------------------------------------------------------------------------
# The course's pretrained models: folders of save_model's layout with their tokenizer, made
# by `make assets` and shipped as the package data `llama3_mini.assets`.
def _assets_folder() -> Path:
    """The pretrained models' folder: the checkout's top-level assets/ in an editable
    install, a folder inside the installed package from a wheel."""
    try:
        return Path(str(resources.files("llama3_mini.assets")))
    except ModuleNotFoundError:  # a checkout put on sys.path by hand, never installed
        return Path(__file__).resolve().parent.parent / "assets"


ASSETS = _assets_folder()


def pretrained_models() -> list[str]:
    """The names `load_pretrained` accepts: the asset folders that hold a model."""
    if not ASSETS.is_dir():
        return []
    return sorted(p.name for p in ASSETS.iterdir() if (p / "model.safetensors").is_file())


def _is_device(value) -> bool:
    try:
        return torch.device(value) is not None
    except (RuntimeError, TypeError):
        return False


def load_pretrained(name="story-model", device=None, folder=None):
    """One of the course's small pretrained models and its tokenizer: (model, tokenizer).

    `name` picks a folder of the package's assets (made by `make assets`): "story-model",
    trained on the story corpus, is the default; `pretrained_models()` lists them all.
    `folder` loads a folder of the same layout from anywhere instead. The model is in eval
    mode, on `device` (default: CUDA, then Apple MPS, then the CPU).

        model, tokenizer = load_pretrained()                      # the story model
        model, tokenizer = load_pretrained("byte-model", device="cpu")"""
    name = "story-model" if name is None else name
    if folder is None and device is None and name not in pretrained_models() \
            and _is_device(name):
        name, device = "story-model", name  # load_pretrained(device), the older call
    if folder is None:
        available = pretrained_models()
        if name not in available:
            raise FileNotFoundError(
                f"no pretrained model {name!r} in {ASSETS}; the available models are: "
                f"{', '.join(available) or 'none'} (`make assets` makes them in a checkout)")
        folder = ASSETS / name
    folder = Path(folder)
    if not (folder / "model.safetensors").exists():
        raise FileNotFoundError(f"no pretrained model in {folder}; run `make assets` to make it")
    model, tokenizer, _ = load_checkpoint(folder, device)
    return model, tokenizer
