"""The Python examples in docs/ run as written, offline, on the bundled models; README stays a landing page whose
figures are those of the benchmark files and whose links lead somewhere.

Each ```python block of a docs/ page runs in a fresh namespace in a temporary folder. Blocks that need what a test
machine does not have (a real Stable Diffusion checkpoint, a GPU, the Hub) are skipped; they are named by what
they need: ``path/to/`` and ``my_images/`` placeholders, ``"cuda"``, ``push_to_hub(``.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
NEEDS_MORE = ("path/to/", "my_images/", '"cuda"', "push_to_hub(")
MODELS = {"linear": "digits-ddpm-linear", "cosine": "digits-iddpm-cosine"}


def _blocks() -> list:
    params = []
    for page in sorted(DOCS.glob("*.md")):
        for number, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.DOTALL)):
            needs = [word for word in NEEDS_MORE if word in code]
            marks = [pytest.mark.skip(reason=f"needs {needs[0]}")] if needs else []
            params.append(pytest.param(page, code, id=f"{page.name}#{number}", marks=marks))
    return params


def test_the_docs_have_examples():
    assert len(_blocks()) >= 10


@pytest.mark.parametrize("page, code", _blocks())
def test_docs_example_runs(page, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may write tables/, bench/
    exec(compile(code, str(page), "exec"), {"__name__": "__docs__"})  # noqa: S102 (our own docs, as written)


def test_readme_is_a_landing_page():
    """At most 10 KB, the set-up commands first, and one table of figures (the rest live in docs/results.md)."""
    text = README.read_text(encoding="utf-8")
    assert len(text.encode()) <= 10_000, "README.md is over 10 KB: move detail into docs/ and link to it"
    first_block = text.split("```", 2)[1]
    assert "pip install -e '.[digits]' && analytic-sampler demo" in first_block
    assert "pip install -e '.[test]' && python -m pytest -q tests" in first_block
    assert len(re.findall(r"^\|---", text, re.MULTILINE)) == 1, "README quotes one results table; others go to docs/"


def _benchmark_series() -> dict:
    """The figures of each sampler cell series of samplers.json (FD-digits, one decimal) and each variance and
    trajectory of steps.json (bits/dim, three decimals), as their Markdown prints them, by (model, K)."""
    series = {"FD": defaultdict(dict), "bits/dim": defaultdict(dict)}
    for model in json.loads((RESULTS / "samplers.json").read_text())["models"]:
        for cell in model["cells"]:
            key = cell["method"], cell["trajectory"], cell["table"], cell["seed"]
            series["FD"][key][model["model"], cell["K"]] = f"{cell['fd']:.1f} ± {cell['stderr']:.1f}"
    for model in json.loads((RESULTS / "steps.json").read_text())["models"]:
        for cell in model["nll"]:
            key = cell["variance"], cell["trajectory"]
            series["bits/dim"][key][model["model"], cell["K"]] = f"{cell['bpd']:.3f} ± {cell['stderr']:.3f}"
    return series


def test_readme_results_table_quotes_the_benchmark_files():
    """Each row of README's results table quotes one sampler of samplers.json and one variance and trajectory of
    steps.json: all its figures of a metric are that series' cells for the model and K their columns name (a header
    cell names what changes: "FD linear K=5", "K=10", ..., "bits/dim linear K=10", "cosine K=10")."""
    section = README.read_text(encoding="utf-8").split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    header, _, *rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
                        for line in section.splitlines() if line.startswith("|")]
    columns, metric, model = {}, None, None
    for index, name in enumerate(header):
        named = re.fullmatch(r"(FD |bits/dim )?(linear |cosine )?K=(\d+)", name)
        if named:
            metric, model = (named[1] or metric or "").strip(), (named[2] or model or "").strip()
            columns[index] = (metric, MODELS[model], int(named[3]))
    assert len(columns) >= 4 and len(rows) >= 5, "README's results table lost its columns or rows"
    series, quoted = _benchmark_series(), 0
    for row in rows:
        for metric in series:
            figures = {(m, k): row[i] for i, (kind, m, k) in columns.items() if kind == metric and row[i] != "—"}
            sources = [key for key, cells in series[metric].items() if figures.items() <= cells.items()]
            assert not figures or sources, f"README, {row[0]} ({row[1]}): {metric} {figures} is no series of the file"
            quoted += len(figures)
    assert quoted >= 20


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_links_lead_somewhere():
    """Every relative link of README names a file of the project and, with #, a heading of that file."""
    for target in re.findall(r"\]\(([^)#:]*)(?:#([^)]*))?\)", README.read_text(encoding="utf-8")):
        path, anchor = README.parent / target[0], target[1]
        assert path.exists(), f"README links to {target[0]}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", path.read_text(encoding="utf-8"), re.MULTILINE)
            assert anchor in {_anchor(h) for h in headings}, f"README links to {target[0]}#{anchor}: no such heading"
