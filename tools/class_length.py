"""The class length of each notebook, estimated from what a learner reads and does:
`python tools/class_length.py notebooks/*.ipynb`.

minutes = prose words / 100 (careful reading of technical text)
        + lines of code / 8 (reading each cell, running it, reading its output)
        + 10 per exercise (a solution cell to write and check)
rounded to 5 minutes. An estimate to plan a class with, not a measurement: a class that
discusses the questions in TEACHING.md needs more. tests/test_docs_in_step.py checks that
TEACHING.md's time table quotes these numbers."""
import math
import sys

import nbformat

WORDS_PER_MINUTE, CODE_LINES_PER_MINUTE, MINUTES_PER_EXERCISE = 100, 8, 10


def estimate(path) -> dict:
    nb = nbformat.read(path, as_version=4)
    words = sum(len(c.source.split()) for c in nb.cells if c.cell_type == "markdown")
    code = [c for c in nb.cells
            if c.cell_type == "code" and "setup" not in c.metadata.get("tags", [])]
    lines = sum(1 for c in code for line in c.source.splitlines()
                if line.strip() and not line.strip().startswith("#"))
    exercises = sum("solution" in c.metadata.get("tags", []) for c in code)
    minutes = (words / WORDS_PER_MINUTE + lines / CODE_LINES_PER_MINUTE
               + MINUTES_PER_EXERCISE * exercises)
    return {"words": words, "code_lines": lines, "exercises": exercises,
            "minutes": 5 * math.ceil(minutes / 5)}


if __name__ == "__main__":
    for path in sys.argv[1:]:
        e = estimate(path)
        print(f"{path}: {e['words']} words, {e['code_lines']} lines of code, "
              f"{e['exercises']} exercise(s): about {e['minutes']} min")
