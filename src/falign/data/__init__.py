"""Datasets: synthetic tasks, scikit-learn digits, MNIST-format IDX files; subsets and label noise.

:func:`load_dataset` is the entry point used by the trainer and the command line.
"""

from __future__ import annotations

from pathlib import Path

from falign.data.base import (
    Dataset,
    DatasetError,
    DatasetMissing,
    add_label_noise,
    batches,
    epoch_order,
    hold_out,
    resize_images,
    subsample_train,
    subset_classes,
)
from falign.data.cifar import load_cifar
from falign.data.digits import load_digits
from falign.data.idx import FASHION_MNIST_DIR, fashion_mnist_dir, load_idx_dataset, read_idx
from falign.data.synthetic import many_class_subset, synthetic_classification

DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10", "cifar100", "synthetic")


def load_dataset(name: str, *, data_dir: str | Path | None = None, n_classes: int | None = None,
                 label_noise: float = 0.0, train_subset: int | None = None, seed: int = 0,
                 synthetic_classes: int = 10, val_size: int = 0, resize: int | None = None) -> Dataset:
    """Load a dataset by name and apply the options in a fixed order: train subset, classes, noise, validation
    split, resize.

    Args:
        name: ``digits``, ``fashion-mnist``, ``mnist``, ``cifar10``, ``cifar100`` (the last three need
            ``data_dir``) or ``synthetic``.
        data_dir: folder of the IDX files (default for Fashion-MNIST: ``/usr/share/datasets/fashion-mnist``, or
            ``$FALIGN_FASHION_MNIST_DIR`` when set).
        n_classes: keep the first ``n`` classes.
        label_noise: symmetric label-noise rate in ``[0, 1)`` on the training labels.
        train_subset: seeded random subset of this many training examples.
        seed: seed of the split (digits), the task (synthetic), the subset and the noise.
        synthetic_classes: number of classes of the synthetic task.
        val_size: hold this many training examples out as a validation split (:func:`hold_out`; its own fixed
            seed, the same split for every ``seed``; clean labels).
        resize: bilinear resize of the images to ``resize × resize`` (:func:`resize_images`).
    """
    if name == "digits":
        ds = load_digits(seed=seed)
    elif name == "fashion-mnist":
        ds = load_idx_dataset(data_dir, "fashion-mnist")
    elif name == "mnist":
        if data_dir is None:
            raise DatasetError("mnist: no files are bundled; put the four IDX files in a folder and pass --data-dir")
        ds = load_idx_dataset(data_dir, "mnist")
    elif name in ("cifar10", "cifar100"):
        if data_dir is None:
            raise DatasetError(f"{name}: no files are bundled; extract the CIFAR 'python version' archive and pass "
                               f"--data-dir with its folder")
        ds = load_cifar(data_dir, name)
    elif name == "synthetic":
        ds = synthetic_classification(num_classes=synthetic_classes, seed=seed)
    else:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if train_subset is not None:
        ds = subsample_train(ds, train_subset, seed)
    if n_classes is not None:
        ds = subset_classes(ds, n_classes)
    ds = add_label_noise(ds, label_noise, seed)
    if val_size:
        ds = hold_out(ds, val_size)
    return resize_images(ds, resize) if resize is not None else ds


__all__ = [
    "DATASETS",
    "FASHION_MNIST_DIR",
    "Dataset",
    "DatasetError",
    "DatasetMissing",
    "add_label_noise",
    "batches",
    "epoch_order",
    "fashion_mnist_dir",
    "hold_out",
    "load_cifar",
    "load_dataset",
    "load_digits",
    "load_idx_dataset",
    "many_class_subset",
    "read_idx",
    "resize_images",
    "subsample_train",
    "subset_classes",
    "synthetic_classification",
]
