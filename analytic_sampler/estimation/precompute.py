"""A table estimated into a folder, as ``analytic-sampler precompute`` does it: never overwritten or mixed.

- The folder already holds the table of this very run (the same
  :func:`~analytic_sampler.estimation.moments.run_key`: weights, data, settings): nothing is estimated, the table is returned as it is.
- It holds a table of another run (or one without a record of its run: an older version, a merged table): refused,
  naming each field that differs, unless ``overwrite``.
- Otherwise the table is estimated with a checkpoint, then written; the checkpoint is removed after the write
  unless ``keep_checkpoint``.

Where the checkpoint waits (:func:`checkpoint_path`): beside the table folder, ``<OUT>.partial/checkpoint.pt``; and
for the ``table/`` folder of a model folder (the default of the command), beside the model folder,
``<MODEL>.partial/table/checkpoint.pt``. A model folder is what users upload (``HfApi.upload_folder``,
``hf upload``, which skip only ``.git/`` and ``.cache/huggingface/``), and the table folder is what
``VarianceTable.push_to_hub`` and ``load_pretrained`` read: a checkpoint inside either would travel with them or
be taken for part of the model, so it lives outside both, and its name says what it belongs to.

:func:`precompute_sample_cost` adds the sample cost of the sample-quality trajectory to a finished table in a
second pass, with the same rules: the same settings again do nothing, other settings are refused unless
``overwrite``, and its checkpoint (``sample_cost.pt``) waits beside the table's.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..options import options_of
from ..table import META_NAME, VarianceTable
from .distributed import rank_path, world_rank
from .latents import PipelineOptions
from .moments import EstimateOptions, accumulate, build_table, discard_other_checkpoint, prepare_estimate, run_key

PARTIAL_SUFFIX = ".partial"
CHECKPOINT_NAME = "checkpoint.pt"
SAMPLE_COST_CHECKPOINT = "sample_cost.pt"
STATUSES = ("estimated", "unchanged")


@dataclass
class Precomputed:
    """What :func:`precompute_table` did: ``table`` (the one in the folder), ``status`` (``"estimated"``, or
    ``"unchanged"``: the folder held this run's table already) and the ``folder``."""

    table: VarianceTable
    status: str
    folder: Path


def _is_model_folder(path: Path) -> bool:
    return (path / "unet").is_dir() or (path / "model_index.json").is_file()


def checkpoint_path(out: str | os.PathLike) -> Path:
    """The default checkpoint of the table bound for ``out`` (module docstring): ``<OUT>.partial/checkpoint.pt``,
    or ``<MODEL>.partial/table/checkpoint.pt`` when ``out`` is the ``table/`` folder of a model folder (one with
    ``unet/`` or ``model_index.json``)."""
    out = Path(os.path.abspath(out))
    if _is_model_folder(out.parent):
        model = out.parent
        return model.with_name(model.name + PARTIAL_SUFFIX) / out.name / CHECKPOINT_NAME
    return out.with_name(out.name + PARTIAL_SUFFIX) / CHECKPOINT_NAME


def _run_differences(recorded: Any, key: dict[str, Any]) -> list[str]:
    """The run key fields in which a finished table's recorded run differs from ``key``, described."""
    if not isinstance(recorded, dict):
        return ["the table records no run key (written by an older version of analytic-sampler, or merged)"]
    return [f"{name}: {recorded.get(name, 'not recorded')!r} in the table, {key.get(name, 'not recorded')!r} now"
            for name in dict.fromkeys([*key, *recorded]) if recorded.get(name) != key.get(name)]


def _decide(out: Path, key: dict[str, Any], overwrite: bool) -> tuple[str, Any]:
    """``("unchanged", table)``, ``("estimate", None)``, or ``("refuse", message)`` for the folder ``out``."""
    if not (out / META_NAME).exists():
        return "estimate", None
    try:
        table = VarianceTable.load(out)
    except ValueError as err:
        table, found = None, f"a variance table that does not load: {err}"
    else:
        diffs = _run_differences(table.provenance.get("run_key"), key)
        if not diffs:
            return "unchanged", table
        found = f"a variance table of another run ({'; '.join(diffs)})"
    if overwrite:
        return "estimate", None
    return "refuse", (f"{out} already holds {found}; pass overwrite=True (on the command line: --overwrite) to "
                      "replace it, or choose another folder (--out).")


def _agree(decision: tuple[str, Any], rank: int, world: int) -> tuple[str, Any]:
    """Rank 0's decision on every rank (ranks need not share a disk)."""
    if world == 1:
        return decision
    import torch.distributed as dist

    shared = [decision if rank == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def precompute_table(
    model,
    data,
    scheduler_or_alphas_cumprod=None,
    num_samples: int = 1000,
    timesteps: Sequence[int] | None = None,
    batch_size: int = 64,
    seed: int = 0,
    *,
    out: str | os.PathLike,
    options: EstimateOptions | None = None,
    pipeline_options: PipelineOptions | None = None,
    overwrite: bool = False,
    keep_checkpoint: bool = False,
) -> Precomputed:
    """Estimate a model's table into the folder ``out``, resumably, never overwriting or mixing a finished table
    (module docstring).

    Args:
        model, data, scheduler_or_alphas_cumprod, num_samples, timesteps, batch_size, seed, options, pipeline_options:
            As in :func:`~analytic_sampler.estimate_moments`; ``options.checkpoint`` defaults to
            :func:`checkpoint_path` of ``out``.
        out (`str` or `os.PathLike`):
            The table's folder (created if missing).
        overwrite (`bool`, defaults to `False`):
            Replace a table of another run in ``out``, and delete a checkpoint of another run (or an unreadable
            one) instead of refusing it. A checkpoint of this very run still resumes: the table is the same.
        keep_checkpoint (`bool`, defaults to `False`):
            Keep the checkpoint after the table is written (it is removed otherwise).

    Returns:
        :class:`Precomputed`: the table, and whether it was estimated or found.

    Under torch.distributed every rank calls it; rank 0 decides and writes the table, and every rank removes its own
    checkpoint.
    """
    folder = Path(out)
    options = options_of(options, EstimateOptions)
    checkpoint = Path(options.checkpoint or checkpoint_path(folder))
    options = replace(options, checkpoint=checkpoint)
    plan = prepare_estimate(model, data, scheduler_or_alphas_cumprod, num_samples, timesteps, batch_size, seed,
                            options, options_of(pipeline_options, PipelineOptions, "pipeline_options"))
    key = run_key(plan)
    rank, world = world_rank()
    status, detail = _agree(_decide(folder, key, overwrite) if rank == 0 else None, rank, world)
    if status == "refuse":
        raise ValueError(detail)
    if status == "unchanged":
        return Precomputed(detail, "unchanged", folder)
    mine = Path(rank_path(str(checkpoint), rank))
    if overwrite and discard_other_checkpoint(mine, key):
        warnings.warn(f"deleted the checkpoint {mine} of another run (overwrite)", stacklevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    table = build_table(plan, key, accumulate(plan, key, options), options.provenance)
    if rank == 0:
        table.save(folder)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # the table is written before any checkpoint goes
    if not keep_checkpoint:
        _remove(mine)
    return Precomputed(table, "estimated", folder)


def _remove(checkpoint: Path) -> None:
    """Delete a checkpoint, and its ``.partial`` folders once empty."""
    checkpoint.unlink(missing_ok=True)
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        if folder.name.endswith(PARTIAL_SUFFIX) or folder.parent.name.endswith(PARTIAL_SUFFIX):
            try:
                folder.rmdir()
            except OSError:  # not empty (another rank's file, the user's files) or gone
                pass


def precompute_sample_cost(
    model,
    data,
    scheduler_or_alphas_cumprod,
    *,
    out: str | os.PathLike,
    num_paths: int | None = None,
    candidates: int | None = None,
    overwrite: bool = False,
    keep_checkpoint: bool = False,
    force_table: bool = False,
    **kwargs,
) -> Precomputed:
    """Add the sample cost (:func:`~analytic_sampler.estimation.sample_cost.estimate_sample_cost`: ``num_paths x G``
    model calls, one forward path per image of ``data``) to the table in the folder ``out``, and rewrite it.

    Args:
        model, data, scheduler_or_alphas_cumprod:
            As in :func:`~analytic_sampler.estimation.sample_cost.estimate_sample_cost`; the model must be the table's
            (:meth:`~analytic_sampler.VarianceTable.check_model`, unless ``force_table``).
        out (`str` or `os.PathLike`):
            The folder of a finished table.
        num_paths (`int`, *optional*):
            Forward paths, at most one per image of ``data`` (default 64, or as many images as ``data`` holds).
        candidates (`int`, *optional*):
            Grid points the trajectory may use (default 250).
        overwrite (`bool`, defaults to `False`):
            Replace a sample cost of other settings (refused otherwise).
        keep_checkpoint (`bool`, defaults to `False`):
            Keep the checkpoint after the table is written.
        **kwargs:
            ``batch_size``, ``seed``, ``device``, ``prediction_type``, ``progress`` of ``estimate_sample_cost``.

    Returns:
        :class:`Precomputed`: the table with its sample cost, ``"estimated"`` or ``"unchanged"``.
    """
    from ..sample_trajectory import DEFAULT_CANDIDATES, DEFAULT_PATHS, candidate_timesteps
    from .data import iter_batches
    from .sample_cost import estimate_sample_cost

    folder = Path(out)
    if not (folder / META_NAME).is_file():
        raise ValueError(f"no variance table in {str(folder)!r} to add the sample cost to: estimate the table first "
                         "(precompute_table, or `analytic-sampler precompute` without --sample-cost-only).")
    table = VarianceTable.load(folder).check_schedule(scheduler_or_alphas_cumprod).check_model(model, force_table)
    x0 = next(iter_batches(data, num_paths or DEFAULT_PATHS), None)  # one path per image, as many as there are
    if x0 is None:
        raise ValueError("data holds no images to draw the sample cost's forward paths from.")
    grid = candidate_timesteps(table.num_train_timesteps, candidates or DEFAULT_CANDIDATES)
    settings = {"num_paths": int(x0.shape[0]), "candidates": int(grid.size), "seed": int(kwargs.get("seed", 0)),
                "batch_size": int(kwargs.get("batch_size", 256)),
                "data_sha256": hashlib.sha256(x0.double().numpy().tobytes()).hexdigest()[:16],
                "model_calls": int(x0.shape[0] * grid.size)}
    recorded = table.provenance.get("sample_cost")
    if table.has_sample_cost and recorded == settings:
        return Precomputed(table, "unchanged", folder)
    if table.has_sample_cost and not overwrite:
        diffs = _run_differences(recorded, settings)
        raise ValueError(f"{folder} already holds a sample cost of other settings ({'; '.join(diffs)}); pass "
                         "overwrite=True (on the command line: --overwrite) to replace it.")
    checkpoint = checkpoint_path(folder).with_name(SAMPLE_COST_CHECKPOINT)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    cost = estimate_sample_cost(model, x0, scheduler_or_alphas_cumprod, num_paths=settings["num_paths"],
                                candidates=candidates or DEFAULT_CANDIDATES, data_range=table.data_range,
                                checkpoint=checkpoint, **kwargs)
    table = table.with_sample_cost(cost)
    table.provenance["sample_cost"] = settings
    table.save(folder)
    if not keep_checkpoint:
        _remove(checkpoint)
    return Precomputed(table, "estimated", folder)


FIT_CHECKPOINT = "fitted_timesteps.pt"


def precompute_fitted_timesteps(
    model,
    scheduler,
    *,
    out: str | os.PathLike,
    options=None,
    sample_shape=None,
    path_kwargs=None,
    key_fields=None,
    device=None,
    overwrite: bool = False,
    keep_checkpoint: bool = False,
    force_table: bool = False,
    progress: bool = True,
) -> Precomputed:
    """Fit timesteps to the model for each solver of ``options``
    (:func:`~analytic_sampler.estimation.timestep_fit.fit_timesteps`: teacher paths from noise, no data needed) and
    add them to the finished table in the folder ``out``, with the same rules as :func:`precompute_sample_cost`:
    the same settings again do nothing, other settings are refused unless ``overwrite``, and the checkpoint
    (``fitted_timesteps.pt``) waits beside the table's.

    Args:
        model: a UNet, an :class:`~analytic_sampler.EpsilonAdapter` (conditioning, guidance) or a callable; it must
            be the table's (:meth:`~analytic_sampler.VarianceTable.check_model`, unless ``force_table``).
        scheduler: the model's scheduler (its config says how x0 is clipped).
        options (:class:`~analytic_sampler.estimation.timestep_fit.FitOptions`, *optional*): the fit's settings.
        sample_shape: one sample's shape (default: the UNet config's channels and size).
        path_kwargs: per-path model kwargs (one row per path: a pipeline's prompt embeddings).
        key_fields: more fields of the run key (what identifies ``path_kwargs``, e.g. the prompts' hash).
    """
    from ..denoiser import Denoiser, x0_limit
    from .timestep_fit import FitOptions, fit_key, fit_timesteps

    folder = Path(out)
    if not (folder / META_NAME).is_file():
        raise ValueError(f"no variance table in {str(folder)!r} to add fitted timesteps to: estimate the table first "
                         "(precompute_table, or `analytic-sampler precompute` without --fit-only).")
    table = VarianceTable.load(folder).check_schedule(scheduler).check_model(model, force_table)
    options = options or FitOptions()
    if sample_shape is None:
        config = getattr(model, "config", None) or getattr(getattr(model, "model", None), "config", None)
        if config is None:
            raise ValueError("pass sample_shape=(C, H, W): the model has no config to read it from.")
        size = config.sample_size
        sample_shape = (config.in_channels, *((size, size) if isinstance(size, int) else size))
    denoiser = Denoiser(model, scheduler, x0_limit(scheduler), options.batch_size, device, path_kwargs)
    key = fit_key(denoiser, scheduler, sample_shape, options, key_fields)
    recorded = table.provenance.get("fitted_timesteps")
    if table.has_fitted_timesteps and isinstance(recorded, dict) and recorded.get("run_key") == key:
        return Precomputed(table, "unchanged", folder)
    if table.has_fitted_timesteps and not overwrite:
        diffs = _run_differences(recorded.get("run_key") if isinstance(recorded, dict) else None, key)
        raise ValueError(f"{folder} already holds fitted timesteps of other settings ({'; '.join(diffs)}); pass "
                         "overwrite=True (on the command line: --overwrite) to replace them.")
    checkpoint = checkpoint_path(folder).with_name(FIT_CHECKPOINT)
    result = fit_timesteps(denoiser, scheduler, sample_shape, options, checkpoint, key_fields, progress)
    table = table.with_fitted_timesteps(result.fitted)
    table.provenance["fitted_timesteps"] = {"model_calls": result.model_calls, "run_key": result.key}
    table.save(folder)
    if not keep_checkpoint:
        _remove(checkpoint)
    return Precomputed(table, "estimated", folder)
