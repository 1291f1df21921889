"""``analytic-sampler`` command: precompute a table, inspect trajectories, sample, run the demo."""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

from ..pretrained import (
    BUNDLED_MODELS,
    DEFAULT_MODEL,
    TABLE_SUBFOLDER,
    load_pretrained,
    local_or_repo_id,
)
from ..schedule import SPACINGS
from ..table import REESTIMATE_HINT
from .outputs import refuse_overwrite
from .runtime import configure_threads

DEVICE_HELP = "cpu, cuda, cuda:N or mps (checked before any work)"
THREADS_HELP = ("CPU threads of torch (default: OMP_NUM_THREADS if set, else one per core this process may use; "
                "waiting threads sleep instead of spinning, so a busy machine does not stall the run)")
OVERWRITE_HELP = "replace the results of an earlier run in --out (refused otherwise)"
FORCE_TABLE_HELP = ("use the table even where it was estimated for another model (other channels or weights; "
                    "refused otherwise)")
DATA_FORMS = "use digits:train, digits:heldout, a .pt/.npy file of images in [-1, 1] or an image folder"


def _non_negative_int(text: str) -> int:
    """argparse type: an integer of at least 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative integer; pass 0 or more.")
    return int(text)


def _positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer; pass 1 or more.")
    return value


def _steps(text: str) -> int:
    """argparse type: a number of sampling steps K >= 2 (t = N-1 ... 0)."""
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: a trajectory needs at least 2 steps (t = N-1 and t = 0).")
    return value


def _device(text: str) -> str:
    """A torch device that this machine has, so that a missing GPU is reported before any work. Checked after the
    arguments are read (:func:`main`), so that ``--help`` and argument errors never import torch."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device; use cpu, cuda or cuda:N.") from err
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and hasattr(backend, "is_available") and not backend.is_available():
        name = {"cuda": "CUDA", "mps": "MPS"}.get(device.type, device.type)
        raise argparse.ArgumentTypeError(
            f"{name} is not available; use --device cpu, or install a torch build with {name} support "
            f"(this is torch {torch.__version__})."
        )
    if device.index is not None and hasattr(backend, "device_count") and device.index >= backend.device_count():
        raise argparse.ArgumentTypeError(
            f"{text!r}: this machine has {backend.device_count()} {device.type} device(s); "
            f"use {device.type}:0 to {device.type}:{backend.device_count() - 1}."
        )
    return text


