"""Image batches from the usual sources: a tensor, a DataLoader / iterable of batches, a Dataset, a folder.

Images from files (and PIL images in datasets) are mapped from ``[0, 255]`` to ``[-1, 1]``: ``x = p / 127.5 - 1``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
IMAGE_KEYS = ("images", "pixel_values", "sample", "image", "img")
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
# PIL modes by the kind of image they hold, which converting to another kind changes (grey <-> colour, alpha)
_KINDS = {"1": "L", "L": "L", "I": "L", "I;16": "L", "F": "L", "LA": "RGBA", "La": "RGBA", "PA": "RGBA",
          "RGBA": "RGBA", "RGBa": "RGBA"}
_LOSS = {("L", "RGB"): "the grey level is repeated in R, G and B", ("L", "RGBA"): "grey repeated, opaque alpha added",
         ("RGB", "L"): "colour is lost", ("RGB", "RGBA"): "an opaque alpha channel is added",
         ("RGBA", "L"): "colour and alpha are dropped", ("RGBA", "RGB"): "the alpha channel is dropped"}
METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # captions beside the images (Hugging Face's imagefolder)


def _pil_to_tensor(image, channels: int | None) -> torch.Tensor:
    """A PIL image as a float32 ``(C, H, W)`` tensor in ``[-1, 1]``; ``channels=None`` keeps L / RGB / RGBA."""
    if channels is None:
        channels = {"L": 1, "RGBA": 4}.get(image.mode, 3)
    if channels not in _MODES:
        raise ValueError(f"channels={channels} is not supported for images; use 1 (grey), 3 (RGB) or 4 (RGBA).")
    array = np.asarray(image.convert(_MODES[channels]), dtype=np.float32).reshape(image.height, image.width, channels)
    return torch.from_numpy(array / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def _as_tensor(item: Any, channels: int | None) -> torch.Tensor:
    """The images in a batch or dataset item: a tensor / array, a tuple's first entry, a dict entry, a PIL image."""
    if isinstance(item, dict):
        key = next((k for k in IMAGE_KEYS if k in item), None)
        if key is None:
            raise ValueError(f"batch dict has keys {sorted(item)}; put the images under one of {IMAGE_KEYS}.")
        item = item[key]
    elif isinstance(item, (tuple, list)) and item:
        item = item[0]
    if isinstance(item, np.ndarray):
        return torch.from_numpy(item)
    if isinstance(item, torch.Tensor):
        return item
    if hasattr(item, "convert") and hasattr(item, "mode"):  # PIL image
        return _pil_to_tensor(item, channels)
    raise TypeError(
        f"cannot read images from a {type(item).__name__}; give tensors (B, C, H, W), tuples with the image "
        f"tensor first, dicts with one of {IMAGE_KEYS}, or PIL images."
    )


def _check_batch(x: torch.Tensor) -> torch.Tensor:
    if x.ndim != 4:
        raise ValueError(
            f"image batches must have shape (B, C, H, W); got {tuple(x.shape)}. Add the missing batch/channel axis."
        )
    return x if x.is_floating_point() else x.float()


def folder_files(path: str) -> list[str]:
    """The image files of a folder, sorted by name: the order in which their images are read. Other entries
    (a README, ``.DS_Store``, subfolders) are skipped with one warning naming them; captions files
    (``metadata.jsonl`` / ``.csv``) without one."""
    entries = sorted(os.listdir(path))
    files = [f for f in entries if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, f))]
    others = [f + ("/" if os.path.isdir(os.path.join(path, f)) else "") for f in entries
              if f not in files and f not in METADATA_FILES]
    if not files:
        held = f"it holds only {', '.join(others[:5])}{', ...' if len(others) > 5 else ''}" if others else "it is empty"
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {path} ({held}); point data at a folder "
                         "of image files.")
    if others:
        warnings.warn(f"folder {path}: skipping what is not an image file ({', '.join(others)}).")
    return files


