"""A plain sampling loop over any Diffusers scheduler, samplers ranked by Fréchet distance, and image grids."""

from __future__ import annotations

import inspect
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..predictions import split_learned_variance
from ..schedulers.timesteps import apply_timesteps
from .frechet import FrechetReference, bootstrap_distances


def _step_generator(seed: int, batch: int) -> torch.Generator:
    """The generator of the noise the steps of one batch draw, independent of the initial noise's."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 1, batch]).generate_state(1)[0]))


def _draw_noise(generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=generator)


def initial_noise(num_samples: int, shape: Sequence[int], seed: int = 0, batch_size: int | None = None
                  ) -> torch.Tensor:
    """The x_T :func:`sample` starts sample i from (before ``init_noise_sigma``): one generator seeded with ``seed``,
    drawn batch after batch of ``batch_size`` (default: all at once). The reference solution of a sampler's
    samples starts from it (:mod:`analytic_sampler.evaluation.reference`)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    batch_size = batch_size or num_samples
    return torch.cat([_draw_noise(generator, (min(batch_size, num_samples - start), *shape))
                      for start in range(0, num_samples, batch_size)])


@torch.inference_mode()
def sample(
    unet,
    scheduler,
    num_samples: int,
    num_inference_steps: int | None = None,
    timesteps: Sequence[int] | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    **step_kwargs,
) -> torch.Tensor:
    """Draw ``num_samples`` images with ``scheduler`` in batches; float32 on the CPU, clipped to [-1, 1].

    ``timesteps``: an explicit trajectory (:func:`~analytic_sampler.schedulers.timesteps.apply_timesteps`), else
    ``num_inference_steps`` with the scheduler's own spacing. Noise: the initial noise comes from one generator seeded
    with ``seed``, drawn batch after batch, so every scheduler run at the same seed and batch size starts sample i
    from the same x_T. The noise the steps draw comes from a second generator per batch: a stochastic scheduler never
    shifts the initial noise of later batches, and schedulers that draw one normal sample of the image's shape per
    step (DDPM, Analytic-DDPM, Euler ancestral) draw the same numbers at the same step. The variance half of a 2C
    (learned-variance) output reaches only schedulers configured to use it (``variance_type`` learned*).
    """
    device = torch.device(device)
    unet = unet.to(device).eval()
    size = unet.config.sample_size
    shape = (unet.config.in_channels, *((size, size) if isinstance(size, int) else size))
    keep_variance = "variance_type" in inspect.signature(type(scheduler).__init__).parameters and scheduler.config.get(
        "variance_type") in ("learned", "learned_range")
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    generator = torch.Generator(device="cpu").manual_seed(seed)
    batch_size = batch_size or num_samples

    def restart() -> None:  # every batch: multistep schedulers keep a step index and past outputs
        if timesteps is not None:
            apply_timesteps(scheduler, timesteps, device=device)
        else:
            scheduler.set_timesteps(num_inference_steps, device=device)
        if hasattr(scheduler, "set_begin_index"):  # start at step 0 even where the first timestep repeats (Karras
            scheduler.set_begin_index(0)  # sigmas on a cosine schedule round to duplicate integer timesteps)

    restart()
    out = []
    bar = tqdm(total=num_samples * len(scheduler.timesteps), desc="sampling", unit="step", disable=not progress, leave=False)
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        if start:
            restart()
        x = _draw_noise(generator, (n, *shape)).to(device) * scheduler.init_noise_sigma
        noise = {"generator": _step_generator(seed, start // batch_size)} if takes_generator else {}
        for t in scheduler.timesteps:
            model_output = unet(scheduler.scale_model_input(x, t), t).sample
            if not keep_variance:
                model_output = split_learned_variance(model_output, x)[0]
            x = scheduler.step(model_output, t, x, **noise, **step_kwargs).prev_sample
            bar.update(n)
        out.append(x.clamp(-1, 1).float().cpu())
    bar.close()
    return torch.cat(out)


def ranked_fd_rows(
    unet,
    samplers: Mapping[str, Any],
    num_steps: int,
    features: Callable[[torch.Tensor], torch.Tensor],
    reference: FrechetReference,
    num_samples: int,
    seed: int = 0,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    on_samples: Callable[[str, torch.Tensor], None] | None = None,
) -> list[dict]:
    """Sample ``num_samples`` images with every :class:`~analytic_sampler.evaluation.baselines.Sampler` at K =
    ``num_steps`` (its explicit trajectory, else its own spacing), all from the same initial noise, and rank them by
    the Fréchet distance of their ``features`` to ``reference``.

    One row per sampler: ``fd`` ± ``stderr`` (bootstrap), ``diff_to_best`` = its FD minus the lowest one, with the
    paired bootstrap standard error ``diff_stderr`` (the same resampled indices for both rows, so the shared initial
    noise cancels), ``best`` (the name of the lowest row), ``seconds`` and the ``timesteps`` it ran.
    ``on_samples(name, images)`` sees each set of images."""
    rows, feats = [], []
    for name, sampler in samplers.items():
        start = time.time()
        images = sample(unet, sampler.scheduler, num_samples, None if sampler.timesteps else num_steps,
                        sampler.timesteps, seed=seed, batch_size=batch_size, device=device, progress=False,
                        **sampler.step_kwargs)
        seconds = time.time() - start
        if on_samples is not None:
            on_samples(name, images)
        feats.append(features(images).numpy())
        ran = [int(t) if float(t).is_integer() else float(t) for t in sampler.scheduler.timesteps.tolist()]
        rows.append({"K": num_steps, "method": name, "fd": reference.distance(feats[-1]), "num_samples": num_samples,
                     "seconds": seconds, "timesteps": ran})
    boot = bootstrap_distances(feats, reference, seed)
    best = int(np.argmin([r["fd"] for r in rows]))
    for i, row in enumerate(rows):
        row.update(stderr=float(np.std(boot[:, i], ddof=1)), diff_to_best=row["fd"] - rows[best]["fd"],
                   diff_stderr=float(np.std(boot[:, i] - boot[:, best], ddof=1)), best=rows[best]["method"])
    return rows


GRID_MIN_SIDE = 512  # pixels: small images (8x8 digits) are enlarged until the grid's longer side reaches this


def save_grid(
    images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, scale: int | None = None,
    row_labels: Sequence[str] | None = None,
) -> str:
    """Tile images in [-1, 1] (N, C, H, W) into one PNG, each pixel enlarged ``scale`` times (nearest neighbour;
    default: the smallest integer that makes the grid's longer side at least ``GRID_MIN_SIDE`` pixels, 1 for
    grids that size already); ``row_labels`` writes one label left of each row."""
    from PIL import Image, ImageDraw

    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + 1) + 1, nrow * (w + 1) + 1, c), 255, dtype=np.uint8)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, img in enumerate(pixels):
        r, col = divmod(i, nrow)
        grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + col * (w + 1): 1 + col * (w + 1) + w] = img
    scale = scale or max(1, math.ceil(GRID_MIN_SIDE / max(grid.shape[:2])))
    grid = grid.repeat(scale, 0).repeat(scale, 1)
    image = Image.fromarray(grid[..., 0] if c == 1 else grid)
    if row_labels:
        if len(row_labels) != rows:
            raise ValueError(f"{len(row_labels)} row labels for {rows} rows of {nrow} images; pass one per row.")
        draw = ImageDraw.Draw(image)
        margin = int(max(draw.textlength(label) for label in row_labels)) + 8
        labelled = Image.new(image.mode, (image.width + margin, image.height), 255)
        labelled.paste(image, (margin, 0))
        draw, row_height = ImageDraw.Draw(labelled), (h + 1) * scale
        for r, label in enumerate(row_labels):
            draw.text((4, r * row_height + row_height // 2), label, fill=0, anchor="lm")
        image = labelled
    image.save(path)
    return str(path)
