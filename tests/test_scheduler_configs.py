"""AnalyticDPMScheduler on the scheduler configs real Hub models ship, and against Diffusers' own step options:
timesteps, Diffusers options it does not use, dynamic thresholding, zero terminal SNR, dtypes, K = 1, the order of
``step``'s arguments, ``previous_timestep``, and settings that contradict the table."""

from __future__ import annotations

import inspect
import os
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import ExactGaussianEps
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hub_configs import DDPM_CIFAR10, DEEPFLOYD_IF, HUB_CONFIGS, SD_2_1, SD_V1_5  # noqa: E402

from analytic_sampler.schedule import alphas_cumprod_from_config  # noqa: E402
from analytic_sampler.schedulers.analytic_dpm import AnalyticDPMScheduler  # noqa: E402
from analytic_sampler.table import VarianceTable  # noqa: E402
from analytic_sampler.trajectory import optimal_trajectory, quadratic_trajectory  # noqa: E402
from analytic_sampler.variance import pair_coefficients  # noqa: E402

N = 1000
MS = np.linspace(0.2, 0.999, N)


def table_for(config, data_range=(-1.0, 1.0), prediction_type="epsilon", channels=None, **provenance):
    """A table of the config's schedule with made-up moments (x0_mse too, clipped as data_range says)."""
    abar = alphas_cumprod_from_config(config)
    n = np.full(N, 100)
    kwargs = {}
    if channels:
        rows = np.stack([MS * (1 + 0.01 * c) for c in range(channels)])
        rows /= rows.mean(0) / MS  # the scalar table is the channel mean
        kwargs = dict(channel_ms_eps=rows, channel_stderr=rows * 0 + 1e-3, channel_x0_mse=rows * 0.1,
                      channel_x0_mse_stderr=rows * 0 + 1e-4)
    return VarianceTable(MS, np.full(N, 1e-3), n, abar, data_range=data_range, x0_mse=MS * 0.1,
                         x0_mse_stderr=np.full(N, 1e-4), x0_clip=data_range,
                         provenance={"prediction_type": prediction_type, **provenance}, **kwargs)


def quietly(build, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build(*args, **kwargs)


# ---------------------------------------------------------------- timesteps of real configs
@pytest.mark.parametrize("name", HUB_CONFIGS)
@pytest.mark.parametrize("num_steps", [1, 10, 25, 50])
def test_real_configs_get_ddims_timesteps(name, num_steps, tmp_path):
    """A config without timestep_spacing (saved before the option existed) runs the timesteps of the scheduler it
    came from, with its steps_offset: exactly DDIMScheduler.from_config's, from the JSON, from a saved folder and
    from the live scheduler's config; timestep_spacing= still chooses this package's trajectories."""
    config = HUB_CONFIGS[name]
    ddim = quietly(DDIMScheduler.from_config, config)
    ddim.set_timesteps(num_steps)
    expected = ddim.timesteps.tolist()
    live = quietly(getattr(__import__("diffusers"), config["_class_name"]).from_config, config)
    folder = tmp_path / "scheduler"
    live.save_pretrained(folder)
    built = [
        quietly(AnalyticDPMScheduler.from_config, config, ms_eps=MS),
        quietly(AnalyticDPMScheduler.from_pretrained, folder, ms_eps=MS),
        quietly(AnalyticDPMScheduler.from_config, live.config, ms_eps=MS),
        quietly(AnalyticDPMScheduler.from_table, table_for(
            config, data_range=None if name.startswith("stable-diffusion") else (-1.0, 1.0),
            prediction_type=config.get("prediction_type", "epsilon")), live),
    ]
    for scheduler in built:
        scheduler.set_timesteps(num_steps)
        assert scheduler.timesteps.tolist() == expected and scheduler.config.timestep_spacing == "leading"
        assert scheduler.config.steps_offset == config.get("steps_offset", 0)
    ours = quietly(AnalyticDPMScheduler.from_config, config, ms_eps=MS, timestep_spacing="quadratic")
    ours.set_timesteps(num_steps)
    assert ours.trajectory == ([N - 1] if num_steps == 1 else quadratic_trajectory(N, num_steps))


def test_sd_v1_5_known_timesteps():
    scheduler = quietly(AnalyticDPMScheduler.from_config, SD_V1_5, ms_eps=MS)
    scheduler.set_timesteps(10)
    assert scheduler.trajectory == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]


