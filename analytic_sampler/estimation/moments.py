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

:func:`estimate_moments` (its options: :class:`EstimateOptions`, and for a latent pipeline
:class:`~analytic_sampler.estimation.latents.PipelineOptions`) runs three steps: :func:`prepare_estimate` (the sample
source, the model on its device, the work list) with :func:`run_key` (what a checkpoint must match),
:func:`accumulate` (the loop, its checkpoints and the distributed gather) and :func:`build_table` (the table and its
provenance).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .._version import __version__
from ..adapter import EpsilonAdapter, as_epsilon_model, config_value, model_device
from ..fingerprint import tensor_fingerprint, values_fingerprint, weights_fingerprint
from ..noise import noise_generator
from ..options import options_of
from ..predictions import x0_from_eps
from ..schedule import as_alphas_cumprod, schedule_fingerprint
from ..table import VarianceTable
from .data import check_range, take_samples
from .distributed import agree_on_start, all_gather, rank_path, world_rank
from .latents import PipelineOptions, PipelineSamples, is_latent_pipeline

CHECKPOINT_FORMAT = 4  # 2: four running sums (ms_eps and x0_mse); 3: and the same four per channel; 4: the run key
# also covers the weights, the adapter's timestep convention and unconditional kwargs, and data_range
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


def _mean_square(x: torch.Tensor, start: int = 1) -> torch.Tensor:
    """``||x_i||^2 / d`` per batch row (``start=1``), or per row and channel ``(B, C)`` (``start=2``), in float64."""
    flat = x.flatten(start)
    return torch.linalg.vector_norm(flat, dim=-1, dtype=torch.float64).square() / flat.shape[-1]


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
    noise = torch.randn(shape, generator=noise_generator(seed, batch, source), device=source, pin_memory=pin)
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


# Run key fields that may be unknown (None), and how the user names what they stand for
_UNIDENTIFIED = {
    "model": ("model_id", "no nn.Module weights were found behind the model to fingerprint (a plain function?)"),
    "data": ("data_id", "the data are streamed from a DataLoader / Dataset, not read up front"),
}
START_AFRESH = "delete it to start afresh (`analytic-sampler precompute`: pass --overwrite)"


