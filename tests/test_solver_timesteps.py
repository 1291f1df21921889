"""Timesteps fitted to DPM-Solver-v3: the search never ends worse than where it starts, and the statistics carry the
result to the scheduler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_unet
from diffusers import DDPMScheduler

from analytic_sampler.adapter import as_epsilon_model
from analytic_sampler.estimation.moments import EstimateOptions
from analytic_sampler.estimation.solver_statistics import StatisticsOptions, estimate_solver_statistics
from analytic_sampler.estimation.solver_timesteps import V3FitOptions, _family, _Objective, fit_solver_timesteps
from analytic_sampler.noise import noise_generator
from analytic_sampler.schedule import alphas_cumprod_from_config

SCHEDULER = DDPMScheduler(num_train_timesteps=100)
ABAR = alphas_cumprod_from_config(SCHEDULER.config)
OPTIONS = V3FitOptions(steps=(3, 4), paths=8, teacher_steps=40, t_lasts=(2, 8), powers=(1.0, 2.0), moves=(8, 2),
                     rounds=1)


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(channels=1)


@pytest.fixture(scope="module")
def statistics(unet):
    data = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return estimate_solver_statistics(unet, data, SCHEDULER, StatisticsOptions(grid_points=12, num_samples=16,
                                      groups=4, batch_size=64), EstimateOptions(progress=False))


def test_fitted_timesteps_beat_the_best_of_the_family(unet, statistics):
    fitted, calls = fit_solver_timesteps(unet, statistics, SCHEDULER, OPTIONS, progress=False)
    assert set(fitted) == {"3", "4"} and calls > 0
    for k, ts in fitted.items():
        assert len(ts) == int(k) and ts[0] == 99 and np.all(np.diff(ts) < 0)
    generator = noise_generator(OPTIONS.seed, 0, stream="estimate")  # the fit's own paths
    x_t = torch.randn((OPTIONS.paths, 1, 8, 8), generator=generator, dtype=torch.float64)
    objective = _Objective(as_epsilon_model(unet, SCHEDULER), statistics, ABAR, x_t, OPTIONS, {})
    for k, ts in fitted.items():
        family = [objective(start) for start in _family(ABAR, int(k), OPTIONS)]
        assert objective(ts) <= min(family)


def test_more_starts_never_end_worse_and_each_trajectory_is_solved_once(unet, statistics):
    """The descent from the family's best three ends no worse than from its best one; asking the objective again
    for a trajectory costs no model call."""
    one = V3FitOptions(steps=(4,), paths=8, teacher_steps=40, t_lasts=(2, 8, 20), powers=(1.0, 2.0), moves=(8, 2),
                       rounds=1, starts=1)
    three = V3FitOptions(**{**one.__dict__, "starts": 3})
    x_t = torch.randn((8, 1, 8, 8), generator=noise_generator(0, 0, stream="estimate"), dtype=torch.float64)
    objective = _Objective(as_epsilon_model(unet, SCHEDULER), statistics, ABAR, x_t, one, {})
    fitted = {n: fit_solver_timesteps(unet, statistics, SCHEDULER, o, progress=False)[0]["4"]
              for n, o in (("one", one), ("three", three))}
    assert objective(fitted["three"]) <= objective(fitted["one"])
    calls = objective.calls
    assert objective(fitted["one"]) == objective(list(fitted["one"])) and objective.calls == calls


def test_fit_options_refuse_what_cannot_work():
    with pytest.raises(ValueError, match="steps"):
        V3FitOptions(steps=(1,))
    with pytest.raises(ValueError, match="paths"):
        V3FitOptions(paths=0)
    with pytest.raises(ValueError, match="starts"):
        V3FitOptions(starts=0)


def test_a_fit_without_statistics_or_a_family_is_refused_naming_the_fix(unet, statistics, tmp_path):
    from analytic_sampler.estimation.solver_timesteps import precompute_solver_timesteps

    with pytest.raises(ValueError, match="holds no solver statistics to fit timesteps to; estimate them first"):
        precompute_solver_timesteps(unet, SCHEDULER, OPTIONS, out=tmp_path, progress=False)
    too_late = V3FitOptions(steps=(3,), paths=2, teacher_steps=10, t_lasts=(99,), powers=(1.0,))
    with pytest.raises(ValueError, match=r"no 3-step trajectory of the family .* pass t_lasts below 97"):
        fit_solver_timesteps(unet, statistics, SCHEDULER, too_late, progress=False)


def test_a_stopped_fit_resumes_at_its_first_missing_k_and_ends_as_an_uninterrupted_one(unet, statistics, tmp_path,
                                                                                       monkeypatch):
    from analytic_sampler.estimation import solver_timesteps
    from analytic_sampler.solver_statistics import SolverStatistics

    statistics.save(tmp_path)
    fit_one, fitted_k = solver_timesteps._fit_one, []

    def stopped_at_4(objective, k):
        if k == 4:
            raise KeyboardInterrupt
        return fit_one(objective, k)

    monkeypatch.setattr(solver_timesteps, "_fit_one", stopped_at_4)
    with pytest.raises(KeyboardInterrupt):
        solver_timesteps.precompute_solver_timesteps(unet, SCHEDULER, OPTIONS, out=tmp_path, progress=False)
    saved = SolverStatistics.load(tmp_path)
    assert set(saved.fitted_timesteps) == {"3"} and saved.provenance["timestep_fit"]["complete"] is False
    first_calls = saved.provenance["timestep_fit"]["model_calls"]

    monkeypatch.setattr(solver_timesteps, "_fit_one", lambda objective, k: fitted_k.append(k) or fit_one(objective, k))
    resumed, status = solver_timesteps.precompute_solver_timesteps(unet, SCHEDULER, OPTIONS, out=tmp_path,
                                                                  progress=False)
    assert status == "fitted" and fitted_k == [4]
    whole, _ = fit_solver_timesteps(unet, statistics, SCHEDULER, OPTIONS, progress=False)
    assert resumed.fitted_timesteps == whole == SolverStatistics.load(tmp_path).fitted_timesteps
    record = SolverStatistics.load(tmp_path).provenance["timestep_fit"]
    assert record["complete"] is True and record["model_calls"] > first_calls
    assert solver_timesteps.precompute_solver_timesteps(unet, SCHEDULER, OPTIONS, out=tmp_path,
                                                        progress=False)[1] == "unchanged"
    other = V3FitOptions(**{**OPTIONS.__dict__, "steps": (3,)})  # other options start over
    fitted_k.clear()
    refit, _ = solver_timesteps.precompute_solver_timesteps(unet, SCHEDULER, other, out=tmp_path, progress=False)
    assert fitted_k == [3] and set(refit.fitted_timesteps) == {"3"}
