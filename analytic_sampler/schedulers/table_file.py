"""Per-model tables a scheduler holds as state, saved beside its config: one strict-JSON file named in the config.

A Diffusers scheduler config is a small JSON that pipelines copy, print and hand to other schedulers
(``DDIMScheduler.from_config(pipe.scheduler.config)``), so a scheduler's per-model statistics (Analytic-DPM's variance
table, a solver's coefficients) are its state, not config entries. A scheduler that mixes in :class:`TableFileMixin`
holds a :class:`SchedulerTable` as ``self.table``; ``save_pretrained`` / ``save_config`` write it to one file beside
``scheduler_config.json`` (before the config, so ``push_to_hub`` uploads both), and ``from_pretrained`` reads it back
from a local folder or the Hugging Face Hub. The config keeps the file's name and the SHA-256 of the table
(``table_file``, ``table_sha256``); a file that holds another table is refused.

The file is JSON (``null`` where a value is missing), never ``*.safetensors``: Diffusers' pipeline download takes any
``*.safetensors`` file in a component folder for model weights, and would then skip the scheduler folder's other files
and judge the whole pipeline not safetensors-compatible. :class:`TableFileMixin` refuses another file name.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import weakref
from typing import Any, ClassVar

import numpy as np
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, OfflineModeIsEnabled

from ..hub import hub_unreachable

FILE_FORMAT = "analytic-sampler scheduler table"
FILE_FORMAT_VERSION = 2  # 1: the arrays only, with the table's settings in the config (development versions)
# the loading options of from_pretrained that also fetch the table file from the Hub
HUB_OPTIONS = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision")

# A registry, because Diffusers builds a scheduler from its config alone (from_config(pipe.scheduler.config, eta=0.0),
# a pipeline's components) and the config names its table only by checksum; weak, so it keeps no table alive.
_HELD: weakref.WeakValueDictionary[str, SchedulerTable] = weakref.WeakValueDictionary()


class SchedulerTable:
    """Base of a scheduler's table: a dataclass (``eq=False``) whose fields are arrays, numbers, strings, tuples or
    JSON-able dicts, ``None`` for what it lacks. Subclasses check and normalise their fields in ``__post_init__`` and
    then call this one, which makes the arrays read-only (the checksum must stay true); ``describes`` names the table
    in messages."""

    describes: ClassVar[str] = "table"

    def __post_init__(self):
        for value in self.fields().values():
            if isinstance(value, np.ndarray):
                value.flags.writeable = False

    def fields(self) -> dict[str, Any]:
        """The table by field name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @functools.cached_property
    def sha256(self) -> str:
        """SHA-256 of every field with its name: numbers as float64 little-endian with their shape (NaN and -0.0
        made canonical), strings as UTF-8, dicts as JSON with sorted keys; ``None`` fields are left out."""
        digest = hashlib.sha256()
        for name, value in sorted(self.fields().items()):
            if value is None:
                continue
            if isinstance(value, (str, dict)):
                text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
                digest.update(f"{name}:{text}".encode())
                continue
            a = np.asarray(value, dtype="<f8")
            a = np.where(np.isnan(a), np.nan, a) + 0.0
            digest.update(f"{name}{a.shape}".encode())
            digest.update(np.ascontiguousarray(a).tobytes())
        return digest.hexdigest()

    def hold(self) -> SchedulerTable:
        """Make the table findable by its checksum in this process while something holds it; return the table held
        under that checksum (this one, or an equal one held before)."""
        return _HELD.setdefault(self.sha256, self)

    def save(self, directory: str | os.PathLike, file_name: str) -> str:
        """Write the table file into ``directory`` (atomically); return its path."""
        document = {"format": FILE_FORMAT, "format_version": FILE_FORMAT_VERSION, "sha256": self.sha256,
                    **{name: _to_json(value) for name, value in self.fields().items()}}
        path = os.path.join(os.fspath(directory), file_name)
        with open(f"{path}.tmp", "w") as f:
            f.write(json.dumps(document, allow_nan=False))
        os.replace(f"{path}.tmp", path)
        return path

    @classmethod
    def read(cls, path: str, expected_sha256: str, hint: str) -> SchedulerTable:
        """The table of a file written by :meth:`save`, refused unless it has ``expected_sha256`` (the checksum in
        the scheduler config beside it); ``hint`` names how to rebuild the scheduler otherwise."""
        try:
            with open(path) as f:
                document = json.load(f, parse_constant=_refuse_constant)
            if document.get("format") != FILE_FORMAT:
                raise ValueError(f"not a {FILE_FORMAT} file")
            if document.get("format_version") != FILE_FORMAT_VERSION:
                raise ValueError(f"format version {document.get('format_version')!r}; this version of "
                                 f"analytic-sampler reads {FILE_FORMAT_VERSION}")
            names = [f.name for f in dataclasses.fields(cls) if f.name in document]
            table = cls(**{name: _from_json(document[name]) for name in names})
        except (OSError, ValueError, TypeError, AttributeError) as err:
            raise ValueError(f"{path}: unreadable {cls.describes} file ({err}); save the scheduler again with "
                             f"save_pretrained, or rebuild it with {hint}.") from err
        if table.sha256 != expected_sha256:
            raise ValueError(
                f"{path} holds another {cls.describes} than the scheduler config beside it names (sha256 "
                f"{table.sha256[:12]}… instead of {expected_sha256[:12]}…): the folder mixes files of two schedulers; "
                f"save the scheduler again with save_pretrained, or rebuild it with {hint}."
            )
        return table


