"""A small Improved-DDPM trainer (Nichol & Dhariwal, 2021) for Diffusers ``UNet2DModel``.

What it implements
------------------
* Noise schedule from a Diffusers ``DDPMScheduler`` config (``linear`` or ``squaredcos_cap_v2`` =
  cosine), read through :func:`analytic_sampler.schedule.alphas_cumprod_from_config` in float64.
* ``loss="simple"``: ``L_simple`` = mean over dimensions of ``(eps - eps_theta)^2``; the UNet has
  ``out_channels = C`` and the exported scheduler uses ``variance_type="fixed_small"``.
* ``loss="hybrid"``: ``L_simple + lambda * L_vlb`` with ``lambda = 0.001`` and a learned-range
  variance: ``out_channels = 2C``; the second half ``v`` in [-1, 1] gives
  ``log sigma^2 = (v+1)/2 log beta_t + (1-(v+1)/2) log btilde_t`` (``btilde_0`` replaced by
  ``btilde_1``, the "log-clipped" posterior variance of the reference code). The VLB term sees the
  eps half through a stop-gradient (``detach``), so it only trains the variance. Per sample,
  ``L_vlb`` is estimated by ``N * L_t`` (t drawn uniformly, or reweighted under importance sampling),
  where ``L_t`` is the KL between the Gaussian posterior ``q(x_{t-1}|x_t,x_0)`` and
  ``p(x_{t-1}|x_t)`` for t > 0, and the discretised-Gaussian decoder NLL over 8-bit bins (width
  2/255, edge bins open) for t = 0, both in **nats per dimension** (mean over dimensions).
  The reference code measures ``L_t`` in bits, i.e. its VLB weight is 1/ln 2 = 1.44 times ours.
* Importance sampling of timesteps (:class:`LossSecondMomentResampler`): the last 10 losses of every
  t are kept; sampling is uniform until every t has 10, then ``p_t ∝ sqrt(E[L_t^2])`` mixed as
  ``(1 - 0.001) p + 0.001 / N``; the loss is reweighted by ``1 / (N p_t)``. As in the reference it is
  fed the full per-sample training loss.
* EMA of the weights with Diffusers' ``EMAModel`` (warm-up ``decay = min(ema_decay, (1+n)/(10+n))``) and
  the learning-rate warm-up with Diffusers' ``get_scheduler("constant_with_warmup")``.
* Atomic checkpoints (model, EMA, optimizer, learning-rate scheduler, resampler, all RNG states, data
  order, step, elapsed time) every ``checkpoint_every`` steps; ``resume=True`` continues bit-exactly.
* Export in the Diffusers folder layout: ``<out>/unet`` (EMA weights, safetensors) and
  ``<out>/scheduler`` (``DDPMScheduler`` with ``fixed_small`` or ``learned_range``).

Bundled recipes (``RECIPES``) are rerun with
``python -m analytic_sampler.digits.training --recipe digits-ddpm-linear`` (see ``--help``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from ..evaluation.kl import discretized_gaussian_log_likelihood, normal_kl
from ..schedule import alphas_cumprod_from_config

__all__ = [
    "TrainConfig",
    "RECIPES",
    "recipe_config",
    "GaussianDiffusionTerms",
    "LossSecondMomentResampler",
    "UniformSampler",
    "make_ema",
    "make_lr_scheduler",
    "build_unet",
    "scheduler_config",
    "make_scheduler",
    "training_losses",
    "train",
    "load_checkpoint",
    "export_diffusers",
]


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved inside every checkpoint)."""

    output_dir: str = "runs/ddpm"
    # schedule
    beta_schedule: str = "linear"  # "linear" or "squaredcos_cap_v2" (alias "cosine")
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    # loss
    loss: str = "simple"  # "simple" or "hybrid"
    vlb_weight: float = 0.001  # lambda of L_hybrid = L_simple + lambda * L_vlb
    importance_sampling: bool = False
    resampler_history: int = 10
    resampler_uniform_prob: float = 0.001
    # model (UNet2DModel)
    sample_size: int = 8
    in_channels: int = 1
    block_out_channels: tuple[int, ...] = (64, 128)
    layers_per_block: int = 2
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "UpBlock2D")
    attention_head_dim: int | None = 32
    norm_num_groups: int = 32
    dropout: float = 0.1
    # optimisation
    steps: int = 10000
    batch_size: int = 128
    lr: float = 2e-4
    lr_warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    # bookkeeping
    seed: int = 0
    device: str = "cpu"
    num_threads: int | None = None  # torch.set_num_threads when given
    checkpoint_every: int = 500
    log_every: int = 50
    progress: bool = True
    resume: bool = True
    max_minutes: float | None = None  # stop (after a checkpoint) once this much wall time is used

    def __post_init__(self) -> None:
        if self.beta_schedule == "cosine":
            self.beta_schedule = "squaredcos_cap_v2"
        if self.beta_schedule not in ("linear", "squaredcos_cap_v2", "scaled_linear"):
            raise ValueError(f"beta_schedule={self.beta_schedule!r}: use 'linear' or 'squaredcos_cap_v2' ('cosine').")
        if self.loss not in ("simple", "hybrid"):
            raise ValueError(f"loss={self.loss!r}: use 'simple' or 'hybrid'.")
        self.block_out_channels = tuple(self.block_out_channels)
        self.down_block_types = tuple(self.down_block_types)
        self.up_block_types = tuple(self.up_block_types)
        if not (len(self.block_out_channels) == len(self.down_block_types) == len(self.up_block_types)):
            raise ValueError("block_out_channels, down_block_types and up_block_types need the same length.")

    @property
    def learn_sigma(self) -> bool:
        return self.loss == "hybrid"

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ~1.0 M parameters (4 MB in fp32): 8x8 -> 4x4 with self-attention at 4x4 (and in the mid block).
_DIGITS_UNET = dict(
    sample_size=8,
    in_channels=1,
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=32,
    dropout=0.0,
)

