"""The package's floors, read from the source (every import, at any depth of a file): the library's math, inputs
and table (the modules of ``analytic_sampler/``) import nothing above them; the Monte Carlo passes
(``estimation``) and the Diffusers schedulers (``schedulers``) stand beside each other on the next floor and import
neither each other nor anything above; then ``evaluation``, ``digits`` and ``commands``. No module imports itself
back through a circle of imports."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "analytic_sampler"
FLOORS = {"library": 0, "estimation": 1, "schedulers": 1, "evaluation": 2, "digits": 3, "commands": 4}
FACADES = {"__init__.py", "__main__.py", "scheduler.py"}  # entry points that sit above every floor


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
    name = module_name(path)
    own = floor_of(name)
    above = sorted(m for m in package_imports(path) if floor_of(m) > own)
    assert not above, f"{path.relative_to(PACKAGE.parent)} (floor {own}) imports higher floors: {above}"
    beside = sorted(m for m in package_imports(path)
                    if own and floor_of(m) == own and package_of(m) != package_of(name))
    assert not beside, f"{path.relative_to(PACKAGE.parent)} imports another package of its floor: {beside}"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    """The subpackage of a module (``estimation``, ``schedulers``, …), ``""`` for the library's own modules."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in FLOORS) else ""


def test_no_circles_of_imports():
    """Tarjan's strongly connected components of the module graph: every one is a single module."""
    graph = {module_name(p): {m for m in package_imports(p) if m != module_name(p)} for p in PACKAGE.rglob("*.py")}
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, f"modules that import each other in a circle: {circles}"


def test_floor_reading_sees_relative_imports():
    """The check itself: a relative import from the library into evaluation is seen and placed on its floor."""
    scheduler = PACKAGE / "schedulers" / "analytic_dpm.py"
    assert "analytic_sampler.schedule" in package_imports(scheduler)
    assert floor_of("analytic_sampler.schedulers.analytic_dpm") == 1 and floor_of("analytic_sampler.table") == 0
    likelihood = PACKAGE / "evaluation" / "likelihood.py"
    assert "analytic_sampler.variance" in package_imports(likelihood)
    assert floor_of("analytic_sampler.evaluation.likelihood") == 2 and floor_of("analytic_sampler.variance") == 0


def test_import_is_light_and_keeps_saved_pipelines_loadable():
    """``import analytic_sampler`` imports neither torch nor diffusers, yet puts the modules a saved pipeline's
    model_index.json names (``analytic_sampler.schedulers.analytic_dpm``, and ``analytic_sampler.scheduler`` of
    earlier versions) in sys.modules, where Diffusers looks for them; their names import them on first use."""
    code = (
        "import sys, analytic_sampler\n"
        "print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))\n"
        "earlier = sys.modules['analytic_sampler.scheduler'].AnalyticDPMScheduler\n"
        "cls = sys.modules['analytic_sampler.schedulers.analytic_dpm'].AnalyticDPMScheduler\n"
        "import analytic_sampler.schedulers.analytic_dpm as real\n"
        "print(cls is earlier is real.AnalyticDPMScheduler is analytic_sampler.AnalyticDPMScheduler, "
        "'torch' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=PACKAGE.parent, env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split("\n")[:2] == ["[]", "True True"]
