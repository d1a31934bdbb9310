"""Meta's checkpoint format, as Meta's own reference code makes it: the fields of params.json
and the dimension along which model parallelism splits each tensor into consolidated.NN.pth.
hub.py reads and writes the folders with these."""
from __future__ import annotations

import torch

from .config import ModelArgs

# Meta's Llama 3 reference (meta-llama/llama3, llama/model.py) builds its layers from fairscale's
# model-parallel ones; each rank saves its slices as consolidated.<rank>.pth. Column-parallel,
# split along dim 0: wq, wk, wv (lines 100-120), w1, w3 (208, 214), output (267). Row-parallel,
# dim 1: wo (121), w2 (211). tok_embeddings is a VocabParallelEmbedding (258): the vocabulary is
# split, dim 0 (Llama 2's ParallelEmbedding split dim 1). RMSNorms (236-237, 266): whole on every
# rank. Meta's resharding code agrees (meta-llama/llama-models, models/checkpoint.py 71-96).

def shard_dim(name: str) -> int | None:
    """The dimension along which Meta's model-parallel checkpoints split a tensor: 0 for the
    column-parallel layers and the vocab-parallel embedding, 1 for the row-parallel wo and w2,
    None for the norms (replicated). `shard_dim("tok_embeddings.weight") -> 0`,
    `shard_dim("layers.3.attention.wo.weight") -> 1`, `shard_dim("norm.weight") -> None`."""
    if name.endswith("norm.weight"):
        return None
    return 1 if name.endswith(("wo.weight", "w2.weight")) else 0


def merge_meta_shards(shards: list[dict]) -> dict:
    """Model-parallel shards (consolidated.00.pth, .01, ...) -> one state dict: each tensor's
    pieces concatenated along `shard_dim`, norms taken once (from shard 0)."""
    merged = {}
    for name, first in shards[0].items():
        if name == "rope.freqs":  # a buffer Llama 2 checkpoints carry; we recompute it
            continue
        dim = shard_dim(name)
        merged[name] = first if dim is None or len(shards) == 1 else \
            torch.cat([s[name] for s in shards], dim=dim)
    return merged


def check_shardable(args: ModelArgs, n_shards: int) -> None:
    """Meta's reference gives each rank n_heads // n_shards query heads and n_kv_heads //
    n_shards KV heads (llama/model.py lines 94-97), and an equal share of the vocabulary and
    the SwiGLU hidden size. Llama 3 70B on 8 shards: 8 query heads and 1 KV head a rank."""
    sizes = {"n_heads": args.n_heads, "n_kv_heads": args.kv_heads,
             "vocab_size": args.vocab_size, "hidden_dim": args.hidden_dim}
    for field, size in sizes.items():
        if size % n_shards:
            raise ValueError(f"{field} ({size}) is not a multiple of {n_shards} shards: Meta's "
                             "model parallelism gives every rank an equal share of it (whole "
                             "KV heads, at least one each); choose a number of shards that "
                             "divides it")


def split_meta_shards(state_dict: dict, n_shards: int) -> list[dict]:
    """One state dict -> n model-parallel shards, as Meta's reference saves a model run on n
    GPUs (the inverse of `merge_meta_shards`)."""
    shards = [{} for _ in range(n_shards)]
    for name, w in state_dict.items():
        dim = shard_dim(name)
        if dim is not None and w.shape[dim] % n_shards:
            raise ValueError(f"{name} of shape {tuple(w.shape)} cannot be split into {n_shards} "
                             f"equal shards along dim {dim}")
        parts = [w] * n_shards if dim is None else w.chunk(n_shards, dim=dim)
        for shard, part in zip(shards, parts, strict=True):
            shard[name] = part.clone()
    return shards


# Meta's params.json fields (llama/model.py 19-29; use_scaled_rope from 3.1, llama-models
# args.py 49). Not max_seq_len: Meta's loader passes it itself (generation.py 98-102).
META_PARAMS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
               "ffn_dim_multiplier", "norm_eps", "rope_theta", "use_scaled_rope")
ROPE_SCALING = ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                "rope_original_max_seq_len")


def meta_params(args: ModelArgs) -> dict:
    """params.json for a model: Meta's fields; and, for a scaled RoPE that differs from what
    `meta_args` would assume, the scaling's own fields (llama-models ignores unknown keys)."""
    params = {k: getattr(args, k) for k in META_PARAMS if getattr(args, k) is not None}
    if not args.use_scaled_rope:
        params.pop("use_scaled_rope")
    else:
        assumed = meta_args(params)
        params.update({k: getattr(args, k) for k in ROPE_SCALING
                       if getattr(args, k) != getattr(assumed, k)})
    return params


def meta_args(params: dict, max_seq_len: int | None = None) -> ModelArgs:
    """`ModelArgs` from Meta's params.json. Llama 3.1 and 3.2 say `use_scaled_rope` but not
    by how much: like Hugging Face's converter, take 32 for the 3.2 1B and 3B (dim 2048,
    3072) and 8 otherwise, unless params.json gives `rope_scaling_factor`. (32 is the
    `rope_scaling.factor` of the config.json Meta publishes with the 3.2 1B and 3B; Meta's
    reference hard-codes 8, llama-models model.py line 47, and a reply in llama-models issue
    #166 says it should be 32 as that file documents; #241 is a user's report of the 8's
    effect past about 80K tokens.)"""
    params = dict(params)
    if params.get("use_scaled_rope") and "rope_scaling_factor" not in params:
        params["rope_scaling_factor"] = 32.0 if params.get("dim") in (2048, 3072) else 8.0
    if max_seq_len is not None:
        params["max_seq_len"] = max_seq_len
    return ModelArgs.from_dict(params)
