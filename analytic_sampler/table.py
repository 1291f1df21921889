"""``VarianceTable``: the per-timestep moments of one model,

    ms_eps[t] = E ||eps_theta(x_t, t)||^2 / d        x0_mse[t] = E ||x0 - x0_hat(x_t, t)||^2 / d

(``x0_hat`` clipped to the data range when one is declared), and the same two moments per channel
(``||.||^2 / d_c`` over one channel's entries; the scalar moments are their mean). From per-timestep sums ``S1 = sum m``,
``S2 = sum m^2`` over ``n`` draws of a per-draw value ``m``::

    mean = S1 / n,    stderr = sqrt(var / n),    var = (S2 - n mean^2) / (n - 1)

Saved as ``variance_table.safetensors`` (arrays, and a copy of the metadata in its header) +
``variance_table.json`` (the metadata, strict JSON, with the arrays file's SHA-256); loadable from a local folder
or the Hugging Face Hub. The checksum covers the arrays and, through the header's copy, every metadata field: a
hand-edited JSON is refused naming the fields that changed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from .fingerprint import file_sha256
from .fitted_timesteps import FittedTimesteps
from .hub import hub_unreachable
from .schedule import as_alphas_cumprod, same_schedule, schedule_fingerprint

# 2 added x0_mse / x0_mse_stderr (NaN in version 1); 3 the optional per-channel arrays; 4 the metadata's copy in the
# arrays file (the checksum covers it) and strict-JSON provenance with the model's fingerprint and the run key; 5 the
# optional sample cost (path_timesteps, path_x0_msd) of the sample-quality trajectory; 6 the optional fitted timesteps
# (fitted_timesteps, fitted_errors, and fitted_solvers in the metadata)
FORMAT_VERSION = 6
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6)
ARRAYS_NAME = "variance_table.safetensors"
META_NAME = "variance_table.json"
HEADER_KEY = "variance_table"  # the metadata's copy in the safetensors header
CHECKSUM = "arrays_sha256"
# provenance fields in which two tables must agree to be pooled by merge (besides the schedule and data range)
MERGE_FIELDS = ("model_fingerprint", "prediction_type", "timestep_shift", "timestep_scale", "guidance_scale",
                "negative_prompt", "latent", "vae_scaling_factor")
FORCE_HINT = "pass force_table=True (on the command line: --force-table) to use it anyway"
_ARRAY_DTYPES = {"ms_eps": np.float64, "stderr": np.float64, "counts": np.int64, "alphas_cumprod": np.float64}
_X0_ARRAYS = ("x0_mse", "x0_mse_stderr")
CHANNEL_ARRAYS = ("channel_ms_eps", "channel_stderr", "channel_x0_mse", "channel_x0_mse_stderr")
PATH_ARRAYS = ("path_timesteps", "path_x0_msd")
FITTED_ARRAYS = ("fitted_timesteps", "fitted_errors")
REESTIMATE_HINT = (
    "re-estimate the table with this version of analytic-sampler: `analytic-sampler precompute MODEL --data DATA "
    "--out DIR` or `estimate_moments(...)` (x0_mse comes from the same model calls as ms_eps)"
)


def validate_ms_eps(
    ms_eps: Sequence[float] | np.ndarray,
    num_train_timesteps: int,
    needed=None,
    name: str = "ms_eps",
    per_channel: bool | None = False,
) -> np.ndarray:
    """Return a table column (``name``: ms_eps, x0_mse or a standard error) as float64, refusing a wrong shape,
    negative values, or NaN at the timesteps in ``needed``. ``per_channel``: ``False`` wants shape ``(N,)``, ``True``
    ``(C, N)`` (one row per data channel), ``None`` either."""
    ms = np.asarray(ms_eps, dtype=np.float64)
    n = num_train_timesteps
    if per_channel is False and ms.ndim == 1 and ms.size != n:
        raise ValueError(
            f"{name} has {ms.size} entries but the schedule has num_train_timesteps={n}; "
            "estimate the table with the same scheduler config as the model (estimate_moments)."
        )
    ndims = {False: (1,), True: (2,), None: (1, 2)}[per_channel]
    if ms.ndim not in ndims or ms.shape[-1] != n or ms.size == 0:
        wanted = " or ".join({1: f"({n},)", 2: f"(channels, {n})"}[d] for d in ndims)
        hint = (
            "pass the scalar column (e.g. table.ms_eps), or a per-channel one where it is accepted (channel_ms_eps)"
            if per_channel is False and ms.ndim == 2
            else "estimate the table with the same scheduler config as the model (estimate_moments)"
        )
        raise ValueError(f"{name} has shape {ms.shape}, but needs {wanted} (num_train_timesteps={n}); {hint}.")
    if np.any(ms < 0):  # NaN compares False: unestimated timesteps are refused below, where needed
        raise ValueError(
            f"{name} has negative entries (min {np.nanmin(ms):.4g}), but it is a mean square; pass the {name} of a "
            "VarianceTable from estimate_moments unchanged, or re-estimate it."
        )
    idx = np.arange(n) if needed is None else np.asarray(needed, dtype=np.int64)
    bad = ~np.isfinite(np.atleast_2d(ms)[:, idx])  # (channels or 1, len(idx))
    missing = idx[bad.any(0)]
    if missing.size:
        shown = ", ".join(map(str, missing[:8].tolist())) + (" …" if missing.size > 8 else "")
        where = f" in channel(s) {np.flatnonzero(bad.any(1)).tolist()}" if ms.ndim == 2 else ""
        raise ValueError(
            f"{name} is NaN/inf at {missing.size} needed timestep(s) ({shown}){where}; estimate them with "
            "estimate_moments(..., timesteps=...) or choose a trajectory through estimated timesteps only."
        )
    return ms


def strict_json(value: Any) -> Any:
    """``value`` as strict JSON: mappings with string keys, lists, strings, finite numbers, booleans and ``null``;
    NaN and infinities become ``null``, numpy scalars and arrays Python values, anything else its ``str``."""
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [strict_json(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, bool, int)):
        return value
    return str(value)


def _ordinary_permissions(path: str) -> None:
    """The permissions of any new file (``0o666`` less the umask: 0644 as a rule); temporary files get 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _mean_stderr(sums, sums_sq, counts) -> tuple[np.ndarray, np.ndarray]:
    """Per-timestep mean and its standard error from ``S1``, ``S2`` and ``n`` (NaN where ``n`` is too small)."""
    s1, s2, n = np.asarray(sums, dtype=np.float64), np.asarray(sums_sq, dtype=np.float64), np.asarray(counts)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(n > 0, s1 / n, np.nan)
        var = np.maximum(s2 - n * mean**2, 0.0) / (n - 1)
        return mean, np.where(n > 1, np.sqrt(var / n), np.nan)


