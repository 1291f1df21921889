"""``analytic-sampler bench``: what fewer steps cost one model, in likelihood and in samples, in one report.

For each K it measures

- the NLL bound (bits/dim ± standard error over the evaluation images) of DDPM's two fixed variances, the analytic
  and the residual variance (and Improved DDPM's learned one when the model has it), on the even trajectory and on
  the optimal one (the residual DP of the table);
- the Fréchet distance of samples from every method of :func:`sampling_methods` to the training images, with a
  bootstrap standard error, where a feature extractor is available: the shipped digit classifier for 1x8x8 images,
  or an Inception network the user points to (``inception``).

The table is the one given, else the model's own if it has x0_mse, else estimated on the training images (resumable
from ``<out>/table/checkpoint.pt``). Writes ``bench.json``, ``bench.md``, ``bench_nll.png`` and, with sample
quality, ``bench_fd.png`` into ``out``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..evaluation.baselines import (
    ANALYTIC,
    BENCH_METHODS,
    FITTED,
    LEARNED,
    SOLVER_V3,
    applies,
    check_names,
    sampling_methods,
)
from ..evaluation.frechet import FrechetReference, frechet_with_stderr
from ..evaluation.likelihood import NLLOptions, nll_bpd
from ..evaluation.peers import is_deterministic
from ..evaluation.provenance import environment, footer, write_results
from ..evaluation.reference import ErrorStat, ReferenceOptions, reference_solution, squared_errors
from ..evaluation.sampling import initial_noise, ranked_fd_rows
from ..options import options_of
from ..pretrained import TABLE_SUBFOLDER, PretrainedModel, load_pretrained
from ..table import ARRAYS_NAME, META_NAME, VarianceTable
from ..trajectory import TrajectoryDP, even_trajectory

REFERENCE_IMAGES = 10_000  # training images (at most) behind the reference statistics
NLL_VARIANCES = ("btilde", "beta", "analytic", "residual")
REFERENCE_SAMPLES = 100  # the first samples of every deterministic row scored by their reference error
#: the fit behind the fitted-timestep rows when bench estimates the table: fewer paths and candidates than precompute's
BENCH_FIT = {"num_paths": 32, "candidates": 60, "max_steps": 25}
#: DPM-Solver-v3's statistics and fit when bench estimates them: fewer grid points, paths and moves than precompute's
BENCH_STATISTICS = {"grid_points": 40}
BENCH_V3_FIT = {"paths": 32, "teacher_steps": 100, "starts": 1, "moves": (32, 8, 2), "rounds": 2}
V3_FIT_STEPS = (3, 5, 7, 10)  # the K bench fits DPM-Solver-v3's timesteps for (up to its largest K)
PLOT_APART = ("btilde",)  # tens to hundreds of bits/dim at small K: plotted beside the others, not with them
Features = Callable[[torch.Tensor], torch.Tensor]


def output_names(name: str = "bench") -> tuple[str, ...]:
    """The files :func:`run_bench` writes into its ``out`` folder (the table where it estimates one)."""
    return (f"{name}.json", f"{name}.md", f"{name}_nll.png", f"{name}_fd.png", f"{TABLE_SUBFOLDER}/{META_NAME}",
            f"{TABLE_SUBFOLDER}/{ARRAYS_NAME}")


def inception_features(path: str | os.PathLike, device: str | torch.device = "cpu") -> Features:
    """Features from a TorchScript Inception network at ``path`` that takes uint8 ``(N, 3, H, W)`` images and
    returns pool features when called with ``return_features=True`` (NVIDIA's ``inception-2015-12-05.pt``, the
    network of StyleGAN3's and clean-fid's FID). Grey images are repeated to 3 channels."""
    if not Path(path).is_file():
        raise ValueError(f"--inception {os.fspath(path)!r}: no such file; pass a TorchScript Inception network "
                         "(e.g. inception-2015-12-05.pt), or leave it out to skip sample quality.")
    network = torch.jit.load(os.fspath(path), map_location=device).eval()

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        out = []
        for batch in images.split(100):
            pixels = ((batch.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            pixels = pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels
            out.append(network(pixels.to(device), return_features=True).double().cpu())
        return torch.cat(out)

    return features


def feature_extractor(image_shape: Sequence[int], inception=None, device="cpu") -> tuple[Features | None, str]:
    """``(features, name)``; ``features`` is None, and ``name`` the reason, where no extractor applies."""
    if inception is not None:
        return inception_features(inception, device), "Inception FID"
    if tuple(image_shape) == (1, 8, 8):
        from ..digits import DigitFeatures

        return DigitFeatures(device=device), "FD-digits"
    return None, (f"sample quality skipped: no feature extractor for {'x'.join(map(str, image_shape))} images "
                  "(FD-digits covers 1x8x8 digits); pass --inception PATH to a local Inception network for FID.")


@dataclass(frozen=True)
class BenchOptions:
    """How :func:`run_bench` measures: the table, the sample-quality cells, the sampler rows, the run and the output
    files' name.

    Args:
        table (`VarianceTable`, *optional*):
            The table to use; default: the model's own if it has x0_mse, else one estimated on the training images
            into ``out/table`` (:func:`bench_table`).
        table_samples (`int`, defaults to 100):
            Images per timestep for an estimated table.
        solver_statistics (`SolverStatistics`, *optional*):
            What the DPM-Solver-v3 row samples with; default: the model's own (a table folder with them), else
            estimated into ``out/table`` (:func:`bench_statistics`).
        solver_samples (`int`, defaults to 128):
            Draws per grid point for estimated solver statistics; 0 leaves the DPM-Solver-v3 row out instead.
        force_table (`bool`, defaults to `False`):
            Use the table even where it was estimated for another model.
        overwrite (`bool`, defaults to `False`):
            Replace a table of other settings that an earlier run estimated into ``out/table``.
        fd_samples (`int`, *optional*):
            Samples per method and K (default: as many as there are training images, at most 5000), all from the same
            initial noise. FD is biased upwards by about ``dim / n``, so every cell is measured at the same n.
        inception (`str` or `os.PathLike`, *optional*):
            A TorchScript Inception network for FID (:func:`inception_features`); default for 1x8x8 images: FD-digits.
        methods (`list[str]`, *optional*):
            The sampler rows (default :data:`BENCH_METHODS`, names of :func:`build_sampler`), each built on the
            model's own scheduler config.
        schedulers (`list[str]`, defaults to `()`):
            More rows: Diffusers scheduler classes by name (``"HeunDiscreteScheduler"``).
        on_samples (`Callable[[str, int, torch.Tensor], None]`, *optional*):
            ``on_samples(method, K, images)`` sees each set of samples.
        eps_model (an `EpsilonAdapter` or eps callable, *optional*):
            What the NLL rows score instead of the bare UNet (conditioning, guidance, a timestep convention); sample
            quality is then skipped, as the sampling loop runs the UNet itself.
        batch_size (`int`, defaults to 256):
            Images per model call.
        seed (`int`, defaults to 0):
            Seeds the table, the NLL noise, the initial noise of the samples and the bootstrap.
        device (`str`, defaults to `"cpu"`):
            Where the model runs.
        progress (`bool`, defaults to `True`):
            Show a progress bar over the cells.
        name (`str`, defaults to `"bench"`):
            The output files' stem (:func:`output_names`).
    """

    table: VarianceTable | None = None
    table_samples: int = 100
    solver_statistics: Any = None
    solver_samples: int = 128
    force_table: bool = False
    overwrite: bool = False
    fd_samples: int | None = None
    inception: str | os.PathLike | None = None
    methods: Sequence[str] | None = None
    schedulers: Sequence[str] = ()
    on_samples: Callable[[str, int, torch.Tensor], None] | None = None
    eps_model: Any = None
    batch_size: int = 256
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    name: str = "bench"

    def __post_init__(self):
        if self.solver_samples != 0 and self.solver_samples < 4:
            raise ValueError(f"solver_samples={self.solver_samples}: at least 4 draws per grid point (two groups of "
                             "two), or 0 to leave the DPM-Solver-v3 row out.")


def bench_table(model, train: torch.Tensor, out: Path, options: BenchOptions | None = None, fit_steps: int = 10):
    """The table to use and where it came from: ``options.table``, else the model's own if it has x0_mse (either
    checked against the model's schedule, channels and weights, unless ``options.force_table``), else one estimated
    into ``out/table`` from ``options.table_samples`` images per timestep
    (:func:`~analytic_sampler.estimation.precompute.precompute_table`: checkpointed beside it, reused when it holds
    this very run, another run's replaced only with ``options.overwrite``) with a sample cost from
    ``min(64, table_samples)`` forward paths (one per image;
    :func:`~analytic_sampler.estimation.precompute.precompute_sample_cost`) and timesteps fitted up to ``fit_steps``
    (:data:`BENCH_FIT`; :func:`~analytic_sampler.estimation.precompute.precompute_fitted_timesteps`)."""
    options = options_of(options, BenchOptions)
    table, source = options.table, "given"
    if table is None and model.table is not None and model.table.has_x0_mse:
        table, source = model.table, "shipped with the model" if model.is_bundled else _own_table_label(model)
    if table is not None:  # a table left in the model folder by an earlier model is refused too
        return table.check_schedule(model.scheduler).check_model(model.unet, force=options.force_table), source
    from ..estimation.moments import EstimateOptions
    from ..estimation.precompute import precompute_fitted_timesteps, precompute_sample_cost, precompute_table
    from ..estimation.timestep_fit import FitOptions
    from ..sample_trajectory import DEFAULT_PATHS

    folder, o = out / TABLE_SUBFOLDER, options
    num_samples = min(o.table_samples, len(train))
    done = precompute_table(model.unet, train, model.scheduler, num_samples, batch_size=o.batch_size, seed=o.seed,
                            out=folder, overwrite=o.overwrite,
                            options=EstimateOptions(device=o.device, provenance={"model_id": model.name}))
    how = "estimated here" if done.status == "estimated" else "found in the output folder, estimated earlier"
    paths = min(DEFAULT_PATHS, num_samples)
    precompute_sample_cost(model.unet, train, model.scheduler, out=folder, num_paths=paths, overwrite=o.overwrite,
                           batch_size=o.batch_size, seed=o.seed, device=o.device, progress=False)
    fit = FitOptions(**{**BENCH_FIT, "max_steps": min(BENCH_FIT["max_steps"], max(fit_steps, 2))}, seed=o.seed,
                     batch_size=o.batch_size)
    done = precompute_fitted_timesteps(model.unet, model.scheduler, out=folder, options=fit, device=o.device,
                                       overwrite=o.overwrite, progress=False)
    return done.table, (f"{how} ({num_samples} images per timestep, {paths} paths for the sample cost, timesteps "
                        f"fitted on {fit.num_paths} paths x {fit.candidates} candidates, saved to {folder})")


def bench_statistics(model, train: torch.Tensor, out: Path, options: BenchOptions | None = None,
                     fit_steps: int = 10):
    """DPM-Solver-v3's statistics and where they came from: ``options.solver_statistics``, else the model's own
    (either checked against the model's schedule), else estimated into ``out/table`` from
    ``options.solver_samples`` draws per grid point (:data:`BENCH_STATISTICS`;
    :func:`~analytic_sampler.estimation.solver_statistics.precompute_solver_statistics`: checkpointed, reused when it
    holds this very run, another run's replaced only with ``options.overwrite``) with timesteps fitted for the K of
    :data:`V3_FIT_STEPS` up to ``fit_steps`` (:data:`BENCH_V3_FIT`; resumable per K); ``(None, why)`` where
    ``options.solver_samples`` is 0."""
    o = options_of(options, BenchOptions)
    given = o.solver_statistics if o.solver_statistics is not None else model.solver_statistics
    if given is not None:
        source = "given" if o.solver_statistics is not None else "shipped with the model"
        return given.check_schedule(model.scheduler), source
    if o.solver_samples == 0:
        return None, "not estimated (solver_samples=0)"
    from ..estimation.moments import EstimateOptions
    from ..estimation.solver_statistics import StatisticsOptions, precompute_solver_statistics
    from ..estimation.solver_timesteps import V3FitOptions, precompute_solver_timesteps

    folder = out / TABLE_SUBFOLDER
    stats = StatisticsOptions(**BENCH_STATISTICS, num_samples=o.solver_samples, groups=min(8, o.solver_samples // 2),
                              batch_size=o.batch_size, seed=o.seed)
    done = precompute_solver_statistics(model.unet, train, model.scheduler, stats,
                                        EstimateOptions(device=o.device, progress=False,
                                                        provenance={"model_id": model.name}),
                                        out=folder, overwrite=o.overwrite)
    statistics, steps = done.table, tuple(k for k in V3_FIT_STEPS if k <= fit_steps)
    if steps:
        fit = V3FitOptions(steps=steps, **BENCH_V3_FIT, seed=o.seed, batch_size=o.batch_size)
        statistics, _ = precompute_solver_timesteps(model.unet, model.scheduler, fit, out=folder, device=o.device,
                                                    progress=False)
    how = "estimated here" if done.status == "estimated" else "found in the output folder, estimated earlier"
    return statistics, (f"{how} ({statistics.timesteps.size} grid points x {o.solver_samples} draws, timesteps "
                        f"fitted for K = {', '.join(map(str, steps)) or 'none'} on {BENCH_V3_FIT['paths']} paths, "
                        f"saved to {folder})")


def add_reference_errors(rows: list[dict], methods_per_k: dict, kept: dict, model, num_samples: int,
                         options: BenchOptions, data_range) -> dict | None:
    """Give every row ``uses_table`` and ``ref_error`` (``{"rms", "se", "num_samples"}`` on the first
    :data:`REFERENCE_SAMPLES` samples; ``None`` for a stochastic sampler), against the reference solution from the
    same noise (:mod:`~analytic_sampler.evaluation.reference`); return how that reference was solved."""
    deterministic = [row for row in rows if is_deterministic(methods_per_k[row["K"]][row["method"]])]
    for row in rows:
        row.update(uses_table=row["method"] in (*ANALYTIC, *FITTED, SOLVER_V3), ref_error=None)
    if not deterministic:
        return None
    config = model.unet.config
    size = config.sample_size
    shape = (config.in_channels, *((size, size) if isinstance(size, int) else size))
    count = min(REFERENCE_SAMPLES, num_samples)
    reference = ReferenceOptions(steps=min(ReferenceOptions.steps, model.scheduler.config.num_train_timesteps),
                                 batch_size=options.batch_size, device=options.device)
    x_T = initial_noise(num_samples, shape, options.seed, options.batch_size)[:count]
    solution = reference_solution(model.unet, x_T, model.scheduler, reference)
    for row in deterministic:
        stat = ErrorStat.of(squared_errors(kept[(row["method"], row["K"])], solution, data_range))
        row["ref_error"] = {"rms": stat.rms, "se": stat.se, "num_samples": stat.n}
    return {"solver": reference.solver.name, "steps": reference.steps, "num_samples": count}


def _own_table_label(model) -> str:
    """Where the table of a user's model folder came from, by its provenance."""
    data = model.table.provenance.get("data")
    return f"the model's {TABLE_SUBFOLDER}/ folder" + (f" (estimated on {data})" if data else "")


def nll_rows(model, table, heldout: torch.Tensor, steps: Sequence[int], batch_size: int = 256, seed: int = 0,
             device="cpu", on_cell: Callable[[], object] | None = None, eps_model=None) -> list[dict]:
    """NLL rows ``K, trajectory, variance, bpd, stderr, num_images, seconds, timesteps`` for every K: the variances
    of ``NLL_VARIANCES`` (and ``learned`` where the model has it) on the even trajectory and on the optimal one
    (the residual DP of ``table``), from one pass of model calls per trajectory; a trajectory that equals the
    even one (K = N) is not evaluated twice. ``on_cell()`` is called after each K and trajectory. ``eps_model``
    (an :class:`~analytic_sampler.EpsilonAdapter` or eps callable: conditioning, guidance, a timestep convention)
    is scored instead of the bare UNet."""
    n = model.scheduler.config.num_train_timesteps
    dp = TrajectoryDP(table.alphas_cumprod, None, max(steps), x0_mse=table.require_x0_mse("the optimal trajectory"))
    variances = list(NLL_VARIANCES) + (["learned"] if model.scheduler.config.get("variance_type") in LEARNED else [])
    rows = []
    for k in steps:
        done = {}
        for trajectory, ts in (("even", even_trajectory(n, k)), ("optimal", dp.path(k))):
            if tuple(ts) not in done:
                t0 = time.time()
                results = nll_bpd(eps_model or model.unet, heldout, model.scheduler, ts, variances, table.ms_eps,
                                  table.x0_mse, batch_size=batch_size, seed=seed,
                                  options=NLLOptions(device=device, progress=False, ms_x0=table.ms_x0))
                done[tuple(ts)] = results, time.time() - t0
            results, seconds = done[tuple(ts)]
            rows += [{"K": k, "trajectory": trajectory, "variance": v, "bpd": r.mean, "stderr": r.stderr,
                      "num_images": r.num_samples, "seconds": seconds, "timesteps": ts, "t_1": ts[-1]}
                     for v, r in results.items()]
            if on_cell is not None:
                on_cell()
    return rows


def run_bench(
    model_name_or_path: str | os.PathLike | PretrainedModel,
    train: torch.Tensor,
    heldout: torch.Tensor,
    steps: Sequence[int],
    out: str | os.PathLike,
    options: BenchOptions | None = None,
) -> dict:
    """Run the whole report (see the module docstring) for each K of ``steps``, with ``train`` for the table and
    the FD reference (at most ``REFERENCE_IMAGES``) and ``heldout`` for the NLL and the real-data floor (measured at
    its own count); write ``<name>.json`` / ``.md`` / plots into ``out`` and return the JSON's content.

    Each FD row carries its FD minus the best row's at that K with the paired bootstrap standard error, and the
    timesteps it ran. ``options``: :class:`BenchOptions` (default: ``BenchOptions()``).
    """
    o = options_of(options, BenchOptions)
    start, load_at_start = time.time(), environment(o.device)["load_average"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model_name_or_path
    if not isinstance(model, PretrainedModel):
        model = load_pretrained(model_name_or_path)
    config = model.scheduler.config
    n = config.num_train_timesteps
    if not all(2 <= int(k) <= n for k in steps):
        raise ValueError(f"steps {list(steps)}: each K must be between 2 and the model's num_train_timesteps={n}.")
    names = check_names([*(BENCH_METHODS if o.methods is None else o.methods), *o.schedulers])
    table, table_source = bench_table(model, train, out, o, fit_steps=max(steps))
    features, feature_name = feature_extractor(train.shape[1:], o.inception, o.device)
    if o.eps_model is not None:
        features, feature_name = None, ("sample quality skipped: the NLL rows score the eps_model given, the "
                                        "sampling loop would run the bare UNet.")
    fd_samples = o.fd_samples or min(len(train), 5000)
    statistics, statistics_source = (None, "not needed") if SOLVER_V3 not in names or features is None else \
        bench_statistics(model, train, out, o, fit_steps=max(steps))
    methods_per_k = {} if features is None else {k: sampling_methods(config, table, k, names, statistics=statistics)
                                                 for k in steps}
    cells = 2 * len(steps) + sum(len(m) for m in methods_per_k.values())
    with tqdm(total=cells, desc="bench", unit="cell", disable=not o.progress) as bar:
        nll = nll_rows(model, table, heldout, steps, o.batch_size, o.seed, o.device, on_cell=bar.update,
                       eps_model=o.eps_model)
        fd, floor, kept = [], None, {}
        if features is not None:
            fd, floor, kept = _fd_rows(model, methods_per_k, features, train, heldout, fd_samples, o, bar.update)
    reference = add_reference_errors(fd, methods_per_k, kept, model, fd_samples, o, table.data_range)
    quality = {"measure": feature_name if features is not None else None,
               "skipped": None if features is not None else feature_name,
               "num_samples": fd_samples if features is not None else 0,
               "reference_images": min(len(train), REFERENCE_IMAGES),
               "real_floor": None if floor is None else {"fd": floor[0], "stderr": floor[1],
                                                          "num_images": len(heldout)},
               "not_applicable": [name for name in names
                                  if not all(applies(name, config, table, k, statistics) for k in steps)],
               "reference": reference, "rows": fd}
    result = {
        "model": model.name, "table": table_source, "solver_statistics": statistics_source,
        "table_samples_per_timestep":
            int(np.median(table.counts[table.estimated])), "steps": list(steps), "seed": o.seed,
        "train_images": len(train), "eval_images": len(heldout), "nll": nll, "sample_quality": quality,
        "seconds_total": time.time() - start, "load_average_at_start": load_at_start, **environment(o.device),
    }
    write_results(out, o.name, result, markdown(result))
    plot(result, out, o.name)
    return result


def _fd_rows(model, methods_per_k: dict, features: Features, train: torch.Tensor, heldout: torch.Tensor,
             fd_samples: int, options: BenchOptions, on_cell: Callable[[], object]) -> tuple[list[dict], tuple, dict]:
    """The ranked FD rows of every K (:func:`ranked_fd_rows`), the real-data floor ``(fd, stderr)`` of the
    evaluation images, against the statistics of the training images, and the first :data:`REFERENCE_SAMPLES`
    samples of each ``(method, K)``; ``on_cell()`` after each sampler's set."""
    o = options
    reference = FrechetReference.of(features(train[:REFERENCE_IMAGES]).numpy())
    floor = frechet_with_stderr(features(heldout).numpy(), reference, o.seed)
    rows, kept = [], {}
    for k, samplers in methods_per_k.items():
        def seen(method, images, k=k):
            on_cell()
            kept[(method, k)] = images[:REFERENCE_SAMPLES]
            if o.on_samples is not None:
                o.on_samples(method, k, images)

        rows += ranked_fd_rows(model.unet, samplers, k, features, reference, fd_samples, o.seed, o.batch_size,
                               o.device, on_samples=seen)
    return rows, floor, kept


def _common_t1(rows: Sequence[dict]) -> int:
    """The last timestep shared by every NLL row; a ValueError where they differ (their bits/dim do not compare)."""
    ends = sorted({x["t_1"] for x in rows})
    if len(ends) != 1:
        raise ValueError(f"NLL rows end at t_1 = {ends}: bits/dim compare only between trajectories that end at the "
                         "same t_1; report them in separate tables.")
    return ends[0]


def markdown(r: dict) -> str:
    steps = r["steps"]
    head = " | ".join(f"K={k}" for k in steps)
    out = [f"# bench: {r['model']}", "",
           f"Table: {r['table']}, {r['table_samples_per_timestep']} samples per timestep. Seed {r['seed']}."
           + (f" DPM-Solver-v3's statistics: {r['solver_statistics']}." if r.get("solver_statistics") else ""), "",
           (f"NLL bound (bits/dim ± standard error over {r['eval_images']} evaluation images; lower is better; "
            "optimal = the residual DP's trajectory). Bits/dim compare only between trajectories that end at the "
            f"same t_1; every row here ends at t_1 = {_common_t1(r['nll'])}:"), "",
           f"| variance | trajectory | {head} |", "|---|---|" + "---:|" * len(steps)]
    cell = {(x["variance"], x["trajectory"], x["K"]): x for x in r["nll"]}
    for variance in dict.fromkeys(x["variance"] for x in r["nll"]):
        for trajectory in ("even", "optimal"):
            out.append(f"| {variance} | {trajectory} | " + " | ".join(
                f"{cell[(variance, trajectory, k)]['bpd']:.3f} ± {cell[(variance, trajectory, k)]['stderr']:.3f}"
                for k in steps) + " |")
    q = r["sample_quality"]
    out.append("")
    if q["skipped"]:
        out.append(q["skipped"][0].upper() + q["skipped"][1:])
    else:
        floor = q["real_floor"]
        relation = ("fewer images than a cell, so this floor sits above the one at the cells' n"
                    if floor["num_images"] < q["num_samples"] else "at least as many images as a cell")
        out += [(f"{q['measure']} to the {q['reference_images']} training images ({q['num_samples']} samples per "
                 f"cell, ± bootstrap standard error; lower is better). Real-data floor: the {floor['num_images']} "
                 f"evaluation images score {floor['fd']:.3f} ± {floor['stderr']:.3f} ({relation})."), ""]
        if q.get("reference"):
            ref = q["reference"]
            out += [(f"Reference error: RMS distance of a deterministic row's first {ref['num_samples']} samples to "
                     f"the model's own ODE solution from the same noise ({ref['solver']}, {ref['steps']} timesteps), "
                     "± standard error; none for stochastic rows. `table`: the row reads the variance table."), ""]
        out += fd_markdown(q["rows"])
        if q.get("not_applicable"):
            out.append(f"Not run: {', '.join(q['not_applicable'])} (a learned variance needs a model trained for it, "
                       "the residual rows a table with x0_mse, the sample trajectory a table with a sample cost: "
                       "`analytic-sampler precompute ... --sample-cost-only`, the fitted rows a table with fitted "
                       "timesteps at that K: `analytic-sampler precompute ... --fit-only`, DPM-Solver-v3 solver "
                       "statistics: `--solver-samples` above 0).")
    start_load = r.get("load_average_at_start")
    out += ["", f"Run time {r['seconds_total']:.0f} s"
            + ("" if start_load is None else f" (load average {start_load[0]} when it started)") + ". " + footer(r)]
    return "\n".join(out) + "\n"


def _timesteps_text(timesteps: Sequence[float]) -> str:
    shown = [f"{t:g}" for t in timesteps]
    return ", ".join(shown) if len(shown) <= 6 else ", ".join(shown[:3] + ["…"] + shown[-2:])


def _ref_text(ref: dict | None) -> str:
    return "—" if ref is None else f"{ref['rms']:.4f} ± {ref['se']:.4f}"


def fd_markdown(rows: Sequence[dict]) -> list[str]:
    """One ranked table per K: FD ± bootstrap standard error, the difference to the best row at that K ± its paired
    standard error (the same resamples of the same initial noise), and the timesteps each sampler ran."""
    out = []
    for k in dict.fromkeys(x["K"] for x in rows):
        at_k = sorted((x for x in rows if x["K"] == k), key=lambda x: x["fd"])
        out += [f"K = {k} (all rows from the same initial noise; difference to the best row ± paired standard error):",
                "", "| method | FD | − best | ref error | table | timesteps |", "|---|---:|---:|---:|---|---|"]
        out += [f"| {x['method']} | {x['fd']:.2f} ± {x['stderr']:.2f} | "
                + ("best" if x["method"] == x["best"] else f"+{x['diff_to_best']:.2f} ± {x['diff_stderr']:.2f}")
                + f" | {_ref_text(x.get('ref_error'))} | {'yes' if x.get('uses_table') else 'no'}"
                + f" | {_timesteps_text(x['timesteps'])} |" for x in at_k]
        out.append("")
    return out


def plot(r: dict, out: Path, name: str = "bench") -> None:
    try:
        import matplotlib
    except ImportError:  # the [digits] extra brings matplotlib; without it, JSON and Markdown only
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variances = list(dict.fromkeys(x["variance"] for x in r["nll"]))
    apart = [v for v in variances if v in PLOT_APART]  # far above the others: their own panel, their own scale
    fig, axes = plt.subplots(1, 2 if apart else 1, figsize=(9 if apart else 6, 4), squeeze=False,
                             gridspec_kw={"width_ratios": [2, 1] if apart else [1]})
    for variance in variances:
        ax = axes[0, 1] if variance in apart else axes[0, 0]
        for trajectory, style in (("even", "--"), ("optimal", "-")):
            rows = [x for x in r["nll"] if x["variance"] == variance and x["trajectory"] == trajectory]
            ax.errorbar([x["K"] for x in rows], [x["bpd"] for x in rows], [x["stderr"] for x in rows], fmt=style,
                        marker="o", label=f"{variance} ({trajectory})")
    axes[0, 0].set(xscale="log", xlabel="K", ylabel="NLL bound (bits/dim)", title=r["model"])
    if apart:
        axes[0, 1].set(xscale="log", yscale="log", xlabel="K", title=f"{', '.join(apart)}: own scale (log)")
    for ax in axes[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{name}_nll.png", dpi=110)
    plt.close(fig)
    q = r["sample_quality"]
    if q["rows"]:
        fig = (_fd_bars if len(r["steps"]) == 1 else _fd_lines)(plt, r)
        fig.savefig(out / f"{name}_fd.png", dpi=110)
        plt.close(fig)


def _floor_label(q: dict) -> str:
    """The real-data line's label: at fewer images than a cell it is not the floor at the cells' n."""
    floor = q["real_floor"]
    below = floor["num_images"] < q["num_samples"]
    return (f"real evaluation images (n={floor['num_images']}" + (f"; not the floor at the cells' n={q['num_samples']})"
                                                                   if below else ")"))


def _fd_lines(plt, r: dict):
    """FD against K, one line per method."""
    q = r["sample_quality"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(x["method"] for x in q["rows"]):
        rows = [x for x in q["rows"] if x["method"] == method]
        ax.errorbar([x["K"] for x in rows], [x["fd"] for x in rows], [x["stderr"] for x in rows], marker="o",
                    label=method)
    ax.axhline(q["real_floor"]["fd"], color="grey", lw=0.8, label=_floor_label(q))
    ax.set(xscale="log", yscale="log", xlabel="K", ylabel=q["measure"], title=r["model"])
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _fd_bars(plt, r: dict):
    """One K: the methods ranked by FD, best on top, as bars with their bootstrap standard errors."""
    q = r["sample_quality"]
    rows = sorted(q["rows"], key=lambda x: x["fd"], reverse=True)
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.5))
    ax.barh([x["method"] for x in rows], [x["fd"] for x in rows], xerr=[x["stderr"] for x in rows], capsize=3,
            color=["tab:orange" if x.get("uses_table") else "tab:blue" for x in rows])
    ax.axvline(q["real_floor"]["fd"], color="grey", lw=0.8, label=_floor_label(q))
    ax.set(xlabel=q["measure"], title=f"{r['model']}, K = {r['steps'][0]} (orange: uses the table)")
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig

