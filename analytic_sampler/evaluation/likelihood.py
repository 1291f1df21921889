"""The variational bound of a K-step DDPM-type chain (eta = 1), in bits/dim.

For a descending trajectory ``t_K > … > t_1`` and data ``x0`` of dimension d::

    L = KL(q(x_{t_K} | x0) || N(0, I))
        + sum_{k>=2} KL(q(x_{t_{k-1}} | x_{t_k}, x0) || p(x_{t_{k-1}} | x_{t_k}))
        - log p(x0 | x_{t_1}),                        bits/dim = L / (d ln 2)

``q(x_s | x_t, x0) = N(mu~, btilde(s, t))`` and ``p(x_s | x_t) = N(mu_theta, sigma^2)`` with the DDPM mean
``mu_theta = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - btilde) eps_hat`` and sigma^2 from
the chosen variance: ``analytic`` (clipped Analytic-DPM), ``residual`` (``lambda^2 + coef^2 x0_mse``, whose
transition KL is ``(d/2) log(sigma^2 / btilde)`` for any network), ``beta`` (``b_ts``), ``btilde`` or ``learned``
(Improved DDPM's learned range on the respaced pair: ``log sigma^2 = f log b_ts + (1 - f) log btilde``,
``f = (v + 1) / 2``). Each KL term is estimated with one draw ``x_{t_k} ~ q(x_{t_k} | x0)``. With
``clip_denoised`` (the default for bounded data, as in Improved DDPM's evaluation and in sampling) x0_hat is
clipped to the data range and eps_hat recomputed from it, so mu_theta is the posterior mean of the clipped
x0_hat; without it, schedules whose abar[N-1] is tiny (cosine: 2.4e-9) turn small eps errors at t = N-1 into
huge mean errors on coarse trajectories.

Decoder ``p(x0 | x_{t_1})``: mean ``x0_hat(x_{t_1})`` (clipped to the data range for the discretised decoder)
and, by default, the **same variance for every method**, ``1 - abar[t_1]`` (DDPM's ``beta`` of the last step);
``NLLOptions(decoder_variance="analytic")`` uses the method-free analytic ``c[t_1]`` instead, a ``float`` a fixed
value.

Per channel: ``ms_eps`` / ``x0_mse`` of shape ``(C, N)`` (a table's ``channel_ms_eps`` / ``channel_x0_mse``) give a
diagonal ``p``, ``sigma_c^2`` for the entries of channel c in every KL term (and in the analytic decoder variance);
the KL is elementwise, so this is the same sum with sigma^2 broadcast over ``(B, C, H, W)`` as ``(C, 1, 1)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..adapter import as_epsilon_model, model_device
from ..estimation.data import check_range, iter_batches
from ..noise import noise_generator
from ..options import options_of
from ..predictions import clip_x0, x0_from_eps
from ..schedule import as_alphas_cumprod
from ..table import VarianceTable, validate_ms_eps
from ..trajectory import validate_timesteps
from ..variance import (
    analytic_covariance,
    analytic_variance,
    channel_view,
    ddpm_variance,
    pair_coefficients,
    residual_variance,
)
from .kl import discretized_gaussian_log_likelihood, normal_kl

LIKELIHOOD_VARIANCES = ("analytic", "residual", "beta", "btilde", "learned")  # the reverse variances nll_bpd scores
DECODERS = ("discretized", "gaussian")


@dataclass
class NLLResult:
    """Bits/dim of the bound: ``mean`` ± ``stderr`` over data points, with the per-term split.

    Args:
        mean (`float`): the bound in bits/dim, averaged over the images.
        stderr (`float`): its standard error over the images.
        num_samples (`int`): the images evaluated.
        prior (`float`): the prior KL ``KL(q(x_{t_K} | x0) || N(0, I))``, bits/dim.
        transitions (`float`): the sum of the transition KLs, bits/dim.
        decoder (`float`): ``-log p(x0 | x_{t_1})``, bits/dim.
        per_step (`list[float]`): the mean KL of each pair ``(t_{k-1}, t_k)``, K-1 entries, bits/dim.
        per_step_stderr (`list[float]`): their standard errors over the images.
        timesteps (`list[int]`): the trajectory.
        variance (`str`): the reverse variance scored.
    """

    mean: float
    stderr: float
    num_samples: int
    prior: float
    transitions: float
    decoder: float
    per_step: list[float] = field(default_factory=list)
    per_step_stderr: list[float] = field(default_factory=list)
    timesteps: list[int] = field(default_factory=list)
    variance: str = ""


def _fixed_variances(kind: str, abar, s, t, data_range, ms_eps=None, x0_mse=None, ms_x0=None):
    """sigma^2 on the pairs ``(s, t)`` of a fixed (not learned) variance, float64 numpy."""
    if kind == "analytic":
        return analytic_variance(abar, ms_eps, s, t, 1.0, data_range, ms_x0=ms_x0)
    if kind == "residual":
        return residual_variance(abar, x0_mse, s, t, 1.0)
    return ddpm_variance(abar, s, t, kind)


def _learned_variance(v: torch.Tensor, beta: float, btilde: float) -> torch.Tensor:
    """Improved DDPM's learned range on a pair: ``log sigma^2 = f log beta + (1 - f) log btilde``, ``f = (v + 1) / 2``."""
    frac = (v + 1.0) / 2.0
    return torch.exp(frac * math.log(beta) + (1.0 - frac) * math.log(btilde))


