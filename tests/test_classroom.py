"""The classroom kit: every notebook has a self-checking exercise, `make student` strips the
solutions without losing a check, and `make site` renders pages that fetch nothing from
the internet."""
import ast
import importlib.util
import inspect
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest

import llama3_mini.exercises

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
IDS = [p.stem for p in NOTEBOOKS]
CHECK_CALL = re.compile(r"\b(check_\w+)\s*\(")


def _load(name):
    path = ROOT / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"l3m_tools_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


student = _load("student")
site = _load("site")


def _tags(cell):
    return cell.get("metadata", {}).get("tags", [])


def _solutions(nb):
    return [c for c in nb.cells if c.cell_type == "code" and "solution" in _tags(c)]


def _checks(nb):
    return [c for c in nb.cells if c.cell_type == "code" and "solution" not in _tags(c)
            and CHECK_CALL.search(c.source)]


# ---------------------------------------------------------------- the notebooks' exercises
def test_the_course_has_notebooks():
    assert len(NOTEBOOKS) >= 2, f"expected the course's notebooks in {ROOT / 'notebooks'}"


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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_student_copy_stubs_every_solution_and_keeps_everything_else(path, student_dir):
    original = nbformat.read(path, as_version=4)
    copy = nbformat.read(student_dir / path.name, as_version=4)
    nbformat.validate(copy)
    assert [c.cell_type for c in copy.cells] == [c.cell_type for c in original.cells]
    for before, after in zip(original.cells, copy.cells, strict=True):
        if before.cell_type == "code" and "solution" in _tags(before):
            stub = after.source
            leaked = _answer_lines(before.source) & {line.strip() for line in stub.splitlines()}
            assert not leaked, f"{path.name}: solution lines survive in the student copy: {leaked}"
            assert 'NotImplementedError("your turn")' in stub
            assert after.outputs == [] and after.execution_count is None
            assert not after.metadata.get("jupyter", {}).get("source_hidden")
            assert "solution" not in _tags(after)
        else:
            assert after.source == before.source
            assert after.get("outputs") == before.get("outputs"), (
                f"{path.name}: outputs of a non-solution cell changed")
    assert [c.source for c in _checks(copy)] == [c.source for c in _checks(original)], (
        f"{path.name}: a check cell is missing from the student copy")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_student_stubs_have_the_solutions_signatures_and_say_your_turn(path, student_dir):
    original = nbformat.read(path, as_version=4)
    copy = nbformat.read(student_dir / path.name, as_version=4)
    for before, after in zip(original.cells, copy.cells, strict=True):
        if not (before.cell_type == "code" and "solution" in _tags(before)):
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


