"""The main job: same model, fewer steps — Analytic-DDPM / Analytic-DDIM against DDPM / DDIM on a bundled model.

For each K it samples with the four methods from the same initial noise, scores every set with FD-digits
against the held-out digits, and writes ``grid.png``, ``results.json`` and ``results.md`` to the output folder.
"""

from __future__ import annotations

import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ._version import __version__
from .pretrained import load_pretrained
from .sampling import sample, save_grid
from .scheduler import AnalyticDPMScheduler
from .trajectory import even_trajectory

# Precompute budget when a model ships no table: the paper finds 10 draws per timestep already enough.
DEMO_TABLE_SAMPLES = 100


def baseline_schedulers(config, num_steps: int) -> dict[str, tuple[object, list[int] | None]]:
    """DDPM (fixed_small, even trajectory) and DDIM (``trailing`` spacing) as Diffusers runs them."""
    n = config["num_train_timesteps"]
    return {
        "DDPM": (DDPMScheduler.from_config(config, variance_type="fixed_small"), even_trajectory(n, num_steps)),
        "DDIM": (DDIMScheduler.from_config(config, timestep_spacing="trailing", set_alpha_to_one=True), None),
    }


def _table(model, out: Path):
    if model.table is not None:
        return model.table
    from .digits import load_digits_split
    from .moments import estimate_moments

    print(f"{model.source} ships no variance table: estimating one ({DEMO_TABLE_SAMPLES} draws per timestep)")
    table = estimate_moments(model.unet, load_digits_split("train")[0], model.scheduler, num_samples=DEMO_TABLE_SAMPLES,
                             batch_size=500, checkpoint=out / "table" / "checkpoint.pt")
    table.save(out / "table")
    return table


def run_demo(model_name: str, out_dir: str, steps=(10, 25), num_images: int = 297, seed: int = 0, device: str = "cpu") -> dict:
    """Sample every method at every K, score with FD-digits, write grid + tables; return the results."""
    from .digits import fd_digits, load_digits_split

    start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = load_pretrained(model_name)
    table = _table(model, out)
    config = dict(model.scheduler.config)
    heldout = load_digits_split("heldout")[0]
    rows, grids = [], []
    for k in steps:
        methods = {
            "Analytic-DDPM": (AnalyticDPMScheduler.from_table(table, config, eta=1.0), None),
            "Analytic-DDIM": (AnalyticDPMScheduler.from_table(table, config, eta=0.0), None),
            **baseline_schedulers(config, k),
        }
        for name, (scheduler, timesteps) in methods.items():
            t0 = time.time()
            images = sample(model.unet, scheduler, num_images, None if timesteps else k, timesteps, seed=seed, device=device)
            rows.append({"method": name, "K": k, "fd_digits": fd_digits(images, heldout), "seconds": time.time() - t0,
                         "trajectory": [int(t) for t in scheduler.timesteps]})
            grids.append(images[:10])
            print(f"K={k:4d} {name:14s} FD-digits {rows[-1]['fd_digits']:8.3f}")
    real_fd = fd_digits(load_digits_split("train")[0][: len(heldout)], heldout)
    save_grid(torch.cat(grids), out / "grid.png", nrow=10)

    result = {
        "model": model.source, "num_images": num_images, "seed": seed, "heldout_images": len(heldout),
        "fd_digits_train_vs_heldout": real_fd, "results": rows, "seconds_total": time.time() - start,
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        "device": device, "versions": {"analytic_sampler": __version__, "torch": torch.__version__},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(_markdown(result, steps))
    print(f"\nwrote {out / 'grid.png'} (rows: " + ", ".join(f"{r['method']} K={r['K']}" for r in rows)
          + f")\nwrote {out / 'results.md'} in {result['seconds_total']:.0f} s")
    return result


def _markdown(result: dict, steps) -> str:
    methods = list(dict.fromkeys(r["method"] for r in result["results"]))
    fd = {(r["method"], r["K"]): r["fd_digits"] for r in result["results"]}
    lines = [
        f"FD-digits to the {result['heldout_images']} held-out digits ({result['num_images']} samples per cell, "
        f"seed {result['seed']}; lower is better; not comparable with Inception FID). "
        f"Real train vs held-out images: {result['fd_digits_train_vs_heldout']:.3f}.",
        "",
        "| method | " + " | ".join(f"K={k}" for k in steps) + " |",
        "|---|" + "---:|" * len(steps),
        *(f"| {m} | " + " | ".join(f"{fd[(m, k)]:.3f}" for k in steps) + " |" for m in methods),
        "",
        f"Model {result['model']}; {result['machine']}; {result['versions']}; {result['date']}.",
    ]
    return "\n".join(lines) + "\n"
