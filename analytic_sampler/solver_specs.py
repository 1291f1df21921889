"""The deterministic solvers this package runs in its own variables (:mod:`analytic_sampler.solvers`), named and
keyed without importing torch: which solver a table's fitted timesteps belong to, and how Diffusers runs it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Solver:
    """A deterministic solver: ``kind`` ``"dpmpp"`` (DPM-Solver++ multistep) or ``"unipc"``, its ``order`` and
    UniPC's ``bh`` (``"bh1"`` or ``"bh2"``); ``name`` is how results show it."""

    name: str
    kind: str
    order: int
    bh: str = "bh2"

    def __post_init__(self):
        if self.kind not in ("dpmpp", "unipc") or not 1 <= self.order <= 3 or self.bh not in ("bh1", "bh2"):
            raise ValueError(f"{self}: kind must be 'dpmpp' or 'unipc', order 1 to 3, bh 'bh1' or 'bh2'.")

    def step_orders(self, num_steps: int) -> list[int]:
        """The order each of the K steps uses (Diffusers' warm-up and ``lower_order_final``)."""
        k, p = num_steps, self.order
        if self.kind == "unipc":
            return [min(p, k - i, i + 1) for i in range(k)]
        orders = [min(p, i + 1, 2 if i == k - 2 and k < 15 else p) for i in range(k)]
        return orders[:-1] + [1]

    @property
    def diffusers(self) -> tuple[str, dict[str, Any]]:
        """The Diffusers scheduler class (by name) and ``from_config`` options that run this solver."""
        if self.kind == "dpmpp":
            return "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": self.order}
        return "UniPCMultistepScheduler", {"solver_order": self.order, "solver_type": self.bh}


DDIM = Solver("DDIM (eps from clipped x0)", "dpmpp", 1)
DPMPP_2M = Solver("DPM-Solver++(2M)", "dpmpp", 2)
DPMPP_3M = Solver("DPM-Solver++(3M)", "dpmpp", 3)
UNIPC = Solver("UniPC (bh2)", "unipc", 2, "bh2")
#: the solvers whose timesteps a table can carry (:mod:`analytic_sampler.fitted_timesteps`), by key
FITTED_SOLVERS = {"dpm-solver++": DPMPP_2M, "unipc": UNIPC, "ddim": DDIM}


def solver_by_key(key: str) -> Solver:
    """A solver of :data:`FITTED_SOLVERS` by key; ValueError naming the keys."""
    if key not in FITTED_SOLVERS:
        raise ValueError(f"solver {key!r}: use one of {', '.join(FITTED_SOLVERS)}.")
    return FITTED_SOLVERS[key]
