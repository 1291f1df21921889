"""The Monte Carlo pass behind fitted timesteps (:mod:`analytic_sampler.fitted_timesteps`): for each solver and each
K, the K model-call timesteps whose samples come closest to the model's own ODE solution from the same noise.

Teacher: P paths from ``x_T ~ N(0, I)``, the noise sampling starts from. A sampler is judged by its distance to the
ODE solution from its own x_T, so the fit trains on exactly that: the states the solver visits from noise, not
forward-noised data (whose x_t have the right marginals but lie on no sampler's path), and it needs no images at all
(a latent pipeline fits from its prompts alone). Each path is solved by the reference solve (DPM-Solver++(3M) on
``reference_steps`` integer timesteps, ``x0_hat`` limited as the model's config limits it), keeping the state
``x_g`` and data prediction ``m_g`` at G candidate timesteps (:func:`candidate_grid`) and the end ``x_end``.

Student DP (Optimal Stepsize Distillation, Pei et al. 2025; measured ahead of GITS' local-cost DP): level k holds,
for every candidate node j, the solver's own state after k model calls ending at j, reached from the level k-1 node
whose step lands closest to the teacher there::

    i*(j) = argmin_i  mean_p |Phi(state_i; t_i -> t_j) - x_j|^2        (UniPC's corrector: the teacher's m_j)

then one model call per node at its chosen state gives its ``m_j``: ``P`` calls per node and level. The K-call
trajectory is the level-K node whose ``m`` lies closest to ``x_end`` (every solver here returns the last call's
``m``). Start nodes: N-1 and the candidates at or above ``start_min (N-1)``; x_T is taken as x there, as Diffusers'
"leading" spacing does, and the error still counts from the solve that starts at N-1. The levels run one after
another, so the pass checkpoints after the teacher and after every level, and a rerun of the same settings resumes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..denoiser import Denoiser, X0Limit
from ..fingerprint import values_fingerprint, weights_fingerprint
from ..fitted_timesteps import FittedTimesteps
from ..noise import noise_generator
from ..schedule import as_alphas_cumprod, schedule_fingerprint
from ..solver_specs import DPMPP_3M, FITTED_SOLVERS, Solver, solver_by_key
from ..solvers import DEFAULT_REFERENCE_STEPS, SolverState, advance, arrive, log_snr_half, reference_grid, solve

CHECKPOINT_FORMAT = 1
ELEMENTS_PER_CHUNK = 1 << 23  # candidate states formed at once (64 MB of float64)


@dataclass(frozen=True)
class FitOptions:
    """Settings of the fit: the ``solvers`` (keys of :data:`~analytic_sampler.solver_specs.FITTED_SOLVERS`), K from
    ``min_steps`` to ``max_steps``, ``num_paths`` teacher paths from noise seeded by ``seed``, ``candidates``
    timesteps to choose from, the teacher's ``reference_steps``, the lowest start ``start_min`` (a fraction of N-1)
    and ``batch_size`` rows per model call."""

    solvers: tuple[str, ...] = tuple(FITTED_SOLVERS)
    max_steps: int = 25
    min_steps: int = 2
    num_paths: int = 64
    candidates: int = 120
    reference_steps: int = DEFAULT_REFERENCE_STEPS
    start_min: float = 0.5
    seed: int = 0
    batch_size: int = 256

    def __post_init__(self):
        object.__setattr__(self, "solvers", tuple(self.solvers))
        for key in self.solvers:
            solver_by_key(key)
        if not self.solvers:
            raise ValueError("fit at least one solver (e.g. solvers=('dpm-solver++',)).")
        if not 2 <= self.min_steps <= self.max_steps:
            raise ValueError(f"min_steps={self.min_steps}, max_steps={self.max_steps}: need 2 <= min_steps <= "
                             "max_steps.")
        if self.num_paths < 2 or self.batch_size < 1:
            raise ValueError(f"num_paths={self.num_paths} must be at least 2 and batch_size at least 1.")
        if self.candidates <= self.max_steps:
            raise ValueError(f"candidates={self.candidates} must exceed max_steps={self.max_steps}: a K-step "
                             "trajectory takes K candidate timesteps.")
        if not 0.0 <= self.start_min <= 1.0:
            raise ValueError(f"start_min={self.start_min} is a fraction of N-1, between 0 and 1.")


def candidate_grid(alphas_cumprod, reference: Sequence[int], count: int) -> np.ndarray:
    """About ``count`` timesteps of the (descending) ``reference`` grid, descending: ``count / 2`` spaced evenly in
    t and ``count / 2`` evenly in ``lambda`` (log-SNR / 2), each moved to the nearest reference point; N-1 and the
    last reference point always included."""
    ref = np.asarray(reference, dtype=np.int64)
    lam = log_snr_half(alphas_cumprod, ref).numpy()
    half = max(2, count // 2)
    wanted_t = np.linspace(ref[0], ref[-1], half)
    wanted_lam = np.linspace(lam[0], lam[-1], half)
    index = np.concatenate([np.abs(ref[None, :] - wanted_t[:, None]).argmin(1),
                            np.abs(lam[None, :] - wanted_lam[:, None]).argmin(1)])
    return ref[np.unique(index)]


@dataclass
class Teacher:
    """The teacher's ``x_T`` ``(P, D)``, its states ``x`` and predictions ``m`` ``(P, G, D)`` on the descending
    ``grid``, the final ``x_end`` ``(P, D)``, and the model's ``m`` at ``x_T`` for each start timestep."""

    grid: np.ndarray
    shape: tuple[int, ...]
    x_T: torch.Tensor
    x: torch.Tensor
    m: torch.Tensor
    x_end: torch.Tensor
    start_m: dict[int, torch.Tensor]


