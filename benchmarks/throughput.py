"""Throughput of sampling and of estimate_moments, on one process and under torchrun (random weights, nothing
downloaded).

    python benchmarks/throughput.py --device cuda     # the GPU figures: ddpm-cifar10-32's UNet, batch 128
    python benchmarks/throughput.py                   # on the CPU: a small UNet, batch 32, 1 and 2 processes
    python benchmarks/throughput.py --quick           # smoke run

(1) samples/s of a full K-step loop, AnalyticDPMScheduler (Analytic-DDPM) against DDPMScheduler;
(2) estimate_moments' pairs/s against bare forward passes of the same model over batches of the same size, measured
    side by side (best of ``--repeats``), with its default settings and with each speed option: noise drawn on the
    model's device, bfloat16 weights and inputs, torch.compile;
(3) estimate_moments' pairs/s against the number of processes, each run launched by torchrun (gloo on the CPU with
    ``--threads`` threads per process, nccl with one GPU per process).
Writes ``throughput_<device>.json`` / ``.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from analytic_sampler.estimation.distributed import start_distributed
from analytic_sampler.estimation.moments import EstimateOptions, estimate_moments
from analytic_sampler.evaluation.provenance import environment, footer, write_results
from analytic_sampler.schedulers.analytic_dpm import AnalyticDPMScheduler
from analytic_sampler.trajectory import even_trajectory

UNETS = {
    "cifar10": "google/ddpm-cifar10-32's UNet2DModel (35.7M parameters, 3x32x32)",
    "small": "a small UNet2DModel (channels 32, 64; attention at 8x8; 0.7M parameters, 3x16x16)",
    "tiny": "a tiny UNet2DModel (channels 8, 16; 3x8x8)",
}
OPTIONS = {  # estimate_moments' settings and the model they run: (label, kwargs, bfloat16 weights)
    "default": ("default (noise on the host, float32, eager)", {}, False),
    "noise_on_device": ("noise drawn on the model's device", {"noise_device": "model"}, False),
    "bfloat16": ("bfloat16 weights and inputs", {}, True),
    "compile": ("torch.compile", {"compile": True}, False),
}
MARK = "THROUGHPUT_RESULT "


def make_unet(name: str) -> UNet2DModel:
    """One of ``UNETS``, randomly initialised with seed 0; ``cifar10`` is google/ddpm-cifar10-32's config."""
    torch.manual_seed(0)
    if name == "cifar10":
        return UNet2DModel(
            sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), dropout=0.1,
        ).eval()
    small = name == "small"
    return UNet2DModel(
        sample_size=16 if small else 8, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 64) if small else (8, 16), norm_num_groups=8 if small else 4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D" if small else "DownBlock2D"),
        up_block_types=("AttnUpBlock2D" if small else "UpBlock2D", "UpBlock2D"),
    ).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sample_shape(unet: UNet2DModel) -> tuple[int, int, int]:
    return unet.config.in_channels, unet.config.sample_size, unet.config.sample_size


def _images(unet: UNet2DModel, n: int) -> torch.Tensor:
    return torch.rand(n, *_sample_shape(unet), generator=torch.Generator().manual_seed(0)) * 2 - 1


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def alternated(a: Callable[[], object], b: Callable[[], object], repeats: int, device: torch.device
               ) -> tuple[float, float, float]:
    """Run ``a`` and ``b`` alternately ``repeats`` times: (best time of ``a``, best of ``b``, median over the pairs of
    time_b / time_a). The paired ratio cancels load that other processes put on the machine for a while; the best
    times are the least disturbed runs."""
    times = np.array([(_timed(a, device), _timed(b, device)) for _ in range(repeats)])
    return float(times[:, 0].min()), float(times[:, 1].min()), float(np.median(times[:, 1] / times[:, 0]))


def sampling_loop(unet, scheduler, batch: int, device: torch.device, **set_timesteps) -> Callable[[], None]:
    def loop():
        scheduler.set_timesteps(device=device, **set_timesteps)
        x = torch.randn(batch, *_sample_shape(unet), device=device)
        with torch.inference_mode():
            for t in scheduler.timesteps:
                x = scheduler.step(unet(x, t).sample, t, x).prev_sample

    return loop


