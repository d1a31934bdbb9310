"""Student copies of the course: every exercise's solution replaced by a stub.

    python tools/student.py [notebooks/] [student/] [--force]     (or: make student)

A solution cell is a code cell tagged `solution` (its source collapsed in JupyterLab by
`"jupyter": {"source_hidden": true}`). In the copy it keeps each function's name,
signature and docstring, and its body becomes `raise NotImplementedError("your turn")`;
imports stay, everything else in the cell goes, nbgrader's `### BEGIN SOLUTION` /
`### END SOLUTION` markers with it (tools/grading.py puts them around each body, the same
region nbgrader's own release replaces; the cells' nbgrader metadata is kept, so a teacher
can collect these copies with nbgrader too). The solution cell's own outputs are
cleared; every other cell, check cells included, is copied as it is, outputs and all.
A copy already in student/ that differs from the one about to be written (a learner's work,
or an older version of the course) is kept, with a warning, unless --force is given.

`exercise_problems(nb)` lists what a notebook lacks for this to work (no solution cell,
a solution not collapsed, no check cell); `main` names each such notebook on stderr, since
its copy may give a solution away or have nothing to check, and writes the copies anyway.
The labs (notebooks/labs/, side studies that extend a chapter) are copied to student/labs/
the same way; a lab need not have an exercise, but one it has gets its stub too."""
from __future__ import annotations

import argparse
import ast
import copy
import re
import shutil
import sys
from pathlib import Path

import nbformat

SOLUTION_TAG = "solution"
STUB_TAG = "exercise"  # the stub's tag in the student copy
STUB_ERROR = 'raise NotImplementedError("your turn")'
STUB_NOTE = ("# Your turn: replace each `raise NotImplementedError` with your code "
             "(this copy has no solution).")
CHECK_CALL = re.compile(r"\bcheck_\w+\s*\(")
LABS = "labs"  # the sub-folder of side studies, copied alongside the main line


def tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def is_solution(cell) -> bool:
    return cell.cell_type == "code" and SOLUTION_TAG in tags(cell)


def is_check(cell) -> bool:
    """A check cell calls a checker from llama3_mini.exercises (`check_...(`)."""
    return cell.cell_type == "code" and not is_solution(cell) and bool(
        CHECK_CALL.search(cell.source))


def is_collapsed(cell) -> bool:
    return bool(cell.get("metadata", {}).get("jupyter", {}).get("source_hidden"))


def exercise_problems(nb) -> list[str]:
    """What the notebook lacks for a self-checking exercise; empty when it has it all."""
    problems = []
    solutions = [i for i, cell in enumerate(nb.cells) if is_solution(cell)]
    checks = [i for i, cell in enumerate(nb.cells) if is_check(cell)]
    if not solutions:
        problems.append(f"no solution cell (a code cell tagged '{SOLUTION_TAG}')")
    if not checks:
        problems.append("no check cell (a code cell calling a check_...() from "
                        "llama3_mini.exercises)")
    for i in solutions:
        if not is_collapsed(nb.cells[i]):
            problems.append(f"solution cell {i} is not collapsed (add metadata "
                            '"jupyter": {"source_hidden": true})')
        if not any(j > i for j in checks):
            problems.append(f"solution cell {i} has no check cell after it")
    return problems


def _stub_function(node: ast.FunctionDef | ast.AsyncFunctionDef):
    stub = copy.copy(node)
    docstring = ast.get_docstring(node, clean=False) is not None
    stub.body = node.body[:1] if docstring else []
    stub.body = stub.body + ast.parse(STUB_ERROR).body
    return stub


def _stub_class(node: ast.ClassDef) -> ast.ClassDef:
    stub = copy.copy(node)
    body = node.body[:1] if ast.get_docstring(node, clean=False) is not None else []
    body += [_stub_function(item) for item in node.body
             if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))]
    stub.body = body or [ast.Pass()]
    return stub


