"""What the subcommands share in their arguments: argparse types, help texts and the run options."""

from __future__ import annotations

import argparse

DEVICE_HELP = "cpu, cuda, cuda:N or mps (checked before any work)"
THREADS_HELP = ("CPU threads of torch (default: OMP_NUM_THREADS if set, else one per core this process may use; "
                "waiting threads sleep instead of spinning, so a busy machine does not stall the run)")
OVERWRITE_HELP = "replace the results of an earlier run in --out (refused otherwise)"
FORCE_TABLE_HELP = ("use the table even where it was estimated for another model (other channels or weights; "
                    "refused otherwise)")
DATA_FORMS = "use digits:train, digits:heldout, a .pt/.npy file of images in [-1, 1] or an image folder"


def non_negative_int(text: str) -> int:
    """argparse type: an integer of at least 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative integer; pass 0 or more.")
    return int(text)


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer; pass 1 or more.")
    return value


def num_steps(text: str) -> int:
    """argparse type: a number of sampling steps K >= 2 (t = N-1 ... 0)."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: a trajectory needs at least 2 steps (t = N-1 and t = 0).")
    return value


def torch_device(text: str) -> str:
    """A torch device that this machine has, so that a missing GPU is reported before any work. Checked after the
    arguments are read (:func:`main`), so that ``--help`` and argument errors never import torch."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device; use cpu, cuda or cuda:N.") from err
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and hasattr(backend, "is_available") and not backend.is_available():
        name = {"cuda": "CUDA", "mps": "MPS"}.get(device.type, device.type)
        raise argparse.ArgumentTypeError(
            f"{name} is not available; use --device cpu, or install a torch build with {name} support "
            f"(this is torch {torch.__version__})."
        )
    if device.index is not None and hasattr(backend, "device_count") and device.index >= backend.device_count():
        raise argparse.ArgumentTypeError(
            f"{text!r}: this machine has {backend.device_count()} {device.type} device(s); "
            f"use {device.type}:0 to {device.type}:{backend.device_count() - 1}."
        )
    return text


def add_run_options(p: argparse.ArgumentParser) -> None:
    """``--seed``, ``--device`` (default cpu) and ``--threads``, as every command that runs the model takes them."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.add_argument("--threads", type=positive_int, default=None, help=THREADS_HELP)