@dataclass(frozen=True)
class NLLOptions:
    """How :func:`nll_bpd` scores, beyond the variance, the table's moments and the decoder: the data's bins and
    clip, the decoder's variance, the images, the model call, the table and the progress bar.

    Args:
        data_range (`tuple[float, float]`, *optional*, defaults to `(-1.0, 1.0)`):
            The data's range: checked, the bins' range and the clip range.
        bin_width (`float`, defaults to 2/255):
            The quantisation bin of the discretised decoder (8-bit images in ``[-1, 1]``).
        decoder_variance (`str` or `float`, defaults to `"beta"`):
            The decoder's variance, the same for every method: ``"beta"`` ``1 - abar[t_1]``, ``"analytic"`` the
            analytic ``c[t_1]`` (needs ``ms_eps``), or a fixed value.
        clip_denoised (`bool`, defaults to `True`):
            Clip ``x0_hat`` to the data range and recompute ``eps_hat`` from it, as samplers do.
        num_samples (`int`, *optional*):
            Evaluate the first ``num_samples`` images only.
        device (`str` or `torch.device`, *optional*):
            Where the model runs; default: the model's device.
        prediction_type (`str`, *optional*):
            What the model predicts; default: the scheduler config's, else ``"epsilon"``.
        table (`VarianceTable`, *optional*):
            The model's table, in place of ``ms_eps`` / ``x0_mse`` (its scalar columns): checked against the schedule
            and against the model (:meth:`~analytic_sampler.VarianceTable.check_model`: channels, weights).
        force_table (`bool`, defaults to `False`):
            Use ``table`` even where it was estimated for another model.
        ms_x0 (`float` or `np.ndarray`, *optional*):
            The data's second moment ``E||x0||^2 / d`` (one per channel for a ``(C, N)`` table), which bounds the
            analytic variance as in the scheduler; taken from ``table`` when it records it. A step from a zero-SNR
            timestep (``abar <= 2^-24``) without it or a data range is refused.
        progress (`bool`, defaults to `True`):
            Show a progress bar.
    """

    data_range: tuple[float, float] | None = (-1.0, 1.0)
    bin_width: float = 2.0 / 255
    decoder_variance: str | float = "beta"
    clip_denoised: bool = True
    num_samples: int | None = None
    device: str | torch.device | None = None
    prediction_type: str | None = None
    table: VarianceTable | None = None
    force_table: bool = False
    ms_x0: float | np.ndarray | None = None
    progress: bool = True


