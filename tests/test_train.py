"""The trainer: schedule against torch's schedulers, AdamW groups, bits per byte against the
closed form, checkpoints, resume after SIGKILL (mid-run and mid-save), torchrun against one
process, and the NaN stop."""
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_data import ByteTokenizer

from llama3_mini.checkpoint import latest_checkpoint, load_model, read_metrics, save_model
from llama3_mini.config import get_preset
from llama3_mini.data import pack_documents, story_data
from llama3_mini.model import Transformer
from llama3_mini.train import TrainConfig, Trainer, evaluate_bpb, lr_at, make_optimizer

ROOT = Path(__file__).resolve().parent.parent
ARGS = get_preset("tiny").replace(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=258,
                                  multiple_of=16, max_seq_len=64)


@pytest.fixture(scope="module")
def stories():
    return story_data(ByteTokenizer(), n_stories=60, seq_len=32)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 20), st.integers(2, 80), st.floats(1e-4, 1.0), st.floats(0.0, 0.5))
def test_schedule_matches_torch_warmup_then_cosine(warmup, decay, max_lr, min_frac):
    total, min_lr = warmup + decay + 1, max_lr * min_frac
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=max_lr)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, 1 / warmup, 1.0, total_iters=max(1, warmup - 1)),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=decay, eta_min=min_lr)],
        milestones=[warmup])
    for step in range(total):
        assert lr_at(step, max_lr, warmup, total, min_lr) == pytest.approx(
            opt.param_groups[0]["lr"], rel=1e-6, abs=1e-12), step
        opt.step()
        sched.step()
    assert lr_at(total + 5, max_lr, warmup, total, min_lr) == pytest.approx(min_lr)


def test_weight_decay_on_matrices_only():
    model = Transformer(ARGS)
    decayed, plain = make_optimizer(model, TrainConfig(weight_decay=0.1)).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert {names[id(p)] for p in plain["params"]} == {
        n for n, _ in model.named_parameters() if n.endswith("norm.weight")}
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_bits_per_byte_of_a_uniform_model_is_log2_vocab_per_byte():
    model = Transformer(ARGS)
    torch.nn.init.zeros_(model.output.weight)  # every logit 0: each token costs log2(258)
    tok = ByteTokenizer()
    docs = [torch.tensor(tok.encode(t, bos=True, eos=True)).numpy() for t in ["héllo", "ab c"]]
    rows = pack_documents(docs, 16)
    from llama3_mini.data import token_bytes
    got = evaluate_bpb(model, rows, token_bytes(tok))
    predicted = (rows[:, 1:] >= 0).sum().item()  # all tokens but the first BOS
    n_bytes = len("héllo".encode()) + len("ab c")
    assert got["val_bpb"] == pytest.approx(predicted * math.log2(258) / n_bytes, rel=1e-5)


def test_training_lowers_the_loss_and_accumulation_matches_one_batch(stories):
    losses = {}
    for accum in (1, 2):
        torch.manual_seed(0)
        cfg = TrainConfig(steps=6, batch_size=4, grad_accum=accum, seq_len=32, warmup_steps=2,
                          lr=1e-2, eval_every=0)
        losses[accum] = [r["loss"] for r in Trainer(Transformer(ARGS), stories, cfg,
                                                     device="cpu").fit(progress=False)]
    assert losses[1][-1] < losses[1][0]
    assert losses[1] == pytest.approx(losses[2], rel=1e-4)


def test_bf16_autocast_trains_close_to_float32(stories):
    """Eight optimizer steps, not one forward pass: the bf16 run trains (its loss falls by
    over a nat) along float32's path, step by step."""
    out, losses = {}, {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        cfg = TrainConfig(steps=8, batch_size=4, seq_len=32, warmup_steps=2, lr=1e-2, bf16=bf16,
                          eval_every=0)
        out[bf16] = Trainer(Transformer(ARGS), stories, cfg, device="cpu").fit(progress=False)
        losses[bf16] = [r["loss"] for r in out[bf16]]
    assert len(losses[True]) == 8 and losses[True][-1] < losses[True][0] - 1.0
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)
    assert losses[True] != losses[False]  # autocast was on: bf16 products round differently
    assert out[True][-1]["val_bpb"] == pytest.approx(out[False][-1]["val_bpb"], rel=2e-2)


