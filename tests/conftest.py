"""Shared fixtures: the isotropic Gaussian world where Analytic-DPM is exact (DESIGN.md §1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from analytic_sampler.schedule import alphas_cumprod_from_config

# The suite is many tiny ops: one thread avoids OpenMP threads waiting on each other on small CI machines.
torch.set_num_threads(1)


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
        return torch.tensor(self.v, dtype=like.dtype, device=like.device).view(-1, *([1] * (like.ndim - 2)))

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


@pytest.fixture
def linear_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, clip_sample=False)


@pytest.fixture
def gaussian_model(linear_scheduler) -> ExactGaussianEps:
    return ExactGaussianEps(alphas_cumprod_from_config(linear_scheduler.config), v=0.25)


def tiny_unet(channels: int = 1, out_channels: int | None = None, size: int = 8, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=out_channels or channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()
