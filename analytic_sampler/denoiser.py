"""The model's data prediction at ``(x_t, t)`` in float64, limited as its config limits it: what the ODE solvers of
:mod:`analytic_sampler.solvers` read::

    eps    = model(x_t, t)        (any prediction type, through EpsilonAdapter; a 2C output's variance half dropped)
    x0_hat = (x_t - sqrt(1 - abar[t]) eps) / sqrt(abar[t]),   then  clamp(x0_hat, -r, r)   (clip_sample, range r)
                                                              or    dynamic thresholding    (thresholding)

The model sees float32 inputs (or its half-precision weights' dtype); the solvers' states stay float64.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from .adapter import as_epsilon_model, config_value, model_device
from .predictions import dynamic_threshold, x0_from_eps
from .schedule import as_alphas_cumprod

X0Limit = tuple[float, float] | Callable[[torch.Tensor], torch.Tensor] | None


def x0_limit(config: Mapping[str, Any] | Any) -> X0Limit:
    """What a scheduler config does to ``x0_hat``: dynamic thresholding (``thresholding``), a clip range
    (``clip_sample``, ``clip_sample_range``), or nothing (``None``; latents, configs without a clip)."""
    if config_value(config, "thresholding"):
        return functools.partial(dynamic_threshold, ratio=float(config_value(config, "dynamic_thresholding_ratio")),
                                 max_value=float(config_value(config, "sample_max_value")))
    if config_value(config, "clip_sample"):
        bound = float(config_value(config, "clip_sample_range") or 1.0)
        return (-bound, bound)
    return None


class Denoiser:
    """``(x0_hat, eps)`` of ``model`` at ``(x, t)``, float64 on the CPU (module docstring).

    Args:
        model: a Diffusers UNet, an :class:`~analytic_sampler.EpsilonAdapter` (conditioning, guidance) or a callable
            ``model(x, t)``.
        schedule: the model's scheduler, its config or ``alphas_cumprod``.
        limit: ``x0_hat``'s limit (:func:`x0_limit`); ``None``: none.
        batch_size: rows per model call.
        device: where the model runs (default: its own device).
        path_kwargs: per-path model kwargs (tensors with one row per path, e.g. prompt embeddings), picked for each
            row by the ``paths`` argument of a call.

    ``calls`` counts model evaluations (one row at one t is one call).
    """

    def __init__(self, model, schedule, limit: X0Limit = None, batch_size: int = 256,
                 device: str | torch.device | None = None, path_kwargs: Mapping[str, torch.Tensor] | None = None):
        self.adapter = as_epsilon_model(model, schedule)
        self.device = torch.device(device) if device is not None else model_device(self.adapter)
        module = self.adapter.model
        self.input_dtype = torch.float32
        if isinstance(module, torch.nn.Module):
            module.to(self.device).eval()
            weight = next(module.parameters(), None)
            if weight is not None and weight.dtype in (torch.float16, torch.bfloat16):
                self.input_dtype = weight.dtype
        roots = np.sqrt(np.stack([as_alphas_cumprod(schedule), 1.0 - as_alphas_cumprod(schedule)]))
        self.roots = torch.from_numpy(roots)  # (2, N) float64
        self.limit, self.batch_size = limit, int(batch_size)
        self.path_kwargs = {k: v.to(self.device) for k, v in (path_kwargs or {}).items()}
        self.calls = 0

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, paths: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: ``(B, ...)`` states; ``t``: ``(B,)`` integer timesteps; ``paths``: ``(B,)`` rows of ``path_kwargs``
        (default: row b is path b)."""
        x, t = x.double(), torch.as_tensor(t, dtype=torch.long)
        paths = torch.arange(x.shape[0]) if paths is None else paths
        out = []
        for lo in range(0, x.shape[0], self.batch_size):
            rows = slice(lo, lo + self.batch_size)
            kwargs = {k: v[paths[rows].to(v.device)] for k, v in self.path_kwargs.items()}
            eps = self.adapter(x[rows].to(self.device, self.input_dtype), t[rows].to(self.device), **kwargs)
            out.append(eps.double().cpu())
        eps = torch.cat(out)
        if not torch.isfinite(eps).all():
            raise ValueError("the model returned NaN/inf; check its weights, dtype and conditioning.")
        self.calls += x.shape[0]
        shape = (-1,) + (1,) * (x.ndim - 1)
        sqrt_abar, sqrt_bb = self.roots[0, t].view(shape), self.roots[1, t].view(shape)
        x0 = x0_from_eps(eps, x, sqrt_abar, sqrt_bb)
        if self.limit is not None:
            x0 = self.limit(x0) if callable(self.limit) else x0.clamp(*self.limit)
        return x0, eps