def test_save_and_load_model_round_trip(tmp_path):
    for tied in (False, True):
        model = Transformer(ARGS.replace(tie_word_embeddings=tied))
        save_model(model, tmp_path / f"m{tied}", tokenizer="tok.tiktoken")
        loaded, info = load_model(tmp_path / f"m{tied}", device="cpu")
        x = torch.randint(0, 258, (2, 10))
        torch.testing.assert_close(loaded(x), model(x))
        assert info["tokenizer"] == "tok.tiktoken"
    save_model(model, tmp_path / "half", dtype=torch.bfloat16)
    assert (tmp_path / "half/model.safetensors").stat().st_size < \
        0.6 * (tmp_path / "mTrue/model.safetensors").stat().st_size
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        load_model(tmp_path)


def test_nan_loss_stops_with_the_step_and_last_good_checkpoint(stories, tmp_path):
    cfg = TrainConfig(steps=10, batch_size=4, seq_len=32, eval_every=0, save_every=2)
    trainer = Trainer(Transformer(ARGS), stories, cfg, out_dir=tmp_path)
    trainer.cfg.steps = 2
    trainer.fit(progress=False)
    with torch.no_grad():
        trainer.model.norm.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 2; last good checkpoint: "
                       r".*step_000002"):
        trainer.train_step()


SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {root!r})
    from tests.test_data import ByteTokenizer
    from llama3_mini.config import get_preset
    from llama3_mini.data import story_data
    from llama3_mini.model import Transformer
    from llama3_mini.train import Trainer, TrainConfig
    if len(sys.argv) > 2:  # a window to kill a save in: it pauses, complete, before its rename
        import time
        import llama3_mini.checkpoint as checkpoint
        rename = checkpoint.replace_dir
        def slow_rename(tmp, folder):
            print("saving", folder.name, flush=True)
            time.sleep(float(sys.argv[2]))
            rename(tmp, folder)
        checkpoint.replace_dir = slow_rename
    torch.manual_seed(0)
    args = get_preset("tiny").replace(dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                      vocab_size=258, multiple_of=16, max_seq_len=64)
    data = story_data(ByteTokenizer(), n_stories=60, seq_len=32)
    cfg = TrainConfig(steps=12, batch_size=4, seq_len=32, warmup_steps=3, lr=1e-2,
                      eval_every=0, save_every=2)
    trainer = Trainer(Transformer(args), data, cfg, out_dir=sys.argv[1], device="cpu")
    trainer.fit(progress=False,
                callback=lambda t: print("step", t.step, t.history[-1]["loss"], flush=True))
    if trainer.rank == 0:
        with open(sys.argv[1] + "/losses.json", "w") as f:
            json.dump([r["loss"] for r in trainer.history], f)
""")


def _script(tmp_path):
    path = tmp_path / "train_script.py"
    path.write_text(SCRIPT.format(root=str(ROOT)))
    return path


def _run_until(cmd, marker):
    """Start cmd, read its output until a line starts with `marker`, then SIGKILL it."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(marker):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)


def _complete(folder):
    return {p.name for p in folder.iterdir()} == {"model.safetensors", "config.json", "state.pt"}


@pytest.mark.slow
def test_sigkill_mid_run_and_mid_save_then_resume_gives_the_same_losses(tmp_path):
    script = _script(tmp_path)
    full, broken = tmp_path / "full", tmp_path / "broken"
    subprocess.run([sys.executable, script, full], check=True, capture_output=True)
    reference = json.loads((full / "losses.json").read_text())
    # killed in the middle of saving step 6: weights, config and state written, not renamed
    _run_until([sys.executable, script, broken, "30"], "saving step_000006")
    assert latest_checkpoint(broken).name == "step_000004"
    assert not (broken / "step_000006").exists() and (broken / ".tmp-step_000006").exists()
    assert all(_complete(f) for f in broken.glob("step_*"))
    # resumed, then killed again between checkpoints, after step 9
    _run_until([sys.executable, script, broken], "step 9 ")
    assert latest_checkpoint(broken).name == "step_000008"
    assert not list(broken.glob(".tmp-*"))
    assert all(_complete(f) for f in broken.glob("step_*"))
    subprocess.run([sys.executable, script, broken], check=True, capture_output=True)
    resumed = [r["loss"] for r in read_metrics(broken / "metrics.jsonl")]
    assert resumed == pytest.approx(reference, rel=1e-6, abs=0)
    assert json.loads((broken / "losses.json").read_text()) == pytest.approx(reference, rel=1e-6)


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path):
    script = _script(tmp_path)
    subprocess.run([sys.executable, script, tmp_path / "one"], check=True, capture_output=True)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", script, tmp_path / "two"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    one = json.loads((tmp_path / "one/losses.json").read_text())
    assert json.loads((tmp_path / "two/losses.json").read_text()) == pytest.approx(one, rel=1e-4)


