"""Insert (or refresh) the set-up cell as the first code cell of each notebook given:
`python tools/setup_cell.py notebooks/*.ipynb`. tests/test_setup_cell.py runs it in a fresh
kernel."""
import sys

import nbformat

SETUP = '''\
# Set-up: where the course package is missing (a fresh Colab or JupyterHub kernel), install it
# from the course's folder when the notebook sits in one, else from the package index.
import importlib.util
import pathlib

if importlib.util.find_spec("llama3_mini") is None:
    root = next((p for p in [pathlib.Path.cwd(), *pathlib.Path.cwd().parents]
                 if (p / "llama3_mini" / "__init__.py").exists()), None)
    source = f"{root}[course]" if root else "llama3-mini[course]"
    print(f"Installing the course package from {source} ...")
    %pip install --quiet "{source}"
    importlib.invalidate_caches()
    if importlib.util.find_spec("llama3_mini") is None:
        print("Not importable yet: restart the kernel and run this cell again; if that fails, "
              "clone the course and run pip install -e '.[course]' in it.")'''

for path in sys.argv[1:]:
    nb = nbformat.read(path, as_version=4)
    first = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    cell = nbformat.v4.new_code_cell(SETUP, metadata={"tags": ["setup"]})
    if nb.cells[first].source.startswith("# Set-up:"):
        nb.cells[first].source = SETUP
    else:
        nb.cells.insert(first, cell)
    nbformat.write(nb, path)
    print(path, "set-up cell at", first)
