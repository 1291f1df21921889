"""What `analytic-sampler bench` costs on a model it has never seen, given only PNG folders.

    python benchmarks/bench_unseen.py            # the linear bundled model's weights, K = 5 and 10, a 32-sample table
    python benchmarks/bench_unseen.py --quick    # smoke run: K = 5, a 4-sample table, 64 FD samples

The "unseen" model is the bundled linear model's UNet and its DDPM scheduler config saved to a fresh folder
without its table, so `bench` estimates a table (``--table-samples`` per timestep), the sample cost and a small fit
of the timesteps, then samples every row. The training and held-out digits are written as 8x8 grey PNG files, the
form a user's data comes in. Timed: the whole `bench` command, from its start to its report. Listed: the methods
whose rows carry a reference error at every K (the deterministic ones) and those without.

Writes ``bench_unseen.json`` / ``.md`` under ``--out``, with the bench report; their paths name ``--work`` (default
``benchmarks/.cache/bench_unseen``) as WORK. The report's own files and the estimated table stay under ``--work``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

import numpy as np  # noqa: E402
from diffusers import DDPMScheduler  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analytic_sampler.commands.cli import main as cli  # noqa: E402
from analytic_sampler.digits import load_digits_split  # noqa: E402
from analytic_sampler.evaluation.provenance import environment, footer, write_results  # noqa: E402
from analytic_sampler.pretrained import load_pretrained  # noqa: E402

BOUND_S = 600  # the bench of an unseen model must finish within this on 2 cores


def write_inputs(work: Path) -> tuple[Path, Path, Path]:
    """The model folder (UNet + DDPM scheduler config, no table) and the train / held-out PNG folders."""
    model = load_pretrained("digits-ddpm-linear", with_table=False)
    folder = work / "model"
    model.unet.save_pretrained(folder / "unet")
    DDPMScheduler.from_config(model.scheduler.config).save_pretrained(folder / "scheduler")
    splits = {}
    for split in ("train", "heldout"):
        splits[split] = work / split
        splits[split].mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(load_digits_split(split)[0]):
            pixels = np.rint((image[0].numpy() + 1) * 127.5).astype(np.uint8)
            Image.fromarray(pixels).save(splits[split] / f"{i:04d}.png")
    return folder, splits["train"], splits["heldout"]


def methods_by_ref_error(report: dict) -> dict[str, list[str]]:
    """The sample-quality methods with a reference error at every K, and those without one at some K."""
    rows = report["sample_quality"]["rows"]
    methods = sorted({row["method"] for row in rows})
    scored = [m for m in methods if all(r.get("ref_error") for r in rows if r["method"] == m)]
    return {"with": scored, "without": [m for m in methods if m not in scored]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--work", default=str(Path(__file__).resolve().parent / ".cache" / "bench_unseen"))
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)

    work = Path(args.work)
    model, train, heldout = write_inputs(work)
    steps, table_samples = (["5"], "4") if args.quick else (["5", "10"], "32")
    report_dir = work / "report"
    command = ["bench", str(model), "--data", str(train), "--eval-data", str(heldout), "--steps", *steps,
               "--table-samples", table_samples, "--out", str(report_dir), "--overwrite"]
    if args.quick:
        command += ["--fd-samples", "64"]
    env = environment("cpu")  # before the run: its load average is the machine's, not the run's
    start = time.perf_counter()
    cli(command)
    seconds = time.perf_counter() - start
    report = json.loads((report_dir / "bench.json").read_text())
    rows = report["sample_quality"]["rows"]
    result = {
        "command": "analytic-sampler " + " ".join(command),
        "seconds": seconds,
        "bound_s": BOUND_S,
        "table": report["table"],
        "rows_with_ref_error": sum(r.get("ref_error") is not None for r in rows),
        "rows": len(rows),
        "methods": methods_by_ref_error(report),
        "bench": report,
        **env,
    }
    text = json.dumps(result).replace(str(work), "WORK")  # the report names --work's folder as WORK
    result = json.loads(text)
    markdown_text = markdown(result, report_dir).replace(str(work), "WORK")
    write_results(args.out, "bench_unseen" + ("_quick" if args.quick else ""), result, markdown_text)
    return result


def markdown(r: dict, report_dir: Path) -> str:
    verdict = "within" if r["seconds"] <= r["bound_s"] else "over"
    bench_md = (report_dir / "bench.md").read_text().split("\n", 1)[1].strip()
    return "\n".join([
        "# `bench` on a model it has never seen, from PNG folders", "",
        f"`{r['command']}`", "",
        f"**{r['seconds']:.0f} s** for the whole command ({verdict} the {r['bound_s']} s bound), on a model folder "
        f"without a table: {r['table']}. {r['rows_with_ref_error']} of {r['rows']} sample-quality rows carry a "
        f"reference error, at every K: {', '.join(r['methods']['with'])}. Without one (stochastic samplers): "
        f"{', '.join(r['methods']['without'])}.", "",
        "The report as `bench` wrote it:", "", bench_md, "",
        footer(r), "",
    ])


if __name__ == "__main__":
    main()
