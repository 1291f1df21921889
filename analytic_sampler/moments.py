"""Monte Carlo estimate, with ``x_t = sqrt(abar[t]) x0 + sqrt(1 - abar[t]) eps``, of

    ms_eps[t] = E_{x0, eps} ||eps_theta(x_t, t)||^2 / d
    x0_mse[t] = E_{x0, eps} ||x0 - x0_hat(x_t, t)||^2 / d,   x0_hat = (x_t - sqrt(1 - abar[t]) eps_theta) / sqrt(abar[t])

(``x0_hat`` clipped to the data range when one is declared), both from the same model calls.

Work list: every (timestep, sample) pair, pair ``i`` -> timestep ``timesteps[i % T]``, sample ``i // T``,
cut into batches that mix timesteps. The noise of batch ``b`` comes from a generator seeded with ``(seed, b)``:
on the CPU by default (``noise_device="cpu"``), so ``x_t`` is the same bit for bit wherever the model runs; or on the
model's device (``noise_device="model"``), so a GPU never waits for the host. A GPU's own generator (Philox, laid out
by the launch grid of its kernel) gives other numbers than the CPU's and may give other numbers on another GPU model:
the table is then the same bit for bit for any number of processes on the same kind of device (given the same model
outputs per batch), and across kinds of device only statistically. On the CPU both settings are one and the same.
Per-timestep sums of ``m = ||eps_theta||^2 / d``, ``m^2``, ``e = ||x0 - x0_hat||^2 / d`` and ``e^2``
accumulate in float64 on the device, and the same four per channel (axis 1 of ``(B, C, ...)`` data) with
``d_c = d / C`` in place of ``d``.

Under ``torch.distributed`` (``torchrun``, ``accelerate launch``) the batches are dealt out in rounds: in round r,
rank i runs batch ``next + r W + i``; the W per-batch sums are all-gathered and every rank adds them in batch order,
exactly as one process adds its own batches. So the table does not depend on the number of processes: on the CPU
it is the same bit for bit (given the same model outputs per batch), and every rank holds the same running sums.

Host syncs: none per batch. The model inputs, noise and sums stay on the device (a host draw of the noise is pinned
and copied without blocking), so the host queues batches ahead of the device; the host waits for the device only at
checkpoint boundaries (every ``checkpoint_every`` rounds and at the end), where the NaN check and the checkpoint read
the sums, and, with a latent pipeline, when it copies the next chunk of pixel images to the VAE (once per
``encode_batch_size`` images).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ._version import __version__
from .adapter import EpsilonAdapter
from .data import check_range, take_samples
from .schedule import as_alphas_cumprod, schedule_fingerprint
from .table import VarianceTable

CHECKPOINT_FORMAT = 3  # 2: four running sums (ms_eps and x0_mse); 3: and the same four per channel
SUMS = ("ms_eps", "ms_eps^2", "x0_mse", "x0_mse^2")  # then, with C channels, these four rows for each channel
NOISE_DEVICES = ("cpu", "model")


def _timesteps(timesteps: Sequence[int] | None, num_train_timesteps: int) -> np.ndarray:
    if timesteps is None:
        return np.arange(num_train_timesteps)
    ts = np.asarray(timesteps, dtype=np.int64).ravel()
    if ts.size == 0 or ts.min() < 0 or ts.max() >= num_train_timesteps:
        raise ValueError(f"timesteps must be a non-empty list of integers in [0, {num_train_timesteps - 1}].")
    if np.unique(ts).size != ts.size:
        raise ValueError("timesteps contains duplicates; pass each timestep once (raise num_samples for more draws).")
    return np.sort(ts)


def _module(model) -> Any:
    return model.model if isinstance(model, EpsilonAdapter) else model


def _config_value(obj, key: str):
    config = getattr(obj, "config", obj)
    return config.get(key) if isinstance(config, Mapping) else None


def _default_device(module) -> torch.device:
    if isinstance(module, torch.nn.Module):
        param = next(module.parameters(), None)
        if param is not None:
            return param.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(module):
    """Switch off dropout while estimating, restoring the module's mode afterwards."""
    training = isinstance(module, torch.nn.Module) and module.training
    if training:
        module.eval()
    try:
        yield
    finally:
        if training:
            module.train()