def _make_folder(folder: str | os.PathLike) -> Path:
    """Create an output folder and its parents before any work; a clear error where that is impossible."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"cannot create the output folder {str(path)!r} ({err.strerror}); choose another --out."
        ) from err
    return path


def _load_data(spec: str, channels: int, flag: str = "--data"):
    """``digits:train`` / ``digits:heldout``, a ``.pt`` / ``.npy`` tensor file, or every image of a folder."""
    import numpy as np
    import torch

    if spec.startswith("digits:"):
        from ..digits import load_digits_split

        return load_digits_split(spec.split(":", 1)[1])[0]
    path = _existing_path(spec, flag, DATA_FORMS)
    if os.path.isdir(path):
        from ..estimation.data import iter_batches

        return torch.cat(list(iter_batches(path, batch_size=1024, channels=channels)))
    if path.endswith(".pt"):
        return torch.load(path, map_location="cpu")
    if path.endswith(".npy"):
        return torch.from_numpy(np.load(path))
    raise ValueError(f"{flag} {spec!r}: not a .pt/.npy file; {DATA_FORMS}.")


def _existing_path(spec: str, flag: str, forms: str) -> str:
    """``spec`` with ``~`` expanded; a clear error naming ``flag`` and where it looked when nothing is there."""
    path = os.path.expanduser(spec)
    if not os.path.exists(path):
        raise ValueError(f"{flag} {spec!r}: no such file or folder (looked in {os.path.abspath(path)}); {forms}.")
    return path


def _check_data(data, unet, spec: str, flag: str = "--data", needed: int = 1, count_flag: str | None = None) -> None:
    """Refuse data that is not a ``(N, C, H, W)`` tensor of the UNet's channels and size, or that holds fewer
    than ``needed`` images, before any work."""
    import torch

    size = unet.config.sample_size
    c, h, w = unet.config.in_channels, *((size, size) if isinstance(size, int) else size)
    if not isinstance(data, torch.Tensor):
        raise ValueError(f"{flag} {spec!r} holds a {type(data).__name__}, not an image tensor; {DATA_FORMS}.")
    if data.ndim != 4 or tuple(data.shape[1:]) != (c, h, w):
        raise ValueError(
            f"{flag} {spec!r} holds images of shape {tuple(data.shape)} but the model takes (N, C, H, W) = "
            f"(N, {c}, {h}, {w}); give it {h}x{w} images with {c} channel(s)."
        )
    if len(data) < needed:
        fix = f"pass {count_flag} {len(data)} or more images" if count_flag else "pass more images"
        why = f"{count_flag} is {needed}" if count_flag else f"at least {needed} are needed"
        raise ValueError(f"{flag} {spec!r} holds {len(data)} images but {why}; {fix}.")


def _timesteps(spec: str, num_train_timesteps: int) -> list[int] | None:
    """``all`` (``None``), ``even:K`` or a comma list of distinct timesteps, checked against the schedule."""
    from ..trajectory import even_trajectory

    n = num_train_timesteps
    try:
        if spec == "all":
            return None
        if spec.startswith("even:"):
            return sorted(even_trajectory(n, int(spec.split(":", 1)[1])))
        ts = sorted(int(t) for t in spec.split(","))
        if ts[0] >= 0 and ts[-1] < n and len(set(ts)) == len(ts):
            return ts
    except ValueError:
        pass
    raise ValueError(
        f"--timesteps {spec!r} is not one of the accepted forms: all, even:K with 2 <= K <= {n}, "
        f"or a comma list of distinct timesteps in [0, {n - 1}] such as {n - 1},{n // 2},0."
    )


def cmd_precompute(args) -> None:
    import torch

    from ..estimation.distributed import start_distributed
    from ..pretrained import is_latent_pipeline_model, load_pipeline, resolve

    rank, args.device = start_distributed(args.device)
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    source = resolve(args.model)
    latent = is_latent_pipeline_model(source, args.revision)
    if not latent and (args.prompt is not None or args.captions or args.guidance_scale is not None):
        raise ValueError(f"--prompt, --captions and --guidance-scale are for latent text-to-image pipelines; "
                         f"{args.model} has no VAE (no model_index.json naming one).")
    if args.out is None:
        if args.model in BUNDLED_MODELS or not os.path.isdir(source):
            raise ValueError(f"pass --out: {args.model} is not a local model folder to store the table beside.")
        args.out = os.path.join(source, TABLE_SUBFOLDER)
    provenance = {"model_id": args.model, "revision": args.revision, "data": args.data}
    if latent:  # the data and prompts are checked before the pipeline loads
        data = _pipeline_data(args)
        model = load_pipeline(source, args.revision, torch_dtype=dtype)
        schedule = model.scheduler
        options = dict(prompt=args.prompt, captions=args.captions, guidance_scale=args.guidance_scale,
                       negative_prompt=args.negative_prompt, latent=args.latent)
    else:
        model = load_pretrained(source, revision=args.revision, with_table=False, torch_dtype=dtype)
        data, schedule, options = _load_data(args.data, model.unet.config.in_channels), model.scheduler, {}
        _check_data(data, model.unet, args.data, needed=1 if args.sample_cost_only else args.num_samples,
                    count_flag="--num-samples")
    timesteps = _timesteps(args.timesteps, schedule.config.num_train_timesteps)
    _make_folder(args.out)
    if not args.sample_cost_only:
        _moments_pass(args, rank, model if latent else model.unet, data, schedule, timesteps, provenance, options)
    if rank != 0:  # the sample cost is one process's pass
        return
    if latent and (args.paths or args.sample_cost_only):
        print("the sample cost (sample-quality trajectory) is not estimated for latent pipelines by this command: "
              "encode latents and call precompute_sample_cost(unet, latents, scheduler, out=...) in Python.")
    elif args.paths or args.sample_cost_only:
        _sample_cost_pass(args, model.unet, data, schedule)


def _moments_pass(args, rank: int, model, data, schedule, timesteps, provenance: dict, options: dict) -> None:
    """The first pass of precompute: the table's moments (resumable, never mixed with another run's)."""
    from ..estimation.precompute import precompute_table

    done = precompute_table(
        model, data, schedule, out=args.out, overwrite=args.overwrite,
        keep_checkpoint=args.keep_checkpoint, num_samples=args.num_samples, timesteps=timesteps,
        batch_size=args.batch_size, seed=args.seed, device=args.device, checkpoint=args.checkpoint,
        checkpoint_every=args.checkpoint_every,
        noise_device=args.noise_device, compile=args.compile, provenance=provenance, **options,
    )
    if rank == 0:  # every rank holds the same table
        if done.status == "unchanged":
            print(f"{done.table}\n{args.out} already holds the table of these settings (the same weights, data and "
                  "options); nothing to do (--overwrite estimates it again only if it differs)")
        else:
            kept = " (checkpoint kept)" if args.keep_checkpoint else ""
            print(f"{done.table}\nsaved to {args.out}{kept}")


def _sample_cost_pass(args, unet, data, schedule) -> None:
    """The second pass of precompute: the sample cost of `trajectory --for samples`, its model calls stated."""
    from ..estimation.precompute import precompute_sample_cost
    from ..sample_trajectory import DEFAULT_PATHS, candidate_timesteps

    grid = candidate_timesteps(schedule.config.num_train_timesteps, args.candidates).size
    paths = min(args.paths or DEFAULT_PATHS, len(data))  # one path per image
    print(f"sample cost (for `trajectory --for samples`): {paths} paths x {grid} candidate timesteps = "
          f"{paths * grid} model calls")
    done = precompute_sample_cost(unet, data, schedule, out=args.out, num_paths=paths, candidates=args.candidates,
                                  overwrite=args.overwrite, keep_checkpoint=args.keep_checkpoint,
                                  force_table=args.force_table, batch_size=args.batch_size, seed=args.seed,
                                  device=args.device)
    if done.status == "unchanged":
        print(f"{args.out} already holds the sample cost of these settings; nothing to do")
    else:
        print(f"{done.table}\nsaved to {args.out}")


def _pipeline_data(args) -> str:
    """A latent pipeline's ``--data``: a folder of images, streamed, checked to hold ``--num-samples`` images with
    a prompt for each (``--prompt``, ``--captions`` or the folder's own metadata file)."""
    from ..estimation.data import folder_files
    from ..estimation.latents import CAPTION_FILES, resolve_prompts

    spec, needed = args.data, args.num_samples
    if not os.path.isdir(os.path.expanduser(spec)):
        _existing_path(spec, "--data", "a latent pipeline reads a folder of images (with captions beside them)")
        raise ValueError(f"--data {spec!r}: a latent pipeline reads a folder of images (with captions beside them).")
    spec = os.path.expanduser(spec)
    count = len(folder_files(spec))
    if count < needed:
        raise ValueError(f"--data {spec!r} holds {count} images but --num-samples is {needed}; pass --num-samples "
                         f"{count} or more images.")
    if args.prompt is None and args.captions is None and not any(
        os.path.isfile(os.path.join(spec, name)) for name in CAPTION_FILES
    ):
        raise ValueError(f"--data {spec!r} has no captions ({' or '.join(CAPTION_FILES)}) and the pipeline is "
                         "text-conditioned: pass --prompt '...' (one prompt for every image; --prompt '' for the "
                         "unconditional model) or --captions FILE (.txt with one line per image, .jsonl or .csv).")
    resolve_prompts(spec, needed, args.prompt, args.captions)
    return spec


def _table(args, model=None):
    """``--table`` if given (a missing local folder is never sent to the Hub), else the table the model ships;
    with ``model``, checked to belong to it (channels, weights) unless ``--force-table``."""
    table = _load_table(args, model)
    if model is not None:
        table.check_model(model.unet, force=args.force_table)
    return table


def _load_table(args, model=None):
    from ..table import VarianceTable

    if args.table:
        fix = "pass the --out folder of `analytic-sampler precompute` or a Hub repo id 'owner/name'."
        source = local_or_repo_id(args.table, fix)
        try:
            return VarianceTable.load(source)
        except ValueError as err:
            if os.path.exists(source):
                raise
            raise ValueError(f"--table {args.table!r} is no local folder (looked in {os.path.abspath(source)}; "
                             f"write ./{args.table} to mean one) and did not load as a Hub repo id: {err}") from err
    table = (model or load_pretrained(args.model)).table
    if table is None:
        raise SystemExit(f"{args.model} ships no variance table: run `analytic-sampler precompute {args.model} --data ...` and pass --table.")
    return table


def cmd_trajectory(args) -> None:
    import numpy as np

    from ..evaluation.likelihood import predicted_transitions_bpd
    from ..trajectory import TrajectoryDP, even_trajectory

    if args.json:
        _make_folder(Path(args.json).parent)
    table = _table(args)
    if args.goal == "samples":
        return _sample_trajectories(args, table)
    abar, n, k_max = table.alphas_cumprod, table.num_train_timesteps, max(args.steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the paper's DP is shown on purpose, beside the residual one
        paper = TrajectoryDP(abar, table.ms_eps, k_max, data_range=table.data_range, ms_x0=table.ms_x0)
        paths = {"even": lambda k: even_trajectory(n, k), "paper DP": paper.path}
    samples = int(np.median(table.counts[table.estimated])) if table.estimated.any() else 0
    print(f"table: {int(table.estimated.sum())} of {n} timesteps estimated, {samples} samples per timestep")
    if not table.has_x0_mse:
        print(f"this table has no x0_mse, so no bound can be predicted and the residual DP is unavailable; "
              f"{REESTIMATE_HINT}.")
        for k in args.steps:
            print(f"K={k} paper DP: {paths['paper DP'](k)}")
        return
    paths["residual DP"] = TrajectoryDP(abar, None, k_max, x0_mse=table.x0_mse).path

    def predict(path, variance):
        return predicted_transitions_bpd(abar, path, table.x0_mse, table.x0_mse_stderr, variance, table.ms_eps,
                                         table.data_range, table.ms_x0)

    print("predicted bits/dim of the K-1 transitions (prior and decoder terms, the same for every trajectory here, "
          "left out), residual variance | analytic variance, ± the table's standard error. Every trajectory here ends "
          "at t_1 = 0; bits/dim compare only between trajectories that end at the same t_1:")
    print(f"{'K':>5}  " + "  ".join(f"{name:>29}" for name in paths))
    report, untrusted = {}, []
    for k in args.steps:
        rows = {name: path(k) for name, path in paths.items()}
        cells = {name: (predict(p, "residual"), predict(p, "analytic")) for name, p in rows.items()}
        print(f"{k:>5}  " + "  ".join(
            f"{res[0]:7.3f}±{res[1]:.3f} | {ana[0]:7.3f}±{ana[1]:.3f}" for res, ana in cells.values()))
        gain = cells["even"][0][0] - cells["residual DP"][0][0]
        spread = np.hypot(cells["even"][0][1], cells["residual DP"][0][1])
        if not gain > 3 * spread:  # NaN standard errors count as untrusted too
            untrusted.append(k)
        report[k] = {name: {"timesteps": p, "residual_bpd": cells[name][0][0], "analytic_bpd": cells[name][1][0],
                            "stderr": cells[name][0][1]} for name, p in rows.items()}
    for k in args.steps:
        print(f"K={k} residual DP: {report[k]['residual DP']['timesteps']}")
    if untrusted:
        print(f"warning: at K={', '.join(map(str, untrusted))} the residual DP's predicted gain over the even "
              f"trajectory is under 3 standard errors of this table ({samples} samples per timestep); the DP may "
              "be fitting noise there: estimate a larger table (precompute --num-samples) before relying on it.")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")


def _sample_trajectories(args, table) -> None:
    """``trajectory --for samples``: the sample-quality trajectory for each K and its bound."""
    from ..sample_trajectory import DEFAULT_SIGMA_MIN, SampleCost, SampleTrajectoryDP

    cost = SampleCost.from_table(table)
    sigma_min = DEFAULT_SIGMA_MIN if args.sigma_min is None else (args.sigma_min or None)
    dp = SampleTrajectoryDP(table.alphas_cumprod, cost, max(args.steps), sigma_min=sigma_min)
    print(f"sample-quality trajectory: Align Your Steps' bound (nats per dimension) on the KL from holding x0_hat "
          f"fixed over each interval, counted down to noise level sigma_min={sigma_min}; estimated from "
          f"{cost.num_paths} "
          f"forward paths on {cost.timesteps.size} candidate timesteps. Pass the timesteps to any scheduler that takes "
          "them (scheduler.set_timesteps(timesteps=...), analytic_sampler.apply_timesteps). These trajectories end at "
          "t_1 > 0 (the sampler returns x0_hat there): their bits/dim do not compare with trajectories that end at "
          "t_1 = 0 (trajectory --for likelihood).")
    report = {}
    for k in args.steps:
        path = dp.path(k)
        report[k] = {"timesteps": path, "bound_nats_per_dim": dp.cost(k), "t_1": path[-1]}
        print(f"K={k}: bound {dp.cost(k):.4f}, t_1 = {path[-1]}: {path}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")


def cmd_nll(args) -> None:
    from ..evaluation.likelihood import nll_bpd
    from ..trajectory import (
        TrajectoryDP,
        even_trajectory,
        quadratic_trajectory,
        validate_timesteps,
    )

    model = load_pretrained(args.model)
    data = _load_data(args.data, model.unet.config.in_channels)
    _check_data(data, model.unet, args.data)
    data = data[: args.num_images]
    table = _table(args, model) if args.variance in ("analytic", "residual") or args.trajectory == "optimal" else None
    n = model.scheduler.config.num_train_timesteps
    if args.timesteps:
        try:
            timesteps = validate_timesteps([int(t) for t in args.timesteps.split(",")], n)
        except ValueError as err:
            raise ValueError(f"--timesteps {args.timesteps!r}: {err}") from err
    elif args.trajectory == "optimal":
        timesteps = TrajectoryDP(table.alphas_cumprod, None, args.steps,
                                 x0_mse=table.require_x0_mse("the optimal trajectory")).path(args.steps)
    else:
        timesteps = (even_trajectory if args.trajectory == "even" else quadratic_trajectory)(n, args.steps)
    if args.variance == "residual":
        table.require_x0_mse()
    r = nll_bpd(model.unet, data, model.scheduler, timesteps, args.variance,
                ms_eps=None if table is None else table.ms_eps, x0_mse=None if table is None else table.x0_mse,
                batch_size=args.batch_size, seed=args.seed, device=args.device,
                ms_x0=None if table is None else table.ms_x0)
    print(f"{r.mean:.4f} ± {r.stderr:.4f} bits/dim ({args.variance} variance, K={len(timesteps)}, "
          f"{r.num_samples} images, seed {args.seed}; prior {r.prior:.4f} + transitions {r.transitions:.4f} + "
          f"decoder {r.decoder:.4f})\ntimesteps: {timesteps}\nthis trajectory ends at t_1 = {timesteps[-1]}: bits/dim "
          f"compare only with trajectories that end at the same t_1"
          + ("" if timesteps[-1] == 0 else " (the decoder here reads x_{t_1} at a higher noise level than at t_1 = 0; "
             "on quantised data that can score below the full chain)") + ".")


def cmd_bench(args) -> None:
    from .bench import output_names, run_bench

    refuse_overwrite(args.out, args.overwrite, output_names())
    if args.inception is not None and not os.path.isfile(args.inception):
        raise ValueError(f"--inception {args.inception!r}: no such file (looked in {os.path.abspath(args.inception)}); "
                         "pass a TorchScript Inception network, or leave it out to skip sample quality.")
    model = load_pretrained(args.model)
    train = _load_data(args.data, model.unet.config.in_channels)
    _check_data(train, model.unet, args.data, needed=2)
    heldout = _load_data(args.eval_data, model.unet.config.in_channels, "--eval-data")
    _check_data(heldout, model.unet, args.eval_data, "--eval-data", needed=2)
    table = _load_table(args) if args.table else None  # run_bench checks it against the model
    out = _make_folder(args.out)
    result = run_bench(model, train, heldout, args.steps, out, table=table, table_samples=args.table_samples,
                       fd_samples=args.fd_samples, inception=args.inception, batch_size=args.batch_size,
                       seed=args.seed, device=args.device, overwrite=args.overwrite, force_table=args.force_table,
                       schedulers=args.scheduler or ())
    print((out / "bench.md").read_text())
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'} and plots in {result['seconds_total']:.0f} s")


def cmd_sample(args) -> None:
    from PIL import Image

    from ..evaluation.sampling import sample, save_grid
    from ..schedulers.analytic_dpm import AnalyticDPMScheduler

    if Path(args.out).suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--out {args.out!r} is not an image file name; end it in .png (or .jpg, ...).")
    refuse_overwrite(args.out, args.overwrite)
    model = load_pretrained(args.model)
    table = _table(args, model)
    timesteps, choice = None, {"trajectory": args.trajectory}
    if args.trajectory in SPACINGS:
        choice = {"timestep_spacing": args.trajectory}
    elif args.trajectory == "samples":
        from ..sample_trajectory import sample_quality_trajectory

        timesteps, choice = sample_quality_trajectory(table, args.steps), {}
    scheduler = AnalyticDPMScheduler.from_table(table, model.scheduler.config, eta=args.eta, **choice)
    _make_folder(Path(args.out).parent)
    images = sample(model.unet, scheduler, args.num_images, None if timesteps else args.steps, timesteps,
                    seed=args.seed, device=args.device)
    print(f"trajectory: {scheduler.trajectory}")
    print(f"wrote {save_grid(images, args.out)}")


def cmd_demo(args) -> None:
    from .demo import DEMO_OUTPUTS, run_demo

    refuse_overwrite(args.out, args.overwrite, DEMO_OUTPUTS)
    out = _make_folder(args.out)
    run_demo(args.model, args.out, steps=args.steps, num_images=args.num_images, seed=args.seed, device=args.device,
             overwrite=args.overwrite, full=args.full)
    seconds = time.perf_counter() - args.started
    result = json.loads((out / "results.json").read_text())
    result["seconds_command"] = seconds
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    line = f"The whole command took {seconds:.0f} s, from start to exit (with importing torch and loading the model)."
    (out / "results.md").write_text((out / "results.md").read_text() + "\n" + line + "\n")
    print(line)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """``--seed``, ``--device`` (default cpu) and ``--threads``, as every command that runs the model takes them."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.add_argument("--threads", type=_positive_int, default=None, help=THREADS_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="analytic-sampler", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="fewer steps on a bundled model: bits/dim, FD-digits and a labelled sample grid")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--steps", type=_steps, nargs="+", default=None, help="K values (default 10; --full: 10 25)")
    p.add_argument("--num-images", type=_positive_int, default=None,
                   help="samples per method and K for FD-digits (default 2000)")
    p.add_argument("--full", action="store_true", help="the full-size run: K = 10 and 25, 2000 samples per method")
    _add_run_options(p)
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=cmd_demo, parser=p)

    p = sub.add_parser("precompute", help="Monte Carlo estimate of a model's ms_eps / x0_mse table")
    p.add_argument("model", help="bundled model name, model folder (unet/ + scheduler/, or a Stable Diffusion-type "
                   "pipeline) or Hub repo id")
    p.add_argument("--data", required=True, help="digits:train, a .pt/.npy file of images in [-1, 1], or an image "
                   "folder (the only form for latent pipelines)")
    p.add_argument("--out", default=None, help="folder for variance_table.{safetensors,json} (created if missing; "
                   "default for a local model folder: MODEL/table, where load_pretrained and --table find it)")
    p.add_argument("--num-samples", type=_positive_int, default=1000)
    p.add_argument("--timesteps", default="all", help="all, even:K or a comma list")
    p.add_argument("--batch-size", type=_positive_int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None,
                   help=DEVICE_HELP + "; default cpu, under torchrun each rank's GPU where there is one")
    p.add_argument("--threads", type=_positive_int, default=None, help=THREADS_HELP)
    p.add_argument("--checkpoint", default=None, help="resume file (default OUT.partial/checkpoint.pt, or for a "
                   "model's table/ folder MODEL.partial/table/checkpoint.pt: outside the folders you upload), removed "
                   "once the table is saved")
    p.add_argument("--checkpoint-every", type=_positive_int, default=50,
                   help="batches between checkpoints (rounds of one batch per process under torchrun)")
    p.add_argument("--keep-checkpoint", action="store_true", help="keep the checkpoint after the table is saved")
    p.add_argument("--overwrite", action="store_true", help="replace a table of other settings in --out, and a "
                   "checkpoint of other settings (a rerun with the same settings is a no-op without it)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="model weights and inputs (default: as saved); the sums stay float64")
    p.add_argument("--noise-device", choices=("cpu", "model"), default="cpu",
                   help="cpu: the same noise on every device; model: drawn on the GPU (faster; same table only on "
                        "the same kind of GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (pays off on long runs)")
    p.add_argument("--paths", type=_non_negative_int, default=64, metavar="N",
                   help="second pass: N forward paths (one per image, at most as many as --data holds) for the sample "
                        "cost of `trajectory --for samples`, N x candidates model calls (default 64; 0 skips it)")
    p.add_argument("--candidates", type=_positive_int, default=250,
                   help="timesteps the sample-quality trajectory may use (an even grid; default 250)")
    p.add_argument("--sample-cost-only", action="store_true",
                   help="add the sample cost to the table already in --out, without estimating the moments again")
    p.add_argument("--force-table", action="store_true", help=FORCE_TABLE_HELP)
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of the model")
    conditioning = p.add_mutually_exclusive_group()
    conditioning.add_argument("--prompt", default=None, help="latent pipelines: one prompt for every image")
    conditioning.add_argument("--captions", default=None, help="latent pipelines: .txt (one line per image, sorted "
                              "file names), .jsonl or .csv (file_name, text); default: DATA/metadata.jsonl or .csv")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="latent pipelines: estimate the guided eps at this classifier-free guidance scale (the one "
                   "you will sample at); default: the conditional eps")
    p.add_argument("--negative-prompt", default=None, help="the unconditional prompt of the guided eps (default '')")
    p.add_argument("--latent", default="mean", choices=["mean", "sample"],
                   help="latent pipelines: the VAE posterior mean (default) or a sample of it, times its scaling factor")
    p.set_defaults(func=cmd_precompute, parser=p)

    p = sub.add_parser(
        "trajectory", help="optimal K-step trajectories of a table and the bound (bits/dim) it predicts against even"
    )
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--table", default=None)
    p.add_argument("--steps", type=_steps, nargs="+", default=[10, 25])
    p.add_argument("--for", dest="goal", choices=("likelihood", "samples"), default="likelihood",
                   help="likelihood: the DP on the bits/dim bound (default); samples: the sample-quality trajectory "
                        "from the table's sample cost (precompute --paths)")
    p.add_argument("--sigma-min", type=float, default=None,
                   help="samples: the noise level (data units) down to which the bound counts (default: the "
                        "library's, analytic_sampler.sample_trajectory.DEFAULT_SIGMA_MIN; 0: all the way down)")
    p.add_argument("--json", default=None, help="also write the trajectories and predictions to this JSON file")
    p.set_defaults(func=cmd_trajectory, parser=p)

    p = sub.add_parser("nll", help="the K-step NLL bound (bits/dim) of one configuration on some images")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--data", default="digits:heldout", help=f"evaluation images; {DATA_FORMS}")
    p.add_argument("--table", default=None, help="table folder or Hub repo id (default: the model's own)")
    p.add_argument("--force-table", action="store_true", help=FORCE_TABLE_HELP)
    p.add_argument("--steps", type=_steps, default=10)
    p.add_argument("--trajectory", default="even", choices=["even", "quadratic", "optimal"])
    p.add_argument("--timesteps", default=None, help="explicit descending timesteps, e.g. 999,500,0 (overrides --steps)")
    p.add_argument("--variance", default="analytic", choices=["analytic", "residual", "beta", "btilde", "learned"])
    p.add_argument("--num-images", type=_positive_int, default=None)
    p.add_argument("--batch-size", type=_positive_int, default=256)
    _add_run_options(p)
    p.set_defaults(func=cmd_nll, parser=p)

    p = sub.add_parser("bench", help="NLL and sample quality against K for any model: bench.json, bench.md, plots")
    p.add_argument("model", help="bundled model name, model folder (unet/ + scheduler/ [+ table/]) or Hub repo id")
    p.add_argument("--data", required=True, help=f"training images (table, FD reference); {DATA_FORMS}")
    p.add_argument("--eval-data", required=True, help="held-out images for the NLL and the real-data floor")
    p.add_argument("--steps", type=_steps, nargs="+", default=[10, 25, 50, 100])
    p.add_argument("--out", default="outputs/bench")
    p.add_argument("--table", default=None, help="reuse this table (default: the model's own, else estimate one)")
    p.add_argument("--force-table", action="store_true", help=FORCE_TABLE_HELP)
    p.add_argument("--table-samples", type=_positive_int, default=100, help="samples per timestep for a new table")
    p.add_argument("--fd-samples", type=_positive_int, default=None,
                   help="samples per FD cell (default: the number of training images, at most 5000)")
    p.add_argument("--inception", default=None, help="local TorchScript Inception network for FID on RGB models")
    p.add_argument("--scheduler", action="append", metavar="CLASS",
                   help="add a Diffusers scheduler by class name to the sampler rows, built from the model's own "
                        "scheduler config (repeatable), e.g. --scheduler HeunDiscreteScheduler")
    p.add_argument("--batch-size", type=_positive_int, default=256)
    _add_run_options(p)
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=cmd_bench, parser=p)

    p = sub.add_parser("sample", help="sample a grid with AnalyticDPMScheduler")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--table", default=None, help="table folder or Hub repo id (default: the model's own)")
    p.add_argument("--force-table", action="store_true", help=FORCE_TABLE_HELP)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--trajectory", default="trailing", choices=[*SPACINGS, "even", "quadratic", "optimal", "samples"],
                   help="Diffusers' spacings (trailing, the default, sampled best on the bundled models), this "
                        "package's trajectories (optimal: the likelihood DP), or samples: the sample-quality "
                        "trajectory of the table's sample cost")
    p.add_argument("--num-images", type=_positive_int, default=64)
    _add_run_options(p)
    p.add_argument("--out", default="samples.png", help="PNG file (its folder is created if missing)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_sample, parser=p)
    return parser


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    args = build_parser().parse_args(argv)
    args.started = started
    if hasattr(args, "threads"):
        configure_threads(args.threads)
    if getattr(args, "device", None) not in (None, "cpu"):
        try:
            _device(args.device)
        except argparse.ArgumentTypeError as err:
            args.parser.error(f"argument --device: {err}")
    shown, warnings.formatwarning = warnings.formatwarning, _warning_line
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from err
    finally:
        warnings.formatwarning = shown


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """Warnings on the command line: one line each, without the source line that raised them."""
    return f"warning: {message}\n"


if __name__ == "__main__":
    main()
