"""K-step trajectories ``N-1 = t_K > … > t_1 = 0``: even, quadratic and optimal (dynamic programming); Diffusers'
``timestep_spacing`` ones, which may start below N-1 and end above 0, are in :mod:`analytic_sampler.schedule`.

With ``snr[t] = abar[t] / (1 - abar[t])``, the DDPM-type K-step bound is, up to terms that every trajectory
shares, ``(d/2) sum_k J(t_{k-1}, t_k)`` with::

    J(s, t) = log(1 + (snr[s] - snr[t]) * m[t])

- residual cost (``x0_mse`` given): ``m = x0_mse``, the model's own error of x0. With the residual variance
  ``lambda^2 + coef^2 x0_mse[t]`` each KL term is exactly ``(d/2) J(s, t)`` for any network.
- the paper's cost (Analytic-DPM): ``m = c = (bb/abar)(1 - ms_eps)``, the posterior variance of a perfect network;
  ``log(1 - b_ts ms_eps[t] / bb[t])`` differs from this J by ``log snr[t] - log snr[s]``, which telescopes.

The moment is first fitted so that ``g[t] = 1/m[t] - snr[t]`` is non-increasing in t (weighted isotonic regression,
pool-adjacent-violators). The exact MMSE has this shape for any data distribution (Gaussian data: g = 1/v; the
single-crossing property of the MMSE in general), so the fit removes Monte Carlo noise, notably the noise that
puts ``c`` near 0 at high t, where the raw estimate invites free-looking jumps; the raw estimate stays in the table.
The DP is ``C_k[t] = min_{s<t} C_{k-1}[s] + J(s, t)``; one pass up to K_max serves every K <= K_max. With g
non-increasing, ``J(s, t) = log m[t] + log(g[t] + snr[s])`` is a Monge matrix (``log`` is concave and both
arguments fall as s and t grow), so the leftmost argmin over s is non-decreasing in t, and each level is solved
exactly by divide and conquer over t in O(N log N) (:func:`_solve_monge`, vectorised across each depth of the
recursion). A raw (unfitted) moment, or a DP on a GPU, uses the dense O(K N^2) solver (:func:`_solve_dense`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import isotonic_regression

from .schedule import ZERO_SNR_FLOOR, as_alphas_cumprod, check_num_steps, signal_to_noise, spaced_timesteps
from .table import validate_ms_eps
from .variance import DataRange, check_zero_snr_bound, covariance_upper_bound

_BLOCK = 256  # rows of the cost matrix per block in the exact O(K N^2) DP: a 256 x N float64 slab stays in cache


def even_trajectory(num_train_timesteps: int, num_steps: int) -> list[int]:
    """``linspace(0, N-1, K).round()``, descending: Diffusers' ``"linspace"`` timestep spacing.

    Args:
        num_train_timesteps (`int`): N.
        num_steps (`int`): K, from 2 to N.
    """
    return spaced_timesteps(num_train_timesteps, check_num_steps(num_train_timesteps, num_steps), "linspace")


def quadratic_trajectory(num_train_timesteps: int, num_steps: int) -> list[int]:
    """``round(linspace(0, sqrt(N-1), K)^2)``, made strictly increasing near t = 0, descending.

    Args:
        num_train_timesteps (`int`): N.
        num_steps (`int`): K, from 2 to N.
    """
    k = check_num_steps(num_train_timesteps, num_steps)
    t = np.linspace(0.0, np.sqrt(num_train_timesteps - 1), k) ** 2
    t = np.maximum.accumulate(np.round(t).astype(int) - np.arange(k)) + np.arange(k)
    return t[::-1].tolist()


def validate_timesteps(timesteps: Sequence[int], num_train_timesteps: int, min_steps: int = 2) -> list[int]:
    """Check a user trajectory: integers, strictly descending, inside [0, N-1], at least ``min_steps``."""
    ts = [int(t) for t in timesteps]
    if len(ts) < min_steps:
        raise ValueError(f"custom timesteps need at least {min_steps} entries (K >= {min_steps}).")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"custom timesteps must be strictly descending (e.g. [999, 500, 0]); got {ts[:6]}…")
    if ts[0] > num_train_timesteps - 1 or ts[-1] < 0:
        raise ValueError(f"custom timesteps must lie in [0, {num_train_timesteps - 1}]; got {ts[0]} … {ts[-1]}.")
    return ts


def posterior_variance(alphas_cumprod, ms_eps, data_range: DataRange = (-1.0, 1.0), ms_x0=None) -> np.ndarray:
    """``c[t] = (bb[t] / abar[t]) (1 - ms_eps[t])``, at least 0: the x0 error a perfect network would make. Where
    ``abar[t] <= 2^-24`` (x_t says nothing about x0) it is the prior's bound, as in the scheduler's variance
    (:func:`~analytic_sampler.variance.analytic_covariance`): the data range's or the second moment's, else refused."""
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    c = np.maximum(1.0 - np.asarray(ms_eps, dtype=np.float64), 0.0) / signal_to_noise(abar)
    blind = np.flatnonzero((abar <= ZERO_SNR_FLOOR) & np.isfinite(c))
    if blind.size:
        check_zero_snr_bound(abar, blind, data_range, ms_x0)
        c[blind] = covariance_upper_bound(abar, blind, data_range, ms_x0)
    return c


def monotone_moment(alphas_cumprod, moment, stderr=None) -> np.ndarray:
    """The moment refitted so that ``g[t] = 1/m[t] - snr[t]`` is non-increasing in t; NaN stays NaN.

    Weighted isotonic regression of g with weights ``1 / Var(g) ~ m^4 / stderr^2`` (delta method; where a
    standard error is missing, the median relative one).
    """
    snr, m = signal_to_noise(alphas_cumprod), np.asarray(moment, dtype=np.float64)
    est = np.flatnonzero(np.isfinite(m))
    out = np.full(m.shape, np.nan)
    if est.size == 0:
        return out
    top = max(float(m[est].max()), 1e-300)
    raw = np.maximum(m[est], top * 1e-12)  # a moment of 0 (c where ms_eps >= 1) gets a negligible weight
    rel = np.full(est.size, np.nan) if stderr is None else np.asarray(stderr, dtype=np.float64)[est] / raw
    usable = np.isfinite(rel) & (rel > 0)
    rel = np.where(usable, rel, np.median(rel[usable]) if usable.any() else 1.0)
    fit = isotonic_regression(1.0 / raw - snr[est], weights=(raw / rel) ** 2, increasing=False).x
    out[est] = 1.0 / np.maximum(fit + snr[est], 1e-12 / top)  # guards a non-positive 1/m only
    return out


def transition_cost(alphas_cumprod, moment, prev_t, t) -> np.ndarray:
    """``J(s, t) = log(1 + (snr[s] - snr[t]) m[t])`` for ``0 <= s < t``; broadcasts."""
    snr, m = signal_to_noise(alphas_cumprod), np.asarray(moment, dtype=np.float64)
    s, t = np.asarray(prev_t, dtype=np.int64), np.asarray(t, dtype=np.int64)
    return np.log1p((snr[s] - snr[t]) * m[t])


def trajectory_cost(alphas_cumprod, moment, timesteps: Sequence[int]) -> float:
    """``sum_k J(t_{k-1}, t_k)`` along a descending trajectory ending at 0."""
    return float(np.sum(transition_cost(alphas_cumprod, moment, timesteps[1:], timesteps[:-1])))


def _solve_dense(snr: torch.Tensor, m: torch.Tensor, max_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact DP for any moment over the full matrix of ``J(s, t)`` (:func:`solve_dense`)."""
    return solve_dense(torch.log1p((snr[None, :] - snr[:, None]) * m[:, None]), max_steps)


