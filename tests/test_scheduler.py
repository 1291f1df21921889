"""AnalyticDPMScheduler: exactness, agreement with Diffusers' schedulers, pipelines, round trips, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tiny_unet
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, PNDMScheduler

from analytic_sampler.pretrained import load_pretrained
from analytic_sampler.sample_trajectory import sample_quality_trajectory
from analytic_sampler.schedule import alphas_cumprod_from_config, schedule_fingerprint
from analytic_sampler.schedulers.analytic_dpm import AnalyticDPMScheduler
from analytic_sampler.table import VarianceTable
from analytic_sampler.trajectory import even_trajectory, optimal_trajectory, quadratic_trajectory
from analytic_sampler.variance import ddpm_variance

N = 1000


def sample_variance(scheduler, model, num_steps: int, n: int = 2000) -> float:
    scheduler.set_timesteps(num_steps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, int(t)), t, x, generator=g).prev_sample
    return float(x.var())


@pytest.mark.parametrize("num_steps", [2, 5, 10])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing", ["linspace", "optimal"])
@pytest.mark.parametrize("variance", ["analytic", "residual"])
def test_exact_on_isotropic_gaussian(gaussian_model, linear_scheduler, num_steps, eta, spacing, variance):
    """Exact eps: both variances coincide with the optimum, on any trajectory; with x0_mse in the table,
    timestep_spacing='optimal' is the residual DP's."""
    table = {"ms_eps": gaussian_model.exact_ms_eps().tolist()}
    if variance == "residual":
        table["x0_mse"] = gaussian_model.exact_x0_mse().tolist()
    sched = AnalyticDPMScheduler.from_config(
        linear_scheduler.config, **table, variance=variance, eta=eta, timestep_spacing=spacing, clip_sample=False,
        data_range=None,
    )
    assert abs(sample_variance(sched, gaussian_model, num_steps) / gaussian_model.v - 1) < 0.02
    if spacing == "optimal" and variance == "residual":
        assert sched.trajectory == optimal_trajectory(sched.alphas_cumprod_64, None, num_steps, table["x0_mse"])


@pytest.mark.parametrize("num_steps", [2, 5, 10])
def test_ddpm_is_not_exact_at_few_steps(gaussian_model, num_steps):
    ddpm = DDPMScheduler(num_train_timesteps=N, clip_sample=False)
    ddpm.set_timesteps(timesteps=even_trajectory(N, num_steps))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 1, 8, 8, generator=g)
    for t in ddpm.timesteps:
        x = ddpm.step(gaussian_model(x, int(t)), t, x, generator=g).prev_sample
    assert abs(float(x.var()) / gaussian_model.v - 1) > 0.2


def test_unit_ms_eps_gives_ddpm_fixed_small_variance(linear_scheduler):
    sched = AnalyticDPMScheduler.from_config(linear_scheduler.config, ms_eps=[1.0] * N, timestep_spacing="linspace")
    sched.set_timesteps(10)
    t = np.array(sched.trajectory)
    sigma = sched.step_coefficients(1.0).sigma[:, 0]
    ddpm = DDPMScheduler(num_train_timesteps=N)
    ddpm.set_timesteps(timesteps=sched.trajectory)
    expected = np.array([float(ddpm._get_variance(int(ti))) for ti in t[:-1]])
    np.testing.assert_allclose(sigma[:-1] ** 2, expected, rtol=1e-5, atol=1e-7)  # DDPM works in float32
    np.testing.assert_allclose(sigma[:-1] ** 2, ddpm_variance(sched.alphas_cumprod_64, t[1:], t[:-1]), rtol=1e-12)
    assert sigma[-1] == 0.0  # the last step is deterministic