def _read_checkpoint(path: str) -> dict[str, Any] | None:
    """The checkpoint's state, ``None`` where there is no file; an unreadable or foreign file is refused."""
    if not os.path.exists(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state["run"], state["next_batch"]
    except Exception as err:  # any unreadable or foreign file
        raise ValueError(f"checkpoint {path} is unreadable ({type(err).__name__}); {START_AFRESH}.") from err
    return state


_MISSING = object()


def _shown(value: Any) -> str:
    return "not recorded" if value is _MISSING else repr(value)


def _differences(state: dict[str, Any], key: dict[str, Any]) -> list[str]:
    """Each run key field in which the checkpoint's run differs from ``key``, described; fields that a checkpoint of
    an older format did not record count as differing."""
    saved = state["run"] if isinstance(state.get("run"), dict) else {}
    diffs = [
        f"{name}: {_shown(saved.get(name, _MISSING))} in the checkpoint, {_shown(key.get(name, _MISSING))} now"
        for name in dict.fromkeys([*key, *saved]) if saved.get(name, _MISSING) != key.get(name, _MISSING)
    ]
    if state.get("format") != CHECKPOINT_FORMAT:
        diffs.insert(0, f"format: {state.get('format')!r} in the checkpoint (an older analytic-sampler), "
                        f"{CHECKPOINT_FORMAT} now")
    return diffs


def _unidentified(key: dict[str, Any]) -> list[str]:
    """What of this run cannot be identified, so that no checkpoint can be trusted to belong to it."""
    return [
        f"{why}: pass options=EstimateOptions({name_arg}='...') (the same on every run) to name it"
        for field, (name_arg, why) in _UNIDENTIFIED.items() if key.get(field) is None and name_arg not in key
    ]


def _load_checkpoint(path: str, key: dict[str, Any]) -> tuple[int, torch.Tensor] | None:
    """``(next_batch, sums)`` of the checkpoint at ``path`` if it holds this run; ``None`` where there is none. A
    checkpoint of another run, of an older format, or of a run that cannot be identified is refused, naming each
    field that differs."""
    state = _read_checkpoint(path)
    if state is None:
        return None
    unknown = _unidentified(key)
    if unknown:
        raise ValueError(f"checkpoint {path} cannot be resumed: {'; '.join(unknown)}. Or {START_AFRESH}.")
    diffs = _differences(state, key)
    if diffs:
        raise ValueError(
            f"checkpoint {path} belongs to another run ({'; '.join(diffs)}); {START_AFRESH}, or rerun with the "
            "checkpoint's settings to resume."
        )
    return state["next_batch"], state.get("sums")


def discard_other_checkpoint(path: str | os.PathLike, key: dict[str, Any]) -> bool:
    """Delete the checkpoint at ``path`` if it is unreadable, of another run or of an unidentifiable one (what
    ``overwrite`` replaces); keep one of this very run, which resumes to the same table. Returns whether it
    deleted one."""
    path = os.fspath(path)
    try:
        state = _read_checkpoint(path)
    except ValueError:
        state = {}
    if state is None or (state and not _unidentified(key) and not _differences(state, key)):
        return False
    os.remove(path)
    return True


def _save_checkpoint(path: str, run: dict[str, Any], next_batch: int, sums: torch.Tensor):
    """Write to a temporary file, then ``os.replace``: an interruption never leaves a half-written checkpoint."""
    state = {"format": CHECKPOINT_FORMAT, "run": run, "next_batch": next_batch, "sums": sums.cpu()}
    tmp = f"{path}.tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(state, tmp)
    os.replace(tmp, path)


class _TensorSamples:
    """``x0`` held in memory, the sample source of a pixel-space model (a latent pipeline's is
    :class:`~analytic_sampler.estimation.latents.PipelineSamples`): the first ``num_samples`` images of ``data``,
    checked against ``data_range``, on ``device`` in ``dtype``."""

    def __init__(self, data: Any, num_samples: int, data_range, device: torch.device, dtype: torch.dtype):
        x0 = take_samples(data, num_samples).float()
        check_range(x0, data_range)
        self._identity = tensor_fingerprint(x0)
        self.x0 = x0.to(device=device, dtype=dtype)

    def window(self, lo: int, hi: int) -> tuple[torch.Tensor, dict[str, Any], dict[str, Any]]:
        """``(x0, per_sample, shared)`` of samples ``lo … hi``; the user's ``model_kwargs`` are handled apart."""
        return self.x0[lo : hi + 1], {}, {}

    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x0.shape[1:])

    def identity(self) -> str:
        """What a checkpoint must match to be resumed: a hash of the images."""
        return self._identity

    def key_fields(self) -> dict[str, Any]:
        """The run key's fields of the sample source beyond :meth:`identity`: none for images held as they are."""
        return {}

    def provenance(self) -> dict[str, Any]:
        """The data's mean square per channel, ``E||x0_c||^2 / d_c`` (channel data only)."""
        if self.x0.ndim < 3:
            return {}
        return {"channel_ms_x0": _mean_square(self.x0, 2).mean(0).tolist()}


