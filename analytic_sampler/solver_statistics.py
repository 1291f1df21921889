"""``SolverStatistics``: the empirical model statistics ``l, s, b`` of DPM-Solver-v3 (Zheng et al., NeurIPS 2023) for
one model, on a grid of training timesteps.

Notation (float64): ``alpha_t = sqrt(abar[t])``, ``sigma_t = sqrt(1 - abar[t])``, ``lambda_t = log(alpha_t / sigma_t)``
(half the log-SNR; sampling runs lambda upwards). ``D(x, t)`` is the model's data prediction, clipped to the data
range where one is declared, and the probability-flow ODE is ``dx/dlambda = alpha (D - alpha x)``. With ``u = x /
alpha`` and a linear coefficient ``l`` (one value per feature: a pixel, or a channel of latents) the solver's model
output and its derivative along the ODE are

    f  = (1 - l) u - D
    f' = df/dlambda = -(1 - l + l') u + (1 - l) D - D1,        D1 = dD/dlambda along the ODE,  l' = dl/dlambda,

and the statistics minimise, per grid point and feature, over forward-noised data ``x = alpha x0 + sigma n``::

    l = E[ (d(sigma eps)/dx)_ii ] = 1 - (alpha / sigma) E[ n_i (D_i - x0_i) ]        (Stein's identity in n)
    s = Cov(f', f) / (Var(f) + Var(l_hat) Var(u)),    b = E f' - s E f

the least squares of f' on f with a ridge: ``Var(l_hat) Var(u)`` is the part of Var(f) that the estimation noise of
``l`` alone puts there (f holds ``-(l_hat - l) u``). Where the model is linear in x per feature (as the exact model
of Gaussian data is) f is that noise and nothing else, its least-squares s has poles where the noise crosses zero,
and the solver's ``e^{S}`` factors blow up; the ridge keeps s finite there (b absorbs the drift of f). Where f
carries the model's own nonlinearity (Var(f) well above the noise) it changes s little.

:meth:`SolverStatistics.from_sums` turns the Monte Carlo sums of
:mod:`analytic_sampler.estimation.solver_statistics` into ``l, s, b`` with delete-one-group jackknife standard errors;
between grid points the solver reads them linearly interpolated in lambda (:meth:`SolverStatistics.at`).

Saved as two files beside a variance table (``save``, ``load``; their own format version, independent of the
table's): ``solver_statistics.safetensors`` (the arrays, with a copy of the metadata in its header) and
``solver_statistics.json`` (the metadata, strict JSON, with the arrays file's SHA-256). A table folder without them
(an older table) simply has no statistics: :meth:`SolverStatistics.find` returns ``None``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .fingerprint import file_sha256
from .schedule import as_alphas_cumprod, schedule_fingerprint

FORMAT = "analytic-sampler solver statistics"
FORMAT_VERSION = 1
ARRAYS_NAME = "solver_statistics.safetensors"
META_NAME = "solver_statistics.json"
HEADER_KEY = "solver_statistics"
#: per-feature sums the Monte Carlo pass accumulates, in this order (``n`` the noise, ``x0`` the data)
MOMENTS = ("u", "D", "D1", "uu", "DD", "uD", "D1u", "D1D", "stein")
STATISTICS = ("l", "s", "b")
VAR_FLOOR = 1e-12  # keeps s = 0 where f and its parts are constant (a pixel that is always clipped)
REESTIMATE = ("estimate them with `analytic-sampler precompute MODEL --data DATA` (a pass after the table) or "
              "estimate_solver_statistics(...)")


def half_log_snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """``lambda_t = log(alpha_t / sigma_t) = (log abar - log(1 - abar)) / 2`` at every training timestep (float64)."""
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    return 0.5 * (np.log(abar) - np.log1p(-abar))


def alpha_of(lam) -> np.ndarray:
    """``alpha = sqrt(sigmoid(2 lambda))``, the VP signal scale at half log-SNR ``lambda``."""
    return np.sqrt(0.5 * (1.0 + np.tanh(np.asarray(lam, dtype=np.float64))))


def statistics_grid(alphas_cumprod: np.ndarray, num_points: int) -> np.ndarray:
    """About ``num_points`` training timesteps, uniform in lambda from ``t = N-1`` to ``t = 0`` (both kept), rounded to
    integers and made distinct (where one timestep spans more lambda than the spacing, as near t = 0): descending t,
    ascending lambda."""
    lam = half_log_snr(alphas_cumprod)
    if num_points < 2:
        raise ValueError(f"a statistics grid needs at least 2 points; got {num_points}.")
    wanted = np.linspace(lam[-1], lam[0], num_points)
    t = np.interp(wanted, lam[::-1], np.arange(lam.size, dtype=np.float64)[::-1])
    return np.unique(np.round(t).astype(np.int64))[::-1].copy()


def logsnr_timesteps(alphas_cumprod: np.ndarray, num_steps: int, t_last: int, power: float) -> list[int]:
    """``num_steps`` integer timesteps from N-1 down to ``t_last`` whose lambda is ``lambda(N-1) + (lambda(t_last) -
    lambda(N-1)) u^(1/power)``, u uniform on [0, 1] (power > 1: denser at high noise), rounded and kept distinct."""
    lam = half_log_snr(alphas_cumprod)
    n = lam.size
    if not 0 <= t_last < n - 1 or power <= 0:
        raise ValueError(f"t_last={t_last} must lie in [0, {n - 2}] and power={power} be positive.")
    u = np.linspace(0.0, 1.0, num_steps) ** (1.0 / power)
    wanted = lam[-1] + (lam[t_last] - lam[-1]) * u
    t = np.round(np.interp(wanted, lam[::-1], np.arange(n, dtype=np.float64)[::-1])).astype(np.int64)
    if num_steps > 1 and np.any(np.diff(t) >= 0):
        raise ValueError(f"{num_steps} steps of the logsnr spacing round to repeated timesteps above t_last={t_last}; "
                         "use fewer steps, a smaller logsnr_t_last or a smaller logsnr_power.")
    return t.tolist()


def _l_from_means(m: dict[str, np.ndarray], alpha: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """``l = 1 - (alpha / sigma) E[n (D - x0)]`` (G, F) from the means of :data:`MOMENTS`."""
    return 1.0 - (alpha / sigma)[:, None] * m["stein"]


def _stats_from_means(m: dict[str, np.ndarray], lambdas: np.ndarray, alpha: np.ndarray, sigma: np.ndarray,
                      l_var: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``l, s, b`` (G, F) from the per-feature means ``m`` (name -> (G, F)) of :data:`MOMENTS` and the variance of
    the estimate of ``l`` (the ridge of ``s``; module docstring)."""
    l = _l_from_means(m, alpha, sigma)
    dl = np.gradient(l, lambdas, axis=0) if lambdas.size > 1 else np.zeros_like(l)
    a, c = 1.0 - l, 1.0 - l + dl  # f = a u - D,  f' = -c u + a D - D1
    var_u, var_d = m["uu"] - m["u"] ** 2, m["DD"] - m["D"] ** 2
    cov_ud, cov_d1u, cov_d1d = m["uD"] - m["u"] * m["D"], m["D1u"] - m["D1"] * m["u"], m["D1D"] - m["D1"] * m["D"]
    mean_f, mean_f1 = a * m["u"] - m["D"], -c * m["u"] + a * m["D"] - m["D1"]
    var_f = a * a * var_u - 2 * a * cov_ud + var_d
    cov = -c * a * var_u + c * cov_ud + a * a * cov_ud - a * var_d - a * cov_d1u + cov_d1d
    s = cov / (var_f + l_var * var_u + VAR_FLOOR)
    return l, s, mean_f1 - s * mean_f


