"""The classroom kit: README's course map is the notebooks (its "Going further" table the
labs), every notebook has a self-checking exercise, and `make student` strips the solutions
without losing a check, the labs' included (`make site`: test_site.py)."""
import ast
import inspect
import re

import nbformat
import pytest
from nb_support import (
    ALL_IDS,
    ALL_NOTEBOOKS,
    IDS,
    LAB_IDS,
    LABS,
    NOTEBOOKS,
    ROOT,
    chapter_of_lab,
    load_tool,
)

import llama3_mini.exercises

CHECK_CALL = re.compile(r"\b(check_\w+)\s*\(")  # the checker's name, as a group
# a row of README's course map: "| [00 Llama 3 at a glance](notebooks/00_llama3_....ipynb) | ..."
COURSE_MAP_ROW = re.compile(r"^\| \[[^\]]+\]\(notebooks/([^)/]+\.ipynb)\)", re.M)
# a row of README's "Going further" table: "| [06c lab: ...](notebooks/labs/06c_lab_....ipynb) |"
LAB_ROW = re.compile(r"^\| \[[^\]]+\]\(notebooks/labs/([^)/]+\.ipynb)\)", re.M)

student = load_tool("student")


def _solutions(nb):
    return [c for c in nb.cells if student.is_solution(c)]


def _checks(nb):
    return [c for c in nb.cells if student.is_check(c)]


# ---------------------------------------------------------------- the notebooks' exercises
def test_the_course_is_the_notebooks_in_the_readmes_course_map():
    listed = COURSE_MAP_ROW.findall((ROOT / "README.md").read_text(encoding="utf-8"))
    assert listed, "README.md has no course map (rows like '| [00 ...](notebooks/00_....ipynb) |')"
    assert listed == sorted(listed), f"README's course map is out of order: {listed}"
    assert listed == [p.name for p in NOTEBOOKS], (
        "README's course map and notebooks/ differ: only in README "
        f"{sorted(set(listed) - {p.name for p in NOTEBOOKS})}, only in notebooks/ "
        f"{sorted({p.name for p in NOTEBOOKS} - set(listed))}")


def test_notebook_00s_course_map_names_every_notebook_and_lab():
    """00's "The course" cell is the learner's map: a table row for each notebook of
    notebooks/ and each lab of notebooks/labs/, in order, named as the file is, and no other."""
    nb = nbformat.read(ROOT / "notebooks" / "00_llama3_at_a_glance.ipynb", as_version=4)
    [cell] = [c for c in nb.cells
              if c.cell_type == "markdown" and c.source.startswith("## The course")]
    rows = re.findall(r"^\| `(\d\d[a-z]?_\w+)`", cell.source, re.M)
    for part in ([r for r in rows if "_lab_" not in r], [r for r in rows if "_lab_" in r]):
        assert part == sorted(part), f"00's course map is out of order: {part}"
    files = [p.stem for p in (*NOTEBOOKS, *LABS)]
    assert sorted(rows) == sorted(files), (
        f"00's course map: not in notebooks/ {sorted(set(rows) - set(files))}, "
        f"not in the map {sorted(set(files) - set(rows))}")


