"""The exercises carry nbgrader's conventions (tools/grading.py): a teacher can run
`nbgrader generate_assignment` and `nbgrader autograde` on the course's notebooks as they are.

The metadata tests read every notebook; the round trip runs nbgrader itself on notebook 00
(the quickest to execute) in a throwaway course directory: the release has nbgrader's stub in
place of the answer, the solution notebook autogrades to full points and the release, handed
in untouched, to none."""
import ast
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nb_support import ALL_IDS, ALL_NOTEBOOKS, LABS, ROOT, load_tool

grading = load_tool("grading")


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=ALL_IDS)
def test_every_exercise_carries_nbgraders_markers_and_metadata(path):
    nb = nbformat.read(path, as_version=4)
    problems = grading.grading_problems(nb)
    if path in LABS and not grading.exercises(nb):  # a lab need not have an exercise
        problems = [p for p in problems if not p.startswith("no exercise")]
    assert problems == [], f"run `python tools/grading.py {path.name}`"
    number = path.name.split("_", 1)[0]
    for i, j in grading.exercises(nb):
        solution, check = nb.cells[i].metadata.nbgrader, nb.cells[j].metadata.nbgrader
        assert solution["grade_id"].startswith(number + "-")
        assert check["grade_id"] == solution["grade_id"] + "-check" and check["points"] > 0


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=ALL_IDS)
def test_markers_keep_the_signature_and_docstring_outside(path):
    """What nbgrader replaces is the body alone, as tools/student.py's stub does."""
    nb = nbformat.read(path, as_version=4)
    for i, _ in grading.exercises(nb):
        source = nb.cells[i].source
        begins = [k + 1 for k, line in enumerate(source.splitlines())
                  if line.strip() == grading.BEGIN]
        for node in ast.parse(source).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = node.body[0]
                header_end = (first.end_lineno if ast.get_docstring(node, clean=False)
                              is not None else node.lineno)
                assert any(header_end < k <= node.end_lineno for k in begins), (
                    f"{path.name}: {node.name}'s body has no '{grading.BEGIN}' after its "
                    "def line and docstring")


def test_mark_source_wraps_bodies_and_is_idempotent():
    source = 'def f(x):\n    """Add one."""\n    y = x + 1\n    return y\n'
    marked = grading.mark_source(source)
    assert marked == ('def f(x):\n    """Add one."""\n    ### BEGIN SOLUTION\n    y = x + 1\n'
                      "    return y\n    ### END SOLUTION")
    assert grading.mark_source(marked) == marked
    assert grading.mark_source("answer = 42\n") == (
        "### BEGIN SOLUTION\nanswer = 42\n### END SOLUTION")


def test_grading_problems_name_what_is_missing():
    solution = nbformat.v4.new_code_cell("def f(a):\n    return a\n",
                                         metadata={"tags": ["solution"]})
    check = nbformat.v4.new_code_cell("assert check_merge(f)")
    nb = nbformat.v4.new_notebook(cells=[solution, check])
    problems = " ".join(grading.grading_problems(nb))
    assert "lacks '### BEGIN SOLUTION'" in problems and "no nbgrader metadata" in problems
    grading.mark(nb, "99")
    assert grading.grading_problems(nb) == []
    nb.cells[1].metadata.nbgrader["points"] = 0
    assert "has no points" in " ".join(grading.grading_problems(nb))


# ---------------------------------------------------------------- nbgrader itself
def _nbgrader(course: Path, *args):
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(course / ".jupyter"))
    # nbgrader calls `alembic` by name: the environment's scripts must be on PATH
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    result = subprocess.run([sys.executable, "-m", "nbgrader", *args,
                             f"--CourseDirectory.root={course}"], cwd=course, env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"nbgrader {args} failed:\n{result.stdout}\n{result.stderr}"


def _scores(course: Path) -> dict[str, float]:
    with sqlite3.connect(course / "gradebook.db") as db:
        rows = db.execute("SELECT student.id, grade.auto_score FROM grade "
                          "JOIN submitted_notebook ON grade.notebook_id = submitted_notebook.id "
                          "JOIN submitted_assignment ON submitted_notebook.assignment_id = "
                          "submitted_assignment.id JOIN student ON "
                          "submitted_assignment.student_id = student.id").fetchall()
    scores = {}
    for student, score in rows:
        scores[student] = scores.get(student, 0) + (score or 0)
    return scores


@pytest.mark.slow
def test_nbgrader_releases_stubs_and_autogrades_the_course(tmp_path):
    pytest.importorskip("nbgrader", reason="nbgrader is in the test extra: `make setup`")
    path = ROOT / "notebooks" / "00_llama3_at_a_glance.ipynb"
    course, assignment = tmp_path / "course", "ch00"
    (course / "source" / assignment).mkdir(parents=True)
    shutil.copy(path, course / "source" / assignment / path.name)

    _nbgrader(course, "generate_assignment", assignment)
    original = nbformat.read(path, as_version=4)
    release = nbformat.read(course / "release" / assignment / path.name, as_version=4)
    for i, j in grading.exercises(original):
        answer = original.cells[i].source.split(grading.BEGIN)[1].split(grading.END)[0]
        stub = release.cells[i].source
        assert "# YOUR CODE HERE\n    raise NotImplementedError()" in stub
        assert original.cells[i].source.split(grading.BEGIN)[0] in stub  # def and docstring
        leaked = {line.strip() for line in answer.splitlines() if line.strip()} & {
            line.strip() for line in stub.splitlines()}
        assert not leaked, f"the release gives the answer away: {leaked}"
        assert release.cells[j].source == original.cells[j].source  # the check, locked
        assert release.cells[j].metadata.get("editable") is False

    wrong = nbformat.read(path, as_version=4)  # an answer that runs and is wrong
    for i, _ in grading.exercises(wrong):
        wrong.cells[i].source = f"def {grading._function_name(wrong.cells[i].source)}(*args):\n" \
            "    return 0\n"
    nbformat.write(wrong, tmp_path / path.name)
    for student, handed_in in (("solver", path), ("wrong", tmp_path / path.name),
                               ("blank", course / "release" / assignment / path.name)):
        (course / "submitted" / student / assignment).mkdir(parents=True)
        shutil.copy(handed_in, course / "submitted" / student / assignment / path.name)
    _nbgrader(course, "autograde", assignment)
    points = sum(original.cells[j].metadata.nbgrader["points"]
                 for _, j in grading.exercises(original))
    assert _scores(course) == {"solver": points, "wrong": 0, "blank": 0}
    # the wrong answer's check cell shows the checker's verdict, then fails on its assert
    graded = nbformat.read(course / "autograded" / "wrong" / assignment / path.name, 4)
    for _, j in grading.exercises(graded):
        outputs = graded.cells[j].outputs
        assert any(o.get("name") == "stdout" and "✗ " in o.text for o in outputs), outputs
        assert [o.ename for o in outputs if o.output_type == "error"] == ["AssertionError"]
