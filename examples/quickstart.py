"""Quick start on the bundled digits model, offline: its table, the scheduler in a Diffusers pipeline, and the
sample-quality trajectory. It shows the API and stops; the comparison with other samplers is `analytic-sampler demo`.

    python examples/quickstart.py [--out outputs/quickstart] [--steps 10] [--num-images 16]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import DDPMPipeline

from analytic_sampler import AnalyticDPMScheduler
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

    # 1. Analytic-DPM in a Diffusers pipeline: the table, the model's own scheduler config and trailing timesteps,
    #    which sample better than the config's "leading" ones (benchmarks/results/samplers.md).
    pipe = DDPMPipeline(unet=model.unet, scheduler=model.scheduler)
    pipe.scheduler = AnalyticDPMScheduler.from_table(model.table, pipe.scheduler.config, timestep_spacing="trailing")
    images = pipe(batch_size=args.num_images, num_inference_steps=args.steps,
                  generator=torch.Generator().manual_seed(0), output_type="pt").images
    save_grid(images * 2 - 1, out / "analytic_dpm.png", nrow=8)  # "pt" output: (B, C, H, W) in [0, 1]
    print(f"Analytic-DPM, {args.steps} steps on {pipe.scheduler.trajectory}: wrote {out / 'analytic_dpm.png'}")

    # 2. The sample-quality trajectory of the table's sample cost, timestep_spacing="samples": here Analytic-DDPM,
    #    without the cap, since the trajectory already ends above t = 0. Any scheduler that takes custom timesteps
    #    runs it too: apply_timesteps(scheduler, sample_quality_trajectory(model.table, K)), which also serves UniPC.
    scheduler = AnalyticDPMScheduler.from_table(model.table, model.scheduler.config, timestep_spacing="samples",
                                                variance_cap_y=None)
    images = sample(model.unet, scheduler, args.num_images, args.steps, progress=False)
    grid = save_grid(images, out / "sample_trajectory.png", nrow=8)
    print(f"Analytic-DDPM on the sample-quality trajectory {scheduler.trajectory}: wrote {grid}")


if __name__ == "__main__":
    main()