def nll_bpd(
    model,
    data,
    scheduler_or_alphas_cumprod,
    timesteps: Sequence[int],
    variance: str | Sequence[str] = "analytic",
    ms_eps=None,
    x0_mse=None,
    decoder: str = "discretized",
    batch_size: int = 256,
    seed: int = 0,
    *,
    options: NLLOptions | None = None,
) -> NLLResult | dict[str, NLLResult]:
    """The K-step variational bound (eta = 1) in bits/dim over ``data`` (all of it, or the first
    ``options.num_samples`` images):
    ``L = KL(q(x_{t_K} | x0) || N(0, I)) + sum_k KL(q(x_s | x_t, x0) || p(x_s | x_t)) - log p(x0 | x_{t_1})``,
    ``bits/dim = L / (d ln 2)``, each KL term estimated with one draw ``x_{t_k} ~ q(x_{t_k} | x0)``.

    Args:
        model (`UNet2DModel`, `EpsilonAdapter` or a callable):
            The model, scored as the sampler calls it: an :class:`~analytic_sampler.EpsilonAdapter`'s conditioning,
            guidance and timestep convention included. ``variance="learned"`` needs a model with 2C output channels
            (under guidance, the conditional pass's variance half).
        data (`torch.Tensor`, a `DataLoader`, a `Dataset` or a folder):
            The evaluation images, ``(N, C, H, W)`` in the data range.
        scheduler_or_alphas_cumprod (a scheduler, its config or `np.ndarray`):
            The model's noise schedule.
        timesteps (`list[int]`):
            The trajectory, strictly descending (e.g. ``even_trajectory(N, K)`` or ``optimal_trajectory(...)``).
            Compare bits/dim only between trajectories that end at the same ``t_1``.
        variance (`str` or `list[str]`, defaults to `"analytic"`):
            The reverse variance: ``"analytic"`` (needs ``ms_eps``), ``"residual"`` (needs ``x0_mse``), ``"beta"``,
            ``"btilde"`` or ``"learned"`` (Improved DDPM's learned range on the respaced pair); or several of them,
            all scored from one pass of model calls (the same data and noise: their differences are paired).
        ms_eps (`np.ndarray`, *optional*):
            The table's ``ms_eps``, shape ``(N,)``, or ``(C, N)`` (``channel_ms_eps``) for one sigma^2 per channel.
        x0_mse (`np.ndarray`, *optional*):
            The table's ``x0_mse`` likewise, estimated with the same clipping as ``options.clip_denoised`` (the data
            range).
        decoder (`str`, defaults to `"discretized"`):
            ``"discretized"``: a Gaussian over the data's quantisation bins (edge bins open); ``"gaussian"``: a
            density.
        batch_size (`int`, defaults to 256):
            Images per model call.
        seed (`int`, defaults to 0):
            Seeds the noise of every batch (drawn on the CPU), so the figure is reproducible.
        options (:class:`NLLOptions`, *optional*):
            The data range and bins, the decoder's variance, the clip, the images, the device, the prediction type,
            a table in place of ``ms_eps`` / ``x0_mse`` and the progress bar (default: ``NLLOptions()``).

    Returns:
        :class:`NLLResult` for one ``variance`` (a string): ``mean`` ± ``stderr`` in bits/dim over the images, with
        the prior, transition and decoder parts and the KL of every step; `dict[str, NLLResult]`, one per variance,
        for a list of them.

    Example:

    ```py
    >>> from analytic_sampler import NLLOptions, nll_bpd, optimal_trajectory
    >>> from analytic_sampler.digits import load_digits_split  # the bundled world's held-out digits
    >>> from analytic_sampler.pretrained import load_pretrained

    >>> model = load_pretrained("digits-ddpm-linear")
    >>> table, heldout = model.table, load_digits_split("heldout")[0][:16]
    >>> steps = optimal_trajectory(table.alphas_cumprod, table.ms_eps, 10, x0_mse=table.x0_mse)
    >>> result = nll_bpd(model.unet, heldout, model.scheduler, steps, "residual", x0_mse=table.x0_mse,
    ...                  options=NLLOptions(progress=False))
    >>> result.num_samples, len(result.per_step)  # result.mean ± result.stderr: about 5.2 ± 0.1 bits/dim
    (16, 9)

    ```
    """
    options = options_of(options, NLLOptions)
    variances = _variance_names(variance)
    abar = as_alphas_cumprod(scheduler_or_alphas_cumprod)
    traj = validate_timesteps(timesteps, abar.size)
    ms_x0 = options.ms_x0
    if options.table is not None:
        ms_eps, x0_mse = _table_columns(options.table, model, abar, ms_eps, x0_mse, options.force_table)
        ms_x0 = options.table.ms_x0 if ms_x0 is None else ms_x0
    ms_eps, x0_mse = _check_options(abar.size, traj, variances, ms_eps, x0_mse, decoder, options)
    adapter = as_epsilon_model(model, scheduler_or_alphas_cumprod, options.prediction_type)
    device = torch.device(model_device(adapter) if options.device is None else options.device)
    bound = _TrajectoryBound(abar, traj, variances, (ms_eps, x0_mse, ms_x0), decoder, options)
    totals = _Totals(variances, len(traj) - 1)
    with torch.inference_mode(), tqdm(desc=f"NLL K={len(traj)}", unit="img", disable=not options.progress,
                                      total=options.num_samples) as bar:
        for b, x0 in enumerate(_first_images(data, batch_size, options.num_samples)):
            x0 = x0.to(device=device, dtype=torch.float32)
            check_range(x0, options.data_range)
            terms = bound.terms(adapter, x0, noise_generator(seed, b, stream="likelihood"), device)
            totals.add(*terms, dims=x0[0].numel())
            bar.update(x0.shape[0])
    results = totals.results(traj)
    return results[variance] if isinstance(variance, str) else results


