"""``AnalyticDPMScheduler``: Analytic-DPM's reverse process as a drop-in Diffusers scheduler.

One step from ``t`` to the previous point ``s`` of the trajectory (``s = -1`` after the last one)::

    x0_hat = x0 predicted by the model (clipped to the data range when clip_sample is on, or dynamically thresholded)
    eps    = (x_t - sqrt(abar[t]) x0_hat) / sqrt(1 - abar[t])
    x_s    = sqrt(abar[s]) x0_hat + sqrt(1 - abar[s] - lambda^2) eps + sigma(s, t) z

with ``lambda^2 = eta^2 btilde(s, t)`` and ``sigma^2`` either the clipped analytic variance of
:func:`analytic_sampler.analytic_variance` (``variance="analytic"``) or the residual one,
``lambda^2 + coef^2 x0_mse[t]`` (``variance="residual"``, :func:`analytic_sampler.residual_variance`).
With ``per_channel=True`` sigma is diagonal: ``sigma_c^2`` from channel c's row of the table, ``z`` scaled per channel.
The last step returns ``x0_hat`` with no noise. ``step`` computes in float32 (at least) and returns the input's dtype.

The table's arrays are not in the config: ``save_pretrained`` writes them to ``analytic_table.json`` beside
``scheduler_config.json`` and ``from_pretrained`` reads them back (:mod:`analytic_sampler.schedulers.table_file`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, FrozenDict, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..predictions import check_prediction_type, clip_x0, dynamic_threshold, split_learned_variance, to_x0_and_eps
from ..schedule import (
    SPACINGS,
    alphas_cumprod_from_config,
    betas_from_alphas_cumprod,
    betas_from_config,
    check_num_steps,
    schedule_fingerprint,
    spaced_timesteps,
)
from ..table import REESTIMATE_HINT, validate_ms_eps
from ..trajectory import TrajectoryDP, even_trajectory, quadratic_trajectory, validate_timesteps
from ..variance import analytic_variance, channel_view, check_eta, pair_coefficients, residual_variance
from .diffusers_config import explicit_keys, ignored_options, with_source_spacing
from .table_file import HUB_OPTIONS, TABLE_ARGUMENTS, TABLE_FILE, SchedulerTable, loaded_table, read_scheduler_table

TRAJECTORIES = ("optimal", "even", "quadratic")
DEFAULT_SPACING = "trailing"  # when neither trajectory nor timestep_spacing says otherwise: it measured best
SAMPLING_VARIANCES = ("analytic", "residual")  # the reverse variances the scheduler samples with, from its table
_UNSET = object()


@dataclass
class AnalyticDPMSchedulerOutput(BaseOutput):
    """``prev_sample``: x at the previous trajectory point; ``pred_original_sample``: x0_hat used for it."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class StepCoefficients(NamedTuple):
    """The constants of every step ``t -> s`` of a trajectory, one row per point ``t_K … t_1`` (``s = -1`` after
    ``t_1``)::

        x_s = sqrt_abar_s * x0_hat + eps_coef * eps_hat + sigma * z,    x0_hat, eps_hat at sqrt_abar_t, sqrt_one_minus_abar_t

    float64 arrays from :meth:`AnalyticDPMScheduler.step_coefficients`; ``step`` reads a copy in the sample's device
    and dtype (:meth:`to`).
    """

    sqrt_abar_t: np.ndarray  # (K,) sqrt(abar[t])
    sqrt_one_minus_abar_t: np.ndarray  # (K,) sqrt(1 - abar[t])
    sqrt_abar_s: np.ndarray  # (K,) sqrt(abar[s]); 1 at the last step
    eps_coef: np.ndarray  # (K,) sqrt(1 - abar[s] - lambda^2)
    sigma: np.ndarray  # (K, C'): the noise std, one column (scalar variance) or one per data channel; 0 at the last step

    def to(self, device: torch.device, dtype: torch.dtype) -> StepCoefficients:
        """The same fields as tensors on ``device`` in ``dtype``."""
        return StepCoefficients(*(torch.from_numpy(np.ascontiguousarray(x)).to(device=device, dtype=dtype) for x in self))


def _check_guidance(estimated: float | None, sampling: float | None) -> None:
    """Warn when a table of the eps guided at ``estimated`` serves sampling at another scale (``<= 1``: unguided)."""
    if sampling is None:
        return
    effective = [w if w is not None and w > 1 else 1.0 for w in (estimated, sampling)]
    if effective[0] != effective[1]:
        how = "without guidance" if effective[0] == 1.0 else f"at guidance_scale={estimated:g}"
        warnings.warn(
            f"the variance table was estimated {how}, but the pipeline is sampling at guidance_scale={sampling:g}: "
            "its ms_eps / x0_mse belong to another eps. Estimate a table at this scale "
            "(estimate_moments(pipe, images, prompt=..., guidance_scale=...)).",
            UserWarning,
            stacklevel=3,
        )


