"""CPU threads of the commands: as many as the cores this process may use, waiting without spinning.

PyTorch's CPU kernels run on OpenMP threads, by default one per core of the machine, that spin for a while when
they wait for each other. Where other work holds the cores, a spinning thread keeps the sibling it waits for off
its core, and a run slows down several times over (``benchmarks/threads.py`` measures it). The commands therefore

- let OpenMP threads sleep while they wait (``OMP_WAIT_POLICY=PASSIVE``, unless the environment sets a policy; it
  takes effect where torch is not imported yet, as in the ``analytic-sampler`` command), and
- use ``--threads`` threads, else ``OMP_NUM_THREADS`` (which torch reads itself), else one per core this process may
  use (its CPU affinity, a container's CPU quota), shared among the processes of a ``torchrun`` node.

The count never follows the machine's load: the number of threads may change the order in which a kernel sums, and a
resumed estimate must give the table of an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

# cgroup v2, then v1: the CPU quota of a container (docker --cpus, Kubernetes limits)
CGROUP_QUOTA_FILES = (Path("/sys/fs/cgroup/cpu.max"),)
CGROUP_V1_FILES = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


def _cgroup_cpus() -> float | None:
    """CPUs allowed by the cgroup's quota (``quota / period``), ``None`` where there is no quota."""
    try:
        for path in CGROUP_QUOTA_FILES:
            if path.is_file():
                quota, period = path.read_text().split()[:2]
                return None if quota == "max" else int(quota) / int(period)
        quota_file, period_file = CGROUP_V1_FILES
        if quota_file.is_file() and period_file.is_file():
            quota, period = int(quota_file.read_text()), int(period_file.read_text())
            return None if quota <= 0 else quota / period
    except (OSError, ValueError):  # unreadable or unexpected: no quota known
        return None
    return None


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity (all CPUs where the platform has none), capped by the
    cgroup CPU quota rounded up."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_cpus()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def thread_cap() -> int | None:
    """Threads per process where this process may use fewer cores than the machine has (CPU affinity, a
    container's quota) or shares them with the other ``LOCAL_WORLD_SIZE`` processes ``torchrun`` started on this
    machine: the available cores shared evenly; ``None`` where torch's own default (one thread per core) applies."""
    per_node = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    cores = available_cores()
    return max(1, cores // per_node) if cores < (os.cpu_count() or cores) or per_node > 1 else None


def configure_threads(threads: int | None) -> None:
    """Set the threads of a command (see the module docstring): ``threads`` if given, else ``OMP_NUM_THREADS`` if
    set, else :func:`thread_cap` where it applies. Through the environment while torch is not imported yet (the
    command line's ``--help`` stays fast), through ``torch.set_num_threads`` after."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cap = thread_cap() if threads is None and "OMP_NUM_THREADS" not in os.environ else None
    torch = sys.modules.get("torch")
    if threads is None and cap is None:
        return
    if torch is None:
        os.environ["OMP_NUM_THREADS"] = str(threads or cap)
    else:
        torch.set_num_threads(threads or min(cap, torch.get_num_threads()))