def stub_source(source: str) -> str:
    """The student's version of a solution cell's source.

    Functions and classes keep their names, signatures, decorators and docstrings, with
    bodies that raise NotImplementedError("your turn"); imports are kept; any other
    statement (an assignment, a call) is dropped, named in a comment, and the cell ends
    by raising, so running it says whose turn it is."""
    try:
        tree = ast.parse(source)
    except SyntaxError:  # cell magics and the like: nothing to keep
        return f"{STUB_NOTE}\n{STUB_ERROR}\n"
    parts, dropped = [], []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            parts.append(ast.unparse(node))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            parts.append(ast.unparse(_stub_function(node)))
        elif isinstance(node, ast.ClassDef):
            parts.append(ast.unparse(_stub_class(node)))
        else:
            dropped += [ast.unparse(t) for t in _targets(node)] or ["the rest of the cell"]
    if dropped:
        names = ", ".join(dict.fromkeys(dropped))
        parts.append(f"# Your turn: set {names}\n{STUB_ERROR}")
    text = STUB_NOTE + "\n" + "\n\n\n".join(parts) + "\n"
    return text.replace("raise NotImplementedError('your turn')", STUB_ERROR)


def _targets(node: ast.stmt) -> list[ast.expr]:
    if isinstance(node, ast.Assign):
        return node.targets
    if isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        return [node.target]
    return []


def student_notebook(nb):
    """A copy of nb with every solution cell replaced by its stub (outputs cleared)."""
    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        if not is_solution(cell):
            continue
        cell.source = stub_source(cell.source)
        cell.outputs, cell.execution_count = [], None
        meta = cell.metadata
        meta.pop("execution", None)
        meta.get("jupyter", {}).pop("source_hidden", None)
        if "jupyter" in meta and not meta["jupyter"]:
            del meta["jupyter"]
        meta["tags"] = [STUB_TAG if t == SOLUTION_TAG else t for t in tags(cell)]
    return nb


def notebooks_in(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).glob("*.ipynb") if not p.name.startswith("."))


def write_student(src: Path, dst: Path, force: bool = False) -> tuple[list[Path], list[Path]]:
    """Write the student copy of every notebook in src (and its other files) to dst.

    Returns (written, kept): kept are the existing copies that differ from the new ones
    and were left alone, since force was not given."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    written, kept = [], []
    for path in sorted(src.iterdir()):
        target = dst / path.name
        if path.is_dir() and path.name == LABS:  # the labs keep their own folder
            lab_written, lab_kept = write_student(path, target, force=force)
            written, kept = written + lab_written, kept + lab_kept
            continue
        if path.name.startswith(".") or path.is_dir():
            continue
        if path.suffix == ".ipynb":
            nb = student_notebook(nbformat.read(path, as_version=4))
            nbformat.validate(nb)
            text = nbformat.writes(nb).rstrip("\n") + "\n"
        else:  # data files next to the notebooks travel with them
            text = None
        if target.exists() and not force and (
                target.read_bytes() != (path.read_bytes() if text is None else text.encode())):
            kept.append(target)
            continue
        if text is None:
            shutil.copy2(path, target)
        else:
            target.write_text(text, encoding="utf-8")
            written.append(target)
    return written, kept


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", nargs="?", default="notebooks", type=Path)
    parser.add_argument("dst", nargs="?", default="student", type=Path)
    parser.add_argument("--force", action="store_true",
                        help="overwrite copies in dst that differ (a learner's work is lost)")
    opts = parser.parse_args(argv)
    paths = notebooks_in(opts.src)
    if not paths:
        print(f"no notebooks in {opts.src}: give the course's notebooks folder", file=sys.stderr)
        return 1
    bad = {p.name: exercise_problems(nbformat.read(p, as_version=4)) for p in paths}
    for lab in notebooks_in(opts.src / LABS):  # a lab without an exercise is fine
        nb = nbformat.read(lab, as_version=4)
        if any(is_solution(c) or is_check(c) for c in nb.cells):
            bad[f"{LABS}/{lab.name}"] = exercise_problems(nb)
    bad = {name: problems for name, problems in bad.items() if problems}
    for name, problems in bad.items():
        print(f"warning: {name}: " + "; ".join(problems), file=sys.stderr)
    written, kept = write_student(opts.src, opts.dst, force=opts.force)
    for path in kept:
        print(f"warning: kept {path}: it differs from the new copy (a learner's work, or an "
              "older course); remove it or pass --force (make student FORCE=1) to replace it",
              file=sys.stderr)
    print(f"wrote {len(written)} student notebooks to {opts.dst}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
