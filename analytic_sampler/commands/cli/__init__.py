"""``analytic-sampler`` command: precompute a table, inspect trajectories, score and sample, bench, run the demo.

One module per subcommand, each with ``add_parser`` and ``run``; they import torch and the library only when they
run, so ``--help`` and argument errors answer at once."""

from __future__ import annotations

import argparse
import time
import warnings

from ..runtime import configure_threads
from . import bench, demo, nll, precompute, sample, trajectory
from .arguments import torch_device

SUBCOMMANDS = (demo, precompute, trajectory, nll, bench, sample)
DESCRIPTION = "Analytic-DPM for a Diffusers model: precompute its table, inspect trajectories, score, sample, bench."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="analytic-sampler", description=DESCRIPTION)
    subcommands = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(subcommands)
    return parser


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    args = build_parser().parse_args(argv)
    args.started = started
    if hasattr(args, "threads"):
        configure_threads(args.threads)
    if getattr(args, "device", None) not in (None, "cpu"):
        try:
            torch_device(args.device)
        except argparse.ArgumentTypeError as err:
            args.parser.error(f"argument --device: {err}")
    shown, warnings.formatwarning = warnings.formatwarning, _warning_line
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from err
    finally:
        warnings.formatwarning = shown


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """Warnings on the command line: one line each, without the source line that raised them."""
    return f"warning: {message}\n"


if __name__ == "__main__":
    main()
