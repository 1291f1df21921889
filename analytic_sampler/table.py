"""``VarianceTable``: the per-timestep moments of one model,

    ms_eps[t] = E ||eps_theta(x_t, t)||^2 / d        x0_mse[t] = E ||x0 - x0_hat(x_t, t)||^2 / d

(``x0_hat`` clipped to the data range when one is declared), and the same two moments per channel
(``||.||^2 / d_c`` over one channel's entries; the scalar moments are their mean). From per-timestep sums ``S1 = sum m``,
``S2 = sum m^2`` over ``n`` draws of a per-draw value ``m``::

    mean = S1 / n,    stderr = sqrt(var / n),    var = (S2 - n mean^2) / (n - 1)

Saved as ``variance_table.safetensors`` (arrays) + ``variance_table.json`` (metadata); loadable from a
local folder or the Hugging Face Hub.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from .schedule import as_alphas_cumprod, schedule_fingerprint
from .variance import validate_ms_eps

FORMAT_VERSION = 4  # 2 added x0_mse / x0_mse_stderr (NaN in version 1); 3 the optional per-channel arrays; 4 the
READABLE_VERSIONS = (1, 2, 3, 4)  # optional sample cost (path_timesteps, path_x0_msd) of the sample-quality trajectory
ARRAYS_NAME = "variance_table.safetensors"
META_NAME = "variance_table.json"
_ARRAY_DTYPES = {"ms_eps": np.float64, "stderr": np.float64, "counts": np.int64, "alphas_cumprod": np.float64}
_X0_ARRAYS = ("x0_mse", "x0_mse_stderr")
CHANNEL_ARRAYS = ("channel_ms_eps", "channel_stderr", "channel_x0_mse", "channel_x0_mse_stderr")
PATH_ARRAYS = ("path_timesteps", "path_x0_msd")
REESTIMATE_HINT = (
    "re-estimate the table with this version of analytic-sampler: `analytic-sampler precompute MODEL --data DATA "
    "--out DIR` or `estimate_moments(...)` (x0_mse comes from the same model calls as ms_eps)"
)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


@dataclass
class VarianceTable:
    """Monte Carlo estimate of ``ms_eps`` and ``x0_mse`` for one model and noise schedule.

    ``ms_eps``, ``stderr``, ``x0_mse``, ``x0_mse_stderr`` and ``counts`` have one entry per training timestep
    (both moments come from the same draws); NaN / 0 where not estimated, standard errors NaN where fewer than two
    draws were made. ``x0_mse`` is NaN everywhere in tables from before it existed (format 1); ``x0_clip`` is the
    range ``x0_hat`` was clipped to when ``x0_mse`` was estimated (``None``: no clipping).

    ``channel_ms_eps``, ``channel_stderr``, ``channel_x0_mse`` and ``channel_x0_mse_stderr`` are the same moments
    per data channel, shape ``(C, N)``, or ``None`` (tables from before format 3, or merged with one).

    ``path_timesteps`` (G,), ``path_x0_msd`` (G, G) and ``path_samples`` are the sample cost of the sample-quality
    trajectory (:class:`~analytic_sampler.sample_trajectory.SampleCost`, from ``path_samples`` forward paths), or
    ``None`` / 0 (tables from before format 4, or not estimated).
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
        self.provenance = dict(self.provenance)

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
        """Both path arrays or neither: ascending timesteps in ``[0, N-1]`` and a matching square matrix."""
        if (self.path_timesteps is None) != (self.path_x0_msd is None):
            raise ValueError(f"the sample cost comes as a pair: pass both of {PATH_ARRAYS} or neither.")
        if self.path_timesteps is None:
            return
        ts = np.asarray(self.path_timesteps, dtype=np.int64)
        msd = np.asarray(self.path_x0_msd, dtype=np.float64)
        if ts.ndim != 1 or np.any(np.diff(ts) <= 0) or ts[0] != 0 or ts[-1] != n - 1 or msd.shape != (ts.size,) * 2:
            raise ValueError(f"path_timesteps must ascend from 0 to {n - 1} and path_x0_msd be square over them; "
                             "re-estimate the sample cost.")
        self.path_timesteps, self.path_x0_msd, self.path_samples = ts, msd, int(self.path_samples)

    def with_sample_cost(self, cost) -> VarianceTable:
        """A copy of this table carrying ``cost`` (a :class:`~analytic_sampler.sample_trajectory.SampleCost`)."""
        return dataclasses.replace(self, path_timesteps=cost.timesteps, path_x0_msd=cost.x0_msd,
                                   path_samples=cost.num_paths, provenance=dict(self.provenance))

    @classmethod
    def from_sums(
        cls, sums, sums_sq, counts, alphas_cumprod, x0_sums=None, x0_sums_sq=None, channel_sums=None, **kwargs
    ):
        """Build from ``S1 = sum m``, ``S2 = sum m^2`` and ``n`` per timestep (``n = 0``: not estimated), the
        same sums of the per-draw ``||x0 - x0_hat||^2 / d`` when given, and ``channel_sums``: the four sums
        (m, m^2, x0 error, its square) per channel, shape ``(4, C, N)``, when given."""
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
        if abar.shape != self.alphas_cumprod.shape or not np.allclose(abar, self.alphas_cumprod, rtol=1e-5, atol=0.0):
            raise ValueError(
                f"the variance table was estimated for schedule {self.fingerprint}, the scheduler uses "
                f"{schedule_fingerprint(abar)}; estimate a table for this model/schedule with estimate_moments "
                "(or load the table that belongs to this model)."
            )
        return self

    def merge(self, other: VarianceTable) -> VarianceTable:
        """Pool two independent estimates (e.g. runs with different seeds or data shards) by adding their sums."""
        self.check_schedule(other.alphas_cumprod)
        if self.data_range != other.data_range:
            raise ValueError(
                f"cannot merge tables with data_range {self.data_range} and {other.data_range}; "
                "estimate both with the same data_range."
            )
        if self.x0_clip != other.x0_clip and self.has_x0_mse and other.has_x0_mse:
            raise ValueError(
                f"cannot merge tables whose x0_mse was clipped to {self.x0_clip} and {other.x0_clip}; "
                "estimate both with the same data_range."
            )
        common = {k: v for k, v in self.provenance.items() if k in other.provenance and other.provenance[k] == v}
        provenance = {**common, "merged_from": [self.provenance, other.provenance]}
        total = [a + b for a, b in zip(self.sums(), other.sums())]  # x0_mse sums stay NaN if either lacks it
        channels = None
        if self.num_channels is not None and self.num_channels == other.num_channels:
            channels = self.channel_sums() + other.channel_sums()
        paths = {}  # the sample costs pool (weighted by paths) when both were estimated on the same grid
        if self.path_samples and other.path_samples and np.array_equal(self.path_timesteps, other.path_timesteps):
            count = self.path_samples + other.path_samples
            msd = (self.path_samples * self.path_x0_msd + other.path_samples * other.path_x0_msd) / count
            paths = {"path_timesteps": self.path_timesteps, "path_x0_msd": msd, "path_samples": count}
        return VarianceTable.from_sums(
            *total[:2], self.counts + other.counts, self.alphas_cumprod, *total[2:], channel_sums=channels,
            data_range=self.data_range, provenance=provenance, x0_clip=self.x0_clip, **paths,
        )

    def save(self, directory: str | os.PathLike) -> str:
        """Write ``variance_table.safetensors`` and ``variance_table.json`` into ``directory``; return it."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        arrays_path = os.path.join(directory, ARRAYS_NAME)
        dtypes = {**_ARRAY_DTYPES, **dict.fromkeys(_X0_ARRAYS, np.float64)}
        if self.num_channels is not None:
            dtypes.update(dict.fromkeys(CHANNEL_ARRAYS, np.float64))
        if self.path_timesteps is not None:
            dtypes.update(path_timesteps=np.int64, path_x0_msd=np.float64)
        save_file({k: np.ascontiguousarray(getattr(self, k), dtype=d) for k, d in dtypes.items()}, arrays_path)
        meta = {
            "format_version": FORMAT_VERSION,
            "num_train_timesteps": self.num_train_timesteps,
            "num_channels": self.num_channels,
            "path_samples": self.path_samples,
            "fingerprint": self.fingerprint,
            "data_range": None if self.data_range is None else list(self.data_range),
            "x0_clip": None if self.x0_clip is None else list(self.x0_clip),
            "provenance": self.provenance,
            "arrays_sha256": _sha256(arrays_path),
        }
        with open(os.path.join(directory, META_NAME), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        return directory

    @classmethod
    def load(
        cls,
        dir_or_repo_id: str | os.PathLike,
        subfolder: str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> VarianceTable:
        """Load from a local folder, else from a Hub repo through ``hf_hub_download`` (honours ``HF_HUB_OFFLINE``)."""
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
                meta = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise _corrupt(meta_path, f"not valid JSON ({err})") from err
        version = meta.get("format_version") if isinstance(meta, dict) else None
        if version not in READABLE_VERSIONS:
            raise ValueError(
                f"{meta_path}: table format version {version!r}, this package reads versions {READABLE_VERSIONS}; "
                "upgrade analytic-sampler or re-estimate the table."
            )
        if meta.get("arrays_sha256") != _sha256(arrays_path):
            raise _corrupt(arrays_path, f"checksum does not match the one recorded in {os.path.basename(meta_path)}")
        try:
            arrays = load_file(arrays_path)
        except (SafetensorError, OSError) as err:
            raise _corrupt(arrays_path, f"unreadable safetensors file ({err})") from err
        n = meta.get("num_train_timesteps")
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
        if version >= 4 and meta.get("path_samples"):
            paths = {key: arrays.get(key) for key in PATH_ARRAYS}
            if any(value is None for value in paths.values()):
                raise _corrupt(arrays_path, f"arrays {PATH_ARRAYS} missing (the JSON records a sample cost)")
            paths["path_samples"] = meta["path_samples"]
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
        """Create ``repo_id`` if needed and upload the two table files (into ``subfolder``); return the commit info."""
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
        if self.path_samples:
            guided += f", sample_cost={self.path_samples} paths x {self.path_timesteps.size} timesteps"
        return (
            f"VarianceTable(N={self.num_train_timesteps}, estimated={int(est.sum())}, draws/timestep={draws}, "
            f"ms_eps in {span}{channels}{guided}, data_range={self.data_range}, fingerprint={self.fingerprint!r}"
            + (f", model_id={model!r})" if model else ")")
        )


def _download(repo_id: str, filename: str, subfolder, revision, cache_dir) -> str:
    try:
        return hf_hub_download(repo_id, filename, subfolder=subfolder, revision=revision, cache_dir=cache_dir)
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
