"""A plain sampling loop over any Diffusers scheduler, and image-grid output."""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..predictions import split_learned_variance


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

    The initial noise of sample i is the same for every scheduler (one generator per call, seeded),
    so methods compared at the same seed start from the same x_T. The variance half of a 2C
    (learned-variance) output reaches only schedulers configured to use it (``variance_type`` learned*).
    """
    device = torch.device(device)
    unet = unet.to(device).eval()
    size = unet.config.sample_size
    shape = (unet.config.in_channels, *((size, size) if isinstance(size, int) else size))
    keep_variance = "variance_type" in inspect.signature(type(scheduler).__init__).parameters and scheduler.config.get(
        "variance_type") in ("learned", "learned_range")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    batch_size = batch_size or num_samples
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=list(timesteps), device=device)
    else:
        scheduler.set_timesteps(num_inference_steps, device=device)
    out = []
    bar = tqdm(total=num_samples * len(scheduler.timesteps), desc="sampling", unit="step", disable=not progress, leave=False)
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        x = torch.randn((n, *shape), generator=generator).to(device) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_output = unet(scheduler.scale_model_input(x, t), t).sample
            if not keep_variance:
                model_output = split_learned_variance(model_output, x)[0]
            x = scheduler.step(model_output, t, x, generator=generator, **step_kwargs).prev_sample
            bar.update(n)
        out.append(x.clamp(-1, 1).float().cpu())
    bar.close()
    return torch.cat(out)


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
