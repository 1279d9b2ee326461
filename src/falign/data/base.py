"""In-memory datasets, n-class subsets, symmetric label noise and seeded batching."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from falign.errors import FalignError
from falign.seeding import mix_seed


class DatasetError(FalignError, ValueError):
    """A dataset file is missing, malformed, or an option does not fit the dataset."""


class DatasetMissing(DatasetError, FileNotFoundError):
    """A dataset's files are not on this machine (the commands with a documented fallback catch this)."""


@dataclass
class Dataset:
    """Train and test tensors held in memory.

    Attributes:
        x_train, x_test: float inputs ``(N, *input_shape)``; y_train, y_test: int64 labels ``(N,)``.
        num_classes: number of classes; labels are ``0 … num_classes−1``.
        clean_y_train: training labels before label noise (equal to ``y_train`` without noise).
        x_val, y_val: a validation split held out of the training images (:func:`hold_out`), or ``None``.
        info: provenance (source files, options applied).
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    clean_y_train: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)
    x_val: Tensor | None = None
    y_val: Tensor | None = None

    def __post_init__(self) -> None:
        if self.clean_y_train is None:
            self.clean_y_train = self.y_train

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to(self, device: torch.device | str) -> Dataset:
        return replace(self, x_train=self.x_train.to(device), y_train=self.y_train.to(device),
                       x_test=self.x_test.to(device), y_test=self.y_test.to(device),
                       clean_y_train=self.clean_y_train.to(device),
                       x_val=None if self.x_val is None else self.x_val.to(device),
                       y_val=None if self.y_val is None else self.y_val.to(device))

    def __repr__(self) -> str:
        val = "" if self.y_val is None else f", val={len(self.y_val)}"
        return (f"Dataset({self.name!r}, train={len(self.y_train)}{val}, test={len(self.y_test)}, "
                f"input_shape={self.input_shape}, classes={self.num_classes})")


def check_integers(values: np.ndarray, low: int, high: int, what: str, source: object) -> None:
    """Refuse anything but integers in ``low … high``: the one check of labels and pixels read from a file.

    Raises :class:`DatasetError` naming ``source`` (the file) and the first bad value with its index, e.g.
    ``data_batch_3: label 10 at index 417 is outside 0..9``; floats and booleans are refused, not cast.
    """
    def at(flat: int) -> str:
        where = np.unravel_index(flat, values.shape)
        return f"{what} {values[where]} at index {where[0] if len(where) == 1 else tuple(int(i) for i in where)}"

    if values.size and values.dtype.kind not in "iu":  # an empty list is float64 to numpy, and holds no floats
        raise DatasetError(f"{source}: {what}s of type {values.dtype} ({at(0)}), expected integers {low}..{high}")
    if values.size and low <= np.iinfo(values.dtype).min and np.iinfo(values.dtype).max <= high:
        return  # the type's own range fits (uint8 pixels in 0..255): nothing to scan
    bad = np.flatnonzero((values < low) | (values > high))
    if len(bad):
        raise DatasetError(f"{source}: {at(bad[0])} is outside {low}..{high}")


def check_splits(y_train: np.ndarray, y_test: np.ndarray, train_source: object, test_source: object) -> None:
    """Refuse a task that cannot be trained or tested: no training or test examples, fewer than two classes
    among the training labels, or a test label no training example has (the labels are in range already)."""
    if len(y_train) == 0 or len(y_test) == 0:
        raise DatasetError(f"{train_source if len(y_train) == 0 else test_source}: no "
                           f"{'training' if len(y_train) == 0 else 'test'} examples")
    present = np.unique(y_train)
    if len(present) < 2:
        raise DatasetError(f"{train_source}: every training label is {present[0]}; a classification task needs "
                           f"at least 2 classes")
    unseen = np.flatnonzero(~np.isin(y_test, present))
    if len(unseen):
        i = unseen[0]
        raise DatasetError(f"{test_source}: label {y_test[i]} at index {i} has no training examples")


def subset_classes(ds: Dataset, n_classes: int) -> Dataset:
    """Keep the first ``n_classes`` classes (labels ``0 … n−1``) in train and test."""
    if not 2 <= n_classes <= ds.num_classes:
        raise DatasetError(f"n_classes must be between 2 and {ds.num_classes} for {ds.name}, got {n_classes}")
    if n_classes == ds.num_classes:
        return ds
    keep_tr, keep_te = ds.y_train < n_classes, ds.y_test < n_classes
    return replace(ds, x_train=ds.x_train[keep_tr], y_train=ds.y_train[keep_tr], x_test=ds.x_test[keep_te],
                   y_test=ds.y_test[keep_te], clean_y_train=ds.clean_y_train[keep_tr], num_classes=n_classes,
                   info={**ds.info, "n_classes": n_classes})


def subsample_train(ds: Dataset, n: int, seed: int = 0) -> Dataset:
    """A seeded random subset of ``n`` training examples (the test set is unchanged)."""
    total = len(ds.y_train)
    if not 1 <= n <= total:
        raise DatasetError(f"train_subset must be between 1 and {total} for {ds.name}, got {n}")
    idx = torch.randperm(total, generator=torch.Generator().manual_seed(mix_seed(seed, 101)))[:n]
    idx = idx.sort().values
    return replace(ds, x_train=ds.x_train[idx], y_train=ds.y_train[idx], clean_y_train=ds.clean_y_train[idx],
                   info={**ds.info, "train_subset": n})


def hold_out(ds: Dataset, n: int, seed: int = 0) -> Dataset:
    """Move a seeded random ``n`` of the training examples into a validation split (``x_val``, ``y_val``).

    The validation labels are the clean ones (``clean_y_train``); the test set is unchanged. The split depends on
    ``seed`` only, so runs that differ in their own seed are compared on the same validation images.
    """
    total = len(ds.y_train)
    if not 1 <= n < total:
        raise DatasetError(f"val_size must be between 1 and {total - 1} for {ds.name} ({total} training examples), "
                           f"got {n}")
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(mix_seed(seed, 303)))
    val, train = perm[:n].sort().values, perm[n:].sort().values
    return replace(ds, x_train=ds.x_train[train], y_train=ds.y_train[train], clean_y_train=ds.clean_y_train[train],
                   x_val=ds.x_train[val], y_val=ds.clean_y_train[val], info={**ds.info, "val_size": n})


def resize_images(ds: Dataset, side: int) -> Dataset:
    """Every image ``(C, H, W)`` resized to ``(C, side, side)`` by bilinear interpolation (BioTorch resizes
    Fashion-MNIST's 28×28 to 32×32 this way; here the resize acts on the normalised floats, not on 8-bit images)."""
    if ds.x_train.dim() != 4:
        raise DatasetError(f"resize applies to images (N, C, H, W); {ds.name} has inputs of shape {ds.input_shape}")
    if side < 4:
        raise DatasetError(f"resize must be at least 4 pixels, got {side}")

    def scale(x: Tensor | None) -> Tensor | None:
        if x is None:
            return None
        return torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)

    return replace(ds, x_train=scale(ds.x_train), x_test=scale(ds.x_test), x_val=scale(ds.x_val),
                   info={**ds.info, "resize": side})


