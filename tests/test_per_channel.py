"""Diagonal (per-channel) reverse variance: variance functions, scheduler, likelihood.

The exact test world: "latents" whose channel c is x0_c ~ N(0, v_c I), independent across channels, with
v = (0.05, 0.3, 1, 2). Each channel is an isotropic Gaussian problem of its own (docs/math.md), so

    eps*(x_t)_c = sqrt(bb[t]) x_t,c / (abar[t] v_c + bb[t]),      ms_eps_c[t] = bb[t] / (abar[t] v_c + bb[t]),

and the per-channel analytic variance is the exact reverse variance of every channel; the scalar table (the mean
over channels) is exact for none of them.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import ExactGaussianEps

from analytic_sampler.evaluation.likelihood import NLLOptions, nll_bpd
from analytic_sampler.schedule import alphas_cumprod_from_config
from analytic_sampler.schedulers.analytic_dpm import AnalyticDPMScheduler
from analytic_sampler.table import VarianceTable, validate_ms_eps
from analytic_sampler.trajectory import even_trajectory
from analytic_sampler.variance import analytic_variance, residual_variance

SD_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
ABAR = alphas_cumprod_from_config(SD_SCHEDULE)
BB = 1.0 - ABAR
V = np.array([0.05, 0.3, 1.0, 2.0])
N, C = ABAR.size, V.size


def exact_ms_eps(v: np.ndarray = V) -> np.ndarray:
    """``(C, N)``: ``bb / (abar v_c + bb)``."""
    return ChannelGaussianEps(v).exact_ms_eps()


def exact_x0_mse(v: np.ndarray = V) -> np.ndarray:
    """``(C, N)``: the posterior variance of x0_c, ``v_c bb / (abar v_c + bb)``."""
    return ChannelGaussianEps(v).exact_x0_mse()


# ---------------------------------------------------------------- variance.py
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("data_range", [None, (-1.0, 1.0)])
def test_channel_variance_is_the_scalar_formula_per_row(eta, data_range):
    t = np.array([999, 700, 300, 50, 1])
    s = np.array([700, 300, 50, 1, -1])
    ms, x0 = exact_ms_eps(), exact_x0_mse()
    chan = analytic_variance(ABAR, ms, s, t, eta, data_range)
    assert chan.shape == (C, t.size)
    # exact on any CPU: only +, -, *, /, clip and where touch the channel axis, each correctly rounded per element
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


# ---------------------------------------------------------------- scheduler
def ChannelGaussianEps(v: np.ndarray = V) -> ExactGaussianEps:  # noqa: N802 (reads as the model class)
    """The exact eps of per-channel Gaussian data, ``sqrt(bb[t]) x_t,c / (abar[t] v_c + bb[t])``."""
    return ExactGaussianEps(ABAR, tuple(float(x) for x in v))


def channel_scheduler(per_channel: bool, **kwargs) -> AnalyticDPMScheduler:
    """Stable Diffusion's schedule, no data range, the exact per-channel tables and their channel means as scalars."""
    ms, x0 = exact_ms_eps(), exact_x0_mse()
    return AnalyticDPMScheduler.from_config({}, **{
        **SD_SCHEDULE, "ms_eps": ms.mean(0).tolist(), "x0_mse": x0.mean(0).tolist(), "channel_ms_eps": ms.tolist(),
        "channel_x0_mse": x0.tolist(), "per_channel": per_channel, "clip_sample": False, "data_range": None,
        "timestep_spacing": "linspace", **kwargs,
    })


def channel_variance_errors(scheduler: AnalyticDPMScheduler, num_steps: int, n: int = 20000) -> np.ndarray:
    """``(K, C)`` relative errors of each channel's empirical variance along one sampling loop (the exact
    targets are in the docstring of the test below)."""
    scheduler.set_timesteps(num_steps)
    traj, model = scheduler.trajectory, ChannelGaussianEps()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, C, 8, 8, generator=g)
    errors = []
    for k, t in enumerate(scheduler.timesteps):
        x = scheduler.step(model(x, int(t)), t, x, generator=g).prev_sample
        if k + 1 < len(traj):  # x at the next trajectory point s: its exact marginal
            exact = ABAR[traj[k + 1]] * V + BB[traj[k + 1]]
        else:  # the output x0_hat(x_{t_1}) = E[x0 | x_{t_1}]
            exact = ABAR[traj[-1]] * V**2 / (ABAR[traj[-1]] * V + BB[traj[-1]])
        errors.append(x.double().transpose(0, 1).flatten(1).var(1).numpy() / exact - 1)
    return np.array(errors)


