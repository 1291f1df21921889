"""analytic-sampler: Analytic-DPM for pretrained Diffusers models.

Estimate ``ms_eps[t] = E||eps_theta(x_t, t)||^2 / d`` and ``x0_mse[t] = E||x0 - x0_hat||^2 / d`` once per model
(:func:`estimate_moments`), keep them in a :class:`VarianceTable`, and sample with the analytic (or residual)
reverse variance on the even or optimal K-step trajectory through :class:`AnalyticDPMScheduler`.
"""

from ._version import __version__
from .adapter import EpsilonAdapter
from .likelihood import NLLResult, nll_bpd, nll_bpd_many, predicted_transitions_bpd
from .moments import estimate_moments
from .scheduler import AnalyticDPMScheduler
from .table import VarianceTable
from .trajectory import TrajectoryDP, even_trajectory, optimal_trajectory, quadratic_trajectory
from .variance import analytic_variance, residual_variance, variance_bounds

__all__ = [
    "__version__",
    "AnalyticDPMScheduler",
    "EpsilonAdapter",
    "NLLResult",
    "VarianceTable",
    "TrajectoryDP",
    "analytic_variance",
    "estimate_moments",
    "even_trajectory",
    "nll_bpd",
    "nll_bpd_many",
    "predicted_transitions_bpd",
    "optimal_trajectory",
    "quadratic_trajectory",
    "residual_variance",
    "variance_bounds",
]
