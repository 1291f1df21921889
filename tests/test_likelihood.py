"""nll_bpd: exact on isotropic Gaussian data, decoders, variance choices, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analytic_sampler.likelihood import nll_bpd, nll_bpd_many
from analytic_sampler.schedule import alphas_cumprod_from_config
from analytic_sampler.trajectory import even_trajectory, optimal_trajectory

from conftest import ExactGaussianEps, tiny_unet

ABAR = alphas_cumprod_from_config({"num_train_timesteps": 1000})
V = 0.25
ENTROPY_BPD = 0.5 * math.log(2 * math.pi * math.e * V) / math.log(2)


@pytest.fixture(scope="module")
def gaussian():
    model = ExactGaussianEps(ABAR, V)
    data = torch.randn(2000, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * math.sqrt(V)
    return model, data


@pytest.mark.parametrize("num_steps", [2, 10, 1000])
@pytest.mark.parametrize("trajectory", ["even", "optimal"])
def test_bound_equals_entropy_on_isotropic_gaussian(gaussian, num_steps, trajectory):
    model, data = gaussian
    ms = model.exact_ms_eps()
    ts = even_trajectory(1000, num_steps) if trajectory == "even" else optimal_trajectory(ABAR, ms, num_steps)
    r = nll_bpd(model, data, ABAR, ts, "analytic", ms_eps=ms, decoder="gaussian", data_range=None,
                batch_size=1000, progress=False)
    assert r.num_samples == 2000 and len(r.per_step) == num_steps - 1
    assert abs(r.mean - ENTROPY_BPD) < 3 * r.stderr
    assert r.mean == pytest.approx(r.prior + r.transitions + r.decoder, rel=1e-9)


def test_ddpm_variances_are_far_above_at_ten_steps(gaussian):
    model, data = gaussian
    ts = even_trajectory(1000, 10)
    kw = dict(decoder="gaussian", data_range=None, progress=False)
    btilde = nll_bpd(model, data, ABAR, ts, "btilde", **kw)
    beta = nll_bpd(model, data, ABAR, ts, "beta", **kw)
    assert btilde.mean > ENTROPY_BPD + 100 and beta.mean > ENTROPY_BPD + 10 * beta.stderr


def test_many_variances_in_one_pass_equal_separate_runs(gaussian):
    model, data = gaussian
    kw = dict(ms_eps=model.exact_ms_eps(), decoder="gaussian", data_range=None, progress=False, seed=3)
    ts = even_trajectory(1000, 5)
    many = nll_bpd_many(model, data[:200], ABAR, ts, ("btilde", "analytic"), **kw)
    for variance in ("btilde", "analytic"):
        single = nll_bpd(model, data[:200], ABAR, ts, variance, **kw)
        assert single.mean == pytest.approx(many[variance].mean, rel=1e-12) and single.per_step == pytest.approx(many[variance].per_step)


def test_seeded_and_reproducible(gaussian):
    model, data = gaussian
    kw = dict(variance="analytic", ms_eps=model.exact_ms_eps(), decoder="gaussian", data_range=None, progress=False)
    a = nll_bpd(model, data[:100], ABAR, even_trajectory(1000, 5), seed=1, **kw)
    b = nll_bpd(model, data[:100], ABAR, even_trajectory(1000, 5), seed=1, **kw)
    c = nll_bpd(model, data[:100], ABAR, even_trajectory(1000, 5), seed=2, **kw)
    assert a.mean == b.mean and a.mean != c.mean


def test_learned_variance_and_discretized_on_a_unet():
    unet = tiny_unet(channels=1, out_channels=2)
    data = torch.rand(6, 1, 8, 8) * 2 - 1
    r = nll_bpd(unet, data, ABAR, even_trajectory(1000, 4), "learned", batch_size=4, progress=False)
    assert r.num_samples == 6 and np.isfinite(r.mean) and r.mean > 0
    with pytest.raises(ValueError, match="variance='learned' needs a model with 2C output channels"):
        nll_bpd(tiny_unet(channels=1), data, ABAR, even_trajectory(1000, 4), "learned", progress=False)


def test_errors_name_the_fix(gaussian):
    model, data = gaussian
    ts = even_trajectory(1000, 5)
    with pytest.raises(ValueError, match="needs the model's table: pass ms_eps=table.ms_eps"):
        nll_bpd(model, data, ABAR, ts, "analytic", data_range=None, decoder="gaussian", progress=False)
    with pytest.raises(ValueError, match="variance='fixed'"):
        nll_bpd(model, data, ABAR, ts, "fixed", progress=False)
    with pytest.raises(ValueError, match="discretized decoder needs the data range"):
        nll_bpd(model, data, ABAR, ts, "beta", data_range=None, progress=False)
    with pytest.raises(ValueError, match="strictly descending"):
        nll_bpd(model, data, ABAR, ts[::-1], "beta", progress=False)
    with pytest.raises(ValueError, match="data outside the declared range"):
        nll_bpd(model, data * 10, ABAR, ts, "beta", progress=False)
