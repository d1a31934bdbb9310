"""llama3_mini: the pieces of Llama 3, kept once the course's notebooks have built them."""
from .config import PRESETS, ModelArgs, get_preset, kv_cache_bytes, num_params, param_counts
from .model import Transformer, pick_device

__all__ = ["ModelArgs", "PRESETS", "get_preset", "num_params", "param_counts", "kv_cache_bytes",
           "Transformer", "pick_device"]


def _version() -> str:
    """The installed distribution's version (pyproject.toml's), the one `llama3-mini
    --version` prints; "unknown" when the package runs from a folder never installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama3-mini")
    except PackageNotFoundError:
        return "unknown"


__version__ = _version()
