"""Quick start on the bundled digits model, offline: its table, the scheduler in a Diffusers pipeline, the demo.

    python examples/quickstart.py [--out outputs/quickstart]
"""

from __future__ import annotations

import argparse

import torch
from diffusers import DDPMPipeline

from analytic_sampler import AnalyticDPMScheduler
from analytic_sampler.commands.demo import run_demo
from analytic_sampler.evaluation.sampling import save_grid
from analytic_sampler.pretrained import DEFAULT_MODEL, load_pretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/quickstart")
    args = parser.parse_args()

    model = load_pretrained(DEFAULT_MODEL)  # unet/ + scheduler/ + table/, the layout of a Hub repo
    print(model.table)
    pipe = DDPMPipeline(unet=model.unet, scheduler=model.scheduler)
    pipe.scheduler = AnalyticDPMScheduler.from_table(model.table, pipe.scheduler.config, trajectory="even")
    images = pipe(batch_size=16, num_inference_steps=10, generator=torch.Generator().manual_seed(0), output_type="pt").images
    print(f"10-step trajectory: {pipe.scheduler.trajectory}")

    # The main job: bits/dim and FD-digits of Analytic-DPM against DDPM / DDIM at K = 10 and 25, a labelled grid.
    run_demo(DEFAULT_MODEL, args.out)
    save_grid(images * 2 - 1, f"{args.out}/pipeline_k10.png", nrow=8)  # "pt" output: (B, C, H, W) in [0, 1]
    print(f"wrote {args.out}/pipeline_k10.png")


if __name__ == "__main__":
    main()
