"""`falign reproduce --data-dir`: the paper's datasets found where a user keeps them, image folders and
Tiny-ImageNet read with Pillow, malformed data an error before any training, and the many-class subsets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from falign.app.experiments import reproduce
from falign.app.experiments.sources import catalog
from falign.data import DatasetError, many_class_subset
from falign.data.images import image_folder, tiny_imagenet
from tests.core.test_data import write_tiny_mnist

Image = pytest.importorskip("PIL.Image", reason="the [images] extra (Pillow) is part of the test extra")


def _png(path: Path, color: tuple[int, int, int], size: int = 12) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path


def write_tiny_imagenet(root: Path, classes=("n01", "n02", "n03"), per_class: int = 4) -> Path:
    lines = []
    for i, wnid in enumerate(classes):
        for k in range(per_class):
            _png(root / "train" / wnid / "images" / f"{wnid}_{k}.JPEG", (40 * i, 10 * k, 0))
        for k in range(2):
            name = f"val_{i}_{k}.JPEG"
            _png(root / "val" / "images" / name, (40 * i, 0, 10 * k))
            lines.append(f"{name}\t{wnid}\t0\t0\t12\t12")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def test_image_folder_reads_classes_and_pixels(tmp_path):
    for split in ("train", "val"):
        _png(tmp_path / split / "cat" / "a.png", (255, 0, 0))
        _png(tmp_path / split / "dog" / "b.png", (0, 0, 255))
    folder = image_folder(tmp_path)
    assert folder.classes == ["cat", "dog"]
    x, y = folder.load("train", [0, 1], size=8)
    assert x.shape == (2, 3, 8, 8) and y.tolist() == [0, 1]
    assert torch.allclose(x[0, 0], torch.ones(8, 8)) and torch.allclose(x[1, 2], torch.ones(8, 8))
    with pytest.raises(DatasetError, match="train/<class>/"):
        image_folder(tmp_path / "train")


def test_tiny_imagenet_layout_subsets_and_errors(tmp_path):
    root = write_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    ds = tiny_imagenet(root)
    assert ds.classes == ["n01", "n02", "n03"] and len(ds.train) == 12 and len(ds.test) == 6
    sub = ds.subset([0, 2], 3, None, seed=0, size=8)
    assert sub.x_train.shape == (6, 3, 8, 8) and sorted(set(sub.y_train.tolist())) == [0, 1]
    assert sub.x_test.shape[0] == 4
    ann = root / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "missing.JPEG\tn01\t0\t0\t1\t1\n")
    with pytest.raises(DatasetError, match=r"val_annotations.txt:7: .*missing.JPEG does not exist"):
        tiny_imagenet(root)


def test_catalog_finds_the_papers_data_and_notes_what_is_missing(tmp_path):
    (tmp_path / "mnist").mkdir()
    write_tiny_mnist(tmp_path / "mnist", gz=True)
    cat = catalog(tmp_path)
    assert cat.mnist is not None and cat.mnist.num_classes == 10
    assert cat.cifar100 is None and cat.tiny is None
    assert any("cifar-100-python" in n for n in cat.notes) and any("tiny-imagenet-200" in n for n in cat.notes)
    write_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    assert catalog(tmp_path).tiny is not None
    with pytest.raises(DatasetError, match="is not a folder"):
        catalog(tmp_path / "nope")


def test_malformed_data_is_an_error_before_any_training(tmp_path):
    data = tmp_path / "data"
    root = write_tiny_imagenet(data / "tiny-imagenet-200")
    bad = root / "train" / "n02" / "images" / "n02_0.JPEG"
    bad.write_bytes(bad.read_bytes()[:20])  # truncated
    out = tmp_path / "report"
    with pytest.raises(DatasetError, match=r"n02_0\.JPEG: not a readable image"):
        reproduce(out, size="tiny", seeds=1, progress=False, data_dir=data, only=["min_norm"])
    assert not out.exists()  # nothing written, nothing trained
    mnist = data / "mnist"
    mnist.mkdir()
    write_tiny_mnist(mnist, gz=False)
    bad.unlink()
    target = next(mnist.glob("train-images*"))
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(DatasetError, match="train-images"):
        reproduce(out, size="tiny", seeds=1, progress=False, data_dir=data, only=["min_norm"])
    assert not out.exists()


def test_many_class_subset_fixed_examples_per_class():
    a = many_class_subset(20, per_class_train=7, per_class_test=3, seed=0)
    b = many_class_subset(20, per_class_train=7, per_class_test=3, seed=0)
    c = many_class_subset(20, per_class_train=7, per_class_test=3, seed=1)
    assert a.num_classes == 20 and len(a.y_train) == 140 and len(a.y_test) == 60
    assert np.bincount(a.y_train.numpy()).tolist() == [7] * 20
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.x_train, c.x_train)


def _write_cifar100(folder: Path, per_class: int = 2) -> None:
    import pickle

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    n = 100 * per_class
    for stem in ("train", "test"):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": [i % 100 for i in range(n)]}
        with open(folder / stem, "wb") as f:
            pickle.dump(batch, f, protocol=2)


def test_multiclass_runs_on_the_papers_data_from_data_dir(tmp_path):
    """CIFAR-100 and Tiny-ImageNet from --data-dir join the multiclass experiment, and the report says so."""
    data = tmp_path / "data"
    _write_cifar100(data / "cifar-100-python")
    write_tiny_imagenet(data / "tiny-imagenet-200", classes=tuple(f"n{i:02d}" for i in range(4)), per_class=10)
    results, paths = reproduce(tmp_path / "out", size="tiny", seeds=1, progress=False, data_dir=data,
                               only=["multiclass"])
    used = results[0].data
    assert "cifar100" in used and "tiny-imagenet" in used
    runs = next(t for t in results[0].tables if t.name == "multiclass_runs").rows
    tiny_n = {r["n"] for r in runs if r["dataset"] == "tiny-imagenet"}
    assert tiny_n and max(tiny_n) <= 4  # never more classes than the folder has
    md = paths["markdown"].read_text()
    assert "holds no MNIST IDX files" in md and "the paper used CIFAR-100 and Tiny-ImageNet" in md


def test_reproduce_falls_back_without_fashion_mnist_and_finds_it_in_the_default_folder(tmp_path, monkeypatch):
    """The default Fashion-MNIST folder is read through $FALIGN_FASHION_MNIST_DIR: empty, reproduce's catalog has
    no Fashion-MNIST (the experiments fall back to digits and say so); with the four files there, it is found."""
    empty, there = tmp_path / "empty", tmp_path / "there"
    empty.mkdir()
    there.mkdir()
    monkeypatch.setenv("FALIGN_FASHION_MNIST_DIR", str(empty))
    assert catalog(None).fashion is None
    write_tiny_mnist(there, gz=True)
    monkeypatch.setenv("FALIGN_FASHION_MNIST_DIR", str(there))
    found = catalog(None).fashion
    assert found is not None and found.name == "fashion-mnist" and found.info["source"] == str(there)
