"""A K-step trajectory chosen for samples, by exact dynamic programming on a Monte Carlo discretisation cost.

A sampler that holds the model's x0 prediction fixed over each interval ``t_{k-1} < tau <= t_k`` of its trajectory
(DDPM, DDIM and Analytic-DPM steps all do) differs from the reverse diffusion by at most (Girsanov; the derivation in
this project's indexing is in ``docs/sample-trajectory.md``)::

    KL <= sum_k D(t_{k-1}, t_k),    D(s, t) = (d/2) int_{snr[t]}^{min(snr[s], snr_max)} S(tau, t) dsnr(tau)
    S(tau, t) = E || x0_hat(x_tau, tau) - x0_hat(x_t, t) ||^2 / d,    snr = abar / (1 - abar)

with the expectation along forward noise paths ``x0 -> x_tau -> x_t`` (``x_t = sqrt(abar_t/abar_tau) x_tau +
sqrt(1 - abar_t/abar_tau) z``). ``snr_max = 1 / sigma_min^2`` truncates the bound at the noise level ``sigma_min`` (in
data units): detail finer than that is not counted, as Align Your Steps integrates from its sigma_min. The last point
``t_1`` returns ``x0_hat(x_{t_1})``: its interval runs down to ``t = 0``.

One pass of ``num_paths x G`` model calls on a grid of G candidate timesteps estimates the whole matrix ``S``
(:func:`estimate_sample_cost`); it is stored with the variance table. ``D`` is additive over intervals but not Monge,
so the trajectory comes from the dense O(K G^2) DP of :func:`analytic_sampler.trajectory.solve_dense`, exact on the
grid: a K-step trajectory is a path of K + 1 grid points from ``N-1`` to ``0`` whose last point (t = 0) is not a model
call. :func:`apply_timesteps` runs any trajectory on any Diffusers scheduler that can take one.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .adapter import EpsilonAdapter
from .data import check_range, take_samples
from .predictions import to_x0_and_eps
from .schedule import as_alphas_cumprod, schedule_fingerprint, signal_to_noise
from .trajectory import solve_dense, validate_timesteps

DEFAULT_CANDIDATES = 250  # grid points: a (250, 250) float64 matrix (0.5 MB) beside the table
DEFAULT_PATHS = 64
DEFAULT_SIGMA_MIN = 0.3
CHECKPOINT_FORMAT = 1


def candidate_timesteps(num_train_timesteps: int, count: int = DEFAULT_CANDIDATES) -> np.ndarray:
    """``round(linspace(0, N-1, count))`` without repeats, ascending: the grid the DP chooses from."""
    if count < 3:
        raise ValueError(f"candidates={count}: the grid needs at least 3 timesteps (0, one inside and N-1).")
    return np.unique(np.linspace(0, num_train_timesteps - 1, min(count, num_train_timesteps)).round().astype(np.int64))


@dataclass
class SampleCost:
    """The Monte Carlo estimate behind the sample-quality trajectory: ``x0_msd[i, j] = S(timesteps[i], timesteps[j])``,
    symmetric ``(G, G)`` float64, on the ascending grid ``timesteps`` (from 0 to N-1), from ``num_paths`` paths."""

    timesteps: np.ndarray
    x0_msd: np.ndarray
    num_paths: int

    def __post_init__(self):
        self.timesteps = np.asarray(self.timesteps, dtype=np.int64)
        self.x0_msd = np.asarray(self.x0_msd, dtype=np.float64)
        g = self.timesteps.size
        if g < 3 or self.timesteps[0] != 0 or np.any(np.diff(self.timesteps) <= 0):
            raise ValueError("the sample cost's timesteps must ascend from 0 with at least 3 entries; re-estimate it.")
        if self.x0_msd.shape != (g, g) or not np.isfinite(self.x0_msd).all() or np.any(self.x0_msd < 0):
            raise ValueError(f"x0_msd must be a finite, non-negative ({g}, {g}) matrix; re-estimate the sample cost.")

    @classmethod
    def from_table(cls, table) -> SampleCost:
        """The cost a :class:`~analytic_sampler.VarianceTable` carries, or a ValueError naming how to add it."""
        if table.path_timesteps is None:
            raise ValueError(
                "this variance table has no sample cost (the sample-quality trajectory needs one); add it with "
                "`analytic-sampler precompute MODEL --data DATA --out DIR` (the path pass runs after the moments) or "
                "table = table.with_sample_cost(estimate_sample_cost(model, images, scheduler))."
            )
        return cls(table.path_timesteps, table.path_x0_msd, table.path_samples)

    def interval_costs(self, alphas_cumprod, sigma_min: float | None = DEFAULT_SIGMA_MIN) -> np.ndarray:
        """``(G, G)`` matrix ``D(s, t) / d`` (nats per dimension) for grid indices ``s < t``, 0 elsewhere.

        The integral runs in the forward path's own variable ``v = 1 / snr`` (``dsnr = dv / v^2``), with ``S``
        linear in v between grid points, each piece integrated exactly (``sigma_min``: v clipped below at
        ``sigma_min^2``; ``None``: no truncation)."""
        v = 1.0 / signal_to_noise(as_alphas_cumprod(alphas_cumprod))[self.timesteps]
        if sigma_min is not None:
            if not sigma_min > 0:
                raise ValueError(f"sigma_min={sigma_min} must be positive (a noise level in data units), or None.")
            v = np.maximum(v, sigma_min**2)
        lo, width = v[:-1], np.diff(v)
        ratio = width / lo
        with np.errstate(divide="ignore", invalid="ignore"):  # a piece below sigma_min has width 0 and no weight
            near = np.where(width > 0, (ratio - np.log1p(ratio)) / width, 0.0)  # weight of S at the piece's low end
            far = np.where(width > 0, (np.log1p(ratio) - ratio / (1 + ratio)) / width, 0.0)
        pieces = near[:, None] * self.x0_msd[:-1] + far[:, None] * self.x0_msd[1:]  # piece [grid l, l+1], held at t
        g = self.timesteps.size
        pieces[np.arange(g - 1)[:, None] >= np.arange(g)[None, :]] = 0.0
        cost = np.zeros((g, g))
        cost[:-1] = 0.5 * np.flip(np.cumsum(np.flip(pieces, 0), 0), 0)  # sum over pieces s <= l < t
        return cost


class SampleTrajectoryDP:
    """One DP pass on ``cost.interval_costs(...)`` up to ``max_steps`` model calls; ``path(K)``, ``cost(K)``."""

    def __init__(self, alphas_cumprod, cost: SampleCost, max_steps: int, sigma_min: float | None = DEFAULT_SIGMA_MIN):
        self.abar = as_alphas_cumprod(alphas_cumprod)
        self.grid = cost.timesteps
        if self.grid[-1] != self.abar.size - 1:
            raise ValueError(
                f"the sample cost's grid ends at t={self.grid[-1]} but the schedule has N={self.abar.size}; "
                "estimate it for this model's schedule."
            )
        if not 1 <= max_steps < self.grid.size:
            raise ValueError(f"max_steps={max_steps} must be between 1 and {self.grid.size - 1} (grid size - 1); "
                             "estimate the sample cost on a finer grid (more candidates) for more steps.")
        self.max_steps, self.sigma_min = int(max_steps), sigma_min
        self.intervals = cost.interval_costs(self.abar, sigma_min)
        total, self._argmin = solve_dense(torch.from_numpy(self.intervals.T.copy()), self.max_steps + 1)
        self._total, self._argmin = total.numpy(), self._argmin.numpy()

    def path(self, num_steps: int) -> list[int]:
        """The K model-call timesteps, descending from N-1; the sampler returns x0_hat at the last one."""
        k = int(num_steps)
        if not 1 <= k <= self.max_steps:
            raise ValueError(f"num_steps={k} must be between 1 and max_steps={self.max_steps} of this DP.")
        points = [self.grid.size - 1]
        for level in range(k + 1, 1, -1):
            points.append(int(self._argmin[level, points[-1]]))
        return self.grid[points[:-1]].tolist()

    def cost(self, num_steps: int) -> float:
        """The bound ``sum_k D / d`` (nats per dimension) along ``path(num_steps)``."""
        self.path(num_steps)
        return float(self._total[int(num_steps) + 1, -1])

    def trajectory_cost(self, timesteps) -> float:
        """The same bound for any descending trajectory whose points lie on the grid (ValueError otherwise)."""
        ts = validate_timesteps(timesteps, self.abar.size) if len(timesteps) > 1 else [int(t) for t in timesteps]
        index = np.searchsorted(self.grid, ts)
        if np.any(index >= self.grid.size) or np.any(self.grid[np.minimum(index, self.grid.size - 1)] != ts):
            raise ValueError(f"timesteps {ts[:6]}… are not all on the cost's grid of {self.grid.size} candidates.")
        points = [*index.tolist(), 0]
        return float(sum(self.intervals[s, t] for t, s in zip(points, points[1:])))


def sample_quality_trajectory(table, num_steps: int, sigma_min: float | None = DEFAULT_SIGMA_MIN) -> list[int]:
    """The K-step sample-quality trajectory of a :class:`~analytic_sampler.VarianceTable` that carries a sample cost;
    pass it as ``scheduler.set_timesteps(timesteps=...)`` or :func:`apply_timesteps`."""
    return SampleTrajectoryDP(table.alphas_cumprod, SampleCost.from_table(table), num_steps, sigma_min).path(num_steps)


def _forward_path(x0: torch.Tensor, abar_grid: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``(P, G, ...)`` states of the forward chain on the grid: ``x_{g_j} = sqrt(r_j) x_{g_{j-1}} + sqrt(1-r_j) z_j``,
    ``r_j = abar[g_j] / abar[g_{j-1}]`` (``abar[g_{-1}] = 1``), in float64."""
    ratio = abar_grid / torch.cat([abar_grid.new_ones(1), abar_grid[:-1]])
    noise = torch.randn((x0.shape[0], ratio.numel(), *x0.shape[1:]), generator=generator, dtype=torch.float64)
    states, x = torch.empty_like(noise), x0.double()
    for j, r in enumerate(ratio):
        x = r.sqrt() * x + (1 - r).sqrt() * noise[:, j]
        states[:, j] = x
    return states


