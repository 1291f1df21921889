"""DPM-Solver-v3: its coefficients, its exactness on Gaussian data, and DPMSolverV3Scheduler in Diffusers' pipelines."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_unet
from diffusers import DDIMPipeline, DDPMPipeline, DDPMScheduler

from analytic_sampler.schedule import alphas_cumprod_from_config
from analytic_sampler.schedulers.dpm_solver_v3 import DPMSolverV3Scheduler
from analytic_sampler.solver_coefficients import solver_plan, step, taylor_matrix
from analytic_sampler.solver_statistics import SolverStatistics, half_log_snr, logsnr_timesteps, statistics_grid
from analytic_sampler.testing import ExactGaussianEps, gaussian_ode_solution, gaussian_solver_statistics

V, MU = 0.3, 0.5
CONFIG = dict(DDPMScheduler(num_train_timesteps=1000, clip_sample=False).config)
ABAR = alphas_cumprod_from_config(CONFIG)


def gaussian_statistics(points: int = 1000) -> SolverStatistics:
    grid = np.unique(np.linspace(0, 999, points).round().astype(np.int64))[::-1]
    return gaussian_solver_statistics(ABAR, grid, V, MU)


def run(scheduler, model, x: torch.Tensor) -> torch.Tensor:
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x).prev_sample
    return x


def exact_output(x_start: torch.Tensor, t_end: int) -> torch.Tensor:
    """E[x0 | x] at the ODE's solution at t_end: what the solver returns after its last model call."""
    x = gaussian_ode_solution(ABAR, x_start, 999, t_end, V, MU)
    a = ABAR[t_end]
    return MU + math.sqrt(a) * V * (x - math.sqrt(a) * MU) / (a * V + 1 - a)


