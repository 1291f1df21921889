"""analytic-sampler: Analytic-DPM for pretrained Diffusers models.

Estimate ``ms_eps[t] = E||eps_theta(x_t, t)||^2 / d`` and ``x0_mse[t] = E||x0 - x0_hat||^2 / d`` once per model
(:func:`estimate_moments`), keep them in a :class:`VarianceTable`, and sample with the analytic (or residual)
reverse variance on the even or optimal K-step trajectory through :class:`AnalyticDPMScheduler`.

The package has floors, each importing only those below it: the math and the table (the modules of this folder);
the Monte Carlo passes (``analytic_sampler.estimation``) and the Diffusers schedulers
(``analytic_sampler.schedulers``) beside each other; the evaluation (``analytic_sampler.evaluation``: bits/dim,
Fréchet distance, the peers, the sampling loop); the bundled digits world (``analytic_sampler.digits``); the
commands (``analytic_sampler.commands``). The names below are imported on first use, so that
``import analytic_sampler`` (and the command line's ``--help``) stays fast.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING

from ._version import __version__

_EXPORTS = {
    "AnalyticDPMScheduler": "schedulers.analytic_dpm",
    "DPMSolverV3Scheduler": "schedulers.dpm_solver_v3",
    "SolverStatistics": "solver_statistics",
    "StatisticsOptions": "estimation.solver_statistics",
    "estimate_solver_statistics": "estimation.solver_statistics",
    "precompute_solver_statistics": "estimation.solver_statistics",
    "EpsilonAdapter": "adapter",
    "VarianceTable": "table",
    "estimate_moments": "estimation.moments",
    "EstimateOptions": "estimation.moments",
    "PipelineOptions": "estimation.latents",
    "precompute_table": "estimation.precompute",
    "estimate_sample_cost": "estimation.sample_cost",
    "TrajectoryDP": "trajectory",
    "even_trajectory": "trajectory",
    "optimal_trajectory": "trajectory",
    "quadratic_trajectory": "trajectory",
    "SampleCost": "sample_trajectory",
    "SampleTrajectoryDP": "sample_trajectory",
    "sample_quality_trajectory": "sample_trajectory",
    "apply_timesteps": "schedulers.timesteps",
    "analytic_variance": "variance",
    "residual_variance": "variance",
    "variance_bounds": "variance",
    "NLLResult": "evaluation.likelihood",
    "nll_bpd": "evaluation.likelihood",
    "NLLOptions": "evaluation.likelihood",
    "predicted_transitions_bpd": "evaluation.likelihood",
}

__all__ = ["__version__", *_EXPORTS]


class _ImportedOnFirstUse(types.ModuleType):
    """Stands in ``sys.modules`` for one module of the package until a name of it is asked for (not a dunder, which
    tools scanning ``sys.modules`` ask), then imports the real module and takes its names."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        real = importlib.import_module(self.__name__)
        self.__dict__.update(real.__dict__)
        return getattr(real, name)


# Diffusers resolves the module a saved pipeline's model_index.json names for a component of another library from
# sys.modules only (it never imports it): so that `import analytic_sampler` makes such pipelines loadable while torch
# and diffusers are still imported only when used, the scheduler modules stand there until first used. This one
# comment is their reason (tests/test_layers.py shows the failure without them).
for _module in ("schedulers.analytic_dpm", "schedulers.dpm_solver_v3", "scheduler"):  # and earlier versions' saves
    _name = f"{__name__}.{_module}"
    if _name not in sys.modules:
        _spec = importlib.util.find_spec(_name)
        _stand_in = _ImportedOnFirstUse(_name)
        _stand_in.__spec__, _stand_in.__file__, _stand_in.__package__ = _spec, _spec.origin, _spec.parent
        sys.modules[_name] = _stand_in


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from .adapter import EpsilonAdapter  # noqa: F401
    from .estimation.latents import PipelineOptions  # noqa: F401
    from .estimation.moments import EstimateOptions, estimate_moments  # noqa: F401
    from .estimation.precompute import precompute_table  # noqa: F401
    from .estimation.sample_cost import estimate_sample_cost  # noqa: F401
    from .estimation.solver_statistics import (  # noqa: F401
        StatisticsOptions,
        estimate_solver_statistics,
        precompute_solver_statistics,
    )
    from .evaluation.likelihood import NLLOptions, NLLResult, nll_bpd, predicted_transitions_bpd  # noqa: F401
    from .sample_trajectory import SampleCost, SampleTrajectoryDP, sample_quality_trajectory  # noqa: F401
    from .schedulers.analytic_dpm import AnalyticDPMScheduler  # noqa: F401
    from .schedulers.dpm_solver_v3 import DPMSolverV3Scheduler  # noqa: F401
    from .schedulers.timesteps import apply_timesteps  # noqa: F401
    from .solver_statistics import SolverStatistics  # noqa: F401
    from .table import VarianceTable  # noqa: F401
    from .trajectory import TrajectoryDP, even_trajectory, optimal_trajectory, quadratic_trajectory  # noqa: F401
    from .variance import analytic_variance, residual_variance, variance_bounds  # noqa: F401
