"""The class length of each notebook, estimated from what a learner reads and does and from the
questions a class discusses: `python tools/class_length.py notebooks/*.ipynb`.

minutes = prose words / 100 (careful reading of technical text)
        + lines of code / 8 (reading each cell, running it, reading its output)
        + 10 per exercise (a solution cell to write and check)
        + 5 per class question (TEACHING.md's "Questions for the class": asked, thought
          about, answered with what the notebook printed)
        + 5 to start (open the notebook, run the set-up, say what the class is for)
rounded up to 5 minutes. A chapter taught in parts (01a and 01b) shares its questions between
them, the first part taking the odd one; a question marked "(Lab `NAME`.)" counts for that lab
instead. An estimate to plan a class with, not a measurement: without the questions and the
start, a teacher who tried it found the estimates 1.3 to 2 times short.
tests/test_docs_in_step.py checks that TEACHING.md's time table quotes these numbers."""
import math
import re
import sys
from pathlib import Path

import nbformat

WORDS_PER_MINUTE, CODE_LINES_PER_MINUTE, MINUTES_PER_EXERCISE = 100, 8, 10
MINUTES_PER_QUESTION, MINUTES_TO_START = 5, 5
TEACHING = Path(__file__).resolve().parent.parent / "TEACHING.md"


def _sections(text: str) -> dict:
    """TEACHING.md's notebook sections: {"00": body, "01a 01b": body, ...} by their heading."""
    out, parts = {}, re.split(r"^### ", text, flags=re.M)
    for part in parts[1:]:
        heading, _, body = part.partition("\n")
        if " · " not in heading:  # "### Prerequisites", "### A 12-week term": not a notebook's
            continue
        names = re.findall(r"\b(\d\d[a-z]?)\b", heading.split(" · ")[0])
        if names:
            out[" ".join(names)] = body
    return out


def _questions(body: str) -> list[str]:
    """The bullets under "**Questions for the class.**", up to the next heading or paragraph."""
    _, found, rest = body.partition("**Questions for the class.**")
    if not found:
        return []
    bullets = []
    for line in rest.splitlines():
        if line.startswith("- "):
            bullets.append(line[2:])
        elif line.startswith("  ") and bullets:
            bullets[-1] += " " + line.strip()
        elif bullets or line.strip():  # a blank line or a paragraph after the list ends it
            break
    return bullets


def class_questions(path, teaching=TEACHING) -> int:
    """How many of TEACHING.md's class questions belong to this notebook (or lab)."""
    path = Path(path)
    text = Path(teaching).read_text(encoding="utf-8") if Path(teaching).is_file() else ""
    stem = path.stem
    if "_lab_" in stem:  # a lab: the questions its chapter's section marks as its own
        return sum(f"(Lab `{stem}`" in q for body in _sections(text).values()
                   for q in _questions(body))
    number = stem.split("_")[0]
    for names, body in _sections(text).items():
        parts = names.split()
        if number in parts:
            mine = [q for q in _questions(body) if not q.startswith("(Lab `")]
            share, extra = divmod(len(mine), len(parts))
            return share + (1 if parts.index(number) < extra else 0)
    return 0


def estimate(path, teaching=TEACHING) -> dict:
    nb = nbformat.read(path, as_version=4)
    words = sum(len(c.source.split()) for c in nb.cells if c.cell_type == "markdown")
    code = [c for c in nb.cells
            if c.cell_type == "code" and "setup" not in c.metadata.get("tags", [])]
    lines = sum(1 for c in code for line in c.source.splitlines()
                if line.strip() and not line.strip().startswith("#"))
    exercises = sum("solution" in c.metadata.get("tags", []) for c in code)
    questions = class_questions(path, teaching)
    minutes = (words / WORDS_PER_MINUTE + lines / CODE_LINES_PER_MINUTE
               + MINUTES_PER_EXERCISE * exercises + MINUTES_PER_QUESTION * questions
               + MINUTES_TO_START)
    return {"words": words, "code_lines": lines, "exercises": exercises,
            "questions": questions, "minutes": 5 * math.ceil(minutes / 5)}


if __name__ == "__main__":
    for path in sys.argv[1:]:
        e = estimate(path)
        print(f"{path}: {e['words']} words, {e['code_lines']} lines of code, "
              f"{e['exercises']} exercise(s), {e['questions']} class question(s): "
              f"about {e['minutes']} min")
