"""Where a figure came from: machine, versions and date, written next to every result file."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path


def environment(device: str = "cpu") -> dict:
    import diffusers
    import numpy
    import torch

    from .._version import __version__

    if str(device).startswith("cuda") and torch.cuda.is_available():
        where = torch.cuda.get_device_name(torch.device(device))
    else:
        where = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return {
        "device": where,
        "python": platform.python_version(),
        "versions": {"analytic_sampler": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "numpy": numpy.__version__},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # other work on the machine (1, 5 and 15 minute averages of runnable processes) slows every timing
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def footer(env: dict) -> str:
    v = env["versions"]
    load = env.get("load_average")
    return (f"Machine: {env['device']}; Python {env['python']}, torch {v['torch']}, diffusers {v['diffusers']}, "
            f"analytic-sampler {v['analytic_sampler']}; {env['date']}"
            + ("" if load is None else f"; load average {load[0]} / {load[1]} / {load[2]} (1 / 5 / 15 min)") + ".")


def write_results(out_dir: str | os.PathLike, name: str, data: dict, markdown: str) -> tuple[Path, Path]:
    """``<out>/<name>.json`` and ``<out>/<name>.md``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path
