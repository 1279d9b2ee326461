"""The statistics behind the verdicts, on ``scipy.stats``: intervals over seeds, fitted slopes with their
intervals, and a slope within strata (what remains of a relation once every stratum's own level is removed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A number with its interval: ``value [lo, hi]`` at ``level`` (``lo``/``hi`` NaN when it has none)."""

    value: float
    lo: float = math.nan
    hi: float = math.nan
    n: int = 0
    level: float = LEVEL

    @property
    def excludes_zero(self) -> bool:
        return math.isfinite(self.lo) and math.isfinite(self.hi) and (self.lo > 0 or self.hi < 0)

    def __str__(self) -> str:
        if not math.isfinite(self.value):
            return "—"
        if not (math.isfinite(self.lo) and math.isfinite(self.hi)):
            return f"{self.value:.3g}"
        return f"{self.value:.3g} [{self.lo:.3g}, {self.hi:.3g}]"

    def fmt(self, spec: str = ".3g", scale: float = 1.0, unit: str = "") -> str:
        v, lo, hi = (x * scale for x in (self.value, self.lo, self.hi))
        if not math.isfinite(v):
            return "—"
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return f"{v:{spec}}{unit}"
        return f"{v:{spec}}{unit} [{lo:{spec}}, {hi:{spec}}]"


def _stats():
    """``scipy.stats``, imported when a statistic is first computed (scipy is in the ``experiments`` extra)."""
    from scipy import stats

    return stats


def _finite(values: Sequence[float]) -> np.ndarray:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    return v[np.isfinite(v)]


def mean_ci(values: Sequence[float], level: float = LEVEL, bounds: tuple[float, float] | None = None) -> Estimate:
    """Mean over seeds with a Student-t interval (none for fewer than two values); ``bounds`` clips the interval
    to a quantity's range (a fraction's [0, 1])."""
    v = _finite(values)
    if len(v) == 0:
        return Estimate(math.nan)
    mean = float(v.mean())
    if len(v) < 2:
        return Estimate(mean, n=len(v), level=level)
    sem = float(_stats().sem(v))
    if sem == 0:
        return Estimate(mean, mean, mean, len(v), level)
    lo, hi = _stats().t.interval(level, len(v) - 1, loc=mean, scale=sem)
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return Estimate(mean, float(lo), float(hi), len(v), level)


def slope_ci(x: Sequence[float], y: Sequence[float], level: float = LEVEL) -> Estimate:
    """Least-squares slope of ``y`` on ``x`` (``scipy.stats.linregress``) with its t interval."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.ptp(x) == 0:
        return Estimate(math.nan, n=len(x))
    fit = _stats().linregress(x, y)
    half = float(_stats().t.ppf(0.5 + level / 2, len(x) - 2)) * float(fit.stderr)
    return Estimate(float(fit.slope), float(fit.slope) - half, float(fit.slope) + half, len(x), level)


def within_strata_slope(x: Sequence[float], y: Sequence[float], strata: Sequence, level: float = LEVEL) -> Estimate:
    """Slope of ``y`` on ``x`` once each stratum's mean is removed from both (a fixed-effects regression
    ``y ~ x + C(stratum)``), with a t interval on ``n − strata − 1`` degrees of freedom.

    Adding any per-stratum offset to ``x`` or ``y`` leaves it unchanged: a third variable that moves whole
    strata (the number of classes moving both accuracy and angle) cannot produce it.
    """
    x, y, s = np.asarray(x, float), np.asarray(y, float), np.asarray(strata)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y, s = x[keep], y[keep], s[keep]
    labels = list(dict.fromkeys(s.tolist()))
    xc, yc = x.copy(), y.copy()
    for label in labels:
        m = s == label
        xc[m] -= x[m].mean()
        yc[m] -= y[m].mean()
    dof = len(x) - len(labels) - 1
    sxx = float((xc**2).sum())
    if dof < 1 or sxx == 0:
        return Estimate(math.nan, n=len(x))
    slope = float((xc * yc).sum()) / sxx
    resid = yc - slope * xc
    se = math.sqrt(float((resid**2).sum()) / dof / sxx)
    half = float(_stats().t.ppf(0.5 + level / 2, dof)) * se
    return Estimate(slope, slope - half, slope + half, len(x), level)


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Spearman's rank correlation and its two-sided p-value (``scipy.stats.spearmanr``)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 3 or np.ptp(x[keep]) == 0 or np.ptp(y[keep]) == 0:
        return math.nan, math.nan
    result = _stats().spearmanr(x[keep], y[keep])
    return float(result.statistic), float(result.pvalue)


def loglog_slope(x: Sequence[float], y: Sequence[float], level: float = LEVEL) -> Estimate:
    """Slope of ``log y`` on ``log x`` with its interval (NaN if a value is not positive)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or np.any(x <= 0) or np.any(y <= 0) or not np.all(np.isfinite(y)):
        return Estimate(math.nan)
    if len(x) == 2:
        return Estimate(float(np.diff(np.log(y))[0] / np.diff(np.log(x))[0]), n=2)
    return slope_ci(np.log(x), np.log(y), level)