class TableFileMixin:
    """A scheduler whose state is a :class:`SchedulerTable` (``self.table``), saved beside its config.

    The scheduler names the table's class (``table_type``), the file (``table_file_name``, a ``.json`` name), the
    keyword arguments of its ``from_config`` that replace a saved table (``table_arguments``) and how to rebuild it
    (``table_hint``); its config has ``table_file`` and ``table_sha256``, and its ``__init__`` takes the table with
    :meth:`held_table`. Put the mixin before ``SchedulerMixin`` and ``ConfigMixin``.
    """

    table_type: ClassVar[type[SchedulerTable]]
    table_file_name: ClassVar[str]
    table_arguments: ClassVar[tuple[str, ...]] = ()
    table_hint: ClassVar[str]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.table_file_name.endswith(".json"):
            raise TypeError(
                f"{cls.__name__}.table_file_name={cls.table_file_name!r}: use a .json name (Diffusers' pipeline "
                "download takes weight-like files in a component folder, *.safetensors above all, for the weights)."
            )

    @classmethod
    def held_table(cls, sha256: str | None) -> SchedulerTable:
        """The table this process holds under the config's ``table_sha256``, else a ValueError naming the fix."""
        table = None if sha256 is None else _HELD.get(sha256)
        if isinstance(table, cls.table_type):
            return table
        if table is not None:
            raise ValueError(
                f"this scheduler config's table_sha256 names a {table.describes}, not the "
                f"{cls.table_type.describes} {cls.__name__} samples with (a config of another scheduler): build it "
                f"with {cls.table_hint}."
            )
        if sha256 is None:
            raise ValueError(f"{cls.__name__} needs the model's {cls.table_type.describes}: build it with "
                             f"{cls.table_hint}; a saved scheduler loads with {cls.__name__}.from_pretrained("
                             "folder_or_repo, subfolder=...).")
        raise ValueError(
            f"this scheduler config refers to the {cls.table_type.describes} {cls.table_file_name} (sha256 "
            f"{sha256[:12]}…), which this process does not hold: load the scheduler with {cls.__name__}."
            f"from_pretrained(folder_or_repo, subfolder=...), which reads the file beside scheduler_config.json, or "
            f"rebuild it with {cls.table_hint}."
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None = None,
                        subfolder: str | None = None, return_unused_kwargs: bool = False, **kwargs):
        """``SchedulerMixin.from_pretrained``, reading the table file beside ``scheduler_config.json`` too: from a
        local folder, or a Hub repo (``subfolder``, ``revision``, ``cache_dir``, ``token``, ``local_files_only`` and
        ``HF_HUB_OFFLINE`` honoured; the file of the config's own commit). Keyword arguments override saved options;
        table arguments replace the saved table."""
        hub = {name: kwargs[name] for name in HUB_OPTIONS if name in kwargs}
        config, kwargs, commit_hash = cls.load_config(
            pretrained_model_name_or_path=pretrained_model_name_or_path, subfolder=subfolder,
            return_unused_kwargs=True, return_commit_hash=True, **kwargs,
        )
        if config.get("table_sha256") and not any(kwargs.get(name) is not None for name in cls.table_arguments):
            file_name = config.get("table_file") or cls.table_file_name
            path = _table_path(pretrained_model_name_or_path, subfolder, file_name, cls.config_name, commit_hash,
                               cls.table_hint, **hub)
            table = cls.table_type.read(path, config["table_sha256"], cls.table_hint).hold()
            kwargs["table_sha256"] = table.sha256  # (the same checksum; this local holds the table until then)
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """``ConfigMixin.save_config`` (which ``save_pretrained`` calls), with the table file written first."""
        if not os.path.isfile(save_directory):  # (Diffusers refuses a file with its own message)
            os.makedirs(save_directory, exist_ok=True)
            self.table.save(save_directory, self.config.table_file or self.table_file_name)
        super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    def to_json_string(self) -> str:
        """The config as strict JSON: options kept from the config it was built from whose value is not a finite
        number (DPM-Solver's ``lambda_min_clipped = -inf``) are left out, so that a scheduler built from the saved
        config takes its own default for them."""
        config = json.loads(super().to_json_string())
        kept = {k: v for k, v in config.items() if not (isinstance(v, float) and not math.isfinite(v))}
        return json.dumps(kept, indent=2, sort_keys=True, allow_nan=False) + "\n"


