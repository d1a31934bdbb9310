"""Training: AdamW (weight decay on matrices only), linear warm-up then cosine decay,
gradient clipping and accumulation, optional bf16 autocast, evaluation in bits per byte,
atomic checkpoints that resume exactly, and DistributedDataParallel under torchrun.

    torchrun --nproc_per_node=8 -m llama3_mini.cli train --preset tiny --steps 2000

runs the same loop on 8 GPUs (nccl), or on CPU processes (gloo): each process takes its
share of every global batch and DDP averages the gradients."""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .checkpoint import (
    latest_checkpoint,
    load_training_state,
    load_weights,
    read_metrics,
    remove_unfinished,
    save_checkpoint,
)
from .config import pick_device
from .data import TokenData, batch_at
from .model import Transformer, evaluating, model_device


@dataclass
class TrainConfig:
    """One run's settings. document_mask (default False) turns on Llama 3's document mask
    ("The Llama 3 Herd of Models", section 3.2): each packed document attends to itself
    alone, in training and in evaluation. Off by default, because off keeps every shipped
    model and stored notebook output as it was, and because a model trained with the mask
    must be scored with it: on rows of packed stories without the mask it scores far worse
    (+0.08 bits per byte after 150 steps). On stories alone, at equal steps, the mask gained
    0.006 bits per byte in pre-training and 0.005 in chapter 08's continued training at
    2,048 tokens, 4% and 26% of the excess over the entropy floor (assets/document-mask,
    shown in notebook 08): worth turning on for a new run."""

    steps: int | None = 600  # None: as many as max_minutes allows
    batch_size: int = 16  # sequences per optimizer step, all processes together
    grad_accum: int = 1  # micro-batches per step in each process
    seq_len: int = 256
    lr: float = 2e-3  # peak learning rate, reached after warm-up
    min_lr: float = 2e-4  # the cosine decays to this at the last step
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    eval_every: int = 100  # 0: evaluate at the end only
    save_every: int = 0  # 0: save at the end only (when there is an out_dir)
    keep: int = 2  # checkpoints kept on disk
    seed: int = 0  # decides the batches (with the step), and the initial weights
    bf16: bool = False  # autocast matrix products to bfloat16 (CPU or GPU)
    fast_attention: bool = True  # scaled_dot_product_attention, else the explicit path
    max_minutes: float | None = None  # a time budget: the schedule is laid over it
    # attention inside each packed document (model.document_mask; see above). Needs
    # TokenData.doc_starts and val_doc_ids, as prepare_data and story_data make them.
    document_mask: bool = False


def lr_at(step: int, max_lr: float, warmup_steps: int, total_steps: int,
          min_lr: float = 0.0) -> float:
    """Learning rate of optimizer step `step` (0-based): rises linearly from max_lr /
    warmup_steps to max_lr over the warm-up, then follows half a cosine down to min_lr at
    the last step (total_steps - 1), and stays there."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * progress))


# A time budget (max_minutes) is a complete run: the schedule is laid over the time. We
# schedule by elapsed training time rather than fix a step count from the speed of the first
# steps, because the speed drifts (other programs on a shared CPU, a laptop that heats up, a
# GPU's first steps): a fixed count ends early, or is cut off with the lr still high, while a
# schedule in time reaches its floor when the time is up whatever the speed did. The price: a
# run by time is not repeatable bit for bit, as a run by steps is. Evaluating and saving do
# not count as training time. The warm-up is counted in steps, since what it protects (AdamW's
# moment estimates, which start from nothing) grows with updates, not seconds; but it never
# takes more than WARMUP_SHARE of the time, or a slow machine would spend the budget warming up.
WARMUP_SHARE = 0.1


def lr_in_budget(step: int, end_seconds: float, budget_seconds: float, max_lr: float,
                 warmup_steps: int, min_lr: float = 0.0, warmup_seconds: float | None = 0.0,
                 total_steps: int | None = None) -> float:
    """Learning rate of step `step` of a run with a time budget. While the warm-up lasts
    (warmup_seconds is None) it rises linearly over warmup_steps steps as lr_at's does, or over
    WARMUP_SHARE of the budget if that is further along; then half a cosine runs over the time
    from warmup_seconds (when the warm-up ended) to budget_seconds. end_seconds is when this
    step should end (the time so far plus the last step's duration): the step that ends at or
    past the budget runs at min_lr, as lr_at's last step does. With total_steps too, the
    cosine follows whichever budget is further spent."""
    if end_seconds >= budget_seconds:
        return min_lr
    if warmup_seconds is None:
        rise = max((step + 1) / max(1, warmup_steps), end_seconds / (WARMUP_SHARE * budget_seconds))
        return max_lr * min(1.0, rise)
    progress = (end_seconds - warmup_seconds) / max(budget_seconds - warmup_seconds, 1e-9)
    if total_steps is not None:
        progress = max(progress, (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps))
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (embeddings, projections) and none on the
    RMSNorm gains, which are vectors."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


@torch.no_grad()
def evaluate_bpb(model, rows: torch.Tensor, token_bytes: torch.Tensor, batch_size: int = 16,
                 bf16: bool = False, device=None, doc_ids: torch.Tensor | None = None) -> dict:
    """Bits per byte of whole documents: the summed loss of every predicted token, in bits,
    over the UTF-8 bytes those tokens stand for. rows: (n, seq_len + 1), pad -100. doc_ids
    (n, seq_len + 1), the rows' documents: each document then sees none of the others."""
    device = model_device(model, device)  # the model's own; a device given must name it
    nll, n_bytes, n_tokens = 0.0, 0.0, 0
    ids = rows.new_zeros(rows.shape) if doc_ids is None else doc_ids
    with evaluating(model):
        for chunk, chunk_ids in zip(rows.split(batch_size), ids.split(batch_size), strict=True):
            chunk = chunk.to(device)
            inputs, targets = chunk[:, :-1].clamp(min=0), chunk[:, 1:]  # pads only follow a row
            masked = None if doc_ids is None else chunk_ids[:, :-1].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(inputs) if masked is None else model(inputs, doc_ids=masked)
            nll += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                                   reduction="sum").item()
            real = targets[targets >= 0]
            n_bytes += token_bytes.to(device)[real].sum().item()
            n_tokens += real.numel()
    return {"val_loss": nll / max(1, n_tokens), "val_bpb": nll / math.log(2) / max(1.0, n_bytes)}


