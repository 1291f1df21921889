"""Where DPM-Solver-v3's FD-digits gap at K = 10 comes from: the end of its trajectory. Both bundled models, K = 10,
2000 samples, sampling seeds 0 and 1; every cell starts from the same noise.

    python benchmarks/solver_v3_tail.py                               # both models, then the results
    python benchmarks/solver_v3_tail.py --models digits-ddpm-linear   # one model's cells (run models in parallel)

The bundled models ship the statistics and their fitted timesteps; this file only samples. Cells: the peers (UniPC
and DPM-Solver++(2M) on every spacing of ``solver_v3.py``), v3 on its fitted timesteps (its default) and on Diffusers'
spacings, and two changes to where the trajectory ends:

- ``stop at T``: the logsnr spacing ending at T, whose last model call's data prediction is the sample (it stops
  early and denoises in one call);
- ``jump from T``: the logsnr spacing of K - 1 calls ending at T, then one long step to t = 1 and the data
  prediction there;
- ``samples, sigma_min S``: the table's sample-quality trajectory (Align Your Steps' bound, truncated at the noise
  level S), a per-model rule chosen without FD-digits.

Reference error and FD-digits as in ``solver_v3.py`` (paired standard errors against the best peer cell by each
measure), against a 200-step DPM-Solver++(3M) reference whose own error (against 100 steps, first 100 samples) the
file reports. Writes ``solver_v3_tail.json`` and ``solver_v3_tail.md``.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP: no spinning on a shared machine

import torch  # noqa: E402
from solver_v3 import (  # noqa: E402
    PEERS,
    SPACINGS,
    V3,
    cached,
    cell_arguments,
    half_step_error,
    reference_cells,
    reference_solution,
    run_models,
    scored_cell,
    summaries,
    timed,
)

from analytic_sampler import DPMSolverV3Scheduler  # noqa: E402
from analytic_sampler.commands.bench import REFERENCE_IMAGES  # noqa: E402
from analytic_sampler.digits import DigitFeatures, load_digits_split  # noqa: E402
from analytic_sampler.evaluation.baselines import build_sampler  # noqa: E402
from analytic_sampler.evaluation.frechet import FrechetReference  # noqa: E402
from analytic_sampler.evaluation.provenance import environment, footer, write_results  # noqa: E402
from analytic_sampler.evaluation.sampling import sample  # noqa: E402
from analytic_sampler.pretrained import BUNDLED_MODELS, load_pretrained  # noqa: E402
from analytic_sampler.sample_trajectory import sample_quality_trajectory  # noqa: E402

K = 10
REFERENCE_STEPS = 200
STOPS = (20, 70, 100)  # 20 = the logsnr spacing's own t_last at K = 10 (N / 5K)
JUMPS = (30, 50, 100)
SIGMA_MINS = (0.3, 0.1)  # the sample-quality trajectory's default, and a finer one


def v3_trajectories(model) -> dict[str, list[int]]:
    """v3's cells: label -> its K timesteps (the scheduler's own spacings, or a trajectory it is given)."""

    def spaced(k: int, **options) -> list[int]:
        scheduler = DPMSolverV3Scheduler.from_table(model.solver_statistics, model.scheduler.config, **options)
        scheduler.set_timesteps(k)
        return scheduler.timesteps.tolist()

    out = {"fitted": spaced(K)}
    out.update({spacing: spaced(K, timestep_spacing=spacing) for spacing in ("linspace", "leading", "trailing")})
    out.update({f"stop at {t}": spaced(K, timestep_spacing="logsnr", logsnr_t_last=t) for t in STOPS})
    out.update({f"jump from {t}": spaced(K - 1, timestep_spacing="logsnr", logsnr_t_last=t) + [1] for t in JUMPS})
    out.update({f"samples, sigma_min {s}": sample_quality_trajectory(model.table, K, s) for s in SIGMA_MINS})
    return out


def run_model(name: str, n: int, seeds: list[int], cache: Path, features, steps: int) -> dict:
    model = load_pretrained(name)
    stats, config = model.solver_statistics, model.scheduler.config
    result = {"model": name, "cells": []}
    runs = []
    for method in PEERS:
        for spacing in SPACINGS:
            s = build_sampler(method, config, model.table, spacing)
            runs.append((method, spacing, s.scheduler, s.timesteps, s.step_kwargs))
    runs += [(V3, label, DPMSolverV3Scheduler.from_table(stats, config), timesteps, {})
             for label, timesteps in v3_trajectories(model).items()]
    for seed in seeds:
        reference, _ = cached(cache / f"{name}-reference{steps}-n{n}-s{seed}.pt", reference_solution, model, n, seed,
                              steps)
        if seed == seeds[0]:
            result["reference_vs_half_steps"] = half_step_error(model, reference, seed, steps)
        result["cells"] += reference_cells(reference, steps, seed, 0.0, features, (K,))
        for method, spacing, scheduler, timesteps, kwargs in runs:
            images, seconds = timed(sample, model.unet, scheduler, n, None if timesteps else K, timesteps, seed=seed,
                                    batch_size=1000, progress=False, **kwargs)
            result["cells"].append(scored_cell(name, method, spacing, K, seed, seconds, scheduler.timesteps.tolist(),
                                               images, reference, features))
    return result


def markdown(result: dict) -> str:
    lines = [f"# DPM-Solver-v3 at K = {K}: the end of the trajectory and FD-digits ({result['num_samples']} samples "
             "per cell)", "",
             f"Reference error: mean per-sample RMS distance to a {result['reference_steps']}-step DPM-Solver++(3M) "
             "solution from the same x_T (x0 clipped as every compared sampler clips it), as a ratio to the best peer "
             "cell by that measure. FD-digits − the best peer cell by FD-digits, ± paired bootstrap SE. Peers: UniPC "
             "and DPM-Solver++(2M) on linspace, leading, trailing and Karras spacings. v3 cells: its fitted "
             "timesteps (its default), Diffusers' spacings, `stop at T` (the logsnr spacing ending at T: its last "
             "call's data prediction is the sample), `jump from T` (K - 1 logsnr calls to T, then one long step to "
             "t = 1 and the data prediction there) and `samples, sigma_min S` (the table's sample-quality "
             "trajectory, truncated at noise level S). The bundled statistics, fitted timesteps and tables.", "",
             "| model | cell | timesteps | ref error / best peer (seeds) | FD-digits − best peer ± paired SE "
             "(seeds) |", "|---|---|---|---:|---:|"]
    for m in result["models"]:
        for method, spacing in dict.fromkeys((r["method"], r["spacing"]) for r in m["rows"]):
            rows = [r for r in m["rows"] if (r["method"], r["spacing"]) == (method, spacing)]
            if method in PEERS and not any(r["best_peer_fd"] == f"{method} {spacing}" or r["best_peer_ref"]
                                           == f"{method} {spacing}" for r in m["rows"]):
                continue  # peers that are best by neither measure on any seed: in the JSON only
            label = spacing if method == V3 else f"{method} {spacing}"
            lines.append(f"| {m['model']} | {label} | {rows[0]['timesteps'] if rows[0]['timesteps'] else ''} | "
                         + ", ".join(f"{r['ref_ratio_to_best_peer']:.2f}x" for r in rows) + " | "
                         + ", ".join(f"{r['fd_diff_to_best_peer']:+.2f} ± {r['fd_diff_se']:.2f}" for r in rows)
                         + " |")
    lines.append("")
    for m in result["models"]:
        best = {r["seed"]: (r["best_peer_ref"], r["best_peer_fd"]) for r in m["rows"]}
        lines.append(f"{m['model']}: reference against its {result['reference_steps'] // 2}-step solve "
                     f"{m['reference_vs_half_steps']:.4f} RMS; best peer (by ref error; by FD): "
                     + "; ".join(f"seed {s}: {a}; {b}" for s, (a, b) in sorted(best.items())) + ".")
    lines += ["", "Every cell, with absolute figures, is in `solver_v3_tail.json`.", "", footer(result)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict | None:
    args = cell_arguments(__doc__.splitlines()[0], "outputs/solver_v3_tail_cache",
                          "smoke run: 16 samples, seed 0, a 20-step reference").parse_args(argv)
    if args.quick:
        args.num_samples, args.seeds = 16, [0]
    steps = 20 if args.quick else REFERENCE_STEPS
    torch.set_num_threads(1)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    features = DigitFeatures()
    env = {**environment("cpu"), "load_average_start": [round(x, 2) for x in os.getloadavg()]}

    def path_of(name: str) -> Path:
        return cache / f"{name}-n{args.num_samples}-s{'_'.join(map(str, args.seeds))}-r{steps}.json"

    run_models(args.models or BUNDLED_MODELS, path_of,
               lambda name: run_model(name, args.num_samples, args.seeds, cache, features, steps))
    if args.models:
        return None
    train = load_digits_split("train")[0]
    reference = FrechetReference.of(features(train[:REFERENCE_IMAGES]).numpy())
    result = {"quick": args.quick, "num_samples": args.num_samples, "seeds": args.seeds, "K": K,
              "reference_steps": steps, **env, "models": summaries(path_of, reference)}
    write_results(args.out, "solver_v3_tail", result, markdown(result))
    return result


if __name__ == "__main__":
    main()
