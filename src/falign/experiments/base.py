"""Where and how big an experiment runs (:class:`Context`), and small helpers the experiments share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from falign.experiments.sources import Catalog

SIZES = ("tiny", "quick", "full")


@dataclass
class Context:
    """Where and how big an experiment runs.

    ``size``: ``tiny`` (the test suite), ``quick`` (the default: minutes on a laptop CPU) or ``full``.
    ``seeds``: how many seeds every repeated measurement uses (at least 3 for intervals). ``catalog``: the
    datasets found on this machine (:func:`falign.experiments.sources.catalog`). ``tick`` advances the bar.
    """

    out: Path
    size: str = "quick"
    seeds: int = 3
    device: str = "cpu"
    tick: Callable[[int], None] = lambda n=1: None
    catalog: Catalog = field(default_factory=Catalog)

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {self.size!r}")
        self.out = Path(self.out)

    def pick(self, tiny: Any, quick: Any, full: Any) -> Any:
        return {"tiny": tiny, "quick": quick, "full": full}[self.size]

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds))

    @property
    def figures(self) -> Path:
        path = self.out / "figures"
        path.mkdir(parents=True, exist_ok=True)
        return path


def float64_digits(n: int | None = None, seed: int = 0):
    """Digits as flat float64 ``(x, y)`` training tensors (first ``n`` examples), for flow experiments."""
    from falign.data import load_digits

    ds = load_digits(seed=seed)
    x, y = ds.x_train.flatten(1).to(torch.float64), ds.y_train
    return (x, y) if n is None else (x[:n], y[:n])
