"""analytic-sampler: Analytic-DPM for pretrained Diffusers models.

Estimate ``ms_eps[t] = E||eps_theta(x_t, t)||^2 / d`` once per model (:func:`estimate_moments`), keep it in a
:class:`VarianceTable`, and sample with the analytic optimal reverse variance on the optimal K-step
trajectory through :class:`AnalyticDPMScheduler`.
"""

from ._version import __version__
from .adapter import EpsilonAdapter
from .likelihood import NLLResult, nll_bpd
from .moments import estimate_moments
from .scheduler import AnalyticDPMScheduler
from .table import VarianceTable
from .trajectory import TrajectoryDP, even_trajectory, optimal_trajectory, quadratic_trajectory
from .variance import analytic_variance, variance_bounds

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
    "optimal_trajectory",
    "quadratic_trajectory",
    "variance_bounds",
]
