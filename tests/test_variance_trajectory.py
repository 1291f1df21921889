"""analytic_variance against the closed forms of docs/math.md and Theorem 2; the trajectory DP against brute force."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch

from analytic_sampler.pretrained import load_pretrained
from analytic_sampler.schedule import (
    alphas_cumprod_from_config,
    cosine_alphas_cumprod,
    schedule_fingerprint,
    signal_to_noise,
)
from analytic_sampler.trajectory import (
    TrajectoryDP,
    _is_monge,
    _solve_dense,
    even_trajectory,
    optimal_trajectory,
    posterior_variance,
    quadratic_trajectory,
    trajectory_cost,
    transition_cost,
)
from analytic_sampler.variance import analytic_variance, ddpm_variance, variance_bounds

ABAR = alphas_cumprod_from_config({"num_train_timesteps": 1000})
RNG = np.random.default_rng(0)


def random_pairs(n=500, n_train=1000):
    t = RNG.integers(1, n_train, size=n)
    s = np.array([RNG.integers(-1, ti) for ti in t])
    return s, t


def test_ddpm_type_closed_form():
    ms = RNG.uniform(0.0, 1.0, 1000)
    s, t = random_pairs()
    a_s = np.where(s < 0, 1.0, ABAR[np.maximum(s, 0)])
    a_t = ABAR[t]
    b_ts = 1 - a_t / a_s
    btilde = (1 - a_s) * b_ts / (1 - a_t)
    c = np.clip((1 - a_t) / a_t * (1 - ms[t]), 0, np.minimum((1 - a_t) / a_t, 1.0))
    expected = btilde + a_s * b_ts**2 / (1 - a_t) ** 2 * c
    np.testing.assert_allclose(analytic_variance(ABAR, ms, s, t, eta=1.0), expected, rtol=1e-10, atol=1e-300)


def test_ddim_type_closed_form_and_intermediate_eta():
    ms = RNG.uniform(0.0, 1.0, 1000)
    s, t = random_pairs()
    a_s = np.where(s < 0, 1.0, ABAR[np.maximum(s, 0)])
    a_t = ABAR[t]
    c = np.clip((1 - a_t) / a_t * (1 - ms[t]), 0, 1.0)
    expected = (np.sqrt(a_s) - np.sqrt((1 - a_s) * a_t / (1 - a_t))) ** 2 * c
    np.testing.assert_allclose(analytic_variance(ABAR, ms, s, t, eta=0.0), expected, rtol=1e-10, atol=1e-300)
    mid = analytic_variance(ABAR, ms, s, t, eta=0.5)
    lam2 = 0.25 * ddpm_variance(ABAR, s, t, "btilde")
    assert np.all(mid >= lam2 - 1e-15)


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("data_range", [(-1.0, 1.0), (0.0, 1.0), None])
def test_stays_inside_theorem2_bounds(eta, data_range):
    ms = RNG.uniform(-0.5, 1.5, 1000)
    s, t = random_pairs()
    var = analytic_variance(ABAR, ms, s, t, eta=eta, data_range=data_range)
    lower, upper = variance_bounds(ABAR, s, t, eta=eta, data_range=data_range)
    assert np.all(var >= lower * (1 - 1e-12)) and np.all(var <= upper * (1 + 1e-12))
    # ms_eps <= 0 saturates the upper bound, ms_eps >= 1 the lower one.
    hi, lo = ms[t] <= 0, ms[t] >= 1
    np.testing.assert_allclose(var[hi], upper[hi], rtol=1e-12)
    np.testing.assert_allclose(var[lo], lower[lo], rtol=1e-12)
    # The unbounded variant's second upper bound (sqrt(bb_t / a_ts) - sqrt(bb_s - lambda^2))^2 + lambda^2.
    a_s = np.where(s < 0, 1.0, ABAR[np.maximum(s, 0)])
    a_t = ABAR[t]
    second = lower + (np.sqrt((1 - a_t) * a_s / a_t) - np.sqrt(np.maximum(1 - a_s - lower, 0))) ** 2
    assert np.all(var <= second * (1 + 1e-9))


def test_bad_pairs_are_refused():
    with pytest.raises(ValueError, match="prev_t < t"):
        analytic_variance(ABAR, np.zeros(1000), 10, 5)
    with pytest.raises(ValueError, match="eta=2"):
        analytic_variance(ABAR, np.zeros(1000), 1, 5, eta=2)


@pytest.mark.parametrize("n", [9, 12])
@pytest.mark.parametrize("cost", ["residual", "paper"])
@pytest.mark.parametrize("monotone", [False, True])  # the dense DP on the raw moment; the fast one on the fitted
def test_dp_equals_exhaustive_search(n, cost, monotone):
    abar = np.cumprod(1 - np.linspace(0.05, 0.4, n))
    ms = np.minimum((1 - abar) / (abar * 0.3 + 1 - abar) * (1 + 0.1 * np.sin(3 * np.arange(n))), 1)
    x0_mse = 0.3 / (0.3 * signal_to_noise(abar) + 1) * (1 + 0.3 * np.cos(2 * np.arange(n)))  # not monotone: any moment works
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp = TrajectoryDP(abar, ms, n, x0_mse=x0_mse if cost == "residual" else None, monotone=monotone)
    moment = dp.moment
    assert _is_monge(signal_to_noise(abar), moment) == monotone
    if not monotone:
        np.testing.assert_array_equal(moment, x0_mse if cost == "residual" else posterior_variance(abar, ms))
    for k in range(2, n + 1):
        best = min(
            (trajectory_cost(abar, moment, [n - 1, *mid[::-1], 0]), [n - 1, *mid[::-1], 0])
            for mid in itertools.combinations(range(1, n - 1), k - 2)
        )
        assert dp.cost(k) == pytest.approx(best[0], abs=1e-12)
        assert trajectory_cost(abar, moment, dp.path(k)) == pytest.approx(best[0], abs=1e-12)  # the fit can tie paths


def _dense_costs(abar, moment, max_steps):
    u, m = torch.from_numpy(signal_to_noise(abar)), torch.from_numpy(moment)
    return _solve_dense(u, m, max_steps)[0].numpy()[2:, -1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_dp_equals_dense_dp_on_random_tables(seed):
    """The divide-and-conquer DP (monotone moment) and the dense O(K N^2) DP reach the same optimum, N = 1000."""
    rng = np.random.default_rng(seed)
    abar = ABAR if seed % 2 else cosine_alphas_cumprod(1000)
    x0_mse = rng.uniform(0.05, 0.5) / (signal_to_noise(abar) * rng.uniform(0.05, 0.5) + 1) * np.exp(rng.normal(0, 0.3, 1000))
    dp = TrajectoryDP(abar, None, 1000, x0_mse=x0_mse, stderr=x0_mse * 0.1)
    assert _is_monge(signal_to_noise(abar), dp.moment)
    fast = np.array([dp.cost(k) for k in range(2, 1001)])
    np.testing.assert_allclose(fast, _dense_costs(abar, dp.moment, 1000), rtol=1e-9)
    for k in (2, 10, 100, 1000):  # the paths realise the costs they report
        assert trajectory_cost(abar, dp.moment, dp.path(k)) == pytest.approx(dp.cost(k), rel=1e-12)


@pytest.mark.parametrize("model", ["digits-ddpm-linear", "digits-iddpm-cosine"])
def test_fast_dp_equals_dense_dp_on_bundled_tables(model):
    table = load_pretrained(model).table
    for ms_eps, x0_mse, stderr in ((None, table.x0_mse, table.x0_mse_stderr), (table.ms_eps, None, None)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dp = TrajectoryDP(table.alphas_cumprod, ms_eps, 300, x0_mse=x0_mse, stderr=stderr)
        assert _is_monge(signal_to_noise(table.alphas_cumprod), dp.moment)
        fast = np.array([dp.cost(k) for k in range(2, 301)])
        np.testing.assert_allclose(fast, _dense_costs(table.alphas_cumprod, dp.moment, 300), rtol=1e-9)


def test_paper_cost_differs_from_the_residual_form_by_a_shared_term():
    """log(1 - b_ts ms_eps/bb_t) = J(s, t) with m = c, plus log snr[t] - log snr[s] (telescopes along a path)."""
    ms = np.clip((1 - ABAR) / (ABAR * 0.2 + 1 - ABAR), 0, 1)
    s, t = np.array([0, 10, 500, 998]), np.array([5, 700, 999, 999])
    paper = np.log1p(-(1 - ABAR[t] / ABAR[s]) * ms[t] / (1 - ABAR[t]))
    ours = transition_cost(ABAR, posterior_variance(ABAR, ms), s, t)
    np.testing.assert_allclose(paper, ours + np.log(signal_to_noise(ABAR)[t]) - np.log(signal_to_noise(ABAR)[s]), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_optimal_never_worse_than_even(schedule):
    abar = ABAR if schedule == "linear" else cosine_alphas_cumprod(1000)
    x0_mse = 0.2 / (0.2 * signal_to_noise(abar) + 1) * np.exp(RNG.normal(0, 0.05, 1000))
    dp = TrajectoryDP(abar, None, 100, x0_mse=x0_mse)
    for k in (2, 5, 10, 25, 100):
        path = dp.path(k)
        assert len(path) == k and path[0] == 999 and path[-1] == 0 and all(np.diff(path) < 0)
        assert dp.cost(k) <= trajectory_cost(abar, dp.moment, even_trajectory(1000, k)) + 1e-12


def test_monotone_fit_absorbs_ms_eps_above_one():
    """Without x0_mse the paper's cost is used (with a warning); ms_eps >= 1 (c = 0) no longer makes free jumps."""
    ms = (1 - ABAR) / (ABAR * 0.2 + 1 - ABAR)
    noisy = ms.copy()
    noisy[[700, 850, 999]] = 1.02
    with pytest.warns(UserWarning, match="residual cost, which holds for real networks, needs a table with x0_mse"):
        dp = TrajectoryDP(ABAR, noisy, 50)
    g = 1 / dp.moment - signal_to_noise(ABAR)
    assert np.all(np.isfinite(dp.moment)) and np.all(dp.moment > 0) and np.all(np.diff(g) <= 1e-9 * np.abs(g[1:]))
    assert dp.moment[999] > 0.5 * posterior_variance(ABAR, ms)[999]  # the fit pools t=999 with its neighbours
    for k in (2, 3, 10, 50):
        path = dp.path(k)
        assert len(path) == k and path[0] == 999 and path[-1] == 0 and all(np.diff(path) < 0)
    assert path[1] > 500  # no jump from 999 straight to low noise


