"""Fitted timesteps against tuned baselines, measured as solver papers measure few-step samplers: the reference
error (RMS distance to the model's own ODE solution from the same noise) and FD-digits, on both bundled models.

    python benchmarks/fitted.py                          # full run (hours on 2 cores; every cell is cached)
    python benchmarks/fitted.py --steps 5 10 --seeds 0   # a part of it; a later full run reuses its cells
    python benchmarks/fitted.py --quick                  # smoke run: one model, K = 5, tiny sizes
    python benchmarks/fitted.py --seeds 1 --num-samples 500 --name fitted_seed1   # a second seed at a smaller n

Per model:

1. The reference solution (DPM-Solver++(3M), 500 integer timesteps, x0 clipped as the config clips it) for the
   2000 samples of each sampling seed, and its convergence: the distance of the first 128 samples' solve to solves
   with 250 and 1000 points.
2. Tuned baselines: every peer of :mod:`analytic_sampler.evaluation.peers` (85 solver x spacing rows) at each K on
   the first 200 samples of seed 0, ranked by reference error; the best spacing of each solver family, and the best
   peer of all.
3. Two fits (:func:`~analytic_sampler.estimation.timestep_fit.fit_timesteps`, default options, fit seeds 0 and 1)
   for DPM-Solver++(2M), UniPC (bh2) and DDIM (eps from the clipped x0, run as DPM-Solver++(1)).
4. Final rows on all 2000 samples of each seed: the best peer, the best fixed spacing of DPM-Solver++(2M), UniPC-2
   (bh2), DDIM (eps from clipped x0) and DDIM, each solver on its timesteps of the first fit; on seed 0 also the
   second fit's and the sample-quality trajectory's (the table's, Align Your Steps' bound). Fitted vs the solver's
   own best spacing: reference-error ratio ± paired SE and FD-digits difference ± paired bootstrap SE. Also the
   FD-digits of the reference solution itself, where every accurate sampler's FD-digits converges.

Acceptance (reported, not assumed): at K = 5, on both models, UniPC and DPM-Solver++(2M) on fitted timesteps reach
at most 0.8x the reference error of the same solver's best fixed spacing with FD-digits no worse beyond one paired
standard error; at K = 10, at most 1.0x. Writes ``fitted.json`` and ``fitted.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP: no spinning on a shared machine

import numpy as np  # noqa: E402
import torch  # noqa: E402

from analytic_sampler.commands.bench import REFERENCE_IMAGES  # noqa: E402
from analytic_sampler.denoiser import Denoiser, x0_limit  # noqa: E402
from analytic_sampler.digits import DigitFeatures, load_digits_split  # noqa: E402
from analytic_sampler.estimation.timestep_fit import FitOptions, fit_timesteps  # noqa: E402
from analytic_sampler.evaluation.frechet import FrechetReference, bootstrap_distances  # noqa: E402
from analytic_sampler.evaluation.peers import all_peers, solver_sampler  # noqa: E402
from analytic_sampler.evaluation.provenance import environment, footer, write_results  # noqa: E402
from analytic_sampler.evaluation.reference import (  # noqa: E402
    ErrorStat,
    ReferenceOptions,
    paired_ratio,
    reference_solution,
    squared_errors,
)
from analytic_sampler.evaluation.sampling import initial_noise, sample  # noqa: E402
from analytic_sampler.fitted_timesteps import FittedTimesteps  # noqa: E402
from analytic_sampler.pretrained import BUNDLED_MODELS, load_pretrained  # noqa: E402
from analytic_sampler.sample_trajectory import sample_quality_trajectory  # noqa: E402
from analytic_sampler.solver_specs import FITTED_SOLVERS  # noqa: E402

#: solver key -> the peer family of its fixed spacings
FAMILY_OF = {"dpm-solver++": "DPM-Solver++(2M)", "unipc": "UniPC-2 (bh2)", "ddim": "DDIM (eps from clipped x0)"}
SPACING_FAMILIES = (*FAMILY_OF.values(), "DDIM")
ACCEPTANCE = {5: 0.8, 10: 1.0}  # K -> the largest fitted / best-spacing ratio accepted (UniPC, DPM-Solver++(2M))
ACCEPTED_SOLVERS = ("dpm-solver++", "unipc")
BATCH = 1000


@dataclass
class Settings:
    models: tuple[str, ...] = tuple(BUNDLED_MODELS)
    steps: tuple[int, ...] = (3, 5, 7, 10, 25)
    seeds: tuple[int, ...] = (0, 1)
    fit_seeds: tuple[int, ...] = (0, 1)
    num_samples: int = 2000
    screen_samples: int = 200
    convergence_samples: int = 128
    convergence_steps: tuple[int, ...] = (250, 1000)
    reference: ReferenceOptions = field(default_factory=lambda: ReferenceOptions(batch_size=BATCH))
    fit: FitOptions = field(default_factory=lambda: FitOptions(min_steps=3, batch_size=BATCH))  # K = 3 … 25


QUICK = Settings(models=("digits-ddpm-linear",), steps=(5,), seeds=(0, 1), fit_seeds=(0, 1), num_samples=24,
                 screen_samples=16, convergence_samples=8, convergence_steps=(20, 80),
                 reference=ReferenceOptions(steps=40, batch_size=BATCH),
                 fit=FitOptions(max_steps=5, num_paths=4, candidates=20, reference_steps=40, batch_size=BATCH))


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


class ModelRun:
    """One bundled model's part of the benchmark: its references, fits and cells, cached under ``cache/<model>``."""

    def __init__(self, name: str, settings: Settings, cache: Path, features, fd_reference: FrechetReference, log):
        self.name, self.settings, self.log = name, settings, log
        self.features, self.fd_reference = features, fd_reference
        self.model = load_pretrained(name)
        config = self.model.unet.config
        self.shape = (config.in_channels, config.sample_size, config.sample_size)
        self.folder = cache / name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.references: dict[int, torch.Tensor] = {}

    def path(self, kind: str, *key) -> Path:
        return self.folder / f"{kind}-{_digest(self.name, *key)}"

    def reference(self, seed: int) -> torch.Tensor:
        """The reference of the seed's samples, solved (and cached) 500 samples at a time."""
        if seed not in self.references:
            x_T = initial_noise(self.settings.num_samples, self.shape, seed, BATCH)
            parts = []
            for lo in range(0, len(x_T), 500):
                part = x_T[lo:lo + 500]
                path = self.path("reference", seed, lo, len(part), asdict(self.settings.reference)).with_suffix(".pt")
                if not path.is_file():
                    start = time.time()
                    torch.save(reference_solution(self.model.unet, part, self.model.scheduler, self.settings.reference),
                               path)
                    self.log(f"{self.name}: reference seed {seed}, samples {lo}+ in {time.time() - start:.0f} s")
                parts.append(torch.load(path))
            self.references[seed] = torch.cat(parts)
        return self.references[seed]

    def convergence(self) -> list[dict]:
        """Distances of the reference (its first samples, seed 0) to solves with other numbers of points."""
        n, ref = self.settings.convergence_samples, self.reference(0)
        x_T = initial_noise(self.settings.num_samples, self.shape, 0, BATCH)[:n]
        rows = []
        for steps in self.settings.convergence_steps:
            options = replace(self.settings.reference, steps=steps)
            path = self.path("convergence", n, asdict(options)).with_suffix(".pt")
            if not path.is_file():
                torch.save(reference_solution(self.model.unet, x_T, self.model.scheduler, options), path)
                self.log(f"{self.name}: convergence solve with {steps} points")
            stat = ErrorStat.of(squared_errors(torch.load(path), ref[:n], None))
            rows.append({"steps": steps, "reference_steps": self.settings.reference.steps, "samples": n,
                         "rms": stat.rms, "se": stat.se})
        return rows

    def fit(self, fit_seed: int) -> dict:
        """The fit of one seed (cached; its checkpoint resumes an interrupted fit)."""
        options = replace(self.settings.fit, seed=fit_seed)
        path = self.path("fit", asdict(options))
        if not path.with_suffix(".json").is_file():
            denoiser = Denoiser(self.model.unet, self.model.scheduler, x0_limit(self.model.scheduler.config), BATCH)
            start = time.time()
            result = fit_timesteps(denoiser, self.model.scheduler, self.shape, options,
                                   checkpoint=path.with_suffix(".pt"), progress=False)
            record = {"solvers": list(result.fitted.solvers), "timesteps": result.fitted.timesteps.tolist(),
                      "errors": result.fitted.errors.tolist(), "model_calls": result.model_calls,
                      "seconds": time.time() - start, "seed": fit_seed}
            path.with_suffix(".json").write_text(json.dumps(record))
            path.with_suffix(".pt").unlink(missing_ok=True)
            self.log(f"{self.name}: fit seed {fit_seed}: {result.model_calls} model calls in {record['seconds']:.0f} s")
        return json.loads(path.with_suffix(".json").read_text())

    def cell(self, sampler, k: int, seed: int, n: int) -> dict:
        """One sampler at K from the seed's first n noises: per-sample errors, features (cells of all samples) and
        the timesteps it ran."""
        config = {key: v for key, v in dict(sampler.scheduler.config).items() if not key.startswith("_")}
        path = self.path("cell", type(sampler.scheduler).__name__, config, sampler.timesteps, sampler.step_kwargs, k,
                         seed, n, asdict(self.settings.reference)).with_suffix(".npz")
        if not path.is_file():
            ref = self.reference(seed)
            start = time.time()
            try:
                images = sample(self.model.unet, sampler.scheduler, n, None if sampler.timesteps else k,
                                sampler.timesteps, seed=seed, batch_size=BATCH, progress=False, **sampler.step_kwargs)
                error = "" if torch.isfinite(images).all() else "non-finite samples"
            except (ValueError, RuntimeError, IndexError) as err:  # a configuration Diffusers refuses
                images, error = None, f"{type(err).__name__}: {err}"
            errors = np.full(n, np.nan) if error else squared_errors(images, ref[:n])
            feats = self.features(images).numpy() if n == len(ref) and not error else np.zeros((0, 1))
            ran = np.asarray(sampler.scheduler.timesteps.tolist() if not error else [], dtype=np.float64)
            np.savez(path, errors=errors, features=feats, timesteps=ran, error=error, seconds=time.time() - start)
        saved = np.load(path)
        return {key: saved[key] for key in saved.files}


