"""The dominance and min_norm experiments: their primary tests on constructed inputs that must pass, fail or stay
inconclusive, and small real runs in which the control (the mechanism absent) flips the same test."""

from __future__ import annotations

import math

import numpy as np
import pytest

from falign.app.experiments import dominance, min_norm
from falign.app.experiments.base import Context
from falign.app.results import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED


# ---- dominance ------------------------------------------------------------------------------------------
def test_worst_margin_is_the_worst_record():
    assert dominance.worst_margin([0.5, -0.2, math.nan, 0.1]) == pytest.approx(0.8)
    assert math.isnan(dominance.worst_margin([math.nan]))


def test_dominance_test_three_values():
    t = dominance.dominance_test
    assert t([0.9, 1.0, 0.8], "x").status == SUPPORTED
    assert t([-0.3, -0.5, -0.4], "x").status == NOT_SUPPORTED  # a record where the hidden terms cancel it
    assert t([0.12, 0.13, 0.11], "x").status == NOT_SUPPORTED  # clears the line, by less than the smallest effect
    assert t([1.0, -0.5, 0.3], "x").status == INCONCLUSIVE  # too spread to tell, power stated
    assert "power" in t([1.0, -0.5, 0.3], "x").text
    assert t([0.9, 1.0, 0.8], "x", diverged=1).status == INCONCLUSIVE  # a run that diverged is not the test
    assert t([0.9, 1.0, 0.8], "x", role="control").role == "control"


def test_exponential_is_told_from_a_power_law_on_block_means():
    t = np.arange(500, 2000)
    exp = dominance.fit_decay(t, 2.0 * np.exp(-0.004 * t))
    power = dominance.fit_decay(t, 50.0 / t)
    assert exp["rate"] == pytest.approx(0.004) and exp["log_rss_ratio"] > 5
    assert power["log_rss_ratio"] < -5
    assert dominance.exponential_test([exp["log_rss_ratio"] + i for i in range(3)], [0.004] * 3).status == SUPPORTED
    assert dominance.exponential_test([power["log_rss_ratio"] + i for i in range(3)],
                                      [0.001] * 3).status == NOT_SUPPORTED
    assert dominance.exponential_test([3.0, 2.0, 4.0], [0.004, -0.001, 0.004]).status == INCONCLUSIVE  # no decay


def test_bound_check_is_secondary():
    assert dominance.bound_check([1.2, 1.05, 3.0]).status == SUPPORTED
    assert dominance.bound_check([1.2, 0.5, 3.0]).status == NOT_SUPPORTED
    assert dominance.bound_check([math.nan]).status == INCONCLUSIVE
    assert dominance.bound_check([1.2]).role == "secondary" and "consistency" in dominance.bound_check([1.2]).claim


def test_anti_aligned_feedback_flips_dominance_without_diverging(tmp_path):
    """Real tiny runs (N ≫ width, minibatch cross-entropy): fa passes the primary test, fa with its output feedback
    at 180° to W₀ fails it — while training to the same fit target with a finite loss."""
    ctx = Context(tmp_path, size="tiny")
    fa = [dominance.minibatch_run(ctx, "fa", s) for s in range(3)]
    anti = [dominance.minibatch_run(ctx, "fa", s, control=True) for s in range(3)]
    assert dominance.dominance_test([r["worst"] for r in fa], "fa").status == SUPPORTED
    assert dominance.dominance_test([r["worst"] for r in anti], "anti", role="control").status == NOT_SUPPORTED
    for r in anti:
        assert r["stopped"] == "fit" and r["max loss ÷ initial"] < dominance.DIVERGED and r["failing records"] > 0


def test_backprop_never_fails_dominance(tmp_path):
    """The measurement itself: under bp every hidden term is a squared norm, so ρ ≥ 0 at every record."""
    r = dominance.minibatch_run(Context(tmp_path, size="tiny"), "bp", 0)
    assert r["worst"] >= 1.0 - 1e-6 and r["failing records"] == 0


# ---- min_norm ---------------------------------------------------------------------------------------------
def test_slope_test_three_values():
    t = min_norm.slope_test
    assert t([1.0, 0.99, 1.01], 0, "x").status == SUPPORTED
    assert t([0.02, -0.01, 0.03], 0, "x").status == NOT_SUPPORTED  # the distance does not fall with ε
    assert t([1.0, -0.5, 0.2], 0, "x").status == INCONCLUSIVE
    assert t([1.0, 0.99, 1.01], 1, "x").status == INCONCLUSIVE  # a run hit the cap
    assert t([1.0, math.nan], 0, "x").status == INCONCLUSIVE


def test_unit_slope_test():
    assert min_norm.unit_slope_test([1.0, 0.99, 1.01]).status == SUPPORTED
    assert min_norm.unit_slope_test([0.5, 0.52, 0.49]).status == NOT_SUPPORTED
    assert min_norm.unit_slope_test([1.0, 0.6, 1.3]).status == INCONCLUSIVE


def test_weight_decay_removes_the_min_norm_property():
    """A real small problem: fa's distance falls in proportion to ε; with weight decay it does not move."""
    x, y = min_norm.problem(8, 4, 2, seed=0)
    eps = [0.1, 0.01]

    def slope(wd: float) -> float:
        runs = [min_norm.train("fa", x, y, e, 0, 5000, wd) for e in eps]
        assert all(r["stopped"] == "converged" for r in runs)
        return math.log(runs[0]["relative distance"] / runs[1]["relative distance"]) / math.log(eps[0] / eps[1])

    assert slope(0.0) == pytest.approx(1.0, abs=0.05)
    assert abs(slope(min_norm.WEIGHT_DECAY)) < 0.05