def test_dp_input_errors_name_the_fix():
    with pytest.raises(ValueError, match="pass x0_mse \\(residual cost\\) or ms_eps"):
        TrajectoryDP(ABAR, None, 10)
    with pytest.raises(ValueError, match="x0_mse has 5 entries but the schedule has num_train_timesteps=1000"):
        TrajectoryDP(ABAR, None, 10, x0_mse=np.ones(5))
    with pytest.raises(ValueError, match="stderr has negative entries"):
        TrajectoryDP(ABAR, None, 10, x0_mse=np.ones(1000), stderr=-np.ones(1000))


def test_partial_table_restricts_the_path():
    ms = (1 - ABAR) / (ABAR * 0.2 + 1 - ABAR)
    ms_partial = np.full(1000, np.nan)
    keep = np.array(even_trajectory(1000, 51))
    ms_partial[keep] = ms[keep]
    path = optimal_trajectory(ABAR, ms_partial, 10)
    assert set(path) <= set(keep.tolist())
    with pytest.raises(ValueError, match="no 60-step trajectory runs through estimated timesteps only.*estimate the table at more timesteps"):
        optimal_trajectory(ABAR, ms_partial, 60)


def test_even_and_quadratic_trajectories():
    assert even_trajectory(1000, 10) == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert even_trajectory(1000, 1000) == list(range(999, -1, -1))
    q = quadratic_trajectory(20, 15)
    assert len(q) == 15 and q[0] == 19 and q[-1] == 0 and all(np.diff(q) < 0)
    with pytest.raises(ValueError, match="num_steps=1 must be between 2"):
        even_trajectory(1000, 1)


