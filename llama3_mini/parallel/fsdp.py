"""Fully sharded data parallelism (FSDP, ZeRO stage 3), the DP of Llama 3's 4D parallelism
("The Llama 3 Herd of Models", section 3.3.2), through torch's FSDP2 (`fully_shard`).

Every rank takes its own share of the batch, as in plain data parallelism, but keeps only
1/N of every parameter, of its gradient and of the optimizer's state. Before a block runs
(forward, then again in the backward) its parameters are all-gathered whole, and freed after;
after the backward each gradient is reduce-scattered, so each rank receives the average, over
the ranks, of its own 1/N. The communication per step: two all-gathers and one reduce-scatter
of the parameters, against plain data parallelism's one all-reduce (itself a reduce-scatter
plus an all-gather): 1.5 times the bytes for N times less memory (the ZeRO paper,
Rajbhandari et al. 2020, section 7)."""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from .tensor import blocks


def mixed_precision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) -> MixedPrecisionPolicy:
    """A policy: blocks compute with their parameters gathered in param_dtype (bf16) while the
    sharded masters and the optimizer stay float32, and gradients are reduced in reduce_dtype.
    Reducing in float32 keeps the sum of N ranks' bf16 gradients from losing their low bits."""
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)


def apply_fsdp(model: nn.Module, mesh: DeviceMesh | None = None,
               mp_policy: MixedPrecisionPolicy | None = None,
               reshard_after_forward: bool = True) -> nn.Module:
    """Shard `model` (a Transformer) in place over `mesh` (one dimension; by default every rank)
    and return it: one FSDP unit per block, so that only one block is gathered whole at a time,
    and one at the root for the embedding, the final norm and the output. Parameters become
    DTensors sharded along dim 0 (`p.to_local()` this rank's rows, `p.full_tensor()` all).
    reshard_after_forward=False keeps each block gathered between forward and backward
    (ZeRO-2's memory, one all-gather fewer). Works on a model already split by tensor
    parallelism: its DTensors are then sharded over both meshes (2D)."""
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for block in blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model
