"""What the weights' fingerprint in a table's run key costs, against the precompute it guards.

    python benchmarks/fingerprint.py                  # a 1 GiB UNet (64x64 RGB), on the CPU
    python benchmarks/fingerprint.py --device cuda    # the same model on a GPU (hashed on the host)
    python benchmarks/fingerprint.py --quick          # smoke run: a small UNet

Both sides on the same randomly initialised ``UNet2DModel`` (nothing downloaded), in one run:

- the fingerprint (``analytic_sampler.fingerprint.weights_fingerprint``: every parameter and buffer rounded to
  float16 and hashed with SHA-256), best and median of ``--repeats``, with its default threads and with one;
- ``estimate_moments``' seconds per batch of (timestep, image) pairs, from two runs of 1 and ``1 + --batches``
  batches (their difference: the model calls alone, without the set-up and fingerprint both runs share), hence the
  time of a 100-sample precompute, 100 x 1000 pairs, in batches of ``--batch-size``.

Writes ``fingerprint_<device>.json`` / ``.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analytic_sampler.estimation.moments import EstimateOptions, estimate_moments
from analytic_sampler.evaluation.provenance import environment, footer, write_results
from analytic_sampler.fingerprint import weights_fingerprint

PRECOMPUTE_SAMPLES, TIMESTEPS = 100, 1000  # the precompute the fingerprint is measured against
BOUND = 0.10  # the fingerprint must stay under this share of it


def make_unet(quick: bool) -> UNet2DModel:
    """A 64x64 RGB UNet2DModel of about 1 GiB of float32 weights (attention in the three lower blocks); ``quick``:
    a small one at 16x16."""
    torch.manual_seed(0)
    channels = (32, 64, 64, 64) if quick else (224, 448, 672, 896)
    return UNet2DModel(
        sample_size=16 if quick else 64, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=channels, norm_num_groups=32,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ).eval()


def timed(fn, repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def estimate_seconds(unet: UNet2DModel, batches: int, batch_size: int, device: str) -> float:
    """Wall seconds of ``estimate_moments`` over ``batches`` full batches (set-up and fingerprint included)."""
    size = unet.config.sample_size
    images = torch.rand(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    timesteps = torch.linspace(0, TIMESTEPS - 1, batches).round().long().unique().tolist()
    start = time.perf_counter()
    estimate_moments(unet, images, DDPMScheduler(num_train_timesteps=TIMESTEPS), num_samples=batch_size,
                     timesteps=timesteps, batch_size=batch_size * len(timesteps) // batches,
                     options=EstimateOptions(device=device, progress=False))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per model call")
    p.add_argument("--batches", type=int, default=2, help="model calls timed beyond the first")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)

    unet = make_unet(args.quick).to(args.device)
    tensors = [*unet.parameters(), *unet.buffers()]
    size_gib = sum(t.numel() * t.element_size() for t in tensors) / 2**30
    fingerprint = {threads: timed(lambda t=threads: weights_fingerprint(unet, threads=t), args.repeats)
                   for threads in (None, 1)}
    one = estimate_seconds(unet, 1, args.batch_size, args.device)
    more = estimate_seconds(unet, 1 + args.batches, args.batch_size, args.device)
    per_batch = (more - one) / args.batches
    precompute = per_batch * PRECOMPUTE_SAMPLES * TIMESTEPS / args.batch_size
    best = min(fingerprint[None])
    result = {
        "model": f"UNet2DModel, {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M parameters, "
                 f"{size_gib:.3f} GiB of float32 weights, 3x{unet.config.sample_size}x{unet.config.sample_size}",
        "size_gib": size_gib,
        "fingerprint_seconds": {"default threads": fingerprint[None], "1 thread": fingerprint[1]},
        "fingerprint_best_s": best,
        "estimate": {"batch_size": args.batch_size, "runs_s": [one, more], "batches": [1, 1 + args.batches],
                     "seconds_per_batch": per_batch},
        "precompute_s": precompute,
        "share": best / precompute,
        "bound": BOUND,
        **environment(args.device),
    }
    write_results(args.out, f"fingerprint_{'cuda' if args.device.startswith('cuda') else 'cpu'}", result,
                  markdown(result))
    return result


def markdown(r: dict) -> str:
    fp, est = r["fingerprint_seconds"], r["estimate"]
    rows = [f"| {name} | {min(s):.2f} | {statistics.median(s):.2f} | {r['size_gib'] / min(s):.2f} |"
            for name, s in fp.items()]
    hours = r["precompute_s"] / 3600
    return "\n".join([
        f"# Weights' fingerprint against a 100-sample precompute: {r['model']}", "",
        "The fingerprint rounds every parameter and buffer to float16 and hashes it (SHA-256); best and median of "
        f"{len(fp['default threads'])} runs.", "",
        "| fingerprint | best (s) | median (s) | GiB/s (best) |", "|---|---:|---:|---:|", *rows, "",
        f"estimate_moments, batches of {est['batch_size']} pairs: {est['runs_s'][0]:.1f} s for {est['batches'][0]} "
        f"batch, {est['runs_s'][1]:.1f} s for {est['batches'][1]}: {est['seconds_per_batch']:.2f} s per batch, so a "
        f"{PRECOMPUTE_SAMPLES}-sample precompute ({PRECOMPUTE_SAMPLES} x {TIMESTEPS} pairs) takes "
        f"{r['precompute_s']:.0f} s ({hours:.1f} h).", "",
        f"**The fingerprint (best run) costs {r['share']:.1e} of that precompute, {100 * r['share']:.2g}%** (bound: "
        f"{100 * r['bound']:.0f}%).", "",
        footer(r), ""])


if __name__ == "__main__":
    main()
