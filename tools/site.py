"""The course as a static site that works offline.

    python tools/site.py [notebooks/] [site/]      (or: make site)

Each notebook becomes one HTML page (nbconvert's JupyterLab template, with its stored
outputs and plots) with previous / contents / next links, and `index.html` lists them all;
the labs (notebooks/labs/, side studies named after the chapter they extend) get pages
beside them, listed under "Going further", each linking back to its chapter.
Nothing is fetched from the internet: the template's require.js, MathJax, Mermaid and
widget-manager scripts are left out (a last pass removes any external script or
stylesheet that remains), CSS is inline and images are embedded as data URIs. TeX in the
prose ($...$, $$...$$) is drawn by matplotlib's mathtext into inline SVG images (left as
code when mathtext cannot parse it). A widget
is drawn from its stored state as a still snapshot (its readout, its figure, the values
its controls had), with a note to open the notebook in JupyterLab to move them; a widget
whose state was not stored gets the note alone. Solution cells fold away under "Show
the solution", as they are collapsed in JupyterLab."""
from __future__ import annotations

import argparse
import base64
import copy
import html
import io
import re
import sys
from pathlib import Path

import jinja2
import nbformat
from nbconvert import HTMLExporter

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
OPEN_IN_LAB = ("This is an interactive widget. Open the notebook in JupyterLab "
               "(<code>make lab</code>) to move its controls.")

SITE_CSS = """
.l3m-nav { display: flex; justify-content: space-between; gap: 1em; padding: 0.6em 1em;
  margin: 0 0 1em 0; background: #f3f6fa; border-radius: 6px; font-family: sans-serif; }
.l3m-nav a { text-decoration: none; }
.l3m-widget { border: 1px solid #c8d3e0; border-radius: 6px; padding: 0.5em 0.8em; }
.l3m-widget-note { font-size: 90%; color: #555; font-style: italic; margin-bottom: 0.4em; }
.l3m-control { display: inline-block; margin: 0 1.2em 0.3em 0; font-family: monospace; }
.l3m-widget img { max-width: 100%; }
.l3m-math-display { text-align: center; margin: 0.6em 0; }
details.l3m-solution > summary { cursor: pointer; color: #1a5fb4; padding: 0.3em 0; }
"""

PAGE_TEMPLATE = r"""{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block extra_css -%}<style type="text/css">{{ resources.site_css }}</style>{%- endblock -%}
{%- block body_header -%}{{ super() }}{{ resources.site_nav }}{%- endblock body_header -%}
{%- block body_footer -%}{{ resources.site_nav }}{{ super() }}{%- endblock body_footer -%}
{#- pygments escapes the code it highlights: skip the (slow) HTML sanitiser on it -#}
{%- block input -%}
<div class="jp-CodeMirrorEditor jp-Editor jp-InputArea-editor" data-type="inline">
<div class="cm-editor cm-s-jupyter">
{{ cell.source | highlight_code(metadata=cell.metadata) }}
</div></div>
{%- endblock input -%}
{%- block input_group -%}
{%- if 'solution' in cell.metadata.get('tags', []) -%}
<details class="l3m-solution"><summary>Show the solution (try the exercise first)</summary>
{{ super() }}</details>
{%- else -%}{{ super() }}{%- endif -%}
{%- endblock input_group -%}
"""

INDEX_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; max-width: 52em; margin: 2em auto; padding: 0 1em;
  line-height: 1.5; color: #222; }}
