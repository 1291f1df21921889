"""``analytic-sampler nll``: the K-step bound (bits/dim) of one configuration on some images."""

from __future__ import annotations

from ...pretrained import DEFAULT_MODEL, load_pretrained
from .arguments import DATA_FORMS, FORCE_TABLE_HELP, add_run_options, num_steps, positive_int
from .inputs import check_data, load_data, model_table


def add_parser(subcommands) -> None:
    """The ``nll`` subcommand's arguments."""
    p = subcommands.add_parser("nll", help="the K-step NLL bound (bits/dim) of one configuration on some images")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--data", default="digits:heldout", help=f"evaluation images; {DATA_FORMS}")
    p.add_argument("--table", default=None, help="table folder or Hub repo id (default: the model's own)")
    p.add_argument("--force-table", action="store_true", help=FORCE_TABLE_HELP)
    p.add_argument("--steps", type=num_steps, default=10)
    p.add_argument("--trajectory", default="even", choices=["even", "quadratic", "optimal"])
    p.add_argument("--timesteps", default=None,
                   help="explicit descending timesteps, e.g. 999,500,0 (overrides --steps)")
    p.add_argument("--variance", default="analytic", choices=["analytic", "residual", "beta", "btilde", "learned"])
    p.add_argument("--num-images", type=positive_int, default=None)
    p.add_argument("--batch-size", type=positive_int, default=256)
    add_run_options(p)
    p.set_defaults(func=run, parser=p)


def run(args) -> None:
    from ...evaluation.likelihood import NLLOptions, nll_bpd
    from ...trajectory import (
        TrajectoryDP,
        even_trajectory,
        quadratic_trajectory,
        validate_timesteps,
    )

    model = load_pretrained(args.model)
    data = load_data(args.data, model.unet.config.in_channels)
    check_data(data, model.unet, args.data)
    data = data[: args.num_images]
    needs_table = args.variance in ("analytic", "residual") or args.trajectory == "optimal"
    table = model_table(args, model) if needs_table else None
    n = model.scheduler.config.num_train_timesteps
    if args.timesteps:
        try:
            timesteps = validate_timesteps([int(t) for t in args.timesteps.split(",")], n)
        except ValueError as err:
            raise ValueError(f"--timesteps {args.timesteps!r}: {err}") from err
    elif args.trajectory == "optimal":
        timesteps = TrajectoryDP(table.alphas_cumprod, None, args.steps,
                                 x0_mse=table.require_x0_mse("the optimal trajectory")).path(args.steps)
    else:
        timesteps = (even_trajectory if args.trajectory == "even" else quadratic_trajectory)(n, args.steps)
    if args.variance == "residual":
        table.require_x0_mse()
    r = nll_bpd(model.unet, data, model.scheduler, timesteps, args.variance,
                ms_eps=None if table is None else table.ms_eps, x0_mse=None if table is None else table.x0_mse,
                batch_size=args.batch_size, seed=args.seed,
                options=NLLOptions(device=args.device, ms_x0=None if table is None else table.ms_x0))
    print(f"{r.mean:.4f} ± {r.stderr:.4f} bits/dim ({args.variance} variance, K={len(timesteps)}, "
          f"{r.num_samples} images, seed {args.seed}; prior {r.prior:.4f} + transitions {r.transitions:.4f} + "
          f"decoder {r.decoder:.4f})\ntimesteps: {timesteps}\nthis trajectory ends at t_1 = {timesteps[-1]}: bits/dim "
          f"compare only with trajectories that end at the same t_1"
          + ("" if timesteps[-1] == 0 else " (the decoder here reads x_{t_1} at a higher noise level than at t_1 = 0; "
             "on quantised data that can score below the full chain)") + ".")
