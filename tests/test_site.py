"""`make site`: the course as static pages that fetch nothing from the internet, with a
contents page, links from page to page, stored plots, folded solutions, widgets drawn from
their stored state, and the prose's math drawn offline."""
import re
import shutil
from html.parser import HTMLParser

import nbformat
import pytest
from nb_support import ALL_NOTEBOOKS, LABS, NOTEBOOKS, ROOT, chapter_of_lab, load_tool

site = load_tool("site")
student = load_tool("student")


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


@pytest.mark.slow
def test_site_has_a_contents_page_linking_every_notebook_in_order(site_dir):
    links = [a for a in _parse(site_dir / "index.html").anchors if a.endswith(".html")]
    assert links == [p.stem + ".html" for p in NOTEBOOKS + LABS]  # labs: "Going further"
    for link in links:
        assert (site_dir / link).is_file(), f"{link} is listed but was not written"
    sections = [a for a in _parse(site_dir / "index.html").anchors if "#" in a]
    assert len(sections) >= len(NOTEBOOKS), "the contents list no notebook's sections"
    for link in sections:
        page, anchor = link.split("#", 1)
        assert f'id="{anchor}"' in (site_dir / page).read_text(encoding="utf-8"), (
            f"contents link {link} points at no heading")


@pytest.mark.slow
def test_site_pages_link_previous_contents_and_next(site_dir):
    pages = [p.stem + ".html" for p in NOTEBOOKS]
    for i, page in enumerate(pages):
        anchors = set(_parse(site_dir / page).anchors)
        assert "index.html" in anchors, f"{page} has no link to the contents"
        assert (i > 0 and pages[i - 1] in anchors) or (i == 0), f"{page}: no previous link"
        assert (i + 1 < len(pages) and pages[i + 1] in anchors) or i + 1 == len(pages), (
            f"{page}: no next link")


@pytest.mark.slow
def test_lab_pages_link_the_contents_and_the_chapter_they_extend(site_dir):
    chapters = {p.stem.split("_")[0]: p.stem + ".html" for p in NOTEBOOKS}
    for p in NOTEBOOKS:  # a lab named after a chapter in parts (08_lab_x) links its first part
        chapters.setdefault(p.stem[:2], p.stem + ".html")
    for lab in LABS:
        anchors = set(_parse(site_dir / (lab.stem + ".html")).anchors)
        assert {"index.html", chapters[chapter_of_lab(lab)]} <= anchors, (
            f"{lab.stem}.html does not link the contents and chapter {chapter_of_lab(lab)}")


def test_a_lab_is_listed_under_going_further_and_links_back(tmp_path):
    src = tmp_path / "nbs"
    (src / "labs").mkdir(parents=True)
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Ch")]),
                   src / "06c_x.ipynb")
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(
        "# Lab\n\nBack to [the chapter](../06c_x.ipynb).")]), src / "labs" / "06c_lab_y.ipynb")
    site.build_site(src, tmp_path / "site")
    index = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    assert "Going further" in index and index.index("06c_x.html") < index.index("06c_lab_y.html")
    lab = (tmp_path / "site" / "06c_lab_y.html").read_text(encoding="utf-8")
    assert lab.count('href="06c_x.html"') >= 2  # the nav's link back and the prose's link


@pytest.mark.slow
def test_no_site_page_fetches_anything_from_the_internet(site_dir):
    for page in sorted(site_dir.glob("*.html")):
        external = [(tag, url) for tag, url in _parse(page).fetches if _external(url)]
        assert not external, f"{page.name} would fetch {external}"


@pytest.mark.slow
def test_site_pages_keep_stored_plots_and_fold_solutions(site_dir):
    for path in ALL_NOTEBOOKS:
        page = (site_dir / (path.stem + ".html")).read_text(encoding="utf-8")
        nb = nbformat.read(path, as_version=4)
        plots = sum("image/png" in out.get("data", {})
                    for cell in nb.cells for out in cell.get("outputs", []))
        assert page.count("data:image/png;base64,") >= plots, f"{path.name}: a plot went missing"
        solutions = sum(map(student.is_solution, nb.cells))
        assert page.count('<details class="l3m-solution">') == solutions


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
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# 99 · Widgets\n\nSee [05](05_cache.ipynb)."),
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


@pytest.mark.slow
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
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(prose)])
    nbformat.write(nb, tmp_path / "nbs" / "98.ipynb")
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
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("train()", outputs=[output])])
    nb.metadata["widgets"] = {site.WIDGET_STATE: data["manager_state"]}
    (tmp_path / "nbs").mkdir()
    nbformat.write(nb, tmp_path / "nbs" / "97_bar.ipynb")
    site.build_site(tmp_path / "nbs", tmp_path / "site")
    page = (tmp_path / "site" / "97_bar.html").read_text(encoding="utf-8")
    assert re.search(r'<progress max="4(\.0)?" value="3(\.0)?">|<progress value="3(\.0)?" '
                     r'max="4(\.0)?">', page)
    assert "training: 75%" in page and "Open the notebook in JupyterLab" not in page
