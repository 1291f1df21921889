"""Helper for test_distributed.py: estimate a table for a tiny UNet, alone or under torchrun.

    python distributed_estimate.py OUT [--crash-after N]      # N: rank 1 dies after N model calls
    python distributed_estimate.py OUT --statistics           # DPM-Solver-v3's statistics instead of the table
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from diffusers import DDPMScheduler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_unet  # noqa: E402

from analytic_sampler.estimation.moments import EstimateOptions, estimate_moments  # noqa: E402
from analytic_sampler.estimation.solver_statistics import StatisticsOptions, estimate_solver_statistics  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--crash-after", type=int, default=None)
    p.add_argument("--statistics", action="store_true")
    args = p.parse_args()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    unet = tiny_unet(channels=1)
    calls = 0

    def model(x, t):
        nonlocal calls
        calls += 1
        if args.crash_after is not None and rank == 1 and calls > args.crash_after:
            os._exit(1)  # a killed process: no cleanup, no exception
        return unet(x, t).sample

    data = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    if args.statistics:
        stats = estimate_solver_statistics(model, data, DDPMScheduler(num_train_timesteps=30),
                                           StatisticsOptions(grid_points=10, num_samples=16, groups=4, batch_size=16),
                                           EstimateOptions(progress=False, model_id="tiny"))
        if rank == 0:
            stats.save(args.out)
        if dist.is_initialized():
            dist.destroy_process_group()
        return
    options = EstimateOptions(checkpoint=os.path.join(args.out, "checkpoint.pt"), checkpoint_every=1, progress=False)
    table = estimate_moments(model, data, DDPMScheduler(num_train_timesteps=30), num_samples=12, batch_size=16,
                             seed=3, options=options)
    if rank == 0:
        table.save(args.out)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