def test_a_config_that_names_no_scheduler_gets_the_default_spacing():
    scheduler = AnalyticDPMScheduler.from_config({"num_train_timesteps": N, "beta_schedule": "linear"}, ms_eps=MS)
    scheduler.set_timesteps(10)
    assert scheduler.config.timestep_spacing == "trailing" and "trajectory" not in scheduler.config
    ddim = DDIMScheduler(num_train_timesteps=N, timestep_spacing="trailing")
    ddim.set_timesteps(10)
    assert scheduler.trajectory == ddim.timesteps.tolist()


def test_a_live_schedulers_default_spacing_is_its_own():
    """DDPMScheduler() was not given timestep_spacing: its config lists it as a default, and Diffusers' from_config
    would drop it; the scheduler takes DDPMScheduler's own ("leading"), Euler's its own ("linspace")."""
    for cls, spacing in ((DDPMScheduler, "leading"), (EulerDiscreteScheduler, "linspace")):
        base = cls(num_train_timesteps=N)
        assert "timestep_spacing" in base.config["_use_default_values"]
        scheduler = quietly(AnalyticDPMScheduler.from_config, base.config, ms_eps=MS)
        assert scheduler.config.timestep_spacing == spacing and "trajectory" not in scheduler.config


# ---------------------------------------------------------------- Diffusers options
@pytest.mark.parametrize("config, names", [
    (SD_V1_5, "set_alpha_to_one"),
    (SD_2_1, "set_alpha_to_one"),
    (DDPM_CIFAR10, None),
    (DEEPFLOYD_IF, "variance_type"),
    ({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True, "final_sigmas_type": "sigma_min",
      "algorithm_type": "sde-dpmsolver++", "solver_order": 2}, "final_sigmas_type, use_karras_sigmas"),
])
def test_unused_options_get_one_short_warning_naming_them(config, names):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        AnalyticDPMScheduler.from_config(config, ms_eps=MS)
    mine = [w for w in caught if "does not use" in str(w.message)]
    if names is None:
        assert not mine
        return
    assert len(mine) == 1
    message = str(mine[0].message)
    assert f"does not use {names} of the scheduler config" in message and len(message) < 250
    assert "False" not in message and "learned_range" not in message and "karras'" not in message  # no values


def test_own_saved_config_reloads_without_the_warning(tmp_path):
    scheduler = quietly(AnalyticDPMScheduler.from_config, SD_V1_5, ms_eps=MS)
    scheduler.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AnalyticDPMScheduler.from_pretrained(tmp_path)
        AnalyticDPMScheduler.from_config(scheduler.config)


def test_dynamic_thresholding_as_ddpm_does_it():
    """DeepFloyd IF's config: x0_hat dynamically thresholded (quantile 0.95, at most 1.5), eps recomputed from it,
    exactly DDPMScheduler's step; the learned-variance half of the output is ignored."""
    ours = quietly(AnalyticDPMScheduler.from_config, DEEPFLOYD_IF, ms_eps=np.ones(N), timestep_spacing="linspace")
    plain = quietly(AnalyticDPMScheduler.from_config, DEEPFLOYD_IF, ms_eps=np.ones(N), timestep_spacing="linspace",
                    thresholding=False)
    theirs = quietly(DDPMScheduler.from_config, DEEPFLOYD_IF, variance_type="fixed_small")
    assert ours.config.thresholding and ours.config.sample_max_value == 1.5
    for s in (ours, plain):
        s.set_timesteps(10)
    theirs.set_timesteps(timesteps=ours.trajectory)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(4, 3, 8, 8, generator=g) * 1.5, torch.randn(4, 3, 8, 8, generator=g)
    differs = False
    for t in ours.trajectory:
        zero = torch.zeros_like(x)
        mine = ours.step(torch.cat([eps, eps], 1), t, x, variance_noise=zero)
        clipped = plain.step(eps, t, x, variance_noise=zero)
        their = theirs.step(eps, t, x, generator=torch.Generator().manual_seed(1))
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        their_mean = their.prev_sample - (theirs._get_variance(t) ** 0.5 * noise if t > 0 else 0)
        torch.testing.assert_close(mine.pred_original_sample, their.pred_original_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine.prev_sample, their_mean, rtol=1e-5, atol=1e-5)
        differs |= not torch.allclose(mine.pred_original_sample, clipped.pred_original_sample)
    assert differs  # a threshold s > 1 rescaled some samples: not a plain clip to [-1, 1]


