"""Llama 3's parallelism measured on CPU ranks, each figure printed beside its formula.

1. Memory per rank: parameters, gradients and AdamW's state, counted tensor by tensor (the
   local shard of a DTensor) after one step, for one process, DDP, FSDP, tensor parallel (TP),
   pipeline (PP, the largest stage) and context parallel (CP), against 4 + 4 + 8 bytes a
   parameter (float32 AdamW) divided as each scheme divides the parameters. With mixed
   precision ZeRO counts 2 + 2 + 12 (bf16 weights and gradients, float32 master, two moments).
2. Bytes communicated per rank in one training step, counted at the collectives (every
   all-reduce, all-gather, reduce-scatter and pipeline send that torch's engines make goes
   through a counter here), against the textbook formula for each dimension.
3. The pipeline bubble: the idle share of each stage for several micro-batch counts, against
   (p - 1) / (m + p - 1). Each stage's compute is a fixed sleep (forward t, backward 2t), so
   the figure measures the schedule itself, not two shared CPU cores.
4. Context parallelism at a long sequence: the activations saved for the backward pass per
   rank (counted through autograd's saved-tensor hooks), one process against CP = 2 and 4.

Tokens per second on CPU ranks are not the point: gloo over loopback moves a few GB/s while
NVLink moves hundreds, ranks share two cores, and a CPU matmul is a thousand times slower than
an H100's. What carries over to GPUs unchanged is what is counted here: bytes held and bytes
moved per rank, and the bubble's share of the step. On GPUs the question becomes whether the
communication hides behind the compute (FSDP prefetches the next block's all-gather, TP's
all-reduces sit on the critical path and so stay inside a server's NVLink).

    python benchmarks/bench_parallel.py                 # all four sections, ~2.5 minutes
    python benchmarks/bench_parallel.py --section bubble

Measured (torch 2.13 CPU, gloo, one thread a rank, on a shared 2-core machine under load
average 10 to 15: the timings of section 3 carry that load). A 1,000,576-parameter model,
batch 4 x 64, 2 ranks; memory per rank (KiB) against 16 bytes a parameter as each scheme
divides them:
    one process 15634.0 (1.000)   ddp 15634.0 (1.000)   fsdp 7817.0 (1.000)
    tp 8082.0 against 7826.0 (1.033: DTensor leaves the row-wise embedding's gradient
    replicated, (1024, 128) where its weight holds (512, 128))   pp 7818.0 (1.000)
    cp 15634.0 (1.000: context parallelism splits activations, not weights)
Bytes a rank moves in one step (KiB), counted against the formula, all ratios 1.000:
    ddp all-reduce 3908.5 (the gradients, 4N); fsdp all-gather 7817.0 (the parameters twice:
    forward, then again in the backward) and reduce-scatter 3908.5 (the gradients), 1.5 x DDP;
    tp all-reduce 3840.0 in 30 calls (7L + 2 activations of 128 KiB; Megatron's fused qkv and
    gate-up matrices would need 4L + 2 = 18) and all-gather 1024.0 (the logits);
    pp send 128.0 (one activation tensor across each stage boundary, each way);
    cp all-gather 512.0 and reduce-scatter 512.0 (keys and values of every layer, 2L b S
    n_kv hd floats each way), then the gradients' all-reduce 3908.5.
The bubble (sleeping stages, t = 30 ms): at p = 4 the measured idle share per rank is 0.76
(m = 1), 0.62 (2), 0.45 to 0.48 (4), 0.33 to 0.34 (8), 0.26 to 0.34 (16) against 0.750,
0.600, 0.429, 0.273, 0.158: exact while m is small, above the formula as m grows, because
each of the 2 x m x p messages costs a few ms on loaded cores and the formula counts
communication as free. The interleaved schedule's extra messages (twice as many) cost it
more than its smaller bubble saves here (0.45 at p = 4, m = 8, against 0.158): on NVLink a
message costs microseconds and the ordering of the formula returns.
Context parallelism at 2,048 tokens, activations saved per rank: one process 110.9 MiB,
CP = 2 59.1 MiB (0.533), CP = 4 33.2 MiB (0.299), against 1/CP of one process plus the
gathered keys and values that every rank keeps whole (57.5 and 30.7 MiB: ratios 1.028,
1.081; the rest is the mask's rows and the scores' bookkeeping).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama3_mini.config import ModelArgs, num_params  # noqa: E402
from llama3_mini.model import Transformer  # noqa: E402
from llama3_mini.parallel.context import context_parallel_loss, reduce_gradients  # noqa: E402
from llama3_mini.parallel.pipeline import (  # noqa: E402
    bubble_fraction,
    lm_loss,
    pipeline_schedule,
    pipeline_stages,
    pipeline_step,
    split_layers,
)
from llama3_mini.parallel.spawn import run_ranks  # noqa: E402

ARGS = ModelArgs(dim=128, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=1024, multiple_of=32,
                 max_seq_len=4096)
BATCH, SEQ, WORLD = 4, 64, 2
F32 = 4


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class Counter:
    """Counts the bytes each collective carries on this rank while it is active: an
    all-reduce its tensor, an all-gather its output (the whole gathered tensor), a
    reduce-scatter its input, a pipeline transfer the tensors this rank sends."""

    def __init__(self):
        self.bytes = defaultdict(int)
        self.calls = defaultdict(int)
        self._saved = []

    def add(self, name, tensors):
        for t in tensors:
            self.bytes[name] += _local(t).numel() * _local(t).element_size()
            self.calls[name] += 1

    def _wrap(self, module, attr, name, pick):
        original = getattr(module, attr)

        def counted(*args, **kwargs):
            self.add(name, pick(*args, **kwargs))
            return original(*args, **kwargs)
        self._saved.append((module, attr, original))
        setattr(module, attr, counted)

    def __enter__(self):
        import torch.distributed._functional_collectives as funcol
        import torch.distributed.pipelining.schedules as schedules
        self._wrap(dist, "all_reduce", "all-reduce", lambda t, *a, **k: [t])
        self._wrap(dist, "all_gather", "all-gather", lambda out, t, *a, **k: out)
        self._wrap(dist, "all_gather_into_tensor", "all-gather", lambda out, t, *a, **k: [out])
        self._wrap(dist, "reduce_scatter", "reduce-scatter", lambda out, ins, *a, **k: ins)
        self._wrap(dist, "reduce_scatter_tensor", "reduce-scatter", lambda out, t, *a, **k: [t])
        self._wrap(dist, "all_gather_single", "all-gather",
                   lambda *a, **k: [a[0] if a else k["output_tensor"]])
        self._wrap(dist, "reduce_scatter_single", "reduce-scatter",
                   lambda *a, **k: [a[1] if len(a) > 1 else k["input"]])
        self._wrap(funcol, "all_reduce", "all-reduce", lambda t, *a, **k: [t])
        self._wrap(funcol, "all_gather_tensor", "all-gather", self._gathered)
        self._wrap(funcol, "all_gather_single", "all-gather", self._gathered)
        self._wrap(funcol, "reduce_scatter_tensor", "reduce-scatter", lambda t, *a, **k: [t])
        self._wrap(schedules, "_batch_p2p", "send", lambda ops, *a, **k:
                   [op.tensor for op in ops if op.op is dist.isend])
        return self

    @staticmethod
    def _gathered(t, gather_dim, group, *a, **k):
        from torch.distributed._functional_collectives import _expand_group
        return [t] * _expand_group(group)[2]  # the output: one piece a rank of the group

    def __exit__(self, *exc):
        for module, attr, original in reversed(self._saved):
            setattr(module, attr, original)


def _ddp_hook(state, bucket):
    """DDP's own all-reduce (mean of the ranks' gradients), made in Python so it is counted."""
    buffer = bucket.buffer().div_(dist.get_world_size())
    return dist.all_reduce(buffer, async_op=True).get_future().then(lambda f: f.value()[0])


def _batch():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, ARGS.vocab_size, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _held(params, opt) -> dict:
    params = list(params)
    size = lambda ts: sum(_local(t).numel() * _local(t).element_size() for t in ts)  # noqa: E731
    states = [t for s in opt.state.values() for t in s.values()
              if torch.is_tensor(t) and t.dim() > 0]  # exp_avg, exp_avg_sq (not the step)
    return {"params": size(params), "grads": size(p.grad for p in params if p.grad is not None),
            "optim": size(states)}


def _rank(kind: str) -> dict:
    """One rank: wrap the model as `kind` says, take a warm-up step, then count one step."""
    from llama3_mini.parallel.fsdp import apply_fsdp
    from llama3_mini.parallel.tensor import apply_tensor_parallel
    torch.manual_seed(0)
    model = Transformer(ARGS)
    inputs, targets = _batch()
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = slice(rank * BATCH // world, (rank + 1) * BATCH // world)  # data-parallel share
    stages = None
    if kind == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
        model.register_comm_hook(None, _ddp_hook)
    elif kind == "fsdp":
        apply_fsdp(model)
    elif kind == "tp":
        apply_tensor_parallel(model)
    elif kind == "pp":
        stages = pipeline_stages(model)
        schedule = pipeline_schedule(stages, world, kind="1f1b")
    params = ([p for s in stages for p in s.submod.parameters()] if stages
              else list(model.parameters()))
    opt = torch.optim.AdamW(params, lr=1e-3)

    def step():
        opt.zero_grad()
        if kind == "pp":
            pipeline_step(schedule, stages, inputs, targets)
        elif kind == "cp":
            context_parallel_loss(model, inputs, targets).backward()
            reduce_gradients(model)
        else:
            x, y = (inputs[mine], targets[mine]) if kind in ("ddp", "fsdp") else (inputs, targets)
            lm_loss(model(x), y).backward()
        opt.step()
    step()
    with Counter() as counter:
        step()
    return {**_held(params, opt), "bytes": dict(counter.bytes), "calls": dict(counter.calls)}


def _formulas(world: int) -> dict:
    """Bytes per rank: held (fp32 AdamW, 16 a parameter) and sent per step, by scheme."""
    d, n, L, V = ARGS.dim, num_params(ARGS), ARGS.n_layers, ARGS.vocab_size
    kv = ARGS.kv_heads * ARGS.head_dim
    block = (num_params(ARGS) - 2 * V * d - d) // L  # one block's parameters
    norms = (2 * L + 1) * d  # replicated under TP
    stage = max(len(r) for r in split_layers(L, world)) * block + V * d + (d if world > 1 else 0)
    act = BATCH * SEQ * d * F32  # one activation tensor of the whole batch
    return {
        "one process": (n, {}),
        "ddp": (n, {"all-reduce": n * F32}),
        # Each unit (a block, the root) is gathered for the forward and again for the
        # backward (reshard_after_forward=True: every unit, the root included, in FSDP2).
        "fsdp": (n / world, {"all-gather": 2 * n * F32,
                             "reduce-scatter": n * F32}),
        # Megatron: 2 all-reduces a block forward, 2 backward, one for the embedding's output
        # and one for the input gradient of the output layer: 4L + 2. DTensor reduces the
        # input gradient of each column-wise linear apart (wq, wk, wv; w1, w3): 5 a block
        # backward where Megatron's fused qkv and gate-up matrices need 2, so 7L + 2.
        "tp": ((n - norms) / world + norms, {"all-reduce": (7 * L + 2) * act,
                                             "all-gather": BATCH * SEQ * V * F32}),
        "pp": (stage, {"send": act}),
        "cp": (n, {"all-gather": 2 * L * BATCH * SEQ * kv * F32,
                   "reduce-scatter": 2 * L * BATCH * SEQ * kv * F32, "all-reduce": n * F32}),
    }


def memory_and_bytes(world: int = WORLD):
    formulas = _formulas(world)
    kib = 1024
    print(f"\n1-2. A {num_params(ARGS):,}-parameter model ({ARGS.n_layers} layers, dim "
          f"{ARGS.dim}), batch {BATCH} x {SEQ} tokens, {world} ranks, float32 AdamW")
    print(f"{'scheme':12} {'params KiB':>11} {'grads KiB':>10} {'Adam KiB':>9} {'total':>8} "
          f"{'formula':>8} {'ratio':>6}")
    sent = {}
    for kind in formulas:
        if kind == "one process":
            torch.manual_seed(0)
            model = Transformer(ARGS)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            inputs, targets = _batch()
            lm_loss(model(inputs), targets).backward()
            opt.step()
            r = _held(model.parameters(), opt)
        else:
            ranks = run_ranks(_rank, world, kind)
            r = max(ranks, key=lambda x: x["params"] + x["grads"] + x["optim"])
            sent[kind] = ranks
        total = r["params"] + r["grads"] + r["optim"]
        expect = formulas[kind][0] * (4 + 4 + 8)
        print(f"{kind:12} {r['params'] / kib:11.1f} {r['grads'] / kib:10.1f} "
              f"{r['optim'] / kib:9.1f} {total / kib:8.1f} {expect / kib:8.1f} "
              f"{total / expect:6.3f}")
    print("\nBytes one rank moves in one step (the busiest rank), counted at the collectives")
    print(f"{'scheme':6} {'collective':15} {'calls':>5} {'KiB':>9} {'formula':>9} {'ratio':>6}")
    for kind, ranks in sent.items():
        busiest = max(ranks, key=lambda x: sum(x["bytes"].values()))
        for name, expect in formulas[kind][1].items():
            got = busiest["bytes"].get(name, 0)
            print(f"{kind:6} {name:15} {busiest['calls'].get(name, 0):5d} {got / kib:9.1f} "
                  f"{expect / kib:9.1f} {got / expect:6.3f}")
        extra = set(busiest["bytes"]) - set(formulas[kind][1])
        for name in sorted(extra):
            print(f"{kind:6} {name:15} {busiest['calls'][name]:5d} "
                  f"{busiest['bytes'][name] / kib:9.1f} {'(none)':>9}")


class _Sleep(torch.autograd.Function):
    """A stage's compute, made a fixed duration: forward sleeps t, backward 2t, and both
    add their intervals to `busy`."""

    @staticmethod
    def forward(ctx, x, t, busy):
        ctx.t, ctx.busy = t, busy
        start = time.perf_counter()
        time.sleep(t)
        busy.append(time.perf_counter() - start)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        start = time.perf_counter()
        time.sleep(2 * ctx.t)
        ctx.busy.append(time.perf_counter() - start)
        return grad, None, None


class _SleepStage(torch.nn.Module):
    def __init__(self, t, busy):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)
        self.t, self.busy = t, busy

    def forward(self, x):
        return _Sleep.apply(self.linear(x), self.t, self.busy)


def _bubble_rank(kind, n_micro, t):
    """One rank's idle share of a step: 1 - (its compute time) / (the step's wall time).
    The interleaved schedule gets two stages a rank, each half the work."""
    from torch.distributed.pipelining import PipelineStage

    from llama3_mini.parallel.pipeline import stage_ids
    busy: list[float] = []
    rank, world = dist.get_rank(), dist.get_world_size()
    v = 2 if kind == "interleaved" else 1
    stages = [PipelineStage(_SleepStage(t / v, busy), s, world * v, torch.device("cpu"))
              for s in stage_ids(rank, world, v)]
    schedule = pipeline_schedule(stages, n_micro, loss_fn=lambda out, y: out.pow(2).mean(),
                                 kind=kind)
    x = torch.randn(n_micro, 8)
    first, last = any(s.is_first for s in stages), any(s.is_last for s in stages)

    def step():
        dist.barrier()
        start = time.perf_counter()
        schedule.step(*((x,) if first else ()), target=x if last else None)
        dist.barrier()  # the step ends when the last rank is done: the same wall for all
        return time.perf_counter() - start
    step()  # the first step also exchanges shapes
    busy.clear()
    wall = step()
    return 1 - sum(busy) / wall


def bubble(t: float = 0.03):
    print(f"\n3. The pipeline bubble: each stage's idle share of a step (compute: sleep "
          f"{t * 1000:.0f} ms forward, {2 * t * 1000:.0f} ms backward per micro-batch and rank)")
    print(f"{'p':>2} {'m':>3} {'schedule':12} {'idle, each rank':28} {'formula':>8}")
    for p in (2, 4):
        for m in (1, 2, 4, 8, 16):
            for kind in ("gpipe", "1f1b", "interleaved"):
                if kind != "gpipe" and m < p:  # 1F1B needs m >= p, interleaved m % p == 0
                    continue
                idle = run_ranks(_bubble_rank, p, kind, m, t)
                shown = " ".join(f"{x:.3f}" for x in idle)
                v = 2 if kind == "interleaved" else 1
                print(f"{p:2d} {m:3d} {kind:12} {shown:28} {bubble_fraction(p, m, v):8.3f}")


def _saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves for the backward while fn() runs."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return sum(storages.values())


def _cp_rank(seq):
    torch.manual_seed(0)
    model = Transformer(ARGS)
    tokens = torch.randint(0, ARGS.vocab_size, (1, seq + 1))
    return _saved_bytes(lambda: context_parallel_loss(model, tokens[:, :-1], tokens[:, 1:]))


def context_memory(seq: int = 2048):
    torch.manual_seed(0)
    model = Transformer(ARGS)
    tokens = torch.randint(0, ARGS.vocab_size, (1, seq + 1))
    one = _saved_bytes(lambda: lm_loss(model(tokens[:, :-1]), tokens[:, 1:]))
    kv = ARGS.n_layers * 2 * seq * ARGS.kv_heads * ARGS.head_dim * F32  # gathered K, V
    print(f"\n4. Context parallelism: activations saved for the backward per rank, one "
          f"sequence of {seq} tokens")
    print("formula: one process's / CP, but the gathered keys and values stay whole on every "
          f"rank ({kv / 2**20:.1f} MiB over the {ARGS.n_layers} layers)")
    print(f"{'CP':>3} {'MiB per rank':>13} {'vs one process':>15} {'formula MiB':>12} "
          f"{'ratio':>6}")
    for cp in (1, 2, 4):
        per_rank = one if cp == 1 else max(run_ranks(_cp_rank, cp, seq))
        expect = one / cp + kv * (1 - 1 / cp)
        print(f"{cp:3d} {per_rank / 2**20:13.2f} {per_rank / one:15.3f} "
              f"{expect / 2**20:12.2f} {per_rank / expect:6.3f}")


SECTIONS = {"memory": memory_and_bytes, "bubble": bubble, "context": context_memory}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--section", choices=sorted(SECTIONS), action="append")
    torch.set_num_threads(1)
    for name in parser.parse_args().section or list(SECTIONS):
        start = time.perf_counter()
        SECTIONS[name]()
        print(f"({name}: {time.perf_counter() - start:.0f} s)")
