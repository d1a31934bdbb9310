"""Helpers shared by the tests that read the course's notebooks and drive tools/."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
IDS = [p.stem for p in NOTEBOOKS]  # "00_llama3_at_a_glance", ... for parametrize ids


def load_tool(name: str):
    """tools/<name>.py as a module: tools/ is a folder of scripts, not a package."""
    path = ROOT / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"l3m_tools_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
