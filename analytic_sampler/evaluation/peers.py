"""Tuned baselines: every deterministic Diffusers scheduler a user would pick, on every spacing it offers, built
``from_config`` on the model's own scheduler config and run at a matched number of model calls (NFE).

Spacings (:data:`SPACINGS`): Diffusers' ``timestep_spacing`` ``"leading"``, ``"linspace"``, ``"trailing"``, and the
noise-level spacings ``use_karras_sigmas``, ``use_exponential_sigmas``, ``use_beta_sigmas`` and ``use_lu_lambdas``
(uniform in log-SNR), wherever the class takes the option (``DPMSolverSinglestepScheduler`` has one even spacing of
its own, listed as ``"linspace"``). Clipping follows :mod:`analytic_sampler.evaluation.baselines`: DDIM reads the
config's ``clip_sample``; DPM-Solver++ (multistep and singlestep), UniPC and DEIS get it as thresholding capped at 1
(a clip of x0 to [-1, 1]); Euler, Heun, LMS and PNDM have no clip. UniPC with ``solver_type="bh1"`` runs with
``final_sigmas_type="sigma_min"``: with the default ``"zero"`` its last step multiplies ``B(h) = h = -inf`` by a zero
in diffusers 0.42 and every sample is NaN.

NFE = model calls per sample = ``len(scheduler.timesteps)``: one per step for multistep schedulers, DDIM, Euler and
LMS; Heun ``2n - 1`` for n steps; PNDM (PLMS) ``n + 1``. :meth:`Peer.steps_for` takes the largest n within K.
The best peer at a K is the row with the lowest reference error (:mod:`analytic_sampler.evaluation.reference`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import diffusers

from ..solver_specs import Solver
from .baselines import Sampler, _clip_as_thresholding, _variance_half

SPACINGS: dict[str, dict[str, Any]] = {
    "leading": {"timestep_spacing": "leading"},
    "linspace": {"timestep_spacing": "linspace"},
    "trailing": {"timestep_spacing": "trailing"},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "beta": {"use_beta_sigmas": True},
    "logSNR": {"use_lu_lambdas": True},
}
OWN_SPACING = {"DPMSolverSinglestepScheduler": "linspace"}  # classes whose only even spacing has no option
NO_CLIP = ("EulerDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler", "PNDMScheduler")


@dataclass(frozen=True)
class Peer:
    """One baseline: a solver ``family`` (its label), the Diffusers class, ``from_config`` options, ``step``
    options, and the ``spacing`` (a key of :data:`SPACINGS`)."""

    family: str
    class_name: str
    options: tuple[tuple[str, Any], ...] = ()
    step_options: tuple[tuple[str, Any], ...] = ()
    spacing: str = "leading"

    @property
    def name(self) -> str:
        return f"{self.family} [{self.spacing}]"

    @property
    def cls(self) -> type:
        return getattr(diffusers, self.class_name)

    def supported(self) -> bool:
        """Whether the class offers this spacing."""
        if self.class_name in OWN_SPACING and "timestep_spacing" in SPACINGS[self.spacing]:
            return self.spacing == OWN_SPACING[self.class_name]
        return all(k in inspect.signature(self.cls.__init__).parameters for k in SPACINGS[self.spacing])

    def sampler(self, config: Mapping[str, Any]) -> Sampler:
        """The scheduler on the model's ``config`` (clip and spacing as in the module docstring) and step options."""
        if not self.supported():
            raise ValueError(f"{self.class_name} offers no {self.spacing!r} spacing; use one of "
                             f"{[s for s in SPACINGS if Peer(self.family, self.class_name, spacing=s).supported()]}.")
        spacing = {} if self.class_name in OWN_SPACING and self.spacing == OWN_SPACING[self.class_name] else SPACINGS[
            self.spacing]
        return Sampler(build_scheduler(self.class_name, config, {**dict(self.options), **spacing}),
                       step_kwargs=dict(self.step_options))

    def steps_for(self, config: Mapping[str, Any], nfe: int) -> int:
        """The largest number of steps whose model calls do not exceed ``nfe``."""
        scheduler = self.sampler(config).scheduler
        for steps in range(nfe, 0, -1):
            scheduler.set_timesteps(steps)
            if len(scheduler.timesteps) <= nfe:
                return steps
        raise ValueError(f"{self.name} cannot run within {nfe} model calls.")


