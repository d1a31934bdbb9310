"""Run a function on N ranks of a process group from one Python process: the tests, the
benchmark and notebook 11a start their ranks with this instead of torchrun.

    from llama3_mini.parallel.spawn import run_ranks
    def hello(x):                      # runs on every rank, the group already made
        import torch.distributed as dist
        return dist.get_rank() * x
    run_ranks(hello, 2, 10)            # -> [0, 10]: what each rank returned, in rank order

Each rank is a child process: it joins a gloo group (NCCL on CUDA when asked) on a free local
port, calls fn(*args, **kwargs), sends back what it returned, and leaves the group. What a
rank returns must be tensors, numbers, strings, None and lists, tuples and dicts of them (it is
saved with torch.save and read back with weights_only=True). An exception in any rank is
raised here with that rank's traceback."""
from __future__ import annotations

import importlib
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on this machine that nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, fn, world_size, port, backend, threads, out_dir, args, kwargs):
    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        result = fn(*args, **kwargs)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, backend: str = "gloo", threads: int = 1,
              start_method: str | None = None, **kwargs) -> list:
    """fn(*args, **kwargs) on `world_size` ranks -> the list of what each rank returned.

    backend: "gloo" (CPU, the default) or "nccl" (one GPU a rank). threads: torch threads per
    rank (1: N ranks on a laptop share its cores). start_method: "fork" by default on Linux
    (fast: the children inherit torch already imported, and fn may be defined in a notebook),
    "spawn" elsewhere (macOS, Windows), where fn must be importable from a module."""
    if world_size < 1:
        raise ValueError(f"world_size ({world_size}) must be at least 1")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(f"nccl needs one GPU a rank: {world_size} ranks, "
                         f"{torch.cuda.device_count()} GPUs; use backend='gloo' on CPU")
    if start_method is None:
        start_method = "fork" if sys.platform.startswith("linux") else "spawn"
    if start_method == "fork":
        # DTensor imports torch._dynamo on first use: several seconds a process. Imported
        # here once, every forked rank inherits it.
        importlib.import_module("torch._dynamo")
    with tempfile.TemporaryDirectory(prefix="llama3-ranks-") as out_dir:
        mp.start_processes(_rank_main, nprocs=world_size, join=True, start_method=start_method,
                           args=(fn, world_size, free_port(), backend, threads, out_dir,
                                 args, kwargs))
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True)
                for r in range(world_size)]
