"""Deterministic samplers of the probability-flow ODE, written in their own variables, on any descending trajectory
of integer training timesteps, as Diffusers 0.42 runs them there.

At a timestep t of the VP schedule ``abar[t]`` (float64)::

    alpha_t = sqrt(abar[t]),   sigma_t = sqrt(1 - abar[t]),   lambda_t = log(alpha_t / sigma_t)

and the end point, clean data, has ``sigma = 0``, ``lambda = +inf``. A step goes from ``s0`` (history ``s1, s2``,
older) to ``t`` with ``h = lambda_t - lambda_s0``, ``phi = e^{-h} - 1``; ``m`` is the model's data prediction
``x0_hat`` limited as the model's config limits it (:class:`~analytic_sampler.denoiser.Denoiser`)::

    DPM-Solver++ (Lu et al. 2022), order 1:  x_t = (sigma_t / sigma_s0) x - alpha_t phi m0
        (= DDIM with eps recomputed from the clipped x0)
    order 2:  ... - (alpha_t phi / 2) D1,   D1 = (m0 - m1) / r0,   r0 = (lambda_s0 - lambda_s1) / h
    order 3:  ... + alpha_t (phi / h + 1) D1' - alpha_t ((phi + h) / h^2 - 1/2) D2        (Diffusers' 3M)
    UniPC (Zhao et al. 2023), predictor UniP-p, with B(h) = -h (bh1) or e^{-h} - 1 (bh2):
        x_t = (sigma_t / sigma_s0) x - alpha_t phi m0 - alpha_t B(h) sum_k rho_k D_k,   D_k = (m_{s_k} - m0) / r_k

with ``rho`` solving ``sum_k r_k^i rho_k = b_i``, ``b_i = i! phi_{i+1}(-h) / B(h)`` (UniP-2: ``rho = 1/2``). UniPC's
corrector UniC-p adds the model's ``m`` at the predicted point as a node (``r = 1``) and is applied once the model
has been called there, before the next predictor: it costs no model call.

Conventions of Diffusers' defaults (``final_sigmas_type="zero"``, ``lower_order_final=True``): the first step is
first order (multistep warm-up); DPM-Solver++ takes the last step first order and, below 15 steps, the step before it
at most second order; UniPC's order at step i of K is ``min(p, K - i, i + 1)``; the last step, to ``sigma = 0``,
returns ``m`` of the last model call. :func:`solve` reproduces ``DPMSolverMultistepScheduler`` and
``UniPCMultistepScheduler`` on the same timesteps to float32 rounding (``tests/test_reference.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .solver_specs import Solver

Denoise = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # (x, t) -> (m, eps), float64


DEFAULT_REFERENCE_STEPS = 500


def reference_grid(num_train_timesteps: int, steps: int = DEFAULT_REFERENCE_STEPS) -> list[int]:
    """The reference solve's ``steps`` integer timesteps, spaced evenly from N-1 to 0 (``round(linspace)``),
    descending."""
    if not 2 <= steps <= num_train_timesteps:
        raise ValueError(f"reference steps={steps} must be between 2 and num_train_timesteps={num_train_timesteps}.")
    return np.linspace(num_train_timesteps - 1, 0, steps).round().astype(np.int64).tolist()


def log_snr_half(alphas_cumprod, timesteps) -> torch.Tensor:
    """``lambda_t = log(alpha_t / sigma_t) = (log abar - log(1 - abar)) / 2`` (float64), ``+inf`` at ``t = -1``."""
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    t = np.asarray(timesteps, dtype=np.int64)
    a = abar[np.maximum(t, 0)]
    return torch.from_numpy(np.where(t < 0, np.inf, 0.5 * (np.log(a) - np.log1p(-a))))


def _alpha_sigma(lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.sigmoid(2 * lam).sqrt(), torch.sigmoid(-2 * lam).sqrt()


def dpmpp_step(x: torch.Tensor, ms: Sequence[torch.Tensor], lams: Sequence[torch.Tensor], lam_t: torch.Tensor,
               order: int) -> torch.Tensor:
    """One DPM-Solver++ step from ``s0`` to ``t``: ``ms = [m_s0, m_s1, m_s2]`` and their ``lams`` newest first
    (``order`` of them read); ``lam_t = inf`` (the end point) returns ``m_s0``."""
    if torch.isinf(lam_t).all():
        return ms[0].clone()
    lam_s0 = lams[0]
    h = lam_t - lam_s0
    alpha_t, sigma_t = _alpha_sigma(lam_t)
    phi = torch.expm1(-h)
    out = (sigma_t / _alpha_sigma(lam_s0)[1]) * x - (alpha_t * phi) * ms[0]
    if order == 2:
        r0 = (lam_s0 - lams[1]) / h
        out = out - (0.5 * alpha_t * phi / r0) * (ms[0] - ms[1])
    elif order == 3:
        r0, r1 = (lam_s0 - lams[1]) / h, (lams[1] - lams[2]) / h
        d1_0, d1_1 = (ms[0] - ms[1]) / r0, (ms[1] - ms[2]) / r1
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        out = out + (alpha_t * (phi / h + 1.0)) * d1 - (alpha_t * ((phi + h) / h**2 - 0.5)) * d2
    return out


def _unipc_coefficients(h: torch.Tensor, order: int, bh: str) -> tuple[torch.Tensor, torch.Tensor, list]:
    """``(phi, B(h), [b_1 … b_order])`` of UniPC's data-prediction form (``hh = -h``)."""
    hh = -h
    phi = torch.expm1(hh)
    b_h = hh if bh == "bh1" else torch.expm1(hh)
    h_phi_k, factorial, b = phi / hh - 1.0, 1.0, []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return phi, b_h, b


