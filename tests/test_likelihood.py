"""nll_bpd: exact on isotropic Gaussian data, decoders, variance choices, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import ExactGaussianEps, tiny_unet

from analytic_sampler.estimation.moments import EstimateOptions
from analytic_sampler.evaluation.likelihood import NLLOptions, NLLResult, nll_bpd
from analytic_sampler.schedule import alphas_cumprod_from_config
from analytic_sampler.trajectory import even_trajectory, optimal_trajectory

ABAR = alphas_cumprod_from_config({"num_train_timesteps": 1000})
V = 0.25
ENTROPY_BPD = 0.5 * math.log(2 * math.pi * math.e * V) / math.log(2)
QUIET = NLLOptions(progress=False)
DENSITY = NLLOptions(data_range=None, progress=False)  # unbounded Gaussian data, for decoder="gaussian"


@pytest.fixture(scope="module")
def gaussian():
    model = ExactGaussianEps(ABAR, V)
    data = torch.randn(2000, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * math.sqrt(V)
    return model, data


@pytest.mark.parametrize("num_steps", [2, 10, 1000])
@pytest.mark.parametrize("trajectory", ["even", "optimal"])
@pytest.mark.parametrize("variance", ["analytic", "residual"])
def test_bound_equals_entropy_on_isotropic_gaussian(gaussian, num_steps, trajectory, variance):
    """Exact eps: both variances and both DPs (paper's for analytic, residual for residual) are exact for any K."""
    model, data = gaussian
    ms, x0_mse = model.exact_ms_eps(), model.exact_x0_mse()
    if trajectory == "even":
        ts = even_trajectory(1000, num_steps)
    elif variance == "analytic":
        with pytest.warns(UserWarning, match="optimal trajectory from ms_eps alone"):
            ts = optimal_trajectory(ABAR, ms, num_steps)
    else:
        ts = optimal_trajectory(ABAR, None, num_steps, x0_mse=x0_mse)
    r = nll_bpd(model, data, ABAR, ts, variance, ms_eps=ms, x0_mse=x0_mse, decoder="gaussian", batch_size=1000,
                options=DENSITY)
    assert r.num_samples == 2000 and len(r.per_step) == num_steps - 1
    assert abs(r.mean - ENTROPY_BPD) < 3 * r.stderr
    assert r.mean == pytest.approx(r.prior + r.transitions + r.decoder, rel=1e-9)


def test_ddpm_variances_are_far_above_at_ten_steps(gaussian):
    model, data = gaussian
    ts = even_trajectory(1000, 10)
    kw = dict(decoder="gaussian", options=DENSITY)
    btilde = nll_bpd(model, data, ABAR, ts, "btilde", **kw)
    beta = nll_bpd(model, data, ABAR, ts, "beta", **kw)
    assert btilde.mean > ENTROPY_BPD + 100 and beta.mean > ENTROPY_BPD + 10 * beta.stderr


def test_many_variances_in_one_pass_equal_separate_runs(gaussian):
    """A list of variances gives a dict of results from one pass of model calls; a name gives one result."""
    model, data = gaussian
    kw = dict(ms_eps=model.exact_ms_eps(), decoder="gaussian", seed=3, options=DENSITY)
    ts = even_trajectory(1000, 5)
    calls = []
    counted = lambda x, t: calls.append(t) or model(x, t)  # noqa: E731
    many = nll_bpd(counted, data[:200], ABAR, ts, ("btilde", "analytic"), **kw)
    assert list(many) == ["btilde", "analytic"] and len(calls) == len(ts)  # one model call per step, both scored
    for variance in ("btilde", "analytic"):
        single = nll_bpd(model, data[:200], ABAR, ts, variance, **kw)
        assert isinstance(single, NLLResult) and single.variance == variance
        assert single.mean == pytest.approx(many[variance].mean, rel=1e-12)
        assert single.per_step == pytest.approx(many[variance].per_step)
    assert list(nll_bpd(model, data[:200], ABAR, ts, ["analytic"], **kw)) == ["analytic"]


def test_seeded_and_reproducible(gaussian):
    model, data = gaussian
    kw = dict(variance="analytic", ms_eps=model.exact_ms_eps(), decoder="gaussian", options=DENSITY)
    a = nll_bpd(model, data[:100], ABAR, even_trajectory(1000, 5), seed=1, **kw)
    b = nll_bpd(model, data[:100], ABAR, even_trajectory(1000, 5), seed=1, **kw)
    c = nll_bpd(model, data[:100], ABAR, even_trajectory(1000, 5), seed=2, **kw)
    assert a.mean == b.mean and a.mean != c.mean


def test_learned_variance_and_discretized_on_a_unet():
    unet = tiny_unet(channels=1, out_channels=2)
    data = torch.rand(6, 1, 8, 8) * 2 - 1
    r = nll_bpd(unet, data, ABAR, even_trajectory(1000, 4), "learned", batch_size=4, options=QUIET)
    assert r.num_samples == 6 and np.isfinite(r.mean) and r.mean > 0
    with pytest.raises(ValueError, match="variance='learned' needs a model with 2C output channels"):
        nll_bpd(tiny_unet(channels=1), data, ABAR, even_trajectory(1000, 4), "learned", options=QUIET)


def test_errors_name_the_fix(gaussian):
    model, data = gaussian
    ts = even_trajectory(1000, 5)
    with pytest.raises(ValueError, match="needs the model's table: pass ms_eps=table.ms_eps"):
        nll_bpd(model, data, ABAR, ts, "analytic", decoder="gaussian", options=DENSITY)
    with pytest.raises(ValueError, match="residual variance needs the model's x0_mse: pass x0_mse=table.x0_mse"):
        nll_bpd(model, data, ABAR, ts, "residual", decoder="gaussian", options=DENSITY)
    with pytest.raises(ValueError, match="variance='fixed'"):
        nll_bpd(model, data, ABAR, ts, "fixed", options=QUIET)
    with pytest.raises(ValueError, match="variance='fixed'"):
        nll_bpd(model, data, ABAR, ts, ["beta", "fixed"], options=QUIET)
    with pytest.raises(ValueError, match=r"variance=\[\]; pass one of \('analytic'.* or a list of them"):
        nll_bpd(model, data, ABAR, ts, [], options=QUIET)
    with pytest.raises(ValueError, match=r"discretized decoder needs the data range .*pass "
                                         r"options=NLLOptions\(data_range=\(a, b\)\) or decoder='gaussian'"):
        nll_bpd(model, data, ABAR, ts, "beta", options=DENSITY)
    with pytest.raises(ValueError, match="strictly descending"):
        nll_bpd(model, data, ABAR, ts[::-1], "beta", options=QUIET)
    with pytest.raises(ValueError, match="data outside the declared range"):
        nll_bpd(model, data * 10, ABAR, ts, "beta", options=QUIET)
    with pytest.raises(TypeError, match=r"options=EstimateOptions\(...\): pass NLLOptions\(...\); its fields: "
                                        r"data_range, bin_width, .*progress"):
        nll_bpd(model, data, ABAR, ts, "beta", options=EstimateOptions(progress=False))


@pytest.mark.parametrize("model_name", ["digits-ddpm-linear", "digits-iddpm-cosine"])
def test_residual_transition_kl_is_half_log_variance_ratio_on_a_real_network(model_name):
    """With sigma^2 = lambda^2 + coef^2 x0_mse, each transition's expected KL is
    (d/2) log(sigma^2 / lambda^2) for any network. Checked on a bundled model along the residual DP path (K = 10)
    of its shipped table, on the 200 training digits that table saw. x0_mse is re-estimated on that path with
    other noise: the DP picks timesteps where its own table's noise happens to be low, which makes the prediction
    from that same table optimistic by a few standard errors (winner's curse)."""
    from analytic_sampler.digits import load_digits_split
    from analytic_sampler.estimation.moments import estimate_moments
    from analytic_sampler.pretrained import load_pretrained
    from analytic_sampler.variance import residual_variance

    model = load_pretrained(model_name)
    abar, data = model.table.alphas_cumprod, load_digits_split("train")[0][:200]
    ts = optimal_trajectory(abar, None, 10, x0_mse=model.table.x0_mse)
    fresh = estimate_moments(model.unet, data, model.scheduler, num_samples=200, timesteps=ts[:-1], seed=1,
                             batch_size=1000, options=EstimateOptions(progress=False))
    r = nll_bpd(model.unet, data, model.scheduler, ts, "residual", x0_mse=fresh.x0_mse, batch_size=200, options=QUIET)
    s, t = np.array(ts[1:]), np.array(ts[:-1])
    lam2 = (1 - abar[s]) * (1 - abar[t] / abar[s]) / (1 - abar[t])
    var = residual_variance(abar, fresh.x0_mse, s, t)
    predicted = 0.5 * np.log(var / lam2) / math.log(2)
    # the estimate's own error moves the prediction by d/dm of the above (the measured KL moves only to 2nd order)
    table_err = 0.5 * fresh.x0_mse_stderr[t] / fresh.x0_mse[t] * (1 - lam2 / var) / math.log(2)
    err = np.sqrt(np.array(r.per_step_stderr) ** 2 + table_err**2)
    assert np.all(np.abs(np.array(r.per_step) - predicted) < 3.5 * err), (r.per_step, predicted.tolist(), err.tolist())
    assert abs(np.sum(r.per_step) - np.sum(predicted)) < 3 * np.sqrt(np.sum(err**2))


def class_unet(out_channels: int = 1):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=out_channels, block_out_channels=(8, 16),
                       layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), num_class_embeds=3).eval()


