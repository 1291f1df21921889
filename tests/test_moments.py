import numpy as np
import pytest
import torch
from conftest import ExactGaussianEps, tiny_unet
from diffusers import DDPMScheduler
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from analytic_sampler.adapter import EpsilonAdapter
from analytic_sampler.estimation.data import check_range, iter_batches, take_samples
from analytic_sampler.estimation.moments import EstimateOptions, estimate_moments
from analytic_sampler.schedule import alphas_cumprod_from_config

N = 1000
ABAR = alphas_cumprod_from_config({"num_train_timesteps": N, "beta_schedule": "linear"})
V = 0.25
SHAPE = (3, 8, 8)
FEW = [0, 250, 500, 750, 999]
QUIET = EstimateOptions(progress=False)
UNBOUNDED = EstimateOptions(data_range=None, progress=False)


class GaussianEps(ExactGaussianEps):
    def __init__(self, v=V):
        super().__init__(ABAR, v)


class Flaky(GaussianEps):
    """GaussianEps that raises on its ``fail_at``-th call, like an interrupted job."""

    def __init__(self, fail_at=None):
        super().__init__()
        self.calls, self.fail_at = 0, fail_at

    def forward(self, x, t):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("interrupted")
        return super().forward(x, t)


def gaussian_data(n, seed=0):
    return V**0.5 * torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def run(model=None, n=64, timesteps=FEW, batch_size=16, seed=0, **options):
    options = EstimateOptions(**{"data_range": None, "progress": False, **options})
    model = model or GaussianEps()
    return estimate_moments(model, gaussian_data(n), ABAR, n, timesteps, batch_size, seed, options=options)


def assert_same(a, b):
    for key in ("ms_eps", "stderr", "x0_mse", "x0_mse_stderr", "counts"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))


def test_exact_gaussian_within_three_standard_errors():
    ts = np.linspace(0, N - 1, 50).round().astype(int)
    table = estimate_moments(
        GaussianEps(), gaussian_data(2000), ABAR, num_samples=2000, timesteps=ts, batch_size=1000, options=UNBOUNDED,
    )
    exact = (1 - ABAR) / (ABAR * V + 1 - ABAR)
    z = (table.ms_eps[ts] - exact[ts]) / table.stderr[ts]
    assert np.all(np.abs(z) < 3), z
    assert 0.5 < np.mean(z**2) < 2  # the standard errors are calibrated
    rest = np.setdiff1d(np.arange(N), ts)
    assert np.all(np.isnan(table.ms_eps[rest])) and np.all(np.isnan(table.stderr[rest]))
    assert np.all(table.counts[rest] == 0) and np.all(table.counts[ts] == 2000)
    assert table.estimated.sum() == 50 and table.data_range is None
    assert table.provenance["num_samples"] == 2000 and table.provenance["model_id"] == "GaussianEps"


def test_exact_gaussian_x0_mse_within_four_standard_errors():
    """For the exact eps of N(0, vI) data, x0_mse[t] = c[t] = (bb/abar)(1 - ms_eps[t]) = v bb / (abar v + bb)."""
    ts = np.linspace(0, N - 1, 50).round().astype(int)
    table = run(n=1000, timesteps=ts, batch_size=1000)
    exact = (1 - ABAR) / ABAR * (1 - GaussianEps().exact_ms_eps())
    z = (table.x0_mse[ts] - exact[ts]) / table.x0_mse_stderr[ts]
    assert np.all(np.abs(z) < 4), z
    assert table.has_x0_mse and table.x0_clip is None
    assert np.all(np.isnan(table.x0_mse[np.setdiff1d(np.arange(N), ts)]))


def test_x0_mse_uses_the_clipped_prediction():
    """With a data range the error is that of x0_hat clipped to it, as samplers use it."""
    data, zero_eps = gaussian_data(64).clamp(-1, 1), lambda x, t: torch.zeros_like(x)  # x0_hat = x_t / sqrt(abar)
    clipped = estimate_moments(zero_eps, data, ABAR, 64, [999], options=QUIET)
    raw = estimate_moments(zero_eps, data, ABAR, 64, [999], options=UNBOUNDED)
    assert clipped.x0_clip == (-1.0, 1.0) and raw.x0_clip is None
    assert clipped.x0_mse[999] <= 4.0  # |x0 - clip(x0_hat)| <= 2
    assert abs(raw.x0_mse[999] / ((1 - ABAR[999]) / ABAR[999]) - 1) < 0.1  # the noise, scaled by 1/sqrt(abar)


def test_seed_determinism():
    a, b, c = run(seed=3), run(seed=3), run(seed=4)
    assert_same(a, b)
    assert not np.any(a.ms_eps[FEW] == c.ms_eps[FEW])