def _variance_names(variance: str | Sequence[str]) -> list[str]:
    """The variances to score: ``[variance]`` for one name, else the names given, each checked."""
    names = [variance] if isinstance(variance, str) else list(variance) if isinstance(variance, Sequence) else []
    if not names:
        raise ValueError(f"variance={variance!r}; pass one of {LIKELIHOOD_VARIANCES} or a list of them.")
    for name in names:
        if name not in LIKELIHOOD_VARIANCES:
            raise ValueError(f"variance={name!r}; use one of {LIKELIHOOD_VARIANCES}.")
    return names


def _table_columns(table, model, abar, ms_eps, x0_mse, force_table: bool):
    """``(ms_eps, x0_mse)`` of a table that belongs to this schedule and model (x0_mse ``None`` where the table has
    none), refusing them given twice."""
    if ms_eps is not None or x0_mse is not None:
        raise ValueError("pass either options=NLLOptions(table=...) or ms_eps / x0_mse (a table's own columns), not "
                         "both.")
    table.check_schedule(abar).check_model(model, force=force_table)
    return table.ms_eps, table.x0_mse if table.has_x0_mse else None


def _check_options(n: int, traj: list[int], variances: list[str], ms_eps, x0_mse, decoder: str, options: NLLOptions):
    """Refuse an unknown decoder, or a table column a choice needs but that is missing or unusable on the
    trajectory; return ``(ms_eps, x0_mse)`` checked (as given where not needed)."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder={decoder!r}; use one of {DECODERS}.")
    if decoder == "discretized" and options.data_range is None:
        raise ValueError("the discretized decoder needs the data range of the bins; pass "
                         "options=NLLOptions(data_range=(a, b)) or decoder='gaussian'.")
    if "analytic" in variances or options.decoder_variance == "analytic":
        if ms_eps is None:
            raise ValueError("the analytic variance needs the model's table: pass ms_eps=table.ms_eps.")
        ms_eps = validate_ms_eps(ms_eps, n, needed=traj, per_channel=None)
    if "residual" in variances:
        if x0_mse is None:
            raise ValueError(
                "the residual variance needs the model's x0_mse: pass x0_mse=table.x0_mse (a table from "
                "`analytic-sampler precompute`, format 2)."
            )
        x0_mse = validate_ms_eps(x0_mse, n, needed=traj[:-1], name="x0_mse", per_channel=None)
    return ms_eps, x0_mse


def _first_images(data, batch_size: int, num_samples: int | None):
    """The batches of ``data`` up to ``num_samples`` images in all (all of it for ``None``)."""
    total = 0
    for x0 in iter_batches(data, batch_size):
        if num_samples is not None and total >= num_samples:
            return
        x0 = x0[: None if num_samples is None else num_samples - total]
        total += x0.shape[0]
        yield x0


def _decoder_variance(decoder_variance: str | float, abar: np.ndarray, t1: int, ms_eps, data_range, ms_x0=None):
    """The decoder's variance at ``t_1``: ``"beta"`` ``1 - abar[t_1]``, ``"analytic"`` ``c[t_1]`` (per channel for a
    ``(C, N)`` table), or a fixed value."""
    if decoder_variance == "analytic":
        return analytic_covariance(abar, ms_eps, t1, data_range, floor=1e-20, ms_x0=ms_x0)
    if decoder_variance == "beta":
        return 1.0 - abar[t1]
    return float(decoder_variance)


class _TrajectoryBound:
    """The terms of the bound on one trajectory for a batch of images, each summed over dimensions (nats per image):
    the prior KL, one transition KL per pair and variance, and the decoder's log-likelihood."""

    def __init__(self, abar, traj, variances: list[str], moments, decoder: str, options: NLLOptions):
        """``moments``: the table's ``(ms_eps, x0_mse, ms_x0)``, each ``None`` where not needed."""
        ms_eps, x0_mse, ms_x0 = moments
        data_range = options.data_range
        self.abar, self.names = abar, variances
        self.t = np.asarray(traj, dtype=np.int64)
        self.s = np.append(self.t[1:], -1)  # the pair of step k is (s_k, t_k); the last pair (-1, t_1) is the decoder
        s, t = self.s[:-1], self.t[:-1]
        # sigma^2 of each pair, shape (K-1,) or (C, K-1)
        self.fixed = {v: _fixed_variances(v, abar, s, t, data_range, ms_eps, x0_mse, ms_x0)
                      for v in variances if v != "learned"}
        self.decoder_variance = _decoder_variance(options.decoder_variance, abar, self.t[-1], ms_eps, data_range,
                                                  ms_x0)
        self.decoder, self.bin_width, self.data_range = decoder, options.bin_width, data_range
        self.clip_range = data_range if options.clip_denoised else None

    def terms(self, adapter, x0: torch.Tensor, generator: torch.Generator, device: torch.device):
        """``(prior (B,), transitions (V, B, K-1), decoder log-likelihood (B,))`` for the images ``x0`` with one
        forward-process draw ``x_{t_k} ~ q(x_{t_k} | x0)`` per step, float64 on ``device``."""
        # prior: KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)), summed over dimensions
        a_T = float(self.abar[self.t[0]])
        prior = 0.5 * ((1 - a_T) + a_T * x0.double() ** 2 - 1 - math.log(1 - a_T)).flatten(1).sum(1)
        k_steps = len(self.t) - 1
        steps = torch.zeros(len(self.names), x0.shape[0], k_steps, dtype=torch.float64, device=device)
        for k in range(k_steps + 1):
            pair = pair_coefficients(self.abar, self.s[k], self.t[k], 1.0)
            a_t = float(pair.abar_t)
            sqrt_a_t, sqrt_bb_t = math.sqrt(a_t), math.sqrt(1 - a_t)
            noise = torch.randn(x0.shape, generator=generator).to(device)
            x_t = sqrt_a_t * x0 + sqrt_bb_t * noise
            eps, v = adapter.predict(x_t, torch.full((x0.shape[0],), int(self.t[k]), device=device))
            x0_hat = x0_from_eps(eps, x_t, sqrt_a_t, sqrt_bb_t)
            x0_hat, eps = clip_x0(x0_hat, eps, x_t, sqrt_a_t, sqrt_bb_t, self.clip_range)
            if k == k_steps:
                var = _channel_tensor(self.decoder_variance, x0)
                decoded = _decoder_log_likelihood(x0, x0_hat, var, self.decoder, self.bin_width, self.data_range)
            else:
                steps[:, :, k] = self._transition_kls(pair, k, x0, x_t, x0_hat, eps, v)
        return prior, steps, decoded

    def _transition_kls(self, pair, k: int, x0, x_t, x0_hat, eps, v) -> torch.Tensor:
        """``KL(q(x_s | x_t, x0) || p(x_s | x_t))`` of pair ``k`` for each variance, summed over dimensions: ``(V, B)``."""
        a_t, a_s, beta, btilde = (float(x) for x in (pair.abar_t, pair.abar_s, pair.beta, pair.btilde))
        true_mean = math.sqrt(a_s) * beta / (1 - a_t) * x0 + math.sqrt(a_t / a_s) * (1 - a_s) / (1 - a_t) * x_t
        mean = math.sqrt(a_s) * x0_hat + float(pair.eps_coef) * eps
        true_mean, mean = true_mean.double(), mean.double()
        log_btilde = torch.tensor(math.log(btilde), dtype=torch.float64, device=x0.device)
        kls = []
        for variance in self.names:
            if variance == "learned":
                if v is None:
                    raise ValueError("variance='learned' needs a model with 2C output channels (learned range).")
                var = _learned_variance(v.double(), beta, btilde)
            else:
                var = _channel_tensor(self.fixed[variance][..., k], x0)
            kls.append(normal_kl(true_mean, log_btilde, mean, torch.log(var)).flatten(1).sum(1))
        return torch.stack(kls)


