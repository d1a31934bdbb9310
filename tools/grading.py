"""nbgrader's conventions on the course's exercises, so `nbgrader generate_assignment` and
`nbgrader autograde` work on the notebooks as they are.

    python tools/grading.py notebooks/*.ipynb      marks the notebooks in place (idempotent)

Each exercise is a solution cell (a code cell tagged `solution`) followed by its check cell
(one calling a `check_...()` from llama3_mini.exercises). Marked, they look like this:

- In the solution cell, `### BEGIN SOLUTION` / `### END SOLUTION` around each function's
  body, after its `def` line and docstring, so nbgrader's release keeps the signature and
  docstring and puts `# YOUR CODE HERE` / `raise NotImplementedError()` in the body (what
  tools/student.py's stub does too); code outside a function is wrapped whole. The markers
  are comments: running the cell gives the same outputs as before.
- nbgrader cell metadata (schema version 3): the solution cell is an autograded answer
  (`solution: true`, not locked), grade id `<nn>-<function>`; the check cell is an autograder
  test (`grade: true`, locked, `points`), grade id `<nn>-<function>-check`, where <nn> is the
  notebook's number.

`grading_problems(nb)` lists what a notebook lacks for nbgrader; empty when it has it all."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import nbformat

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
SCHEMA_VERSION = 3
POINTS = 1  # per check cell: each exercise is one function and one check


def _student():
    import importlib.util

    spec = importlib.util.spec_from_file_location("l3m_tools_student",
                                                  Path(__file__).with_name("student.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


student = _student()


def solution_metadata(grade_id: str) -> dict:
    return {"grade": False, "grade_id": grade_id, "locked": False,
            "schema_version": SCHEMA_VERSION, "solution": True, "task": False}


def check_metadata(grade_id: str, points: int = POINTS) -> dict:
    return {"grade": True, "grade_id": grade_id, "locked": True, "points": points,
            "schema_version": SCHEMA_VERSION, "solution": False, "task": False}


def exercises(nb) -> list[tuple[int, int]]:
    """(solution cell index, its check cell index) for each exercise: the first check cell
    after each solution cell."""
    pairs = []
    for i, cell in enumerate(nb.cells):
        if student.is_solution(cell):
            j = next((j for j in range(i + 1, len(nb.cells)) if student.is_check(nb.cells[j])),
                     None)
            if j is not None:
                pairs.append((i, j))
    return pairs


def mark_source(source: str) -> str:
    """source with the solution markers added: around each top-level function's body (after
    its docstring), or around the whole cell when it defines no function. Unchanged when it
    has markers already.

    `def f(x):\\n    return x + 1` -> `def f(x):\\n    ### BEGIN SOLUTION\\n    return x + 1
    \\n    ### END SOLUTION`"""
    if BEGIN in source:
        return source
    lines = source.rstrip("\n").split("\n")
    functions = [n for n in ast.parse(source).body
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    if not functions:
        return "\n".join([BEGIN, *lines, END])
    for node in reversed(functions):  # from the bottom, so line numbers above stay valid
        body = node.body[1:] if ast.get_docstring(node, clean=False) is not None else node.body
        if not body:
            continue
        first = body[0].lineno - 1  # 0-based
        indent = lines[first][:len(lines[first]) - len(lines[first].lstrip())]
        lines.insert(node.end_lineno, indent + END)
        lines.insert(first, indent + BEGIN)
    return "\n".join(lines)


def _function_name(source: str) -> str:
    names = [n.name for n in ast.parse(source).body
             if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return names[0] if names else "answer"


def mark(nb, number: str) -> None:
    """Add the markers and nbgrader metadata to every exercise of nb (notebook `number`)."""
    for i, j in exercises(nb):
        solution, check = nb.cells[i], nb.cells[j]
        grade_id = f"{number}-{_function_name(solution.source)}"
        solution.source = mark_source(solution.source)
        solution.metadata["nbgrader"] = solution_metadata(grade_id)
        check.metadata["nbgrader"] = check_metadata(grade_id + "-check")


def grading_problems(nb) -> list[str]:
    """What nb lacks for nbgrader: markers, solution metadata, check metadata with points,
    unique grade ids."""
    problems, ids = [], []
    pairs = exercises(nb)
    if not pairs:
        problems.append("no exercise (a solution cell followed by a check cell)")
    for i, j in pairs:
        source = nb.cells[i].source
        if not (source.count(BEGIN) == source.count(END) >= 1):
            problems.append(f"solution cell {i} lacks '{BEGIN}' / '{END}'")
        for k, expected in ((i, "solution"), (j, "check")):
            meta = nb.cells[k].metadata.get("nbgrader")
            if not meta:
                problems.append(f"{expected} cell {k} has no nbgrader metadata")
                continue
            ids.append(meta.get("grade_id"))
            want = (solution_metadata(meta.get("grade_id")) if expected == "solution"
                    else check_metadata(meta.get("grade_id"), meta.get("points", POINTS)))
            if expected == "check" and not meta.get("points", 0) > 0:
                problems.append(f"check cell {k} has no points")
            if meta != want:
                problems.append(f"{expected} cell {k}'s nbgrader metadata is {meta}, not {want}")
    duplicated = sorted({g for g in ids if ids.count(g) > 1})
    if duplicated:
        problems.append(f"grade ids used twice: {duplicated}")
    return problems


def main(argv=None) -> int:
    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 1
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        mark(nb, path.name.split("_", 1)[0])
        problems = grading_problems(nb)
        nbformat.validate(nb)
        nbformat.write(nb, path)
        print(f"{path}: " + ("; ".join(problems) if problems else "marked"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
