"""Tests of the digits data split, the shipped classifier and FD-digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from analytic_sampler.digits import (  # noqa: E402
    CLASSIFIER_PATH,
    DigitFeatures,
    fd_digits,
    load_digits_split,
    split_indices,
)
from analytic_sampler.evaluation.frechet import frechet_distance  # noqa: E402


def test_split_sizes_and_determinism():
    x, y = load_digits_split("train")
    xh, yh = load_digits_split("heldout")
    assert x.shape == (1500, 1, 8, 8) and y.shape == (1500,)
    assert xh.shape == (297, 1, 8, 8) and yh.shape == (297,)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1 and x.max() == 1
    # 17 grey levels x / 16 * 2 - 1
    levels = torch.unique(torch.cat([x, xh]))
    torch.testing.assert_close(levels, torch.arange(17.0) / 16 * 2 - 1)
    tr, ho = split_indices("train"), split_indices("heldout")
    assert len(set(tr.tolist()) | set(ho.tolist())) == 1797 and not set(tr.tolist()) & set(ho.tolist())
    x2, y2 = load_digits_split("train")
    assert torch.equal(x, x2) and torch.equal(y, y2)
    np.testing.assert_array_equal(ho, np.sort(np.random.default_rng(0).permutation(1797)[-297:]))
    assert set(yh.tolist()) == set(range(10))
    with pytest.raises(ValueError):
        load_digits_split("validation")


def test_shipped_classifier_accuracy():
    assert CLASSIFIER_PATH.exists() and CLASSIFIER_PATH.stat().st_size < 1_000_000
    feats = DigitFeatures()
    xh, yh = load_digits_split("heldout")
    acc = (feats.predict(xh) == yh).float().mean().item()
    assert acc >= 0.95
    f = feats(xh)
    assert f.shape == (297, 64) and f.dtype == torch.float64


def test_fd_digits_identity_and_split_gap():
    x, _ = load_digits_split("train")
    xh, _ = load_digits_split("heldout")
    assert fd_digits(xh, xh) == pytest.approx(0.0, abs=1e-3)
    gap = fd_digits(x[:297], xh)
    assert gap > 0
    # noise is far from digits
    noise = torch.rand(297, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert fd_digits(noise, xh) > 10 * gap


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=3), rng.normal(size=3)
    d1, d2 = rng.random(3) + 0.1, rng.random(3) + 0.1
    expect = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
    assert frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(expect, rel=1e-8)
    # singular covariances are handled
    s = np.zeros((3, 3))
    s[0, 0] = 1.0
    assert frechet_distance(mu1, s, mu1, s) == pytest.approx(0.0, abs=1e-6)


def test_bad_images_refused():
    with pytest.raises(ValueError, match="shape"):
        fd_digits(torch.zeros(5, 3, 8, 8), torch.zeros(5, 3, 8, 8))
