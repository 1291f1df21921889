"""StableDiffusionPipeline and StableDiffusionImg2ImgPipeline driving AnalyticDPMScheduler (tiny random SD, offline).

How these pipelines drive a scheduler (diffusers 0.42):
- ``pipe(..., eta=0.0)`` is the default and is passed to every ``scheduler.step`` (its ``step`` accepts ``eta``), so the
  scheduler config's ``eta`` (1.0 by default: Analytic-DDPM) is overridden: SD gives Analytic-DDIM unless the call
  passes ``eta=1.0``. Analytic-DDIM still adds noise, with its analytic variance; only where that is zero (c = 0,
  ``ms_eps = 1``) is it DDIM's deterministic step.
- timesteps follow the config's ``timestep_spacing="leading"`` with ``steps_offset=1``: 901, 801, ..., 1 for K = 10.
- img2img runs the last ``int(K * strength)`` of those timesteps after ``set_begin_index(K - int(K * strength))``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from diffusers import DDIMScheduler, StableDiffusionPipeline  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_sd import SD_SCHEDULER_CONFIG, tiny_images, tiny_img2img, tiny_sd_pipeline  # noqa: E402

from analytic_sampler import (  # noqa: E402
    AnalyticDPMScheduler,
    EstimateOptions,
    PipelineOptions,
    VarianceTable,
    analytic_variance,
    estimate_moments,
)

K = 10
GUIDANCE = 7.5
PROMPTS = ["a red square", "two blue dots"]


def sd_timesteps(num_steps: int) -> list[int]:
    """The timesteps Stable Diffusion's own DDIMScheduler runs for ``num_steps``."""
    ddim = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    ddim.set_timesteps(num_steps)
    return ddim.timesteps.tolist()


@pytest.fixture(scope="module")
def sd_base() -> StableDiffusionPipeline:
    """The tiny pipeline with SD's DDIMScheduler; tests build their own pipelines on its (read-only) modules."""
    return tiny_sd_pipeline()


@pytest.fixture(scope="module")
def table(sd_base) -> VarianceTable:
    """A latent table of the guided eps, from pixel images and prompts, at the K = 10 timesteps the pipelines visit."""
    images = tiny_images(8)
    prompts = [f"picture number {i}" for i in range(len(images))]
    return estimate_moments(sd_base, images, num_samples=len(images), timesteps=sd_timesteps(K),
                            options=EstimateOptions(progress=False),
                            pipeline_options=PipelineOptions(prompt=prompts, guidance_scale=GUIDANCE))


