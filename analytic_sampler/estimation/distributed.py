"""Running under a process group (torchrun, accelerate launch): joining it, and the collective steps of a
distributed estimate."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def start_distributed(device: str | None) -> tuple[int, str | None]:
    """Join the process group when launched by torchrun / accelerate (``WORLD_SIZE`` > 1): gloo on the CPU,
    nccl on GPUs, each rank on its ``LOCAL_RANK`` GPU. Returns ``(rank, device)``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, device
    cuda = device is None and torch.cuda.is_available() or str(device).startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), device or "cpu"


def world_rank() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_path(path: str, rank: int) -> str:
    """Rank 0 keeps ``path``; rank r > 0 writes ``<stem>.rank<r><suffix>`` beside it (no shared disk needed)."""
    if rank == 0:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}.rank{rank}{ext}"


def agree_on_start(start: int, state: torch.Tensor, world_size: int) -> tuple[int, torch.Tensor]:
    """Every rank starts from the least advanced checkpoint among the ranks (a rank killed before its last write
    is behind the others): ``(start, state)`` of that rank, whose state, identical on every rank that reached it,
    is broadcast into ``state``."""
    if world_size == 1:
        return start, state
    device = state.device
    starts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size)]
    dist.all_gather(starts, torch.tensor([start], dtype=torch.int64, device=device))
    starts = [int(x) for x in starts]
    source = starts.index(min(starts))
    dist.broadcast(state, src=source)
    return starts[source], state


def all_gather(part: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    """Every rank's ``part``, in rank order (``[part]`` alone without a process group)."""
    if world_size == 1:
        return [part]
    parts = [torch.empty_like(part) for _ in range(world_size)]
    dist.all_gather(parts, part)
    return parts
