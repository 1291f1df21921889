"""The samplers compared at K steps: Analytic-DPM against the Diffusers schedulers a user would otherwise run.

Each Analytic-DPM variant runs on the same timesteps as its baseline, so a comparison isolates the variance:
DDPM-type methods on the even trajectory ``[N-1, …, 0]``, DDIM-type ones on DDIMScheduler's ``trailing``
timesteps ``[N-1, N-1-N/K, …]`` (both end with the x0 prediction). Where the table has x0_mse, Analytic-DDPM
also runs with the residual variance, and one more row uses the optimal trajectory of the residual DP with it,
which minimises the likelihood bound rather than a sample-quality measure.
"""

from __future__ import annotations

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from ..scheduler import AnalyticDPMScheduler
from ..trajectory import even_trajectory

LEARNED = ("learned", "learned_range")


def sampling_methods(config, table, num_steps: int) -> dict[str, tuple[object, list[int] | None]]:
    """``name -> (scheduler, explicit timesteps or None)`` for every method that applies to the model."""
    config = dict(config)
    even = even_trajectory(config["num_train_timesteps"], num_steps)
    ddim = DDIMScheduler.from_config(config, timestep_spacing="trailing", set_alpha_to_one=True)
    ddim.set_timesteps(num_steps)
    ddim_steps = ddim.timesteps.tolist()
    methods = {
        "DDPM (btilde)": (DDPMScheduler.from_config(config, variance_type="fixed_small"), even),
        "DDPM (beta)": (DDPMScheduler.from_config(config, variance_type="fixed_large"), even),
        "Analytic-DDPM": (AnalyticDPMScheduler.from_table(table, config, eta=1.0), even),
        "DDIM": (ddim, None),
        "Analytic-DDIM": (AnalyticDPMScheduler.from_table(table, config, eta=0.0), ddim_steps),
    }
    if table.has_x0_mse:
        residual = {"eta": 1.0, "variance": "residual"}
        methods["Analytic-DDPM (residual)"] = (AnalyticDPMScheduler.from_table(table, config, **residual), even)
        methods["Analytic-DDPM (residual, optimal trajectory)"] = (
            AnalyticDPMScheduler.from_table(table, config, **residual, trajectory="optimal"), None)
    else:
        methods["Analytic-DDPM (optimal trajectory)"] = (
            AnalyticDPMScheduler.from_table(table, config, eta=1.0, trajectory="optimal"), None)
    if config.get("variance_type") in LEARNED:
        methods["Improved DDPM (learned)"] = (DDPMScheduler.from_config(config, variance_type="learned_range"), even)
    methods["DPM-Solver++(2M)"] = (DPMSolverMultistepScheduler.from_config(config, variance_type=None), None)
    return methods
