"""The variance table an :class:`~analytic_sampler.AnalyticDPMScheduler` samples with, kept out of its config.

A Diffusers scheduler config is a small JSON that pipelines copy, print and hand to other schedulers
(``DDIMScheduler.from_config(pipe.scheduler.config)``), so the table's arrays do not go into it. They live in
``analytic_table.json`` beside ``scheduler_config.json``: written by ``save_pretrained`` / ``save_config``, read by
``from_pretrained`` from a local folder or the Hugging Face Hub. The config keeps the file's name and the SHA-256 of
the arrays (``table_file``, ``table_sha256``); a file whose arrays do not match is refused. The file is strict JSON
(``null`` where a timestep was not estimated), not safetensors: Diffusers' pipeline download takes any
``*.safetensors`` file in a component folder for model weights, and would then skip the scheduler folder's other files
and judge the whole pipeline not safetensors-compatible.

Tables in memory are found again by their checksum (a weak registry), so that ``AnalyticDPMScheduler.from_config``
of a config that refers to a table, a copy of it or a round trip through another scheduler's config, works in the
process that holds the table.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import weakref
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, OfflineModeIsEnabled

from ..hub import hub_unreachable
from ..table import REESTIMATE_HINT, validate_ms_eps

TABLE_FILE = "analytic_table.json"
TABLE_FORMAT = "analytic-sampler scheduler table"
TABLE_FORMAT_VERSION = 1
# the keyword arguments of AnalyticDPMScheduler that hold the table (never stored in its config)
TABLE_ARGUMENTS = ("ms_eps", "x0_mse", "channel_ms_eps", "channel_x0_mse", "ms_x0", "channel_ms_x0")
# the loading options of from_pretrained that also fetch the table file from the Hub
HUB_OPTIONS = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision")

_LOADED: weakref.WeakValueDictionary[str, SchedulerTable] = weakref.WeakValueDictionary()


@dataclass(eq=False)
class SchedulerTable:
    """The moments a scheduler samples with, float64 and read-only: ``ms_eps`` and ``x0_mse`` ``(N,)``, their
    per-channel rows ``(C, N)``, and the data's second moment ``ms_x0 = E||x0||^2 / d`` (a float, and ``(C,)`` per
    channel) that bounds the analytic variance. Build it with :meth:`from_arguments`."""

    ms_eps: np.ndarray
    x0_mse: np.ndarray | None = None
    channel_ms_eps: np.ndarray | None = None
    channel_x0_mse: np.ndarray | None = None
    ms_x0: float | None = None
    channel_ms_x0: np.ndarray | None = None

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                value.flags.writeable = False  # the checksum must stay true

    @classmethod
    def from_arguments(cls, num_train_timesteps: int, **arguments) -> SchedulerTable:
        """Check the scheduler's table arguments (any of :data:`TABLE_ARGUMENTS`) and build the table.

        ``ms_eps`` (or ``channel_ms_eps``, whose channel mean it then is) is required; ``x0_mse`` likewise from
        ``channel_x0_mse``, ``ms_x0`` from ``channel_ms_x0``. Given both ways, the scalar must be the channel mean
        (they come from one table), else ValueError.
        """
        unknown = set(arguments) - set(TABLE_ARGUMENTS)
        if unknown:
            raise TypeError(f"unknown table arguments {sorted(unknown)}; the table is {TABLE_ARGUMENTS}.")
        n = num_train_timesteps
        channels = {
            name: validate_ms_eps(arguments[name], n, [], name, per_channel=True)
            for name in ("channel_ms_eps", "channel_x0_mse")
            if arguments.get(name) is not None
        }
        if len({value.shape for value in channels.values()}) > 1:
            raise ValueError(
                f"channel_ms_eps has shape {channels['channel_ms_eps'].shape} but channel_x0_mse "
                f"{channels['channel_x0_mse'].shape}; pass both from the same VarianceTable."
            )
        ms_eps = _scalar_moment("ms_eps", arguments.get("ms_eps"), channels.get("channel_ms_eps"), n)
        if ms_eps is None:
            raise ValueError(
                "AnalyticDPMScheduler needs the model's variance table: run "
                "`table = estimate_moments(unet, images, scheduler)` once, then use "
                "`AnalyticDPMScheduler.from_table(table, scheduler.config)` (or pass ms_eps=table.ms_eps); a saved "
                "scheduler loads its table with AnalyticDPMScheduler.from_pretrained(folder_or_repo, subfolder=...)."
            )
        x0_mse = _scalar_moment("x0_mse", arguments.get("x0_mse"), channels.get("channel_x0_mse"), n)
        if x0_mse is not None and not np.isfinite(x0_mse).any():
            raise ValueError(
                "x0_mse is NaN at every timestep (a table estimated before x0_mse existed, or merged with one): leave "
                "x0_mse out (variance='analytic' and trajectory='optimal', with Analytic-DPM's cost, need only "
                f"ms_eps), or {REESTIMATE_HINT}."
            )
        channel_ms_x0 = _channel_ms_x0(arguments.get("channel_ms_x0"), channels)
        ms_x0 = arguments.get("ms_x0")
        if ms_x0 is not None and (not math.isfinite(float(ms_x0)) or float(ms_x0) < 0):
            raise ValueError(f"ms_x0={ms_x0} must be E||x0||^2 / d of the data: a finite number >= 0.")
        if channel_ms_x0 is not None:
            mean = float(channel_ms_x0.mean())
            if ms_x0 is not None and not math.isclose(float(ms_x0), mean, rel_tol=1e-6):
                raise ValueError(
                    f"ms_x0={ms_x0} is not the mean of channel_ms_x0 ({mean:.6g}): they come from different tables; "
                    "pass both from the same VarianceTable, or only one."
                )
            ms_x0 = mean
        return cls(ms_eps, x0_mse, channels.get("channel_ms_eps"), channels.get("channel_x0_mse"),
                   None if ms_x0 is None else float(ms_x0), channel_ms_x0)

    @property
    def num_channels(self) -> int | None:
        return None if self.channel_ms_eps is None else int(self.channel_ms_eps.shape[0])

    def arrays(self) -> dict[str, Any]:
        """The table by name, ``None`` for what it does not hold."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @functools.cached_property
    def sha256(self) -> str:
        """SHA-256 of the values (float64, little-endian, NaN and -0.0 made canonical) with their names and shapes."""
        digest = hashlib.sha256()
        for name, value in sorted(self.arrays().items()):
            if value is None:
                continue
            a = np.asarray(value, dtype="<f8")
            a = np.where(np.isnan(a), np.nan, a) + 0.0
            digest.update(f"{name}{a.shape}".encode())
            digest.update(np.ascontiguousarray(a).tobytes())
        return digest.hexdigest()

    def register(self) -> SchedulerTable:
        """Make the table findable by its checksum in this process (while something holds it); return the table
        registered under that checksum (this one, or an equal one registered before)."""
        return _LOADED.setdefault(self.sha256, self)

    def to_json(self) -> str:
        """The file's text: strict JSON, ``null`` for NaN."""
        document = {
            "format": TABLE_FORMAT,
            "format_version": TABLE_FORMAT_VERSION,
            "num_train_timesteps": int(self.ms_eps.size),
            "num_channels": self.num_channels,
            "sha256": self.sha256,
            **{name: _to_json_value(value) for name, value in self.arrays().items()},
        }
        return json.dumps(document, allow_nan=False)

    def save(self, directory: str | os.PathLike, file_name: str = TABLE_FILE) -> str:
        """Write the table file into ``directory`` (atomically); return its path."""
        path = os.path.join(os.fspath(directory), file_name)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(self.to_json())
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, path: str, expected_sha256: str) -> SchedulerTable:
        """The table of a file written by :meth:`save`, refused unless its arrays have ``expected_sha256`` (the
        checksum in the scheduler config beside it)."""
        try:
            with open(path) as f:
                document = json.load(f, parse_constant=_refuse_constant)
            if document.get("format") != TABLE_FORMAT:
                raise ValueError(f"not a {TABLE_FORMAT} file")
            if document.get("format_version") != TABLE_FORMAT_VERSION:
                raise ValueError(
                    f"format version {document.get('format_version')!r}; this package reads {TABLE_FORMAT_VERSION} "
                    "(upgrade analytic-sampler)"
                )
            table = cls.from_arguments(
                int(document["num_train_timesteps"]),
                **{name: _from_json_value(document.get(name)) for name in TABLE_ARGUMENTS},
            )
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
            raise ValueError(
                f"{path}: unreadable scheduler table ({err}); save the scheduler again with save_pretrained, or "
                "rebuild it with AnalyticDPMScheduler.from_table(table, config)."
            ) from err
        if table.sha256 != expected_sha256:
            raise ValueError(
                f"{path} holds another table than the scheduler config beside it names (sha256 {table.sha256[:12]}… "
                f"instead of {expected_sha256[:12]}…): the folder mixes files of two schedulers; save the scheduler "
                "again with save_pretrained, or rebuild it with AnalyticDPMScheduler.from_table(table, config)."
            )
        return table


