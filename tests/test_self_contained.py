"""The project explains itself: no file a user gets refers to documents outside it (a development tree's design
notes, its ``shared`` folder) or to numbered tickets of a tracker the user cannot see."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("analytic_sampler", "docs", "benchmarks", "tests", "examples")
TOP_LEVEL = ("README.md", "CHANGELOG.md", "CITATION.cff", "pyproject.toml")
# A design file's name, the shared folder, a ticket number; written so that this file does not match itself.
OUTSIDE = re.compile(r"DESIGN\.md|shared[/]|\bissue #?[0-9]", re.IGNORECASE)
BINARY = {".png", ".jpg", ".safetensors", ".pt", ".npy", ".pyc"}


def _project_files() -> list[Path]:
    files = [ROOT / name for name in TOP_LEVEL if (ROOT / name).is_file()]
    for folder in FOLDERS:
        files += [p for p in sorted((ROOT / folder).rglob("*"))
                  if p.is_file() and p.suffix not in BINARY and "__pycache__" not in p.parts]
    return files


def test_no_reference_outside_the_project():
    hits = []
    for path in _project_files():
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="ignore").splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not hits, "references to files or tickets outside the project (say it here, or point into docs/):\n" + (
        "\n".join(hits))


def test_the_check_finds_what_it_looks_for():
    design, shared, ticket = "DESIGN" + ".md", "../shared" + "/", "issue" + " "
    for line in (f"see {design} §1", f"in {shared}notes", f"the checks of {ticket.title()}7", f"fixed in {ticket}#12"):
        assert OUTSIDE.search(line), line
    for line in ("the shared prompt embedding", "an issue with the data", "issues: 3 open"):
        assert not OUTSIDE.search(line), line
