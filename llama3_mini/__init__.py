"""llama3_mini: the pieces of Llama 3, kept once the course's notebooks have built them."""
from .config import PRESETS, ModelArgs, get_preset, kv_cache_bytes, num_params, param_counts
from .model import Transformer, pick_device

__all__ = ["ModelArgs", "PRESETS", "get_preset", "num_params", "param_counts", "kv_cache_bytes",
           "Transformer", "pick_device"]
__version__ = "0.1.0"