def _means_agree(ours, theirs, timesteps, their_kwargs, clip):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=g) * 1.5
    out = torch.randn(4, 3, 8, 8, generator=g)
    zero = torch.zeros_like(x)
    for i, t in enumerate(timesteps):
        mine = ours.step(out, t, x, variance_noise=zero).prev_sample
        std = ours.step_coefficients(ours.config.eta).sigma[i, 0]
        their = theirs.step(out, t, x, generator=torch.Generator().manual_seed(2), **their_kwargs).prev_sample
        if isinstance(theirs, DDPMScheduler) and t > 0:
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
            their = their - theirs._get_variance(t) ** 0.5 * noise
        assert torch.allclose(mine, their, atol=1e-5), (t, (mine - their).abs().max())
        assert std >= 0


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_mean_matches_ddpm_step(clip, prediction_type):
    ddpm = DDPMScheduler(num_train_timesteps=N, clip_sample=clip, prediction_type=prediction_type)
    ours = AnalyticDPMScheduler.from_config(ddpm.config, ms_eps=[0.9] * N, timestep_spacing="linspace")
    ours.set_timesteps(10)
    ddpm.set_timesteps(timesteps=ours.trajectory)
    _means_agree(ours, ddpm, ours.trajectory, {}, clip)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_mean_matches_ddim_step(clip, prediction_type):
    # DDIM steps from t to t - N/K, so its trajectory is ours only with evenly strided ("trailing") timesteps;
    # its last step goes to abar = 1 (set_alpha_to_one), which is ours: x0_hat, no noise.
    ddim = DDIMScheduler(num_train_timesteps=N, clip_sample=clip, prediction_type=prediction_type,
                         timestep_spacing="trailing", set_alpha_to_one=True)
    ddim.set_timesteps(10)
    ours = AnalyticDPMScheduler.from_config(ddim.config, ms_eps=[0.9] * N, eta=0.0)
    ours.set_timesteps(timesteps=ddim.timesteps.tolist())
    _means_agree(ours, ddim, ours.trajectory, {"eta": 0.0, "use_clipped_model_output": True}, clip)


def test_learned_variance_output_is_accepted(linear_scheduler):
    sched = AnalyticDPMScheduler.from_config(linear_scheduler.config, ms_eps=[0.9] * N)
    sched.set_timesteps(5)
    x = torch.randn(2, 3, 8, 8)
    eps = torch.randn(2, 3, 8, 8)
    a = sched.step(torch.cat([eps, torch.randn_like(eps)], 1), sched.timesteps[0], x, variance_noise=torch.zeros_like(x))
    sched.set_timesteps(5)
    b = sched.step(eps, sched.timesteps[0], x, variance_noise=torch.zeros_like(x))
    assert torch.equal(a.prev_sample, b.prev_sample)  # a slice of the same eps, through the same elementwise step
    with pytest.raises(ValueError, match="expected 3 \\(fixed variance\\) or 6"):
        sched.step(torch.randn(2, 5, 8, 8), sched.timesteps[1], x)


@pytest.mark.parametrize("num_steps", [2, 10, 50])
def test_ddpm_pipeline_with_tiny_unet(num_steps):
    unet = tiny_unet(channels=3)
    table = np.linspace(0.2, 0.999, N)
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=N))
    pipe.scheduler = AnalyticDPMScheduler.from_config(pipe.scheduler.config, ms_eps=table.tolist())
    pipe.set_progress_bar_config(disable=True)
    run = lambda: pipe(batch_size=2, num_inference_steps=num_steps, generator=torch.Generator().manual_seed(0), output_type="np").images
    first, second = run(), run()
    assert first.shape == (2, 8, 8, 3)
    assert np.isfinite(first).all() and np.array_equal(first, second)
    assert len(pipe.scheduler.timesteps) == num_steps


