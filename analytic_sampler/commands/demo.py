"""The main job: Analytic-DPM next to the samplers a user would otherwise pick, in likelihood and in samples.

A short :func:`run_bench` on the bundled digits model: bits/dim at each K for DDPM's variances and Analytic-DPM's
(even and optimal trajectories), and FD-digits of DDIM (with the model's eps, and with eps from the clipped x0 as
Analytic-DDIM computes it), Analytic-DDIM, DPM-Solver++(2M), UniPC, Analytic-DPM with the scheduler's defaults
(``from_table(table)``: trailing spacing) and on the model's spacing (``from_table(table, config)``), and
Analytic-DDPM on the table's sample-quality trajectory, DPM-Solver++(2M) and UniPC on the timesteps fitted to the
model for them where its table has them, each but the defaults built on the model's own scheduler
config, all from the same initial noise, ranked with paired standard errors against the training digits, with the
real-data floor; and ``grid.png``: 10 samples per method and K, each row labelled. Writes ``results.{json,md}``,
``results_nll.png`` and ``results_fd.png`` too.

The default size, K = 10 with 2000 samples per method (the size of ``benchmarks/samplers.py``, whose cells its rows
reproduce), runs in under two minutes on 2 CPU cores (``benchmarks/results/demo.md``) and its paired standard errors
still rank these methods; ``full=True`` adds K = 25.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..evaluation.sampling import save_grid
from ..pretrained import load_pretrained
from .bench import BenchOptions, output_names, run_bench

#: the two "(fitted timesteps)" rows run where the table carries fitted timesteps (``precompute``, or a table the
#: demo estimates; not the bundled tables); DPM-Solver-v3 on the model's solver statistics (the bundled models ship
#: them), else on statistics the demo estimates beside its table
DEMO_METHODS = ("DDIM", "DDIM (eps from clipped x0)", "Analytic-DDIM", "DPM-Solver++(2M)", "UniPC",
                "Analytic-DPM (defaults)", "Analytic-DPM (model's spacing)", "Analytic-DDPM (sample trajectory)",
                "DPM-Solver++(2M) (fitted timesteps)", "UniPC (fitted timesteps)", "DPM-Solver-v3")
DEMO_STEPS, DEMO_IMAGES = (10,), 2000
FULL_STEPS, FULL_IMAGES = (10, 25), 2000
# Precompute budget when a model ships no table: 10 draws per timestep already match 200 on the even trajectory
# and give the residual DP its gain (benchmarks/results/cost.md, trajectory.md).
DEMO_TABLE_SAMPLES = 20
GRID_COLUMNS = 10
RESULTS, GRID = "results", "grid.png"
DEMO_OUTPUTS = (*output_names(RESULTS), GRID)


def run_demo(model_name: str, out_dir: str, steps=None, num_images: int | None = None, seed: int = 0,
             device: str = "cpu", overwrite: bool = False, full: bool = False) -> dict:
    """Run the demo into ``out_dir`` and return the results: ``num_images`` samples per method at each K of
    ``steps`` (defaults: K = 10 and 2000 samples; ``full``: K = 10 and 25); ``overwrite`` replaces a table of other
    settings that an earlier demo estimated there."""
    from ..digits import load_digits_split

    steps = tuple(steps or (FULL_STEPS if full else DEMO_STEPS))
    num_images = num_images or (FULL_IMAGES if full else DEMO_IMAGES)
    out = Path(out_dir)
    model = load_pretrained(model_name)
    rows: list[tuple[str, torch.Tensor]] = []
    options = BenchOptions(
        table_samples=DEMO_TABLE_SAMPLES, overwrite=overwrite, fd_samples=num_images, methods=DEMO_METHODS,
        on_samples=lambda method, k, images: rows.append((f"{method}, K={k}", images[:GRID_COLUMNS])),
        batch_size=1000, seed=seed, device=device, name=RESULTS,
    )
    result = run_bench(model, load_digits_split("train")[0], load_digits_split("heldout")[0], steps, out, options)
    grid = save_grid(torch.cat([images for _, images in rows]), out / GRID, nrow=GRID_COLUMNS,
                     row_labels=[label for label, _ in rows])
    print((out / f"{RESULTS}.md").read_text())
    print(f"wrote {grid} (one labelled row per method and K), {out / f'{RESULTS}.md'} and plots "
          f"in {result['seconds_total']:.0f} s")
    return result