@pytest.mark.parametrize("num_steps", [3, 10])
@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_per_channel_variance_is_exact_on_per_channel_gaussian(num_steps, eta):
    """Exact eps and the exact per-channel table: every reverse step is the true
    conditional of each channel (the Gaussian argument of docs/math.md, per channel, for any K and eta in [0, 1]), so
    the per-channel scheduler reproduces, channel by channel, the exact marginal ``abar[s] v_c + bb[s]`` of x at
    every trajectory point s (up to the prior, N(0, I) instead of N(0, abar v + bb) at t = 999: < 0.5% here).

    The last step is deterministic and returns x0_hat = E[x0 | x_{t_1}], whose variance is not v_c but
    ``abar v_c^2 / (abar v_c + bb)`` at t_1 (1.7% short of v_c for v_c = 0.05, as bb[0] = 0.00085): the output is
    compared with that, which is the same claim as the marginal at t_1 (x0_hat is linear in x_{t_1}).
    20000 vectors of 4 x 8 x 8: 1.28M draws per channel, sampling error ~0.13%. The scalar variance (the table's
    channel mean) gives the small channels too much noise and the large ones too little.
    """
    per_channel = channel_variance_errors(channel_scheduler(True, eta=eta), num_steps)
    scalar = channel_variance_errors(channel_scheduler(False, eta=eta), num_steps)
    assert np.abs(per_channel).max() < 0.03, per_channel
    assert np.abs(scalar[-1]).max() > 0.10, scalar[-1]


def run_loop(scheduler: AnalyticDPMScheduler, num_steps: int = 10, seed: int = 3) -> torch.Tensor:
    scheduler.set_timesteps(num_steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, C, 8, 8, generator=g)
    for t in scheduler.timesteps:
        x = scheduler.step(torch.tanh(x), t, x, generator=g).prev_sample
    return x


@pytest.mark.parametrize("variance", ["analytic", "residual"])
def test_equal_channel_rows_give_the_scalar_sampler_bit_for_bit(variance):
    """One code path: a (C, N) table whose rows all equal the scalar table samples exactly as the scalar one."""
    ms, x0 = exact_ms_eps(np.full(C, 0.3)), exact_x0_mse(np.full(C, 0.3))
    kw = dict(ms_eps=ms[0].tolist(), x0_mse=x0[0].tolist(), channel_ms_eps=ms.tolist(), channel_x0_mse=x0.tolist(),
              variance=variance, eta=0.5, data_range=None)
    per = AnalyticDPMScheduler.from_config(SD_SCHEDULE, per_channel=True, **kw)
    scalar = AnalyticDPMScheduler.from_config(SD_SCHEDULE, **kw)
    # exact on any CPU: the two differ only in the shapes of the table ((C, N) or (1, N)) and of sigma ((C, 1, 1) or
    # (1, 1, 1)), which meet only elementwise +, -, *, /, sqrt and clip, each rounded per element (no sum, exp or log)
    assert torch.equal(run_loop(per), run_loop(scalar))
    coef_per, coef_scalar = per.step_coefficients(0.5), scalar.step_coefficients(0.5)
    assert coef_per.sigma.shape == (10, C) and coef_scalar.sigma.shape == (10, 1)
    np.testing.assert_array_equal(coef_per.sigma, np.repeat(coef_scalar.sigma, C, axis=1))
    for name in ("sqrt_abar_t", "sqrt_one_minus_abar_t", "sqrt_abar_s", "eps_coef"):
        assert getattr(coef_per, name).shape == (10,)
        np.testing.assert_array_equal(getattr(coef_per, name), getattr(coef_scalar, name))