def loaded_table(sha256: str) -> SchedulerTable | None:
    """The table with this checksum if this process holds it."""
    return _LOADED.get(sha256)


def read_scheduler_table(
    source: str | os.PathLike, subfolder: str | None, file_name: str, sha256: str, config_name: str,
    commit_hash: str | None = None, **hub_options,
) -> SchedulerTable:
    """The table file of the scheduler at ``source``: the folder ``from_pretrained`` read ``config_name`` from (with
    ``subfolder`` where that holds it, as Diffusers looks), else the Hub repo ``source`` at the config's commit
    (``commit_hash``), through ``hf_hub_download`` (which honours ``HF_HUB_OFFLINE``)."""
    source = os.fspath(source)
    if os.path.isfile(source):
        return SchedulerTable.read(os.path.join(os.path.dirname(source), file_name), sha256)
    if os.path.isdir(source):
        inner = os.path.join(source, subfolder or "")
        folder = inner if subfolder and os.path.isfile(os.path.join(inner, config_name)) else source
        path = os.path.join(folder, file_name)
        if not os.path.isfile(path):
            raise ValueError(
                f"{folder}'s {config_name} refers to the variance table {file_name}, which is not in the folder: copy "
                "the whole scheduler folder (save_pretrained writes both files), or rebuild the scheduler with "
                "AnalyticDPMScheduler.from_table(VarianceTable.load(...), config)."
            )
        return SchedulerTable.read(path, sha256)
    if commit_hash is not None:
        hub_options["revision"] = commit_hash
    hub_options["local_files_only"] = hub_options.get("local_files_only") or hub_unreachable()
    try:
        path = hf_hub_download(source, file_name, subfolder=subfolder, **hub_options)
    except (HFValidationError, EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled, OSError, ValueError) as err:
        where = "/".join(p for p in (source, subfolder, file_name) if p)
        raise ValueError(
            f"could not get {where}, the variance table the scheduler config refers to ({type(err).__name__}: "
            f"{err}); upload the whole scheduler folder (scheduler.save_pretrained(folder, push_to_hub=True, "
            "repo_id=...)), download it while online (it is then cached for HF_HUB_OFFLINE=1), or rebuild the "
            "scheduler with AnalyticDPMScheduler.from_table(table, config)."
        ) from err
    return SchedulerTable.read(path, sha256)


