"""``analytic-sampler bench``: what fewer steps cost any model, in likelihood and samples (the work is
:func:`analytic_sampler.commands.bench.run_bench`)."""

from __future__ import annotations

import os

from ...pretrained import load_pretrained
from ..outputs import refuse_overwrite
from .arguments import (
    DATA_FORMS,
    FORCE_TABLE_HELP,
    OVERWRITE_HELP,
    add_run_options,
    non_negative_int,
    num_steps,
    positive_int,
)
from .inputs import check_data, load_data, load_table, make_folder


def add_parser(subcommands) -> None:
    """The ``bench`` subcommand's arguments."""
    p = subcommands.add_parser(
        "bench", help="NLL and sample quality against K for any model: bench.json, bench.md, plots")
    p.add_argument("model", help="bundled model name, model folder (unet/ + scheduler/ [+ table/]) or Hub repo id")
    p.add_argument("--data", required=True, help=f"training images (table, FD reference); {DATA_FORMS}")
    p.add_argument("--eval-data", required=True, help="held-out images for the NLL and the real-data floor")
    p.add_argument("--steps", type=num_steps, nargs="+", default=[10, 25, 50, 100])
    p.add_argument("--out", default="outputs/bench")
    p.add_argument("--table", default=None, help="reuse this table (default: the model's own, else estimate one)")
    p.add_argument("--force-table", action="store_true", help=FORCE_TABLE_HELP)
    p.add_argument("--table-samples", type=positive_int, default=100, help="samples per timestep for a new table")
    p.add_argument("--solver-samples", type=non_negative_int, default=128, metavar="M",
                   help="draws per grid point for DPM-Solver-v3's statistics where the model has none (0: leave "
                        "its row out)")
    p.add_argument("--fd-samples", type=positive_int, default=None,
                   help="samples per FD cell (default: the number of training images, at most 5000)")
    p.add_argument("--inception", default=None, help="local TorchScript Inception network for FID on RGB models")
    p.add_argument("--scheduler", action="append", metavar="CLASS",
                   help="add a Diffusers scheduler by class name to the sampler rows, built from the model's own "
                        "scheduler config (repeatable), e.g. --scheduler HeunDiscreteScheduler")
    p.add_argument("--batch-size", type=positive_int, default=256)
    add_run_options(p)
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=run, parser=p)


def run(args) -> None:
    from ..bench import BenchOptions, output_names, run_bench

    refuse_overwrite(args.out, args.overwrite, output_names())
    if args.inception is not None and not os.path.isfile(args.inception):
        raise ValueError(f"--inception {args.inception!r}: no such file (looked in {os.path.abspath(args.inception)}); "
                         "pass a TorchScript Inception network, or leave it out to skip sample quality.")
    model = load_pretrained(args.model)
    train = load_data(args.data, model.unet.config.in_channels)
    check_data(train, model.unet, args.data, needed=2)
    heldout = load_data(args.eval_data, model.unet.config.in_channels, "--eval-data")
    check_data(heldout, model.unet, args.eval_data, "--eval-data", needed=2)
    table = load_table(args) if args.table else None  # run_bench checks it against the model
    out = make_folder(args.out)
    options = BenchOptions(table=table, table_samples=args.table_samples, solver_samples=args.solver_samples,
                           force_table=args.force_table,
                           overwrite=args.overwrite, fd_samples=args.fd_samples, inception=args.inception,
                           schedulers=args.scheduler or (), batch_size=args.batch_size, seed=args.seed,
                           device=args.device)
    result = run_bench(model, train, heldout, args.steps, out, options)
    print((out / "bench.md").read_text())
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'} and plots in {result['seconds_total']:.0f} s")
