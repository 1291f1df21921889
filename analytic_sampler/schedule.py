"""Noise schedules in float64, read from any Diffusers scheduler config, and Diffusers' timestep spacings.

Indexing follows Diffusers: ``abar[t] = alphas_cumprod[t]`` for ``t = 0 … N-1``; ``abar[-1] := 1``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Zero-terminal-SNR schedules end in abar = 0, where x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar)
# is undefined; their last value is raised to this floor, as Diffusers' Euler-type schedulers do (or to the geometric
# continuation of the two values before it, where that is lower, so that abar keeps decreasing). At or below it
# (SNR < 6e-8) x_t carries no usable information about x0.
ZERO_SNR_FLOOR = 2.0**-24


def cosine_alphas_cumprod(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Improved DDPM cosine schedule (Diffusers ``squaredcos_cap_v2``).

    ``f(u) = cos((u + 0.008) / 1.008 * pi/2)^2``, ``beta_t = min(1 - f((t+1)/N) / f(t/N), max_beta)``.
    """
    u = np.arange(num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps
    f = np.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = np.minimum(1.0 - f[1:] / f[:-1], max_beta)
    return np.cumprod(1.0 - betas)


def betas_from_config(config: Mapping[str, Any]) -> np.ndarray:
    """float64 betas of a DDPM / DDIM / PNDM / Stable Diffusion scheduler config (or the config's object)."""
    n = int(config.get("num_train_timesteps", 1000))
    trained = config.get("trained_betas")
    if trained is not None:
        betas = np.asarray(trained, dtype=np.float64)
        if betas.shape != (n,):
            raise ValueError(
                f"trained_betas has {betas.size} entries but num_train_timesteps is {n}; "
                "pass num_train_timesteps=len(trained_betas)."
            )
    else:
        kind = config.get("beta_schedule", "linear")
        start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
        if kind == "linear":
            betas = np.linspace(start, end, n, dtype=np.float64)
        elif kind == "scaled_linear":
            betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
        elif kind == "squaredcos_cap_v2":
            betas = betas_from_alphas_cumprod(cosine_alphas_cumprod(n))
        else:
            raise ValueError(
                f"beta_schedule={kind!r} is not supported; use 'linear', 'scaled_linear', "
                "'squaredcos_cap_v2' or pass trained_betas."
            )
    if config.get("rescale_betas_zero_snr", False):
        betas = _rescale_zero_terminal_snr(betas)
    if np.any(betas <= 0) or np.any(betas > 1):
        raise ValueError("betas must lie in (0, 1]; check beta_start, beta_end or trained_betas.")
    return betas


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(abar) so that abar[N-1] = 0."""
    root = np.sqrt(np.cumprod(1.0 - betas))
    first, last = root[0], root[-1]
    root = (root - last) * first / (first - last)
    abar = root**2
    return 1.0 - np.concatenate([abar[:1], abar[1:] / abar[:-1]])


def betas_from_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    """float64 ``beta_t = 1 - abar[t] / abar[t-1]`` (``abar[-1] = 1``), the inverse of ``cumprod(1 - betas)``."""
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    return 1.0 - abar / np.concatenate([[1.0], abar[:-1]])


def alphas_cumprod_from_config(config: Mapping[str, Any] | Any) -> np.ndarray:
    """float64 ``alphas_cumprod`` (length N) of a scheduler, its config, or a plain mapping."""
    if hasattr(config, "config") and not isinstance(config, Mapping):
        config = config.config
    abar = np.cumprod(1.0 - betas_from_config(config))
    if abar[-1] <= 0.0:  # a zero-terminal-SNR schedule; every other schedule keeps its own last value
        abar[-1] = min(ZERO_SNR_FLOOR, abar[-2] ** 2 / abar[-3])
    return abar


def as_alphas_cumprod(schedule: Any) -> np.ndarray:
    """Accept a Diffusers scheduler, its config, or an array of alphas_cumprod; return float64 abar."""
    if isinstance(schedule, (np.ndarray, Sequence)) or hasattr(schedule, "detach"):
        abar = np.asarray(schedule.detach().cpu() if hasattr(schedule, "detach") else schedule, dtype=np.float64)
        if abar.ndim != 1 or abar.size < 2 or np.any(abar <= 0) or np.any(abar > 1) or np.any(np.diff(abar) > 0):
            raise ValueError(
                "alphas_cumprod must be a 1-D, non-increasing array in (0, 1]; "
                "pass a Diffusers scheduler or its config instead."
            )
        return abar
    return alphas_cumprod_from_config(schedule)


def schedule_fingerprint(alphas_cumprod: np.ndarray) -> str:
    """A short id of a float64 schedule (hash of its values at 6 significant digits).

    Tables and schedulers compute it from the config in float64, so equal configs give equal ids;
    compare arrays of other precisions with ``np.allclose`` instead.
    """
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    text = ",".join(f"{v:.5e}" for v in abar)
    return f"N{abar.size}-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def same_schedule(alphas_cumprod: np.ndarray, other: np.ndarray) -> bool:
    """Whether two ``alphas_cumprod`` arrays are one schedule: equal length and equal to float32 precision
    (``rtol=1e-5``), so that a float32 copy matches its float64 original (fingerprints compare float64 only)."""
    a, b = np.asarray(alphas_cumprod, dtype=np.float64), np.asarray(other, dtype=np.float64)
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-5, atol=0.0))


def signal_to_noise(alphas_cumprod) -> np.ndarray:
    """``snr[t] = abar[t] / (1 - abar[t])``, float64."""
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    return abar / (1.0 - abar)


def abar_with_clean(alphas_cumprod: np.ndarray, index: np.ndarray | int) -> np.ndarray:
    """``abar[index]`` for indices from -1: ``abar[-1] = 1`` is clean data (not numpy's last entry)."""
    idx = np.asarray(index)
    return np.where(idx < 0, 1.0, np.asarray(alphas_cumprod, dtype=np.float64)[np.maximum(idx, 0)])


def check_num_steps(num_train_timesteps: int, num_steps: int, minimum: int = 2) -> int:
    """``num_steps`` (K) as an int, refused outside ``[minimum, N]`` (a sampler takes K = 1: one step to x0)."""
    if not minimum <= int(num_steps) <= num_train_timesteps:
        raise ValueError(
            f"num_steps={num_steps} must be between {minimum} and num_train_timesteps={num_train_timesteps}; "
            "the first step is t=N-1 and the last t=0."
        )
    return int(num_steps)


SPACINGS = ("leading", "linspace", "trailing")


def spaced_timesteps(num_train_timesteps: int, num_steps: int, spacing: str, steps_offset: int = 0) -> list[int]:
    """Diffusers' ``timestep_spacing`` (Lin et al. 2023, Table 2), descending, as DDIM/DDPMScheduler give it::

        leading:  arange(K) * (N // K) + steps_offset
        linspace: round(linspace(0, N-1, K))
        trailing: round(arange(N, 0, -N/K)) - 1

    Only ``leading`` uses ``steps_offset``. Diffusers' float ``arange`` gives ``trailing`` a spurious last ``t = -1``
    for some K (61 of 1000, …); the first K points are kept. K = 1 gives Diffusers' one point (``steps_offset``,
    0 and N-1 respectively).
    """
    n, k = num_train_timesteps, check_num_steps(num_train_timesteps, num_steps, minimum=1)
    if spacing == "leading":
        t = np.arange(k)[::-1] * (n // k) + int(steps_offset)
    elif spacing == "linspace":
        t = np.linspace(0, n - 1, k).round()[::-1]
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