@pytest.fixture
def pipe(sd_base, table) -> StableDiffusionPipeline:
    """A fresh pipeline on ``sd_base``'s modules with the analytic scheduler assigned after construction."""
    pipe = StableDiffusionPipeline(**sd_base.components, requires_safety_checker=False)
    pipe.scheduler = AnalyticDPMScheduler.from_table(table, sd_base.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def initial_latents() -> torch.Tensor:
    return torch.randn(len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(1))


def sample(
    pipe, seed: int, latents: torch.Tensor | None = None, output_type: str = "latent", **kwargs
) -> torch.Tensor:
    """K-step guided text-to-image output (latents by default) from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        PROMPTS, num_inference_steps=K, guidance_scale=GUIDANCE, generator=generator, latents=latents,
        output_type=output_type, **kwargs,
    ).images


@torch.no_grad()
def guided_loop(pipe, latents: torch.Tensor, seed: int, eta: float) -> torch.Tensor:
    """The text-to-image loop written out: guided eps ``eps_u + w (eps_c - eps_u)``, then ``scheduler.step``."""
    cond, uncond = pipe.encode_prompt(PROMPTS, pipe.device, 1, do_classifier_free_guidance=True)
    embeds = torch.cat([uncond, cond])
    scheduler, generator, x = pipe.scheduler, torch.Generator().manual_seed(seed), latents
    scheduler.set_timesteps(K)
    for t in scheduler.timesteps:
        eps_u, eps_c = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=embeds).sample.chunk(2)
        x = scheduler.step(eps_u + GUIDANCE * (eps_c - eps_u), t, x, generator=generator, eta=eta).prev_sample
    return x


def test_text_to_image_is_finite_seeded_and_on_sds_timesteps(pipe):
    first, again, other = (sample(pipe, seed, output_type="pt") for seed in (0, 0, 1))
    assert first.shape == (len(PROMPTS), 3, 16, 16)
    assert torch.isfinite(first).all() and first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert pipe.scheduler.timesteps.tolist() == sd_timesteps(K) == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_pipeline_equals_hand_written_guided_loop(pipe, initial_latents, eta):
    latents = sample(pipe, 7, initial_latents, eta=eta)
    assert latents.shape == initial_latents.shape and torch.isfinite(latents).all()
    torch.testing.assert_close(latents, guided_loop(pipe, initial_latents, 7, eta), rtol=1e-5, atol=1e-5)


def test_pipeline_default_eta_zero_overrides_the_scheduler_config(pipe, initial_latents):
    # The config says Analytic-DDPM, but SD's __call__ has eta=0.0 and hands it to step(): Analytic-DDIM.
    assert pipe.scheduler.config.eta == 1.0
    latents = sample(pipe, 7, initial_latents)
    torch.testing.assert_close(latents, guided_loop(pipe, initial_latents, 7, eta=0.0), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(latents, guided_loop(pipe, initial_latents, 7, eta=1.0), atol=1e-3)


def test_noise_enters_only_through_the_analytic_variance_at_eta_zero(sd_base, pipe, initial_latents):
    def by_generator(**kwargs) -> list[torch.Tensor]:
        """The same initial latents stepped with two differently seeded generators."""
        return [sample(pipe, seed, initial_latents, **kwargs) for seed in (1, 2)]

    # Analytic-DDIM adds noise with variance (sqrt(abar_s) - sqrt(bb_s abar_t / bb_t))^2 c[t] > 0 ...
    assert not torch.equal(*by_generator())
    assert (pipe.scheduler.step_coefficients(0.0).sigma[:-1, 0] > 0).all()
    # ... which vanishes with c = 0 (ms_eps = 1): DDIM's deterministic step, while eta=1.0 still adds btilde noise.
    pipe.scheduler = AnalyticDPMScheduler.from_config(sd_base.scheduler.config, ms_eps=[1.0] * 1000, data_range=None)
    assert torch.equal(*by_generator())
    assert torch.equal(*by_generator(eta=0.0))
    assert not torch.allclose(*by_generator(eta=1.0), atol=1e-3)


@contextlib.contextmanager
def unet_timesteps(unet) -> Iterator[list[int]]:
    """Record the timestep of every UNet call."""
    calls: list[int] = []
    handle = unet.register_forward_pre_hook(lambda module, args: calls.append(int(args[1])))
    try:
        yield calls
    finally:
        handle.remove()


@pytest.mark.parametrize("strength, num_steps", [(0.3, 3), (0.5, 5), (1.0, 10)])
def test_img2img_runs_the_tail_of_the_trajectory(pipe, strength, num_steps):
    img2img = tiny_img2img(pipe)
    scheduler = img2img.scheduler
    steps: list[tuple[int, int | None]] = []

    def after_step(pipeline, i, t, tensors):
        steps.append((int(t), scheduler.step_index))
        return {}

    with unet_timesteps(img2img.unet) as calls:
        images = img2img(
            PROMPTS, image=(tiny_images(len(PROMPTS), seed=5) + 1) / 2, strength=strength, num_inference_steps=K,
            guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(0), output_type="pt",
            callback_on_step_end=after_step,
        ).images
    tail = scheduler.trajectory[K - num_steps :]
    assert images.shape == (len(PROMPTS), 3, 16, 16) and torch.isfinite(images).all()
    assert scheduler.trajectory == sd_timesteps(K) and scheduler.begin_index == K - num_steps
    assert calls == tail  # one (batched, guided) UNet call per step
    assert steps == list(zip(tail, [*range(K - num_steps + 1, K), None]))


def test_save_pretrained_from_pretrained_round_trip(pipe, table, tmp_path):
    pipe.scheduler = AnalyticDPMScheduler.from_table(table, pipe.scheduler.config, eta=0.5, variance="residual")
    pipe.save_pretrained(tmp_path)
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    before, after = pipe.scheduler.config, loaded.scheduler.config
    assert type(loaded.scheduler) is AnalyticDPMScheduler
    np.testing.assert_array_equal(loaded.scheduler.ms_eps, table.ms_eps)  # NaN where not estimated, too
    np.testing.assert_array_equal(loaded.scheduler.x0_mse, table.x0_mse)
    np.testing.assert_array_equal(loaded.scheduler.channel_ms_eps, table.channel_ms_eps)
    assert sorted(os.listdir(tmp_path / "scheduler")) == ["analytic_table.json", "scheduler_config.json"]
    for key in ("eta", "variance", "timestep_spacing", "steps_offset", "clip_sample", "beta_schedule", "table_sha256"):
        assert after[key] == before[key], key
    assert loaded.scheduler.table.data_range is None
    assert torch.equal(sample(pipe, 3, output_type="pt"), sample(loaded, 3, output_type="pt"))


def test_latent_model_settings_from_sds_config(sd_base, table):
    estimated = np.flatnonzero(np.isfinite(table.ms_eps) & np.isfinite(table.x0_mse))
    assert estimated.tolist() == sorted(sd_timesteps(K)) and (table.counts[estimated] == 8).all()
    scheduler = AnalyticDPMScheduler.from_table(table, sd_base.scheduler.config)
    assert table.data_range is None and scheduler.table.data_range is None
    assert scheduler.config.clip_sample is False and scheduler.config.prediction_type == "epsilon"
    scheduler.set_timesteps(K)
    assert scheduler.trajectory == sd_timesteps(K)
    # No data range: the variance is bounded by the latents' own second moment, which the table records (with the
    # latent shape), not by [-1, 1]; without it (a table of an earlier version) sigma^2 would be larger here.
    assert table.provenance["sample_shape"] == [4, 8, 8] and len(table.provenance["channel_ms_x0"]) == 4
    assert scheduler.ms_x0 == pytest.approx(np.mean(table.provenance["channel_ms_x0"]), rel=1e-12)
    t = np.asarray(scheduler.trajectory[:-1])
    s = np.asarray(scheduler.trajectory[1:])
    abar, ms_eps = scheduler.alphas_cumprod_64, scheduler.ms_eps
    bounded = analytic_variance(abar, ms_eps, s, t, eta=1.0, data_range=None, ms_x0=scheduler.ms_x0)
    np.testing.assert_allclose(scheduler.step_coefficients(1.0).sigma[:-1, 0] ** 2, bounded, rtol=1e-12)
    assert (bounded < analytic_variance(abar, ms_eps, s, t, eta=1.0, data_range=None)).any()


def test_images_are_encoded_at_the_pipelines_size_and_the_table_says_so(sd_base):
    """32 x 24 images: resized and center-cropped to the 16 x 16 the pipeline samples at (8 x 8 latents) by default;
    with resize=False encoded at their own size, and a scheduler from that table warns when sampling at 8 x 8."""
    images = torch.rand(4, 3, 32, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1
    kwargs = dict(num_samples=4, timesteps=sd_timesteps(K), options=EstimateOptions(progress=False))
    fitted = estimate_moments(sd_base, images, pipeline_options=PipelineOptions(prompt="a photo"), **kwargs)
    own = estimate_moments(sd_base, images, pipeline_options=PipelineOptions(prompt="a photo", resize=False), **kwargs)
    assert fitted.provenance["sample_shape"] == [4, 8, 8] and fitted.provenance["image_size"] == [16, 16]
    assert own.provenance["sample_shape"] == [4, 16, 12] and own.provenance["image_size"] is None
    pipe = StableDiffusionPipeline(**sd_base.components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = AnalyticDPMScheduler.from_table(fitted, sd_base.scheduler.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample(pipe, 0)
    pipe.scheduler = AnalyticDPMScheduler.from_table(own, sd_base.scheduler.config)
    with pytest.warns(UserWarning, match=r"estimated on samples of shape \(4, 16, 12\), but this pipeline samples "
                                         r"\(4, 8, 8\)"):
        sample(pipe, 0)