# ---------------------------------------------------------------- the static site
class _Requests(HTMLParser):
    """Everything a page would fetch by itself: script and media sources, <link> hrefs,
    CSS imports and urls, and URLs inside inline scripts."""

    def __init__(self):
        super().__init__()
        self.fetches, self.anchors, self._in = [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a" and attrs.get("href"):
            self.anchors.append(attrs["href"])
        if attrs.get("src"):
            self.fetches.append((tag, attrs["src"]))
        if tag == "link" and attrs.get("href"):
            self.fetches.append((tag, attrs["href"]))
        if tag == "object" and attrs.get("data"):
            self.fetches.append((tag, attrs["data"]))
        if attrs.get("style"):
            self.fetches += [("style", u) for u in _css_urls(attrs["style"])]
        self._in = tag if tag in ("script", "style") else None

    def handle_endtag(self, tag):
        self._in = None

    def handle_data(self, data):
        if self._in == "style":
            self.fetches += [("style", u) for u in _css_urls(data)]
        elif self._in == "script":
            self.fetches += [("script", u) for u in re.findall(r"(?:https?:)?//[\w.-]+\.\w+", data)]


def _css_urls(css):
    css = re.sub(r"/\*.*?\*/", "", css, flags=re.S)
    return (re.findall(r"url\(\s*['\"]?([^'\")]+)", css)
            + re.findall(r"@import\s+['\"]([^'\"]+)", css))


def _external(url):
    return bool(re.match(r"\s*(https?:)?//", url, re.I))


def _parse(page):
    parser = _Requests()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    assert site.main([str(ROOT / "notebooks"), str(out)]) == 0
    return out


def test_site_has_a_contents_page_linking_every_notebook_in_order(site_dir):
    links = [a for a in _parse(site_dir / "index.html").anchors if a.endswith(".html")]
    assert links == [p.stem + ".html" for p in NOTEBOOKS]
    for link in links:
        assert (site_dir / link).is_file(), f"{link} is listed but was not written"
    sections = [a for a in _parse(site_dir / "index.html").anchors if "#" in a]
    assert len(sections) >= len(NOTEBOOKS), "the contents list no notebook's sections"
    for link in sections:
        page, anchor = link.split("#", 1)
        assert f'id="{anchor}"' in (site_dir / page).read_text(encoding="utf-8"), (
            f"contents link {link} points at no heading")


def test_site_pages_link_previous_contents_and_next(site_dir):
    pages = [p.stem + ".html" for p in NOTEBOOKS]
    for i, page in enumerate(pages):
        anchors = set(_parse(site_dir / page).anchors)
        assert "index.html" in anchors, f"{page} has no link to the contents"
        assert (i > 0 and pages[i - 1] in anchors) or (i == 0), f"{page}: no previous link"
        assert (i + 1 < len(pages) and pages[i + 1] in anchors) or i + 1 == len(pages), (
            f"{page}: no next link")


def test_no_site_page_fetches_anything_from_the_internet(site_dir):
    for page in sorted(site_dir.glob("*.html")):
        external = [(tag, url) for tag, url in _parse(page).fetches if _external(url)]
        assert not external, f"{page.name} would fetch {external}"


def test_site_pages_keep_stored_plots_and_fold_solutions(site_dir):
    for path in NOTEBOOKS:
        page = (site_dir / (path.stem + ".html")).read_text(encoding="utf-8")
        nb = nbformat.read(path, as_version=4)
        plots = sum("image/png" in out.get("data", {})
                    for cell in nb.cells for out in cell.get("outputs", []))
        assert page.count("data:image/png;base64,") >= plots, f"{path.name}: a plot went missing"
        assert page.count('<details class="l3m-solution">') == len(_solutions(nb))


def test_strip_external_removes_scripts_and_stylesheets_but_keeps_links():
    page = ('<script src="https://cdn.example/require.js"></script>'
            "<link rel='stylesheet' href='//fonts.example/a.css'>"
            '<style>@import url("https://fonts.example/b.css"); p {color: red}</style>'
            '<script src="local.js"></script><a href="https://ai.meta.com/blog">Meta</a>')
    cleaned = site.strip_external(page)
    assert "cdn.example" not in cleaned and "fonts.example" not in cleaned
    assert 'src="local.js"' in cleaned and 'href="https://ai.meta.com/blog"' in cleaned
    assert "p {color: red}" in cleaned


def _widget_notebook(with_state):
    import ipywidgets as widgets
    from ipywidgets.embed import embed_data

    png = b"\x89PNG\r\n\x1a\nnot-really-a-png"
    box = widgets.VBox([widgets.IntSlider(value=7, description="layer"),
                        widgets.Dropdown(options=["MHA", "GQA"], value="GQA", description="heads"),
                        widgets.HTML("<b>KV cache</b> 42 bytes"), widgets.Image(value=png)])
    data = embed_data(views=[box])
    output = nbformat.v4.new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": data["view_specs"][0],
        "text/plain": "VBox(...)"})
    nb = _notebook([nbformat.v4.new_markdown_cell("# 99 · Widgets\n\nSee [05](05_cache.ipynb)."),
                    nbformat.v4.new_code_cell("box", outputs=[output])])
    if with_state:
        nb.metadata["widgets"] = {site.WIDGET_STATE: data["manager_state"]}
    return nb, png