def test_the_labs_are_named_after_a_chapter_and_listed_under_going_further():
    """A lab (notebooks/labs/) extends one chapter of the main line and is named after it (a
    chapter in parts by its number: 08_lab_x extends 08a and 08b);
    README lists every lab in its "Going further" table, in order, after the course map."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    chapters = {p.stem.split("_")[0] for p in NOTEBOOKS}
    chapters |= {c[:2] for c in chapters}  # a chapter taught in parts (08a, 08b) is also "08"
    for lab in LABS:
        assert chapter_of_lab(lab) in chapters, (
            f"{lab.name} extends chapter {chapter_of_lab(lab)}, which notebooks/ does not have")
    listed = LAB_ROW.findall(readme)
    assert listed == [p.name for p in LABS], (
        "README's \"Going further\" table and notebooks/labs/ differ: only in README "
        f"{sorted(set(listed) - {p.name for p in LABS})}, only in notebooks/labs/ "
        f"{sorted({p.name for p in LABS} - set(listed))}")
    if LABS:
        heading = readme.find("Going further")
        assert heading > 0 and all(readme.find(f"notebooks/labs/{p.name}") > heading
                                   for p in LABS), "README's lab rows sit under no 'Going further'"


@pytest.mark.parametrize("path", LABS, ids=LAB_IDS)
def test_a_labs_exercise_if_it_has_one_is_collapsed_and_checked(path):
    nb = nbformat.read(path, as_version=4)
    if _solutions(nb) or _checks(nb):
        assert student.exercise_problems(nb) == [], (path.name, student.exercise_problems(nb))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_every_notebook_has_a_collapsed_solution_and_a_check(path):
    nb = nbformat.read(path, as_version=4)
    solutions, checks = _solutions(nb), _checks(nb)
    assert solutions, f"{path.name} has no solution cell (a code cell tagged 'solution')"
    assert checks, f"{path.name} has no check cell (one calling a check_...() from exercises.py)"
    for cell in solutions:
        assert cell.metadata.get("jupyter", {}).get("source_hidden") is True, (
            f"{path.name}: solution cell {cell.source[:40]!r} is not collapsed "
            '(metadata "jupyter": {"source_hidden": true})')
    first_solution = nb.cells.index(solutions[0])
    assert any(nb.cells.index(c) > first_solution for c in checks), (
        f"{path.name}: no check cell comes after its first solution cell")


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=ALL_IDS)
def test_check_cells_call_checkers_that_exist(path):
    nb = nbformat.read(path, as_version=4)
    for cell in _checks(nb):
        for name in CHECK_CALL.findall(cell.source):
            assert callable(getattr(llama3_mini.exercises, name, None)), (
                f"{path.name} calls {name}, which llama3_mini/exercises.py does not define")


def _notebook(cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = cells
    return nb


def _solution_cell(source, hidden=True):
    meta = {"tags": ["solution"]}
    if hidden:
        meta["jupyter"] = {"source_hidden": True}
    return nbformat.v4.new_code_cell(source, metadata=meta)


def test_exercise_problems_name_what_is_missing():
    check = nbformat.v4.new_code_cell("assert check_count_params(f)")
    good = _notebook([nbformat.v4.new_markdown_cell("# x"), _solution_cell("def f(a): ..."), check])
    assert student.exercise_problems(good) == []
    assert "no solution cell" in " ".join(student.exercise_problems(_notebook([check])))
    lonely = _notebook([_solution_cell("def f(a): ...")])
    assert "no check cell" in " ".join(student.exercise_problems(lonely))
    shown = _notebook([_solution_cell("def f(a): ...", hidden=False), check])
    assert "not collapsed" in " ".join(student.exercise_problems(shown))
    late = _notebook([check, _solution_cell("def f(a): ...")])
    assert "no check cell after it" in " ".join(student.exercise_problems(late))


def test_make_student_names_a_notebook_without_an_exercise(tmp_path, capsys):
    src = tmp_path / "nbs"
    src.mkdir()
    nbformat.write(_notebook([nbformat.v4.new_markdown_cell("# no exercise")]), src / "03_x.ipynb")
    assert student.main([str(src), str(tmp_path / "out")]) == 0
    assert "03_x.ipynb: no solution cell" in capsys.readouterr().err


def test_make_student_copies_the_labs_into_their_own_folder(tmp_path):
    src, out = tmp_path / "nbs", tmp_path / "student"
    (src / "labs").mkdir(parents=True)
    check = nbformat.v4.new_code_cell("assert check_count_params(f)")
    nbformat.write(_notebook([_solution_cell("def f(a):\n    return 42\n"), check]),
                   src / "00_x.ipynb")
    nbformat.write(_notebook([_solution_cell("def g(a):\n    return 7\n"), check]),
                   src / "labs" / "00_lab_y.ipynb")
    assert student.main([str(src), str(out)]) == 0
    lab = nbformat.read(out / "labs" / "00_lab_y.ipynb", as_version=4)
    assert "return 7" not in lab.cells[0].source and "your turn" in lab.cells[0].source


def test_make_student_never_overwrites_a_learners_work_unless_forced(tmp_path, capsys):
    src, out = tmp_path / "nbs", tmp_path / "student"
    src.mkdir()
    check = nbformat.v4.new_code_cell("assert check_count_params(f)")
    nbformat.write(_notebook([_solution_cell("def f(a):\n    return 42\n"), check]),
                   src / "00_x.ipynb")
    assert student.main([str(src), str(out)]) == 0
    work = nbformat.read(out / "00_x.ipynb", as_version=4)
    work.cells[0].source = "def f(a):\n    return a  # the learner's attempt\n"
    nbformat.write(work, out / "00_x.ipynb")
    assert student.main([str(src), str(out)]) == 0
    assert "learner's attempt" in (out / "00_x.ipynb").read_text()
    assert "kept " + str(out / "00_x.ipynb") in capsys.readouterr().err
    assert student.main([str(src), str(out), "--force"]) == 0
    assert "learner's attempt" not in (out / "00_x.ipynb").read_text()
    assert student.main([str(src), str(out)]) == 0  # an unchanged copy is no conflict
    assert "kept" not in capsys.readouterr().err


# ---------------------------------------------------------------- stubs, by hand
STUB_CASES = [
    ("def f(a, b=2, *rest, key: int = 3, **kw) -> int:\n    '''Sum them.'''\n"
     "    def helper(x):\n        return x + 1\n    return helper(a) + b  # the answer\n",
     f"{student.STUB_NOTE}\ndef f(a, b=2, *rest, key: int=3, **kw) -> int:\n"
     '    """Sum them."""\n    raise NotImplementedError("your turn")\n'),
    ("import torch\n\n@torch.no_grad()\ndef g(x):\n    return x.softmax(-1)\n",
     f"{student.STUB_NOTE}\nimport torch\n\n\n@torch.no_grad()\ndef g(x):\n"
     "    raise NotImplementedError(\"your turn\")\n"),
    ("class Norm:\n    eps = 1e-5\n\n    def __call__(self, x):\n        return x / x.norm()\n",
     f"{student.STUB_NOTE}\nclass Norm:\n\n    def __call__(self, x):\n"
     "        raise NotImplementedError(\"your turn\")\n"),
    ("temperature = 0.7\nanswer = 2 ** 10\n",
     f"{student.STUB_NOTE}\n# Your turn: set temperature, answer\n"
     "raise NotImplementedError(\"your turn\")\n"),
    ("%%time\ndef h():\n    return 1\n",
     f"{student.STUB_NOTE}\nraise NotImplementedError(\"your turn\")\n"),
]


@pytest.mark.parametrize("source, expected", STUB_CASES, ids=["signature", "decorator", "class",
                                                                "assignment", "magic"])
def test_stub_keeps_signatures_and_drops_the_answer(source, expected):
    assert student.stub_source(source) == expected


# ---------------------------------------------------------------- student copies of the course
@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("student")
    assert student.main([str(ROOT / "notebooks"), str(out)]) == 0
    return out


class _Missing(dict):
    def __missing__(self, key):  # names from earlier cells (defaults, decorators)
        return None


def _answer_lines(source):
    """The lines of a solution that give the answer away: everything but the signatures,
    decorators, imports, docstrings, comments and blank lines."""
    tree = ast.parse(source)
    keep = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            keep.update(range(node.lineno, node.body[0].lineno))
            keep.update(d.lineno for d in node.decorator_list)
            if ast.get_docstring(node, clean=False) is not None:
                keep.update(range(node.body[0].lineno, node.body[0].end_lineno + 1))
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            keep.update(range(node.lineno, node.end_lineno + 1))
    lines = source.splitlines()
    return {lines[i - 1].strip() for i in range(1, len(lines) + 1) if i not in keep
            and lines[i - 1].strip() and not lines[i - 1].strip().startswith("#")}


def _student_copy(path, student_dir):
    """Where make student writes path's copy: student/NAME, or student/labs/NAME for a lab."""
    return student_dir / path.relative_to(ROOT / "notebooks")


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=ALL_IDS)
def test_student_copy_stubs_every_solution_and_keeps_everything_else(path, student_dir):
    original = nbformat.read(path, as_version=4)
    copy = nbformat.read(_student_copy(path, student_dir), as_version=4)
    nbformat.validate(copy)
    assert [c.cell_type for c in copy.cells] == [c.cell_type for c in original.cells]
    for before, after in zip(original.cells, copy.cells, strict=True):
        if student.is_solution(before):
            stub = after.source
            leaked = _answer_lines(before.source) & {line.strip() for line in stub.splitlines()}
            assert not leaked, f"{path.name}: solution lines survive in the student copy: {leaked}"
            assert 'NotImplementedError("your turn")' in stub
            assert after.outputs == [] and after.execution_count is None
            assert not after.metadata.get("jupyter", {}).get("source_hidden")
            assert "solution" not in student.tags(after)
        else:
            assert after.source == before.source
            assert after.get("outputs") == before.get("outputs"), (
                f"{path.name}: outputs of a non-solution cell changed")
    assert [c.source for c in _checks(copy)] == [c.source for c in _checks(original)], (
        f"{path.name}: a check cell is missing from the student copy")


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=ALL_IDS)
def test_student_stubs_have_the_solutions_signatures_and_say_your_turn(path, student_dir):
    original = nbformat.read(path, as_version=4)
    copy = nbformat.read(_student_copy(path, student_dir), as_version=4)
    for before, after in zip(original.cells, copy.cells, strict=True):
        if not student.is_solution(before):
            continue
        defs = {n.name: n for n in ast.parse(before.source).body
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        stub_defs = {n.name: n for n in ast.parse(after.source).body
                     if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        assert set(stub_defs) == set(defs), f"{path.name}: stub defines {set(stub_defs)}"
        for name, node in defs.items():
            assert ast.dump(stub_defs[name].args) == ast.dump(node.args), (
                f"{path.name}: {name}'s signature changed in the stub")
        namespace = _Missing()
        exec(compile(after.source, path.name, "exec"), {}, namespace)
        for name in defs:
            fn = namespace[name]
            params = inspect.signature(fn).parameters.values()
            positional = [None for p in params if p.default is p.empty
                          and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            keywords = {p.name: None for p in params
                        if p.default is p.empty and p.kind is p.KEYWORD_ONLY}
            with pytest.raises(NotImplementedError, match="your turn"):
                fn(*positional, **keywords)