@torch.no_grad()
def text_bits_per_byte(model, tokenizer, text: str) -> float:
    """The bits the model pays for the tokens of `text` after <|begin_of_text|>, over the
    text's UTF-8 bytes: the sum of -log2 p(token | what precedes it) / len(text.encode()).
    The text must fit the model's window (max_seq_len tokens with the <|begin_of_text|>)."""
    ids = tokenizer.encode(text, bos=True)
    if not 1 < len(ids) <= model.params.max_seq_len:
        raise ValueError(f"{len(ids)} tokens with <|begin_of_text|>: need 2 to max_seq_len "
                         f"({model.params.max_seq_len}); cut the text into pieces")
    ids = torch.tensor([ids], device=model_device(model))
    with evaluating(model):
        logits = model(ids[:, :-1]).float()  # (1, n - 1, vocab_size)
    nats = F.cross_entropy(logits[0], ids[0, 1:], reduction="sum").item()
    return nats / math.log(2) / len(text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------
def _distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank), starting the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if world > 1:
        return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


class Trainer:
    """Trains `model` on `data`; `fit()` runs to cfg.steps or through cfg.max_minutes,
    resuming from out_dir if a checkpoint is there. History rows go to out_dir/metrics.jsonl
    for plotting. `clock` (seconds, default time.perf_counter) times the training."""

    def __init__(self, model: Transformer, data: TokenData, cfg: TrainConfig, out_dir=None,
                 tokenizer_path=None, device=None, resume: bool = True, clock=None):
        if cfg.steps is None and cfg.max_minutes is None:
            raise ValueError("give steps, max_minutes or both: the run needs an end")
        self.rank, self.world, local_rank = _distributed()
        device = pick_device(device)
        if device.type == "cuda" and self.world > 1:
            device = torch.device("cuda", local_rank)
        per_rank = cfg.batch_size // self.world
        if cfg.batch_size % self.world or per_rank % cfg.grad_accum:
            raise ValueError(f"batch_size ({cfg.batch_size}) must split evenly over "
                             f"{self.world} processes x grad_accum ({cfg.grad_accum})")
        if cfg.document_mask and (data.doc_starts is None or data.val_doc_ids is None):
            raise ValueError("document_mask needs the documents' bounds: TokenData.doc_starts "
                             "and val_doc_ids, as prepare_data and story_data make them")
        self.cfg, self.data, self.device = cfg, data, device
        self.model = model.to(device).set_fast_attention(cfg.fast_attention)
        self.model.train()
        self.net = self.model
        if self.world > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = make_optimizer(self.model, cfg)
        self.out_dir = Path(out_dir) if out_dir else None
        self.tokenizer_path = str(tokenizer_path) if tokenizer_path else None
        self.step, self.history, self.last_checkpoint = 0, [], None
        self.tokens_seen, self.seconds, self.clock = 0, 0.0, clock or time.perf_counter
        self.step_seconds, self.warmup_seconds, self.lr = 0.0, None, None  # for lr_in_budget
        if self.out_dir and resume and (found := latest_checkpoint(self.out_dir)):
            self.resume(found)

    # -- checkpoints ----------------------------------------------------------------------
    def save(self) -> Path | None:
        """Checkpoint out_dir/step_NNNNNN: weights, config and the state to resume. The batches
        need no saving: `batch_at` draws step s's batch from (seed, s) alone."""
        if self.out_dir is None or self.rank != 0:
            return None
        state = {"optimizer": self.optimizer.state_dict(), "step": self.step,
                 "torch_rng": torch.get_rng_state(), "tokens_seen": self.tokens_seen,
                 "seconds": self.seconds,
                 "schedule": (self.step_seconds, self.warmup_seconds, self.lr)}
        self.last_checkpoint = save_checkpoint(
            self.model, self.out_dir, self.step, state, keep=self.cfg.keep,
            train_config=asdict(self.cfg), seconds=self.seconds, tokenizer=self.tokenizer_path,
            tokens_seen=self.tokens_seen, metrics=self.history[-1] if self.history else {})
        return self.last_checkpoint

    def resume(self, folder) -> None:
        """Continue from a checkpoint: weights, optimizer, RNG, step and metrics so far."""
        folder = Path(folder)
        weights, _ = load_weights(folder)
        self.model.load_state_dict(weights)
        state = load_training_state(folder)
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.seconds, self.last_checkpoint = state["seconds"], folder
        # a run by time continues its schedule (lr_in_budget) where it was
        self.step_seconds, self.warmup_seconds, self.lr = state.get("schedule", (0.0, 0.0, None))
        remove_unfinished(self.out_dir)
        log = self.out_dir / "metrics.jsonl"  # rows past the checkpoint will be trained again
        if log.exists():
            self.history = [r for r in read_metrics(log) if r["step"] <= self.step]
            if self.rank == 0:
                log.write_text("".join(json.dumps(r) + "\n" for r in self.history))

    # -- training -------------------------------------------------------------------------
    def train_step(self) -> float:
        """One optimizer step: set the learning rate, take this process's share of the batch,
        accumulate its gradients, average over the processes, clip, step. Returns the mean
        loss (nats)."""
        cfg = self.cfg
        self.lr = self.learning_rate()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        starts = self.data.doc_starts if cfg.document_mask else None
        inputs, targets, *doc_ids = batch_at(self.data.train, self.step, cfg.batch_size,
                                             cfg.seq_len, cfg.seed, self.rank, self.world, starts)
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        n_bytes = self.data.token_bytes.to(self.device)[targets].sum()  # bytes of this share
        doc_ids = doc_ids[0].to(self.device) if doc_ids else None
        loss = self._all_processes(self._backward(inputs, targets, doc_ids), mean=True)
        n_bytes = self._all_processes(n_bytes)
        self._stop_if_not_finite(loss)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += cfg.batch_size * cfg.seq_len
        bytes_per_token = n_bytes / (cfg.batch_size * cfg.seq_len)
        self._log({"step": self.step, "loss": loss, "lr": self.lr, "grad_norm": norm.item(),
                   "bpb": loss / math.log(2) / max(bytes_per_token, 1e-9)})  # train bits/byte
        return loss

    def _backward(self, inputs: torch.Tensor, targets: torch.Tensor,
                  doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Forward and backward over cfg.grad_accum micro-batches, the gradients summed (DDP
        averages them over the processes at the last one only: no_sync before it). doc_ids:
        the document mask's, or None. Returns this process's mean loss, a tensor."""
        cfg = self.cfg
        total = torch.zeros((), device=self.device)
        ids = [None] * cfg.grad_accum if doc_ids is None else doc_ids.chunk(cfg.grad_accum)
        micro = zip(inputs.chunk(cfg.grad_accum), targets.chunk(cfg.grad_accum), ids, strict=True)
        for i, (x, y, d) in enumerate(micro):
            last = i == cfg.grad_accum - 1
            sync = self.net.no_sync() if self.world > 1 and not last else nullcontext()
            with sync, torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                logits = self.net(x) if d is None else self.net(x, doc_ids=d)  # (b, seq, vocab)
                loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
                (loss / cfg.grad_accum).backward()
            total += loss.detach() / cfg.grad_accum
        return total

    def _all_processes(self, value: torch.Tensor, mean: bool = False) -> float:
        """A tensor summed (or averaged) over the processes, as a number."""
        if self.world > 1:
            dist.all_reduce(value)
            if mean:
                value /= self.world
        return value.item()

    def _stop_if_not_finite(self, loss: float) -> None:
        """A NaN or infinite loss stops the run before the step, naming what to do."""
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            where = self.last_checkpoint or "none saved yet"
            raise FloatingPointError(f"loss is {loss} at step {self.step}; last good checkpoint: "
                                     f"{where}. Lower the learning rate or turn bf16 off, "
                                     "then resume from that checkpoint.")

    def learning_rate(self) -> float:
        """The next step's: `lr_at` over cfg.steps, or `lr_in_budget` over cfg.max_minutes."""
        cfg = self.cfg
        if cfg.max_minutes is None:
            return lr_at(self.step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr)
        return lr_in_budget(self.step, self.seconds + self.step_seconds, cfg.max_minutes * 60,
                            cfg.lr, cfg.warmup_steps, cfg.min_lr, self.warmup_seconds, cfg.steps)

    def out_of_time(self) -> bool:
        """Time is up: the budget is spent and the last step ran at the floor learning rate."""
        return (self.cfg.max_minutes is not None and self.lr == self.cfg.min_lr
                and self.seconds >= self.cfg.max_minutes * 60)

    def finished(self) -> bool:
        """cfg.steps are done, or the time budget is (`out_of_time`)."""
        return (self.cfg.steps is not None and self.step >= self.cfg.steps) or self.out_of_time()

    def _count_time(self, seconds: float) -> None:
        """Training time so far is `seconds`: under torchrun the slowest process's, so that
        every process takes the same lr and stops at the same step. Marks the end of the
        warm-up when it comes (see lr_in_budget)."""
        if self.world > 1:
            seconds = torch.tensor(seconds, dtype=torch.float64, device=self.device)
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
            seconds = seconds.item()
        self.step_seconds, self.seconds = seconds - self.seconds, seconds
        budget = 60 * self.cfg.max_minutes if self.cfg.max_minutes else math.inf
        if self.warmup_seconds is None and (self.step >= self.cfg.warmup_steps
                                            or self.seconds >= WARMUP_SHARE * budget):
            self.warmup_seconds = self.seconds

    def _every(self, n: int) -> bool:
        return bool(n) and self.step % n == 0

    def evaluate(self) -> dict:
        return evaluate_bpb(self.model, self.data.val_rows, self.data.token_bytes,
                            bf16=self.cfg.bf16,
                            doc_ids=self.data.val_doc_ids if self.cfg.document_mask else None)

    def _log(self, row: dict) -> None:
        row = {**row, "tokens": self.tokens_seen, "seconds": round(self.seconds, 3)}
        if self.history and self.history[-1]["step"] == row["step"]:
            self.history[-1].update(row)
        else:
            self.history.append(row)
        if self.out_dir is not None and self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def summary(self, history: list[dict]) -> str:
        """One line after `fit`: the last step's loss, validation bits per byte (and the floor,
        when the corpus has one), final learning rate, minutes and checkpoint."""
        last = {"step": self.step, "loss": math.nan, "lr": math.nan, **(history[-1] if history
                                                                          else {})}
        floor = f" (floor {self.data.floor:.4f})" if self.data.floor is not None else ""
        return (f"step {last['step']}: loss {last['loss']:.4f}, validation "
                f"{last.get('val_bpb', math.nan):.4f} bits per byte{floor}; final learning rate "
                f"{last['lr']:.2e} after {self.seconds / 60:.2f} minutes of training; "
                f"checkpoint {self.last_checkpoint}")

    def fit(self, progress: bool = True, callback=None) -> list[dict]:
        """Train to cfg.steps or through cfg.max_minutes of training time, evaluating and
        saving on schedule. callback(trainer) runs after every step (a live plot, say)."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        bar = tqdm(total=cfg.steps, initial=self.step, desc="training",
                   disable=not progress or self.rank != 0)
        start = self.clock() - self.seconds
        while not self.finished():
            loss = self.train_step()
            self._count_time(self.clock() - start)
            done = self.finished()
            if done or self._every(cfg.eval_every):
                self._log({"step": self.step, **self.evaluate()})
            if self.out_dir and (done or self._every(cfg.save_every)):
                self.save()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if callback is not None:
                callback(self)
            start = self.clock() - self.seconds  # evaluating, saving, plotting: not training
        bar.close()
        return self.history
