"""benign_overfitting: the crossed seeds × test-examples interval, the non-inferiority test of the noise cost and
its control, the regimes and the Gaussian grid's test, each shown flipping on a constructed counter-example."""

from __future__ import annotations

import math

import numpy as np
import pytest

from falign.app.experiments import benign_overfitting as bo
from falign.app.experiments.base import Context
from falign.app.experiments.stats import Estimate
from falign.app.results import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED
from falign.data import load_digits, subsample_train


def _crossed(rng, seeds, examples, sd_seed, sd_example, sd_noise, mean=0.0):
    """``mean + a_s + b_i + e_si``: seeds and test examples as crossed random effects."""
    return (mean + sd_seed * rng.standard_normal((seeds, 1)) + sd_example * rng.standard_normal((1, examples))
            + sd_noise * rng.standard_normal((seeds, examples)))


@pytest.mark.parametrize("sd_seed, sd_example", [(0.0, 0.3), (0.05, 0.0), (0.02, 0.2), (0.0, 0.0)])
def test_paired_estimate_covers_with_both_sources_of_variation(sd_seed, sd_example):
    """Over repeated draws its standard error matches the spread of the mean and its interval covers the truth,
    whether the test set (a t interval over seeds alone misses it), the seeds (a bootstrap over test examples
    alone misses them), both, or neither (adding the two terms would count the example-by-seed noise twice)."""
    rng = np.random.default_rng(1)
    draws = [_crossed(rng, 4, 300, sd_seed, sd_example, 0.5) for _ in range(150)]
    est = [bo.paired_estimate(d, resamples=400) for d in draws]
    spread = np.std([e.value for e in est])
    assert 0.8 < np.mean([e.se for e in est]) / spread < 1.3
    assert np.mean([e.lo <= 0 <= e.hi for e in est]) >= 0.88
    seeds_only = [np.std(d.mean(1), ddof=1) / 2 for d in draws]  # the t interval over 4 seeds' means
    examples_only = [np.std(d.mean(0), ddof=1) / math.sqrt(300) for d in draws]  # the bootstrap's alone
    true_var = sd_seed**2 / 4 + sd_example**2 / 300 + 0.25 / 1200
    if sd_example and not sd_seed:
        assert np.mean(seeds_only) < 0.8 * math.sqrt(true_var)  # a seeds-only interval would be too narrow
    if sd_seed and not sd_example:
        assert np.mean(examples_only) < 0.8 * math.sqrt(true_var)  # so would a test-set-only one


def test_paired_estimate_edge_cases():
    one_seed = bo.paired_estimate(np.ones((1, 50)))
    assert one_seed.value == 1 and not math.isfinite(one_seed.lo)  # no interval from one seed
    same = bo.paired_estimate(np.zeros((3, 50)))
    assert same.identical and same.fmt(".1f", 100) == "all 3 seeds × 50 test examples: 0.0"


def _wrong(rng, seeds, examples, rate):
    return (rng.random((seeds, examples)) < rate).astype(float)


def _runs(rule, noise, wrong, fit=1.0):
    return [{"rule": rule, "noise": noise, "wrong": w, "interpolated": fit >= bo.INTERPOLATED, "train fit": fit}
            for w in wrong]


def _cost_test(extra_fa, extra_bp=0.10, examples=10_000, seeds=3, fa_fit=1.0, seed=0):
    """Constructed runs: the clean runs miss 10% of the test set; the noisy runs miss, in addition, an
    ``extra`` fraction of the examples the clean run got right (the rule's noise cost ≈ 0.9·extra)."""
    rng = np.random.default_rng(seed)
    clean_fa, clean_bp = _wrong(rng, seeds, examples, 0.1), _wrong(rng, seeds, examples, 0.1)
    noisy_fa = np.maximum(clean_fa, _wrong(rng, seeds, examples, extra_fa))
    noisy_bp = np.maximum(clean_bp, _wrong(rng, seeds, examples, extra_bp))
    return bo.noise_cost_test((_runs("fa", 0.2, noisy_fa, fa_fit), _runs("fa", 0.0, clean_fa)),
                              (_runs("bp", 0.2, noisy_bp), _runs("bp", 0.0, clean_bp)), "claim")


