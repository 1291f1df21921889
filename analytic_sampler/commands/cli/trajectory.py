"""``analytic-sampler trajectory``: a table's optimal K-step trajectories and the bits/dim they predict, or its
sample-quality trajectory."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from ...pretrained import DEFAULT_MODEL
from ...table import REESTIMATE_HINT
from .arguments import num_steps
from .inputs import make_folder, model_table
from .precompute import FITTED_SOLVER_KEYS


def add_parser(subcommands) -> None:
    """The ``trajectory`` subcommand's arguments."""
    p = subcommands.add_parser(
        "trajectory", help="optimal K-step trajectories of a table and the bound (bits/dim) it predicts against even"
    )
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--table", default=None)
    p.add_argument("--steps", type=num_steps, nargs="+", default=[10, 25])
    p.add_argument("--for", dest="goal", choices=("likelihood", "samples", *FITTED_SOLVER_KEYS), default="likelihood",
                   help="likelihood: the DP on the bits/dim bound (default); samples: the sample-quality trajectory "
                        "from the table's sample cost (precompute --paths); "
                        f"{', '.join(FITTED_SOLVER_KEYS)}: the timesteps fitted to the model for that solver "
                        "(precompute --fit-paths)")
    p.add_argument("--sigma-min", type=float, default=None,
                   help="samples: the noise level (data units) down to which the bound counts (default: the "
                        "library's, analytic_sampler.sample_trajectory.DEFAULT_SIGMA_MIN; 0: all the way down)")
    p.add_argument("--json", default=None, help="also write the trajectories and predictions to this JSON file")
    p.set_defaults(func=run, parser=p)