def test_taylor_matrix_gives_the_derivatives_of_a_polynomial():
    offsets = np.array([0.0, -0.7, -1.5, 0.4])
    coefficients = np.array([0.3, -1.2, 0.8, 2.0])  # g(d) = sum c_k d^k / k!
    values = [sum(c * d**k / math.factorial(k) for k, c in enumerate(coefficients)) for d in offsets]
    np.testing.assert_allclose(taylor_matrix(offsets) @ values, coefficients, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("num_points", [1, 2, 3])
def test_one_step_is_exact_for_a_polynomial_g(num_points):
    """With any l, s, b and g a polynomial of degree < q, the q-point step reproduces the ODE's solution (a fine
    Runge-Kutta integration of dx/dlambda = (sigma^2 - l) x - alpha f)."""
    rng = np.random.default_rng(num_points)
    lam = np.linspace(-3.0, 3.0, 13)
    shape = (1, 1, 2)
    stats = SolverStatistics(np.arange(13)[::-1] * 10, lam, rng.uniform(0.2, 0.9, (13, *shape)),
                             rng.normal(0, 0.5, (13, *shape)), rng.normal(0, 0.3, (13, *shape)), "test", 1)
    traj = np.array([-2.6, -1.9, -1.1, 0.2])
    anchor = 2
    points = tuple(anchor - k for k in range(num_points))
    coefficients = rng.normal(size=(num_points, *shape))

    def f_at(x_lam: float) -> np.ndarray:  # f = e^S (g + B), S and B from the anchor
        fine = np.linspace(traj[anchor], x_lam, 4001)
        _, s, b = stats.at(fine)
        big_s = np.concatenate([np.zeros((1, *shape)), np.cumsum((s[1:] + s[:-1]) / 2 * np.diff(fine)[:, None, None, None], 0)])
        inner = np.exp(-big_s) * b
        big_b = np.trapezoid(inner, fine, axis=0)
        d = x_lam - traj[anchor]
        g = sum(c * d**k / math.factorial(k) for k, c in enumerate(coefficients))
        return np.exp(big_s[-1]) * (g + big_b)

    def velocity(x_lam: float, x: np.ndarray) -> np.ndarray:
        l = stats.at([x_lam])[0][0]
        alpha2 = 0.5 * (1 + np.tanh(x_lam))
        return (1 - alpha2 - l) * x - math.sqrt(alpha2) * f_at(x_lam)

    x0 = rng.normal(size=shape)
    x, lam_now, h = x0.copy(), traj[anchor], (traj[anchor + 1] - traj[anchor]) / 200
    for _ in range(200):  # classical Runge-Kutta
        k1 = velocity(lam_now, x)
        k2 = velocity(lam_now + h / 2, x + h / 2 * k1)
        k3 = velocity(lam_now + h / 2, x + h / 2 * k2)
        k4 = velocity(lam_now + h, x + h * k3)
        x, lam_now = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), lam_now + h
    coeff = step(stats, traj, anchor, anchor + 1, points)
    solved = coeff.decay * x0 - sum(w * f_at(traj[p]) for w, p in zip(coeff.weights, points)) - coeff.const
    np.testing.assert_allclose(solved, x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("timesteps", [[999], [999, 300], [999, 600, 300, 100, 20]], ids=["K=1", "K=2", "K=5"])
def test_exact_statistics_make_the_solver_exact_on_gaussian_data(order, timesteps):
    """Data N(mu, v I), its exact eps and exact l, s, b on every training timestep: the K-call solver returns the
    ODE's answer up to the statistics' linear interpolation in lambda (which shrinks as the grid's spacing squared)."""
    model = ExactGaussianEps(ABAR, V, MU)
    x_start = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for points in (1000, 250):
        scheduler = DPMSolverV3Scheduler.from_table(gaussian_statistics(points), CONFIG, solver_order=order)
        scheduler.set_timesteps(timesteps=timesteps)
        errors.append(float((run(scheduler, model, x_start) - exact_output(x_start, timesteps[-1])).abs().max()))
    assert errors[0] < 1e-4
    if len(timesteps) > 1:
        assert errors[0] < errors[1] / 8  # 4x the grid points: ~16x smaller


@pytest.mark.parametrize("options, orders", [({}, [1, 2, 3, 2, 1]), ({"lower_order_final": False}, [1, 2, 3, 3, 3])])
def test_lower_order_final_lowers_the_last_steps(options, orders):
    """Step i of K uses min(order, i + 1) outputs, and with lower_order_final (the default) at most K - 1 - i; the
    corrector one more."""
    scheduler = DPMSolverV3Scheduler.from_table(gaussian_statistics(50), CONFIG, **options)
    scheduler.set_timesteps(timesteps=[999, 800, 600, 400, 200, 50])
    plan = scheduler._run.plan
    assert [len(step.points) for step in plan.predictors] == orders
    assert [len(step.points) for step in plan.correctors] == [p + 1 for p in orders]


def test_l_one_and_s_b_zero_give_dpm_solver_pp():
    """l = 1, s = b = 0: the first-order step is DPM-Solver++'s (DDIM with eps from the clipped x0):
    x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^{-h}) D_s."""
    lam = half_log_snr(ABAR)
    grid = statistics_grid(ABAR, 5)
    ones = np.ones((grid.size, 1, 1, 1))
    stats = SolverStatistics(grid, lam[grid], ones, 0 * ones, 0 * ones, "x", 1)
    plan = solver_plan(stats, lam[[900, 500]], order=1, corrector=False)
    h = lam[500] - lam[900]
    decay, weights = plan.predictors[0].decay, plan.predictors[0].weights
    np.testing.assert_allclose(decay, math.sqrt((1 - ABAR[500]) / (1 - ABAR[900])), rtol=1e-12)
    # f = (1 - l) u - D = -D, so x_t = decay x_s - w f = decay x_s + w D
    np.testing.assert_allclose(weights[0], math.sqrt(ABAR[500]) * (1 - math.exp(-h)), rtol=1e-12)


@pytest.fixture
def digits_statistics() -> SolverStatistics:
    """Exact Gaussian statistics recorded as clipped to [-1, 1] (the bundled digits models' setting)."""
    stats = gaussian_statistics(100)
    return dataclasses.replace(stats, provenance={"data_range": [-1.0, 1.0], "prediction_type": "epsilon"})


@pytest.fixture
def ddpm_config() -> dict:
    return dict(DDPMScheduler(num_train_timesteps=1000).config)


def test_ddpm_and_ddim_pipelines_sample_with_it(digits_statistics, ddpm_config):
    unet = tiny_unet(channels=1, out_channels=2)  # a learned-variance output: its second half is ignored
    scheduler = DPMSolverV3Scheduler.from_table(digits_statistics, ddpm_config)
    assert scheduler.config.clip_sample and scheduler.config.timestep_spacing == "fitted"  # none: logsnr
    images = {}
    for cls in (DDPMPipeline, DDIMPipeline):
        pipe = cls(unet=unet, scheduler=scheduler)
        pipe.scheduler = scheduler  # DDIMPipeline.__init__ replaced it with a DDIMScheduler
        pipe.set_progress_bar_config(disable=True)
        images[cls] = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                           output_type="np").images
        assert scheduler.timesteps.tolist() == logsnr_timesteps(ABAR, 5, 40, 2.5)
    assert images[DDPMPipeline].shape == (2, 8, 8, 1) and np.isfinite(images[DDPMPipeline]).all()
    np.testing.assert_array_equal(images[DDPMPipeline], images[DDIMPipeline])  # deterministic, the same noise


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_v_and_x0_models_sample_as_the_eps_model_does(prediction_type):
    eps_model = ExactGaussianEps(ABAR, V, MU)

    def other(x, t):
        a = torch.as_tensor(ABAR, dtype=torch.float64)[t.long()].reshape(-1, 1, 1, 1)
        eps = eps_model(x, t)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0 if prediction_type == "v_prediction" else x0

    stats = gaussian_statistics(200)
    x_start = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    reference = DPMSolverV3Scheduler.from_table(stats, CONFIG)
    reference.set_timesteps(5)
    relabelled = dataclasses.replace(stats, provenance={**stats.provenance, "prediction_type": prediction_type})
    scheduler = DPMSolverV3Scheduler.from_table(relabelled, CONFIG)
    scheduler.set_timesteps(5)
    torch.testing.assert_close(run(scheduler, other, x_start), run(reference, eps_model, x_start), rtol=1e-9,
                               atol=1e-9)


