"""What every experiment returns, the sizes it runs at, and the statistics behind verdicts."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

SIZES = ("tiny", "quick", "full")


@dataclass
class Context:
    """Where and how big an experiment runs.

    ``size``: ``tiny`` (the test suite), ``quick`` (the default, minutes on a laptop CPU) or ``full``.
    ``seeds``: number of seeds where an experiment repeats runs. ``tick`` advances the progress bar.
    """

    out: Path
    size: str = "quick"
    seeds: int = 3
    device: str = "cpu"
    tick: Callable[[int], None] = lambda n=1: None

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {self.size!r}")
        self.out = Path(self.out)

    def pick(self, tiny: Any, quick: Any, full: Any) -> Any:
        return {"tiny": tiny, "quick": quick, "full": full}[self.size]

    @property
    def figures(self) -> Path:
        path = self.out / "figures"
        path.mkdir(parents=True, exist_ok=True)
        return path


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x`` (``nan`` if any value is not positive)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or np.any(x <= 0) or np.any(y <= 0) or not np.all(np.isfinite(y)):
        return math.nan
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def linear_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """``(slope, intercept, R²)`` of a least-squares line."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or np.ptp(x) == 0:
        return math.nan, math.nan, math.nan
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    total = np.sum((y - y.mean()) ** 2)
    r2 = 1.0 - float(np.sum(resid**2) / total) if total > 0 else 1.0
    return float(slope), float(intercept), r2


def _ranks(a: np.ndarray) -> np.ndarray:
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a), float)
    ranks[order] = np.arange(len(a), dtype=float)
    for value in np.unique(a):  # average ranks for ties
        tie = a == value
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(x: Sequence[float], y: Sequence[float], permutations: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Spearman's rank correlation and a two-sided permutation p-value."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    rx, ry = _ranks(x), _ranks(y)
    rho = float(np.corrcoef(rx, ry)[0, 1])
    rng = np.random.default_rng(seed)
    null = np.array([np.corrcoef(rx, rng.permutation(ry))[0, 1] for _ in range(permutations)])
    p = float((np.sum(np.abs(null) >= abs(rho) - 1e-12) + 1) / (permutations + 1))
    return rho, p


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], float)
    if len(v) == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def float64_digits(n: int | None = None, seed: int = 0):
    """Digits as flat float64 ``(x, y)`` training tensors (first ``n`` examples), for flow experiments."""
    from falign.data import load_digits

    ds = load_digits(seed=seed)
    x, y = ds.x_train.flatten(1).to(torch.float64), ds.y_train
    return (x, y) if n is None else (x[:n], y[:n])
