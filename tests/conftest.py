"""Shared fixtures: the isotropic Gaussian world where Analytic-DPM is exact (docs/math.md)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from analytic_sampler.schedule import alphas_cumprod_from_config
from analytic_sampler.testing import ExactGaussianEps  # noqa: F401 (tests import it from here)

# The suite is many tiny ops: one thread avoids OpenMP threads waiting on each other on small CI machines.
torch.set_num_threads(1)


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
