"""Tests of the Improved-DDPM trainer (fast: tiny UNets, a few dozen steps)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from analytic_sampler.digits.training import (
    GaussianDiffusionTerms,
    LossSecondMomentResampler,
    TrainConfig,
    build_unet,
    export_diffusers,
    load_checkpoint,
    make_ema,
    make_lr_scheduler,
    recipe_config,
    scheduler_config,
    train,
    training_losses,
)
from analytic_sampler.evaluation.kl import discretized_gaussian_log_likelihood, normal_kl
from analytic_sampler.pretrained import BUNDLED_DIR
from analytic_sampler.schedule import alphas_cumprod_from_config


def tiny_config(tmp_path, **kw) -> TrainConfig:
    base = dict(
        output_dir=str(tmp_path / "run"),
        sample_size=8,
        in_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
        dropout=0.0,
        num_train_timesteps=100,
        batch_size=32,
        lr=2e-3,
        lr_warmup_steps=0,
        steps=40,
        checkpoint_every=0,
        log_every=1,
        progress=False,
        resume=False,
        seed=0,
        num_threads=None,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def data():
    # a fixed set of smooth blobs in [-1, 1] (no dependence on scikit-learn here)
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    c = torch.rand(64, 2, generator=g) * 5 + 1.5
    r2 = (yy - c[:, 0, None, None]) ** 2 + (xx - c[:, 1, None, None]) ** 2
    x = 2 * torch.exp(-r2 / 3.0) - 1
    return (torch.round((x + 1) * 127.5) / 127.5 - 1).unsqueeze(1)


def read_log(cfg: TrainConfig) -> list[dict]:
    return [json.loads(line) for line in open(Path(cfg.output_dir) / "log.jsonl")]


# ---------------------------------------------------------------------------------------------------


def test_terms_match_diffusers_schedule():
    from diffusers import DDPMScheduler

    for sched in ("linear", "squaredcos_cap_v2"):
        cfg = TrainConfig(beta_schedule=sched, loss="hybrid")
        kw = scheduler_config(cfg)
        assert kw["variance_type"] == "learned_range"
        abar = alphas_cumprod_from_config(scheduler_config(cfg))
        ref = DDPMScheduler(**kw).alphas_cumprod.double().numpy()
        np.testing.assert_allclose(abar, ref, rtol=1e-4)  # (diffusers: float32); no floor on the cosine schedule's last value
        terms = GaussianDiffusionTerms(abar)
        betas = terms.betas
        btilde = betas[1:] * (1 - abar[:-1]) / (1 - abar[1:])
        np.testing.assert_allclose(terms.post_log_var_clipped[1:].double().numpy(), np.log(btilde), rtol=1e-5)
        # t = 0 uses btilde[1] (Improved DDPM's log-clipped posterior variance)
        assert math.isclose(float(terms.post_log_var_clipped[0]), math.log(btilde[0]), rel_tol=1e-5)
    assert scheduler_config(TrainConfig(loss="simple"))["variance_type"] == "fixed_small"


def test_learned_range_interpolates_log_variance():
    abar = alphas_cumprod_from_config({"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 50})
    terms = GaussianDiffusionTerms(abar)
    t = torch.arange(50)
    xt = torch.randn(50, 1, 2, 2)
    eps = torch.randn_like(xt)
    for v, expect in ((1.0, terms.log_betas), (-1.0, terms.post_log_var_clipped)):
        _, logvar = terms.p_mean_logvar(eps, torch.full_like(xt, v), xt, t)
        torch.testing.assert_close(logvar[:, 0, 0, 0], expect)
    _, logvar = terms.p_mean_logvar(eps, torch.zeros_like(xt), xt, t)
    torch.testing.assert_close(logvar[:, 0, 0, 0], 0.5 * (terms.log_betas + terms.post_log_var_clipped))


def test_vlb_zero_for_exact_eps_and_posterior_variance():
    abar = alphas_cumprod_from_config({"beta_schedule": "linear", "num_train_timesteps": 100})
    terms = GaussianDiffusionTerms(abar)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(40, 1, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(1, 100, (40,), generator=g)
    xt = terms.q_sample(x0, t, noise)
    mean, logvar = terms.p_mean_logvar(noise, -torch.ones_like(x0), xt, t)
    true_mean, true_logvar = terms.q_posterior(x0, xt, t)
    kl = normal_kl(true_mean, true_logvar, mean, logvar)
    assert kl.abs().max() < 1e-4


@pytest.mark.parametrize("num_bins", [256, 17])
def test_discretized_gaussian_sums_to_one(num_bins):
    x = torch.linspace(-1, 1, num_bins, dtype=torch.float64)[:, None]
    means = torch.tensor([-1.3, -1.0, -0.5, -0.02, 0.0, 0.3, 0.99, 1.0, 1.4], dtype=torch.float64)[None]
    for scale in (1e-3, 0.01, 0.1, 0.5, 2.0):
        log_scales = torch.full_like(means, math.log(scale))
        for dtype in (torch.float64, torch.float32):
            logp = discretized_gaussian_log_likelihood(x.to(dtype), means.to(dtype), log_scales.to(dtype), 2 / (num_bins - 1))
            assert torch.isfinite(logp).all()
            total = logp.double().exp().sum(0)
            tol = 1e-9 if dtype == torch.float64 else 2e-4
            # bins further than ~5 sigma... are clamped at 1e-12, negligible at these sizes
            np.testing.assert_allclose(total.numpy(), 1.0, atol=max(tol, num_bins * 1e-12))


def test_discretized_gaussian_matches_direct_cdf():
    from scipy.stats import norm

    x = torch.linspace(-1, 1, 256, dtype=torch.float64)
    mean, scale = 0.1, 0.05
    logp = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, math.log(scale)))
    h = 1 / 255
    upper = norm.cdf((x.numpy() + h - mean) / scale)
    lower = norm.cdf((x.numpy() - h - mean) / scale)
    p = upper - lower
    p[0], p[-1] = upper[0], 1 - lower[-1]
    keep = p > 1e-10
    np.testing.assert_allclose(logp.numpy()[keep], np.log(p[keep]), rtol=1e-6, atol=1e-8)


def test_vlb_sends_no_gradient_to_eps_half():
    cfg = TrainConfig(
        loss="hybrid", num_train_timesteps=100, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    torch.manual_seed(0)
    unet = build_unet(cfg)
    assert unet.config.out_channels == 2
    terms = GaussianDiffusionTerms(alphas_cumprod_from_config(scheduler_config(cfg)))
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.cat([torch.zeros(2, dtype=torch.long), torch.randint(1, 100, (14,))])  # includes the decoder term

    # gradients with respect to the model output itself
    captured = {}

    def model(xt, tt):
        out = unet(xt, tt).sample
        out.retain_grad()
        captured["out"] = out
        return out

    losses = training_losses(model, terms, x0, t, noise, "hybrid")
    losses["vb"].sum().backward()
    g = captured["out"].grad
    assert torch.count_nonzero(g[:, :1]) == 0
    assert g[:, 1:].abs().sum() > 0
    # and in the weights: the eps row of the output convolution gets nothing from the VLB
    w = unet.conv_out.weight.grad
    assert torch.count_nonzero(w[0]) == 0 and w[1].abs().sum() > 0
    # the MSE half trains only the eps channels
    unet.zero_grad()
    losses = training_losses(unet, terms, x0, t, noise, "hybrid")
    losses["mse"].sum().backward()
    w = unet.conv_out.weight.grad
    assert torch.count_nonzero(w[1]) == 0 and w[0].abs().sum() > 0
    # hybrid = mse + lambda * N * vb
    torch.testing.assert_close(losses["loss"], losses["mse"] + 0.001 * 100 * losses["vb"])


def test_resampler_uniform_until_warm_then_second_moment():
    n, hist = 5, 10
    rs = LossSecondMomentResampler(n, history_per_term=hist, uniform_prob=0.001)
    rng = np.random.default_rng(0)
    for k in range(hist):
        np.testing.assert_allclose(rs.probabilities(), np.full(n, 1 / n))
        rs.update(np.arange(n - 1), rng.random(n - 1) * (1 + np.arange(n - 1)))
    assert not rs.warmed_up()  # t = n-1 has no losses yet
    all_losses = {t: [] for t in range(n)}
    for k in range(hist + 7):  # overfill so that old losses are shifted out
        for t in range(n):
            loss = rng.random() * (t + 1) ** 2
            rs.update([t], [loss])
            all_losses[t].append(loss)
    assert rs.warmed_up()
    # the history keeps the last 10 losses of each t
    for t in range(n):
        recent = [x for x in all_losses[t]][-hist:]
        np.testing.assert_allclose(rs.loss_history[t], recent)
    w = np.array([np.sqrt(np.mean(np.square(all_losses[t][-hist:]))) for t in range(n)])
    p = (1 - 0.001) * w / w.sum() + 0.001 / n
    np.testing.assert_allclose(rs.probabilities(), p, rtol=1e-12)
    t, weights = rs.sample(1000, np.random.default_rng(1))
    np.testing.assert_allclose(weights, 1 / (n * p[t]))
    counts = np.bincount(t, minlength=n) / 1000
    assert np.abs(counts - p).max() < 0.06
    # state round trip
    rs2 = LossSecondMomentResampler(n, hist)
    rs2.load_state_dict(rs.state_dict())
    np.testing.assert_array_equal(rs2.probabilities(), rs.probabilities())


def test_loss_goes_down_simple(tmp_path, data):
    cfg = tiny_config(tmp_path, loss="simple", steps=40)
    path = train(cfg, data)
    log = read_log(cfg)
    first = np.mean([r["loss"] for r in log[:5]])
    last = np.mean([r["loss"] for r in log[-5:]])
    assert last < 0.6 * first, (first, last)
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").exists()
    from diffusers import DDPMScheduler, UNet2DModel

    assert DDPMScheduler.from_pretrained(path / "scheduler").config.variance_type == "fixed_small"
    assert UNet2DModel.from_pretrained(path / "unet").config.out_channels == 1


def test_loss_goes_down_hybrid_with_importance_sampling(tmp_path, data):
    cfg = tiny_config(tmp_path, loss="hybrid", importance_sampling=True, num_train_timesteps=20, steps=45,
                      batch_size=32)
    path = train(cfg, data)
    log = read_log(cfg)
    first = np.mean([r["mse"] for r in log[:5]])
    last = np.mean([r["mse"] for r in log[-5:]])
    assert last < 0.6 * first, (first, last)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["vb"]) for r in log)
    # after warm-up the resampler's probabilities follow sqrt(E[L_t^2]) of its history
    _, _, state = load_checkpoint(cfg.output_dir)
    rs = LossSecondMomentResampler(20)
    rs.load_state_dict(state["sampler"])
    assert rs.warmed_up()
    w = np.sqrt((rs.loss_history**2).mean(1))
    np.testing.assert_allclose(rs.probabilities(), 0.999 * w / w.sum() + 0.001 / 20, rtol=1e-12)
    assert not np.allclose(rs.probabilities(), 1 / 20)
    from diffusers import DDPMScheduler, UNet2DModel

    assert DDPMScheduler.from_pretrained(path / "scheduler").config.variance_type == "learned_range"
    assert UNet2DModel.from_pretrained(path / "unet").config.out_channels == 2


def test_resume_reproduces_uninterrupted_run(tmp_path, data):
    # interrupted inside the learning-rate warm-up (10 steps) and the EMA warm-up (its decay reaches 0.9 at n = 80)
    kw = dict(loss="hybrid", importance_sampling=True, num_train_timesteps=10, steps=12, batch_size=24,
              dropout=0.1, checkpoint_every=5, ema_decay=0.9, lr_warmup_steps=10)
    a = tiny_config(tmp_path / "a", **kw)
    train(a, data)
    b = tiny_config(tmp_path / "b", **kw)
    ckpt = train(b, data, stop_at=7)
    assert ckpt.name == "checkpoint.pt"
    assert torch.load(ckpt, weights_only=False)["step"] == 7
    b.resume = True
    train(b, data)
    sa = torch.load(Path(a.output_dir) / "checkpoint.pt", weights_only=False)
    sb = torch.load(Path(b.output_dir) / "checkpoint.pt", weights_only=False)
    assert sa["step"] == sb["step"] == 12
    for key in ("model",):
        for name, v in sa[key].items():
            assert torch.equal(v, sb[key][name]), name
    assert sa["ema"]["optimization_step"] == sb["ema"]["optimization_step"] == 12
    for i, v in enumerate(sa["ema"]["shadow_params"]):
        assert torch.equal(v, sb["ema"]["shadow_params"][i]), i
    assert sa["lr_scheduler"]["last_epoch"] == sb["lr_scheduler"]["last_epoch"] == 13
    assert sa["optimizer"]["param_groups"][0]["lr"] == sb["optimizer"]["param_groups"][0]["lr"] == a.lr
    np.testing.assert_array_equal(sa["sampler"]["loss_history"], sb["sampler"]["loss_history"])
    # the export holds the EMA weights
    unet, _, _ = load_checkpoint(b.output_dir)
    for v, shadow in zip(unet.parameters(), sa["ema"]["shadow_params"], strict=True):
        assert torch.equal(v, shadow)
    out = export_diffusers(Path(b.output_dir) / "checkpoint.pt", tmp_path / "exp")
    assert (out / "scheduler" / "scheduler_config.json").exists()


def test_resume_refuses_other_config(tmp_path, data):
    a = tiny_config(tmp_path, steps=2, checkpoint_every=1)
    train(a, data)
    b = tiny_config(tmp_path, steps=4, loss="hybrid", resume=True)
    with pytest.raises(ValueError, match="resume=False"):
        train(b, data)


def test_resume_refuses_checkpoint_of_earlier_trainer(tmp_path, data):
    a = tiny_config(tmp_path, steps=2)
    train(a, data, export=False)
    ckpt = Path(a.output_dir) / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=False)
    del state["lr_scheduler"]  # the earlier trainer set the learning rate itself and kept its own EMA
    torch.save(state, ckpt)
    with pytest.raises(ValueError, match="earlier trainer.*resume=False"):
        train(tiny_config(tmp_path, steps=4, resume=True), data)
    with pytest.raises(ValueError, match="earlier trainer"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_decay_schedule(warmup):
    """The k-th update uses min(ema_decay, (1 + n) / (10 + n)), n = k - 1 (the first one copies the weights)."""
    m = torch.nn.Linear(3, 2)
    ema = make_ema(m, TrainConfig(ema_decay=0.9, ema_warmup=warmup))
    shadow = [p.detach().clone() for p in m.parameters()]
    for k in range(1, 120):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p))
        ema.step(m.parameters())
        n = k - 1
        d = 0.0 if k == 1 else min(0.9, (1 + n) / (10 + n)) if warmup else 0.9
        assert ema.cur_decay_value == d, k  # the same float operations on both sides
        shadow = [d * s + (1 - d) * p.detach() for s, p in zip(shadow, m.parameters())]
        for s, e in zip(shadow, ema.shadow_params):
            torch.testing.assert_close(e, s)
    assert not warmup or ema.cur_decay_value == 0.9  # the warm-up reached the cap at n = 80


@pytest.mark.parametrize("warmup_steps", [0, 1, 4])
def test_lr_warmup(warmup_steps):
    """Step k (from 0) trains at lr * min(1, (k + 1) / warmup_steps); no warning from torch's step-order check."""
    m = torch.nn.Linear(2, 1)
    cfg = TrainConfig(lr=3e-4, lr_warmup_steps=warmup_steps)
    opt = torch.optim.AdamW(m.parameters(), lr=cfg.lr)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched = make_lr_scheduler(opt, cfg)
        for k in range(warmup_steps + 3):
            want = cfg.lr * min(1.0, (k + 1) / warmup_steps) if warmup_steps else cfg.lr
            assert opt.param_groups[0]["lr"] == want, k  # the same float operations on both sides
            m(torch.ones(1, 2)).sum().backward()
            opt.step()
            sched.step()


