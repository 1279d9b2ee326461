"""Which data each experiment of ``falign reproduce`` runs on, found and checked before any training.

The paper (Robertson & Koyejo 2024) used MNIST (benign overfitting: a random 4,000-example subset with 20%
label noise), CIFAR-100 and Tiny-ImageNet (multi-class: random n-class subsets). None of them ships with
this machine. ``falign reproduce --data-dir DIR`` uses them when DIR holds them:

- MNIST: the four IDX files (``train-images-idx3-ubyte[.gz]`` …) in ``DIR``, ``DIR/mnist`` or ``DIR/MNIST/raw``;
- CIFAR-100: ``DIR/cifar-100-python`` (the "python version" archive, extracted);
- Tiny-ImageNet: ``DIR/tiny-imagenet-200`` (its standard ``train/`` and ``val/`` folders);
- Fashion-MNIST: ``DIR/fashion-mnist``, or ``/usr/share/datasets/fashion-mnist`` (``apt-get install -y
  dataset-fashion-mnist``).

Whatever is missing falls back to data on the machine (digits, a synthetic task), with a line in the report.
A dataset that is there but malformed or truncated is an error naming the file, raised by :func:`catalog`
before any experiment starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from falign.data import Dataset, DatasetError, load_cifar, load_idx_dataset
from falign.data.idx import FILES, fashion_mnist_dir
from falign.data.images import ImageFolder, tiny_imagenet

PAPER_DATA = {
    "conservation": "the paper's image tasks (MNIST, CIFAR-100, Tiny-ImageNet); the law is checked on its ideal "
                    "flow and under practical training",
    "implicit_alignment": "the paper's theory (Thm 5.2), no dataset of its own",
    "dominance": "the paper's theory (alignment dominance), no dataset of its own",
    "multiclass": "CIFAR-100 and Tiny-ImageNet, random n-class subsets",
    "benign_overfitting": "MNIST, a random 4,000-example subset with 20% symmetric label noise",
    "min_norm": "the paper's theory (two-layer linear networks), no dataset of its own",
}


@dataclass
class Catalog:
    """The datasets found for this run (``None``: not there) and one note per fallback."""

    data_dir: Path | None = None
    mnist: Dataset | None = None
    fashion: Dataset | None = None
    cifar100: Dataset | None = None
    tiny: ImageFolder | None = None
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        found = [name for name, value in (("MNIST", self.mnist), ("Fashion-MNIST", self.fashion),
                                           ("CIFAR-100", self.cifar100), ("Tiny-ImageNet", self.tiny)) if value]
        return ", ".join(found) if found else "none (digits and synthetic tasks only)"


def _idx_folder(candidates: list[Path]) -> Path | None:
    for folder in candidates:
        if all((folder / f).is_file() or (folder / f"{f}.gz").is_file() for f in FILES.values()):
            return folder
    return None


def catalog(data_dir: str | Path | None) -> Catalog:
    """Find and load (or index) every dataset the experiments can use; errors name a malformed file."""
    cat = Catalog(Path(data_dir) if data_dir is not None else None)
    root = cat.data_dir
    if root is not None and not root.is_dir():
        raise DatasetError(f"--data-dir {root} is not a folder")
    if root is not None:
        mnist = _idx_folder([root, root / "mnist", root / "MNIST" / "raw"])
        if mnist is not None:
            cat.mnist = load_idx_dataset(mnist, "mnist")
        else:
            cat.notes.append(f"--data-dir {root} holds no MNIST IDX files: benign_overfitting runs on the "
                             f"largest dataset on this machine instead")
        cifar = root / "cifar-100-python"
        if cifar.is_dir():
            cat.cifar100 = load_cifar(cifar, "cifar100")
        else:
            cat.notes.append(f"--data-dir {root} holds no cifar-100-python/: multiclass runs without CIFAR-100")
        tiny = root / "tiny-imagenet-200"
        if tiny.is_dir():
            cat.tiny = tiny_imagenet(tiny)
            cat.tiny.check()
        else:
            cat.notes.append(f"--data-dir {root} holds no tiny-imagenet-200/: multiclass runs without Tiny-ImageNet")
    fashion = _idx_folder(([root / "fashion-mnist"] if root is not None else []) + [fashion_mnist_dir()])
    if fashion is not None:
        cat.fashion = load_idx_dataset(fashion, "fashion-mnist")
    return cat
