"""Pipeline parallelism: the model's blocks cut into stages, one stage (or several) a rank,
and a batch cut into micro-batches that flow through the stages, on torch's own engine
(`torch.distributed.pipelining`).

A rank holds only its stage's weights, so a model too big for one device fits on p of them;
the price is the bubble: while the first micro-batch walks down the pipe the last stages
wait, and while its gradient walks back up the first ones do. With p stages and m
micro-batches of equal cost a stage is idle a fraction (p - 1) / (m + p - 1) of the step
(`bubble_fraction`). GPipe runs every forward, then every backward (m activations alive at
once); 1F1B starts each micro-batch's backward as soon as it can (at most p alive, the same
bubble); the interleaved 1F1B gives each rank v stages spread along the model (rank r holds
stages r, r + p, ...), which divides the bubble by v for v times the messages. Llama 3 used
an interleaved schedule ("The Llama 3 Herd of Models", section 3.3.2).

The schedule divides each gradient by m (`scale_grads`), so with a loss that is a mean over
each micro-batch's tokens the gradients are those of the whole batch's mean, as one process
computes them: tests/test_parallel_pipeline.py checks it.

    stages = pipeline_stages(model, pp_group)                  # this rank's part
    schedule = pipeline_schedule(stages, n_microbatches=4, loss_fn=lm_loss, kind="1f1b")
    losses = []
    loss, logits = pipeline_step(schedule, stages, tokens, targets)  # on the last stage
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

from ..model import Transformer, causal_mask

SCHEDULES = ("gpipe", "1f1b", "interleaved")


def split_layers(n_layers: int, n_stages: int) -> list[range]:
    """The layers each stage runs, as even as they go, the first stages one longer when the
    count does not divide: split_layers(5, 2) -> [range(0, 3), range(3, 5)]."""
    if n_stages < 1 or n_stages > n_layers:
        raise ValueError(f"cannot cut {n_layers} layers into {n_stages} pipeline stages: each "
                         f"stage needs at least one layer (use at most {n_layers} stages)")
    base, extra = divmod(n_layers, n_stages)
    bounds, start = [], 0
    for s in range(n_stages):
        stop = start + base + (1 if s < extra else 0)
        bounds.append(range(start, stop))
        start = stop
    return bounds


def bubble_fraction(n_stages: int, n_microbatches: int, stages_per_rank: int = 1) -> float:
    """The fraction of a step a stage sits idle when every micro-batch costs the same:
    (p - 1) / (v m + p - 1); v = 1 for GPipe and 1F1B. bubble_fraction(4, 4) -> 3/7."""
    p, m, v = n_stages, n_microbatches, stages_per_rank
    return (p - 1) / (v * m + p - 1)


class StageModule(nn.Module):
    """The part of a `Transformer` one pipeline stage runs: the embedding if it is the first
    stage, its own blocks, the final norm and output if it is the last. It shares the
    model's modules (no copy), and its parameter names are the model's own
    ("layers.3.attention.wq.weight"), so a state dict or a gradient maps one to one.

    forward: tokens (batch, seq) on the first stage, else the hidden states (batch, seq,
    dim) the previous stage sent -> hidden states, or float32 logits on the last stage."""

    def __init__(self, model: Transformer, layer_ids: range, first: bool, last: bool):
        super().__init__()
        self.tok_embeddings = model.tok_embeddings if first else None
        # A ModuleDict keyed by the layer's own index keeps the names "layers.<i>...".
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        self.norm = model.norm if last else None
        self.output = model.output if last else None
        self.freqs_cis = model.freqs_cis  # not a parameter: every stage needs the angles

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        seqlen = h.shape[1]
        if self.freqs_cis.device != h.device:
            self.freqs_cis = self.freqs_cis.to(h.device)
        mask = causal_mask(seqlen, device=h.device).to(h.dtype) if seqlen > 1 else None
        for layer in self.layers.values():
            h = layer(h, self.freqs_cis[:seqlen], mask)  # (batch, seq, dim)
        if self.output is not None:
            return self.output(self.norm(h)).float()  # (batch, seq, vocab)
        return h


def stage_ids(pp_rank: int, pp_size: int, stages_per_rank: int = 1) -> list[int]:
    """The stages a rank holds, looped as the interleaved schedule wants them: rank r holds
    r, r + p, r + 2p, ... stage_ids(1, 2, stages_per_rank=2) -> [1, 3]."""
    return [pp_rank + k * pp_size for k in range(stages_per_rank)]


def pipeline_stages(model: Transformer, pp_group: dist.ProcessGroup | None = None,
                    stages_per_rank: int = 1, device=None) -> list:
    """This rank's pipeline stages (torch's `PipelineStage`) of `model`, cut into
    pp_size * stages_per_rank stages of consecutive blocks (`split_layers`).

    pp_group: the ranks of one pipeline (default: the whole world); device: where the stage
    runs (default: the model's). The model is not copied: each stage's module shares its
    blocks, and an optimizer over `[p for s in stages for p in s.submod.parameters()]`
    updates this rank's part. The other blocks stay in `model` untouched; build the model on
    the meta device first if they must not take memory."""
    pp_size = dist.get_world_size(pp_group)
    pp_rank = dist.get_rank(pp_group)
    n_stages = pp_size * stages_per_rank
    if model.params.tie_word_embeddings and n_stages > 1:
        raise ValueError("this model ties its output to its embedding (tie_word_embeddings), "
                         "but pipeline stages put them on different ranks: untie them "
                         "(ModelArgs.replace(tie_word_embeddings=False)) or use pp 1")
    cuts = split_layers(model.params.n_layers, n_stages)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    stages = []
    for s in stage_ids(pp_rank, pp_size, stages_per_rank):
        module = StageModule(model, cuts[s], first=s == 0, last=s == n_stages - 1)
        stages.append(PipelineStage(module, s, n_stages, device, group=pp_group))
    return stages


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of one micro-batch: logits (batch, seq, vocab),
    targets (batch, seq)."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def pipeline_schedule(stages: list, n_microbatches: int, loss_fn=lm_loss, kind: str = "1f1b"):
    """torch's schedule of the given name over this rank's stages: "gpipe" (ScheduleGPipe),
    "1f1b" (Schedule1F1B), both one stage a rank, or "interleaved"
    (ScheduleInterleaved1F1B, several stages a rank, as `pipeline_stages(...,
    stages_per_rank=v)` builds them). The batch given to `step` must divide into
    n_microbatches equal parts."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {kind!r}: use one of {SCHEDULES}")
    if kind == "interleaved":
        return ScheduleInterleaved1F1B(stages, n_microbatches, loss_fn=loss_fn)
    if len(stages) != 1:
        raise ValueError(f"the {kind} schedule runs one stage a rank, not {len(stages)}: use "
                         "kind='interleaved' for several, or pipeline_stages(stages_per_rank=1)")
    if kind == "gpipe":
        return ScheduleGPipe(stages[0], n_microbatches, loss_fn=loss_fn)
    return Schedule1F1B(stages[0], n_microbatches, loss_fn=loss_fn)


def pipeline_step(schedule, stages: list, tokens: torch.Tensor, targets: torch.Tensor):
    """One forward and backward of the batch through the pipeline. Every rank passes the
    same tokens and targets (only the first stage reads the tokens, only the last the
    targets). Returns (loss, logits) on the rank that holds the last stage: the batch's mean
    loss (the mean of the micro-batches' losses) and the logits (batch, seq, vocab) put
    back together; (None, None) on the others. Gradients land in each stage's parameters,
    already divided by the micro-batch count."""
    first = any(s.is_first for s in stages)
    last = any(s.is_last for s in stages)
    losses: list[torch.Tensor] = []
    args = (tokens,) if first else ()
    logits = schedule.step(*args, target=targets if last else None,
                           losses=losses if last else None)
    if not last:
        return None, None
    return torch.stack(losses).mean().detach(), logits