def test_step_noise_is_one_sigma_per_channel_and_the_cap_applies_per_channel():
    t = np.array(even_trajectory(N, 5))
    bounded = (-4.0, 4.0)  # the cap is counted in the data's 8-bit bins, so it needs a data range
    free = analytic_variance(ABAR, exact_ms_eps(), t[1:], t[:-1], 1.0, bounded)  # (C, K-1)
    cap = math.sqrt(free[0, -1] * free[-1, -1])  # binds for the wide channels only
    sched = channel_scheduler(True, data_range=bounded,
                              variance_cap_y=math.sqrt(cap) / (8 / 255 * math.sqrt(math.pi / 2)))
    sched.set_timesteps(5)
    assert free[0, -1] < cap < free[-1, -1]
    free[:, -1] = np.minimum(free[:, -1], cap)
    np.testing.assert_allclose(sched.step_coefficients(1.0).sigma[:-1] ** 2, free.T, rtol=1e-12)
    # step adds sigma_c * z to channel c: with zero model output the mean is known, so the noise can be read off
    x = torch.ones(1, C, 2, 2, dtype=torch.float64)
    z = torch.randn(1, C, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sched.step(torch.zeros_like(x), int(t[0]), x, variance_noise=z).prev_sample
    coef = sched.step_coefficients(1.0)
    mean = coef.sqrt_abar_s[0] / coef.sqrt_abar_t[0]  # sqrt(abar_s) x0_hat with x0_hat = x / sqrt(abar_t), eps = 0
    np.testing.assert_allclose((out - mean).numpy(), (torch.from_numpy(coef.sigma[0]).reshape(-1, 1, 1) * z).numpy(),
                               rtol=1e-12)


def test_channel_entries_round_trip_through_save_pretrained(tmp_path):
    ms, x0 = exact_ms_eps(), exact_x0_mse()
    ms[1, 5] = x0[2, 7] = np.nan  # not estimated, never visited by an even 10-step trajectory
    sched = AnalyticDPMScheduler.from_config(SD_SCHEDULE, channel_ms_eps=ms.tolist(), channel_x0_mse=x0.tolist(),
                                 per_channel=True, variance="residual", data_range=None, clip_sample=False)
    np.testing.assert_allclose(sched.ms_eps, ms.mean(0))  # no scalar table given: the channel mean, as in a table
    sched.save_pretrained(tmp_path)
    loaded = AnalyticDPMScheduler.from_pretrained(tmp_path)
    assert loaded.config.per_channel is True and loaded.config.variance == "residual"
    assert "channel_ms_eps" not in loaded.config  # the arrays live in the table file beside the config
    np.testing.assert_array_equal(loaded.channel_ms_eps, ms)
    np.testing.assert_array_equal(loaded.channel_x0_mse, x0)
    assert torch.equal(run_loop(sched), run_loop(loaded))


def test_from_table_passes_the_channel_moments(monkeypatch):
    """A stand-in for a table with per-channel moments (``VarianceTable.channel_*``, shape (C, N)); the
    attributes are patched on, so this works whether or not VarianceTable defines them."""
    ms, x0 = exact_ms_eps(), exact_x0_mse()
    counts = np.full(N, 100)
    table = VarianceTable(ms.mean(0), np.full(N, 1e-3), counts, ABAR, data_range=None,
                          x0_mse=x0.mean(0), x0_mse_stderr=np.full(N, 1e-4))
    with pytest.raises(ValueError, match="per_channel=True with variance='analytic' needs channel_ms_eps.*re-estimate"):
        AnalyticDPMScheduler.from_table(table, SD_SCHEDULE, per_channel=True)  # a table without channel moments
    for name, value in dict(channel_ms_eps=ms, channel_stderr=ms * 0 + 1e-3, channel_x0_mse=x0,
                            channel_x0_mse_stderr=x0 * 0 + 1e-4).items():
        monkeypatch.setattr(table, name, value, raising=False)
    plain = AnalyticDPMScheduler.from_table(table, SD_SCHEDULE, clip_sample=False)
    assert plain.config.per_channel is False  # kept in the config (a saved scheduler keeps them), not used
    np.testing.assert_array_equal(plain.channel_ms_eps, ms)
    np.testing.assert_array_equal(plain.channel_x0_mse, x0)
    plain.set_timesteps(10)
    assert plain.step_coefficients(1.0).sigma.shape == (10, 1)
    for variance, moments in (("analytic", ms), ("residual", x0)):
        per = AnalyticDPMScheduler.from_table(table, SD_SCHEDULE, per_channel=True, variance=variance)
        per.set_timesteps(10)
        t = np.array(per.trajectory)
        expected = (analytic_variance(ABAR, moments, t[1:], t[:-1], 1.0, None) if variance == "analytic"
                    else residual_variance(ABAR, moments, t[1:], t[:-1], 1.0))
        np.testing.assert_allclose(per.step_coefficients(1.0).sigma[:-1] ** 2, expected.T, rtol=1e-12)


def test_per_channel_refusals_name_the_fix():
    ms, x0 = exact_ms_eps(), exact_x0_mse()
    with pytest.raises(ValueError, match=r"per_channel=True with variance='analytic' needs channel_ms_eps.*"
                                         r"from_table\(table, config, per_channel=True\).*per_channel=False"):
        AnalyticDPMScheduler.from_config(SD_SCHEDULE, ms_eps=ms.mean(0).tolist(), per_channel=True)
    with pytest.raises(ValueError, match="per_channel=True with variance='residual' needs channel_x0_mse"):
        AnalyticDPMScheduler.from_config(SD_SCHEDULE, channel_ms_eps=ms.tolist(), x0_mse=x0.mean(0).tolist(),
                             variance="residual", per_channel=True)
    with pytest.raises(ValueError, match=r"channel_ms_eps has shape \(4, 1000\) but channel_x0_mse \(3, 1000\)"):
        AnalyticDPMScheduler.from_config(SD_SCHEDULE, channel_ms_eps=ms.tolist(), channel_x0_mse=x0[:3].tolist())
    with pytest.raises(ValueError, match=r"channel_ms_eps has shape \(4, 10\), but needs \(channels, 1000\)"):
        AnalyticDPMScheduler.from_config(SD_SCHEDULE, channel_ms_eps=ms[:, :10].tolist())
    holes = ms.copy()
    holes[3, 999] = np.nan
    sched = AnalyticDPMScheduler.from_config(SD_SCHEDULE, ms_eps=ms.mean(0).tolist(), channel_ms_eps=holes.tolist(),
                                 per_channel=True)
    with pytest.raises(ValueError, match=r"channel_ms_eps is NaN/inf at 1 needed timestep\(s\) \(999\) in channel"):
        sched.set_timesteps(10)
    sched = channel_scheduler(True)
    sched.set_timesteps(10)
    x = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"per-channel variance has 4 channels .* sample has 3 .*per_channel=False"):
        sched.step(x, sched.timesteps[0], x)