def _check_options(
    table: SchedulerTable,
    variance: str,
    per_channel: bool,
    trajectory: str | None,
    timestep_spacing: str | None,
    prediction_type: str,
    eta: float,
    dynamic_thresholding_ratio: float,
    sample_max_value: float,
) -> None:
    """Refuse an unknown option, or a variance the table cannot serve, naming the fix."""
    if variance not in SAMPLING_VARIANCES:
        raise ValueError(f"variance={variance!r}; use one of {SAMPLING_VARIANCES}.")
    if variance == "residual" and table.x0_mse is None:
        raise ValueError(
            "variance='residual' needs the table's x0_mse: use AnalyticDPMScheduler.from_table(table, ...) with a "
            f"table that has it, or pass x0_mse=table.x0_mse; {REESTIMATE_HINT}."
        )
    needed = "channel_ms_eps" if variance == "analytic" else "channel_x0_mse"
    if per_channel and getattr(table, needed) is None:
        raise ValueError(
            f"per_channel=True with variance={variance!r} needs {needed}: use "
            "AnalyticDPMScheduler.from_table(table, config, per_channel=True) with a table that has per-channel "
            f"moments (table.num_channels is not None; {REESTIMATE_HINT}), pass {needed}=table.{needed}, "
            "or set per_channel=False."
        )
    if trajectory is not None and trajectory not in TRAJECTORIES:
        raise ValueError(f"trajectory={trajectory!r}; use one of {TRAJECTORIES} or set_timesteps(timesteps=[...]).")
    if timestep_spacing is not None and timestep_spacing not in SPACINGS:
        raise ValueError(f"timestep_spacing={timestep_spacing!r}; use one of {SPACINGS}, or None for `trajectory`.")
    if not 0.0 < dynamic_thresholding_ratio <= 1.0 or not sample_max_value >= 1.0:
        raise ValueError(
            f"dynamic_thresholding_ratio={dynamic_thresholding_ratio} must lie in (0, 1] and sample_max_value="
            f"{sample_max_value} be at least 1 (the threshold s is clamped to [1, sample_max_value])."
        )
    check_prediction_type(prediction_type)
    check_eta(eta)


def _check_fingerprint(table_fingerprint: str | None, alphas_cumprod: np.ndarray) -> None:
    """Refuse a table estimated for another schedule than the config's."""
    if table_fingerprint is not None and table_fingerprint != schedule_fingerprint(alphas_cumprod):
        raise ValueError(
            f"the variance table was estimated for schedule {table_fingerprint}, but this scheduler's config "
            f"gives {schedule_fingerprint(alphas_cumprod)}; estimate a table with this model's own scheduler config."
        )


def _check_eta_argument(eta: Any) -> None:
    """``step``'s fourth positional argument is ``eta``, as in ``DDIMScheduler.step``; refuse anything else there."""
    if eta is None or isinstance(eta, (int, float, np.number)) or (isinstance(eta, torch.Tensor) and eta.numel() == 1):
        return
    raise TypeError(
        f"step() got eta={type(eta).__name__}: its arguments are (model_output, timestep, sample, eta, "
        "use_clipped_model_output, generator, variance_noise, return_dict), as in DDIMScheduler.step; pass "
        "generator=... by keyword."
    )


def _adopt_table_settings(table, config: Mapping[str, Any], kwargs: dict[str, Any]) -> None:
    """Take the table's prediction type, data range and x0 clipping into ``kwargs``, refusing a config (or keyword
    argument) that says otherwise."""
    explicit = explicit_keys(config)

    def stated(key: str) -> Any:
        return kwargs[key] if key in kwargs else config[key] if key in explicit else _UNSET

    recorded = table.provenance.get("prediction_type")
    said = stated("prediction_type")
    if recorded is not None and said is not _UNSET and said != recorded:
        raise ValueError(
            f"the variance table was estimated reading the model's output as prediction_type={recorded!r}, but the "
            f"scheduler config (or prediction_type=) says {said!r}: use the model's own scheduler config, or "
            "re-estimate the table with estimate_moments(..., prediction_type=...) for the other reading."
        )
    if recorded is not None:
        kwargs["prediction_type"] = recorded
    wanted = kwargs.get("data_range", table.data_range)
    if (None if wanted is None else tuple(float(v) for v in wanted)) != table.data_range:
        raise ValueError(
            f"data_range={wanted} contradicts the variance table's data_range={table.data_range} (its x0_mse and "
            "the variance bound were estimated for that range): leave data_range out, or re-estimate the table "
            "with estimate_moments(..., data_range=...)."
        )
    kwargs["data_range"] = table.data_range
    clip = stated("clip_sample")
    if table.data_range is None:
        if clip is True:
            raise ValueError(
                "the variance table has no data range (latents), but the scheduler config clips x0_hat "
                "(clip_sample=True): pass clip_sample=False, or re-estimate the table with a data_range."
            )
        kwargs["clip_sample"] = False
    elif table.has_x0_mse and table.x0_clip is not None:
        lo, hi = table.x0_clip
        bound = stated("clip_sample_range")
        if clip is False or (lo == -hi and bound is not _UNSET and float(bound) != hi):
            shown = "clip_sample=False" if clip is False else f"clip_sample_range={bound}"
            raise ValueError(
                f"the variance table's x0_mse was estimated with x0_hat clipped to {table.x0_clip}, but the scheduler "
                f"config sets {shown}: leave the clip to the table (clip_sample=True"
                f"{f', clip_sample_range={hi:g}' if lo == -hi else ''}), or re-estimate the table with "
                "estimate_moments(..., data_range=None) for unclipped sampling."
            )
        kwargs["clip_sample"] = True
        if lo == -hi:
            kwargs["clip_sample_range"] = hi


