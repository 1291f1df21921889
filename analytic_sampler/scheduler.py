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
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .predictions import check_prediction_type, eps_from_x0, split_learned_variance, to_x0_and_eps
from .schedule import alphas_cumprod_from_config, betas_from_alphas_cumprod, extended, schedule_fingerprint
from .trajectory import (
    SPACINGS, TrajectoryDP, even_trajectory, quadratic_trajectory, spaced_timesteps, validate_timesteps,
)
from .table import REESTIMATE_HINT
from .variance import analytic_variance, residual_variance, validate_ms_eps

TRAJECTORIES = ("optimal", "even", "quadratic")
VARIANCES = ("analytic", "residual")


@dataclass
class AnalyticDPMSchedulerOutput(BaseOutput):
    """``prev_sample``: x at the previous trajectory point; ``pred_original_sample``: x0_hat used for it."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


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


class AnalyticDPMScheduler(SchedulerMixin, ConfigMixin):
    """Analytic-DDPM (``eta=1``) and Analytic-DDIM (``eta=0``) sampling with a precomputed ``ms_eps`` table.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr:
            the model's training schedule, as in ``DDPMScheduler``.
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``; 2C-channel (learned-variance)
            outputs are accepted and their variance half is ignored.
        clip_sample, clip_sample_range: clip x0_hat to ``[-range, range]``.
        ms_eps: the table ``E||eps_theta(x_t, t)||^2 / d`` (length ``num_train_timesteps``), from
            :func:`analytic_sampler.estimate_moments`; NaN where not estimated.
        x0_mse: the same table's ``E||x0 - x0_hat||^2 / d``; with it ``trajectory="optimal"`` minimises the bound
            the network really achieves (the residual DP), without it Analytic-DPM's cost (with a warning).
        variance: ``"analytic"`` (default) or ``"residual"`` (needs ``x0_mse``).
        channel_ms_eps, channel_x0_mse: the table's moments per data channel, ``C`` rows of ``num_train_timesteps``
            floats (``VarianceTable.channel_ms_eps`` / ``.channel_x0_mse``; NaN where not estimated). When the scalar
            ``ms_eps`` / ``x0_mse`` is not given it is their mean over channels, as in the table.
        per_channel: ``True``: one sigma per channel from ``channel_ms_eps`` (``"analytic"``) or ``channel_x0_mse``
            (``"residual"``), for data whose channels differ (Stable Diffusion latents); ``False`` (default): the
            scalar variance. The trajectory DP always uses the scalar table.
        eta: 1 for DDPM-type, 0 for DDIM-type, anything in between; a pipeline's ``eta`` overrides it per call.
        trajectory: ``"even"`` (default), ``"quadratic"`` or ``"optimal"``: the DP trajectory of Analytic-DPM, which
            minimises the likelihood bound (bits/dim) but, with its large jumps at high noise, not a sample-quality
            measure; explicit timesteps go to ``set_timesteps(timesteps=...)``.
        timestep_spacing, steps_offset: Diffusers' ``"leading"``, ``"linspace"`` or ``"trailing"`` timesteps
            (``steps_offset`` is added to ``"leading"`` ones), exactly those DDIMScheduler / DDPMScheduler give for
            the same K. When ``timestep_spacing`` is set it wins over ``trajectory``; ``from_config`` keeps the one a
            pipeline's config sets, unless ``trajectory`` is passed too. A spacing that ends at t > 0 (``"leading"``
            with ``steps_offset=1``: …, 1) still takes its last step to clean data.
        data_range: ``(a, b)`` bounds the data for the variance clip (Theorem 2); ``None`` for latents.
        variance_cap_y (`float` or `None`, defaults to 2.0): cap on the variance of the step into ``t_1``,
            ``sigma^2 <= (y * bin * sqrt(pi / 2))^2`` with ``bin = (b - a) / 255`` of ``data_range`` (the paper's
            sample-quality setting, y = 1 or 2). On by default because it samples better: without it the step into
            ``t_1 = 0`` adds noise that the last step cannot remove (on the bundled digits at the config's spacing,
            FD-digits 41.0 -> 22.8 at K = 10 and 10.2 -> 7.6 at K = 25 on the linear model; see the README). It
            does not enter bits/dim (``nll_bpd`` has its own variances); ``None`` turns it off. Data without a range
            (latents) have no bins and no cap.
        table_fingerprint: the schedule fingerprint the table was estimated for; a mismatch is refused.
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
        variance_cap_y: float | None = 2.0,
        table_fingerprint: str | None = None,
        rescale_betas_zero_snr: bool = False,
        timestep_spacing: str | None = None,
        steps_offset: int = 0,
    ):
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
        if variance not in VARIANCES:
            raise ValueError(f"variance={variance!r}; use one of {VARIANCES}.")
        if variance == "residual" and x0_mse is None:
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
        self._check_eta(eta)
        abar = alphas_cumprod_from_config(self.config)
        if table_fingerprint is not None and table_fingerprint != schedule_fingerprint(abar):
            raise ValueError(
                f"the variance table was estimated for schedule {table_fingerprint}, but this scheduler's config "
                f"gives {schedule_fingerprint(abar)}; estimate a table with this model's own scheduler config."
            )
        ms = validate_ms_eps(ms_eps, num_train_timesteps, needed=[])
        # The config keeps plain floats (NaN for timesteps that were not estimated) so it serialises to JSON.
        self.register_to_config(ms_eps=[float(v) for v in ms])
        if x0_mse is not None:
            self.register_to_config(x0_mse=[float(v) for v in validate_ms_eps(x0_mse, num_train_timesteps, [], "x0_mse")])
        self.register_to_config(**{name: value.tolist() for name, value in channels.items()})
        if data_range is not None:
            self.register_to_config(data_range=tuple(float(v) for v in data_range))

        # float32 views of the float64 schedule, as DDPMScheduler has them: alphas = 1 - betas, abar = cumprod(alphas).
        self.alphas_cumprod_64 = abar
        betas = betas_from_alphas_cumprod(abar)
        self.betas = torch.from_numpy(betas).float()
        self.alphas = torch.from_numpy(1.0 - betas).float()
        self.alphas_cumprod = torch.from_numpy(abar).float()
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.from_numpy(np.arange(num_train_timesteps)[::-1].copy())
        self.trajectory: list[int] = []
        self._dp: TrajectoryDP | None = None
        self._coefficients: dict[tuple, torch.Tensor] = {}
        self._step_index: int | None = None
        self._begin_index: int | None = None

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
        cls, table, scheduler_config=None, guidance_scale: float | None = None, **kwargs
    ) -> "AnalyticDPMScheduler":
        """Build from a :class:`VarianceTable` and the model's scheduler config (or its schedule alone).

        The table's per-channel moments, when it has them, go into the config too (so a saved scheduler keeps them);
        they are used only with ``per_channel=True``. ``guidance_scale``: the classifier-free guidance scale the
        pipeline will sample at; a warning when the table's eps was estimated at another (``table.guidance_scale``;
        none counts as 1). A table without a data range (latents) also sets ``clip_sample=False`` unless passed."""
        _check_guidance(table.guidance_scale, guidance_scale)
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

    @staticmethod
    def _check_eta(eta: float) -> float:
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"eta={eta} is outside [0, 1]; use 1 for Analytic-DDPM, 0 for Analytic-DDIM.")
        return float(eta)

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
        """Choose the trajectory: explicit ``timesteps`` (descending) or ``num_inference_steps`` points, spaced by
        ``timestep_spacing`` when the config sets one, else by ``trajectory``."""
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
        self._coefficients_for(self._check_eta(self.config.eta), torch.device(device or "cpu"), torch.float32)

    def _optimal(self, num_steps: int) -> list[int]:
        """The DP's path (residual cost with ``x0_mse``, else the paper's); one solve serves every K up to the
        largest asked for (the config's table is fixed)."""
        if self._dp is None or self._dp.max_steps < num_steps:
            self._dp = TrajectoryDP(self.alphas_cumprod_64, self.ms_eps, num_steps, x0_mse=self.x0_mse)
        return self._dp.path(num_steps)

    def step_coefficients(self, eta: float) -> np.ndarray:
        """Per-step float64 table, one row per trajectory point ``t_K … t_1``:
        ``[sqrt(abar_t), sqrt(1-abar_t), sqrt(abar_s), sqrt(1-abar_s-lambda^2), sigma_1 … sigma_C']``, with one sigma
        (``C' = 1``, the scalar variance) or, with ``per_channel``, one per data channel (``C' = C``)."""
        if not self.trajectory:
            raise ValueError("call set_timesteps(num_inference_steps) before step_coefficients().")
        t = np.asarray(self.trajectory, dtype=np.int64)
        s = np.append(t[1:], -1)
        abar = self.alphas_cumprod_64
        a_t, a_s = abar[t], extended(abar, s)
        lam2 = eta**2 * (1.0 - a_s) * (1.0 - a_t / a_s) / (1.0 - a_t)
        moments = np.atleast_2d(self._variance_moments()[1])  # (C', N)
        var = np.zeros((moments.shape[0], t.size))
        if self.config.variance == "residual":
            var[:, :-1] = residual_variance(abar, moments, s[:-1], t[:-1], eta)
        else:
            var[:, :-1] = analytic_variance(abar, moments, s[:-1], t[:-1], eta, self.config.data_range)
        if self.config.variance_cap_y is not None and self.config.data_range is not None and t.size >= 2:
            lo, hi = self.config.data_range
            cap = (self.config.variance_cap_y * (hi - lo) / 255.0 * math.sqrt(math.pi / 2)) ** 2
            var[:, -2] = np.minimum(var[:, -2], cap)
        mean = [np.sqrt(a_t), np.sqrt(1 - a_t), np.sqrt(a_s), np.sqrt(np.maximum(1 - a_s - lam2, 0))]
        return np.concatenate([np.stack(mean, 1), np.sqrt(var).T], 1)

    def _coefficients_for(self, eta: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (eta, device, dtype)
        if key not in self._coefficients:
            self._coefficients[key] = torch.from_numpy(self.step_coefficients(eta)).to(device=device, dtype=dtype)
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
        """One reverse step ``x_t -> x_s``. ``eta`` (e.g. from DDIMPipeline) overrides the config's;
        ``use_clipped_model_output=False`` keeps the model's own eps next to a clipped x0_hat.

        Steps follow ``timesteps`` from ``begin_index`` or, without one, from where the first ``timestep`` is on the
        trajectory (a lookup that syncs an accelerator tensor once per loop, as in Diffusers' multistep schedulers).
        A ``timestep`` given as a Python int or a CPU tensor must be the expected one, else ValueError; on an
        accelerator tensor that check is skipped rather than wait for the device. With ``per_channel`` the noise std
        broadcasts over ``sample`` ``(B, C, …)`` as ``(C, 1, …)``; a sample with another channel count is refused."""
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
        eta = self.config.eta if eta is None else self._check_eta(eta)
        coef = self._coefficients_for(float(eta), sample.device, sample.dtype)[i]
        sqrt_abar_t, sqrt_bb_t, sqrt_abar_s, eps_coef = coef[:4].unbind()
        std = coef[4:]
        if self.config.per_channel and sample.shape[1] != std.shape[0]:
            raise ValueError(
                f"this scheduler's per-channel variance has {std.shape[0]} channels (channel_ms_eps / channel_x0_mse), "
                f"but the sample has {sample.shape[1]} (shape {tuple(sample.shape)}); use the variance table estimated "
                "for this model's own data (or latents), or per_channel=False."
            )
        std = std.reshape(-1, *([1] * (sample.ndim - 2)))  # (C', 1, …): one sigma per channel, or one for all

        prediction, _ = split_learned_variance(model_output, sample)
        x0, eps = to_x0_and_eps(prediction, sample, sqrt_abar_t, sqrt_bb_t, self.config.prediction_type)
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            x0 = x0.clamp(-r, r)
            if use_clipped_model_output is not False:
                eps = eps_from_x0(x0, sample, sqrt_abar_t, sqrt_bb_t)
        prev_sample = sqrt_abar_s * x0 + eps_coef * eps
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
