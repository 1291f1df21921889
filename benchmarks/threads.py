"""Wall time of a short ``analytic-sampler precompute`` on a busy machine: torch's thread defaults against the
command's.

    python benchmarks/threads.py                     # 0, 2 and 4 competing busy loops, 5 samples per timestep
    python benchmarks/threads.py --quick             # smoke run: no competing load, 1 sample per timestep

Each configuration runs the real command in a fresh process (start-up and model loading included) on the bundled
``digits-ddpm-linear`` model, ``--num-samples`` images per timestep at all 1000 timesteps, while ``--busy`` other
processes spin on the CPU (``while True: pass``), on top of whatever else the machine runs:

- ``torch defaults`` (the command before it managed threads): torch is imported before the command, so OpenMP keeps
  its default wait policy (spin, then sleep) and torch its default thread count (one per core);
- ``command defaults``: ``analytic-sampler precompute`` as shipped (threads that sleep while they wait; one per
  available core);
- ``--threads 1``: one thread.

Configurations alternate within each repeat; the load average is recorded before every run. Writes
``threads.json`` / ``threads.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analytic_sampler.evaluation.provenance import environment, footer, write_results

MODEL = "digits-ddpm-linear"
CONFIGS = {  # name: (what it is, Python code that runs the command, extra arguments)
    "torch defaults": ("torch imported first: OpenMP's default waits (spin, then sleep), one thread per core",
                       "import sys, torch; from analytic_sampler.commands.cli import main; main(sys.argv[1:])", []),
    "command defaults": ("the command as shipped: waiting threads sleep (OMP_WAIT_POLICY=PASSIVE), one per core",
                         "from analytic_sampler.commands.cli import main; main()", []),
    "--threads 1": ("one thread", "from analytic_sampler.commands.cli import main; main()", ["--threads", "1"]),
}


def run_once(config: str, num_samples: int, timeout: float) -> dict:
    """Time one precompute in a fresh process; the load average (1 min) just before it."""
    _, code, extra = CONFIGS[config]
    out = tempfile.mkdtemp(prefix="threads-")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env["PYTHONPATH"] = str(ROOT)
    argv = ["precompute", MODEL, "--data", "digits:train", "--num-samples", str(num_samples), "--out", out,
            "--fit-paths", "0", *extra]  # the moments pass (and the sample cost) only, as before the fit existed
    load = os.getloadavg()[0]
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env,
                              timeout=timeout, check=False)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{config}: the command failed:\n{done.stderr[-3000:]}")
    except subprocess.TimeoutExpired:
        seconds = None
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"config": config, "seconds": seconds, "load_before": round(load, 2)}


def start_busy(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def stop_busy(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        p.terminate()
    for p in processes:
        p.wait()


def _cell(runs: list[dict], config: str, timeout: float) -> tuple[float, bool, str]:
    """Median wall time of ``config`` (a lower bound where a run timed out: counted at the limit), whether it is
    a bound, and the Markdown cell: median, then every run."""
    times = [x["seconds"] for x in runs if x["config"] == config]
    bound = None in times
    median = statistics.median(timeout if t is None else t for t in times)
    each = ", ".join(f"> {timeout:.0f}" if t is None else f"{t:.1f}" for t in times)
    return median, bound, f"{'> ' if bound else ''}{median:.1f} ({each})"


def markdown(r: dict) -> str:
    configs = list(CONFIGS)
    lines = [
        f"# Threads: a {r['num_samples']}-sample `precompute` of {MODEL} on a busy machine", "",
        (f"Wall time (s) of `analytic-sampler precompute {MODEL} --data digits:train --num-samples "
         f"{r['num_samples']}` in a fresh process, {r['cores']} cores available, with competing busy loops on top of "
         "the machine's other work: median (each run), runs stopped after "
         f"{r['timeout_s']:.0f} s counted as that; load average (1 min) when the level started, and its range "
         f"over the runs. Configurations alternate; {r['settle_s']:.0f} s of settling after the busy loops "
         "start."), "",
        *(f"- **{name}**: {CONFIGS[name][0]}" for name in configs), "",
        "| busy loops | load | " + " | ".join(configs) + " | torch defaults / command defaults |",
        "|---:|---:|" + "---:|" * len(configs) + "---:|",
    ]
    for level in r["levels"]:
        cells = {c: _cell(level["runs"], c, r["timeout_s"]) for c in configs}
        (before, bound, _), (after, _, _) = cells["torch defaults"], cells["command defaults"]
        loads = [x["load_before"] for x in level["runs"]]
        lines.append(f"| {level['busy']} | {level['load_before']:.1f} ({min(loads):.1f}-{max(loads):.1f}) | "
                     + " | ".join(cell for _, _, cell in cells.values())
                     + f" | {'> ' if bound else ''}{before / after:.1f}x |")
    lines += ["", footer(r)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 2, 4], help="competing busy loops per level")
    parser.add_argument("--num-samples", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--settle", type=float, default=10.0, help="seconds between starting busy loops and timing")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before a run counts as a timeout")
    parser.add_argument("--quick", action="store_true", help="smoke run: no busy loops, 1 sample, 1 repeat")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.busy, args.num_samples, args.repeats, args.settle = [0], 1, 1, 0.0

    from analytic_sampler.commands.runtime import available_cores

    levels = []
    for busy in args.busy:
        processes = start_busy(busy)
        try:
            time.sleep(args.settle)
            load = os.getloadavg()[0]
            runs = []
            for repeat in range(args.repeats):
                order = list(CONFIGS) if repeat % 2 == 0 else list(reversed(CONFIGS))
                for config in order:
                    runs.append(run_once(config, args.num_samples, args.timeout))
                    print(f"busy {busy}: {runs[-1]}", flush=True)
        finally:
            stop_busy(processes)
        levels.append({"busy": busy, "load_before": load, "runs": runs})

    result = {"model": MODEL, "num_samples": args.num_samples, "repeats": args.repeats, "settle_s": args.settle,
              "timeout_s": args.timeout,
              "cores": available_cores(), "levels": levels, **environment("cpu")}
    write_results(args.out, "threads", result, markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
