"""scikit-learn's bundled 8x8 digits (no download), split the same way in every stage."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset


def split(seed: int = 0, test_fraction: float = 0.2):
    """(x_train, y_train, x_test, y_test) as float32/int64 tensors of raw pixels (0..16)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = d.data.astype(np.float32), d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    t = torch.from_numpy
    return t(x[train]), t(y[train]), t(x[test]), t(y[test])


def datasets(seed: int = 0):
    xtr, ytr, xte, yte = split(seed)
    return TensorDataset(xtr, ytr), TensorDataset(xte, yte)
