"""What the subcommands read and write: data specs, model checks, tables, output folders."""

from __future__ import annotations

import os
from pathlib import Path

from ...pretrained import load_pretrained, local_or_repo_id
from .arguments import DATA_FORMS


def make_folder(folder: str | os.PathLike) -> Path:
    """Create an output folder and its parents before any work; a clear error where that is impossible."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"cannot create the output folder {str(path)!r} ({err.strerror}); choose another --out."
        ) from err
    return path


def load_data(spec: str, channels: int, flag: str = "--data"):
    """``digits:train`` / ``digits:heldout``, a ``.pt`` / ``.npy`` tensor file, or every image of a folder."""
    import numpy as np
    import torch

    if spec.startswith("digits:"):
        from ...digits import load_digits_split

        return load_digits_split(spec.split(":", 1)[1])[0]
    path = existing_path(spec, flag, DATA_FORMS)
    if os.path.isdir(path):
        from ...estimation.data import iter_batches

        return torch.cat(list(iter_batches(path, batch_size=1024, channels=channels)))
    if path.endswith(".pt"):
        return torch.load(path, map_location="cpu")
    if path.endswith(".npy"):
        return torch.from_numpy(np.load(path))
    raise ValueError(f"{flag} {spec!r}: not a .pt/.npy file; {DATA_FORMS}.")


def existing_path(spec: str, flag: str, forms: str) -> str:
    """``spec`` with ``~`` expanded; a clear error naming ``flag`` and where it looked when nothing is there."""
    path = os.path.expanduser(spec)
    if not os.path.exists(path):
        raise ValueError(f"{flag} {spec!r}: no such file or folder (looked in {os.path.abspath(path)}); {forms}.")
    return path


def check_data(data, unet, spec: str, flag: str = "--data", needed: int = 1, count_flag: str | None = None) -> None:
    """Refuse data that is not a ``(N, C, H, W)`` tensor of the UNet's channels and size, or that holds fewer
    than ``needed`` images, before any work."""
    import torch

    size = unet.config.sample_size
    c, h, w = unet.config.in_channels, *((size, size) if isinstance(size, int) else size)
    if not isinstance(data, torch.Tensor):
        raise ValueError(f"{flag} {spec!r} holds a {type(data).__name__}, not an image tensor; {DATA_FORMS}.")
    if data.ndim != 4 or tuple(data.shape[1:]) != (c, h, w):
        raise ValueError(
            f"{flag} {spec!r} holds images of shape {tuple(data.shape)} but the model takes (N, C, H, W) = "
            f"(N, {c}, {h}, {w}); give it {h}x{w} images with {c} channel(s)."
        )
    if len(data) < needed:
        fix = f"pass {count_flag} {len(data)} or more images" if count_flag else "pass more images"
        why = f"{count_flag} is {needed}" if count_flag else f"at least {needed} are needed"
        raise ValueError(f"{flag} {spec!r} holds {len(data)} images but {why}; {fix}.")


def model_table(args, model=None):
    """``--table`` if given (a missing local folder is never sent to the Hub), else the table the model ships;
    with ``model``, checked to belong to it (channels, weights) unless ``--force-table``."""
    table = load_table(args, model)
    if model is not None:
        table.check_model(model.unet, force=args.force_table)
    return table


def load_table(args, model=None):
    from ...table import VarianceTable

    if args.table:
        fix = "pass the --out folder of `analytic-sampler precompute` or a Hub repo id 'owner/name'."
        source = local_or_repo_id(args.table, fix)
        try:
            return VarianceTable.load(source)
        except ValueError as err:
            if os.path.exists(source):
                raise
            raise ValueError(f"--table {args.table!r} is no local folder (looked in {os.path.abspath(source)}; "
                             f"write ./{args.table} to mean one) and did not load as a Hub repo id: {err}") from err
    table = (model or load_pretrained(args.model)).table
    if table is None:
        raise SystemExit(f"{args.model} ships no variance table: run `analytic-sampler precompute {args.model} "
                         "--data ...` and pass --table.")
    return table
