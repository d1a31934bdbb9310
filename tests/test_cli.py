"""The `llama3-mini` command, each subcommand end to end on a tiny budget."""
import subprocess
import sys
from importlib.metadata import version

import pytest

from llama3_mini.cli import main
from llama3_mini.tokenizer import Tokenizer

TINY = ["--dim", "32", "--n-layers", "2", "--n-heads", "4", "--n-kv-heads", "2",
        "--seq-len", "32", "--batch-size", "4", "--quiet"]


@pytest.mark.parametrize("command", ["train-tokenizer", "train", "generate", "info"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "usage: llama3-mini " + command in capsys.readouterr().out


def test_the_installed_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "llama3_mini.cli", "--help"], check=True,
                         capture_output=True, text=True).stdout
    for command in ("train-tokenizer", "train", "generate", "info"):
        assert command in out


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