def test_ddim_pipeline_after_assignment_uses_eta_zero_by_default():
    unet = tiny_unet(channels=1)
    ms = np.linspace(0.2, 0.999, N).tolist()
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=N))
    pipe.scheduler = AnalyticDPMScheduler.from_config(pipe.scheduler.config, ms_eps=ms)
    pipe.set_progress_bar_config(disable=True)
    a = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np").images
    b = pipe(batch_size=2, num_inference_steps=5, eta=0.0, generator=torch.Generator().manual_seed(5), output_type="np").images
    # Another seed: other noise (initial, and in Analytic-DDIM's steps, whose analytic variance is above zero).
    c = pipe(batch_size=2, num_inference_steps=5, eta=1.0, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert a.shape == (2, 8, 8, 1) and not np.array_equal(a, b) and not np.array_equal(a, c)


def test_hand_written_loop_and_save_load_round_trip(tmp_path, linear_scheduler):
    ms = np.linspace(0.3, 0.99, N)
    ms[5] = np.nan  # not estimated, never visited by an even 10-step trajectory
    sched = AnalyticDPMScheduler.from_config(linear_scheduler.config, ms_eps=ms.tolist(), timestep_spacing="linspace",
                                             eta=0.5)
    sched.save_pretrained(tmp_path)
    loaded = AnalyticDPMScheduler.from_pretrained(tmp_path)
    assert loaded.config.eta == 0.5 and loaded.config.timestep_spacing == "linspace"
    np.testing.assert_array_equal(loaded.ms_eps, sched.ms_eps)
    outs = []
    for s in (sched, loaded):
        s.set_timesteps(10)
        g = torch.Generator().manual_seed(3)
        x = torch.randn(2, 1, 8, 8, generator=g)
        for t in s.timesteps:
            x = s.step(torch.tanh(x), t, x, generator=g).prev_sample
        outs.append(x)
    assert torch.equal(*outs)


def test_residual_variance_round_trip_and_step(tmp_path, linear_scheduler):
    """x0_mse and variance survive save_pretrained; the residual step's sigma is lambda^2 + coef^2 x0_mse."""
    from analytic_sampler.variance import residual_variance

    x0_mse = np.linspace(1e-4, 0.4, N)
    sched = AnalyticDPMScheduler.from_config(linear_scheduler.config, ms_eps=[0.5] * N, x0_mse=x0_mse.tolist(),
                                             variance="residual", timestep_spacing="linspace", eta=0.3,
                                             variance_cap_y=None)
    sched.save_pretrained(tmp_path)
    loaded = AnalyticDPMScheduler.from_pretrained(tmp_path)
    assert loaded.config.variance == "residual"
    np.testing.assert_array_equal(loaded.x0_mse, x0_mse)
    loaded.set_timesteps(10)
    t = np.array(loaded.trajectory)
    expected = residual_variance(loaded.alphas_cumprod_64, x0_mse, t[1:], t[:-1], 0.3)
    np.testing.assert_allclose(loaded.step_coefficients(0.3).sigma[:-1, 0] ** 2, expected, rtol=1e-12)


def test_config_round_trip_with_ddpm_ddim_pndm():
    ms = [0.5] * N
    for cls in (DDPMScheduler, DDIMScheduler, PNDMScheduler):
        base = cls(num_train_timesteps=N, beta_schedule="squaredcos_cap_v2")
        ours = AnalyticDPMScheduler.from_config(base.config, ms_eps=ms)
        np.testing.assert_allclose(ours.alphas_cumprod.numpy(), base.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-7)
        back = cls.from_config(ours.config)
        assert torch.equal(back.alphas_cumprod, base.alphas_cumprod)


@pytest.mark.parametrize("schedule", [
    dict(beta_schedule="linear"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(trained_betas=np.linspace(1e-3, 0.05, N).tolist()),
])
def test_betas_alphas_and_alphas_cumprod_match_ddpm(schedule):
    ddpm = DDPMScheduler(num_train_timesteps=N, **schedule)
    ours = AnalyticDPMScheduler.from_config(ddpm.config, ms_eps=[0.5] * N)
    for name in ("betas", "alphas", "alphas_cumprod"):
        mine, theirs = getattr(ours, name), getattr(ddpm, name)
        assert mine.dtype == torch.float32 and mine.shape == (N,), name
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(torch.cumprod(ours.alphas.double(), 0).float(), ours.alphas_cumprod, rtol=1e-5, atol=0)


@pytest.mark.parametrize("num_steps", [10, 25, 50])
@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler])
def test_timestep_spacing_gives_the_source_schedulers_timesteps(cls, spacing, steps_offset, num_steps):
    theirs = cls(num_train_timesteps=N, timestep_spacing=spacing, steps_offset=steps_offset)
    ours = AnalyticDPMScheduler.from_config(theirs.config, ms_eps=[0.5] * N)
    assert (ours.config.timestep_spacing, ours.config.steps_offset) == (spacing, steps_offset)
    theirs.set_timesteps(num_steps)
    ours.set_timesteps(num_steps)
    assert ours.timesteps.dtype == theirs.timesteps.dtype and torch.equal(ours.timesteps, theirs.timesteps)
    assert ours.trajectory == theirs.timesteps.tolist() and ours.num_inference_steps == num_steps
    assert ours.step_coefficients(1.0).sqrt_abar_s[-1] == 1.0  # the last step goes to clean data, also from t=1


