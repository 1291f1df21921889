"""Seeded noise: one generator per batch, so that a run's draws depend on its seed and the batch index only, not on
the batch order, the number of processes or what ran before."""

from __future__ import annotations

import numpy as np
import torch

NOISE_STREAMS = ("estimate", "latent", "likelihood", "fit")


def noise_generator(
    seed: int, index: int, device: str | torch.device = "cpu", stream: str = "estimate"
) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` for batch ``index`` of a run seeded with ``seed``. ``stream`` keeps the
    draws of different uses apart; each has its own seed, kept as first published so that tables and figures
    reproduce::

        estimate:    SeedSequence([seed, index])       the x_t noise of estimate_moments (index: batch)
        latent:      SeedSequence([seed, index, 1])    VAE posterior draws of a latent pipeline (index: image chunk)
        likelihood:  seed * 1_000_003 + index          the x_t noise of nll_bpd (index: batch)
        fit:         SeedSequence([seed, index, 2])    x_T of the fitted-timestep pass's paths (index: path)
    """
    if stream == "likelihood":
        state = seed * 1_000_003 + index
    elif stream in ("estimate", "latent", "fit"):
        key = [seed, index] + {"estimate": [], "latent": [1], "fit": [2]}[stream]
        state = int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0])
    else:
        raise ValueError(f"stream={stream!r}; use one of {NOISE_STREAMS}.")
    return torch.Generator(device=device).manual_seed(state)
