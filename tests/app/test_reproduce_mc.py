"""The multi-class experiment: its primary test (the θ intervention) and its control, its secondary tests, each on
constructed inputs that must pass and inputs that must fail; the held, turned and placebo feedback of the
intervention; and the experiment end to end at a tiny size."""

from __future__ import annotations

import math

import pytest
import torch

import falign
from falign.app.experiments import multiclass
from falign.app.experiments.base import Context
from falign.app.experiments.runs import MLPRun, feedback_at_angle
from falign.app.experiments.stats import spearman
from falign.app.results import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, combine
from falign.data import many_class_subset


def _acc(slopes: list[float], thetas=(0, 75), base: float = 0.45, wobble=(0.0, 0.002, -0.001, 0.001, -0.002)):
    """Accuracies per seed and θ falling by ``slope`` points per degree (a fraction per point), with a small
    per-seed offset."""
    return {s: {t: base + wobble[s % len(wobble)] + slope * t / 100 for t in thetas} for s, slope in enumerate(slopes)}


# ---- the primary test and its control ---------------------------------------------------------------------------
def test_angle_slopes_are_points_per_degree():
    acc = {0: {0: 0.50, 75: 0.425}, 1: {0: 0.40, 30: 0.40, 60: 0.40}}
    slopes = multiclass.angle_slopes(acc)
    assert slopes[0] == pytest.approx(-0.1)  # 7.5 points over 75°
    assert slopes[1] == pytest.approx(0.0)


def test_intervention_verdict_supported_not_supported_inconclusive():
    falls = _acc([-0.12, -0.11, -0.13, -0.12, -0.125])  # the quick run's size of effect
    verdict, est = multiclass.intervention_verdict(falls, 100)
    assert verdict.status == SUPPORTED and verdict.role == "primary"
    assert est.value == pytest.approx(-0.121) and est.n == 5 and est.hi < 0
    flat = _acc([0.01, -0.01, 0.005, -0.004, 0.0])  # no effect: the interval excludes -0.05
    assert multiclass.intervention_verdict(flat, 100)[0].status == NOT_SUPPORTED
    rises = _acc([0.08, 0.1, 0.09])  # opposite sign
    assert multiclass.intervention_verdict(rises, 100)[0].status == NOT_SUPPORTED
    noisy = _acc([-0.2, 0.1, -0.05])  # contains both 0 and the smallest effect
    verdict, _ = multiclass.intervention_verdict(noisy, 100)
    assert verdict.status == INCONCLUSIVE and "power" in verdict.text
    # an effect real but below the smallest effect of interest is supported, never called large
    small = _acc([-0.02, -0.021, -0.019, -0.02])
    verdict, _ = multiclass.intervention_verdict(small, 100)
    assert verdict.status == SUPPORTED and "below the smallest effect of interest" in verdict.text


def test_the_control_fails_as_built_and_voids_the_primary_when_it_passes():
    primary, _ = multiclass.intervention_verdict(_acc([-0.12, -0.11, -0.13, -0.12, -0.125]), 100)
    placebo_flat = _acc([0.002, -0.01, 0.012, 0.0, -0.004])
    control, _ = multiclass.intervention_verdict(placebo_flat, 100, "a random matrix", role="control")
    assert control.status == NOT_SUPPORTED and control.as_expected
    assert combine([primary, control]).status == SUPPORTED
    # a placebo that moves accuracy as much as the real intervention: the test cannot tell, the verdict says so
    placebo_moves = _acc([-0.1, -0.12, -0.11, -0.1, -0.12])
    control, _ = multiclass.intervention_verdict(placebo_moves, 100, "a random matrix", role="control")
    assert control.status == SUPPORTED and not control.as_expected
    assert combine([primary, control]).status == INCONCLUSIVE
    # a control too noisy to exclude the smallest effect also voids nothing silently: it is inconclusive, not passed
    control, _ = multiclass.intervention_verdict(_acc([-0.2, 0.15, -0.05]), 100, "a random matrix", role="control")
    assert control.status == INCONCLUSIVE and combine([primary, control]).status == INCONCLUSIVE


def test_interaction_verdict():
    small = _acc([-0.01, 0.0, -0.02, -0.01, 0.0])
    assert multiclass.interaction_verdict(small, _acc([-0.12, -0.11, -0.13, -0.12, -0.1]), 5, 100).status == SUPPORTED
    assert multiclass.interaction_verdict(small, _acc([-0.01, 0.0, -0.02, -0.005, 0.0]), 5, 100).status \
        == NOT_SUPPORTED


