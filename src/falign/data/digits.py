"""scikit-learn's bundled 8×8 digits (1,797 images, 10 classes; no download)."""

from __future__ import annotations

import torch

from falign.data.base import Dataset, DatasetError, standardize
from falign.seeding import mix_seed


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """The digits as ``(1, 8, 8)`` images, standardised, with a seeded stratified train/test split."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:  # pragma: no cover - depends on the environment
        raise DatasetError("the digits dataset needs scikit-learn: pip install 'falign[experiments]'") from None
    if not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"test_fraction must be in (0, 1), got {test_fraction}")
    bunch = sk_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(mix_seed(seed, 505))
    train_idx, test_idx = [], []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = round(len(idx) * test_fraction)
        test_idx.append(idx[:k])
        train_idx.append(idx[k:])
    tr, te = torch.cat(train_idx).sort().values, torch.cat(test_idx).sort().values
    x_tr, x_te = standardize(x[tr], x[te])
    return Dataset("digits", x_tr, y[tr], x_te, y[te], 10,
                   info={"source": "sklearn.datasets.load_digits", "test_fraction": test_fraction, "seed": seed})
