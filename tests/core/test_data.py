"""Dataset loaders on tiny files the tests write, subsets, label noise, errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from falign.data import (
    DatasetError,
    add_label_noise,
    load_dataset,
    load_digits,
    load_idx_dataset,
    read_idx,
    subset_classes,
    synthetic_classification,
)
from falign.data.idx import FILES


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def write_tiny_mnist(folder: Path, gz: bool, n_train=20, n_test=10, classes=10) -> None:
    rng = np.random.default_rng(0)
    write_idx(folder / FILES["train_images"], rng.integers(0, 256, (n_train, 6, 6)), gz)
    write_idx(folder / FILES["train_labels"], np.arange(n_train) % classes, gz)
    write_idx(folder / FILES["test_images"], rng.integers(0, 256, (n_test, 6, 6)), gz)
    write_idx(folder / FILES["test_labels"], np.arange(n_test) % classes, gz)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_loader_plain_and_gzipped(tmp_path, gz):
    write_tiny_mnist(tmp_path, gz)
    ds = load_idx_dataset(tmp_path, "mnist")
    assert ds.x_train.shape == (20, 1, 6, 6) and ds.x_test.shape == (10, 1, 6, 6)
    assert ds.num_classes == 10 and ds.y_train.tolist() == [i % 10 for i in range(20)]
    assert abs(ds.x_train.mean().item()) < 1e-5 and abs(ds.x_train.std().item() - 1) < 1e-4
    raw = read_idx(next(tmp_path.glob("train-images*")))
    assert raw.shape == (20, 6, 6) and raw.dtype == np.uint8


def test_idx_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_idx_dataset(tmp_path, "fashion-mnist")
    write_tiny_mnist(tmp_path, gz=False)
    images = tmp_path / FILES["train_images"]
    good = images.read_bytes()
    images.write_bytes(b"\x12\x34" + good[2:])
    with pytest.raises(DatasetError, match=rf"{images}: not an IDX file \(bad magic"):
        load_idx_dataset(tmp_path)
    images.write_bytes(good[:-7])
    with pytest.raises(DatasetError, match=rf"{images}: size .* does not match its header"):
        load_idx_dataset(tmp_path)
    images.unlink()
    gz = write_idx(images, np.zeros((20, 6, 6)), gz=True)
    gz.write_bytes(gz.read_bytes()[:-12])
    with pytest.raises(DatasetError, match=rf"{gz}: cannot read .*truncated"):
        load_idx_dataset(tmp_path)
    gz.unlink()
    write_idx(images, np.zeros((3, 6, 6)))
    with pytest.raises(DatasetError, match="20 labels for 3 images"):
        load_idx_dataset(tmp_path)


def test_mnist_needs_data_dir_and_unknown_dataset():
    with pytest.raises(DatasetError, match="--data-dir"):
        load_dataset("mnist")
    with pytest.raises(DatasetError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")


def test_digits_split_is_seeded_and_stratified():
    a, b, c = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    assert torch.equal(a.x_test, b.x_test) and not torch.equal(a.y_test, c.y_test)
    assert a.x_train.shape[1:] == (1, 8, 8) and len(a.y_train) + len(a.y_test) == 1797
    counts = torch.bincount(a.y_test, minlength=10)
    assert counts.min() >= 43 and counts.max() <= 47


def test_synthetic_any_number_of_classes_and_seeded():
    for n in (2, 7, 100):
        ds = synthetic_classification(num_classes=n, n_train=1000, seed=3)
        assert ds.num_classes == n and set(ds.y_train.tolist()) == set(range(n))
    a, b = synthetic_classification(seed=1), synthetic_classification(seed=1)
    assert torch.equal(a.x_train, b.x_train)
    with pytest.raises(DatasetError):
        synthetic_classification(num_classes=1)


def test_subset_classes_and_label_noise():
    ds = synthetic_classification(num_classes=10, n_train=2000, seed=0)
    sub = subset_classes(ds, 3)
    assert sub.num_classes == 3 and sub.y_train.max() == 2 and sub.y_test.max() == 2
    with pytest.raises(DatasetError, match="between 2 and 10"):
        subset_classes(ds, 11)
    noisy = add_label_noise(ds, 0.2, seed=1)
    flipped = (noisy.y_train != ds.y_train)
    assert flipped.sum().item() == 400  # exactly 20%, each to a different class
    assert torch.equal(noisy.clean_y_train, ds.y_train) and torch.equal(noisy.y_test, ds.y_test)
    counts = torch.bincount(noisy.y_train[flipped], minlength=10).float()
    assert counts.min() > 20  # flipped labels spread over the classes
    for bad in (-0.1, 1.0):
        with pytest.raises(DatasetError, match=r"\[0, 1\)"):
            add_label_noise(ds, bad)


def test_load_dataset_options_in_order():
    ds = load_dataset("synthetic", n_classes=4, label_noise=0.1, train_subset=1000, seed=2)
    assert ds.num_classes == 4 and ds.info["train_subset"] == 1000
    assert ds.info["flipped"] == round(0.1 * len(ds.y_train))


def write_cifar(folder: Path, name: str, n: int = 6) -> None:
    import pickle

    rng = np.random.default_rng(1)
    key, files = ("labels", ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                             "test_batch"]) if name == "cifar10" else ("fine_labels", ["train", "test"])
    for stem in files:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 key.encode(): [i % 10 for i in range(n)]}  # every test label has training examples
        with open(folder / stem, "wb") as f:
            pickle.dump(batch, f, protocol=2)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loader_on_tiny_files(tmp_path, name):
    write_cifar(tmp_path, name)
    ds = load_dataset(name, data_dir=tmp_path)
    train_n = 30 if name == "cifar10" else 6
    assert ds.x_train.shape == (train_n, 3, 32, 32) and ds.x_test.shape == (6, 3, 32, 32)
    assert ds.num_classes == (10 if name == "cifar10" else 100)
    means = ds.x_train.mean(dim=(0, 2, 3))
    assert torch.allclose(means, torch.zeros(3), atol=1e-5)


def test_cifar_errors_and_code_carrying_pickle(tmp_path):
    import os
    import pickle

    with pytest.raises(DatasetError, match="--data-dir"):
        load_dataset("cifar10")
    with pytest.raises(FileNotFoundError, match="data_batch_1 not found"):
        load_dataset("cifar10", data_dir=tmp_path)
    write_cifar(tmp_path, "cifar10")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({b"data": Payload(), b"labels": [0]}, f)
    with pytest.raises(DatasetError, match=r"data_batch_3: not a readable CIFAR batch .*refusing to load"):
        load_dataset("cifar10", data_dir=tmp_path)
    assert not marker.exists()
    (tmp_path / "data_batch_3").write_bytes(b"\x80\x02}q")
    with pytest.raises(DatasetError, match="data_batch_3"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_a_missing_fashion_mnist_names_the_folder_variable(tmp_path, monkeypatch):
    """With $FALIGN_FASHION_MNIST_DIR set, installing the package would not help: the message says so."""
    from falign.data import DatasetMissing

    monkeypatch.setenv("FALIGN_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(DatasetMissing, match=rf"\$FALIGN_FASHION_MNIST_DIR names {tmp_path}: put the four IDX"):
        load_idx_dataset()
