"""``analytic-sampler precompute``: a model's table, resumable, with DPM-Solver-v3's statistics, the sample cost and
timesteps fitted to the solvers as further passes."""

from __future__ import annotations

import os

from ...pretrained import BUNDLED_MODELS, TABLE_SUBFOLDER, load_pretrained
from ...solver_specs import FITTED_SOLVERS
from .arguments import DEVICE_HELP, FORCE_TABLE_HELP, THREADS_HELP, non_negative_int, num_steps, positive_int
from .inputs import check_data, existing_path, load_data, make_folder

FITTED_SOLVER_KEYS = tuple(FITTED_SOLVERS)
V3_KEY = "dpm-solver-v3"  # the solver statistics' own fit (estimation.solver_timesteps)
V3_FIT_STEPS = (3, 5, 7, 10)


def add_parser(subcommands) -> None:
    """The ``precompute`` subcommand's arguments."""
    p = subcommands.add_parser("precompute", help="Monte Carlo estimate of a model's ms_eps / x0_mse table")
    p.add_argument("model", help="bundled model name, model folder (unet/ + scheduler/, or a Stable Diffusion-type "
                   "pipeline) or Hub repo id")
    p.add_argument("--data", required=True, help="digits:train, a .pt/.npy file of images in [-1, 1], or an image "
                   "folder (the only form for latent pipelines)")
    p.add_argument("--out", default=None, help="folder for variance_table.{safetensors,json} (created if missing; "
                   "default for a local model folder: MODEL/table, where load_pretrained and --table find it)")
    p.add_argument("--num-samples", type=positive_int, default=1000)
    p.add_argument("--timesteps", default="all", help="all, even:K or a comma list")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None,
                   help=DEVICE_HELP + "; default cpu, under torchrun each rank's GPU where there is one")
    p.add_argument("--threads", type=positive_int, default=None, help=THREADS_HELP)
    p.add_argument("--checkpoint", default=None, help="resume file (default OUT.partial/checkpoint.pt, or for a "
                   "model's table/ folder MODEL.partial/table/checkpoint.pt: outside the folders you upload), removed "
                   "once the table is saved")
    p.add_argument("--checkpoint-every", type=positive_int, default=50,
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
    p.add_argument("--paths", type=non_negative_int, default=64, metavar="N",
                   help="third pass: N forward paths (one per image, at most as many as --data holds) for the sample "
                        "cost of `trajectory --for samples`, N x candidates model calls (default 64; 0 skips it)")
    p.add_argument("--candidates", type=positive_int, default=250,
                   help="timesteps the sample-quality trajectory may use (an even grid; default 250)")
    p.add_argument("--solver-samples", type=non_negative_int, default=None, metavar="M",
                   help="second pass: DPM-Solver-v3's statistics from M draws per grid point, 3 model calls each "
                        "(default: --num-samples; 0 skips it)")
    p.add_argument("--solver-grid", type=positive_int, default=120, metavar="G",
                   help="grid points of the solver statistics, uniform in log-SNR (default 120)")
    p.add_argument("--sample-cost-only", action="store_true",
                   help="add the sample cost to the table already in --out, without estimating the moments again")
    p.add_argument("--fit-solvers", nargs="+", default=[*FITTED_SOLVER_KEYS, V3_KEY],
                   choices=(*FITTED_SOLVER_KEYS, V3_KEY), metavar="SOLVER", help="fourth pass: timesteps fitted for "
                   f"these solvers ({', '.join(FITTED_SOLVER_KEYS)}: shown by `trajectory --for SOLVER`; {V3_KEY}: "
                   f"K = {', '.join(map(str, V3_FIT_STEPS))} up to --fit-max-steps, saved with the solver statistics, "
                   "used by DPMSolverV3Scheduler's default spacing; default all)")
    p.add_argument("--fit-paths", type=non_negative_int, default=64, metavar="N",
                   help="fourth pass: N teacher paths from noise (no data needed; default 64; 0 skips the fit)")
    p.add_argument("--fit-candidates", type=positive_int, default=120,
                   help="timesteps a fitted trajectory may use (default 120)")
    p.add_argument("--fit-max-steps", type=num_steps, default=25, help="fit K = 3 … this (default 25)")
    p.add_argument("--fit-only", action="store_true",
                   help="add fitted timesteps to the table already in --out, without the other passes")
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
                   help="latent pipelines: the VAE posterior mean (default) or a sample of it, times its scaling "
                        "factor")
    p.set_defaults(func=run, parser=p)


