"""analytic-sampler: Analytic-DPM for pretrained Diffusers models.

Estimate ``ms_eps[t] = E||eps_theta(x_t, t)||^2 / d`` and ``x0_mse[t] = E||x0 - x0_hat||^2 / d`` once per model
(:func:`estimate_moments`), keep them in a :class:`VarianceTable`, and sample with the analytic (or residual)
reverse variance on the even or optimal K-step trajectory through :class:`AnalyticDPMScheduler`.

The package has four floors, each importing only those below it: the library (the modules of this folder), the
evaluation (``analytic_sampler.evaluation``: bits/dim, Fréchet distance, baselines, sampling loop), the bundled
digits world (``analytic_sampler.digits``) and the commands (``analytic_sampler.commands``). The names below are
imported on first use, so that ``import analytic_sampler`` (and the command line's ``--help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__

_EXPORTS = {
    "AnalyticDPMScheduler": "scheduler",
    "EpsilonAdapter": "adapter",
    "VarianceTable": "table",
    "estimate_moments": "moments",
    "TrajectoryDP": "trajectory",
    "even_trajectory": "trajectory",
    "optimal_trajectory": "trajectory",
    "quadratic_trajectory": "trajectory",
    "SampleCost": "sample_trajectory",
    "SampleTrajectoryDP": "sample_trajectory",
    "apply_timesteps": "sample_trajectory",
    "estimate_sample_cost": "sample_trajectory",
    "sample_quality_trajectory": "sample_trajectory",
    "analytic_variance": "variance",
    "residual_variance": "variance",
    "variance_bounds": "variance",
    "NLLResult": "evaluation.likelihood",
    "nll_bpd": "evaluation.likelihood",
    "nll_bpd_many": "evaluation.likelihood",
    "predicted_transitions_bpd": "evaluation.likelihood",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from .adapter import EpsilonAdapter
    from .evaluation.likelihood import NLLResult, nll_bpd, nll_bpd_many, predicted_transitions_bpd
    from .moments import estimate_moments
    from .sample_trajectory import (
        SampleCost,
        SampleTrajectoryDP,
        apply_timesteps,
        estimate_sample_cost,
        sample_quality_trajectory,
    )
    from .scheduler import AnalyticDPMScheduler
    from .table import VarianceTable
    from .trajectory import TrajectoryDP, even_trajectory, optimal_trajectory, quadratic_trajectory
    from .variance import analytic_variance, residual_variance, variance_bounds