# ---------------------------------------------------------------- zero terminal SNR
SCHEDULES = [dict(beta_schedule="linear"), dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
             dict(beta_schedule="squaredcos_cap_v2")]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s["beta_schedule"])
def test_zero_snr_schedule_matches_ddim(schedule):
    config = dict(num_train_timesteps=N, rescale_betas_zero_snr=True, **schedule)
    ddim = DDIMScheduler(**config)
    ours = AnalyticDPMScheduler.from_config(config, ms_eps=MS, ms_x0=0.5)
    for name in ("betas", "alphas", "alphas_cumprod"):  # Diffusers rescales in float32, the schedule here in float64
        torch.testing.assert_close(getattr(ours, name), getattr(ddim, name), rtol=0, atol=1e-5, msg=name)
    assert ours.alphas_cumprod[-1] == 0 and ours.betas[-1] == 1
    abar = ours.alphas_cumprod_64  # the step's float64 schedule: the endpoint raised to a floor, still decreasing
    assert np.all(np.diff(abar) < 0) and 0 < abar[-1] <= 2.0**-24
    for spacing in ("linspace", "optimal"):
        scheduler = quietly(AnalyticDPMScheduler.from_config, config, ms_eps=MS, x0_mse=MS * 0.1, ms_x0=0.5,
                            timestep_spacing=spacing)
        scheduler.set_timesteps(N if spacing == "linspace" else 10)
        coefficients = scheduler.step_coefficients(1.0)
        assert all(np.isfinite(field).all() for field in coefficients)
        assert scheduler.trajectory[0] == N - 1


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_zero_snr_first_step_is_bounded_and_robust_to_monte_carlo_noise(eta, prediction_type):
    """A latent table (no data range) of a zero-SNR model: the step from t = N-1 has the data's variance bound as
    c, so moving ms_eps[N-1] by its standard error (either way) leaves its sigma within a few percent; without the
    data's second moment the step is refused by name. The step from the endpoint is finite for eps and v models."""
    config = dict(num_train_timesteps=N, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type=prediction_type)
    abar = alphas_cumprod_from_config(config)
    ms = (1 - abar) / (abar * 0.9 + 1 - abar)  # Gaussian latents of variance 0.9
    stderr = 3.5e-3  # ms_eps's Monte Carlo error with 10 draws of 4x64x64 latents: sqrt(2 / d / 10)
    sigmas = []
    for shift in (0.0, -stderr, stderr):
        table = ms.copy()
        table[-1] += shift
        scheduler = AnalyticDPMScheduler.from_config(config, ms_eps=table, channel_ms_eps=np.stack([table] * 4),
                                         channel_ms_x0=[0.9] * 4, data_range=None, clip_sample=False, eta=eta)
        scheduler.set_timesteps(10)
        sigmas.append(scheduler.step_coefficients(eta).sigma[0, 0])
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        out = scheduler.step(torch.randn_like(x), N - 1, x, generator=torch.Generator().manual_seed(1))
        assert torch.isfinite(out.prev_sample).all() and torch.isfinite(out.pred_original_sample).all()
    assert max(abs(s / sigmas[0] - 1) for s in sigmas) < 0.03
    bound = AnalyticDPMScheduler.from_config(config, ms_eps=ms, ms_x0=0.9, data_range=None, clip_sample=False, eta=eta)
    bound.set_timesteps(10)
    pair = pair_coefficients(abar, bound.trajectory[1], bound.trajectory[0], eta)  # c[N-1] = ms_x0, the bound
    assert bound.step_coefficients(eta).sigma[0, 0] ** 2 == pytest.approx(pair.lambda2 + pair.coef**2 * 0.9, rel=1e-12)
    blind = AnalyticDPMScheduler.from_config(config, ms_eps=ms, data_range=None, clip_sample=False, eta=eta)
    with pytest.raises(ValueError, match="step from t=999 .* needs a bound on the data's variance.*channel_ms_x0"):
        blind.set_timesteps(10)


