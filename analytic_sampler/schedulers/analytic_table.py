"""What :class:`~analytic_sampler.AnalyticDPMScheduler` samples with: its state, taken from the model's variance table.

All of it belongs to the table, none of it is an option: the moments ``ms_eps`` and ``x0_mse`` (and per data channel),
the data's second moment and range, the reading of the model's output the table was estimated with, the sample shape
and schedule it was estimated for, and the sample cost of the sample-quality trajectory. ``from_table`` takes them from
a :class:`~analytic_sampler.VarianceTable` (:meth:`AnalyticTable.from_variance_table`); ``from_config(config,
ms_eps=...)`` and configs saved by earlier versions, which held them inline, give them as arguments
(:func:`table_arguments`). The scheduler saves its table in ``analytic_table.json`` beside its config
(:mod:`analytic_sampler.schedulers.table_file`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..sample_trajectory import SampleCost
from ..schedule import schedule_fingerprint
from ..table import REESTIMATE_HINT, validate_ms_eps
from .table_file import SchedulerTable

TABLE_FILE = "analytic_table.json"
# from_config's keyword arguments that give the table, which configs saved by earlier versions held inline (the last
# two under other names)
TABLE_ARGUMENTS = ("ms_eps", "x0_mse", "channel_ms_eps", "channel_x0_mse", "ms_x0", "channel_ms_x0", "data_range")
RENAMED = {"table_fingerprint": "fingerprint", "table_sample_shape": "sample_shape"}


@dataclass(eq=False)
class AnalyticTable(SchedulerTable):
    """The table a scheduler samples with, float64 and read-only.

    ``ms_eps`` and ``x0_mse`` ``(N,)``, their per-channel rows ``(C, N)`` (given only the rows, the scalar is their
    mean; given both, they must agree), the data's second moment ``ms_x0 = E||x0||^2 / d`` (and ``(C,)`` per channel)
    that bounds the analytic variance, the data range (``None``: unbounded, latents), the ``prediction_type`` it was
    estimated with, the shape of one sample, the schedule fingerprint, and the sample cost
    (:class:`~analytic_sampler.sample_trajectory.SampleCost`: ``path_timesteps``, ``path_x0_msd``, ``path_samples``).
    """

    describes = "variance table"

    ms_eps: np.ndarray | None = None
    x0_mse: np.ndarray | None = None
    channel_ms_eps: np.ndarray | None = None
    channel_x0_mse: np.ndarray | None = None
    ms_x0: float | None = None
    channel_ms_x0: np.ndarray | None = None
    data_range: tuple[float, float] | None = (-1.0, 1.0)
    prediction_type: str | None = None
    sample_shape: tuple[int, ...] | None = None
    fingerprint: str | None = None
    path_timesteps: np.ndarray | None = None
    path_x0_msd: np.ndarray | None = None
    path_samples: int = 0

    def __post_init__(self):
        columns = [value for value in (self.channel_ms_eps, self.ms_eps) if value is not None]
        if not columns:
            raise ValueError(
                "the variance table needs ms_eps (or channel_ms_eps): build the scheduler with "
                "AnalyticDPMScheduler.from_table(table, config), or pass ms_eps=table.ms_eps to from_config."
            )
        n = np.shape(columns[0])[-1]
        for name in ("channel_ms_eps", "channel_x0_mse"):
            if getattr(self, name) is not None:
                setattr(self, name, np.array(validate_ms_eps(getattr(self, name), n, [], name, per_channel=True)))
        if self.channel_x0_mse is not None and self.channel_ms_eps is not None and \
                self.channel_ms_eps.shape != self.channel_x0_mse.shape:
            raise ValueError(f"channel_ms_eps has shape {self.channel_ms_eps.shape} but channel_x0_mse "
                             f"{self.channel_x0_mse.shape}; pass both from the same VarianceTable.")
        self.ms_eps = _scalar_moment("ms_eps", self.ms_eps, self.channel_ms_eps, n)
        self.x0_mse = _scalar_moment("x0_mse", self.x0_mse, self.channel_x0_mse, n)
        if self.x0_mse is not None and not np.isfinite(self.x0_mse).any():
            raise ValueError(
                "x0_mse is NaN at every timestep (a table estimated before x0_mse existed, or merged with one): leave "
                "x0_mse out (variance='analytic' and timestep_spacing='optimal', with Analytic-DPM's cost, need only "
                f"ms_eps), or {REESTIMATE_HINT}."
            )
        self.channel_ms_x0 = _channel_ms_x0(self.channel_ms_x0, self.channel_ms_eps, self.channel_x0_mse)
        self.ms_x0 = _ms_x0(self.ms_x0, self.channel_ms_x0)
        self.data_range = None if self.data_range is None else tuple(float(v) for v in self.data_range)
        self.sample_shape = None if self.sample_shape is None else tuple(int(v) for v in self.sample_shape)
        if self.path_timesteps is not None or self.path_x0_msd is not None:
            cost = SampleCost(self.path_timesteps, self.path_x0_msd, int(self.path_samples))
            self.path_timesteps, self.path_x0_msd = np.array(cost.timesteps), np.array(cost.x0_msd)
        super().__post_init__()

    @classmethod
    def from_variance_table(cls, table) -> AnalyticTable:
        """The scheduler's table from a :class:`~analytic_sampler.VarianceTable`: its moments (``x0_mse`` where it
        has one), the data's second moment (per channel where it has per-channel moments), data range, prediction
        type, sample shape, schedule fingerprint and sample cost."""
        channel_ms_x0 = table.channel_ms_x0  # the data's mean square per channel (tables of this version)
        per_channel = channel_ms_x0 is not None and table.num_channels == len(channel_ms_x0)
        return cls(
            ms_eps=table.ms_eps, x0_mse=table.x0_mse if table.has_x0_mse else None,
            channel_ms_eps=table.channel_ms_eps, channel_x0_mse=table.channel_x0_mse,
            ms_x0=None if per_channel else table.ms_x0, channel_ms_x0=channel_ms_x0 if per_channel else None,
            data_range=table.data_range, prediction_type=table.provenance.get("prediction_type"),
            sample_shape=table.provenance.get("sample_shape"), fingerprint=table.fingerprint,
            path_timesteps=table.path_timesteps, path_x0_msd=table.path_x0_msd, path_samples=table.path_samples,
        )

    @property
    def num_channels(self) -> int | None:
        return None if self.channel_ms_eps is None else int(self.channel_ms_eps.shape[0])

    @property
    def sample_cost(self) -> SampleCost | None:
        """The sample cost of the sample-quality trajectory, when the table has one."""
        return None if self.path_timesteps is None else SampleCost(self.path_timesteps, self.path_x0_msd,
                                                                   self.path_samples)

    def check_schedule(self, alphas_cumprod: np.ndarray) -> None:
        """Refuse a schedule of another length than the table's columns, or with another fingerprint."""
        n = len(alphas_cumprod)
        for name in ("channel_ms_eps", "channel_x0_mse", "ms_eps", "x0_mse"):
            if getattr(self, name) is not None:
                validate_ms_eps(getattr(self, name), n, [], name, per_channel=name.startswith("channel_"))
        if self.fingerprint is not None and self.fingerprint != schedule_fingerprint(alphas_cumprod):
            raise ValueError(
                f"the variance table was estimated for schedule {self.fingerprint}, but this scheduler's config "
                f"gives {schedule_fingerprint(alphas_cumprod)}; estimate a table with this model's own scheduler "
                "config."
            )


