"""Model-call time on a shared CPU: torch's OpenMP threads with the runtime's default wait policy (they spin a while
before sleeping) against OMP_WAIT_POLICY=PASSIVE (they sleep at once), with 1 and 2 threads, on an idle machine and
with busy processes competing for the cores. The command line sets PASSIVE when the cores are already busy.

    python benchmarks/threads.py            # 0, 1 and 2 competing busy processes
    python benchmarks/threads.py --quick    # fewer repeats

Each setting runs in a fresh process (the wait policy is read when OpenMP starts): the bundled linear model's UNet,
batches of 1000 8x8 digits, the median of the repeats. Writes ``threads.json`` and ``threads.md``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time

from analytic_sampler.evaluation.provenance import environment, footer, write_results

PROBE = """
import json, statistics, sys, time, torch
from analytic_sampler.pretrained import load_pretrained
torch.set_num_threads(int(sys.argv[1]))
unet = load_pretrained("digits-ddpm-linear").unet.eval()
x, t = torch.randn(1000, 1, 8, 8), torch.full((1000,), 500)
times = []
with torch.inference_mode():
    unet(x, t)
    for _ in range(int(sys.argv[2])):
        start = time.perf_counter()
        unet(x, t)
        times.append(time.perf_counter() - start)
print(json.dumps(statistics.median(times)))
"""


def _busy() -> None:
    while True:
        pass


def measure(threads: int, policy: str, repeats: int) -> float:
    """Median milliseconds per image of one forward pass of 1000 images, in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", PROBE, str(threads), str(repeats)], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 repeats, no competing processes")
    p.add_argument("--busy", type=int, nargs="+", default=None, help="numbers of competing busy processes (0 1 2)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    repeats, loads = (3, [0]) if args.quick else (9, args.busy or [0, 1, 2])
    rows = []
    for busy in loads:
        workers = [multiprocessing.Process(target=_busy, daemon=True) for _ in range(busy)]
        for w in workers:
            w.start()
        time.sleep(1.0 if busy else 0.0)
        try:
            for threads in (1, 2):
                for policy in ("default", "PASSIVE"):
                    seconds = measure(threads, policy, repeats)
                    rows.append({"busy_processes": busy, "threads": threads, "policy": policy,
                                 "ms_per_image": seconds, "load_average": [round(x, 2) for x in os.getloadavg()]})
                    print(f"busy {busy}, {threads} thread(s), {policy}: {seconds:.3f} ms/image", flush=True)
        finally:
            for w in workers:
                w.terminate()
    result = {"quick": args.quick, "repeats": repeats, "rows": rows, **environment("cpu")}
    lines = ["# Model calls on a shared CPU: OpenMP wait policy and threads", "",
             "The bundled linear model's UNet, 1000 8x8 digits per call, median of "
             f"{repeats} calls, each setting in a fresh process; busy = processes spinning on the cores meanwhile.", "",
             "| busy processes | threads | OMP_WAIT_POLICY | ms per image | load average (1 min) |",
             "|---:|---:|---|---:|---:|"]
    lines += [f"| {r['busy_processes']} | {r['threads']} | {r['policy']} | {r['ms_per_image']:.3f} | "
              f"{r['load_average'][0]} |" for r in rows]
    lines += ["", footer(result)]
    write_results(args.out, "threads", result, "\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