def sampling_row(unet, analytic, ddpm, num_steps: int, batch: int, device: torch.device, repeats: int) -> dict:
    """Samples/s of full K-step loops with AnalyticDPMScheduler and with DDPMScheduler on the same trajectory."""
    ours = sampling_loop(unet, analytic, batch, device, num_inference_steps=num_steps)
    ours()  # warm-up; sets the trajectory that DDPMScheduler follows
    theirs = sampling_loop(unet, ddpm, batch, device, timesteps=list(analytic.trajectory))
    theirs()
    t_ours, t_theirs, ratio = alternated(ours, theirs, repeats, device)
    return {"K": num_steps, "batch": batch, "analytic_samples_per_s": batch / t_ours,
            "ddpm_samples_per_s": batch / t_theirs, "ratio": ratio}


def moments_row(unet, scheduler, batch: int, num_batches: int, device: torch.device, repeats: int, options: dict,
                max_seconds: float | None) -> dict:
    """pairs/s of estimate_moments with ``options`` and images/s of bare forward passes of the model it runs, over
    ``num_batches`` batches of ``batch`` (fewer if one run would exceed ``max_seconds``), after a warm-up of both."""
    data = _images(unet, batch)
    timesteps = even_trajectory(1000, num_batches)
    forward = torch.compile(unet, dynamic=False) if options.get("compile") else unet
    x = data.to(device=device, dtype=unet.dtype)
    t = torch.full((batch,), 500, device=device)

    def ours(n: int) -> Callable[[], None]:
        return lambda: estimate_moments(unet, data, scheduler, num_samples=batch, timesteps=timesteps[:n],
                                        batch_size=batch, options=EstimateOptions(progress=False, device=device,
                                                                                  **options))

    def bare(n: int) -> Callable[[], None]:
        def run():
            with torch.inference_mode():
                for _ in range(n):
                    forward(x, t)

        return run

    ours(1)()  # first calls: compilation, allocator and cuDNN caches
    bare(1)()
    n = num_batches if max_seconds is None else int(np.clip(max_seconds / _timed(bare(1), device), 2, num_batches))
    t_ours, t_bare, ratio = alternated(ours(n), bare(n), repeats, device)
    return {"batches": n, "pairs_per_s": batch * n / t_ours, "forward_images_per_s": batch * n / t_bare,
            "ratio": ratio}


def option_rows(unet, scheduler, batch: int, num_batches: int, device: torch.device, repeats: int,
                names: list[str], max_seconds: float | None) -> list[dict]:
    rows = []
    for name in names:
        label, options, bf16 = OPTIONS[name]
        model = copy.deepcopy(unet).to(torch.bfloat16) if bf16 else unet
        try:
            row = moments_row(model, scheduler, batch, num_batches, device, repeats, options, max_seconds)
        except Exception as err:  # e.g. torch.compile without a working C++ compiler or Triton
            rows.append({"option": name, "label": label, "skipped": f"{type(err).__name__}: {err}"[:300]})
            print(f"  {label}: skipped ({rows[-1]['skipped']})", flush=True)
            continue
        rows.append({"option": name, "label": label, **row})
        print(f"  {label}: estimate_moments {row['pairs_per_s']:.1f} pairs/s, bare forward "
              f"{row['forward_images_per_s']:.1f} images/s, ratio {row['ratio']:.3f}", flush=True)
    reference = rows[0].get("forward_images_per_s") if rows and rows[0]["option"] == "default" else None
    for row in rows:
        row["vs_default_forward"] = row["pairs_per_s"] / reference if reference and "pairs_per_s" in row else None
    return rows


