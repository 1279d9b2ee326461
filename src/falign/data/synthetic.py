"""Seeded synthetic classification tasks made in-process."""

from __future__ import annotations

import torch

from falign.data.base import Dataset, DatasetError
from falign.seeding import mix_seed


def synthetic_classification(num_classes: int = 10, dim: int = 32, n_train: int = 4000, n_test: int = 2000,
                             clusters_per_class: int = 2, noise: float = 0.6, seed: int = 0) -> Dataset:
    """Gaussian-mixture classification: each class owns ``clusters_per_class`` random centres in
    ``R^dim`` (entries ``N(0, 1)``); a sample is a centre plus ``N(0, noise²)`` per coordinate.

    Balanced classes; the same ``seed`` gives the same task. Multimodal classes make it non-linear,
    and a two-hidden-layer MLP trained by backprop learns it well at the defaults.
    """
    if num_classes < 2:
        raise DatasetError(f"synthetic task needs at least 2 classes, got {num_classes}")
    if dim < 1 or n_train < num_classes or n_test < 1 or clusters_per_class < 1 or noise < 0:
        raise DatasetError("synthetic task needs dim >= 1, n_train >= num_classes, n_test >= 1, "
                           "clusters_per_class >= 1, noise >= 0")
    g = torch.Generator().manual_seed(mix_seed(seed, 404))
    centres = torch.randn(num_classes, clusters_per_class, dim, generator=g)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=g)]
        c = torch.randint(0, clusters_per_class, (n,), generator=g)
        x = centres[y, c] + noise * torch.randn(n, dim, generator=g)
        return x, y

    x_tr, y_tr = sample(n_train)
    x_te, y_te = sample(n_test)
    return Dataset("synthetic", x_tr, y_tr, x_te, y_te, num_classes,
                   info={"source": "synthetic Gaussian mixture", "dim": dim, "clusters_per_class": clusters_per_class,
                         "noise": noise, "seed": seed})