def build_scheduler(class_name: str, config: Mapping[str, Any], options: Mapping[str, Any]):
    """``class_name.from_config(config, **options)`` with the clip of the module docstring and without a learned
    variance where the class cannot read it."""
    cls = getattr(diffusers, class_name)
    params = inspect.signature(cls.__init__).parameters
    clip = {} if class_name in NO_CLIP or "thresholding" not in params or class_name == "DDIMScheduler" else (
        _clip_as_thresholding(config))
    if class_name == "PNDMScheduler":
        options = {"skip_prk_steps": True, **options}
    return cls.from_config(dict(config), **{**clip, **_variance_half(cls, config), **options})


def solver_sampler(solver: Solver, config: Mapping[str, Any], timesteps: Sequence[int]) -> Sampler:
    """The Diffusers scheduler that runs ``solver`` (:attr:`~analytic_sampler.solvers.Solver.diffusers`), clipped
    as the model's config asks, on explicit ``timesteps`` (fitted ones, or any other trajectory)."""
    class_name, options = solver.diffusers
    return Sampler(build_scheduler(class_name, config, options), [int(t) for t in timesteps])


def _family(label: str, class_name: str, step: Mapping[str, Any] | None = None, **options) -> tuple:
    return label, class_name, tuple(sorted(options.items())), tuple(sorted((step or {}).items()))


FAMILIES = (
    _family("DDIM", "DDIMScheduler"),
    _family("DDIM (eps from clipped x0)", "DDIMScheduler", {"use_clipped_model_output": True}),
    _family("DPM-Solver++(2M)", "DPMSolverMultistepScheduler", algorithm_type="dpmsolver++", solver_order=2),
    _family("DPM-Solver++(3M)", "DPMSolverMultistepScheduler", algorithm_type="dpmsolver++", solver_order=3),
    _family("UniPC-2 (bh2)", "UniPCMultistepScheduler", solver_order=2, solver_type="bh2"),
    _family("UniPC-3 (bh2)", "UniPCMultistepScheduler", solver_order=3, solver_type="bh2"),
    _family("UniPC-2 (bh1)", "UniPCMultistepScheduler", solver_order=2, solver_type="bh1",
            final_sigmas_type="sigma_min"),
    _family("UniPC-3 (bh1)", "UniPCMultistepScheduler", solver_order=3, solver_type="bh1",
            final_sigmas_type="sigma_min"),
    _family("DEIS-2", "DEISMultistepScheduler", solver_order=2),
    _family("DEIS-3", "DEISMultistepScheduler", solver_order=3),
    _family("DPM-Solver++(2S)", "DPMSolverSinglestepScheduler", algorithm_type="dpmsolver++", solver_order=2),
    _family("DPM-Solver++(3S)", "DPMSolverSinglestepScheduler", algorithm_type="dpmsolver++", solver_order=3),
    _family("Euler", "EulerDiscreteScheduler"),
    _family("Heun", "HeunDiscreteScheduler"),
    _family("LMS", "LMSDiscreteScheduler"),
    _family("PNDM (PLMS)", "PNDMScheduler"),
)


def all_peers(families: Sequence[tuple] = FAMILIES) -> list[Peer]:
    """Every (family, spacing) the family's class supports."""
    peers = [Peer(label, cls, options, step, spacing) for label, cls, options, step in families for spacing in SPACINGS]
    return [peer for peer in peers if peer.supported()]


STOCHASTIC = ("DDPMScheduler", "EulerAncestralDiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
              "DPMSolverSDEScheduler", "LCMScheduler", "TCDScheduler", "AnalyticDPMScheduler",
              "CMStochasticIterativeScheduler", "ScoreSdeVeScheduler")


def is_deterministic(sampler: Sampler) -> bool:
    """Whether a sampler's samples are a function of x_T alone (the ones a reference error applies to): not a
    stochastic class, no SDE variant, DDIM at ``eta = 0``, Euler without churn."""
    scheduler = sampler.scheduler
    if type(scheduler).__name__ in STOCHASTIC:
        return False
    if "sde" in str(scheduler.config.get("algorithm_type", "")):
        return False
    return not sampler.step_kwargs.get("eta", 0) and not sampler.step_kwargs.get("s_churn", 0)
