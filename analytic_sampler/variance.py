"""The analytic optimal reverse variance of Analytic-DPM and its Theorem 2 bounds.

For a pair ``s < t`` (``s = -1`` is clean data) with ``a_ts = abar[t] / abar[s]``, ``b_ts = 1 - a_ts``,
``bb = 1 - abar`` and ``lambda^2 = eta^2 * bb[s] * b_ts / bb[t]``::

    coef       = sqrt(abar[s]) - sqrt((bb[s] - lambda^2) * abar[t] / bb[t])
    c[t]       = clip((bb[t] / abar[t]) * (1 - ms_eps[t]), 0, c_max[t])
    c_max[t]   = min(bb[t] / abar[t], ((b - a) / 2)^2, ms_x0)      # the terms that are known
    sigma^2    = lambda^2 + coef^2 * c[t]                  # analytic: the network's mean assumed optimal
    sigma^2    = lambda^2 + coef^2 * x0_mse[t]             # residual: the network's own x0 error

The sampler's mean error is ``coef * (x0_hat - x0)``, so the residual variance minimises the expected KL of
each transition for the network's actual mean, where it equals ``(d/2) log(sigma^2 / lambda^2)`` (docs/math.md).

``c[t]`` is the posterior variance of x0, so it is at most the data's variance, hence at most its second moment
``ms_x0 = E||x0||^2 / d`` (when the table records it). Where ``abar[t] <= 2^-24`` (a zero-terminal-SNR endpoint, or
the cosine schedule's last step) x_t carries no usable information about x0 and ``(bb / abar)(1 - ms_eps)`` is
Monte Carlo noise amplified more than 1.7e7 times, so ``c[t] = c_max[t]``, the prior's bound.

Per channel (diagonal variance): a table of shape ``(C, N)``, one row per data channel, gives one sigma^2 per channel
and pair by the same formulas, ``sigma_c^2 = lambda^2 + coef^2 c_c[t]``; the result gets a leading axis of length C.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .schedule import ZERO_SNR_FLOOR, abar_with_clean

DataRange = tuple[float, float] | None


def channel_view(values, sample_ndim: int):
    """``values`` of shape ``()`` or ``(C',)`` (a tensor or an array) reshaped to ``(C', 1, …)``, to broadcast over a
    ``(B, C, …)`` sample of ``sample_ndim`` axes: one value for every channel, or one per channel (``C' = C``)."""
    return values.reshape(-1, *([1] * (sample_ndim - 2)))


def check_eta(eta: float) -> float:
    """``eta`` as a float, refused outside ``[0, 1]`` (1: DDPM-type, 0: DDIM-type)."""
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta={eta} is outside [0, 1]; use 1 for Analytic-DDPM, 0 for Analytic-DDIM.")
    return float(eta)


class PairCoefficients(NamedTuple):
    """The float64 constants of the pairs ``(s, t)``, ``s < t`` (``s = -1``: clean data), each of the pairs' shape::

        beta     = 1 - abar[t] / abar[s]                      (b_ts)
        btilde   = (1 - abar[s]) beta / (1 - abar[t])         (DDPM's posterior variance on the pair)
        lambda2  = eta^2 btilde                               (the generalised forward process's variance)
        eps_coef = sqrt(1 - abar[s] - lambda2)                (the mean's eps weight)
        coef     = sqrt(abar[s]) - sqrt((1 - abar[s] - lambda2) abar[t] / (1 - abar[t]))   (weight of x0_hat - x0)
    """

    t: np.ndarray  # t broadcast to the pairs' shape, so ``table[..., t]`` lines up with the other fields
    abar_t: np.ndarray
    abar_s: np.ndarray
    beta: np.ndarray
    btilde: np.ndarray
    lambda2: np.ndarray
    eps_coef: np.ndarray
    coef: np.ndarray


def pair_coefficients(alphas_cumprod, prev_t, t, eta: float = 1.0) -> PairCoefficients:
    """:class:`PairCoefficients` of the pairs ``(prev_t, t)`` (broadcast), after checking the pairs and ``eta``."""
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    prev_t, t = np.broadcast_arrays(np.asarray(prev_t, dtype=np.int64), np.asarray(t, dtype=np.int64))
    if np.any(prev_t >= t) or np.any(prev_t < -1) or np.any(t >= abar.size) or np.any(t < 0):
        raise ValueError("need -1 <= prev_t < t < num_train_timesteps for every pair.")
    eta = check_eta(eta)
    a_t, a_s = abar[t], abar_with_clean(abar, prev_t)
    bb_t, bb_s = 1.0 - a_t, 1.0 - a_s
    beta = 1.0 - a_t / a_s
    btilde = bb_s * beta / bb_t
    lam2 = eta**2 * btilde
    eps_var = np.maximum(bb_s - lam2, 0.0)
    coef = np.sqrt(a_s) - np.sqrt(eps_var * a_t / bb_t)
    return PairCoefficients(t, a_t, a_s, beta, btilde, lam2, np.sqrt(eps_var), coef)


def covariance_upper_bound(alphas_cumprod, t, data_range: DataRange = (-1.0, 1.0), ms_x0=None) -> np.ndarray:
    """Upper bound on ``c[t]``: ``bb[t]/abar[t]``, ``((b-a)/2)^2`` for data in ``[a, b]``, and the data's second
    moment ``ms_x0`` when given (a float, or one per channel, which adds a leading channel axis)."""
    abar = np.asarray(alphas_cumprod, dtype=np.float64)[np.asarray(t, dtype=np.int64)]
    upper = (1.0 - abar) / abar
    if data_range is not None:
        lo, hi = data_range
        upper = np.minimum(upper, ((hi - lo) / 2.0) ** 2)
    if ms_x0 is not None:
        ms_x0 = np.asarray(ms_x0, dtype=np.float64)
        upper = np.minimum(upper, ms_x0.reshape(ms_x0.shape + (1,) * abar.ndim))
    return upper


def check_zero_snr_bound(alphas_cumprod, t, data_range: DataRange, ms_x0=None) -> None:
    """Refuse a step from a zero-SNR timestep (``abar[t] <= 2^-24``) that neither a data range nor the data's second
    moment bounds: there ``c[t]`` is the prior's bound, and without one it is ``bb/abar`` (> 1.7e7), a variance that
    no sampler or likelihood bound should silently use."""
    t = np.atleast_1d(np.asarray(t, dtype=np.int64))
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    blind = t[abar[t] <= ZERO_SNR_FLOOR]
    if blind.size and data_range is None and ms_x0 is None:
        first = int(blind.max())
        raise ValueError(
            f"the step from t={first} (abar = {abar[first]:.2g}: x_t says nothing about x0) needs a bound on the "
            "data's variance, and neither a data range nor the data's second moment is known: pass ms_x0= "
            "(E||x0||^2 / d of the data, or channel_ms_x0= per channel; tables estimated with this version record "
            f"it: table.ms_x0) or a data_range, use variance='residual', or start the trajectory below t={first}."
        )


def analytic_covariance(
    alphas_cumprod, ms_eps, t, data_range: DataRange = (-1.0, 1.0), floor: float = 0.0, ms_x0=None
) -> np.ndarray:
    """``c[t] = (bb[t] / abar[t]) (1 - ms_eps[t])`` clipped to ``[floor, covariance_upper_bound]``: the posterior
    variance of x0 a perfect network implies; the bound itself where ``abar[t] <= 2^-24`` (no information about x0);
    a leading channel axis for ``ms_eps`` of shape ``(C, N)``."""
    t = np.asarray(t, dtype=np.int64)
    a_t = np.asarray(alphas_cumprod, dtype=np.float64)[t]
    check_zero_snr_bound(alphas_cumprod, t, data_range, ms_x0)
    ms = np.asarray(ms_eps, dtype=np.float64)[..., t]
    upper = covariance_upper_bound(alphas_cumprod, t, data_range, ms_x0)
    c = np.clip((1.0 - a_t) / a_t * (1.0 - ms), floor, upper)
    return np.where(a_t <= ZERO_SNR_FLOOR, np.broadcast_to(upper, c.shape), c)


def analytic_variance(
    alphas_cumprod, ms_eps, prev_t, t, eta: float = 1.0, data_range: DataRange = (-1.0, 1.0), ms_x0=None
):
    """sigma^2(prev_t, t) of Analytic-DPM, clipped to Theorem 2's bounds:
    ``lambda^2 + coef^2 c[t]``, ``c[t] = clip((bb[t] / abar[t]) (1 - ms_eps[t]), 0, c_max)``.

    Args:
        alphas_cumprod (`np.ndarray`):
            The schedule ``abar``, length N.
        ms_eps (`np.ndarray`):
            The table's ``ms_eps``, shape ``(N,)``, or ``(C, N)`` for one sigma^2 per channel.
        prev_t (`int` or `np.ndarray`):
            The earlier timestep ``s`` of each pair (``-1``: clean data); broadcasts with ``t``.
        t (`int` or `np.ndarray`):
            The later timestep of each pair.
        eta (`float`, defaults to 1.0):
            1: DDPM-type (``lambda^2 = btilde``), 0: DDIM-type, anything in ``[0, 1]``.
        data_range (`tuple[float, float]`, *optional*, defaults to `(-1.0, 1.0)`):
            Bounds ``c`` by ``((b - a) / 2)^2``; ``None``: no data bound.
        ms_x0 (`float` or `np.ndarray`, *optional*):
            The data's second moment ``E||x0||^2 / d`` (one per channel for a ``(C, N)`` table), which bounds ``c``.

    Returns:
        `np.ndarray`: float64 sigma^2 of the pairs' shape, with a leading channel axis for a ``(C, N)`` table.
    """
    pair = pair_coefficients(alphas_cumprod, prev_t, t, eta)
    return pair.lambda2 + pair.coef**2 * analytic_covariance(alphas_cumprod, ms_eps, pair.t, data_range, ms_x0=ms_x0)


def residual_variance(alphas_cumprod, x0_mse, prev_t, t, eta: float = 1.0):
    """The residual variance ``lambda^2 + coef^2 x0_mse[t]``, which minimises each step's KL for the network's own
    mean.

    Args:
        alphas_cumprod (`np.ndarray`):
            The schedule ``abar``, length N.
        x0_mse (`np.ndarray`):
            The table's ``x0_mse`` (negative entries count as 0), shape ``(N,)`` or ``(C, N)``.
        prev_t, t (`int` or `np.ndarray`):
            The pairs, as in :func:`analytic_variance`.
        eta (`float`, defaults to 1.0):
            As in :func:`analytic_variance`.

    Returns:
        `np.ndarray`: float64 sigma^2, shaped as :func:`analytic_variance`'s.
    """
    pair = pair_coefficients(alphas_cumprod, prev_t, t, eta)
    return pair.lambda2 + pair.coef**2 * np.maximum(np.asarray(x0_mse, dtype=np.float64)[..., pair.t], 0.0)


def variance_bounds(alphas_cumprod, prev_t, t, eta: float = 1.0, data_range: DataRange = (-1.0, 1.0), ms_x0=None):
    """Theorem 2: ``(lambda^2, lambda^2 + coef^2 c_max)``, the range of any optimal sigma^2 on the pairs, with
    ``c_max = min(bb[t] / abar[t], ((b - a) / 2)^2, ms_x0)``.

    Args:
        alphas_cumprod, prev_t, t, eta, data_range, ms_x0:
            As in :func:`analytic_variance`.

    Returns:
        `tuple[np.ndarray, np.ndarray]`: the lower and upper bounds.
    """
    pair = pair_coefficients(alphas_cumprod, prev_t, t, eta)
    upper = covariance_upper_bound(alphas_cumprod, pair.t, data_range, ms_x0)
    return pair.lambda2, pair.lambda2 + pair.coef**2 * upper


def ddpm_variance(alphas_cumprod, prev_t, t, kind: str = "btilde"):
    """DDPM's fixed choices on a pair: ``btilde = bb[s] b_ts / bb[t]`` (fixed_small) or ``beta = b_ts`` (fixed_large)."""
    pair = pair_coefficients(alphas_cumprod, prev_t, t, 1.0)
    if kind == "btilde":
        return pair.btilde
    if kind == "beta":
        return pair.beta
    raise ValueError(f"kind={kind!r}; use 'btilde' or 'beta'.")
