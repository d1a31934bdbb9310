"""`llama3-mini train` on the 4D mesh: the course's Trainer (schedule, budget, evaluation,
metrics, all unchanged) with its model split by tensor, context and fully sharded data
parallelism instead of wrapped in DDP, and checkpoints through torch.distributed.checkpoint
(DCP), so that a run saved under one layout resumes under another.

    torchrun --nproc_per_node=2 -m llama3_mini.cli train --tp 2 --steps 300

Each checkpoint step_NNNNNN is the course's own folder (whole weights, config.json, state.pt:
`load_checkpoint`, `generate` and `export` read it as any other), and beside it
sharded/step_NNNNNN holds every rank's shard of the weights and of AdamW's state, written by
all ranks at once. DCP records where each piece of each tensor sits, so a different layout
reads back the pieces it needs: saved with --tp 2, resumed with --dp-shard 2."""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..checkpoint import (
    latest_checkpoint,
    load_training_state,
    read_metrics,
    remove_unfinished,
    save_checkpoint,
)
from ..config import pick_device
from ..data import batch_at
from ..train import Trainer, make_optimizer
from .context import context_parallel_forward
from .mesh import Layout, build_mesh, clip_grad_norm_, mesh_coordinates, parallelize
from .pipeline import lm_loss, pipeline_schedule, pipeline_stages, pipeline_step

DEGREES = ("tp", "cp", "pp", "dp_shard")


