"""The course's own checkpoints: config.json (marked "format": "llama3-mini") and
model.safetensors, written atomically (`save_model`, `load_model`, `load_checkpoint`); a
training run's checkpoints and metrics (`save_checkpoint`, `latest_checkpoint`,
`read_metrics`).

The other formats live in their own modules: Hugging Face's names and config in hf_format.py
(its names are importable from here too, as are the shipped models' registry, pretrained.py,
and `load_pretrained`, for the notebooks that import them from here); Meta's and Hugging
Face's whole folders in hub.py; one loader for all of them, `llama3_mini.load`, in loader.py."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .config import ModelArgs, pick_device
from .hf_format import (  # noqa: F401  (re-exported for older imports: checkpoint.hf_name, ...)
    args_from_hf_config,
    from_hf_state_dict,
    hf_config,
    hf_config_dict,
    hf_name,
    hf_rope_scaling,
    our_name,
    permute_from_hf,
    permute_to_hf,
    to_hf_model,
    to_hf_state_dict,
)
from .pretrained import ASSETS, pretrained_models  # noqa: F401  (the registry, re-exported)

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


def _is_device(value) -> bool:
    try:
        return torch.device(value) is not None
    except (RuntimeError, TypeError):
        return False


def load_pretrained(name="story-model", device=None, folder=None):
    """One of the course's shipped models and its tokenizer: (model, tokenizer), through
    `llama3_mini.load`. `name` picks one (`pretrained_models()` lists them; "story-model",
    trained on the story corpus, is the default); `folder` loads any folder `load` reads
    instead. The model is in eval mode, on `device` (default: CUDA, then Apple MPS, then
    the CPU).

        model, tokenizer = load_pretrained()                      # the story model
        model, tokenizer = load_pretrained("byte-model", device="cpu")"""
    from .loader import load  # the one loader, above this module

    name = "story-model" if name is None else name
    if folder is None and device is None and name not in pretrained_models() \
            and _is_device(name):
        name, device = "story-model", name  # load_pretrained(device), the older call
    if folder is None and name not in pretrained_models():
        from .pretrained import pretrained_folder

        pretrained_folder(name)  # raises, naming the models there are
    return load(name if folder is None else folder, device=device)
