"""A checkpoint resumes only the run it belongs to: everything that changes the numbers is in its run key, and a
mismatch is refused naming each field that differs."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from conftest import tiny_unet
from diffusers import DDPMScheduler

from analytic_sampler.adapter import EpsilonAdapter
from analytic_sampler.estimation.moments import CHECKPOINT_FORMAT, EstimateOptions, estimate_moments
from analytic_sampler.fingerprint import model_modules, weights_fingerprint

SCHEDULER = DDPMScheduler(num_train_timesteps=20)
TS = [0, 7, 19]


def images(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def estimate(model, checkpoint, data=None, seed=0, **options):
    options = EstimateOptions(checkpoint=checkpoint, progress=False, **options)
    return estimate_moments(model, images() if data is None else data, SCHEDULER, 6, TS, 4, seed, options=options)


def refusal(first, second, tmp_path) -> str:
    """The message with which the run ``second()`` refuses the checkpoint that ``first()`` left."""
    path = tmp_path / "ck.pt"
    first(path)
    with pytest.raises(ValueError, match="belongs to another run") as err:
        second(path)
    return str(err.value)


def test_other_weights_are_refused(tmp_path):
    """Retrained in place (same class, same config, other weights): the checkpoint is not resumed."""
    message = refusal(lambda p: estimate(tiny_unet(seed=0), p), lambda p: estimate(tiny_unet(seed=1), p), tmp_path)
    assert f"model: '{weights_fingerprint(tiny_unet(seed=0))}' in the checkpoint, " in message
    assert "delete it to start afresh (`analytic-sampler precompute`: pass --overwrite)" in message


def test_a_changed_buffer_is_refused(tmp_path):
    unet, other = tiny_unet(), tiny_unet()
    other.register_buffer("scale", torch.ones(1))
    unet.register_buffer("scale", torch.full((1,), 2.0))
    assert "model: " in refusal(lambda p: estimate(unet, p), lambda p: estimate(other, p), tmp_path)


def test_data_range_is_refused(tmp_path):
    unet = tiny_unet()
    message = refusal(lambda p: estimate(unet, p), lambda p: estimate(unet, p, data_range=None), tmp_path)
    assert "(data_range: [-1.0, 1.0] in the checkpoint, None now)" in message


def test_timestep_convention_is_refused(tmp_path):
    unet = tiny_unet()
    message = refusal(lambda p: estimate(EpsilonAdapter(unet, SCHEDULER), p),
                      lambda p: estimate(EpsilonAdapter(unet, SCHEDULER, timestep_shift=1, timestep_scale=0.5), p),
                      tmp_path)
    assert "(timestep_shift: 0 in the checkpoint, 1 now; timestep_scale: 1.0 in the checkpoint, 0.5 now)" in message


def class_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), num_class_embeds=3).eval()


def test_unconditional_kwargs_and_conditioning_are_refused(tmp_path):
    unet = class_unet()

    def guided(uncond: int, label: int = 1) -> EpsilonAdapter:
        return EpsilonAdapter(unet, SCHEDULER, guidance_scale=2.0, class_labels=torch.tensor([label]),
                              uncond_kwargs={"class_labels": torch.tensor([uncond])})

    message = refusal(lambda p: estimate(guided(0), p), lambda p: estimate(guided(2), p), tmp_path / "a")
    assert message.count(" in the checkpoint, ") == 1 and "(uncond_kwargs: '" in message
    message = refusal(lambda p: estimate(guided(0), p), lambda p: estimate(guided(0, label=2), p), tmp_path / "b")
    assert message.count(" in the checkpoint, ") == 1 and "(conditioning: '" in message


def test_other_data_is_refused(tmp_path):
    unet = tiny_unet()
    message = refusal(lambda p: estimate(unet, p), lambda p: estimate(unet, p, data=images(seed=1)), tmp_path)
    assert message.count(" in the checkpoint, ") == 1 and "(data: '" in message


def test_every_differing_field_is_named(tmp_path):
    message = refusal(lambda p: estimate(tiny_unet(seed=0), p),
                      lambda p: estimate(tiny_unet(seed=1), p, data=images(seed=1), seed=5, data_range=None), tmp_path)
    fields = [part.split(":")[0] for part in message.split("(", 1)[1].split(")")[0].split("; ")]
    assert fields == ["model", "seed", "data", "data_range"]


def test_old_checkpoint_is_refused_never_resumed(tmp_path):
    """A checkpoint of the previous format, whose run dict lacks the new fields, is refused like any other run."""
    unet, path = tiny_unet(), tmp_path / "ck.pt"
    estimate(unet, path)
    state = torch.load(path, weights_only=True)
    new_fields = ("model", "timestep_shift", "timestep_scale", "data_range", "uncond_kwargs", "guidance_scale")
    old_run = {k: v for k, v in state["run"].items() if k not in new_fields}
    torch.save({**state, "format": CHECKPOINT_FORMAT - 1, "run": old_run}, path)
    with pytest.raises(ValueError, match=r"belongs to another run \(format: 3 in the checkpoint \(an older "
                                         r"analytic-sampler\), 4 now; model: not recorded in the checkpoint, '\w+' now;"
                                         r" timestep_shift: not recorded .* delete it to start afresh"):
        estimate(unet, path)


def test_a_model_found_through_a_wrapper_resumes(tmp_path):
    """The weights behind a lambda, a bound method, a partial or a wrapper object are fingerprinted, so their
    checkpoints resume; the fingerprint is that of the module itself."""
    unet, path = tiny_unet(), tmp_path / "ck.pt"
    full = estimate(unet, None)
    estimate(unet, path)
    calls = []

    class Wrapper:
        def __init__(self, network):
            self.network = network

        def __call__(self, x, t):
            calls.append(1)
            return self.network(x, t).sample

    for model in (lambda x, t: calls.append(1) or unet(x, t), functools.partial(unet.forward, return_dict=True),
                  Wrapper(unet), EpsilonAdapter(unet, SCHEDULER)):
        assert weights_fingerprint(model) == weights_fingerprint(unet) and model_modules(model) == [unet]
        np.testing.assert_array_equal(estimate(model, path).ms_eps, full.ms_eps)
    assert calls == []  # every one resumed the finished checkpoint


def test_a_plain_function_needs_a_model_id_to_resume(tmp_path):
    def zero_eps(x, t):
        return torch.zeros_like(x)

    path = tmp_path / "ck.pt"
    assert weights_fingerprint(zero_eps) is None
    with pytest.warns(UserWarning, match="will not resume this run if it is interrupted: no nn.Module weights were "
                                         r"found behind the model .*pass options=EstimateOptions\(model_id="):
        estimate(zero_eps, path)
    with pytest.raises(ValueError, match=r"cannot be resumed: no nn.Module weights .*: pass options=EstimateOptions\("
                                         r"model_id='...'\) \(the same on every run\) to name it. Or delete it to "
                                         r"start afresh"):
        estimate(zero_eps, path)
    path.unlink()
    named = estimate(zero_eps, path, model_id="zeros-v1")
    assert named.provenance["model_id"] == "zeros-v1" and named.provenance["model_fingerprint"] is None
    np.testing.assert_array_equal(estimate(zero_eps, path, model_id="zeros-v1").ms_eps, named.ms_eps)
    with pytest.raises(ValueError, match=r"\(model_id: 'zeros-v1' in the checkpoint, 'zeros-v2' now\)"):
        estimate(zero_eps, path, model_id="zeros-v2")


def test_weights_fingerprint_covers_parameters_and_buffers_not_dtype():
    unet = tiny_unet()
    base = weights_fingerprint(unet)
    assert weights_fingerprint(tiny_unet().half()) == base  # a float16 copy shares it
    assert weights_fingerprint(tiny_unet().to(torch.bfloat16)) != base  # rounded differently
    changed = tiny_unet()
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 1e-2
    assert weights_fingerprint(changed) != base
    with_buffer = tiny_unet()
    with_buffer.register_buffer("extra", torch.zeros(3), persistent=False)
    assert weights_fingerprint(with_buffer) != base


def test_table_records_the_run(tmp_path):
    unet = tiny_unet()
    table = estimate(unet, None)
    assert table.provenance["model_fingerprint"] == weights_fingerprint(unet)
    assert table.provenance["run_key"]["model"] == weights_fingerprint(unet)
    assert table.provenance["run_key"]["data_range"] == [-1.0, 1.0]


def test_the_run_key_of_a_fixed_run_is_pinned():
    """The run key a table records is what `precompute` compares on a rerun: the same settings must give the same
    key from one version to the next (these values are those of the version before option objects), or finished
    tables would be estimated again. The weights' fingerprint depends only on the weights."""
    unet = tiny_unet()
    key = estimate(unet, None).provenance["run_key"]
    assert key == {
        "model": weights_fingerprint(unet), "prediction_type": "epsilon", "timestep_shift": 0, "timestep_scale": 1.0,
        "dtype": "None", "schedule": "N20-7502fd48938e6a94", "timesteps": "3 timesteps, 01ca5828431a0bfb",
        "num_samples": 6, "batch_size": 4, "seed": 0, "data": "7e92522a96d8f52e", "data_range": [-1.0, 1.0],
        "conditioning": "e3b0c44298fc1c14", "guidance_scale": None, "uncond_kwargs": "e3b0c44298fc1c14",
    }
    assert list(key) == ["model", "prediction_type", "timestep_shift", "timestep_scale", "dtype", "schedule",
                         "timesteps", "num_samples", "batch_size", "seed", "data", "data_range", "conditioning",
                         "guidance_scale", "uncond_kwargs"]