def test_output_keeps_the_input_dtype_and_coefficients_are_float64(digits_statistics, ddpm_config):
    scheduler = DPMSolverV3Scheduler.from_table(digits_statistics, ddpm_config)
    scheduler.set_timesteps(4)
    assert scheduler._run.plan.predictors[0].decay.dtype == torch.float64
    x = torch.randn(2, 1, 8, 8)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        scheduler.set_timesteps(4)
        out = scheduler.step(torch.zeros_like(x, dtype=dtype), scheduler.timesteps[0], x.to(dtype))
        assert out.prev_sample.dtype == dtype and out.pred_original_sample.dtype == dtype


def test_save_pretrained_and_from_pretrained_round_trip(digits_statistics, ddpm_config, tmp_path):
    scheduler = DPMSolverV3Scheduler.from_table(digits_statistics, ddpm_config, solver_order=2)
    scheduler.save_pretrained(tmp_path)
    assert (tmp_path / "dpm_solver_v3_statistics.json").is_file()
    checksum = scheduler.config.table_sha256
    del scheduler
    import gc

    gc.collect()  # nothing holds the statistics in this process any more
    loaded = DPMSolverV3Scheduler.from_pretrained(tmp_path)
    assert loaded.config.table_sha256 == checksum and loaded.config.solver_order == 2
    np.testing.assert_array_equal(loaded.statistics.l, digits_statistics.l)
    again = DPMSolverV3Scheduler.from_config(loaded.config)  # in process: found by checksum
    assert again.statistics is loaded.statistics


