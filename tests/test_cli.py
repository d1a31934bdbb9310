"""The `llama3-mini` command, each subcommand end to end on a tiny budget."""
import json
import subprocess
import sys
from importlib.metadata import version

import pytest

from llama3_mini.checkpoint import read_metrics
from llama3_mini.cli import TEXT_DEFAULTS, main
from llama3_mini.tokenizer import Tokenizer

TINY = ["--dim", "32", "--n-layers", "2", "--n-heads", "4", "--n-kv-heads", "2",
        "--seq-len", "32", "--batch-size", "4", "--quiet"]


@pytest.mark.parametrize("command", ["train-tokenizer", "train", "generate", "info"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "usage: llama3-mini " + command in capsys.readouterr().out


@pytest.mark.slow
def test_the_installed_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "llama3_mini.cli", "--help"], check=True,
                         capture_output=True, text=True).stdout
    for command in ("train-tokenizer", "train", "generate", "info"):
        assert command in out


@pytest.mark.slow
def test_version_and_python_dash_m(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"llama3-mini {version('llama3-mini')}\n"
    out = subprocess.run([sys.executable, "-m", "llama3_mini", "info", "--preset", "tiny"],
                         check=True, capture_output=True, text=True).stdout
    assert out.splitlines()[1].startswith("tiny")


def test_generate_names_the_pretrained_models_for_an_unknown_one(capsys):
    assert main(["generate", "--model", "nope", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert "no pretrained model 'nope'" in err and "story-model" in err


def test_train_tokenizer_train_generate_end_to_end(tmp_path, capsys):
    tok_file = tmp_path / "tok.tiktoken"
    assert main(["train-tokenizer", "--n-stories", "100", "--vocab-size", "300",
                 "--out", str(tok_file), "--quiet"]) == 0
    assert Tokenizer.load(tok_file).n_words == 300 + 256
    assert main(["train", "--n-stories", "100", "--tokenizer", str(tok_file), "--steps", "3",
                 "--out-dir", str(tmp_path / "run"), "--eval-every", "3", *TINY]) == 0
    out = capsys.readouterr().out
    assert "step 3: loss" in out and "bits per byte (floor 0.1" in out
    assert (tmp_path / "run/latest").read_text() == "step_000003"
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--num-samples", "2",
                 "--max-new-tokens", "5", "--prompt", "Lily"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2 and "\nLily" in out
    # a second `train` with more steps resumes instead of starting over
    assert main(["train", "--n-stories", "100", "--tokenizer", str(tok_file), "--steps", "4",
                 "--out-dir", str(tmp_path / "run"), *TINY]) == 0
    assert "resuming from" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:the text has no pair left to merge")
def test_train_on_a_text_folder_trains_its_own_tokenizer(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    for i in range(30):
        (tmp_path / "docs" / f"{i}.txt").write_text(f"Document {i}: the quick brown fox. " * 5)
    assert main(["train", "--corpus", str(tmp_path / "docs"), "--steps", "2",
                 "--out-dir", str(tmp_path / "run"), "--val-fraction", "0.1", *TINY]) == 0
    assert (tmp_path / "run/tokenizer.tiktoken").exists()
    assert "floor" not in capsys.readouterr().out  # only the stories have a known floor


def test_info_lists_presets_with_meta_parameter_counts(capsys):
    assert main(["info", "--seq-len", "8192"]) == 0
    out = capsys.readouterr().out
    assert "8,030,261,248" in out and "70,553,706,496" in out  # Meta's published sizes
    assert main(["info", "--preset", "tiny"]) == 0
    assert "llama3-8b" not in capsys.readouterr().out


def test_clear_errors(tmp_path, capsys):
    assert main(["train", "--corpus", str(tmp_path / "missing"), "--out-dir",
                 str(tmp_path / "run")]) == 2
    assert "error: no such file or folder" in capsys.readouterr().err
    (tmp_path / "bad.txt").write_bytes(b"ok \xfe")
    assert main(["train-tokenizer", "--corpus", str(tmp_path / "bad.txt")]) == 2
    assert "bad.txt: invalid UTF-8 at byte offset 3" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="tokenizer file .*nope.tiktoken not found"):
        main(["train", "--tokenizer", str(tmp_path / "nope.tiktoken"), "--out-dir",
              str(tmp_path / "run")])
    assert main(["info", "--preset", "llama9"]) == 2
    assert "unknown preset 'llama9'" in capsys.readouterr().err


def test_generate_defaults_to_the_pretrained_asset(capsys):
    assert main(["generate", "--temperature", "0", "--max-new-tokens", "200", "--check",
                 "--prompt", "Once upon a time"]) == 0
    out = capsys.readouterr().out
    # greedy decoding from the trained model writes a story that the grammar accepts
    assert out.startswith("--- sample 1 [grammatical]\nOnce upon a time, there was"), out


def _lines(n: int) -> str:
    return "".join(f"Line {i}: the {'quick brown fox' if i % 2 else 'lazy dog'} saw {i * 7}.\n"
                   for i in range(n))


@pytest.mark.filterwarnings("ignore:the text has no pair left to merge")
def test_one_text_file_trains_with_its_last_lines_for_validation(tmp_path, capsys):
    (tmp_path / "input.txt").write_text(_lines(300))
    assert main(["train", "--corpus", str(tmp_path / "input.txt"), "--steps", "3",
                 "--warmup-steps", "1", "--val-fraction", "0.1", "--out-dir",
                 str(tmp_path / "run"), *TINY]) == 0
    out = capsys.readouterr().out
    floor = f"{TEXT_DEFAULTS['lr'] / 10:.2e}"  # a text file's default peak, over 10
    assert "step 3: loss" in out and f" bits per byte; final learning rate {floor} " in out


@pytest.mark.filterwarnings("ignore:the text has no pair left to merge")
@pytest.mark.slow
def test_a_time_budget_ends_at_the_floor_learning_rate(tmp_path, capsys):
    (tmp_path / "input.txt").write_text(_lines(300))
    assert main(["train", "--corpus", str(tmp_path / "input.txt"), "--max-minutes", "0.05",
                 "--warmup-steps", "2", "--eval-every", "0", "--out-dir", str(tmp_path / "run"),
                 *TINY]) == 0
    out = capsys.readouterr().out
    assert f" bits per byte; final learning rate {TEXT_DEFAULTS['lr'] / 10:.2e} after " in out, out
    assert float(out.split(" after ")[1].split()[0]) >= 0.05  # minutes of training
    rows = read_metrics(tmp_path / "run/metrics.jsonl")
    assert rows[-1]["lr"] == pytest.approx(TEXT_DEFAULTS["lr"] / 10) and "val_bpb" in rows[-1]
    assert len(rows) > 2
    # the first of two warm-up steps: half the peak, or more where that step took over a
    # tenth of the budget (a loaded machine), never more than the peak
    assert TEXT_DEFAULTS["lr"] / 2 - 1e-12 <= rows[0]["lr"] <= TEXT_DEFAULTS["lr"]


@pytest.mark.filterwarnings("ignore:the text has no pair left to merge")
def test_bad_input_gets_a_clear_message_not_a_traceback(tmp_path, capsys):
    def fails(*argv, code=2):
        result = main([*argv, "--out-dir", str(tmp_path / "run"), "--quiet"])
        assert result == code, result
        return capsys.readouterr().err

    (tmp_path / "empty.txt").write_text("\n \n")
    assert "empty.txt is empty (or only white space)" in fails("train", "--corpus",
                                                               str(tmp_path / "empty.txt"))
    for steps in ("-5", "0", "many"):
        with pytest.raises(SystemExit) as exit_:
            main(["train", "--steps", steps])
        assert exit_.value.code == 2
        assert f"argument --steps: expected a whole number above 0, got '{steps}'" in \
            capsys.readouterr().err
    (tmp_path / "short.txt").write_text(_lines(8))
    err = fails("train", "--corpus", str(tmp_path / "short.txt"), "--seq-len", "512")
    assert "short.txt is too short for sequences of 512 tokens" in err
    assert " bytes, and once the last 5% is kept for validation, " in err
    assert "tokens are left to train on, where one training sequence needs 513" in err
    assert "shorter sequences: --seq-len " in err
    shorter = int(err.rsplit("--seq-len ", 1)[1])
    assert main(["train", "--corpus", str(tmp_path / "short.txt"), "--seq-len", str(shorter),
                 "--steps", "1", "--out-dir", str(tmp_path / "ok"), "--quiet"]) == 0
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    assert "image.png: invalid UTF-8 at byte offset 0" in fails(
        "train", "--corpus", str(tmp_path / "image.png"))


def test_a_truncated_checkpoint_is_named_not_a_traceback(tmp_path, capsys):
    from llama3_mini.checkpoint import save_model
    from llama3_mini.config import ModelArgs
    from llama3_mini.model import Transformer

    tok = Tokenizer.train("a small text to train on, " * 20, 260, progress=False)
    tok.save(tmp_path / "tok.tiktoken")
    model = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=tok.n_words,
                                  multiple_of=16, max_seq_len=32))
    save_model(model, tmp_path / "ckpt", tokenizer="../tok.tiktoken")
    weights = tmp_path / "ckpt/model.safetensors"
    for size in (weights.stat().st_size // 2, 5):  # cut in the tensors, cut in the header
        weights.write_bytes(weights.read_bytes()[:size])
        assert main(["generate", "--checkpoint", str(tmp_path / "ckpt")]) == 2
        err = capsys.readouterr().err
        assert "ckpt/model.safetensors is damaged or incomplete" in err and "Traceback" not in err


def test_text_defaults_and_a_run_folder_per_corpus(tmp_path, capsys, monkeypatch):
    """A text file trains at the sweep's defaults in runs/<its name>; flags override them; a
    run folder is never resumed on another corpus (its tokenizer would not fit)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text(_lines(300))
    assert main(["train", "--corpus", "notes.txt", "--steps", "2", "--warmup-steps", "1",
                 "--quiet", "--seq-len", "32"]) == 0
    config = json.loads((tmp_path / "runs" / "notes" / "step_000002" / "config.json").read_text())
    shape = TEXT_DEFAULTS["shape"]
    assert {k: config["model_args"][k] for k in shape} == shape
    assert config["train_config"]["seq_len"] == 32  # the flag, not the default
    assert config["train_config"]["lr"] == TEXT_DEFAULTS["lr"]
    assert config["train_config"]["batch_size"] == TEXT_DEFAULTS["batch_size"]
    capsys.readouterr()
    assert main(["train", "--corpus", "stories", "--out-dir", "runs/notes", "--steps", "1"]) == 2
    assert "runs/notes holds a run on " in capsys.readouterr().err


@pytest.mark.slow
def test_a_time_budget_without_a_shape_is_sized_by_the_scaling_law(tmp_path, capsys, monkeypatch):
    """--max-minutes and no shape: the shape comes from the law at this machine's speed (a
    fake 1e9 FLOPs/s here), printed with its reason; the law's recipe fills the flags left out
    on the stories; an explicit shape flag turns the sizing off."""
    from llama3_mini import scaling
    from llama3_mini.checkpoint import ASSETS, latest_checkpoint

    law = scaling.ScalingLaw(0.05, 0.5, 3.0, 0.5, 0.17, 30.0, 0.15, seq_len=32, batch_size=4)
    monkeypatch.setattr(scaling, "load_law", lambda **kw: law)
    monkeypatch.setattr(scaling, "measure_speed", lambda *a, **kw: 1e9)
    tok = str(ASSETS / "story-model" / "tokenizer.tiktoken")
    common = ["train", "--n-stories", "300", "--tokenizer", tok, "--eval-every", "0", "--quiet"]
    assert main([*common, "--max-minutes", "0.01", "--out-dir", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    expected, _ = scaling.shape_for_budget(0.01 * 60 * 1e9, law, Tokenizer.load(tok).n_words)
    assert "sized for 0.01 min: this machine trains 1e+09 FLOPs/s, so 6e+08 FLOPs" in out
    assert f"picks dim {expected.dim}, {expected.n_layers} layer" in out
    assert f"predicted {law.loss_for(6e8):.3f} bits per byte" in out
    config = json.loads((latest_checkpoint(tmp_path / "a") / "config.json").read_text())
    assert config["model_args"]["dim"] == expected.dim
    assert (config["train_config"]["seq_len"], config["train_config"]["batch_size"]) == (32, 4)
    assert main([*common, "--max-minutes", "0.01", "--dim", "32", "--n-heads", "2",
                 "--n-kv-heads", "1", "--out-dir", str(tmp_path / "b")]) == 0
    assert "sized for" not in capsys.readouterr().out
    config = json.loads((latest_checkpoint(tmp_path / "b") / "config.json").read_text())
    assert config["model_args"]["dim"] == 32 and config["train_config"]["seq_len"] == 256
    # resumed, the sized run keeps its shape whatever the speed now
    monkeypatch.setattr(scaling, "measure_speed", lambda *a, **kw: 1e12)
    assert main([*common, "--max-minutes", "0.02", "--out-dir", str(tmp_path / "a")]) == 0
    assert f"resuming a run sized for its budget: dim {expected.dim}," in capsys.readouterr().out
