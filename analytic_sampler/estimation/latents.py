"""Latent text-to-image pipelines (Stable Diffusion class): pixel images and prompts encoded once per image.

The Monte Carlo data of such a model are latents and prompt embeddings::

    x0   = (z - shift_factor) * scaling_factor,   z = mean (default) or a sample of the VAE posterior q(z | image)
    cond = pipe.encode_prompt(prompt)              (the pipeline's own text encoder, no guidance)

Images are first resized (shorter side) and center-cropped to the size the pipeline samples at by default (its
UNet's ``sample_size`` times the VAE's scale factor), so that the latents have the shape the sampler will see;
``resize=False`` encodes them at their own size. The table records the latent shape and the latents' mean square per
channel (``sample_shape``, ``channel_ms_x0`` in its provenance).

:class:`PipelineSamples` encodes them ``chunk`` images at a time, as the estimate reaches them, and keeps only the
chunks the current batch needs, so memory stays bounded by the chunk and batch sizes whatever the number of images.
Chunks are fixed (images ``[k chunk, (k+1) chunk)``), so the latents do not depend on the batch size or on the
number of processes; :func:`encode_images` / :func:`encode_prompts` with the same ``batch_size`` give the same ones.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..fingerprint import files_fingerprint, tensor_fingerprint, weights_fingerprint
from ..noise import noise_generator
from .data import METADATA_FILES, check_range, folder_files, iter_batches

LATENTS = ("mean", "sample")
CAPTION_FILES = METADATA_FILES
CAPTION_KEYS = ("text", "caption", "prompt")


def is_latent_pipeline(obj: Any) -> bool:
    """A Diffusers pipeline with a UNet, a VAE and a scheduler (``StableDiffusionPipeline`` and its kind)."""
    return all(getattr(obj, name, None) is not None for name in ("unet", "vae", "scheduler")) and hasattr(
        obj, "components"
    )


def _latent_chunk(pipe, images: torch.Tensor, latent: str, generator: torch.Generator | None) -> torch.Tensor:
    vae = pipe.vae
    posterior = vae.encode(images.to(device=vae.device, dtype=vae.dtype).contiguous()).latent_dist
    z = posterior.mean if latent == "mean" else posterior.sample(generator)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((z - shift) * vae.config.scaling_factor).float()


def pipeline_image_size(pipe) -> tuple[int, int] | None:
    """``(height, width)`` the pipeline samples at by default: its UNet's ``sample_size`` times the VAE's scale
    factor (512 x 512 for Stable Diffusion v1.5); ``None`` when the pipeline does not say."""
    size = getattr(pipe.unet.config, "sample_size", None)
    factor = getattr(pipe, "vae_scale_factor", None)
    if size is None or factor is None:
        return None
    height, width = (size, size) if isinstance(size, int) else size
    return int(height * factor), int(width * factor)


def fit_to_size(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, C, H, W)`` images in ``[-1, 1]`` resized so that they cover ``size`` (bicubic, antialiased, the aspect
    ratio kept) and center-cropped to it; unchanged when they have that size."""
    height, width = images.shape[-2:]
    if (height, width) == tuple(size):
        return images
    scale = max(size[0] / height, size[1] / width)
    resized = (max(size[0], round(height * scale)), max(size[1], round(width * scale)))
    out = torch.nn.functional.interpolate(images.float(), size=resized, mode="bicubic", antialias=True,
                                          align_corners=False).clamp(-1.0, 1.0)
    top, left = (resized[0] - size[0]) // 2, (resized[1] - size[1]) // 2
    return out[..., top : top + size[0], left : left + size[1]].to(images.dtype)


def _check_latent(latent: str) -> None:
    if latent not in LATENTS:
        raise ValueError(f"latent={latent!r}; use 'mean' (the VAE posterior mean) or 'sample' (a draw from it).")


@torch.inference_mode()
def encode_images(
    pipe, images: torch.Tensor, latent: str = "mean", batch_size: int = 16, seed: int = 0
) -> torch.Tensor:
    """Latents ``(z - shift_factor) * scaling_factor`` of pixel ``images`` in ``[-1, 1]``, ``batch_size`` at a time
    (``latent="sample"``: posterior draws seeded by ``(seed, batch)``), float32 on the VAE's device."""
    _check_latent(latent)
    return torch.cat([
        _latent_chunk(pipe, images[i : i + batch_size], latent, noise_generator(seed, k, stream="latent"))
        for k, i in enumerate(range(0, images.shape[0], batch_size))
    ])


