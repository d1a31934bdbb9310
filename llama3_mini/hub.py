"""Real Llama 3 weights: Meta's folders and Hugging Face's, loaded into our `Transformer`.

Meta's format (`llama model download`): params.json (the shape, in `ModelArgs`' names),
consolidated.00.pth (the weights, in our names; .01, .02... when saved split over several
GPUs), tokenizer.model (tiktoken's `base64(bytes) rank` lines). Hugging Face's
(`huggingface-cli download meta-llama/...`): config.json, model.safetensors (renamed, q/k rows
permuted; big models split, with model.safetensors.index.json), tokenizer.json.

This module reads and writes those whole folders: Meta's (`save_meta`, `load_meta`; the
model-parallel layout is in meta_format.py), Hugging Face's (`load_hf`, `save_hf`,
`export_hf`), and tells them apart (`detect_format`); `llama3_mini.load` (loader.py) is the
one function that loads any of them, and `Llama.from_pretrained` wraps it. The pieces it
assembles live where they belong: the name mapping in hf_format.py, our own folders in
checkpoint.py, tokenizer.json in hf_tokenizer.py, tokenizer.model in tokenizer.py."""
from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import torch

from .checkpoint import FORMAT, is_our_config, model_weights
from .config import ModelArgs, pick_device
from .hf_format import args_from_hf_config, from_hf_state_dict, hf_config_dict, to_hf_state_dict
from .hf_tokenizer import CHAT_TEMPLATE, ranks_from_tokenizer_json, tokenizer_json
from .meta_format import (  # noqa: F401  (re-exported: hub.merge_meta_shards, ...)
    check_shardable,
    merge_meta_shards,
    meta_args,
    meta_params,
    shard_dim,
    split_meta_shards,
)
from .model import Transformer
from .rope import freqs_cis_for

META_WEIGHTS = "consolidated.*.pth"
HF_INDEX = "model.safetensors.index.json"


class UnsafeCheckpointError(ValueError):
    """A checkpoint whose pickle would run code or build objects other than tensors."""


def safe_torch_load(file, mmap: bool = True) -> dict:
    """`torch.load` that accepts tensors and plain containers only (`weights_only=True`),
    memory-mapped so a 2.5 GB file is read from disk as it is used, not copied up front."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(e).splitlines()]
        why = next((line for line in lines if "Unsupported global" in line),
                   next((line for line in lines if line), type(e).__name__))
        raise UnsafeCheckpointError(
            f"refused to load {file}: it is a pickle that asks to run code or build objects "
            f"other than tensors, so it was not unpickled ({why.split('. ')[0]}). Load weights "
            "only from sources you trust; prefer safetensors, which cannot carry code.") from None


# ----- Meta's format (its layout: meta_format.py) -----------------------------------------

def save_meta(model: Transformer, folder, n_shards: int = 1, tokenizer_model=None) -> Path:
    """Write a model in Meta's format: params.json, consolidated.NN.pth (each a rank's slices,
    output.weight included even when tied, as Meta's files hold it), tokenizer.model."""
    if n_shards > 1:
        check_shardable(model.params, n_shards)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(meta_params(model.params), indent=2))
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for i, shard in enumerate(split_meta_shards(sd, n_shards)):
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    if tokenizer_model is not None:
        (folder / "tokenizer.model").write_bytes(Path(tokenizer_model).read_bytes())
    return folder


def load_meta_state_dict(folder) -> tuple[ModelArgs, dict]:
    folder = Path(folder)
    files = sorted(folder.glob(META_WEIGHTS))
    if not (folder / "params.json").exists() or not files:
        raise FileNotFoundError(f"{folder} is not a Meta checkpoint: it needs params.json and "
                                f"{META_WEIGHTS}")
    params = json.loads((folder / "params.json").read_text())
    kv_heads = params.get("n_kv_heads") or params["n_heads"]
    if kv_heads % len(files):
        raise ValueError(f"{folder} has {len(files)} shards but n_kv_heads is {kv_heads}: "
                         "Meta's reference splits whole KV heads evenly over the shards "
                         "(llama/model.py line 96), so these cannot be merged by "
                         "concatenation; for Llama 3.1 405B use the mp8 folder")
    return params, merge_meta_shards([safe_torch_load(f) for f in files])


# ----- Hugging Face's format -------------------------------------------------------------------