def add_label_noise(ds: Dataset, rate: float, seed: int = 0) -> Dataset:
    """Symmetric label noise: exactly ``round(rate·N)`` training labels, chosen at random, are replaced
    by a different class drawn uniformly. Test labels stay clean; ``clean_y_train`` keeps the originals."""
    if not 0.0 <= rate < 1.0:
        raise DatasetError(f"label noise rate must be in [0, 1), got {rate}")
    if rate == 0.0:
        return ds
    g = torch.Generator().manual_seed(mix_seed(seed, 202))
    n = len(ds.y_train)
    flip = torch.randperm(n, generator=g)[: round(rate * n)]
    offset = torch.randint(1, ds.num_classes, (len(flip),), generator=g)
    noisy = ds.y_train.clone()
    noisy[flip] = (noisy[flip] + offset) % ds.num_classes
    return replace(ds, y_train=noisy, clean_y_train=ds.clean_y_train,
                   info={**ds.info, "label_noise": rate, "flipped": len(flip)})


def standardize(x_train: Tensor, x_test: Tensor) -> tuple[Tensor, Tensor]:
    """Scale both splits by the training set's global mean and standard deviation."""
    mean, std = x_train.mean(), x_train.std().clamp_min(1e-8)
    return (x_train - mean) / std, (x_test - mean) / std


def epoch_order(n: int, seed: int, epoch: int, device: torch.device | str = "cpu") -> Tensor:
    """The shuffled example order of ``epoch``: a pure function of (seed, epoch), so resuming is exact."""
    g = torch.Generator().manual_seed(mix_seed(seed, 303, epoch))
    return torch.randperm(n, generator=g).to(device)


def batches(x: Tensor, y: Tensor, batch_size: int, order: Tensor | None = None,
            start: int = 0, drop_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """Mini-batches of ``(x, y)`` in ``order`` (default: as stored), from batch index ``start``; with
    ``drop_last`` a last batch smaller than ``batch_size`` is left out (as PyTorch's ``DataLoader(drop_last=True)``)."""
    n = len(y) - (len(y) % batch_size if drop_last else 0)
    for i in range(start * batch_size, n, batch_size):
        if order is None:
            yield x[i : i + batch_size], y[i : i + batch_size]
        else:
            idx = order[i : i + batch_size]
            yield x[idx], y[idx]