def _sums(mean, stderr, counts) -> tuple[np.ndarray, np.ndarray]:
    """``(S1, S2)`` recovered from mean, stderr and counts (zero where not estimated)."""
    n = counts
    mean = np.where(n > 0, mean, 0.0)
    m2 = np.where(n > 1, np.nan_to_num(stderr) ** 2 * n * (n - 1), 0.0)  # sum of squared deviations
    return mean * n, m2 + n * mean**2


def _corrupt(name: str, problem: str) -> ValueError:
    return ValueError(
        f"{name}: {problem}. The variance table is corrupted or incomplete; download it again "
        "(or delete it from the Hub cache) or re-estimate it with estimate_moments."
    )


def _edited(name: str, problem: str) -> ValueError:
    return ValueError(
        f"{name}: {problem}; the file was changed after the table was written. A table's metadata records how it "
        "was estimated and is covered by its checksum: restore the file (download the table again, or delete it "
        "from the Hub cache) or re-estimate the table with estimate_moments."
    )


def _check_unedited(meta: dict[str, Any], header: dict[str, str], meta_path: str, arrays_path: str) -> None:
    """Refuse a JSON whose fields differ from the copy written into the arrays file's header, naming each one
    (``provenance.<key>`` inside the provenance)."""
    if HEADER_KEY not in header:
        raise _corrupt(arrays_path, f"its header has no copy of the metadata, which format {FORMAT_VERSION} writes")
    written = json.loads(header[HEADER_KEY])
    changed = []
    for key in sorted((set(meta) | set(written)) - {CHECKSUM}):
        now, then = meta.get(key, _ABSENT), written.get(key, _ABSENT)
        if now == then:
            continue
        if key == "provenance" and isinstance(now, dict) and isinstance(then, dict):
            changed += [_change(f"provenance.{k}", now.get(k, _ABSENT), then.get(k, _ABSENT))
                        for k in sorted(set(now) | set(then)) if now.get(k, _ABSENT) != then.get(k, _ABSENT)]
        else:
            changed.append(_change(key, now, then))
    if changed:
        raise _edited(meta_path, "; ".join(changed))


_ABSENT = object()


def _change(name: str, now: Any, then: Any) -> str:
    """``name`` with its value in the file and when written, each shortened to 60 characters."""
    def shown(value: Any) -> str:
        text = "absent" if value is _ABSENT else json.dumps(value)
        return text if len(text) <= 60 else text[:57] + "..."

    return f"{name} is {shown(now)} but was {shown(then)} when the table was written"


