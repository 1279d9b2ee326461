"""Bad data is an error naming the file and the value before any training.

Each loader (CIFAR pickles, IDX files, image folders, Tiny-ImageNet) refuses labels outside the format's
range, floats where the format holds integers, empty splits, fewer than two training classes, test labels
with no training examples, values of the wrong type, headers that overflow or claim a decompression bomb,
and a broken image anywhere in a folder, each as one :class:`DatasetError` line.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from falign.app.experiments.sources import catalog
from falign.data import DatasetError, load_dataset, load_idx_dataset, read_idx
from falign.data.idx import FILES
from tests.core.test_data import write_idx, write_tiny_mnist

CIFAR10 = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]


def write_cifar_batches(folder: Path, name: str = "cifar10", n: int = 420, **override: dict) -> Path:
    """Valid CIFAR pickles of ``n`` examples each (labels ``i mod classes``); ``override`` replaces the dict of
    one file by stem, e.g. ``data_batch_3={b"labels": [...]}``."""
    folder.mkdir(parents=True, exist_ok=True)
    key, files, classes = (b"labels", CIFAR10, 10) if name == "cifar10" else (b"fine_labels", ["train", "test"], 100)
    rng = np.random.default_rng(0)
    for stem in files:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: [i % classes for i in range(n)]}
        batch.update(override.get(stem, {}))
        with open(folder / stem, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return folder


def labels_with(n: int, index: int, value: object, classes: int = 10) -> list:
    labels: list = [i % classes for i in range(n)]
    labels[index] = value
    return labels


# --- item 7: CIFAR ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [10, -1, -100])
def test_cifar10_label_outside_range_names_file_index_and_value(tmp_path, bad):
    folder = write_cifar_batches(tmp_path / "cifar-10-batches-py", data_batch_3={b"labels": labels_with(420, 417, bad)})
    with pytest.raises(DatasetError, match=rf"cifar-10-batches-py/data_batch_3: label {bad} at index 417 is "
                                           r"outside 0\.\.9$"):
        load_dataset("cifar10", data_dir=folder)


def test_cifar100_fine_labels_are_0_to_99(tmp_path):
    folder = write_cifar_batches(tmp_path, "cifar100", n=200, test={b"fine_labels": labels_with(200, 5, 100, 100)})
    with pytest.raises(DatasetError, match=r"/test: label 100 at index 5 is outside 0\.\.99"):
        load_dataset("cifar100", data_dir=folder)
    write_cifar_batches(tmp_path, "cifar100", n=200)
    assert load_dataset("cifar100", data_dir=tmp_path).num_classes == 100


def test_cifar_float_pixels_and_float_labels_are_refused_not_cast(tmp_path):
    pixels = np.random.default_rng(0).random((420, 3072))  # floats in [0, 1): all 0 once cast to uint8
    write_cifar_batches(tmp_path, data_batch_2={b"data": pixels})
    with pytest.raises(DatasetError, match=r"data_batch_2: pixels of type float64 \(pixel 0\.63\d* at index "
                                           r"\(0, 0\)\), expected integers 0\.\.255$"):
        load_dataset("cifar10", data_dir=tmp_path)
    write_cifar_batches(tmp_path, data_batch_2={b"labels": [float(i % 10) + 0.7 for i in range(420)]})
    with pytest.raises(DatasetError, match=r"data_batch_2: labels of type float64 \(label 0\.7 at index 0\), "
                                           r"expected integers 0\.\.9$"):
        load_dataset("cifar10", data_dir=tmp_path)
    wide = np.random.default_rng(0).integers(0, 256, (420, 3072))
    wide[7, 100] = 300  # int64 pixels are fine while they fit a byte
    write_cifar_batches(tmp_path, data_batch_2={b"data": wide})
    with pytest.raises(DatasetError, match=r"data_batch_2: pixel 300 at index \(7, 100\) is outside 0\.\.255"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_cifar_test_label_without_training_examples(tmp_path):
    train = {b"labels": [i % 9 for i in range(420)]}  # class 9 never in training
    write_cifar_batches(tmp_path, **{stem: train for stem in CIFAR10[:5]})
    with pytest.raises(DatasetError, match=r"test_batch: label 9 at index 9 has no training examples"):
        load_dataset("cifar10", data_dir=tmp_path)
    write_cifar_batches(tmp_path, **{stem: {b"labels": [3] * 420} for stem in CIFAR10[:5]})
    with pytest.raises(DatasetError, match=r"data_batch_1…data_batch_5: every training label is 3; .*at least 2"):
        load_dataset("cifar10", data_dir=tmp_path)


# --- item 7: IDX -------------------------------------------------------------------------------------------------

def test_idx_stray_label_is_an_error_not_a_201_class_task(tmp_path):
    write_tiny_mnist(tmp_path, gz=False)
    labels = np.arange(20) % 10
    labels[3] = 200
    path = write_idx(tmp_path / FILES["train_labels"], labels)
    with pytest.raises(DatasetError, match=rf"{path}: label 200 at index 3 is outside 0\.\.9$"):
        load_idx_dataset(tmp_path, "mnist")


def test_idx_single_class_and_unseen_test_label(tmp_path):
    write_tiny_mnist(tmp_path, gz=True)
    path = write_idx(tmp_path / FILES["train_labels"], np.zeros(20), gz=True)
    with pytest.raises(DatasetError, match=rf"{path}: every training label is 0; .*at least 2 classes"):
        load_idx_dataset(tmp_path, "fashion-mnist")
    write_idx(tmp_path / FILES["train_labels"], np.arange(20) % 5, gz=True)  # classes 0..4 only
    test = tmp_path / (FILES["test_labels"] + ".gz")
    with pytest.raises(DatasetError, match=rf"{test}: label 5 at index 5 has no training examples"):
        load_idx_dataset(tmp_path, "mnist")


# --- item 9: tracebacks that become errors ---------------------------------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    (b"data", "not pixels", r"'data' is a str of <U10, expected integers"),
    (b"data", {"a": 1}, r"'data' is a dict of object, expected integers"),
    (b"data", [[1, 2], [3]], r"'data' is not an array \(ValueError"),
    (b"data", None, r"'data' is a NoneType of object"),
    (b"labels", "0123", r"'labels' is a str of <U4"),
    (b"labels", 7, r"expected data of shape \(N, 3072\) and N labels, got \(420, 3072\) and \(\)"),
    (b"labels", [[0, 1]] * 420, r"expected data of shape \(N, 3072\) and N labels, got \(420, 3072\) and \(420, 2\)"),
])
def test_cifar_wrong_types_are_errors_naming_the_file(tmp_path, field, value, message):
    write_cifar_batches(tmp_path, data_batch_4={field: value})
    with pytest.raises(DatasetError, match=r"data_batch_4: " + message):
        load_dataset("cifar10", data_dir=tmp_path)


def test_idx_header_whose_dims_overflow(tmp_path):
    """2^31 × 2^31 × 2^31 wraps to 0 in int64: a header-only file once passed the size check and crashed in
    ``reshape``."""
    path = tmp_path / "huge-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 3]) + (2**31).to_bytes(4, "big") * 3)
    with pytest.raises(DatasetError, match=rf"{path}: size 16 bytes does not match its header "
                                           rf"\[2147483648, 2147483648, 2147483648\] \({2**93 + 16} bytes"):
        read_idx(path)


def test_empty_train_split_idx_and_cifar(tmp_path):
    idx = tmp_path / "idx"
    idx.mkdir()
    write_tiny_mnist(idx, gz=False)
    write_idx(idx / FILES["train_images"], np.zeros((0, 6, 6)))
    labels = write_idx(idx / FILES["train_labels"], np.zeros(0))
    with pytest.raises(DatasetError, match=rf"{labels}: no training examples"):
        load_idx_dataset(idx, "mnist")
    empty = {b"data": np.zeros((0, 3072), np.uint8), b"labels": []}
    cifar = write_cifar_batches(tmp_path / "cifar", **{stem: empty for stem in CIFAR10[:5]})
    with pytest.raises(DatasetError, match=r"data_batch_1…data_batch_5: no training examples"):
        load_dataset("cifar10", data_dir=cifar)


# --- items 7 and 9: image folders and Tiny-ImageNet --------------------------------------------------------------

@pytest.fixture
def pil() -> None:
    pytest.importorskip("PIL.Image", reason="the [images] extra (Pillow) is part of the test extra")


def _jpeg(path: Path, seed: int) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG")
    return path


def write_tiny(root: Path, classes=("n01", "n02", "n03"), per_class: int = 3) -> Path:
    lines = []
    for i, wnid in enumerate(classes):
        for k in range(per_class):
            _jpeg(root / "train" / wnid / "images" / f"{wnid}_{k}.JPEG", 10 * i + k)
        name = f"val_{i}.JPEG"
        _jpeg(root / "val" / "images" / name, 100 + i)
        lines.append(f"{name}\t{wnid}\t0\t0\t16\t16")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def _png_header_only(path: Path, width: int, height: int) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_decompression_bomb_header_is_an_error_naming_the_file(tmp_path, pil):
    root = write_tiny(tmp_path / "data" / "tiny-imagenet-200")
    bomb = root / "train" / "n01" / "images" / "n01_0.JPEG"
    _png_header_only(bomb, 30000, 30000)
    with pytest.raises(DatasetError, match=rf"{bomb}: not a readable image \(DecompressionBombError"):
        catalog(tmp_path / "data")


def test_check_reads_every_image_not_one_per_class(tmp_path, pil):
    """A truncated JPEG keeps a readable header: only decoding it finds the damage, before any training."""
    from PIL import Image

    root = write_tiny(tmp_path / "data" / "tiny-imagenet-200")
    for broken in (root / "train" / "n02" / "images" / "n02_2.JPEG", root / "val" / "images" / "val_2.JPEG"):
        good = broken.read_bytes()
        broken.write_bytes(good[: good.index(b"\xff\xda") + 40])  # cut 40 bytes into the image data
        with Image.open(broken) as image:
            assert image.size == (16, 16)  # the header still reads
        with pytest.raises(DatasetError, match=rf"{broken}: not a readable image \(OSError: image file is truncated"):
            catalog(tmp_path / "data")
        broken.write_bytes(good)
    assert catalog(tmp_path / "data").tiny is not None


def test_image_folders_need_two_classes_each_with_training_images(tmp_path, pil):
    from falign.data.images import image_folder, tiny_imagenet

    one = write_tiny(tmp_path / "one", classes=("n01",))
    with pytest.raises(DatasetError, match=r"one/train: one class folder \(n01\); .*at least 2"):
        tiny_imagenet(one)
    empty = write_tiny(tmp_path / "empty")
    for path in (empty / "train" / "n02" / "images").iterdir():
        path.unlink()
    with pytest.raises(DatasetError, match=r"empty/train/n02: no training images of class n02"):
        tiny_imagenet(empty)
    folder = tmp_path / "folder"
    for split, cls in (("train", "cat"), ("train", "dog"), ("val", "cat"), ("val", "cow")):
        _jpeg(folder / split / cls / "a.jpg", 0)
    with pytest.raises(DatasetError, match=r"folder/val/cow: class cow has no training folder"):
        image_folder(folder)
    (folder / "val" / "cow" / "a.jpg").unlink()
    (folder / "val" / "cow").rmdir()
    (folder / "val" / "cat" / "a.jpg").unlink()
    with pytest.raises(DatasetError, match=r"folder/val: no test examples"):
        image_folder(folder)


# --- the command line: one line, no traceback ----------------------------------------------------------------------

def test_cli_prints_one_error_line_for_bad_labels(tmp_path):
    folder = write_cifar_batches(tmp_path / "cifar-10-batches-py", n=30,
                                 data_batch_3={b"labels": labels_with(30, 17, -100)})
    import falign

    env = {**os.environ, "PYTHONPATH": str(Path(falign.__file__).resolve().parents[1])}  # the falign under test
    proc = subprocess.run([sys.executable, "-m", "falign", "train", "--data", "cifar10", "--data-dir", str(folder),
                           "--epochs", "1", "--out", str(tmp_path / "run")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"falign train: error: {folder}/data_batch_3: label -100 at index 17 is outside 0..9"]