class _Totals:
    """Running sums of the bound's terms over batches, and the :class:`NLLResult` of each variance from them."""

    def __init__(self, names: list[str], k_steps: int):
        self.names = names
        self.per_sample: dict[str, list[torch.Tensor]] = {v: [] for v in names}  # bits/dim of each image
        self.per_step, self.per_step_sq = np.zeros((len(names), k_steps)), np.zeros((len(names), k_steps))
        self.prior_sum, self.decoder_sum, self.total, self.dims = 0.0, 0.0, 0, 0

    def add(self, prior: torch.Tensor, steps: torch.Tensor, decoded: torch.Tensor, dims: int) -> None:
        """One batch's terms from :meth:`_TrajectoryBound.terms`; ``dims``: the dimension d of one image."""
        for i, variance in enumerate(self.names):
            self.per_sample[variance].append(((prior + steps[i].sum(1) - decoded) / (dims * math.log(2))).cpu())
        self.per_step += steps.sum(1).cpu().numpy()
        self.per_step_sq += (steps**2).sum(1).cpu().numpy()
        self.prior_sum += float(prior.sum())
        self.decoder_sum += float(-decoded.sum())
        self.total += prior.shape[0]
        self.dims = dims

    def results(self, timesteps: list[int]) -> dict[str, NLLResult]:
        total, d = self.total, self.dims
        if total == 0:
            raise ValueError("the data yielded no images; pass a non-empty data set.")
        scale = 1.0 / (total * d * math.log(2))
        spread = np.maximum(self.per_step_sq / total - (self.per_step / total) ** 2, 0.0) * total / max(total - 1, 1)
        step_stderr = np.sqrt(spread / total) / (d * math.log(2))
        results = {}
        for i, variance in enumerate(self.names):
            bpd = torch.cat(self.per_sample[variance]).numpy()
            results[variance] = NLLResult(
                mean=float(bpd.mean()),
                stderr=float(bpd.std(ddof=1) / math.sqrt(total)) if total > 1 else float("nan"),
                num_samples=total,
                prior=self.prior_sum * scale,
                transitions=float(self.per_step[i].sum() * scale),
                decoder=self.decoder_sum * scale,
                per_step=(self.per_step[i] * scale).tolist(),
                per_step_stderr=step_stderr[i].tolist(),
                timesteps=[int(x) for x in timesteps],
                variance=variance,
            )
        return results


