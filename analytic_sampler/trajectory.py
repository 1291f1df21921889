"""K-step trajectories ``N-1 = t_K > … > t_1 = 0``: even, quadratic and optimal (Analytic-DPM's DP), and
Diffusers' ``timestep_spacing`` ones, which may start below N-1 and end above 0.

The DDPM-type K-step bound with the analytic variance is, up to constants, ``(d/2) sum_k J(t_{k-1}, t_k)``::

    J(s, t) = log(1 - b_ts * ms_eps[t] / bb[t])

and ``C_k[t] = min_{s<t} C_{k-1}[s] + J(s, t)``; one pass up to K_max serves every K <= K_max.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from .schedule import as_alphas_cumprod

_BLOCK = 256  # rows of the cost matrix per block: a 256 x N float64 slab stays in cache


def _check_steps(num_train_timesteps: int, num_steps: int) -> int:
    if not 2 <= int(num_steps) <= num_train_timesteps:
        raise ValueError(
            f"num_steps={num_steps} must be between 2 and num_train_timesteps={num_train_timesteps}; "
            "the first step is t=N-1 and the last t=0."
        )
    return int(num_steps)


def even_trajectory(num_train_timesteps: int, num_steps: int) -> list[int]:
    """``linspace(0, N-1, K).round()``, descending."""
    k = _check_steps(num_train_timesteps, num_steps)
    return np.linspace(0, num_train_timesteps - 1, k).round().astype(int)[::-1].tolist()


def quadratic_trajectory(num_train_timesteps: int, num_steps: int) -> list[int]:
    """``round(linspace(0, sqrt(N-1), K)^2)``, made strictly increasing near t = 0, descending."""
    k = _check_steps(num_train_timesteps, num_steps)
    t = np.linspace(0.0, np.sqrt(num_train_timesteps - 1), k) ** 2
    t = np.maximum.accumulate(np.round(t).astype(int) - np.arange(k)) + np.arange(k)
    return t[::-1].tolist()


SPACINGS = ("leading", "linspace", "trailing")


def spaced_timesteps(num_train_timesteps: int, num_steps: int, spacing: str, steps_offset: int = 0) -> list[int]:
    """Diffusers' ``timestep_spacing`` (Lin et al. 2023, Table 2), descending, as DDIM/DDPMScheduler give it::

        leading:  arange(K) * (N // K) + steps_offset
        linspace: round(linspace(0, N-1, K))
        trailing: round(arange(N, 0, -N/K)) - 1

    Only ``leading`` uses ``steps_offset``. Diffusers' float ``arange`` gives ``trailing`` a spurious last ``t = -1``
    for some K (61 of 1000, …); the first K points are kept.
    """
    n, k = num_train_timesteps, _check_steps(num_train_timesteps, num_steps)
    if spacing == "leading":
        t = np.arange(k)[::-1] * (n // k) + int(steps_offset)
    elif spacing == "linspace":
        t = np.array(even_trajectory(n, k))
    elif spacing == "trailing":
        t = np.round(np.arange(n, 0, -n / k))[:k] - 1
    else:
        raise ValueError(f"timestep_spacing={spacing!r}; use one of {SPACINGS}, or None for `trajectory`.")
    if t[0] > n - 1:
        raise ValueError(
            f"timestep_spacing={spacing!r} with steps_offset={steps_offset} starts at t={int(t[0])} > N-1={n - 1} "
            f"for K={k}; use fewer steps or a smaller steps_offset."
        )
    return t.astype(np.int64).tolist()


def validate_timesteps(timesteps: Sequence[int], num_train_timesteps: int) -> list[int]:
    """Check a user trajectory: integers, strictly descending, inside [0, N-1], at least two."""
    ts = [int(t) for t in timesteps]
    if len(ts) < 2:
        raise ValueError("custom timesteps need at least two entries (K >= 2).")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"custom timesteps must be strictly descending (e.g. [999, 500, 0]); got {ts[:6]}…")
    if ts[0] > num_train_timesteps - 1 or ts[-1] < 0:
        raise ValueError(f"custom timesteps must lie in [0, {num_train_timesteps - 1}]; got {ts[0]} … {ts[-1]}.")
    return ts


def _cost_matrix(abar: np.ndarray, ms_eps: np.ndarray) -> torch.Tensor:
    """``J[s, t]`` for s < t as float64; +inf where s >= t or ms_eps[t] is not estimated."""
    a = torch.from_numpy(abar)
    ms = torch.from_numpy(ms_eps)
    b_ts = 1.0 - a[None, :] / a[:, None]
    j = torch.log1p(-b_ts * (ms / (1.0 - a))[None, :])
    j = torch.where(torch.isfinite(j), j, torch.full_like(j, float("inf")))
    return j.masked_fill_(torch.ones_like(j, dtype=torch.bool).tril_(), float("inf"))


def trajectory_cost(alphas_cumprod, ms_eps, timesteps: Sequence[int]) -> float:
    """``sum_k J(t_{k-1}, t_k)`` of a descending trajectory ending at 0."""
    abar = as_alphas_cumprod(alphas_cumprod)
    ms = np.asarray(ms_eps, dtype=np.float64)
    t = np.asarray(timesteps[:-1], dtype=np.int64)
    s = np.asarray(timesteps[1:], dtype=np.int64)
    return float(np.sum(np.log1p(-(1.0 - abar[t] / abar[s]) * ms[t] / (1.0 - abar[t]))))


class TrajectoryDP:
    """One dynamic-programming pass up to ``max_steps``; ``path(K)`` for any K <= max_steps.

    Timesteps without an estimate (NaN) cannot be visited. Where ms_eps > 1 (an imperfect model, or
    Monte Carlo noise around 1 at large t) ``J`` is undefined for distant pairs and unbounded below for
    near ones, so such timesteps are left out of the trajectory too; t = N-1, which every trajectory
    starts from, is clipped to 1 instead. A warning says how many were left out.
    """

    def __init__(self, alphas_cumprod, ms_eps, max_steps: int):
        self.abar = as_alphas_cumprod(alphas_cumprod)
        n = self.abar.size
        self.max_steps = _check_steps(n, max_steps)
        self.ms_eps = np.asarray(ms_eps, dtype=np.float64)
        if self.ms_eps.shape != (n,):
            raise ValueError(f"ms_eps has {self.ms_eps.size} entries, the schedule {n}; use the model's own table.")
        usable = self.ms_eps.copy()
        bad = np.flatnonzero(usable[1:-1] > 1.0) + 1
        usable[bad] = np.nan
        usable[-1] = min(usable[-1], 1.0)
        if bad.size or self.ms_eps[-1] > 1.0:
            warnings.warn(
                f"ms_eps > 1 at {bad.size + int(self.ms_eps[-1] > 1.0)} timestep(s) (first t={bad[0] if bad.size else n - 1}): "
                "the model's eps has more energy than true noise there, or the table's Monte Carlo noise reaches "
                f"past 1. Those timesteps are left out of the optimal trajectory (t={n - 1} is clipped to 1).",
                stacklevel=2,
            )
        self._argmin, self._cost = self._solve(_cost_matrix(self.abar, usable))

    def _solve(self, j: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        n = j.shape[0]
        jt = j.t().contiguous()  # jt[t, s] = J(s, t)
        cost = torch.full((self.max_steps + 1, n), float("inf"), dtype=torch.float64)
        cost[1, 0] = 0.0
        argmin = [torch.zeros(n, dtype=torch.int64)] * 2
        for k in range(2, self.max_steps + 1):
            # C_k[t] = min_s C_{k-1}[s] + J(s, t) over k-2 <= s < t, in row blocks that stay in cache.
            lo, arg = k - 2, torch.zeros(n, dtype=torch.int64)
            for a in range(lo + 1, n, _BLOCK):
                b = min(a + _BLOCK, n)
                cost[k, a:b], arg[a:b] = (jt[a:b, lo:b] + cost[k - 1, None, lo:b]).min(dim=1)
            argmin.append(arg + lo)
        return argmin, cost

    def path(self, num_steps: int) -> list[int]:
        """The optimal descending trajectory with ``num_steps`` points, N-1 … 0."""
        k = _check_steps(self.abar.size, num_steps)
        if k > self.max_steps:
            raise ValueError(f"num_steps={k} exceeds max_steps={self.max_steps} of this DP; solve with a larger one.")
        t = self.abar.size - 1
        if k == self.abar.size:  # the full chain is the only trajectory
            return list(range(t, -1, -1))
        if not torch.isfinite(self._cost[k, t]):
            raise ValueError(
                f"no {k}-step trajectory runs through timesteps with a usable ms_eps (estimated and <= 1); "
                "estimate ms_eps at more timesteps, with more samples, or use fewer steps."
            )
        points = [t]
        for level in range(k, 1, -1):
            t = int(self._argmin[level][t])
            points.append(t)
        return points

    def cost(self, num_steps: int) -> float:
        """``sum_k J`` along ``path(num_steps)``."""
        return trajectory_cost(self.abar, np.minimum(self.ms_eps, 1.0), self.path(num_steps))


def optimal_trajectory(alphas_cumprod, ms_eps, num_steps: int) -> list[int]:
    """The K-step trajectory minimising Analytic-DPM's bound, descending N-1 … 0."""
    return TrajectoryDP(alphas_cumprod, ms_eps, num_steps).path(num_steps)