class AnalyticDPMScheduler(SchedulerMixin, ConfigMixin):
    """Analytic-DDPM (``eta=1``) and Analytic-DDIM (``eta=0``) sampling with a model's variance table.

    Each step from ``t`` to the previous trajectory point ``s`` is
    ``x_s = sqrt(abar[s]) x0_hat + sqrt(1 - abar[s] - lambda^2) eps_hat + sigma(s, t) z`` with
    ``lambda^2 = eta^2 btilde(s, t)`` and sigma^2 the analytic or residual variance of the table; the last step returns
    ``x0_hat``. Build it with :meth:`from_table` (or :meth:`from_config` and ``ms_eps=...``) and assign it to a
    pipeline: ``pipe.scheduler = AnalyticDPMScheduler.from_table(table, pipe.scheduler.config)``. The table's arrays
    are kept out of the config: ``save_pretrained`` writes them to ``analytic_table.json`` beside
    ``scheduler_config.json``, ``from_pretrained`` reads both.

    Args:
        num_train_timesteps (`int`, defaults to 1000):
            The number of diffusion steps the model was trained with (N).
        beta_start (`float`, defaults to 0.0001):
            The first beta of the ``"linear"`` and ``"scaled_linear"`` schedules.
        beta_end (`float`, defaults to 0.02):
            The last beta of those schedules.
        beta_schedule (`str`, defaults to `"linear"`):
            ``"linear"``, ``"scaled_linear"`` or ``"squaredcos_cap_v2"``, as in ``DDPMScheduler``.
        trained_betas (`np.ndarray` or `list[float]`, *optional*):
            The betas themselves, in place of ``beta_schedule``.
        prediction_type (`str`, defaults to `"epsilon"`):
            What the model predicts: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``. 2C-channel (learned-variance)
            outputs are accepted and their variance half is ignored.
        clip_sample (`bool`, defaults to `True`):
            Clip ``x0_hat`` to ``[-clip_sample_range, clip_sample_range]`` (and recompute ``eps_hat`` from it).
        clip_sample_range (`float`, defaults to 1.0):
            The bound of that clip.
        ms_eps (`np.ndarray` or `list[float]`, *optional*):
            The table ``E||eps_theta(x_t, t)||^2 / d``, ``num_train_timesteps`` floats from
            :func:`~analytic_sampler.estimate_moments` (``VarianceTable.ms_eps``); NaN where not estimated. Required,
            unless ``channel_ms_eps`` is given or the config names a table this process holds (``table_sha256``).
        x0_mse (`np.ndarray` or `list[float]`, *optional*):
            The same table's ``E||x0 - x0_hat||^2 / d``. With it ``trajectory="optimal"`` minimises the bound the
            network really achieves (the residual DP); without it, Analytic-DPM's cost (with a warning).
        channel_ms_eps (`np.ndarray`, *optional*):
            ``ms_eps`` per data channel, ``(C, num_train_timesteps)`` (``VarianceTable.channel_ms_eps``); when
            ``ms_eps`` is not given it is their mean over channels, as in the table (given both, they must agree).
        channel_x0_mse (`np.ndarray`, *optional*):
            ``x0_mse`` per data channel, likewise.
        per_channel (`bool`, defaults to `False`):
            ``True``: one sigma per channel from ``channel_ms_eps`` (``"analytic"``) or ``channel_x0_mse``
            (``"residual"``), for data whose channels differ (Stable Diffusion latents); ``False``: the scalar
            variance. The trajectory DP always uses the scalar table.
        variance (`str`, defaults to `"analytic"`):
            ``"analytic"``: Analytic-DPM's variance, clipped to Theorem 2's bounds; ``"residual"``:
            ``lambda^2 + coef^2 x0_mse[t]``, the variance that minimises each step's KL for the network's own mean
            (needs ``x0_mse``).
        eta (`float`, defaults to 1.0):
            1 for DDPM-type, 0 for DDIM-type, anything in ``[0, 1]``; a pipeline's ``eta`` overrides it per call.
        trajectory (`str`, *optional*):
            This package's trajectories: ``"even"``, ``"quadratic"`` or ``"optimal"`` (the DP trajectory, which
            minimises the likelihood bound but, with its large jumps at high noise, not a sample-quality measure).
            When set it wins over ``timestep_spacing``. Explicit timesteps (e.g. the sample-quality trajectory,
            :func:`~analytic_sampler.sample_trajectory.sample_quality_trajectory`) go to
            ``set_timesteps(timesteps=...)``.
        data_range (`tuple[float, float]`, *optional*, defaults to `(-1.0, 1.0)`):
            ``(a, b)`` bounds the data for the variance clip (Theorem 2); ``None`` for unbounded data (latents).
        variance_cap_y (`float`, *optional*, defaults to 2.0):
            Caps the variance of the step into ``t_1``: ``sigma^2 <= (y * bin * sqrt(pi / 2))^2`` with
            ``bin = (b - a) / 255`` of ``data_range`` (the paper's sample-quality setting, y = 1 or 2). On by default
            because it samples better: without it the step into ``t_1 = 0`` adds noise that the last step cannot
            remove (the measurements are in docs/results.md). It does not enter bits/dim (``nll_bpd`` has its own
            variances); ``None`` turns it off. Data without a range (latents) have no bins and no cap.
        table_fingerprint (`str`, *optional*):
            The schedule fingerprint the table was estimated for (``VarianceTable.fingerprint``); a mismatch with
            this config's schedule is refused.
        rescale_betas_zero_snr (`bool`, defaults to `False`):
            Rescale the betas to zero terminal SNR, as in ``DDPMScheduler``; ``betas`` and ``alphas_cumprod`` are
            Diffusers' (ending in 1 and 0), the step's float64 schedule raises the last ``abar`` to a floor
            (:func:`~analytic_sampler.schedule.alphas_cumprod_from_config`), and the analytic variance of a step from
            there takes the data's variance bound (no information about x0 is left).
        timestep_spacing (`str`, *optional*):
            Diffusers' ``"leading"``, ``"linspace"`` or ``"trailing"`` timesteps, exactly those DDIMScheduler /
            DDPMScheduler give for the same K, used when ``trajectory`` is not set; when neither is set,
            ``"trailing"`` (it sampled best on the bundled models). :meth:`from_config` takes it from
            the config (or, where the config has none, from the default of the scheduler it came from: ``"leading"``
            for DDPM, DDIM and PNDM) and keeps it for Diffusers' schedulers built from this config. A spacing that
            ends at t > 0 (``"leading"`` with ``steps_offset=1``: …, 1) still takes its last step to clean data.
        steps_offset (`int`, defaults to 0):
            Added to ``"leading"`` timesteps.
        thresholding (`bool`, defaults to `False`):
            Dynamic thresholding of ``x0_hat`` (Imagen; ``DDPMScheduler``'s ``thresholding``) in place of
            ``clip_sample``: per sample, ``s = clamp(quantile(|x0_hat|, dynamic_thresholding_ratio), 1,
            sample_max_value)`` and ``x0_hat = clamp(x0_hat, -s, s) / s``; eps is recomputed from it.
        dynamic_thresholding_ratio (`float`, defaults to 0.995):
            The quantile of that threshold.
        sample_max_value (`float`, defaults to 1.0):
            The largest threshold.
        ms_x0 (`float`, *optional*):
            The data's second moment ``E||x0||^2 / d`` (``VarianceTable``'s provenance ``channel_ms_x0``, averaged),
            an upper bound on the posterior variance of x0 that keeps Monte Carlo noise at high noise levels from
            inflating the analytic variance; it is the variance of a step from a zero-SNR endpoint.
        channel_ms_x0 (`list[float]`, *optional*):
            The same per data channel (``C`` values), for ``per_channel=True``; ``ms_x0`` is their mean.
        table_file (`str`, *optional*):
            The table file beside ``scheduler_config.json`` (``"analytic_table.json"``); set by the scheduler.
        table_sha256 (`str`, *optional*):
            The SHA-256 of the table's arrays; set by the scheduler. A config that carries it finds the table in this
            process (``from_config`` of a copied config) or in that file (``from_pretrained``).
        table_sample_shape (`list[int]`, *optional*):
            The shape of one sample the table was estimated on (``VarianceTable``'s provenance ``sample_shape``);
            ``step`` warns once when it samples another (a latent table estimated at another resolution).

    Example:

    ```py
    >>> import torch
    >>> from diffusers import DDPMPipeline
    >>> from analytic_sampler import AnalyticDPMScheduler
    >>> from analytic_sampler.pretrained import load_pretrained

    >>> model = load_pretrained("digits-ddpm-linear")  # a bundled 8x8 digits UNet, its scheduler and its table
    >>> scheduler = AnalyticDPMScheduler.from_table(model.table, model.scheduler.config, trajectory="optimal")
    >>> pipe = DDPMPipeline(unet=model.unet, scheduler=scheduler)
    >>> pipe.set_progress_bar_config(disable=True)
    >>> images = pipe(batch_size=4, num_inference_steps=10, generator=torch.Generator().manual_seed(0),
    ...               output_type="np").images
    >>> images.shape, len(scheduler.timesteps)
    ((4, 8, 8, 1), 10)

    ```
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
        ms_eps: np.ndarray | list[float] | None = None,
        x0_mse: np.ndarray | list[float] | None = None,
        channel_ms_eps: np.ndarray | list[list[float]] | None = None,
        channel_x0_mse: np.ndarray | list[list[float]] | None = None,
        per_channel: bool = False,
        variance: str = "analytic",
        eta: float = 1.0,
        trajectory: str | None = None,
        data_range: tuple[float, float] | None = (-1.0, 1.0),
        variance_cap_y: float | None = 2.0,
        table_fingerprint: str | None = None,
        rescale_betas_zero_snr: bool = False,
        timestep_spacing: str | None = None,
        steps_offset: int = 0,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        ms_x0: float | None = None,
        channel_ms_x0: list[float] | None = None,
        table_file: str | None = None,
        table_sha256: str | None = None,
        table_sample_shape: list[int] | None = None,
    ):
        self._table = self._find_table(
            dict(ms_eps=ms_eps, x0_mse=x0_mse, channel_ms_eps=channel_ms_eps, channel_x0_mse=channel_x0_mse,
                 ms_x0=ms_x0, channel_ms_x0=channel_ms_x0),
            num_train_timesteps, table_sha256,
        )
        self._keep_table_out_of_config()
        if trajectory is None and timestep_spacing is None:
            self._register_set(timestep_spacing=DEFAULT_SPACING)
        _check_options(self._table, variance, per_channel, trajectory, self.config.timestep_spacing, prediction_type,
                       eta, dynamic_thresholding_ratio, sample_max_value)
        abar = alphas_cumprod_from_config(self.config)
        _check_fingerprint(table_fingerprint, abar)
        if data_range is not None:
            self.register_to_config(data_range=tuple(float(v) for v in data_range))
        if table_sample_shape is not None:
            self.register_to_config(table_sample_shape=[int(v) for v in table_sample_shape])
        self._set_schedule_tensors(abar)
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.from_numpy(np.arange(num_train_timesteps)[::-1].copy())
        self.trajectory: list[int] = []
        self._dp: TrajectoryDP | None = None
        self._coefficients: dict[tuple, StepCoefficients] = {}
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._warned_shapes: set[tuple[int, ...]] = set()

    @staticmethod
    def _find_table(arguments: dict[str, Any], num_train_timesteps: int, sha256: str | None) -> SchedulerTable:
        """The table from the arguments, else the one this process holds under the config's checksum."""
        given = {name: value for name, value in arguments.items() if value is not None}
        if not given and sha256 is not None:
            table = loaded_table(sha256)
            if table is None:
                raise ValueError(
                    f"this scheduler config refers to the variance table {TABLE_FILE} (sha256 {sha256[:12]}…), which "
                    "this process does not hold: load the scheduler with AnalyticDPMScheduler.from_pretrained("
                    "folder_or_repo, subfolder=...), which reads the file beside scheduler_config.json, or rebuild it "
                    "with AnalyticDPMScheduler.from_table(table, config)."
                )
            validate_ms_eps(table.ms_eps, num_train_timesteps, needed=[])
            return table
        return SchedulerTable.from_arguments(num_train_timesteps, **given)

    def _keep_table_out_of_config(self) -> None:
        """Replace the table's arrays in the config (``register_to_config`` records every argument) by the table
        file's name and the arrays' checksum, and make the table findable by that checksum in this process."""
        self._table = self._table.register()
        self._register_set(table_file=TABLE_FILE, table_sha256=self._table.sha256)

    def _register_set(self, **values) -> None:
        """``register_to_config`` of values this scheduler sets itself, which then no longer count as left at their
        defaults (``from_config`` drops those); the table's arguments leave the config altogether. The names left at
        their defaults are kept sorted (Diffusers lists them in a set's order), so equal configs compare equal."""
        self.register_to_config(**values)
        config = {k: v for k, v in self._internal_dict.items() if k not in TABLE_ARGUMENTS}
        dropped = set(values) | set(TABLE_ARGUMENTS)
        defaults = sorted(k for k in config.pop("_use_default_values", ()) if k not in dropped)
        self._internal_dict = FrozenDict({**config, **({"_use_default_values": defaults} if defaults else {})})

    def _set_schedule_tensors(self, abar: np.ndarray) -> None:
        """The float64 schedule of the steps (a zero-SNR schedule's last value raised to a floor), and the float32
        ``betas``, ``alphas = 1 - betas`` and ``alphas_cumprod = cumprod(alphas)`` as DDPMScheduler has them."""
        self.alphas_cumprod_64 = abar
        betas = torch.from_numpy(betas_from_config(self.config)).float()
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, return_unused_kwargs: bool = False, **kwargs):
        """``ConfigMixin.from_config`` for any DDPM / DDIM / PNDM (or other Diffusers) scheduler config.

        - Timesteps: the config's ``timestep_spacing`` and ``steps_offset``, or where it has none the defaults of
          the scheduler it came from (``_class_name``): a Stable Diffusion v1.5 (PNDM) config gives 901, 801, …, 1
          at K = 10, as ``DDIMScheduler.from_config`` does. ``trajectory=`` chooses this package's trajectory
          instead (the config's spacing stays in the config for Diffusers' schedulers built from it);
          ``timestep_spacing=`` chooses a spacing over a ``trajectory`` the config sets; both together are refused.
        - Options of the config that this scheduler does not use (``set_alpha_to_one=False``, a learned
          ``variance_type``, Karras or other sigma schedules, …) are named in one warning.
        - The table: ``ms_eps=...`` (and the other table arguments), or the one this process holds under the
          config's ``table_sha256``.
        """
        trajectory, spacing = kwargs.get("trajectory"), kwargs.get("timestep_spacing")
        if trajectory is not None and spacing is not None:
            raise ValueError(
                f"trajectory={trajectory!r} and timestep_spacing={spacing!r} were both passed; pass one. trajectory= "
                "chooses this package's trajectory and wins over the config's timestep_spacing (which stays in the "
                "config for Diffusers' schedulers built from it); timestep_spacing= chooses Diffusers' spacing over "
                "a trajectory the config sets."
            )
        if spacing is not None:
            kwargs.setdefault("trajectory", None)
        if isinstance(config, Mapping):
            own = config.get("_class_name") == cls.__name__ or {"variance", "per_channel"} <= set(config)
            unused = [] if own else ignored_options(config)
            if unused:
                warnings.warn(
                    f"AnalyticDPMScheduler does not use {', '.join(unused)} of the scheduler config it is built from; "
                    "see 'How Diffusers' options map onto this scheduler' in docs/scheduler.md.",
                    UserWarning,
                    stacklevel=2,
                )
            config = with_source_spacing(config)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike | None = None,
        subfolder: str | None = None,
        return_unused_kwargs: bool = False,
        **kwargs,
    ):
        """``SchedulerMixin.from_pretrained``, reading the table file beside ``scheduler_config.json`` too: a local
        folder, or a Hub repo (``subfolder``, ``revision``, ``cache_dir``, ``token``, ``local_files_only`` and
        ``HF_HUB_OFFLINE`` honoured; the file from the config's commit). A config saved by earlier versions, with the
        arrays inside, loads as well.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`):
                A folder holding ``scheduler_config.json`` (and ``analytic_table.json``), or a Hub repo id.
            subfolder (`str`, *optional*):
                The scheduler's folder inside it (``"scheduler"`` of a pipeline).
            return_unused_kwargs (`bool`, defaults to `False`):
                Also return the keyword arguments the scheduler did not take.
            **kwargs:
                Hub options, and any argument of :class:`AnalyticDPMScheduler` to override the saved one.
        """
        hub = {name: kwargs[name] for name in HUB_OPTIONS if name in kwargs}
        config, kwargs, commit_hash = cls.load_config(
            pretrained_model_name_or_path=pretrained_model_name_or_path, subfolder=subfolder,
            return_unused_kwargs=True, return_commit_hash=True, **kwargs,
        )
        table = None  # held here until the scheduler holds it: the registry keeps no table alive by itself
        if config.get("table_sha256") and not any(kwargs.get(name) is not None for name in TABLE_ARGUMENTS):
            table = read_scheduler_table(
                pretrained_model_name_or_path, subfolder, config.get("table_file") or TABLE_FILE,
                config["table_sha256"], cls.config_name, commit_hash, **hub,
            )
            table.register()
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def to_json_string(self) -> str:
        """The config as strict JSON: options kept from the config it was built from whose value is not a finite
        number (DPMSolver's ``lambda_min_clipped = -inf``) are left out, so that a scheduler built from the saved
        config takes its own default for them."""
        config = json.loads(super().to_json_string())
        kept = {k: v for k, v in config.items() if not (isinstance(v, float) and not math.isfinite(v))}
        return json.dumps(kept, indent=2, sort_keys=True, allow_nan=False) + "\n"

    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """``ConfigMixin.save_config`` (which ``save_pretrained`` calls), with the table file written first, so that
        ``push_to_hub`` uploads both."""
        if not os.path.isfile(save_directory):
            os.makedirs(save_directory, exist_ok=True)
            self._table.save(save_directory, self.config.table_file)
        super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def from_table(
        cls, table, scheduler_config=None, guidance_scale: float | None = None, model=None, force_table: bool = False,
        **kwargs,
    ) -> "AnalyticDPMScheduler":
        """Build from a :class:`~analytic_sampler.VarianceTable` and the model's scheduler config.

        The table's schedule must be the config's (else ValueError); its ``ms_eps``, ``x0_mse``, per-channel
        moments, the data's second moment and the sample shape it was estimated on go into the scheduler. So do its
        prediction type, data range and x0 clip: a latent table (no data range) sets ``clip_sample=False``, a
        table whose ``x0_mse`` was clipped to ``(-r, r)`` sets ``clip_sample=True`` with that range, and a config
        or keyword argument that contradicts the table is refused, naming the fix. Timesteps as in
        :meth:`from_config`.

        Args:
            table (`VarianceTable`):
                The model's table, from :func:`~analytic_sampler.estimate_moments` or ``VarianceTable.load``.
            scheduler_config (`dict` or a scheduler, *optional*):
                The model's scheduler config (``pipe.scheduler.config``) or the scheduler itself; default: the
                table's schedule as ``trained_betas``.
            guidance_scale (`float`, *optional*):
                The classifier-free guidance scale the pipeline will sample at; a warning when the table's eps was
                estimated at another (``table.guidance_scale``; none counts as 1).
            model (`UNet2DModel`, a pipeline or a callable, *optional*):
                The model the scheduler will sample with: a table estimated for another model (other channels or
                weights, :meth:`~analytic_sampler.VarianceTable.check_model`) is refused.
            force_table (`bool`, defaults to `False`):
                Use the table for ``model`` anyway, with a warning.
            **kwargs:
                Any other argument of :class:`AnalyticDPMScheduler` (``eta``, ``trajectory``, ``variance``, …).
        """
        _check_guidance(table.guidance_scale, guidance_scale)
        if model is not None:
            table.check_model(model, force=force_table)
        if scheduler_config is None:
            betas = betas_from_alphas_cumprod(table.alphas_cumprod)
            scheduler_config = {"num_train_timesteps": betas.size, "trained_betas": betas.tolist()}
        elif hasattr(scheduler_config, "config") and not isinstance(scheduler_config, Mapping):
            source = scheduler_config
            scheduler_config = {"_class_name": type(source).__name__, **source.config}
        table.check_schedule(alphas_cumprod_from_config(scheduler_config))
        _adopt_table_settings(table, scheduler_config, kwargs)
        if kwargs.get("variance") == "residual" and not table.has_x0_mse:
            table.require_x0_mse()
        ms_x0 = table.channel_ms_x0  # the data's mean square per channel (tables of this version)
        per_channel = ms_x0 is not None and table.num_channels == len(ms_x0)
        taken = {"ms_eps": table.ms_eps, "x0_mse": table.x0_mse if table.has_x0_mse else None,
                 "channel_ms_eps": table.channel_ms_eps, "channel_x0_mse": table.channel_x0_mse,
                 "channel_ms_x0": ms_x0.tolist() if per_channel else None,
                 "ms_x0": table.ms_x0 if not per_channel else None}
        for name, value in taken.items():
            if value is not None:
                kwargs.setdefault(name, value)
        kwargs.setdefault("table_sample_shape", table.provenance.get("sample_shape"))
        return cls.from_config(scheduler_config, table_fingerprint=table.fingerprint, **kwargs)

    # ------------------------------------------------------------------ the table
    @property
    def ms_eps(self) -> np.ndarray:
        return self._table.ms_eps

    @property
    def x0_mse(self) -> np.ndarray | None:
        return self._table.x0_mse

    @property
    def channel_ms_eps(self) -> np.ndarray | None:
        return self._table.channel_ms_eps

    @property
    def channel_x0_mse(self) -> np.ndarray | None:
        return self._table.channel_x0_mse

    @property
    def ms_x0(self) -> float | None:
        """The data's second moment ``E||x0||^2 / d``, when the table records it."""
        return self._table.ms_x0

    @property
    def channel_ms_x0(self) -> np.ndarray | None:
        return self._table.channel_ms_x0

    def _variance_moments(self) -> tuple[str, np.ndarray, Any]:
        """``(name, table, ms_x0)`` the step's variance reads: ``ms_eps`` (analytic) or ``x0_mse`` (residual), shape
        ``(N,)``, with the data's second moment, or with ``per_channel`` their ``channel_`` rows, shape ``(C, N)``."""
        name = "x0_mse" if self.config.variance == "residual" else "ms_eps"
        if self.config.per_channel:
            return "channel_" + name, getattr(self, "channel_" + name), self.channel_ms_x0
        return name, getattr(self, name), self.ms_x0

    @property
    def step_index(self) -> int | None:
        """Index into ``timesteps`` of the next ``step``; ``None`` before the first one and after the last."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """Index of the first step, from ``set_begin_index`` (img2img pipelines); ``None``: found from the timestep."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next loop at ``timesteps[begin_index]``; ``set_timesteps`` clears it."""
        self._begin_index = begin_index

    # ------------------------------------------------------------------ Diffusers scheduler API
    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Choose the trajectory: ``num_inference_steps`` points of ``trajectory`` when the config sets one, else
        spaced by ``timestep_spacing``; or explicit ``timesteps``. Precomputes every step's coefficients.

        Args:
            num_inference_steps (`int`, *optional*):
                The number of steps K (1 to ``num_train_timesteps``; K = 1 is one step from t = N-1, or Diffusers'
                one spaced point, to x0).
            device (`str` or `torch.device`, *optional*):
                Where ``timesteps`` and the step coefficients live.
            timesteps (`list[int]`, *optional*):
                A strictly descending list of training timesteps, in place of ``num_inference_steps``.
        """
        n = self.config.num_train_timesteps
        if timesteps is not None:
            if num_inference_steps is not None:
                raise ValueError("pass either num_inference_steps or timesteps, not both.")
            trajectory = validate_timesteps(timesteps, n, min_steps=1)
        elif num_inference_steps is None:
            raise ValueError("set_timesteps needs num_inference_steps (K) or an explicit list of timesteps.")
        elif self.config.trajectory is not None:
            trajectory = self._trajectory(check_num_steps(n, num_inference_steps, minimum=1))
        else:
            spacing, offset = self.config.timestep_spacing, self.config.steps_offset
            trajectory = spaced_timesteps(n, num_inference_steps, spacing, offset)
        validate_ms_eps(self.ms_eps, n, needed=trajectory[:-1])  # the DP's and the scalar variance's table
        name, moments, _ = self._variance_moments()
        validate_ms_eps(moments, n, needed=trajectory[:-1], name=name, per_channel=self.config.per_channel)

        self.trajectory = trajectory
        self.num_inference_steps = len(trajectory)
        self.timesteps = torch.tensor(trajectory, dtype=torch.int64, device=device)
        self._coefficients = {}
        self._step_index = None
        self._begin_index = None
        self._coefficients_for(check_eta(self.config.eta), torch.device(device or "cpu"), torch.float32)

    def _trajectory(self, num_steps: int) -> list[int]:
        """``num_steps`` points of the config's ``trajectory``; one step starts at N-1."""
        n = self.config.num_train_timesteps
        if num_steps == 1:
            return [n - 1]
        if self.config.trajectory == "optimal":
            return self._optimal(num_steps)
        if self.config.trajectory == "quadratic":
            return quadratic_trajectory(n, num_steps)
        return even_trajectory(n, num_steps)

    def _optimal(self, num_steps: int) -> list[int]:
        """The DP's path (residual cost with ``x0_mse``, else the paper's); one solve serves every K up to the
        largest asked for (the config's table is fixed)."""
        if self._dp is None or self._dp.max_steps < num_steps:
            self._dp = TrajectoryDP(self.alphas_cumprod_64, self.ms_eps, num_steps, x0_mse=self.x0_mse,
                                    data_range=self.config.data_range, ms_x0=self.ms_x0)
        return self._dp.path(num_steps)

    def step_coefficients(self, eta: float) -> StepCoefficients:
        """The float64 :class:`StepCoefficients` of the trajectory at ``eta``, one row per point ``t_K … t_1``:
        ``sigma`` has one column (the scalar variance) or, with ``per_channel``, one per data channel.

        Args:
            eta (`float`):
                1 for DDPM-type, 0 for DDIM-type, anything in ``[0, 1]``.
        """
        if not self.trajectory:
            raise ValueError("call set_timesteps(num_inference_steps) before step_coefficients().")
        t = np.asarray(self.trajectory, dtype=np.int64)
        s = np.append(t[1:], -1)
        pair = pair_coefficients(self.alphas_cumprod_64, s, t, eta)
        var = self._pair_variances(s[:-1], t[:-1], eta)  # (C', K-1); the last step, into clean data, has none
        if self.config.variance_cap_y is not None and self.config.data_range is not None and var.shape[1]:
            lo, hi = self.config.data_range  # the step into t_1
            cap = (self.config.variance_cap_y * (hi - lo) / 255.0 * math.sqrt(math.pi / 2)) ** 2
            var[:, -1] = np.minimum(var[:, -1], cap)
        return StepCoefficients(
            sqrt_abar_t=np.sqrt(pair.abar_t),
            sqrt_one_minus_abar_t=np.sqrt(1 - pair.abar_t),
            sqrt_abar_s=np.sqrt(pair.abar_s),
            eps_coef=pair.eps_coef,
            sigma=np.sqrt(np.concatenate([var, np.zeros((var.shape[0], 1))], 1)).T,
        )

    def _pair_variances(self, prev_t: np.ndarray, t: np.ndarray, eta: float) -> np.ndarray:
        """sigma^2 of the pairs ``(prev_t, t)``, shape ``(C', pairs)``: the config's variance from its table."""
        _, moments, ms_x0 = self._variance_moments()
        moments = np.atleast_2d(moments)  # (C', N)
        if self.config.variance == "residual":
            return residual_variance(self.alphas_cumprod_64, moments, prev_t, t, eta)
        ms_x0 = None if ms_x0 is None else np.asarray(ms_x0, dtype=np.float64)
        return analytic_variance(self.alphas_cumprod_64, moments, prev_t, t, eta, self.config.data_range, ms_x0=ms_x0)

    def _coefficients_for(self, eta: float, device: torch.device, dtype: torch.dtype) -> StepCoefficients:
        key = (eta, device, dtype)
        if key not in self._coefficients:
            self._coefficients[key] = self.step_coefficients(eta).to(device, dtype)
        return self._coefficients[key]

    def _x0_limit(self):
        """What ``step`` does to ``x0_hat``: dynamic thresholding, a clip range, or nothing (``None``)."""
        if self.config.thresholding:
            return functools.partial(dynamic_threshold, ratio=self.config.dynamic_thresholding_ratio,
                                     max_value=self.config.sample_max_value)
        if self.config.clip_sample:
            return (-self.config.clip_sample_range, self.config.clip_sample_range)
        return None

    def _check_sample_shape(self, sample: torch.Tensor) -> None:
        """Warn once per shape when the sample is not the shape the table was estimated on."""
        expected, shape = self.config.table_sample_shape, tuple(sample.shape[1:])
        if expected is None or shape == tuple(expected) or shape in self._warned_shapes:
            return
        self._warned_shapes.add(shape)
        warnings.warn(
            f"the variance table was estimated on samples of shape {tuple(expected)}, but this pipeline samples "
            f"{shape}: the moments of another resolution are not this one's. Estimate a table at this size "
            "(estimate_moments resizes a pipeline's images to its sample size by default).",
            UserWarning,
            stacklevel=3,
        )

    def index_for_timestep(self, timestep: int | torch.Tensor) -> int:
        t = int(timestep)
        if t not in self.trajectory:
            raise ValueError(f"timestep {t} is not on the trajectory {self.trajectory[:4]}…; call set_timesteps first.")
        return self.trajectory.index(t)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float | None = None,
        use_clipped_model_output: bool | None = None,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> AnalyticDPMSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One reverse step ``x_t -> x_s`` to the previous point of the trajectory. The arguments come in
        ``DDIMScheduler.step``'s order; the step computes in float32 (float64 for float64 input) and returns the
        input's dtype.

        Steps follow ``timesteps`` from ``begin_index`` or, without one, from where the first ``timestep`` is on the
        trajectory (a lookup that syncs an accelerator tensor once per loop, as in Diffusers' multistep schedulers).
        A ``timestep`` given as a Python int or a CPU tensor must be the expected one, else ValueError; on an
        accelerator tensor that check is skipped rather than wait for the device.

        Args:
            model_output (`torch.Tensor`):
                The model's output at ``(sample, timestep)``: eps, v or x0 per ``prediction_type``; a 2C-channel
                output's variance half is ignored.
            timestep (`int` or `torch.Tensor`):
                The current timestep ``t`` (an entry of ``timesteps``).
            sample (`torch.Tensor`):
                ``x_t``, ``(B, C, …)``. With ``per_channel`` the noise std broadcasts as ``(C, 1, …)``; a sample with
                another channel count is refused.
            eta (`float`, *optional*):
                Overrides the config's ``eta`` (DDIMPipeline and StableDiffusionPipeline pass their own).
            use_clipped_model_output (`bool`, *optional*):
                ``False`` keeps the model's own eps next to a clipped ``x0_hat``; by default eps is recomputed from it.
            generator (`torch.Generator`, *optional*):
                Draws the noise ``z``.
            variance_noise (`torch.Tensor`, *optional*):
                The noise ``z`` itself, in place of drawing it.
            return_dict (`bool`, defaults to `True`):
                Return an :class:`AnalyticDPMSchedulerOutput`, else the tuple ``(prev_sample, pred_original_sample)``.
        """
        _check_eta_argument(eta)
        if not self.trajectory:
            raise ValueError("call set_timesteps(num_inference_steps) before step().")
        i = self._step_index
        if i is None:
            i = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index
        on_host = not isinstance(timestep, torch.Tensor) or timestep.device.type == "cpu"
        if on_host and int(timestep) != self.trajectory[i]:
            raise ValueError(
                f"step() got timestep {int(timestep)}, but step {i} of this trajectory is t={self.trajectory[i]}; "
                "step through scheduler.timesteps in order, or call set_timesteps() / set_begin_index() to restart."
            )
        eta = self.config.eta if eta is None else check_eta(eta)
        self._check_sample_shape(sample)
        work = sample.dtype if sample.dtype == torch.float64 else torch.float32
        coefficients = self._coefficients_for(float(eta), sample.device, work)
        sqrt_abar_t, sqrt_bb_t = coefficients.sqrt_abar_t[i], coefficients.sqrt_one_minus_abar_t[i]
        std = coefficients.sigma[i]
        if self.config.per_channel and sample.shape[1] != std.shape[0]:
            raise ValueError(
                f"this scheduler's per-channel variance has {std.shape[0]} channels (channel_ms_eps / channel_x0_mse), "
                f"but the sample has {sample.shape[1]} (shape {tuple(sample.shape)}); use the variance table estimated "
                "for this model's own data (or latents), or per_channel=False."
            )
        std = channel_view(std, sample.ndim)  # (C', 1, …): one sigma per channel, or one for all

        x_t = sample.to(work)
        prediction, _ = split_learned_variance(model_output, sample)
        x0, eps = to_x0_and_eps(prediction.to(work), x_t, sqrt_abar_t, sqrt_bb_t, self.config.prediction_type)
        x0, eps = clip_x0(x0, eps, x_t, sqrt_abar_t, sqrt_bb_t, self._x0_limit(),
                          recompute_eps=use_clipped_model_output is not False)
        prev_sample = coefficients.sqrt_abar_s[i] * x0 + coefficients.eps_coef[i] * eps
        if i < len(self.trajectory) - 1:
            if variance_noise is None:
                variance_noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=work)
            prev_sample = prev_sample + std * variance_noise.to(work)
        self._step_index = i + 1 if i + 1 < len(self.trajectory) else None
        prev_sample, x0 = prev_sample.to(sample.dtype), x0.to(sample.dtype)

        if not return_dict:
            return prev_sample, x0
        return AnalyticDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(abar[t]) x0 + sqrt(1 - abar[t]) noise`` (img2img and training)."""
        abar = self.alphas_cumprod.to(device=original_samples.device, dtype=original_samples.dtype)[timesteps]
        abar = abar.reshape(-1, *([1] * (original_samples.ndim - 1)))
        return abar.sqrt() * original_samples + (1 - abar).sqrt() * noise

    def previous_timestep(self, timestep: int | torch.Tensor) -> torch.Tensor:
        """The trajectory point after ``timestep``, a tensor as in ``DDPMScheduler`` (``tensor(-1)`` after the last)."""
        i = self.index_for_timestep(timestep)
        return self.timesteps[i + 1] if i + 1 < len(self.trajectory) else torch.tensor(-1)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