def test_a_file_of_other_statistics_or_none_is_refused(digits_statistics, ddpm_config, tmp_path):
    DPMSolverV3Scheduler.from_table(digits_statistics, ddpm_config).save_pretrained(tmp_path)
    path = tmp_path / "dpm_solver_v3_statistics.json"
    document = json.loads(path.read_text())
    document["l"][0][0][0][0] += 0.01
    path.write_text(json.dumps(document))
    import gc

    gc.collect()
    with pytest.raises(ValueError, match="another solver statistics table than the scheduler config"):
        DPMSolverV3Scheduler.from_pretrained(tmp_path)
    path.unlink()
    with pytest.raises(ValueError, match="not in the folder"):
        DPMSolverV3Scheduler.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="needs the model's solver statistics table"):
        DPMSolverV3Scheduler()


def test_bad_input_is_refused_naming_the_fix(digits_statistics, ddpm_config):
    with pytest.raises(ValueError, match="schedule"):
        DPMSolverV3Scheduler.from_table(digits_statistics, {**ddpm_config, "beta_end": 0.03})
    with pytest.raises(ValueError, match="clip_sample"):
        DPMSolverV3Scheduler.from_table(digits_statistics, ddpm_config, clip_sample=False)
    with pytest.raises(ValueError, match="prediction_type"):
        DPMSolverV3Scheduler.from_table(digits_statistics, ddpm_config, prediction_type="v_prediction")
    scheduler = DPMSolverV3Scheduler.from_table(digits_statistics, ddpm_config)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(torch.zeros(1, 1, 8, 8), 999, torch.zeros(1, 1, 8, 8))
    scheduler.set_timesteps(3)
    with pytest.raises(ValueError, match="eta"):
        scheduler.step(torch.zeros(1, 1, 8, 8), 999, torch.zeros(1, 1, 8, 8), eta=1.0)
    with pytest.raises(ValueError, match="descending"):
        scheduler.set_timesteps(timesteps=[500, 600])
    with pytest.raises(ValueError, match="repeated timesteps"):
        scheduler.set_timesteps(500)
    with pytest.raises(ValueError, match=r"logsnr_t_last=999; use a timestep in \[0, 998\]"):
        DPMSolverV3Scheduler.from_table(digits_statistics, ddpm_config, logsnr_t_last=999)


def test_fitted_timesteps_are_used_for_their_k_and_travel_with_the_scheduler(digits_statistics, ddpm_config,
                                                                              tmp_path):
    fitted = dataclasses.replace(digits_statistics, fitted_timesteps={"3": [999, 400, 60]})
    scheduler = DPMSolverV3Scheduler.from_table(fitted, ddpm_config)
    scheduler.set_timesteps(3)
    assert scheduler.timesteps.tolist() == [999, 400, 60]
    scheduler.set_timesteps(4)  # no fitted timesteps for K = 4: the logsnr spacing
    assert scheduler.timesteps.tolist() == logsnr_timesteps(ABAR, 4, 50, 2.5)  # round(1000 / (5 K))
    scheduler.save_pretrained(tmp_path)
    del scheduler
    import gc

    gc.collect()
    loaded = DPMSolverV3Scheduler.from_pretrained(tmp_path)
    loaded.set_timesteps(3)
    assert loaded.timesteps.tolist() == [999, 400, 60]
    with pytest.raises(ValueError, match="descending"):
        dataclasses.replace(digits_statistics, fitted_timesteps={"3": [999, 60, 400]})


def test_a_config_naming_another_schedulers_table_is_refused(digits_statistics, ddpm_config):
    """Both schedulers keep their table under table_sha256: the config of one never builds the other on its table."""
    from analytic_sampler import AnalyticDPMScheduler

    from_v3 = DPMSolverV3Scheduler.from_table(digits_statistics, ddpm_config)
    with pytest.raises(ValueError, match="names a solver statistics table, not the variance table"):
        AnalyticDPMScheduler.from_config(from_v3.config)
