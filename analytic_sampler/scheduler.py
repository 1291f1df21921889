"""``AnalyticDPMScheduler``: Analytic-DPM's reverse process as a drop-in Diffusers scheduler.

One step from ``t`` to the previous point ``s`` of the trajectory (``s = -1`` after the last one)::

    x0_hat = x0 predicted by the model (clipped to the data range when clip_sample is on)
    eps    = (x_t - sqrt(abar[t]) x0_hat) / sqrt(1 - abar[t])
    x_s    = sqrt(abar[s]) x0_hat + sqrt(1 - abar[s] - lambda^2) eps + sigma(s, t) z

with ``lambda^2 = eta^2 btilde(s, t)`` and ``sigma^2`` either the clipped analytic variance of
:func:`analytic_sampler.analytic_variance` (``variance="analytic"``) or the residual one,
``lambda^2 + coef^2 x0_mse[t]`` (``variance="residual"``, :func:`analytic_sampler.residual_variance`).
With ``per_channel=True`` sigma is diagonal: ``sigma_c^2`` from channel c's row of the table, ``z`` scaled per channel.
The last step returns ``x0_hat`` with no noise.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .predictions import check_prediction_type, clip_x0, split_learned_variance, to_x0_and_eps
from .schedule import (
    SPACINGS,
    alphas_cumprod_from_config,
    betas_from_alphas_cumprod,
    schedule_fingerprint,
    spaced_timesteps,
)
from .table import REESTIMATE_HINT, validate_ms_eps
from .trajectory import TrajectoryDP, even_trajectory, quadratic_trajectory, validate_timesteps
from .variance import analytic_variance, channel_view, check_eta, pair_coefficients, residual_variance

TRAJECTORIES = ("optimal", "even", "quadratic")
SAMPLING_VARIANCES = ("analytic", "residual")  # the reverse variances the scheduler samples with, from its table


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


def _channel_tables(channel_ms_eps, channel_x0_mse, num_train_timesteps: int) -> dict[str, np.ndarray]:
    """The per-channel moments that were given, each checked to be ``(C, N)``, with one ``C`` for both."""
    channels = {
        name: validate_ms_eps(value, num_train_timesteps, [], name, per_channel=True)
        for name, value in (("channel_ms_eps", channel_ms_eps), ("channel_x0_mse", channel_x0_mse))
        if value is not None
    }
    if len({value.shape for value in channels.values()}) > 1:
        raise ValueError(
            f"channel_ms_eps has shape {channels['channel_ms_eps'].shape} but channel_x0_mse "
            f"{channels['channel_x0_mse'].shape}; pass both from the same VarianceTable."
        )
    return channels


def _scalar_tables(ms_eps, x0_mse, channels: dict[str, np.ndarray]) -> tuple[Any, Any]:
    """``(ms_eps, x0_mse)``: as given, else the mean over channels of the per-channel ones (as in a table);
    ``ms_eps`` is required."""
    if ms_eps is None and "channel_ms_eps" in channels:
        ms_eps = channels["channel_ms_eps"].mean(0)
    if x0_mse is None and "channel_x0_mse" in channels:
        x0_mse = channels["channel_x0_mse"].mean(0)
    if ms_eps is None:
        raise ValueError(
            "AnalyticDPMScheduler needs the model's variance table: run "
            "`table = estimate_moments(unet, images, scheduler)` once, then pass `ms_eps=table.ms_eps` "
            "or use `AnalyticDPMScheduler.from_table(table, scheduler.config)`."
        )
    return ms_eps, x0_mse


def _check_options(
    variance: str,
    has_x0_mse: bool,
    per_channel: bool,
    channels: dict[str, np.ndarray],
    trajectory: str,
    timestep_spacing: str | None,
    prediction_type: str,
    eta: float,
) -> None:
    """Refuse an unknown option, or a variance the table cannot serve, naming the fix."""
    if variance not in SAMPLING_VARIANCES:
        raise ValueError(f"variance={variance!r}; use one of {SAMPLING_VARIANCES}.")
    if variance == "residual" and not has_x0_mse:
        raise ValueError(
            "variance='residual' needs the table's x0_mse: use AnalyticDPMScheduler.from_table(table, ...) with a "
            f"table that has it, or pass x0_mse=table.x0_mse; {REESTIMATE_HINT}."
        )
    needed = "channel_ms_eps" if variance == "analytic" else "channel_x0_mse"
    if per_channel and needed not in channels:
        raise ValueError(
            f"per_channel=True with variance={variance!r} needs {needed}: use "
            "AnalyticDPMScheduler.from_table(table, config, per_channel=True) with a table that has per-channel "
            f"moments (table.num_channels is not None; {REESTIMATE_HINT}), pass {needed}=table.{needed}.tolist(), "
            "or set per_channel=False."
        )
    if trajectory not in TRAJECTORIES:
        raise ValueError(f"trajectory={trajectory!r}; use one of {TRAJECTORIES} or set_timesteps(timesteps=[...]).")
    if timestep_spacing is not None and timestep_spacing not in SPACINGS:
        raise ValueError(f"timestep_spacing={timestep_spacing!r}; use one of {SPACINGS}, or None for `trajectory`.")
    check_prediction_type(prediction_type)
    check_eta(eta)


def _check_fingerprint(table_fingerprint: str | None, alphas_cumprod: np.ndarray) -> None:
    """Refuse a table estimated for another schedule than the config's."""
    if table_fingerprint is not None and table_fingerprint != schedule_fingerprint(alphas_cumprod):
        raise ValueError(
            f"the variance table was estimated for schedule {table_fingerprint}, but this scheduler's config "
            f"gives {schedule_fingerprint(alphas_cumprod)}; estimate a table with this model's own scheduler config."
        )


