"""Timesteps fitted to one model for each of a few deterministic solvers, as a table carries them.

:func:`analytic_sampler.estimation.timestep_fit.fit_timesteps` finds, for each solver of
:data:`~analytic_sampler.solver_specs.FITTED_SOLVERS` and each K, the K model-call timesteps whose samples lie closest to
the model's own ODE solution from the same noise; the table stores them as one small integer array per table
(``(solvers, K values, max K)``, ``-1`` past each trajectory's end) with the error each reached on the fit's paths.
Run them with any Diffusers scheduler that takes custom timesteps
(:func:`~analytic_sampler.schedulers.timesteps.apply_timesteps`), configured as the solver they were fitted for
(:attr:`~analytic_sampler.solver_specs.Solver.diffusers`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .solver_specs import FITTED_SOLVERS, solver_by_key

FIT_HINT = ("add them with `analytic-sampler precompute MODEL --data DATA --out DIR` (the fit runs after the moments; "
            "--fit-only adds it to a finished table)")


@dataclass
class FittedTimesteps:
    """``timesteps[s, k]``: the trajectory of solver ``solvers[s]`` with ``steps[k]`` model calls (descending, padded
    with -1); ``errors[s, k]``: its RMS distance to the ODE solution on the fit's own paths."""

    solvers: tuple[str, ...]
    timesteps: np.ndarray
    errors: np.ndarray

    def __post_init__(self):
        self.solvers = tuple(str(key) for key in self.solvers)
        for key in self.solvers:
            solver_by_key(key)
        self.timesteps = np.asarray(self.timesteps, dtype=np.int64)
        self.errors = np.asarray(self.errors, dtype=np.float64)
        s = len(self.solvers)
        if self.timesteps.ndim != 3 or self.timesteps.shape[0] != s or self.errors.shape != self.timesteps.shape[:2]:
            raise ValueError(f"fitted timesteps of shape {self.timesteps.shape} and errors of shape {self.errors.shape} "
                             f"do not fit {s} solver(s): (solvers, K values, max K) and (solvers, K values); refit.")
        for row in self.timesteps.reshape(-1, self.timesteps.shape[-1]):
            ts = row[row >= 0]
            if ts.size < 1 or np.any(row[ts.size:] >= 0) or np.any(np.diff(ts) >= 0):
                raise ValueError(f"a fitted trajectory {row.tolist()} is not descending timesteps padded with -1; refit.")

    @classmethod
    def build(cls, paths: Mapping[str, Mapping[int, Sequence[int]]], errors: Mapping[str, Mapping[int, float]]
              ) -> FittedTimesteps:
        """From ``paths[solver][K]`` and ``errors[solver][K]`` (every solver with the same K values)."""
        solvers = list(paths)
        steps = sorted(paths[solvers[0]])
        if any(sorted(paths[key]) != steps for key in solvers):
            raise ValueError("every solver needs trajectories for the same K values.")
        array = np.full((len(solvers), len(steps), max(steps)), -1, dtype=np.int64)
        for s, key in enumerate(solvers):
            for k, num in enumerate(steps):
                array[s, k, :num] = paths[key][num]
        return cls(tuple(solvers), array, [[errors[key][num] for num in steps] for key in solvers])

    @classmethod
    def from_table(cls, table) -> FittedTimesteps:
        """The fitted timesteps a :class:`~analytic_sampler.VarianceTable` carries, or a ValueError naming how to add
        them."""
        if table.fitted_timesteps is None:
            raise ValueError(f"this variance table has no fitted timesteps; {FIT_HINT}.")
        return cls(table.fitted_solvers, table.fitted_timesteps, table.fitted_errors)

    @property
    def steps(self) -> list[int]:
        """The K values, ascending."""
        return (self.timesteps[0] >= 0).sum(1).tolist()

    def timesteps_for(self, solver: str, num_steps: int) -> list[int]:
        """The K-call trajectory fitted for ``solver`` (a key of :data:`FITTED_SOLVERS`), descending."""
        if solver not in self.solvers:
            known = ", ".join(self.solvers)
            raise ValueError(f"no timesteps fitted for {solver!r} in this table (it has {known}); fit them for it "
                             f"(precompute --fit-solvers {solver}) or use one of {', '.join(FITTED_SOLVERS)}.")
        steps = self.steps
        if num_steps not in steps:
            raise ValueError(f"no {num_steps}-step trajectory fitted (K = {steps[0]} … {steps[-1]}); refit with "
                             f"--fit-max-steps {num_steps} (precompute), or choose K in that range.")
        row = self.timesteps[self.solvers.index(solver), steps.index(num_steps)]
        return row[row >= 0].tolist()

    def error_for(self, solver: str, num_steps: int) -> float:
        """The RMS distance :meth:`timesteps_for` reached on the fit's paths."""
        self.timesteps_for(solver, num_steps)
        return float(self.errors[self.solvers.index(solver), self.steps.index(num_steps)])


def fitted_timesteps(table, solver: str, num_steps: int) -> list[int]:
    """The K-step trajectory fitted to the table's model for ``solver`` (``"dpm-solver++"``, ``"unipc"`` or
    ``"ddim"``); pass it to :func:`~analytic_sampler.apply_timesteps`."""
    return FittedTimesteps.from_table(table).timesteps_for(solver, num_steps)