def test_trailing_spacing_drops_diffusers_spurious_last_timestep():
    ddim = DDIMScheduler(num_train_timesteps=N, timestep_spacing="trailing")
    ddim.set_timesteps(61)  # Diffusers' float arange gives 62 points here, the last one t=-1
    ours = AnalyticDPMScheduler.from_config(ddim.config, ms_eps=[0.5] * N)
    ours.set_timesteps(61)
    assert ours.trajectory == ddim.timesteps.tolist()[:61] and ddim.timesteps[-1] == -1


def test_the_argument_wins_over_the_configs_spacing(tmp_path, gaussian_model):
    """One timestep setting: timestep_spacing= wins over the config's, which is kept when none is passed; the
    package's trajectories are spacings too, and a saved scheduler keeps its spacing and offset."""
    ms = gaussian_model.exact_ms_eps().tolist()
    ddpm = DDPMScheduler(num_train_timesteps=N, timestep_spacing="trailing", steps_offset=1)
    ddpm.save_pretrained(tmp_path / "ddpm")
    saved = DDPMScheduler.load_config(tmp_path / "ddpm")  # a pipeline's config, spacing as saved
    kept = AnalyticDPMScheduler.from_config(saved, ms_eps=ms)
    chosen = AnalyticDPMScheduler.from_config(saved, ms_eps=ms, timestep_spacing="optimal")
    respaced = AnalyticDPMScheduler.from_config(chosen.config, timestep_spacing="linspace")
    for s in (kept, chosen, respaced):
        s.set_timesteps(10)
    assert kept.config.timestep_spacing == "trailing" and "trajectory" not in kept.config
    assert kept.trajectory == list(range(999, -1, -100))
    assert chosen.config.timestep_spacing == "optimal"
    assert chosen.trajectory == optimal_trajectory(chosen.alphas_cumprod_64, ms, 10)
    assert respaced.trajectory == even_trajectory(N, 10)
    # The way back to a Diffusers scheduler from this package's trajectory names a spacing Diffusers knows.
    back = DDPMScheduler.from_config(chosen.config, timestep_spacing="trailing")
    back.set_timesteps(10)
    assert back.timesteps.tolist() == kept.trajectory
    kept.save_pretrained(tmp_path / "ours")
    loaded = AnalyticDPMScheduler.from_pretrained(tmp_path / "ours")
    assert (loaded.config.timestep_spacing, loaded.config.steps_offset) == ("trailing", 1)
    loaded.set_timesteps(10)
    assert loaded.trajectory == kept.trajectory


def test_config_of_no_scheduler_gets_trailing_timesteps():
    """No spacing, no trajectory and no source scheduler to take them from: the package's default, trailing, which
    starts at N-1 and ends at N/K - 1."""
    config = {"num_train_timesteps": N, "beta_schedule": "linear"}
    sched = AnalyticDPMScheduler.from_config(config, ms_eps=[0.5] * N)
    assert sched.config.timestep_spacing == "trailing" and "trajectory" not in sched.config
    sched.set_timesteps(10)
    assert sched.trajectory == list(range(999, 0, -100))
    again = AnalyticDPMScheduler.from_config(sched.config, ms_eps=[0.5] * N)  # the default is in the saved config
    assert again.config.timestep_spacing == "trailing"