def _stat(errors: np.ndarray) -> dict:
    if not np.isfinite(errors).all():
        return {"ref_rms": None, "ref_se": None}
    stat = ErrorStat.of(errors)
    return {"ref_rms": stat.rms, "ref_se": stat.se}


def screening(run: ModelRun, k: int) -> list[dict]:
    """Every peer at K on the first samples of seed 0, by reference error (failures last)."""
    config, n = run.model.scheduler.config, run.settings.screen_samples
    rows = []
    for peer in all_peers():
        steps = peer.steps_for(config, k)
        result = run.cell(peer.sampler(config), steps, 0, n)
        rows.append({"K": k, "peer": peer.name, "family": peer.family, "spacing": peer.spacing,
                     "nfe": len(result["timesteps"]), "timesteps": result["timesteps"].tolist(),
                     "error": str(result["error"]), **_stat(result["errors"])})
    return sorted(rows, key=lambda r: (r["ref_rms"] is None, r["ref_rms"] or 0.0))


def best_of(rows: list[dict], family: str | None = None) -> dict:
    """The lowest-reference-error screening row (of a family)."""
    return next(r for r in rows if r["ref_rms"] is not None and (family is None or r["family"] == family))


def final_rows(run: ModelRun, k: int, seed: int, screened: list[dict], fits: dict[int, dict]) -> list[dict]:
    """The rows measured on all samples of a seed (module docstring), with FD-digits and paired comparisons."""
    config, n = run.model.scheduler.config, run.settings.num_samples
    peers = {p.name: p for p in all_peers()}
    plan = [("best peer", best_of(screened)["peer"], None, None)]
    plan += [(f"best spacing: {family}", best_of(screened, family)["peer"], None, None) for family in SPACING_FAMILIES]
    first = min(fits)
    for fit_seed, fit in fits.items():
        if fit_seed != first and seed != run.settings.seeds[0]:
            continue
        table = FittedTimesteps(fit["solvers"], fit["timesteps"], fit["errors"])
        plan += [(f"fitted (fit {fit_seed})", key, table.timesteps_for(key, k), fit_seed) for key in table.solvers]
    if seed == run.settings.seeds[0]:
        path = sample_quality_trajectory(run.model.table, k)
        plan += [("sample-quality trajectory", key, path, None) for key in FITTED_SOLVERS]
    rows, feats = [], []
    for label, what, timesteps, fit_seed in plan:
        if timesteps is None:
            peer = peers[what]
            sampler, solver, family = peer.sampler(config), None, peer.family
            result = run.cell(sampler, peer.steps_for(config, k), seed, n)
        else:
            sampler, solver, family = solver_sampler(FITTED_SOLVERS[what], config, timesteps), what, FAMILY_OF[what]
            result = run.cell(sampler, k, seed, n)
        rows.append({"model": run.name, "K": k, "seed": seed, "row": label, "family": family, "solver": solver,
                     "peer": what if timesteps is None else None, "fit_seed": fit_seed,
                     "timesteps": result["timesteps"].tolist(), "nfe": len(result["timesteps"]),
                     "seconds": float(result["seconds"]), **_stat(result["errors"]), "_errors": result["errors"]})
        feats.append(result["features"])
    # the reference's own samples: how far FD-digits moves when a sampler reaches the ODE's solution
    rows.append({"model": run.name, "K": k, "seed": seed, "row": "reference solution", "family": None, "solver": None,
                 "peer": f"DPM-Solver++(3M), {run.settings.reference.steps} points", "fit_seed": None,
                 "timesteps": [], "nfe": run.settings.reference.steps, "seconds": 0.0, "ref_rms": None, "ref_se": None})
    feats.append(run.features(run.reference(seed)[:n].clamp(-1, 1).float()).numpy())
    boot = bootstrap_distances(feats, run.fd_reference, seed)
    for i, row in enumerate(rows):
        row.update(fd=run.fd_reference.distance(feats[i]), fd_se=float(np.std(boot[:, i], ddof=1)), _boot=boot[:, i])
    return rows


