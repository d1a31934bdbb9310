"""Tensor parallelism: every block's matrices split across the ranks of a group, Megatron's
way, through torch's DTensor (`parallelize_module`), in the very layout Meta's model-parallel
checkpoints are cut (meta_format.py, notebook 09; Meta's reference builds its layers from
fairscale's ColumnParallelLinear, RowParallelLinear and VocabParallelEmbedding).

- wq, wk, wv and w1, w3: column-wise (the output features split, weight dim 0). Each rank
  computes its own query heads, its own KV heads and its own slice of SwiGLU's hidden units
  from the whole input: no communication.
- wo and w2: row-wise (the input features split, weight dim 1). Each rank multiplies its own
  heads' (or hidden units') slice; the partial sums are all-reduced: one all-reduce after
  attention and one after the feed-forward, in the forward pass (and two in the backward).
- tok_embeddings: the vocabulary split (dim 0, as VocabParallelEmbedding): a rank looks up the
  tokens it holds, zeros for the others, and an all-reduce completes every row.
- output: column-wise, the vocabulary split; the logits are all-gathered.
- the RMSNorm gains: whole on every rank.

Grouped-query attention splits whole KV heads: with n_kv_heads 2 on 2 ranks each rank holds one
KV head and the n_heads / 2 query heads that share it, so each rank's attention module runs
with the local counts (`n_heads // tp`, `n_kv_heads // tp`)."""
from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from ..config import ModelArgs


def check_tensor_parallel(args: ModelArgs, tp: int) -> None:
    """Raise if `tp` ranks cannot each take an equal, whole share: query heads, KV heads (at
    least one each), the vocabulary and SwiGLU's hidden units must all divide by tp.
    Llama 3 70B (64 heads, 8 KV heads) on 8 ranks: 8 query heads and 1 KV head a rank."""
    if tp < 1:
        raise ValueError(f"the tensor-parallel degree ({tp}) must be at least 1")
    sizes = {"n_heads": args.n_heads, "n_kv_heads": args.kv_heads,
             "vocab_size": args.vocab_size, "hidden_dim": args.hidden_dim}
    for field, size in sizes.items():
        if size % tp:
            raise ValueError(f"tensor parallel over {tp} ranks: {field} ({size}) is not a "
                             f"multiple of {tp}, and every rank needs an equal share of whole "
                             f"{'heads' if 'heads' in field else 'rows'}; choose a degree that "
                             f"divides it (n_heads {args.n_heads}, n_kv_heads {args.kv_heads}, "
                             f"vocab_size {args.vocab_size}, hidden_dim {args.hidden_dim})")


def blocks(model: nn.Module) -> list[nn.Module]:
    """The TransformerBlocks of a model, or of a pipeline stage (whose layers are a ModuleDict
    keyed by their index in the whole model)."""
    layers = model.layers
    return list(layers.values()) if isinstance(layers, nn.ModuleDict) else list(layers)


def block_plan() -> dict:
    """The plan for one TransformerBlock: module name -> how parallelize_module splits it."""
    return {"attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(), "attention.wo": RowwiseParallel(),
            "feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel()}


def apply_tensor_parallel(model: nn.Module, mesh: DeviceMesh | None = None) -> nn.Module:
    """Split `model` (a Transformer) in place over the ranks of `mesh` (one dimension; by
    default every rank of the process group) and return it. Its parameters become DTensors
    holding each rank's shard (`p.to_local()`; `p.full_tensor()` gathers the whole); its
    forward takes the whole batch on every rank and returns the whole logits."""
    if mesh is None:
        import torch.distributed as dist
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    tp = mesh.size()
    if hasattr(model, "params"):  # a pipeline stage is checked with its whole model's args
        check_tensor_parallel(model.params, tp)
    # A pipeline stage (pipeline.StageModule) may lack the embedding or the output.
    embedding, output = getattr(model, "tok_embeddings", None), getattr(model, "output", None)
    tied = embedding is not None and output is not None and output.weight is embedding.weight
    # The vocabulary: the embedding row-wise (its weight is (vocab, dim), so its rows are the
    # vocabulary), the output column-wise, the logits gathered whole on every rank.
    plan = {}
    if embedding is not None:
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate())
    if output is not None:
        plan["output"] = ColwiseParallel(output_layouts=Replicate())
    parallelize_module(model, mesh, plan)
    if tied:  # Llama 3.2 1B, 3B: one (vocab, dim) matrix, split the same way for both uses
        model.output.weight = model.tok_embeddings.weight
    for block in blocks(model):
        parallelize_module(block, mesh, block_plan())
        block.attention.n_heads //= tp  # this rank's heads: the views in Attention.forward
        block.attention.n_kv_heads //= tp
    return model