def _open_image(path: str):
    """The image at ``path``, fully read; a ``ValueError`` naming the file where it is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"{path} is not a readable image ({err}); replace or remove the file.") from err


def _folder_images(path: str, channels: int | None) -> Iterator[torch.Tensor]:
    files = folder_files(path)
    size, warned = None, set()
    for name in files:
        image = _open_image(os.path.join(path, name))
        if size is None:  # the first image sets the size and, with channels=None, the mode of all
            size, channels = image.size, channels or {"L": 1, "RGBA": 4}.get(image.mode, 3)
        elif image.size != size:
            raise ValueError(
                f"{name} is {image.size[0]}x{image.size[1]} but {files[0]} is {size[0]}x{size[1]}; "
                "all images in the folder must have the same size: resize or crop them first."
            )
        target = _MODES.get(channels)
        kind = _KINDS.get(image.mode, "RGB")
        if target is not None and kind != target and (image.mode, target) not in warned:
            warned.add((image.mode, target))
            warnings.warn(f"folder {path}: converting {image.mode} images to {target} for {channels} channel(s) "
                          f"(first: {name}); {_LOSS[(kind, target)]}.")
        yield _pil_to_tensor(image, channels)[None]


def _pieces(data: Any, channels: int | None) -> Iterator[torch.Tensor]:
    """The data as a stream of ``(b, C, H, W)`` tensors of any length ``b``."""
    if isinstance(data, (str, os.PathLike)):
        if not os.path.isdir(data):
            raise ValueError(f"data={os.fspath(data)!r} is not a folder; pass a folder of images, a tensor or a loader.")
        yield from _folder_images(os.fspath(data), channels)
    elif isinstance(data, (torch.Tensor, np.ndarray, dict)):  # a single batch
        yield _check_batch(_as_tensor(data, channels))
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (list, tuple)):
        for i in range(len(data)):  # a map-style Dataset: one sample per item
            yield _check_batch(_as_tensor(data[i], channels)[None])
    elif isinstance(data, Iterable):
        for batch in data:
            yield _check_batch(_as_tensor(batch, channels))
    else:
        raise TypeError(
            f"data of type {type(data).__name__} is not supported; pass a tensor (N, C, H, W), a DataLoader or "
            "iterable of batches, a torch Dataset, or a folder of images."
        )


def iter_batches(data: Any, batch_size: int, channels: int | None = None) -> Iterator[torch.Tensor]:
    """Yield float ``(batch_size, C, H, W)`` image tensors (the last may be smaller) from any supported source.

    ``channels`` picks the PIL mode for image files (1: L, 3: RGB, 4: RGBA); ``None`` keeps the file's own.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1.")
    buffer: list[torch.Tensor] = []
    held, shape = 0, None
    for piece in _pieces(data, channels):
        shape = shape or piece.shape[1:]
        if piece.shape[1:] != shape:
            raise ValueError(f"images of shape {tuple(piece.shape[1:])} follow {tuple(shape)}; all must have one shape.")
        buffer.append(piece)
        held += piece.shape[0]
        while held >= batch_size:
            joined = torch.cat(buffer) if len(buffer) > 1 else buffer[0]
            yield joined[:batch_size]
            buffer, held = [joined[batch_size:]], held - batch_size
    if held:
        yield torch.cat(buffer)


def take_samples(data: Any, num_samples: int, channels: int | None = None) -> torch.Tensor:
    """The first ``num_samples`` images of ``data`` as one float ``(num_samples, C, H, W)`` tensor."""
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be at least 1.")
    batch = next(iter_batches(data, num_samples, channels), None)
    total = 0 if batch is None else batch.shape[0]
    if total < num_samples:
        raise ValueError(
            f"data holds only {total} images but num_samples={num_samples}; lower num_samples or pass more data."
        )
    return batch


def check_range(x: torch.Tensor, data_range: tuple[float, float] | None, tolerance: float = 1e-4) -> None:
    """Refuse data outside ``[a, b]`` (up to ``tolerance``) or with NaN; ``data_range=None`` checks only NaN."""
    if not torch.isfinite(x).all():
        raise ValueError("data contains NaN or inf values; clean the images before estimating.")
    if data_range is None:
        return
    lo, hi = data_range
    x_min, x_max = float(x.min()), float(x.max())
    if x_min < lo - tolerance or x_max > hi + tolerance:
        raise ValueError(
            f"data outside the declared range [{lo:g}, {hi:g}] (min {x_min:.4g}, max {x_max:.4g}); rescale images "
            "to [-1, 1] or pass data_range=None / the right range."
        )
