"""DPM-Solver-v3's multistep predictor and corrector (orders 1-3) as linear maps of the stored model outputs, with
their coefficients computed once per trajectory (float64).

With the statistics ``l, s, b`` of :mod:`analytic_sampler.solver_statistics` the ODE ``dx/dlambda = alpha (D - alpha
x)`` reads ``dx/dlambda = (sigma^2 - l) x - alpha f`` with ``f = (1 - l) x / alpha - D``. For a step from ``lambda_i``
to ``lambda_t``, with ``L = int l``, ``S = int s`` and ``B(lambda) = int e^{-S} b`` all taken from ``lambda_i``, the
function ``g = e^{-S} f - B`` is constant along the ODE where the model obeys ``f' = s f + b``, and the exact solution
expanded in ``g`` is::

    x_t = (alpha_t / alpha_i) e^{-L_t} x_i - alpha_t e^{-L_t} [ sum_k A_k g^(k)(lambda_i) + C ],
    A_k = int_{lambda_i}^{lambda_t} e^{L + S} (lambda - lambda_i)^k / k! dlambda,
    C   = int_{lambda_i}^{lambda_t} e^{L + S} B dlambda,

exact for polynomial ``g`` of degree < q when the derivatives ``g^(k)`` come from the q stored outputs the step uses
(the Taylor matrix of their offsets, :func:`taylor_matrix`). Every step is therefore ::

    x_new = decay * x_i - sum_j weights[j] * f_j - const        (per feature)

The integrals run over the knots (the statistics' grid points and the trajectory's points, between which l, s, b are
linear in lambda): ``L`` and ``S`` exactly (trapezoid of a linear function), ``B``, ``A_k`` and ``C`` by 8-point
Gauss-Legendre on each knot interval (``B`` inside an interval by a nested rule), an error far below float32
sampling for any step.

Predictor of order ``p_i = min(order, i + 1)`` at step i uses the outputs at points ``i, i-1, …``; the corrector,
once the model has been called at the predicted point i+1, redoes step i with that output added (``p_i + 1``
points, UniC's order raise) and replaces ``x_{i+1}``; its output ``f_{i+1}`` is kept, so the corrector costs no model
call (DPM-Solver-v3, Zheng et al. 2023; UniPC, Zhao et al. 2023).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .solver_statistics import SolverStatistics, alpha_of

_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(8)


def taylor_matrix(offsets: np.ndarray) -> np.ndarray:
    """``M`` with ``[g, g', g'', …](lambda_anchor) = M @ [g_0, g_1, …]`` for the interpolating polynomial through
    points at ``offsets`` from the anchor (``offsets[0] = 0``: the anchor itself)."""
    offsets = np.asarray(offsets, dtype=np.float64)
    q = offsets.size
    m = np.zeros((q, q))
    m[0, 0] = 1.0
    if q > 1:
        vandermonde = np.array([[d**k / math.factorial(k) for k in range(1, q)] for d in offsets[1:]])
        inverse = np.linalg.inv(vandermonde)
        m[1:, 1:] = inverse
        m[1:, 0] = -inverse.sum(1)
    return m


@dataclass(frozen=True)
class Step:
    """``x_new = decay * x_anchor - sum_j weights[j] * f[points[j]] - const``; ``decay``, ``const`` and each weight
    of shape ``feature_shape``, ``weights`` stacked ``(len(points), *feature_shape)``."""

    points: tuple[int, ...]
    decay: np.ndarray
    weights: np.ndarray
    const: np.ndarray


def _gauss(a, b) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes and (signed) weights on ``[a, b]``; ``a``, ``b`` of any common shape (nodes last)."""
    a, b = np.asarray(a, dtype=np.float64)[..., None], np.asarray(b, dtype=np.float64)[..., None]
    return 0.5 * (a + b) + 0.5 * (b - a) * _NODES, 0.5 * (b - a) * _WEIGHTS


class _Primitives:
    """``L``, ``S``, ``B`` from an anchor, on the knots of an interval of lambda and inside their intervals."""

    def __init__(self, statistics: SolverStatistics, knots: np.ndarray, anchor: float):
        self.stats, self.knots = statistics, knots
        self.l, self.s, self.b = statistics.at(knots)
        gap = self._column(np.diff(knots))
        dl, ds = gap * (self.l[1:] + self.l[:-1]) / 2, gap * (self.s[1:] + self.s[:-1]) / 2
        i = int(np.flatnonzero(knots == anchor)[0])
        self.L = self._anchored(dl, i)
        self.S = self._anchored(ds, i)
        nodes, weights = _gauss(knots[:-1], knots[1:])  # (n - 1, 8)
        self.B = self._anchored(self._b_increments(np.arange(knots.size - 1), nodes, weights), i)

    def _column(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values).reshape(-1, *([1] * (self.l.ndim - 1)))

    @staticmethod
    def _anchored(increments: np.ndarray, anchor: int) -> np.ndarray:
        total = np.concatenate([np.zeros_like(increments[:1]), np.cumsum(increments, 0)])
        return total - total[anchor]

    def local(self, k: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``l, s, b`` and ``L, S`` (exact: linear l, s) at points ``x`` inside the intervals ``k`` (knot k to k+1)."""
        l, s, b = self.stats.at(x)
        gap = self._column(x - self.knots[k])
        return b, self.L[k] + gap * (self.l[k] + l) / 2, self.S[k] + gap * (self.s[k] + s) / 2

    def _b_increments(self, k: np.ndarray, nodes: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """``int e^{-S} b`` from knot ``k[i]`` over ``nodes[i]`` with ``weights[i]`` (rows i), summed per row."""
        shape = nodes.shape
        b, _, s_at = self.local(np.repeat(k, shape[1]), nodes.ravel())
        terms = np.exp(-s_at) * b * self._column(weights.ravel())
        return terms.reshape(*shape, *terms.shape[1:]).sum(1)

    def integrals(self, start: int, stop: int, orders: int) -> tuple[np.ndarray, np.ndarray]:
        """``A_k`` (k < ``orders``, stacked) and ``C`` over the knots ``start`` to ``stop`` (ascending)."""
        k = np.arange(start, stop)
        nodes, weights = _gauss(self.knots[k], self.knots[k + 1])  # (m, 8)
        flat_k, flat_x = np.repeat(k, nodes.shape[1]), nodes.ravel()
        _, big_l, big_s = self.local(flat_k, flat_x)
        inner_nodes, inner_weights = _gauss(self.knots[flat_k], flat_x)  # a nested rule from each interval's start
        b_at = self.B[flat_k] + self._b_increments(flat_k, inner_nodes, inner_weights)
        growth = np.exp(big_l + big_s) * self._column(weights.ravel())
        offset = self._column(flat_x - self.knots[start])
        a = np.stack([(growth * offset**j / math.factorial(j)).sum(0) for j in range(orders)])
        return a, (growth * b_at).sum(0)


def step(statistics: SolverStatistics, lambdas: np.ndarray, anchor: int, target: int, points: tuple[int, ...]
         ) -> Step:
    """The coefficients of the update from ``lambdas[anchor]`` to ``lambdas[target]`` (ascending) whose expansion of
    ``g`` uses the stored outputs at ``points`` (``points[0] == anchor``)."""
    if points[0] != anchor or target <= anchor:
        raise ValueError("a step starts at its anchor (its first point) and moves to a later point.")
    lam_i, lam_t = lambdas[anchor], lambdas[target]
    used = lambdas[list(points)]
    lo, hi = min(used.min(), lam_i), max(used.max(), lam_t)
    grid = statistics.lambdas
    knots = np.unique(np.concatenate([grid[(grid > lo) & (grid < hi)], used, [lam_i, lam_t]]))
    prim = _Primitives(statistics, knots, lam_i)
    i, t = int(np.searchsorted(knots, lam_i)), int(np.searchsorted(knots, lam_t))
    a, c = prim.integrals(i, t, len(points))
    decay = alpha_of(lam_t) / alpha_of(lam_i) * np.exp(-prim.L[t])
    scale = alpha_of(lam_t) * np.exp(-prim.L[t])
    taylor = taylor_matrix(used - lam_i)
    at = np.searchsorted(knots, used)
    mixed = np.stack([np.tensordot(taylor[:, j], a, axes=(0, 0)) for j in range(len(points))])  # sum_k A_k M_kj
    weights = scale * mixed * np.exp(-prim.S[at])
    const = scale * (c - (mixed * prim.B[at]).sum(0))
    return Step(tuple(points), decay, weights, const)


@dataclass(frozen=True)
class SolverPlan:
    """The coefficients of one trajectory with model calls at ``lambdas`` (ascending): ``predictors[i]`` takes
    ``x_i`` to ``x_{i+1}``; ``correctors[i]`` (``None`` without a corrector) redoes that step once ``f_{i+1}`` is
    known; ``l`` ``(K, *feature_shape)`` and ``alpha`` ``(K,)`` at each call (``f = (1 - l) x / alpha - D``)."""

    lambdas: np.ndarray
    predictors: tuple[Step, ...]
    correctors: tuple[Step | None, ...]
    l: np.ndarray
    alpha: np.ndarray

    def to(self, convert: Callable[[np.ndarray], Any]) -> SolverPlan:
        """The same plan with every array passed through ``convert`` (e.g. to a tensor on a device)."""
        def moved(step: Step | None) -> Step | None:
            return None if step is None else Step(step.points, *map(convert, (step.decay, step.weights, step.const)))

        return SolverPlan(self.lambdas, tuple(map(moved, self.predictors)), tuple(map(moved, self.correctors)),
                          convert(self.l), convert(self.alpha))


def solver_plan(statistics: SolverStatistics, lambdas: np.ndarray, order: int = 3, corrector: bool = True,
                lower_order_final: bool = True) -> SolverPlan:
    """The coefficients of every predictor and corrector (one order more) of a trajectory of model calls at the
    ascending half log-SNRs ``lambdas``. Step i (to point i+1 of K) has order ``min(order, i + 1)``, and with
    ``lower_order_final`` at most ``K - 1 - i`` (the last step first order, as Diffusers' multistep solvers do):
    near t = 0 the remainder's higher derivatives, from statistics of a rough model, amplify rather than cancel."""
    lambdas = np.asarray(lambdas, dtype=np.float64)
    if order not in (1, 2, 3):
        raise ValueError(f"solver order {order}; DPM-Solver-v3 here has orders 1, 2 and 3.")
    if np.any(np.diff(lambdas) <= 0):
        raise ValueError("the trajectory's half log-SNRs must ascend (timesteps descend).")
    predictors, correctors = [], []
    for i in range(lambdas.size - 1):
        p = min(order, i + 1)
        if lower_order_final:
            p = min(p, lambdas.size - 1 - i)
        predictors.append(step(statistics, lambdas, i, i + 1, tuple(i - k for k in range(p))))
        extra = (i, i + 1, *(i - k for k in range(1, p)))
        correctors.append(step(statistics, lambdas, i, i + 1, extra) if corrector else None)
    return SolverPlan(lambdas, tuple(predictors), tuple(correctors), statistics.at(lambdas)[0], alpha_of(lambdas))


def _apply(coefficients: Step, x, history: dict[int, Any]):
    out = coefficients.decay * x - coefficients.const
    for j, p in enumerate(coefficients.points):
        out = out - coefficients.weights[j] * history[p]
    return out


class SolverRun:
    """The solver along a plan (its arrays converted to the samples' kind with :meth:`SolverPlan.to`), one model call
    at a time: after call i at ``x_i`` with the clipped data prediction ``D_i``, :meth:`advance` stores
    ``f_i = (1 - l_i) x_i / alpha_i - D_i``, replaces ``x_i`` by the corrector of step i-1, and returns
    ``x_{i+1}`` (the predictor) or, after the last call, ``D_{K-1}``."""

    def __init__(self, plan: SolverPlan):
        self.plan = plan
        self.history: dict[int, Any] = {}
        self.anchor = None

    def advance(self, i: int, x, d):
        plan = self.plan
        self.history[i] = (1.0 - plan.l[i]) * x / plan.alpha[i] - d
        if i > 0 and plan.correctors[i - 1] is not None and self.anchor is not None:
            x = _apply(plan.correctors[i - 1], self.anchor, self.history)
        if i + 1 == len(plan.lambdas):
            self.history, self.anchor = {}, None
            return d
        self.anchor = x
        return _apply(plan.predictors[i], x, self.history)
