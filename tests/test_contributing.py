"""CONTRIBUTING.md's recipe for a learning rule, followed by a test: a toy rule written as the recipe says (one
FeedbackRule subclass, one registry line, one reference entry) passes the whole rule triad and trains through
``falign.convert`` and ``falign.app.train`` with nothing else changed."""

from __future__ import annotations

import pytest
import torch

import falign
from falign.rules import RULES, Feedback, FeedbackRule, Law, Signal
from tests import rule_reference
from tests.core import test_rule_triad


class SparseFeedbackAlignment(FeedbackRule):
    """A toy rule: ``B = R ⊙ M``, ``R`` fixed random and ``M`` a fixed random mask keeping half the entries."""

    name = "sparse-fa"
    summary = "toy: fixed random feedback with half its entries zero"
    feedback = Feedback.FIXED
    signal = Signal.LAYER
    law = Law.NONE

    def initial_feedback(self, layer, shape, init, generator):
        r = init.sample(shape, generator, layer.weight.dtype)
        keep = torch.rand(shape, generator=generator) < 0.5
        return r * keep.to(r.dtype)


@pytest.fixture
def toy_rule(monkeypatch):
    monkeypatch.setitem(RULES, SparseFeedbackAlignment.name, SparseFeedbackAlignment)  # step 2: the registry line
    monkeypatch.setitem(rule_reference.REFERENCE, SparseFeedbackAlignment.name,   # step 3: the reference entry
                        rule_reference.Reference(matrix=lambda L: L.feedback_weight.detach(),
                                                 exact=lambda L, out: rule_reference._copy(L, L.weight.detach())))
    return SparseFeedbackAlignment.name


def test_the_recipe_rule_passes_the_triad(toy_rule):
    test_rule_triad.test_every_rule_has_a_reference()
    for kind in ("mlp", "cnn"):
        test_rule_triad.test_backprop_mode_equals_autograd(toy_rule, kind)
    test_rule_triad.test_exact_feedback_equals_autograd(toy_rule)
    for output_signal in ("rule", "backprop"):
        test_rule_triad.test_mlp_gradients_follow_the_rule_formula(toy_rule, output_signal)
    test_rule_triad.test_cnn_gradients_follow_the_rule_formula(toy_rule)
    test_rule_triad.test_feedback_gradient_follows_the_rule(toy_rule)
    test_rule_triad.test_the_rule_really_runs(toy_rule)
    model = falign.convert(test_rule_triad.mlp(), toy_rule)
    assert (model[0].feedback_weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.1)


def test_the_recipe_rule_trains_through_falign_train(toy_rule, tmp_path):
    from falign.app.train import TrainConfig, train

    summary = train(TrainConfig(rule=toy_rule, hidden=(16,), epochs=1), tmp_path / "run", progress=False)
    assert summary["status"] == "completed" and summary["rule"] == toy_rule


def test_a_wrong_reference_fails_the_triad(toy_rule, monkeypatch):
    """The negative control: the reference says B = W for the toy rule (backprop's formula), and the triad's
    formula test fails."""
    monkeypatch.setitem(rule_reference.REFERENCE, toy_rule,
                        rule_reference.Reference(matrix=lambda L: L.weight.detach()))
    with pytest.raises(AssertionError):
        test_rule_triad.test_mlp_gradients_follow_the_rule_formula(toy_rule, "rule")
