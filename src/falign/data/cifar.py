"""CIFAR-10 / CIFAR-100 from the "python version" files a user brings (no download here).

CIFAR-10: a folder (``cifar-10-batches-py``) with ``data_batch_1`` … ``data_batch_5`` and ``test_batch``;
CIFAR-100: a folder (``cifar-100-python``) with ``train`` and ``test``. Each file is a pickle of a dict
with ``data`` (N × 3072 uint8, channel-major) and ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100).

The pickles are read with an unpickler that only builds plain containers and numpy arrays, so a file
crafted to run code is refused instead of executed.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from falign.data.base import Dataset, DatasetError, check_integers, check_splits

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # how protocol-2 pickles from Python 3 store bytes
    ("__builtin__", "bytes"), ("builtins", "bytes"),  # ... and empty bytes (the buffer of an empty array)
}
FILES = {
    "cifar10": (["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"], ["test_batch"],
                "labels", 10),
    "cifar100": (["train"], ["test"], "fine_labels", 100),
}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core") and np.lib.NumpyVersion(np.__version__) >= "2.0.0":
            module = module.replace("numpy.core", "numpy._core", 1)
        module = "builtins" if module == "__builtin__" else module
        return getattr(importlib.import_module(module), name)


def _array(value: Any, what: str, path: Path) -> np.ndarray:
    """``value`` as a numpy array, or an error naming the file when it is not an array of numbers."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as err:  # ragged lists and the like
        raise DatasetError(f"{path}: '{what}' is not an array ({type(err).__name__}: {err})") from None
    if array.dtype.kind not in "biuf":
        raise DatasetError(f"{path}: '{what}' is a {type(value).__name__} of {array.dtype}, expected integers")
    return array


def read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR pickle as ``(images (N, 3, 32, 32) uint8, labels (N,) int64)``.

    Refuses, naming the file and the value, pixels that are not integers in ``0 … 255`` (floats are never cast)
    and labels that are not integers in ``0 … num_classes−1``.
    """
    try:
        with open(path, "rb") as f:
            batch = _ArraysOnly(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, MemoryError, OverflowError) as err:
        raise DatasetError(f"{path}: not a readable CIFAR batch ({type(err).__name__}: {err})") from None
    if not isinstance(batch, dict):
        raise DatasetError(f"{path}: not a CIFAR batch (a {type(batch).__name__}, not a dict)")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise DatasetError(f"{path}: missing 'data' or '{label_key}'")
    data, labels = _array(batch["data"], "data", path), _array(batch[label_key], label_key, path)
    if data.ndim != 2 or data.shape[1] != 3072 or labels.ndim != 1 or len(labels) != len(data):
        raise DatasetError(f"{path}: expected data of shape (N, 3072) and N labels, "
                           f"got {data.shape} and {labels.shape}")
    check_integers(data, 0, 255, "pixel", path)
    check_integers(labels, 0, num_classes - 1, "label", path)
    return data.astype(np.uint8).reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar(directory: str | Path, name: str = "cifar10") -> Dataset:
    """CIFAR-10/100 as ``(3, 32, 32)`` images scaled to [0, 1] and standardised per channel with the
    training set's statistics.

    Every file is checked before anything trains (see :func:`read_batch`); both splits need examples, the
    training labels at least two classes, and every test label training examples.
    """
    if name not in FILES:
        raise DatasetError(f"unknown CIFAR variant {name!r}; choose cifar10 or cifar100")
    train_files, test_files, label_key, classes = FILES[name]
    directory = Path(directory)

    def read(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
        parts = []
        for stem in files:
            path = directory / stem
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: download the CIFAR 'python version' archive yourself, "
                                        f"extract it and pass --data-dir with its folder")
            parts.append(read_batch(path, label_key, classes))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    x_tr, y_tr = read(train_files)
    x_te, y_te = read(test_files)
    train_name = train_files[0] if len(train_files) == 1 else f"{train_files[0]}…{train_files[-1]}"
    check_splits(y_tr, y_te, directory / train_name, directory / test_files[0])
    x_tr_t = torch.from_numpy(x_tr.astype(np.float32) / 255.0)
    x_te_t = torch.from_numpy(x_te.astype(np.float32) / 255.0)
    mean = x_tr_t.mean(dim=(0, 2, 3), keepdim=True)
    std = x_tr_t.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-8)
    return Dataset(name, (x_tr_t - mean) / std, torch.from_numpy(y_tr), (x_te_t - mean) / std, torch.from_numpy(y_te),
                   classes, info={"source": str(directory)})
