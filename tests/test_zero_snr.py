"""One rule for zero-SNR steps wherever a table becomes variances: at ``abar[t] <= 2^-24`` (the cosine schedule's
t = 999, abar = 2.4e-9) the posterior variance of x0 is the prior's bound, the data's second moment or its range's;
with neither, the bound, the DPs and the scheduler refuse by the same message instead of using ``bb / abar``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import ExactGaussianEps

from analytic_sampler import AnalyticDPMScheduler, VarianceTable
from analytic_sampler.evaluation.likelihood import NLLOptions, nll_bpd, predicted_transitions_bpd
from analytic_sampler.schedule import ZERO_SNR_FLOOR, alphas_cumprod_from_config
from analytic_sampler.trajectory import TrajectoryDP, even_trajectory
from analytic_sampler.variance import pair_coefficients

COSINE = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}
ABAR = alphas_cumprod_from_config(COSINE)
V = 0.3
ENTROPY_BPD = 0.5 * math.log(2 * math.pi * math.e * V) / math.log(2)  # 1.18: the exact NLL of N(0, V I) data
REFUSAL = r"step from t=999 \(abar = 2.4e-09: x_t says nothing about x0\) needs a bound on the data's variance"
WIDE = (-4.0, 4.0)  # a range that holds every draw of N(0, 0.3) here (7 standard deviations)


@pytest.fixture(scope="module")
def gaussian():
    model = ExactGaussianEps(ABAR, V)
    data = torch.randn(2000, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * math.sqrt(V)
    return model, data


def trajectory(kind: str, num_steps: int, data_range, ms_x0) -> list[int]:
    if kind == "even":
        return even_trajectory(1000, num_steps)
    with pytest.warns(UserWarning, match="optimal trajectory from ms_eps alone"):  # the paper's cost: c from ms_eps
        dp = TrajectoryDP(ABAR, ExactGaussianEps(ABAR, V).exact_ms_eps(), num_steps, data_range=data_range,
                          ms_x0=ms_x0)
    return dp.path(num_steps)


def bound(gaussian, timesteps, **options):
    model, data = gaussian
    options.setdefault("decoder_variance", "analytic")  # the true posterior variance at t_1: the bound is tight
    return nll_bpd(model, data, ABAR, timesteps, "analytic", ms_eps=model.exact_ms_eps(), decoder="gaussian",
                   batch_size=1000, options=NLLOptions(progress=False, **options))


def test_the_cosine_schedule_ends_below_the_floor():
    assert ABAR[-1] < ZERO_SNR_FLOOR < ABAR[-2]


@pytest.mark.parametrize("data_range", [None, WIDE])
@pytest.mark.parametrize(("kind", "num_steps"), [("even", 3), ("even", 8), ("dp", 3), ("dp", 8)])
def test_bound_is_exact_with_the_second_moment(gaussian, kind, num_steps, data_range):
    """Exact eps and the data's second moment: the bound is the data's entropy on any trajectory from t = 999."""
    timesteps = trajectory(kind, num_steps, data_range, V)
    assert timesteps[0] == 999
    r = bound(gaussian, timesteps, data_range=data_range, ms_x0=V)
    assert abs(r.mean - ENTROPY_BPD) < 3 * r.stderr, (r.mean, r.stderr, timesteps)


def test_without_a_bound_every_path_refuses_by_the_same_message(gaussian):
    with pytest.raises(ValueError, match=REFUSAL + ".*pass ms_x0="):
        bound(gaussian, even_trajectory(1000, 8), data_range=None)
    with pytest.raises(ValueError, match=REFUSAL):
        trajectory("dp", 3, None, None)
    with pytest.raises(ValueError, match=REFUSAL):
        predicted_transitions_bpd(ABAR, even_trajectory(1000, 8), np.full(1000, 0.1), variance="analytic",
                                  ms_eps=ExactGaussianEps(ABAR, V).exact_ms_eps(), data_range=None)
    scheduler = AnalyticDPMScheduler.from_config(COSINE, ms_eps=ExactGaussianEps(ABAR, V).exact_ms_eps(),
                                                 data_range=None, clip_sample=False, timestep_spacing="linspace")
    with pytest.raises(ValueError, match=REFUSAL):
        scheduler.set_timesteps(8)


def test_a_trajectory_that_starts_lower_needs_no_bound(gaussian):
    r = bound(gaussian, even_trajectory(999, 8), data_range=None)  # 998 ... 0: abar[998] is above the floor
    assert np.isfinite(r.mean)


def test_the_range_alone_bounds_the_step_loosely(gaussian):
    """A data range without the second moment: c[999] = ((b - a) / 2)^2 = 16, a valid but loose bound. The first
    transition's KL is then ``0.5 (log(sigma^2 / lambda^2) + (lambda^2 + coef^2 c*) / sigma^2 - 1)`` per dimension
    with ``sigma^2 = lambda^2 + 16 coef^2`` and the true posterior variance c*; the other terms are unchanged."""
    timesteps = even_trajectory(1000, 8)
    loose, exact = bound(gaussian, timesteps, data_range=WIDE), bound(gaussian, timesteps, data_range=WIDE, ms_x0=V)
    pair = pair_coefficients(ABAR, timesteps[1], timesteps[0])
    c_true = float(ExactGaussianEps(ABAR, V).exact_x0_mse()[999])
    var = pair.lambda2 + pair.coef**2 * 16.0
    kl_bits = 0.5 * (math.log(var / pair.lambda2) + (pair.lambda2 + pair.coef**2 * c_true) / var - 1) / math.log(2)
    assert abs(loose.per_step[0] - kl_bits) < 3 * loose.per_step_stderr[0] + 1e-9
    assert kl_bits > 0.05 and loose.mean > exact.mean + 0.05
    assert loose.per_step[1:] == pytest.approx(exact.per_step[1:], rel=1e-12)


def test_a_table_gives_its_second_moment(gaussian):
    """nll_bpd(table=...) takes the data's second moment the table records, as the scheduler does."""
    model, _ = gaussian
    table = VarianceTable(ms_eps=model.exact_ms_eps(), stderr=np.zeros(1000), counts=np.full(1000, 10),
                          alphas_cumprod=ABAR, data_range=None, provenance={"channel_ms_x0": [V]},
                          x0_mse=model.exact_x0_mse())
    assert table.ms_x0 == V
    timesteps = even_trajectory(1000, 8)
    from_table = nll_bpd(model, gaussian[1], ABAR, timesteps, "analytic", decoder="gaussian", batch_size=1000,
                         options=NLLOptions(table=table, data_range=None, progress=False))
    given = bound(gaussian, timesteps, data_range=None, ms_x0=V, decoder_variance="beta")
    assert from_table.mean == pytest.approx(given.mean, rel=1e-12)
    scheduler = AnalyticDPMScheduler.from_table(table, COSINE, timestep_spacing="linspace")
    scheduler.set_timesteps(8)
    assert scheduler.ms_x0 == V
