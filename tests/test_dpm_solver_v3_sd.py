"""StableDiffusionPipeline driving DPMSolverV3Scheduler (tiny random SD, offline): statistics of the guided eps per
latent channel, the pipeline's guided loop, and a saved pipeline that loads with its statistics."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from diffusers import StableDiffusionPipeline  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_sd import tiny_images, tiny_sd_pipeline  # noqa: E402

from analytic_sampler import (  # noqa: E402
    DPMSolverV3Scheduler,
    EstimateOptions,
    PipelineOptions,
    StatisticsOptions,
    estimate_solver_statistics,
)

K = 6
GUIDANCE = 5.0
PROMPTS = ["a red square", "two blue dots"]


@pytest.fixture(scope="module")
def sd_base() -> StableDiffusionPipeline:
    return tiny_sd_pipeline()


@pytest.fixture(scope="module")
def statistics(sd_base):
    images = tiny_images(8)
    return estimate_solver_statistics(
        sd_base, images, options=StatisticsOptions(grid_points=12, num_samples=8, groups=2, batch_size=32),
        estimate_options=EstimateOptions(progress=False),
        pipeline_options=PipelineOptions(prompt=[f"picture {i}" for i in range(8)], guidance_scale=GUIDANCE),
    )


@pytest.fixture
def pipe(sd_base, statistics) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(**sd_base.components, requires_safety_checker=False)
    pipe.scheduler = DPMSolverV3Scheduler.from_table(statistics, sd_base.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_latent_statistics_are_per_channel_unclipped_and_guided(statistics):
    assert statistics.feature_shape == (4, 1, 1) and statistics.data_range is None
    assert statistics.provenance["guidance_scale"] == GUIDANCE and statistics.provenance["per"] == "channel"


def test_pipeline_equals_the_hand_written_guided_loop(pipe):
    assert not pipe.scheduler.config.clip_sample  # the statistics' latents have no range
    latents = torch.randn(len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(1))
    out = pipe(PROMPTS, num_inference_steps=K, guidance_scale=GUIDANCE, latents=latents, output_type="latent").images
    cond, uncond = pipe.encode_prompt(PROMPTS, pipe.device, 1, do_classifier_free_guidance=True)
    embeds, scheduler, x = torch.cat([uncond, cond]), pipe.scheduler, latents
    scheduler.set_timesteps(K)
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps_u, eps_c = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=embeds).sample.chunk(2)
            x = scheduler.step(eps_u + GUIDANCE * (eps_c - eps_u), t, x).prev_sample
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


def test_a_saved_pipeline_loads_with_its_statistics(pipe, statistics, tmp_path):
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "scheduler" / "dpm_solver_v3_statistics.json").is_file()
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path, safety_checker=None, requires_safety_checker=False)
    assert isinstance(loaded.scheduler, DPMSolverV3Scheduler)
    np.testing.assert_array_equal(loaded.scheduler.statistics.s, statistics.s)
