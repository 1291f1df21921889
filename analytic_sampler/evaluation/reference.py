"""Reference error: how far a deterministic sampler's samples lie from the solution of the model's own
probability-flow ODE that starts at the same noise x_T, as solver papers measure few-step samplers.

The reference solution is a fine solve: DPM-Solver++(3M) on ``steps`` integer timesteps spaced evenly from N-1 to 0,
``x0_hat`` limited as the model's config limits it (the clip every sampler here applies), then the final denoise to
``sigma = 0`` (:func:`reference_solution`). Its own error is shown by its distance to a solve with twice the points
(:func:`convergence`); it must lie at least 10x below every error it ranks. For n samples with final images ``y_i``
and references ``y*_i`` (d entries each), both clamped to the data range (the images a user gets)::

    e_i = |y_i - y*_i|^2 / d,     RMS = sqrt(mean_i e_i),     SE(RMS) = sd(e) / (2 RMS sqrt(n))   (delta method)

Two samplers run from the same x_T compare by the ratio of their RMS, with the paired standard error
``R sqrt(var(a_i / A - b_i / B) / (4 n))`` (A, B the means of their e), which the shared noise makes small.

It is not a sample-quality measure: a sampler can be close to the ODE's solution and still produce worse images than
one further away (and a stochastic sampler has no reference at all); it measures the solver, not the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..denoiser import Denoiser, X0Limit, x0_limit
from ..schedule import as_alphas_cumprod
from ..solver_specs import DPMPP_3M, Solver
from ..solvers import DEFAULT_REFERENCE_STEPS, reference_grid, solve


@dataclass(frozen=True)
class ReferenceOptions:
    """How the reference solution is solved: ``steps`` integer timesteps of ``solver``, ``batch_size`` rows per
    model call, on ``device``."""

    steps: int = DEFAULT_REFERENCE_STEPS
    solver: Solver = DPMPP_3M
    batch_size: int = 500
    device: str | None = None


def reference_solution(model, x_T: torch.Tensor, scheduler, options: ReferenceOptions = ReferenceOptions(),
                       limit: X0Limit | str = "config") -> torch.Tensor:
    """The ODE solution from ``x_T`` (at t = N-1) to clean data, float64 (module docstring). ``model``: a UNet, an
    :class:`~analytic_sampler.EpsilonAdapter` or a callable; ``limit``: ``"config"`` limits ``x0_hat`` as the
    scheduler's config does (:func:`~analytic_sampler.denoiser.x0_limit`), else the limit itself."""
    abar = as_alphas_cumprod(scheduler)
    limit = x0_limit(scheduler) if limit == "config" else limit
    denoiser = Denoiser(model, scheduler, limit, options.batch_size, options.device)
    return solve(options.solver, denoiser, x_T, reference_grid(abar.size, options.steps), abar)[0]


def squared_errors(samples: torch.Tensor, reference: torch.Tensor,
                   data_range: tuple[float, float] | None = (-1.0, 1.0)) -> np.ndarray:
    """``e_i = |y_i - y*_i|^2 / d`` per sample, float64, both clamped to ``data_range`` (``None``: unclamped)."""
    if samples.shape != reference.shape:
        raise ValueError(f"samples {tuple(samples.shape)} and reference {tuple(reference.shape)} differ in shape; "
                         "solve the reference from the same x_T as the samples.")
    a, b = samples.double().cpu(), reference.double().cpu()
    if data_range is not None:
        a, b = a.clamp(*data_range), b.clamp(*data_range)
    return ((a - b) ** 2).flatten(1).mean(1).numpy()


@dataclass(frozen=True)
class ErrorStat:
    """RMS distance ``rms`` ± its standard error ``se`` over ``n`` samples."""

    rms: float
    se: float
    n: int

    @classmethod
    def of(cls, errors: np.ndarray) -> ErrorStat:
        """From the per-sample ``e_i`` of :func:`squared_errors`."""
        e = np.asarray(errors, dtype=np.float64)
        if e.size < 2 or not np.isfinite(e).all():
            raise ValueError(f"{e.size} per-sample errors ({int(np.isfinite(e).sum())} finite): a reference error "
                             "needs at least two finite ones (a sampler that returned NaN has none).")
        rms = math.sqrt(e.mean())
        se = float(e.std(ddof=1) / (2 * rms * math.sqrt(e.size))) if rms > 0 else 0.0
        return cls(rms, se, int(e.size))

    def __str__(self) -> str:
        return f"{self.rms:.4f} ± {self.se:.4f}"


def paired_ratio(errors_a: np.ndarray, errors_b: np.ndarray) -> tuple[float, float]:
    """``RMS_a / RMS_b`` and its paired standard error, for two samplers run from the same x_T."""
    a, b = np.asarray(errors_a, np.float64), np.asarray(errors_b, np.float64)
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"paired errors need the same samples on both sides ({a.size} and {b.size} given).")
    ma, mb = a.mean(), b.mean()
    ratio = math.sqrt(ma / mb)
    return ratio, float(ratio * math.sqrt(np.var(a / ma - b / mb, ddof=1) / (4 * a.size)))


def convergence(model, x_T: torch.Tensor, scheduler, steps: tuple[int, ...] = (250, 500, 1000),
                options: ReferenceOptions = ReferenceOptions()) -> list[dict]:
    """The reference's own error: solves with each number of ``steps`` from the same ``x_T``, and the RMS distance
    of each to the next finer one (``{"steps", "finer_steps", "rms", "se"}``)."""
    solves = {n: reference_solution(model, x_T, scheduler, ReferenceOptions(n, options.solver, options.batch_size,
                                                                             options.device))
              for n in sorted(steps)}
    keys = sorted(solves)
    rows = []
    for coarse, fine in zip(keys, keys[1:]):
        stat = ErrorStat.of(squared_errors(solves[coarse], solves[fine], None))
        rows.append({"steps": coarse, "finer_steps": fine, "rms": stat.rms, "se": stat.se})
    return rows
