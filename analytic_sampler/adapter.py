"""``EpsilonAdapter``: any Diffusers UNet or callable ``model(sample, timestep, **kwargs)`` as an epsilon model.

With ``abar = alphas_cumprod[t]`` the other parameterisations convert as::

    v_prediction:  eps = sqrt(abar) v + sqrt(1 - abar) x_t
    sample:        eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)

Classifier-free guidance combines the two passes ``eps = eps_u + s (eps_c - eps_u)``; the conversions are
affine in the model output, so combining before converting is the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .predictions import check_prediction_type, split_learned_variance, to_epsilon
from .schedule import as_alphas_cumprod, same_schedule


def model_output_tensor(output: Any) -> torch.Tensor:
    """The tensor in a model's output: the tensor itself, the first entry of a tuple, or ``.sample``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(getattr(output, "sample", None), torch.Tensor):
        return output.sample
    raise TypeError(
        f"the model returned {type(output).__name__}; it must return a tensor, a tuple whose first entry is "
        "a tensor, or an object with a `.sample` tensor (e.g. UNet2DOutput)."
    )


def _to_batch(value: Any, batch: int) -> Any:
    """A single-row tensor (one prompt embedding for all) expanded to ``batch`` rows; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == 1 and batch > 1:
        return value.expand(batch, *value.shape[1:])
    return value


def config_value(obj: Any, key: str) -> Any:
    """``key`` of a scheduler's / model's config (or of a plain mapping), ``None`` where there is none."""
    config = getattr(obj, "config", obj)
    return config.get(key) if isinstance(config, Mapping) else None


def model_device(model: Any) -> torch.device:
    """Where a model (or an adapter's model) runs: the device of its first parameter; the CPU for a callable."""
    module = model.model if isinstance(model, EpsilonAdapter) else model
    param = next(module.parameters(), None) if isinstance(module, torch.nn.Module) else None
    return param.device if param is not None else torch.device("cpu")


def as_epsilon_model(model: Any, schedule: Any, prediction_type: str | None = None, **options) -> EpsilonAdapter:
    """``model`` as an :class:`EpsilonAdapter` on ``schedule``: a bare model predicts ``prediction_type``, by default
    the one the schedule's config names, else ``"epsilon"``; an adapter is reused (:meth:`EpsilonAdapter.wrap`,
    which refuses options next to it). ``options``: more :class:`EpsilonAdapter` arguments (guidance)."""
    if not isinstance(model, EpsilonAdapter):
        prediction_type = prediction_type or config_value(schedule, "prediction_type") or "epsilon"
    if prediction_type is not None:
        options["prediction_type"] = prediction_type
    return EpsilonAdapter.wrap(model, schedule, **options)


class EpsilonAdapter:
    """Wrap ``model`` so that ``adapter(x_t, t, **kwargs)`` returns epsilon, whatever the model predicts.

    Args:
        model (`UNet2DModel`, `UNet2DConditionModel` or a callable):
            Any callable ``model(sample, timestep, **kwargs)`` returning a tensor, a tuple with the tensor first, or
            an object with ``.sample``.
        schedule (a scheduler, its config or `np.ndarray`):
            The model's noise schedule (its ``alphas_cumprod``).
        prediction_type (`str`, defaults to `"epsilon"`):
            What the model predicts: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        timestep_shift (`float`, defaults to 0):
            The model is called with ``(t + timestep_shift) * timestep_scale`` (e.g. ``-1`` for checkpoints indexed
            from 1).
        timestep_scale (`float`, defaults to 1.0):
            Likewise (e.g. ``1000 / N`` for rescaled timesteps).
        guidance_scale (`float`, *optional*):
            The classifier-free guidance scale ``s``: ``eps = eps_u + s (eps_c - eps_u)``; needs ``uncond_kwargs``.
        uncond_kwargs (`dict`, *optional*):
            Model kwargs of the unconditional pass; they override the conditional kwargs.
        **model_kwargs:
            Passed to every model call (e.g. ``encoder_hidden_states``, ``class_labels``).
    """

    def __init__(
        self,
        model,
        schedule,
        prediction_type: str = "epsilon",
        timestep_shift: int | float = 0,
        timestep_scale: float = 1.0,
        guidance_scale: float | None = None,
        uncond_kwargs: Mapping[str, Any] | None = None,
        **model_kwargs,
    ):
        if isinstance(model, EpsilonAdapter):
            raise TypeError("model is already an EpsilonAdapter; use EpsilonAdapter.wrap(model, schedule) to reuse it.")
        if not callable(model):
            raise TypeError(f"model must be callable as model(sample, timestep, **kwargs); got {type(model).__name__}.")
        check_prediction_type(prediction_type)
        if guidance_scale is not None and uncond_kwargs is None:
            raise ValueError(
                "guidance_scale needs uncond_kwargs, the model kwargs of the unconditional pass "
                "(e.g. uncond_kwargs={'encoder_hidden_states': empty_prompt_embeds})."
            )
        self.model = model
        self.alphas_cumprod = as_alphas_cumprod(schedule)
        self.prediction_type = prediction_type
        self.timestep_shift = timestep_shift
        self.timestep_scale = float(timestep_scale)
        self.guidance_scale = guidance_scale
        self.uncond_kwargs = dict(uncond_kwargs or {})
        self.model_kwargs = model_kwargs
        abar = torch.from_numpy(self.alphas_cumprod)
        self._coefficients = torch.stack([abar.sqrt(), (1.0 - abar).sqrt()])  # float64, (2, N)
        self._cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    @classmethod
    def wrap(cls, model_or_adapter, schedule, **kwargs) -> EpsilonAdapter:
        """``model_or_adapter`` if it is already an adapter for this schedule, else ``EpsilonAdapter(model, ...)``."""
        if not isinstance(model_or_adapter, EpsilonAdapter):
            return cls(model_or_adapter, schedule, **kwargs)
        if kwargs:
            raise ValueError(
                f"got an EpsilonAdapter together with adapter options {sorted(kwargs)}; set them on the adapter itself."
            )
        if not same_schedule(as_alphas_cumprod(schedule), model_or_adapter.alphas_cumprod):
            raise ValueError(
                "the EpsilonAdapter was built for a different noise schedule than the one given; "
                "build the adapter with the same scheduler."
            )
        return model_or_adapter

    def coefficients(self, t: int | torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sqrt(abar[t]), sqrt(1 - abar[t]))`` in ``like``'s dtype and device, shaped to broadcast over it."""
        key = (like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = self._coefficients.to(device=like.device, dtype=like.dtype)
        table = self._cache[key]
        if isinstance(t, torch.Tensor):
            t = t.to(device=like.device, dtype=torch.long)
            if t.ndim == 1:
                shape = (-1,) + (1,) * (like.ndim - 1)
                return table[0, t].view(shape), table[1, t].view(shape)
        return table[0, t], table[1, t]

    def model_timestep(self, t: int | torch.Tensor) -> int | float | torch.Tensor:
        """The timestep the model sees: ``(t + timestep_shift) * timestep_scale``."""
        if self.timestep_shift == 0 and self.timestep_scale == 1.0:
            return t
        return (t + self.timestep_shift) * self.timestep_scale

    @staticmethod
    def split_output(model_output: Any, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(main, variance_half)``: a 2C-channel output (learned variance) splits in two, else ``(output, None)``."""
        return split_learned_variance(model_output_tensor(model_output), sample)

    def to_epsilon(self, main: torch.Tensor, sample: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """Convert the model's main output (eps, v or x0, per ``prediction_type``) to epsilon."""
        if self.prediction_type == "epsilon":
            return main
        return to_epsilon(main, sample, *self.coefficients(t, sample), self.prediction_type)

    def _call_model(
        self, x_t: torch.Tensor, t: int | torch.Tensor, kwargs: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.split_output(self.model(x_t, self.model_timestep(t), **kwargs), x_t)

    def _guided(
        self, x_t: torch.Tensor, t: int | torch.Tensor, cond: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cond = {k: _to_batch(v, x_t.shape[0]) for k, v in cond.items()}
        uncond = {**cond, **{k: _to_batch(v, x_t.shape[0]) for k, v in self.uncond_kwargs.items()}}
        batchable = all(
            isinstance(cond.get(k), torch.Tensor) and isinstance(v, torch.Tensor) and cond[k].shape == v.shape
            for k, v in uncond.items()
        )
        if batchable:
            both = {k: torch.cat([v, cond[k]]) for k, v in uncond.items()}
            t2 = torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.ndim == 1 else t
            main, variance = self._call_model(torch.cat([x_t, x_t]), t2, both)
            (out_u, out_c), variance = main.chunk(2), None if variance is None else variance.chunk(2)[1]
        else:
            out_u, (out_c, variance) = self._call_model(x_t, t, uncond)[0], self._call_model(x_t, t, cond)
        return out_u + self.guidance_scale * (out_c - out_u), variance

    def predict(
        self, x_t: torch.Tensor, t: int | torch.Tensor, **extra_kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(eps, variance_half)`` at training timestep(s) ``t``: the eps of :meth:`__call__` and, for a model with
        2C output channels (learned variance), the variance half of its (conditional) output, else ``None``."""
        kwargs = {**self.model_kwargs, **extra_kwargs}
        if self.guidance_scale is None:
            main, variance = self._call_model(x_t, t, kwargs)
        else:
            main, variance = self._guided(x_t, t, kwargs)
        return self.to_epsilon(main, x_t, t), variance

    def __call__(self, x_t: torch.Tensor, t: int | torch.Tensor, **extra_kwargs) -> torch.Tensor:
        """Epsilon at training timestep(s) ``t`` (an int or a LongTensor of shape ``(B,)``)."""
        return self.predict(x_t, t, **extra_kwargs)[0]

    def __repr__(self) -> str:
        guidance = "" if self.guidance_scale is None else f", guidance_scale={self.guidance_scale}"
        return (
            f"EpsilonAdapter({type(self.model).__name__}, N={self.alphas_cumprod.size}, "
            f"prediction_type={self.prediction_type!r}, timestep_shift={self.timestep_shift}, "
            f"timestep_scale={self.timestep_scale}{guidance})"
        )