def worker(args) -> None:
    """One process of a torchrun launch: a warm-up of one batch per rank, then the best of ``repeats`` runs of
    ``num_batches`` batches in all."""
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    rank, device = start_distributed(args.device)
    device = torch.device(device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    unet = make_unet(args.unet).to(device)
    scheduler, data = DDPMScheduler(num_train_timesteps=1000), _images(unet, args.batch)
    timesteps = even_trajectory(1000, args.num_batches)

    def run(ts):
        estimate_moments(unet, data, scheduler, num_samples=args.batch, timesteps=ts, batch_size=args.batch,
                         options=EstimateOptions(progress=False, device=device))
        _sync(device)
        if world > 1:
            dist.barrier()

    run(timesteps[:world])
    seconds = min(_timed(lambda: run(timesteps), device) for _ in range(args.repeats))
    if rank == 0:
        print(MARK + json.dumps({"processes": world, "seconds": seconds,
                                 "pairs_per_s": args.batch * args.num_batches / seconds}), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


def process_rows(args, counts: list[int]) -> list[dict]:
    """pairs/s of estimate_moments under ``torchrun --nproc_per_node n`` for each n in ``counts``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    rows = []
    for n in counts:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
               "--worker", "--device", args.device, "--unet", args.unet, "--batch", str(args.batch),
               "--num-batches", str(args.process_batches), "--threads", str(args.threads), "--repeats",
               str(args.repeats)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        lines = [line for line in out.stdout.splitlines() if line.startswith(MARK)]
        if out.returncode != 0 or not lines:
            raise RuntimeError(f"torchrun with {n} process(es) failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(lines[-1][len(MARK):]))
        print(f"  {n} process(es): {rows[-1]['pairs_per_s']:.1f} pairs/s", flush=True)
    for row in rows:
        row["speedup"] = row["pairs_per_s"] / rows[0]["pairs_per_s"] * rows[0]["processes"]
        row["efficiency"] = row["speedup"] / row["processes"]
    return rows


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(result: dict) -> str:
    s = result["settings"]
    fewer = f", fewer where one would take over {s['max_seconds']:g} s" if s["max_seconds"] else ""
    cpu = (" On the CPU the noise is drawn by the CPU either way: the first two rows differ only by measurement noise."
           if s["device_type"] == "cpu" else "")
    lines = [f"# Throughput, {UNETS[s['unet']]}, random weights, {result['device']}"
             f"{' (quick mode)' if result['quick'] else ''}", "",
             f"Batch {s['batch']}; {s['threads']} thread(s) per process. Each comparison alternates {s['repeats']} "
             "timed runs of both sides after a warm-up: rates are the best run, ratios the median of the paired "
             f"ratios. Load average (1, 5, 15 min) before the run: {s['load_average']}.", "",
             "## Sampling", "",
             "| K | Analytic-DDPM (samples/s) | DDPMScheduler (samples/s) | ratio |", "|---:|---:|---:|---:|",
             *(f"| {r['K']} | {r['analytic_samples_per_s']:.2f} | {r['ddpm_samples_per_s']:.2f} | {r['ratio']:.3f} |"
               for r in result["sampling"]),
             "", "## estimate_moments against the bare forward pass (one process)", "",
             "Bare forward: the same model (bfloat16 weights, compiled) on a fixed batch, the network alone; ratio: "
             "(timestep, image) pairs/s over its images/s; last column: pairs/s over the default model's forward "
             f"rate. Runs of {s['num_batches']} batches{fewer}.{cpu}", "",
             "| option | batches | estimate_moments (pairs/s) | bare forward (images/s) | ratio | vs float32 eager "
             "forward |", "|---|---:|---:|---:|---:|---:|"]
    for r in result["moments"]:
        if "skipped" in r:
            lines.append(f"| {r['label']} | | skipped: {r['skipped']} | | | |")
        else:
            lines.append(f"| {r['label']} | {r['batches']} | {r['pairs_per_s']:.1f} | {r['forward_images_per_s']:.1f} "
                         f"| {r['ratio']:.3f} | {_fmt(r['vs_default_forward'], 3)} |")
    lines += ["", f"## estimate_moments against the number of processes (torchrun, {s['backend']}, default options, "
              f"{s['process_batches']} batches in all, best of {s['repeats']})", "",
              "| processes | pairs/s | speed-up | efficiency |", "|---:|---:|---:|---:|",
              *(f"| {r['processes']} | {r['pairs_per_s']:.1f} | {r['speedup']:.2f} | {r['efficiency']:.2f} |"
                for r in result["processes"]),
              "", footer(result)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny UNet, few batches, no compile")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--unet", choices=sorted(UNETS), default=None, help="default: cifar10 on a GPU, small on the CPU")
    p.add_argument("--batch", type=int, default=None, help="default: 128 on a GPU, 32 on the CPU")
    p.add_argument("--num-batches", type=int, default=None, help="batches per timed run (default 50 GPU, 12 CPU)")
    p.add_argument("--repeats", type=int, default=5, help="alternated timed runs per comparison")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="seconds: fewer batches for an option whose run would take longer (default: 1 on the CPU)")
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help="sampling loops of K steps (default: 10 and 100 on a GPU; 10 on the CPU, where the UNet "
                        "dominates)")
    p.add_argument("--processes", type=int, nargs="+", default=None,
                   help="process counts (default: 1 and the number of GPUs, or 1 and 2 on the CPU)")
    p.add_argument("--process-batches", type=int, default=None, help="batches per multi-process run (default 4x)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default 1 on the CPU)")
    p.add_argument("--options", nargs="+", choices=list(OPTIONS), default=list(OPTIONS))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.quick:
        args.unet, args.batch, args.num_batches, args.repeats, args.steps = "tiny", 4, 2, 1, [10]
        args.options = [o for o in args.options if o != "compile"]
    args.unet = args.unet or ("cifar10" if gpu else "small")
    args.batch = args.batch or (128 if gpu else 32)
    args.num_batches = args.num_batches or (50 if gpu else 12)
    args.process_batches = args.process_batches or 4 * args.num_batches
    args.threads = args.threads or (torch.get_num_threads() if gpu else 1)
    args.max_seconds = args.max_seconds or (None if gpu else 1.0)
    args.steps = args.steps or ([10, 100] if gpu else [10])
    if args.worker:
        worker(args)
        return {}
    counts = args.processes or sorted({1, torch.cuda.device_count() if gpu else min(2, os.cpu_count() or 1)})
    torch.set_num_threads(args.threads)
    load = [round(x, 2) for x in os.getloadavg()]  # other users' work on the machine shows up here
    unet = make_unet(args.unet).to(device)
    ddpm = DDPMScheduler(num_train_timesteps=1000)
    ms = np.linspace(0.1, 0.999, 1000)  # a plausible table; the cost of a step does not depend on its values
    analytic = AnalyticDPMScheduler.from_config(ddpm.config, ms_eps=ms.tolist())
    print(f"{UNETS[args.unet]} on {args.device}, batch {args.batch}", flush=True)
    sampling = []
    for k in args.steps:
        sampling.append(sampling_row(unet, analytic, ddpm, k, args.batch, device, args.repeats))
        print(f"  K={k}: Analytic-DDPM {sampling[-1]['analytic_samples_per_s']:.2f} samples/s, DDPM "
              f"{sampling[-1]['ddpm_samples_per_s']:.2f} samples/s", flush=True)
    moments = option_rows(unet, ddpm, args.batch, args.num_batches, device, args.repeats, args.options,
                          args.max_seconds)
    processes = process_rows(args, counts)
    settings = {"device_type": device.type, "unet": args.unet, "batch": args.batch, "num_batches": args.num_batches,
                "repeats": args.repeats, "threads": args.threads, "process_batches": args.process_batches,
                "max_seconds": args.max_seconds, "load_average": load, "backend": "nccl" if gpu else "gloo"}
    result = {"quick": args.quick, **environment(args.device), "settings": settings, "sampling": sampling,
              "moments": moments, "processes": processes}
    write_results(args.out, f"throughput_{device.type}", result, markdown(result))
    return result


if __name__ == "__main__":
    main()
