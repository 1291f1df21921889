"""Joining the process group that torchrun / accelerate launch set up."""

from __future__ import annotations

import os


def start_distributed(device: str | None) -> tuple[int, str | None]:
    """Join the process group when launched by torchrun / accelerate (``WORLD_SIZE`` > 1): gloo on the CPU,
    nccl on GPUs, each rank on its ``LOCAL_RANK`` GPU. Returns ``(rank, device)``."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, device
    cuda = device is None and torch.cuda.is_available() or str(device).startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), device or "cpu"