def test_batches_mix_timesteps():
    seen = []

    def model(x, t):
        seen.append(t.tolist())
        return x

    run(model, n=8, batch_size=4)
    assert all(len(set(t)) == 4 for t in seen)
    assert sorted(sum(seen, [])) == sorted(FEW * 8)


def test_interrupted_run_resumes_bit_identical(tmp_path):
    full = run()
    path = tmp_path / "ck.pt"
    with pytest.raises(RuntimeError, match="interrupted"):
        run(Flaky(fail_at=12), checkpoint=path, checkpoint_every=5)  # 20 batches; 10 checkpointed
    resumed_model = Flaky()
    resumed = run(resumed_model, checkpoint=path, checkpoint_every=5)
    assert resumed_model.calls == 10
    assert_same(resumed, full)
    finished_model = Flaky()
    assert_same(run(finished_model, checkpoint=path), full)  # a finished checkpoint needs no model calls
    assert finished_model.calls == 0
    with pytest.raises(ValueError, match=r"belongs to another run \(seed: 0 in the checkpoint, 1 now\); delete it "
                       r"to start afresh \(`analytic-sampler precompute`: pass --overwrite\), or rerun with"):
        run(checkpoint=path, seed=1)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"unreadable \(\w+\); delete it to start afresh"):
        run(checkpoint=path)


def test_model_returning_nan_is_named():
    def model(x, t):
        return torch.where((t >= 500).view(-1, 1, 1, 1), torch.nan, x)

    with pytest.raises(ValueError, match=r"the model returned NaN/inf at timestep\(s\) 500, 750, 999; check"):
        run(model)


def test_data_out_of_range():
    data = gaussian_data(8) + 3
    with pytest.raises(ValueError, match=r"data outside the declared range \[-1, 1\] \(min .*, max .*\); rescale"):
        estimate_moments(GaussianEps(), data, ABAR, num_samples=8, options=QUIET)
    with pytest.raises(ValueError, match="data contains NaN"):
        check_range(torch.tensor([0.0, float("nan")]), None)


def test_argument_errors():
    with pytest.raises(ValueError, match="timesteps contains duplicates"):
        run(timesteps=[1, 1])
    with pytest.raises(ValueError, match=r"integers in \[0, 999\]"):
        run(timesteps=[1000])
    with pytest.raises(ValueError, match="data holds only 64 images but num_samples=65"):
        estimate_moments(GaussianEps(), gaussian_data(64), ABAR, num_samples=65, options=QUIET)
    with pytest.raises(TypeError, match=r"options=dict\(...\): pass EstimateOptions\(...\) \(a dict: "
                                        r"EstimateOptions\(\*\*settings\)\); its fields: device, dtype, .*data_id"):
        estimate_moments(GaussianEps(), gaussian_data(8), ABAR, num_samples=8, options={"progress": False})
    with pytest.raises(TypeError, match=r"pipeline_options=EstimateOptions\(...\): pass PipelineOptions\(...\); "
                                        r"its fields: prompt, captions"):
        estimate_moments(GaussianEps(), gaussian_data(8), ABAR, num_samples=8, pipeline_options=QUIET)


def test_data_sources_agree():
    x = gaussian_data(10).clamp(-1, 1)
    pairs = TensorDataset(x, torch.arange(10))
    dicts = [{"pixel_values": x[:4]}, {"pixel_values": x[4:]}]
    for source in (x, x.numpy(), {"images": x}, DataLoader(pairs, batch_size=3), pairs, dicts, [x[:7], x[7:]]):
        assert torch.equal(take_samples(source, 9), x[:9])
    assert [b.shape[0] for b in iter_batches(DataLoader(pairs, batch_size=3), 4)] == [4, 4, 2]
    table_tensor = estimate_moments(GaussianEps(), x, ABAR, num_samples=9, timesteps=FEW, batch_size=8, options=QUIET)
    table_loader = estimate_moments(GaussianEps(), DataLoader(pairs, batch_size=4), ABAR, num_samples=9, timesteps=FEW,
                                    batch_size=8, options=QUIET)
    assert_same(table_tensor, table_loader)
    with pytest.raises(ValueError, match="put the images under one of"):
        take_samples([{"labels": x}], 2)
    with pytest.raises(ValueError, match=r"must have shape \(B, C, H, W\); got \(3, 8, 8\)"):
        take_samples([x[0]], 1)
    with pytest.raises(ValueError, match=r"images of shape \(3, 4, 4\) follow \(3, 8, 8\)"):
        take_samples([x[:2], torch.zeros(2, 3, 4, 4)], 4)