li {{ margin-bottom: 0.8em; }} .summary {{ color: #444; }}
ul.toc {{ list-style: none; padding-left: 0; }}
ul.sections {{ font-size: 90%; margin-top: 0.3em; }} ul.sections li {{ margin-bottom: 0.1em; }}
</style></head>
<body><h1>{title}</h1>
<p>Every notebook of the course with its stored outputs. To run the code, change it and
do the exercises, open the notebooks in JupyterLab (<code>make lab</code>).</p>
<h2>Contents</h2>
<ul class="toc">
{items}
</ul>{labs}</body></html>
"""
LABS_TEMPLATE = """
<h2>Going further: the labs</h2>
<p>Side studies that answer a follow-up question of a chapter; the main line never needs them.</p>
<ul class="toc">
{items}
</ul>"""

EXTERNAL = re.compile(r"^\s*(https?:)?//", re.I)
SCRIPT_SRC = re.compile(r"<script\b[^>]*\bsrc\s*=\s*[\"']?\s*(https?:)?//[^>]*>.*?</script>",
                        re.I | re.S)
LINK_HREF = re.compile(r"<link\b[^>]*\bhref\s*=\s*[\"']?\s*(https?:)?//[^>]*>", re.I)
CSS_IMPORT = re.compile(r"@import\s+(url\()?\s*[\"']?(https?:)?//[^;]*;", re.I)


def strip_external(page: str) -> str:
    """Remove every script, link (stylesheet, font, icon) and CSS @import that points
    outside the page; ordinary <a href> links to web pages stay."""
    for pattern in (SCRIPT_SRC, LINK_HREF, CSS_IMPORT):
        page = pattern.sub("", page)
    return page


def title_of(nb, fallback: str) -> str:
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            match = re.search(r"^#\s+(.+)$", cell.source, re.M)
            if match:
                return match.group(1).strip()
    return fallback


def summary_of(nb, limit: int = 300) -> str:
    """The first paragraph after the notebook's title, as plain text."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            paragraphs = [p.strip() for p in cell.source.split("\n\n")]
            text = next((p for p in paragraphs if p and not p.startswith("#")), "")
            text = re.sub(r"[*_`]|\[([^]]*)\]\([^)]*\)", lambda m: m.group(1) or "", text)
            text = " ".join(text.split())
            return text if len(text) <= limit else text[: limit - 1].rsplit(" ", 1)[0] + " …"
    return ""


# --- widgets: a still picture of the stored state -------------------------------------------

def _image_data(model: dict) -> str | None:
    for buffer in model.get("buffers", []):
        if buffer.get("path") == ["value"]:
            return buffer["data"] if buffer.get("encoding", "base64") == "base64" else None
    value = model["state"].get("value")
    return value if isinstance(value, str) else None


def _control(state: dict) -> str:
    if "_options_labels" in state and state.get("index") is not None:
        index = state["index"]
        labels = state["_options_labels"]
        value = ", ".join(labels[i] for i in index) if isinstance(index, list) else labels[index]
    else:
        value = state.get("value", "")
    label = state.get("description") or ""
    return (f'<span class="l3m-control"><b>{html.escape(str(label))}</b> '
            f"{html.escape(str(value))}</span>")


def widget_html(model_id: str, states: dict, depth: int = 0) -> str:
    """Static HTML for one widget from the notebook's stored widget state."""
    model = states.get(model_id.removeprefix("IPY_MODEL_"))
    if model is None or depth > 20:
        return ""
    name, state = model.get("model_name", ""), model.get("state", {})
    if "children" in state:  # VBox, HBox, Box, GridBox, Tab, Accordion
        direction = "row" if name.startswith("HBox") else "column"
        inner = "".join(widget_html(c, states, depth + 1) for c in state["children"])
        return (f'<div style="display:flex; flex-direction:{direction}; flex-wrap:wrap; '
                f'gap:0.3em">{inner}</div>')
    if name == "ImageModel":
        data = _image_data(model)
        mime = "image/" + state.get("format", "png").replace("svg", "svg+xml")
        return f'<img alt="widget figure" src="data:{mime};base64,{data}">' if data else ""
    if name in ("HTMLModel", "HTMLMathModel"):
        return f"<div>{state.get('value', '')}</div>"
    if name == "LabelModel":
        return f"<div>{html.escape(str(state.get('value', '')))}</div>"
    if name == "OutputModel":
        return "".join(_output_html(output) for output in state.get("outputs", []))
    if name in ("FloatProgressModel", "IntProgressModel"):  # tqdm's bars, for one
        return (f'<progress value="{state.get("value", 0)}" max="{state.get("max", 100)}">'
                "</progress>")
    if name == "ButtonModel":
        return f'<span class="l3m-control">[{html.escape(state.get("description", ""))}]</span>'
    if "value" in state or "_options_labels" in state:
        return _control(state)
    return ""


PASSIVE = ("Box", "VBox", "HBox", "GridBox", "HTML", "HTMLMath", "Label", "Image", "Output",
           "FloatProgress", "IntProgress", "Layout", "Style")


def has_controls(model_id: str, states: dict, depth: int = 0) -> bool:
    """Whether the widget has anything a learner could move (a slider, a menu, a button)."""
    model = states.get(model_id.removeprefix("IPY_MODEL_"))
    if model is None or depth > 20:
        return False
    name = model.get("model_name", "").removesuffix("Model")
    if not any(name == p or name.endswith("Style") for p in PASSIVE):
        return True
    return any(has_controls(c, states, depth + 1)
               for c in model.get("state", {}).get("children", []))


def _output_html(output: dict) -> str:
    data = output.get("data", {})
    if "image/png" in data:
        return f'<img alt="output" src="data:image/png;base64,{data["image/png"]}">'
    text = output.get("text") or data.get("text/plain") or ""
    return f"<pre>{html.escape(''.join(text))}</pre>" if text else ""


def render_widgets(nb) -> None:
    """Replace each widget output by a snapshot of its stored state (or a note), and drop
    the notebook's widget state, so the page needs no widget manager."""
    stored = nb.metadata.pop("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            view = output.get("data", {}).get(WIDGET_VIEW)
            if view is None:
                continue
            model_id = view.get("model_id", "")
            snapshot = widget_html(model_id, stored)
            if not snapshot:
                note = OPEN_IN_LAB
            elif has_controls(model_id, stored):
                note = "A still snapshot of the widget as it was stored. " + OPEN_IN_LAB
            else:  # a progress bar or a figure: nothing to move, nothing to say
                note = ""
            note = f'<div class="l3m-widget-note">{note}</div>' if note else ""
            output["data"] = {"text/html": f'<div class="l3m-widget">{note}{snapshot}</div>'}


MATH = re.compile(r"(`+)(?:.|\n)*?\1|\$\$((?:.|\n)+?)\$\$|\$([^$\n]+?)\$")
TEX_TO_MATHTEXT = {r"\tfrac": r"\frac", r"\text{": r"\mathrm{", r"\operatorname{": r"\mathrm{",
                   r"\lvert": "|", r"\rvert": "|"}


def math_image(tex: str, display: bool = False) -> str:
    """An <img> of the TeX drawn by matplotlib's mathtext, or the TeX as a code span."""
    from matplotlib import font_manager, mathtext

    source = tex.strip()
    for old, new in TEX_TO_MATHTEXT.items():
        source = source.replace(old, new)
    buffer = io.BytesIO()
    try:
        depth = mathtext.math_to_image(f"${source}$", buffer, format="svg",
                                       prop=font_manager.FontProperties(size=15 if display else 13))
    except ValueError:  # shown as code, as markdown writes it
        return f"`` {tex} ``"
    data = base64.b64encode(buffer.getvalue()).decode()
    img = (f'<img class="l3m-math" alt="{html.escape(tex, quote=True)}" '
           f'style="vertical-align: -{depth:.1f}pt" src="data:image/svg+xml;base64,{data}">')
    return f'<div class="l3m-math-display">{img}</div>' if display else img


def render_math(nb) -> None:
    """Draw the prose's math offline, so no page needs MathJax from a CDN."""
    def replace(match):
        if match.group(1):  # a code span: leave its dollars alone
            return match.group(0)
        display = match.group(2) is not None
        return math_image(match.group(2) if display else match.group(3), display)

    for cell in nb.cells:
        if cell.cell_type == "markdown" and "$" in cell.source:
            cell.source = MATH.sub(replace, cell.source)


def link_pages(nb) -> None:
    """Links between notebooks (`05_x.ipynb#part`) point at their pages instead."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            cell.source = re.sub(r"(\]\(|href=[\"'])(?!https?:)([\w./-]+)\.ipynb\b",
                                 lambda m: m.group(1) + Path(m.group(2)).name + ".html",
                                 cell.source)


def sections_of(page: str) -> list[tuple[str, str]]:
    """(anchor id, text) of each second-level heading of a rendered page."""
    found = re.findall(r'<h2 id="([^"]+)">(.*?)<a class="anchor-link"', page, re.S)
    return [(anchor, html.unescape(re.sub(r"<[^>]+>", "", text)).strip())
            for anchor, text in found]


def _nav(pages: list[tuple[str, str]], i: int) -> str:
    prev = (f'<a href="{pages[i - 1][0]}">← {html.escape(pages[i - 1][1])}</a>'
            if i > 0 else "<span></span>")
    nxt = (f'<a href="{pages[i + 1][0]}">{html.escape(pages[i + 1][1])} →</a>'
           if i + 1 < len(pages) else "<span></span>")
    return f'<nav class="l3m-nav">{prev}<a href="index.html">Contents</a>{nxt}</nav>'


def _lab_nav(chapter: tuple[str, str] | None) -> str:
    back = (f'<a href="{chapter[0]}">← {html.escape(chapter[1])}</a>' if chapter
            else "<span></span>")
    return f'<nav class="l3m-nav">{back}<a href="index.html">Contents</a><span></span></nav>'


def _items(pages, notebooks, sections) -> str:
    return "\n".join(
        f'<li><a href="{page}">{html.escape(title)}</a><br>'
        f'<span class="summary">{html.escape(summary_of(nb))}</span>'
        '<ul class="sections">' + "".join(f'<li><a href="{page}#{anchor}">{html.escape(text)}</a>'
                                          f"</li>" for anchor, text in parts) + "</ul></li>"
        for (page, title), nb, parts in zip(pages, notebooks, sections, strict=True))


def exporter() -> HTMLExporter:
    loader = jinja2.DictLoader({"l3m_page.html.j2": PAGE_TEMPLATE})
    return HTMLExporter(template_name="lab", template_file="l3m_page.html.j2",
                        extra_loaders=[loader], embed_images=True)


def build_site(src: Path, dst: Path, course: str = "llama3-mini") -> list[Path]:
    """Render every notebook in src (and src/labs/) to dst, plus index.html; returns the
    pages written. Lab pages sit beside the others, so links between notebooks, which
    link_pages points at `<name>.html`, work from either."""
    src, dst = Path(src), Path(dst)
    paths = sorted(p for p in src.glob("*.ipynb") if not p.name.startswith("."))
    if not paths:
        raise FileNotFoundError(f"no notebooks in {src}: give the course's notebooks folder")
    labs = sorted(p for p in (src / "labs").glob("*.ipynb") if not p.name.startswith("."))
    dst.mkdir(parents=True, exist_ok=True)
    notebooks = [nbformat.read(p, as_version=4) for p in paths]
    lab_notebooks = [nbformat.read(p, as_version=4) for p in labs]
    pages = [(p.stem + ".html", title_of(nb, p.stem))
             for p, nb in zip(paths, notebooks, strict=True)]
    lab_pages = [(p.stem + ".html", title_of(nb, p.stem))
                 for p, nb in zip(labs, lab_notebooks, strict=True)]
    by_number = {p.stem.split("_")[0]: page for p, page in zip(paths, pages, strict=True)}
    for p, page in zip(paths, pages, strict=True):  # a chapter in parts (08a, 08b): a lab
        by_number.setdefault(p.stem[:2], page)  # named after it (08_lab_x) links its first
    navs = [_nav(pages, i) for i in range(len(pages))] + [
        _lab_nav(by_number.get(p.stem.split("_")[0])) for p in labs]
    html_exporter, written, sections = exporter(), [], []
    for path, nb, (page, title), nav in zip(paths + labs, notebooks + lab_notebooks,
                                            pages + lab_pages, navs, strict=True):
        nb = copy.deepcopy(nb)
        nb.metadata["title"] = title
        render_widgets(nb)
        render_math(nb)
        link_pages(nb)
        resources = {"metadata": {"path": str(path.parent), "name": path.stem},
                     "site_nav": nav, "site_css": SITE_CSS}
        body, _ = html_exporter.from_notebook_node(nb, resources=resources)
        body = strip_external(body)
        sections.append(sections_of(body))
        (dst / page).write_text(body, encoding="utf-8")
        written.append(dst / page)
    items = _items(pages, notebooks, sections[:len(pages)])
    lab_items = (LABS_TEMPLATE.format(items=_items(lab_pages, lab_notebooks,
                                                   sections[len(pages):])) if labs else "")
    index = INDEX_TEMPLATE.format(title=html.escape(course), items=items, labs=lab_items)
    (dst / "index.html").write_text(index, encoding="utf-8")
    return [dst / "index.html", *written]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", nargs="?", default="notebooks", type=Path)
    parser.add_argument("dst", nargs="?", default="site", type=Path)
    opts = parser.parse_args(argv)
    written = build_site(opts.src, opts.dst)
    print(f"wrote {len(written)} pages to {opts.dst}/ (open {opts.dst}/index.html)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