def test_schedule_configs():
    lin = alphas_cumprod_from_config({"num_train_timesteps": 1000, "beta_schedule": "linear"})
    sd = alphas_cumprod_from_config({"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                                     "beta_start": 0.00085, "beta_end": 0.012})
    betas = np.linspace(1e-4, 0.02, 1000)
    trained = alphas_cumprod_from_config({"num_train_timesteps": 1000, "trained_betas": betas.tolist()})
    zsnr = alphas_cumprod_from_config({"num_train_timesteps": 1000, "rescale_betas_zero_snr": True})
    assert lin.dtype == np.float64 and np.array_equal(lin, trained)
    assert sd[-1] == pytest.approx(0.0047, rel=0.01)
    # The linear schedule's rescaled abar[998] (4.2e-9) is below 2^-24: the floor follows the last ratio instead.
    assert zsnr[-2] < 2.0**-24 and zsnr[-1] == pytest.approx(zsnr[-2] ** 2 / zsnr[-3], rel=1e-12)
    zsnr_sd = alphas_cumprod_from_config({"num_train_timesteps": 1000, "rescale_betas_zero_snr": True,
                                          "beta_schedule": "squaredcos_cap_v2"})
    assert zsnr_sd[-1] == 2.0**-24
    assert np.all(np.diff(zsnr) < 0) and np.all(np.diff(zsnr_sd) < 0)
    assert schedule_fingerprint(lin) == schedule_fingerprint(trained)
    assert schedule_fingerprint(lin) != schedule_fingerprint(sd)
    with pytest.raises(ValueError, match="beta_schedule='sigmoid' is not supported"):
        alphas_cumprod_from_config({"beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="trained_betas has 3 entries but num_train_timesteps is 1000"):
        alphas_cumprod_from_config({"trained_betas": [0.1, 0.2, 0.3]})