def _scalar_moment(name: str, value, channel_rows: np.ndarray | None, n: int) -> np.ndarray | None:
    """``value`` checked, else the channel mean of ``channel_rows`` (as in a table); both given must agree."""
    if value is None:
        return None if channel_rows is None else channel_rows.mean(0)
    value = validate_ms_eps(value, n, [], name)
    if channel_rows is None:
        return value
    mean = channel_rows.mean(0)
    bad = np.flatnonzero(np.isfinite(value) & np.isfinite(mean) & ~np.isclose(value, mean, rtol=1e-6, atol=1e-12))
    if bad.size:  # (NaN, where a timestep was not estimated, is checked where a trajectory needs it)
        raise ValueError(
            f"{name} is not the channel mean of channel_{name} at {bad.size} timestep(s) (e.g. t={bad[0]}): they come "
            f"from different tables; pass both from the same VarianceTable, or only one."
        )
    return value


def _channel_ms_x0(value, channels: dict[str, np.ndarray]) -> np.ndarray | None:
    if value is None:
        return None
    ms_x0 = np.asarray(value, dtype=np.float64)
    wanted = next(iter(channels.values())).shape[0] if channels else None
    if ms_x0.ndim != 1 or (wanted is not None and ms_x0.size != wanted):
        raise ValueError(
            f"channel_ms_x0 has shape {ms_x0.shape}; it needs one E||x0_c||^2 / d_c per data channel "
            f"({wanted if wanted is not None else 'C'} values), from the same VarianceTable as channel_ms_eps."
        )
    if not np.all(np.isfinite(ms_x0)) or np.any(ms_x0 < 0):
        raise ValueError("channel_ms_x0 must hold finite numbers >= 0 (the data's mean square per channel).")
    return ms_x0


def _to_json_value(value):
    if value is None or isinstance(value, float):
        return value
    return np.where(np.isnan(value), None, value.astype(object)).tolist()


def _from_json_value(value):
    if value is None or isinstance(value, (int, float)):
        return value
    return np.array(value, dtype=object).astype(np.float64)


def _refuse_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")
