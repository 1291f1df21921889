"""Fingerprints of what a table's numbers depend on: a model's weights, tensors, image files.

A fingerprint is the first 16 hex digits of a SHA-256. The weights' fingerprint hashes, for every parameter and
buffer of the modules that make the model's output, its name, shape and values, floating-point values rounded to
float16 first (integer ones as they are)::

    weights = SHA-256( for each module m, each tensor (name, w) of m: name, shape, SHA-256(bytes of fp16(w)) )

so a float32 model and its float16 copy share one fingerprint (a bfloat16 copy, rounded differently, does not),
whatever device the weights are on. Rounding halves the bytes to hash; a retrained model, whose weights move by
far more than float16's resolution somewhere, gets another fingerprint. The run key of an estimate records the
model's dtype beside it, so a checkpoint never resumes across dtypes.

This module imports torch only where it hashes tensors, so that ``table`` (which hashes files) stays light.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

LENGTH = 16  # hex digits kept of a SHA-256
_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """The full SHA-256 (hex) of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _update_tensor(digest, tensor, dtype=None) -> None:
    """Feed a tensor's shape, dtype and bytes (floating ones converted to ``dtype`` first, if given) to ``digest``."""
    import torch

    value = tensor.detach()
    if dtype is not None and value.is_floating_point():
        value = value.to(dtype)
    value = value.cpu().contiguous()
    digest.update(f"{tuple(value.shape)}|{value.dtype}|".encode())
    if value.numel():
        digest.update(value.reshape(-1).view(torch.uint8).numpy())


def tensor_fingerprint(tensor) -> str:
    """A tensor's fingerprint: its shape, dtype and bytes, as float32 for floating tensors (so that a float64 copy
    of float32 data matches)."""
    import torch

    digest = hashlib.sha256()
    _update_tensor(digest, tensor, torch.float32)
    return digest.hexdigest()[:LENGTH]


def values_fingerprint(values: Mapping[str, Any]) -> str:
    """A fingerprint of model kwargs (conditioning): each key with its tensor (:func:`tensor_fingerprint`'s bytes) or
    its ``repr``, in key order."""
    import torch

    digest = hashlib.sha256()
    for key in sorted(values):
        value = values[key]
        digest.update(f"{key}=".encode())
        if isinstance(value, torch.Tensor):
            _update_tensor(digest, value, torch.float32)
        else:
            digest.update(repr(value).encode())
        digest.update(b";")
    return digest.hexdigest()[:LENGTH]


def files_fingerprint(folder: str | os.PathLike, names: Sequence[str]) -> str:
    """A fingerprint of files in ``folder``: each name, size and content SHA-256, in the order given."""
    digest = hashlib.sha256()
    for name in names:
        path = os.path.join(folder, name)
        digest.update(f"{name}|{os.path.getsize(path)}|{file_sha256(path)};".encode())
    return digest.hexdigest()[:LENGTH]


def model_modules(model: Any) -> list:
    """The ``nn.Module``\\ s whose weights make ``model``'s output, in the order found: the model itself; an
    :class:`~analytic_sampler.EpsilonAdapter`'s model; the module of a bound method; a ``functools.partial``'s
    function and arguments; the modules a function closes over or names as globals (``lambda x, t: unet(x, t)``);
    the attributes of a callable object. A ``torch.compile``-d module counts as the module it compiles."""
    found: dict[int, Any] = {}
    for module in _modules(model, set()):
        found.setdefault(id(module), module)
    return list(found.values())


def _modules(obj: Any, seen: set[int]) -> Iterator:
    import torch

    if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, bool, type)):
        return
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        yield getattr(obj, "_orig_mod", obj)
        return
    if isinstance(obj, functools.partial):
        parts = [obj.func, *obj.args, *obj.keywords.values()]
    elif inspect.ismethod(obj):
        parts = [obj.__self__, obj.__func__]
    elif inspect.isfunction(obj):
        cells = inspect.getclosurevars(obj)
        parts = [*cells.nonlocals.values(), *cells.globals.values()]
    elif callable(obj) and hasattr(obj, "__dict__"):  # a callable object (an adapter, a wrapper class)
        parts = list(vars(obj).values())
    else:
        parts = []
    for part in parts:
        yield from _modules(part, seen)


def _named_tensors(modules: Sequence) -> list[tuple[str, Any]]:
    """``(name, tensor)`` of every parameter and buffer (persistent or not) of ``modules``, names prefixed by the
    module's position."""
    return [
        (f"{i}.{kind}.{name}", tensor)
        for i, module in enumerate(modules)
        for kind, named in (("p", module.named_parameters()), ("b", module.named_buffers()))
        for name, tensor in named
    ]


def _tensor_digest(tensor) -> str:
    import torch

    digest = hashlib.sha256()
    _update_tensor(digest, tensor, torch.float16)
    return digest.hexdigest()


def weights_fingerprint(model: Any, threads: int | None = None) -> str | None:
    """The fingerprint of the weights behind ``model`` (module docstring), ``None`` where no ``nn.Module`` is found
    (:func:`model_modules`): a plain function, or a callable whose weights are out of reach.

    Args:
        model (`nn.Module`, `EpsilonAdapter`, a pipeline component or a callable):
            The model.
        threads (`int`, *optional*):
            Tensors hashed at once (hashing and rounding release the GIL); default: the CPU count, at most 8.
    """
    modules = model_modules(model)
    if not modules:
        return None
    named = _named_tensors(modules)
    workers = max(1, min(threads or os.cpu_count() or 1, 8, len(named) or 1))
    with ThreadPoolExecutor(workers) as pool:
        digests = list(pool.map(_tensor_digest, [tensor for _, tensor in named]))
    combined = hashlib.sha256()
    for (name, tensor), digest in zip(named, digests):
        combined.update(f"{name}|{tuple(tensor.shape)}|{digest};".encode())
    return combined.hexdigest()[:LENGTH]
