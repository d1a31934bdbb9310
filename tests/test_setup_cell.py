"""The notebooks' set-up cell, run as a learner runs it: in a fresh kernel whose environment
lacks the course package (a new Colab or JupyterHub kernel).

The fresh environment is a throwaway virtual environment that sees this environment's
site-packages through a path line in a .pth file, so torch, ipykernel and the course's
dependencies are importable there without a download, while `llama3_mini` is not: this
environment's editable install works through a finder that its own .pth file starts, and a
.pth file of a folder added by a path line is not processed. pip in the fresh environment
still sees this environment's llama3-mini metadata; it refuses to uninstall anything outside
its own environment, and a test checks this environment is left as it was.
"""
import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]*_*.ipynb"))  # 00_, 01a_, ...
NOTEBOOKS += sorted((ROOT / "notebooks" / "labs").glob("*.ipynb"))  # labs run the same cell
FIRST = ROOT / "notebooks" / "00_llama3_at_a_glance.ipynb"
PROBE = "import llama3_mini, sys; print(llama3_mini.__file__); print(sys.prefix)"
NOT_INSTALLED = "Not importable yet: restart the kernel"
# Variables that would put the checkout on a kernel's path or send pip elsewhere.
UNSET = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PIP_USER", "PIP_TARGET", "PIP_PREFIX",
         "PIP_REQUIRE_VIRTUALENV")


def first_code_cell(path: Path):
    nb = nbformat.read(path, as_version=4)
    return next(c for c in nb.cells if c.cell_type == "code")


def setup_source() -> str:
    cell = first_code_cell(FIRST)
    assert "setup" in cell.metadata.get("tags", []), f"{FIRST.name}: first code cell untagged"
    return cell.source


def test_every_notebook_opens_with_the_same_setup_cell():
    source = setup_source()
    assert "%pip install" in source and "llama3-mini[course]" in source
    for path in NOTEBOOKS:
        cell = first_code_cell(path)
        assert "setup" in cell.metadata.get("tags", []), f"{path.name}: no setup tag"
        assert cell.source == source, f"{path.name}: set-up cell differs from {FIRST.name}'s"
        assert not cell.outputs, f"{path.name}: set-up cell has stored outputs"
    tool = ROOT / "tools" / "setup_cell.py"  # the script that writes the cell into notebooks
    if tool.exists():
        tree = ast.parse(tool.read_text())
        setup = next(ast.literal_eval(node.value) for node in tree.body
                     if isinstance(node, ast.Assign)
                     and getattr(node.targets[0], "id", "") == "SETUP")
        assert setup == source, "notebooks' set-up cell differs from tools/setup_cell.py's SETUP"


# --- a fresh environment and kernels ------------------------------------------------------

