"""A small digit classifier and FD-digits, the Fréchet distance in its feature space.

``fd_digits(a, b)`` is the Fréchet distance between Gaussians fitted to the 64-d penultimate-layer
features of the shipped digit classifier (``DigitFeatures``). It plays the role FID plays for natural
images, but its values are **not comparable with Inception FID** (different network, feature
dimension, data and scale). Like FID it is biased upwards for small sample counts: compare figures
computed with the same number of images on both sides.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..evaluation.frechet import FrechetReference
from .data import load_digits_split

CLASSIFIER_PATH = Path(__file__).resolve().parent / "bundled" / "digit-classifier" / "model.safetensors"


class DigitClassifier(nn.Module):
    """Tiny CNN for 1x8x8 digits in [-1, 1]; ``features`` returns the 64-d penultimate layer."""

    feature_dim = 64

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv4 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 2 * 2, self.feature_dim)
        self.fc2 = nn.Linear(self.feature_dim, 10)
        self.dropout = nn.Dropout(0.3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # 4x4
        h = F.relu(self.conv3(h))
        h = F.max_pool2d(F.relu(self.conv4(h)), 2)  # 2x2
        return F.relu(self.fc1(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.features(x)))


def _shift_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translations by up to one pixel (background value -1 fills the border)."""
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx = torch.randint(0, 3, (n,), generator=gen)
    dy = torch.randint(0, 3, (n,), generator=gen)
    out = torch.empty_like(x)
    for i in range(3):
        for j in range(3):
            m = (dy == i) & (dx == j)
            if m.any():
                out[m] = padded[m, :, i : i + 8, j : j + 8]
    return out


def train_digit_classifier(
    out_path: str | os.PathLike | None = None,
    epochs: int = 60,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    augment: bool = True,
    verbose: bool = True,
) -> tuple[DigitClassifier, float]:
    """Train the digit classifier on the train split; returns ``(model, heldout_accuracy)``.

    With ``out_path`` the weights are written there as safetensors (the shipped file is
    ``CLASSIFIER_PATH``). Adam with cosine learning-rate decay, one-pixel random shifts.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = load_digits_split("train")
    xh, yh = load_digits_split("heldout")
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = (len(x) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for k in range(steps_per_epoch):
            idx = perm[k * batch_size : (k + 1) * batch_size]
            xb = x[idx]
            if augment:
                xb = _shift_augment(xb, gen)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if verbose and (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1}: loss {loss.item():.4f} heldout acc {_accuracy(model, xh, yh):.4f}")
    model.eval()
    acc = _accuracy(model, xh, yh)
    if out_path is not None:
        from safetensors.torch import save_file

        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"heldout_accuracy": f"{acc:.4f}", "seed": str(seed), "epochs": str(epochs)})
        os.replace(tmp, out_path)
    return model, acc


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train(was_training)
    return acc


class DigitFeatures:
    """The shipped digit classifier (eval mode, CPU by default); call it to get 64-d features."""

    def __init__(self, path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> None:
        from safetensors.torch import load_file

        path = Path(path) if path is not None else CLASSIFIER_PATH
        if not path.exists():
            raise FileNotFoundError(
                f"digit classifier weights not found at {path}; retrain them with "
                "`analytic_sampler.digits.train_digit_classifier(out_path=...)`."
            )
        self.device = torch.device(device)
        self.model = DigitClassifier()
        self.model.load_state_dict(load_file(str(path)))
        self.model.eval().to(self.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """float64 features ``(n, 64)`` of images ``(n, 1, 8, 8)`` in [-1, 1]."""
        images = _check_images(images)
        out = [
            self.model.features(images[i : i + batch_size].to(self.device, torch.float32)).double().cpu()
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(out)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        images = _check_images(images)
        return self.model(images.to(self.device, torch.float32)).argmax(1).cpu()


def _check_images(images: torch.Tensor) -> torch.Tensor:
    images = torch.as_tensor(images)
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 8, 8):
        raise ValueError(f"expected digit images of shape (n, 1, 8, 8) in [-1, 1], got {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf")
    return images


def fd_digits(images_a: torch.Tensor, images_b: torch.Tensor, features: DigitFeatures | None = None) -> float:
    """FD-digits between two sets of 1x8x8 images in [-1, 1] (NOT comparable with Inception FID).

    Both sets need at least 2 images; use equal counts when comparing figures (the estimator is biased
    upwards by roughly ``O(feature_dim / n)``).
    """
    features = features if features is not None else _default_features()
    if len(images_a) < 2 or len(images_b) < 2:
        raise ValueError("fd_digits needs at least 2 images in each set")
    return FrechetReference.of(features(images_b).numpy()).distance(features(images_a).numpy())


_FEATURES: DigitFeatures | None = None


def _default_features() -> DigitFeatures:
    global _FEATURES
    if _FEATURES is None:
        _FEATURES = DigitFeatures()
    return _FEATURES


if __name__ == "__main__":  # retrain the shipped classifier: python -m analytic_sampler.digits.classifier
    import argparse

    p = argparse.ArgumentParser(description="Retrain the shipped digit classifier.")
    p.add_argument("--out", default=str(CLASSIFIER_PATH))
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(1)
    _, acc = train_digit_classifier(a.out, epochs=a.epochs, seed=a.seed)
    print(f"held-out accuracy {acc:.4f}; weights written to {a.out}")
