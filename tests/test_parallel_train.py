"""`llama3-mini train` under torchrun with --tp 2, --dp-shard 2, --cp 2, --pp 2 (2 gloo processes
on the CPU each) against the same command in one process, and a run saved under one layout
resumed under another (torch.distributed.checkpoint reshards).

The losses must equal one process's to float32 rounding: a split changes the order of the
additions (tensor parallel's all-reduces, FSDP's reduce-scatter, context parallel's sum of
loss shares, the pipeline's micro-batches); measured differences are under 1e-6, the
tolerance is 1e-5 relative."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from llama3_mini.checkpoint import load_model
from llama3_mini.cli import main
from llama3_mini.parallel.trainer import ParallelTrainer, layout_from_flags
from llama3_mini.train import TrainConfig

# 2 layers of 4 query heads and 2 KV heads: every degree of 2 divides them
TRAIN = ["train", "--n-stories", "100", "--steps", "6", "--batch-size", "4", "--seq-len", "32",
         "--dim", "64", "--n-layers", "2", "--n-heads", "4", "--n-kv-heads", "2",
         "--warmup-steps", "2", "--lr", "3e-3", "--eval-every", "3", "--save-every", "3",
         "--quiet"]


def losses(folder) -> list[float]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tokenizer, and the reference: the command in this one process."""
    folder = tmp_path_factory.mktemp("parallel-train")
    tok = folder / "tok.tiktoken"
    assert main(["train-tokenizer", "--n-stories", "100", "--vocab-size", "300", "--out",
                 str(tok), "--quiet"]) == 0
    assert main(TRAIN + ["--tokenizer", str(tok), "--out-dir", str(folder / "one")]) == 0
    return folder


def torchrun(folder, out: str, *flags) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", "-m", "llama3_mini.cli", *TRAIN,
                          "--tokenizer", str(folder / "tok.tiktoken"),
                          "--out-dir", str(folder / out), *flags],
                         capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return run


@pytest.mark.slow  # two torchrun launches of 2 processes
def test_tp_run_then_resumed_under_fsdp_equal_one_process(runs):
    one = losses(runs / "one")
    torchrun(runs, "tp", "--tp", "2")
    assert losses(runs / "tp") == pytest.approx(one, rel=1e-5)
    # the whole weights written beside the shards: the course's own checkpoint folder
    ours, _ = load_model(runs / "tp/step_000006", device="cpu")
    ref, _ = load_model(runs / "one/step_000006", device="cpu")
    # atol: Adam moves a weight whose gradient is near zero by up to lr (3e-3) on the sign of
    # that tiny gradient, which float32 rounding can shift; measured 1.8e-6 after 6 steps
    for name, w in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], w, rtol=1e-4, atol=1e-5)
    # As if the tp run had been stopped after its step-3 checkpoint: resumed with FSDP, the
    # shards of weights and AdamW's state are read back under the other layout.
    shutil.copytree(runs / "tp", runs / "resumed")
    for later in ("step_000006", "sharded/step_000006"):
        shutil.rmtree(runs / "resumed" / later)
    (runs / "resumed/latest").write_text("step_000003")
    run = torchrun(runs, "resumed", "--dp-shard", "2")
    assert "resuming from" in run.stdout and "(step 3)" in run.stdout
    assert losses(runs / "resumed") == pytest.approx(one, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--cp", "--pp"])
def test_cp_and_pp_runs_equal_one_process(runs, flag):
    torchrun(runs, flag, flag, "2")
    assert losses(runs / flag) == pytest.approx(losses(runs / "one"), rel=1e-5)
    if flag == "--pp":  # each stage's weights gathered into the whole-weight folder
        ours, _ = load_model(runs / flag / "step_000006", device="cpu")
        ref, _ = load_model(runs / "one/step_000006", device="cpu")
        for name, w in ref.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[name], w, rtol=1e-4, atol=1e-5)


def test_degrees_are_checked_before_any_process_group(monkeypatch):
    import torch.distributed as dist

    from llama3_mini.config import get_preset
    from llama3_mini.model import Transformer

    with pytest.raises(ValueError, match="= 2 ranks a model copy, which does not divide the 3 "
                                         "processes started"):
        layout_from_flags(3, tp=2)
    assert layout_from_flags(4, tp=2).dp_replicate == 2  # the rest: data-parallel replicas
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = Transformer(get_preset("tiny").replace(n_layers=3, vocab_size=301, max_seq_len=64))
    for layout, message in [(layout_from_flags(2, pp=2), r"n_layers \(3\) is not a multiple of 2"),
                            (layout_from_flags(2, cp=2), r"seq_len \(30\) is not a multiple of 4"),
                            (layout_from_flags(2, tp=2), r"vocab_size \(301\) is not a multiple"),
                            (layout_from_flags(1, tp=1), "but 2 processes were started")]:
        with pytest.raises(ValueError, match=message):
            ParallelTrainer(model, None, TrainConfig(seq_len=30), layout)
    assert not dist.is_initialized()