def _jackknife(replicates: list[np.ndarray]) -> np.ndarray:
    """Delete-one-group jackknife variance: ``(g - 1) / g * sum_k (theta_k - mean)^2``."""
    return (len(replicates) - 1) * np.stack(replicates).var(0)


@dataclass
class SolverStatistics:
    """DPM-Solver-v3's ``l, s, b`` of one model on a grid of training timesteps (module docstring).

    Args:
        timesteps (`np.ndarray`):
            The grid: distinct training timesteps, descending (so lambda ascends), at least two.
        lambdas (`np.ndarray`):
            ``lambda_t`` at the grid (float64, ascending).
        l, s, b (`np.ndarray`):
            ``(G, *feature_shape)``: one value per grid point and feature. ``feature_shape`` is the sample's shape
            ``(C, H, W)`` for statistics per pixel, or ``(C, 1, 1)`` for statistics per channel (latents); it
            broadcasts against a sample.
        fingerprint (`str`):
            The schedule's fingerprint (:func:`~analytic_sampler.schedule.schedule_fingerprint`).
        num_samples (`int`):
            Monte Carlo draws per grid point.
        l_stderr, s_stderr, b_stderr (`np.ndarray`, *optional*):
            Jackknife standard errors, same shapes.
        provenance (`dict`, *optional*):
            How they were estimated: the model's fingerprint, prediction type, data range (the clip of ``D``), the
            finite-difference step, seed, model calls, run key.
        fitted_timesteps (`dict`, *optional*):
            Timesteps fitted to the solver on these statistics, ``{"K": [t_1, …, t_K]}`` descending
            (:mod:`analytic_sampler.estimation.solver_timesteps`).
    """

    timesteps: np.ndarray
    lambdas: np.ndarray
    l: np.ndarray
    s: np.ndarray
    b: np.ndarray
    fingerprint: str
    num_samples: int
    l_stderr: np.ndarray | None = None
    s_stderr: np.ndarray | None = None
    b_stderr: np.ndarray | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    fitted_timesteps: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self):
        self.timesteps = np.asarray(self.timesteps, dtype=np.int64)
        self.lambdas = np.asarray(self.lambdas, dtype=np.float64)
        g = self.timesteps.size
        if self.timesteps.ndim != 1 or g < 2 or np.any(np.diff(self.timesteps) >= 0):
            raise ValueError("the statistics grid must hold at least two distinct timesteps, descending.")
        if self.lambdas.shape != (g,) or np.any(np.diff(self.lambdas) <= 0):
            raise ValueError("lambdas must hold one ascending half log-SNR per grid timestep.")
        shape = np.shape(self.l)
        for name in (*STATISTICS, *(f"{k}_stderr" for k in STATISTICS)):
            value = getattr(self, name)
            if value is None:
                continue
            value = np.asarray(value, dtype=np.float64)
            if value.shape != shape or value.ndim < 2 or value.shape[0] != g:
                raise ValueError(f"{name} has shape {value.shape}; every statistic needs (grid points, *features) = "
                                 f"{shape} with {g} grid points.")
            if name in STATISTICS and not np.all(np.isfinite(value)):
                raise ValueError(f"{name} is not finite everywhere; {REESTIMATE}.")
            setattr(self, name, value)
        self.num_samples = int(self.num_samples)
        self.provenance = json.loads(json.dumps(dict(self.provenance), allow_nan=False, default=str))
        fitted = {str(k): [int(t) for t in ts] for k, ts in dict(self.fitted_timesteps).items()}
        for k, ts in fitted.items():
            if len(ts) != int(k) or np.any(np.diff(ts) >= 0) or ts[0] > self.timesteps[0] or ts[-1] < 0:
                raise ValueError(f"fitted timesteps for K={k} must be {k} descending timesteps of the schedule; got "
                                 f"{ts}.")
        self.fitted_timesteps = dict(sorted(fitted.items(), key=lambda kv: int(kv[0])))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_sums(cls, sums: np.ndarray, counts: np.ndarray, timesteps: np.ndarray, alphas_cumprod: np.ndarray,
                  feature_shape: tuple[int, ...], num_samples: int, provenance: Mapping[str, Any] | None = None
                  ) -> SolverStatistics:
        """The statistics of per-group Monte Carlo sums, with delete-one-group jackknife standard errors.

        Args:
            sums (`np.ndarray`):
                ``(groups, G, len(MOMENTS), F)``: the sums of :data:`MOMENTS` per group (at least 2), grid point and
            feature.
            counts (`np.ndarray`):
                ``(groups, G)``: the entries summed per feature.
            timesteps (`np.ndarray`):
                The grid (descending).
            alphas_cumprod (`np.ndarray`):
                The schedule.
            feature_shape (`tuple[int, ...]`):
                ``F`` as the shape that broadcasts against a sample.
            num_samples (`int`):
                Draws per grid point.
            provenance (`dict`, *optional*):
                Recorded with the statistics.
        """
        abar = as_alphas_cumprod(alphas_cumprod)
        ts = np.asarray(timesteps, dtype=np.int64)
        lam = half_log_snr(abar)[ts]
        alpha, sigma = np.sqrt(abar[ts]), np.sqrt(1.0 - abar[ts])
        sums, counts = np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64)

        groups = sums.shape[0]
        if groups < 2:
            raise ValueError("the statistics need at least 2 groups of draws (the jackknife gives s its ridge).")
        total, n = sums.sum(0), counts.sum(0)
        means = [{name: (total - part)[:, i] / (n - k)[:, None] for i, name in enumerate(MOMENTS)}
                 for part, k in [(0.0, 0.0), *zip(sums, counts)]]  # all draws, then each group left out
        l_var = _jackknife([_l_from_means(m, alpha, sigma) for m in means[1:]])
        full, *reps = (_stats_from_means(m, lam, alpha, sigma, l_var) for m in means)
        errors = [np.sqrt(_jackknife([r[i] for r in reps])) for i in range(3)]
        shape = (ts.size, *feature_shape)
        values = [v.reshape(shape) for v in (*full[:3], *errors)]
        return cls(ts, lam, *values[:3], schedule_fingerprint(abar), num_samples, *values[3:],
                   provenance=dict(provenance or {}))

    # ------------------------------------------------------------------ reading
    @property
    def feature_shape(self) -> tuple[int, ...]:
        """The shape of one grid point's statistic, broadcastable against a sample (``(C, H, W)`` or ``(C, 1, 1)``)."""
        return tuple(self.l.shape[1:])

    @property
    def data_range(self) -> tuple[float, float] | None:
        """The range ``D`` was clipped to when the statistics were estimated (``None``: no clip)."""
        value = self.provenance.get("data_range")
        return None if value is None else (float(value[0]), float(value[1]))

    @property
    def prediction_type(self) -> str | None:
        """How the model's output was read (``"epsilon"``, ``"v_prediction"``, ``"sample"``), where recorded."""
        return self.provenance.get("prediction_type")

    def at(self, lam) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``l, s, b`` at half log-SNRs ``lam`` (``(P,)``): each ``(P, *feature_shape)``, linear in lambda between
        grid points and held at the ends outside the grid."""
        lam = np.clip(np.asarray(lam, dtype=np.float64), self.lambdas[0], self.lambdas[-1])
        hi = np.clip(np.searchsorted(self.lambdas, lam, side="right"), 1, self.lambdas.size - 1)
        w = (lam - self.lambdas[hi - 1]) / (self.lambdas[hi] - self.lambdas[hi - 1])
        w = w.reshape(-1, *([1] * len(self.feature_shape)))
        return tuple(a[hi - 1] * (1.0 - w) + a[hi] * w for a in (self.l, self.s, self.b))

    def check_schedule(self, alphas_cumprod_or_scheduler) -> SolverStatistics:
        """Refuse another schedule than the one the statistics were estimated for; return ``self``."""
        theirs = schedule_fingerprint(as_alphas_cumprod(alphas_cumprod_or_scheduler))
        if theirs != self.fingerprint:
            raise ValueError(
                f"the solver statistics were estimated for schedule {self.fingerprint}, the scheduler uses {theirs}; "
                f"use the statistics of this model ({REESTIMATE})."
            )
        return self

    def __repr__(self) -> str:
        model = self.provenance.get("model_id")
        return (f"SolverStatistics(grid={self.timesteps.size} timesteps {self.timesteps[0]}..{self.timesteps[-1]}, "
                f"features={self.feature_shape}, draws/point={self.num_samples}, fingerprint={self.fingerprint!r}"
                + (f", model_id={model!r})" if model else ")"))

    # ------------------------------------------------------------------ files
    def metadata(self) -> dict[str, Any]:
        """What ``solver_statistics.json`` holds besides the checksum (the arrays file's header holds a copy)."""
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "fingerprint": self.fingerprint,
                "num_samples": self.num_samples, "provenance": self.provenance,
                "fitted_timesteps": self.fitted_timesteps}

    def save(self, directory: str | os.PathLike) -> str:
        """Write the two files into ``directory`` (beside a table's, or anywhere), each beside its place and renamed
        into it, the JSON last; return the folder."""
        from safetensors.numpy import save_file

        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        arrays = {"timesteps": self.timesteps, "lambdas": self.lambdas}
        for name in (*STATISTICS, *(f"{k}_stderr" for k in STATISTICS)):
            if getattr(self, name) is not None:
                arrays[name] = np.ascontiguousarray(getattr(self, name))
        meta = self.metadata()
        arrays_path, meta_path = os.path.join(directory, ARRAYS_NAME), os.path.join(directory, META_NAME)
        save_file(arrays, f"{arrays_path}.tmp", metadata={HEADER_KEY: json.dumps(meta, sort_keys=True)})
        with open(f"{meta_path}.tmp", "w") as f:
            json.dump({**meta, "arrays_sha256": file_sha256(f"{arrays_path}.tmp")}, f, indent=2, sort_keys=True,
                      allow_nan=False)
        os.replace(f"{arrays_path}.tmp", arrays_path)
        os.replace(f"{meta_path}.tmp", meta_path)
        return directory

    @classmethod
    def load(cls, dir_or_repo_id: str | os.PathLike, subfolder: str | None = None, revision: str | None = None,
             cache_dir: str | os.PathLike | None = None) -> SolverStatistics:
        """Load from a local folder (a table's), else from a Hub repo; a folder or repo without them, a corrupted or
        edited file is refused with a message that names the fix."""
        found = cls.find(dir_or_repo_id, subfolder, revision, cache_dir)
        if found is None:
            where = "/".join(p for p in (os.fspath(dir_or_repo_id), subfolder) if p)
            raise ValueError(f"{where} holds no solver statistics ({META_NAME}); {REESTIMATE}.")
        return found

    @classmethod
    def find(cls, dir_or_repo_id: str | os.PathLike, subfolder: str | None = None, revision: str | None = None,
             cache_dir: str | os.PathLike | None = None) -> SolverStatistics | None:
        """:meth:`load`, or ``None`` where the folder (or repo) has no statistics: a table of an earlier version."""
        local = os.path.join(os.fspath(dir_or_repo_id), subfolder or "")
        if os.path.isdir(local):
            meta_path = os.path.join(local, META_NAME)
            return cls._read(meta_path, os.path.join(local, ARRAYS_NAME)) if os.path.isfile(meta_path) else None
        paths = [_hub_file(os.fspath(dir_or_repo_id), name, subfolder, revision, cache_dir)
                 for name in (META_NAME, ARRAYS_NAME)]
        return None if None in paths else cls._read(*paths)

    @classmethod
    def _read(cls, meta_path: str, arrays_path: str) -> SolverStatistics:
        from safetensors import SafetensorError, safe_open
        from safetensors.numpy import load_file

        fix = f"restore the files (or download them again), or re-estimate them: {REESTIMATE}"
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format {meta.get('format')!r} version {meta.get('format_version')!r}; this version "
                                 f"of analytic-sampler reads {FORMAT!r} version {FORMAT_VERSION}")
            if meta.get("arrays_sha256") != file_sha256(arrays_path):
                raise ValueError(f"the checksum of {os.path.basename(arrays_path)} is not the one recorded")
            arrays = load_file(arrays_path)
            with safe_open(arrays_path, framework="numpy") as f:
                written = json.loads((f.metadata() or {}).get(HEADER_KEY, "null"))
            meta.pop("arrays_sha256")
            if written != meta:
                raise ValueError("its metadata differs from the copy in the arrays file (edited after it was written)")
            return cls(arrays["timesteps"], arrays["lambdas"], *(arrays[k] for k in STATISTICS), meta["fingerprint"],
                       meta["num_samples"], *(arrays.get(f"{k}_stderr") for k in STATISTICS),
                       provenance=meta.get("provenance", {}), fitted_timesteps=meta.get("fitted_timesteps", {}))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as err:
            raise ValueError(f"{meta_path}: unreadable solver statistics ({err}); {fix}.") from err


def _hub_file(repo_id: str, name: str, subfolder, revision, cache_dir) -> str | None:
    """A file of a Hub repo (through the cache, honouring ``HF_HUB_OFFLINE``), ``None`` where the repo lacks it."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, OfflineModeIsEnabled

    from .hub import hub_unreachable

    try:
        return hf_hub_download(repo_id, name, subfolder=subfolder, revision=revision, cache_dir=cache_dir,
                               local_files_only=hub_unreachable())
    except EntryNotFoundError:
        return None
    except (HFValidationError, HfHubHTTPError, OfflineModeIsEnabled, OSError) as err:
        where = "/".join(p for p in (repo_id, subfolder, name) if p)
        raise ValueError(f"could not get {where} ({type(err).__name__}: {err}); pass a local folder, or download it "
                         "while online (it is then cached for HF_HUB_OFFLINE=1).") from err
