"""Diagonal (per-channel) reverse variance: variance functions, scheduler, likelihood.

The exact test world: "latents" whose channel c is x0_c ~ N(0, v_c I), independent across channels, with
v = (0.05, 0.3, 1, 2). Each channel is an isotropic Gaussian problem of its own (DESIGN.md §1), so

    eps*(x_t)_c = sqrt(bb[t]) x_t,c / (abar[t] v_c + bb[t]),      ms_eps_c[t] = bb[t] / (abar[t] v_c + bb[t]),

and the per-channel analytic variance is the exact reverse variance of every channel; the scalar table (the mean
over channels) is exact for none of them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analytic_sampler.variance import analytic_variance, residual_variance, validate_ms_eps
from analytic_sampler.schedule import alphas_cumprod_from_config

SD_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
ABAR = alphas_cumprod_from_config(SD_SCHEDULE)
BB = 1.0 - ABAR
V = np.array([0.05, 0.3, 1.0, 2.0])
N, C = ABAR.size, V.size


def exact_ms_eps(v: np.ndarray = V) -> np.ndarray:
    """``(C, N)``: ``bb / (abar v_c + bb)``."""
    return BB / (ABAR * v[:, None] + BB)


def exact_x0_mse(v: np.ndarray = V) -> np.ndarray:
    """``(C, N)``: the posterior variance of x0_c, ``v_c bb / (abar v_c + bb)``."""
    return v[:, None] * BB / (ABAR * v[:, None] + BB)


# ---------------------------------------------------------------- variance.py
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("data_range", [None, (-1.0, 1.0)])
def test_channel_variance_is_the_scalar_formula_per_row(eta, data_range):
    t = np.array([999, 700, 300, 50, 1])
    s = np.array([700, 300, 50, 1, -1])
    ms, x0 = exact_ms_eps(), exact_x0_mse()
    chan = analytic_variance(ABAR, ms, s, t, eta, data_range)
    assert chan.shape == (C, t.size)
    np.testing.assert_array_equal(chan, [analytic_variance(ABAR, row, s, t, eta, data_range) for row in ms])
    res = residual_variance(ABAR, x0, s, t, eta)
    np.testing.assert_array_equal(res, [residual_variance(ABAR, row, s, t, eta) for row in x0])
    if data_range is None:  # exact eps: x0_mse is the analytic c, so both variances coincide
        np.testing.assert_allclose(chan, res, rtol=1e-9)
    # a scalar t against several prev_t: the channel axis stays in front
    assert analytic_variance(ABAR, ms, np.arange(-1, 3), 3, eta).shape == (C, 4)


def test_channel_tables_are_validated_with_clear_messages():
    ms = exact_ms_eps()
    assert validate_ms_eps(ms, N, per_channel=True).shape == (C, N)
    assert validate_ms_eps(ms, N, per_channel=None).shape == (C, N)
    assert validate_ms_eps(ms[0], N, per_channel=None).shape == (N,)
    with pytest.raises(ValueError, match=r"ms_eps has shape \(4, 1000\), but needs \(1000,\).*scalar column"):
        validate_ms_eps(ms, N)
    with pytest.raises(ValueError, match=r"channel_ms_eps has shape \(1000,\), but needs \(channels, 1000\)"):
        validate_ms_eps(ms[0], N, name="channel_ms_eps", per_channel=True)
    with pytest.raises(ValueError, match=r"has shape \(4, 10\), but needs \(1000,\) or \(channels, 1000\)"):
        validate_ms_eps(ms[:, :10], N, per_channel=None)
    holes = ms.copy()
    holes[2, [5, 7]] = np.nan
    validate_ms_eps(holes, N, needed=[0, 6], per_channel=True)  # NaN only where not needed
    with pytest.raises(ValueError, match=r"NaN/inf at 2 needed timestep\(s\) \(5, 7\) in channel\(s\) \[2\]"):
        validate_ms_eps(holes, N, needed=[5, 6, 7], per_channel=True)
    with pytest.raises(ValueError, match="negative entries"):
        validate_ms_eps(-ms, N, per_channel=True)