# ---------------------------------------------------------------- likelihood
@pytest.fixture(scope="module")
def channel_data() -> torch.Tensor:
    """2000 draws of 4 x 4 x 4 per-channel Gaussian data."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(2000, C, 4, 4, generator=g) * torch.from_numpy(np.sqrt(V)).float().reshape(-1, 1, 1)


@pytest.mark.parametrize("num_steps", [3, 10])
@pytest.mark.parametrize("variance", ["analytic", "residual"])
def test_per_channel_bound_equals_the_entropy(channel_data, num_steps, variance):
    """Exact eps with the exact (C, N) tables: every KL term and the decoder (analytic variance c_c[t_1]) are
    exact per channel, so the bound is the data's entropy, ``mean_c 0.5 log(2 pi e v_c)`` per dimension, for any K;
    the channel-mean tables overshoot it by far."""
    entropy = float(np.mean(0.5 * np.log(2 * np.pi * np.e * V)) / np.log(2))
    kw = dict(decoder="gaussian", batch_size=1000,
              options=NLLOptions(decoder_variance="analytic", data_range=None, progress=False))
    ts = even_trajectory(N, num_steps)
    ms, x0 = exact_ms_eps(), exact_x0_mse()
    per = nll_bpd(ChannelGaussianEps(), channel_data, ABAR, ts, variance, ms_eps=ms, x0_mse=x0, **kw)
    scalar = nll_bpd(ChannelGaussianEps(), channel_data, ABAR, ts, variance, ms_eps=ms.mean(0), x0_mse=x0.mean(0), **kw)
    assert abs(per.mean - entropy) < 3 * per.stderr
    assert scalar.mean > entropy + 0.05 and scalar.mean > per.mean + 10 * per.stderr
    assert per.mean == pytest.approx(per.prior + per.transitions + per.decoder, rel=1e-9)


@pytest.mark.parametrize("decoder, data_range", [("gaussian", None), ("discretized", (-1.0, 1.0))])
def test_equal_channel_rows_give_the_scalar_bound_and_mismatched_channels_are_refused(channel_data, decoder,
                                                                                      data_range):
    """One code path: rows equal to the scalar table give the scalar result, for every variance, to float64 rounding
    (the log / exp of sigma^2 run on a (C, 1, 1) tensor against a (1, 1, 1) one: SIMD or scalar kernels by shape and
    CPU, a few ulps apart; a 1-ulp change of the table moves every field by < 3e-14 here)."""
    ms, x0 = exact_ms_eps(np.full(C, 0.5)), exact_x0_mse(np.full(C, 0.5))
    kw = dict(decoder=decoder,
              options=NLLOptions(decoder_variance="analytic", data_range=data_range, progress=False, num_samples=200))
    data = channel_data.clamp(-1, 1)
    args = (ChannelGaussianEps(), data, ABAR, even_trajectory(N, 5), ("analytic", "residual", "btilde"))
    per = nll_bpd(*args, ms_eps=ms, x0_mse=x0, **kw)
    scalar = nll_bpd(*args, ms_eps=ms[0], x0_mse=x0[0], **kw)
    for name in args[-1]:
        for field in dataclasses.fields(scalar[name]):
            ours, theirs = getattr(per[name], field.name), getattr(scalar[name], field.name)
            floats = isinstance(theirs, float) or isinstance(theirs, list) and isinstance(theirs[0], float)
            assert ours == (pytest.approx(theirs, rel=1e-12, abs=0) if floats else theirs), (name, field.name)
    with pytest.raises(ValueError, match=r"per-channel table has 4 channels but the data has 3 .*channel_ms_eps"):
        nll_bpd(ChannelGaussianEps(V[:3]), data[:, :3], ABAR, even_trajectory(N, 5), ms_eps=exact_ms_eps(), **kw)