def _load_checkpoint(path: str, run: dict[str, Any]) -> tuple[int, torch.Tensor] | None:
    if not os.path.exists(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved, done, gram = state["run"], int(state["paths_done"]), state["gram"]
    except Exception as err:  # any unreadable or foreign file
        raise ValueError(f"sample-cost checkpoint {path} is unreadable ({type(err).__name__}); delete it to start "
                         "over.") from err
    if state.get("format") != CHECKPOINT_FORMAT or saved != run:
        raise ValueError(f"sample-cost checkpoint {path} belongs to a run with other settings; delete it to start "
                         "over, or rerun with the same settings to resume.")
    return done, gram


def _save_checkpoint(path: str, run: dict[str, Any], done: int, gram: torch.Tensor) -> None:
    tmp = f"{path}.tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"format": CHECKPOINT_FORMAT, "run": run, "paths_done": done, "gram": gram}, tmp)
    os.replace(tmp, path)


@torch.inference_mode()
def estimate_sample_cost(
    model,
    data,
    scheduler_or_alphas_cumprod,
    num_paths: int = DEFAULT_PATHS,
    candidates: int | None = DEFAULT_CANDIDATES,
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device | None = None,
    data_range: tuple[float, float] | None = (-1.0, 1.0),
    prediction_type: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
) -> SampleCost:
    """Estimate ``S`` on the grid from ``num_paths`` forward paths of the first ``num_paths`` images of ``data``:
    ``num_paths x G`` model calls (G = ``candidates`` grid points, default 250; ``None``: every timestep).

    Args:
        model: a Diffusers UNet, an :class:`EpsilonAdapter` (for conditioning) or a callable ``model(x, t)``.
        data_range: ``x0_hat`` is clipped to it, as the samplers and the table's ``x0_mse`` clip (``None``: no clip).
        checkpoint: a file where the running sums are kept after every group of paths; a rerun with the same settings
            resumes from it.
    """
    abar = as_alphas_cumprod(scheduler_or_alphas_cumprod)
    if num_paths < 1:
        raise ValueError(f"num_paths={num_paths} must be at least 1.")
    grid = candidate_timesteps(abar.size, candidates or abar.size)
    options = {}
    if not isinstance(model, EpsilonAdapter):
        config = getattr(scheduler_or_alphas_cumprod, "config", scheduler_or_alphas_cumprod)
        options["prediction_type"] = prediction_type or (
            config.get("prediction_type") if isinstance(config, Mapping) else None) or "epsilon"
    adapter = EpsilonAdapter.wrap(model, abar, **options)
    module, input_dtype = adapter.model, torch.float32
    if isinstance(module, torch.nn.Module):
        weight = next(module.parameters(), torch.empty(0))
        device = weight.device if device is None else device
        if weight.dtype in (torch.float16, torch.bfloat16):  # half weights take inputs of their dtype
            input_dtype = weight.dtype
        module.to(device).eval()
    device = torch.device(device or "cpu")
    x0 = take_samples(data, num_paths).double()
    check_range(x0, data_range)
    g, dim = grid.size, x0[0].numel()
    run = {"schedule": schedule_fingerprint(abar), "grid": g, "num_paths": num_paths, "seed": seed,
           "batch_size": batch_size, "data": hashlib.sha256(x0.numpy().tobytes()).hexdigest()[:16],
           "prediction_type": adapter.prediction_type}
    resumed = None if checkpoint is None else _load_checkpoint(os.fspath(checkpoint), run)
    done, gram = resumed or (0, torch.zeros(g, g, dtype=torch.float64))
    abar_grid = torch.from_numpy(abar[grid])
    roots = torch.stack([abar_grid.sqrt(), (1 - abar_grid).sqrt()]).to(device)
    group = max(1, batch_size // g)  # paths whose G model calls go through the model together
    bar = tqdm(total=num_paths, initial=done, desc="sample cost (paths)", unit="path", disable=not progress)
    for start in range(done, num_paths, group):
        paths = x0[start : start + group]
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, start]).generate_state(1)[0]))
        states = _forward_path(paths, abar_grid, generator).flatten(0, 1)  # (P G, C, H, W), path-major
        index_all = torch.arange(g).repeat(paths.shape[0])  # grid index of each state, path-major
        t_all = torch.from_numpy(grid)[index_all]
        x0_hat = []
        for lo in range(0, states.shape[0], batch_size):
            x_t = states[lo : lo + batch_size].to(device=device, dtype=torch.float32)
            t = t_all[lo : lo + batch_size].to(device)
            index = index_all[lo : lo + batch_size].to(device)
            shape = (-1,) + (1,) * (x_t.ndim - 1)
            a, b = roots[0, index].view(shape).float(), roots[1, index].view(shape).float()
            pred, _ = to_x0_and_eps(adapter(x_t.to(input_dtype), t).float(), x_t, a, b, "epsilon")
            x0_hat.append((pred if data_range is None else pred.clamp(*data_range)).double().cpu())
        flat = torch.cat(x0_hat).view(paths.shape[0], g, dim)
        if not torch.isfinite(flat).all():
            raise ValueError("the model returned NaN/inf on the forward paths; check the weights and the dtype.")
        gram += torch.einsum("pgd,phd->gh", flat, flat)
        done = min(start + group, num_paths)
        if checkpoint is not None:
            _save_checkpoint(os.fspath(checkpoint), run, done, gram)
        bar.update(done - bar.n)
    bar.close()
    gram /= num_paths * dim
    square = torch.diagonal(gram)
    msd = (square[:, None] + square[None, :] - 2 * gram).clamp_(min=0.0)
    msd.fill_diagonal_(0.0)
    return SampleCost(grid, msd.numpy(), num_paths)


