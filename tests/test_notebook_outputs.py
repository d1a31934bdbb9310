"""The notebooks' stored outputs are what a reader sees on GitHub, on the static site and in
the student copies before running anything, so they must be clean: no progress bar frozen
part-way (a tqdm widget is stored as first drawn, at 0%, whatever it reached), no cell that
prints and shows nothing, no machine's paths (a learner's machine is not /work/main/.venv),
no errors. Each test names the notebook and cell (0-based index in `cells`) at fault; the
labs (notebooks/labs/) are read as the main line is."""
import ast
import re

import nbformat
import pytest
from nb_support import ALL_IDS, ALL_NOTEBOOKS

# "BPE merges:   0%|          | 0/7936 [00:00<?, ?it/s]", tqdm's text form
BAR = re.compile(r"(\d{1,3})%\|[^|\n]*\|\s*(\d+(?:\.\d+)?)([kMG]?)/(\d+(?:\.\d+)?)([kMG]?)")
MACHINE_PATH = re.compile(
    r"(?<![\w.])(/work/|/root/|/home/\w|/Users/\w|/tmp/|/private/var/|/var/folders/"
    r"|[A-Za-z]:\\\\(?:Users|Windows)|[\w/\\]*\.venv[/\\]|site-packages|dist-packages)")
PROGRESS_MODELS = {"FloatProgressModel", "IntProgressModel"}
SHOWS = {"print", "display", "show"}  # a cell ending in one of these calls shows something


def _code_cells(nb):
    return [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]


def _texts(output):
    """Every text a reader sees in one output: streams, plain text, HTML, tracebacks."""
    if output.output_type == "stream":
        yield output.text
    elif output.output_type == "error":
        yield "\n".join(output.get("traceback", []))
    for mime, value in output.get("data", {}).items():
        if mime.startswith("text/") or mime.endswith("json"):
            yield value if isinstance(value, str) else str(value)


def frozen_bars(text):
    """The progress bars in text that stopped short of their total."""
    out = []
    for m in BAR.finditer(text):
        percent, done, total = int(m.group(1)), float(m.group(2)), float(m.group(4))
        if percent < 100 or (m.group(3) == m.group(5) and done < total):
            out.append(m.group(0))
    return out


def machine_paths(text):
    return [m.group(0) for m in MACHINE_PATH.finditer(text)]


def shows_something(source):
    """True where the cell's last top-level statement displays something: print(...),
    display(...), plt.show(), or a bare expression that is not a call (its value)."""
    lines = [ln for ln in source.splitlines() if not ln.lstrip().startswith(("%", "!"))]
    try:
        body = ast.parse("\n".join(lines)).body
    except SyntaxError:
        return False
    if not body or not isinstance(body[-1], ast.Expr):
        return False
    value = body[-1].value
    if isinstance(value, ast.Call):
        func = value.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
        return name in SHOWS
    return not isinstance(value, ast.Constant)  # a docstring-like constant shows nothing useful


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=ALL_IDS)
def test_no_progress_bar_is_stored_part_way(path):
    nb = nbformat.read(path, as_version=4)
    found = [(i, bar) for i, cell in _code_cells(nb) for output in cell.get("outputs", [])
             for text in _texts(output) for bar in frozen_bars(text)]
    assert not found, (
        f"{path.name}: progress bars stored part-way {found}; pass progress=False in the "
        "notebook and print a summary (a stored tqdm widget keeps the text it was first drawn "
        "with)")
    state = nb.metadata.get("widgets", {}).get(
        "application/vnd.jupyter.widget-state+json", {}).get("state", {})
    stuck = [(model_id, m["state"].get("value"), m["state"].get("max"))
             for model_id, m in state.items() if m.get("model_name") in PROGRESS_MODELS
             and m["state"].get("value", 0) < m["state"].get("max", 0)]
    assert not stuck, f"{path.name}: progress widgets saved below their maximum: {stuck}"


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=ALL_IDS)
def test_no_machine_paths_in_outputs(path):
    nb = nbformat.read(path, as_version=4)
    found = [(i, hit) for i, cell in _code_cells(nb) for output in cell.get("outputs", [])
             for text in _texts(output) for hit in machine_paths(text)]
    assert not found, f"{path.name}: outputs show paths of the machine that ran them: {found}"


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=ALL_IDS)
def test_no_errors_and_no_blank_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for i, cell in _code_cells(nb):
        outputs = cell.get("outputs", [])
        errors = [o.get("ename") for o in outputs if o.output_type == "error"]
        assert not errors, f"{path.name}, cell {i}: stored error {errors}"
        streams = [o for o in outputs if o.output_type == "stream"]
        if streams and len(streams) == len(outputs):
            assert "".join(o.text for o in streams).strip(), (
                f"{path.name}, cell {i}: its only output is blank: {cell.source[:60]!r}")


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=ALL_IDS)
def test_cells_that_show_something_have_stored_output(path):
    nb = nbformat.read(path, as_version=4)
    missing = [(i, cell.source.strip().splitlines()[-1][:60]) for i, cell in _code_cells(nb)
               if "solution" not in cell.metadata.get("tags", [])
               and shows_something(cell.source) and not cell.get("outputs")]
    assert not missing, (
        f"{path.name}: cells that end by showing something have no output: {missing}")


# ------------------------------------------------------------------- the scanners themselves
def test_frozen_bars_are_found_and_finished_ones_are_not():
    assert frozen_bars("BPE merges:   0%|          | 0/7936 [00:00<?, ?it/s]")
    assert frozen_bars("training:  29%|██▉       | 58/200 [00:24<00:59,  2.4it/s]")
    assert not frozen_bars("training: 100%|██████████| 200/200 [01:02<00:00,  3.2it/s]")
    assert not frozen_bars("score 100%| of 3 cases")  # not a bar


def test_machine_paths_are_found_and_relative_ones_are_not():
    assert machine_paths("Meta's tokenizer: /work/main/.venv/lib/python3.11/site-packages/x")
    assert machine_paths("saved to /home/ada/runs/x.pt") and machine_paths("/tmp/tmpab12/x")
    assert machine_paths(r"C:\\Users\\ada\\x") and machine_paths("/Users/ada/course")
    assert not machine_paths("assets/story-model/card.json and notebooks/01_tokenizer_bpe.ipynb")
    assert not machine_paths("tokens per parameter: 20.0; 3.17 -> 3.94 characters")


def test_cells_that_show_something_are_recognised():
    assert shows_something("x = 1\nprint(x)")
    assert shows_something("fig, ax = plt.subplots()\nplt.show()")
    assert shows_something("explorer = f()\nexplorer")
    assert not shows_something("x = 1")
    assert not shows_something("assert x == 1")
    assert not shows_something("if x:\n    print(x)")  # may print nothing, rightly
    assert not shows_something("%pip install x")
