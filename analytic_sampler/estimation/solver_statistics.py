"""The Monte Carlo pass behind DPM-Solver-v3: the sums that give ``l, s, b``
(:class:`~analytic_sampler.solver_statistics.SolverStatistics`) on a grid of training timesteps.

Work list: every (draw, grid point) pair, pair ``i`` -> grid point ``i % G``, draw ``r = i // G`` of image
``r % images`` (the first ``images`` of the data, reused with fresh noise when the draws outnumber them), group
``r % groups`` (for the jackknife), cut into batches; the noise of batch ``b`` comes from the generator seeded with
``(seed, b)``, as in :mod:`~analytic_sampler.estimation.moments`, whose loop (:func:`~.moments.accumulate`:
checkpoints, resume, the distributed gather in batch order) runs this pass too. So the statistics, like the table,
do not depend on the number of processes.

Per pair, with ``x = alpha x0 + sigma n`` at grid timestep ``t`` and ``D = clip(x0_hat(x, t))``, three model calls:
``D`` itself, then ``D`` at two neighbouring training timesteps ``t_1, t_2`` (half log-SNR offsets ``e_1, e_2`` of
about ``fd_step``: one on each side, both on one side at the ends of the schedule) at the ODE's Euler positions
``x + e_k v``, ``v = alpha (D - alpha x)``; their three-point derivative ::

    D1 = w_0 D + w_1 D(x + e_1 v, t_1) + w_2 D(x + e_2 v, t_2),
    w_1 = e_2 / (e_1 (e_2 - e_1)),  w_2 = -e_1 / (e_2 (e_2 - e_1)),  w_0 = -(w_1 + w_2)

is dD/dlambda along the ODE up to O(e^2) (the Euler positions' O(e^2) error cancels: the weights annul any quadratic).
A finite difference at the scale of the solver's steps, not the derivative at a point, because the bundled models are
rough in t at the scale of one training timestep (a trained-on-integers time embedding): their pointwise
derivative along the ODE is 2-5 times off the slope over +-0.2 in lambda, while differences at 0.02-0.2 give the
same solver (docs/dpm-solver-v3.md). No gradients are needed: ``l`` comes from Stein's identity.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._version import __version__
from ..options import options_of
from ..predictions import x0_from_eps
from ..schedule import as_alphas_cumprod
from ..solver_statistics import MOMENTS, SolverStatistics, half_log_snr, statistics_grid
from .data import folder_files
from .distributed import rank_path, world_rank
from .latents import PipelineOptions
from .moments import (
    EstimateOptions,
    MonteCarloPlan,
    _batch_kwargs,
    _batch_noise,
    _check_finite,
    _differences,
    _fold,
    _read_checkpoint,
    accumulate,
    discard_other_checkpoint,
    prepare_estimate,
    run_key,
)
from .precompute import Precomputed, _remove, _run_differences, checkpoint_path

CHECKPOINT_NAME = "solver_statistics.pt"  # beside the table's checkpoint (outside the folders users upload)
PASS = "solver statistics 1"  # in the run key: a checkpoint of another pass or version is never resumed
PER = ("pixel", "channel", "auto")


@dataclass(frozen=True)
class StatisticsOptions:
    """What the statistics pass draws.

    Args:
        grid_points (`int`, defaults to 120):
            Grid points, uniform in lambda over the schedule (rounded to distinct training timesteps).
        num_samples (`int`, defaults to 1024):
            Draws per grid point (each: a data image and fresh noise).
        fd_step (`float`, defaults to 0.1):
            The half log-SNR offset of the finite difference for ``dD/dlambda`` (snapped to training timesteps).
        groups (`int`, defaults to 8):
            Interleaved groups of draws (at least 2), for the jackknife standard errors and the ridge of ``s``.
        per (`str`, defaults to `"auto"`):
            ``"pixel"``: one ``l, s, b`` per sample entry; ``"channel"``: one per channel (pooled over positions);
            ``"auto"``: per pixel for data with a range, per channel without (latents).
        batch_size (`int`, defaults to 256):
            (draw, grid point) pairs per batch; each costs three model calls.
        seed (`int`, defaults to 0):
            Seeds the noise of every batch.
        num_images (`int`, *optional*):
            Images drawn from (the first of the data); default: as many as there are draws, at most what the data
            holds (a tensor's rows, a folder's image files).
    """

    grid_points: int = 120
    num_samples: int = 1024
    fd_step: float = 0.1
    groups: int = 8
    per: str = "auto"
    batch_size: int = 256
    seed: int = 0
    num_images: int | None = None

    def __post_init__(self):
        if min(self.grid_points - 1, self.num_samples, self.groups - 1, self.batch_size) < 1:
            raise ValueError("grid_points and groups must be at least 2, num_samples and batch_size at least 1.")
        if self.num_samples < 2 * self.groups:
            raise ValueError(f"num_samples={self.num_samples} gives fewer than 2 draws per group ({self.groups} "
                             "groups); raise num_samples or lower groups.")
        if not 0 < self.fd_step <= 1:
            raise ValueError(f"fd_step={self.fd_step}: a half log-SNR offset in (0, 1] (0.1 by default).")
        if self.per not in PER:
            raise ValueError(f"per={self.per!r}; use one of {PER}.")


def fd_stencil(lambdas: np.ndarray, t: int, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Two training timesteps about ``step`` in lambda from ``t`` (one each side; both on one side at the ends), and
    the three-point weights ``(w_0, w_1, w_2)`` of dD/dlambda at ``t`` (module docstring)."""
    n, lam = lambdas.size, lambdas[t]

    def nearest(target: float, allowed: np.ndarray) -> int:
        return int(allowed[np.argmin(np.abs(lambdas[allowed] - target))])

    earlier, later = np.arange(t + 1, n), np.arange(0, t)  # lower lambda (more noise), higher lambda
    if earlier.size and later.size:
        pair = [nearest(lam - step, earlier), nearest(lam + step, later)]
    else:
        side, sign = (later, 1.0) if later.size else (earlier, -1.0)
        first = nearest(lam + sign * step, side)
        pair = [first, nearest(lam + sign * 2 * step, side[side != first])]
    e1, e2 = lambdas[pair] - lam
    w1, w2 = e2 / (e1 * (e2 - e1)), -e1 / (e2 * (e2 - e1))
    return np.array(pair, dtype=np.int64), np.array([-(w1 + w2), w1, w2])


