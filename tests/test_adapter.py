import numpy as np
import pytest
import torch
from conftest import tiny_unet
from diffusers import UNet2DConditionModel
from diffusers.models.unets.unet_2d import UNet2DOutput

from analytic_sampler.adapter import EpsilonAdapter
from analytic_sampler.schedule import alphas_cumprod_from_config

N = 1000
ABAR = alphas_cumprod_from_config({"num_train_timesteps": N, "beta_schedule": "linear"})


def known_case(batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(batch, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])[:batch]
    a = torch.from_numpy(ABAR)[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    return x0, eps, t, a, x_t


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_conversions_recover_known_eps(prediction_type):
    x0, eps, t, a, x_t = known_case()
    output = {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}[prediction_type]
    adapter = EpsilonAdapter(lambda x, ts: output, ABAR, prediction_type=prediction_type)
    torch.testing.assert_close(adapter(x_t, t), eps, rtol=0, atol=1e-9)


def test_scalar_timestep_conversion():
    x0, eps, t, a, x_t = known_case()
    x0, eps, x_t, a = x0[2:3], eps[2:3], x_t[2:3], a[2:3]
    adapter = EpsilonAdapter(lambda x, ts: x0, ABAR, prediction_type="sample")
    for t in (500, torch.tensor(500), torch.tensor([500])):  # int, 0-d and (1,) timesteps
        torch.testing.assert_close(adapter(x_t, t), eps, rtol=0, atol=1e-9)


def test_output_forms_and_learned_variance_split():
    _, eps, t, _, x_t = known_case()
    extra = torch.full_like(eps, 7.0)
    for output in (eps, (eps,), UNet2DOutput(sample=eps), torch.cat([eps, extra], 1)):
        adapter = EpsilonAdapter(lambda x, ts, out=output: out, ABAR)
        torch.testing.assert_close(adapter(x_t, t), eps)
    main, var = EpsilonAdapter.split_output(torch.cat([eps, extra], 1), x_t)
    assert torch.equal(main, eps) and torch.equal(var, extra)
    assert EpsilonAdapter.split_output(eps, x_t)[1] is None


def test_bad_outputs_and_options():
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="model output has 5 channels for a 3-channel sample"):
        EpsilonAdapter(lambda s, t: torch.zeros(2, 5, 4, 4), ABAR)(x, 3)
    with pytest.raises(TypeError, match="must return a tensor"):
        EpsilonAdapter(lambda s, t: {"eps": s}, ABAR)(x, 3)
    with pytest.raises(ValueError, match="prediction_type='x0' is not supported; use one of"):
        EpsilonAdapter(lambda s, t: s, ABAR, prediction_type="x0")
    with pytest.raises(ValueError, match="guidance_scale needs uncond_kwargs"):
        EpsilonAdapter(lambda s, t: s, ABAR, guidance_scale=3.0)


def test_timestep_shift_and_scale_reach_the_model():
    seen = []

    def model(sample, timestep):
        seen.append(timestep)
        return sample

    adapter = EpsilonAdapter(model, ABAR, timestep_shift=1, timestep_scale=0.25)
    x = torch.zeros(2, 3, 4, 4)
    adapter(x, torch.tensor([3, 999]))
    adapter(x, 7)
    torch.testing.assert_close(seen[0], torch.tensor([1.0, 250.0]))
    assert seen[1] == 2.0
    plain = EpsilonAdapter(model, ABAR)
    t = torch.tensor([5, 6])
    plain(x, t)
    assert seen[2] is t


def test_wrap():
    adapter = EpsilonAdapter(lambda s, t: s, ABAR)
    assert EpsilonAdapter.wrap(adapter, ABAR.astype(np.float32)) is adapter
    assert isinstance(EpsilonAdapter.wrap(lambda s, t: s, ABAR), EpsilonAdapter)
    with pytest.raises(ValueError, match="different noise schedule"):
        EpsilonAdapter.wrap(adapter, {"num_train_timesteps": N, "beta_schedule": "squaredcos_cap_v2"})
    with pytest.raises(ValueError, match="set them on the adapter itself"):
        EpsilonAdapter.wrap(adapter, ABAR, prediction_type="sample")
    assert "EpsilonAdapter(function, N=1000" in repr(adapter)


@pytest.mark.parametrize("kind", ["tensor", "non_tensor"])
def test_classifier_free_guidance(kind):
    calls = []

    def model(sample, timestep, scale, tag=None):
        calls.append(sample.shape[0])
        s = scale if isinstance(scale, float) else scale.view(-1, 1, 1, 1)
        return sample * s

    x = torch.randn(3, 3, 4, 4)
    t = torch.tensor([1, 2, 3])
    if kind == "tensor":
        cond, uncond = torch.full((3,), 2.0), torch.full((3,), 0.5)
    else:
        cond, uncond = 2.0, 0.5
    adapter = EpsilonAdapter(model, ABAR, guidance_scale=4.0, uncond_kwargs={"scale": uncond})
    eps = adapter(x, t, scale=cond)
    torch.testing.assert_close(eps, x * 0.5 + 4.0 * (x * 2.0 - x * 0.5))
    assert calls == ([6] if kind == "tensor" else [3, 3])


def test_guidance_with_a_key_only_in_the_unconditional_pass():
    def model(sample, timestep, scale=torch.ones(1)):
        return sample * scale.view(-1, 1, 1, 1)

    x = torch.randn(2, 3, 4, 4)
    adapter = EpsilonAdapter(model, ABAR, guidance_scale=2.0, uncond_kwargs={"scale": torch.zeros(2)})
    torch.testing.assert_close(adapter(x, 5), 2.0 * x)


def test_tiny_unet2d_and_learned_variance():
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        unet = tiny_unet(channels=3)
        torch.testing.assert_close(EpsilonAdapter(unet, ABAR)(x, t), unet(x, t).sample)
        unet6 = tiny_unet(channels=3, out_channels=6)
        torch.testing.assert_close(EpsilonAdapter(unet6, ABAR)(x, t), unet6(x, t).sample[:, :3])


def test_tiny_unet2d_condition_passes_encoder_hidden_states():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    text, other = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    with torch.no_grad():
        expected = unet(x, t, encoder_hidden_states=text).sample
        torch.testing.assert_close(EpsilonAdapter(unet, ABAR, encoder_hidden_states=text)(x, t), expected)
        torch.testing.assert_close(EpsilonAdapter(unet, ABAR)(x, t, encoder_hidden_states=text), expected)
        assert not torch.allclose(EpsilonAdapter(unet, ABAR, encoder_hidden_states=other)(x, t), expected)
