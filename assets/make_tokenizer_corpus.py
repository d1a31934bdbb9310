"""Make assets/tokenizer-corpus/: the fixed text that chapter 01's tokenizer trains on.

Run once (`python assets/make_tokenizer_corpus.py`), not by `make assets`: the point of the
file is that it never changes. Until it existed, 01a and 01b trained on the standard library
of the Python running them and on the course's text as it stood, so a learner's Python, or
any edit of any notebook, gave another tokenizer. The file freezes one snapshot of the
course's own text (MIT, like the course): README.md, the notebooks' markdown cells and the
package's Python source, each file in sorted order, at the commit named in the card. Editing
the course afterwards leaves it as it is, and no Python version reads it differently."""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "assets" / "tokenizer-corpus"


def sources() -> list[tuple[str, str]]:
    """(path, text) for every file of the snapshot, in the order they are joined."""
    out = [("README.md", (ROOT / "README.md").read_text("utf-8"))]
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text("utf-8"))["cells"]
        out.append((f"notebooks/{nb.name} (markdown cells)", "\n".join(
            "".join(c["source"]) for c in cells if c["cell_type"] == "markdown")))
    for py in sorted((ROOT / "llama3_mini").rglob("*.py")):
        out.append((str(py.relative_to(ROOT)), py.read_text("utf-8")))
    return out


def main():
    parts = sources()
    text = "\n".join(t for _, t in parts) + "\n"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "corpus.txt").write_bytes(text.encode("utf-8"))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    card = {"commit": commit, "bytes": len(text.encode("utf-8")),
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "files": {path: len(t.encode("utf-8")) for path, t in parts}}
    (OUT / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    prose = sum(n for p, n in card["files"].items() if not p.endswith(".py"))
    (OUT / "README.md").write_text(
        "# tokenizer-corpus: the text chapter 01 trains its tokenizer on\n\n"
        f"{card['bytes']:,} bytes of UTF-8 (sha256 {card['sha256'][:16]}...), a snapshot of the "
        f"course's own text at commit {commit[:10]}: README.md and the notebooks' markdown "
        f"cells ({prose:,} bytes of English prose), then the package's Python source "
        f"({card['bytes'] - prose:,} bytes of code), each in sorted order (card.json lists "
        "every file). Made once by assets/make_tokenizer_corpus.py and never remade, so that "
        "no edit of the course and no Python version changes the tokenizer that notebooks 01a "
        "and 01b train. Read it with `llama3_mini.data.tokenizer_corpus()`.\n")
    print(f"{OUT / 'corpus.txt'}: {card['bytes']:,} bytes, {len(parts)} files")


if __name__ == "__main__":
    main()