def test_bad_data_is_refused(tmp_path):
    cfg = tiny_config(tmp_path)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        train(cfg, torch.rand(8, 1, 8, 8) * 255)
    with pytest.raises(ValueError, match="in_channels"):
        train(cfg, torch.rand(8, 3, 8, 8))


def test_recipes():
    a = recipe_config("digits-ddpm-linear")
    b = recipe_config("digits-iddpm-cosine")
    assert (a.loss, a.beta_schedule, a.out_channels, a.importance_sampling) == ("simple", "linear", 1, False)
    assert (b.loss, b.beta_schedule, b.out_channels, b.importance_sampling) == ("hybrid", "squaredcos_cap_v2", 2, True)
    assert a.num_train_timesteps == b.num_train_timesteps == 1000
    with pytest.raises(ValueError):
        recipe_config("nope")


@pytest.mark.parametrize("name,variance,out_channels", [
    ("digits-ddpm-linear", "fixed_small", 1),
    ("digits-iddpm-cosine", "learned_range", 2),
])
def test_bundled_model_layout(name, variance, out_channels):
    folder = BUNDLED_DIR / name
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(folder / "unet")
    sched = DDPMScheduler.from_pretrained(folder / "scheduler")
    assert unet.config.out_channels == out_channels and unet.config.sample_size == 8
    assert sched.config.variance_type == variance and sched.config.num_train_timesteps == 1000
    assert (folder / "README.md").exists() and (folder / "samples.png").exists()
    with torch.no_grad():
        out = unet(torch.zeros(2, 1, 8, 8), torch.tensor([0, 999])).sample
    assert out.shape == (2, out_channels, 8, 8) and torch.isfinite(out).all()
