"""Tiny randomly initialised Stable Diffusion pipelines, built offline, for test_stable_diffusion.py.

16x16 RGB images, 4x8x8 latents, a 2-layer CLIP text encoder over a byte-level vocabulary, and Stable Diffusion
v1's real scheduler config (so the pipelines drive the scheduler exactly as they drive SD's).
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

IMAGE_SIZE = 16
MAX_PROMPT_TOKENS = 16
# The scheduler_config.json of Stable Diffusion v1.x.
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    timestep_spacing="leading",
    steps_offset=1,
    clip_sample=False,
    set_alpha_to_one=False,
    prediction_type="epsilon",
)


def _byte_characters() -> list[str]:
    """CLIP's byte-level alphabet: printable Latin-1 bytes stand for themselves, the others for ``chr(256 + k)``."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    chars, k = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + k))
            k += 1
    return chars


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer with no merges: every byte is a token (``</w>`` marks a word's last byte)."""
    chars = _byte_characters()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump({token: i for i, token in enumerate(tokens)}, f)
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_PROMPT_TOKENS)


def tiny_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline of random weights (seeded) with SD's DDIMScheduler and no safety checker."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        sample_size=IMAGE_SIZE,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_PROMPT_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_img2img(pipe: StableDiffusionPipeline) -> StableDiffusionImg2ImgPipeline:
    """The img2img pipeline on ``pipe``'s components (the same modules and scheduler object)."""
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    img2img.set_progress_bar_config(disable=True)
    return img2img


def tiny_images(num_images: int, seed: int = 0) -> torch.Tensor:
    """Seeded random RGB images in [-1, 1], shape ``(num_images, 3, 16, 16)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(num_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g) * 2 - 1
