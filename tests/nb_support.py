"""Helpers shared by the tests that read the course's notebooks and drive tools/."""
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))  # the main line
IDS = [p.stem for p in NOTEBOOKS]  # "00_llama3_at_a_glance", ... for parametrize ids
# The labs: side studies that extend a chapter, named after it ("06c_lab_scaling_curvature")
LABS = sorted((ROOT / "notebooks" / "labs").glob("*.ipynb"))
LAB_IDS = [p.stem for p in LABS]
ALL_NOTEBOOKS, ALL_IDS = NOTEBOOKS + LABS, IDS + LAB_IDS
LAB_NAME = re.compile(r"^(\d\d[a-z]?)_lab_[a-z0-9_]+\.ipynb$")  # group: the chapter it extends


def chapter_of_lab(path: Path) -> str:
    """The number of the main-line chapter a lab extends: 06c_lab_scaling_curvature -> 06c."""
    m = LAB_NAME.match(Path(path).name)
    if m is None:
        raise ValueError(f"{Path(path).name}: a lab is named after the chapter it extends, "
                         "like 06c_lab_scaling_curvature.ipynb (number, '_lab_', topic)")
    return m.group(1)


def load_tool(name: str):
    """tools/<name>.py as a module: tools/ is a folder of scripts, not a package."""
    path = ROOT / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"l3m_tools_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