#: Recipes of the bundled models (``analytic_sampler/digits/bundled/<name>``); rerun with
#: ``python -m analytic_sampler.digits.training --recipe <name>``.
RECIPES: dict[str, dict[str, Any]] = {
    "digits-ddpm-linear": dict(
        _DIGITS_UNET,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        num_train_timesteps=1000,
        loss="simple",
        importance_sampling=False,
        steps=4000,
        batch_size=128,
        lr=3e-4,
        ema_decay=0.999,
        seed=0,
    ),
    "digits-iddpm-cosine": dict(
        _DIGITS_UNET,
        beta_schedule="squaredcos_cap_v2",
        num_train_timesteps=1000,
        loss="hybrid",
        vlb_weight=0.001,
        importance_sampling=True,
        steps=4000,
        batch_size=128,
        lr=3e-4,
        ema_decay=0.999,
        seed=1,
    ),
}


def recipe_config(name: str, **overrides: Any) -> TrainConfig:
    """The :class:`TrainConfig` of a bundled recipe, with optional field overrides."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    kw = dict(RECIPES[name])
    kw.setdefault("output_dir", f"runs/{name}")
    kw.update(overrides)
    return TrainConfig(**kw)


# --------------------------------------------------------------------------------------------------
# Model and scheduler
# --------------------------------------------------------------------------------------------------


def build_unet(config: TrainConfig):
    """A freshly initialised ``diffusers.UNet2DModel`` for ``config``."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=config.sample_size,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        down_block_types=config.down_block_types,
        up_block_types=config.up_block_types,
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.norm_num_groups,
        dropout=config.dropout,
    )


def scheduler_config(config: TrainConfig) -> dict[str, Any]:
    """Keyword arguments of the ``DDPMScheduler`` that matches ``config`` (also used for export)."""
    return dict(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        variance_type="learned_range" if config.learn_sigma else "fixed_small",
        clip_sample=True,
        clip_sample_range=1.0,
        prediction_type="epsilon",
    )


