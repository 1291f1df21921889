"""Scheduler configs that real Hub models ship (their ``scheduler_config.json``, saved by the Diffusers version each
names), for tests of what the scheduler makes of them. None sets ``timestep_spacing``: Diffusers treats the missing
key as the scheduler's default ("leading" for PNDM, DDIM and DDPM)."""

from __future__ import annotations

import json

# runwayml/stable-diffusion-v1-5, scheduler/scheduler_config.json
SD_V1_5 = json.loads("""{
  "_class_name": "PNDMScheduler",
  "_diffusers_version": "0.6.0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "num_train_timesteps": 1000,
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "trained_betas": null,
  "clip_sample": false
}""")

# stabilityai/stable-diffusion-2-1, scheduler/scheduler_config.json
SD_2_1 = json.loads("""{
  "_class_name": "DDIMScheduler",
  "_diffusers_version": "0.10.0.dev0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "clip_sample": false,
  "num_train_timesteps": 1000,
  "prediction_type": "v_prediction",
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "trained_betas": null
}""")

# google/ddpm-cifar10-32, scheduler_config.json
DDPM_CIFAR10 = json.loads("""{
  "_class_name": "DDPMScheduler",
  "_diffusers_version": "0.1.1",
  "beta_end": 0.02,
  "beta_schedule": "linear",
  "beta_start": 0.0001,
  "clip_sample": true,
  "num_train_timesteps": 1000,
  "trained_betas": null,
  "variance_type": "fixed_small"
}""")

# DeepFloyd/IF-I-XL-v1.0, scheduler/scheduler_config.json
DEEPFLOYD_IF = json.loads("""{
  "_class_name": "DDPMScheduler",
  "_diffusers_version": "0.16.0.dev0",
  "beta_end": 0.02,
  "beta_schedule": "squaredcos_cap_v2",
  "beta_start": 0.0001,
  "clip_sample": true,
  "clip_sample_range": 1.0,
  "dynamic_thresholding_ratio": 0.95,
  "num_train_timesteps": 1000,
  "prediction_type": "epsilon",
  "sample_max_value": 1.5,
  "thresholding": true,
  "trained_betas": null,
  "variance_type": "learned_range"
}""")

HUB_CONFIGS = {
    "stable-diffusion-v1-5": SD_V1_5,
    "stable-diffusion-2-1": SD_2_1,
    "ddpm-cifar10-32": DDPM_CIFAR10,
    "IF-I-XL-v1.0": DEEPFLOYD_IF,
}