@pytest.mark.parametrize("num_steps", [2, 5, 10])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_zero_snr_is_exact_on_gaussian_data(num_steps, eta):
    """Exact eps of N(0, v I) data on a zero-SNR schedule, from t = N-1 to 0: the samples have variance v for any
    K, the first step taking c = v (the data's second moment) where x_{N-1} says nothing."""
    config = dict(num_train_timesteps=N, rescale_betas_zero_snr=True, timestep_spacing="linspace")
    model = ExactGaussianEps(alphas_cumprod_from_config(config), v=0.25)
    scheduler = AnalyticDPMScheduler.from_config(config, ms_eps=model.exact_ms_eps(), ms_x0=0.25, data_range=None,
                                     clip_sample=False, eta=eta)
    scheduler.set_timesteps(num_steps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 1, 8, 8, generator=g)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, int(t)), t, x, generator=g).prev_sample
    assert abs(float(x.var()) / 0.25 - 1) < 0.02


# ---------------------------------------------------------------- step: dtype, K = 1, arguments, previous_timestep
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_step_computes_in_float32_and_returns_the_input_dtype(dtype):
    scheduler = AnalyticDPMScheduler.from_config({}, ms_eps=MS, timestep_spacing="linspace")
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 3, 8, 8, generator=g).to(dtype), torch.randn(2, 3, 8, 8, generator=g).to(dtype)
    results = []
    for inputs in ((x, out), (x.float(), out.float())):
        scheduler.set_timesteps(10)
        results.append(scheduler.step(inputs[1], 999, inputs[0], generator=torch.Generator().manual_seed(1)))
    low, full = results
    assert low.prev_sample.dtype == low.pred_original_sample.dtype == dtype
    # exact on any CPU: the low-precision inputs are widened exactly, then both steps run the same float32 operations
    # on the same values and noise, and the result gets the same cast
    assert torch.equal(low.prev_sample, full.prev_sample.to(dtype))
    assert torch.equal(low.pred_original_sample, full.pred_original_sample.to(dtype))


def test_one_step_goes_from_the_last_timestep_to_x0_as_ddim_does():
    ddim = DDIMScheduler(num_train_timesteps=N, timestep_spacing="trailing", set_alpha_to_one=True)
    ddim.set_timesteps(1)
    ours = AnalyticDPMScheduler.from_config(ddim.config, ms_eps=MS, eta=0.0)
    ours.set_timesteps(1)
    even = AnalyticDPMScheduler.from_config({}, ms_eps=MS, timestep_spacing="optimal", x0_mse=MS * 0.1)
    even.set_timesteps(1)
    assert ours.trajectory == ddim.timesteps.tolist() == even.trajectory == [N - 1]
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    mine = ours.step(eps, N - 1, x)
    theirs = ddim.step(eps, N - 1, x, eta=0.0, use_clipped_model_output=True)
    torch.testing.assert_close(mine.prev_sample, theirs.prev_sample, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mine.prev_sample, mine.pred_original_sample)
    assert ours.step_coefficients(1.0).sigma.tolist() == [[0.0]]
    ours.set_timesteps(timesteps=[500])
    assert ours.trajectory == [500]


