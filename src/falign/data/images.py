"""Image folders (``root/train/<class>/*.png``) and Tiny-ImageNet, read with Pillow (the ``images`` extra).

Tiny-ImageNet's standard layout: ``tiny-imagenet-200/train/<wnid>/images/*.JPEG`` (500 per class) and
``val/images/*.JPEG`` labelled by ``val/val_annotations.txt`` (``file<TAB>wnid<TAB>box…``); its test split
has no labels and is not used. A generic image folder: ``train/<class>/<image>`` and ``val/<class>/<image>``
(or ``test/``). Classes are the sorted training class folders.

Listing a folder is cheap; images are decoded only for the examples asked for (:meth:`ImageFolder.load`),
so an n-class subset of Tiny-ImageNet never reads the rest of its 100,000 images. Every image becomes a
float tensor ``(C, H, W)`` in [0, 1], resized (bilinear) to ``size × size`` when ``size`` is given.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from falign.data.base import Dataset, DatasetError, check_splits

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm")


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise DatasetError("reading image folders needs Pillow: pip install 'falign[images]'") from None
    return Image


@contextmanager
def _named_errors(path: Path, image_module: Any) -> Iterator[None]:
    """Pillow's errors while reading ``path`` (truncated, not an image, a header claiming a decompression bomb)
    as one :class:`DatasetError` naming the file."""
    try:
        yield
    except (OSError, ValueError, SyntaxError, image_module.DecompressionBombError) as err:
        raise DatasetError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None


def read_image(path: Path, size: int | None = None) -> torch.Tensor:
    """One image as ``(3, H, W)`` floats in [0, 1] (RGB), a clear error naming a file Pillow cannot read."""
    image_module = _pillow()
    with _named_errors(path, image_module), image_module.open(path) as image:
        image = image.convert("RGB")
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), image_module.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def check_image(path: Path) -> None:
    """Open and decode ``path`` without keeping the pixels: an error naming the file if Pillow cannot read it
    whole (a truncated JPEG has a readable header, so reading headers alone would not find it)."""
    image_module = _pillow()
    with _named_errors(path, image_module), image_module.open(path) as image:
        image.load()


@dataclass
class ImageFolder:
    """The files and labels of a train and a test split; images are decoded by :meth:`load`."""

    name: str
    classes: list[str]
    train: list[tuple[Path, int]]
    test: list[tuple[Path, int]]

    def load(self, split: str, indices: Sequence[int], size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode ``indices`` of ``split`` (``"train"`` or ``"test"``): ``(images (N, 3, S, S), labels (N,))``."""
        items = self.train if split == "train" else self.test
        if not indices:
            side = size or 1
            return torch.empty(0, 3, side, side), torch.empty(0, dtype=torch.long)
        images = [read_image(items[i][0], size) for i in indices]
        shapes = {tuple(t.shape) for t in images}
        if len(shapes) > 1:
            raise DatasetError(f"{self.name}: images of different sizes {sorted(shapes)[:3]}; pass size= to resize")
        return torch.stack(images), torch.tensor([items[i][1] for i in indices], dtype=torch.long)

    def check(self) -> None:
        """Decode every training and test image once, keeping nothing: an unreadable file is an error naming it
        now, before any training, not halfway through a run (about 0.2–0.5 ms a 64×64 JPEG)."""
        for path, _ in self.train + self.test:
            check_image(path)

    def labels(self, split: str) -> torch.Tensor:
        items = self.train if split == "train" else self.test
        return torch.tensor([label for _, label in items], dtype=torch.long)

    def subset(self, classes: Sequence[int], per_class_train: int, per_class_test: int | None, seed: int,
               size: int | None = None) -> Dataset:
        """An in-memory :class:`Dataset` of the given classes (relabelled ``0 … n−1``): ``per_class_train``
        training images per class drawn at random (seeded), and the first ``per_class_test`` test images of
        each class (all of them when ``None``)."""
        g = torch.Generator().manual_seed(seed)
        train_labels, test_labels = self.labels("train"), self.labels("test")
        train_idx, test_idx, new_train, new_test = [], [], [], []
        for new, c in enumerate(classes):
            pool = torch.nonzero(train_labels == c).flatten()
            if len(pool) < per_class_train:
                raise DatasetError(f"{self.name}: class {self.classes[c]} has {len(pool)} training images, "
                                   f"{per_class_train} were asked for")
            pick = pool[torch.randperm(len(pool), generator=g)[:per_class_train]].sort().values.tolist()
            tests = torch.nonzero(test_labels == c).flatten().tolist()[:per_class_test]
            train_idx += pick
            test_idx += tests
            new_train += [new] * len(pick)
            new_test += [new] * len(tests)
        x_train, _ = self.load("train", train_idx, size)
        x_test, _ = self.load("test", test_idx, size)
        return Dataset(self.name, x_train, torch.tensor(new_train), x_test, torch.tensor(new_test), len(classes),
                       info={"classes": [self.classes[c] for c in classes]})


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def image_folder(root: str | Path, name: str = "images") -> ImageFolder:
    """``root/train/<class>/<image>`` and ``root/val/<class>/<image>`` (or ``root/test/...``)."""
    root = Path(root)
    train_root = root / "train"
    test_root = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if not train_root.is_dir() or test_root is None:
        raise DatasetError(f"{root}: an image folder needs train/<class>/ and val/<class>/ (or test/<class>/)")
    classes = sorted(p.name for p in train_root.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{train_root}: no class folders")
    index = {c: i for i, c in enumerate(classes)}
    train = [(path, index[c]) for c in classes for path in _images_in(train_root / c)]
    test = []
    for folder in sorted(p for p in test_root.iterdir() if p.is_dir()):
        if folder.name not in index:
            raise DatasetError(f"{folder}: class {folder.name} has no training folder {train_root / folder.name}")
        test += [(path, index[folder.name]) for path in _images_in(folder)]
    return _checked(ImageFolder(name, classes, train, test), train_root, test_root)


def _checked(folder: ImageFolder, train_root: Path, test_source: Path) -> ImageFolder:
    """``folder`` once every class folder has training images, there are at least two classes, and the test
    split has images: the class count comes from the folders, so an empty one is an error, not a dead class."""
    counts = np.bincount(folder.labels("train").numpy(), minlength=len(folder.classes))
    for name, count in zip(folder.classes, counts):
        if count == 0:
            raise DatasetError(f"{train_root / name}: no training images of class {name}")
    if len(folder.classes) < 2:
        raise DatasetError(f"{train_root}: one class folder ({folder.classes[0]}); a classification task needs "
                           f"at least 2")
    check_splits(folder.labels("train").numpy(), folder.labels("test").numpy(), train_root, test_source)
    return folder


def tiny_imagenet(root: str | Path) -> ImageFolder:
    """Tiny-ImageNet's standard ``train/`` and ``val/`` folders (see the module docstring)."""
    root = Path(root)
    train_root, val_root = root / "train", root / "val"
    annotations = val_root / "val_annotations.txt"
    if not train_root.is_dir() or not (val_root / "images").is_dir() or not annotations.is_file():
        raise DatasetError(f"{root}: Tiny-ImageNet needs train/<wnid>/images/, val/images/ and "
                           f"val/val_annotations.txt")
    classes = sorted(p.name for p in train_root.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{train_root}: no class folders")
    index = {c: i for i, c in enumerate(classes)}
    train = []
    for c in classes:
        folder = train_root / c / "images"
        if not folder.is_dir():
            raise DatasetError(f"{train_root / c}: no images/ folder")
        train += [(path, index[c]) for path in _images_in(folder)]
    test = []
    for number, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in index:
            raise DatasetError(f"{annotations}:{number}: expected 'file<TAB>wnid' with a training class, got "
                               f"{line[:60]!r}")
        path = val_root / "images" / parts[0]
        if not path.is_file():
            raise DatasetError(f"{annotations}:{number}: {path} does not exist")
        test.append((path, index[parts[1]]))
    return _checked(ImageFolder("tiny-imagenet", classes, train, test), train_root, annotations)
