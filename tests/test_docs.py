"""The Python examples in docs/ run as written, offline, on the bundled models.

Each ```python block of a docs/ page runs in a fresh namespace in a temporary folder. Blocks that need what a test
machine does not have (a real Stable Diffusion checkpoint, a GPU, the Hub) are skipped; they are named by what
they need: ``path/to/`` and ``my_images/`` placeholders, ``"cuda"``, ``push_to_hub(``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
NEEDS_MORE = ("path/to/", "my_images/", '"cuda"', "push_to_hub(")


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