def layout_from_flags(world_size: int, tp: int = 1, cp: int = 1, pp: int = 1,
                      dp_shard: int = 1) -> Layout:
    """The layout the command's flags ask for: the ranks left over make data-parallel replicas
    (dp_replicate = world_size / (tp cp pp dp_shard)), as plain DDP does without flags."""
    per_replica = tp * cp * pp * dp_shard
    if per_replica < 1 or world_size % per_replica:
        raise ValueError(f"--tp {tp} x --cp {cp} x --pp {pp} x --dp-shard {dp_shard} = "
                         f"{per_replica} ranks a model copy, which does not divide the "
                         f"{world_size} processes started: start a multiple of {per_replica} "
                         f"(torchrun --nproc_per_node={per_replica} ...) or change the degrees")
    return Layout(tp=tp, cp=cp, pp=pp, dp_shard=dp_shard, dp_replicate=world_size // per_replica)


def make_trainer(args, model, data, cfg, **kwargs) -> Trainer:
    """The command's trainer: the plain Trainer (DDP under torchrun) without degree flags,
    else a ParallelTrainer over the layout they give."""
    degrees = {k: getattr(args, k, 1) for k in DEGREES}
    if all(d == 1 for d in degrees.values()):
        return Trainer(model, data, cfg, **kwargs)
    layout = layout_from_flags(int(os.environ.get("WORLD_SIZE", "1")), **degrees)
    return ParallelTrainer(model, data, cfg, layout, **kwargs)


class _WholeWeights:
    """What save_checkpoint reads of a model (its args and state dict), here the gathered
    whole tensors of a split one."""

    def __init__(self, params, state):
        self.params, self._state = params, state

    def state_dict(self):
        return self._state


class _StageRelay(nn.Module):
    """One pipeline stage seen as a whole model, for evaluation: receives the previous
    stage's hidden states (batch, seq, dim), runs its blocks, sends them to the next one.
    The last stage returns the logits; the others zeros of their shape (their loss is
    thrown away: the last stage's is broadcast)."""

    def __init__(self, stage: nn.Module, group, params):
        super().__init__()
        self.stage, self.group, self.params = stage, group, params
        self.pp_rank, self.pp = dist.get_rank(group), dist.get_world_size(group)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = tokens
        if self.pp_rank > 0:
            h = torch.empty(*tokens.shape, self.params.dim, device=tokens.device)
            dist.recv(h, group=self.group, group_src=self.pp_rank - 1)
        h = self.stage(h)
        if self.pp_rank == self.pp - 1:
            return h
        dist.send(h.float().contiguous(), group=self.group, group_dst=self.pp_rank + 1)
        return torch.zeros(*tokens.shape, self.params.vocab_size, device=tokens.device)


class ParallelTrainer(Trainer):
    """A Trainer whose model is split over `layout` (mesh.py's Layout) across the processes
    torchrun started. Each data-parallel rank takes its share of every global batch (the
    TP, CP ranks of a model copy take the same share); the loss, the bits per byte and the
    gradient norm are those of the whole batch, as in one process."""

    def __init__(self, model, data, cfg, layout: Layout, out_dir=None, tokenizer_path=None,
                 device=None, resume: bool = True, clock=None):
        if cfg.steps is None and cfg.max_minutes is None:
            raise ValueError("give steps, max_minutes or both: the run needs an end")
        # every check before the process group starts: a wrong layout is named at once
        layout.check(int(os.environ.get("WORLD_SIZE", "1")), model.params,
                     cfg.seq_len if layout.cp > 1 else None)
        if layout.pp > 1 and (layout.cp > 1 or cfg.document_mask):
            raise ValueError("--pp runs with neither --cp nor the document mask here (a "
                             "pipeline stage calls its blocks without them): drop one")
        # a pipeline's micro-batches are its grad_accum: at least one a stage
        self.micro = max(cfg.grad_accum, layout.pp) if layout.pp > 1 else cfg.grad_accum
        per_rank = cfg.batch_size // layout.dp
        if cfg.batch_size % layout.dp or per_rank % self.micro:
            raise ValueError(f"batch_size ({cfg.batch_size}) must split evenly over "
                             f"{layout.dp} data-parallel ranks x {self.micro} micro-batches "
                             "(grad_accum, at least --pp)")
        if cfg.document_mask and (data.doc_starts is None or data.val_doc_ids is None):
            raise ValueError("document_mask needs the documents' bounds: TokenData.doc_starts "
                             "and val_doc_ids, as prepare_data and story_data make them")
        device = pick_device(device)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.rank, self.world, self.layout = dist.get_rank(), dist.get_world_size(), layout
        self.mesh = build_mesh(layout, device.type)
        self.coords = mesh_coordinates(self.mesh)
        self.cfg, self.data, self.device = cfg, data, device
        self.params = model.params
        model = model.to(device).set_fast_attention(cfg.fast_attention).train()
        if layout.pp > 1:  # this rank's stage: its blocks (and the embedding or the output)
            self.stages = pipeline_stages(model, self.mesh["pp"].get_group(), device=device)
            model = self.stages[0].submod
            self.schedule = pipeline_schedule(self.stages, self.micro, lm_loss, "1f1b")
        self.model = self.net = parallelize(model, self.mesh)  # in place: the stage too
        self.optimizer = make_optimizer(self.model, cfg)
        self.out_dir = Path(out_dir) if out_dir else None
        self.tokenizer_path = str(tokenizer_path) if tokenizer_path else None
        self.step, self.history, self.last_checkpoint = 0, [], None
        self.tokens_seen, self.seconds, self.clock = 0, 0.0, clock or time.perf_counter
        self.step_seconds, self.warmup_seconds, self.lr = 0.0, None, None
        if self.out_dir and resume and (found := latest_checkpoint(self.out_dir)):
            self.resume(found)

    # -- training -------------------------------------------------------------------------
    def train_step(self) -> float:
        """Trainer.train_step with this rank's data-parallel share of the batch and a
        gradient norm over split and whole tensors alike (mesh.clip_grad_norm_)."""
        cfg = self.cfg
        self.lr = self.learning_rate()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        starts = self.data.doc_starts if cfg.document_mask else None
        inputs, targets, *doc_ids = batch_at(self.data.train, self.step, cfg.batch_size,
                                             cfg.seq_len, cfg.seed, self.coords["dp"],
                                             self.layout.dp, starts)
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        n_bytes = self.data.token_bytes.to(self.device)[targets].sum()
        doc_ids = doc_ids[0].to(self.device) if doc_ids else None
        loss = self._all_processes(self._backward(inputs, targets, doc_ids), mean=True)
        n_bytes = self._all_processes(n_bytes) / (self.world // self.layout.dp)  # one a share
        self._stop_if_not_finite(loss)
        norm = clip_grad_norm_(self.model.parameters(), cfg.grad_clip or math.inf,
                               self.mesh["pp"].get_group() if self.layout.pp > 1 else None)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += cfg.batch_size * cfg.seq_len
        bytes_per_token = n_bytes / (cfg.batch_size * cfg.seq_len)
        self._log({"step": self.step, "loss": loss, "lr": self.lr, "grad_norm": norm.item(),
                   "bpb": loss / math.log(2) / max(bytes_per_token, 1e-9)})
        return loss

    def _backward(self, inputs, targets, doc_ids=None) -> torch.Tensor:
        """Forward and backward over cfg.grad_accum micro-batches. Under context parallelism
        a rank computes its own positions' share of the loss; FSDP averages gradients over the
        DP x CP ranks, so the share is counted CP times (the shares add up to the loss).
        Returns this rank's loss, whose mean over all ranks is the batch's."""
        cfg, cp = self.cfg, self.layout.cp
        if self.layout.pp > 1:  # the schedule runs every micro-batch, forward and backward
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                loss, _ = pipeline_step(self.schedule, self.stages, inputs, targets)
            total = torch.zeros((), device=self.device) if loss is None else loss.detach()
            dist.all_reduce(total, group=self.mesh["pp"].get_group())  # the last stage's
            return total
        total = torch.zeros((), device=self.device)
        ids = [None] * cfg.grad_accum if doc_ids is None else doc_ids.chunk(cfg.grad_accum)
        micro = zip(inputs.chunk(cfg.grad_accum), targets.chunk(cfg.grad_accum), ids, strict=True)
        for x, y, d in micro:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                if cp > 1:
                    positions, logits = context_parallel_forward(
                        self.net, x, self.mesh["cp"].get_group(), d)
                    loss = cp * F.cross_entropy(logits.flatten(0, 1),
                                                y[:, positions.to(y.device)].flatten(),
                                                reduction="sum") / y.numel()
                else:
                    logits = self.net(x) if d is None else self.net(x, doc_ids=d)
                    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
                (loss / cfg.grad_accum).backward()
            total += loss.detach() / cfg.grad_accum
        return total

    def evaluate(self) -> dict:
        """Trainer.evaluate; under pipeline parallelism each stage passes its hidden states
        on (`_StageRelay`) and the last stage's result is given to every rank."""
        if self.layout.pp == 1:
            return super().evaluate()
        net = self.model
        self.model = _StageRelay(net, self.mesh["pp"].get_group(), self.params)
        try:
            result = [super().evaluate()]
        finally:
            self.model = net
        group = self.mesh["pp"].get_group()
        dist.broadcast_object_list(result, group=group, group_src=self.layout.pp - 1)
        return result[0]

    # -- checkpoints ----------------------------------------------------------------------
    def _sharded(self, folder: Path) -> Path:
        return folder.parent / "sharded" / folder.name

    def save(self) -> Path | None:
        """All ranks write their shards (DCP) to sharded/step_NNNNNN, then rank 0 writes the
        course's checkpoint folder with the whole weights, which names it the latest."""
        from torch.distributed.checkpoint import save as dcp_save
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_state_dict,
        )
        if self.out_dir is None:
            return None
        folder = self.out_dir / f"step_{self.step:06d}"
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        dcp_save({"model": model_state, "optimizer": optim_state},
                 checkpoint_id=self._sharded(folder))
        pp = self.layout.pp  # with stages, each holds its own part: gathered over them
        whole = get_model_state_dict(self.model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=pp == 1))
        if pp > 1:
            parts = [None] * pp
            dist.all_gather_object(parts, {k: v.cpu() for k, v in whole.items()},
                                   group=self.mesh["pp"].get_group())
            whole = {k: v for part in parts for k, v in part.items()}
        if self.rank == 0:
            state = {"step": self.step, "torch_rng": torch.get_rng_state(),
                     "tokens_seen": self.tokens_seen, "seconds": self.seconds,
                     "schedule": (self.step_seconds, self.warmup_seconds, self.lr)}
            save_checkpoint(_WholeWeights(self.params, whole), self.out_dir, self.step,
                            state, keep=self.cfg.keep, train_config=asdict(self.cfg),
                            seconds=self.seconds, tokenizer=self.tokenizer_path,
                            tokens_seen=self.tokens_seen, layout=asdict(self.layout),
                            metrics=self.history[-1] if self.history else {})
            kept = {p.name for p in self.out_dir.glob("step_*")}
            for old in (self.out_dir / "sharded").glob("step_*"):
                if old.name not in kept:
                    shutil.rmtree(old)
        dist.barrier()
        self.last_checkpoint = folder
        return folder

    def resume(self, folder) -> None:
        """Continue from a checkpoint written under any layout: the shards this layout needs
        are read from sharded/step_NNNNNN (DCP reshards), the rest from state.pt."""
        from torch.distributed.checkpoint import load as dcp_load
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        folder = Path(folder)
        if not self._sharded(folder).exists():
            raise FileNotFoundError(
                f"{folder} has no sharded state ({self._sharded(folder)}): it was saved by a "
                "run without --tp, --cp or --dp-shard. Resume it the same way, or train "
                "into a new --out-dir")
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        both = {"model": model_state, "optimizer": optim_state}
        dcp_load(both, checkpoint_id=self._sharded(folder))
        set_state_dict(self.model, self.optimizer, model_state_dict=both["model"],
                       optim_state_dict=both["optimizer"])
        state = load_training_state(folder)
        torch.set_rng_state(state["torch_rng"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.seconds, self.last_checkpoint = state["seconds"], folder
        self.step_seconds, self.warmup_seconds, self.lr = state["schedule"]
        dist.barrier()  # every rank has read before rank 0 rewrites the log
        if self.rank == 0:
            remove_unfinished(self.out_dir)
        log = self.out_dir / "metrics.jsonl"  # rows past the checkpoint will be trained again
        if log.exists():
            self.history = [r for r in read_metrics(log) if r["step"] <= self.step]
            if self.rank == 0:
                log.write_text("".join(json.dumps(r) + "\n" for r in self.history))
