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

The scheduler's state is the model's table (:class:`~analytic_sampler.schedulers.analytic_table.AnalyticTable`); its
config holds the options and names the table file, ``analytic_table.json`` beside ``scheduler_config.json``
(:mod:`analytic_sampler.schedulers.table_file`).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..predictions import check_prediction_type, clip_x0, dynamic_threshold, split_learned_variance, to_x0_and_eps
from ..sample_trajectory import SampleTrajectoryDP
from ..schedule import (
    SPACINGS,
    alphas_cumprod_from_config,
    betas_from_alphas_cumprod,
    betas_from_config,
    check_num_steps,
    spaced_timesteps,
)
from ..table import REESTIMATE_HINT, validate_ms_eps
from ..trajectory import TrajectoryDP, quadratic_trajectory, validate_timesteps
from ..variance import analytic_variance, channel_view, check_eta, pair_coefficients, residual_variance
from .analytic_table import TABLE_ARGUMENTS, TABLE_FILE, AnalyticTable, table_arguments
from .diffusers_config import explicit_keys, ignored_options, with_source_spacing
from .table_file import TableFileMixin

TRAJECTORIES = ("optimal", "quadratic", "samples")  # this package's trajectories, beside Diffusers' SPACINGS
TIMESTEP_SPACINGS = (*SPACINGS, *TRAJECTORIES)
DEFAULT_SPACING = "trailing"  # it sampled best on the bundled models
OLD_TRAJECTORIES = {"even": "linspace"}  # earlier versions' trajectory= names that are Diffusers' spacings
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


def _check_options(table: AnalyticTable, config: Mapping[str, Any]) -> None:
    """Refuse an unknown option, a variance or trajectory the table cannot serve, or a prediction type other than the
    table's, naming the fix."""
    variance, spacing = config["variance"], config["timestep_spacing"]
    if variance not in SAMPLING_VARIANCES:
        raise ValueError(f"variance={variance!r}; use one of {SAMPLING_VARIANCES}.")
    if variance == "residual" and table.x0_mse is None:
        raise ValueError(
            "variance='residual' needs the table's x0_mse: use AnalyticDPMScheduler.from_table(table, ...) with a "
            f"table that has it, or pass x0_mse=table.x0_mse; {REESTIMATE_HINT}."
        )
    needed = "channel_ms_eps" if variance == "analytic" else "channel_x0_mse"
    if config["per_channel"] and getattr(table, needed) is None:
        raise ValueError(
            f"per_channel=True with variance={variance!r} needs {needed}: use "
            "AnalyticDPMScheduler.from_table(table, config, per_channel=True) with a table that has per-channel "
            f"moments (table.num_channels is not None; {REESTIMATE_HINT}), pass {needed}=table.{needed}, "
            "or set per_channel=False."
        )
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"timestep_spacing={spacing!r}; use one of {TIMESTEP_SPACINGS} ('even' is Diffusers' "
                         "'linspace'), or set_timesteps(timesteps=[...]).")
    if spacing == "samples" and table.sample_cost is None:
        raise ValueError(
            "timestep_spacing='samples' needs the table's sample cost, which this table does not have: add it with "
            "`analytic-sampler precompute MODEL --data DATA --out DIR` (the path pass runs after the moments), or "
            "choose another spacing."
        )
    if not 0.0 < config["dynamic_thresholding_ratio"] <= 1.0 or not config["sample_max_value"] >= 1.0:
        raise ValueError(
            f"dynamic_thresholding_ratio={config['dynamic_thresholding_ratio']} must lie in (0, 1] and "
            f"sample_max_value={config['sample_max_value']} be at least 1 (the threshold s is clamped to [1, "
            "sample_max_value])."
        )
    check_prediction_type(config["prediction_type"])
    if table.prediction_type not in (None, config["prediction_type"]):
        raise ValueError(
            f"the variance table was estimated reading the model's output as prediction_type="
            f"{table.prediction_type!r}, but the scheduler config (or prediction_type=) says "
            f"{config['prediction_type']!r}: use the model's own scheduler config, or re-estimate the table with "
            "estimate_moments(..., prediction_type=...) for the other reading."
        )
    check_eta(config["eta"])


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
    """Take the table's prediction type (where the config does not state one) and x0 clipping into ``kwargs``,
    refusing a config or keyword argument whose clip or data range contradicts the table."""
    explicit = explicit_keys(config)

    def stated(key: str) -> Any:
        return kwargs[key] if key in kwargs else config[key] if key in explicit else _UNSET

    recorded = table.provenance.get("prediction_type")
    if recorded is not None and stated("prediction_type") is _UNSET:
        kwargs["prediction_type"] = recorded  # a contradiction is refused by the scheduler, which has the table's
    wanted = kwargs.pop("data_range", table.data_range)
    if (None if wanted is None else tuple(float(v) for v in wanted)) != table.data_range:
        raise ValueError(
            f"data_range={wanted} contradicts the variance table's data_range={table.data_range} (its x0_mse and "
            "the variance bound were estimated for that range): leave data_range out, or re-estimate the table "
            "with estimate_moments(..., data_range=...)."
        )
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


