"""``analytic-sampler`` command: precompute a table, inspect trajectories, sample, run the demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .pretrained import DEFAULT_MODEL, load_pretrained


def _load_data(spec: str, channels: int):
    """``digits:train`` / ``digits:heldout``, a ``.pt`` / ``.npy`` tensor file, or a folder of images."""
    import numpy as np
    import torch

    if spec.startswith("digits:"):
        from .digits import load_digits_split

        return load_digits_split(spec.split(":", 1)[1])[0]
    if spec.endswith(".pt"):
        return torch.load(spec, map_location="cpu")
    if spec.endswith(".npy"):
        return torch.from_numpy(np.load(spec))
    if os.path.isdir(spec):
        from .data import take_samples

        return take_samples(spec, num_samples=sys.maxsize, channels=channels)
    raise SystemExit(f"--data {spec!r}: use digits:train, digits:heldout, a .pt/.npy file of images in [-1, 1] or an image folder.")


def _timesteps(spec: str, num_train_timesteps: int):
    from .trajectory import even_trajectory

    if spec == "all":
        return None
    if spec.startswith("even:"):
        return sorted(even_trajectory(num_train_timesteps, int(spec.split(":", 1)[1])))
    return sorted(int(t) for t in spec.split(","))


def cmd_precompute(args) -> None:
    from .moments import estimate_moments

    model = load_pretrained(args.model, with_table=False)
    data = _load_data(args.data, model.unet.config.in_channels)
    out = Path(args.out)
    table = estimate_moments(
        model.unet, data, model.scheduler, num_samples=args.num_samples,
        timesteps=_timesteps(args.timesteps, model.scheduler.config.num_train_timesteps),
        batch_size=args.batch_size, seed=args.seed, device=args.device,
        checkpoint=args.checkpoint or str(out / "checkpoint.pt"),
        provenance={"model_id": args.model, "data": args.data},
    )
    table.save(out)
    print(f"{table}\nsaved to {out}")


def _table(args, model=None):
    """``--table`` if given, else the table the model ships."""
    from .table import VarianceTable

    if args.table:
        return VarianceTable.load(args.table)
    table = (model or load_pretrained(args.model)).table
    if table is None:
        raise SystemExit(f"{args.model} ships no variance table: run `analytic-sampler precompute {args.model} --data ...` and pass --table.")
    return table


def cmd_trajectory(args) -> None:
    from .trajectory import TrajectoryDP, even_trajectory, trajectory_cost

    table = _table(args)
    dp = TrajectoryDP(table.alphas_cumprod, table.ms_eps, max(args.steps))
    n = table.num_train_timesteps
    report = {
        k: {"optimal": dp.path(k), "optimal_cost": dp.cost(k),
            "even_cost": trajectory_cost(table.alphas_cumprod, dp.moment, even_trajectory(n, k))}
        for k in args.steps
    }
    print(json.dumps(report, indent=1))


def cmd_sample(args) -> None:
    from .sampling import sample, save_grid
    from .scheduler import AnalyticDPMScheduler

    model = load_pretrained(args.model)
    scheduler = AnalyticDPMScheduler.from_table(
        _table(args, model), model.scheduler.config, eta=args.eta, trajectory=args.trajectory
    )
    images = sample(model.unet, scheduler, args.num_images, args.steps, seed=args.seed, device=args.device)
    print(f"trajectory: {scheduler.trajectory}")
    print(f"wrote {save_grid(images, args.out)}")


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args.model, args.out, steps=args.steps, num_images=args.num_images, seed=args.seed, device=args.device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="analytic-sampler", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="fewer-steps comparison on a bundled model: image grid + FD-digits table")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 25])
    p.add_argument("--num-images", type=int, default=297)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("precompute", help="Monte Carlo estimate of a model's ms_eps table")
    p.add_argument("model", help="bundled model name, model folder (unet/ + scheduler/) or Hub repo id")
    p.add_argument("--data", required=True, help="digits:train, a .pt/.npy file of images in [-1, 1], or an image folder")
    p.add_argument("--out", required=True, help="folder for variance_table.{safetensors,json}")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--timesteps", default="all", help="all, even:K or a comma list")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--checkpoint", default=None, help="resume file (default OUT/checkpoint.pt)")
    p.set_defaults(func=cmd_precompute)

    p = sub.add_parser("trajectory", help="optimal K-step trajectories of a table and their DP cost against even")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--table", default=None)
    p.add_argument("--steps", type=int, nargs="+", default=[10])
    p.set_defaults(func=cmd_trajectory)

    p = sub.add_parser("sample", help="sample a grid with AnalyticDPMScheduler")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--table", default=None, help="table folder or Hub repo id (default: the model's own)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--trajectory", default="even", choices=["even", "quadratic", "optimal"])
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="samples.png")
    p.set_defaults(func=cmd_sample)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from err


if __name__ == "__main__":
    main()
