"""Exact oracles to test a sampler against.

For isotropic (or per-channel) Gaussian data ``x0 ~ N(0, v I)`` the optimal eps, its second moment and the
posterior variance of x0 have closed forms, and every true reverse conditional is Gaussian: sampling with this
eps, its exact ``ms_eps`` and the analytic variance reproduces ``N(0, v I)`` for any number of steps and any eta.

With a mean, ``x0 ~ N(mu, v I)``, and ``V = abar v + 1 - abar``, ``m = (1 - abar) / V``, the probability-flow ODE
and DPM-Solver-v3's statistics have closed forms too (:func:`gaussian_ode_solution`,
:func:`gaussian_solver_statistics`): with ``l = m`` the solver's model output ``f = -m mu`` does not depend on x,
so the solver is exact at any number of steps (up to the statistics' interpolation between grid points).
"""

from __future__ import annotations

import numpy as np
import torch

from .variance import channel_view


class ExactGaussianEps(torch.nn.Module):
    """The exact eps model for x0 ~ N(mu, v I):
    ``eps*(x_t, t) = sqrt(1-abar[t]) (x_t - sqrt(abar[t]) mu) / (abar[t] v + 1-abar[t])``.

    ``v`` may be one variance per channel (axis 1): then the moments below have shape ``(C, N)``; ``mean`` is ``mu``
    (a number, default 0; the moments do not depend on it)."""

    def __init__(self, alphas_cumprod: np.ndarray, v: float | tuple[float, ...], mean: float = 0.0):
        super().__init__()
        self.register_buffer("abar", torch.as_tensor(alphas_cumprod, dtype=torch.float64))
        self.v = v
        self.mean = float(mean)

    def _v(self, like: torch.Tensor) -> float | torch.Tensor:
        if isinstance(self.v, (int, float)):
            return self.v
        return channel_view(torch.tensor(self.v, dtype=like.dtype, device=like.device), like.ndim)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).long().reshape(-1)
        a = self.abar[t].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return (1 - a).sqrt() * (x - a.sqrt() * self.mean) / (a * self._v(x) + 1 - a)

    def _moment_v(self) -> np.ndarray | float:
        return self.v if isinstance(self.v, (int, float)) else np.asarray(self.v, dtype=np.float64)[:, None]

    def exact_ms_eps(self) -> np.ndarray:
        abar, v = self.abar.numpy(), self._moment_v()
        return (1 - abar) / (abar * v + 1 - abar)

    def exact_x0_mse(self) -> np.ndarray:
        """``E||x0 - x0_hat||^2 / d = v (1-abar) / (abar v + 1-abar)``, the posterior variance of x0."""
        abar, v = self.abar.numpy(), self._moment_v()
        return v * (1 - abar) / (abar * v + 1 - abar)


def gaussian_ode_solution(alphas_cumprod: np.ndarray, x_start: torch.Tensor, t_start: int, t_end: int, v: float,
                          mean: float = 0.0) -> torch.Tensor:
    """The probability-flow ODE's solution at ``t_end`` from ``x_start`` at ``t_start`` for data N(mu, v I):
    ``x_t - alpha_t mu = sqrt(V_t / V_s) (x_s - alpha_s mu)``, ``V = abar v + 1 - abar``."""
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    big_v = abar * v + 1.0 - abar
    alpha = np.sqrt(abar)
    return alpha[t_end] * mean + np.sqrt(big_v[t_end] / big_v[t_start]) * (x_start - alpha[t_start] * mean)


def gaussian_solver_statistics(alphas_cumprod: np.ndarray, timesteps, v: float, mean: float = 0.0,
                               sample_shape: tuple[int, ...] = (1, 8, 8)):
    """DPM-Solver-v3's exact statistics for data N(mu, v I) at ``timesteps`` (descending):
    ``l = m``, ``s = 0``, ``b = -m' mu`` with ``m = sigma^2 / V`` and ``m' = dm/dlambda = -2 alpha^2 sigma^2 v / V^2``
    (:class:`~analytic_sampler.solver_statistics.SolverStatistics`, every feature alike)."""
    from .schedule import schedule_fingerprint
    from .solver_statistics import SolverStatistics, half_log_snr

    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    ts = np.asarray(timesteps, dtype=np.int64)
    a2, s2 = abar[ts], 1.0 - abar[ts]
    big_v = a2 * v + s2
    m, dm = s2 / big_v, -2.0 * a2 * s2 * v / big_v**2
    full = (ts.size, *sample_shape)
    grid = [np.broadcast_to(x.reshape(-1, *([1] * len(sample_shape))), full).copy() for x in (m, 0 * m, -dm * mean)]
    return SolverStatistics(ts, half_log_snr(abar)[ts], *grid, schedule_fingerprint(abar), 0,
                            provenance={"data_range": None, "prediction_type": "epsilon"})