def test_noise_cost_test_flips():
    diff, v = _cost_test(extra_fa=0.10)  # the same noise cost
    assert abs(diff.value) < 0.01 and diff.hi < bo.MARGIN and v.status == SUPPORTED and v.primary
    diff, v = _cost_test(extra_fa=0.16)  # FA pays ≈ 5.4 points more
    assert diff.lo > 0 and v.status == NOT_SUPPORTED and "Δ_FA − Δ_BP = 5." in v.text
    _, v = _cost_test(extra_fa=0.10, examples=300)  # too few test examples to resolve 2 points
    assert v.status == INCONCLUSIVE and "power to detect 2.0 pts" in v.text
    _, v = _cost_test(extra_fa=0.10, fa_fit=0.93)  # FA stopped short of interpolating: not compared
    assert v.status == INCONCLUSIVE and "fa at 20% noise (3 of 3 seeds; fit 93.0%, 93.0%, 93.0%)" in v.text


def test_control_fails_the_primary_test_on_real_runs():
    """The control as run: backprop fitting 40% noise in FA's place against backprop at 20% (digits, 400
    training examples): every run interpolates, and the test says not supported; a cap too small to interpolate
    makes the same test inconclusive and names the run."""
    data = subsample_train(load_digits(seed=0), 400, 0)
    ctx = Context("/tmp/unused", "tiny", 3)
    cfg = {"width": 128, "cap": 1500, "check": 50}
    runs = {p: [bo._fit_images(ctx, "bp", data, p, s, cfg) for s in range(3)] for p in (0.0, 0.2, 0.4)}
    assert all(r["interpolated"] for rs in runs.values() for r in rs)
    diff, v = bo.noise_cost_test((runs[0.4], runs[0.0]), (runs[0.2], runs[0.0]), "control", role="control")
    assert diff.lo > bo.MARGIN and v.status == NOT_SUPPORTED and v.control and v.as_expected
    short = [bo._fit_images(ctx, "bp", data, 0.4, 0, {**cfg, "cap": 50})]
    _, v = bo.noise_cost_test((short, runs[0.0][:1]), (runs[0.2][:1], runs[0.0][:1]), "control", role="control")
    assert v.status == INCONCLUSIVE and "bp at 40% noise (1 of 1 seeds" in v.text and not v.as_expected


def test_regimes_from_intervals():
    def est(lo, hi):
        return Estimate((lo + hi) / 2, lo, hi, 3)

    halfway = 0.4
    assert bo.regime(est(-0.002, 0.008), halfway) == "benign"
    assert bo.regime(est(0.05, 0.15), halfway) == "tempered"
    assert bo.regime(est(0.42, 0.5), halfway) == "catastrophic"
    assert bo.regime(est(0.0, 0.05), halfway) == "benign or tempered"
    assert bo.regime(est(0.3, 0.45), halfway) == "tempered or catastrophic"
    assert bo.regime(est(0.0, 0.5), halfway) == "undetermined"
    assert bo.regime(Estimate(0.005), halfway) == "benign"  # no interval: on the value
    texts = {"bp": "", "fa": ""}
    assert bo.regime_verdict({"bp": "tempered", "fa": "tempered"}, texts, "d").status == SUPPORTED
    assert bo.regime_verdict({"bp": "benign", "fa": "tempered"}, texts, "d").status == NOT_SUPPORTED
    assert bo.regime_verdict({"bp": "benign", "fa": "benign or tempered"}, texts, "d").status == INCONCLUSIVE
    assert bo.regime_verdict({"bp": "tempered", "fa": "did not interpolate"}, texts, "d").status == INCONCLUSIVE


def test_grid_verdict_flips():
    cells = [(1000, 6.0), (3000, 8.0)]
    rng = np.random.default_rng(0)
    same = list(0.001 * rng.standard_normal(6))
    worse = list(0.03 + 0.002 * rng.standard_normal(6))  # FA 3 points worse where backprop is benign
    assert bo.grid_verdict(same, cells, []).status == SUPPORTED
    assert bo.grid_verdict(worse, cells, []).status == NOT_SUPPORTED
    assert bo.grid_verdict(same, [], []).status == INCONCLUSIVE  # backprop benign nowhere
    assert bo.grid_verdict(same, cells, ["fa (d=1000, ‖μ‖=6)"]).status == INCONCLUSIVE
    assert bo.bayes_error(2.0) == pytest.approx(0.02275, abs=1e-4)
