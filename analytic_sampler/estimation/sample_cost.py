"""The Monte Carlo pass behind the sample-quality trajectory: ``S(tau, t) = E||x0_hat(x_tau) - x0_hat(x_t)||^2 / d``
on a grid of candidate timesteps, along forward noise paths of the data (:mod:`analytic_sampler.sample_trajectory`
has the bound and its DP)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..adapter import EpsilonAdapter
from ..predictions import to_x0_and_eps
from ..sample_trajectory import DEFAULT_CANDIDATES, DEFAULT_PATHS, SampleCost, candidate_timesteps
from ..schedule import as_alphas_cumprod, schedule_fingerprint
from .data import check_range, take_samples

CHECKPOINT_FORMAT = 1


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