def apply_timesteps(scheduler, timesteps, device: str | torch.device | None = None) -> None:
    """``scheduler.set_timesteps(timesteps=...)`` for any Diffusers scheduler that can run a custom trajectory.

    Schedulers whose ``set_timesteps`` takes ``timesteps`` (AnalyticDPMScheduler, DDPM, DPM-Solver multistep and
    singlestep, Euler, Heun, LCM) get it directly. UniPCMultistepScheduler (no ``timesteps`` argument in diffusers
    0.42) gets the trajectory and the noise levels its own ``set_timesteps`` gives those timesteps, by the same float32
    torch and numpy operations (the same bits on any CPU). Any other (DDIMScheduler, whose step assumes even spacing;
    PNDM; Euler ancestral) is refused with the alternatives.
    """
    ts = validate_timesteps(timesteps, scheduler.config.num_train_timesteps)
    if "timesteps" in inspect.signature(scheduler.set_timesteps).parameters:
        scheduler.set_timesteps(timesteps=ts, device=device)
        return
    if type(scheduler).__name__ == "UniPCMultistepScheduler":
        special = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas")
                   if scheduler.config.get(k)]
        if special:
            raise ValueError(f"UniPCMultistepScheduler with {special[0]}=True sets its own timesteps; build it without "
                             "that option to run a custom trajectory.")
        scheduler.set_timesteps(len(ts), device=device)
        # the operations of its set_timesteps (diffusers 0.42, default branch), so its kernels give identical bits
        abar = scheduler.alphas_cumprod
        sigmas = np.array(((1 - abar) / abar) ** 0.5)
        sigmas = np.interp(np.array(ts, dtype=np.int64), np.arange(0, len(sigmas)), sigmas)
        last = ((1 - abar[0]) / abar[0]) ** 0.5 if scheduler.config.final_sigmas_type == "sigma_min" else 0
        scheduler.sigmas = torch.from_numpy(np.concatenate([sigmas, [last]]).astype(np.float32))
        scheduler.timesteps = torch.tensor(ts, dtype=torch.int64, device=device)
        return
    raise ValueError(
        f"{type(scheduler).__name__}.set_timesteps takes no custom timesteps in this version of diffusers"
        + (" (its step assumes evenly spaced ones)" if type(scheduler).__name__ == "DDIMScheduler" else "")
        + "; run the trajectory with AnalyticDPMScheduler (eta=0 for DDIM-type steps), "
        "DPMSolverMultistepScheduler (solver_order=1 is the DDIM update), UniPCMultistepScheduler or DDPMScheduler."
    )
