"""The samplers compared at K steps: Analytic-DPM against the Diffusers schedulers a user would otherwise run."""

from __future__ import annotations

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from .scheduler import AnalyticDPMScheduler
from .trajectory import even_trajectory

LEARNED = ("learned", "learned_range")


def sampling_methods(config, table, num_steps: int) -> dict[str, tuple[object, list[int] | None]]:
    """``name -> (scheduler, explicit timesteps or None)`` for every method that applies to the model.

    DDPM variants run on the even trajectory ``[N-1, …, 0]``; DDIM uses ``trailing`` spacing (also starting
    at N-1, ending in x0); DPM-Solver++(2M) keeps its own defaults; Analytic-DPM uses the table's optimal
    trajectory. The learned-variance method appears only for models trained with ``learned_range``.
    """
    config = dict(config)
    n = config["num_train_timesteps"]
    even = even_trajectory(n, num_steps)
    methods = {
        "Analytic-DDPM": (AnalyticDPMScheduler.from_table(table, config, eta=1.0), None),
        "Analytic-DDIM": (AnalyticDPMScheduler.from_table(table, config, eta=0.0), None),
        "DDPM (btilde)": (DDPMScheduler.from_config(config, variance_type="fixed_small"), even),
        "DDPM (beta)": (DDPMScheduler.from_config(config, variance_type="fixed_large"), even),
        "DDIM": (DDIMScheduler.from_config(config, timestep_spacing="trailing", set_alpha_to_one=True), None),
    }
    if config.get("variance_type") in LEARNED:
        methods["Improved DDPM (learned)"] = (DDPMScheduler.from_config(config, variance_type="learned_range"), even)
    methods["DPM-Solver++(2M)"] = (DPMSolverMultistepScheduler.from_config(config, variance_type=None), None)
    return methods
