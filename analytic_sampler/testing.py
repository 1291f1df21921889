"""Exact oracles to test a sampler against.

For isotropic (or per-channel) Gaussian data ``x0 ~ N(0, v I)`` the optimal eps, its second moment and the
posterior variance of x0 have closed forms, and every true reverse conditional is Gaussian: sampling with this
eps, its exact ``ms_eps`` and the analytic variance reproduces ``N(0, v I)`` for any number of steps and any eta.
"""

from __future__ import annotations

import numpy as np
import torch

from .variance import channel_view


class ExactGaussianEps(torch.nn.Module):
    """The exact eps model for x0 ~ N(0, v I): ``eps*(x_t, t) = sqrt(1-abar[t]) x_t / (abar[t] v + 1-abar[t])``.

    ``v`` may be one variance per channel (axis 1): then the moments below have shape ``(C, N)``."""

    def __init__(self, alphas_cumprod: np.ndarray, v: float | tuple[float, ...]):
        super().__init__()
        self.register_buffer("abar", torch.as_tensor(alphas_cumprod, dtype=torch.float64))
        self.v = v

    def _v(self, like: torch.Tensor) -> float | torch.Tensor:
        if isinstance(self.v, (int, float)):
            return self.v
        return channel_view(torch.tensor(self.v, dtype=like.dtype, device=like.device), like.ndim)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).long().reshape(-1)
        a = self.abar[t].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return (1 - a).sqrt() * x / (a * self._v(x) + 1 - a)

    def _moment_v(self) -> np.ndarray | float:
        return self.v if isinstance(self.v, (int, float)) else np.asarray(self.v, dtype=np.float64)[:, None]

    def exact_ms_eps(self) -> np.ndarray:
        abar, v = self.abar.numpy(), self._moment_v()
        return (1 - abar) / (abar * v + 1 - abar)

    def exact_x0_mse(self) -> np.ndarray:
        """``E||x0 - x0_hat||^2 / d = v (1-abar) / (abar v + 1-abar)``, the posterior variance of x0."""
        abar, v = self.abar.numpy(), self._moment_v()
        return v * (1 - abar) / (abar * v + 1 - abar)