def run(args) -> None:
    import torch

    from ...estimation.distributed import start_distributed
    from ...estimation.latents import PipelineOptions
    from ...pretrained import is_latent_pipeline_model, load_pipeline, resolve

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
        options = PipelineOptions(prompt=args.prompt, captions=args.captions, guidance_scale=args.guidance_scale,
                                  negative_prompt=args.negative_prompt, latent=args.latent)
    else:
        model = load_pretrained(source, revision=args.revision, with_table=False, torch_dtype=dtype)
        data, schedule, options = load_data(args.data, model.unet.config.in_channels), model.scheduler, None
        check_data(data, model.unet, args.data, needed=1 if args.sample_cost_only or args.fit_only else
                   args.num_samples, count_flag="--num-samples")
    timesteps = _timesteps(args.timesteps, schedule.config.num_train_timesteps)
    make_folder(args.out)
    if args.sample_cost_only and args.fit_only:
        raise ValueError("--sample-cost-only and --fit-only each run one pass; pass one of them.")
    if not (args.sample_cost_only or args.fit_only):
        _moments_pass(args, rank, model if latent else model.unet, data, schedule, timesteps, provenance, options)
        if args.solver_samples != 0:
            _solver_statistics_pass(args, rank, model if latent else model.unet, data, schedule, provenance, options)
    if rank != 0:  # the sample cost and the fit are one process's passes
        return
    if not args.fit_only and latent and (args.paths or args.sample_cost_only):
        print("the sample cost (sample-quality trajectory) is not estimated for latent pipelines by this command: "
              "encode latents and call precompute_sample_cost(unet, latents, scheduler, out=...) in Python.")
    elif not args.fit_only and (args.paths or args.sample_cost_only):
        _sample_cost_pass(args, model.unet, data, schedule)
    fit = (args.fit_paths or args.fit_only) and not args.sample_cost_only
    if fit and set(args.fit_solvers) - {V3_KEY}:
        _fit_pass(args, model, data if latent else None, schedule)
    if fit and V3_KEY in args.fit_solvers:
        _solver_timesteps_pass(args, model, schedule, latent)


def _moments_pass(args, rank: int, model, data, schedule, timesteps, provenance: dict, pipeline_options) -> None:
    """The first pass of precompute: the table's moments (resumable, never mixed with another run's);
    ``pipeline_options``: a latent pipeline's prompts and latents (``None`` for a UNet)."""
    from ...estimation.moments import EstimateOptions
    from ...estimation.precompute import precompute_table

    options = EstimateOptions(device=args.device, noise_device=args.noise_device, compile=args.compile,
                              checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
                              provenance=provenance)
    done = precompute_table(
        model, data, schedule, args.num_samples, timesteps, args.batch_size, args.seed, out=args.out,
        options=options, pipeline_options=pipeline_options, overwrite=args.overwrite,
        keep_checkpoint=args.keep_checkpoint,
    )
    if rank == 0:  # every rank holds the same table
        if done.status == "unchanged":
            print(f"{done.table}\n{args.out} already holds the table of these settings (the same weights, data and "
                  "options); nothing to do (--overwrite estimates it again only if it differs)")
        else:
            kept = " (checkpoint kept)" if args.keep_checkpoint else ""
            print(f"{done.table}\nsaved to {args.out}{kept}")


