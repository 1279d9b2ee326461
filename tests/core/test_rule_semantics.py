"""Each rule as its formula says, in the corners: wm's mirror step options, kp's B following W's trainability,
dfa never reusing a stale error, brsf's draws independent of memory layout and of input-gradient passes,
double backward (gradient penalties)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import falign
from falign.models import MLP
from falign.rules import Feedback
from tests.rule_reference import REFERENCE

RULES = falign.available_rules()
DT = torch.float64



# ---- wm's mirror_step follows convert's options; kp's B follows W's trainability ---------------------
def test_mirror_step_uses_the_options_given_to_convert():
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    model = falign.convert(net, "wm", lr=0.01, decay=0.02)
    b0 = model[2].feedback_weight.clone()
    falign.rules.mirror_step(model, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    torch.randn(128, 8, generator=g)  # layer 0 draws its noise first
    x = torch.randn(128, 8, generator=g)
    y = x @ model[2].weight.detach().T
    torch.testing.assert_close(model[2].feedback_weight, 0.98 * b0 + 0.01 * y.T @ x / 128)


def test_mirror_step_arguments_override_per_call():
    model = falign.convert(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), "wm", lr=0.01, decay=0.01)
    b0 = model[2].feedback_weight.clone()
    falign.rules.mirror_step(model, lr=0.5, decay=0.5)
    assert (model[2].feedback_weight - b0).norm() / b0.norm() > 0.2


def test_kp_feedback_is_frozen_with_its_weight():
    model = falign.convert(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)), "kp")
    model[2].weight.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, weight_decay=0.1)
    b0 = model[2].feedback_weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    assert model[2].feedback_weight.grad is None and torch.equal(model[2].feedback_weight.detach(), b0)
    assert model[0].feedback_weight.grad is not None  # the trained layer's B still learns


# ---- dfa never reuses a stale output error -----------------------------------------------------------
def test_dfa_submodule_called_alone_after_a_step_raises():
    model = falign.convert(MLP([4, 8, 8, 3]), "dfa")
    model(torch.randn(5, 4)).sum().backward()  # one full step: an error was recorded
    h = torch.randn(5, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="outside a forward pass of the converted model"):
        model.fc2(h).sum().backward()
    with falign.functional.backprop_mode():  # true gradients of a submodule alone still work
        model.fc2(h).sum().backward()


def test_dfa_two_forward_passes_each_use_their_own_error():
    model = falign.convert(MLP([4, 8, 3]), "dfa", seed=1)
    x1, x2 = torch.randn(5, 4), torch.randn(5, 4)
    a = model(x1)
    b = model(x2)
    (b.pow(2).sum()).backward()
    grad_b = model.fc1.weight.grad.clone()
    model.zero_grad()
    reference = copy.deepcopy(model)
    reference(x2).pow(2).sum().backward()
    torch.testing.assert_close(grad_b, reference.fc1.weight.grad)
    a.sum().backward()  # a's own error, not b's
    assert model.fc1.weight.grad is not None


# ---- brsf: layout-independent draws, no side effects outside optimiser steps --------------------
def test_brsf_draws_do_not_depend_on_memory_layout():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    a = falign.convert(net, "brsf", seed=3)
    b = falign.convert(net, "brsf", seed=3).to(memory_format=torch.channels_last)
    for model in (a, b):
        falign.step_rules(model)
    assert not b[0].feedback_weight.is_contiguous()
    torch.testing.assert_close(a[0].feedback_weight, b[0].feedback_weight, rtol=0, atol=0)


def test_input_gradients_leave_brsf_state_unchanged():
    model = falign.convert(MLP([4, 8, 8, 3]), "brsf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(6, 4, requires_grad=True)
    for _ in range(3):  # saliency maps: input gradients only
        torch.autograd.grad(model(x).max(1).values.sum(), x)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_python_guide_documents_input_gradients_and_backprop_mode():
    guide = (Path(__file__).parents[2] / "docs" / "guides" / "python.md").read_text()
    assert "input gradients" in guide and "backprop_mode()" in guide


# ---- double backward (gradient penalties) follows the rule's formula --------------------------------
def _straight_through(x, weight, bias, feedback):
    """``x Wᵀ + b`` whose gradient to ``x`` is ``g B`` (plain autograd, an independent construction)."""
    feedback = feedback.detach()
    return x.detach() @ weight.T + bias + (x @ feedback.T - (x @ feedback.T).detach())


@pytest.mark.parametrize("rule", RULES)
def test_gradient_penalty_double_backward_follows_the_rule(rule):
    """A penalty on the input signal, ``‖∂L/∂x‖²``, differentiated once more: every backward pass through the
    network (the first one, and the second one through the graph it built) uses the rule (formulas from the
    reference table; backprop's is plain autograd)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    model = falign.convert(net, rule, seed=2, example_input=torch.randn(1, 5, dtype=DT))
    x = torch.randn(4, 5, dtype=DT, requires_grad=True)
    target = torch.randn(4, 3, dtype=DT)
    if falign.uses_target(model):
        falign.set_target(model, target)
    with falign.functional.double_backward():
        loss = (model(x) - target).pow(2).sum()
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    penalty = gx.pow(2).sum()
    if penalty.requires_grad:
        penalty.backward()

    ref, entry = copy.deepcopy(net), REFERENCE[rule]
    xr = x.detach().clone().requires_grad_()
    if falign.get_rule(rule).feedback is Feedback.NONE:
        (gx_ref,) = torch.autograd.grad((ref(xr) - target).pow(2).sum(), xr, create_graph=True)
    elif entry.projected is not None:  # the hidden input signal is q·D₂, the first layer's q·D₀
        h = torch.tanh(ref[0](xr))
        o = _straight_through(h, ref[2].weight, ref[2].bias, model[2].feedback_weight)
        e = torch.autograd.grad((o - target).pow(2).sum(), o, create_graph=True)[0]
        gx_ref = entry.projected(e, target) @ model[0].feedback_weight
    else:
        h = torch.tanh(_straight_through(xr, ref[0].weight, ref[0].bias, entry.matrix(model[0])))
        o = _straight_through(h, ref[2].weight, ref[2].bias, entry.matrix(model[2]))
        (gx_ref,) = torch.autograd.grad((o - target).pow(2).sum(), xr, create_graph=True)
    torch.testing.assert_close(gx.detach(), gx_ref.detach())
    penalty_ref = gx_ref.pow(2).sum()
    if penalty_ref.requires_grad:
        penalty_ref.backward()
    # (a rule whose input signal does not depend on the weights gives the penalty no gradient at all)
    torch.testing.assert_close(model[0].weight.grad, ref[0].weight.grad)
    torch.testing.assert_close(model[2].weight.grad, ref[2].weight.grad)