def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a child process: nothing that would put the checkout on its path."""
    return {k: v for k, v in os.environ.items() if k not in UNSET} | extra


def snapshot_own_install() -> dict[str, str]:
    """Hashes of this environment's llama3-mini install files (dist-info, editable finder)."""
    files = {}
    for site_dir in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for path in Path(site_dir).iterdir():
            name = path.name.lower()
            if name.startswith(("llama3_mini", "__editable__.llama3_mini",
                                "__editable___llama3_mini")):
                for f in sorted([path] if path.is_file() else path.rglob("*")):
                    if f.is_file():
                        files[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return files


def own_import_location() -> str:
    out = subprocess.run([sys.executable, "-c", "import llama3_mini; print(llama3_mini.__file__)"],
                         cwd=Path.home() if Path.home().is_dir() else "/", env=clean_env(),
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def make_fresh_venv(venv: Path, outside: Path) -> Path:
    """A virtual environment that sees our dependencies but not the course package."""
    # No pip of its own: `python -m pip` there is ours, found through the path line below,
    # and installs into the fresh environment (pip goes by sys.prefix); saves a few seconds.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv_python(venv)
    (site_dir(python) / "course_dependencies.pth").write_text(
        "".join(f"{p}\n" for p in dict.fromkeys([sysconfig.get_paths()["purelib"],
                                                  sysconfig.get_paths()["platlib"]])))
    check = subprocess.run([str(python), "-c", "import torch, ipykernel, setuptools, llama3_mini"],
                           cwd=outside, env=clean_env(), capture_output=True, text=True)
    assert check.returncode != 0 and "No module named 'llama3_mini'" in check.stderr, (
        "llama3_mini must not be importable in the fresh environment, and its dependencies "
        f"must be:\n{check.stdout}{check.stderr}")
    return venv


def site_dir(python: Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(subprocess.run([str(python), "-c", code],
                               capture_output=True, text=True, check=True).stdout.strip())


@pytest.fixture(scope="module")
def kernels(tmp_path_factory) -> Path:
    """A JUPYTER_PATH folder with three kernels: two fresh environments (the one a test
    installs into is used once) and ours."""
    root = tmp_path_factory.mktemp("fresh")
    outside = tmp_path_factory.mktemp("outside")
    jupyter_path = root / "jupyter"
    pythons = {"ours": Path(sys.executable)}
    for name in ("fresh-checkout", "fresh-index"):
        pythons[name] = venv_python(make_fresh_venv(root / name, outside))
    for name, python in pythons.items():
        spec = jupyter_path / "kernels" / name
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": name, "language": "python"}))
    return jupyter_path


def run_setup(kernel: str, cwd: Path, kernels: Path, monkeypatch, allow_errors=False,
              **env: str) -> tuple[str, str]:
    """Runs the set-up cell, then the probe, in a new kernel started in cwd; their outputs."""
    for name in UNSET:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JUPYTER_PATH", str(kernels))
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(setup_source()), nbformat.v4.new_code_cell(PROBE)]
    NotebookClient(nb, kernel_name=kernel, timeout=300, startup_timeout=120,
                   allow_errors=allow_errors, resources={"metadata": {"path": str(cwd)}}).execute()
    return tuple(cell_text(cell) for cell in nb.cells)


def cell_text(cell) -> str:
    parts = []
    for out in cell.outputs:
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.data.get("text/plain", "") + "\n")
        else:
            parts.append(json.dumps(out))
    return "".join(parts)


def copy_checkout(dest: Path) -> Path:
    """What a clone holds (tracked files) plus work not yet committed (untracked, not ignored)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for rel in filter(None, listed.split("\0")):
        src = ROOT / rel
        if src.is_file():  # a tracked file deleted in the working tree is skipped
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def in_checkout(path: Path) -> bool:
    return any((p / "llama3_mini" / "__init__.py").exists() for p in [path, *path.parents])


# --- the three cases ----------------------------------------------------------------------

@pytest.mark.slow
def test_fresh_kernel_in_a_checkout_installs_the_package_from_it(kernels, tmp_path, monkeypatch):
    copy = copy_checkout(tmp_path / "course").resolve()
    labs = copy / "notebooks" / "labs"  # the deepest folder a notebook runs in: a lab's
    labs.mkdir(exist_ok=True)
    before = snapshot_own_install()
    setup_out, probe_out = run_setup(
        "fresh-checkout", labs, kernels, monkeypatch,
        # Offline and quick: every dependency is already importable, and setuptools is too, so
        # the build needs no isolated environment. pip reads PIP_NO_BUILD_ISOLATION the
        # inverted way (its value is the build_isolation option's): "0" means no isolation.
        PIP_NO_INDEX="1", PIP_NO_BUILD_ISOLATION="0")
    print(setup_out, probe_out, sep="\n")
    assert f"Installing the course package from {copy}[course]" in setup_out, setup_out
    assert NOT_INSTALLED not in setup_out, setup_out
    module_file, prefix = probe_out.split()[:2]
    venv = kernels.parent / "fresh-checkout"
    assert Path(prefix).resolve() == venv.resolve(), probe_out
    assert Path(module_file).resolve().is_relative_to(site_dir(venv_python(venv)).resolve()), \
        probe_out
    # pip saw our editable llama3-mini through the path line and must have left it alone.
    assert snapshot_own_install() == before
    assert Path(own_import_location()).resolve() == (ROOT / "llama3_mini" / "__init__.py").resolve()


@pytest.mark.slow
def test_kernel_that_has_the_package_prints_nothing(kernels, monkeypatch):
    setup_out, probe_out = run_setup("ours", ROOT / "notebooks", kernels, monkeypatch)
    assert setup_out == ""  # no output of any kind (cell_text shows every output)
    assert Path(probe_out.split()[0]).resolve() == (ROOT / "llama3_mini" / "__init__.py").resolve()


@pytest.mark.slow
def test_fresh_kernel_outside_a_checkout_without_an_index_says_how_to_install(
        kernels, tmp_path, monkeypatch):
    assert not in_checkout(tmp_path)
    # No index, and pip blind to our llama3-mini's metadata (which it would otherwise see
    # through the path line and call "already satisfied"): the by-name install fails, as it
    # does where the package index cannot be reached or does not have the package.
    out, probe_out = run_setup("fresh-index", tmp_path, kernels, monkeypatch, allow_errors=True,
                               PIP_NO_INDEX="1", PIP_IGNORE_INSTALLED="1")
    print(out, probe_out, sep="\n")
    assert "Installing the course package from llama3-mini[course]" in out, out
    assert any(line.startswith(NOT_INSTALLED) for line in out.splitlines()), out
    assert out.index("Installing the course package") < out.index(NOT_INSTALLED), out
    assert "ModuleNotFoundError" in probe_out, probe_out  # and the package is still absent
