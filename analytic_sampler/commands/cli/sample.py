"""``analytic-sampler sample``: a grid of samples with AnalyticDPMScheduler."""

from __future__ import annotations

from pathlib import Path

from ...pretrained import DEFAULT_MODEL, load_pretrained
from ..outputs import refuse_overwrite
from .arguments import FORCE_TABLE_HELP, add_run_options, positive_int
from .inputs import make_folder, model_table


def add_parser(subcommands) -> None:
    """The ``sample`` subcommand's arguments."""
    p = subcommands.add_parser("sample", help="sample a grid with AnalyticDPMScheduler")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--table", default=None, help="table folder or Hub repo id (default: the model's own)")
    p.add_argument("--force-table", action="store_true", help=FORCE_TABLE_HELP)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--trajectory", default="trailing",
                   choices=["leading", "linspace", "trailing", "optimal", "quadratic", "samples"],
                   help="the scheduler's timestep_spacing: Diffusers' spacings (trailing, the default, sampled best on "
                        "the bundled models), this package's trajectories (optimal: the likelihood DP), or samples: "
                        "the sample-quality trajectory of the table's sample cost")
    p.add_argument("--num-images", type=positive_int, default=64)
    add_run_options(p)
    p.add_argument("--out", default="samples.png", help="PNG file (its folder is created if missing)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=run, parser=p)


def run(args) -> None:
    from PIL import Image

    from ...evaluation.sampling import sample, save_grid
    from ...schedulers.analytic_dpm import AnalyticDPMScheduler

    if Path(args.out).suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--out {args.out!r} is not an image file name; end it in .png (or .jpg, ...).")
    refuse_overwrite(args.out, args.overwrite)
    model = load_pretrained(args.model)
    table = model_table(args, model)
    scheduler = AnalyticDPMScheduler.from_table(table, model.scheduler.config, eta=args.eta,
                                                timestep_spacing=args.trajectory)
    make_folder(Path(args.out).parent)
    images = sample(model.unet, scheduler, args.num_images, args.steps, seed=args.seed, device=args.device)
    print(f"trajectory: {scheduler.trajectory}")
    print(f"wrote {save_grid(images, args.out)}")
