"""scikit-learn's 8x8 digits as a tiny offline image data set, split once and for all.

``sklearn.datasets.load_digits()``: 1797 greyscale 8x8 images with 17 grey levels (0 … 16).
They are returned as float32 tensors of shape ``(n, 1, 8, 8)`` in ``[-1, 1]`` via ``x / 16 * 2 - 1``.

Fixed split (``SPLIT_SEED = 0``): ``perm = numpy.random.default_rng(0).permutation(1797)``;
**held-out** = the images at ``perm[-297:]`` (297 images), **train** = ``perm[:1500]`` (1500 images).
Both index lists are sorted so that images keep sklearn's order inside each split. The split is not
stratified (class counts differ by a few images between classes); it never changes.
"""

from __future__ import annotations

import numpy as np
import torch

SPLIT_SEED = 0
NUM_DIGITS = 1797
NUM_HELDOUT = 297


def _load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits data set needs scikit-learn; install it with `pip install analytic-sampler[digits]`"
        ) from err
    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def split_indices(split: str = "train") -> np.ndarray:
    """Sorted indices into ``sklearn.datasets.load_digits()`` of the fixed ``train`` / ``heldout`` split."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(NUM_DIGITS)
    if split == "train":
        idx = perm[: NUM_DIGITS - NUM_HELDOUT]
    elif split in ("heldout", "held-out", "test"):
        idx = perm[NUM_DIGITS - NUM_HELDOUT :]
    elif split == "all":
        idx = np.arange(NUM_DIGITS)
    else:
        raise ValueError(f"split={split!r} is not known; use 'train', 'heldout' or 'all'.")
    return np.sort(idx)


def load_digits_split(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of the fixed split: images float32 ``(n, 1, 8, 8)`` in [-1, 1], labels int64 ``(n,)``.

    ``split``: ``"train"`` (1500 images), ``"heldout"`` (297 images) or ``"all"`` (1797 images).
    """
    images, labels = _load_sklearn_digits()
    idx = split_indices(split)
    x = torch.from_numpy(images[idx] / 16.0 * 2.0 - 1.0).unsqueeze(1).contiguous()
    return x, torch.from_numpy(labels[idx])
