"""Fréchet distance between Gaussians fitted to two feature sets (FID's formula), with a bootstrap standard error.

    FD = |mu_1 - mu_2|^2 + tr S_1 + tr S_2 - 2 tr (S_1 S_2)^{1/2},   tr (S_1 S_2)^{1/2} = tr (R S_1 R)^{1/2}

with ``R = S_2^{1/2}``: for covariance matrices (symmetric, positive semi-definite) the trace needs the eigenvalues
of one symmetric matrix, with no complex square root and no special case for singular covariances. Keeping ``R`` of
a fixed reference makes each further distance one ``eigvalsh``, which is what a bootstrap needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

FD_BOOTSTRAP = 100  # resamples of a feature set for the standard error of its distance


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (rows are samples) as float64."""
    f = np.asarray(feats, dtype=np.float64)
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


class FrechetReference:
    """A fixed Gaussian ``(mean, cov)`` with its covariance's square root kept; ``distance`` to others."""

    def __init__(self, mean, cov):
        self.mean = np.atleast_1d(np.asarray(mean, dtype=np.float64))
        cov = np.atleast_2d(np.asarray(cov, dtype=np.float64))
        vals, vecs = np.linalg.eigh(cov)
        self.root, self.trace = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T, float(np.trace(cov))

    @classmethod
    def of(cls, feats) -> FrechetReference:
        return cls(*feature_stats(feats))

    def distance_to(self, mean, cov) -> float:
        """FD from the Gaussian ``(mean, cov)``, clamped at 0."""
        cov = np.atleast_2d(np.asarray(cov, dtype=np.float64))
        cross = np.sqrt(np.clip(np.linalg.eigvalsh(self.root @ cov @ self.root), 0, None)).sum()
        diff = np.atleast_1d(np.asarray(mean, dtype=np.float64)) - self.mean
        return max(float(diff @ diff + np.trace(cov) + self.trace - 2.0 * cross), 0.0)

    def distance(self, feats) -> float:
        """FD from the Gaussian fitted to ``feats``."""
        return self.distance_to(*feature_stats(feats))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """``|mu1-mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})``, clamped at 0."""
    return FrechetReference(mu2, sigma2).distance_to(mu1, sigma1)


def bootstrap_distances(feature_sets: Sequence[np.ndarray], reference: FrechetReference, seed: int = 0,
                        resamples: int = FD_BOOTSTRAP) -> np.ndarray:
    """``(resamples, len(feature_sets))``: FD of each set to the reference on the same resampled indices (drawn with
    replacement; the reference is held fixed). Sets of equal size whose i-th rows belong together (samples from the
    same initial noise) thus give paired differences: the standard error of ``FD_a - FD_b`` is the standard deviation
    of the column difference."""
    sizes = {len(f) for f in feature_sets}
    if len(sizes) != 1:
        raise ValueError(f"paired bootstrap needs feature sets of one size, got sizes {sorted(sizes)}.")
    n, rng = sizes.pop(), np.random.default_rng(seed)
    out = np.empty((resamples, len(feature_sets)))
    for b in range(resamples):
        index = rng.integers(0, n, n)
        out[b] = [reference.distance(f[index]) for f in feature_sets]
    return out


def frechet_with_stderr(feats: np.ndarray, reference: FrechetReference, seed: int = 0) -> tuple[float, float]:
    """FD of ``feats`` to the reference, and its bootstrap standard error (:func:`bootstrap_distances`)."""
    return reference.distance(feats), float(np.std(bootstrap_distances([feats], reference, seed)[:, 0], ddof=1))