# ---- secondary tests --------------------------------------------------------------------------------------------
def test_gap_growth_verdict():
    ns = [5, 5, 5, 20, 20, 20, 100, 100, 100]
    growing = [0.01, 0.02, 0.015, 0.06, 0.07, 0.05, 0.15, 0.17, 0.16]
    flat = [0.05, 0.06, 0.04, 0.05, 0.04, 0.06, 0.05, 0.06, 0.04]
    verdict = multiclass.gap_growth_verdict("s", ns, growing, 0.5, 0.01)
    assert verdict.status == SUPPORTED and verdict.role == "secondary"
    assert multiclass.gap_growth_verdict("s", ns, flat, 0.5, 0.01).status == NOT_SUPPORTED
    assert multiclass.gap_growth_verdict("s", ns, growing, 1.0, 0.01).status == INCONCLUSIVE  # BP at ceiling
    assert multiclass.gap_growth_verdict("s", ns, growing, 0.015, 0.01).status == INCONCLUSIVE  # BP at chance
    # out of range: 10 classes at most (digits, Fashion-MNIST) is reported, never judged, even when it grows
    small_ns = [3, 3, 3, 6, 6, 6, 10, 10, 10]
    verdict = multiclass.gap_growth_verdict("digits", small_ns, growing, 0.9, 0.1)
    assert verdict.status == INCONCLUSIVE and "out of the claim's range" in verdict.text


def test_within_n_verdict_uses_rule_means_and_ignores_per_n_offsets():
    def means(angles, gaps, ns):
        return [{"n": n, "rule": f"r{i % 3}", "angle": a, "gap": g}
                for i, (a, g, n) in enumerate(zip(angles, gaps, ns))]

    ns = [5, 5, 5, 20, 20, 20, 100, 100, 100]
    angle = [20, 40, 60, 20, 40, 60, 20, 40, 60]
    linked = [a / 1000 + o for a, o in zip(angle, [0] * 3 + [0.1] * 3 + [0.3] * 3)]  # 0.1 points/° within n
    verdict = multiclass.within_n_verdict("s", means(angle, linked, ns))
    assert verdict.status == SUPPORTED and "rule means" in verdict.text
    # the pooled confound only: angle and gap both rise with n, within n the order is reversed
    conf_angle = [40, 41, 42, 60, 61, 62, 80, 81, 82]
    conf_gap = [0.03, 0.02, 0.01, 0.13, 0.12, 0.11, 0.33, 0.32, 0.31]
    assert spearman(conf_angle, conf_gap)[0] > 0.7  # a pooled statistic would say "supported"
    assert multiclass.within_n_verdict("s", means(conf_angle, conf_gap, ns)).status == NOT_SUPPORTED


def test_init_scale_verdict():
    unit = {0: 0.45, 1: 0.44, 2: 0.46}
    assert multiclass.init_scale_verdict({0: 0.50, 1: 0.495, 2: 0.51}, unit, 100, 0.1).status == SUPPORTED
    verdict = multiclass.init_scale_verdict({0: 0.40, 1: 0.39, 2: 0.41}, unit, 100, 0.1)
    assert verdict.status == NOT_SUPPORTED and "not a claim of the paper" in verdict.claim


# ---- the intervention: turned, held, placebo --------------------------------------------------------------------
def _angle(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return math.degrees(math.acos(max(-1.0, min(1.0, float(a @ b / (a.norm() * b.norm()))))))


def _fa_layer():
    torch.manual_seed(0)
    model = falign.convert(torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)),
                           "fa", seed=0, example_input=torch.randn(2, 6))
    return model[2]


@pytest.mark.parametrize("theta", [0.0, 30.0, 75.0])
def test_feedback_turned_keeps_its_own_direction(theta):
    layer = _fa_layer()
    w = layer.weight.detach().double().flatten()
    b0 = layer.feedback_weight.detach().double().flatten().clone()
    own = b0 - (b0 @ w) / (w @ w) * w  # the feedback's own part orthogonal to W
    b = feedback_at_angle(layer, theta, torch.Generator().manual_seed(1), keep=True).double().flatten()
    assert _angle(b, w) == pytest.approx(theta, abs=1e-3)
    assert float(b.norm()) == pytest.approx(float(b0.norm()), rel=1e-5)
    if theta:
        rest = b - (b @ w) / (w @ w) * w
        assert _angle(rest, own) == pytest.approx(0.0, abs=1e-3)  # turned towards W, not redrawn
    # without keep, the orthogonal part is a new random direction
    layer2 = _fa_layer()
    b2 = feedback_at_angle(layer2, 75.0, torch.Generator().manual_seed(1)).double().flatten()
    rest2 = b2 - (b2 @ w) / (w @ w) * w
    assert _angle(rest2, own) > 45