def solve_dense(jt: torch.Tensor, max_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact DP on any additive cost, ``jt[t, s] = J(s, t)`` for ``s < t`` on ``n`` points (float64; the entries with
    ``s >= t`` are overwritten with inf, in place, so no second n x n matrix is allocated):
    ``C_k[t] = min_{k-2 <= s < t} C_{k-1}[s] + J(s, t)`` with ``C_1 = 0`` at point 0 only,
    so ``C_k[t]`` is the cheapest path of k points from 0 to t. O(K n^2) time, in row blocks that stay in cache.
    Returns ``(C, argmin)``, each ``(max_steps + 1, n)``."""
    n = jt.shape[0]
    jt.masked_fill_(torch.ones(n, n, dtype=torch.bool, device=jt.device).triu_(), float("inf"))
    cost = torch.full((max_steps + 1, n), float("inf"), dtype=torch.float64, device=jt.device)
    arg = torch.zeros((max_steps + 1, n), dtype=torch.int64, device=jt.device)
    cost[1, 0] = 0.0
    for k in range(2, max_steps + 1):
        lo = k - 2
        for a in range(lo + 1, n, _BLOCK):
            b = min(a + _BLOCK, n)
            cost[k, a:b], arg[k, a:b] = (jt[a:b, lo:b] + cost[k - 1, None, lo:b]).min(dim=1)
        arg[k] += lo
    return cost, arg


def _is_monge(snr: np.ndarray, m: np.ndarray) -> bool:
    """Whether ``g = 1/m - snr`` is non-increasing (to rounding), the condition that makes J a Monge matrix; a raw
    moment of 0 (c where ms_eps >= 1) is not."""
    if np.any(m <= 0):
        return False
    g = 1.0 / m - snr
    return bool(np.all(np.diff(g) <= 1e-12 * (np.abs(g[1:]) + snr[1:])))


def _solve_monge(snr: np.ndarray, m: np.ndarray, max_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact DP when J is Monge: per level, the argmin ``o(t)`` over s is non-decreasing in t, so the middle t
    of a range bounds the windows of both halves (divide and conquer). All ranges of one recursion depth are
    evaluated together as one ragged array: O(K N log N) work in O(K log N) numpy calls. Within a level the
    search runs on ``exp(C_{k-1}[s] - min C_{k-1}) (g[t] + snr[s])``, whose argmin is that of
    ``C_{k-1}[s] + J(s, t)`` (``J = log m[t] + log(g[t] + snr[s])``), so the inner loop has no logarithm.
    Returns ``(C, argmin)`` like :func:`_solve_dense`."""
    n = snr.size
    g, log_m = 1.0 / m - snr, np.log(m)
    cost = np.full((max_steps + 1, n), np.inf)
    arg = np.zeros((max_steps + 1, n), dtype=np.int64)
    cost[1, 0] = 0.0
    positions = np.arange(2 * n)  # a depth never evaluates more than N - 1 windows over N - 1 values of s
    for k in range(2, max_steps + 1):
        # an s costlier than the cheapest by more than any J (at most ~40) is never chosen: exp cannot overflow
        shift = cost[k - 1, k - 2 :].min()
        with np.errstate(over="ignore"):
            weight = np.exp(cost[k - 1] - shift)
        best, best_s = cost[k], arg[k]
        # ranges of t still to solve, each with its window of s: rows t_lo, t_hi, s_lo, s_hi
        ranges = np.array([[k - 1], [n - 1], [k - 2], [n - 2]])
        while ranges.shape[1]:
            t_lo, t_hi, s_lo, s_hi = ranges
            mid = (t_lo + t_hi) >> 1
            width = np.minimum(s_hi, mid - 1) - s_lo + 1
            ends = np.cumsum(width)
            starts = ends - width
            s = positions[: ends[-1]] - np.repeat(starts - s_lo, width)
            vals = weight[s] * (snr[s] + np.repeat(g[mid], width))
            low = np.minimum.reduceat(vals, starts)
            hits = np.flatnonzero(vals == np.repeat(low, width))
            o = s[hits[np.searchsorted(hits, starts)]]  # the first minimum of each window
            best[mid], best_s[mid] = low, o
            halves = np.empty((4, 2 * mid.size), dtype=np.int64)
            halves[:, 0::2] = (t_lo, mid - 1, s_lo, o)
            halves[:, 1::2] = (mid + 1, t_hi, o, s_hi)
            ranges = halves[:, halves[0] <= halves[1]]
        best[k - 1 :] = shift + np.log(best[k - 1 :]) + log_m[k - 1 :]
    return cost, arg


class TrajectoryDP:
    """One dynamic-programming pass up to ``max_steps``; ``path(K)`` and ``cost(K)`` for any K <= max_steps.
    Timesteps without an estimate (NaN) are never visited.

    Args:
        alphas_cumprod (`np.ndarray` or a scheduler):
            The schedule.
        ms_eps (`np.ndarray`, *optional*):
            The table's ``ms_eps``: without ``x0_mse``, Analytic-DPM's J (``m = c``), with a warning.
        max_steps (`int`, defaults to 1000):
            The largest K solved for.
        x0_mse (`np.ndarray`, *optional*):
            The table's ``x0_mse``: the residual bound (``m = x0_mse``).
        stderr (`np.ndarray`, *optional*):
            The moment's standard error (of ``x0_mse``, or of ``ms_eps`` for the paper's cost), to weight the fit.
        monotone (`bool`, defaults to `True`):
            Fit the moment with :func:`monotone_moment` first; ``False`` uses the raw moment.
        device (`str` or `torch.device`, *optional*):
            Where the DP runs: on a CPU a monotone moment takes the O(K N log N) solver, otherwise (a raw moment, or
            a GPU, where the dense DP is one batched kernel per block) the dense O(K N^2) one.
        data_range (`tuple[float, float]`, *optional*, defaults to `(-1.0, 1.0)`), ms_x0 (`float`, *optional*):
            For the paper's cost only: the bounds of ``c`` at a zero-SNR timestep (:func:`posterior_variance`).
    """

    def __init__(
        self,
        alphas_cumprod,
        ms_eps=None,
        max_steps: int = 1000,
        x0_mse=None,
        stderr=None,
        monotone: bool = True,
        device: str | torch.device | None = None,
        data_range: DataRange = (-1.0, 1.0),
        ms_x0: float | None = None,
    ):
        self.abar = as_alphas_cumprod(alphas_cumprod)
        n = self.abar.size
        self.max_steps = check_num_steps(n, max_steps)
        if stderr is not None:
            stderr = validate_ms_eps(stderr, n, needed=[], name="stderr")
        if x0_mse is None:
            if ms_eps is None:
                raise ValueError("pass x0_mse (residual cost) or ms_eps (the paper's cost) from the model's table.")
            warnings.warn(
                "optimal trajectory from ms_eps alone (Analytic-DPM's cost, which assumes the network's mean is the "
                "optimal one); the residual cost, which holds for real networks, needs a table with x0_mse: "
                "re-estimate it with `analytic-sampler precompute` or estimate_moments.",
                stacklevel=2,
            )
            raw = posterior_variance(self.abar, validate_ms_eps(ms_eps, n, needed=[]), data_range, ms_x0)
            stderr = None if stderr is None else stderr / signal_to_noise(self.abar)  # the stderr of c
        else:
            raw = validate_ms_eps(x0_mse, n, needed=[], name="x0_mse")
        self.moment = monotone_moment(self.abar, raw, stderr) if monotone else raw
        self.visited = np.flatnonzero(np.isfinite(self.moment))
        if self.visited.size == 0:
            raise ValueError(
                f"{'x0_mse' if x0_mse is not None else 'ms_eps'} is NaN at every timestep (for x0_mse: a table from "
                "before x0_mse existed); pass x0_mse=None to use ms_eps (Analytic-DPM's cost), or re-estimate the "
                "table with `analytic-sampler precompute` or estimate_moments."
            )
        snr, m = signal_to_noise(self.abar)[self.visited], self.moment[self.visited]
        steps = min(self.max_steps, self.visited.size)
        on_cpu = device is None or torch.device(device).type == "cpu"
        if on_cpu and steps >= 2 and _is_monge(snr, m):
            self._cost, self._argmin = _solve_monge(snr, m, steps)
        else:
            cost, argmin = _solve_dense(torch.from_numpy(snr).to(device), torch.from_numpy(m).to(device), steps)
            self._cost, self._argmin = cost.cpu().numpy(), argmin.cpu().numpy()

    def path(self, num_steps: int) -> list[int]:
        """The optimal descending trajectory with ``num_steps`` points, N-1 … 0."""
        k = check_num_steps(self.abar.size, num_steps)
        if k > self.max_steps:
            raise ValueError(f"num_steps={k} exceeds max_steps={self.max_steps} of this DP; solve with a larger one.")
        last = self.visited.size - 1
        if self.visited[0] != 0 or self.visited[-1] != self.abar.size - 1 or k > self._cost.shape[0] - 1:
            raise ValueError(
                f"no {k}-step trajectory runs through estimated timesteps only ({self.visited.size} estimated; every "
                f"trajectory needs t=0 and t={self.abar.size - 1}); estimate the table at more timesteps or use fewer steps."
            )
        points = [last]
        for level in range(k, 1, -1):
            points.append(int(self._argmin[level, points[-1]]))
        return self.visited[points].tolist()

    def cost(self, num_steps: int) -> float:
        """``sum_k J`` along ``path(num_steps)``, with the moment the DP used."""
        self.path(num_steps)
        return float(self._cost[num_steps, self.visited.size - 1])


def optimal_trajectory(
    alphas_cumprod, ms_eps, num_steps: int, x0_mse=None, data_range: DataRange = (-1.0, 1.0), ms_x0=None
) -> list[int]:
    """The K-step trajectory minimising the residual bound (``x0_mse`` given) or Analytic-DPM's (``ms_eps`` only),
    descending N-1 … 0 (:class:`TrajectoryDP`, which serves every K up to its ``max_steps`` from one pass).

    Args:
        alphas_cumprod (`np.ndarray` or a scheduler):
            The schedule.
        ms_eps (`np.ndarray`, *optional*):
            The table's ``ms_eps``: the paper's cost, with a warning, when ``x0_mse`` is not given.
        num_steps (`int`):
            K, from 2 to N.
        x0_mse (`np.ndarray`, *optional*):
            The table's ``x0_mse``: the residual cost, the bound the network really achieves.
        data_range (`tuple[float, float]`, *optional*, defaults to `(-1.0, 1.0)`), ms_x0 (`float`, *optional*):
            The paper's cost only: the bounds of ``c`` at a zero-SNR timestep, as in :class:`TrajectoryDP`.
    """
    dp = TrajectoryDP(alphas_cumprod, ms_eps, num_steps, x0_mse=x0_mse, data_range=data_range, ms_x0=ms_x0)
    return dp.path(num_steps)
