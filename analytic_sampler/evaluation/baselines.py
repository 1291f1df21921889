"""The samplers compared at K steps: Analytic-DPM's variants and the Diffusers schedulers a user would run instead.

Every sampler is built ``from_config`` on the model's own scheduler config, so each runs on the timesteps that
config's ``timestep_spacing`` gives it (Diffusers' multistep solvers space K + 1 points and drop the last, so their
"leading" ends above DDIM's), unless ``spacing`` overrides the spacing or ``timesteps`` gives the trajectory; the
caller records the timesteps each one used. DDIM appears twice: ``DDIMScheduler`` keeps the model's eps next to the
clipped x0 (its default), and "DDIM (eps from clipped x0)" recomputes eps from the clipped x0 as Analytic-DDIM does,
so that pair differs only by Analytic-DDIM's noise. On an explicit trajectory, which DDIMScheduler cannot run, that
second DDIM is its exact equivalent ``DPMSolverMultistepScheduler(solver_order=1)`` with x0 clipped to the data range.
DPM-Solver++ and UniPC ignore ``clip_sample``; where the config asks for it (range 1) they clip x0 too, through their
thresholding with ``sample_max_value=1`` (which is then exactly a clip to [-1, 1]): without it, on the cosine
schedule, a trajectory that starts at t = N-1 divides the model's error by ``sqrt(abar[N-1]) = 5e-5`` and its
samples are noise. Any other Diffusers scheduler joins by its class name (:func:`diffusers_sampler`).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import diffusers
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    UniPCMultistepScheduler,
)

from ..fitted_timesteps import FittedTimesteps, fitted_timesteps
from ..sample_trajectory import sample_quality_trajectory
from ..schedulers.analytic_dpm import AnalyticDPMScheduler
from ..schedulers.dpm_solver_v3 import DPMSolverV3Scheduler

LEARNED = ("learned", "learned_range")
SPACINGS = ("leading", "linspace", "trailing", "karras")
#: Diffusers schedulers by row name: ``(class, from_config options, step options)``.
PEERS: dict[str, tuple[type, dict[str, Any], dict[str, Any]]] = {
    "DDPM (btilde)": (DDPMScheduler, {"variance_type": "fixed_small"}, {}),
    "DDPM (beta)": (DDPMScheduler, {"variance_type": "fixed_large"}, {}),
    "Improved DDPM (learned)": (DDPMScheduler, {"variance_type": "learned_range"}, {}),
    "DDIM": (DDIMScheduler, {}, {}),
    "DDIM (eps from clipped x0)": (DDIMScheduler, {}, {"use_clipped_model_output": True}),
    "DPM-Solver++(2M)": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}, {}),
    "UniPC": (UniPCMultistepScheduler, {"solver_type": "bh2"}, {}),
    "Euler ancestral": (EulerAncestralDiscreteScheduler, {}, {}),
}
#: Analytic-DPM's variants by row name: ``AnalyticDPMScheduler.from_table(table, config, **options)`` options;
#: ``SAMPLE_TRAJECTORY`` marks a row that runs the table's sample-quality trajectory (tables with a sample cost),
#: ``WITHOUT_CONFIG`` one built from the table alone (``from_table(table)``: the scheduler's own defaults, trailing
#: spacing), where "(model's spacing)" takes the model's config and so its spacing, as a drop-in replacement does.
SAMPLE_TRAJECTORY = "sample_quality_trajectory"
WITHOUT_CONFIG = "without_config"
ANALYTIC: dict[str, dict[str, Any]] = {
    "Analytic-DPM (defaults)": {WITHOUT_CONFIG: True},
    "Analytic-DPM (model's spacing)": {},
    "Analytic-DDPM": {"eta": 1.0, "variance": "analytic", "variance_cap_y": None},
    "Analytic-DDIM": {"eta": 0.0, "variance": "analytic", "variance_cap_y": None},
    "Analytic-DDPM (cap y=2)": {"eta": 1.0, "variance": "analytic", "variance_cap_y": 2.0},
    "Analytic-DDIM (cap y=2)": {"eta": 0.0, "variance": "analytic", "variance_cap_y": 2.0},
    "Analytic-DDPM (residual)": {"eta": 1.0, "variance": "residual", "variance_cap_y": None},
    "Analytic-DDPM (optimal trajectory)": {"eta": 1.0, "variance": "residual", "variance_cap_y": None,
                                           "timestep_spacing": "optimal"},
    "Analytic-DDPM (sample trajectory)": {"eta": 1.0, "variance": "analytic", "variance_cap_y": None,
                                          SAMPLE_TRAJECTORY: True},
}
#: Rows of a peer on the timesteps the table fitted for its solver (``fitted_timesteps``): ``(peer row, solver key)``;
#: DDIM runs there as its first-order DPM-Solver++ form, DDIMScheduler taking no custom timesteps.
FITTED: dict[str, tuple[str, str]] = {
    "DPM-Solver++(2M) (fitted timesteps)": ("DPM-Solver++(2M)", "dpm-solver++"),
    "UniPC (fitted timesteps)": ("UniPC", "unipc"),
    "DDIM (fitted timesteps)": ("DDIM (eps from clipped x0)", "ddim"),
}
#: DPM-Solver-v3 on the model's solver statistics (``DPMSolverV3Scheduler.from_table(statistics, config)``: its
#: fitted timesteps for K where the statistics have them, else its logsnr spacing); applies where statistics exist.
SOLVER_V3 = "DPM-Solver-v3"
#: What ``bench`` samples by default: the peers a user would pick and the variants that tell the analytic variance
#: apart (the same mean with and without its noise).
BENCH_METHODS = ("DDIM", "DDIM (eps from clipped x0)", "DPM-Solver++(2M)", "UniPC", "Euler ancestral",
                 "DDPM (btilde)", "Analytic-DPM (defaults)", "Analytic-DPM (model's spacing)", "Analytic-DDPM",
                 "Analytic-DDIM",
                 "Analytic-DDPM (optimal trajectory)", "Analytic-DDPM (sample trajectory)", *FITTED, SOLVER_V3)


@dataclass
class Sampler:
    """One compared sampler: its scheduler, an explicit trajectory (``None``: the scheduler's own spacing for K) and
    the options its ``step`` takes."""

    scheduler: Any
    timesteps: list[int] | None = None
    step_kwargs: dict[str, Any] = field(default_factory=dict)


def _spacing_options(cls: type, spacing: str | None) -> dict[str, Any]:
    if spacing is None:
        return {}
    if spacing not in SPACINGS:
        raise ValueError(f"spacing={spacing!r}; use one of {SPACINGS}.")
    if spacing == "karras":
        if "use_karras_sigmas" not in inspect.signature(cls.__init__).parameters:
            raise ValueError(f"{cls.__name__} has no Karras sigmas (use_karras_sigmas); use another spacing.")
        return {"use_karras_sigmas": True}
    return {"timestep_spacing": spacing}


def _clip_as_thresholding(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config's ``clip_sample`` (range 1) in the terms of DPM-Solver / UniPC: thresholding capped at 1."""
    if config.get("clip_sample", False) and float(config.get("clip_sample_range", 1.0)) == 1.0:
        return {"thresholding": True, "sample_max_value": 1.0, "dynamic_thresholding_ratio": 1.0}
    return {}


def _variance_half(cls: type, config: Mapping[str, Any]) -> dict[str, Any]:
    """Only DDPMScheduler reads a learned variance; any other scheduler taking ``variance_type`` gets ``None`` (its
    learned-variance path assumes 3 channels), so the sampling loop hands it the prediction half alone."""
    if cls is DDPMScheduler or "variance_type" not in inspect.signature(cls.__init__).parameters:
        return {}
    return {"variance_type": None} if config.get("variance_type") in LEARNED else {}


def check_names(names: Sequence[str]) -> list[str]:
    """``names`` if each is a compared sampler or a Diffusers scheduler class, else a ValueError naming the options
    (checked before any work)."""
    for name in names:
        if name in ANALYTIC or name in PEERS or name in FITTED or name == SOLVER_V3:
            continue
        cls = getattr(diffusers, name, None)
        if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
            known = [n for n in dir(diffusers) if n.endswith("Scheduler")]
            close = difflib.get_close_matches(name, [*ANALYTIC, *PEERS, *known], n=3)
            rows = ", ".join([*ANALYTIC, *PEERS, SOLVER_V3])
            raise ValueError(f"{name!r} is neither a compared sampler ({rows}) nor a "
                             f"Diffusers scheduler class{f'; did you mean {close}?' if close else ''}")
    return list(names)


def diffusers_sampler(name: str, config: Mapping[str, Any], spacing: str | None = None,
                      timesteps: Sequence[int] | None = None) -> Sampler:
    """A row of :data:`PEERS`, or any Diffusers scheduler by class name (``"HeunDiscreteScheduler"``), on the model's
    ``config``; explicit ``timesteps`` for DDIM with eps from the clipped x0 run on its first-order DPM-Solver form."""
    if name in PEERS:
        cls, options, step = PEERS[name]
    else:
        cls, options, step = getattr(diffusers, check_names([name])[0]), {}, {}
    if timesteps is not None and name == "DDIM (eps from clipped x0)":
        cls, step = DPMSolverMultistepScheduler, {}
        options = {"solver_order": 1, "algorithm_type": "dpmsolver++", "final_sigmas_type": "zero"}
    if cls in (DPMSolverMultistepScheduler, UniPCMultistepScheduler):
        options = {**_clip_as_thresholding(config), **options}
    learned = options.get("variance_type") == "learned_range"
    if cls is DDPMScheduler and learned and config.get("variance_type") not in LEARNED:
        raise ValueError(f"{name} needs a model trained with learned variances (variance_type learned_range).")
    options = {**_variance_half(cls, config), **options, **_spacing_options(cls, spacing)}
    scheduler = cls.from_config(dict(config), **options)
    return Sampler(scheduler, None if timesteps is None else list(timesteps), dict(step))


def analytic_sampler(name: str, config: Mapping[str, Any], table, spacing: str | None = None,
                     timesteps: Sequence[int] | None = None, num_steps: int | None = None) -> Sampler:
    """A row of :data:`ANALYTIC` from ``table`` and the model's ``config`` (``num_steps``: the K of a row that runs
    the sample-quality trajectory)."""
    options = dict(ANALYTIC[name])
    if options.pop(WITHOUT_CONFIG, False) and spacing is None and timesteps is None:
        return Sampler(AnalyticDPMScheduler.from_table(table))
    if options.pop(SAMPLE_TRAJECTORY, False) and timesteps is None:
        if num_steps is None:
            raise ValueError(f"{name} needs the number of steps to choose its trajectory; pass num_steps.")
        timesteps = sample_quality_trajectory(table, num_steps)
    if spacing is not None and "timestep_spacing" not in options:
        options.update(_spacing_options(AnalyticDPMScheduler, spacing))
    return Sampler(AnalyticDPMScheduler.from_table(table, dict(config), **options),
                   None if timesteps is None else list(timesteps))


def solver_v3_sampler(config: Mapping[str, Any], statistics, spacing: str | None = None,
                      timesteps: Sequence[int] | None = None) -> Sampler:
    """:data:`SOLVER_V3` on ``statistics`` (``SolverStatistics``) and the model's ``config``: its own spacing
    (fitted, else logsnr), or a Diffusers ``spacing`` (not Karras), or explicit ``timesteps``."""
    if statistics is None:
        raise ValueError(f"{SOLVER_V3} needs the model's solver statistics (a table folder with them, or "
                         "`analytic-sampler precompute`'s statistics pass).")
    options = {} if spacing is None else _spacing_options(DPMSolverV3Scheduler, spacing)
    return Sampler(DPMSolverV3Scheduler.from_table(statistics, dict(config), **options),
                   None if timesteps is None else list(timesteps))


def build_sampler(name: str, config: Mapping[str, Any], table, spacing: str | None = None,
                  timesteps: Sequence[int] | None = None, num_steps: int | None = None, statistics=None) -> Sampler:
    """Any row by name: Analytic-DPM's (:data:`ANALYTIC`), a peer (:data:`PEERS`), a peer on fitted timesteps
    (:data:`FITTED`), DPM-Solver-v3 on ``statistics`` (:data:`SOLVER_V3`) or a Diffusers class name."""
    if name == SOLVER_V3:
        return solver_v3_sampler(config, statistics, spacing, timesteps)
    if name in FITTED and timesteps is None:
        peer, solver = FITTED[name]
        if num_steps is None:
            raise ValueError(f"{name} needs the number of steps to pick its fitted timesteps; pass num_steps.")
        return diffusers_sampler(peer, config, spacing, fitted_timesteps(table, solver, num_steps))
    if name in FITTED:
        return diffusers_sampler(FITTED[name][0], config, spacing, timesteps)
    if name in ANALYTIC:
        return analytic_sampler(name, config, table, spacing, timesteps, num_steps)
    return diffusers_sampler(name, config, spacing, timesteps)


def applies(name: str, config: Mapping[str, Any], table, num_steps: int | None = None, statistics=None) -> bool:
    """Whether a row applies to the model: the learned variance needs a model trained for it, the residual rows a
    table with x0_mse, a fitted row a table with timesteps fitted for its solver (at ``num_steps``), DPM-Solver-v3
    solver ``statistics``."""
    if name == SOLVER_V3:
        return statistics is not None
    if name in FITTED:
        if not table.has_fitted_timesteps or FITTED[name][1] not in table.fitted_solvers:
            return False
        return num_steps is None or num_steps in FittedTimesteps.from_table(table).steps
    if name == "Improved DDPM (learned)":
        return config.get("variance_type") in LEARNED
    if ANALYTIC.get(name, {}).get(SAMPLE_TRAJECTORY):
        return table.path_timesteps is not None
    return ANALYTIC.get(name, {}).get("variance") != "residual" or table.has_x0_mse


def sampling_methods(config, table, num_steps: int, names: Sequence[str] = BENCH_METHODS, spacing: str | None = None,
                     statistics=None) -> dict[str, Sampler]:
    """``name -> Sampler`` at K = ``num_steps`` for the ``names`` that apply to the model (``statistics``: its
    solver statistics, for DPM-Solver-v3), on the config's spacing or ``spacing``."""
    config = dict(config)
    return {name: build_sampler(name, config, table, spacing, num_steps=num_steps, statistics=statistics)
            for name in names if applies(name, config, table, num_steps, statistics)}