def comparisons(rows: list[dict]) -> list[dict]:
    """Each fitted or sample-trajectory row against its solver's best fixed spacing (same K, seed): reference-error
    ratio ± paired SE, FD-digits difference ± paired SE; and fitted against the sample-quality trajectory."""
    out = []
    spacing = {r["family"]: r for r in rows if r["row"].startswith("best spacing")}
    trajectory = {r["solver"]: r for r in rows if r["row"] == "sample-quality trajectory"}
    for row in rows:
        if row["solver"] is None:
            continue
        against = [("best spacing", spacing[row["family"]])]
        if row["row"].startswith("fitted") and row["solver"] in trajectory:
            against.append(("sample-quality trajectory", trajectory[row["solver"]]))
        for name, base in against:
            ratio, ratio_se = paired_ratio(row["_errors"], base["_errors"])
            out.append({"model": row["model"], "K": row["K"], "seed": row["seed"], "solver": row["solver"],
                        "row": row["row"], "against": name, "against_timesteps": base["timesteps"],
                        "ratio": ratio, "ratio_se": ratio_se, "fd_diff": row["fd"] - base["fd"],
                        "fd_diff_se": float(np.std(row["_boot"] - base["_boot"], ddof=1))})
    return out


def reference_fd(rows: list[dict]) -> list[dict]:
    """FD-digits of the reference solution minus each tuned baseline's (best peer, best spacings), ± paired SE: where
    it is positive, a sampler that comes closer to the ODE moves FD-digits up, towards the ODE's own."""
    reference = next(r for r in rows if r["row"] == "reference solution")
    return [{"model": r["model"], "K": r["K"], "seed": r["seed"], "against": r["row"], "peer": r["peer"],
             "fd_diff": reference["fd"] - r["fd"], "fd_diff_se": float(np.std(reference["_boot"] - r["_boot"], ddof=1))}
            for r in rows if r["row"] == "best peer" or r["row"].startswith("best spacing")]


def acceptance(compared: list[dict]) -> list[dict]:
    """The bar the fit is held to per (model, K, seed, solver, fit) of UniPC and DPM-Solver++(2M)."""
    out = []
    for c in compared:
        if c["K"] in ACCEPTANCE and c["solver"] in ACCEPTED_SOLVERS and c["against"] == "best spacing" and c[
                "row"].startswith("fitted"):
            bound = ACCEPTANCE[c["K"]]
            fd_ok = c["fd_diff"] <= c["fd_diff_se"] if c["K"] == 5 else True
            out.append({**{k: c[k] for k in ("model", "K", "seed", "solver", "row", "ratio", "ratio_se", "fd_diff",
                                             "fd_diff_se")}, "bound": bound, "met": c["ratio"] <= bound and fd_ok})
    return out


def run_model(name: str, settings: Settings, cache: Path, features, fd_reference, log, save) -> dict:
    """Everything of one model, K after K; ``save(result)`` after each K (a long run shows its progress)."""
    run = ModelRun(name, settings, cache, features, fd_reference, log)
    result = {"model": name, "screening": {}, "rows": [], "comparisons": [], "reference_fd": [], "fits": {},
              "convergence": []}
    fits = {}
    for fit_seed in settings.fit_seeds:
        fits[fit_seed] = run.fit(fit_seed)
        result["fits"][str(fit_seed)] = fits[fit_seed]
    for k in settings.steps:
        screened = screening(run, k)
        result["screening"][str(k)] = screened
        log(f"{name} K={k}: best peer {screened[0]['peer']} {screened[0]['ref_rms']:.4f}")
        for seed in settings.seeds:
            rows = final_rows(run, k, seed, screened, fits)
            result["comparisons"] += comparisons(rows)
            result["reference_fd"] += reference_fd(rows)
            result["rows"] += [{key: v for key, v in row.items() if not key.startswith("_")} for row in rows]
        save(result)
    result["convergence"] = run.convergence()
    save(result)
    return result