def test_folder_of_pngs(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    pixels[0, 0, 0] = (0, 255, 128)
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(tmp_path / f"{i}.png")
    x = take_samples(tmp_path, 3)
    assert x.shape == (3, 3, 8, 8) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert take_samples(str(tmp_path), 2, channels=1).shape == (2, 1, 8, 8)
    (tmp_path / "grey").mkdir()
    Image.fromarray(pixels[0, :, :, 0]).save(tmp_path / "grey" / "a.png")
    assert take_samples(tmp_path / "grey", 1).shape == (1, 1, 8, 8)  # the first file's mode sets the channels
    Image.fromarray(pixels[0, :4]).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match="small.png is 8x4 but 0.png is 8x8; all images in the folder must have the"):
        take_samples(tmp_path, 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        take_samples(tmp_path / "empty", 1)
    with pytest.raises(ValueError, match="is not a folder"):
        take_samples(tmp_path / "missing", 1)


def test_per_sample_conditioning_and_eval_mode():
    class Labelled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, x, t, class_labels):
            assert not self.training
            return self.drop(torch.ones_like(x)) * class_labels.view(-1, 1, 1, 1)

    model = Labelled().train()
    labels = torch.arange(64) % 2 + 1.0  # ||eps||^2 / d = 1 or 4 per sample
    table = run(model, model_kwargs={"class_labels": labels})
    np.testing.assert_allclose(table.ms_eps[FEW], 2.5)
    assert model.training


def test_tiny_unet_with_scheduler_prediction_type():
    unet = tiny_unet(channels=3, out_channels=6)
    scheduler = DDPMScheduler(num_train_timesteps=N, prediction_type="v_prediction")
    data = gaussian_data(6).clamp(-1, 1)
    table = estimate_moments(unet, data, scheduler, num_samples=6, timesteps=[0, 999], batch_size=4, options=QUIET)
    assert table.provenance["prediction_type"] == "v_prediction"
    assert np.all(np.isfinite(table.ms_eps[[0, 999]])) and table.counts[[0, 999]].tolist() == [6, 6]
    adapter = EpsilonAdapter(unet, scheduler, prediction_type="sample")
    assert estimate_moments(adapter, data, scheduler, num_samples=6, timesteps=[5], options=QUIET).provenance[
        "prediction_type"] == "sample"


def test_a_model_loaded_from_a_path_object_gives_a_savable_table(tmp_path):
    """Diffusers keeps ``_name_or_path`` as given; a pathlib.Path there must not break the table's JSON."""
    from conftest import tiny_unet
    from diffusers import DDPMScheduler

    tiny_unet(channels=1).save_pretrained(tmp_path / "unet")
    unet = type(tiny_unet()).from_pretrained(tmp_path / "unet")
    table = estimate_moments(unet, torch.rand(2, 1, 8, 8) * 2 - 1, DDPMScheduler(num_train_timesteps=10), num_samples=2,
                             options=QUIET)
    table.save(tmp_path / "table")
    assert table.provenance["model_id"] == str(tmp_path / "unet")


def test_per_channel_moments_of_a_gaussian_with_channel_variances(tmp_path):
    """Channels of variance (0.05, 0.3, 1, 2): each channel's ms_eps and x0_mse match their exact values within
    4 standard errors, the scalar moments are the channel means, and the arrays survive save / load and merge."""
    from analytic_sampler.table import VarianceTable

    v = (0.05, 0.3, 1.0, 2.0)
    model = ExactGaussianEps(ABAR, v)
    ts = np.linspace(0, N - 1, 20).round().astype(int)
    data = torch.tensor(v).sqrt().view(1, 4, 1, 1) * torch.randn(400, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    table = estimate_moments(model, data, ABAR, num_samples=400, timesteps=ts, batch_size=500, options=UNBOUNDED)
    assert table.num_channels == 4 and table.channel_ms_eps.shape == (4, N)
    for name, exact in (("ms_eps", model.exact_ms_eps()), ("x0_mse", model.exact_x0_mse())):
        est, err = getattr(table, f"channel_{name}"), getattr(table, "channel_stderr" if name == "ms_eps" else
                                                              "channel_x0_mse_stderr")
        z = (est[:, ts] - exact[:, ts]) / err[:, ts]
        assert np.all(np.abs(z) < 4), (name, z)
        np.testing.assert_allclose(getattr(table, name)[ts], est[:, ts].mean(0), rtol=1e-12)
    spread = table.channel_ms_eps[:, ts[2]]
    assert spread.max() / spread.min() > 1.5  # the channels really differ where the scalar moment averages them

    loaded = VarianceTable.load(table.save(tmp_path / "t"))
    for name in ("channel_ms_eps", "channel_stderr", "channel_x0_mse", "channel_x0_mse_stderr"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(table, name))
    merged = table.merge(loaded)
    np.testing.assert_allclose(merged.channel_ms_eps[:, ts], table.channel_ms_eps[:, ts], rtol=1e-12)
    assert np.all(merged.counts[ts] == 800)
    scalar_only = VarianceTable(table.ms_eps, table.stderr, table.counts, ABAR, data_range=None,
                                provenance=table.provenance)  # the same model, without per-channel arrays
    assert table.merge(scalar_only).num_channels is None