def _unipc_update(x: torch.Tensor, m0: torch.Tensor, nodes: list[tuple[torch.Tensor, torch.Tensor]],
                  lam_s0: torch.Tensor, lam_t: torch.Tensor, bh: str, order: int, rho_half: bool) -> torch.Tensor:
    """``(sigma_t / sigma_s0) x - alpha_t phi m0 - alpha_t B(h) sum_k rho_k D_k`` over ``nodes`` ``(r_k, D_k)``;
    ``rho_half``: the single node's ``rho = 1/2``, else ``rho`` solves the order conditions."""
    h = lam_t - lam_s0
    alpha_t, sigma_t = _alpha_sigma(lam_t)
    phi, b_h, b = _unipc_coefficients(h, order, bh)
    out = (sigma_t / _alpha_sigma(lam_s0)[1]) * x - (alpha_t * phi) * m0
    if not nodes:
        return out
    rhos = [0.5] if rho_half else _solve_rhos([rk for rk, _ in nodes], b[:len(nodes)])
    return out - (alpha_t * b_h) * sum(rho * d for rho, (_, d) in zip(rhos, nodes))


def _solve_rhos(rks: list[torch.Tensor], b: list[torch.Tensor]) -> list[torch.Tensor]:
    """``rho`` with ``sum_k r_k^i rho_k = b_i`` (i = 0 … n-1), for every entry of the (broadcast) ``r_k`` and
    ``b_i`` at once."""
    shape = torch.broadcast_shapes(*(v.shape for v in (*rks, *b)))
    r = torch.stack([v.expand(shape) for v in rks], -1)  # (..., n)
    matrix = torch.stack([r**i for i in range(len(rks))], -2)  # (..., rows i, columns k)
    solution = torch.linalg.solve(matrix, torch.stack([v.expand(shape) for v in b], -1))
    return list(solution.unbind(-1))


def unipc_predict(x: torch.Tensor, ms: Sequence[torch.Tensor], lams: Sequence[torch.Tensor], lam_t: torch.Tensor,
                  order: int, bh: str = "bh2") -> torch.Tensor:
    """UniP-``order`` from ``s0`` (``ms[0]``, ``lams[0]``; history newest first) to ``t``; the end point returns
    ``m_s0``."""
    if torch.isinf(lam_t).all():
        return ms[0].clone()
    h = lam_t - lams[0]
    nodes = [((lams[k] - lams[0]) / h, None) for k in range(1, order)]
    nodes = [(rk, (ms[k] - ms[0]) / rk) for k, (rk, _) in enumerate(nodes, start=1)]
    return _unipc_update(x, ms[0], nodes, lams[0], lam_t, bh, order, rho_half=order == 2)


