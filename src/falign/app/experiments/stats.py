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
    """A number with its interval: ``value [lo, hi]`` at ``level`` (``lo``/``hi`` NaN when it has none).

    ``se`` and ``dof`` are the standard error and degrees of freedom behind the interval (for the power of a
    test, :func:`power`). ``identical``: the ``n`` values were all equal, so there is no interval to give; it is
    written ``all 3 seeds: 100%``, never as a zero-width interval. ``over`` names what ``n`` counts.
    """

    value: float
    lo: float = math.nan
    hi: float = math.nan
    n: int = 0
    level: float = LEVEL
    se: float = math.nan
    dof: float = math.nan
    identical: bool = False
    over: str = "seeds"

    @property
    def excludes_zero(self) -> bool:
        return math.isfinite(self.lo) and math.isfinite(self.hi) and (self.lo > 0 or self.hi < 0) \
            and not self.identical

    def __str__(self) -> str:
        return self.fmt()

    def fmt(self, spec: str = ".3g", scale: float = 1.0, unit: str = "") -> str:
        v, lo, hi = (x * scale for x in (self.value, self.lo, self.hi))
        if not math.isfinite(v):
            return "—"
        if self.identical:
            return f"all {self.n} {self.over}: {v:{spec}}{unit}"
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


def mean_ci(values: Sequence[float], level: float = LEVEL, bounds: tuple[float, float] | None = None,
            over: str = "seeds") -> Estimate:
    """Mean over seeds with a Student-t interval (none for fewer than two values; ``identical`` when all values
    are equal); ``bounds`` clips the interval to a quantity's range (a fraction's [0, 1])."""
    v = _finite(values)
    if len(v) == 0:
        return Estimate(math.nan, over=over)
    mean = float(v.mean())
    if len(v) < 2:
        return Estimate(mean, n=len(v), level=level, over=over)
    sem = float(_stats().sem(v))
    if sem == 0 or np.ptp(v) == 0:
        return Estimate(mean, mean, mean, len(v), level, 0.0, len(v) - 1, True, over)
    lo, hi = _stats().t.interval(level, len(v) - 1, loc=mean, scale=sem)
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return Estimate(mean, float(lo), float(hi), len(v), level, sem, len(v) - 1, over=over)


def slope_ci(x: Sequence[float], y: Sequence[float], level: float = LEVEL) -> Estimate:
    """Least-squares slope of ``y`` on ``x`` (``scipy.stats.linregress``) with its t interval."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.ptp(x) == 0:
        return Estimate(math.nan, n=len(x))
    fit = _stats().linregress(x, y)
    half = float(_stats().t.ppf(0.5 + level / 2, len(x) - 2)) * float(fit.stderr)
    return Estimate(float(fit.slope), float(fit.slope) - half, float(fit.slope) + half, len(x), level,
                    float(fit.stderr), len(x) - 2, over="points")


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
    return Estimate(slope, slope - half, slope + half, len(x), level, se, dof, over="points")


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


def power(est: Estimate, effect: float, level: float = LEVEL) -> float:
    """The chance that this design's interval excludes 0 in the effect's direction when the true effect is
    ``effect`` (a noncentral t with the estimate's standard error and degrees of freedom; normal when ``dof`` is
    infinite). NaN when the estimate has no standard error."""
    if not (math.isfinite(est.se) and est.se > 0) or not (est.dof > 0):
        return math.nan
    crit = float(_stats().t.ppf(0.5 + level / 2, est.dof)) if math.isfinite(est.dof) else \
        float(_stats().norm.ppf(0.5 + level / 2))
    ncp = abs(effect) / est.se
    if not math.isfinite(est.dof):
        return float(_stats().norm.sf(crit - ncp))
    return float(_stats().nct.sf(crit, est.dof, ncp))


def judge(est: Estimate, claim: str, what: str, min_effect: float, direction: int = 1, role: str = "primary",
          spec: str = ".3g", scale: float = 1.0, unit: str = "", control: bool = False):
    """A verdict on a predicted effect from its estimate (DESIGN §5).

    With ``d = direction`` (+1: the claim predicts a positive effect, −1 a negative one) and the interval
    ``[lo, hi]`` of ``d·effect``: *supported* when ``lo > 0``; *not supported* when ``hi < min_effect`` (the
    interval excludes the smallest effect of interest, or shows the opposite sign); *inconclusive* otherwise,
    with the power the design had to detect ``min_effect`` (:func:`power`). Values that were all equal have no
    interval: supported when they lie beyond 0 in the predicted direction, not supported when they fall
    short of ``min_effect``. ``role``: ``primary``, ``secondary`` or ``control``.
    """
    from falign.app.results import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, Verdict

    role = "control" if control else role
    sign = "> 0" if direction > 0 else "< 0"
    smallest = f"{direction * min_effect * scale:{spec}}{unit}"
    shown = est.fmt(spec, scale, unit)
    base = f"{what} = {shown}"
    if not math.isfinite(est.value):
        return Verdict(INCONCLUSIVE, f"{what} could not be estimated", claim, role=role)
    v, lo, hi = (direction * x for x in (est.value, est.lo, est.hi))
    lo, hi = min(lo, hi), max(lo, hi)
    if est.identical:
        if v > 0:
            return Verdict(SUPPORTED, f"{base} (no spread; predicted {sign})", claim, role=role)
        status = NOT_SUPPORTED if v < min_effect else INCONCLUSIVE
        return Verdict(status, f"{base} (no spread; predicted {sign}, smallest effect of interest {smallest})",
                       claim, role=role)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return Verdict(INCONCLUSIVE, f"{base}: too few values for an interval", claim, role=role)
    pw = power(est, min_effect)
    pw_text = f"power to detect {smallest}: {pw:.0%}" if math.isfinite(pw) else "power unknown"
    detail = f"{int(est.level * 100)}% CI over {est.n} {est.over}; predicted {sign}; smallest effect of interest " \
             f"{smallest}; {pw_text}"
    if lo > 0:
        small = "; the whole interval lies below the smallest effect of interest" if hi < min_effect else ""
        return Verdict(SUPPORTED, f"{base} ({detail}{small})", claim, role=role)
    if hi < min_effect:
        why = "the opposite sign" if hi < 0 else "the interval excludes the smallest effect of interest"
        return Verdict(NOT_SUPPORTED, f"{base} ({detail}): {why}", claim, role=role)
    return Verdict(INCONCLUSIVE, f"{base} ({detail}): the interval contains both 0 and {smallest}", claim,
                   role=role)
