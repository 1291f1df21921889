"""Run any trajectory on any Diffusers scheduler that can take one."""

from __future__ import annotations

import inspect

import numpy as np
import torch

from ..trajectory import validate_timesteps


def apply_timesteps(scheduler, timesteps, device: str | torch.device | None = None) -> None:
    """``scheduler.set_timesteps(timesteps=...)`` for any Diffusers scheduler that can run a custom trajectory.

    Schedulers whose ``set_timesteps`` takes ``timesteps`` (AnalyticDPMScheduler, DDPM, DPM-Solver multistep and
    singlestep, Euler, Heun, LCM) get it directly. UniPCMultistepScheduler (no ``timesteps`` argument in diffusers
    0.42) gets the trajectory and the noise levels its own ``set_timesteps`` gives those timesteps, by the same float32
    torch and numpy operations (the same bits on any CPU). Any other (DDIMScheduler, whose step assumes even spacing;
    PNDM; Euler ancestral) is refused with the alternatives.
    """
    ts = validate_timesteps(timesteps, scheduler.config.num_train_timesteps)
    if "timesteps" in inspect.signature(scheduler.set_timesteps).parameters:
        scheduler.set_timesteps(timesteps=ts, device=device)
        return
    if type(scheduler).__name__ == "UniPCMultistepScheduler":
        special = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas")
                   if scheduler.config.get(k)]
        if special:
            raise ValueError(f"UniPCMultistepScheduler with {special[0]}=True sets its own timesteps; build it without "
                             "that option to run a custom trajectory.")
        scheduler.set_timesteps(len(ts), device=device)
        # the operations of its set_timesteps (diffusers 0.42, default branch), so its kernels give identical bits
        abar = scheduler.alphas_cumprod
        sigmas = np.array(((1 - abar) / abar) ** 0.5)
        sigmas = np.interp(np.array(ts, dtype=np.int64), np.arange(0, len(sigmas)), sigmas)
        last = ((1 - abar[0]) / abar[0]) ** 0.5 if scheduler.config.final_sigmas_type == "sigma_min" else 0
        scheduler.sigmas = torch.from_numpy(np.concatenate([sigmas, [last]]).astype(np.float32))
        scheduler.timesteps = torch.tensor(ts, dtype=torch.int64, device=device)
        return
    raise ValueError(
        f"{type(scheduler).__name__}.set_timesteps takes no custom timesteps in this version of diffusers"
        + (" (its step assumes evenly spaced ones)" if type(scheduler).__name__ == "DDIMScheduler" else "")
        + "; run the trajectory with AnalyticDPMScheduler (eta=0 for DDIM-type steps), "
        "DPMSolverMultistepScheduler (solver_order=1 is the DDIM update), UniPCMultistepScheduler or DDPMScheduler."
    )