@dataclass(frozen=True)
class EstimateOptions:
    """How :func:`estimate_moments` runs, beyond which pairs it draws: where and how the model is called, the data's
    range, the checkpoint, the progress bar and what the table records.

    Args:
        device (`str` or `torch.device`, *optional*):
            Where the model runs (moved there if it is an ``nn.Module``); default: the model's device.
        dtype (`torch.dtype`, *optional*):
            The model inputs' dtype (``torch.float16``, ``torch.bfloat16``; the weights must be in it); default: the
            weights' dtype if it is one of these, else float32. ``x_t`` and ``x0_hat`` are formed in float32 and the
            sums in float64 whatever the dtype.
        noise_device (`str`, defaults to `"cpu"`):
            ``"cpu"``: noise drawn by the host, so ``x_t`` does not depend on the device (tables differ across
            devices only by the model's own arithmetic, and a checkpoint resumes on any device); on a GPU it costs
            the host's time to draw a batch, hidden behind the device's work while that is shorter than a model
            call. ``"model"``: drawn on the model's device, no host work per batch; on the CPU the same table, on a
            GPU another one, reproducible on the same kind of GPU (module docstring). Checkpoints record it.
        compile (`bool` or `dict`, defaults to `False`):
            ``True`` (or a dict of ``torch.compile`` options, e.g. ``{"mode": "max-autotune"}``) compiles the model
            once, for the full batch shape (``dynamic=False``); a last, smaller batch runs it uncompiled rather than
            compile it again. Compilation takes seconds to minutes, so it pays off on long runs.
        data_range (`tuple[float, float]` or `None`, defaults to `"auto"`):
            The declared range of ``x0`` (checked; ``x0_hat`` is clipped to it for ``x0_mse``, as samplers clip it);
            ``None`` for unbounded data such as latents; ``"auto"``: ``(-1, 1)``, ``None`` for a pipeline.
        prediction_type (`str`, *optional*):
            What the model predicts; default: the scheduler config's, else ``"epsilon"``.
        model_kwargs (`dict`, *optional*):
            Conditioning passed to the model; tensors with ``num_samples`` rows are paired with the data (a
            pipeline's prompt embeddings come on top of these).
        checkpoint (`str` or `os.PathLike`, *optional*):
            A file for the running sums, written every ``checkpoint_every`` batches and at the end. A run started
            with an existing checkpoint of the same run (:func:`run_key`: the weights, data, settings) resumes from
            it, bit-identical to an uninterrupted run; one of another run, or of an older version, is refused with
            each field that differs named.
        checkpoint_every (`int`, defaults to 50):
            Batches between checkpoints (rounds of one batch per process under torch.distributed).
        progress (`bool`, defaults to `True`):
            Show a progress bar.
        provenance (`dict`, *optional*):
            Recorded in the table (e.g. ``model_id``, ``revision``, ``data``); overrides the defaults.
        model_id (`str`, *optional*):
            Names the model: recorded as the table's ``model_id`` and in the run key. The run key fingerprints the
            weights of the ``nn.Module`` behind the model; where there is none to find (a plain function), a
            checkpoint resumes only with a ``model_id``, the same on every run.
        data_id (`str`, *optional*):
            Names the data, likewise. Tensors and folders are identified by their content; a DataLoader or
            Dataset given to a pipeline is streamed, not read up front, so its checkpoint resumes only with a
            ``data_id``.
    """

    device: str | torch.device | None = None
    dtype: torch.dtype | None = None
    noise_device: str = "cpu"
    compile: bool | Mapping[str, Any] = False
    data_range: tuple[float, float] | None | str = "auto"
    prediction_type: str | None = None
    model_kwargs: Mapping[str, Any] | None = None
    checkpoint: str | os.PathLike | None = None
    checkpoint_every: int = 50
    progress: bool = True
    provenance: Mapping[str, Any] | None = None
    model_id: str | None = None
    data_id: str | None = None


