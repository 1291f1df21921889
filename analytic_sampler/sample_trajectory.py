"""A K-step trajectory chosen for samples, by exact dynamic programming on a Monte Carlo discretisation cost.

A sampler that holds the model's x0 prediction fixed over each interval ``t_{k-1} < tau <= t_k`` of its trajectory
(DDPM, DDIM and Analytic-DPM steps all do) differs from the reverse diffusion by at most (Girsanov; the derivation in
this project's indexing is in ``docs/sample-trajectory.md``)::

    KL <= sum_k D(t_{k-1}, t_k),    D(s, t) = (d/2) int_{snr[t]}^{min(snr[s], snr_max)} S(tau, t) dsnr(tau)
    S(tau, t) = E || x0_hat(x_tau, tau) - x0_hat(x_t, t) ||^2 / d,    snr = abar / (1 - abar)

with the expectation along forward noise paths ``x0 -> x_tau -> x_t`` (``x_t = sqrt(abar_t/abar_tau) x_tau +
sqrt(1 - abar_t/abar_tau) z``). ``snr_max = 1 / sigma_min^2`` truncates the bound at the noise level ``sigma_min`` (in
data units): detail finer than that is not counted, as Align Your Steps integrates from its sigma_min. The last point
``t_1`` returns ``x0_hat(x_{t_1})``: its interval runs down to ``t = 0``.

One pass of ``num_paths x G`` model calls on a grid of G candidate timesteps estimates the whole matrix ``S``
(:func:`analytic_sampler.estimation.sample_cost.estimate_sample_cost`); it is stored with the variance table. ``D`` is
additive over intervals but not Monge, so the trajectory comes from the dense O(K G^2) DP of
:func:`analytic_sampler.trajectory.solve_dense`, exact on the grid: a K-step trajectory is a path of K + 1 grid points
from ``N-1`` to ``0`` whose last point (t = 0) is not a model call.
:func:`analytic_sampler.schedulers.timesteps.apply_timesteps` runs any trajectory on any Diffusers scheduler that can
take one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .schedule import as_alphas_cumprod, signal_to_noise
from .trajectory import solve_dense, validate_timesteps

DEFAULT_CANDIDATES = 250  # grid points: a (250, 250) float64 matrix (0.5 MB) beside the table
DEFAULT_PATHS = 64
DEFAULT_SIGMA_MIN = 0.3


def candidate_timesteps(num_train_timesteps: int, count: int = DEFAULT_CANDIDATES) -> np.ndarray:
    """``round(linspace(0, N-1, count))`` without repeats, ascending: the grid the DP chooses from."""
    if count < 3:
        raise ValueError(f"candidates={count}: the grid needs at least 3 timesteps (0, one inside and N-1).")
    return np.unique(np.linspace(0, num_train_timesteps - 1, min(count, num_train_timesteps)).round().astype(np.int64))


@dataclass
class SampleCost:
    """The Monte Carlo estimate behind the sample-quality trajectory: ``x0_msd[i, j] = S(timesteps[i], timesteps[j])``,
    symmetric ``(G, G)`` float64, on the ascending grid ``timesteps`` (from 0 to N-1), from ``num_paths`` paths."""

    timesteps: np.ndarray
    x0_msd: np.ndarray
    num_paths: int

    def __post_init__(self):
        self.timesteps = np.asarray(self.timesteps, dtype=np.int64)
        self.x0_msd = np.asarray(self.x0_msd, dtype=np.float64)
        g = self.timesteps.size
        if g < 3 or self.timesteps[0] != 0 or np.any(np.diff(self.timesteps) <= 0):
            raise ValueError("the sample cost's timesteps must ascend from 0 with at least 3 entries; re-estimate it.")
        if self.x0_msd.shape != (g, g) or not np.isfinite(self.x0_msd).all() or np.any(self.x0_msd < 0):
            raise ValueError(f"x0_msd must be a finite, non-negative ({g}, {g}) matrix; re-estimate the sample cost.")

    @classmethod
    def from_table(cls, table) -> SampleCost:
        """The cost a :class:`~analytic_sampler.VarianceTable` carries, or a ValueError naming how to add it."""
        if table.path_timesteps is None:
            raise ValueError(
                "this variance table has no sample cost (the sample-quality trajectory needs one); add it with "
                "`analytic-sampler precompute MODEL --data DATA --out DIR` (the path pass runs after the moments) or "
                "table = table.with_sample_cost(estimate_sample_cost(model, images, scheduler))."
            )
        return cls(table.path_timesteps, table.path_x0_msd, table.path_samples)

    def interval_costs(self, alphas_cumprod, sigma_min: float | None = DEFAULT_SIGMA_MIN) -> np.ndarray:
        """``(G, G)`` matrix ``D(s, t) / d`` (nats per dimension) for grid indices ``s < t``, 0 elsewhere.

        The integral runs in the forward path's own variable ``v = 1 / snr`` (``dsnr = dv / v^2``), with ``S``
        linear in v between grid points, each piece integrated exactly (``sigma_min``: v clipped below at
        ``sigma_min^2``; ``None``: no truncation)."""
        v = 1.0 / signal_to_noise(as_alphas_cumprod(alphas_cumprod))[self.timesteps]
        if sigma_min is not None:
            if not sigma_min > 0:
                raise ValueError(f"sigma_min={sigma_min} must be positive (a noise level in data units), or None.")
            v = np.maximum(v, sigma_min**2)
        lo, width = v[:-1], np.diff(v)
        ratio = width / lo
        with np.errstate(divide="ignore", invalid="ignore"):  # a piece below sigma_min has width 0 and no weight
            near = np.where(width > 0, (ratio - np.log1p(ratio)) / width, 0.0)  # weight of S at the piece's low end
            far = np.where(width > 0, (np.log1p(ratio) - ratio / (1 + ratio)) / width, 0.0)
        pieces = near[:, None] * self.x0_msd[:-1] + far[:, None] * self.x0_msd[1:]  # piece [grid l, l+1], held at t
        g = self.timesteps.size
        pieces[np.arange(g - 1)[:, None] >= np.arange(g)[None, :]] = 0.0
        cost = np.zeros((g, g))
        cost[:-1] = 0.5 * np.flip(np.cumsum(np.flip(pieces, 0), 0), 0)  # sum over pieces s <= l < t
        return cost


class SampleTrajectoryDP:
    """One DP pass on ``cost.interval_costs(...)`` up to ``max_steps`` model calls; ``path(K)``, ``cost(K)``."""

    def __init__(self, alphas_cumprod, cost: SampleCost, max_steps: int, sigma_min: float | None = DEFAULT_SIGMA_MIN):
        self.abar = as_alphas_cumprod(alphas_cumprod)
        self.grid = cost.timesteps
        if self.grid[-1] != self.abar.size - 1:
            raise ValueError(
                f"the sample cost's grid ends at t={self.grid[-1]} but the schedule has N={self.abar.size}; "
                "estimate it for this model's schedule."
            )
        if not 1 <= max_steps < self.grid.size:
            raise ValueError(f"max_steps={max_steps} must be between 1 and {self.grid.size - 1} (grid size - 1); "
                             "estimate the sample cost on a finer grid (more candidates) for more steps.")
        self.max_steps, self.sigma_min = int(max_steps), sigma_min
        self.intervals = cost.interval_costs(self.abar, sigma_min)
        total, self._argmin = solve_dense(torch.from_numpy(self.intervals.T.copy()), self.max_steps + 1)
        self._total, self._argmin = total.numpy(), self._argmin.numpy()

    def path(self, num_steps: int) -> list[int]:
        """The K model-call timesteps, descending from N-1; the sampler returns x0_hat at the last one."""
        k = int(num_steps)
        if not 1 <= k <= self.max_steps:
            raise ValueError(f"num_steps={k} must be between 1 and max_steps={self.max_steps} of this DP.")
        points = [self.grid.size - 1]
        for level in range(k + 1, 1, -1):
            points.append(int(self._argmin[level, points[-1]]))
        return self.grid[points[:-1]].tolist()

    def cost(self, num_steps: int) -> float:
        """The bound ``sum_k D / d`` (nats per dimension) along ``path(num_steps)``."""
        self.path(num_steps)
        return float(self._total[int(num_steps) + 1, -1])

    def trajectory_cost(self, timesteps) -> float:
        """The same bound for any descending trajectory whose points lie on the grid (ValueError otherwise)."""
        ts = validate_timesteps(timesteps, self.abar.size) if len(timesteps) > 1 else [int(t) for t in timesteps]
        index = np.searchsorted(self.grid, ts)
        if np.any(index >= self.grid.size) or np.any(self.grid[np.minimum(index, self.grid.size - 1)] != ts):
            raise ValueError(f"timesteps {ts[:6]}… are not all on the cost's grid of {self.grid.size} candidates.")
        points = [*index.tolist(), 0]
        return float(sum(self.intervals[s, t] for t, s in zip(points, points[1:])))


def sample_quality_trajectory(table, num_steps: int, sigma_min: float | None = DEFAULT_SIGMA_MIN) -> list[int]:
    """The K-step sample-quality trajectory of a :class:`~analytic_sampler.VarianceTable` that carries a sample cost;
    pass it as ``scheduler.set_timesteps(timesteps=...)`` or :func:`apply_timesteps`."""
    return SampleTrajectoryDP(table.alphas_cumprod, SampleCost.from_table(table), num_steps, sigma_min).path(num_steps)


