"""MNIST-format (IDX) files: Fashion-MNIST, MNIST, or any dataset stored the same way.

File layout (big-endian): two zero bytes, a type byte (``0x08`` = unsigned byte), the number of
dimensions, one 4-byte size per dimension, then the data. Files may be plain or gzipped.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from falign.data.base import Dataset, DatasetError, DatasetMissing, check_integers, check_splits

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "FALIGN_FASHION_MNIST_DIR"
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# MD5 of the decompressed Fashion-MNIST files (../shared/DESIGN.md §5).
FASHION_MNIST_MD5 = {
    "train_images": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train_labels": "9018921c3c673c538a1fc5bad174d6f9",
    "test_images": "8181f5470baa50b63fa0f6fddb340f0a",
    "test_labels": "15d484375f8d13e6eb1aabb0c3f46965",
}
HOW_TO_GET = {
    "fashion-mnist": "install it with `apt-get install -y dataset-fashion-mnist` (files in "
                     f"{FASHION_MNIST_DIR}) or pass --data-dir with the four IDX files",
    "mnist": "put the four MNIST IDX files (train-images-idx3-ubyte[.gz], ...) in a folder and pass --data-dir",
}
# Classes of the known IDX datasets; any other name takes its class count from the training labels.
CLASSES = {"mnist": 10, "fashion-mnist": 10}


def fashion_mnist_dir() -> Path:
    """Where Fashion-MNIST is looked for by default: ``$FALIGN_FASHION_MNIST_DIR`` when set, else the folder
    ``apt-get install -y dataset-fashion-mnist`` fills (an empty folder in the variable hides an installed copy,
    as CI does to test the fallbacks)."""
    return Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise DatasetError(f"{path}: cannot read ({type(err).__name__}: {err}); the file is truncated or "
                           f"not a valid {'gzip' if path.suffix == '.gz' else 'IDX'} file") from None


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (plain or ``.gz``) of unsigned bytes into a numpy array.

    Raises :class:`DatasetError` naming the file for a wrong magic number, a size that does not match
    the header, or a truncated gzip stream.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DatasetError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    if raw[2] != 0x08:
        raise DatasetError(f"{path}: unsupported IDX data type 0x{raw[2]:02x} (only unsigned bytes, 0x08)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim < 1 or len(raw) < header:
        raise DatasetError(f"{path}: IDX header truncated or with {ndim} dimensions")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + math.prod(dims)  # Python ints: a header claiming 2^93 bytes cannot overflow
    if len(raw) != expected:
        raise DatasetError(f"{path}: size {len(raw)} bytes does not match its header {dims} "
                           f"({expected} bytes expected); the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(directory: Path, stem: str, dataset: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    how = HOW_TO_GET.get(dataset, HOW_TO_GET["mnist"])
    if dataset == "fashion-mnist" and os.environ.get(FASHION_MNIST_ENV):
        how = (f"${FASHION_MNIST_ENV} names {os.environ[FASHION_MNIST_ENV]}: put the four IDX files there, "
               f"unset it, " + how)
    raise DatasetMissing(f"{directory / stem}[.gz] not found: {how}")


def md5_of(path: Path) -> str:
    """MD5 of a file's (decompressed) contents."""
    return hashlib.md5(_read_bytes(path)).hexdigest()


_CACHE: dict[tuple, Dataset] = {}


def load_idx_dataset(directory: str | Path | None = None, name: str = "fashion-mnist",
                     verify: bool = False) -> Dataset:
    """Load the four IDX files of an MNIST-format dataset as ``(1, H, W)`` images scaled to ``[0, 1]``
    and standardised with the training set's mean and standard deviation.

    ``directory`` defaults to :func:`fashion_mnist_dir`; ``verify`` checks Fashion-MNIST's published MD5 sums.
    Missing files raise :class:`DatasetMissing`. Labels are checked before anything trains: MNIST and
    Fashion-MNIST labels are ``0 … 9``, both splits need examples, training needs at least two classes and
    every test label needs training examples; a :class:`DatasetError` names the file and the bad value.
    """
    directory = Path(directory) if directory is not None else fashion_mnist_dir()
    paths = {key: _find(directory, stem, name) for key, stem in FILES.items()}
    key = (name, verify, *((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in paths.values()))
    if key not in _CACHE:  # sweeps load the same files many times; the tensors are never modified
        _CACHE.clear()
        _CACHE[key] = _load(paths, directory, name, verify)
    return _CACHE[key]


def _load(paths: dict[str, Path], directory: Path, name: str, verify: bool) -> Dataset:
    if verify and name == "fashion-mnist":
        for key, path in paths.items():
            if md5_of(path) != FASHION_MNIST_MD5[key]:
                raise DatasetError(f"{path}: MD5 does not match Fashion-MNIST's {FASHION_MNIST_MD5[key]}")
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or 0 in images.shape[1:]:
            raise DatasetError(f"{paths[f'{split}_images']}: expected images of shape (N, H, W), got {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise DatasetError(f"{paths[f'{split}_labels']}: {labels.shape[0]} labels for {len(images)} images")
    num_classes = CLASSES.get(name) or int(arrays["train_labels"].max(initial=0)) + 1
    for split in ("train", "test"):
        check_integers(arrays[f"{split}_labels"], 0, num_classes - 1, "label", paths[f"{split}_labels"])
    check_splits(arrays["train_labels"], arrays["test_labels"], paths["train_labels"], paths["test_labels"])
    x_tr = torch.from_numpy(arrays["train_images"].astype(np.float32) / 255.0).unsqueeze(1)
    x_te = torch.from_numpy(arrays["test_images"].astype(np.float32) / 255.0).unsqueeze(1)
    y_tr = torch.from_numpy(arrays["train_labels"].astype(np.int64))
    y_te = torch.from_numpy(arrays["test_labels"].astype(np.int64))
    mean, std = x_tr.mean(), x_tr.std().clamp_min(1e-8)
    return Dataset(name, (x_tr - mean) / std, y_tr, (x_te - mean) / std, y_te, num_classes,
                   info={"source": str(directory), "files": {k: str(p) for k, p in paths.items()}})
