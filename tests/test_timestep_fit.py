"""Fitted timesteps: the student DP's recorded error is the solver's own error on the fitted trajectory, the pass
resumes from its checkpoint, precompute adds the fit to a table (and refuses what it must), and the fitted
trajectories run on the Diffusers schedulers that take custom timesteps."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import tiny_unet
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from analytic_sampler import AnalyticDPMScheduler, SolverStatistics, VarianceTable
from analytic_sampler.denoiser import Denoiser, x0_limit
from analytic_sampler.estimation.precompute import precompute_fitted_timesteps
from analytic_sampler.estimation.timestep_fit import FitOptions, fit_timesteps, initial_noise, planned_calls
from analytic_sampler.fitted_timesteps import FittedTimesteps, fitted_timesteps
from analytic_sampler.schedule import alphas_cumprod_from_config
from analytic_sampler.schedulers.timesteps import apply_timesteps
from analytic_sampler.solver_specs import DPMPP_3M, FITTED_SOLVERS
from analytic_sampler.solvers import reference_grid, solve

N = 50
TINY = FitOptions(max_steps=4, num_paths=4, candidates=12, reference_steps=30, batch_size=64)


@pytest.fixture
def world():
    """A tiny random UNet on a 50-step linear schedule, its Denoiser and schedule."""
    unet, scheduler = tiny_unet(), DDPMScheduler(num_train_timesteps=N)
    return unet, scheduler, Denoiser(unet, scheduler, x0_limit(scheduler.config), 64)


def test_the_recorded_error_is_the_solvers_own_error_on_the_fitted_trajectory(world):
    unet, scheduler, denoiser = world
    abar = alphas_cumprod_from_config(scheduler.config)
    result = fit_timesteps(denoiser, abar, (1, 8, 8), TINY, progress=False)
    fitted = result.fitted
    assert fitted.solvers == tuple(FITTED_SOLVERS) and fitted.steps == [2, 3, 4]
    assert result.model_calls == planned_calls(abar, TINY)["total"]
    x_T = initial_noise(TINY.num_paths, (1, 8, 8), TINY.seed)
    exact = solve(DPMPP_3M, denoiser, x_T, reference_grid(N, TINY.reference_steps), abar)[0]  # the teacher's end
    for key, solver in FITTED_SOLVERS.items():
        for k in fitted.steps:
            ts = fitted.timesteps_for(key, k)
            assert len(ts) == k and ts == sorted(ts, reverse=True) and ts[0] >= TINY.start_min * (N - 1)
            mine = solve(solver, denoiser, x_T, ts, abar)[0]
            error = float(((mine - exact) ** 2).mean().sqrt())
            assert fitted.error_for(key, k) == pytest.approx(error, rel=1e-6)  # float32 model, other batches


def test_an_interrupted_fit_resumes_to_the_same_timesteps(world, tmp_path):
    unet, scheduler, denoiser = world
    abar = alphas_cumprod_from_config(scheduler.config)
    options = dataclasses.replace(TINY, solvers=("unipc",))
    whole = fit_timesteps(denoiser, abar, (1, 8, 8), options, progress=False).fitted
    calls = {"n": 0}
    teacher_calls = planned_calls(abar, options)["teacher"] // options.num_paths

    def dying(x, t, paths=None):
        calls["n"] += 1
        if calls["n"] > teacher_calls + 1:  # the teacher and one student level, then the run dies
            raise KeyboardInterrupt
        return denoiser(x, t, paths)

    dying.adapter, dying.limit, dying.path_kwargs = denoiser.adapter, denoiser.limit, denoiser.path_kwargs
    checkpoint = tmp_path / "fit.pt"
    with pytest.raises(KeyboardInterrupt):
        fit_timesteps(dying, abar, (1, 8, 8), options, checkpoint, progress=False)
    assert checkpoint.is_file()
    resumed = fit_timesteps(denoiser, abar, (1, 8, 8), options, checkpoint, progress=False).fitted
    assert resumed.timesteps.tolist() == whole.timesteps.tolist()
    np.testing.assert_array_equal(resumed.errors, whole.errors)
    with pytest.raises(ValueError, match="belongs to a run with other settings \\(num_paths\\); delete it"):
        fit_timesteps(denoiser, abar, (1, 8, 8), dataclasses.replace(options, num_paths=5), checkpoint,
                      progress=False)


def test_fit_options_and_fitted_timesteps_refuse_bad_input():
    with pytest.raises(ValueError, match="solver 'heun': use one of dpm-solver\\+\\+, unipc, ddim"):
        FitOptions(solvers=("heun",))
    with pytest.raises(ValueError, match="candidates=10 must exceed max_steps=10"):
        FitOptions(max_steps=10, candidates=10)
    with pytest.raises(ValueError, match="need 2 <= min_steps <= max_steps"):
        FitOptions(min_steps=1)
    fitted = FittedTimesteps.build({"unipc": {2: [40, 0], 3: [49, 20, 0]}}, {"unipc": {2: 0.2, 3: 0.1}})
    assert fitted.steps == [2, 3] and fitted.timesteps_for("unipc", 3) == [49, 20, 0]
    with pytest.raises(ValueError, match="no timesteps fitted for 'ddim' in this table \\(it has unipc\\)"):
        fitted.timesteps_for("ddim", 3)
    with pytest.raises(ValueError, match="no 7-step trajectory fitted \\(K = 2 … 3\\); refit with --fit-max-steps 7"):
        fitted.timesteps_for("unipc", 7)
    with pytest.raises(ValueError, match="is not descending timesteps padded with -1; refit"):
        FittedTimesteps(("unipc",), [[[0, 40]]], [[0.1]])


def _table(folder, scheduler, unet):
    abar = alphas_cumprod_from_config(scheduler.config)
    ms = np.full(N, 0.9)
    VarianceTable(ms, np.full(N, 1e-3), np.full(N, 4), abar, x0_mse=np.full(N, 0.01),
                  x0_mse_stderr=np.full(N, 1e-4)).save(folder)


def test_precompute_adds_the_fit_to_a_table_once_and_refuses_other_settings(world, tmp_path):
    unet, scheduler, _ = world
    with pytest.raises(ValueError, match="no variance table in .* to add fitted timesteps to: estimate the table"):
        precompute_fitted_timesteps(unet, scheduler, out=tmp_path / "none", options=TINY, progress=False)
    _table(tmp_path / "t", scheduler, unet)
    with pytest.raises(ValueError, match="this variance table has no fitted timesteps; add them with"):
        fitted_timesteps(VarianceTable.load(tmp_path / "t"), "unipc", 3)
    done = precompute_fitted_timesteps(unet, scheduler, out=tmp_path / "t", options=TINY, force_table=True,
                                       progress=False)
    assert done.status == "estimated"
    table = VarianceTable.load(tmp_path / "t")  # format 6 round trip
    assert table.fitted_solvers == tuple(FITTED_SOLVERS) and table.fitted_timesteps.tolist() == \
        done.table.fitted_timesteps.tolist()
    assert table.provenance["fitted_timesteps"]["model_calls"] == planned_calls(table.alphas_cumprod, TINY)["total"]
    again = precompute_fitted_timesteps(unet, scheduler, out=tmp_path / "t", options=TINY, force_table=True,
                                        progress=False)
    assert again.status == "unchanged"
    with pytest.raises(ValueError, match="already holds fitted timesteps of other settings .*pass overwrite=True"):
        precompute_fitted_timesteps(unet, scheduler, out=tmp_path / "t", options=dataclasses.replace(TINY, seed=1),
                                    force_table=True, progress=False)


@pytest.mark.parametrize("make", [
    lambda c: DPMSolverMultistepScheduler.from_config(c, algorithm_type="dpmsolver++", solver_order=2),
    lambda c: UniPCMultistepScheduler.from_config(c),
    lambda c: EulerDiscreteScheduler.from_config(c),
], ids=["dpm-solver++", "unipc", "euler"])
def test_fitted_timesteps_run_on_diffusers_schedulers(make):
    scheduler = make(DDPMScheduler(num_train_timesteps=N).config)
    apply_timesteps(scheduler, [49, 30, 12, 3])
    assert scheduler.timesteps.tolist() == [49, 30, 12, 3]


def test_fitted_timesteps_run_on_this_packages_scheduler_and_ddim_is_refused_with_the_alternative():
    abar = alphas_cumprod_from_config(DDPMScheduler(num_train_timesteps=N).config)
    ms = np.full(N, 0.9)
    table = VarianceTable(ms, np.full(N, 1e-3), np.full(N, 4), abar)
    scheduler = AnalyticDPMScheduler.from_table(table, eta=0.0)
    apply_timesteps(scheduler, [49, 30, 12, 3])
    assert scheduler.timesteps.tolist() == [49, 30, 12, 3]
    with pytest.raises(ValueError, match="DDIMScheduler.set_timesteps takes no custom timesteps.*solver_order=1 is "
                                         "the DDIM update"):
        apply_timesteps(DDIMScheduler(num_train_timesteps=N), [49, 30, 12, 3])
    assert torch.is_tensor(scheduler.timesteps)


def test_precompute_fit_only_then_trajectory_for_a_solver(tmp_path, capsys):
    """precompute's fit pass states its cost in model calls, adds the fit to the finished table once, and
    ``trajectory --for unipc`` prints the fitted timesteps with how to run them."""
    import json

    from analytic_sampler.commands.cli import main

    tiny_unet().save_pretrained(tmp_path / "model" / "unet")
    DDPMScheduler(num_train_timesteps=N).save_pretrained(tmp_path / "model" / "scheduler")
    torch.save(torch.rand(4, 1, 8, 8) * 2 - 1, tmp_path / "images.pt")
    base = ["precompute", str(tmp_path / "model"), "--data", str(tmp_path / "images.pt"), "--out",
            str(tmp_path / "table"), "--num-samples", "4", "--paths", "0"]
    main([*base, "--fit-paths", "0"])
    with pytest.raises(SystemExit, match="this variance table has no fitted timesteps; add them with"):
        main(["trajectory", "--table", str(tmp_path / "table"), "--for", "unipc", "--steps", "3"])
    fit = ["--fit-only", "--fit-paths", "4", "--fit-candidates", "12", "--fit-max-steps", "4"]
    capsys.readouterr()
    main([*base, *fit])
    table = VarianceTable.load(tmp_path / "table")
    calls = table.provenance["fitted_timesteps"]["model_calls"]
    options = FitOptions(num_paths=4, candidates=12, max_steps=4, batch_size=256)
    assert calls == planned_calls(table.alphas_cumprod, options)["total"]
    printed = capsys.readouterr().out
    assert f"x 3 (dpm-solver++, unipc, ddim) = {calls} model calls" in printed
    assert "dpm-solver-v3 timesteps for K = 3: 8 paths from noise" in printed
    assert table.counts.tolist() == [4] * N  # the moments are kept
    statistics = SolverStatistics.load(tmp_path / "table")  # DPMSolverV3Scheduler's own fit, K <= 4
    assert list(statistics.fitted_timesteps) == ["3"] and statistics.fitted_timesteps["3"][0] == N - 1
    assert statistics.provenance["timestep_fit"]["options"]["paths"] == 8
    main([*base, *fit])
    printed = capsys.readouterr().out
    assert "already holds the fitted timesteps of these settings; nothing to do" in printed
    assert "already holds dpm-solver-v3 timesteps of these settings; nothing to do" in printed
    main(["trajectory", "--table", str(tmp_path / "table"), "--for", "unipc", "--steps", "3", "4", "--json",
          str(tmp_path / "f.json")])
    printed = capsys.readouterr().out
    assert "UniPCMultistepScheduler.from_config(config, solver_order=2, solver_type='bh2')" in printed
    report = json.loads((tmp_path / "f.json").read_text())
    assert report["4"]["timesteps"] == fitted_timesteps(table, "unipc", 4)
    with pytest.raises(SystemExit, match="no 7-step trajectory fitted"):
        main(["trajectory", "--table", str(tmp_path / "table"), "--for", "ddim", "--steps", "7"])
    v3_only = [*base, "--fit-only", "--fit-paths", "4", "--fit-solvers", "dpm-solver-v3"]
    capsys.readouterr()
    main([*v3_only, "--fit-max-steps", "2"])
    assert "dpm-solver-v3 timesteps skipped: --fit-max-steps 2 is below its K = 3" in capsys.readouterr().out
    for name in ("solver_statistics.json", "solver_statistics.safetensors"):
        (tmp_path / "table" / name).unlink()
    main(v3_only)
    printed = capsys.readouterr().out
    assert f"dpm-solver-v3 timesteps skipped: {tmp_path / 'table'} holds no solver statistics" in printed