def _f(value, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _ts(timesteps) -> str:
    if not len(timesteps):
        return "—"
    ts = [f"{t:g}" for t in timesteps]
    return "[" + (", ".join(ts) if len(ts) <= 10 else ", ".join(ts[:4] + ["…"] + ts[-2:])) + "]"


def model_markdown(r: dict, settings: Settings) -> list[str]:
    out = [f"## {r['model']}", ""]
    if r["convergence"]:
        out += [f"Reference convergence (first {r['convergence'][0]['samples']} samples of seed 0): RMS distance of "
                f"the {settings.reference.steps}-point reference to solves with other numbers of points.", "",
                "| points | distance to the reference |", "|---:|---:|"]
        out += [f"| {c['steps']} | {c['rms']:.5f} ± {c['se']:.5f} |" for c in r["convergence"]]
        ranked = [row["ref_rms"] for row in r["rows"] if row["ref_rms"] is not None]
        finer = [c["rms"] for c in r["convergence"] if c["steps"] > settings.reference.steps]
        if ranked and finer:
            out += ["", f"Smallest error ranked: {min(ranked):.4f}, {min(ranked) / max(finer):.0f}x the reference's "
                    f"distance to the finer solve ({max(finer):.5f})."]
        out.append("")
    for fit_seed, fit in r["fits"].items():
        out.append(f"Fit seed {fit_seed}: {fit['model_calls']} model calls, {fit['seconds']:.0f} s.")
    out.append("")
    for k, screened in r["screening"].items():
        families: dict[str, dict] = {}
        for row in screened:
            if row["ref_rms"] is not None:
                families.setdefault(row["family"], row)
        out += [f"### K = {k}", "", f"Tuned baselines ({len(screened)} peers, first {settings.screen_samples} samples "
                "of seed 0): the best spacing of each solver family, by reference error.", "",
                "| family | best spacing | NFE | timesteps | ref error |", "|---|---|---:|---|---:|"]
        out += [f"| {f} | {row['spacing']} | {row['nfe']} | {_ts(row['timesteps'])} | {_f(row['ref_rms'])} ± "
                f"{_f(row['ref_se'])} |" for f, row in families.items()]
        failed = [row["peer"] + (f" ({row['error'][:60]})" if row["error"] else "") for row in screened
                  if row["ref_rms"] is None]
        if failed:
            out += ["", f"Failed: {', '.join(failed)}."]
        for seed in settings.seeds:
            rows = [row for row in r["rows"] if str(row["K"]) == k and row["seed"] == seed]
            if not rows:
                continue
            out += ["", f"All {settings.num_samples} samples of seed {seed}:", "",
                    "| row | solver / peer | timesteps | ref error | FD-digits |", "|---|---|---|---:|---:|"]
            out += [f"| {row['row']} | {row['solver'] or row['peer']} | {_ts(row['timesteps'])} | {_f(row['ref_rms'])} "
                    f"± {_f(row['ref_se'])} | {row['fd']:.2f} ± {row['fd_se']:.2f} |" for row in rows]
        compared = [c for c in r["comparisons"] if str(c["K"]) == k]
        if compared:
            out += ["", "Paired comparisons (same noise): reference-error ratio and FD-digits difference, ± paired "
                    "standard errors.", "", "| seed | solver | row | against | ratio | FD difference |",
                    "|---:|---|---|---|---:|---:|"]
            out += [f"| {c['seed']} | {c['solver']} | {c['row']} | {c['against']} | {c['ratio']:.3f} ± "
                    f"{c['ratio_se']:.3f} | {c['fd_diff']:+.2f} ± {c['fd_diff_se']:.2f} |" for c in compared]
        against = [c for c in r.get("reference_fd", []) if str(c["K"]) == k]
        if against:
            out += ["", "FD-digits of the reference solution minus the tuned baselines' (paired SE): "
                    + "; ".join(f"seed {c['seed']}, {c['peer']}: {c['fd_diff']:+.2f} ± {c['fd_diff_se']:.2f}"
                                for c in against) + "."]
        out.append("")
    return out


def markdown(result: dict, settings: Settings) -> str:
    out = ["# Fitted timesteps against tuned baselines", "",
           f"Reference error: RMS distance (after the final clamp) to the {settings.reference.steps}-point "
           "DPM-Solver++(3M) solve from the same noise, ± standard error; FD-digits ± bootstrap standard error; "
           f"{settings.num_samples} samples per final row, seeds {list(settings.seeds)}; fits with seeds "
           f"{list(settings.fit_seeds)} ({settings.fit.num_paths} paths, {settings.fit.candidates} candidates). "
           "Produced by `python benchmarks/fitted.py`.", ""]
    accepted = result["acceptance"]
    if accepted:
        out += ["## Acceptance", "", "K = 5: fitted / best-spacing reference error <= 0.8 and FD-digits no worse "
                "beyond one paired SE; K = 10: ratio <= 1.0 (UniPC and DPM-Solver++(2M)).", "",
                "| model | K | seed | solver | row | ratio | FD difference | met |",
                "|---|---:|---:|---|---|---:|---:|---|"]
        out += [f"| {a['model']} | {a['K']} | {a['seed']} | {a['solver']} | {a['row']} | {a['ratio']:.3f} ± "
                f"{a['ratio_se']:.3f} | {a['fd_diff']:+.2f} ± {a['fd_diff_se']:.2f} | {'yes' if a['met'] else 'no'} |"
                for a in accepted]
        out.append("")
    for r in result["models"]:
        out += model_markdown(r, settings)
    out.append(footer(result))
    return "\n".join(out) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--steps", type=int, nargs="+", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--fit-seeds", type=int, nargs="+", default=None)
    p.add_argument("--num-samples", type=int, default=None, help="samples per final row (default 2000)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--name", default="fitted", help="the output files' stem (default fitted: fitted.json, fitted.md)")
    p.add_argument("--cache", default=str(Path(__file__).parent / ".cache" / "fitted"))
    args = p.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    chosen = {"models": args.models, "steps": args.steps, "seeds": args.seeds, "fit_seeds": args.fit_seeds}
    settings = replace(settings, **{k: tuple(v) for k, v in chosen.items() if v is not None})
    if args.num_samples is not None:
        settings = replace(settings, num_samples=args.num_samples)
    torch.set_num_threads(1)
    logging.getLogger("diffusers").setLevel(logging.ERROR)  # DPM-Solver singlestep warns on every odd K
    started = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.0f} s] {message}", flush=True)

    features = DigitFeatures()
    fd_reference = FrechetReference.of(features(load_digits_split("train")[0][:REFERENCE_IMAGES]).numpy())
    result = {"settings": json.loads(json.dumps(asdict(settings), default=str)), "models": [], "acceptance": [],
              **environment()}

    def save(partial: dict) -> None:
        models = [m for m in result["models"] if m["model"] != partial["model"]] + [partial]
        result.update(models=models, acceptance=acceptance([c for m in models for c in m["comparisons"]]),
                      seconds=time.time() - started, **environment())
        write_results(args.out, args.name, result, markdown(result, settings))

    for name in settings.models:
        run_model(name, settings, Path(args.cache), features, fd_reference, log, save)
    log(f"wrote {args.out}/{args.name}.md")
    return result


if __name__ == "__main__":
    main()
