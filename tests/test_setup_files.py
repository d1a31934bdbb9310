"""The two ways to install must not drift apart, and CI must call the README's command."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["test"]
    return {_name(r): r.replace(" ", "") for r in reqs}


def environment_pip_requirements() -> dict[str, str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    reqs = {}
    for line in lines[start + 1:]:
        if not line.strip().startswith("- "):
            break
        req = line.strip()[2:].strip()
        if not req.startswith("-e"):
            reqs[_name(req)] = req.replace(" ", "")
    return reqs


def test_environment_yml_names_the_same_requirements_as_pyproject():
    assert environment_pip_requirements() == pyproject_requirements()


def test_environment_yml_installs_the_package_itself():
    text = (ROOT / "environment.yml").read_text()
    assert "name: llama3-mini" in text
    assert re.search(r"^\s*- -e \.\s*$", text, re.M)


def test_torch_is_pinned_to_the_cpu_build_available_here():
    assert pyproject_requirements()["torch"] == "torch==2.13.0"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make lab" in readme
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(), re.M)
