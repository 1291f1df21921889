"""Load a model in the Diffusers layout (``unet/``, ``scheduler/``, optional ``table/``): bundled, local or Hub."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
BUNDLED_MODELS = ("digits-ddpm-linear", "digits-iddpm-cosine")
DEFAULT_MODEL = "digits-ddpm-linear"
TABLE_SUBFOLDER = "table"


def resolve(name_or_path: str | os.PathLike) -> str:
    """A bundled model's name becomes its folder; anything else (folder or Hub repo id) is returned as is."""
    name = os.fspath(name_or_path)
    if name in BUNDLED_MODELS:
        path = BUNDLED_DIR / name
        if not (path / "unet").is_dir():
            raise FileNotFoundError(f"bundled model {name!r} is missing from {BUNDLED_DIR}; reinstall analytic-sampler.")
        return str(path)
    return name


@dataclass
class PretrainedModel:
    """A UNet, its scheduler config and, when the model ships one, its variance table."""

    unet: object
    scheduler: object
    table: object | None
    source: str


def load_pretrained(name_or_path: str | os.PathLike, revision: str | None = None, with_table: bool = True) -> PretrainedModel:
    """``UNet2DModel`` + ``DDPMScheduler`` from ``<model>/unet`` and ``<model>/scheduler``; the table from
    ``<model>/table`` if present (``None`` otherwise)."""
    from diffusers import DDPMScheduler, UNet2DModel

    from .table import VarianceTable

    source = resolve(name_or_path)
    unet = UNet2DModel.from_pretrained(source, subfolder="unet", revision=revision).eval()
    scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", revision=revision)
    table = None
    if with_table:
        local = Path(source) / TABLE_SUBFOLDER
        if local.is_dir() or not Path(source).exists():
            try:
                table = VarianceTable.load(source, subfolder=TABLE_SUBFOLDER, revision=revision)
            except ValueError:
                if local.is_dir():
                    raise
    return PretrainedModel(unet, scheduler, table, source)