def _available_images(data: Any, wanted: int) -> int:
    """``wanted``, or fewer where ``data`` holds fewer (a tensor's rows, a folder's image files)."""
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return min(wanted, int(data.shape[0]))
    if isinstance(data, (str, os.PathLike)) and os.path.isdir(data):
        return min(wanted, len(folder_files(os.fspath(data))))
    return wanted


@dataclass
class StatisticsPlan:
    """One statistics pass, in the terms :func:`~analytic_sampler.estimation.moments.accumulate` asks of a plan:
    the moments pass's plan for its sample source, model and noise (``base``), and the grid and stencils."""

    base: MonteCarloPlan
    options: StatisticsOptions
    grid: np.ndarray  # (G,) descending timesteps
    stencil: np.ndarray  # (G, 2) neighbouring timesteps of each grid point
    weights: np.ndarray  # (G, 3) finite-difference weights
    per_channel: bool
    description = "estimating solver statistics (l, s, b)"

    @property
    def adapter(self):
        return self.base.adapter

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def num_images(self) -> int:
        return self.base.num_samples

    @property
    def num_pairs(self) -> int:
        return self.grid.size * self.options.num_samples

    @property
    def num_batches(self) -> int:
        return -(-self.num_pairs // self.options.batch_size)

    @property
    def num_features(self) -> int:
        shape = self.base.sample_shape
        return shape[0] if self.per_channel else int(np.prod(shape))

    @property
    def num_rows(self) -> int:
        return len(MOMENTS) * self.num_features

    @property
    def num_columns(self) -> int:
        return self.grid.size * self.options.groups

    def empty_sums(self) -> torch.Tensor:
        return torch.zeros(self.num_rows, self.num_columns, dtype=torch.float64)

    def check_finite(self, sums: torch.Tensor) -> None:
        _check_finite(sums, np.tile(self.grid, self.options.groups))

    @cached_property
    def tables(self) -> dict[str, torch.Tensor]:
        """Per grid point on the device: ``sqrt(abar)``, ``sqrt(1 - abar)`` and the timestep of the point and its two
        neighbours, the neighbours' lambda offsets and the stencil's weights."""
        abar = self.base.alphas_cumprod
        points = np.concatenate([self.grid[:, None], self.stencil], 1)  # (G, 3)
        lam = half_log_snr(abar)
        values = {"alpha": np.sqrt(abar[points]), "sigma": np.sqrt(1.0 - abar[points]), "weights": self.weights,
                  "offsets": lam[self.stencil] - lam[self.grid, None], "timesteps": points}
        return {k: torch.from_numpy(v).to(self.device) for k, v in values.items()}

    def batch_sums(self, b: int, fast) -> torch.Tensor:
        """The sums of batch ``b``: rows ``MOMENTS x features``, columns ``group x grid point``, float64."""
        base, g = self.base, self.grid.size
        lo, hi = b * self.options.batch_size, min((b + 1) * self.options.batch_size, self.num_pairs)
        pair = torch.arange(lo, hi, device=self.device)
        j, draw = pair % g, pair // g
        x0, kwargs = self._images(draw)
        work = base.work_dtype
        noise = _batch_noise(tuple(x0.shape), self.options.seed, b, base.noise_source, self.device, work)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        tab = self.tables
        alpha, sigma = (tab[k][j].to(work).view(-1, 3, *shape[1:]) for k in ("alpha", "sigma"))
        x = alpha[:, 0] * x0 + sigma[:, 0] * noise
        d = self._predict(fast, x, tab["timesteps"][j, 0], alpha[:, 0], sigma[:, 0], kwargs)
        offsets = tab["offsets"][j].to(work).view(-1, 2, *shape[1:])
        v = alpha[:, 0] * (d - alpha[:, 0] * x)
        moved = (x.unsqueeze(1) + offsets * v.unsqueeze(1)).transpose(0, 1).flatten(0, 1)  # neighbour-major
        both = {k: torch.cat([w, w]) if isinstance(w, torch.Tensor) and w.shape[:1] == x.shape[:1] else w
                for k, w in kwargs.items()}
        near = self._predict(fast, moved, tab["timesteps"][j, 1:].T.flatten(), alpha[:, 1:].transpose(0, 1).flatten(0, 1),
                             sigma[:, 1:].transpose(0, 1).flatten(0, 1), both).view(2, *x.shape)
        w = tab["weights"][j].to(work).view(-1, 3, *shape[1:])
        d1 = w[:, 0] * d + w[:, 1] * near[0] + w[:, 2] * near[1]
        u = x / alpha[:, 0]
        values = (u, d, d1, u * u, d * d, u * d, d1 * u, d1 * d, noise * (d - x0))
        rows = torch.cat([self._features(v_) for v_ in values], 1).double().T  # (rows, pairs)
        return _fold(rows, lo, g * self.options.groups)

    def _features(self, value: torch.Tensor) -> torch.Tensor:
        """``(pairs, features)``: each entry, or each channel's sum over positions."""
        return value.flatten(2).sum(2) if self.per_channel else value.flatten(1)

    def _predict(self, fast, x, t, alpha, sigma, kwargs) -> torch.Tensor:
        """``D``: the model's x0 prediction at ``(x, t)``, clipped to the data range where one is declared."""
        base = self.base
        call = fast if x.shape[0] == self.options.batch_size else base.adapter
        eps = call(x if base.dtype is None else x.to(base.dtype), t, **kwargs).to(x.dtype)
        x0 = x0_from_eps(eps, x, alpha, sigma)
        return x0 if base.data_range is None else x0.clamp(*base.data_range)

    def _images(self, draw: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """The data images of the draws (image ``draw % images``) and their model kwargs, on the device."""
        base, n = self.base, self.num_images
        image = (draw % n).cpu()
        parts, kwargs_parts = [], []
        first = 0
        for cut in [*np.flatnonzero(np.diff(image.numpy()) < 0) + 1, image.numel()]:  # contiguous runs of images
            run = image[first:cut]
            x0, per_sample, shared = base.source.window(int(run[0]), int(run[-1]))
            rows = (run - run[0]).to(self.device)
            parts.append(x0.to(device=self.device, dtype=base.work_dtype)[rows])
            kwargs_parts.append({**_batch_kwargs(*base.user_kwargs, run.to(self.device), self.device, base.dtype),
                                 **_batch_kwargs(per_sample, shared, rows, self.device, base.dtype)})
            first = cut
        kwargs = {k: torch.cat([p[k] for p in kwargs_parts]) if isinstance(v, torch.Tensor) else v
                  for k, v in kwargs_parts[0].items()}
        return torch.cat(parts), kwargs


def prepare_statistics(model, data, scheduler_or_alphas_cumprod, options: StatisticsOptions,
                       estimate_options: EstimateOptions, pipeline_options: PipelineOptions
                       ) -> tuple[StatisticsPlan, dict[str, Any]]:
    """The plan of a statistics pass and its run key: the moments pass's plan and key
    (:func:`~analytic_sampler.estimation.moments.prepare_estimate`, :func:`~.moments.run_key`) for its images, the
    grid as timesteps, batch and seed, with this pass's own fields."""
    schedule = scheduler_or_alphas_cumprod if scheduler_or_alphas_cumprod is not None else \
        getattr(model, "scheduler", None)
    if schedule is None:
        raise ValueError("pass the model's noise schedule: its scheduler, scheduler config or alphas_cumprod.")
    grid = statistics_grid(as_alphas_cumprod(schedule), options.grid_points)
    images = options.num_images or _available_images(data, options.num_samples)
    base = prepare_estimate(model, data, scheduler_or_alphas_cumprod, images, grid, options.batch_size, options.seed,
                            estimate_options, pipeline_options)
    lambdas = half_log_snr(base.alphas_cumprod)
    grid = base.timesteps[::-1].copy()
    stencils = [fd_stencil(lambdas, int(t), options.fd_step) for t in grid]
    per_channel = options.per == "channel" or (options.per == "auto" and base.data_range is None)
    if per_channel and len(base.sample_shape) < 2:
        raise ValueError("per='channel' needs samples with a channel axis (C, ...); use per='pixel'.")
    plan = StatisticsPlan(base, options, grid, np.stack([s[0] for s in stencils]), np.stack([s[1] for s in stencils]),
                          per_channel)
    key = {**run_key(base), "pass": PASS, "draws": options.num_samples, "fd_step": options.fd_step,
           "groups": options.groups, "per": "channel" if per_channel else "pixel"}
    return plan, key


def build_statistics(plan: StatisticsPlan, key: dict[str, Any], sums: torch.Tensor,
                     provenance: dict[str, Any] | None) -> SolverStatistics:
    """The statistics of the summed moments, with the run's provenance."""
    base, opts, g = plan.base, plan.options, plan.grid.size
    table = sums.cpu().numpy().reshape(len(MOMENTS), plan.num_features, opts.groups, g).transpose(2, 3, 0, 1)
    entries = int(np.prod(base.sample_shape[1:])) if plan.per_channel else 1
    draws = np.bincount(np.arange(opts.num_samples) % opts.groups, minlength=opts.groups)
    counts = np.repeat((draws * entries)[:, None], g, 1)
    shape = (base.sample_shape[0], *([1] * (len(base.sample_shape) - 1))) if plan.per_channel else base.sample_shape
    adapter = base.adapter
    record = {
        "model_fingerprint": base.model_fingerprint, "prediction_type": adapter.prediction_type,
        "timestep_shift": adapter.timestep_shift, "timestep_scale": adapter.timestep_scale,
        "guidance_scale": adapter.guidance_scale, "sample_shape": list(base.sample_shape),
        "data_range": None if base.data_range is None else list(base.data_range), "per": key["per"],
        "fd_step": opts.fd_step, "groups": opts.groups, "seed": opts.seed, "images": plan.num_images,
        "batch_size": opts.batch_size, "model_calls": 3 * plan.num_pairs, "package_version": __version__,
        **base.names, **(provenance or {}), "run_key": key,
    }
    return SolverStatistics.from_sums(table, counts, plan.grid, base.alphas_cumprod, shape, opts.num_samples, record)


def estimate_solver_statistics(
    model,
    data,
    scheduler_or_alphas_cumprod=None,
    options: StatisticsOptions | None = None,
    estimate_options: EstimateOptions | None = None,
    pipeline_options: PipelineOptions | None = None,
) -> SolverStatistics:
    """Estimate DPM-Solver-v3's statistics ``l, s, b`` of a model (:mod:`analytic_sampler.solver_statistics`):
    ``grid points x num_samples`` draws, three model calls each (module docstring).

    Args:
        model, data, scheduler_or_alphas_cumprod:
            As in :func:`~analytic_sampler.estimate_moments` (a UNet, an adapter, a callable, or a latent pipeline
            with its images).
        options (:class:`StatisticsOptions`, *optional*):
            The grid, draws, finite-difference step, groups, per pixel or channel, batch and seed.
        estimate_options (:class:`~analytic_sampler.EstimateOptions`, *optional*):
            How the pass runs, as for :func:`~analytic_sampler.estimate_moments` (device, dtype, noise device,
            compilation, data range, prediction type, model kwargs, checkpoint, progress, provenance, model and data
            ids), with the same rules: a checkpoint of this very run resumes, bit for bit, and any number of
            processes gives the same statistics.
        pipeline_options (:class:`~analytic_sampler.PipelineOptions`, *optional*):
            Latent pipelines only: prompts or captions, guidance, the VAE latent.

    Example:

    ```py
    >>> import torch
    >>> from analytic_sampler import EstimateOptions
    >>> from analytic_sampler.estimation.solver_statistics import StatisticsOptions, estimate_solver_statistics
    >>> from analytic_sampler.pretrained import load_pretrained

    >>> model = load_pretrained("digits-ddpm-linear", with_table=False)
    >>> images = torch.rand(8, 1, 8, 8) * 2 - 1  # your training images in [-1, 1]
    >>> stats = estimate_solver_statistics(model.unet, images, model.scheduler,
    ...                                    StatisticsOptions(grid_points=4, num_samples=16),
    ...                                    EstimateOptions(progress=False))
    >>> stats.timesteps.tolist(), stats.l.shape
    ([999, 603, 73, 0], (4, 1, 8, 8))

    ```
    """
    options = options_of(options, StatisticsOptions)
    estimate_options = options_of(estimate_options, EstimateOptions, "estimate_options")
    plan, key = prepare_statistics(model, data, scheduler_or_alphas_cumprod, options, estimate_options,
                                   options_of(pipeline_options, PipelineOptions, "pipeline_options"))
    sums = accumulate(plan, key, estimate_options)
    return build_statistics(plan, key, sums, estimate_options.provenance)


def _of_this_run(checkpoint: Path, key: dict[str, Any]) -> bool:
    """Whether ``checkpoint`` is a readable checkpoint of the run ``key``."""
    try:
        state = _read_checkpoint(str(checkpoint))
    except ValueError:
        return False
    return state is not None and not _differences(state, key)


def precompute_solver_statistics(
    model,
    data,
    scheduler_or_alphas_cumprod=None,
    options: StatisticsOptions | None = None,
    estimate_options: EstimateOptions | None = None,
    pipeline_options: PipelineOptions | None = None,
    *,
    out: str | os.PathLike,
    overwrite: bool = False,
    keep_checkpoint: bool = False,
) -> Precomputed:
    """Estimate the statistics into the folder ``out`` (a table's: its own two files beside the table's), with the
    rules of :func:`~analytic_sampler.estimation.precompute.precompute_table`: the statistics of this very run
    already there are returned as they are (``"unchanged"``), those of another run are refused unless ``overwrite``,
    and the run checkpoints beside the folder (``solver_statistics.pt`` next to the table's checkpoint) and resumes.

    Args:
        model, data, scheduler_or_alphas_cumprod, options, estimate_options, pipeline_options:
            As in :func:`estimate_solver_statistics` (``estimate_options.checkpoint`` defaults to the one beside
            ``out``).
        out (`str` or `os.PathLike`):
            The folder (created if missing).
        overwrite (`bool`, defaults to `False`):
            Replace statistics of another run in ``out``.
        keep_checkpoint (`bool`, defaults to `False`):
            Keep the checkpoint after the statistics are written.

    Returns:
        :class:`~analytic_sampler.estimation.precompute.Precomputed` with the statistics as ``table``.
    """
    options = options_of(options, StatisticsOptions)
    estimate_options = options_of(estimate_options, EstimateOptions, "estimate_options")
    folder = Path(out)
    checkpoint = Path(estimate_options.checkpoint or checkpoint_path(folder).with_name(CHECKPOINT_NAME))
    estimate_options = replace(estimate_options, checkpoint=checkpoint)
    plan, key = prepare_statistics(model, data, scheduler_or_alphas_cumprod, options, estimate_options,
                                   options_of(pipeline_options, PipelineOptions, "pipeline_options"))
    rank, world = world_rank()
    mine = Path(rank_path(str(checkpoint), rank))
    found = SolverStatistics.find(folder) if folder.is_dir() else None
    if found is not None:
        diffs = _run_differences(found.provenance.get("run_key"), key)
        if not diffs:
            if not keep_checkpoint and _of_this_run(mine, key):
                _remove(mine)  # kept by an earlier run of these settings, whose statistics are written
            return Precomputed(found, "unchanged", folder)
        if not overwrite:
            raise ValueError(f"{folder} already holds solver statistics of another run ({'; '.join(diffs)}); pass "
                             "overwrite=True (on the command line: --overwrite) to replace them.")
    if overwrite and discard_other_checkpoint(mine, key):
        warnings.warn(f"deleted the checkpoint {mine} of another run (overwrite)", stacklevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    statistics = build_statistics(plan, key, accumulate(plan, key, estimate_options), estimate_options.provenance)
    if rank == 0:
        statistics.save(folder)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # the statistics are written before any checkpoint goes
    if not keep_checkpoint:
        _remove(mine)
    return Precomputed(statistics, "estimated", folder)