def _fold(values: torch.Tensor, offset: int, period: int) -> torch.Tensor:
    """Per-timestep sums of the rows of ``values`` for pairs ``offset, offset+1, …``:
    ``out[:, k] = sum_{i % period = k} values[:, i]``.

    A padded reshape and a sum; unlike ``index_add_`` on CUDA (atomics) it is deterministic.
    """
    start, count = offset % period, values.shape[1]
    rows = -(-(start + count) // period)
    padded = values.new_zeros(values.shape[0], rows * period)
    padded[:, start : start + count] = values
    return padded.view(-1, rows, period).sum(1)


def _split_kwargs(kwargs: Mapping[str, Any], num_samples: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(per_sample, shared)``: tensors with one row per data sample go with their sample; the rest is shared."""
    per_sample = {
        k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == num_samples
    }
    return per_sample, {k: v for k, v in kwargs.items() if k not in per_sample}


def _batch_kwargs(per_sample: dict[str, Any], shared: dict[str, Any], rows: torch.Tensor, device, dtype) -> dict[str, Any]:
    """Model kwargs of one batch: per-sample tensors indexed by ``rows``, single-row shared tensors expanded to the
    batch, other shared values as they are."""
    out = {}
    for key, value in shared.items():
        value = _to_device(value, device, dtype)
        if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == 1:
            value = value.expand(rows.numel(), *value.shape[1:])
        out[key] = value
    for key, value in per_sample.items():
        out[key] = _to_device(value, device, dtype)[rows]
    return out


def _to_device(value: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    """Tensors move to ``device``; floating ones also take the model input ``dtype``."""
    if not isinstance(value, torch.Tensor):
        return value
    return value.to(device=device, dtype=dtype if dtype is not None and value.is_floating_point() else value.dtype)


def _noise_generator(seed: int, batch: int, device: torch.device = torch.device("cpu")) -> torch.Generator:
    state = np.random.SeedSequence([seed, batch]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))


def _noise_source(noise_device: str, device: torch.device) -> torch.device:
    """Where the noise is drawn: ``"cpu"``, or ``"model"``: the model's ``device``."""
    if noise_device not in NOISE_DEVICES:
        raise ValueError(
            f"noise_device={noise_device!r}; use 'cpu' (x_t the same on every device) or 'model' (noise drawn on the "
            "model's device, faster on a GPU)."
        )
    return device if noise_device == "model" else torch.device("cpu")


def _batch_noise(shape: tuple[int, ...], seed: int, batch: int, source: torch.device, device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
    """``N(0, I)`` noise of ``batch`` drawn on ``source``, on ``device`` in ``dtype``. A host draw bound for a GPU is
    pinned and copied without blocking (a pageable copy would wait for the GPU to finish its queue)."""
    pin = source.type == "cpu" and device.type == "cuda"
    noise = torch.randn(shape, generator=_noise_generator(seed, batch, source), device=source, pin_memory=pin)
    return noise.to(device=device, dtype=dtype, non_blocking=pin)


def _input_dtype(module, dtype: torch.dtype | None) -> torch.dtype | None:
    """The model input dtype: ``dtype``, checked against the module's weights, or by default the half / bfloat16
    dtype of a module whose weights are in one (``None``: float32 inputs)."""
    weights = {p.dtype for p in module.parameters() if p.is_floating_point()} if isinstance(
        module, torch.nn.Module) else set()
    if dtype is None:
        half = weights & {torch.float16, torch.bfloat16}
        return half.pop() if len(half) == 1 else None
    if weights and dtype not in weights:
        raise ValueError(
            f"dtype={dtype} but the model's weights are {', '.join(sorted(map(str, weights)))}; convert the model "
            f"first (model.to({dtype})) or leave dtype=None for float32 inputs."
        )
    return dtype


def _compiled(adapter: EpsilonAdapter, compile: bool | Mapping[str, Any]) -> EpsilonAdapter:
    """``adapter`` with its model ``torch.compile``-d once (``compile``: ``True`` or ``torch.compile`` options), or
    ``adapter`` itself."""
    if not isinstance(compile, Mapping) and not compile:
        return adapter
    options = {"dynamic": False, **(compile if isinstance(compile, Mapping) else {})}
    fast = copy.copy(adapter)
    fast.model = torch.compile(adapter.model, **options)
    return fast


def _check_finite(sums: torch.Tensor, timesteps: np.ndarray) -> None:
    bad = (~torch.isfinite(sums).all(0)).cpu().numpy()
    if bad.any():
        shown = ", ".join(map(str, timesteps[bad][:8].tolist())) + (" …" if bad.sum() > 8 else "")
        raise ValueError(
            f"the model returned NaN/inf at timestep(s) {shown}; check the weights, the dtype (float16 overflow?) "
            "and the timestep convention (timestep_shift / timestep_scale of EpsilonAdapter)."
        )


def _world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _rank_path(path: str, rank: int) -> str:
    """Rank 0 keeps ``path``; rank r > 0 writes ``<stem>.rank<r><suffix>`` beside it (no shared disk needed)."""
    if rank == 0:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}.rank{rank}{ext}"


def _agree_on_start(resumed, num_rows: int, num_t: int, device: torch.device, world: int) -> tuple[int, torch.Tensor]:
    """Every rank starts from the least advanced checkpoint among the ranks (a rank killed before its last write
    is behind the others); that rank's sums, identical on every rank that reached them, are broadcast."""
    start, sums = (0, torch.zeros(num_rows, num_t, dtype=torch.float64)) if resumed is None else resumed
    sums = sums.to(device)
    if world == 1:
        return start, sums
    starts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    torch.distributed.all_gather(starts, torch.tensor([start], dtype=torch.int64, device=device))
    starts = [int(x) for x in starts]
    source = starts.index(min(starts))
    torch.distributed.broadcast(sums, src=source)
    return starts[source], sums


def _load_checkpoint(path: str, run: dict[str, Any]) -> tuple[int, torch.Tensor] | None:
    if not os.path.exists(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved, next_batch, sums = state["run"], state["next_batch"], state.get("sums")
    except Exception as err:  # any unreadable or foreign file
        raise ValueError(
            f"checkpoint {path} is unreadable ({type(err).__name__}); delete it to start the estimate over."
        ) from err
    if state.get("format") != CHECKPOINT_FORMAT or saved != run:
        diff = ", ".join(f"{k}: {saved.get(k)!r} != {v!r}" for k, v in run.items() if saved.get(k) != v)
        raise ValueError(
            f"checkpoint {path} belongs to a run with different settings ({diff or 'format'}); delete the file "
            "to start over, or rerun with the same settings to resume."
        )
    return next_batch, sums


def _save_checkpoint(path: str, run: dict[str, Any], next_batch: int, sums: torch.Tensor):
    """Write to a temporary file, then ``os.replace``: an interruption never leaves a half-written checkpoint."""
    state = {"format": CHECKPOINT_FORMAT, "run": run, "next_batch": next_batch, "sums": sums.cpu()}
    tmp = f"{path}.tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(state, tmp)
    os.replace(tmp, path)


class _TensorSamples:
    """``x0`` held in memory, the sample source of a pixel-space model (a latent pipeline's is
    :class:`~analytic_sampler.latents.PipelineSamples`)."""

    def __init__(self, x0: torch.Tensor):
        self.x0 = x0

    def window(self, lo: int, hi: int) -> tuple[torch.Tensor, dict[str, Any], dict[str, Any]]:
        """``(x0, per_sample, shared)`` of samples ``lo … hi``; the user's ``model_kwargs`` are handled apart."""
        return self.x0[lo : hi + 1], {}, {}


def _tensor_identity(kwargs: Mapping[str, Any]) -> str:
    """A hash of the conditioning tensors (a checkpoint with other conditioning is not resumed)."""
    digest = hashlib.sha256()
    for key in sorted(kwargs):
        value = kwargs[key]
        digest.update(key.encode())
        if isinstance(value, torch.Tensor):
            digest.update(str(tuple(value.shape)).encode() + value.detach().float().cpu().contiguous().numpy().tobytes())
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()[:16]


def estimate_moments(
    model,
    data,
    scheduler_or_alphas_cumprod=None,
    num_samples: int = 1000,
    timesteps: Sequence[int] | None = None,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    noise_device: str = "cpu",
    compile: bool | Mapping[str, Any] = False,
    data_range: tuple[float, float] | None | str = "auto",
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 50,
    progress: bool = True,
    prediction_type: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    prompt: str | Sequence[str] | None = None,
    captions: str | os.PathLike | None = None,
    guidance_scale: float | None = None,
    negative_prompt: str | None = None,
    latent: str = "mean",
    encode_batch_size: int = 16,
) -> VarianceTable:
    """Estimate ``ms_eps`` and ``x0_mse`` at ``timesteps`` (default: all) from the first ``num_samples`` images.

    Args:
        model: a Diffusers UNet, an ``EpsilonAdapter``, a callable ``model(sample, timestep, **kwargs)``, or a latent
            text-to-image pipeline (``StableDiffusionPipeline``; see below).
        data: anything ``data.take_samples`` reads (tensor, DataLoader, Dataset, folder of images); the same
            ``x0`` serve every timestep, with fresh noise for every (sample, timestep) pair.
        scheduler_or_alphas_cumprod: the model's noise schedule (scheduler, config or ``alphas_cumprod``); default
            for a pipeline: its scheduler.
        batch_size: pairs per model call. Results depend on ``seed`` and ``batch_size``, not on the device.
        device: where the model runs (moved there if it is an ``nn.Module``); default: the model's device.
        dtype: dtype of the model inputs (``torch.float16``, ``torch.bfloat16``; the model's weights must be in it);
            default: the weights' dtype if it is one of these, else float32. ``x_t``, ``x0_hat`` are formed in float32
            and the sums in float64 whatever the dtype.
        noise_device: ``"cpu"`` (default): noise drawn by the host, so ``x_t`` does not depend on the device (tables
            differ across devices only by the model's own arithmetic, and a checkpoint resumes on any device); on a
            GPU it costs the host's time to draw a batch, hidden behind the device's work while that is shorter than
            a model call. ``"model"``: drawn on the model's device, no host work per batch; on the CPU the same
            table, on a GPU another one, reproducible on the same kind of GPU (module docstring). Checkpoints
            record it.
        compile: ``True`` (or a dict of ``torch.compile`` options, e.g. ``{"mode": "max-autotune"}``) compiles the
            model once, for the full batch shape (``dynamic=False``); a last, smaller batch runs it uncompiled rather
            than compile it again. Compilation takes seconds to minutes, so it pays off on long runs.
        data_range: declared range of ``x0`` (checked; ``x0_hat`` is clipped to it for ``x0_mse``, as samplers
            clip it); ``None`` for unbounded data such as latents; ``"auto"``: ``(-1, 1)``, ``None`` for a pipeline.
        checkpoint: file for the running sums, written every ``checkpoint_every`` batches and at the end;
            a run started with an existing checkpoint of the same settings resumes from it.
        prediction_type: what the model predicts; default: the scheduler config's, else ``"epsilon"``.
        model_kwargs: conditioning passed to the model; tensors with ``num_samples`` rows are paired with the data
            (a pipeline's prompt embeddings come on top of these).
        provenance: recorded in the table (e.g. ``model_id``, ``revision``, ``data``); overrides the defaults.

    With a pipeline (``vae``, ``unet``, ``encode_prompt``), ``data`` are pixel images in ``[-1, 1]`` and the
    moments are estimated in latent space (no data range) for the eps a sampler uses (:mod:`analytic_sampler.latents`):
    ``prompt`` (one for all, or one per image) or ``captions`` (a file; default: the image folder's
    ``metadata.jsonl`` / ``.csv``) condition it; ``guidance_scale`` > 1 estimates the guided eps
    ``eps_u + w (eps_c - eps_u)`` (``negative_prompt``, default ``""``, for ``eps_u``), and the table records ``w``;
    ``latent``: the VAE posterior ``"mean"`` or a ``"sample"``, times its scaling factor; images and prompts are
    encoded ``encode_batch_size`` at a time when the estimate reaches them, once per image.

    Under torch.distributed (``torchrun --nproc_per_node N``, ``accelerate launch``) the batches are shared among
    the processes and every process returns the same table, equal to a single process's (module docstring);
    each rank checkpoints (rank r > 0 to ``<checkpoint>.rank<r>``) and a rerun resumes from the least advanced.
    ``checkpoint_every`` then counts rounds of one batch per rank. Independent shards (other seeds or data) can
    also be pooled with ``VarianceTable.merge``.
    """
    from .latents import PipelineSamples, is_latent_pipeline, resolve_prompts

    if num_samples < 1 or batch_size < 1 or checkpoint_every < 1 or encode_batch_size < 1:
        raise ValueError("num_samples, batch_size, encode_batch_size and checkpoint_every must all be at least 1.")
    pipeline = model if is_latent_pipeline(model) else None
    if pipeline is None and (prompt is not None or captions is not None or guidance_scale is not None):
        raise ValueError(
            "prompt, captions and guidance_scale need a pipeline with a VAE and a text encoder as model; for a bare "
            "UNet pass encoder_hidden_states in model_kwargs (and wrap it in EpsilonAdapter(..., guidance_scale=w))."
        )
    if scheduler_or_alphas_cumprod is None:
        if pipeline is None:
            raise ValueError("pass the model's noise schedule: its scheduler, scheduler config or alphas_cumprod.")
        scheduler_or_alphas_cumprod = pipeline.scheduler
    if data_range == "auto":
        data_range = None if pipeline is not None else (-1.0, 1.0)
    abar = as_alphas_cumprod(scheduler_or_alphas_cumprod)
    ts = _timesteps(timesteps, abar.size)
    if not isinstance(model, EpsilonAdapter):
        prediction_type = prediction_type or _config_value(scheduler_or_alphas_cumprod, "prediction_type") or "epsilon"
    options = {} if prediction_type is None else {"prediction_type": prediction_type}
    record: dict[str, Any] = {}
    if pipeline is not None:
        prompts, prompt_source = resolve_prompts(data, num_samples, prompt, captions)
        if device is not None:
            pipeline.to(device)
        source = PipelineSamples(pipeline, data, num_samples, prompts, guidance_scale, negative_prompt, latent,
                                 encode_batch_size, seed)
        if source.guided:
            options.update(guidance_scale=source.guidance_scale, uncond_kwargs=source.uncond_kwargs)
        model, data_key, record = pipeline.unet, source.identity(), source.provenance(prompt_source)
        sample_shape = source.sample_shape()
    adapter = EpsilonAdapter.wrap(model, abar, **options)
    module = _module(adapter)
    if device is None:
        device = _default_device(module)
    elif isinstance(module, torch.nn.Module):
        module.to(device)
    device = torch.device(device)
    dtype = _input_dtype(module, dtype)
    noise_source = _noise_source(noise_device, device)
    work_dtype = torch.float32 if dtype is None else torch.promote_types(torch.float32, dtype)
    user_kwargs = _split_kwargs({k: _to_device(v, device, dtype) for k, v in (model_kwargs or {}).items()}, num_samples)
    if pipeline is None:
        x0 = take_samples(data, num_samples).float()
        check_range(x0, data_range)
        data_key = hashlib.sha256(str(x0.shape).encode() + x0.cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
        sample_shape = tuple(x0.shape[1:])
        source = _TensorSamples(x0.to(device=device, dtype=work_dtype))
    run = {
        "schedule": schedule_fingerprint(abar),
        "timesteps": hashlib.sha256(ts.tobytes()).hexdigest()[:16],
        "num_samples": num_samples,
        "batch_size": batch_size,
        "seed": seed,
        "data": data_key,
        "conditioning": _tensor_identity({**(model_kwargs or {}), "guidance_scale": adapter.guidance_scale}),
        "prediction_type": adapter.prediction_type,
        "dtype": str(dtype),
    }
    if noise_source.type != "cpu":  # (checkpoints of host-drawn noise keep their settings, and stay resumable)
        run["noise_device"] = noise_source.type

    num_t, num_pairs = ts.size, ts.size * num_samples
    num_batches = -(-num_pairs // batch_size)
    roots = torch.from_numpy(np.stack([np.sqrt(abar[ts]), np.sqrt(1.0 - abar[ts])])).to(device=device, dtype=work_dtype)
    clip = (lambda x: x) if data_range is None else (lambda x: x.clamp(*data_range))
    ts_device = torch.from_numpy(ts).to(device)
    shape = (1,) * len(sample_shape)

    rank, world = _world()
    path = None if checkpoint is None else _rank_path(os.fspath(checkpoint), rank)
    channels = sample_shape[0] if len(sample_shape) >= 2 else 0  # per-channel moments for (B, C, ...) data
    num_rows = len(SUMS) * (1 + channels)
    start, sums = _agree_on_start(None if path is None else _load_checkpoint(path, run), num_rows, num_t, device, world)
    fast = _compiled(adapter, compile)

    def batch_sums(b: int) -> torch.Tensor:
        """The per-timestep sums of batch ``b``: rows ``SUMS`` (then per channel), float64 on the device."""
        offset = b * batch_size
        end = min(offset + batch_size, num_pairs)
        lo, hi = offset // num_t, (end - 1) // num_t  # the samples of this batch
        x0_window, per_sample, shared = source.window(lo, hi)
        pair = torch.arange(offset, end, device=device)
        k, sample = pair % num_t, pair // num_t
        s = sample - lo  # rows of the window
        x0 = x0_window.to(device=device, dtype=work_dtype)[s]
        noise = _batch_noise((pair.numel(), *sample_shape), seed, b, noise_source, device, work_dtype)
        sqrt_abar, sqrt_bb = roots[0, k].view(-1, *shape), roots[1, k].view(-1, *shape)
        x_t = sqrt_abar * x0 + sqrt_bb * noise
        call_kwargs = {**_batch_kwargs(*user_kwargs, sample, device, dtype),
                       **_batch_kwargs(per_sample, shared, s, device, dtype)}
        call = fast if pair.numel() == batch_size else adapter
        eps = call(x_t if dtype is None else x_t.to(dtype), ts_device[k], **call_kwargs)
        x0_err = x0 - clip((x_t - sqrt_bb * eps.to(work_dtype)) / sqrt_abar)
        m, e = _mean_square(eps), _mean_square(x0_err)
        rows = torch.stack([m, m * m, e, e * e])
        if channels:
            m_c, e_c = _mean_square(eps, 2).T, _mean_square(x0_err, 2).T  # (C, B)
            rows = torch.cat([rows, m_c, m_c * m_c, e_c, e_c * e_c])
        return _fold(rows, offset, num_t)

    rounds = -(-(num_batches - start) // world)
    with torch.inference_mode(), _eval_mode(module), tqdm(
        total=num_batches, initial=start, disable=not progress or rank > 0, desc="estimating ms_eps, x0_mse",
        unit="batch",
    ) as bar:
        for r in range(rounds):
            first = start + r * world  # batches first … first + world - 1, one per rank
            mine = first + rank
            part = batch_sums(mine) if mine < num_batches else torch.zeros_like(sums)
            parts = [part]
            if world > 1:
                parts = [torch.empty_like(part) for _ in range(world)]
                torch.distributed.all_gather(parts, part)
            done = min(first + world, num_batches)
            for contribution in parts[: done - first]:  # in batch order, as one process would add them
                sums += contribution
            bar.update(done - first)
            if (r + 1) % checkpoint_every == 0 or done == num_batches:
                _check_finite(sums, ts)
                if path is not None:
                    _save_checkpoint(path, run, done, sums)

    full = np.zeros((num_rows, abar.size))
    full[:, ts] = sums.cpu().numpy()
    per_channel = full[len(SUMS):].reshape(len(SUMS), channels, abar.size) if channels else None
    counts = np.zeros(abar.size, dtype=np.int64)
    counts[ts] = num_samples
    record = {
        "model_id": str(_config_value(module, "_name_or_path") or type(module).__name__),
        "data": f"{num_samples} images, x0 of shape {sample_shape}",
        "num_samples": num_samples,
        "num_timesteps_estimated": int(num_t),
        "seed": seed,
        "batch_size": batch_size,
        "prediction_type": adapter.prediction_type,
        "timestep_shift": adapter.timestep_shift,
        "timestep_scale": adapter.timestep_scale,
        "dtype": str(dtype or work_dtype),
        "noise_device": noise_source.type,
        "package_version": __version__,
        **record,
        **(provenance or {}),
    }
    return VarianceTable.from_sums(
        full[0], full[1], counts, abar, full[2], full[3], channel_sums=per_channel, data_range=data_range,
        x0_clip=data_range, provenance=record,
    )


def _mean_square(x: torch.Tensor, start: int = 1) -> torch.Tensor:
    """``||x_i||^2 / d`` per batch row (``start=1``), or per row and channel ``(B, C)`` (``start=2``), in float64."""
    flat = x.flatten(start)
    return torch.linalg.vector_norm(flat, dim=-1, dtype=torch.float64).square() / flat.shape[-1]
