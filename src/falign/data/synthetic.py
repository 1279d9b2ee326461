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


def many_class_subset(n_classes: int, *, per_class_train: int, per_class_test: int, seed: int, pool: int = 100,
                      dim: int = 20, clusters_per_class: int = 3, noise: float = 1.0, task_seed: int = 0) -> Dataset:
    """A random ``n_classes``-class subset of a fixed synthetic task with ``pool`` classes.

    The task (``task_seed``): each of ``pool`` classes owns ``clusters_per_class`` centres in ``R^dim`` drawn
    ``N(0, 1)``; a sample is a centre plus ``N(0, noise²)`` noise. ``seed`` draws which classes, and the
    samples: ``per_class_train`` / ``per_class_test`` of each, so every subset has the same examples per
    class whatever its size. At the defaults a two-hidden-layer MLP trained by backprop is well above chance
    and below ceiling from about 20 classes up (the multi-class experiment of ``falign reproduce``).
    """
    if not 2 <= n_classes <= pool:
        raise DatasetError(f"n_classes must be between 2 and {pool}, got {n_classes}")
    task = torch.Generator().manual_seed(mix_seed(task_seed, 405))
    centres = torch.randn(pool, clusters_per_class, dim, generator=task)
    g = torch.Generator().manual_seed(mix_seed(seed, 406))
    classes = torch.randperm(pool, generator=g)[:n_classes].sort().values

    def sample(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n_classes).repeat_interleave(per_class)
        c = torch.randint(0, clusters_per_class, (len(y),), generator=g)
        x = centres[classes[y], c] + noise * torch.randn(len(y), dim, generator=g)
        return x, y

    x_tr, y_tr = sample(per_class_train)
    x_te, y_te = sample(per_class_test)
    return Dataset(f"synthetic-{pool}", x_tr, y_tr, x_te, y_te, n_classes,
                   info={"source": f"synthetic {pool}-class Gaussian mixture", "classes": classes.tolist(),
                         "dim": dim, "clusters_per_class": clusters_per_class, "noise": noise})
