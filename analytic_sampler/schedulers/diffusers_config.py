"""How a Diffusers scheduler config maps onto :class:`~analytic_sampler.AnalyticDPMScheduler`.

- Which keys a config really sets: a live scheduler's config lists the arguments it was not given in
  ``_use_default_values``, which ``from_config`` then drops.
- Which timesteps its scheduler would run: a config without ``timestep_spacing`` (saved by Diffusers before the
  option existed: Stable Diffusion v1.x and 2.x, google/ddpm-*, DeepFloyd IF) gets that scheduler's default
  (``"leading"`` for DDPM, DDIM and PNDM) with the config's ``steps_offset``, as the scheduler itself would.
- Which of its options this scheduler does not use, where they ask for something it does not do.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import diffusers
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin

SPACING_KEYS = ("timestep_spacing", "steps_offset")

# Options of Diffusers' schedulers that AnalyticDPMScheduler does not read, with the values that mean what it does
# anyway; any other value is named in one warning. The settings of the solver it replaces (solver_order,
# algorithm_type, skip_prk_steps, ...) are not listed: they describe how that scheduler integrates.
IGNORED_OPTIONS: dict[str, tuple[Any, ...]] = {
    "set_alpha_to_one": (True,),  # the last step always goes to clean data (abar = 1)
    "variance_type": (None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"),  # learned: dropped
    "use_karras_sigmas": (False,),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_flow_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "final_sigmas_type": ("zero",),
    "timestep_type": ("discrete",),
    "interpolation_type": ("linear",),
    "sigma_min": (None,),
    "sigma_max": (None,),
    "lambda_min_clipped": (-math.inf,),
    "use_dynamic_shifting": (False,),
    "flow_shift": (1.0,),
    "shift_terminal": (None,),
    "sigma_schedule": (),
    "sigma_data": (),
    "rho": (),
}


def explicit_keys(config: Mapping[str, Any]) -> set[str]:
    """The keys a config sets: present, not private, and not listed as left at their default."""
    defaults = set(config.get("_use_default_values", ()))
    return {key for key in config if not key.startswith("_") and key not in defaults}


def _init_parameters(cls: type) -> dict[str, inspect.Parameter]:
    return {n: p for n, p in inspect.signature(cls.__init__).parameters.items() if n not in ("self", "kwargs")}


def source_scheduler(config: Mapping[str, Any]) -> type | None:
    """The Diffusers scheduler class a config belongs to: the one ``_class_name`` names, else the one of Diffusers'
    compatible schedulers whose arguments are exactly the config's keys (a live scheduler's config); ``None`` if
    neither tells."""
    name = config.get("_class_name")
    if name is not None:
        cls = getattr(diffusers, name, None) if isinstance(name, str) else None
        return cls if isinstance(cls, type) and issubclass(cls, SchedulerMixin) else None
    keys = {key for key in config if not key.startswith("_")}
    matches = [
        cls for cls in (getattr(diffusers, e.name, None) for e in KarrasDiffusionSchedulers)
        if isinstance(cls, type) and set(_init_parameters(cls)) == keys
    ]
    return matches[0] if len(matches) == 1 else None


def with_source_spacing(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with ``timestep_spacing`` and ``steps_offset`` set as the scheduler it came from uses them: the
    config's own values, or that scheduler's defaults where the config does not set them. A config whose source is
    unknown (or has no such options) is returned unchanged."""
    config = dict(config)
    unset = [key for key in SPACING_KEYS if key not in explicit_keys(config)]
    cls = source_scheduler(config) if unset else None
    if cls is None:
        return config
    parameters = _init_parameters(cls)
    resolved = [key for key in unset if key in parameters]
    for key in resolved:
        config[key] = config.get(key, parameters[key].default)
    if "_use_default_values" in config:
        config["_use_default_values"] = [k for k in config["_use_default_values"] if k not in resolved]
    return config


def ignored_options(config: Mapping[str, Any]) -> list[str]:
    """The options of :data:`IGNORED_OPTIONS` that ``config`` sets to a value this scheduler does not honour."""
    return sorted(
        name for name, neutral in IGNORED_OPTIONS.items()
        if name in config and not any(config[name] == value for value in neutral)
    )