class AnalyticDPMScheduler(SchedulerMixin, ConfigMixin):
    """Analytic-DDPM (``eta=1``) and Analytic-DDIM (``eta=0``) sampling with a model's variance table.

    Each step from ``t`` to the previous trajectory point ``s`` is
    ``x_s = sqrt(abar[s]) x0_hat + sqrt(1 - abar[s] - lambda^2) eps_hat + sigma(s, t) z`` with
    ``lambda^2 = eta^2 btilde(s, t)`` and sigma^2 the analytic or residual variance of the table; the last step returns
    ``x0_hat``. Build it with :meth:`from_table` (or :meth:`from_config` and ``ms_eps=...``) and assign it to a
    pipeline: ``pipe.scheduler = AnalyticDPMScheduler.from_table(table, pipe.scheduler.config)``.

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
        ms_eps (`list[float]`, *optional*):
            The table ``E||eps_theta(x_t, t)||^2 / d``, ``num_train_timesteps`` floats from
            :func:`~analytic_sampler.estimate_moments` (``VarianceTable.ms_eps``); NaN where not estimated. Required,
            unless ``channel_ms_eps`` is given.
        x0_mse (`list[float]`, *optional*):
            The same table's ``E||x0 - x0_hat||^2 / d``. With it ``trajectory="optimal"`` minimises the bound the
            network really achieves (the residual DP); without it, Analytic-DPM's cost (with a warning).
        channel_ms_eps (`list[list[float]]`, *optional*):
            ``ms_eps`` per data channel, ``C`` rows of ``num_train_timesteps`` floats (``VarianceTable.channel_ms_eps``);
            when ``ms_eps`` is not given it is their mean over channels, as in the table.
        channel_x0_mse (`list[list[float]]`, *optional*):
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
        trajectory (`str`, defaults to `"even"`):
            ``"even"``, ``"quadratic"`` or ``"optimal"``: the DP trajectory, which minimises the likelihood bound
            (bits/dim) but, with its large jumps at high noise, not a sample-quality measure. Explicit timesteps go
            to ``set_timesteps(timesteps=...)``.
        data_range (`tuple[float, float]`, *optional*, defaults to `(-1.0, 1.0)`):
            ``(a, b)`` bounds the data for the variance clip (Theorem 2); ``None`` for unbounded data (latents).
        variance_cap_y (`float`, *optional*):
            Caps the variance of the step into ``t_1``: ``sigma^2 <= (y * bin * sqrt(pi / 2))^2`` with
            ``bin = (b - a) / 255``; the paper uses y = 1 or 2.
        table_fingerprint (`str`, *optional*):
            The schedule fingerprint the table was estimated for (``VarianceTable.fingerprint``); a mismatch with
            this config's schedule is refused.
        rescale_betas_zero_snr (`bool`, defaults to `False`):
            Rescale the betas to zero terminal SNR, as in ``DDPMScheduler``.
        timestep_spacing (`str`, *optional*):
            Diffusers' ``"leading"``, ``"linspace"`` or ``"trailing"`` timesteps, exactly those DDIMScheduler /
            DDPMScheduler give for the same K. When set it wins over ``trajectory``; :meth:`from_config` keeps the
            one a pipeline's config sets, unless ``trajectory`` is passed too. A spacing that ends at t > 0
            (``"leading"`` with ``steps_offset=1``: …, 1) still takes its last step to clean data.
        steps_offset (`int`, defaults to 0):
            Added to ``"leading"`` timesteps.

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
        ms_eps: list[float] | None = None,
        x0_mse: list[float] | None = None,
        channel_ms_eps: list[list[float]] | None = None,
        channel_x0_mse: list[list[float]] | None = None,
        per_channel: bool = False,
        variance: str = "analytic",
        eta: float = 1.0,
        trajectory: str = "even",
        data_range: tuple[float, float] | None = (-1.0, 1.0),
        variance_cap_y: float | None = None,
        table_fingerprint: str | None = None,
        rescale_betas_zero_snr: bool = False,
        timestep_spacing: str | None = None,
        steps_offset: int = 0,
    ):
        channels = _channel_tables(channel_ms_eps, channel_x0_mse, num_train_timesteps)
        ms_eps, x0_mse = _scalar_tables(ms_eps, x0_mse, channels)
        _check_options(
            variance, x0_mse is not None, per_channel, channels, trajectory, timestep_spacing, prediction_type, eta
        )
        abar = alphas_cumprod_from_config(self.config)
        _check_fingerprint(table_fingerprint, abar)
        self._register_tables(ms_eps, x0_mse, channels, data_range)
        self._set_schedule_tensors(abar)
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.from_numpy(np.arange(num_train_timesteps)[::-1].copy())
        self.trajectory: list[int] = []
        self._dp: TrajectoryDP | None = None
        self._coefficients: dict[tuple, StepCoefficients] = {}
        self._step_index: int | None = None
        self._begin_index: int | None = None

    def _register_tables(self, ms_eps, x0_mse, channels: dict[str, np.ndarray], data_range) -> None:
        """Check the scalar moments and store every table array in the config as plain floats (NaN for timesteps
        that were not estimated), so that it serialises to JSON."""
        n = self.config.num_train_timesteps
        self.register_to_config(ms_eps=[float(v) for v in validate_ms_eps(ms_eps, n, needed=[])])
        if x0_mse is not None:
            self.register_to_config(x0_mse=[float(v) for v in validate_ms_eps(x0_mse, n, [], "x0_mse")])
        self.register_to_config(**{name: value.tolist() for name, value in channels.items()})
        if data_range is not None:
            self.register_to_config(data_range=tuple(float(v) for v in data_range))

    def _set_schedule_tensors(self, abar: np.ndarray) -> None:
        """The float64 schedule and its float32 views, as DDPMScheduler has them: alphas = 1 - betas,
        abar = cumprod(alphas)."""
        self.alphas_cumprod_64 = abar
        betas = betas_from_alphas_cumprod(abar)
        self.betas = torch.from_numpy(betas).float()
        self.alphas = torch.from_numpy(1.0 - betas).float()
        self.alphas_cumprod = torch.from_numpy(abar).float()

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, return_unused_kwargs: bool = False, **kwargs):
        """``ConfigMixin.from_config``; an explicit ``trajectory`` drops the config's ``timestep_spacing`` (every
        saved DDPM / DDIM config has one) unless ``timestep_spacing`` is passed as well."""
        if "trajectory" in kwargs:
            kwargs.setdefault("timestep_spacing", None)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def from_table(
        cls, table, scheduler_config=None, guidance_scale: float | None = None, model=None, force_table: bool = False,
        **kwargs,
    ) -> "AnalyticDPMScheduler":
        """Build from a :class:`~analytic_sampler.VarianceTable` and the model's scheduler config.

        The table's schedule must be the config's (else ValueError); its ``ms_eps``, ``x0_mse``, data range and
        per-channel moments (kept in the config, used only with ``per_channel=True``) go into the scheduler. A table
        without a data range (latents) also sets ``clip_sample=False`` unless it is passed.

        Args:
            table (`VarianceTable`):
                The model's table, from :func:`~analytic_sampler.estimate_moments` or ``VarianceTable.load``.
            scheduler_config (`dict` or a scheduler, *optional*):
                The model's scheduler config (``pipe.scheduler.config``); default: the table's schedule as
                ``trained_betas``.
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
        if table.data_range is None:
            kwargs.setdefault("clip_sample", False)
        if scheduler_config is None:
            betas = betas_from_alphas_cumprod(table.alphas_cumprod)
            scheduler_config = {"num_train_timesteps": betas.size, "trained_betas": betas.tolist()}
        elif hasattr(scheduler_config, "config"):
            scheduler_config = scheduler_config.config
        table.check_schedule(alphas_cumprod_from_config(scheduler_config))
        kwargs.setdefault("data_range", table.data_range)
        if table.has_x0_mse:
            kwargs.setdefault("x0_mse", table.x0_mse.tolist())
        elif kwargs.get("variance") == "residual":
            table.require_x0_mse()
        for name in ("channel_ms_eps", "channel_x0_mse"):
            if getattr(table, name) is not None:  # tables before format 3 have none
                kwargs.setdefault(name, np.asarray(getattr(table, name)).tolist())
        return cls.from_config(scheduler_config, ms_eps=table.ms_eps.tolist(), table_fingerprint=table.fingerprint, **kwargs)

    @property
    def ms_eps(self) -> np.ndarray:
        return np.asarray(self.config.ms_eps, dtype=np.float64)

    @property
    def x0_mse(self) -> np.ndarray | None:
        return None if self.config.x0_mse is None else np.asarray(self.config.x0_mse, dtype=np.float64)

    @property
    def channel_ms_eps(self) -> np.ndarray | None:
        return None if self.config.channel_ms_eps is None else np.asarray(self.config.channel_ms_eps, dtype=np.float64)

    @property
    def channel_x0_mse(self) -> np.ndarray | None:
        return None if self.config.channel_x0_mse is None else np.asarray(self.config.channel_x0_mse, dtype=np.float64)

    def _variance_moments(self) -> tuple[str, np.ndarray]:
        """``(name, table)`` the step's variance reads: ``ms_eps`` (analytic) or ``x0_mse`` (residual), shape ``(N,)``,
        or with ``per_channel`` their ``channel_`` rows, shape ``(C, N)``."""
        name = "x0_mse" if self.config.variance == "residual" else "ms_eps"
        name = "channel_" + name if self.config.per_channel else name
        return name, getattr(self, name)

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
        """Choose the trajectory: ``num_inference_steps`` points, spaced by ``timestep_spacing`` when the config
        sets one, else by ``trajectory``; or explicit ``timesteps``. Precomputes every step's coefficients.

        Args:
            num_inference_steps (`int`, *optional*):
                The number of steps K (2 to ``num_train_timesteps``).
            device (`str` or `torch.device`, *optional*):
                Where ``timesteps`` and the step coefficients live.
            timesteps (`list[int]`, *optional*):
                A strictly descending list of training timesteps, in place of ``num_inference_steps``.
        """
        n = self.config.num_train_timesteps
        if timesteps is not None:
            if num_inference_steps is not None:
                raise ValueError("pass either num_inference_steps or timesteps, not both.")
            trajectory = validate_timesteps(timesteps, n)
        elif num_inference_steps is None:
            raise ValueError("set_timesteps needs num_inference_steps (K) or an explicit list of timesteps.")
        elif self.config.timestep_spacing is not None:
            spacing, offset = self.config.timestep_spacing, self.config.steps_offset
            trajectory = spaced_timesteps(n, num_inference_steps, spacing, offset)
        elif self.config.trajectory == "optimal":
            trajectory = self._optimal(int(num_inference_steps))
        elif self.config.trajectory == "quadratic":
            trajectory = quadratic_trajectory(n, num_inference_steps)
        else:
            trajectory = even_trajectory(n, num_inference_steps)
        validate_ms_eps(self.ms_eps, n, needed=trajectory[:-1])  # the DP's and the scalar variance's table
        name, moments = self._variance_moments()
        validate_ms_eps(moments, n, needed=trajectory[:-1], name=name, per_channel=self.config.per_channel)

        self.trajectory = trajectory
        self.num_inference_steps = len(trajectory)
        self.timesteps = torch.tensor(trajectory, dtype=torch.int64, device=device)
        self._coefficients = {}
        self._step_index = None
        self._begin_index = None
        self._coefficients_for(check_eta(self.config.eta), torch.device(device or "cpu"), torch.float32)

    def _optimal(self, num_steps: int) -> list[int]:
        """The DP's path (residual cost with ``x0_mse``, else the paper's); one solve serves every K up to the
        largest asked for (the config's table is fixed)."""
        if self._dp is None or self._dp.max_steps < num_steps:
            self._dp = TrajectoryDP(self.alphas_cumprod_64, self.ms_eps, num_steps, x0_mse=self.x0_mse)
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
        if self.config.variance_cap_y is not None:  # the step into t_1
            lo, hi = self.config.data_range or (-1.0, 1.0)
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
        moments = np.atleast_2d(self._variance_moments()[1])  # (C', N)
        if self.config.variance == "residual":
            return residual_variance(self.alphas_cumprod_64, moments, prev_t, t, eta)
        return analytic_variance(self.alphas_cumprod_64, moments, prev_t, t, eta, self.config.data_range)

    def _coefficients_for(self, eta: float, device: torch.device, dtype: torch.dtype) -> StepCoefficients:
        key = (eta, device, dtype)
        if key not in self._coefficients:
            self._coefficients[key] = self.step_coefficients(eta).to(device, dtype)
        return self._coefficients[key]

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
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        eta: float | None = None,
        use_clipped_model_output: bool | None = None,
        variance_noise: torch.Tensor | None = None,
        **unused,
    ) -> AnalyticDPMSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One reverse step ``x_t -> x_s`` to the previous point of the trajectory.

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
            generator (`torch.Generator`, *optional*):
                Draws the noise ``z``.
            return_dict (`bool`, defaults to `True`):
                Return an :class:`AnalyticDPMSchedulerOutput`, else the tuple ``(prev_sample, pred_original_sample)``.
            eta (`float`, *optional*):
                Overrides the config's ``eta`` (DDIMPipeline passes its own).
            use_clipped_model_output (`bool`, *optional*):
                ``False`` keeps the model's own eps next to a clipped ``x0_hat``; by default eps is recomputed from it.
            variance_noise (`torch.Tensor`, *optional*):
                The noise ``z`` itself, in place of drawing it.
        """
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
        coefficients = self._coefficients_for(float(eta), sample.device, sample.dtype)
        sqrt_abar_t, sqrt_bb_t = coefficients.sqrt_abar_t[i], coefficients.sqrt_one_minus_abar_t[i]
        std = coefficients.sigma[i]
        if self.config.per_channel and sample.shape[1] != std.shape[0]:
            raise ValueError(
                f"this scheduler's per-channel variance has {std.shape[0]} channels (channel_ms_eps / channel_x0_mse), "
                f"but the sample has {sample.shape[1]} (shape {tuple(sample.shape)}); use the variance table estimated "
                "for this model's own data (or latents), or per_channel=False."
            )
        std = channel_view(std, sample.ndim)  # (C', 1, …): one sigma per channel, or one for all

        prediction, _ = split_learned_variance(model_output, sample)
        x0, eps = to_x0_and_eps(prediction, sample, sqrt_abar_t, sqrt_bb_t, self.config.prediction_type)
        r = self.config.clip_sample_range
        x0, eps = clip_x0(x0, eps, sample, sqrt_abar_t, sqrt_bb_t, (-r, r) if self.config.clip_sample else None,
                          recompute_eps=use_clipped_model_output is not False)
        prev_sample = coefficients.sqrt_abar_s[i] * x0 + coefficients.eps_coef[i] * eps
        if i < len(self.trajectory) - 1:
            if variance_noise is None:
                variance_noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev_sample = prev_sample + std * variance_noise
        self._step_index = i + 1 if i + 1 < len(self.trajectory) else None

        if not return_dict:
            return prev_sample, x0
        return AnalyticDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(abar[t]) x0 + sqrt(1 - abar[t]) noise`` (img2img and training)."""
        abar = self.alphas_cumprod.to(device=original_samples.device, dtype=original_samples.dtype)[timesteps]
        abar = abar.reshape(-1, *([1] * (original_samples.ndim - 1)))
        return abar.sqrt() * original_samples + (1 - abar).sqrt() * noise

    def previous_timestep(self, timestep: int | torch.Tensor) -> int:
        i = self.index_for_timestep(timestep)
        return self.trajectory[i + 1] if i + 1 < len(self.trajectory) else -1

    def __len__(self) -> int:
        return self.config.num_train_timesteps
