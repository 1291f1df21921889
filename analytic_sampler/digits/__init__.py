"""The bundled world: scikit-learn's 8x8 digits, a digit classifier for FD-digits, the Improved-DDPM trainer
behind the bundled models, and the models themselves (``bundled/``). Needs the ``[digits]`` extra."""

from .classifier import (
    CLASSIFIER_PATH,
    DigitClassifier,
    DigitFeatures,
    fd_digits,
    train_digit_classifier,
)
from .data import NUM_DIGITS, NUM_HELDOUT, SPLIT_SEED, load_digits_split, split_indices

__all__ = [
    "CLASSIFIER_PATH",
    "NUM_DIGITS",
    "NUM_HELDOUT",
    "SPLIT_SEED",
    "DigitClassifier",
    "DigitFeatures",
    "fd_digits",
    "load_digits_split",
    "split_indices",
    "train_digit_classifier",
]
