"""The package works once pip-installed from its wheel, outside the checkout: the wheel
carries the pretrained models (llama3_mini.assets), and the command line and
`load_pretrained()` find them there.

The wheel goes into a fresh virtual environment that sees the dependencies already installed
here through a .pth file (no second torch download); llama3_mini itself comes from the
wheel alone, since the editable install's own .pth is not processed on that path."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
MODELS = sorted(p.name for p in ASSETS.iterdir() if (p / "model.safetensors").is_file())
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")


def _run(args, cwd, env, timeout=300) -> str:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _setuptools_is_new_enough() -> bool:
    try:
        return int(version("setuptools").split(".")[0]) >= 77
    except Exception:
        return False


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (so that no build/ folder left in the
    checkout can slip stale files into it)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("llama3_mini", "assets"):
        shutil.copytree(ROOT / name, src / name, ignore=SKIP)
    # the build backend is the one installed here when it is recent enough (no download)
    isolation = ["--no-build-isolation"] if _setuptools_is_new_enough() else []
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", *isolation,
          "--wheel-dir", tmp / "dist", src], cwd=tmp, env=os.environ.copy())
    (found,) = (tmp / "dist").glob("llama3_mini-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> tuple[Path, dict]:
    """A virtual environment holding the wheel: (its scripts folder, the environment to run
    it with). Its .pth file adds this environment's site-packages after its own."""
    tmp = tmp_path_factory.mktemp("venv")
    env_dir = tmp / "env"
    _run([sys.executable, "-m", "venv", "--without-pip", env_dir], cwd=tmp, env=os.environ)
    scripts = env_dir / ("Scripts" if os.name == "nt" else "bin")
    python = scripts / ("python.exe" if os.name == "nt" else "python")
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     cwd=tmp, env=os.environ).strip())
    ours = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (site / "installed_here.pth").write_text("\n".join(ours) + "\n", encoding="utf-8")
    # this pip, run for the new interpreter: scripts get the new environment's python
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps",
          "--no-index", "--no-compile", wheel], cwd=tmp, env=os.environ)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    return scripts, env


@pytest.fixture
def outside(tmp_path) -> Path:
    """A working directory outside the checkout."""
    assert not tmp_path.resolve().is_relative_to(ROOT)
    return tmp_path


def test_the_wheel_carries_the_pretrained_models_and_the_license(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert MODELS and "story-model" in MODELS
    for model in MODELS:
        for file in ("model.safetensors", "config.json", "tokenizer.tiktoken", "card.json",
                     "README.md"):
            assert f"llama3_mini/assets/{model}/{file}" in names, (model, file)
    shipped = [p for p in ASSETS.glob("*/*") if not p.parent.name.startswith((".", "__"))]
    assert {"qa-lora", "pretraining-lengths"} <= {p.parent.name for p in shipped}
    for path in shipped:  # every file of every asset folder, adapters and checkpoints too
        assert f"llama3_mini/assets/{path.parent.name}/{path.name}" in names, path
    assert "llama3_mini/exercises/building.py" in names
    assert "llama3_mini/__main__.py" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any("/.make-" in n or "__pycache__" in n for n in names)


def test_load_pretrained_from_the_wheel(venv, outside):
    scripts, env = venv
    python = scripts / ("python.exe" if os.name == "nt" else "python")
    out = _run([python, "-c",
                "import llama3_mini, llama3_mini.checkpoint as t\n"
                "model, tokenizer = t.load_pretrained(device='cpu')\n"
                "print(llama3_mini.__file__); print(t.ASSETS); print(t.pretrained_models())\n"
                "print(type(model).__name__, model.training, tokenizer.n_words)\n"
                "try:\n    t.load_pretrained('no-such-model')\n"
                "except FileNotFoundError as e:\n    print(e)\n"], cwd=outside, env=env)
    package, assets, models, loaded, error = out.strip().splitlines()
    env_dir = scripts.parent.resolve()
    assert Path(package).resolve().is_relative_to(env_dir), package  # the wheel's, not ours
    assert Path(assets).resolve().is_relative_to(env_dir), assets
    assert models == repr(MODELS)
    assert loaded.startswith("Transformer False ")
    assert "no pretrained model 'no-such-model'" in error and "story-model" in error


def test_the_command_line_from_the_wheel(venv, outside):
    scripts, env = venv
    exe = ".exe" if os.name == "nt" else ""
    llama3_mini = scripts / f"llama3-mini{exe}"
    python = scripts / f"python{exe}"
    assert _run([llama3_mini, "--version"], cwd=outside, env=env).strip() \
        == f"llama3-mini {version('llama3-mini')}"
    out = _run([python, "-m", "llama3_mini", "info", "--preset", "llama3-8b"], cwd=outside,
               env=env)
    assert "8,030,261,248" in out  # Meta's published size
    out = _run([llama3_mini, "generate", "--max-new-tokens", "12", "--temperature", "0",
                "--device", "cpu", "--prompt", "Once upon a time"], cwd=outside, env=env)
    assert out.startswith("--- sample 1\nOnce upon a time"), out
    assert len(out.splitlines()[1]) > len("Once upon a time")
