"""Gaussian pieces of diffusion likelihoods: the KL between diagonal Gaussians and the discretised decoder."""

from __future__ import annotations

import math

import torch


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor,
    means: torch.Tensor,
    log_scales: torch.Tensor,
    bin_width: float = 2.0 / 255,
    data_range: tuple[float, float] = (-1.0, 1.0),
) -> torch.Tensor:
    """Elementwise log-probability (nats) of the bin ``[x - w/2, x + w/2]`` of ``x`` under ``N(means, exp(log_scales)^2)``.

    8-bit images in [-1, 1] have bins of width 2/255; the bins at the edges of ``data_range`` are open
    (``(-inf, a + w/2]`` and ``[b - w/2, inf)``). The bin mass is floored at 1e-12 as in Improved DDPM.
    """
    half = bin_width / 2
    inv_std = torch.exp(-log_scales)
    centered = x - means
    upper = inv_std * (centered + half)
    lower = inv_std * (centered - half)
    log_cdf_upper = torch.special.log_ndtr(upper)  # log P(X <= x + half)
    log_sf_lower = torch.special.log_ndtr(-lower)  # log P(X >= x - half)
    # log(Phi(upper) - Phi(lower)) = log Phi(upper) + log1p(-Phi(lower)/Phi(upper)), computed on the side
    # of the mean where the bin lies (CDF below the mean, survival function above) for stable tails.
    # The clamp keeps the unused branch of torch.where finite so that no NaN reaches the gradients.
    log_cdf_lower = torch.special.log_ndtr(lower)
    log_sf_upper = torch.special.log_ndtr(-upper)
    left = log_cdf_upper + torch.log1p(-torch.exp(torch.clamp(log_cdf_lower - log_cdf_upper, max=-1e-6)))
    right = log_sf_lower + torch.log1p(-torch.exp(torch.clamp(log_sf_upper - log_sf_lower, max=-1e-6)))
    mid = torch.clamp(torch.where(centered > 0, right, left), min=math.log(1e-12))
    lo, hi = data_range
    return torch.where(x < lo + half, log_cdf_upper, torch.where(x > hi - half, log_sf_lower, mid))
