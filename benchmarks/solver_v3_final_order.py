"""DPM-Solver-v3 with and without ``lower_order_final`` on trajectories that end near t = 0 and on those that stop
early, both bundled models: the reference error of each (the RMS distance to a 500-step DPM-Solver++(3M) solution
from the same x_T, as in ``solver_v3.py``), mean over samples ± standard error.

    python benchmarks/solver_v3_final_order.py      # the bundled models' statistics; --quick for a smoke run

Trajectories: ``uniform K to T``, K timesteps evenly spaced from N-1 to T (T = 0: Diffusers' "leading" ends there);
``linspace K``, UniPC's and DPM-Solver++'s "linspace" (ends near N / K); ``logsnr K``, the scheduler's own spacing
(ends at 40).
Writes ``solver_v3_final_order.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import UniPCMultistepScheduler  # noqa: E402
from solver_v3 import REFERENCE_STEPS, reference_solution, rms  # noqa: E402

from analytic_sampler import DPMSolverV3Scheduler  # noqa: E402
from analytic_sampler.evaluation.provenance import environment, footer, write_results  # noqa: E402
from analytic_sampler.evaluation.sampling import sample  # noqa: E402
from analytic_sampler.pretrained import BUNDLED_MODELS, load_pretrained  # noqa: E402
from analytic_sampler.solver_statistics import logsnr_timesteps  # noqa: E402


def trajectories(config, abar: np.ndarray) -> dict[str, list[int]]:
    def multistep_linspace(k: int) -> list[int]:  # UniPC's and DPM-Solver++'s "linspace" (DDIM's differs)
        scheduler = UniPCMultistepScheduler.from_config(config, timestep_spacing="linspace")
        scheduler.set_timesteps(k)
        return scheduler.timesteps.tolist()

    def uniform(k: int, last: int) -> list[int]:
        return np.unique(np.linspace(last, abar.size - 1, k).round()).astype(int)[::-1].tolist()

    out = {f"uniform {k} to {last}": uniform(k, last) for last in (0, 10) for k in (5, 10, 25, 100)}
    out.update({f"linspace {k}": multistep_linspace(k) for k in (5, 10)})
    out.update({f"logsnr {k}": logsnr_timesteps(abar, k, 40, 2.5) for k in (5, 10)})
    return out


def run_model(name: str, n: int, orders: tuple[int, ...], reference_steps: int, max_steps: int) -> list[dict]:
    model = load_pretrained(name)
    stats = model.solver_statistics
    reference = reference_solution(model, n, 0, reference_steps)
    abar = model.scheduler.alphas_cumprod.numpy().astype(np.float64)
    rows = []
    for label, timesteps in trajectories(model.scheduler.config, abar).items():
        if len(timesteps) > max_steps:
            continue
        for order in orders:
            row = {"model": name, "trajectory": label, "order": order, "timesteps": timesteps}
            for final in (False, True):
                scheduler = DPMSolverV3Scheduler.from_table(stats, model.scheduler.config, solver_order=order,
                                                            lower_order_final=final)
                images = sample(model.unet, scheduler, n, None, timesteps, seed=0, batch_size=1000, progress=False)
                error = rms(images, reference)
                row[f"lower_order_final={final}"] = [float(error.mean()), float(error.std() / len(error) ** 0.5)]
            rows.append(row)
            print(name, label, order, row["lower_order_final=False"][0], row["lower_order_final=True"][0], flush=True)
    return rows


def markdown(result: dict) -> str:
    lines = ["# DPM-Solver-v3: `lower_order_final` on and off", "",
             f"Reference error (RMS distance to the {result['reference_steps']}-step DPM-Solver++(3M) solution from "
             f"the same x_T, mean ± SE over {result['num_samples']} samples of seed 0). Statistics: the bundled "
             "models'.", "",
             "| model | trajectory | order | off | on | off / on |", "|---|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        (off, off_se), (on, on_se) = r["lower_order_final=False"], r["lower_order_final=True"]
        lines.append(f"| {r['model']} | {r['trajectory']} | {r['order']} | {off:.4f} ± {off_se:.4f} | "
                     f"{on:.4f} ± {on_se:.4f} | {off / on:.2f} |")
    return "\n".join([*lines, "", footer(result), ""])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 8 samples, a 20-step reference, K <= 10")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    env = environment("cpu")
    n, steps, max_steps = (8, 20, 10) if args.quick else (args.num_samples, REFERENCE_STEPS, 100)
    rows = [row for name in BUNDLED_MODELS for row in run_model(name, n, (2, 3), steps, max_steps)]
    result = {"quick": args.quick, "num_samples": n, "reference_steps": steps, "rows": rows, **env}
    write_results(args.out, "solver_v3_final_order", result, markdown(result))
    return result


if __name__ == "__main__":
    main()
