"""llama3_mini: the pieces of Llama 3, kept once the course's notebooks have built them.

Devices, one rule everywhere: a function given a model (generate, evaluate_bpb, finetune,
the widgets) works on the model's device and never moves it: place the model first, with
`model.to(pick_device())`; a `device=` such a function still accepts must name the model's
device, or it raises (`model.model_device`). Only something built new (a model, a cache,
a trainer) takes `device=`, and there `device=None` means the best device: CUDA, then
Apple MPS, then the CPU (`pick_device()`). Modes likewise: a function that switches a
model to eval or train mode gives it back in the mode it found
(`with llama3_mini.model.evaluating(m): ...`)."""
from .config import (
    PRESETS,
    ModelArgs,
    get_preset,
    kv_cache_bytes,
    num_params,
    param_counts,
    pick_device,
)
from .loader import load  # (model, tokenizer) from any source: a name, a folder, a Hub name
from .model import Transformer

__all__ = ["ModelArgs", "PRESETS", "get_preset", "num_params", "param_counts", "kv_cache_bytes",
           "Transformer", "pick_device", "load"]


def _version() -> str:
    """The installed distribution's version (pyproject.toml's), the one `llama3-mini
    --version` prints; "unknown" when the package runs from a folder never installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama3-mini")
    except PackageNotFoundError:
        return "unknown"


__version__ = _version()
