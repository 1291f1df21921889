"""Timesteps fitted to DPM-Solver-v3 on one model: for each K, the K model calls whose solution lies closest to the
probability-flow ODE's, measured on paths from seeded ``x_T``.

Teacher: the solver itself on ``teacher_steps`` evenly spaced timesteps from N-1 to 0 (converged: its distance to a
500-step DPM-Solver++(3M) solution is far below any few-step solver's error). Objective of a trajectory: the RMS
distance of its output (the data prediction at its last call, clipped to the data range) to the teacher's, over the
paths. Search: the best of a two-parameter family (:func:`~analytic_sampler.solver_statistics.logsnr_timesteps`'
rule: K points from t = N-1 to ``t_last``, lambda spaced as ``u^(1/power)``), then coordinate descent on integer
timesteps (every single move of ``+-d`` that keeps the order, the best improving one taken, ``d`` halving from 32 to
2), the first timestep kept at N-1. ``K x paths`` model calls per trajectory tried.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
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
        moves (`tuple[int, ...]`, defaults to `(32, 16, 8, 4, 2)`):
            The coordinate descent's step sizes.
        rounds (`int`, defaults to 2):
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
    moves: tuple[int, ...] = (32, 16, 8, 4, 2)
    rounds: int = 2
    order: int = 3
    corrector: bool = True
    lower_order_final: bool = True
    seed: int = 0
    batch_size: int = 256

    def __post_init__(self):
        if any(not 2 <= k <= 15 for k in self.steps):
            raise ValueError(f"steps={self.steps}: fit K from 2 to 15 (larger K use the logsnr spacing).")
        if min(self.paths, self.teacher_steps - 1, self.rounds) < 1:
            raise ValueError("paths and rounds must be at least 1, teacher_steps at least 2.")


class _Objective:
    """The solver on the paths for any trajectory, against the teacher's output (module docstring)."""

    def __init__(self, adapter, statistics: SolverStatistics, abar: np.ndarray, x_t: torch.Tensor,
                 options: V3FitOptions, kwargs: Mapping[str, Any]):
        self.adapter, self.statistics, self.abar, self.x_t = adapter, statistics, abar, x_t
        self.options, self.kwargs, self.calls = options, dict(kwargs), 0
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
        clip = self.statistics.data_range or (-np.inf, np.inf)
        diff = self.output(trajectory).clamp(*clip) - self.teacher.clamp(*clip)
        return float(diff.pow(2).mean().sqrt())


def _family(abar: np.ndarray, k: int, options: V3FitOptions) -> list[list[int]]:
    out = []
    for t_last in options.t_lasts:
        for power in options.powers:
            try:
                out.append(logsnr_timesteps(abar, k, t_last, power))
            except ValueError:  # rounds to repeated timesteps
                continue
    return out


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


def fit_solver_timesteps(model, statistics: SolverStatistics, scheduler_or_alphas_cumprod,
                         options: V3FitOptions | None = None, device: str | torch.device | None = None,
                         prediction_type: str | None = None, progress: bool = True, **model_kwargs
                         ) -> tuple[dict[str, list[int]], int]:
    """Timesteps fitted to the solver on ``statistics`` for each K of ``options.steps`` (module docstring):
    ``({"K": [t_1, …, t_K]}, model calls made)``. ``model_kwargs``: conditioning passed to every model call."""
    options = options or V3FitOptions()
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
    objective = _Objective(adapter, statistics, abar, x_t, options, model_kwargs)
    fitted = {}
    for k in tqdm(options.steps, desc="fitting timesteps to DPM-Solver-v3", disable=not progress):
        start = min(_family(abar, k, options), key=objective)
        fitted[str(k)], _ = _descend(objective, start, options)
    return fitted, objective.calls
