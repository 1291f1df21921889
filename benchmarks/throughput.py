"""Throughput with a UNet of google/ddpm-cifar10-32's architecture (random weights, nothing downloaded).

    python benchmarks/throughput.py --device cuda     # the GPU figures
    python benchmarks/throughput.py --quick           # CPU smoke run

(1) samples/s of a full K-step loop, AnalyticDPMScheduler (Analytic-DDPM) against DDPMScheduler, K in {10, 100};
(2) estimate_moments' pairs/s against a bare forward pass over batches of the same size.
Writes ``throughput_<device>.json`` / ``.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from analytic_sampler.moments import estimate_moments
from analytic_sampler.report import environment, footer, write_results
from analytic_sampler.scheduler import AnalyticDPMScheduler
from analytic_sampler.trajectory import even_trajectory


def cifar10_unet() -> UNet2DModel:
    """google/ddpm-cifar10-32's UNet2DModel config (35.7M parameters), randomly initialised."""
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), dropout=0.1,
    ).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sampling_rate(unet, scheduler, num_steps: int, batch: int, device: torch.device, timesteps=None) -> float:
    """Samples per second of one full K-step loop (after one warm-up loop)."""
    for warm in (True, False):
        x = torch.randn(batch, 3, 32, 32, device=device)
        _sync(device)
        t0 = time.perf_counter()
        if timesteps:
            scheduler.set_timesteps(timesteps=timesteps, device=device)
        else:
            scheduler.set_timesteps(num_steps, device=device)
        with torch.inference_mode():
            for t in scheduler.timesteps:
                x = scheduler.step(unet(x, t).sample, t, x).prev_sample
        _sync(device)
        if not warm:
            return batch / (time.perf_counter() - t0)
    raise AssertionError("unreachable")


def moments_rate(unet, scheduler, batch: int, num_batches: int, device: torch.device) -> tuple[float, float]:
    """(pairs/s of estimate_moments, images/s of bare forward passes) at the same batch size."""
    data = torch.rand(batch, 3, 32, 32) * 2 - 1
    timesteps = even_trajectory(1000, num_batches)
    estimate_moments(unet, data, scheduler, num_samples=batch, timesteps=timesteps[:1], batch_size=batch, progress=False, device=device)
    _sync(device)
    t0 = time.perf_counter()
    estimate_moments(unet, data, scheduler, num_samples=batch, timesteps=timesteps, batch_size=batch, progress=False, device=device)
    _sync(device)
    ours = batch * num_batches / (time.perf_counter() - t0)
    x = data.to(device)
    t = torch.full((batch,), 500, device=device)
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _ in range(num_batches):
            unet(x, t)
    _sync(device)
    return ours, batch * num_batches / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    unet = cifar10_unet().to(device)
    ddpm = DDPMScheduler(num_train_timesteps=1000)
    ms = np.linspace(0.1, 0.999, 1000)  # a plausible table; the cost of a step does not depend on its values
    analytic = AnalyticDPMScheduler.from_config(ddpm.config, ms_eps=ms.tolist())
    steps, batch, num_batches = ((10,), 2, 2) if args.quick else ((10, 100), 128, 20)
    rows = []
    for k in steps:
        a = sampling_rate(unet, analytic, k, batch, device)
        d = sampling_rate(unet, ddpm, k, batch, device, timesteps=analytic.trajectory)
        rows.append({"K": k, "batch": batch, "analytic_samples_per_s": a, "ddpm_samples_per_s": d, "ratio": a / d})
        print(f"  K={k}: Analytic-DDPM {a:.1f} samples/s, DDPM {d:.1f} samples/s", flush=True)
    ours, bare = moments_rate(unet, ddpm, batch, num_batches, device)
    print(f"  estimate_moments {ours:.1f} pairs/s, bare forward {bare:.1f} images/s", flush=True)
    env = environment(args.device)
    result = {"quick": args.quick, **env, "sampling": rows,
              "moments": {"batch": batch, "pairs_per_s": ours, "forward_images_per_s": bare, "ratio": ours / bare}}
    md = [f"# Throughput, ddpm-cifar10-32 architecture (random weights), {env['device']}"
          f"{' (quick mode)' if args.quick else ''}", "",
          "| K | batch | Analytic-DDPM (samples/s) | DDPMScheduler (samples/s) | ratio |", "|---:|---:|---:|---:|---:|",
          *(f"| {r['K']} | {r['batch']} | {r['analytic_samples_per_s']:.2f} | {r['ddpm_samples_per_s']:.2f} | {r['ratio']:.3f} |" for r in rows),
          "", f"estimate_moments: {ours:.1f} (timestep, image) pairs/s against {bare:.1f} images/s for bare forward passes "
          f"at batch {batch} (ratio {ours / bare:.3f}).", "", footer(env)]
    write_results(args.out, f"throughput_{device.type}", result, "\n".join(md) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
