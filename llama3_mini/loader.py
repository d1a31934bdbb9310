"""One loader: `llama3_mini.load(source)` -> (model, tokenizer), whatever the source is.

Every way into a model goes through `load`: the command line (generate, chat, serve,
export), chat.py, the server, the GGUF export, `hub.Llama.from_pretrained`, and the notebooks'
`load_pretrained`. The formats themselves are read where they live: the course's own folders
in checkpoint.py, Meta's and Hugging Face's folders in hub.py (Meta's shards in
meta_format.py, Hugging Face's names in hf_format.py), the shipped models' registry in
pretrained.py."""
from __future__ import annotations

import re
from pathlib import Path

from .pretrained import DEFAULT_MODEL, pretrained_folder, pretrained_models

HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name: "meta-llama/Llama-3.2-1B"
META_MAX_SEQ_LEN = 8192  # Meta's params.json has no context length; Llama 3.x allow more


def load(source=None, device=None, dtype=None, max_seq_len: int | None = None):
    """(model in eval mode, tokenizer) from any source the course knows:

    - the name of a shipped model ("story-model", the default, "qa-full", ...:
      `pretrained.pretrained_models()` lists them);
    - a course checkpoint folder (`save_model`, `llama3-mini train`), or a training run's
      folder (then its newest checkpoint);
    - Meta's folder (params.json, consolidated.*.pth, tokenizer.model), also as the
      original/ of a Hugging Face download;
    - Hugging Face's folder (config.json, model.safetensors, tokenizer.json);
    - a Hugging Face Hub name ("meta-llama/Llama-3.2-1B-Instruct"), downloaded when
      huggingface_hub and a network are there.

    The tokenizer is None for a Meta or Hugging Face folder without one. device: default
    CUDA, then Apple MPS, then the CPU. dtype: the weights' (default: as stored; float32 for
    the course's). max_seq_len bounds the RoPE table and the cache of Meta's and Hugging
    Face's models (default: 8192 for Meta's, the config's for Hugging Face's).

        model, tokenizer = load()                       # the story model
        model, tokenizer = load("runs/my-run", device="cpu")
        model, tokenizer = load("~/.llama/checkpoints/Llama3.2-1B-Instruct")"""
    import torch

    from . import hub
    from .checkpoint import FORMAT, load_checkpoint

    fmt, folder = locate(source)
    if fmt == FORMAT:
        model, tokenizer, _ = load_checkpoint(folder, device, dtype or torch.float32)
        return model, tokenizer
    if fmt == "meta":
        weights = folder if (folder / "params.json").exists() else folder / "original"
        model = hub.load_meta(weights, device, dtype, max_seq_len or META_MAX_SEQ_LEN)
    else:
        model = hub.load_hf(folder, device, dtype, max_seq_len)
    return model, hub.load_tokenizer(folder)


def locate(source=None) -> tuple[str, Path]:
    """(format, folder) of a source `load` takes: the format is "llama3-mini" (the course's
    own), "meta" or "hf" (hub.detect_format); the folder a shipped model's, a local one, or a
    Hub download."""
    from . import hub

    source = DEFAULT_MODEL if source is None else source
    path = Path(source).expanduser()
    if not path.exists():
        if str(source) in pretrained_models():
            folder = pretrained_folder(str(source))
            return hub.detect_format(folder), folder
        if not (isinstance(source, str) and HUB_NAME.fullmatch(source)):
            names = ", ".join(pretrained_models()) or "none: `make assets` makes them"
            raise FileNotFoundError(
                f"no checkpoint folder {path} and no pretrained model {str(source)!r}: the "
                f"available models are: {names}. Pass a checkpoint or training run's folder, "
                "Meta's or Hugging Face's folder, or a shipped model's name")
    folder = hub.resolve(path if path.exists() else source)  # else a Hub name, downloaded
    return hub.detect_format(folder), folder
