"""``analytic-sampler demo``: fewer steps on a bundled model (the work is
:func:`analytic_sampler.commands.demo.run_demo`)."""

from __future__ import annotations

import json
import time

from ...pretrained import DEFAULT_MODEL
from ..outputs import refuse_overwrite
from .arguments import OVERWRITE_HELP, add_run_options, num_steps, positive_int
from .inputs import make_folder


def add_parser(subcommands) -> None:
    """The ``demo`` subcommand's arguments."""
    p = subcommands.add_parser(
        "demo", help="fewer steps on a bundled model: bits/dim, FD-digits and a labelled sample grid")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--steps", type=num_steps, nargs="+", default=None, help="K values (default 10; --full: 10 25)")
    p.add_argument("--num-images", type=positive_int, default=None,
                   help="samples per method and K for FD-digits (default 2000)")
    p.add_argument("--full", action="store_true", help="the full-size run: K = 10 and 25, 2000 samples per method")
    add_run_options(p)
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=run, parser=p)


def run(args) -> None:
    from ..demo import DEMO_OUTPUTS, run_demo

    refuse_overwrite(args.out, args.overwrite, DEMO_OUTPUTS)
    out = make_folder(args.out)
    run_demo(args.model, args.out, steps=args.steps, num_images=args.num_images, seed=args.seed, device=args.device,
             overwrite=args.overwrite, full=args.full)
    seconds = time.perf_counter() - args.started
    result = json.loads((out / "results.json").read_text())
    result["seconds_command"] = seconds
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    line = f"The whole command took {seconds:.0f} s, from start to exit (with importing torch and loading the model)."
    (out / "results.md").write_text((out / "results.md").read_text() + "\n" + line + "\n")
    print(line)
