"""DPM-Solver-v3 (DPMSolverV3Scheduler) against UniPC and DPM-Solver++(2M) on their best fixed spacing, both bundled
models, K = 3, 5, 7, 10, 25: reference error and FD-digits from the same initial noise, paired standard errors; the
cost of the statistics and of the fitted timesteps (model calls, seconds), and the solver's per-step overhead against
UniPC. 2000 samples per cell, sampling seeds 0 and 1 by default.

    python benchmarks/solver_v3.py --models digits-ddpm-linear     # one model's cells (run models in parallel)
    python benchmarks/solver_v3.py                                  # every model not cached yet, then the results

The cache folder keeps the statistics, the fit (redone when its options change), the reference solutions and the
peers' samples, so a rerun after a change to the solver samples only its own cells.

Reference error of a cell: per sample, the RMS over pixels of its output minus the reference solution's from the same
x_T (DPM-Solver++(3M), 500 steps, both clipped to [-1, 1]); the cell's figure is the mean over samples, its standard
error that of the per-sample values, and the paired standard error of a difference that of the per-sample
differences. FD-digits: the shipped classifier's features against the training images', with paired bootstrap
standard errors (:func:`~analytic_sampler.evaluation.frechet.bootstrap_distances`). Writes ``solver_v3.json`` and
``solver_v3.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP: no spinning on a shared machine

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler  # noqa: E402

from analytic_sampler import DPMSolverV3Scheduler, EstimateOptions, SolverStatistics  # noqa: E402
from analytic_sampler.commands.bench import REFERENCE_IMAGES  # noqa: E402
from analytic_sampler.digits import DigitFeatures, load_digits_split  # noqa: E402
from analytic_sampler.estimation.solver_statistics import StatisticsOptions, estimate_solver_statistics  # noqa: E402
from analytic_sampler.estimation.solver_timesteps import V3FitOptions, precompute_solver_timesteps  # noqa: E402
from analytic_sampler.evaluation.baselines import _clip_as_thresholding, build_sampler  # noqa: E402
from analytic_sampler.evaluation.frechet import FrechetReference, bootstrap_distances  # noqa: E402
from analytic_sampler.evaluation.provenance import environment, footer, write_results  # noqa: E402
from analytic_sampler.evaluation.sampling import sample  # noqa: E402
from analytic_sampler.pretrained import BUNDLED_MODELS, load_pretrained  # noqa: E402

STEPS = (3, 5, 7, 10, 25)
FIT_STEPS = (3, 5, 7, 10)  # K = 25 takes the logsnr spacing (the fit stops at 15)
PEERS = ("UniPC", "DPM-Solver++(2M)")
ODE = "ODE (reference solution)"
SPACINGS = ("linspace", "leading", "trailing", "karras")
#: DPM-Solver-v3's cells: its fitted timesteps (logsnr where none are fitted), its logsnr spacing, Diffusers' spacings
V3 = "DPM-Solver-v3"
V3_SPACINGS = ("fitted", "logsnr", "linspace", "leading", "trailing")
#: the second-table check: statistics re-estimated from other draws (no fit: logsnr and Diffusers' spacings) at these K
SECOND = f"{V3} (second table)"
SECOND_STEPS = (5, 10)
REFERENCE_STEPS = 500
STATISTICS = StatisticsOptions(grid_points=60, num_samples=1024, batch_size=1000)
FIT = V3FitOptions(steps=FIT_STEPS, paths=128, teacher_steps=100, t_lasts=(10, 20, 40, 70, 120, 200),
                   powers=(1.5, 2.0, 2.5, 3.0), starts=3, moves=(64, 32, 16, 8, 4), rounds=4, batch_size=1000)
QUICK_STATISTICS = StatisticsOptions(grid_points=8, num_samples=16, groups=4, batch_size=1000)
SECOND_SEED = 1  # StatisticsOptions.seed of the second table
QUICK_FIT = V3FitOptions(steps=FIT_STEPS, paths=4, teacher_steps=20, t_lasts=(20,), powers=(2.0,), moves=(8,), rounds=1)


def timed(function, *args, **kwargs):
    start = time.time()
    out = function(*args, **kwargs)
    return out, time.time() - start


def statistics_with_fit(model, train: torch.Tensor, cache: Path, quick: bool) -> tuple[SolverStatistics, dict]:
    """The model's statistics with timesteps fitted for FIT_STEPS (cached), and what they cost."""
    options, fit = (QUICK_STATISTICS, QUICK_FIT) if quick else (STATISTICS, FIT)
    folder, cost_file = cache / f"{model.name}-statistics", cache / f"{model.name}-statistics-cost.json"
    if cost_file.is_file():
        cost = json.loads(cost_file.read_text())
    else:
        stats, seconds = timed(estimate_solver_statistics, model.unet, train, model.scheduler, options,
                               EstimateOptions(progress=False, model_id=model.name))
        cost = {"grid_points": int(stats.timesteps.size), "draws_per_point": options.num_samples,
                "model_calls": stats.provenance["model_calls"], "seconds": seconds, "threads": torch.get_num_threads()}
        stats.save(folder)
    (stats, status), fit_seconds = timed(precompute_solver_timesteps, model.unet, model.scheduler, fit, out=folder,
                                         progress=False)  # redone only when the fit's options change
    if status == "fitted":
        record = stats.provenance["timestep_fit"]
        cost.update(fit_model_calls=record["model_calls"], fit_seconds=fit_seconds,
                    fitted_timesteps=stats.fitted_timesteps, fit_options=record["options"])
        cost_file.write_text(json.dumps(cost))
    return stats, cost