def digits(n: int = 8) -> torch.Tensor:
    return (torch.randint(0, 17, (n, 1, 8, 8), generator=torch.Generator().manual_seed(1)) / 8.0 - 1).float()


def test_adapter_conditioning_and_guidance_are_scored():
    """nll_bpd scores the eps the sampler uses: a class-conditional adapter's labels and a guided adapter's
    eps_u + w (eps_c - eps_u), each equal to the same eps written as a plain callable; learned variances too."""
    from analytic_sampler.adapter import EpsilonAdapter

    abar = alphas_cumprod_from_config({"num_train_timesteps": 50})
    unet, ts, data = class_unet(out_channels=2), even_trajectory(50, 5), digits()
    kwargs = {"ms_eps": np.full(50, 0.9), "batch_size": 4, "options": QUIET}

    def labelled(label):
        return lambda x, t: unet(x, t, class_labels=torch.full((x.shape[0],), label)).sample

    def scores(model):
        return nll_bpd(model, data, abar, ts, ("analytic", "learned"), **kwargs)

    conditional = scores(EpsilonAdapter(unet, abar, class_labels=torch.tensor([2])))
    by_hand = scores(labelled(2))
    for variance in ("analytic", "learned"):  # the same UNet calls; the label's embedding only broadcasts in one add
        assert conditional[variance].mean == by_hand[variance].mean
    assert conditional["analytic"].mean != scores(labelled(1))["analytic"].mean  # the label matters

    guided = scores(EpsilonAdapter(unet, abar, guidance_scale=3.0, uncond_kwargs={"class_labels": torch.tensor([0])},
                                   class_labels=torch.tensor([2])))

    def guided_by_hand(x, t):
        out_u, out_c = labelled(0)(x, t), labelled(2)(x, t)
        eps_u, eps_c = out_u[:, :1], out_c[:, :1]
        return torch.cat([eps_u + 3.0 * (eps_c - eps_u), out_c[:, 1:]], 1)  # the conditional pass's variance half

    expected = scores(guided_by_hand)
    for variance in ("analytic", "learned"):
        assert guided[variance].mean == pytest.approx(expected[variance].mean, rel=1e-6)
    assert abs(guided["analytic"].mean - conditional["analytic"].mean) > 1e-3  # guidance changes the score