def _reference(alphas_cumprod, options: FitOptions) -> list[int]:
    """The teacher's timesteps: ``reference_steps`` of them, or every one of a shorter schedule."""
    return reference_grid(len(alphas_cumprod), min(options.reference_steps, len(alphas_cumprod)))


def make_teacher(denoiser: Denoiser, x_T: torch.Tensor, alphas_cumprod, options: FitOptions) -> Teacher:
    """Solve the teacher paths (module docstring) and call the model at ``x_T`` at every start timestep below
    N-1."""
    reference = _reference(alphas_cumprod, options)
    grid = candidate_grid(alphas_cumprod, reference, options.candidates)
    keep = [reference.index(int(t)) for t in grid]
    final, kept = solve(DPMPP_3M, denoiser, x_T, reference, alphas_cumprod, keep)
    x = torch.stack([kept[i][0].flatten(1) for i in keep], 1)
    m = torch.stack([kept[i][1].flatten(1) for i in keep], 1)
    start_m = {int(grid[0]): m[:, 0]}
    for t in start_timesteps(grid, options.start_min)[1:]:
        start_m[t] = denoiser(x_T, torch.full((x_T.shape[0],), t))[0].flatten(1)
    return Teacher(grid, tuple(x_T.shape[1:]), x_T.double().flatten(1), x, m, final.flatten(1), start_m)


def start_timesteps(grid: np.ndarray, start_min: float) -> list[int]:
    """The candidates a trajectory may start at: N-1 (the grid's first) and those at or above ``start_min`` of
    it, descending."""
    return [int(t) for t in grid if t >= start_min * grid[0]]


@dataclass
class Level:
    """The student's nodes after k model calls: per node its timestep ``t``, state ``x``, the model's ``m`` at it,
    the previous node's ``hist_m`` and ``hist_lam`` (None at the first level), and the trajectory ``paths``."""

    t: list[int]
    x: torch.Tensor  # (L, P, D)
    m: torch.Tensor
    hist_m: torch.Tensor | None
    hist_lam: torch.Tensor | None
    paths: list[list[int]]


def first_level(teacher: Teacher) -> Level:
    starts = sorted(teacher.start_m, reverse=True)
    x = teacher.x_T.expand(len(starts), *teacher.x_T.shape)
    return Level(starts, x, torch.stack([teacher.start_m[t] for t in starts]), None, None, [[t] for t in starts])


