"""Load a model in the Diffusers layout (``unet/``, ``scheduler/``, optional ``table/``): bundled, local or Hub."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent / "digits" / "bundled"  # package data; the library imports nothing from digits
BUNDLED_MODELS = ("digits-ddpm-linear", "digits-iddpm-cosine")
DEFAULT_MODEL = "digits-ddpm-linear"
TABLE_SUBFOLDER = "table"
MODEL_FORMS = (
    f"a bundled model ({', '.join(BUNDLED_MODELS)}), a local folder with unet/ and scheduler/ subfolders "
    "(as written by save_pretrained) or a Hub repo id 'owner/name'"
)


def is_repo_id(name: str) -> bool:
    """``owner/name`` by huggingface_hub's rules; a bare ``name`` is refused (it is more often a typo than a repo)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return name.count("/") == 1


def looks_like_path(name: str) -> bool:
    """Whether ``name`` reads as a local path rather than a Hub repo id: it starts with '.' or '~', holds a
    backslash, or holds a '/' and is no valid ``owner/name`` (absolute, trailing '/', two '/') or starts with
    an existing folder (``tables/x`` where ``tables/`` exists)."""
    if name.startswith((".", "~")) or "\\" in name:
        return True
    return "/" in name and (not is_repo_id(name) or os.path.isdir(name.split("/", 1)[0]))


def local_or_repo_id(name_or_path: str | os.PathLike, fix: str) -> str:
    """``name_or_path`` with ``~`` expanded; a ``FileNotFoundError`` ending in ``fix`` when it looks like a
    local path (:func:`looks_like_path`) that does not exist, so that it is never sent to the Hub."""
    name = os.fspath(name_or_path)
    path = os.path.expanduser(name)
    if not os.path.exists(path) and looks_like_path(name):
        raise FileNotFoundError(f"no such folder: {name!r} (looked in {os.path.abspath(path)}); {fix}")
    return path if os.path.exists(path) else name


def resolve(name_or_path: str | os.PathLike) -> str:
    """The folder of a bundled model or of a local model, else a Hub repo id ``owner/name``; a clear error for
    anything else, without touching the network."""
    name = os.fspath(name_or_path)
    if name in BUNDLED_MODELS:
        path = BUNDLED_DIR / name
        if not (path / "unet").is_dir():
            raise FileNotFoundError(
                f"bundled model {name!r} is missing from {BUNDLED_DIR}; reinstall analytic-sampler."
            )
        return str(path)
    source = local_or_repo_id(name, f"pass {MODEL_FORMS}.")
    if os.path.exists(source):
        missing = [sub + "/" for sub in ("unet", "scheduler") if not os.path.isdir(os.path.join(source, sub))]
        if missing:
            raise ValueError(
                f"{name!r} is not a model folder: it has no {' and '.join(missing)}; pass {MODEL_FORMS}."
            )
        return source
    if not is_repo_id(source):
        close = difflib.get_close_matches(source, BUNDLED_MODELS, n=1)
        guess = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"{name!r} is not a bundled model{guess}, a local folder or a Hub repo id; pass {MODEL_FORMS}."
        )
    return source


def _hub_error(repo_id: str, err: OSError) -> ValueError:
    """Why a Hub repo id did not load, and what to do about it."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set and the repo is not in the local Hugging Face cache"
        fix = f"Download it once while online (`hf download {repo_id}`)"
    else:
        why = f"{type(err).__name__}: {err}"
        fix = "Check the repo id, the revision and your connection (`hf auth login` for a private repo)"
    return ValueError(
        f"cannot load Hub repo {repo_id!r} ({why}); there is no local folder of that name either (looked in "
        f"{os.path.abspath(repo_id)}). {fix}, or pass {MODEL_FORMS}."
    )


def _loading_options(source: str) -> dict:
    """Diffusers' loading options: without accelerate, the plain load that Diffusers would fall back to anyway
    (asked for, it skips the warning that accelerate is missing); a Hub repo from the cache only where the Hub cannot
    be reached (:func:`~analytic_sampler.hub.hub_unreachable`: no retries with back-off)."""
    import importlib.util

    from .hub import hub_unreachable

    options = {} if importlib.util.find_spec("accelerate") else {"low_cpu_mem_usage": False}
    if not os.path.isdir(source) and hub_unreachable():
        options["local_files_only"] = True
    return options


def _refuse_conditional_unet(name: str | os.PathLike, source: str) -> None:
    """A local model whose ``unet/`` is not a ``UNet2DModel`` (a Stable Diffusion-type pipeline) is refused with the
    way to sample it, instead of Diffusers' error about the missing config entries."""
    import json

    config = Path(source) / "unet" / "config.json"
    if not config.is_file():
        return
    with open(config) as f:
        kind = json.load(f).get("_class_name", "UNet2DModel")
    if kind != "UNet2DModel":
        raise ValueError(
            f"{os.fspath(name)!r} holds a {kind} (a latent or conditional pipeline), and this loads pixel-space "
            "UNet2DModel models (the sample, nll, bench and trajectory commands). For a Stable Diffusion-type "
            "pipeline, estimate its table with `analytic-sampler precompute MODEL --data IMAGES --prompt ...` and "
            "sample in Python: pipe.scheduler = AnalyticDPMScheduler.from_table(table, pipe.scheduler.config) "
            "(README, Stable Diffusion)."
        )