def _table_field(name: str, doc: str) -> property:
    """A read-only view of the table's field ``name``."""
    return property(lambda self: getattr(self.table, name), doc=doc)


class AnalyticDPMScheduler(TableFileMixin, SchedulerMixin, ConfigMixin):
    """Analytic-DDPM (``eta=1``) and Analytic-DDIM (``eta=0``) sampling with a model's variance table.

    Each step from ``t`` to the previous trajectory point ``s`` is
    ``x_s = sqrt(abar[s]) x0_hat + sqrt(1 - abar[s] - lambda^2) eps_hat + sigma(s, t) z`` with
    ``lambda^2 = eta^2 btilde(s, t)`` and sigma^2 the analytic or residual variance of the table; the last step returns
    ``x0_hat``. Build it with :meth:`from_table` and assign it to a pipeline:
    ``pipe.scheduler = AnalyticDPMScheduler.from_table(table, pipe.scheduler.config)``.

    The table is the scheduler's state (``scheduler.table``: its moments, the data's range and second moment, its
    prediction type, sample shape, schedule fingerprint and sample cost); the config holds the options below and
    names the table. ``save_pretrained`` writes the table to ``analytic_table.json`` beside ``scheduler_config.json``,
    ``from_pretrained`` reads both, and ``from_config(pipe.scheduler.config, eta=0.0)`` finds the table in the process
    that holds it. ``from_config(config, ms_eps=table.ms_eps, ...)`` takes a table's arrays directly (as configs of
    earlier versions held them).

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
            What the model predicts: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``; a table estimated with
            another reading is refused. 2C-channel (learned-variance) outputs are accepted and their variance half
            is ignored.
        clip_sample (`bool`, defaults to `True`):
            Clip ``x0_hat`` to ``[-clip_sample_range, clip_sample_range]`` (and recompute ``eps_hat`` from it).
        clip_sample_range (`float`, defaults to 1.0):
            The bound of that clip.
        variance (`str`, defaults to `"analytic"`):
            ``"analytic"``: Analytic-DPM's variance, clipped to Theorem 2's bounds; ``"residual"``:
            ``lambda^2 + coef^2 x0_mse[t]``, the variance that minimises each step's KL for the network's own mean
            (needs the table's ``x0_mse``).
        eta (`float`, defaults to 1.0):
            1 for DDPM-type, 0 for DDIM-type, anything in ``[0, 1]``; a pipeline's ``eta`` overrides it per call.
        per_channel (`bool`, defaults to `False`):
            ``True``: one sigma per channel from the table's ``channel_ms_eps`` (``"analytic"``) or
            ``channel_x0_mse`` (``"residual"``), for data whose channels differ (Stable Diffusion latents);
            ``False``: the scalar variance. The trajectory DP always uses the scalar table.
        timestep_spacing (`str`, defaults to `"trailing"`):
            Diffusers' ``"leading"``, ``"linspace"`` or ``"trailing"`` timesteps, exactly those DDIMScheduler /
            DDPMScheduler give for the same K, or this package's trajectories: ``"optimal"`` (the likelihood DP, whose
            large jumps at high noise sample poorly), ``"quadratic"``, ``"samples"`` (the sample-quality trajectory
            of the table's sample cost). :meth:`from_config` and :meth:`from_table` resolve it by one rule: an
            argument wins over the config's value (or, where the config has none, the default of the scheduler it
            came from: ``"leading"`` for DDPM, DDIM and PNDM), which wins over ``"trailing"``. A spacing that ends at
            t > 0 (``"leading"`` with ``steps_offset=1``: …, 1) still takes its last step to clean data.
        steps_offset (`int`, defaults to 0):
            Added to ``"leading"`` timesteps.
        variance_cap_y (`float`, *optional*, defaults to 2.0):
            Caps the variance of the step into ``t_1``: ``sigma^2 <= (y * bin * sqrt(pi / 2))^2`` with
            ``bin = (b - a) / 255`` of the table's data range (the paper's sample-quality setting, y = 1 or 2). On by
            default because it samples better: without it the step into ``t_1 = 0`` adds noise that the last step
            cannot remove (the measurements are in docs/results.md). It does not enter bits/dim (``nll_bpd`` has its
            own variances); ``None`` turns it off. Data without a range (latents) have no bins and no cap.
        rescale_betas_zero_snr (`bool`, defaults to `False`):
            Rescale the betas to zero terminal SNR, as in ``DDPMScheduler``; ``betas`` and ``alphas_cumprod`` are
            Diffusers' (ending in 1 and 0), the step's float64 schedule raises the last ``abar`` to a floor
            (:func:`~analytic_sampler.schedule.alphas_cumprod_from_config`), and the analytic variance of a step from
            there takes the data's variance bound (no information about x0 is left).
        thresholding (`bool`, defaults to `False`):
            Dynamic thresholding of ``x0_hat`` (Imagen; ``DDPMScheduler``'s ``thresholding``) in place of
            ``clip_sample``: per sample, ``s = clamp(quantile(|x0_hat|, dynamic_thresholding_ratio), 1,
            sample_max_value)`` and ``x0_hat = clamp(x0_hat, -s, s) / s``; eps is recomputed from it.
        dynamic_thresholding_ratio (`float`, defaults to 0.995):
            The quantile of that threshold.
        sample_max_value (`float`, defaults to 1.0):
            The largest threshold.
        table_file (`str`, defaults to `"analytic_table.json"`):
            The table file beside ``scheduler_config.json``.
        table_sha256 (`str`, *optional*):
            The SHA-256 of the table, set by :meth:`from_table` and :meth:`from_config`: the scheduler samples with
            the table of that checksum, read from ``table_file`` by ``from_pretrained`` or held by this process.

    Example:

    ```py
    >>> import torch
    >>> from diffusers import DDPMPipeline
    >>> from analytic_sampler import AnalyticDPMScheduler
    >>> from analytic_sampler.pretrained import load_pretrained

    >>> model = load_pretrained("digits-ddpm-linear")  # a bundled 8x8 digits UNet, its scheduler and its table
    >>> scheduler = AnalyticDPMScheduler.from_table(model.table, model.scheduler.config, timestep_spacing="optimal")
    >>> pipe = DDPMPipeline(unet=model.unet, scheduler=scheduler)
    >>> pipe.set_progress_bar_config(disable=True)
    >>> images = pipe(batch_size=4, num_inference_steps=10, generator=torch.Generator().manual_seed(0),
    ...               output_type="np").images
    >>> images.shape, len(scheduler.timesteps)
    ((4, 8, 8, 1), 10)

    ```
    """

    _compatibles: ClassVar[list[str]] = [e.name for e in KarrasDiffusionSchedulers]
    order = 1
    table_type = AnalyticTable
    table_file_name = TABLE_FILE
    table_arguments = TABLE_ARGUMENTS
    table_hint = ("AnalyticDPMScheduler.from_table(table, config), the table from estimate_moments(unet, images, "
                  "scheduler) once per model or VarianceTable.load(folder_or_repo)")

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
        variance: str = "analytic",
        eta: float = 1.0,
        per_channel: bool = False,
        timestep_spacing: str = DEFAULT_SPACING,
        steps_offset: int = 0,
        variance_cap_y: float | None = 2.0,
        rescale_betas_zero_snr: bool = False,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        table_file: str = TABLE_FILE,
        table_sha256: str | None = None,
    ):
        self.table: AnalyticTable = self.held_table(table_sha256)
        _check_options(self.table, self.config)
        abar = alphas_cumprod_from_config(self.config)
        self.table.check_schedule(abar)
        self.alphas_cumprod_64 = abar  # the steps' float64 schedule (a zero-SNR schedule's end raised to a floor)
        self.betas = torch.from_numpy(betas_from_config(self.config)).float()  # float32, as DDPMScheduler has them
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.from_numpy(np.arange(num_train_timesteps)[::-1].copy())
        self.trajectory: list[int] = []
        self._dps: dict[str, TrajectoryDP | SampleTrajectoryDP] = {}
        self._coefficients: dict[tuple, StepCoefficients] = {}
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._warned_shapes: set[tuple[int, ...]] = set()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, return_unused_kwargs: bool = False, **kwargs):
        """``ConfigMixin.from_config`` for any DDPM / DDIM / PNDM (or other Diffusers) scheduler config.

        - Timesteps: ``timestep_spacing=``, else the config's, else (where the config has none) the default of the
          scheduler it came from (``_class_name``), else ``"trailing"``. A Stable Diffusion v1.5 (PNDM) config gives
          901, 801, …, 1 at K = 10 (with its ``steps_offset``), as ``DDIMScheduler.from_config`` does. Earlier
          versions' ``trajectory`` key loads as the spacing (``"even"`` as ``"linspace"``); ``trajectory=`` as an
          argument is refused, naming the spacing.
        - Options of the config that this scheduler does not use (``set_alpha_to_one=False``, a learned
          ``variance_type``, Karras or other sigma schedules, …) are named in one warning.
        - The table: the one this process holds under the config's ``table_sha256``, or the arrays given as
          arguments (``ms_eps=...``, ``x0_mse``, ``channel_ms_eps``, ``channel_x0_mse``, ``ms_x0``, ``channel_ms_x0``,
          ``data_range``) or inline in a config saved by an earlier version.
        """
        if "trajectory" in kwargs:
            value = kwargs["trajectory"]
            raise ValueError(
                f"trajectory={value!r}: the timesteps have one setting, timestep_spacing; pass "
                f"timestep_spacing={OLD_TRAJECTORIES.get(value, value)!r} (one of {TIMESTEP_SPACINGS})."
            )
        if not isinstance(config, Mapping):
            return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
        config = dict(config)
        unused = [] if cls._is_own(config) else ignored_options(config)
        if unused:
            warnings.warn(
                f"AnalyticDPMScheduler does not use {', '.join(unused)} of the scheduler config it is built from; "
                "see 'How Diffusers' options map onto this scheduler' in docs/scheduler.md.",
                UserWarning,
                stacklevel=2,
            )
        trajectory = config.pop("trajectory", None)  # an earlier version's config
        if trajectory is not None:
            config["timestep_spacing"] = OLD_TRAJECTORIES.get(trajectory, trajectory)
        config = with_source_spacing(config)
        if config.get("timestep_spacing") is None or "timestep_spacing" not in explicit_keys(config):
            kwargs.setdefault("timestep_spacing", DEFAULT_SPACING)  # named in the config, for schedulers built from it
        fields = table_arguments(config, kwargs)
        if fields:
            table = AnalyticTable(**fields).hold()
            kwargs["table_sha256"] = table.sha256  # (this local holds the table until the scheduler does)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def _is_own(cls, config: Mapping[str, Any]) -> bool:
        """Whether ``config`` is this scheduler's (saved, or live without ``_class_name``)."""
        return config.get("_class_name") == cls.__name__ or {"variance", "per_channel"} <= set(config)

    @classmethod
    def from_table(
        cls, table, scheduler_config=None, guidance_scale: float | None = None, model=None, force_table: bool = False,
        **kwargs,
    ) -> AnalyticDPMScheduler:
        """Build from a :class:`~analytic_sampler.VarianceTable` and the model's scheduler config.

        The table's schedule must be the config's (else ValueError); the table becomes the scheduler's state
        (:meth:`AnalyticTable.from_variance_table`). Its prediction type, data range and x0 clip set the
        scheduler's: a latent table (no data range) sets ``clip_sample=False``, a table whose ``x0_mse`` was clipped
        to ``(-r, r)`` sets ``clip_sample=True`` with that range, and a config or keyword argument that contradicts
        the table is refused, naming the fix. Timesteps as in :meth:`from_config`: ``timestep_spacing=``, else the
        config's (or its source scheduler's default), else ``"trailing"``.

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
                Any option of :class:`AnalyticDPMScheduler` (``eta``, ``timestep_spacing``, ``variance``, …).
        """
        _check_guidance(table.guidance_scale, guidance_scale)
        if model is not None:
            table.check_model(model, force=force_table)
        if scheduler_config is None:
            betas = betas_from_alphas_cumprod(table.alphas_cumprod)
            scheduler_config = {"num_train_timesteps": betas.size, "trained_betas": betas.tolist()}
        elif hasattr(scheduler_config, "config") and not isinstance(scheduler_config, Mapping):
            scheduler_config = {"_class_name": type(scheduler_config).__name__, **scheduler_config.config}
        scheduler_config = dict(scheduler_config)
        table_arguments(scheduler_config, {})  # arrays inline in an earlier version's config give way to the table
        table.check_schedule(alphas_cumprod_from_config(scheduler_config))
        _adopt_table_settings(table, scheduler_config, kwargs)
        if kwargs.get("variance") == "residual" and not table.has_x0_mse:
            table.require_x0_mse()
        state = AnalyticTable.from_variance_table(table).hold()
        return cls.from_config(scheduler_config, table_sha256=state.sha256, **kwargs)

    # ------------------------------------------------------------------ the table
    ms_eps = _table_field("ms_eps", "The table's ``E||eps_theta(x_t, t)||^2 / d``, ``(N,)``, NaN where not estimated.")
    x0_mse = _table_field("x0_mse", "The table's ``E||x0 - x0_hat||^2 / d``, ``(N,)``, when it has one.")
    channel_ms_eps = _table_field("channel_ms_eps", "``ms_eps`` per data channel, ``(C, N)``, when the table has it.")
    channel_x0_mse = _table_field("channel_x0_mse", "``x0_mse`` per data channel, ``(C, N)``, when the table has it.")
    ms_x0 = _table_field("ms_x0", "The data's second moment ``E||x0||^2 / d``, when the table records it.")
    channel_ms_x0 = _table_field("channel_ms_x0", "``ms_x0`` per data channel, ``(C,)``, when the table records it.")

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
        """Choose the trajectory: ``num_inference_steps`` points of the config's ``timestep_spacing`` (Diffusers'
        spacings, or this package's trajectories), or explicit ``timesteps``. Precomputes every step's coefficients.

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
        elif self.config.timestep_spacing in SPACINGS:
            spacing, offset = self.config.timestep_spacing, self.config.steps_offset
            trajectory = spaced_timesteps(n, num_inference_steps, spacing, offset)
        else:
            trajectory = self._trajectory(check_num_steps(n, num_inference_steps, minimum=1))
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
        """``num_steps`` points of this package's trajectory ``timestep_spacing``; one step starts at N-1. The DP
        trajectories solve once for every K up to the largest asked for (the table is fixed)."""
        n, spacing = self.config.num_train_timesteps, self.config.timestep_spacing
        if num_steps == 1:
            return [n - 1]
        if spacing == "quadratic":
            return quadratic_trajectory(n, num_steps)
        dp = self._dps.get(spacing)
        if dp is None or dp.max_steps < num_steps:
            if spacing == "optimal":  # the residual cost with x0_mse, else the paper's
                dp = TrajectoryDP(self.alphas_cumprod_64, self.ms_eps, num_steps, x0_mse=self.x0_mse,
                                  data_range=self.table.data_range, ms_x0=self.ms_x0)
            else:
                dp = SampleTrajectoryDP(self.alphas_cumprod_64, self.table.sample_cost, num_steps)
            self._dps[spacing] = dp
        return dp.path(num_steps)

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
        if self.config.variance_cap_y is not None and self.table.data_range is not None and var.shape[1]:
            lo, hi = self.table.data_range  # the step into t_1
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
        return analytic_variance(self.alphas_cumprod_64, moments, prev_t, t, eta, self.table.data_range, ms_x0=ms_x0)

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
        expected, shape = self.table.sample_shape, tuple(sample.shape[1:])
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
