"""The package's floors: the library imports nothing from evaluation, digits or commands; evaluation nothing from
digits or commands; digits nothing from commands. Read from the source (every import, at any depth of the file)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "analytic_sampler"
FLOORS = {"library": 0, "evaluation": 1, "digits": 2, "commands": 3}
FACADES = {"__init__.py", "__main__.py"}  # the package's entry points sit above every floor


def floor_of(module: str) -> int:
    """Floor of a dotted module inside the package (``analytic_sampler.x.y``)."""
    parts = module.split(".")
    return FLOORS.get(parts[1], 0) if len(parts) > 1 else 0


def package_imports(path: Path) -> set[str]:
    """Absolute names of the package's modules that ``path`` imports."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    package = list(rel.parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from . import x`` names modules; ``from .m import x`` names things of module m
            found.update(f"{target}.{a.name}" for a in node.names) if node.module is None else found.add(target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {name for name in found if name == "analytic_sampler" or name.startswith("analytic_sampler.")}


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name not in FACADES or p.parent != PACKAGE)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_only_lower_floors(path):
    own = floor_of(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
    above = sorted(m for m in package_imports(path) if floor_of(m) > own)
    assert not above, f"{path.relative_to(PACKAGE.parent)} (floor {own}) imports higher floors: {above}"


def test_floor_reading_sees_relative_imports():
    """The check itself: a relative import from the library into evaluation is seen and placed on its floor."""
    scheduler = PACKAGE / "scheduler.py"
    assert "analytic_sampler.schedule" in package_imports(scheduler)
    likelihood = PACKAGE / "evaluation" / "likelihood.py"
    assert "analytic_sampler.variance" in package_imports(likelihood)
    assert floor_of("analytic_sampler.evaluation.likelihood") == 1 and floor_of("analytic_sampler.variance") == 0


def test_import_is_light_and_keeps_saved_pipelines_loadable():
    """``import analytic_sampler`` imports neither torch nor diffusers, yet puts ``analytic_sampler.scheduler`` (the
    module a saved pipeline's model_index.json names) in sys.modules; its names import it on first use."""
    code = (
        "import sys, analytic_sampler\n"
        "print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))\n"
        "stand_in = sys.modules['analytic_sampler.scheduler']\n"
        "cls = stand_in.AnalyticDPMScheduler\n"
        "import analytic_sampler.scheduler as real\n"
        "print(cls is real.AnalyticDPMScheduler is analytic_sampler.AnalyticDPMScheduler, 'torch' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=PACKAGE.parent, env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split("\n")[:2] == ["[]", "True True"]