def predicted_transitions_bpd(
    alphas_cumprod, timesteps: Sequence[int], x0_mse, x0_mse_stderr=None, variance: str = "residual", ms_eps=None,
    data_range: tuple[float, float] | None = (-1.0, 1.0),
    ms_x0: float | None = None,
) -> tuple[float, float]:
    """The transition part of the K-step bound (eta = 1) that a table predicts, in bits/dim, ± its standard error.

    The step ``t -> s`` costs ``E KL / d = 0.5 [log(sigma^2/lambda^2) + (lambda^2 + coef^2 x0_mse[t]) / sigma^2 - 1]``
    for the network's own x0 error, with sigma^2 the ``residual`` variance (then exactly
    ``0.5 log(1 + coef^2 x0_mse / lambda^2)``) or the ``analytic`` one (needs ``ms_eps``). The prior and decoder
    terms, shared by every trajectory from N-1 to 0, are left out. The standard error is the delta method on the
    table's ``x0_mse_stderr`` (NaN without it). On the trajectory a DP chose with this very table the figure is
    optimistic: the DP favours timesteps whose estimate came out low. Scalar tables only (shape ``(N,)``).

    Args:
        alphas_cumprod (`np.ndarray` or a scheduler):
            The schedule.
        timesteps (`list[int]`):
            The trajectory, strictly descending.
        x0_mse (`np.ndarray`):
            The table's ``x0_mse``.
        x0_mse_stderr (`np.ndarray`, *optional*):
            Its standard error, for the figure's.
        variance (`str`, defaults to `"residual"`):
            ``"residual"``, ``"analytic"`` (needs ``ms_eps``), ``"beta"`` or ``"btilde"``.
        ms_eps (`np.ndarray`, *optional*):
            The table's ``ms_eps``.
        data_range (`tuple[float, float]`, *optional*, defaults to `(-1.0, 1.0)`):
            The data's range, for the analytic variance's clip.
        ms_x0 (`float`, *optional*):
            The data's second moment, which bounds the analytic variance as in :func:`nll_bpd`.

    Returns:
        `tuple[float, float]`: the transitions' bits/dim and its standard error.
    """
    abar = as_alphas_cumprod(alphas_cumprod)
    t = np.asarray(validate_timesteps(timesteps, abar.size), dtype=np.int64)
    s, t = t[1:], t[:-1]
    x0_mse = validate_ms_eps(x0_mse, abar.size, needed=t, name="x0_mse")
    if variance not in ("residual", "analytic", "beta", "btilde"):
        raise ValueError(f"variance={variance!r}; use 'residual', 'analytic', 'beta' or 'btilde'.")
    if variance == "analytic":
        ms_eps = validate_ms_eps(ms_eps, abar.size, needed=t)
    pair = pair_coefficients(abar, s, t, 1.0)
    lam2, coef2 = pair.lambda2, pair.coef**2
    var = _fixed_variances(variance, abar, s, t, data_range, ms_eps, x0_mse, ms_x0)
    kl = 0.5 * (np.log(var / lam2) + (lam2 + coef2 * x0_mse[t]) / var - 1.0)
    se = np.full(t.size, np.nan) if x0_mse_stderr is None else np.asarray(x0_mse_stderr, dtype=np.float64)[t]
    grad = 0.5 * coef2 / var  # d KL / d x0_mse[t] (for the residual variance the sigma^2 term has zero derivative)
    return float(kl.sum() / math.log(2)), float(np.sqrt(np.sum((grad * se) ** 2)) / math.log(2))