def _table_path(source: str | os.PathLike, subfolder: str | None, file_name: str, config_name: str,
                commit_hash: str | None, hint: str, **hub_options) -> str:
    """The table file of the scheduler at ``source``: in the folder ``from_pretrained`` read ``config_name`` from
    (with ``subfolder`` where that holds it, as Diffusers looks), else in the Hub repo ``source`` at the config's commit
    (``commit_hash``), through ``hf_hub_download`` (which honours ``HF_HUB_OFFLINE``)."""
    source = os.fspath(source)
    if os.path.isfile(source):
        return os.path.join(os.path.dirname(source), file_name)
    if os.path.isdir(source):
        inner = os.path.join(source, subfolder or "")
        folder = inner if subfolder and os.path.isfile(os.path.join(inner, config_name)) else source
        if not os.path.isfile(os.path.join(folder, file_name)):
            raise ValueError(
                f"{folder}'s {config_name} refers to the table file {file_name}, which is not in the folder: copy the "
                f"whole scheduler folder (save_pretrained writes both files), or rebuild the scheduler with {hint}."
            )
        return os.path.join(folder, file_name)
    if commit_hash is not None:
        hub_options["revision"] = commit_hash
    hub_options["local_files_only"] = hub_options.get("local_files_only") or hub_unreachable()
    try:
        return hf_hub_download(source, file_name, subfolder=subfolder, **hub_options)
    except (HFValidationError, EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled, OSError, ValueError) as err:
        where = "/".join(p for p in (source, subfolder, file_name) if p)
        raise ValueError(
            f"could not get {where}, the table file the scheduler config refers to ({type(err).__name__}: {err}); "
            "upload the whole scheduler folder (scheduler.save_pretrained(folder, push_to_hub=True, repo_id=...)), "
            f"download it while online (it is then cached for HF_HUB_OFFLINE=1), or rebuild the scheduler with {hint}."
        ) from err


def _to_json(value):
    """A field as strict JSON: arrays and tuples as (nested) lists, ``null`` for NaN."""
    if not isinstance(value, (np.ndarray, tuple)):
        return value
    array = np.asarray(value)
    if array.dtype.kind != "f":
        return array.tolist()
    return np.where(np.isnan(array), None, array.astype(object)).tolist()


def _from_json(value):
    """Lists as float64 arrays (``null``: NaN); the table's ``__post_init__`` gives each field its own type."""
    return np.array(value, dtype=object).astype(np.float64) if isinstance(value, list) else value


def _refuse_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")