def test_trainer_rejects_a_batch_that_does_not_split(stories):
    with pytest.raises(ValueError, match=r"batch_size \(6\) must split evenly over 1 processes x "
                       r"grad_accum \(4\)"):
        Trainer(Transformer(ARGS), stories, TrainConfig(batch_size=6, grad_accum=4))
    # the data every test here trains on: 60 stories, one token per byte, each BOS ... EOS;
    # validation rows of seq_len + 1 tokens; a byte count for each of the 258 token ids
    for special in (256, 257):  # BOS, EOS: once per story, in training or validation
        assert (stories.train == special).sum() + (stories.val_rows == special).sum() == 60
    assert stories.train[0] == 256 and stories.train[-1] == 257
    assert stories.val_rows.shape[1] == 33 and len(stories.token_bytes) == 258


def test_lr_schedule_checker_accepts_the_reference_and_names_wrong_cases(capsys):
    from llama3_mini.exercises import check_lr_schedule

    assert check_lr_schedule(lr_at)
    assert "right on all" in capsys.readouterr().out

    def warmup_from_zero(step, max_lr, warmup, total, min_lr):
        return max_lr * step / warmup if step < warmup else lr_at(step, max_lr, warmup, total,
                                                                   min_lr)

    def cosine_to_zero(step, max_lr, warmup, total, min_lr):
        return lr_at(step, max_lr, warmup, total, 0.0)

    def decays_one_step_late(step, max_lr, warmup, total, min_lr):
        return lr_at(step, max_lr, warmup, total + 1, min_lr)

    for wrong, case in [(warmup_from_zero, "lr_schedule(0, 0.003, 10, 100, 0.0003)"),
                        (cosine_to_zero, "lr_schedule(11, 0.003, 10, 100, 0.0003)"),
                        (decays_one_step_late, "lr_schedule(11, 0.003, 10, 100, 0.0003)")]:
        assert not check_lr_schedule(wrong)
        out = capsys.readouterr().out
        assert f"✗ {case}" in out and "expected" in out, out


def test_load_pretrained_by_name_from_the_package_data():
    import llama3_mini
    from llama3_mini.checkpoint import ASSETS, load_pretrained, pretrained_models

    assert "story-model" in pretrained_models()
    if Path(llama3_mini.__file__).resolve().is_relative_to(ROOT):  # editable: the checkout's
        assert ASSETS.resolve() == (ROOT / "assets").resolve()
    model, tokenizer = load_pretrained(device="cpu")
    assert not model.training and model.params.vocab_size == tokenizer.n_words
    named, _ = load_pretrained("story-model", device="cpu")
    older, _ = load_pretrained("cpu")  # the first argument was the device before names
    for other in (named, older):
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                      other.state_dict().values(), strict=True))
    with pytest.raises(FileNotFoundError, match="no pretrained model 'nope'.* available "
                                                "models are: .*story-model"):
        load_pretrained("nope")


class FakeClock:
    """Time that passes only while the model computes: one second per forward pass (a
    training step with one micro-batch takes 1 s; evaluation takes time too, which must not
    count as training time)."""

    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def attach(self, model):
        model.register_forward_pre_hook(lambda *_: setattr(self, "now", self.now + 1.0))
        return model


BUDGET = TrainConfig(steps=None, max_minutes=0.4, batch_size=4, seq_len=32, warmup_steps=2,
                     lr=1e-2, min_lr=1e-3, eval_every=8)  # 24 s: 24 steps of 1 s


def _budget_run(stories, clock, out_dir=None, callback=None, **changes):
    torch.manual_seed(0)
    cfg = TrainConfig(**{**BUDGET.__dict__, **changes})
    trainer = Trainer(clock.attach(Transformer(ARGS)), stories, cfg, out_dir=out_dir,
                      device="cpu", clock=clock)
    return trainer, trainer.fit(progress=False, callback=callback)