def _solver_statistics_pass(args, rank: int, model, data, schedule, provenance: dict, pipeline_options) -> None:
    """The statistics of DPMSolverV3Scheduler, beside the table (resumable, never mixed with another run's), their
    model calls stated."""
    from ...estimation.moments import EstimateOptions
    from ...estimation.solver_statistics import StatisticsOptions, precompute_solver_statistics
    from ...schedule import as_alphas_cumprod
    from ...solver_statistics import statistics_grid

    draws = args.num_samples if args.solver_samples is None else args.solver_samples
    if draws < 4:
        print(f"solver statistics skipped: {draws} draws per grid point (at least 4: two groups of two)")
        return
    stats = StatisticsOptions(grid_points=args.solver_grid, num_samples=draws, groups=min(8, draws // 2),
                              batch_size=args.batch_size, seed=args.seed)
    options = EstimateOptions(device=args.device, noise_device=args.noise_device, compile=args.compile,
                              checkpoint_every=args.checkpoint_every, provenance=provenance)
    if rank == 0:
        grid = statistics_grid(as_alphas_cumprod(schedule), args.solver_grid).size
        print(f"solver statistics (DPMSolverV3Scheduler): {grid} grid points x {draws} draws x 3 = "
              f"{3 * grid * draws} model calls")
    done = precompute_solver_statistics(model, data, schedule, stats, options, pipeline_options, out=args.out,
                                        overwrite=args.overwrite, keep_checkpoint=args.keep_checkpoint)
    if rank == 0:
        if done.status == "unchanged":
            print(f"{args.out} already holds the solver statistics of these settings; nothing to do")
        else:
            print(f"{done.table}\nsaved to {args.out}")


def _sample_cost_pass(args, unet, data, schedule) -> None:
    """The third pass of precompute: the sample cost of `trajectory --for samples`, its model calls stated."""
    from ...estimation.precompute import precompute_sample_cost
    from ...sample_trajectory import DEFAULT_PATHS, candidate_timesteps

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


def _fit_pass(args, model, pipeline_data, schedule) -> None:
    """The fourth pass of precompute: timesteps fitted for `trajectory --for SOLVER`, its model calls stated; a latent
    pipeline's paths each take one prompt of --prompt / --captions, guided at --guidance-scale."""
    from ...estimation.precompute import precompute_fitted_timesteps
    from ...estimation.timestep_fit import FitOptions, pipeline_model, planned_calls
    from ...schedule import as_alphas_cumprod

    options = FitOptions(solvers=tuple(k for k in dict.fromkeys(args.fit_solvers) if k != V3_KEY),
                         max_steps=args.fit_max_steps,
                         num_paths=args.fit_paths or 64, candidates=args.fit_candidates, seed=args.seed,
                         batch_size=args.batch_size)
    calls = planned_calls(as_alphas_cumprod(schedule), options)
    print(f"fitted timesteps (for `trajectory --for SOLVER`): {options.num_paths} teacher paths from noise, "
          f"{calls['teacher']} model calls, then {calls['per_solver']} per solver x {len(options.solvers)} "
          f"({', '.join(options.solvers)}) = {calls['total']} model calls")
    eps_model, path_kwargs, key_fields = model.unet, None, None
    if pipeline_data is not None:
        from ...estimation.latents import resolve_prompts

        prompts, _ = resolve_prompts(pipeline_data, options.num_paths, args.prompt, args.captions)
        eps_model, path_kwargs, key_fields = pipeline_model(model, prompts, args.guidance_scale, args.negative_prompt)
    done = precompute_fitted_timesteps(eps_model, schedule, out=args.out, options=options, path_kwargs=path_kwargs,
                                       key_fields=key_fields, device=args.device, overwrite=args.overwrite,
                                       keep_checkpoint=args.keep_checkpoint, force_table=args.force_table)
    if done.status == "unchanged":
        print(f"{args.out} already holds the fitted timesteps of these settings; nothing to do")
    else:
        print(f"{done.table}\nsaved to {args.out}")


def _solver_timesteps_pass(args, model, schedule, latent: bool) -> None:
    """The fourth pass for DPMSolverV3Scheduler: its timesteps for K = 3, 5, 7, 10 (up to --fit-max-steps) fitted to
    the statistics in --out on 2 x --fit-paths paths (a coordinate descent overfits fewer), saved with them."""
    from ...estimation.solver_timesteps import V3FitOptions, precompute_solver_timesteps
    from ...solver_statistics import SolverStatistics

    if latent:
        print(f"{V3_KEY} timesteps are not fitted for latent pipelines by this command: call "
              "precompute_solver_timesteps(unet, scheduler, out=...) in Python with the pipeline's conditioning.")
        return
    if SolverStatistics.find(args.out) is None:
        print(f"{V3_KEY} timesteps skipped: {args.out} holds no solver statistics (--solver-samples 0)")
        return
    steps = tuple(k for k in V3_FIT_STEPS if k <= args.fit_max_steps)
    if not steps:
        print(f"{V3_KEY} timesteps skipped: --fit-max-steps {args.fit_max_steps} is below its K = {V3_FIT_STEPS[0]}")
        return
    options = V3FitOptions(steps=steps, paths=2 * (args.fit_paths or 64), seed=args.seed, batch_size=args.batch_size)
    print(f"{V3_KEY} timesteps for K = {', '.join(map(str, steps))}: {options.paths} paths from noise, "
          f"K x {options.paths} model calls per trajectory tried")
    statistics, status = precompute_solver_timesteps(model.unet, schedule, options, out=args.out, device=args.device)
    if status == "unchanged":
        print(f"{args.out} already holds {V3_KEY} timesteps of these settings; nothing to do")
    else:
        calls = statistics.provenance["timestep_fit"]["model_calls"]
        print(f"{V3_KEY} timesteps {statistics.fitted_timesteps} ({calls} model calls) saved to {args.out}")


def _pipeline_data(args) -> str:
    """A latent pipeline's ``--data``: a folder of images, streamed, checked to hold ``--num-samples`` images with
    a prompt for each (``--prompt``, ``--captions`` or the folder's own metadata file)."""
    from ...estimation.data import folder_files
    from ...estimation.latents import CAPTION_FILES, resolve_prompts

    spec, needed = args.data, args.num_samples
    if not os.path.isdir(os.path.expanduser(spec)):
        existing_path(spec, "--data", "a latent pipeline reads a folder of images (with captions beside them)")
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


def _timesteps(spec: str, num_train_timesteps: int) -> list[int] | None:
    """``all`` (``None``), ``even:K`` or a comma list of distinct timesteps, checked against the schedule."""
    from ...trajectory import even_trajectory

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
