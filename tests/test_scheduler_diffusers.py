"""The generic checks Diffusers runs on each of its own schedulers, run on AnalyticDPMScheduler.

Each test below is one of those checks, written for this scheduler with a consistent config (its table has one entry
per training timestep): saving and loading gives the same steps, configs survive a round trip through every compatible
scheduler, step shapes, tuple and dataclass outputs agree, the public API exists, ``add_noise`` keeps the shape, no
undeclared ``**kwargs``, trained betas round-trip, and attribute access warns only for config entries.
"""

from __future__ import annotations

import inspect
import tempfile

import numpy as np
import pytest
import torch
from diffusers.utils import DummyObject

from analytic_sampler.schedulers.analytic_dpm import AnalyticDPMScheduler

N = 1000
NUM_STEPS = 50  # Diffusers' default number of inference steps in these checks
TABLE = np.linspace(0.2, 0.999, N)


def scheduler_config(**overrides) -> dict:
    return {"num_train_timesteps": N, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
            "ms_eps": TABLE, **overrides}


def build(**overrides) -> AnalyticDPMScheduler:
    """The scheduler of ``scheduler_config(**overrides)``: its options, with the table as arrays."""
    return AnalyticDPMScheduler.from_config({}, **scheduler_config(**overrides))


def sample() -> torch.Tensor:
    return torch.rand((4, 3, 8, 8), generator=torch.Generator().manual_seed(0))


def first_timesteps(**config) -> tuple[int, int]:
    scheduler = build(**config)
    scheduler.set_timesteps(NUM_STEPS)
    return int(scheduler.timesteps[0]), int(scheduler.timesteps[1])


def reloaded(scheduler: AnalyticDPMScheduler, save: str = "save_config") -> AnalyticDPMScheduler:
    with tempfile.TemporaryDirectory() as folder:
        getattr(scheduler, save)(folder)
        return AnalyticDPMScheduler.from_pretrained(folder)


def same_step(scheduler, new_scheduler, timestep, **kwargs) -> None:
    x = sample()
    for s in (scheduler, new_scheduler):
        s.set_timesteps(NUM_STEPS)
    out = scheduler.step(0.1 * x, timestep, x, generator=torch.manual_seed(0), **kwargs).prev_sample
    new_out = new_scheduler.step(0.1 * x, timestep, x, generator=torch.manual_seed(0), **kwargs).prev_sample
    assert torch.sum(torch.abs(out - new_out)) < 1e-5


@pytest.mark.parametrize("config", [
    {}, {"beta_schedule": "squaredcos_cap_v2"}, {"prediction_type": "v_prediction"}, {"clip_sample": False},
    {"eta": 0.0}, {"variance": "residual", "x0_mse": TABLE * 0.1}, {"timestep_spacing": "optimal"},
    {"timestep_spacing": "trailing"}, {"timestep_spacing": "leading", "steps_offset": 1}, {"thresholding": True},
    {"rescale_betas_zero_snr": True, "ms_x0": 0.5}, {"per_channel": True, "channel_ms_eps": np.stack([TABLE] * 3)},
])
def test_over_configs(config):
    """A scheduler saved with ``save_config`` and loaded with ``from_pretrained`` steps identically, for any config."""
    scheduler = build(**config)
    for timestep in first_timesteps(**config):
        same_step(scheduler, reloaded(scheduler), timestep)


@pytest.mark.parametrize("forward", [{"eta": 0.0}, {"eta": 0.5}, {"use_clipped_model_output": False}])
def test_over_forward(forward):
    """The same with keyword arguments of ``step``."""
    scheduler = build()
    same_step(scheduler, reloaded(scheduler), first_timesteps()[0], **forward)


def test_from_save_pretrained():
    scheduler = build()
    same_step(scheduler, reloaded(scheduler, "save_pretrained"), first_timesteps()[0])