def make_scheduler(config: TrainConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(**scheduler_config(config))


# --------------------------------------------------------------------------------------------------
# Diffusion terms and losses
# --------------------------------------------------------------------------------------------------


class GaussianDiffusionTerms:
    """Per-timestep constants (computed in float64, stored as float32 tensors on ``device``)."""

    def __init__(self, alphas_cumprod: np.ndarray, device: torch.device | str = "cpu") -> None:
        abar = np.asarray(alphas_cumprod, dtype=np.float64)
        abar_prev = np.concatenate([[1.0], abar[:-1]])
        betas = 1.0 - abar / abar_prev
        self.num_timesteps = n = abar.size
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)  # btilde_t (0 at t = 0)
        post_log_var_clipped = np.log(np.append(post_var[1], post_var[1:])) if n > 1 else np.log(betas)
        tables = dict(
            sqrt_abar=np.sqrt(abar),
            sqrt_one_minus_abar=np.sqrt(1.0 - abar),
            sqrt_recip_abar=np.sqrt(1.0 / abar),
            sqrt_recipm1_abar=np.sqrt(1.0 / abar - 1.0),
            log_betas=np.log(betas),
            post_log_var_clipped=post_log_var_clipped,
            post_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
            post_mean_coef2=(1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
        )
        self.alphas_cumprod = abar
        self.betas = betas
        for k, v in tables.items():
            setattr(self, k, torch.tensor(v, dtype=torch.float32, device=device))

    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return table[t].reshape(-1, *([1] * (ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._at(self.sqrt_abar, t, x0.ndim) * x0 + self._at(self.sqrt_one_minus_abar, t, x0.ndim) * noise

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (clipped) log variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at(self.post_mean_coef1, t, xt.ndim) * x0 + self._at(self.post_mean_coef2, t, xt.ndim) * xt
        return mean, self._at(self.post_log_var_clipped, t, xt.ndim).expand_as(xt)

    def p_mean_logvar(self, eps: torch.Tensor, v: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """Model mean and learned-range log variance of p(x_{t-1} | x_t) (no clipping of x0_hat)."""
        frac = (v + 1.0) / 2.0
        log_var = frac * self._at(self.log_betas, t, xt.ndim) + (1.0 - frac) * self._at(
            self.post_log_var_clipped, t, xt.ndim
        )
        x0_hat = self._at(self.sqrt_recip_abar, t, xt.ndim) * xt - self._at(self.sqrt_recipm1_abar, t, xt.ndim) * eps
        mean, _ = self.q_posterior(x0_hat, xt, t)
        return mean, log_var


def vlb_terms(
    terms: GaussianDiffusionTerms, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """Per-sample ``L_t`` in nats per dimension (KL for t > 0, decoder NLL for t = 0)."""
    true_mean, true_logvar = terms.q_posterior(x0, xt, t)
    mean, logvar = terms.p_mean_logvar(eps, v, xt, t)
    kl = normal_kl(true_mean, true_logvar, mean, logvar).flatten(1).mean(1)
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar).flatten(1).mean(1)
    return torch.where(t == 0, nll, kl)


def training_losses(
    model,
    terms: GaussianDiffusionTerms,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    loss_type: str = "simple",
    vlb_weight: float = 0.001,
) -> dict[str, torch.Tensor]:
    """Per-sample losses: ``{"loss", "mse"}`` and, for ``"hybrid"``, ``"vb"`` (nats/dim, L_t).

    ``loss = mse`` (simple) or ``mse + vlb_weight * N * vb`` (hybrid; the VLB sees a detached eps).
    """
    xt = terms.q_sample(x0, t, noise)
    out = model(xt, t)
    out = out.sample if hasattr(out, "sample") else out
    c = x0.shape[1]
    if loss_type == "simple":
        if out.shape[1] != c:
            raise ValueError(f"loss='simple' needs a UNet with out_channels={c}, got {out.shape[1]}")
        mse = (noise - out).pow(2).flatten(1).mean(1)
        return {"loss": mse, "mse": mse}
    if loss_type != "hybrid":
        raise ValueError(f"loss_type={loss_type!r}: use 'simple' or 'hybrid'")
    if out.shape[1] != 2 * c:
        raise ValueError(f"loss='hybrid' needs a learned-range UNet with out_channels={2 * c}, got {out.shape[1]}")
    eps, v = out[:, :c], out[:, c:]
    mse = (noise - eps).pow(2).flatten(1).mean(1)
    vb = vlb_terms(terms, x0, xt, t, eps.detach(), v)
    return {"loss": mse + vlb_weight * terms.num_timesteps * vb, "mse": mse, "vb": vb}


# --------------------------------------------------------------------------------------------------
# Timestep samplers
# --------------------------------------------------------------------------------------------------


class UniformSampler:
    def __init__(self, num_timesteps: int) -> None:
        self.num_timesteps = num_timesteps

    def weights(self) -> np.ndarray:
        return np.ones(self.num_timesteps, dtype=np.float64)

    def probabilities(self) -> np.ndarray:
        w = self.weights()
        return w / w.sum()

    def sample(self, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``(timesteps, loss_weights)`` with weights ``1 / (N p_t)``."""
        p = self.probabilities()
        t = rng.choice(len(p), size=(batch_size,), p=p)
        return t, 1.0 / (len(p) * p[t])

    def update(self, ts, losses) -> None:  # noqa: D401 - uniform: nothing to learn
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class LossSecondMomentResampler(UniformSampler):
    """Improved DDPM's importance sampler: ``p_t ∝ sqrt(E[L_t^2])`` over the last ``history`` losses."""

    def __init__(self, num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 0.001) -> None:
        super().__init__(num_timesteps)
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self.loss_history = np.zeros((num_timesteps, history_per_term), dtype=np.float64)
        self.loss_counts = np.zeros(num_timesteps, dtype=np.int64)

    def warmed_up(self) -> bool:
        return bool((self.loss_counts == self.history_per_term).all())

    def weights(self) -> np.ndarray:
        if not self.warmed_up():
            return np.ones(self.num_timesteps, dtype=np.float64)
        w = np.sqrt(np.mean(self.loss_history**2, axis=-1))
        w = w / w.sum()
        return w * (1.0 - self.uniform_prob) + self.uniform_prob / len(w)

    def update(self, ts, losses) -> None:
        ts = np.asarray(ts.detach().cpu() if hasattr(ts, "detach") else ts).reshape(-1)
        losses = np.asarray(losses.detach().cpu() if hasattr(losses, "detach") else losses, dtype=np.float64).reshape(-1)
        for t, loss in zip(ts.tolist(), losses.tolist()):
            if self.loss_counts[t] == self.history_per_term:
                self.loss_history[t, :-1] = self.loss_history[t, 1:]
                self.loss_history[t, -1] = loss
            else:
                self.loss_history[t, self.loss_counts[t]] = loss
                self.loss_counts[t] += 1

    def state_dict(self) -> dict[str, Any]:
        return {"loss_history": self.loss_history.copy(), "loss_counts": self.loss_counts.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_history = np.array(state["loss_history"], dtype=np.float64)
        self.loss_counts = np.array(state["loss_counts"], dtype=np.int64)


# --------------------------------------------------------------------------------------------------
# EMA and learning rate (Diffusers' EMAModel and get_scheduler)
# --------------------------------------------------------------------------------------------------


def make_ema(model: torch.nn.Module, config: TrainConfig) -> EMAModel:
    """EMA of the parameters (a UNet2DModel has no buffers); the k-th update uses
    ``decay_k = min(ema_decay, (1 + n) / (10 + n))``, n = k - 1.

    ``EMAModel`` with ``use_ema_warmup=False`` gives exactly this warm-up from the second update on; its
    first update copies the weights (decay 0). Without ``ema_warmup`` the decay is ``ema_decay`` from the
    second update on (``min_decay``).
    """
    min_decay = 0.0 if config.ema_warmup else config.ema_decay
    return EMAModel(model.parameters(), decay=config.ema_decay, min_decay=min_decay, use_ema_warmup=False)


def make_lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up: step k (from 0) trains at ``lr * min(1, (k + 1) / lr_warmup_steps)``.

    Diffusers' ``constant_with_warmup`` gives ``lr * k / lr_warmup_steps`` at its k-th value; starting it at
    ``last_epoch=0`` (which needs ``initial_lr`` in the parameter groups) skips the value 0, so the first step
    trains at ``lr / lr_warmup_steps``.
    """
    for group in optimizer.param_groups:
        group["initial_lr"] = config.lr
    return get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=config.lr_warmup_steps, last_epoch=0)


# --------------------------------------------------------------------------------------------------
# Training loop
# --------------------------------------------------------------------------------------------------

CHECKPOINT_NAME = "checkpoint.pt"


def _load_state(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    state = torch.load(path, map_location=map_location, weights_only=False)
    if "lr_scheduler" not in state:
        raise ValueError(
            f"checkpoint {path} was written by an earlier trainer (its own EMA, no learning-rate scheduler state); "
            "export or finish it with that version, or start again with resume=False."
        )
    return state


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _as_data_tensor(data: Any, config: TrainConfig) -> torch.Tensor:
    if isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]):
        data = data[0]  # (images, labels)
    x = torch.as_tensor(data, dtype=torch.float32)
    if x.ndim != 4 or x.shape[1] != config.in_channels or tuple(x.shape[2:]) != (config.sample_size,) * 2:
        raise ValueError(
            f"data must be a tensor (n, {config.in_channels}, {config.sample_size}, {config.sample_size}); "
            f"got {tuple(x.shape)}. Set TrainConfig.in_channels / sample_size to match."
        )
    if not torch.isfinite(x).all() or x.min() < -1.0 - 1e-6 or x.max() > 1.0 + 1e-6:
        raise ValueError("data must be finite and scaled to [-1, 1] (e.g. x / 127.5 - 1 for 8-bit images).")
    return x


class _Trainer:
    def __init__(self, config: TrainConfig, data: Any) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.data = _as_data_tensor(data, config).to(self.device)
        self.out = Path(config.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.seed)
        np_seed = np.random.SeedSequence(config.seed)
        self.model = build_unet(config).to(self.device)
        self.ema = make_ema(self.model, config)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.lr_scheduler = make_lr_scheduler(self.opt, config)
        abar = alphas_cumprod_from_config(scheduler_config(config))
        self.terms = GaussianDiffusionTerms(abar, self.device)
        n = config.num_train_timesteps
        self.sampler = (
            LossSecondMomentResampler(n, config.resampler_history, config.resampler_uniform_prob)
            if config.importance_sampling
            else UniformSampler(n)
        )
        self.rng = np.random.default_rng(np_seed.spawn(1)[0])  # timesteps
        self.gen = torch.Generator(device=self.device).manual_seed(config.seed + 1)  # data order + noise
        self.cpu_gen = torch.Generator().manual_seed(config.seed + 2)  # data permutations
        self.perm = torch.randperm(len(self.data), generator=self.cpu_gen)
        self.pos = 0
        self.step = 0
        self.elapsed = 0.0
        self.log_path = self.out / "log.jsonl"

    # -- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "step": self.step,
            "elapsed_s": self.elapsed,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.opt.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "np_rng": self.rng.bit_generator.state,
            "gen": self.gen.get_state(),
            "cpu_gen": self.cpu_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "perm": self.perm,
            "pos": self.pos,
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.step = int(s["step"])
        self.elapsed = float(s.get("elapsed_s", 0.0))
        self.model.load_state_dict(s["model"])
        self.ema.load_state_dict(s["ema"])
        self.opt.load_state_dict(s["optimizer"])
        self.lr_scheduler.load_state_dict(s["lr_scheduler"])
        self.sampler.load_state_dict(s["sampler"])
        self.rng.bit_generator.state = s["np_rng"]
        self.gen.set_state(s["gen"])
        self.cpu_gen.set_state(s["cpu_gen"])
        torch.set_rng_state(s["torch_rng"])
        if s.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["cuda_rng"])
        self.perm = s["perm"]
        self.pos = int(s["pos"])

    def save(self) -> Path:
        path = self.out / CHECKPOINT_NAME
        _atomic_torch_save(self.state_dict(), path)
        return path

    # -- one step -----------------------------------------------------------------------------------
    def next_batch(self) -> torch.Tensor:
        """The next ``batch_size`` images of an epoch-wise random permutation (no augmentation)."""
        chunks, need = [], self.config.batch_size
        while need > 0:
            if self.pos >= len(self.perm):
                self.perm = torch.randperm(len(self.data), generator=self.cpu_gen)
                self.pos = 0
            take = min(need, len(self.perm) - self.pos)
            chunks.append(self.perm[self.pos : self.pos + take])
            self.pos += take
            need -= take
        return self.data[torch.cat(chunks).to(self.device)]

    def train_step(self) -> dict[str, float]:
        cfg = self.config
        x0 = self.next_batch()
        t_np, w_np = self.sampler.sample(cfg.batch_size, self.rng)
        t = torch.as_tensor(t_np, dtype=torch.long, device=self.device)
        w = torch.as_tensor(w_np, dtype=torch.float32, device=self.device)
        noise = torch.randn(x0.shape, generator=self.gen, device=self.device, dtype=x0.dtype)
        self.model.train()
        losses = training_losses(self.model, self.terms, x0, t, noise, cfg.loss, cfg.vlb_weight)
        self.sampler.update(t_np, losses["loss"].detach())
        loss = (losses["loss"] * w).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.lr_scheduler.step()
        self.ema.step(self.model.parameters())
        self.step += 1
        rec = {"loss": loss.item(), "mse": losses["mse"].mean().item()}
        if "vb" in losses:
            rec["vb"] = losses["vb"].mean().item()
        return rec

    def run(self, stop_at: int | None = None) -> None:
        cfg = self.config
        end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        if self.step >= end:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover
            tqdm = None
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not cfg.progress, desc=Path(cfg.output_dir).name,
                   dynamic_ncols=True) if tqdm else None
        t_start = time.perf_counter()
        elapsed0 = self.elapsed
        acc: dict[str, list[float]] = {}
        while self.step < end:
            rec = self.train_step()
            self.elapsed = elapsed0 + time.perf_counter() - t_start
            for k, v in rec.items():
                acc.setdefault(k, []).append(v)
            if bar is not None:
                bar.update(1)
            if cfg.log_every and self.step % cfg.log_every == 0:
                row = {"step": self.step, "elapsed_s": round(self.elapsed, 2)}
                row.update({k: float(np.mean(v)) for k, v in acc.items()})
                acc = {}
                with open(self.log_path, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.4f}")
            if not math.isfinite(rec["loss"]):
                raise FloatingPointError(f"loss became {rec['loss']} at step {self.step}; lower lr or check data")
            done = self.step >= end
            if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or done:
                self.save()
            if cfg.max_minutes is not None and self.elapsed - elapsed0 >= 60.0 * cfg.max_minutes:
                self.save()
                break
        if bar is not None:
            bar.close()


def train(config: TrainConfig, data: Any, stop_at: int | None = None, export: bool = True) -> Path:
    """Train (or resume) a run; returns the export folder ``<output_dir>/export`` (Diffusers layout).

    ``data``: a float tensor ``(n, C, H, W)`` in [-1, 1] (or an ``(images, labels)`` pair). With
    ``config.resume`` and a checkpoint in ``output_dir`` the run continues exactly where it stopped;
    ``stop_at`` ends early after that step (a checkpoint is written). If the run has not reached
    ``config.steps`` (``stop_at`` or ``max_minutes``), the checkpoint path is returned instead.
    """
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    tr = _Trainer(config, data)
    ckpt = tr.out / CHECKPOINT_NAME
    if config.resume and ckpt.exists():
        state = _load_state(ckpt, tr.device)
        saved = TrainConfig.from_dict(state["config"])
        for name in ("loss", "beta_schedule", "num_train_timesteps", "block_out_channels", "in_channels"):
            if getattr(saved, name) != getattr(config, name):
                raise ValueError(
                    f"checkpoint {ckpt} was trained with {name}={getattr(saved, name)!r} but the config says "
                    f"{getattr(config, name)!r}; use another output_dir or resume=False."
                )
        tr.load_state_dict(state)
    with open(tr.out / "train_config.json", "w") as fh:
        json.dump(config.to_dict(), fh, indent=2)
    tr.run(stop_at)
    if tr.step < config.steps or not export:
        return ckpt
    return export_diffusers(ckpt, tr.out / "export")


def load_checkpoint(path: str | os.PathLike, use_ema: bool = True, map_location: str = "cpu"):
    """``(unet, config, state)`` from a checkpoint file or a run folder; EMA weights by default."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    state = _load_state(path, map_location)
    config = TrainConfig.from_dict(state["config"])
    unet = build_unet(config)
    unet.load_state_dict(state["model"])
    if use_ema:
        ema = make_ema(unet, config)
        ema.load_state_dict(state["ema"])
        ema.copy_to(unet.parameters())
    unet.eval()
    return unet, config, state


def export_diffusers(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, use_ema: bool = True) -> Path:
    """Write ``<out_dir>/unet`` (UNet2DModel, safetensors, EMA weights) and ``<out_dir>/scheduler``.

    The scheduler is a ``DDPMScheduler`` with ``variance_type="fixed_small"`` (simple loss) or
    ``"learned_range"`` (hybrid loss); ``<out_dir>/training.json`` records the run's config and step.
    """
    unet, config, state = load_checkpoint(checkpoint, use_ema=use_ema)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    make_scheduler(config).save_pretrained(out / "scheduler")
    info = {"config": config.to_dict(), "step": state["step"], "elapsed_s": state.get("elapsed_s"),
            "weights": "ema" if use_ema else "raw", "ema_decay": config.ema_decay, "ema": "diffusers EMAModel"}
    with open(out / "training.json", "w") as fh:
        json.dump(info, fh, indent=2)
    return out



# --------------------------------------------------------------------------------------------------
# Command line: rerun a bundled recipe
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Train (or resume) a bundled Improved-DDPM recipe on the digits data.")
    p.add_argument("--recipe", required=True, choices=sorted(RECIPES))
    p.add_argument("--output-dir", default=None, help="run folder (default runs/<recipe>)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    overrides: dict[str, Any] = dict(device=a.device, num_threads=a.threads, checkpoint_every=a.checkpoint_every,
                                     resume=not a.no_resume, progress=not a.no_progress, max_minutes=a.max_minutes)
    if a.output_dir:
        overrides["output_dir"] = a.output_dir
    if a.steps:
        overrides["steps"] = a.steps
    if a.batch_size:
        overrides["batch_size"] = a.batch_size
    config = recipe_config(a.recipe, **overrides)
    from .data import load_digits_split

    images, _ = load_digits_split("train")
    path = train(config, images)
    print(f"run folder {config.output_dir}; result {path}")


if __name__ == "__main__":
    main()