def test_step_takes_ddims_argument_order_and_refuses_unknown_keywords():
    ddim_order = list(inspect.signature(DDIMScheduler.step).parameters)
    assert list(inspect.signature(AnalyticDPMScheduler.step).parameters) == ddim_order
    scheduler = AnalyticDPMScheduler.from_config({}, ms_eps=MS, timestep_spacing="linspace")
    x, out = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    results = []
    for call in (lambda: scheduler.step(out, 999, x, 0.3, None, torch.Generator().manual_seed(0)),
                 lambda: scheduler.step(out, 999, x, eta=0.3, generator=torch.Generator().manual_seed(0))):
        scheduler.set_timesteps(10)
        results.append(call().prev_sample)
    assert torch.equal(*results)
    scheduler.set_timesteps(10)
    with pytest.raises(TypeError, match="step\\(\\) got eta=Generator: .*as in DDIMScheduler.step; pass generator="):
        scheduler.step(out, 999, x, torch.Generator())  # DDPMScheduler's order puts the generator fourth
    with pytest.raises(TypeError, match="unexpected keyword argument 'genrator'"):
        scheduler.step(out, 999, x, genrator=torch.Generator())
    assert scheduler.step_index is None  # nothing was stepped


def test_previous_timestep_is_ddpms():
    scheduler = AnalyticDPMScheduler.from_config({}, ms_eps=MS, timestep_spacing="linspace")
    scheduler.set_timesteps(10)
    ddpm = DDPMScheduler(num_train_timesteps=N)
    ddpm.set_timesteps(timesteps=scheduler.trajectory)
    for t in scheduler.timesteps:
        mine, theirs = scheduler.previous_timestep(t), ddpm.previous_timestep(t)
        assert isinstance(mine, torch.Tensor) and mine.dtype == theirs.dtype and int(mine) == int(theirs)


# ---------------------------------------------------------------- the table's settings win, contradictions refused
def test_from_table_takes_the_tables_prediction_type():
    table = table_for(SD_V1_5, data_range=None, prediction_type="v_prediction")
    scheduler = quietly(AnalyticDPMScheduler.from_table, table, SD_V1_5)  # the config does not say
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.clip_sample is False
    assert quietly(AnalyticDPMScheduler.from_table, table, SD_2_1).config.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="prediction_type='v_prediction', but the scheduler config .* says 'epsilon'"):
        quietly(AnalyticDPMScheduler.from_table, table, {**SD_V1_5, "prediction_type": "epsilon"})
    with pytest.raises(ValueError, match="says 'sample'"):
        quietly(AnalyticDPMScheduler.from_table, table, SD_2_1, prediction_type="sample")
    live = DDPMScheduler(**{k: v for k, v in SD_V1_5.items() if not k.startswith("_") and k in
                            inspect.signature(DDPMScheduler.__init__).parameters})
    assert "prediction_type" in live.config["_use_default_values"]  # left at its default: not a contradiction
    assert quietly(AnalyticDPMScheduler.from_table, table, live).config.prediction_type == "v_prediction"


def test_from_table_takes_the_tables_data_range_and_clip():
    pixel = table_for(DDPM_CIFAR10, data_range=(-1.0, 1.0))
    scheduler = AnalyticDPMScheduler.from_table(pixel, {**DDPM_CIFAR10, "clip_sample_range": 1.0})
    assert scheduler.config.clip_sample is True and scheduler.table.data_range == (-1.0, 1.0)
    with pytest.raises(ValueError, match="x0_hat clipped to \\(-1.0, 1.0\\), but the scheduler config sets "
                                         "clip_sample=False: leave the clip to the table"):
        AnalyticDPMScheduler.from_table(pixel, {**DDPM_CIFAR10, "clip_sample": False})
    with pytest.raises(ValueError, match="sets clip_sample_range=2"):
        AnalyticDPMScheduler.from_table(pixel, DDPM_CIFAR10, clip_sample_range=2)
    with pytest.raises(ValueError, match="data_range=None contradicts the variance table's data_range=\\(-1.0, 1.0\\)"):
        AnalyticDPMScheduler.from_table(pixel, DDPM_CIFAR10, data_range=None)
    latent = table_for(DDPM_CIFAR10, data_range=None)
    with pytest.raises(ValueError, match="no data range \\(latents\\), but the scheduler config clips x0_hat"):
        AnalyticDPMScheduler.from_table(latent, DDPM_CIFAR10)  # google/ddpm-cifar10-32 says clip_sample: true
    assert AnalyticDPMScheduler.from_table(latent, DDPM_CIFAR10, clip_sample=False).config.clip_sample is False


