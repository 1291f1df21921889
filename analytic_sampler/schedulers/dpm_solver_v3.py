"""``DPMSolverV3Scheduler``: DPM-Solver-v3 (Zheng et al., NeurIPS 2023) on a model's own statistics, as a drop-in
Diffusers scheduler.

At each of the K model calls, at timestep ``t_i`` (half log-SNR ``lambda_i``, ascending)::

    D_i = x0 predicted by the model (eps, v or x0 output), clipped to the statistics' data range
    f_i = (1 - l_i) x_i / alpha_i - D_i
    x_i <- corrector_{i-1}(x_{i-1}, f_{i-p} … f_i)          (after the first call; f_i is kept)
    x_{i+1} = predictor_i(x_i, f_{i-p+1} … f_i)             (the last call returns D_{K-1} instead)

each a ``decay * x - sum_j w_j f_j - const`` whose float64 coefficients :func:`~analytic_sampler.solver_coefficients.
solver_plan` computes in ``set_timesteps`` from the statistics ``l, s, b``
(:class:`~analytic_sampler.solver_statistics.SolverStatistics`). ``step`` works in float64 (float32 on MPS) and
returns the sample's dtype. The statistics are the scheduler's state (:class:`~.solver_table.SolverTable`, saved in
``dpm_solver_v3_statistics.json`` beside ``scheduler_config.json`` by :mod:`.table_file`); the config holds the
options and names the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput

from ..predictions import check_prediction_type, split_learned_variance, to_x0_and_eps
from ..schedule import SPACINGS, alphas_cumprod_from_config, spaced_timesteps
from ..solver_coefficients import SolverRun, solver_plan
from ..solver_statistics import SolverStatistics, half_log_snr, logsnr_timesteps
from ..trajectory import validate_timesteps
from .solver_table import TABLE_FILE, SolverTable
from .table_file import TableFileMixin

LOGSNR = "logsnr"  # K points whose lambda runs from t = N-1 to t_last as lambda_0 + (lambda_last - lambda_0) u^(1/p)
FITTED = "fitted"  # the statistics' timesteps fitted for K, else the logsnr spacing
TIMESTEP_SPACINGS = (*SPACINGS, LOGSNR, FITTED)
HINT = ("DPMSolverV3Scheduler.from_table(statistics, config), the statistics from estimate_solver_statistics(...) or "
        "a table folder's SolverStatistics.load(folder)")


@dataclass
class DPMSolverV3SchedulerOutput(BaseOutput):
    """``prev_sample``: x at the next model call; ``pred_original_sample``: the clipped data prediction ``D``."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def _settings_from_statistics(state: SolverTable, kwargs: dict[str, Any]) -> None:
    """The statistics' prediction type and clip into ``kwargs``, refusing a contradicting argument."""
    recorded = state.prediction_type
    wanted = kwargs.get("prediction_type", recorded)
    if recorded is not None and wanted != recorded:
        raise ValueError(f"prediction_type={wanted!r}, but the statistics were estimated reading the model as "
                         f"{recorded!r}; leave prediction_type out, or estimate statistics for that reading.")
    if recorded is not None:
        kwargs["prediction_type"] = recorded
    lo_hi = state.data_range
    clip = lo_hi is not None
    if kwargs.get("clip_sample", clip) != clip:
        raise ValueError(f"clip_sample={kwargs['clip_sample']}, but the statistics were estimated with the data "
                         f"prediction {'clipped to ' + str(lo_hi) if clip else 'unclipped (no data range)'}: leave "
                         "clip_sample out, or estimate statistics with the other data range.")
    kwargs["clip_sample"] = clip
    if clip:
        if lo_hi[0] != -lo_hi[1]:
            raise ValueError(f"the statistics' data range {lo_hi} is not symmetric; clip_sample_range needs [-r, r].")
        kwargs["clip_sample_range"] = lo_hi[1]


