"""implicit_alignment and conservation: their primary tests, controls and secondary tests on constructed inputs
that must pass and inputs that must fail, and the law's angle prediction on small networks where the law holds
(ReLU, fa) and where it does not (tanh; backprop with the feedback unused)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import falign
from falign.app.experiments import conservation, implicit_alignment
from falign.app.results import CONTROL, INCONCLUSIVE, NOT_SUPPORTED, PRIMARY, SECONDARY, SUPPORTED, combine
from falign.diagnostics import find_pairs, pair_quantities
from falign.functional import backprop_mode
from falign.models import MLP


# ---- implicit_alignment ---------------------------------------------------------------------------------------
def test_predicted_angle():
    assert implicit_alignment.predicted_angle(1.5, 1.0, 1.0) == pytest.approx(60.0)
    assert implicit_alignment.predicted_angle(0.0, 0.0, 2.0) == pytest.approx(90.0)
    assert implicit_alignment.predicted_angle(5.0, 0.0, 1.0) == 0.0  # a cosine above 1: no angle, clipped
    assert implicit_alignment.predicted_angle(-5.0, 0.0, 1.0) == 180.0
    assert math.isnan(implicit_alignment.predicted_angle(1.0, 0.0, 0.0))


def test_prediction_verdict_flips():
    verdict = implicit_alignment.prediction_verdict
    assert verdict([1.2, 1.5, 1.3]).status == SUPPORTED  # every error provably under 5°
    assert verdict([13.0, 14.5, 12.8], "tanh (fa)", CONTROL).status == NOT_SUPPORTED  # provably over 4°
    assert verdict([90.0, 90.0, 90.0], "bp", CONTROL).status == NOT_SUPPORTED  # identical values, no interval
    assert verdict([1.0, 9.0, 5.0]).status == INCONCLUSIVE  # the interval holds both 5° and 4°
    assert verdict([4.6, 4.7, 4.8]).status == SUPPORTED  # close to the tolerance, but provably under it
    assert verdict([4.8, 5.0, 5.2]).status == NOT_SUPPORTED  # not provably under 5°, provably over 4°
    untrained = verdict([1.2, 1.5, 1.3], accuracies=[0.95, 0.11], chance=0.1)
    assert untrained.status == INCONCLUSIVE and "did not train" in untrained.text
    text = verdict([1.2, 1.5, 1.3]).text
    assert "power to detect" in text and "largest error" in text


def test_trend_is_secondary_and_names_the_controls():
    v = implicit_alignment.trend_verdict([10.5, 11.0, 10.0], {"tanh (fa)": [13.0, 14.0, 12.5], "bp": [0.5, -0.3, 0.1]})
    assert v.role == SECONDARY and v.status == SUPPORTED and "tanh (fa) 13.2" in v.text
    assert "(tanh (fa) too, without the law" in v.text  # the controls that show the trend are named; bp does not
    assert "without the law" not in implicit_alignment.trend_verdict([10.5, 11.0, 10.0], {"bp": [0.5, -0.3, 0.1]}).text
    assert "monotone" not in v.text + v.claim
    assert implicit_alignment.trend_verdict([-1.0, -0.5, -0.8], {}).status == NOT_SUPPORTED


def _largest_error(activation: str, backprop: bool, seed: int, lr: float = 0.1, steps: int = 400) -> float:
    """A small MLP (8-16-16-3, biases) trained by full-batch float64 SGD under fa (or backprop, its feedback
    kept but unused): the largest |measured − law-predicted angle| over the layers whose feedback is used."""
    g = torch.Generator().manual_seed(seed)
    x = 4 * torch.randn(64, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=g)
    torch.manual_seed(seed)
    model = falign.convert(MLP([8, 16, 16, 3], activation=activation).double(), "fa", seed=seed, example_input=x[:2])
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if not n.endswith("feedback_weight")], lr=lr)
    falign.attach(model, opt)
    pairs = find_pairs(model, x[:2])
    q0 = {p.key: float(pair_quantities(p)["q"].sum()) for p in pairs}
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        with backprop_mode() if backprop else contextlib.nullcontext():
            loss.backward()
        opt.step()
    angles = implicit_alignment.layer_angles(pairs, q0)
    assert set(angles) == {"fc2", "fc3"}
    return max(abs(m - p) for m, p in angles.values())


def test_the_law_predicts_the_angle_under_relu_fa_only():
    """The primary test passes where the law holds and fails, as built, on both controls."""
    relu = [_largest_error("relu", False, s) for s in range(3)]
    tanh = [_largest_error("tanh", False, s) for s in range(3)]
    assert max(relu) < 1.0 and min(tanh) > 3.0
    assert implicit_alignment.prediction_verdict(relu).status == SUPPORTED
    assert implicit_alignment.prediction_verdict(tanh, "tanh (fa)", CONTROL).status == NOT_SUPPORTED
    assert _largest_error("relu", True, 0) > 10.0  # backprop: the lower layer grows, W does not turn to B
    # over the same horizon at half the step, the ReLU error (SGD's O(η) drift) halves; tanh's does not shrink
    assert _largest_error("relu", False, 0, lr=0.05, steps=800) < 0.6 * relu[0]
    assert _largest_error("tanh", False, 0, lr=0.05, steps=800) > 0.9 * tanh[0]


def test_implicit_alignment_declares_one_primary_and_its_controls():
    roles = [role for *_, role in implicit_alignment.CASES]
    assert roles.count(PRIMARY) == 1 and roles.count(CONTROL) == 2
    activations = {case: (act, bp) for case, act, bp, _ in implicit_alignment.CASES}
    assert activations["fa"] == ("relu", False)
    assert {activations[c] for c, *_, r in implicit_alignment.CASES if r == CONTROL} == {("tanh", False),
                                                                                        ("relu", True)}


# ---- conservation ---------------------------------------------------------------------------------------------
def test_slope_verdict_flips():
    verdict = conservation.slope_verdict
    assert verdict([0.98, 1.0, 1.01], "fa").status == SUPPORTED
    assert verdict([0.004, 0.002, 0.006], "bp: FA quantity", CONTROL).status == NOT_SUPPORTED  # a tiny slope
    assert verdict([-0.02, -0.01, -0.03], "tanh", CONTROL).status == NOT_SUPPORTED
    assert verdict([0.5, 1.4, 0.9], "fa").status == INCONCLUSIVE
    assert verdict([0.85, 0.86, 0.87], "fa").status == SUPPORTED  # above the margin, if short of 1
    assert verdict([1.0, math.nan], "fa").status == INCONCLUSIVE
    assert "power to detect" in verdict([0.98, 1.0, 1.01], "fa").text


def test_a_control_that_passes_voids_the_primary():
    primary = conservation.slope_verdict([0.98, 1.0, 1.01], "FA family")
    passing = conservation.slope_verdict([0.97, 1.0, 0.99], "tanh", CONTROL)
    failing = conservation.slope_verdict([0.0, 0.01, -0.01], "tanh", CONTROL)
    assert combine([primary, failing]).status == SUPPORTED
    assert combine([primary, passing]).status == INCONCLUSIVE


def test_ratio_verdict():
    kept = conservation.ratio_verdict([0.8, 0.85, 0.75], [0.01, 0.012, 0.009], "kept", "bp ÷ fa")
    assert kept.status == SUPPORTED and kept.role == SECONDARY
    assert conservation.ratio_verdict([0.8, 0.85, 0.75], [0.7, 0.8, 0.9], "kept", "bp ÷ adam").status == NOT_SUPPORTED
    broken = conservation.ratio_verdict([0.7, 0.6, 0.65], [0.01, 0.012, 0.009], "adam breaks", "adam ÷ sgd",
                                        "its drift is 0.82 of a backprop copy's")
    assert broken.status == SUPPORTED and "0.82 of a backprop copy's" in broken.text


def test_conservation_primary_judges_the_fa_family_only():
    """Backprop's balancedness is a secondary, never pooled into the law's fits; the controls are the FA quantity
    under backprop and tanh."""
    runs = {name: (rule, act, momentum, bp) for name, rule, act, momentum, bp in conservation.RUNS}
    primary = [(run, q) for _, run, q, role in conservation.CASES if role == PRIMARY]
    assert {run for run, _ in primary} == {"fa", "usf", "dfa"} and {q for _, q in primary} == {"q"}
    for run, _ in primary:
        rule, act, momentum, bp = runs[run]
        assert act == "relu" and momentum == 0.0 and not bp and rule in ("fa", "usf", "dfa")
    controls = {case: (runs[run], q) for case, run, q, role in conservation.CASES if role == CONTROL}
    assert controls == {"bp: FA quantity": (("fa", "relu", 0.0, True), "q"),
                        "tanh (fa)": (("fa", "tanh", 0.0, False), "q")}
    assert [role for case, *_, role in conservation.CASES if case == "bp: balancedness"] == [SECONDARY]

