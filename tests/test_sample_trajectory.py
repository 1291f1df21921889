"""The sample-quality trajectory: its Monte Carlo cost against the closed form for Gaussian data, the DP against
brute force, its storage in the table, and custom timesteps on Diffusers' schedulers."""

from __future__ import annotations

import inspect
import itertools
import json

import numpy as np
import pytest
import torch
from conftest import ExactGaussianEps, tiny_unet
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    UniPCMultistepScheduler,
)

from analytic_sampler import VarianceTable
from analytic_sampler.estimation.sample_cost import estimate_sample_cost
from analytic_sampler.sample_trajectory import (
    SampleCost,
    SampleTrajectoryDP,
    candidate_timesteps,
    sample_quality_trajectory,
)
from analytic_sampler.schedule import alphas_cumprod_from_config
from analytic_sampler.schedule import signal_to_noise as snr
from analytic_sampler.schedulers.analytic_dpm import AnalyticDPMScheduler
from analytic_sampler.schedulers.timesteps import apply_timesteps

V = 0.25
ABAR = alphas_cumprod_from_config(DDPMScheduler(num_train_timesteps=1000).config)


def gaussian_msd(grid: np.ndarray) -> np.ndarray:
    """``E||x0*(x_a) - x0*(x_b)||^2 / d`` along a forward path for x0 ~ N(0, V I): with ``y = x / sqrt(abar)`` the
    posterior mean is ``V y / (V + 1/snr)`` and ``E[y_a y_b] = V + 1/snr`` at the less noisy point, so the distance is
    ``|f(a) - f(b)|`` with ``f = V^2 snr / (1 + V snr)``."""
    f = V**2 * snr(ABAR)[grid] / (1 + V * snr(ABAR)[grid])
    return np.abs(f[:, None] - f[None, :])


def gaussian_interval_cost(s: int, t: int) -> float:
    """``D(s, t) / d = 1/2 int_{u_t}^{u_s} (f(u) - f(u_t)) du`` in closed form (``u`` = snr, no truncation)."""
    us, ut = snr(ABAR)[s], snr(ABAR)[t]
    integral = V * (us - ut) - np.log((1 + V * us) / (1 + V * ut))
    return 0.5 * (integral - V**2 * ut / (1 + V * ut) * (us - ut))