class DPMSolverV3Scheduler(TableFileMixin, SchedulerMixin, ConfigMixin):
    """DPM-Solver-v3's multistep predictor-corrector with a model's statistics (module docstring).

    Build it with :meth:`from_table` and assign it to a pipeline (``DDIMPipeline`` replaces any scheduler in its
    ``__init__``: assign after construction): ``pipe.scheduler = DPMSolverV3Scheduler.from_table(statistics,
    pipe.scheduler.config)``. Deterministic: ``eta`` must be 0 and a generator is ignored.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas:
            The model's noise schedule, as in ``DDPMScheduler``; the statistics' schedule must be this one.
        prediction_type (`str`, defaults to `"epsilon"`):
            What the model predicts: ``"epsilon"``, ``"v_prediction"`` or ``"sample"`` (the statistics' own reading;
            2C-channel learned-variance outputs are cut to their first C channels).
        solver_order (`int`, defaults to 3):
            The predictor's order (1, 2 or 3; lower on the first steps, which lack history).
        use_corrector (`bool`, defaults to `True`):
            Redo each step with the model output at its end (one order more; no extra model call).
        lower_order_final (`bool`, defaults to `True`):
            Lower the order on the last steps (step i of K at most ``K - 1 - i``: the last one first order), as
            Diffusers' multistep solvers do. Without it, trajectories that end near t = 0 (``"leading"``, or many
            steps) lose accuracy several-fold on the bundled models.
        clip_sample (`bool`, defaults to `True`):
            Clip ``D`` to ``[-clip_sample_range, clip_sample_range]``: set by the statistics' data range (the clip
            they were estimated with).
        clip_sample_range (`float`, defaults to 1.0):
            The bound of that clip.
        timestep_spacing (`str`, defaults to `"fitted"`):
            ``"fitted"``: the timesteps fitted to this solver on the model for K (``statistics.fitted_timesteps``,
            :mod:`analytic_sampler.estimation.solver_timesteps`), else ``"logsnr"``
            (:func:`~analytic_sampler.solver_statistics.logsnr_timesteps` with ``logsnr_t_last`` and
            ``logsnr_power``); or Diffusers' ``"leading"``, ``"linspace"``, ``"trailing"`` (as DDIMScheduler gives
            them).
        steps_offset (`int`, defaults to 0):
            Added to ``"leading"`` timesteps.
        logsnr_t_last (`int`, *optional*):
            The last model call's timestep of the ``"logsnr"`` spacing; default ``round(num_train_timesteps / (5 K))``
            (40 of 1000 at K = 5, 8 at K = 25: a fixed end is a floor on the error as K grows, and the timesteps
            fitted for K = 3-10 end near this).
        logsnr_power (`float`, defaults to 2.5):
            Its exponent: larger puts more steps at high noise.
        table_file (`str`, defaults to `"dpm_solver_v3_statistics.json"`):
            The statistics file beside ``scheduler_config.json``.
        table_sha256 (`str`, *optional*):
            The SHA-256 of the statistics, set by :meth:`from_table`: the scheduler samples with the statistics of
            that checksum, read by ``from_pretrained`` or held by this process.
    """

    _compatibles: ClassVar[list[str]] = [e.name for e in KarrasDiffusionSchedulers]
    order = 1
    table_type = SolverTable
    table_file_name = TABLE_FILE
    table_hint = HINT

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        solver_order: int = 3,
        use_corrector: bool = True,
        lower_order_final: bool = True,
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
        timestep_spacing: str = FITTED,
        steps_offset: int = 0,
        logsnr_t_last: int | None = None,
        logsnr_power: float = 2.5,
        table_file: str = TABLE_FILE,
        table_sha256: str | None = None,
    ):
        self.table: SolverTable = self.held_table(table_sha256)
        check_prediction_type(prediction_type)
        if solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order={solver_order}; use 1, 2 or 3.")
        if logsnr_t_last is not None and not 0 <= logsnr_t_last <= num_train_timesteps - 2:
            raise ValueError(f"logsnr_t_last={logsnr_t_last}; use a timestep in [0, {num_train_timesteps - 2}], or "
                             "leave it out for round(num_train_timesteps / (5 K)).")
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing={timestep_spacing!r}; use one of {TIMESTEP_SPACINGS}, or "
                             "set_timesteps(timesteps=[...]).")
        abar = alphas_cumprod_from_config(self.config)
        self.statistics.check_schedule(abar)
        self.alphas_cumprod_64 = abar
        self.alphas_cumprod = torch.from_numpy(abar).float()
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.from_numpy(np.arange(num_train_timesteps)[::-1].copy())
        self.trajectory: list[int] = []
        self._run: SolverRun | None = None
        self._clip: tuple[float, float] | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None

    # ------------------------------------------------------------------ construction and files
    @classmethod
    def from_table(cls, statistics: SolverStatistics, scheduler_config=None, **kwargs) -> DPMSolverV3Scheduler:
        """Build from a model's :class:`~analytic_sampler.solver_statistics.SolverStatistics` and its scheduler
        config (``pipe.scheduler.config``, or the scheduler; default: the statistics' schedule is not recorded, so
        the config is needed). The statistics' schedule must be the config's; their prediction type and clip set the
        scheduler's (a contradicting argument is refused).

        Args:
            statistics (`SolverStatistics`):
                From :func:`~analytic_sampler.estimation.solver_statistics.estimate_solver_statistics` or
                ``SolverStatistics.load(table_folder)``.
            scheduler_config (`dict` or a scheduler):
                The model's scheduler config.
            **kwargs:
                Any option of :class:`DPMSolverV3Scheduler`.
        """
        if scheduler_config is None:
            raise ValueError("pass the model's scheduler config: from_table(statistics, pipe.scheduler.config).")
        if hasattr(scheduler_config, "config") and not isinstance(scheduler_config, Mapping):
            scheduler_config = scheduler_config.config
        config = dict(scheduler_config)
        statistics.check_schedule(alphas_cumprod_from_config(config))
        state = SolverTable.from_statistics(statistics).hold()  # (this local holds it until the scheduler does)
        _settings_from_statistics(state, kwargs)
        for key in ("timestep_spacing", "clip_sample", "clip_sample_range", "prediction_type", "table_file"):
            if key not in kwargs:
                config.pop(key, None)  # this scheduler's own default (a DDPM config's spacing is not ours)
        return cls.from_config(config, table_sha256=state.sha256, **kwargs)

    @property
    def statistics(self) -> SolverStatistics:
        """The statistics the scheduler samples with (its table's, without standard errors)."""
        return self.table.statistics

    # ------------------------------------------------------------------ Diffusers scheduler API
    @property
    def step_index(self) -> int | None:
        """Index into ``timesteps`` of the next ``step``; ``None`` before the first one and after the last."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next loop at ``timesteps[begin_index]``; ``set_timesteps`` clears it."""
        self._begin_index = begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        return sample

    def _spaced(self, num_steps: int) -> list[int]:
        n, spacing = self.config.num_train_timesteps, self.config.timestep_spacing
        fitted = self.statistics.fitted_timesteps.get(str(num_steps))
        if spacing == FITTED and fitted is not None:
            return list(fitted)
        if spacing in (LOGSNR, FITTED):  # a fitted spacing without timesteps for this K
            if num_steps == 1:
                return [n - 1]
            t_last = self.config.logsnr_t_last
            t_last = round(n / (5 * num_steps)) if t_last is None else t_last
            return logsnr_timesteps(self.alphas_cumprod_64, num_steps, t_last,
                                    self.config.logsnr_power)
        return spaced_timesteps(n, num_steps, spacing, self.config.steps_offset)

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[int] | None = None) -> None:
        """Choose the K model calls (``num_inference_steps`` of the config's spacing, or explicit descending
        ``timesteps``) and precompute every step's coefficients (float64, on ``device``)."""
        n = self.config.num_train_timesteps
        if timesteps is not None:
            if num_inference_steps is not None:
                raise ValueError("pass either num_inference_steps or timesteps, not both.")
            trajectory = validate_timesteps(timesteps, n, min_steps=1)
        elif num_inference_steps is None:
            raise ValueError("set_timesteps needs num_inference_steps (K) or an explicit list of timesteps.")
        else:
            trajectory = self._spaced(num_inference_steps)
        lambdas = half_log_snr(self.alphas_cumprod_64)[trajectory]
        plan = solver_plan(self.statistics, lambdas, self.config.solver_order, self.config.use_corrector,
                           self.config.lower_order_final)
        device = torch.device(device or "cpu")
        work = torch.float32 if device.type == "mps" else torch.float64

        def tensor(a) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=work)

        self._run = SolverRun(plan.to(tensor))
        self._clip = None
        if self.config.clip_sample:
            self._clip = (-self.config.clip_sample_range, self.config.clip_sample_range)
        self.trajectory = trajectory
        self.num_inference_steps = len(trajectory)
        self.timesteps = torch.tensor(trajectory, dtype=torch.int64, device=device)
        self._step_index = self._begin_index = None

    def _start_index(self, timestep) -> int:
        if self._step_index is not None:
            return self._step_index
        if self._begin_index is not None:
            return self._begin_index
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
    ) -> DPMSolverV3SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One model call's step: ``x`` at the next timestep of the trajectory (the data prediction after the last).
        Arguments in ``DDIMScheduler.step``'s order; ``eta`` must be 0 (or ``None``), ``use_clipped_model_output``,
        ``generator`` and ``variance_noise`` are accepted and unused (the solver draws no noise)."""
        if eta:
            raise ValueError(f"eta={eta}: DPM-Solver-v3 is an ODE solver (deterministic); sample with eta=0.")
        if self._run is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step().")
        i = self._start_index(timestep)
        plan = self._run.plan
        x = sample.to(plan.alpha.dtype)
        alpha = plan.alpha[i]
        prediction, _ = split_learned_variance(model_output, sample)
        d, _ = to_x0_and_eps(prediction.to(x.dtype), x, alpha, (1 - alpha**2).sqrt(), self.config.prediction_type)
        if self._clip is not None:
            d = d.clamp(*self._clip)
        prev = self._run.advance(i, x, d)
        self._step_index = i + 1 if i + 1 < len(self.trajectory) else None
        prev, d = prev.to(sample.dtype), d.to(sample.dtype)
        return DPMSolverV3SchedulerOutput(prev, d) if return_dict else (prev, d)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(abar[t]) x0 + sqrt(1 - abar[t]) noise`` (img2img and training)."""
        abar = self.alphas_cumprod.to(device=original_samples.device, dtype=original_samples.dtype)[timesteps]
        abar = abar.reshape(-1, *([1] * (original_samples.ndim - 1)))
        return abar.sqrt() * original_samples + (1 - abar).sqrt() * noise

    def __len__(self) -> int:
        return self.config.num_train_timesteps

