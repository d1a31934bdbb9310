"""Llama 3's 4D parallelism: ranks grouped in the order [TP, CP, PP, DP] ("The Llama 3 Herd
of Models", section 3.3.2, Figure 5), and the four composed on one model.

The order says which ranks sit closest: TP first, so consecutive ranks form a tensor-parallel
group (its all-reduces, two a block, run inside one server's NVLink), then context parallel,
then pipeline, and data parallel last, across the whole cluster (it communicates once a step).
The paper's example, 16 GPUs with every degree 2: GPU0 is [TP0, CP0, PP0, DP0], GPU1 is
[TP1, CP0, PP0, DP0] (same TP group as GPU0), GPU2 shares GPU0's CP group, GPU4 its PP group,
GPU8 its DP group: rank = tp + TP (cp + CP (pp + PP dp)), `Layout.coordinates`.

torch's DeviceMesh numbers the other way (its last dimension varies fastest), so the mesh
is built with the dimensions reversed, (dp_replicate, dp_shard, pp, cp, tp). DP is two:
dp_shard ranks split the parameters (FSDP, the paper's DP) and dp_replicate groups of them
keep whole copies (plain data parallelism, or HSDP with both)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from ..config import ModelArgs
from .fsdp import apply_fsdp
from .tensor import apply_tensor_parallel, check_tensor_parallel

MESH_DIMS = ("dp_replicate", "dp_shard", "pp", "cp", "tp")  # torch's order: tp varies fastest


@dataclass(frozen=True)
class Layout:
    """The degree of each dimension; their product is the number of ranks."""

    tp: int = 1
    cp: int = 1
    pp: int = 1
    dp_shard: int = 1
    dp_replicate: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.pp * self.dp_shard * self.dp_replicate

    @property
    def dp(self) -> int:
        return self.dp_shard * self.dp_replicate

    def check(self, world_size: int, args: ModelArgs | None = None,
              seq_len: int | None = None) -> None:
        """Raise, before any process-group work, if the degrees do not multiply to world_size
        or do not divide what they split: heads, KV heads, vocabulary and hidden units (tp),
        layers (pp), the sequence into 2 x cp chunks (cp)."""
        degrees = {"tp": self.tp, "cp": self.cp, "pp": self.pp, "dp_shard": self.dp_shard,
                   "dp_replicate": self.dp_replicate}
        for name, d in degrees.items():
            if d < 1:
                raise ValueError(f"--{name.replace('_', '-')} ({d}) must be at least 1")
        if self.world_size != world_size:
            raise ValueError(
                f"tp {self.tp} x cp {self.cp} x pp {self.pp} x dp_shard {self.dp_shard} x "
                f"dp_replicate {self.dp_replicate} = {self.world_size} ranks, but {world_size} "
                f"processes were started: choose degrees whose product is {world_size}")
        if args is not None:
            check_tensor_parallel(args, self.tp)
            if args.n_layers % self.pp:
                raise ValueError(f"pipeline parallel over {self.pp} stages: n_layers "
                                 f"({args.n_layers}) is not a multiple of {self.pp}; every "
                                 "stage takes an equal share of the blocks")
        if seq_len is not None and seq_len % (2 * self.cp):
            raise ValueError(f"context parallel over {self.cp} ranks cuts the sequence into "
                             f"{2 * self.cp} chunks: seq_len ({seq_len}) is not a multiple of "
                             f"{2 * self.cp}")

    def coordinates(self, rank: int) -> dict:
        """{tp, cp, pp, dp}: where `rank` sits, TP varying fastest, as the paper numbers GPUs.
        Layout(2, 2, 2, 2).coordinates(5) -> {"tp": 1, "cp": 0, "pp": 1, "dp": 0}."""
        coords = {}
        for name, size in (("tp", self.tp), ("cp", self.cp), ("pp", self.pp), ("dp", self.dp)):
            rank, coords[name] = divmod(rank, size)
        return coords

    def describe(self, rank: int) -> str:
        """The paper's notation: describe(1) -> "GPU1[TP1, CP0, PP0, DP0]"."""
        c = self.coordinates(rank)
        return f"GPU{rank}[TP{c['tp']}, CP{c['cp']}, PP{c['pp']}, DP{c['dp']}]"


def build_mesh(layout: Layout, device_type: str | None = None) -> DeviceMesh:
    """The process group's ranks as a 5-dimensional DeviceMesh named MESH_DIMS (the paper's
    [TP, CP, PP, DP] reversed, DP split into replicate and shard). `mesh["tp"]` is this rank's
    tensor-parallel group, and so on."""
    layout.check(dist.get_world_size())
    device_type = device_type or ("cuda" if dist.get_backend() == "nccl" else "cpu")
    return init_device_mesh(device_type, (layout.dp_replicate, layout.dp_shard, layout.pp,
                                          layout.cp, layout.tp), mesh_dim_names=MESH_DIMS)


def mesh_coordinates(mesh: DeviceMesh) -> dict:
    """This rank's {tp, cp, pp, dp} read from the mesh itself (dp = replicate x shard)."""
    c = dict(zip(MESH_DIMS, mesh.get_coordinate(), strict=True))
    return {"tp": c["tp"], "cp": c["cp"], "pp": c["pp"],
            "dp": c["dp_replicate"] * mesh["dp_shard"].size() + c["dp_shard"]}


def data_mesh(mesh: DeviceMesh) -> DeviceMesh | None:
    """The ranks that hold the same parameters and see different tokens, over which gradients
    are averaged: data parallel and context parallel together (a CP rank's loss is the mean
    over its own tokens). None when there is one."""
    shard = mesh["dp_shard", "cp"]._flatten("dp_shard_cp") if mesh["cp"].size() > 1 \
        else mesh["dp_shard"]
    if mesh["dp_replicate"].size() * shard.size() == 1:
        return None
    if mesh["dp_replicate"].size() == 1:
        return shard
    return mesh["dp_replicate", "dp_shard_cp" if mesh["cp"].size() > 1 else "dp_shard"]


def parallelize(model: nn.Module, mesh: DeviceMesh, mp_policy=None) -> nn.Module:
    """Apply the mesh's tensor and data parallelism to `model` (a Transformer, or a pipeline
    stage of one: pipeline.py cuts the stages first, then each is given to this) in place:
    TP inside mesh["tp"], then FSDP over the data ranks (HSDP when replicated too). Context
    parallelism changes the attention itself: context.py applies it."""
    if mesh["tp"].size() > 1:
        apply_tensor_parallel(model, mesh["tp"])
    if (dp := data_mesh(mesh)) is not None:
        apply_fsdp(model, dp, mp_policy=mp_policy)
    return model


def clip_grad_norm_(parameters, max_norm: float, pp_group=None) -> torch.Tensor:
    """Scale the gradients so that their global norm is at most max_norm; returns the norm
    before clipping, as torch.nn.utils.clip_grad_norm_ does (the same formula: scale by
    max_norm / (norm + 1e-6) when below 1). Unlike torch's, this takes a mixture of DTensors
    (sharded, the norm gathered) and plain tensors (replicated, as TP leaves the RMSNorm
    gains), and, given the pipeline group, adds up the squares over the stages."""
    grads = [p.grad for p in parameters if p.grad is not None]
    squares = torch.zeros((), dtype=torch.float32,
                          device=grads[0].device if grads else None)
    for g in grads:
        norm = torch.linalg.vector_norm(g, dtype=torch.float32)
        squares = squares + (norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2
    if pp_group is not None:
        dist.all_reduce(squares, group=pp_group)
    total = squares.sqrt()
    if math.isfinite(max_norm):
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(scale)
    return total
