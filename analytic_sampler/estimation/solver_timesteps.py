"""Timesteps fitted to DPM-Solver-v3 on one model: for each K, the K model calls whose solution lies closest to the
probability-flow ODE's, measured on paths from seeded ``x_T``.

Teacher: the solver itself on ``teacher_steps`` evenly spaced timesteps from N-1 to 0 (converged: its distance to a
500-step DPM-Solver++(3M) solution is far below any few-step solver's error). Objective of a trajectory: the mean over
the paths of the RMS distance of its output (the data prediction at its last call, clipped to the data range) to the
teacher's, as the benchmarks score it (an RMS over all paths at once lets a few hard paths choose). Search: a family
of trajectories from t = N-1 to each ``t_last`` (lambda spaced as ``u^(1/power)``,
:func:`~analytic_sampler.solver_statistics.logsnr_timesteps`' rule, and t spaced evenly, Diffusers' linspace rule),
then coordinate descent on integer timesteps from the ``starts`` best of them (every single move of ``+-d`` that keeps
the order, the best improving one taken, up to ``rounds`` per ``d``, ``d`` halving from 64 to 2), the first timestep
kept at N-1; the best end wins (the timesteps are coupled: a lone move out of a local optimum raises the error). One
start, one move per size and the all-paths RMS ended 24% further from the ODE on the bundled cosine model at K = 5
(0.087 against 0.070 RMS to the reference solution, 1000 samples).
``K x paths`` model calls per trajectory tried.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..adapter import as_epsilon_model
from ..noise import noise_generator
from ..predictions import x0_from_eps
from ..schedule import as_alphas_cumprod
from ..solver_coefficients import SolverRun, solver_plan
from ..solver_statistics import SolverStatistics, half_log_snr, logsnr_timesteps


@dataclass(frozen=True)
class V3FitOptions:
    """How the timesteps are fitted (module docstring).

    Args:
        steps (`tuple[int, ...]`, defaults to `(3, 5, 7, 10)`):
            The K to fit (from 2 to 15: beyond, the coordinate descent's cost grows as K^2 and the gain shrinks).
        paths (`int`, defaults to 128):
            Paths from seeded ``x_T``.
        teacher_steps (`int`, defaults to 250):
            The teacher's model calls.
        t_lasts, powers (`tuple`):
            The family's grid.
        starts (`int`, defaults to 3):
            The family's best trajectories the descent starts from.
        moves (`tuple[int, ...]`, defaults to `(64, 32, 16, 8, 4, 2)`):
            The coordinate descent's step sizes.
        rounds (`int`, defaults to 8):
            Improving moves taken per step size at most.
        order, corrector, lower_order_final:
            The solver fitted for (the scheduler's ``solver_order``, ``use_corrector``, ``lower_order_final``).
        seed (`int`, defaults to 0):
            Seeds ``x_T`` (a stream of its own: never the noise a sampling run of the same seed starts from).
        batch_size (`int`, defaults to 256):
            Paths per model call.
    """

    steps: tuple[int, ...] = (3, 5, 7, 10)
    paths: int = 128
    teacher_steps: int = 250
    t_lasts: tuple[int, ...] = (10, 20, 40, 70, 120, 200)
    powers: tuple[float, ...] = (1.0, 1.5, 2.0, 2.5, 3.0)
    starts: int = 3
    moves: tuple[int, ...] = (64, 32, 16, 8, 4, 2)
    rounds: int = 8
    order: int = 3
    corrector: bool = True
    lower_order_final: bool = True
    seed: int = 0
    batch_size: int = 256

    def __post_init__(self):
        if any(not 2 <= k <= 15 for k in self.steps):
            raise ValueError(f"steps={self.steps}: fit K from 2 to 15 (larger K use the logsnr spacing).")
        if min(self.paths, self.teacher_steps - 1, self.rounds, self.starts) < 1:
            raise ValueError("paths, starts and rounds must be at least 1, teacher_steps at least 2.")


class _Objective:
    """The solver on the paths for any trajectory, against the teacher's output (module docstring)."""

    def __init__(self, adapter, statistics: SolverStatistics, abar: np.ndarray, x_t: torch.Tensor,
                 options: V3FitOptions, kwargs: Mapping[str, Any]):
        self.adapter, self.statistics, self.abar, self.x_t = adapter, statistics, abar, x_t
        self.options, self.kwargs, self.calls, self.seen = options, dict(kwargs), 0, {}
        n = abar.size
        self.teacher = self.output(np.unique(np.linspace(0, n - 1, options.teacher_steps).round()).astype(int)[::-1])

    @torch.inference_mode()
    def output(self, trajectory) -> torch.Tensor:
        """The solver's output (clipped data prediction at the last call) from every path."""
        trajectory = [int(t) for t in trajectory]
        plan = solver_plan(self.statistics, half_log_snr(self.abar)[trajectory], self.options.order,
                           self.options.corrector, self.options.lower_order_final)
        plan = plan.to(lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.x_t))
        outs, size, clip = [], self.options.batch_size, self.statistics.data_range
        for lo in range(0, self.x_t.shape[0], size):
            run, x = SolverRun(plan), self.x_t[lo : lo + size]
            for i, t in enumerate(trajectory):
                alpha = plan.alpha[i]
                t_in = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
                eps = self.adapter(x.float(), t_in, **self.kwargs).to(x.dtype)
                d = x0_from_eps(eps, x, alpha, (1 - alpha**2).sqrt())
                x = run.advance(i, x, d if clip is None else d.clamp(*clip))
            outs.append(x)
            self.calls += x.shape[0] * len(trajectory)
        return torch.cat(outs)

    def __call__(self, trajectory) -> float:
        """The objective, each trajectory solved once."""
        key = tuple(int(t) for t in trajectory)
        if key not in self.seen:
            clip = self.statistics.data_range or (-np.inf, np.inf)
            diff = self.output(key).clamp(*clip) - self.teacher.clamp(*clip)
            self.seen[key] = float(diff.flatten(1).pow(2).mean(1).sqrt().mean())
        return self.seen[key]


def _family(abar: np.ndarray, k: int, options: V3FitOptions) -> list[list[int]]:
    """The search's starting candidates (module docstring), distinct."""
    out = []
    for t_last in options.t_lasts:
        even = np.linspace(abar.size - 1, t_last, k).round().astype(int).tolist()
        if np.all(np.diff(even) < 0):
            out.append(even)
        for power in options.powers:
            try:
                out.append(logsnr_timesteps(abar, k, t_last, power))
            except ValueError:  # rounds to repeated timesteps
                continue
    return [list(t) for t in dict.fromkeys(map(tuple, out))]


def _descend(objective: _Objective, start: list[int], options: V3FitOptions) -> tuple[list[int], float]:
    """Coordinate descent on the integer timesteps (module docstring); the first one stays."""
    best, value = list(start), objective(start)
    top = objective.abar.size - 1
    for d in options.moves:
        for _ in range(options.rounds):
            moves = [best[:k] + [best[k] + sign * d] + best[k + 1:] for k in range(1, len(best)) for sign in (-1, 1)]
            moves = [m for m in moves if 0 <= min(m) and max(m) <= top and np.all(np.diff(m) < 0)]
            scored = [(objective(m), m) for m in moves]
            if not scored or min(scored)[0] >= value:
                break
            value, best = min(scored)
    return best, value


def _objective(model, statistics: SolverStatistics, scheduler_or_alphas_cumprod, options: V3FitOptions,
               device, prediction_type: str | None, model_kwargs: Mapping[str, Any]) -> _Objective:
    """The fit's objective on its seeded paths (the same paths for every K and every run of these options)."""
    abar = as_alphas_cumprod(scheduler_or_alphas_cumprod)
    statistics.check_schedule(abar)
    adapter = as_epsilon_model(model, scheduler_or_alphas_cumprod, prediction_type or statistics.prediction_type)
    module = adapter.model
    if device is not None and isinstance(module, torch.nn.Module):
        module.to(device)
    device = torch.device(device or "cpu")
    shape = tuple(statistics.provenance.get("sample_shape") or statistics.feature_shape)
    generator = noise_generator(options.seed, 0, stream="estimate")
    x_t = torch.randn((options.paths, *shape), generator=generator, dtype=torch.float64).to(device)
    return _Objective(adapter, statistics, abar, x_t, options, model_kwargs)


def _fit_one(objective: _Objective, k: int) -> list[int]:
    """The fitted ``k``-step trajectory: the best end of the descents from the family's best starts."""
    options = objective.options
    family = sorted(_family(objective.abar, k, options), key=objective)
    if not family:
        raise ValueError(f"no {k}-step trajectory of the family ends at t_lasts={options.t_lasts} on a schedule "
                         f"of {objective.abar.size} timesteps; pass t_lasts below {objective.abar.size - k}.")
    ends = [_descend(objective, start, options) for start in family[: options.starts]]
    return min(ends, key=lambda end: end[1])[0]


def fit_solver_timesteps(model, statistics: SolverStatistics, scheduler_or_alphas_cumprod,
                         options: V3FitOptions | None = None, device: str | torch.device | None = None,
                         prediction_type: str | None = None, progress: bool = True, **model_kwargs
                         ) -> tuple[dict[str, list[int]], int]:
    """Timesteps fitted to the solver on ``statistics`` for each K of ``options.steps`` (module docstring):
    ``({"K": [t_1, …, t_K]}, model calls made)``. ``model_kwargs``: conditioning passed to every model call."""
    options = options or V3FitOptions()
    objective = _objective(model, statistics, scheduler_or_alphas_cumprod, options, device, prediction_type,
                           model_kwargs)
    fitted = {str(k): _fit_one(objective, k)
              for k in tqdm(options.steps, desc="fitting timesteps to DPM-Solver-v3", disable=not progress)}
    return fitted, objective.calls


def precompute_solver_timesteps(model, scheduler_or_alphas_cumprod, options: V3FitOptions | None = None, *,
                                out: str | os.PathLike, device: str | torch.device | None = None,
                                progress: bool = True) -> tuple[SolverStatistics, str]:
    """Fit the timesteps (:func:`fit_solver_timesteps`) to the statistics in the folder ``out`` and save them there
    after each K: ``(statistics, "fitted")``, or ``(statistics, "unchanged")`` where they already hold a complete
    fit of these options. A fit of these options that was stopped resumes at its first missing K (the paths are
    seeded: the result is the uninterrupted one's); other options start over. The fit's options, model calls and
    whether it is complete go to the statistics' provenance (``"timestep_fit"``)."""
    options = options or V3FitOptions()
    statistics = SolverStatistics.find(out)
    if statistics is None:
        raise ValueError(f"{os.fspath(out)} holds no solver statistics to fit timesteps to; estimate them first "
                         "(precompute's statistics pass, --solver-samples).")
    wanted = json.loads(json.dumps(asdict(options)))
    record = statistics.provenance.get("timestep_fit", {})
    same = record.get("options") == wanted
    if same and record.get("complete", True):
        return statistics, "unchanged"
    fitted = {k: t for k, t in (statistics.fitted_timesteps or {}).items() if same and int(k) in options.steps}
    calls = record.get("model_calls", 0) if same else 0
    objective = _objective(model, statistics, scheduler_or_alphas_cumprod, options, device, None, {})
    todo = [k for k in options.steps if str(k) not in fitted]
    for k in tqdm(todo, desc="fitting timesteps to DPM-Solver-v3", disable=not progress):
        fitted[str(k)] = _fit_one(objective, k)
        statistics.fitted_timesteps = {str(j): fitted[str(j)] for j in options.steps if str(j) in fitted}
        statistics.provenance = {**statistics.provenance, "timestep_fit": {
            "options": wanted, "model_calls": calls + objective.calls, "complete": k == todo[-1]}}
        statistics.save(out)
    return statistics, "fitted"