def _state(level: Level, rows: torch.Tensor, lam: torch.Tensor) -> SolverState:
    """The solver state of the level's nodes ``rows`` (leading dimension), lambdas shaped to broadcast."""
    lams = [lam[rows].view(-1, 1, 1)]
    ms = [level.m[rows]]
    if level.hist_m is not None:
        ms.append(level.hist_m[rows])
        lams.append(level.hist_lam[rows].view(-1, 1, 1))
    return SolverState(level.x[rows], ms, lams)


def _chosen_sources(solver: Solver, level: Level, lam_of, teacher: Teacher, order: int) -> dict[int, int]:
    """For each grid node j reachable from the level, the level node whose step lands closest to the teacher's
    ``x_j`` (module docstring)."""
    level_t = torch.tensor(level.t)
    lam_level = lam_of(level.t)
    width = level.x.shape[1] * level.x.shape[2]
    chunk = max(1, ELEMENTS_PER_CHUNK // width)
    chosen = {}
    for j, t in enumerate(teacher.grid.tolist()):
        sources = torch.nonzero(level_t > t).flatten()
        if sources.numel() == 0:
            continue
        lam_j = lam_of([t])[0]
        errors = []
        for rows in sources.split(chunk):
            state = _state(level, rows, lam_level)
            x, started = advance(solver, state, lam_j, order)
            x = arrive(solver, started, x, teacher.m[:, j], lam_j).x
            errors.append(((x - teacher.x[:, j]) ** 2).mean((1, 2)))
        chosen[j] = int(sources[int(torch.cat(errors).argmin())])
    return chosen


def next_level(solver: Solver, level: Level, teacher: Teacher, denoiser: Denoiser, alphas_cumprod,
               order: int) -> Level:
    """The student's level after one more model call: every reachable grid node, from its chosen source."""
    lam_of = lambda ts: log_snr_half(alphas_cumprod, ts)  # noqa: E731
    chosen = _chosen_sources(solver, level, lam_of, teacher, order)
    targets, sources = list(chosen), torch.tensor(list(chosen.values()))
    t_new = teacher.grid[targets].tolist()
    lam_new = lam_of(t_new).view(-1, 1, 1)
    state = _state(level, sources, lam_of(level.t))
    predicted, started = advance(solver, state, lam_new, order)
    num, paths = predicted.shape[:2]
    m, _ = denoiser(predicted.reshape(num * paths, *teacher.shape), torch.tensor(t_new).repeat_interleave(paths),
                    torch.arange(paths).repeat(num))
    m = m.reshape(num, paths, -1)
    arrived = arrive(solver, started, predicted, m, lam_new)
    return Level(t_new, arrived.x, m, state.ms[0], lam_of(level.t)[sources],
                 [level.paths[i] + [t] for i, t in zip(sources.tolist(), t_new)])


def fitted_steps(alphas_cumprod, options: FitOptions) -> list[int]:
    """The K values a fit gives: ``min_steps`` to ``max_steps``, at most as many as the candidate grid has points (a
    short schedule's grid can be smaller)."""
    size = candidate_grid(alphas_cumprod, _reference(alphas_cumprod, options), options.candidates).size
    return list(range(min(options.min_steps, size), min(options.max_steps, size) + 1))


def planned_calls(alphas_cumprod, options: FitOptions) -> dict[str, int]:
    """The model calls of an uninterrupted fit: the teacher's (``P`` x (reference steps + starts below N-1)) and
    each solver's student (``P`` x (G-1 + G-2 + … + G-K_max+1): level k+1 holds the candidates below level k's
    highest)."""
    reference = _reference(alphas_cumprod, options)
    grid = candidate_grid(alphas_cumprod, reference, options.candidates)
    p, g = options.num_paths, grid.size
    teacher = p * (len(reference) + len(start_timesteps(grid, options.start_min)) - 1)
    student = p * sum(g - k for k in range(1, fitted_steps(alphas_cumprod, options)[-1]))
    return {"teacher": teacher, "per_solver": student, "total": teacher + student * len(options.solvers)}


def _describe_limit(limit: X0Limit) -> Any:
    if callable(limit):
        return f"{getattr(limit, 'func', limit).__name__} {sorted(getattr(limit, 'keywords', {}).items())}"
    return None if limit is None else [float(v) for v in limit]


def fit_key(denoiser: Denoiser, alphas_cumprod, shape: Sequence[int], options: FitOptions,
            extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a fit's checkpoint and result record of the run, and must match to resume: the model's weights and
    conventions, the schedule, the limit on ``x0_hat``, the conditioning (guidance included), the sample shape and
    every option; ``extra``: the caller's fields (a pipeline's prompts)."""
    adapter = denoiser.adapter
    return {
        "model": weights_fingerprint(adapter.model),
        "prediction_type": adapter.prediction_type,
        "timestep_shift": adapter.timestep_shift,
        "timestep_scale": adapter.timestep_scale,
        "schedule": schedule_fingerprint(as_alphas_cumprod(alphas_cumprod)),
        "x0_limit": _describe_limit(denoiser.limit),
        "conditioning": values_fingerprint({**adapter.model_kwargs, **denoiser.path_kwargs}),
        "guidance_scale": adapter.guidance_scale,
        "uncond_kwargs": values_fingerprint(adapter.uncond_kwargs),
        "sample_shape": [int(v) for v in shape],
        **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(options).items()},
        **dict(extra or {}),
    }


def _load_checkpoint(path: str, key: dict[str, Any]) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = state["key"]
    except Exception as err:  # any unreadable or foreign file
        raise ValueError(f"fit checkpoint {path} is unreadable ({type(err).__name__}); delete it to start over.") from err
    if state.get("format") != CHECKPOINT_FORMAT or saved != key:
        differ = sorted(k for k in {*key, *saved} if saved.get(k) != key.get(k))
        raise ValueError(f"fit checkpoint {path} belongs to a run with other settings ({', '.join(differ)}); delete it "
                         "to start over, or rerun with the same settings to resume.")
    return state


def _save_checkpoint(path: str, state: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(state, tmp)
    os.replace(tmp, path)


def _teacher_state(teacher: Teacher) -> dict[str, Any]:
    fields = dataclasses.asdict(teacher)
    fields["grid"], fields["shape"] = torch.from_numpy(teacher.grid), list(teacher.shape)
    fields["start_m"] = {str(t): m for t, m in teacher.start_m.items()}
    return fields


def _teacher_of(fields: dict[str, Any]) -> Teacher:
    starts = {int(t): m for t, m in fields["start_m"].items()}
    return Teacher(fields["grid"].numpy(), tuple(fields["shape"]), fields["x_T"], fields["x"], fields["m"],
                   fields["x_end"], starts)


def initial_noise(num_paths: int, shape: Sequence[int], seed: int) -> torch.Tensor:
    """The fit's x_T: one draw of ``shape`` per path, each from its own generator (stream ``"fit"``), so that more
    paths extend the same set."""
    return torch.stack([torch.randn(tuple(shape), generator=noise_generator(seed, p, stream="fit"), dtype=torch.float64)
                        for p in range(num_paths)])


@dataclass
class FitResult:
    """What :func:`fit_timesteps` returns: the ``fitted`` timesteps, the run's ``key`` and its ``model_calls``
    (of an uninterrupted run, :func:`planned_calls`)."""

    fitted: FittedTimesteps
    key: dict[str, Any]
    model_calls: int


def fit_timesteps(denoiser: Denoiser, alphas_cumprod, shape: Sequence[int], options: FitOptions = FitOptions(),
                  checkpoint: str | os.PathLike | None = None, key_fields: Mapping[str, Any] | None = None,
                  progress: bool = True) -> FitResult:
    """Fit timesteps for every solver of ``options`` to the model behind ``denoiser`` (module docstring).

    Args:
        denoiser: the model's limited data prediction (:class:`~analytic_sampler.denoiser.Denoiser`; its
            ``path_kwargs`` condition each teacher path).
        alphas_cumprod: the model's schedule.
        shape: one sample's shape (C, H, W).
        options: :class:`FitOptions`.
        checkpoint: a file for the teacher and the finished levels; a rerun with the same settings resumes.
        key_fields: more fields of the run key (:func:`fit_key`).
    """
    abar = as_alphas_cumprod(alphas_cumprod)
    key = fit_key(denoiser, abar, shape, options, key_fields)
    path = None if checkpoint is None else os.fspath(checkpoint)
    state = (None if path is None else _load_checkpoint(path, key)) or {"format": CHECKPOINT_FORMAT, "key": key}
    if "teacher" in state:
        teacher = _teacher_of(state["teacher"])
    else:
        teacher = make_teacher(denoiser, initial_noise(options.num_paths, shape, options.seed), abar, options)
        state.update(teacher=_teacher_state(teacher), done={})
        if path is not None:
            _save_checkpoint(path, state)
    planned = planned_calls(abar, options)
    steps = fitted_steps(abar, options)
    options = dataclasses.replace(options, min_steps=steps[0], max_steps=steps[-1])
    bar = tqdm(total=len(options.solvers) * (options.max_steps - 1), desc="fitting timesteps (levels)", unit="level",
               disable=not progress)
    for solver_key in options.solvers:
        if solver_key in state["done"]:
            bar.update(options.max_steps - 1)
            continue
        state["done"][solver_key] = _fit_solver(solver_by_key(solver_key), solver_key, teacher, denoiser, abar,
                                                options, state, path, bar)
        if path is not None:
            _save_checkpoint(path, state)
    bar.close()
    paths = {s: {int(k): v for k, v in state["done"][s]["paths"].items()} for s in options.solvers}
    errors = {s: {int(k): v for k, v in state["done"][s]["errors"].items()} for s in options.solvers}
    return FitResult(FittedTimesteps.build(paths, errors), key, planned["total"])


def _fit_solver(solver: Solver, solver_key: str, teacher: Teacher, denoiser: Denoiser, abar, options: FitOptions,
                state: dict[str, Any], path: str | None, bar) -> dict[str, Any]:
    """The student DP of one solver, from its level in the checkpoint (if any) to ``max_steps``; its trajectories
    and errors by K."""
    current = state.get("current")
    if current is not None and current["solver"] == solver_key:
        level, k = Level(**current["level"]), current["k"]
        paths, errors = current["paths"], current["errors"]
    else:
        level, k, paths, errors = first_level(teacher), 1, {}, {}
    bar.update(k - 1)
    while True:
        if k >= options.min_steps:
            distance = ((level.m - teacher.x_end) ** 2).mean((1, 2))
            best = int(distance.argmin())
            paths[str(k)], errors[str(k)] = level.paths[best], float(distance[best].sqrt())
        if k == options.max_steps:
            break
        order = 1 if level.hist_m is None else solver.order
        level = next_level(solver, level, teacher, denoiser, abar, order)
        k += 1
        bar.update()
        state["current"] = {"solver": solver_key, "k": k, "level": dataclasses.asdict(level), "paths": paths,
                            "errors": errors}
        if path is not None:
            _save_checkpoint(path, state)
    state.pop("current", None)
    return {"paths": paths, "errors": errors}


def pipeline_model(pipe, prompts: Sequence[str], guidance_scale: float | None = None,
                   negative_prompt: str | None = None) -> tuple[Any, dict[str, torch.Tensor], dict[str, Any]]:
    """A latent text-to-image pipeline as the fit's model: its UNet's eps, guided at ``guidance_scale`` (``> 1``;
    otherwise the conditional eps) as the pipeline samples, the embeddings of one prompt per path (``path_kwargs``)
    and the run key's fields that identify them (the guidance scale enters the key through the adapter)."""
    import hashlib

    from ..adapter import as_epsilon_model
    from .latents import encode_prompts

    guided = guidance_scale is not None and guidance_scale > 1
    negative = (negative_prompt or "") if guided else None
    options = {"guidance_scale": float(guidance_scale),
               "uncond_kwargs": {"encoder_hidden_states": encode_prompts(pipe, [negative])}} if guided else {}
    adapter = as_epsilon_model(pipe.unet, pipe.scheduler, **options)
    names = sorted(n for n, c in pipe.components.items() if n.startswith("text_encoder") and c)
    key = {"prompts": hashlib.sha256("\x00".join(prompts).encode()).hexdigest()[:16], "negative_prompt": negative,
           **{f"{name}_weights": weights_fingerprint(getattr(pipe, name)) for name in names}}
    return adapter, {"encoder_hidden_states": encode_prompts(pipe, list(prompts))}, key
