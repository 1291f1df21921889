"""The option objects of the wide entry points (``estimate_moments``, ``nll_bpd``, ``run_bench``): frozen
dataclasses whose fields are the settings past the leading arguments."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

Options = TypeVar("Options")


def options_of(value: Any, kind: type[Options], name: str = "options") -> Options:
    """``value`` where it is a ``kind``, ``kind()`` for ``None``; anything else (a dict of settings, another
    function's options) is refused, naming the class and its fields."""
    if value is None:
        return kind()
    if isinstance(value, kind):
        return value
    fields = ", ".join(field.name for field in dataclasses.fields(kind))
    hint = f" (a dict: {kind.__name__}(**settings))" if isinstance(value, dict) else ""
    raise TypeError(f"{name}={type(value).__name__}(...): pass {kind.__name__}(...){hint}; its fields: {fields}.")