def unipc_correct(x_s0: torch.Tensor, m_t: torch.Tensor, ms: Sequence[torch.Tensor], lams: Sequence[torch.Tensor],
                  lam_t: torch.Tensor, order: int, bh: str = "bh2") -> torch.Tensor:
    """UniC-``order``: ``x_t`` again from ``x_s0`` (the sample the predictor started from) with the model's ``m_t``
    at the predicted point added as a node (``r = 1``)."""
    h = lam_t - lams[0]
    nodes = [((lams[k] - lams[0]) / h, None) for k in range(1, order)]
    nodes = [(rk, (ms[k] - ms[0]) / rk) for k, (rk, _) in enumerate(nodes, start=1)]
    nodes.append((torch.ones_like(h), m_t - ms[0]))
    return _unipc_update(x_s0, ms[0], nodes, lams[0], lam_t, bh, order, rho_half=order == 1)


@dataclass
class SolverState:
    """Where a solve stands after a model call: the state ``x`` (UniPC: corrected), the model's recent ``ms`` and
    their ``lams`` (newest first), and UniPC's predictor start and order for the next correction."""

    x: torch.Tensor
    ms: list[torch.Tensor]
    lams: list[torch.Tensor]
    last_sample: torch.Tensor | None = None
    last_order: int = 1


def advance(solver: Solver, state: SolverState, lam_t: torch.Tensor, order: int) -> tuple[torch.Tensor, SolverState]:
    """The predicted state at ``lam_t`` (where the model is called next) and the state to correct it from."""
    if solver.kind == "dpmpp":
        return dpmpp_step(state.x, state.ms, state.lams, lam_t, order), state
    pred = unipc_predict(state.x, state.ms, state.lams, lam_t, order, solver.bh)
    return pred, SolverState(state.x, state.ms, state.lams, state.x, order)


def arrive(solver: Solver, previous: SolverState, x_t: torch.Tensor, m_t: torch.Tensor, lam_t: torch.Tensor
           ) -> SolverState:
    """The state at ``t`` once the model gave ``m_t`` at the predicted ``x_t`` (UniPC corrects ``x_t`` with it)."""
    if solver.kind == "unipc" and previous.last_sample is not None:
        x_t = unipc_correct(previous.last_sample, m_t, previous.ms, previous.lams, lam_t, previous.last_order,
                            solver.bh)
    return SolverState(x_t, [m_t, *previous.ms][:solver.order], [lam_t, *previous.lams][:solver.order])


@torch.inference_mode()
def solve(solver: Solver, denoise: Denoise, x_T: torch.Tensor, timesteps: Sequence[int], alphas_cumprod,
          keep: Sequence[int] = ()) -> tuple[torch.Tensor, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Run ``solver`` from ``x_T`` (taken as x at ``timesteps[0]``) through K model calls down to ``sigma = 0``.

    Returns the final sample (float64, the last call's ``m``) and, for each step index in ``keep``, the state and
    the model's ``m`` at that call (UniPC: the state after its correction)."""
    ts = [int(t) for t in timesteps]
    if not ts or any(a <= b for a, b in zip(ts, ts[1:])) or ts[-1] < 0 or ts[0] >= len(alphas_cumprod):
        raise ValueError(f"timesteps must be strictly descending integers in [0, {len(alphas_cumprod) - 1}]; got "
                         f"{ts[:6]}…")
    lam = log_snr_half(alphas_cumprod, [*ts, -1])
    orders = solver.step_orders(len(ts))
    state, kept = SolverState(x_T.double(), [], []), {}
    x = state.x
    for i, t in enumerate(ts):
        m, _ = denoise(x, torch.full((x.shape[0],), t, dtype=torch.long))
        state = arrive(solver, state, x, m, lam[i]) if i else SolverState(x, [m], [lam[0]])
        if i in keep:
            kept[i] = (state.x, m)
        x, state = advance(solver, state, lam[i + 1], orders[i])
    return x, kept