@pytest.mark.filterwarnings("ignore:AnalyticDPMScheduler does not use", "ignore::DeprecationWarning")
def test_compatibles():
    """Every compatible Diffusers scheduler builds from this config, and this scheduler from theirs, config intact."""
    scheduler = build()
    assert all(c is not None for c in scheduler.compatibles)
    for comp_cls in scheduler.compatibles:
        if isinstance(comp_cls, DummyObject):  # a scheduler whose optional dependency is not installed (torchsde)
            continue
        comp = comp_cls.from_config(scheduler.config)
        assert comp is not None
        new = AnalyticDPMScheduler.from_config(comp.config)
        shared = {k: v for k, v in new.config.items() if k in scheduler.config}
        assert shared == dict(scheduler.config), comp_cls.__name__
        extra = {k for k in new.config if k not in scheduler.config}
        assert not extra & set(inspect.signature(AnalyticDPMScheduler.__init__).parameters), comp_cls.__name__


def test_from_pretrained():
    scheduler = build()
    new = reloaded(scheduler, "save_pretrained")
    config = dict(scheduler.config)
    del config["_use_default_values"]
    assert config == new.config


def test_step_shape():
    scheduler = build()
    scheduler.set_timesteps(NUM_STEPS)
    x = sample()
    first, second = first_timesteps()
    out_0 = scheduler.step(0.1 * x, first, x).prev_sample
    out_1 = scheduler.step(0.1 * x, second, x).prev_sample
    assert out_0.shape == x.shape == out_1.shape


def test_outputs_equivalence():
    """``return_dict=False`` gives the same tensors as the dataclass."""
    scheduler = build()
    x, timestep = sample(), first_timesteps()[0]
    scheduler.set_timesteps(NUM_STEPS)
    as_dict = scheduler.step(0.1 * x, timestep, x, generator=torch.manual_seed(0))
    scheduler.set_timesteps(NUM_STEPS)
    as_tuple = scheduler.step(0.1 * x, timestep, x, generator=torch.manual_seed(0), return_dict=False)
    for tuple_value, dict_value in zip(as_tuple, as_dict.values()):
        assert torch.allclose(tuple_value, dict_value, atol=1e-5)


def test_public_api():
    scheduler = build()
    assert hasattr(scheduler, "init_noise_sigma") and hasattr(scheduler, "scale_model_input")
    assert hasattr(scheduler, "step")
    assert scheduler.scale_model_input(sample(), 0.0).shape == sample().shape


def test_add_noise_device():
    scheduler = build()
    scheduler.set_timesteps(NUM_STEPS)
    x = scheduler.scale_model_input(sample(), 0.0)
    noised = scheduler.add_noise(x, torch.randn(x.shape), scheduler.timesteps[5][None])
    assert noised.shape == x.shape


def test_no_undeclared_kwargs():
    has_kwargs = "kwargs" in inspect.signature(AnalyticDPMScheduler.__init__).parameters
    assert has_kwargs == (len(AnalyticDPMScheduler._deprecated_kwargs) > 0)


def test_trained_betas():
    """Trained betas round-trip (with a table of their length: two training timesteps)."""
    scheduler = AnalyticDPMScheduler.from_config({}, num_train_timesteps=2, ms_eps=[0.5, 0.5],
                                             trained_betas=np.array([0.1, 0.3]))
    new = reloaded(scheduler, "save_pretrained")
    assert scheduler.betas.tolist() == new.betas.tolist()


def test_getattr_is_correct():
    scheduler = build()
    scheduler.dummy_attribute = 5
    scheduler.register_to_config(test_attribute=5)
    assert scheduler.dummy_attribute == 5 and getattr(scheduler, "dummy_attribute") == 5
    assert scheduler.save_pretrained == getattr(scheduler, "save_pretrained")
    with pytest.warns(FutureWarning):
        assert scheduler.test_attribute == 5
    with pytest.raises(AttributeError, match="'AnalyticDPMScheduler' object has no attribute 'does_not_exist'"):
        scheduler.does_not_exist