def second_statistics(model, train: torch.Tensor, cache: Path, quick: bool) -> SolverStatistics:
    """The second table: the statistics of ``statistics_with_fit`` from other draws (cached), not fitted."""
    options = replace(QUICK_STATISTICS if quick else STATISTICS, seed=SECOND_SEED)
    folder = cache / f"{model.name}-statistics-seed{SECOND_SEED}"
    stats = SolverStatistics.find(folder) if folder.is_dir() else None
    if stats is None:
        stats = estimate_solver_statistics(model.unet, train, model.scheduler, options,
                                           EstimateOptions(progress=False, model_id=model.name))
        stats.save(folder)
    return stats


def cells(model, stats: SolverStatistics, second: SolverStatistics) -> list[dict]:
    """(method, spacing, K, scheduler, timesteps) of every compared cell."""
    config = model.scheduler.config
    out = []
    for k in STEPS:
        for method, table, spacings in ((V3, stats, V3_SPACINGS), (SECOND, second, V3_SPACINGS[1:])):
            if method == SECOND and k not in SECOND_STEPS:
                continue
            for spacing in spacings:
                scheduler = DPMSolverV3Scheduler.from_table(table, config, timestep_spacing=spacing)
                out.append({"method": method, "spacing": spacing, "K": k, "scheduler": scheduler,
                            "timesteps": None, "step_kwargs": {}})
        for method in PEERS:
            for spacing in SPACINGS:
                s = build_sampler(method, config, model.table, spacing)
                out.append({"method": method, "spacing": spacing, "K": k, "scheduler": s.scheduler,
                            "timesteps": s.timesteps, "step_kwargs": s.step_kwargs})
    return out


def reference_solution(model, n: int, seed: int, steps: int) -> torch.Tensor:
    """DPM-Solver++(3M) on ``steps`` linspace timesteps, x0 clipped as the config (and every compared sampler) clips
    it: unclipped, Diffusers' DPM-Solver++ on the cosine model does not converge (500 against 200 steps: 0.58 RMS)."""
    config = model.scheduler.config
    scheduler = DPMSolverMultistepScheduler.from_config(config, solver_order=3, variance_type=None,
                                                        algorithm_type="dpmsolver++", timestep_spacing="linspace",
                                                        **_clip_as_thresholding(config))
    return sample(model.unet, scheduler, n, steps, seed=seed, batch_size=1000, progress=False)


def rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample RMS over pixels of ``a - b``."""
    return (a - b).flatten(1).pow(2).mean(1).sqrt()


def step_overhead(model, stats: SolverStatistics, k: int = 10, batch: int = 500, repeats: int = 5) -> dict:
    """Milliseconds per ``step`` (the scheduler alone, a fixed model output) of DPM-Solver-v3 and UniPC, batch 500."""
    config = model.scheduler.config
    schedulers = {"DPM-Solver-v3": DPMSolverV3Scheduler.from_table(stats, config, timestep_spacing="logsnr"),
                  "UniPC": UniPCMultistepScheduler.from_config(config, timestep_spacing="trailing")}
    x0 = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = {}
    for name, scheduler in schedulers.items():
        best = float("inf")
        for _ in range(repeats):
            scheduler.set_timesteps(k)
            x, start = x0, time.perf_counter()
            for t in scheduler.timesteps:
                x = scheduler.step(0.1 * x0, t, x).prev_sample
            best = min(best, (time.perf_counter() - start) / k)
        out[name] = 1000 * best
    return out


def run_model(name: str, n: int, seeds: list[int], cache: Path, features, train: torch.Tensor, quick: bool) -> dict:
    model = load_pretrained(name)
    stats, cost = statistics_with_fit(model, train, cache, quick)
    second = second_statistics(model, train, cache, quick)
    result = {"model": name, "statistics_cost": cost, "step_ms": step_overhead(model, stats), "cells": []}
    steps = 20 if quick else REFERENCE_STEPS
    for seed in seeds:
        reference, ref_seconds = cached(cache / f"{name}-reference{steps}-n{n}-s{seed}.pt",
                                        reference_solution, model, n, seed, steps)
        result.setdefault("reference_seconds", {})[seed] = ref_seconds
        if seed == seeds[0]:
            result["reference_vs_half_steps"] = half_step_error(model, reference, seed, steps)
        result["cells"] += reference_cells(reference, steps, seed, ref_seconds, features, STEPS)
        for c in cells(model, stats, second):
            run = (sample, model.unet, c["scheduler"], n, None if c["timesteps"] else c["K"], c["timesteps"])
            kwargs = {"seed": seed, "batch_size": 1000, "progress": False, **c["step_kwargs"]}
            if c["method"] in PEERS:  # the peers' samples do not depend on the statistics: kept across runs
                images, seconds = cached(cache / f"{name}-{c['method']}-{c['spacing']}-K{c['K']}-n{n}-s{seed}.pt",
                                         *run, **kwargs)
            else:
                images, seconds = timed(*run, **kwargs)
            result["cells"].append(scored_cell(name, c["method"], c["spacing"], c["K"], seed, seconds,
                                               c["scheduler"].timesteps.tolist(), images, reference, features))
    return result


def half_step_error(model, reference: torch.Tensor, seed: int, steps: int) -> float:
    """The reference's own error: mean RMS against its solve with half the steps, first 100 samples."""
    half = reference_solution(model, min(len(reference), 100), seed, steps // 2)
    return float(rms(half, reference[: len(half)]).mean())


def scored_cell(name: str, method: str, spacing: str, k: int, seed: int, seconds: float, timesteps: list[int],
                images: torch.Tensor, reference: torch.Tensor, features) -> dict:
    """One cell's record for :func:`summarise`: per-sample reference errors and classifier features."""
    error = rms(images, reference)
    print(f"{name} seed {seed} K={k} {method} {spacing}: ref {float(error.mean()):.4f} ({seconds:.1f} s)", flush=True)
    return {"method": method, "spacing": spacing, "K": k, "seed": seed, "seconds": seconds, "timesteps": timesteps,
            "ref_error": error.numpy().tolist(), "features": features(images).numpy().astype(np.float32).tolist()}


def reference_cells(reference: torch.Tensor, steps: int, seed: int, seconds: float, features, ks) -> list[dict]:
    """The reference solution as a row of every K in ``ks``: its FD-digits is the ODE's own, which a sampler
    approaches as its reference error goes to 0."""
    feats = features(reference).numpy().astype(np.float32).tolist()
    return [{"method": ODE, "spacing": f"{steps} steps", "K": k, "seed": seed, "seconds": seconds, "timesteps": [],
             "ref_error": [0.0] * len(reference), "features": feats} for k in ks]


def cached(path: Path, function, *args, **kwargs) -> tuple[torch.Tensor, float]:
    """``timed(function, ...)``'s images and seconds, saved at ``path`` and read back on a later run."""
    if path.is_file():
        saved = torch.load(path)
        return saved["images"], saved["seconds"]
    images, seconds = timed(function, *args, **kwargs)
    torch.save({"images": images, "seconds": seconds}, path)
    return images, seconds


def summarise(model_result: dict, reference: FrechetReference) -> list[dict]:
    """Per (K, seed): each cell's ref error and FD with SEs, and v3 against the best peer cell (by each metric)."""
    rows = []
    groups = {(c["K"], c["seed"]) for c in model_result["cells"]}
    for k, seed in sorted(groups):
        group = [c for c in model_result["cells"] if (c["K"], c["seed"]) == (k, seed)]
        feats = [np.asarray(c["features"]) for c in group]
        boot = bootstrap_distances(feats, reference, seed)
        errors = [np.asarray(c["ref_error"]) for c in group]
        fds = [reference.distance(f) for f in feats]
        peers = [i for i, c in enumerate(group) if c["method"] in PEERS]
        best_ref = min(peers, key=lambda i: errors[i].mean())
        best_fd = min(peers, key=lambda i: fds[i])
        for i, c in enumerate(group):
            n = errors[i].size
            rows.append({
                "model": model_result["model"], "K": k, "seed": seed, "method": c["method"], "spacing": c["spacing"],
                "timesteps": c["timesteps"], "ref_error": float(errors[i].mean()),
                "ref_error_se": float(errors[i].std(ddof=1) / np.sqrt(n)),
                "ref_ratio_to_best_peer": float(errors[i].mean() / errors[best_ref].mean()),
                "ref_diff_to_best_peer_se": float((errors[i] - errors[best_ref]).std(ddof=1) / np.sqrt(n)),
                "fd": fds[i], "fd_se": float(np.std(boot[:, i], ddof=1)),
                "fd_diff_to_best_peer": fds[i] - fds[best_fd],
                "fd_diff_se": float(np.std(boot[:, i] - boot[:, best_fd], ddof=1)),
                "best_peer_ref": f"{group[best_ref]['method']} {group[best_ref]['spacing']}",
                "best_peer_fd": f"{group[best_fd]['method']} {group[best_fd]['spacing']}",
                "seconds": c["seconds"],
            })
    return rows


def markdown(result: dict) -> str:
    lines = [f"# DPM-Solver-v3 against the best peer ({result['num_samples']} samples per cell)", "",
             f"Reference error: mean per-sample RMS distance to a {result['reference_steps']}-step DPM-Solver++(3M) "
             "solution from the same x_T (x0 clipped to [-1, 1] as every compared sampler clips it; outputs clipped); "
             "ratio and paired SE against the best UniPC / DPM-Solver++(2M) cell on a fixed spacing (linspace, "
             "leading, trailing, Karras) by that metric. FD-digits against the training images' features; "
             "difference to the best peer cell by FD, paired bootstrap SE. Every cell of one "
             "(model, K, seed) starts from the same noise.", ""]
    lines += ["## Summary: DPM-Solver-v3 against the best peer cell", "",
              "Fitted: v3 on its fitted timesteps (its default). Best v3 cell: the v3 cell with the lowest FD-digits "
              "of its spacings (fitted, logsnr, linspace, leading, trailing) per (K, seed), chosen as the best peer "
              "cell is chosen among the peers'.", "",
              "| model | K | fitted: ref error / best peer (seeds) | fitted: FD-digits − best peer ± paired SE "
              "(seeds) | best v3 cell by FD: FD-digits − best peer (seeds) | the ODE's own FD-digits − best peer |",
              "|---|---:|---:|---:|---:|---:|"]

    def diffs(rows, spacing=False):
        return ", ".join((f"{r['spacing']} " if spacing else "")
                         + f"{r['fd_diff_to_best_peer']:+.2f} ± {r['fd_diff_se']:.2f}" for r in rows)

    for m in result["models"]:
        for k in dict.fromkeys(r["K"] for r in m["rows"]):
            mine = [r for r in m["rows"] if (r["K"], r["method"], r["spacing"]) == (k, V3, "fitted")]
            ode = [r for r in m["rows"] if (r["K"], r["method"]) == (k, ODE)]
            best = [min((r for r in m["rows"] if (r["K"], r["seed"], r["method"]) == (k, seed, V3)),
                        key=lambda r: r["fd"]) for seed in dict.fromkeys(r["seed"] for r in mine)]
            lines.append(f"| {m['model']} | {k} | " + ", ".join(f"{r['ref_ratio_to_best_peer']:.2f}x" for r in mine)
                         + f" | {diffs(mine)} | {diffs(best, spacing=True)} | {diffs(ode)} |")
    lines += ["", f"## Second-table check: v3's FD-digits − best peer on statistics re-estimated from other draws "
              f"(seed {SECOND_SEED}, same options; not fitted)", "",
              "| model | K | spacing | first table (seeds) | second table (seeds) |", "|---|---:|---|---:|---:|"]
    for m in result["models"]:
        for k in SECOND_STEPS:
            for spacing in V3_SPACINGS[1:]:
                first, again = ([r for r in m["rows"] if (r["K"], r["method"], r["spacing"]) == (k, method, spacing)]
                                for method in (V3, SECOND))
                if again:
                    lines.append(f"| {m['model']} | {k} | {spacing} | {diffs(first)} | {diffs(again)} |")
    lines += ["", "K = 25 is not fitted: its \"fitted\" row is the logsnr spacing.", ""]
    for m in result["models"]:
        c = m["statistics_cost"]
        lines += [f"## {m['model']}", "",
                  f"Statistics: {c['grid_points']} grid points x {c['draws_per_point']} draws x 3 = "
                  f"{c['model_calls']} model calls, {c['seconds']:.0f} s; fitted timesteps (K = "
                  f"{', '.join(c['fitted_timesteps'])}): "
                  f"{c['fit_model_calls']} model calls, {c['fit_seconds']:.0f} s ({c['threads']} torch thread(s)). "
                  f"Fitted: {c['fitted_timesteps']}. Scheduler step alone, batch 500, K = 10: DPM-Solver-v3 "
                  f"{m['step_ms']['DPM-Solver-v3']:.2f} ms, UniPC {m['step_ms']['UniPC']:.2f} ms. Reference against "
                  f"its half-step solve: {m['reference_vs_half_steps']:.4f} RMS.", "",
                  "| K | seed | method | spacing | ref error ± SE | / best peer (paired SE of diff) | FD ± SE | "
                  "FD − best peer ± paired SE |", "|---:|---:|---|---|---:|---:|---:|---:|"]
        for r in m["rows"]:
            lines.append(f"| {r['K']} | {r['seed']} | {r['method']} | {r['spacing']} | {r['ref_error']:.4f} ± "
                         f"{r['ref_error_se']:.4f} | {r['ref_ratio_to_best_peer']:.2f}x "
                         f"({r['ref_diff_to_best_peer_se']:.4f}) | {r['fd']:.2f} ± {r['fd_se']:.2f} | "
                         f"{r['fd_diff_to_best_peer']:+.2f} ± {r['fd_diff_se']:.2f} |")
        best = {(r["K"], r["seed"]): (r["best_peer_ref"], r["best_peer_fd"]) for r in m["rows"]}
        lines += ["", "Best peer cell (by ref error; by FD): " + "; ".join(
            f"K={k} seed {s}: {a}; {b}" for (k, s), (a, b) in sorted(best.items())), ""]
    lines.append(footer(result))
    return "\n".join(lines) + "\n"


def cell_arguments(description: str, cache: str, quick: str) -> argparse.ArgumentParser:
    """The options of a benchmark whose cells run per model (``--models`` to run some in parallel) into a cache."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--models", nargs="+", default=None, help="run these models' cells only (no results written)")
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--cache", default=cache)
    p.add_argument("--quick", action="store_true", help=quick)
    return p


def run_models(names, path_of: Callable[[str], Path], run: Callable[[str], dict]) -> None:
    """``run(name)`` for each model whose cells are not at ``path_of(name)`` yet, saved there."""
    for name in names:
        if not path_of(name).is_file():
            path_of(name).write_text(json.dumps(run(name)))


def summaries(path_of: Callable[[str], Path], reference: FrechetReference) -> list[dict]:
    """Each bundled model's saved result without its cells, with :func:`summarise`'s rows."""
    out = []
    for name in BUNDLED_MODELS:
        m = json.loads(path_of(name).read_text())
        out.append({k: v for k, v in m.items() if k != "cells"} | {"rows": summarise(m, reference)})
    return out


def main(argv: list[str] | None = None) -> dict | None:
    args = cell_arguments(__doc__.splitlines()[0], "outputs/solver_v3_cache",
                          "smoke run: tiny statistics and fit, 20-step reference").parse_args(argv)
    torch.set_num_threads(1)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    train = load_digits_split("train")[0]
    features = DigitFeatures()
    env = {**environment("cpu"), "load_average_start": [round(x, 2) for x in os.getloadavg()]}

    def path_of(name: str) -> Path:
        return cache / f"{name}-n{args.num_samples}-s{'_'.join(map(str, args.seeds))}.json"

    run_models(args.models or BUNDLED_MODELS, path_of,
               lambda name: run_model(name, args.num_samples, args.seeds, cache, features, train, args.quick))
    if args.models:
        return None
    reference = FrechetReference.of(features(train[:REFERENCE_IMAGES]).numpy())
    result = {"quick": args.quick, "num_samples": args.num_samples, "seeds": args.seeds,
              "reference_steps": 20 if args.quick else REFERENCE_STEPS,
              "statistics_options": asdict(QUICK_STATISTICS if args.quick else STATISTICS),
              "fit_options": asdict(QUICK_FIT if args.quick else FIT),
              **env, "models": summaries(path_of, reference)}
    write_results(args.out, "solver_v3", result, markdown(result))
    return result


if __name__ == "__main__":
    main()
