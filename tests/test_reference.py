"""The reference error: the solvers in their own variables against Diffusers, the reference solution and the error of
DDIM against their closed forms for Gaussian data, the statistics, and their refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ExactGaussianEps, tiny_unet
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
from diffusers.models.unets.unet_2d import UNet2DOutput

from analytic_sampler.denoiser import Denoiser, x0_limit
from analytic_sampler.evaluation.baselines import _clip_as_thresholding
from analytic_sampler.evaluation.reference import (
    ErrorStat,
    ReferenceOptions,
    convergence,
    paired_ratio,
    reference_solution,
    squared_errors,
)
from analytic_sampler.evaluation.sampling import initial_noise, sample
from analytic_sampler.schedule import alphas_cumprod_from_config
from analytic_sampler.schedulers.timesteps import apply_timesteps
from analytic_sampler.solver_specs import DDIM, DPMPP_2M, DPMPP_3M, UNIPC, Solver
from analytic_sampler.solvers import reference_grid, solve

V = 0.05  # Gaussian data's variance: samples stay inside [-1, 1], so the final clamp changes nothing


class GaussianUNet(ExactGaussianEps):
    """The exact eps of N(0, V I) data with a UNet's face: ``.sample`` outputs and a config with the sample's shape."""

    def __init__(self, alphas_cumprod):
        super().__init__(alphas_cumprod, v=V)
        self.config = tiny_unet().config

    def forward(self, x, t):
        return UNet2DOutput(sample=super().forward(x, t))


CLASSES = {"DPMSolverMultistepScheduler": DPMSolverMultistepScheduler, "UniPCMultistepScheduler": UniPCMultistepScheduler}


def gaussian_gain(abar: np.ndarray, timesteps) -> tuple[float, float]:
    """``(G, exact)``: DDIM's x_end / x_T on ``timesteps`` (x_T taken at the first) and the ODE's from N-1, for x0 ~
    N(0, V I). With ``c_t^2 = abar_t V + 1 - abar_t`` a DDIM step is ``g(s, t) = (alpha_t alpha_s V + sigma_t
    sigma_s) / c_s^2``, the last ``alpha_s V / c_s^2``, and the ODE carries N(0, c_T^2) onto N(0, V) linearly."""
    a, s = np.sqrt(abar), np.sqrt(1 - abar)
    c2 = abar * V + 1 - abar
    gain = 1.0
    for t, nxt in zip(timesteps, [*timesteps[1:], None]):
        gain *= (a[t] * V if nxt is None else a[nxt] * a[t] * V + s[nxt] * s[t]) / c2[t]
    return gain, float(np.sqrt(V / c2[-1]))


@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_reference_error_of_ddim_is_the_closed_form_for_gaussian_data(beta_schedule):
    """DDIMScheduler on trailing timesteps, from the noise the sampling loop draws: its reference error against the
    500-point reference solution equals |G - exact| rms(x_T), and the reference lies within 1e-3 of the exact ODE
    solution (its own error)."""
    config = DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, clip_sample=False).config
    abar = alphas_cumprod_from_config(config)
    model = GaussianUNet(abar)
    x_T = initial_noise(64, (1, 8, 8), seed=3, batch_size=32)
    reference = reference_solution(model, x_T, config, ReferenceOptions(batch_size=64))
    exact = gaussian_gain(abar, [999])[1] * x_T.double()
    assert ErrorStat.of(squared_errors(reference, exact, None)).rms < 1e-3
    rms_x_T = float(x_T.double().pow(2).mean().sqrt())
    for k in (5, 10):
        ddim = DDIMScheduler.from_config(config, timestep_spacing="trailing")
        images = sample(model, ddim, 64, k, seed=3, batch_size=32, progress=False)
        gain, exact_gain = gaussian_gain(abar, ddim.timesteps.tolist())
        closed_form = abs(gain - exact_gain) * rms_x_T
        measured = ErrorStat.of(squared_errors(images, reference))
        assert measured.rms == pytest.approx(closed_form, abs=1e-3) and closed_form > 0.02
        # this package's DDIM (eps from the clipped x0; no clip here) on the same timesteps: the closed form, to the
        # float32 rounding of the model's eps
        mine = solve(DDIM, Denoiser(model, config), x_T, ddim.timesteps.tolist(), abar)[0]
        assert ErrorStat.of(squared_errors(mine, exact, None)).rms == pytest.approx(closed_form, rel=1e-4)  # float32 eps


@pytest.mark.parametrize("solver", [DDIM, DPMPP_2M, DPMPP_3M, UNIPC, Solver("UniPC-3", "unipc", 3)],
                         ids=lambda s: s.name)
@pytest.mark.parametrize("timesteps", [[999, 700, 480, 300, 170, 80, 20], [900, 500, 100], list(range(999, 0, -50))],
                         ids=["7 uneven", "3 from 900", "20 even"])
def test_solvers_reproduce_diffusers_on_any_trajectory(solver, timesteps):
    """solve() is Diffusers' scheduler on the same timesteps, x0 clipped (the clip binds: a random UNet), to float32
    rounding, on both schedules."""
    unet = tiny_unet()
    x_T = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for beta_schedule in ("linear", "squaredcos_cap_v2"):
        config = DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule).config
        class_name, options = solver.diffusers
        scheduler = CLASSES[class_name].from_config(config, **_clip_as_thresholding(config), **options)
        apply_timesteps(scheduler, timesteps)
        x = x_T.clone()
        with torch.inference_mode():
            for t in scheduler.timesteps:
                x = scheduler.step(unet(x, t).sample, t, x).prev_sample
        mine = solve(solver, Denoiser(unet, config, x0_limit(config)), x_T, timesteps, alphas_cumprod_from_config(config))[0]
        assert float(x.abs().max()) == pytest.approx(1.0, abs=1e-6)  # samples at the clip's bound
        assert torch.allclose(mine.float(), x, atol=1e-4, rtol=0)


def test_convergence_shrinks_with_more_points():
    config = DDPMScheduler(num_train_timesteps=1000, clip_sample=False).config
    model = ExactGaussianEps(alphas_cumprod_from_config(config), v=0.3)
    rows = convergence(model, torch.randn(16, 1, 8, 8), config, steps=(50, 100, 200))
    assert [(r["steps"], r["finer_steps"]) for r in rows] == [(50, 100), (100, 200)]
    assert rows[1]["rms"] < rows[0]["rms"] / 2 and rows[1]["se"] > 0


def test_statistics_and_their_refusals():
    e = np.array([0.01, 0.04, 0.09, 0.16])
    stat = ErrorStat.of(e)
    assert stat.rms == pytest.approx(np.sqrt(0.075)) and stat.n == 4
    assert stat.se == pytest.approx(np.std(e, ddof=1) / (2 * stat.rms * 2))
    assert paired_ratio(e, e) == (1.0, 0.0)
    ratio, se = paired_ratio(4 * e, e)  # every sample twice as far: the ratio is exact
    assert ratio == pytest.approx(2.0) and se == pytest.approx(0.0, abs=1e-12)
    assert paired_ratio(e[::-1], e)[1] > 0
    with pytest.raises(ValueError, match="a reference error needs at least two finite ones .*NaN has none"):
        ErrorStat.of([np.nan, 0.1])
    with pytest.raises(ValueError, match="differ in shape; solve the reference from the same x_T"):
        squared_errors(torch.zeros(3, 1, 8, 8), torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="the same samples on both sides"):
        paired_ratio(e, e[:3])
    with pytest.raises(ValueError, match="reference steps=1 must be between 2 and num_train_timesteps=1000"):
        reference_grid(1000, 1)
    with pytest.raises(ValueError, match="strictly descending integers in \\[0, 999\\]"):
        solve(DDIM, lambda x, t: (x, x), torch.zeros(1, 1, 8, 8), [500, 700], np.linspace(0.99, 0.01, 1000))
    with pytest.raises(ValueError, match="kind must be 'dpmpp' or 'unipc', order 1 to 3"):
        Solver("x", "heun", 2)


def test_denoiser_refuses_a_model_that_returns_nan():
    config = DDPMScheduler(num_train_timesteps=10).config
    with pytest.raises(ValueError, match="the model returned NaN/inf; check its weights"):
        Denoiser(lambda x, t: x * float("nan"), config)(torch.zeros(2, 1, 4, 4), torch.tensor([3, 3]))
