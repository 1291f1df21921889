"""One seeding scheme for every seeded draw: each stream gives the generator it documents, bit for bit."""

import numpy as np
import pytest
import torch

from analytic_sampler.noise import noise_generator


def draws(generator: torch.Generator) -> torch.Tensor:
    return torch.randn(64, generator=generator)


@pytest.mark.parametrize(("stream", "key"), [("estimate", [7, 3]), ("latent", [7, 3, 1])])
def test_seed_sequence_streams(stream, key):
    state = int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0])
    expected = draws(torch.Generator().manual_seed(state))
    assert torch.equal(draws(noise_generator(7, 3, stream=stream)), expected)
    assert torch.equal(draws(noise_generator(7, 3)), draws(noise_generator(7, 3, stream="estimate")))  # the default


def test_likelihood_stream_and_streams_differ():
    assert torch.equal(draws(noise_generator(7, 3, stream="likelihood")),
                       draws(torch.Generator().manual_seed(7 * 1_000_003 + 3)))
    first = {s: draws(noise_generator(7, 3, stream=s)) for s in ("estimate", "latent", "likelihood")}
    assert not torch.equal(first["estimate"], first["latent"]) and not torch.equal(first["estimate"], first["likelihood"])
    assert not torch.equal(draws(noise_generator(7, 3)), draws(noise_generator(7, 4)))  # one generator per batch


def test_unknown_stream_names_the_choices():
    with pytest.raises(ValueError, match=r"stream='moments'; use one of \('estimate', 'latent', 'likelihood', 'fit'\)"):
        noise_generator(0, 0, stream="moments")