def test_a_table_of_another_model_is_refused_unless_forced():
    from analytic_sampler.fingerprint import weights_fingerprint
    from analytic_sampler.table import VarianceTable

    abar = alphas_cumprod_from_config({"num_train_timesteps": 50})
    unet, other, ts = tiny_unet(channels=1), tiny_unet(channels=1, seed=1), even_trajectory(50, 5)
    table = VarianceTable(np.full(50, 0.9), np.full(50, 0.01), np.full(50, 4), abar, x0_mse=np.full(50, 0.05),
                          provenance={"model_id": "mine", "model_fingerprint": weights_fingerprint(unet)})
    own = nll_bpd(unet, digits(), abar, ts, "residual", options=NLLOptions(table=table, progress=False))
    assert own.mean == nll_bpd(unet, digits(), abar, ts, "residual", x0_mse=table.x0_mse, options=QUIET).mean
    with pytest.raises(ValueError, match=r"the variance table \(mine\) does not belong to this model: it was estimated "
                                         r"with weights \w+, this model's are \w+ .*pass force_table=True"):
        nll_bpd(other, digits(), abar, ts, "residual", options=NLLOptions(table=table, progress=False))
    with pytest.warns(UserWarning, match="used anyway"):
        nll_bpd(other, digits(), abar, ts, "residual",
                options=NLLOptions(table=table, force_table=True, progress=False))
    with pytest.raises(ValueError, match=r"pass either options=NLLOptions\(table=...\) or ms_eps / x0_mse"):
        nll_bpd(unet, digits(), abar, ts, "residual", x0_mse=table.x0_mse,
                options=NLLOptions(table=table, progress=False))
