"""DPM-Solver-v3's statistics: the Monte Carlo pass against the Gaussian closed forms, its run rules (checkpoint,
resume, refusal) and the statistics' files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from analytic_sampler.estimation.moments import EstimateOptions
from analytic_sampler.estimation.solver_statistics import StatisticsOptions, estimate_solver_statistics, fd_stencil
from analytic_sampler.schedule import alphas_cumprod_from_config
from analytic_sampler.schedulers.dpm_solver_v3 import DPMSolverV3Scheduler
from analytic_sampler.solver_statistics import SolverStatistics, half_log_snr
from analytic_sampler.testing import ExactGaussianEps, gaussian_ode_solution, gaussian_solver_statistics

V, MU = 0.3, 0.5
CONFIG = dict(DDPMScheduler(num_train_timesteps=1000, clip_sample=False).config)
ABAR = alphas_cumprod_from_config(CONFIG)
MODEL = ExactGaussianEps(ABAR, V, MU)


def gaussian_data(n: int, shape=(1, 4, 4)) -> torch.Tensor:
    return MU + V**0.5 * torch.randn(n, *shape, generator=torch.Generator().manual_seed(0))


def estimate(options: StatisticsOptions, data: torch.Tensor | None = None, **run) -> SolverStatistics:
    return estimate_solver_statistics(MODEL, gaussian_data(1024) if data is None else data, CONFIG, options,
                                      EstimateOptions(data_range=None, progress=False, model_id="gaussian", **run))


@pytest.fixture(scope="module")
def gaussian_estimate() -> SolverStatistics:
    return estimate(StatisticsOptions(grid_points=60, num_samples=1024, groups=16, batch_size=512, per="pixel"))


def test_l_matches_its_closed_form_within_its_standard_errors(gaussian_estimate):
    exact = gaussian_solver_statistics(ABAR, gaussian_estimate.timesteps, V, MU, (1, 4, 4))
    z = (gaussian_estimate.l - exact.l) / gaussian_estimate.l_stderr
    assert 0.6 < np.abs(z).mean() < 1.1  # |N(0, 1)| has mean 0.80 (t with 15 dof: 0.83)
    assert np.abs(z).max() < 6 and (np.abs(z) > 3).mean() < 0.02


def test_estimated_statistics_sample_the_gaussian_ode_about_as_well_as_exact_ones():
    """The solver on Monte Carlo l, s, b (per channel: 16 entries a draw) stays within a few times the error the exact
    statistics on the same grid make (their linear interpolation in lambda): the ridge of s keeps the noise of l from
    blowing up e^S (without it: errors of 1e7 on a 12-point grid). Full order to the end: this Gaussian's remainder
    is smooth, so its higher derivatives measure the statistics (a first-order last step leaves 0.07 here)."""
    estimated = estimate(StatisticsOptions(grid_points=60, num_samples=1024, groups=16, batch_size=512))
    assert estimated.feature_shape == (1, 1, 1)  # data without a range: per channel
    x_start = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = gaussian_solver_statistics(ABAR, estimated.timesteps, V, MU, (1, 1, 1))
    ts = [999, 600, 300, 100, 20]
    x_end = gaussian_ode_solution(ABAR, x_start, 999, 20, V, MU)
    a = ABAR[20]
    answer = MU + a**0.5 * V * (x_end - a**0.5 * MU) / (a * V + 1 - a)
    errors = []
    for stats in (exact, estimated):
        scheduler = DPMSolverV3Scheduler.from_table(stats, CONFIG, lower_order_final=False)
        scheduler.set_timesteps(timesteps=ts)
        x = x_start
        for t in scheduler.timesteps:
            x = scheduler.step(MODEL(x, t), t, x).prev_sample
        errors.append(float((x - answer).abs().max()))
    assert errors[1] < max(4 * errors[0], 0.03)


def test_per_channel_statistics_pool_the_positions():
    data = gaussian_data(256, (2, 4, 4))
    stats = estimate(StatisticsOptions(grid_points=8, num_samples=256, groups=8, per="channel"), data)
    assert stats.l.shape == (stats.timesteps.size, 2, 1, 1) and stats.provenance["per"] == "channel"
    exact = gaussian_solver_statistics(ABAR, stats.timesteps, V, MU, (2, 1, 1))
    z = (stats.l - exact.l) / stats.l_stderr
    assert np.abs(z).max() < 6


def test_fd_stencil_differentiates_quadratics_and_stays_inside_the_schedule():
    lam = half_log_snr(ABAR)
    for t in (0, 1, 500, 998, 999):
        neighbours, weights = fd_stencil(lam, t, 0.1)
        assert t not in neighbours and neighbours.min() >= 0 and neighbours.max() <= 999
        offsets = np.concatenate([[0.0], lam[neighbours] - lam[t]])
        for power, derivative in ((0, 0.0), (1, 1.0), (2, 0.0)):
            assert abs(weights @ offsets**power - derivative) < 1e-9
    neighbours, _ = fd_stencil(lam, 500, 0.1)
    assert lam[neighbours[0]] < lam[500] < lam[neighbours[1]]  # one on each side inside the schedule


def test_an_interrupted_run_resumes_to_the_same_statistics(tmp_path):
    options = StatisticsOptions(grid_points=6, num_samples=64, groups=4, batch_size=32)
    whole = estimate(options)
    calls = 0

    class Dies(ExactGaussianEps):  # the same weights (the run key fingerprints them), killed after 10 calls
        def forward(self, x, t):
            nonlocal calls
            calls += 1
            if calls > 10:
                raise KeyboardInterrupt
            return super().forward(x, t)

    checkpoint = tmp_path / "statistics.pt"
    with pytest.raises(KeyboardInterrupt):
        estimate_solver_statistics(Dies(ABAR, V, MU), gaussian_data(1024), CONFIG, options,
                                   EstimateOptions(data_range=None, progress=False, model_id="gaussian",
                                                   checkpoint=checkpoint, checkpoint_every=1))
    assert 0 < torch.load(checkpoint, weights_only=True)["next_batch"] < 12
    resumed = estimate(options, checkpoint=checkpoint)
    for name in ("l", "s", "b", "l_stderr"):  # bit for bit: the same batches, added in the same order
        np.testing.assert_array_equal(getattr(resumed, name), getattr(whole, name))
    with pytest.raises(ValueError, match="another run"):
        estimate(StatisticsOptions(grid_points=6, num_samples=64, groups=4, batch_size=32, fd_step=0.2),
                 checkpoint=checkpoint)


def test_files_round_trip_and_an_edit_is_refused(gaussian_estimate, tmp_path):
    gaussian_estimate.save(tmp_path)
    loaded = SolverStatistics.load(tmp_path)
    for name in ("timesteps", "lambdas", "l", "s", "b", "s_stderr"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(gaussian_estimate, name))
    assert loaded.provenance == gaussian_estimate.provenance and loaded.provenance["model_calls"] == 3 * loaded.timesteps.size * 1024
    meta = json.loads((tmp_path / "solver_statistics.json").read_text())
    meta["provenance"]["seed"] = 7
    (tmp_path / "solver_statistics.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="edited"):
        SolverStatistics.load(tmp_path)
    (tmp_path / "solver_statistics.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="checksum"):
        SolverStatistics.load(tmp_path)


def test_a_table_folder_without_statistics_has_none(tmp_path):
    assert SolverStatistics.find(tmp_path) is None
    with pytest.raises(ValueError, match="holds no solver statistics"):
        SolverStatistics.load(tmp_path)


def test_statistics_of_another_schedule_are_refused(gaussian_estimate):
    with pytest.raises(ValueError, match="schedule"):
        gaussian_estimate.check_schedule(DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"))


def test_options_refuse_what_cannot_work():
    with pytest.raises(ValueError, match="groups"):
        StatisticsOptions(groups=1)
    with pytest.raises(ValueError, match="fd_step"):
        StatisticsOptions(fd_step=0.0)
    with pytest.raises(ValueError, match="per="):
        StatisticsOptions(per="row")