def table_arguments(config: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Take the table's fields out of a config saved by an earlier version (which held them inline) and out of
    ``from_config``'s keyword arguments (which win), in place; return them by field name (empty when neither has
    any)."""
    fields = {}
    for source in (config, kwargs):
        for key in [key for key in source if key in TABLE_ARGUMENTS or key in RENAMED]:
            fields[RENAMED.get(key, key)] = source.pop(key)
    return fields


def _scalar_moment(name: str, value, channel_rows: np.ndarray | None, n: int) -> np.ndarray | None:
    """``value`` checked, else the channel mean of ``channel_rows`` (as in a table); both given must agree."""
    if value is None:
        return None if channel_rows is None else channel_rows.mean(0)
    value = np.array(validate_ms_eps(value, n, [], name))
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


def _channel_ms_x0(value, *channel_rows: np.ndarray | None) -> np.ndarray | None:
    """``E||x0_c||^2 / d_c``: one finite value >= 0 per data channel of the per-channel rows."""
    if value is None:
        return None
    ms_x0 = np.array(value, dtype=np.float64)
    wanted = next((rows.shape[0] for rows in channel_rows if rows is not None), None)
    if ms_x0.ndim != 1 or (wanted is not None and ms_x0.size != wanted):
        raise ValueError(
            f"channel_ms_x0 has shape {ms_x0.shape}; it needs one E||x0_c||^2 / d_c per data channel "
            f"({wanted if wanted is not None else 'C'} values), from the same VarianceTable as channel_ms_eps."
        )
    if not np.all(np.isfinite(ms_x0)) or np.any(ms_x0 < 0):
        raise ValueError("channel_ms_x0 must hold finite numbers >= 0 (the data's mean square per channel).")
    return ms_x0


def _ms_x0(value, channel_ms_x0: np.ndarray | None) -> float | None:
    """``E||x0||^2 / d``: the mean of ``channel_ms_x0`` where there is one (``value``, if given, must be it)."""
    if value is not None and (not math.isfinite(float(value)) or float(value) < 0):
        raise ValueError(f"ms_x0={value} must be E||x0||^2 / d of the data: a finite number >= 0.")
    if channel_ms_x0 is None:
        return None if value is None else float(value)
    mean = float(channel_ms_x0.mean())
    if value is not None and not math.isclose(float(value), mean, rel_tol=1e-6):
        raise ValueError(
            f"ms_x0={value} is not the mean of channel_ms_x0 ({mean:.6g}): they come from different tables; "
            "pass both from the same VarianceTable, or only one."
        )
    return mean