@pytest.mark.parametrize("with_state", [True, False], ids=["stored-state", "no-state"])
def test_widgets_render_offline_from_their_stored_state(tmp_path, with_state):
    import base64

    nb, png = _widget_notebook(with_state)
    (tmp_path / "nbs").mkdir()
    nbformat.write(nb, tmp_path / "nbs" / "99_widgets.ipynb")
    site.build_site(tmp_path / "nbs", tmp_path / "site")
    page = (tmp_path / "site" / "99_widgets.html").read_text(encoding="utf-8")
    assert "Open the notebook in JupyterLab" in page
    assert "widget-view+json" not in page and "widget-state+json" not in page
    assert 'href="05_cache.html"' in page
    shown = ["<b>layer</b> 7", "<b>heads</b> GQA", "<b>KV cache</b> 42 bytes",
             base64.b64encode(png).decode()]
    assert all((s in page) == with_state for s in shown), shown


def test_site_pages_make_no_request_in_a_real_browser(site_dir):
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    requests = []
    with sync_api.sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        except Exception as error:  # no browser here: `make browser` installs one
            pytest.skip(f"no Chromium to drive ({type(error).__name__}); run `make browser`")
        page = browser.new_page()
        page.on("request", lambda r: requests.append(r.url))
        for html_file in sorted(site_dir.glob("*.html")):
            page.goto(html_file.as_uri(), wait_until="load")
        browser.close()
    outside = [u for u in requests if not u.startswith(("file:", "data:"))]
    assert not outside, f"pages requested {outside}"
    assert len(requests) >= len(NOTEBOOKS) + 1


def test_math_in_the_prose_is_drawn_offline(tmp_path):
    import base64
    import xml.etree.ElementTree as ET

    prose = ("# 98 · Math\n\nEach pair turns at $\\omega_i = \\theta^{-2i/d}$:\n\n"
             "$$\\mathrm{RMSNorm}(x) = \\frac{x}{\\sqrt{\\tfrac{1}{d}\\sum_i x_i^2}}$$\n\n"
             "Not math: `echo $HOME $PATH`. Not drawable: $\\notacommand{x}$.")
    (tmp_path / "nbs").mkdir()
    nbformat.write(_notebook([nbformat.v4.new_markdown_cell(prose)]), tmp_path / "nbs" / "98.ipynb")
    site.build_site(tmp_path / "nbs", tmp_path / "site")
    page = (tmp_path / "site" / "98.html").read_text(encoding="utf-8")
    images = [(re.search(r'alt="([^"]*)"', tag).group(1),
               re.search(r'src="data:image/svg\+xml;base64,([^"]+)"', tag).group(1))
              for tag in re.findall(r"<img [^>]*>", page) if 'class="l3m-math"' in tag]
    assert [alt for alt, _ in images] == [
        "\\omega_i = \\theta^{-2i/d}", "\\mathrm{RMSNorm}(x) = \\frac{x}{\\sqrt{\\tfrac{1}{d}"
        "\\sum_i x_i^2}}"]
    for _, data in images:
        assert ET.fromstring(base64.b64decode(data)).tag.endswith("svg")
    assert "echo $HOME $PATH" in page
    assert "<code>\\notacommand{x}</code>" in page


def test_a_progress_bar_renders_as_a_bar_with_no_note(tmp_path):
    import ipywidgets as widgets
    from ipywidgets.embed import embed_data

    bar = widgets.HBox([widgets.HTML("training: 75%"), widgets.FloatProgress(value=3, max=4)])
    data = embed_data(views=[bar])
    output = nbformat.v4.new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": data["view_specs"][0]})
    nb = _notebook([nbformat.v4.new_code_cell("train()", outputs=[output])])
    nb.metadata["widgets"] = {site.WIDGET_STATE: data["manager_state"]}
    (tmp_path / "nbs").mkdir()
    nbformat.write(nb, tmp_path / "nbs" / "97_bar.ipynb")
    site.build_site(tmp_path / "nbs", tmp_path / "site")
    page = (tmp_path / "site" / "97_bar.html").read_text(encoding="utf-8")
    assert re.search(r'<progress max="4(\.0)?" value="3(\.0)?">|<progress value="3(\.0)?" '
                     r'max="4(\.0)?">', page)
    assert "training: 75%" in page and "Open the notebook in JupyterLab" not in page