def _encode_prompt_chunk(pipe, prompts: list[str]) -> torch.Tensor:
    if not hasattr(pipe, "encode_prompt"):
        raise ValueError(f"{type(pipe).__name__} has no encode_prompt; pass prompt embeddings in model_kwargs.")
    out = pipe.encode_prompt(prompts, pipe.unet.device, 1, False)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor)):
        raise ValueError(
            f"{type(pipe).__name__}.encode_prompt returns more than one prompt embedding (SDXL-type pipelines need "
            "added_cond_kwargs too); encode latents and embeddings yourself and pass them as data and model_kwargs."
        )
    return out[0]


@torch.inference_mode()
def encode_prompts(pipe, prompts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """The pipeline's own conditional prompt embeddings (``encode_prompt`` without guidance), ``batch_size`` at a time."""
    prompts = list(prompts)
    return torch.cat([_encode_prompt_chunk(pipe, prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)])


def read_captions(path: str | os.PathLike, folder: str | os.PathLike | None = None) -> list[str]:
    """Captions in image order: ``.txt`` one line per image (the folder's images sorted by name); ``.jsonl`` /
    ``.csv`` rows with ``file_name`` and ``text`` (or ``caption`` / ``prompt``), as Hugging Face's imagefolder
    ``metadata.jsonl``, matched to the images of ``folder``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"captions file {path!r} not found; pass a .txt, .jsonl or .csv file.")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".txt":
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
        count = None if folder is None else len(folder_files(os.fspath(folder)))
        if count is not None and len(lines) != count:
            raise ValueError(f"captions file {path} has {len(lines)} lines but {folder} holds {count} images; give "
                             "one line per image, in the order of the sorted file names.")
        return lines
    if ext not in (".jsonl", ".csv"):
        raise ValueError(f"captions file {path!r}: use .txt (one line per image), .jsonl or .csv (file_name, text).")
    with open(path, encoding="utf-8", newline="") as f:
        rows = [json.loads(line) for line in f if line.strip()] if ext == ".jsonl" else list(csv.DictReader(f))
    by_name = {}
    for i, row in enumerate(rows):
        key = next((k for k in CAPTION_KEYS if k in row), None)
        if "file_name" not in row or key is None:
            raise ValueError(f"{path} row {i + 1} needs 'file_name' and one of {CAPTION_KEYS}; it has {sorted(row)}.")
        by_name[os.path.basename(row["file_name"])] = row[key]
    if folder is None:
        raise ValueError(f"{path} names image files; pass the image folder as data so the captions can be matched.")
    names = folder_files(os.fspath(folder))
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"{path} has no caption for {len(missing)} image(s) of {folder} (e.g. {missing[0]!r}).")
    return [by_name[n] for n in names]


def resolve_prompts(
    data: Any, num_samples: int, prompt: str | Sequence[str] | None, captions: str | os.PathLike | None
) -> tuple[list[str], str]:
    """One prompt per image, and a description of where they came from for the table's provenance.

    ``prompt``: one prompt for all images, or a list with one per image; ``captions``: a captions file
    (:func:`read_captions`); neither: the folder's own ``metadata.jsonl`` / ``metadata.csv`` if ``data`` is a folder.
    """
    if prompt is not None and captions is not None:
        raise ValueError("pass either prompt (one for all, or one per image) or captions (a file), not both.")
    folder = os.fspath(data) if isinstance(data, (str, os.PathLike)) and os.path.isdir(data) else None
    if prompt is None and captions is None and folder is not None:
        captions = next((os.path.join(folder, n) for n in CAPTION_FILES if os.path.isfile(os.path.join(folder, n))), None)
    if isinstance(prompt, str):
        return [prompt] * num_samples, f"prompt: {prompt!r}"
    if prompt is not None:
        prompts, source = list(prompt), "the prompt list"
    elif captions is not None:
        prompts, source = read_captions(captions, folder), f"captions: {os.fspath(captions)}"
    else:
        raise ValueError(
            "this pipeline is text-conditioned: pass prompt='...' (one for all images; '' for the unconditional "
            "model), a list with one prompt per image, or captions=FILE (.txt, .jsonl, .csv)."
        )
    if len(prompts) < num_samples or not all(isinstance(p, str) for p in prompts):
        raise ValueError(
            f"{source} gives {len(prompts)} prompt(s) for num_samples={num_samples} images; give one string per "
            "image or lower num_samples."
        )
    return prompts[:num_samples], source


def _data_identity(data: Any, num_samples: int) -> str | None:
    """What identifies the pixel data of a run: the first ``num_samples`` image files of a folder (names, sizes and
    contents), a tensor's values; ``None`` for a stream (a DataLoader, a Dataset), which is not read up front."""
    if isinstance(data, (str, os.PathLike)) and os.path.isdir(data):
        return files_fingerprint(data, folder_files(os.fspath(data))[:num_samples])
    if isinstance(data, torch.Tensor):
        return tensor_fingerprint(data[:num_samples])
    return None


@dataclass(frozen=True)
class PipelineOptions:
    """How a latent pipeline's pixel images and prompts become the estimate's latents and conditioning: the
    ``pipeline_options`` of :func:`~analytic_sampler.estimate_moments`.

    Args:
        prompt (`str` or `list[str]`, *optional*): one prompt for all images, or one per image.
        captions (`str` or `os.PathLike`, *optional*): a captions file (:func:`read_captions`); without ``prompt`` and
            ``captions``, the image folder's own ``metadata.jsonl`` / ``metadata.csv``.
        guidance_scale (`float`, *optional*): ``None`` or ``<= 1``: the conditional eps; ``w > 1``: the guided
            ``eps_u + w (eps_c - eps_u)``, as the pipeline computes it.
        negative_prompt (`str`, *optional*): the prompt of ``eps_u`` under guidance (default ``""``).
        latent (`str`, defaults to `"mean"`): ``"mean"`` or ``"sample"`` of the VAE posterior.
        encode_batch_size (`int`, defaults to 16): images (and prompts) encoded per VAE / text-encoder call.
        resize (`bool`, defaults to `True`): resize and center-crop the images to the pipeline's sample size
            (:func:`pipeline_image_size`) before encoding; ``False`` encodes them at their own size.
    """

    prompt: str | Sequence[str] | None = None
    captions: str | os.PathLike | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    latent: str = "mean"
    encode_batch_size: int = 16
    resize: bool = True

    def check_bare_model(self) -> None:
        """Refuse prompts or guidance for a model that is not a latent pipeline, naming what to pass instead."""
        if self.prompt is not None or self.captions is not None or self.guidance_scale is not None:
            raise ValueError(
                "prompt, captions and guidance_scale need a pipeline with a VAE and a text encoder as model; for a "
                "bare UNet pass encoder_hidden_states in model_kwargs (and wrap it in EpsilonAdapter(..., "
                "guidance_scale=w))."
            )


class PipelineSamples:
    """The estimate's ``x0`` (latents) and per-sample model kwargs for a latent pipeline, encoded chunk by chunk.

    Args:
        pipe: a Diffusers pipeline with ``vae``, ``unet``, ``encode_prompt`` (``StableDiffusionPipeline``, img2img).
        data: pixel images in ``[-1, 1]`` (anything ``data.iter_batches`` reads: a folder, a tensor, a loader).
        num_samples (`int`): the images used, from the first.
        options (:class:`PipelineOptions`): prompts, guidance, latent and encoding batch; the prompts are resolved
            (:func:`resolve_prompts`) and checked before anything is encoded.
        seed (`int`, defaults to 0): seeds the posterior draws of ``latent="sample"``.
        device (`str` or `torch.device`, *optional*): where the pipeline is moved before encoding.
    """

    def __init__(
        self,
        pipe,
        data: Any,
        num_samples: int,
        options: PipelineOptions,
        seed: int = 0,
        device: str | torch.device | None = None,
    ):
        prompts, self.prompt_source = resolve_prompts(data, num_samples, options.prompt, options.captions)
        _check_latent(options.latent)
        if device is not None:
            pipe.to(device)
        self.pipe, self.data, self.num_samples, self.prompts = pipe, data, num_samples, prompts
        self.latent, self.chunk, self.seed = options.latent, options.encode_batch_size, seed
        guidance_scale = options.guidance_scale
        self.guided = guidance_scale is not None and guidance_scale > 1
        self.guidance_scale = float(guidance_scale) if self.guided else None  # None: the conditional eps
        self.negative_prompt = (options.negative_prompt or "") if self.guided else None
        self.image_size = pipeline_image_size(pipe) if options.resize else None
        self.single_prompt = len(set(prompts)) == 1
        self._shared = encode_prompts(pipe, prompts[:1]) if self.single_prompt else None
        self.uncond_kwargs = (
            {"encoder_hidden_states": encode_prompts(pipe, [self.negative_prompt])} if self.guided else None
        )
        self._images: Iterator[torch.Tensor] | None = None
        self._next_chunk = 0
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._square_sums: dict[int, torch.Tensor] = {}  # per chunk: sum over its latents of ||x0_c||^2 / d_c

    def _encode_chunk(self, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._images is None or k < self._next_chunk:  # (re)start the stream of pixel chunks
            channels = self.pipe.vae.config.in_channels
            self._images, self._next_chunk = iter_batches(self.data, self.chunk, channels=channels), 0
        lo = k * self.chunk
        wanted = min(self.chunk, self.num_samples - lo)
        while True:
            pixels = next(self._images, None)
            self._next_chunk += 1
            if pixels is None or self._next_chunk - 1 == k:
                break
        if pixels is None or pixels.shape[0] < wanted:
            raise ValueError(f"data holds fewer than {self.num_samples} images; lower num_samples or add images.")
        pixels = pixels[:wanted]
        check_range(pixels, (-1.0, 1.0))
        if self.image_size is not None:
            pixels = fit_to_size(pixels, self.image_size)
        latents = _latent_chunk(self.pipe, pixels, self.latent, noise_generator(self.seed, k, stream="latent"))
        self._square_sums[k] = latents.double().flatten(2).square().mean(-1).sum(0).cpu()
        embeds = None if self.single_prompt else encode_prompts(self.pipe, self.prompts[lo : lo + pixels.shape[0]])
        return latents, embeds

    @torch.inference_mode()
    def window(self, lo: int, hi: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(latents, per_sample, shared)`` of samples ``lo … hi`` (rows ``0 … hi - lo``), the prompt embeddings
        (``encoder_hidden_states``) per sample or, for a single prompt, one shared row; chunks before ``lo`` are
        dropped."""
        first, last = lo // self.chunk, hi // self.chunk
        for k in [k for k in self._cache if k < first]:
            del self._cache[k]
        for k in range(first, last + 1):
            if k not in self._cache:
                self._cache[k] = self._encode_chunk(k)
        start, stop = lo - first * self.chunk, hi - first * self.chunk + 1

        def rows(part: int) -> torch.Tensor:  # a view when the window lies in one chunk, as it mostly does
            pieces = [self._cache[k][part] for k in range(first, last + 1)]
            return (pieces[0] if len(pieces) == 1 else torch.cat(pieces))[start:stop]

        if self.single_prompt:
            return rows(0), {}, {"encoder_hidden_states": self._shared}
        return rows(0), {"encoder_hidden_states": rows(1)}, {}

    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one latent (encodes the first chunk)."""
        return tuple(self.window(0, 0)[0].shape[1:])

    def channel_ms_x0(self) -> list[float]:
        """``E||x0_c||^2 / d_c`` per latent channel over the ``num_samples`` latents (encoding the chunks this run
        has not encoded, after a resume)."""
        for k in range(-(-self.num_samples // self.chunk)):
            if k not in self._square_sums:
                self._encode_chunk(k)
        return (sum(self._square_sums.values()) / self.num_samples).tolist()

    def identity(self) -> str | None:
        """What identifies the pixel images (``None`` for a stream, :func:`_data_identity`)."""
        return _data_identity(self.data, self.num_samples)

    def key_fields(self) -> dict[str, Any]:
        """The run key's fields of the prompts and of how images and prompts are encoded: the prompts' hash, the
        latent settings and the weights' fingerprints of the VAE and the text encoder(s)."""
        config = self.pipe.vae.config
        names = ["vae", *sorted(n for n, c in self.pipe.components.items() if n.startswith("text_encoder") and c)]
        return {
            "prompts": hashlib.sha256("\x00".join(self.prompts).encode()).hexdigest()[:16],
            "negative_prompt": self.negative_prompt,
            "latent": self.latent,
            "encode_batch_size": self.chunk,
            "vae_scaling": [float(config.scaling_factor), getattr(config, "shift_factor", None)],
            "image_size": self.image_size,
            **{f"{name}_weights": weights_fingerprint(getattr(self.pipe, name)) for name in names},
        }

    def provenance(self) -> dict[str, Any]:
        """What the table records of the latents and prompts."""
        config = self.pipe.vae.config
        return {
            "model_id": str(getattr(self.pipe, "name_or_path", None) or type(self.pipe).__name__),
            "pipeline": type(self.pipe).__name__,
            "latent": self.latent,
            "vae_scaling_factor": float(config.scaling_factor),
            "vae_shift_factor": getattr(config, "shift_factor", None),
            "guidance_scale": self.guidance_scale,
            "negative_prompt": self.negative_prompt,
            "prompt_source": self.prompt_source,
            "image_size": None if self.image_size is None else list(self.image_size),
            "channel_ms_x0": self.channel_ms_x0(),
        }