def test_feedback_at_angle_to_a_reference():
    layer = _fa_layer()
    ref = torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(3))
    b = feedback_at_angle(layer, 20.0, torch.Generator().manual_seed(1), reference=ref, keep=True)
    assert _angle(b, ref) == pytest.approx(20.0, abs=1e-3)
    assert abs(_angle(b, layer.weight.detach()) - 20.0) > 10  # the angle to W is not what was set


def _run(**kw):
    data = many_class_subset(5, per_class_train=10, per_class_test=10, seed=0)
    return MLPRun("fa", data, hidden=(16, 16), steps=40, seed=0, lr=0.1, **kw).run()


def test_held_angle_stays_and_the_placebo_does_not_set_it():
    held = _run(feedback_angle=30.0, hold_angle_every=5, angle_keeps_feedback=True)
    assert held["weight-feedback angle start"] == pytest.approx(30.0, abs=0.1)
    assert held["weight-feedback angle"] == pytest.approx(30.0, abs=3.0)  # re-set at step 35 of 40
    set_once = _run(feedback_angle=30.0, angle_keeps_feedback=True)  # set at initialisation only: it drifts
    assert abs(set_once["weight-feedback angle"] - 30.0) > abs(held["weight-feedback angle"] - 30.0)
    placebo = _run(feedback_angle=0.0, hold_angle_every=5, angle_keeps_feedback=True, angle_reference="random")
    assert placebo["weight-feedback angle start"] > 60  # held at 0° to a random matrix: far from W
    plain = _run()
    assert placebo["weight-feedback angle start"] == pytest.approx(plain["weight-feedback angle start"], abs=15)
    with pytest.raises(ValueError):
        _run(feedback_angle=0.0, angle_reference="bias")


def test_default_feedback_at_angle_is_unchanged_for_other_experiments():
    """No keep, no reference: the same draw as before the intervention's options existed (dominance uses it)."""
    a, b = _fa_layer(), _fa_layer()
    x = feedback_at_angle(a, 60.0, torch.Generator().manual_seed(5)).clone()
    w = b.weight.detach().double().flatten()
    r = torch.randn(w.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    w_hat = w / w.norm()
    r -= (r @ w_hat) * w_hat
    expect = float(b.feedback_weight.double().norm()) * (0.5 * w_hat + math.sin(math.radians(60)) * r / r.norm())
    assert torch.allclose(x.double().flatten(), expect, atol=1e-6)


# ---- end to end, tiny ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    return multiclass.run(Context(tmp_path_factory.mktemp("mc"), "tiny", 2))


def test_one_primary_one_control_and_the_headline_is_the_primary(tiny_result):
    roles = [v.role for v in tiny_result.verdicts]
    assert roles.count("primary") == 1 and roles.count("control") == 1
    primary = next(v for v in tiny_result.verdicts if v.role == "primary")
    control = next(v for v in tiny_result.verdicts if v.role == "control")
    assert "held at θ to W" in primary.text and "a random matrix" in control.text
    assert "θ intervention" in tiny_result.headline["metric"]
    assert tiny_result.headline["value"].split(" points/°")[0] in primary.text
    assert tiny_result.verdict.status == combine(tiny_result.verdicts).status
    digits = [v for v in tiny_result.verdicts if v.claim.startswith("digits")]
    assert digits and all(v.status == INCONCLUSIVE and "out of the claim's range" in v.text for v in digits)


def test_kp_is_compared_at_equal_weight_decay(tiny_result):
    runs = next(t for t in tiny_result.tables if t.name == "multiclass_runs").rows
    for r in (r for r in runs if r["rule"] == "kp"):
        bp = next(b for b in runs if b["rule"] == "bp" and b["weight decay"] == r["weight decay"]
                  and (b["dataset"], b["n"], b["seed"]) == (r["dataset"], r["n"], r["seed"]))
        assert r["weight decay"] == multiclass.LEARNED_WEIGHT_DECAY
        assert r["gap to bp"] == pytest.approx(bp["test acc"] - r["test acc"])
    assert all(r["stopped"] in ("fit", "plateau", "cap", "diverged") for r in runs)
    assert "hit the cap" in tiny_result.setup["training"]  # tiny's cap of 100 steps is reported when hit
