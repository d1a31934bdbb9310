"""Model configuration: Meta's `ModelArgs`, the Llama 3 presets, the arithmetic of
parameters and KV-cache memory, computed without allocating a single weight, and the
machine: bytes per dtype, GiB, and the device a new model or cache is built on."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

# Bytes per element for the dtypes a learner is likely to ask about.
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2,
               "fp16": 2, "int8": 1, "fp8": 1, "int4": 0.5}


@dataclass(frozen=True)
class ModelArgs:
    """The shape of a Llama 3 model. Field names follow Meta's `params.json`.

    Frozen: validated once, when made, and never changed after, so a preset or a model's
    `params` can be shared without copies. `args.replace(dim=512)` makes a changed copy."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None means n_heads (plain multi-head attention)
    vocab_size: int = 128256
    multiple_of: int = 256  # the SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False  # Llama 3.1 long-context scaling of RoPE frequencies
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    max_seq_len: int = 8192
    tie_word_embeddings: bool = False  # Llama 3.2 1B and 3B share input and output embeddings

    def __post_init__(self):
        self.validate()

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """Meta's SwiGLU hidden-size rule: 2/3 of 4*dim, times the multiplier, rounded up."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def validate(self) -> None:
        positive = ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} ({getattr(self, name)}) must be positive")
        if self.kv_heads <= 0:
            raise ValueError(f"n_kv_heads ({self.kv_heads}) must be positive")
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = dim / n_heads ({self.head_dim}) must be even for RoPE, "
                             "which rotates pairs of dimensions")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta ({self.rope_theta}) must be positive")

    def replace(self, **changes) -> "ModelArgs":
        """A copy with some fields changed (validated, as every new ModelArgs is)."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, params: dict) -> "ModelArgs":
        """Build from a dict such as Meta's `params.json`; unknown keys are ignored."""
        known = {k: v for k, v in params.items() if k in cls.__dataclass_fields__}
        return cls(**known)


_LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, norm_eps=1e-5, n_kv_heads=8)
PRESETS: dict[str, ModelArgs] = {
    "llama3-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, multiple_of=1024,
                           ffn_dim_multiplier=1.3, max_seq_len=8192, **_LLAMA3),
    "llama3-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, multiple_of=4096,
                            ffn_dim_multiplier=1.3, max_seq_len=8192, **_LLAMA3),
    "llama3.1-405b": ModelArgs(dim=16384, n_layers=126, n_heads=128, multiple_of=4096,
                               ffn_dim_multiplier=1.2, max_seq_len=131072, use_scaled_rope=True,
                               **_LLAMA3),
    "llama3.2-1b": ModelArgs(dim=2048, n_layers=16, n_heads=32, multiple_of=256,
                             ffn_dim_multiplier=1.5, max_seq_len=131072, use_scaled_rope=True,
                             rope_scaling_factor=32.0, tie_word_embeddings=True, **_LLAMA3),
    "llama3.2-3b": ModelArgs(dim=3072, n_layers=28, n_heads=24, multiple_of=256,
                             ffn_dim_multiplier=1.0, max_seq_len=131072, use_scaled_rope=True,
                             rope_scaling_factor=32.0, tie_word_embeddings=True, **_LLAMA3),
    # Small enough to train on a laptop CPU in minutes; same architecture.
    "tiny": ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=1280,
                      multiple_of=32, max_seq_len=512, rope_theta=500000.0),
}


def get_preset(name: str) -> ModelArgs:
    """A preset by name (frozen: `get_preset("tiny").replace(n_layers=2)` for a variant)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def param_counts(args: ModelArgs) -> dict[str, int]:
    """Parameters by module, computed from shapes alone (no weights allocated)."""
    kv_dim = args.kv_heads * args.head_dim
    attention = args.dim * args.dim * 2 + args.dim * kv_dim * 2  # wq, wo + wk, wv
    feed_forward = 3 * args.dim * args.hidden_dim  # w1, w2, w3
    norms = 2 * args.dim  # attention_norm, ffn_norm
    embedding = args.vocab_size * args.dim
    return {
        "tok_embeddings": embedding,
        "attention": attention * args.n_layers,
        "feed_forward": feed_forward * args.n_layers,
        "norms": norms * args.n_layers + args.dim,  # + the final norm
        "output": 0 if args.tie_word_embeddings else embedding,
    }


def num_params(args: ModelArgs) -> int:
    """Total parameter count; equals `sum(p.numel() for p in Transformer(args).parameters())`."""
    return sum(param_counts(args).values())


def dtype_bytes(dtype) -> float:
    name = str(dtype).replace("torch.", "")
    if name not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


def weight_bytes(args: ModelArgs, dtype="bfloat16") -> float:
    """Memory the weights take in a given dtype."""
    return num_params(args) * dtype_bytes(dtype)


def kv_cache_bytes(args: ModelArgs, seq_len: int, batch_size: int = 1, dtype="bfloat16",
                   n_kv_heads: int | None = None) -> float:
    """Memory of a KV cache: keys and values, every layer, every KV head, every position.

    `n_kv_heads` overrides the config's, to ask "what if this model used MHA (n_heads) or
    MQA (1)?"."""
    if seq_len < 0 or batch_size < 0:
        raise ValueError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be >= 0")
    kv_heads = args.kv_heads if n_kv_heads is None else n_kv_heads
    if kv_heads <= 0 or args.n_heads % kv_heads:
        raise ValueError(f"n_heads ({args.n_heads}) must be a multiple of n_kv_heads ({kv_heads})")
    per_token = 2 * args.n_layers * kv_heads * args.head_dim  # 2 = keys and values
    return per_token * seq_len * batch_size * dtype_bytes(dtype)


GiB = 1024 ** 3


def pick_device(device=None) -> torch.device:
    """The device to build something new on (a model, a cache, a trainer): the one asked
    for, else CUDA, then Apple MPS, then the CPU. A function given a model uses the model's
    device instead (see the package docstring)."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