@dataclass
class VarianceTable:
    """Monte Carlo estimate of ``ms_eps`` and ``x0_mse`` for one model and noise schedule, as
    :func:`~analytic_sampler.estimate_moments` returns it; saved and loaded as two files (``save``, ``load``,
    ``push_to_hub``), and turned into a scheduler by ``AnalyticDPMScheduler.from_table``.

    Every array has one entry per training timestep; both moments come from the same draws.

    Args:
        ms_eps (`np.ndarray`):
            ``E||eps_theta(x_t, t)||^2 / d``, NaN where not estimated.
        stderr (`np.ndarray`):
            Its standard error, NaN where fewer than two draws were made.
        counts (`np.ndarray`):
            Draws per timestep (0: not estimated).
        alphas_cumprod (`np.ndarray`):
            The schedule the table was estimated for; its fingerprint is checked against every scheduler it serves.
        data_range (`tuple[float, float]`, *optional*, defaults to `(-1.0, 1.0)`):
            The data's range (``None``: unbounded, e.g. latents).
        fingerprint (`str`, *optional*):
            The schedule's fingerprint; computed when empty, refused when it does not match ``alphas_cumprod``.
        provenance (`dict`, *optional*):
            Model id, data, seed, settings and versions of the run.
        x0_mse (`np.ndarray`, *optional*):
            ``E||x0 - x0_hat||^2 / d``; NaN everywhere in tables from before it existed (format 1).
        x0_mse_stderr (`np.ndarray`, *optional*):
            Its standard error.
        x0_clip (`tuple[float, float]`, *optional*):
            The range ``x0_hat`` was clipped to when ``x0_mse`` was estimated (``None``: no clipping).
        channel_ms_eps, channel_stderr, channel_x0_mse, channel_x0_mse_stderr (`np.ndarray`, *optional*):
            The same moments per data channel, shape ``(C, N)``, all four or none (tables from before format 3, or
            merged with one, have none).
        path_timesteps, path_x0_msd (`np.ndarray`, *optional*), path_samples (`int`, defaults to 0):
            The sample cost of the sample-quality trajectory
            (:class:`~analytic_sampler.sample_trajectory.SampleCost`: grid ``(G,)``, matrix ``(G, G)``, from
            ``path_samples`` forward paths); none in tables from before format 5 or where it was not estimated.
        fitted_timesteps, fitted_errors (`np.ndarray`, *optional*), fitted_solvers (`tuple[str, ...]`, *optional*):
            Timesteps fitted to the model for each solver and K
            (:class:`~analytic_sampler.fitted_timesteps.FittedTimesteps`); none in tables from before format 6 or
            where they were not fitted.

    Example:

    ```py
    >>> import tempfile
    >>> from analytic_sampler import VarianceTable
    >>> from analytic_sampler.pretrained import load_pretrained

    >>> table = load_pretrained("digits-ddpm-linear").table  # or estimate_moments(...), VarianceTable.load("user/repo")
    >>> table.num_train_timesteps, int(table.counts.max()), table.has_x0_mse
    (1000, 200, True)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     loaded = VarianceTable.load(table.save(folder))
    >>> loaded.fingerprint == table.fingerprint
    True

    ```
    """

    ms_eps: np.ndarray
    stderr: np.ndarray
    counts: np.ndarray
    alphas_cumprod: np.ndarray
    data_range: tuple[float, float] | None = (-1.0, 1.0)
    fingerprint: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    x0_mse: np.ndarray | None = None
    x0_mse_stderr: np.ndarray | None = None
    x0_clip: tuple[float, float] | None = None
    channel_ms_eps: np.ndarray | None = None
    channel_stderr: np.ndarray | None = None
    channel_x0_mse: np.ndarray | None = None
    channel_x0_mse_stderr: np.ndarray | None = None
    path_timesteps: np.ndarray | None = None
    path_x0_msd: np.ndarray | None = None
    path_samples: int = 0
    fitted_timesteps: np.ndarray | None = None
    fitted_errors: np.ndarray | None = None
    fitted_solvers: tuple[str, ...] | None = None

    def __post_init__(self):
        self.alphas_cumprod = as_alphas_cumprod(self.alphas_cumprod)
        n = self.alphas_cumprod.size
        self.counts = np.asarray(self.counts, dtype=np.int64)
        if self.counts.shape != (n,) or np.any(self.counts < 0):
            raise ValueError(
                f"counts must be {n} non-negative integers, one per training timestep; got shape {self.counts.shape}."
            )
        self.ms_eps = validate_ms_eps(self.ms_eps, n, needed=np.flatnonzero(self.counts))
        for name in ("stderr", *_X0_ARRAYS):
            value = np.full(n, np.nan) if getattr(self, name) is None else np.asarray(getattr(self, name), np.float64)
            if value.shape != (n,):
                raise ValueError(f"{name} has {value.size} entries but the schedule has {n}; pass one per timestep.")
            setattr(self, name, value)
        if np.any(self.x0_mse < 0):
            raise ValueError("x0_mse has negative entries; it is a mean squared error. Re-estimate the table.")
        self._check_channel_arrays(n)
        self._check_sample_cost(n)
        self._check_fitted(n)
        if self.x0_clip is not None:
            self.x0_clip = tuple(float(v) for v in self.x0_clip)
        if self.data_range is not None:
            lo, hi = (float(v) for v in self.data_range)
            if not lo < hi:
                raise ValueError(f"data_range={self.data_range} must be (low, high) with low < high, or None.")
            self.data_range = (lo, hi)
        expected = schedule_fingerprint(self.alphas_cumprod)
        if self.fingerprint and self.fingerprint != expected:
            raise ValueError(
                f"fingerprint {self.fingerprint!r} does not match alphas_cumprod ({expected!r}); "
                "leave fingerprint empty to compute it."
            )
        self.fingerprint = expected
        self.provenance = strict_json(dict(self.provenance))

    def _check_channel_arrays(self, n: int) -> None:
        """All four per-channel arrays or none, each float64 ``(C, N)`` with one shared ``C``."""
        given = [getattr(self, name) is not None for name in CHANNEL_ARRAYS]
        if not any(given):
            return
        if not all(given):
            raise ValueError(f"per-channel arrays come together: pass all of {CHANNEL_ARRAYS} or none.")
        first = np.asarray(self.channel_ms_eps, dtype=np.float64)
        for name in CHANNEL_ARRAYS:
            value = np.asarray(getattr(self, name), dtype=np.float64)
            if value.ndim != 2 or value.shape != (first.shape[0], n):
                raise ValueError(f"{name} has shape {value.shape}; it must be (channels, {n}), like channel_ms_eps.")
            setattr(self, name, value)

    def _check_sample_cost(self, n: int) -> None:
        """Both path arrays or neither: ascending timesteps from 0 to N-1 and a matching square matrix."""
        if (self.path_timesteps is None) != (self.path_x0_msd is None):
            raise ValueError(f"the sample cost comes as a pair: pass both of {PATH_ARRAYS} or neither.")
        if self.path_timesteps is None:
            self.path_samples = 0
            return
        ts = np.asarray(self.path_timesteps, dtype=np.int64)
        msd = np.asarray(self.path_x0_msd, dtype=np.float64)
        if ts.ndim != 1 or np.any(np.diff(ts) <= 0) or ts[0] != 0 or ts[-1] != n - 1 or msd.shape != (ts.size,) * 2:
            raise ValueError(f"path_timesteps must ascend from 0 to {n - 1} and path_x0_msd be square over them; "
                             "re-estimate the sample cost.")
        if int(self.path_samples) < 1:
            raise ValueError(f"path_samples={self.path_samples}: a sample cost comes from at least one path.")
        self.path_timesteps, self.path_x0_msd, self.path_samples = ts, msd, int(self.path_samples)

    def _check_fitted(self, n: int) -> None:
        """All three fitted fields or none, consistent (:class:`FittedTimesteps`) and inside ``[0, N-1]``."""
        given = [getattr(self, name) is not None for name in (*FITTED_ARRAYS, "fitted_solvers")]
        if not any(given):
            return
        if not all(given):
            raise ValueError(f"fitted timesteps come with their errors and solvers: pass all of {FITTED_ARRAYS} and "
                             "fitted_solvers, or none.")
        fitted = FittedTimesteps(self.fitted_solvers, self.fitted_timesteps, self.fitted_errors)
        if fitted.timesteps.max() > n - 1:
            raise ValueError(f"fitted timesteps reach t={fitted.timesteps.max()} but the schedule has N={n}; refit.")
        self.fitted_timesteps, self.fitted_errors = fitted.timesteps, fitted.errors
        self.fitted_solvers = fitted.solvers

    @property
    def has_fitted_timesteps(self) -> bool:
        """Whether the table carries timesteps fitted to its model."""
        return self.fitted_timesteps is not None

    def with_fitted_timesteps(self, fitted) -> VarianceTable:
        """A copy of this table carrying ``fitted`` (a :class:`~analytic_sampler.fitted_timesteps.FittedTimesteps`)."""
        return dataclasses.replace(self, fitted_timesteps=fitted.timesteps, fitted_errors=fitted.errors,
                                   fitted_solvers=fitted.solvers, provenance=dict(self.provenance))

    @property
    def has_sample_cost(self) -> bool:
        """Whether the table carries the sample cost of the sample-quality trajectory."""
        return self.path_timesteps is not None

    def with_sample_cost(self, cost) -> VarianceTable:
        """A copy of this table carrying ``cost`` (a :class:`~analytic_sampler.sample_trajectory.SampleCost`)."""
        return dataclasses.replace(self, path_timesteps=cost.timesteps, path_x0_msd=cost.x0_msd,
                                   path_samples=cost.num_paths, provenance=dict(self.provenance))

    @classmethod
    def from_sums(
        cls, sums, sums_sq, counts, alphas_cumprod, x0_sums=None, x0_sums_sq=None, channel_sums=None, **kwargs
    ):
        """Build from per-timestep sums over ``n`` draws of a per-draw value ``m``:
        ``mean = S1 / n``, ``stderr = sqrt((S2 - n mean^2) / ((n - 1) n))``.

        Args:
            sums (`np.ndarray`):
                ``S1 = sum m`` of ``m = ||eps_theta||^2 / d``, per timestep.
            sums_sq (`np.ndarray`):
                ``S2 = sum m^2``.
            counts (`np.ndarray`):
                ``n`` per timestep (0: not estimated).
            alphas_cumprod (`np.ndarray`):
                The schedule.
            x0_sums, x0_sums_sq (`np.ndarray`, *optional*):
                The same sums of ``||x0 - x0_hat||^2 / d``.
            channel_sums (`np.ndarray`, *optional*):
                The four sums (m, m^2, x0 error, its square) per channel, shape ``(4, C, N)``.
            **kwargs:
                The other fields (``data_range``, ``provenance``, ``x0_clip``).
        """
        n = np.asarray(counts, dtype=np.int64)
        ms_eps, stderr = _mean_stderr(sums, sums_sq, n)
        if x0_sums is not None:
            kwargs["x0_mse"], kwargs["x0_mse_stderr"] = _mean_stderr(x0_sums, x0_sums_sq, n)
        if channel_sums is not None:
            c1, c2, e1, e2 = np.asarray(channel_sums, dtype=np.float64)
            kwargs["channel_ms_eps"], kwargs["channel_stderr"] = _mean_stderr(c1, c2, n)
            kwargs["channel_x0_mse"], kwargs["channel_x0_mse_stderr"] = _mean_stderr(e1, e2, n)
        return cls(ms_eps, stderr, n, alphas_cumprod, **kwargs)

    def sums(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(S1, S2)`` of ms_eps, then of x0_mse, recovered from means, stderrs and counts (zero where not
        estimated; the x0_mse sums are NaN where the table has no x0_mse)."""
        return (*_sums(self.ms_eps, self.stderr, self.counts), *_sums(self.x0_mse, self.x0_mse_stderr, self.counts))

    def channel_sums(self) -> np.ndarray | None:
        """The per-channel ``(S1, S2)`` of ms_eps and of x0_mse as one ``(4, C, N)`` array, or ``None``."""
        if self.channel_ms_eps is None:
            return None
        return np.stack([
            *_sums(self.channel_ms_eps, self.channel_stderr, self.counts),
            *_sums(self.channel_x0_mse, self.channel_x0_mse_stderr, self.counts),
        ])

    @property
    def num_channels(self) -> int | None:
        """The number of data channels with per-channel moments, ``None`` when the table has none."""
        return None if self.channel_ms_eps is None else int(self.channel_ms_eps.shape[0])

    @property
    def guidance_scale(self) -> float | None:
        """The classifier-free guidance scale the table's eps was estimated at (``None``: unguided)."""
        value = self.provenance.get("guidance_scale")
        return None if value is None else float(value)

    @property
    def channel_ms_x0(self) -> np.ndarray | None:
        """The data's mean square per channel, ``E||x0_c||^2 / d_c`` (recorded by this version's estimates of channel
        data), else ``None``."""
        value = self.provenance.get("channel_ms_x0")
        return None if value is None else np.asarray(value, dtype=np.float64)

    @property
    def ms_x0(self) -> float | None:
        """The data's second moment ``E||x0||^2 / d`` (the mean of :attr:`channel_ms_x0`), which bounds the posterior
        variance of x0 where no data range does; ``None`` when the table does not record it."""
        channel = self.channel_ms_x0
        return None if channel is None else float(channel.mean())

    @property
    def has_x0_mse(self) -> bool:
        """Whether ``x0_mse`` was estimated at every estimated timestep (tables of format 2 and later)."""
        return bool(np.isfinite(self.x0_mse[self.estimated]).all()) and bool(self.estimated.any())

    def require_x0_mse(self, purpose: str = "the residual variance and trajectory") -> np.ndarray:
        """``x0_mse``, or a ValueError naming the command that re-estimates it."""
        if not self.has_x0_mse:
            raise ValueError(
                f"{purpose} needs x0_mse, which this table does not have (estimated with an older version or merged "
                f"with such a table); {REESTIMATE_HINT}."
            )
        return self.x0_mse

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.size)

    @property
    def estimated(self) -> np.ndarray:
        """Boolean mask of the timesteps with at least one draw."""
        return self.counts > 0

    def check_schedule(self, alphas_cumprod_or_scheduler) -> VarianceTable:
        """Refuse a scheduler / schedule other than the one this table was estimated for; return ``self``."""
        abar = as_alphas_cumprod(alphas_cumprod_or_scheduler)
        if not same_schedule(abar, self.alphas_cumprod):
            raise ValueError(
                f"the variance table was estimated for schedule {self.fingerprint}, the scheduler uses "
                f"{schedule_fingerprint(abar)}; estimate a table for this model/schedule with estimate_moments "
                "(or load the table that belongs to this model)."
            )
        return self

    def merge(self, other: VarianceTable) -> VarianceTable:
        """Pool two independent estimates of one model (e.g. runs with different seeds or data shards) by adding
        their sums. Tables of another schedule, data range or x0 clip, or that differ in a provenance field of
        ``MERGE_FIELDS`` (the model's fingerprint, prediction type, timestep convention, guidance, latent
        encoding) are refused, naming the field. The merged provenance keeps every field the two share (not the run
        key: a pooled table is no single run's) and lists both under ``merged_from``. Fitted timesteps do not pool: the
        merged table has none (fit them again on it).

        Args:
            other (`VarianceTable`):
                A table of the same model, schedule and settings.
        """
        self.check_schedule(other.alphas_cumprod)
        differ = []
        if self.data_range != other.data_range:
            differ.append(f"data_range ({self.data_range} and {other.data_range})")
        if self.x0_clip != other.x0_clip and self.has_x0_mse and other.has_x0_mse:
            differ.append(f"x0_clip ({self.x0_clip} and {other.x0_clip})")
        for name in MERGE_FIELDS:
            mine, theirs = self.provenance.get(name), other.provenance.get(name)
            if name == "guidance_scale":
                mine, theirs = self.guidance_scale, other.guidance_scale
            if mine != theirs:
                differ.append(f"{name} ({mine!r} and {theirs!r})")
        if differ:
            raise ValueError(
                f"cannot merge these tables: they differ in {', '.join(differ)}. Merge only estimates of one model "
                "with the same settings (estimate_moments with other seeds or data shards); a table recorded without a "
                "field (an older version) cannot be pooled with one that has it: re-estimate it."
            )
        common = {k: v for k, v in self.provenance.items() if k in other.provenance and other.provenance[k] == v}
        common.pop("run_key", None)
        provenance = {**common, "merged_from": [self.provenance, other.provenance]}
        total = [a + b for a, b in zip(self.sums(), other.sums())]  # x0_mse sums stay NaN if either lacks it
        channels = None
        if self.num_channels is not None and self.num_channels == other.num_channels:
            channels = self.channel_sums() + other.channel_sums()
        paths = {}  # the sample costs pool (weighted by paths) when both were estimated on the same grid
        if self.has_sample_cost and other.has_sample_cost and np.array_equal(self.path_timesteps, other.path_timesteps):
            count = self.path_samples + other.path_samples
            msd = (self.path_samples * self.path_x0_msd + other.path_samples * other.path_x0_msd) / count
            paths = {"path_timesteps": self.path_timesteps, "path_x0_msd": msd, "path_samples": count}
        return VarianceTable.from_sums(
            *total[:2], self.counts + other.counts, self.alphas_cumprod, *total[2:], channel_sums=channels,
            data_range=self.data_range, provenance=provenance, x0_clip=self.x0_clip, **paths,
        )

    def check_model(self, model: Any, force: bool = False) -> VarianceTable:
        """Refuse a model this table was not estimated for: one whose config takes another number of channels than
        the table's per-channel moments have, or whose weights' fingerprint
        (:func:`~analytic_sampler.fingerprint.weights_fingerprint`) is not the one the table recorded. Tables
        without these records (older versions, merged tables of several models) are not checked. Return ``self``.

        Args:
            model (`UNet2DModel`, `EpsilonAdapter`, a pipeline or a callable):
                The model the table is about to serve.
            force (`bool`, defaults to `False`):
                Use the table anyway, with a warning naming the mismatch.
        """
        from .fingerprint import model_modules, weights_fingerprint

        model = getattr(model, "unet", model)  # a pipeline's eps model
        modules = model_modules(model)
        config = getattr(modules[0], "config", None) if modules else None
        channels = getattr(config, "in_channels", None)
        problems = []
        if self.num_channels is not None and channels is not None and channels != self.num_channels:
            problems.append(f"it holds moments of {self.num_channels} channel(s), the model takes {channels}")
        recorded = self.provenance.get("model_fingerprint")
        actual = weights_fingerprint(model) if recorded is not None and modules else None
        if actual is not None and actual != recorded:
            problems.append(f"it was estimated with weights {recorded}, this model's are {actual} (a float16 copy "
                            "of the same weights matches, another dtype does not)")
        if not problems:
            return self
        name = self.provenance.get("model_id", "unnamed model")
        message = f"the variance table ({name}) does not belong to this model: " + "; ".join(problems)
        if force:
            warnings.warn(f"{message}; used anyway (force).", stacklevel=2)
            return self
        raise ValueError(
            f"{message}. Use the table estimated for this model (`analytic-sampler precompute MODEL --data DATA` or "
            f"estimate_moments), or {FORCE_HINT}."
        )

    def metadata(self) -> dict[str, Any]:
        """What ``variance_table.json`` holds besides the checksum (and the arrays file's header a copy of)."""
        return {
            "format_version": FORMAT_VERSION,
            "num_train_timesteps": self.num_train_timesteps,
            "num_channels": self.num_channels,
            "path_samples": self.path_samples,
            "fitted_solvers": None if self.fitted_solvers is None else list(self.fitted_solvers),
            "fingerprint": self.fingerprint,
            "data_range": None if self.data_range is None else list(self.data_range),
            "x0_clip": None if self.x0_clip is None else list(self.x0_clip),
            "provenance": self.provenance,
        }

    def save(self, directory: str | os.PathLike) -> str:
        """Write ``variance_table.safetensors`` (the arrays, with a copy of the metadata in its header) and
        ``variance_table.json`` (the metadata in strict JSON, with the arrays file's SHA-256) into ``directory``,
        creating it; return it. Each file is written beside its place and renamed into it, ordinary permissions
        (0644 under the usual umask), the JSON last: a folder with a ``variance_table.json`` holds a whole table.

        Args:
            directory (`str` or `os.PathLike`):
                The folder.
        """
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        arrays_path, meta_path = os.path.join(directory, ARRAYS_NAME), os.path.join(directory, META_NAME)
        dtypes = {**_ARRAY_DTYPES, **dict.fromkeys(_X0_ARRAYS, np.float64)}
        if self.num_channels is not None:
            dtypes.update(dict.fromkeys(CHANNEL_ARRAYS, np.float64))
        if self.has_sample_cost:
            dtypes.update(path_timesteps=np.int64, path_x0_msd=np.float64)
        if self.has_fitted_timesteps:
            dtypes.update(fitted_timesteps=np.int64, fitted_errors=np.float64)
        meta = self.metadata()
        header = {HEADER_KEY: json.dumps(meta, sort_keys=True, allow_nan=False)}
        arrays = {k: np.ascontiguousarray(getattr(self, k), dtype=d) for k, d in dtypes.items()}
        save_file(arrays, f"{arrays_path}.tmp", metadata=header)
        with open(f"{meta_path}.tmp", "w") as f:
            json.dump({**meta, CHECKSUM: file_sha256(f"{arrays_path}.tmp")}, f, indent=2, sort_keys=True,
                      allow_nan=False)
        for path in (arrays_path, meta_path):
            _ordinary_permissions(f"{path}.tmp")
            os.replace(f"{path}.tmp", path)
        return directory

    @classmethod
    def load(
        cls,
        dir_or_repo_id: str | os.PathLike,
        subfolder: str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> VarianceTable:
        """Load from a local folder, else from a Hub repo through ``hf_hub_download`` (honours ``HF_HUB_OFFLINE``).
        A corrupted or foreign file is refused with a message that names the fix.

        Args:
            dir_or_repo_id (`str` or `os.PathLike`):
                A folder holding the two table files, or a Hub repo id ``"owner/name"``.
            subfolder (`str`, *optional*):
                The files' folder inside it (e.g. ``"table"`` of a model repo).
            revision (`str`, *optional*):
                The Hub revision (branch, tag or commit).
            cache_dir (`str` or `os.PathLike`, *optional*):
                The Hugging Face cache to use.
        """
        local = os.path.join(os.fspath(dir_or_repo_id), subfolder or "")
        if os.path.isdir(local):
            meta_path, arrays_path = (os.path.join(local, name) for name in (META_NAME, ARRAYS_NAME))
            for path in (meta_path, arrays_path):
                if not os.path.isfile(path):
                    raise _corrupt(path, "file not found")
        else:
            repo_id = os.fspath(dir_or_repo_id)
            meta_path, arrays_path = (
                _download(repo_id, name, subfolder, revision, cache_dir) for name in (META_NAME, ARRAYS_NAME)
            )
        return cls._read(meta_path, arrays_path)

    @classmethod
    def _read(cls, meta_path: str, arrays_path: str) -> VarianceTable:
        try:
            with open(meta_path) as f:
                meta = json.load(f)  # tables before format 4 may hold a bare NaN in their provenance
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise _corrupt(meta_path, f"not valid JSON ({err})") from err
        version = meta.get("format_version") if isinstance(meta, dict) else None
        if version not in READABLE_VERSIONS:
            raise ValueError(
                f"{meta_path}: table format version {version!r}, this package reads versions {READABLE_VERSIONS}; "
                "upgrade analytic-sampler or re-estimate the table."
            )
        if CHECKSUM not in meta:
            raise _edited(meta_path, f"its checksum '{CHECKSUM}' (of {ARRAYS_NAME}) is missing")
        if meta[CHECKSUM] != file_sha256(arrays_path):
            raise _corrupt(arrays_path, f"checksum does not match the one recorded in {os.path.basename(meta_path)}")
        try:
            arrays = load_file(arrays_path)
            with safe_open(arrays_path, framework="numpy") as f:
                header = f.metadata() or {}
        except (SafetensorError, OSError) as err:
            raise _corrupt(arrays_path, f"unreadable safetensors file ({err})") from err
        if version >= 4:
            _check_unedited(meta, header, meta_path, arrays_path)
        n = meta.get("num_train_timesteps")
        held = arrays.get("ms_eps")
        if held is not None and held.ndim == 1 and held.shape != (n,):
            raise _edited(meta_path, f"it says num_train_timesteps={n!r} but {ARRAYS_NAME} holds {held.size} timesteps")
        dtypes = {**_ARRAY_DTYPES, **(dict.fromkeys(_X0_ARRAYS, np.float64) if version >= 2 else {})}
        for key, dtype in dtypes.items():
            value = arrays.get(key)
            if value is None or value.dtype != dtype or value.shape != (n,):
                raise _corrupt(arrays_path, f"array {key!r} missing or not {np.dtype(dtype).name}[{n}]")
        channels = meta.get("num_channels") if version >= 3 else None
        for key in CHANNEL_ARRAYS if channels is not None else ():
            value = arrays.get(key)
            if value is None or value.dtype != np.float64 or value.shape != (channels, n):
                raise _corrupt(arrays_path, f"array {key!r} missing or not float64[{channels}, {n}]")
        paths = {}
        if version >= 5 and meta.get("path_samples"):
            paths = {key: arrays.get(key) for key in PATH_ARRAYS}
            if any(value is None for value in paths.values()):
                raise _corrupt(arrays_path, f"arrays {PATH_ARRAYS} missing (the JSON records a sample cost)")
            paths["path_samples"] = meta["path_samples"]
        if version >= 6 and meta.get("fitted_solvers"):
            paths.update({key: arrays.get(key) for key in FITTED_ARRAYS}, fitted_solvers=tuple(meta["fitted_solvers"]))
            if any(paths[key] is None for key in FITTED_ARRAYS):
                raise _corrupt(arrays_path, f"arrays {FITTED_ARRAYS} missing (the JSON records fitted timesteps)")
        data_range, x0_clip = meta.get("data_range"), meta.get("x0_clip")
        try:
            return cls(
                arrays["ms_eps"], arrays["stderr"], arrays["counts"], arrays["alphas_cumprod"],
                data_range=None if data_range is None else tuple(data_range),
                fingerprint=meta.get("fingerprint", ""),
                provenance=meta.get("provenance", {}),
                x0_mse=arrays.get("x0_mse"), x0_mse_stderr=arrays.get("x0_mse_stderr"),
                x0_clip=None if x0_clip is None else tuple(x0_clip),
                **{key: arrays[key] for key in CHANNEL_ARRAYS if channels is not None}, **paths,
            )
        except ValueError as err:
            raise _corrupt(arrays_path, str(err)) from err

    def push_to_hub(
        self,
        repo_id: str,
        subfolder: str | None = None,
        commit_message: str = "Upload variance table",
        private: bool | None = None,
        token: str | None = None,
    ):
        """Create ``repo_id`` if needed and upload the two table files; return the commit info.

        Args:
            repo_id (`str`):
                The Hub repo ``"owner/name"``.
            subfolder (`str`, *optional*):
                The folder inside the repo (e.g. ``"table"`` beside a model's ``unet/``).
            commit_message (`str`, defaults to `"Upload variance table"`):
                The commit message.
            private (`bool`, *optional*):
                Create the repo private.
            token (`str`, *optional*):
                A Hub token (default: the logged-in one).
        """
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save(tmp)
            return api.upload_folder(
                repo_id=repo_id, folder_path=tmp, path_in_repo=subfolder, commit_message=commit_message
            )

    def __repr__(self) -> str:
        est = self.estimated
        span = f"[{np.min(self.ms_eps[est]):.4g}, {np.max(self.ms_eps[est]):.4g}]" if est.any() else "[]"
        draws = f"{self.counts[est].min()}-{self.counts[est].max()}" if est.any() else "0"
        model = self.provenance.get("model_id")
        channels = "" if self.num_channels is None else f", channels={self.num_channels}"
        guided = "" if self.guidance_scale is None else f", guidance_scale={self.guidance_scale:g}"
        if self.has_sample_cost:
            guided += f", sample_cost={self.path_samples} paths x {self.path_timesteps.size} timesteps"
        if self.has_fitted_timesteps:
            guided += f", fitted_timesteps={'/'.join(self.fitted_solvers)}"
        return (
            f"VarianceTable(N={self.num_train_timesteps}, estimated={int(est.sum())}, draws/timestep={draws}, "
            f"ms_eps in {span}{channels}{guided}, data_range={self.data_range}, fingerprint={self.fingerprint!r}"
            + (f", model_id={model!r})" if model else ")")
        )


def _download(repo_id: str, filename: str, subfolder, revision, cache_dir) -> str:
    try:
        return hf_hub_download(repo_id, filename, subfolder=subfolder, revision=revision, cache_dir=cache_dir,
                               local_files_only=hub_unreachable())
    except HFValidationError as err:
        raise ValueError(
            f"{repo_id!r} is neither a local folder nor a valid Hub repo id; pass the folder that holds "
            f"{META_NAME} and {ARRAYS_NAME}, or a repo id like 'user/model'."
        ) from err
    except (EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled, OSError) as err:
        where = "/".join(p for p in (repo_id, subfolder, filename) if p)
        raise ValueError(
            f"could not get {where} from the Hugging Face Hub ({type(err).__name__}: {err}); check the repo id, "
            "subfolder and revision, download it while online (it is then cached for HF_HUB_OFFLINE=1), "
            "or re-estimate the table with estimate_moments."
        ) from err
