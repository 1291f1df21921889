"""What :class:`~analytic_sampler.schedulers.dpm_solver_v3.DPMSolverV3Scheduler` samples with: its state, taken from a
model's :class:`~analytic_sampler.solver_statistics.SolverStatistics`.

The statistics ``l, s, b`` on their grid (without standard errors), the schedule's fingerprint, the draws per grid
point, the timesteps fitted for the solver, and what the scheduler reads of their provenance: the data range ``D`` was
clipped to, the model's prediction type, the guidance scale and the model's name. The scheduler saves it in
``dpm_solver_v3_statistics.json`` beside its config (:mod:`analytic_sampler.schedulers.table_file`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from ..solver_statistics import STATISTICS, SolverStatistics
from .table_file import SchedulerTable

TABLE_FILE = "dpm_solver_v3_statistics.json"
KEPT_PROVENANCE = ("data_range", "prediction_type", "guidance_scale", "model_id")


@dataclass(eq=False)
class SolverTable(SchedulerTable):
    """The statistics a scheduler samples with, float64 and read-only (module docstring); checked as
    :class:`~analytic_sampler.solver_statistics.SolverStatistics` checks them."""

    describes = "solver statistics table"

    timesteps: np.ndarray
    lambdas: np.ndarray
    l: np.ndarray
    s: np.ndarray
    b: np.ndarray
    fingerprint: str
    num_samples: int
    data_range: tuple[float, float] | None = None
    prediction_type: str | None = None
    guidance_scale: float | None = None
    model_id: str | None = None
    fitted_timesteps: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("lambdas", *STATISTICS):  # copies: the table's arrays become read-only, the caller's stay as they are
            setattr(self, name, np.array(getattr(self, name), dtype=np.float64))
        self.data_range = None if self.data_range is None else tuple(float(v) for v in self.data_range)
        checked = self.statistics
        self.timesteps, self.num_samples, self.fitted_timesteps = (checked.timesteps, checked.num_samples,
                                                                   checked.fitted_timesteps)
        super().__post_init__()

    @classmethod
    def from_statistics(cls, statistics: SolverStatistics) -> SolverTable:
        """The scheduler's table of a model's statistics."""
        kept = {name: statistics.provenance.get(name) for name in KEPT_PROVENANCE}
        return cls(statistics.timesteps, statistics.lambdas, *(getattr(statistics, k) for k in STATISTICS),
                   statistics.fingerprint, statistics.num_samples, fitted_timesteps=statistics.fitted_timesteps, **kept)

    @cached_property
    def statistics(self) -> SolverStatistics:
        """The table as :class:`~analytic_sampler.solver_statistics.SolverStatistics` (what the solver's coefficients
        read), sharing its arrays."""
        provenance = {name: getattr(self, name) for name in KEPT_PROVENANCE}
        provenance["data_range"] = None if self.data_range is None else list(self.data_range)
        return SolverStatistics(self.timesteps, self.lambdas, self.l, self.s, self.b, self.fingerprint,
                                self.num_samples, provenance=provenance, fitted_timesteps=self.fitted_timesteps)
