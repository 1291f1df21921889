"""estimate_moments' speed options: noise on the model's device, bfloat16 model inputs, torch.compile, and no host
syncs per batch (the last on a GPU only)."""

from __future__ import annotations

import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from conftest import tiny_unet
from diffusers import DDPMScheduler

from analytic_sampler.commands.cli import main
from analytic_sampler.estimation.moments import EstimateOptions, estimate_moments
from analytic_sampler.table import VarianceTable

SCHEDULER = DDPMScheduler(num_train_timesteps=1000)
TS = np.linspace(0, 999, 10).round().astype(int)
ARRAYS = ("ms_eps", "stderr", "x0_mse", "x0_mse_stderr", "counts", "channel_ms_eps", "channel_x0_mse")
# bfloat16 keeps 8 significant bits: each eps element is within a few units of 2^-8 of float32's, with signs that
# average out in a mean of squares over d x M elements; measured 8e-4 (scalar) and 2.6e-3 (per channel) at M = 64.
BF16_RTOL = 2.0**-8


def images(n: int = 48, channels: int = 3) -> torch.Tensor:
    return torch.rand(n, channels, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


def estimate(model, n: int = 48, **options) -> VarianceTable:
    options = EstimateOptions(progress=False, **options)
    return estimate_moments(model, images(n), SCHEDULER, n, TS, batch_size=32, seed=1, options=options)


def assert_same(a: VarianceTable, b: VarianceTable) -> None:
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_noise_on_the_model_device_equals_host_noise_on_the_cpu(tmp_path):
    unet = tiny_unet(channels=3)
    host = estimate(unet, checkpoint=tmp_path / "ck.pt")
    on_model = estimate(unet, noise_device="model")
    assert_same(host, on_model)
    assert host.provenance["noise_device"] == on_model.provenance["noise_device"] == "cpu"
    calls = []
    resumed = estimate(lambda x, t: calls.append(t) or unet(x, t), noise_device="model", checkpoint=tmp_path / "ck.pt")
    assert calls == [] and (resumed.ms_eps[TS] == host.ms_eps[TS]).all()  # the same run: its checkpoint is reused
    with pytest.raises(ValueError, match=r"noise_device='cuda'; use 'cpu' \(x_t the same on every device\) or 'model'"):
        estimate(unet, noise_device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_noise_on_a_gpu_is_reproducible_and_agrees_with_host_noise_statistically(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    unet = tiny_unet(channels=3).cuda()
    on_gpu, again, host = (estimate(unet, n=200, noise_device=where) for where in ("model", "model", "cpu"))
    assert_same(on_gpu, again)
    assert on_gpu.provenance["noise_device"] == "cuda" and not (on_gpu.ms_eps[TS] == host.ms_eps[TS]).any()
    z = (on_gpu.ms_eps[TS] - host.ms_eps[TS]) / np.hypot(on_gpu.stderr[TS], host.stderr[TS])
    assert np.all(np.abs(z) < 4), z


def test_bfloat16_model_gives_float32_table_within_bfloat16_precision(tmp_path):
    full = estimate(tiny_unet(channels=3))
    half_unet = tiny_unet(channels=3).to(torch.bfloat16)
    half = estimate(half_unet, checkpoint=tmp_path / "ck.pt")  # dtype defaults to the weights' bfloat16
    assert half.provenance["dtype"] == "torch.bfloat16"
    assert torch.load(tmp_path / "ck.pt", weights_only=True)["sums"].dtype == torch.float64
    for name in ("ms_eps", "x0_mse", "channel_ms_eps", "channel_x0_mse"):
        ours, ref = getattr(half, name)[..., TS], getattr(full, name)[..., TS]
        assert np.isfinite(ours).all() and not (ours == ref).all(), name  # bfloat16 really ran
        np.testing.assert_allclose(ours, ref, rtol=BF16_RTOL, err_msg=name)
    assert np.all(np.abs(half.ms_eps[TS] - full.ms_eps[TS]) < 0.25 * full.stderr[TS])  # far below the Monte Carlo noise
    assert_same(half, estimate(half_unet, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"dtype=torch.bfloat16 but the model's weights are torch.float32; convert the "
                                         r"model first \(model.to\(torch.bfloat16\)\) or leave dtype=None"):
        estimate(tiny_unet(channels=3), dtype=torch.bfloat16)


def test_compile_compiles_once_for_the_full_batch_and_leaves_the_adapter_alone():
    """A recording backend (no C++ compiler needed) sees the full batch of 32 only: 470 pairs are 14 batches of 32 and
    a last one of 22, which runs uncompiled; the table equals the uncompiled one."""
    torch._dynamo.reset()
    unet, shapes = tiny_unet(channels=3), []

    def backend(graph, example_inputs):
        shapes.append({tuple(x.shape) for x in example_inputs if isinstance(x, torch.Tensor)})
        return graph.forward

    eager = estimate(unet, n=47)
    compiled = estimate(unet, n=47, compile={"backend": backend})
    torch._dynamo.reset()
    assert len(shapes) >= 1 and (32, 3, 8, 8) in shapes[0]
    assert not any((22, 3, 8, 8) in inputs for inputs in shapes)
    assert_same(eager, compiled)


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="torch.compile on the CPU needs a C++ "
                    "compiler (set CXX or install g++)")
@pytest.mark.skipif(os.environ.get("ANALYTIC_SAMPLER_COMPILE_TEST") != "1", reason="inductor takes up to ~100 s "
                    "to compile a tiny UNet on a 2-core CPU with a cold cache (10 s warm); set "
                    "ANALYTIC_SAMPLER_COMPILE_TEST=1")
def test_compile_with_inductor_matches_eager():
    """Inductor fuses and reorders float32 arithmetic: the table agrees to float32 rounding, not bit for bit."""
    torch._dynamo.reset()
    unet = tiny_unet(channels=3)
    eager, compiled = estimate(unet, n=47), estimate(unet, n=47, compile=True)
    torch._dynamo.reset()
    for name in ("ms_eps", "x0_mse"):
        np.testing.assert_allclose(getattr(compiled, name)[TS], getattr(eager, name)[TS], rtol=1e-5, err_msg=name)


def test_cli_precompute_bfloat16_with_noise_on_the_model_device(tmp_path):
    tiny_unet(channels=1).save_pretrained(tmp_path / "model" / "unet")
    DDPMScheduler(num_train_timesteps=20).save_pretrained(tmp_path / "model" / "scheduler")
    torch.save(images(6, channels=1), tmp_path / "images.pt")
    main(["precompute", str(tmp_path / "model"), "--fit-paths", "0",
          "--data", str(tmp_path / "images.pt"), "--out", str(tmp_path / "t"),
          "--num-samples", "6", "--dtype", "bfloat16", "--noise-device", "model", "--device", "cpu"])
    table = VarianceTable.load(tmp_path / "t")
    assert table.provenance["dtype"] == "torch.bfloat16" and np.isfinite(table.ms_eps).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are a GPU matter; no CUDA device here")
@pytest.mark.parametrize("noise_device", ["cpu", "model"])
def test_no_host_sync_per_batch_on_a_gpu(noise_device):
    """CUDA's sync debug mode warns at every host sync: 4 and 16 batches (one checkpoint boundary, at the end) give
    the same count, so no batch syncs."""
    unet = tiny_unet(channels=3).cuda()

    def syncs(num_batches: int) -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                estimate(unet, n=num_batches * 32 // TS.size, noise_device=noise_device, checkpoint_every=10**6)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    syncs(4)  # warm-up: cuDNN, pinned-memory and allocator caches
    assert syncs(4) == syncs(16)