def test_monte_carlo_cost_matches_the_gaussian_closed_form():
    model = ExactGaussianEps(ABAR, v=V)
    x0 = torch.randn(128, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * V**0.5
    cost = estimate_sample_cost(model, x0, ABAR, num_paths=128, candidates=40, batch_size=512, data_range=None,
                                progress=False)
    exact = gaussian_msd(cost.timesteps)
    # per path, ||x0*(x_a) - x0*(x_b)||^2 / d averages d = 64 squares of N(0, S): standard error S sqrt(2 / (P d))
    stderr = exact * np.sqrt(2 / (128 * 64))
    off = ~np.eye(cost.timesteps.size, dtype=bool) & (exact > 1e-6)
    z = np.abs(cost.x0_msd - exact)[off] / stderr[off]
    assert np.median(z) < 1.5 and z.max() < 6
    assert np.allclose(cost.x0_msd, cost.x0_msd.T) and np.all(np.diag(cost.x0_msd) == 0)


def test_interval_cost_is_the_integral_of_the_closed_form():
    """On the grid of every timestep the trapezoidal rule in snr reproduces the closed-form integral."""
    grid = np.arange(1000)
    cost = SampleCost(grid, gaussian_msd(grid), num_paths=1).interval_costs(ABAR, sigma_min=None)
    for s, t in [(0, 1), (0, 99), (10, 500), (400, 999), (0, 999)]:
        assert cost[s, t] == pytest.approx(gaussian_interval_cost(s, t), rel=2e-3)
    assert np.all(cost[np.tril_indices(1000)] == 0)
    # truncated at sigma_min: the part of the integral above snr = 1 / sigma_min^2 is left out
    truncated = SampleCost(grid, gaussian_msd(grid), num_paths=1).interval_costs(ABAR, sigma_min=0.2)
    assert truncated[0, 999] < cost[0, 999] and truncated[500, 999] == pytest.approx(cost[500, 999])


def brute_force(intervals: np.ndarray, num_steps: int) -> tuple[float, list[int]]:
    """Cheapest K points ``G-1 = p_K > … > p_1 > 0`` (grid indices) plus the final interval down to index 0."""
    g = intervals.shape[0]
    best = (np.inf, [])
    for inner in itertools.combinations(range(1, g - 1), num_steps - 1):
        points = [g - 1, *sorted(inner, reverse=True), 0]
        total = sum(intervals[s, t] for t, s in zip(points, points[1:]))
        best = min(best, (total, points[:-1]))
    return best


@pytest.mark.parametrize("seed", [0, 1])
def test_dp_equals_brute_force_on_a_small_grid(seed):
    rng = np.random.default_rng(seed)
    grid = np.linspace(0, 999, 11).round().astype(int)
    noise = rng.gamma(1.0, 1.0, (11, 11))
    msd = noise + noise.T  # any non-negative symmetric matrix: no Monge structure to lean on
    np.fill_diagonal(msd, 0)
    cost = SampleCost(grid, msd, num_paths=1)
    dp = SampleTrajectoryDP(ABAR, cost, max_steps=5, sigma_min=0.3)
    for k in (1, 2, 3, 4, 5):
        total, points = brute_force(dp.intervals, k)
        assert dp.cost(k) == pytest.approx(total, rel=1e-12)
        assert dp.path(k) == grid[points].tolist()
        assert dp.trajectory_cost(dp.path(k)) == pytest.approx(total, rel=1e-12)


def test_dp_refusals_name_the_fix():
    grid = candidate_timesteps(1000, 20)
    cost = SampleCost(grid, gaussian_msd(grid), num_paths=1)
    with pytest.raises(ValueError, match="max_steps=20 must be between 1 and 19.*more candidates"):
        SampleTrajectoryDP(ABAR, cost, max_steps=20)
    dp = SampleTrajectoryDP(ABAR, cost, max_steps=5)
    with pytest.raises(ValueError, match="not all on the cost's grid"):
        dp.trajectory_cost([999, 500, 0])
    with pytest.raises(ValueError, match="sigma_min=0 must be positive"):
        cost.interval_costs(ABAR, sigma_min=0)
    with pytest.raises(ValueError, match="grid ends at t=999 but the schedule has N=500"):
        SampleTrajectoryDP(ABAR[:500], cost, max_steps=5)


def test_sample_cost_is_stored_with_the_table(tmp_path):
    model = tiny_unet()
    scheduler = DDPMScheduler(num_train_timesteps=100)
    images = torch.rand(6, 1, 8, 8) * 2 - 1
    from analytic_sampler import EstimateOptions, estimate_moments

    table = estimate_moments(model, images, scheduler, num_samples=2, options=EstimateOptions(progress=False))
    with pytest.raises(ValueError, match="no sample cost.*analytic-sampler precompute MODEL --data DATA --out DIR"):
        sample_quality_trajectory(table, 4)
    cost = estimate_sample_cost(model, images, scheduler, num_paths=3, candidates=30, batch_size=32,
                                checkpoint=tmp_path / "paths.pt", progress=False)
    with_cost = table.with_sample_cost(cost)
    with_cost.save(tmp_path / "t")
    loaded = VarianceTable.load(tmp_path / "t")
    np.testing.assert_array_equal(loaded.path_x0_msd, cost.x0_msd)
    assert loaded.path_samples == 3 and "sample_cost=3 paths x 30 timesteps" in repr(loaded)
    path = sample_quality_trajectory(loaded, 4)
    assert len(path) == 4 and path[0] == 99 and all(t in cost.timesteps for t in path)
    # the checkpoint holds every path: a rerun resumes from it without a model call
    calls = []
    model.forward = lambda *a, **k: calls.append(1)
    again = estimate_sample_cost(model, images, scheduler, num_paths=3, candidates=30, batch_size=32,
                                 checkpoint=tmp_path / "paths.pt", progress=False)
    np.testing.assert_array_equal(again.x0_msd, cost.x0_msd)
    assert not calls
    with pytest.raises(ValueError, match="belongs to a run with other settings"):
        estimate_sample_cost(model, images, scheduler, num_paths=4, candidates=30, checkpoint=tmp_path / "paths.pt")
    # a table saved without the cost (format 3) still loads
    table.save(tmp_path / "plain")
    meta = json.loads((tmp_path / "plain" / "variance_table.json").read_text())
    assert meta["path_samples"] == 0 and VarianceTable.load(tmp_path / "plain").path_timesteps is None
    # merging pools the costs of the same grid
    merged = with_cost.merge(with_cost)
    assert merged.path_samples == 6 and np.allclose(merged.path_x0_msd, cost.x0_msd)


def test_damaged_sample_cost_is_refused(tmp_path):
    grid = candidate_timesteps(50, 10)
    with pytest.raises(ValueError, match="comes as a pair"):
        VarianceTable(np.full(50, 0.5), np.full(50, 0.01), np.full(50, 3), ABAR[:50], path_timesteps=grid)
    with pytest.raises(ValueError, match="must ascend from 0 to 49"):
        VarianceTable(np.full(50, 0.5), np.full(50, 0.01), np.full(50, 3), ABAR[:50], path_timesteps=grid[:-1],
                      path_x0_msd=np.zeros((9, 9)), path_samples=2)


def cls_takes_generator(scheduler) -> bool:
    return "generator" in inspect.signature(scheduler.step).parameters


def run(scheduler, timesteps=None, k=None):
    """Eight steps' worth of a fixed fake model, from fixed noise: the scheduler's output and its timesteps."""
    if timesteps is None:
        scheduler.set_timesteps(k)
    else:
        apply_timesteps(scheduler, timesteps)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    noise = {"generator": torch.Generator().manual_seed(1)} if cls_takes_generator(scheduler) else {}
    for t in scheduler.timesteps:
        x = scheduler.step(0.3 * x + 0.01 * float(t) / 1000, t, x, **noise).prev_sample
    return x, scheduler.timesteps.tolist()


@pytest.mark.parametrize("cls", [UniPCMultistepScheduler, DPMSolverMultistepScheduler, DDPMScheduler])
def test_custom_timesteps_reproduce_the_schedulers_own_spacing(cls):
    """Given the timesteps its own 'trailing' spacing picks, each scheduler samples exactly as with that spacing."""
    own, timesteps = run(cls(timestep_spacing="trailing"), k=6)
    custom, used = run(cls(timestep_spacing="trailing"), timesteps=timesteps)
    # bit for bit on any CPU: apply_timesteps computes UniPC's sigmas by its set_timesteps' own operations
    assert used == timesteps and torch.equal(own, custom)


def test_custom_timesteps_on_analytic_dpm_and_refusals():
    ms_eps = np.full(1000, 0.9)
    scheduler = AnalyticDPMScheduler.from_config({}, ms_eps=ms_eps.tolist())
    apply_timesteps(scheduler, [999, 500, 120])
    assert scheduler.trajectory == [999, 500, 120]
    with pytest.raises(ValueError, match="DDIMScheduler.set_timesteps takes no custom .*even.*solver_order=1"):
        apply_timesteps(DDIMScheduler(), [999, 500, 120])
    with pytest.raises(ValueError, match="EulerAncestralDiscreteScheduler.set_timesteps takes no custom timesteps"):
        apply_timesteps(EulerAncestralDiscreteScheduler(), [999, 500, 120])
    with pytest.raises(ValueError, match="use_karras_sigmas=True sets its own timesteps"):
        apply_timesteps(UniPCMultistepScheduler(use_karras_sigmas=True), [999, 500, 120])
    with pytest.raises(ValueError, match="strictly descending"):
        apply_timesteps(DDPMScheduler(), [500, 999])


def test_first_order_dpm_solver_is_ddim_with_eps_from_the_clipped_x0():
    """DPMSolverMultistepScheduler(solver_order=1) with thresholding capped at 1 clips x0 to [-1, 1] and steps like
    DDIMScheduler(use_clipped_model_output=True): the DDIM update on any timesteps."""
    ddim = DDIMScheduler(timestep_spacing="trailing")
    ddim.set_timesteps(5)
    dpm = DPMSolverMultistepScheduler(solver_order=1, thresholding=True, sample_max_value=1.0,
                                      timestep_spacing="trailing")
    apply_timesteps(dpm, ddim.timesteps.tolist())
    x = y = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2
    for t in ddim.timesteps:
        out = 0.8 * x  # a fake eps, large enough to drive x0 outside [-1, 1]
        x = ddim.step(out, t, x, use_clipped_model_output=True).prev_sample
        y = dpm.step(0.8 * y, t, y).prev_sample
    torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_sampling_in_batches_restarts_multistep_schedulers():
    """A multistep scheduler keeps its step index and past outputs: each batch starts it afresh, so the second
    batch runs (and the first batch is what a one-batch run gives)."""
    from analytic_sampler.evaluation.sampling import sample

    unet = tiny_unet()
    for scheduler in (DPMSolverMultistepScheduler(num_train_timesteps=100),
                      UniPCMultistepScheduler(num_train_timesteps=100)):
        both = sample(unet, scheduler, 6, 5, batch_size=3, progress=False)
        first = sample(unet, scheduler, 3, 5, batch_size=3, progress=False)
        assert both.shape == (6, 1, 8, 8) and torch.equal(both[:3], first)
        custom = sample(unet, scheduler, 6, timesteps=[99, 70, 40, 10], batch_size=3, progress=False)
        assert custom.shape == (6, 1, 8, 8) and scheduler.timesteps.tolist() == [99, 70, 40, 10]
    # Karras sigmas on a cosine schedule round to a repeated first timestep: sampling still starts at step 0
    karras = DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True)
    karras.set_timesteps(10)
    assert karras.timesteps[0] == karras.timesteps[1]
    assert sample(unet, karras, 2, 10, progress=False).shape == (2, 1, 8, 8)