def test_contradictory_inputs_are_refused():
    with pytest.raises(ValueError, match="ms_eps is not the channel mean of channel_ms_eps .*different tables"):
        AnalyticDPMScheduler.from_config({}, ms_eps=MS, channel_ms_eps=np.stack([MS * 0.9] * 3))
    with pytest.raises(ValueError, match="x0_mse is not the channel mean of channel_x0_mse"):
        AnalyticDPMScheduler.from_config({}, ms_eps=MS, x0_mse=MS * 0.1, channel_x0_mse=np.stack([MS * 0.2] * 3))
    same = AnalyticDPMScheduler.from_config({}, ms_eps=MS, channel_ms_eps=np.stack([MS * 0.9, MS * 1.1]))  # the mean
    np.testing.assert_allclose(same.ms_eps, MS)
    with pytest.raises(ValueError, match="trajectory='optimal': the timesteps have one setting, timestep_spacing; "
                                         "pass timestep_spacing='optimal'"):
        quietly(AnalyticDPMScheduler.from_config, SD_V1_5, ms_eps=MS, trajectory="optimal")
    with pytest.raises(ValueError, match="trajectory='even': .*pass timestep_spacing='linspace'"):
        AnalyticDPMScheduler.from_table(table_for(DDPM_CIFAR10), DDPM_CIFAR10, trajectory="even")


def test_all_nan_x0_mse_names_the_fix():
    with pytest.raises(ValueError, match="x0_mse is NaN at every timestep .*leave x0_mse out"):
        AnalyticDPMScheduler.from_config({}, ms_eps=MS, x0_mse=np.full(N, np.nan), timestep_spacing="optimal")
    abar = alphas_cumprod_from_config({})
    with pytest.raises(ValueError, match="x0_mse is NaN at every timestep .*pass x0_mse=None to use ms_eps"):
        optimal_trajectory(abar, MS, 10, x0_mse=np.full(N, np.nan))


def test_sampling_at_another_size_than_the_tables_warns_once():
    table = table_for(SD_V1_5, data_range=None, channels=4, sample_shape=[4, 8, 8], channel_ms_x0=[1.0] * 4)
    scheduler = quietly(AnalyticDPMScheduler.from_table, table, SD_V1_5)
    assert scheduler.table.sample_shape == (4, 8, 8) and scheduler.ms_x0 == 1.0
    scheduler.set_timesteps(10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduler.step(torch.zeros(1, 4, 8, 8), 901, torch.zeros(1, 4, 8, 8))
    with pytest.warns(UserWarning, match="estimated on samples of shape \\(4, 8, 8\\), but this pipeline samples "
                                         "\\(4, 16, 16\\)"):
        scheduler.step(torch.zeros(1, 4, 16, 16), 801, torch.zeros(1, 4, 16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduler.step(torch.zeros(1, 4, 16, 16), 701, torch.zeros(1, 4, 16, 16))  # once per shape


def test_dpm_solver_config_with_karras_sigmas_still_samples():
    base = DPMSolverMultistepScheduler(num_train_timesteps=N, use_karras_sigmas=True)
    with pytest.warns(UserWarning, match="does not use use_karras_sigmas"):
        scheduler = AnalyticDPMScheduler.from_config(base.config, ms_eps=MS)
    scheduler.set_timesteps(10)
    assert scheduler.config.timestep_spacing == "linspace" and len(scheduler.trajectory) == 10