@dataclass
class MonteCarloPlan:
    """The settings of one estimate, fixed before its first batch (:func:`prepare_estimate`): the work list of
    (timestep, sample) pairs, the sample source, the model and where and in which dtype it runs."""

    alphas_cumprod: np.ndarray
    timesteps: np.ndarray  # sorted training timesteps to estimate
    num_samples: int
    batch_size: int
    seed: int
    adapter: EpsilonAdapter
    device: torch.device
    dtype: torch.dtype | None  # the model inputs' dtype (None: float32)
    work_dtype: torch.dtype  # the dtype of x0, x_t and x0_hat: float32, or wider if the model inputs are
    noise_source: torch.device  # where the noise is drawn
    source: Any  # _TensorSamples or PipelineSamples: window(lo, hi) -> (x0, per-sample kwargs, shared kwargs)
    sample_shape: tuple[int, ...]
    data_range: tuple[float, float] | None
    model_kwargs: dict[str, Any]  # the user's conditioning as given (the run key hashes it)
    user_kwargs: tuple[dict[str, Any], dict[str, Any]]  # the same on the device: (per_sample, shared)
    model_fingerprint: str | None = None  # of the eps model's weights (None: none found)
    names: dict[str, str] = field(default_factory=dict)  # the user's model_id / data_id, where given
    description = "estimating ms_eps, x0_mse"  # (the progress bar's; another pass's plan names its own)

    @property
    def num_pairs(self) -> int:
        return self.timesteps.size * self.num_samples

    @property
    def num_batches(self) -> int:
        return -(-self.num_pairs // self.batch_size)

    @property
    def channels(self) -> int:
        """Data channels with per-channel moments: ``C`` of ``(C, ...)`` samples, 0 for flat ones."""
        return self.sample_shape[0] if len(self.sample_shape) >= 2 else 0

    @property
    def num_rows(self) -> int:
        """Rows of the running sums: ``SUMS``, then the same four for each channel."""
        return len(SUMS) * (1 + self.channels)

    @cached_property
    def roots(self) -> torch.Tensor:
        """``(2, T)`` on the device: ``sqrt(abar[t])`` and ``sqrt(1 - abar[t])`` of the estimated timesteps."""
        abar, ts = self.alphas_cumprod, self.timesteps
        return torch.from_numpy(np.stack([np.sqrt(abar[ts]), np.sqrt(1.0 - abar[ts])])).to(
            device=self.device, dtype=self.work_dtype
        )

    @cached_property
    def timesteps_on_device(self) -> torch.Tensor:
        return torch.from_numpy(self.timesteps).to(self.device)

    # what accumulate() asks of a plan; another Monte Carlo pass's plan answers the same (estimation.solver_statistics)
    def empty_sums(self) -> torch.Tensor:
        return torch.zeros(self.num_rows, self.timesteps.size, dtype=torch.float64)

    def batch_sums(self, b: int, fast: EpsilonAdapter) -> torch.Tensor:
        return _batch_sums(self, b, fast)

    def check_finite(self, sums: torch.Tensor) -> None:
        _check_finite(sums, self.timesteps)


def prepare_estimate(
    model,
    data,
    scheduler_or_alphas_cumprod,
    num_samples: int,
    timesteps: Sequence[int] | None,
    batch_size: int,
    seed: int,
    options: EstimateOptions,
    pipeline_options: PipelineOptions,
) -> MonteCarloPlan:
    """The first step of :func:`estimate_moments`: check the arguments, set up the sample source (images in memory,
    or a latent pipeline's images and prompts, encoded as the estimate reaches them), the model (an
    :class:`EpsilonAdapter` on its device) and the work list. Arguments as in :func:`estimate_moments`."""
    if min(num_samples, batch_size, options.checkpoint_every, pipeline_options.encode_batch_size) < 1:
        raise ValueError("num_samples, batch_size, encode_batch_size and checkpoint_every must all be at least 1.")
    pipeline = model if is_latent_pipeline(model) else None
    if pipeline is None:
        pipeline_options.check_bare_model()
    if scheduler_or_alphas_cumprod is None:
        if pipeline is None:
            raise ValueError("pass the model's noise schedule: its scheduler, scheduler config or alphas_cumprod.")
        scheduler_or_alphas_cumprod = pipeline.scheduler
    data_range = options.data_range
    if data_range == "auto":
        data_range = None if pipeline is not None else (-1.0, 1.0)
    abar = as_alphas_cumprod(scheduler_or_alphas_cumprod)
    ts = _timesteps(timesteps, abar.size)
    guidance, source = {}, None
    if pipeline is not None:
        source = PipelineSamples(pipeline, data, num_samples, pipeline_options, seed, options.device)
        if source.guided:
            guidance = {"guidance_scale": source.guidance_scale, "uncond_kwargs": source.uncond_kwargs}
        model = pipeline.unet
    adapter = as_epsilon_model(model, scheduler_or_alphas_cumprod, options.prediction_type, **guidance)
    device = _place(adapter, options.device)
    dtype = _input_dtype(adapter.model, options.dtype)
    noise_source = _noise_source(options.noise_device, device)
    work_dtype = torch.float32 if dtype is None else torch.promote_types(torch.float32, dtype)
    model_kwargs = dict(options.model_kwargs or {})
    user_kwargs = _split_kwargs({k: _to_device(v, device, dtype) for k, v in model_kwargs.items()}, num_samples)
    if source is None:
        source = _TensorSamples(data, num_samples, data_range, device, work_dtype)
    names = {k: str(v) for k, v in (("model_id", options.model_id), ("data_id", options.data_id)) if v is not None}
    return MonteCarloPlan(
        abar, ts, num_samples, batch_size, seed, adapter, device, dtype, work_dtype, noise_source, source,
        source.sample_shape(), data_range, model_kwargs, user_kwargs, weights_fingerprint(adapter.model), names,
    )


def _place(adapter: EpsilonAdapter, device: str | torch.device | None) -> torch.device:
    """Where the model runs: ``device`` (an ``nn.Module`` is moved there), by default the model's own device."""
    if device is None:
        return torch.device(model_device(adapter))
    if isinstance(adapter.model, torch.nn.Module):
        adapter.model.to(device)
    return torch.device(device)


def run_key(plan: MonteCarloPlan) -> dict[str, Any]:
    """What a checkpoint records of its run and must match to be resumed, and what a finished table records to
    tell a rerun of the same settings: everything that changes the numbers. The model's weights (their
    fingerprint), prediction type, timestep convention and input dtype; the schedule, the work list and the seed;
    the data (a hash of the images, or of a pipeline's image files, prompts and encoders), its declared range and
    the conditioning, guidance included (and the noise device when it is not the host, so that checkpoints of
    host-drawn noise stay resumable). ``None`` marks what cannot be identified (:data:`_UNIDENTIFIED`); the user's
    ``model_id`` / ``data_id`` name it."""
    adapter = plan.adapter
    key = {
        "model": plan.model_fingerprint,
        "prediction_type": adapter.prediction_type,
        "timestep_shift": adapter.timestep_shift,
        "timestep_scale": adapter.timestep_scale,
        "dtype": str(plan.dtype),
        "schedule": schedule_fingerprint(plan.alphas_cumprod),
        "timesteps": f"{plan.timesteps.size} timesteps, " + hashlib.sha256(plan.timesteps.tobytes()).hexdigest()[:16],
        "num_samples": plan.num_samples,
        "batch_size": plan.batch_size,
        "seed": plan.seed,
        "data": plan.source.identity(),
        "data_range": None if plan.data_range is None else list(plan.data_range),
        "conditioning": values_fingerprint({**adapter.model_kwargs, **plan.model_kwargs}),
        "guidance_scale": adapter.guidance_scale,
        "uncond_kwargs": values_fingerprint(adapter.uncond_kwargs),
        **plan.source.key_fields(),
        **plan.names,
    }
    if plan.noise_source.type != "cpu":
        key["noise_device"] = plan.noise_source.type
    return key


def accumulate(plan: MonteCarloPlan, key: dict[str, Any], options: EstimateOptions) -> torch.Tensor:
    """The Monte Carlo loop: the per-timestep sums of every batch of ``plan``, float64 ``(plan.num_rows, T)`` on the
    device. Resumes from ``options.checkpoint`` when it holds a run with this ``key``, and writes it every
    ``options.checkpoint_every`` rounds and at the end; under torch.distributed every rank runs one batch per round
    and adds all ranks' sums in batch order."""
    checkpoint, checkpoint_every, progress = options.checkpoint, options.checkpoint_every, options.progress
    rank, world = world_rank()
    path = None if checkpoint is None else rank_path(os.fspath(checkpoint), rank)
    resumed = None if path is None else _load_checkpoint(path, key)
    if path is not None and resumed is None and _unidentified(key):
        warnings.warn(f"checkpoint {path} will not resume this run if it is interrupted: "
                      f"{'; '.join(_unidentified(key))}.", stacklevel=3)
    start, sums = (0, plan.empty_sums()) if resumed is None else resumed
    start, sums = agree_on_start(start, sums.to(plan.device), world)
    num_batches = plan.num_batches
    if start and progress and rank == 0:
        print(f"resuming from {start}/{num_batches} batches ({checkpoint})", flush=True)
    fast = _compiled(plan.adapter, options.compile)
    rounds = -(-(num_batches - start) // world)
    with torch.inference_mode(), _eval_mode(plan.adapter.model), tqdm(
        total=num_batches, initial=start, disable=not progress or rank > 0, desc=plan.description,
        unit="batch",
    ) as bar:
        for r in range(rounds):
            first = start + r * world  # batches first … first + world - 1, one per rank
            mine = first + rank
            part = plan.batch_sums(mine, fast) if mine < num_batches else torch.zeros_like(sums)
            done = min(first + world, num_batches)
            for contribution in all_gather(part, world)[: done - first]:  # in batch order, as one process adds them
                sums += contribution
            bar.update(done - first)
            if (r + 1) % checkpoint_every == 0 or done == num_batches:
                plan.check_finite(sums)
                if path is not None:
                    _save_checkpoint(path, key, done, sums)
    return sums


def _batch_sums(plan: MonteCarloPlan, b: int, fast: EpsilonAdapter) -> torch.Tensor:
    """The per-timestep sums of batch ``b``: rows ``SUMS`` (then per channel), float64 on the device. ``fast``: the
    (compiled) model for full batches; a last, smaller batch runs ``plan.adapter``."""
    num_t, device, work_dtype = plan.timesteps.size, plan.device, plan.work_dtype
    offset = b * plan.batch_size
    end = min(offset + plan.batch_size, plan.num_pairs)
    lo, hi = offset // num_t, (end - 1) // num_t  # the samples of this batch
    x0_window, per_sample, shared = plan.source.window(lo, hi)
    pair = torch.arange(offset, end, device=device)
    k, sample = pair % num_t, pair // num_t
    s = sample - lo  # rows of the window
    x0 = x0_window.to(device=device, dtype=work_dtype)[s]
    noise = _batch_noise((pair.numel(), *plan.sample_shape), plan.seed, b, plan.noise_source, device, work_dtype)
    shape = (-1,) + (1,) * len(plan.sample_shape)
    sqrt_abar, sqrt_bb = plan.roots[0, k].view(shape), plan.roots[1, k].view(shape)
    x_t = sqrt_abar * x0 + sqrt_bb * noise
    call_kwargs = {**_batch_kwargs(*plan.user_kwargs, sample, device, plan.dtype),
                   **_batch_kwargs(per_sample, shared, s, device, plan.dtype)}
    call = fast if pair.numel() == plan.batch_size else plan.adapter
    eps = call(x_t if plan.dtype is None else x_t.to(plan.dtype), plan.timesteps_on_device[k], **call_kwargs)
    x0_hat = x0_from_eps(eps.to(work_dtype), x_t, sqrt_abar, sqrt_bb)
    x0_err = x0 - (x0_hat if plan.data_range is None else x0_hat.clamp(*plan.data_range))
    m, e = _mean_square(eps), _mean_square(x0_err)
    rows = torch.stack([m, m * m, e, e * e])
    if plan.channels:
        m_c, e_c = _mean_square(eps, 2).T, _mean_square(x0_err, 2).T  # (C, B)
        rows = torch.cat([rows, m_c, m_c * m_c, e_c, e_c * e_c])
    return _fold(rows, offset, num_t)


def build_table(
    plan: MonteCarloPlan, key: dict[str, Any], sums: torch.Tensor, provenance: Mapping[str, Any] | None
) -> VarianceTable:
    """The last step of :func:`estimate_moments`: the :class:`VarianceTable` of the sums, with the run's provenance
    (the defaults below, then the sample source's, then ``provenance``); ``key`` (:func:`run_key`) is recorded as
    ``run_key``, so that a rerun of the same settings can be told."""
    n, ts, channels = plan.alphas_cumprod.size, plan.timesteps, plan.channels
    full = np.zeros((plan.num_rows, n))
    full[:, ts] = sums.cpu().numpy()
    per_channel = full[len(SUMS):].reshape(len(SUMS), channels, n) if channels else None
    counts = np.zeros(n, dtype=np.int64)
    counts[ts] = plan.num_samples
    adapter, module = plan.adapter, plan.adapter.model
    record = {
        "model_id": str(config_value(module, "_name_or_path") or type(module).__name__),
        "model_fingerprint": plan.model_fingerprint,
        "data": f"{plan.num_samples} images, x0 of shape {plan.sample_shape}",
        "sample_shape": list(plan.sample_shape),
        "num_samples": plan.num_samples,
        "num_timesteps_estimated": int(ts.size),
        "seed": plan.seed,
        "batch_size": plan.batch_size,
        "prediction_type": adapter.prediction_type,
        "timestep_shift": adapter.timestep_shift,
        "timestep_scale": adapter.timestep_scale,
        "dtype": str(plan.dtype or plan.work_dtype),
        "noise_device": plan.noise_source.type,
        "package_version": __version__,
        **plan.source.provenance(),
        **plan.names,
        **(provenance or {}),
        "run_key": key,
    }
    return VarianceTable.from_sums(
        full[0], full[1], counts, plan.alphas_cumprod, full[2], full[3], channel_sums=per_channel,
        data_range=plan.data_range, x0_clip=plan.data_range, provenance=record,
    )


def estimate_moments(
    model,
    data,
    scheduler_or_alphas_cumprod=None,
    num_samples: int = 1000,
    timesteps: Sequence[int] | None = None,
    batch_size: int = 64,
    seed: int = 0,
    *,
    options: EstimateOptions | None = None,
    pipeline_options: PipelineOptions | None = None,
) -> VarianceTable:
    """Estimate a model's variance table: ``ms_eps[t] = E||eps_theta(x_t, t)||^2 / d`` and
    ``x0_mse[t] = E||x0 - x0_hat||^2 / d`` at ``timesteps`` from the first ``num_samples`` images, overall and per
    channel, each (sample, timestep) pair with fresh noise.

    Args:
        model (`UNet2DModel`, `EpsilonAdapter`, a callable or a pipeline):
            A Diffusers UNet, an :class:`~analytic_sampler.EpsilonAdapter`, a callable
            ``model(sample, timestep, **kwargs)``, or a latent text-to-image pipeline (``StableDiffusionPipeline``;
            see below).
        data (`torch.Tensor`, a `DataLoader`, a `Dataset` or a folder):
            The images ``x0``, ``(N, C, H, W)`` in the data range (:class:`EstimateOptions`); a folder's image files
            are mapped from ``[0, 255]`` to ``[-1, 1]``. The same ``x0`` serve every timestep.
        scheduler_or_alphas_cumprod (a scheduler, its config or `np.ndarray`, *optional*):
            The model's noise schedule; default for a pipeline: its scheduler.
        num_samples (`int`, defaults to 1000):
            Images used, hence draws per timestep (100 to 1000 for a real table).
        timesteps (`list[int]`, *optional*):
            The training timesteps to estimate (default: all); the others stay NaN in the table.
        batch_size (`int`, defaults to 64):
            (sample, timestep) pairs per model call. The table depends on ``seed`` and ``batch_size``, not on the
            device or the number of processes.
        seed (`int`, defaults to 0):
            Seeds the noise of every batch.
        options (:class:`EstimateOptions`, *optional*):
            How the estimate runs: device, dtype, noise device, compilation, data range, prediction type, model
            kwargs, checkpoint, progress bar and what the table records (default: ``EstimateOptions()``).
        pipeline_options (:class:`~analytic_sampler.estimation.latents.PipelineOptions`, *optional*):
            Pipelines only: prompts or captions, guidance, the VAE latent, the encoding batch and the resize.

    Returns:
        :class:`~analytic_sampler.VarianceTable`: the moments, their standard errors and the run's provenance.

    With a pipeline (``vae``, ``unet``, ``encode_prompt``), ``data`` are pixel images in ``[-1, 1]`` and the
    moments are estimated in latent space (no data range) for the eps a sampler uses
    (:mod:`analytic_sampler.estimation.latents`).
    Under torch.distributed (``torchrun --nproc_per_node N``, ``accelerate launch``) the batches are shared among
    the processes and every process returns the same table, equal to a single process's (module docstring); each
    rank checkpoints (rank r > 0 to ``<checkpoint>.rank<r>``) and a rerun resumes from the least advanced.
    Independent shards (other seeds or data) can also be pooled with ``VarianceTable.merge``.

    Example:

    ```py
    >>> import torch
    >>> from analytic_sampler import EstimateOptions, estimate_moments
    >>> from analytic_sampler.pretrained import load_pretrained

    >>> model = load_pretrained("digits-ddpm-linear", with_table=False)  # a bundled UNet and its DDPMScheduler
    >>> images = torch.rand(8, 1, 8, 8) * 2 - 1  # your training images, (N, C, H, W) in [-1, 1]
    >>> table = estimate_moments(model.unet, images, model.scheduler, num_samples=8, timesteps=[0, 500, 999],
    ...                          options=EstimateOptions(progress=False))  # all timesteps, 100-1000 images for real
    >>> table.counts[[0, 1, 500, 999]].tolist()
    [8, 0, 8, 8]

    ```
    """
    options = options_of(options, EstimateOptions)
    plan = prepare_estimate(model, data, scheduler_or_alphas_cumprod, num_samples, timesteps, batch_size, seed,
                            options, options_of(pipeline_options, PipelineOptions, "pipeline_options"))
    key = run_key(plan)
    return build_table(plan, key, accumulate(plan, key, options), options.provenance)