def test_explicit_even_and_optimal_timesteps(linear_scheduler, gaussian_model):
    ms = gaussian_model.exact_ms_eps().tolist()
    sched = AnalyticDPMScheduler.from_config(linear_scheduler.config, ms_eps=ms, timestep_spacing="linspace")
    sched.set_timesteps(timesteps=[999, 600, 100, 0])
    assert sched.timesteps.tolist() == [999, 600, 100, 0]
    sched.set_timesteps(10)
    assert sched.config.timestep_spacing == "linspace" and sched.trajectory == even_trajectory(N, 10)
    optimal = AnalyticDPMScheduler.from_config(linear_scheduler.config, ms_eps=ms, timestep_spacing="optimal")
    optimal.set_timesteps(10)
    assert optimal.trajectory == optimal_trajectory(optimal.alphas_cumprod_64, ms, 10) != even_trajectory(N, 10)


def test_samples_spacing_is_the_tables_sample_quality_trajectory(tmp_path):
    """timestep_spacing="samples" runs the sample-quality trajectory of the table's sample cost, which the scheduler
    keeps in its table (and its saved table file); one DP solve serves every K up to the largest asked for."""
    model = load_pretrained("digits-ddpm-linear")
    scheduler = AnalyticDPMScheduler.from_table(model.table, model.scheduler.config, timestep_spacing="samples")
    scheduler.save_pretrained(tmp_path)
    loaded = AnalyticDPMScheduler.from_pretrained(tmp_path)
    for k in (10, 4, 25, 10):
        for s in (scheduler, loaded):
            s.set_timesteps(k)
            assert s.trajectory == sample_quality_trajectory(model.table, k)


def test_step_refuses_an_unexpected_timestep(linear_scheduler):
    sched = AnalyticDPMScheduler.from_config(linear_scheduler.config, ms_eps=[0.5] * N, timestep_spacing="linspace")
    sched.set_timesteps(10)
    x, out = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    sched.step(out, 999, x)
    with pytest.raises(ValueError, match="got timestep 999, but step 1 of this trajectory is t=888"):
        sched.step(out, 999, x)
    with pytest.raises(ValueError, match="got timestep 777, but step 1 of this trajectory is t=888"):
        sched.step(out, torch.tensor(777), x)  # CPU tensors are checked too
    assert sched.step_index == 1  # a refused step changes nothing
    sched.step(out, torch.tensor(888), x)
    # A timestep on an accelerator is not read back (that would sync): a meta tensor has no value to read.
    sched.step(out, torch.tensor(777, device="meta"), x)
    assert sched.step_index == 3