def _cosine(progress, max_lr=1e-2, min_lr=1e-3):
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * progress))


def test_a_time_budget_is_a_complete_run_ending_at_the_floor_lr(stories):
    clock = FakeClock()
    trainer, history = _budget_run(stories, clock)
    lrs = [r["lr"] for r in history]
    # warm-up over 2 steps (2 s), then the cosine over the 22 s left: step k (0-based) should
    # end at k + 1 s, so it runs at the cosine's value there; the 24th ends at the budget
    assert lrs == pytest.approx([5e-3, 1e-2] + [_cosine((k + 1 - 2) / 22) for k in range(2, 24)],
                                rel=1e-12, abs=0)
    assert lrs[-1] == BUDGET.min_lr < lrs[-2]  # the floor exactly when the time is up
    assert trainer.step == 24 and trainer.seconds == 24.0
    assert [r["step"] for r in history if "val_bpb" in r] == [8, 16, 24]
    assert clock.now > 24  # evaluation took time, which was not counted
    assert len(trainer.fit(progress=False)) == 24  # a finished run does not step again


def test_on_a_slow_machine_the_warm_up_takes_at_most_a_tenth_of_the_budget(stories):
    trainer, history = _budget_run(stories, FakeClock(), max_minutes=0.2, warmup_steps=10)
    # 12 s: 10 warm-up steps would take 10 s; the warm-up rises over 1.2 s instead, ending
    # with the step that crosses it (step 1, at 2 s), and the cosine has the 10 s left
    assert [r["lr"] for r in history] == pytest.approx(
        [1e-3, 1e-2] + [_cosine((k + 1 - 2) / 10) for k in range(2, 12)], rel=1e-12, abs=0)
    assert trainer.warmup_seconds == 2.0 and history[-1]["lr"] == BUDGET.min_lr


def test_a_step_that_overruns_the_budget_is_followed_by_one_at_the_floor(stories):
    clock = FakeClock()
    torch.manual_seed(0)
    trainer = Trainer(clock.attach(Transformer(ARGS)), stories, BUDGET, device="cpu",
                      clock=clock)
    trainer.model.register_forward_pre_hook(  # step 21 (0-based) takes 3 s instead of 1
        lambda *_: setattr(clock, "now", clock.now + (2.0 if trainer.step == 21 else 0.0)))
    lrs = [r["lr"] for r in trainer.fit(progress=False)]
    assert trainer.seconds == 25.0 and len(lrs) == 23  # steps 0-21 (24 s), then one more
    assert lrs[-2] > BUDGET.min_lr and lrs[-1] == BUDGET.min_lr


def test_resuming_a_time_budgeted_run_continues_its_schedule(stories, tmp_path):
    _, reference = _budget_run(stories, FakeClock())

    def crash(trainer):
        if trainer.step == 6:
            raise KeyboardInterrupt  # killed at step 6; the last checkpoint is step 4

    with pytest.raises(KeyboardInterrupt):
        _budget_run(stories, FakeClock(), out_dir=tmp_path, callback=crash, save_every=4)
    assert latest_checkpoint(tmp_path).name == "step_000004"
    trainer, resumed = _budget_run(stories, FakeClock(1000.0), out_dir=tmp_path)  # a new process
    assert [r["lr"] for r in resumed] == [r["lr"] for r in reference]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in reference],
                                                         rel=1e-6)
    assert trainer.step == 24 and trainer.seconds == 24.0


def test_a_run_by_steps_keeps_lr_at_whatever_the_clock_says(stories):
    clock = FakeClock()
    cfg = TrainConfig(steps=7, batch_size=4, seq_len=32, warmup_steps=2, eval_every=0)
    trainer = Trainer(clock.attach(Transformer(ARGS)), stories, cfg, device="cpu", clock=clock)
    lrs = [r["lr"] for r in trainer.fit(progress=False)]
    assert lrs == [lr_at(k, cfg.lr, 2, 7, cfg.min_lr) for k in range(7)]
    with pytest.raises(ValueError, match="give steps, max_minutes or both"):
        Trainer(Transformer(ARGS), stories, TrainConfig(steps=None))
