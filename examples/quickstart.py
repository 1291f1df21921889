"""Quick start on the bundled digits model, offline: its table, the scheduler in a Diffusers pipeline, and the
sample-quality trajectory on another scheduler. It shows the API and stops; the comparison is `analytic-sampler demo`.

    python examples/quickstart.py [--out outputs/quickstart] [--steps 10] [--num-images 16]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DPMSolverMultistepScheduler

from analytic_sampler import AnalyticDPMScheduler, apply_timesteps, sample_quality_trajectory
from analytic_sampler.evaluation.sampling import sample, save_grid
from analytic_sampler.pretrained import DEFAULT_MODEL, load_pretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/quickstart")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--num-images", type=int, default=16)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model = load_pretrained(DEFAULT_MODEL)  # unet/ + scheduler/ + table/, the layout of a Hub repo
    print(model.table)

    # 1. Analytic-DPM in a Diffusers pipeline: the table and the model's own scheduler config, nothing else.
    pipe = DDPMPipeline(unet=model.unet, scheduler=model.scheduler)
    pipe.scheduler = AnalyticDPMScheduler.from_table(model.table, pipe.scheduler.config)
    images = pipe(batch_size=args.num_images, num_inference_steps=args.steps,
                  generator=torch.Generator().manual_seed(0), output_type="pt").images
    save_grid(images * 2 - 1, out / "analytic_dpm.png", nrow=8)  # "pt" output: (B, C, H, W) in [0, 1]
    print(f"Analytic-DPM, {args.steps} steps on {pipe.scheduler.trajectory}: wrote {out / 'analytic_dpm.png'}")

    # 2. The sample-quality trajectory the table carries, on any scheduler that takes custom timesteps.
    timesteps = sample_quality_trajectory(model.table, args.steps)
    dpm = DPMSolverMultistepScheduler.from_config(model.scheduler.config)
    apply_timesteps(dpm, timesteps)
    images = sample(model.unet, dpm, args.num_images, timesteps=timesteps, progress=False)
    save_grid(images, out / "dpm_solver_sample_trajectory.png", nrow=8)
    print(f"DPM-Solver++ on the sample-quality trajectory {timesteps}: wrote "
          f"{out / 'dpm_solver_sample_trajectory.png'}")


if __name__ == "__main__":
    main()