def test_begin_index_starts_the_loop_part_way(linear_scheduler):
    sched, reference = (
        AnalyticDPMScheduler.from_config(linear_scheduler.config, ms_eps=[0.5] * N, timestep_spacing="linspace")
        for _ in range(2)
    )
    for s in (sched, reference):
        s.set_timesteps(10)
    assert sched.begin_index is None and sched.step_index is None
    sched.set_begin_index(3)
    assert sched.begin_index == 3 and sched.step_index is None
    x, out = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    with pytest.raises(ValueError, match="got timestep 999, but step 3 of this trajectory is t=666"):
        sched.step(out, sched.timesteps[0], x)
    assert sched.step_index is None
    y = x
    for i, t in enumerate(sched.timesteps[3:], start=3):
        x = sched.step(out, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        y = reference.step(out, t, y, generator=torch.Generator().manual_seed(i)).prev_sample  # found from t
        assert sched.step_index == (i + 1 if i < 9 else None) and torch.equal(x, y)
    sched.set_timesteps(10)
    assert sched.begin_index is None


def test_variance_cap_on_step_into_t1(linear_scheduler):
    kw = dict(ms_eps=[0.0] * N, timestep_spacing="linspace")
    free = AnalyticDPMScheduler.from_config(linear_scheduler.config, **kw)
    capped = AnalyticDPMScheduler.from_config(linear_scheduler.config, variance_cap_y=1.0, **kw)
    for s in (free, capped):
        s.set_timesteps(5)
    cap = 2 / 255 * np.sqrt(np.pi / 2)
    free_coef, capped_coef = free.step_coefficients(1.0), capped.step_coefficients(1.0)
    assert free_coef.sigma[-2, 0] > cap
    assert capped_coef.sigma[-2, 0] == pytest.approx(cap)
    for name in ("sqrt_abar_t", "sqrt_one_minus_abar_t", "sqrt_abar_s", "eps_coef"):  # the cap changes sigma only
        np.testing.assert_array_equal(getattr(free_coef, name), getattr(capped_coef, name))
    np.testing.assert_array_equal(np.delete(free_coef.sigma, -2, 0), np.delete(capped_coef.sigma, -2, 0))


# ---------------------------------------------------------------- error paths: a clear message that names the fix
def test_missing_table_is_refused(linear_scheduler):
    """No table: refused by name, from a config and from the constructor, which takes options only."""
    with pytest.raises(ValueError, match="needs the model's variance table: build it with AnalyticDPMScheduler."
                                         "from_table\\(table, config\\).*estimate_moments"):
        AnalyticDPMScheduler.from_config(linear_scheduler.config)
    with pytest.raises(ValueError, match="needs the model's variance table"):
        AnalyticDPMScheduler(eta=0.0)
    with pytest.raises(ValueError, match="the variance table needs ms_eps \\(or channel_ms_eps\\)"):
        AnalyticDPMScheduler.from_config(linear_scheduler.config, x0_mse=[0.1] * N)
    with pytest.raises(TypeError, match="unexpected keyword argument 'ms_eps'"):
        AnalyticDPMScheduler(ms_eps=[0.5] * N)


def test_wrong_length_and_nan_tables_are_refused(linear_scheduler):
    with pytest.raises(ValueError, match="ms_eps has 10 entries.*num_train_timesteps=1000"):
        AnalyticDPMScheduler.from_config(linear_scheduler.config, ms_eps=[0.5] * 10)
    ms = [0.5] * N
    ms[999] = float("nan")
    sched = AnalyticDPMScheduler.from_config(linear_scheduler.config, ms_eps=ms, timestep_spacing="linspace")
    with pytest.raises(ValueError, match="NaN/inf at 1 needed timestep\\(s\\) \\(999\\).*estimate_moments"):
        sched.set_timesteps(10)


def test_mismatched_fingerprint_is_refused(linear_scheduler):
    cosine = DDPMScheduler(num_train_timesteps=N, beta_schedule="squaredcos_cap_v2")
    cosine_print = schedule_fingerprint(alphas_cumprod_from_config(cosine.config))
    ok = AnalyticDPMScheduler.from_config(cosine.config, ms_eps=[0.5] * N, table_fingerprint=cosine_print)
    assert ok.table.fingerprint == cosine_print and "table_fingerprint" not in ok.config
    with pytest.raises(ValueError, match=f"estimated for schedule {cosine_print}.*this model's own scheduler config"):
        AnalyticDPMScheduler.from_config(linear_scheduler.config, ms_eps=[0.5] * N, table_fingerprint=cosine_print)


@pytest.mark.parametrize("bad, message", [
    (dict(num_inference_steps=0), "num_steps=0 must be between 1 and num_train_timesteps=1000"),
    (dict(num_inference_steps=1001), "num_steps=1001 must be between 1"),
    (dict(timesteps=[]), "custom timesteps need at least 1 entries"),
    (dict(timesteps=[0, 500, 999]), "strictly descending"),
    (dict(timesteps=[1200, 0]), "must lie in \\[0, 999\\]"),
    (dict(), "needs num_inference_steps"),
])
def test_bad_timesteps_are_refused(linear_scheduler, bad, message):
    sched = AnalyticDPMScheduler.from_config(linear_scheduler.config, ms_eps=[0.5] * N, timestep_spacing="linspace")
    with pytest.raises(ValueError, match=message):
        sched.set_timesteps(**bad)


def test_bad_options_are_refused(linear_scheduler):
    with pytest.raises(ValueError, match="eta=1.5 is outside \\[0, 1\\]"):
        AnalyticDPMScheduler.from_config(linear_scheduler.config, ms_eps=[0.5] * N, eta=1.5)
    with pytest.raises(ValueError, match="timestep_spacing='fast'"):
        AnalyticDPMScheduler.from_config(linear_scheduler.config, ms_eps=[0.5] * N, timestep_spacing="fast")
    with pytest.raises(ValueError, match="timestep_spacing='even'.*'leading', 'linspace', 'trailing', 'optimal', "
                                         "'quadratic', 'samples'\\) \\('even' is Diffusers' 'linspace'\\)"):
        AnalyticDPMScheduler.from_config(linear_scheduler.config, ms_eps=[0.5] * N, timestep_spacing="even")
    with pytest.raises(ValueError, match="timestep_spacing='samples' needs the table's sample cost"):
        AnalyticDPMScheduler.from_config(linear_scheduler.config, ms_eps=[0.5] * N, timestep_spacing="samples")
    offset = AnalyticDPMScheduler.from_config({}, ms_eps=[0.5] * N, timestep_spacing="leading", steps_offset=1)
    with pytest.raises(ValueError, match="starts at t=1000 > N-1=999 for K=1000; use fewer steps"):
        offset.set_timesteps(N)
    with pytest.raises(ValueError, match="prediction_type='x0'"):
        AnalyticDPMScheduler.from_config(linear_scheduler.config, ms_eps=[0.5] * N, prediction_type="x0")
    with pytest.raises(ValueError, match="variance='residual' needs the table's x0_mse.*analytic-sampler precompute"):
        AnalyticDPMScheduler.from_config(linear_scheduler.config, ms_eps=[0.5] * N, variance="residual")
    with pytest.raises(ValueError, match="variance='learned'; use one of \\('analytic', 'residual'\\)"):
        AnalyticDPMScheduler.from_config(linear_scheduler.config, ms_eps=[0.5] * N, variance="learned")
    sched = AnalyticDPMScheduler.from_config(linear_scheduler.config, ms_eps=[0.5] * N)
    with pytest.raises(ValueError, match="call set_timesteps"):
        sched.step(torch.zeros(1, 1, 2, 2), 999, torch.zeros(1, 1, 2, 2))


def test_from_table_checks_the_schedule(linear_scheduler, gaussian_model, tmp_path):
    abar = alphas_cumprod_from_config(linear_scheduler.config)
    ms = gaussian_model.exact_ms_eps()
    table = VarianceTable(ms, np.full(N, 1e-3), np.full(N, 100), abar, data_range=None)
    sched = AnalyticDPMScheduler.from_table(table, linear_scheduler.config)
    assert sched.table.fingerprint == table.fingerprint and sched.table.data_range is None
    own = AnalyticDPMScheduler.from_table(table)  # the table's own schedule, as trained_betas
    np.testing.assert_allclose(own.alphas_cumprod_64, abar, rtol=1e-12)
    chosen = AnalyticDPMScheduler.from_table(table, linear_scheduler.config, timestep_spacing="quadratic")
    for s in (sched, own, chosen):
        s.set_timesteps(10)
    assert sched.trajectory == list(range(900, -1, -100))  # DDPMScheduler's own spacing ("leading")
    assert own.trajectory == list(range(999, 0, -100))  # no config: this package's default, trailing
    assert chosen.trajectory == quadratic_trajectory(N, 10)  # the argument wins over the config
    sched.save_pretrained(tmp_path)
    assert AnalyticDPMScheduler.from_pretrained(tmp_path).table.fingerprint == table.fingerprint
    assert sched.x0_mse is None  # a format-1 style table: no x0_mse, and residual is refused by name
    with pytest.raises(ValueError, match="needs x0_mse, which this table does not have.*analytic-sampler precompute"):
        AnalyticDPMScheduler.from_table(table, linear_scheduler.config, variance="residual")
    full = VarianceTable.from_sums(ms * 100, ms**2 * 100 + 1e-4, np.full(N, 100), abar,
                                   gaussian_model.exact_x0_mse() * 100, gaussian_model.exact_x0_mse() ** 2 * 100 + 1e-6,
                                   data_range=None)
    residual = AnalyticDPMScheduler.from_table(full, linear_scheduler.config, variance="residual",
                                               timestep_spacing="optimal")
    np.testing.assert_allclose(residual.x0_mse, full.x0_mse)
    residual.set_timesteps(10)
    assert residual.trajectory == optimal_trajectory(abar, None, 10, x0_mse=full.x0_mse)
    cosine = DDPMScheduler(num_train_timesteps=N, beta_schedule="squaredcos_cap_v2")
    with pytest.raises(ValueError, match="table was estimated for schedule .* estimate a table for this model"):
        AnalyticDPMScheduler.from_table(table, cosine.config)


def test_from_table_refuses_the_table_of_another_model_unless_forced():
    from conftest import tiny_unet

    from analytic_sampler.fingerprint import weights_fingerprint

    config = DDPMScheduler(num_train_timesteps=20).config
    abar = alphas_cumprod_from_config(config)
    unet = tiny_unet(channels=1)
    table = VarianceTable(np.full(20, 0.9), np.full(20, 0.01), np.full(20, 4), abar,
                          provenance={"model_id": "mine", "model_fingerprint": weights_fingerprint(unet)})
    assert AnalyticDPMScheduler.from_table(table, config, model=unet).table.fingerprint == table.fingerprint
    with pytest.raises(ValueError, match=r"the variance table \(mine\) does not belong to this model: it was "
                                         r"estimated with weights .*pass force_table=True \(on the command line: "
                                         r"--force-table\)"):
        AnalyticDPMScheduler.from_table(table, config, model=tiny_unet(channels=1, seed=1))
    with pytest.warns(UserWarning, match="used anyway"):
        AnalyticDPMScheduler.from_table(table, config, model=tiny_unet(channels=1, seed=1), force_table=True)


def test_step_coefficients_before_set_timesteps_names_the_fix():
    scheduler = AnalyticDPMScheduler.from_config({"num_train_timesteps": N}, ms_eps=np.linspace(0.2, 0.999, N).tolist())
    with pytest.raises(ValueError, match=r"call set_timesteps\(num_inference_steps\) before step_coefficients"):
        scheduler.step_coefficients(1.0)


def test_the_default_caps_the_step_into_t1_on_bounded_data_only(linear_scheduler):
    """By default the variance of the step into t_1 is capped at (2 * bin * sqrt(pi/2))^2 with 8-bit bins of the data
    range; every other step keeps the analytic variance; variance_cap_y=None and data_range=None leave it uncapped."""
    ms = np.full(N, 0.3).tolist()
    kw = dict(ms_eps=ms, timestep_spacing="linspace")
    capped = AnalyticDPMScheduler.from_config(linear_scheduler.config, **kw)
    free = AnalyticDPMScheduler.from_config(linear_scheduler.config, variance_cap_y=None, **kw)
    latent = AnalyticDPMScheduler.from_config(linear_scheduler.config, data_range=None, **kw)
    for sched in (capped, free, latent):
        sched.set_timesteps(10)
    assert capped.config.variance_cap_y == 2.0
    cap = (2 * 2 / 255 * math.sqrt(math.pi / 2)) ** 2
    a, b = capped.step_coefficients(1.0).sigma[:, 0] ** 2, free.step_coefficients(1.0).sigma[:, 0] ** 2
    assert b[-2] > cap and a[-2] == pytest.approx(cap, rel=1e-12)
    np.testing.assert_array_equal(a[:-2], b[:-2])
    unbounded = AnalyticDPMScheduler.from_config(linear_scheduler.config, data_range=None, variance_cap_y=None, **kw)
    unbounded.set_timesteps(10)
    np.testing.assert_array_equal(latent.step_coefficients(1.0).sigma, unbounded.step_coefficients(1.0).sigma)
