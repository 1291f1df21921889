"""Output files of the commands: what a user computed is replaced only with ``--overwrite``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def refuse_overwrite(out: str | os.PathLike, overwrite: bool, names: Sequence[str] | None = None,
                     flag: str = "--out") -> None:
    """Refuse, before any work, to replace the results of an earlier run, unless ``overwrite``: the output file
    ``out``, or with ``names`` the files of the folder ``out`` of those names (``table/variance_table.json``...).
    The ``ValueError`` names what exists and the two ways on: ``--overwrite`` or another ``flag``."""
    out = os.fspath(out)
    if names is None:
        existing = [out] if os.path.exists(out) else []
        what = f"{flag} {out} already exists"
    else:
        existing = [name for name in names if (Path(out) / name).exists()]
        what = f"{flag} {out} already holds {', '.join(existing)}"
    if existing and not overwrite:
        them = "it" if names is None else "them"
        raise ValueError(f"{what} (from an earlier run); pass --overwrite to replace {them}, or choose another {flag}.")
