"""Model-output conventions: prediction types and learned-variance (2C) outputs.

With ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps`` and ``v = sqrt(abar) eps - sqrt(1 - abar) x0``:

    epsilon:      x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
    sample:       eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)
    v_prediction: x0 = sqrt(abar) x_t - sqrt(1 - abar) v,   eps = sqrt(abar) v + sqrt(1 - abar) x_t
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Coefficient = torch.Tensor | float  # a schedule root: a tensor that broadcasts over the sample, or a Python float

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} is not supported; use one of {PREDICTION_TYPES}.")
    return prediction_type


def split_learned_variance(model_output: torch.Tensor, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(prediction, variance_half)``: a 2C-channel output (learned variance) is cut in two, a C-channel one is not."""
    channels = sample.shape[1]
    if model_output.shape[1] == 2 * channels:
        return model_output[:, :channels], model_output[:, channels:]
    if model_output.shape[1] != channels:
        raise ValueError(
            f"model output has {model_output.shape[1]} channels for a {channels}-channel sample; expected "
            f"{channels} (fixed variance) or {2 * channels} (learned variance). Check that the model matches the data's "
            "channel count."
        )
    return model_output, None


def to_epsilon(
    prediction: torch.Tensor, sample: torch.Tensor, sqrt_abar: torch.Tensor, sqrt_one_minus_abar: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """``eps_hat`` from a model prediction of the given type."""
    if prediction_type == "epsilon":
        return prediction
    return to_x0_and_eps(prediction, sample, sqrt_abar, sqrt_one_minus_abar, prediction_type)[1]


def to_x0_and_eps(
    prediction: torch.Tensor, sample: torch.Tensor, sqrt_abar: torch.Tensor, sqrt_one_minus_abar: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0_hat, eps_hat)`` from a model prediction of the given type; the abar terms broadcast against sample."""
    if prediction_type == "epsilon":
        return x0_from_eps(prediction, sample, sqrt_abar, sqrt_one_minus_abar), prediction
    if prediction_type == "sample":
        return prediction, (sample - sqrt_abar * prediction) / sqrt_one_minus_abar
    if prediction_type == "v_prediction":
        return sqrt_abar * sample - sqrt_one_minus_abar * prediction, sqrt_abar * prediction + sqrt_one_minus_abar * sample
    raise ValueError(f"prediction_type={prediction_type!r} is not supported; use one of {PREDICTION_TYPES}.")


def x0_from_eps(eps: torch.Tensor, sample: torch.Tensor, sqrt_abar: Coefficient, sqrt_one_minus_abar: Coefficient) -> torch.Tensor:
    """``x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)``."""
    return (sample - sqrt_one_minus_abar * eps) / sqrt_abar


def eps_from_x0(x0: torch.Tensor, sample: torch.Tensor, sqrt_abar: Coefficient, sqrt_one_minus_abar: Coefficient) -> torch.Tensor:
    """``eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)``."""
    return (sample - sqrt_abar * x0) / sqrt_one_minus_abar


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Imagen, Saharia et al. 2022), per sample ``b``::

        s_b = clamp(quantile(|x0_b|, ratio), 1, max_value),    x0_b <- clamp(x0_b, -s_b, s_b) / s_b

    the quantile over all of the sample's entries, computed in float32 at least."""
    work = x0 if x0.dtype in (torch.float32, torch.float64) else x0.float()
    s = torch.quantile(work.flatten(1).abs(), ratio, dim=1).clamp(1.0, max_value)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return (torch.maximum(torch.minimum(work, s), -s) / s).to(x0.dtype)


def clip_x0(
    x0: torch.Tensor,
    eps: torch.Tensor,
    sample: torch.Tensor,
    sqrt_abar: Coefficient,
    sqrt_one_minus_abar: Coefficient,
    clip_range: tuple[float, float] | Callable[[torch.Tensor], torch.Tensor] | None,
    recompute_eps: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0_hat, eps_hat)`` with ``x0_hat`` clamped to ``clip_range`` (or mapped by it, e.g. by
    :func:`dynamic_threshold`) and, with ``recompute_eps``, ``eps_hat`` recomputed from the new ``x0_hat``
    (:func:`eps_from_x0`), so that the mean ``sqrt(abar_s) x0_hat + sqrt(1 - abar_s - lambda^2) eps_hat`` is that of
    the clipped prediction. ``clip_range=None`` returns both unchanged."""
    if clip_range is None:
        return x0, eps
    x0 = clip_range(x0) if callable(clip_range) else x0.clamp(*clip_range)
    return x0, eps_from_x0(x0, sample, sqrt_abar, sqrt_one_minus_abar) if recompute_eps else eps