def _channel_tensor(values, like: torch.Tensor) -> torch.Tensor:
    """float64 ``values`` of shape ``()`` or ``(C,)`` on ``like``'s device, shaped ``(C', 1, …)`` to broadcast over
    ``like`` ``(B, C, …)``: one value for every channel or one per channel (then ``C`` must match)."""
    values = torch.as_tensor(np.asarray(values, dtype=np.float64), device=like.device)
    if values.ndim and values.shape[0] != like.shape[1]:
        raise ValueError(
            f"the per-channel table has {values.shape[0]} channels but the data has {like.shape[1]} (shape "
            f"{tuple(like.shape)}); pass the channel_ms_eps / channel_x0_mse of this data's table, or its scalar ones."
        )
    return channel_view(values, like.ndim)


def _decoder_log_likelihood(x0, x0_hat, var: torch.Tensor, decoder: str, bin_width: float, data_range) -> torch.Tensor:
    """``log p(x0 | x_{t_1})`` summed over dimensions, float64 per image; ``var`` broadcasts over ``x0``."""
    if decoder == "gaussian":
        logp = -0.5 * (torch.log(2 * math.pi * var) + (x0.double() - x0_hat.double()) ** 2 / var)
    else:
        mean = x0_hat.clamp(*data_range).double()
        log_scale = (0.5 * torch.log(var)).expand_as(mean)
        logp = discretized_gaussian_log_likelihood(x0.double(), mean, log_scale, bin_width, data_range)
    return logp.flatten(1).sum(1)