@dataclass
class PretrainedModel:
    """A UNet, its scheduler config and, when the model ships them, its variance table and the solver statistics
    beside it (:class:`~analytic_sampler.solver_statistics.SolverStatistics`; ``None`` for a table without them)."""

    unet: object
    scheduler: object
    table: object | None
    source: str
    solver_statistics: object | None = None

    @property
    def name(self) -> str:
        """The model as results show it: a bundled model's name, a Hub repo id or relative path as given, the
        last folder of an absolute path (no machine's paths in titles and reports)."""
        path = Path(self.source)
        return path.name if path.is_absolute() else self.source

    @property
    def is_bundled(self) -> bool:
        """Whether this is one of the models installed with the package."""
        return Path(self.source).parent == BUNDLED_DIR


def load_pretrained(
    name_or_path: str | os.PathLike, revision: str | None = None, with_table: bool = True, torch_dtype=None
) -> PretrainedModel:
    """``UNet2DModel`` (weights in ``torch_dtype``, default as saved) + ``DDPMScheduler`` from ``<model>/unet`` and
    ``<model>/scheduler``; the table and the solver statistics from ``<model>/table`` if present (``None``
    otherwise)."""
    source = resolve(name_or_path)  # before importing diffusers: a bad name fails at once
    _refuse_conditional_unet(name_or_path, source)

    from diffusers import DDPMScheduler, UNet2DModel

    from .solver_statistics import SolverStatistics
    from .table import VarianceTable

    try:
        options = _loading_options(source)
        unet = UNet2DModel.from_pretrained(source, subfolder="unet", revision=revision, torch_dtype=torch_dtype,
                                           **options).eval()
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", revision=revision,
                                                  local_files_only=options.get("local_files_only", False))
    except OSError as err:
        if os.path.isdir(source):
            raise
        raise _hub_error(source, err) from err
    table = statistics = None
    if with_table:
        local = Path(source) / TABLE_SUBFOLDER
        if local.is_dir() or not Path(source).exists():
            try:
                table = VarianceTable.load(source, subfolder=TABLE_SUBFOLDER, revision=revision)
            except ValueError:
                if local.is_dir():
                    raise
        if table is not None:
            statistics = SolverStatistics.find(source, subfolder=TABLE_SUBFOLDER, revision=revision)
    return PretrainedModel(unet, scheduler, table, source, statistics)


def _model_index(source: str, revision: str | None) -> dict | None:
    """The pipeline's ``model_index.json`` (local or from the Hub), ``None`` where there is none."""
    import json

    if os.path.isdir(source):
        path = os.path.join(source, "model_index.json")
        if not os.path.isfile(path):
            return None
    else:
        from huggingface_hub import hf_hub_download

        from .hub import hub_unreachable

        try:
            path = hf_hub_download(source, "model_index.json", revision=revision, local_files_only=hub_unreachable())
        except (OSError, ValueError):  # no index (a bare UNet repo), offline or unreachable: load_pretrained reports it
            return None
    with open(path) as f:
        return json.load(f)


def is_latent_pipeline_model(source: str, revision: str | None = None) -> bool:
    """Whether ``source`` (a folder from :func:`resolve` or a Hub repo id) is a pipeline with a VAE (latent model)."""
    index = _model_index(source, revision)
    return bool(index) and isinstance(index.get("vae"), list) and index["vae"][0] is not None


def load_pipeline(source: str, revision: str | None = None, torch_dtype=None):
    """The Diffusers pipeline at ``source`` (``DiffusionPipeline.from_pretrained``, weights in ``torch_dtype``, default
    as saved), progress bars off."""
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(source, revision=revision, torch_dtype=torch_dtype,
                                                 **_loading_options(source))
    except OSError as err:
        if os.path.isdir(source):
            raise
        raise _hub_error(source, err) from err
    pipe.set_progress_bar_config(disable=True)
    return pipe