def load_hf_state_dict(folder) -> tuple[dict, dict]:
    """config.json and every tensor of model.safetensors (or of the shards its index lists)."""
    from safetensors import safe_open

    folder = Path(folder)
    if (folder / HF_INDEX).exists():
        weight_map = json.loads((folder / HF_INDEX).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = ["model.safetensors"]
    if not (folder / "config.json").exists() or not (folder / files[0]).exists():
        raise FileNotFoundError(f"{folder} is not a Hugging Face checkpoint: it needs "
                                f"config.json and model.safetensors (or {HF_INDEX})")
    sd = {}
    for name in files:
        with safe_open(folder / name, framework="pt") as f:  # memory-mapped, no pickle
            sd.update({key: f.get_tensor(key) for key in f.keys()})
    return json.loads((folder / "config.json").read_text()), sd


# ----- both ------------------------------------------------------------------------------------

def check_state_dict(model: torch.nn.Module, state_dict: dict, source: str = "checkpoint"):
    """Every tensor the model needs is there, with the shape the config implies."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{source} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for name, want in expected.items():
        got = tuple(state_dict[name].shape)
        if got != tuple(want.shape):
            raise ValueError(f"{name}: the weights in {source} have shape {got} but the config "
                             f"implies {tuple(want.shape)}; the config does not describe these "
                             "weights (wrong params.json/config.json?)")


def build_model(args: ModelArgs, state_dict: dict, device=None, dtype=None,
                source: str = "checkpoint") -> Transformer:
    """Our `Transformer` holding exactly these tensors. The model is first built on the
    'meta' device (shapes, no memory) and the tensors are then assigned, not copied, so a
    memory-mapped checkpoint is never held twice."""
    device = pick_device(device)
    if args.tie_word_embeddings or "output.weight" not in state_dict:
        state_dict = dict(state_dict)
        state_dict["output.weight"] = state_dict.get("tok_embeddings.weight")
    with torch.device("meta"):
        model = Transformer(args)
    check_state_dict(model, state_dict, source)
    model.load_state_dict(state_dict, assign=True)
    if args.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.freqs_cis = freqs_cis_for(args)  # was built on 'meta' with the rest
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval()


def load_meta(folder, device=None, dtype=None, max_seq_len: int | None = 8192) -> Transformer:
    """Our `Transformer` from a Meta folder (params.json + consolidated.*.pth). Meta's files
    hold output.weight even for Llama 3.2, whose output shares the embedding's weights (Meta's
    model.py line 267 always builds `output`, and llama-models' generation.py line 139 loads
    strictly): an output equal to the embedding, or none, is tied to it, as Hugging Face's
    config for 3.2 says (tie_word_embeddings)."""
    params, sd = load_meta_state_dict(folder)
    args = meta_args(params, max_seq_len)
    out, emb = sd.get("output.weight"), sd["tok_embeddings.weight"]
    if out is None or (out.shape == emb.shape and torch.equal(out, emb)):
        args = args.replace(tie_word_embeddings=True)
    return build_model(args, sd, device, dtype, source=str(folder))


def load_hf(folder, device=None, dtype=None, max_seq_len: int | None = None) -> Transformer:
    """Our `Transformer` from a Hugging Face folder (config.json + safetensors)."""
    config, hf_sd = load_hf_state_dict(folder)
    args = args_from_hf_config(config)
    if max_seq_len is not None:
        args = args.replace(max_seq_len=max_seq_len)
    return build_model(args, from_hf_state_dict(hf_sd, args), device, dtype, source=str(folder))


def detect_format(folder) -> str:
    """'meta', 'hf' or 'llama3-mini' (the course's own), from what a folder holds: Meta's
    params.json; a config.json that says "model_type": "llama" (Hugging Face's) or carries
    the course's mark (`checkpoint.is_our_config`); or a training run's `latest`."""
    folder = Path(folder)
    if (folder / "params.json").exists() and any(folder.glob(META_WEIGHTS)):
        return "meta"
    if (folder / "config.json").exists():
        config = json.loads((folder / "config.json").read_text())
        if is_our_config(config):
            return FORMAT
        if config.get("model_type") == "llama":
            return "hf"
        raise ValueError(f"{folder}/config.json is neither a Hugging Face Llama config "
                         f"(model_type {config.get('model_type')!r}, not 'llama') nor a "
                         "llama3-mini checkpoint's (no 'model_args')")
    if (folder / "latest").exists():
        return FORMAT
    if (folder / "original" / "params.json").exists():
        return "meta"
    raise FileNotFoundError(f"{folder} holds neither a Meta checkpoint (params.json + "
                            f"{META_WEIGHTS}) nor a Hugging Face one (config.json + "
                            "model.safetensors) nor a llama3-mini one")


def find_tokenizer(folder) -> Path | None:
    """tokenizer.model (Meta's) in the folder or its original/, else tokenizer.json, else None."""
    folder = Path(folder)
    for candidate in ("tokenizer.model", "original/tokenizer.model", "tokenizer.json"):
        if (folder / candidate).exists():
            return folder / candidate
    return None


def load_tokenizer(folder):
    """Our `Tokenizer` for a checkpoint folder, or None when the folder has none."""
    path = find_tokenizer(folder)
    if path is None:
        return None
    from .tokenizer import Tokenizer

    if path.suffix == ".model":
        return Tokenizer.load(path)
    ranks, _ = ranks_from_tokenizer_json(path)
    return Tokenizer(ranks)


def resolve(path_or_repo) -> Path:
    """A local folder as is; a Hub name (`meta-llama/Llama-3.2-1B-Instruct`) downloaded
    through huggingface_hub when it is installed and a network is there (optional)."""
    folder = Path(os.path.expanduser(str(path_or_repo)))
    if folder.exists():
        return folder
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"no folder {folder}; pass the folder holding the weights") \
            from None
    try:
        return Path(snapshot_download(str(path_or_repo), allow_patterns=[
            "*.json", "*.safetensors", "original/tokenizer.model"]))
    except Exception as e:  # offline, gated, or not a repo name
        raise FileNotFoundError(
            f"no folder {folder}, and downloading {path_or_repo!r} from the Hugging Face Hub "
            f"failed ({type(e).__name__}). Download the weights yourself (see notebook 09) "
            "and pass their folder.") from None


def save_hf(model: Transformer, folder, tokenizer=None, dtype=None) -> Path:
    """Write a model (and its tokenizer) as a Hugging Face folder: config.json,
    generation_config.json, model.safetensors in Hugging Face's names (q/k rows permuted),
    and tokenizer.json + tokenizer_config.json with the special tokens and the chat template.
    `LlamaForCausalLM.from_pretrained(folder)` and `AutoTokenizer.from_pretrained(folder)`
    load it; dtype (default: the model's) is the dtype the weights are stored in."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = dtype or next(model.parameters()).dtype
    state = to_hf_state_dict(model_weights(model, dtype), model.params)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    config = hf_config_dict(model.params, tokenizer, dtype)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is None:
        return folder
    stops = sorted(tokenizer.stop_tokens)  # Llama 3.1's: end of text, of message, of turn
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tokenizer.bos_id, "eos_token_id": stops}, indent=2))
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json(tokenizer),
                                                      ensure_ascii=False), encoding="utf-8")
    added = {str(i): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True}
             for name, i in tokenizer.special_tokens.items()}
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": added, "bos_token": "<|begin_of_text|>",
         "eos_token": "<|end_of_text|>", "chat_template": CHAT_TEMPLATE,
         "clean_up_tokenization_spaces": False,  # decode gives the text back, spaces and all
         "model_input_names": ["input_ids", "attention_mask"],
         "model_max_length": model.params.max_seq_len,
         "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2, ensure_ascii=False))
    return folder


def export_hf(checkpoint, out_dir, dtype=None) -> Path:
    """A course checkpoint (or a training run's folder: its newest checkpoint) -> a Hugging
    Face folder (`save_hf`); what `llama3-mini export CHECKPOINT OUT_DIR` does. dtype: a torch
    dtype or its name ("float32", "bfloat16", "float16")."""
    if isinstance(dtype, str):
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype {dtype} is not for a Hugging Face folder: float32, bfloat16 "
                             "or float16 (the GGUF types are for --format gguf)")
        dtype = getattr(torch, dtype)
    from .loader import load  # any source: a course checkpoint, Meta's folder, a name...

    model, tokenizer = load(checkpoint, device="cpu")
    return save_hf(model, out_dir, tokenizer, dtype)


class Llama:
    """A model and its tokenizer, loaded from either format: `Llama.from_pretrained(path)`."""

    def __init__(self, model: Transformer, tokenizer=None, source: str = ""):
        self.model, self.tokenizer, self.source = model, tokenizer, source

    @classmethod
    def from_pretrained(cls, path_or_repo, device=None, dtype=None,
                        max_seq_len: int | None = 8192) -> "Llama":
        """`llama3_mini.load` wrapped with its source: a folder in Meta's, Hugging Face's or
        the course's own format (see `detect_format`), a shipped model's name, a Hub name.
        max_seq_len bounds the RoPE table and the cache; Llama 3.2 allows 131072."""
        from .loader import load, locate  # the one loader (it reads this module's formats)

        fmt, folder = locate(path_or_repo)
        model, tokenizer = load(folder, device, dtype, max_seq_len)
        return cls(model, tokenizer, source=f"{fmt}:{folder}")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def chat(self, dialog: list[dict], max_new_tokens: int = 64, **sampling) -> str:
        """The assistant's reply to a dialog ([{"role": "user", "content": ...}, ...]),
        formatted with Llama 3's chat template, generation stopping at <|eot_id|>."""
        from .generate import generate
        from .tokenizer import ChatFormat

        if self.tokenizer is None:
            raise ValueError(f"{self.source} has no tokenizer.model or tokenizer.json; "
                             "chat needs one")
        prompt = ChatFormat(self.tokenizer).encode_dialog_prompt(dialog)
        out = generate(self.model, [prompt], max_new_tokens,
                       stop_tokens=tuple(self.tokenizer.stop_tokens), **sampling)[0]
        stops = set(self.tokenizer.stop_tokens)
        return self.tokenizer.decode([t for t in out if t not in stops])
