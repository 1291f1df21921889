"""The solver statistics a :class:`~analytic_sampler.schedulers.dpm_solver_v3.DPMSolverV3Scheduler` holds as its
state, kept out of its config: one strict-JSON file beside ``scheduler_config.json``, named with its SHA-256 in the
config (``statistics_file``, ``statistics_sha256``), and found again in this process by that checksum (a weak
registry) when Diffusers rebuilds the scheduler from its config alone (``from_config(pipe.scheduler.config)``).

This is the scheduler's whole save / load piece: a generic "arrays beside scheduler_config.json" mechanism
(``schedulers/table_file.py``'s table-file mixin) takes its place once every scheduler of the package shares one.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref

import numpy as np

from ..solver_statistics import STATISTICS, SolverStatistics

FILE_NAME = "dpm_solver_v3_statistics.json"
FORMAT = "analytic-sampler scheduler solver statistics"
FORMAT_VERSION = 1
HUB_OPTIONS = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision")
_HELD: weakref.WeakValueDictionary[str, SolverStatistics] = weakref.WeakValueDictionary()


def state_of(statistics: SolverStatistics) -> SolverStatistics:
    """What the scheduler keeps of the statistics (no standard errors, the provenance fields it reads), held by
    checksum in this process."""
    keep = {k: statistics.provenance.get(k) for k in ("data_range", "prediction_type", "guidance_scale", "model_id")}
    state = SolverStatistics(statistics.timesteps, statistics.lambdas, statistics.l, statistics.s, statistics.b,
                             statistics.fingerprint, statistics.num_samples, provenance=keep,
                             fitted_timesteps=statistics.fitted_timesteps)
    return _HELD.setdefault(sha256(state), state)


def sha256(state: SolverStatistics) -> str:
    """SHA-256 of the state's file content (its arrays as float64 little-endian, its numbers and provenance)."""
    digest = hashlib.sha256()
    for name in ("timesteps", "lambdas", *STATISTICS):
        value = np.ascontiguousarray(getattr(state, name), dtype="<f8")
        digest.update(f"{name}{value.shape}".encode())
        digest.update(value.tobytes())
    digest.update(json.dumps([state.fingerprint, state.num_samples, state.provenance, state.fitted_timesteps],
                             sort_keys=True).encode())
    return digest.hexdigest()


def held(checksum: str | None) -> SolverStatistics | None:
    """The state this process holds under ``checksum``, if any."""
    return None if checksum is None else _HELD.get(checksum)


def save(state: SolverStatistics, directory: str | os.PathLike, file_name: str = FILE_NAME) -> str:
    """Write the state file into ``directory`` (atomically); return its path."""
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, "sha256": sha256(state),
                "fingerprint": state.fingerprint, "num_samples": state.num_samples, "provenance": state.provenance,
                "fitted_timesteps": state.fitted_timesteps,
                **{name: getattr(state, name).tolist() for name in ("timesteps", "lambdas", *STATISTICS)}}
    path = os.path.join(os.fspath(directory), file_name)
    with open(f"{path}.tmp", "w") as f:
        json.dump(document, f, allow_nan=False)
    os.replace(f"{path}.tmp", path)
    return path


def read(path: str, expected: str, hint: str) -> SolverStatistics:
    """The state of a file written by :func:`save`, refused unless its checksum is ``expected`` (the config's)."""
    try:
        with open(path) as f:
            doc = json.load(f)
        if doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"not a {FORMAT} file of version {FORMAT_VERSION}")
        state = SolverStatistics(*(np.asarray(doc[k]) for k in ("timesteps", "lambdas", *STATISTICS)),
                                 doc["fingerprint"], doc["num_samples"], provenance=doc["provenance"],
                                 fitted_timesteps=doc["fitted_timesteps"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: unreadable solver statistics ({err}); save the scheduler again with "
                         f"save_pretrained, or rebuild it with {hint}.") from err
    if sha256(state) != expected:
        raise ValueError(f"{path} holds other statistics than the scheduler config beside it names (sha256 "
                         f"{sha256(state)[:12]}… instead of {expected[:12]}…); save the scheduler again with "
                         f"save_pretrained, or rebuild it with {hint}.")
    return _HELD.setdefault(expected, state)


def locate(source: str | os.PathLike, subfolder: str | None, file_name: str, config_name: str, hint: str,
           **hub_options) -> str:
    """The state file of the scheduler at ``source``: beside ``config_name`` in a local folder (with ``subfolder``
    where that holds it), else in the Hub repo ``source`` (``hf_hub_download``, honouring ``HF_HUB_OFFLINE``)."""
    source = os.fspath(source)
    if os.path.isdir(source):
        inner = os.path.join(source, subfolder or "")
        folder = inner if subfolder and os.path.isfile(os.path.join(inner, config_name)) else source
        path = os.path.join(folder, file_name)
        if not os.path.isfile(path):
            raise ValueError(f"{folder}'s {config_name} refers to {file_name}, which is not in the folder: copy the "
                             f"whole scheduler folder (save_pretrained writes both), or rebuild it with {hint}.")
        return path
    from huggingface_hub import hf_hub_download

    from ..hub import hub_unreachable

    hub_options["local_files_only"] = hub_options.get("local_files_only") or hub_unreachable()
    try:
        return hf_hub_download(source, file_name, subfolder=subfolder, **hub_options)
    except Exception as err:  # any Hub or cache failure ends here, with the fix
        raise ValueError(f"could not get {source}/{file_name}, the statistics the scheduler config refers to "
                         f"({type(err).__name__}: {err}); upload the whole scheduler folder, download it while online, "
                         f"or rebuild the scheduler with {hint}.") from err
