"""Few-step sample quality: FD-digits of DDIM, Analytic-DDIM, DPM-Solver++(2M), UniPC, DPM-Solver-v3 and
Analytic-DDPM on each spacing and on the sample-quality trajectory, at K = 5, 10, 25, on both bundled models.

    python benchmarks/samplers.py            # full run: 2000 samples per cell (resumable: cells are cached)
    python benchmarks/samplers.py --quick    # smoke run: one model, K = 5, 32 samples per cell

Every cell of one (model, K) starts from the same initial noise (seed 0), so each carries its FD-digits minus the
best cell's with a paired bootstrap standard error (the same resampled indices for both). Trajectories: "even" is
each scheduler's ``linspace`` spacing, "leading" / "trailing" Diffusers' spacings (the bundled configs say
"leading"), "karras" Karras sigmas (DPM-Solver++ and UniPC only), "samples" the sample-quality trajectory of the
table's sample cost, "own" DPM-Solver-v3's default (its timesteps fitted for K, else its logsnr spacing) on the
statistics the model ships. DDIM appears with the model's eps (DDIMScheduler's default) and with eps from the clipped x0
(Analytic-DDIM's mean). The checks rerun the Analytic-DPM and sample-trajectory cells at K = 10 with a second
table (10 samples per timestep, seed 1) and a second sample cost (seed 1, other training images), and the
scheduler's defaults against DDIMScheduler at K = 10 and 25 with a second sampling seed; and DDIM (eps from clipped
x0) and DPM-Solver++(2M) on sample-quality trajectories with sigma_min None (the untruncated bound) and 0.1 to 0.4.
Writes ``samplers.json`` and ``samplers.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP: no spinning on a shared machine

import numpy as np  # noqa: E402
import torch  # noqa: E402

from analytic_sampler import EstimateOptions, VarianceTable, estimate_moments
from analytic_sampler.commands.bench import REFERENCE_IMAGES
from analytic_sampler.digits import DigitFeatures, load_digits_split
from analytic_sampler.estimation.sample_cost import estimate_sample_cost
from analytic_sampler.evaluation.baselines import build_sampler
from analytic_sampler.evaluation.frechet import FrechetReference, bootstrap_distances, frechet_with_stderr
from analytic_sampler.evaluation.provenance import environment, footer, write_results
from analytic_sampler.evaluation.sampling import sample
from analytic_sampler.pretrained import BUNDLED_MODELS, load_pretrained
from analytic_sampler.sample_trajectory import SampleCost, SampleTrajectoryDP

KINDS = ("even", "leading", "trailing", "karras", "samples", "own")
#: method -> the trajectories it runs (its spacing, Karras sigmas where it has them, the sample-quality trajectory)
CELLS = {
    "DDIM": ("even", "leading", "trailing"),
    "DDIM (eps from clipped x0)": ("even", "leading", "trailing", "samples"),
    "Analytic-DDIM": ("even", "leading", "trailing", "samples"),
    "Analytic-DDPM": ("even", "leading", "trailing", "samples"),
    "Analytic-DDPM (cap y=2)": ("leading", "trailing"),
    "Analytic-DDIM (cap y=2)": ("leading", "trailing"),
    "DPM-Solver++(2M)": ("even", "leading", "trailing", "karras", "samples"),
    "UniPC": ("even", "leading", "trailing", "karras", "samples"),
    "DPM-Solver-v3": ("even", "leading", "trailing", "own"),
}
ANALYTIC_ROWS = ("Analytic-DDIM", "Analytic-DDPM", "Analytic-DDPM (cap y=2)", "Analytic-DDIM (cap y=2)")
#: the defaults check: (method, spacing) cells; "defaults" is from_table(table) alone (the scheduler's trailing
#: default), "config" the model's own config (its "leading"), "trailing" DDIM on the defaults' spacing rules
DEFAULTS = (("Analytic-DPM (defaults)", "defaults"), ("DDIM", "trailing"), ("DDIM", "config"),
            ("Analytic-DPM (model's spacing)", "config"))
#: the paired differences the defaults check reports: (cell, against)
DEFAULT_PAIRS = ((DEFAULTS[0], DEFAULTS[1]), (DEFAULTS[0], DEFAULTS[2]), (DEFAULTS[3], DEFAULTS[2]))
CHECK_STEPS = 10  # the K of the second-table check
SIGMA_SCAN = (None, 0.1, 0.2, 0.3, 0.4)  # sigma_min of the sample-quality trajectory, compared at K = CHECK_STEPS
SIGMA_METHODS = ("DDIM (eps from clipped x0)", "DPM-Solver++(2M)")
SETTINGS = ("eta", "variance", "variance_cap_y", "timestep_spacing")  # the defaults' settings, recorded
FULL_STEPS, QUICK_STEPS = (5, 10, 25), (5,)


def cell_key(model: str, sampler, k: int, seed: int, n: int) -> str:
    """A cache key that changes with anything that changes the samples: the scheduler's class and config (the table
    is in an Analytic-DPM config), the trajectory, the step options, K, the seed and n."""
    config = {key: value for key, value in dict(sampler.scheduler.config).items() if not key.startswith("_")}
    text = json.dumps([model, type(sampler.scheduler).__name__, config, sampler.timesteps, sampler.step_kwargs, k, seed,
                       n], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def run_cell(model, name: str, sampler, k: int, seed: int, n: int, features, cache: Path) -> dict:
    """Sample one cell (or read it from the cache): its features and what it ran."""
    path = cache / f"{cell_key(name, sampler, k, seed, n)}.npz"
    if path.is_file():
        saved = np.load(path)
        return {"features": saved["features"], "timesteps": saved["timesteps"].tolist(),
                "seconds": float(saved["seconds"])}
    start = time.time()
    images = sample(model.unet, sampler.scheduler, n, None if sampler.timesteps else k, sampler.timesteps, seed=seed,
                    batch_size=1000, progress=False, **sampler.step_kwargs)
    seconds = time.time() - start
    feats = features(images).numpy().astype(np.float32)
    timesteps = np.asarray(sampler.scheduler.timesteps.tolist(), dtype=np.float64)
    np.savez(path, features=feats, timesteps=timesteps, seconds=seconds)
    return {"features": feats, "timesteps": timesteps.tolist(), "seconds": seconds}


def second_table(model, name: str, train: torch.Tensor, cache: Path, quick: bool = False) -> VarianceTable:
    """10 samples per timestep, seed 1, with a sample cost from seed 1 on the next 64 training images (quick: 2
    samples per timestep, 8 paths on 50 candidates)."""
    samples, paths, candidates = (2, 8, 50) if quick else (10, 64, 250)
    folder = cache / (f"{name}-table-m{samples}-s1" + ("-quick" if quick else ""))
    if not (folder / "variance_table.json").is_file():
        table = estimate_moments(model.unet, train, model.scheduler, num_samples=samples, batch_size=1000, seed=1,
                                 options=EstimateOptions(progress=False))
        cost = estimate_sample_cost(model.unet, train[64:], model.scheduler, num_paths=paths, candidates=candidates,
                                    batch_size=1000, seed=1, progress=False)
        table.with_sample_cost(cost).save(folder)
    return VarianceTable.load(folder)


def cells_for(model, table, steps, methods: dict, tag: str) -> list[dict]:
    """The cells of one table: (method, trajectory, K) with the sampler each runs."""
    config = model.scheduler.config
    out = []
    if not steps:
        return out
    dp = SampleTrajectoryDP(table.alphas_cumprod, SampleCost.from_table(table), max(steps))
    for k in steps:
        for method, kinds in methods.items():
            for kind in kinds:
                spacing = {"even": "linspace", "samples": None, "own": None}.get(kind, kind)
                sampler = build_sampler(method, config, table, spacing, dp.path(k) if kind == "samples" else None,
                                        statistics=model.solver_statistics)
                out.append({"table": tag, "method": method, "trajectory": kind, "K": k, "sampler": sampler})
    return out


def rank(cells: list[dict], reference: FrechetReference, seed: int) -> None:
    """FD ± bootstrap standard error of each cell, and its difference to the best cell of the same (K, seed) with the
    paired standard error, in place."""
    for key in dict.fromkeys((c["K"], c["seed"]) for c in cells):
        group = [c for c in cells if (c["K"], c["seed"]) == key]
        boot = bootstrap_distances([c["features"] for c in group], reference, seed)
        fds = [reference.distance(c["features"]) for c in group]
        best = int(np.argmin(fds))
        for i, c in enumerate(group):
            c.update(fd=fds[i], stderr=float(np.std(boot[:, i], ddof=1)), diff_to_best=fds[i] - fds[best],
                     diff_stderr=float(np.std(boot[:, i] - boot[:, best], ddof=1)),
                     best=f"{group[best]['method']}, {group[best]['trajectory']} ({group[best]['table']})")


def _fd(cell: dict) -> str:
    return f"{cell['fd']:.1f} ± {cell['stderr']:.1f}"


def _diff(pair: tuple[float, float]) -> str:
    return f"{pair[0]:+.1f} ± {pair[1]:.1f}"


def _cell_text(cell: dict | None) -> str:
    if cell is None:
        return "—"
    diff = "(best)" if cell["diff_to_best"] == 0 else f"(+{cell['diff_to_best']:.1f} ± {cell['diff_stderr']:.1f})"
    return f"{cell['fd']:.1f} ± {cell['stderr']:.1f} {diff}"


def markdown(result: dict) -> str:
    quick = " (quick mode)" if result["quick"] else ""
    out = [f"# Few-step sample quality: FD-digits by sampler and trajectory{quick}",
           "", f"{result['num_samples']} samples per cell against the {result['reference_images']} training digits "
           "(± bootstrap standard error; lower is better). In each (model, K), every cell starts from the same "
           "initial "
           "noise; \"+x ± y\" is the cell's FD minus the best cell's, ± the paired standard error. Trajectories: "
           "even = "
           "each scheduler's linspace spacing, leading / trailing = Diffusers' spacings (the bundled configs say "
           "leading), karras = Karras sigmas, samples = the sample-quality trajectory (sigma_min "
           f"{result['sigma_min']}), own = DPM-Solver-v3's fitted timesteps (logsnr spacing where none are fitted). "
           f"Real-data floor: the {result['real_floor']['num_images']} held-out digits score "
           f"{result['real_floor']['fd']:.2f} ± {result['real_floor']['stderr']:.2f} (fewer images than a cell, so "
           "above the floor at the cells' n).", ""]
    for m in result["models"]:
        out.append(f"## {m['model']}")
        for k in m["steps"]:
            rows = [c for c in m["cells"] if c["K"] == k and c["table"] == "shipped" and c["seed"] == 0]
            out += ["", f"K = {k} (best: {rows[0]['best']}):", "",
                    "| method | " + " | ".join(KINDS) + " |", "|---|" + "---:|" * len(KINDS)]
            for method in dict.fromkeys(c["method"] for c in rows):
                cell = {c["trajectory"]: c for c in rows if c["method"] == method}
                out.append(f"| {method} | " + " | ".join(_cell_text(cell.get(kind)) for kind in KINDS) + " |")
        second = [c for c in m["cells"] if c["table"] == "second"]
        if second:
            out += ["", "Check with a second table (10 samples per timestep, seed 1; second sample cost: seed 1, other "
                    "images), same noise; difference to the same cell with the shipped table ± paired standard error:",
                    "", "| K | method | trajectory | FD (second) | second − shipped |", "|---:|---|---|---:|---:|"]
            out += [f"| {c['K']} | {c['method']} | {c['trajectory']} | {c['fd']:.1f} ± {c['stderr']:.1f} | "
                    f"{c['vs_shipped']:+.1f} ± {c['vs_shipped_stderr']:.1f} |" for c in second]
        defaults = [c for c in m["cells"] if c["table"] == "defaults"]
        if defaults:
            def cell(k, seed, method, kind):
                return next(c for c in defaults if (c["K"], c["seed"], c["method"], c["trajectory"]) ==
                            (k, seed, method, kind))

            settings = {c["method"]: c["settings"] for c in defaults if "settings" in c}
            out += ["", "The scheduler's defaults against DDIMScheduler, two sampling seeds. Analytic-DPM (defaults) "
                    "is `AnalyticDPMScheduler.from_table(table)` with no other argument ("
                    + ", ".join(f"{k}={v}" for k, v in settings[DEFAULTS[0][0]].items()) + "), compared with DDIM "
                    "on the same spacing rules (trailing) and on the model's config (leading); Analytic-DPM "
                    "(model's spacing) is `from_table(table, config)`, the drop-in on the config's spacing ("
                    + ", ".join(f"{k}={v}" for k, v in settings[DEFAULTS[3][0]].items()) + "). Differences are "
                    "paired (same noise, same resamples):", "",
                    "| K | seed | defaults | DDIM trailing | defaults − DDIM trailing | DDIM leading | "
                    "defaults − DDIM leading | model's spacing | model's spacing − DDIM leading |",
                    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for k, seed in dict.fromkeys((c["K"], c["seed"]) for c in defaults):
                mine, trailing, leading, drop_in = (cell(k, seed, *key) for key in DEFAULTS)
                out.append(f"| {k} | {seed} | " + " | ".join([
                    _fd(mine), _fd(trailing), _diff(mine["vs_ddim"]["trailing"]), _fd(leading),
                    _diff(mine["vs_ddim"]["config"]), _fd(drop_in), _diff(drop_in["vs_ddim"]["config"])]) + " |")
        scan = [c for c in m["cells"] if c["table"] == "sigma_min"]
        if scan:
            out += ["", f"sigma_min of the sample-quality trajectory at K = {scan[0]['K']}: each sampler on it, minus "
                    "the same sampler on trailing timesteps (paired; None: the bound down to t = 0, as derived):", "",
                    "| sigma_min | " + " | ".join(f"{name} | − trailing" for name in SIGMA_METHODS) + " | t_1 |",
                    "|---:|" + "---:|---:|" * len(SIGMA_METHODS) + "---:|"]
            for sigma in dict.fromkeys(c["sigma_min"] for c in scan):
                row = {c["method"]: c for c in scan if c["sigma_min"] == sigma}
                out.append(f"| {sigma} | " + " | ".join(
                    f"{row[name]['fd']:.1f} ± {row[name]['stderr']:.1f} | {row[name]['vs_trailing']:+.1f} ± "
                    f"{row[name]['vs_trailing_stderr']:.1f}" for name in SIGMA_METHODS)
                    + f" | {row[SIGMA_METHODS[0]]['timesteps'][-1]:g} |")
        out += ["", "Timesteps of the sample-quality trajectory (shipped table): " + "; ".join(
            f"K={k}: {t}" for k, t in m["sample_trajectories"].items()), ""]
    sampling = sum(c["seconds"] for m in result["models"] for c in m["cells"])
    out += [f"Sampling time of the cells, summed: {sampling / 3600:.1f} h (cached cells keep the time of the run that "
            f"sampled them; 2000 samples x K model calls each, batches of 1000); this run {result['seconds']:.0f} s, "
            f"load average {result['load_start']} at its start, {result['load_end']} at its end. " + footer(result)]
    return "\n".join(out) + "\n"


def paired_difference(a: dict, b: dict, reference: FrechetReference, seed: int) -> tuple[float, float]:
    boot = bootstrap_distances([a["features"], b["features"]], reference, seed)
    return a["fd"] - b["fd"], float(np.std(boot[:, 0] - boot[:, 1], ddof=1))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one model, K = 5, 32 samples per cell (smoke run)")
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--steps", type=int, nargs="+", default=None, help="K values (default 5 10 25)")
    p.add_argument("--no-checks", action="store_true", help="skip the second-table and second-seed checks")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--cache", default="outputs/samplers_cache", help="cached cells (features) and the second tables")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    steps = args.steps or (QUICK_STEPS if args.quick else FULL_STEPS)
    models = args.models or (BUNDLED_MODELS[:1] if args.quick else BUNDLED_MODELS)
    n = 32 if args.quick else args.num_samples
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    train, heldout = load_digits_split("train")[0], load_digits_split("heldout")[0]
    features = DigitFeatures()
    reference = FrechetReference.of(features(train[:REFERENCE_IMAGES]).numpy())
    floor = frechet_with_stderr(features(heldout).numpy(), reference)
    start, load_start = time.time(), [round(x, 2) for x in os.getloadavg()]
    result = {"quick": args.quick, "num_samples": n, "reference_images": min(len(train), REFERENCE_IMAGES),
              "sigma_min": None, "real_floor": {"fd": floor[0], "stderr": floor[1], "num_images": len(heldout)},
              **environment("cpu"), "models": []}
    for name in models:
        model = load_pretrained(name)
        cells = [{**c, "seed": 0} for c in cells_for(model, model.table, steps, CELLS, "shipped")]
        dp = SampleTrajectoryDP(model.table.alphas_cumprod, SampleCost.from_table(model.table), max(steps))
        result["sigma_min"] = dp.sigma_min
        if not args.no_checks:
            second = second_table(model, name, train, cache, args.quick)
            checked = {m: [k for k in CELLS[m] if m in ANALYTIC_ROWS or k == "samples"] for m in CELLS}
            check_steps = [k for k in steps if k == CHECK_STEPS or args.quick]
            cells += [{**c, "seed": 0} for c in cells_for(model, second, check_steps, checked, "second")]
            config = model.scheduler.config
            cells += [{"table": "defaults", "method": method, "trajectory": kind, "K": k, "seed": seed,
                       "sampler": build_sampler(method, config, model.table, "trailing" if kind == "trailing" else None)}
                      for k in steps if k >= 10 or args.quick for seed in (0, 1) for method, kind in DEFAULTS]
            k_scan = CHECK_STEPS if CHECK_STEPS in steps else steps[0]
            for sigma in SIGMA_SCAN:
                path = SampleTrajectoryDP(model.table.alphas_cumprod, SampleCost.from_table(model.table), k_scan,
                                          sigma_min=sigma).path(k_scan)
                cells += [{"table": "sigma_min", "method": method, "trajectory": "samples", "K": k_scan, "seed": 0,
                           "sigma_min": sigma, "sampler": build_sampler(method, config, model.table, None, path)}
                          for method in SIGMA_METHODS]
        for i, c in enumerate(cells):
            sampler = c.pop("sampler")
            if c["method"].startswith("Analytic-DPM ("):
                c["settings"] = {key: sampler.scheduler.config[key] for key in SETTINGS}
            c.update(run_cell(model, name, sampler, c["K"], c["seed"], n, features, cache))
            print(f"{name} [{i + 1}/{len(cells)}] K={c['K']} {c['method']}, {c['trajectory']} ({c['table']}, seed "
                  f"{c['seed']}): {c['seconds']:.0f} s", flush=True)
        for tag in ("shipped", "second", "defaults", "sigma_min"):
            rank([c for c in cells if c["table"] == tag], reference, 0)
        shipped = {(c["method"], c["trajectory"], c["K"]): c for c in cells if c["table"] == "shipped"}
        for c in cells:
            if c["table"] == "sigma_min":
                c["vs_trailing"], c["vs_trailing_stderr"] = paired_difference(
                    c, shipped[(c["method"], "trailing", c["K"])], reference, 0)
            if c["table"] == "second":
                c["vs_shipped"], c["vs_shipped_stderr"] = paired_difference(
                    c, shipped[(c["method"], c["trajectory"], c["K"])], reference, 0)
        for mine, other in DEFAULT_PAIRS:
            for c in cells:
                if c["table"] == "defaults" and (c["method"], c["trajectory"]) == mine:
                    d = next(d for d in cells if d["table"] == "defaults" and (d["method"], d["trajectory"]) == other
                             and (d["K"], d["seed"]) == (c["K"], c["seed"]))
                    c.setdefault("vs_ddim", {})[other[1]] = paired_difference(c, d, reference, 0)
        for c in cells:
            del c["features"]
        result["models"].append({"model": name, "steps": list(steps), "cells": cells,
                                 "sample_trajectories": {k: dp.path(k) for k in steps}})
    result.update(seconds=time.time() - start, load_start=load_start, load_end=[round(x, 2) for x in os.getloadavg()])
    json_path, md_path = write_results(args.out, "samplers", result, markdown(result))
    print(f"wrote {json_path} and {md_path}")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