def run(args) -> None:
    import numpy as np

    from ...evaluation.likelihood import predicted_transitions_bpd
    from ...trajectory import TrajectoryDP, even_trajectory

    if args.json:
        make_folder(Path(args.json).parent)
    table = model_table(args)
    if args.goal == "samples":
        return _sample_trajectories(args, table)
    if args.goal in FITTED_SOLVER_KEYS:
        return _fitted_trajectories(args, table)
    abar, n, k_max = table.alphas_cumprod, table.num_train_timesteps, max(args.steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the paper's DP is shown on purpose, beside the residual one
        paper = TrajectoryDP(abar, table.ms_eps, k_max, data_range=table.data_range, ms_x0=table.ms_x0)
        paths = {"even": lambda k: even_trajectory(n, k), "paper DP": paper.path}
    samples = int(np.median(table.counts[table.estimated])) if table.estimated.any() else 0
    print(f"table: {int(table.estimated.sum())} of {n} timesteps estimated, {samples} samples per timestep")
    if not table.has_x0_mse:
        print(f"this table has no x0_mse, so no bound can be predicted and the residual DP is unavailable; "
              f"{REESTIMATE_HINT}.")
        for k in args.steps:
            print(f"K={k} paper DP: {paths['paper DP'](k)}")
        return
    paths["residual DP"] = TrajectoryDP(abar, None, k_max, x0_mse=table.x0_mse).path

    def predict(path, variance):
        return predicted_transitions_bpd(abar, path, table.x0_mse, table.x0_mse_stderr, variance, table.ms_eps,
                                         table.data_range, table.ms_x0)

    print("predicted bits/dim of the K-1 transitions (prior and decoder terms, the same for every trajectory here, "
          "left out), residual variance | analytic variance, ± the table's standard error. Every trajectory here ends "
          "at t_1 = 0; bits/dim compare only between trajectories that end at the same t_1:")
    print(f"{'K':>5}  " + "  ".join(f"{name:>29}" for name in paths))
    report, untrusted = {}, []
    for k in args.steps:
        rows = {name: path(k) for name, path in paths.items()}
        cells = {name: (predict(p, "residual"), predict(p, "analytic")) for name, p in rows.items()}
        print(f"{k:>5}  " + "  ".join(
            f"{res[0]:7.3f}±{res[1]:.3f} | {ana[0]:7.3f}±{ana[1]:.3f}" for res, ana in cells.values()))
        gain = cells["even"][0][0] - cells["residual DP"][0][0]
        spread = np.hypot(cells["even"][0][1], cells["residual DP"][0][1])
        if not gain > 3 * spread:  # NaN standard errors count as untrusted too
            untrusted.append(k)
        report[k] = {name: {"timesteps": p, "residual_bpd": cells[name][0][0], "analytic_bpd": cells[name][1][0],
                            "stderr": cells[name][0][1]} for name, p in rows.items()}
    for k in args.steps:
        print(f"K={k} residual DP: {report[k]['residual DP']['timesteps']}")
    if untrusted:
        print(f"warning: at K={', '.join(map(str, untrusted))} the residual DP's predicted gain over the even "
              f"trajectory is under 3 standard errors of this table ({samples} samples per timestep); the DP may "
              "be fitting noise there: estimate a larger table (precompute --num-samples) before relying on it.")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")


def _sample_trajectories(args, table) -> None:
    """``trajectory --for samples``: the sample-quality trajectory for each K and its bound."""
    from ...sample_trajectory import DEFAULT_SIGMA_MIN, SampleCost, SampleTrajectoryDP

    cost = SampleCost.from_table(table)
    sigma_min = DEFAULT_SIGMA_MIN if args.sigma_min is None else (args.sigma_min or None)
    dp = SampleTrajectoryDP(table.alphas_cumprod, cost, max(args.steps), sigma_min=sigma_min)
    print(f"sample-quality trajectory: Align Your Steps' bound (nats per dimension) on the KL from holding x0_hat "
          f"fixed over each interval, counted down to noise level sigma_min={sigma_min}; estimated from "
          f"{cost.num_paths} "
          f"forward paths on {cost.timesteps.size} candidate timesteps. Pass the timesteps to any scheduler that takes "
          "them (scheduler.set_timesteps(timesteps=...), analytic_sampler.apply_timesteps). These trajectories end at "
          "t_1 > 0 (the sampler returns x0_hat there): their bits/dim do not compare with trajectories that end at "
          "t_1 = 0 (trajectory --for likelihood).")
    report = {}
    for k in args.steps:
        path = dp.path(k)
        report[k] = {"timesteps": path, "bound_nats_per_dim": dp.cost(k), "t_1": path[-1]}
        print(f"K={k}: bound {dp.cost(k):.4f}, t_1 = {path[-1]}: {path}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")


def _fitted_trajectories(args, table) -> None:
    """``trajectory --for SOLVER``: the timesteps fitted for the solver at each K, with how to run them."""
    from ...fitted_timesteps import FittedTimesteps
    from ...solver_specs import solver_by_key

    fitted, solver = FittedTimesteps.from_table(table), solver_by_key(args.goal)
    class_name, options = solver.diffusers
    settings = ", ".join(f"{k}={v!r}" for k, v in options.items())
    recorded = table.provenance.get("fitted_timesteps") or {}
    key = recorded.get("run_key") or {}
    print(f"timesteps fitted for {solver.name} from {key.get('num_paths', '?')} teacher paths (the model's ODE solved "
          f"on {key.get('reference_steps', '?')} points from noise; {recorded.get('model_calls', '?')} model calls). "
          f"Run them with {class_name}.from_config(config, {settings}) and "
          "analytic_sampler.apply_timesteps(scheduler, timesteps) (clip x0 as the model's config does: thresholding "
          "with sample_max_value=1 for clip_sample); the error is the RMS distance to the ODE solution on the fit's "
          "own paths.")
    report = {}
    for k in args.steps:
        path = fitted.timesteps_for(args.goal, k)
        report[k] = {"timesteps": path, "fit_error": fitted.error_for(args.goal, k)}
        print(f"K={k}: error {report[k]['fit_error']:.4f}: {path}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
