"""Fewer steps, same model: NLL (bits/dim) and FD-digits against K for each bundled model.

    python benchmarks/steps.py            # full run: K in {10, 25, 50, 100, 200, 1000}, all held-out digits
    python benchmarks/steps.py --quick    # smoke run: K in {10, 25}, few images (CI)

Writes ``steps.json``, ``steps.md`` and ``steps_<model>.png`` (NLL vs K, FD vs K) under ``--out``.
NLL: the K-step bound on the 297 held-out digits, on the even trajectory and the optimal one (the residual DP), discretised decoder over 8-bit bins with the same
decoder variance (``1 - abar[t_1]``) for every method. FD-digits: samples vs the held-out digits, the same
initial noise for every method.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from analytic_sampler.commands.bench import nll_rows as bench_nll_rows
from analytic_sampler.digits import fd_digits, load_digits_split
from analytic_sampler.evaluation.baselines import applies, build_sampler
from analytic_sampler.evaluation.provenance import environment, footer, write_results
from analytic_sampler.evaluation.sampling import sample
from analytic_sampler.pretrained import BUNDLED_MODELS, load_pretrained
from analytic_sampler.trajectory import even_trajectory

FULL_STEPS = (10, 25, 50, 100, 200, 1000)
QUICK_STEPS = (10, 25)
# At K = N every DDPM-type method runs the full chain; sampling all of them there would cost more than the
# rest of the benchmark together, so K = N samples only these (the learned one where the model has it).
FULL_CHAIN_METHODS = ("DDPM (btilde)", "Analytic-DDPM", "Analytic-DDPM (residual)", "Improved DDPM (learned)")


def nll_rows(model, table, heldout, steps, num_images, seed, device):
    """One row per (K, trajectory, variance): bits/dim ± stderr on the held-out images, as ``bench`` measures it."""
    rows = bench_nll_rows(model, table, heldout[:num_images], steps, batch_size=num_images, seed=seed, device=device)
    for r in rows:
        print(f"  NLL K={r['K']:4d} {r['trajectory']:7s} {r['variance']:8s} {r['bpd']:8.3f} ± {r['stderr']:.3f}", flush=True)
    return rows


#: The rows of the FD section and their trajectories: DDPM-type rows on the even trajectory, DDIM-type rows on
#: DDIMScheduler's "trailing" timesteps (each pair isolates the variance), DPM-Solver++ and the DP rows on their own.
FD_METHODS = {"DDPM (btilde)": "even", "DDPM (beta)": "even", "Analytic-DDPM": "even", "DDIM": "trailing",
              "Analytic-DDIM": "trailing", "Analytic-DDPM (residual)": "even",
              "Analytic-DDPM (optimal trajectory)": None, "Improved DDPM (learned)": "even", "DPM-Solver++(2M)": None}


def fd_rows(model, table, heldout, steps, num_images, seed, device):
    """One row per (K, method): FD-digits of ``num_images`` samples to the held-out digits."""
    config = model.scheduler.config
    rows = []
    for k in steps:
        for name, spacing in FD_METHODS.items():
            if not applies(name, config, table) or (k == config.num_train_timesteps and name not in FULL_CHAIN_METHODS):
                continue
            even = even_trajectory(config.num_train_timesteps, k) if spacing == "even" else None
            sampler = build_sampler(name, config, table, spacing if spacing == "trailing" else None, even)
            t0 = time.time()
            images = sample(model.unet, sampler.scheduler, num_images, None if even else k, even, seed=seed,
                            device=device, progress=False, **sampler.step_kwargs)
            rows.append({"K": k, "method": name, "fd_digits": fd_digits(images, heldout), "num_images": num_images,
                         "seconds": time.time() - t0})
            print(f"  FD  K={k:4d} {name:24s} {rows[-1]['fd_digits']:8.3f}", flush=True)
    return rows


def markdown(result: dict) -> str:
    out = [f"# Fewer steps: NLL and FD-digits against K{' (quick mode)' if result['quick'] else ''}", ""]
    for m in result["models"]:
        steps = m["steps"]
        head = "| " + " | ".join(f"K={k}" for k in steps) + " |"
        out += [f"## {m['model']}", "",
                f"NLL (bits/dim, ± standard error over {m['nll'][0]['num_images']} held-out digits; lower is better):", "",
                "| variance | trajectory " + head, "|---|---|" + "---:|" * len(steps)]
        cells = {(r["variance"], r["trajectory"], r["K"]): r for r in m["nll"]}
        for variance in dict.fromkeys(r["variance"] for r in m["nll"]):
            for traj in ("even", "optimal"):
                row = [cells[(variance, traj, k)] for k in steps]
                out.append(f"| {variance} | {traj} | " + " | ".join(f"{r['bpd']:.3f} ± {r['stderr']:.3f}" for r in row) + " |")
        fd = {(r["method"], r["K"]): r["fd_digits"] for r in m["fd"]}
        out += ["", f"FD-digits ({m['fd'][0]['num_images']} samples vs the {m['heldout_images']} held-out digits; "
                f"{m['fd'][0]['num_images']} real train digits vs held-out: {m['fd_real']:.3f}; lower is better; "
                "— : not run, see below):", "",
                "| method " + head, "|---|" + "---:|" * len(steps)]
        for method in dict.fromkeys(r["method"] for r in m["fd"]):
            out.append(f"| {method} | " + " | ".join(f"{fd[(method, k)]:.3f}" if (method, k) in fd else "—" for k in steps) + " |")
        out += ["", f"At K={max(steps)} only {', '.join(FULL_CHAIN_METHODS)} are sampled (the full chain). "
                f"Run time {m['seconds']:.0f} s.", ""]
    out.append(footer(result))
    return "\n".join(out) + "\n"


def plot(result: dict, out_dir) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for m in result["models"]:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for variance in dict.fromkeys(r["variance"] for r in m["nll"]):
            for traj, style in (("even", "--"), ("optimal", "-")):
                rows = [r for r in m["nll"] if r["variance"] == variance and r["trajectory"] == traj]
                if rows:
                    ax1.plot([r["K"] for r in rows], [r["bpd"] for r in rows], style, marker="o", label=f"{variance} ({traj})")
        ax1.set(xscale="log", yscale="log", xlabel="K", ylabel="NLL bound (bits/dim)", title=f"{m['model']}: NLL")
        ax1.legend(fontsize=7)
        for method in dict.fromkeys(r["method"] for r in m["fd"]):
            rows = [r for r in m["fd"] if r["method"] == method]
            ax2.plot([r["K"] for r in rows], [r["fd_digits"] for r in rows], marker="o", label=method)
        ax2.axhline(m["fd_real"], color="grey", lw=0.8, label="real train vs held-out")
        ax2.set(xscale="log", yscale="log", xlabel="K", ylabel="FD-digits", title=f"{m['model']}: sample quality")
        ax2.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(f"{out_dir}/steps_{m['model']}.png", dpi=110)
        plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="K in {10, 25} and few images: a smoke run of a minute or two")
    p.add_argument("--models", nargs="+", default=list(BUNDLED_MODELS))
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nll-images", type=int, default=297, help="held-out digits in the NLL (all 297 by default)")
    p.add_argument("--fd-images", type=int, default=150, help="samples per FD-digits cell (same count of real train images for the reference)")
    args = p.parse_args(argv)
    steps = QUICK_STEPS if args.quick else FULL_STEPS
    heldout = load_digits_split("heldout")[0]
    nll_images, fd_images = (32, 64) if args.quick else (args.nll_images, args.fd_images)
    fd_real = fd_digits(load_digits_split("train")[0][:fd_images], heldout)
    result = {"quick": args.quick, "seed": args.seed, **environment(args.device), "models": []}
    for name in args.models:
        t0 = time.time()
        print(f"{name}:", flush=True)
        model = load_pretrained(name)
        if model.table is None:
            raise SystemExit(f"{name} ships no variance table; run `analytic-sampler precompute {name} ...` first.")
        with torch.inference_mode():
            nll = nll_rows(model, model.table, heldout, steps, nll_images, args.seed, args.device)
            fd = fd_rows(model, model.table, heldout, steps, fd_images, args.seed, args.device)
        result["models"].append({"model": name, "steps": list(steps), "heldout_images": len(heldout), "fd_real": fd_real,
                                 "nll": nll, "fd": fd, "seconds": time.time() - t0})
    json_path, md_path = write_results(args.out, "steps", result, markdown(result))
    plot(result, args.out)
    print(f"wrote {json_path} and {md_path}")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
