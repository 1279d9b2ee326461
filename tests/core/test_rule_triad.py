"""The triad every registered rule gets, from the registry and the reference table (tests/rule_reference.py):

1. B = W reproduces plain autograd exactly (feedback set as the reference says, where the rule allows it;
   and always inside ``backprop_mode()``);
2. B ≠ W: gradients equal a naive reference written with explicit per-layer deltas from the rule's
   defining formula (an MLP and a CNN, with the output layer's signal by the rule or by backprop);
3. the rule really runs: hidden-layer gradients differ from backprop's (except for backprop itself).
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn
from torch.nn.grad import conv2d_input, conv2d_weight

import falign
from falign.functional import backprop_mode
from falign.rules import RULES, Feedback, Signal
from tests.rule_reference import REFERENCE

DT = torch.float64
N_OUT = 4


def test_every_rule_has_a_reference():
    missing = sorted(set(falign.available_rules()) - set(REFERENCE))
    assert not missing, f"registered rules without an entry in tests/rule_reference.py: {missing}"
    for name, ref in REFERENCE.items():
        rule = RULES[name]()
        if rule.direct:
            assert ref.projected is not None and ref.matrix is None, name
        else:
            assert ref.matrix is not None and ref.projected is None, name


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, N_OUT)).to(DT)


def cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 5 * 5, N_OUT)).to(DT)


def batch(kind: str, n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 6) if kind == "mlp" else (n, 2, 5, 5)
    return torch.randn(shape, generator=g, dtype=DT), torch.randint(0, N_OUT, (n,), generator=g)


def rule_grads(model: nn.Module, x, y, backprop: bool = False) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    if falign.uses_target(model):
        falign.set_target(model, y)
    loss = nn.functional.cross_entropy(model(x), y)
    if backprop:
        with backprop_mode():
            loss.backward()
    else:
        loss.backward()
    return [p.grad.clone() for name, p in model.named_parameters() if "feedback" not in name]


def autograd_grads(net: nn.Module, x, y) -> list[torch.Tensor]:
    net = copy.deepcopy(net)
    nn.functional.cross_entropy(net(x), y).backward()
    return [p.grad for p in net.parameters()]


def assert_all_close(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


# ---- 1. B = W is backprop -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("rule", falign.available_rules())
def test_backprop_mode_equals_autograd(rule, kind):
    net = mlp() if kind == "mlp" else cnn()
    model = falign.convert(net, rule, seed=3)
    x, y = batch(kind)
    assert_all_close(rule_grads(model, x, y, backprop=True), autograd_grads(net, x, y))


@pytest.mark.parametrize("rule", falign.available_rules())
def test_exact_feedback_equals_autograd(rule):
    """Feedback set so that B = W (the reference says how, per rule): the rule's own backward is backprop's.
    A rule whose signal cannot equal backprop's (it is not a function of W or e) has no such setting."""
    ref = REFERENCE[rule]
    if ref.exact is None:
        assert RULES[rule].signal is Signal.TARGET, f"{rule}: only a target-projecting rule may lack B = W"
        return
    for widths in ((6, 9, 7, N_OUT), (6, 9, N_OUT)):  # deepest network where the rule can be exact
        net = nn.Sequential(*[m for a, b in itertools.pairwise(widths) for m in (nn.Linear(a, b), nn.ReLU())][:-1])
        net = net.to(DT)
        model = falign.convert(net, rule, seed=3)
        x, y = batch("mlp")
        rule_grads(model, x, y)  # first forward: direct rules size D
        layers = falign.feedback_layers(model)
        exact = [ref.exact(layer, i == len(layers) - 1) for i, layer in enumerate(layers)]
        if all(exact[1:]):  # layer 0's input is data: its feedback is never used
            assert_all_close(rule_grads(model, x, y), autograd_grads(net, x, y))
            return
    raise AssertionError(f"{rule}: the reference could not make even a one-hidden-layer network exact")


# ---- 2. B ≠ W follows the rule's formula ----------------------------------------------------------------
def input_signal(layer, delta, e, t, shape, output_signal_bp: bool):
    """The signal the rule sends to ``layer``'s input, from the reference table (plain tensors)."""
    ref = REFERENCE[layer.rule.name]
    w = layer.weight.detach()
    if output_signal_bp:
        b = w
    elif ref.matrix is not None:
        b = ref.matrix(layer)
    else:
        q = ref.projected(e, t)
        d = layer.feedback_weight.detach()
        return (q @ d).reshape(shape)
    if w.dim() == 2:
        return delta @ b
    return conv2d_input(shape, b, delta, padding=1)


@pytest.mark.parametrize("output_signal", ["rule", "backprop"])
@pytest.mark.parametrize("rule", falign.available_rules())
def test_mlp_gradients_follow_the_rule_formula(rule, output_signal):
    torch.manual_seed(0)
    model = falign.convert(mlp(), rule, seed=3, output_signal=output_signal)
    x, y = batch("mlp")
    got = rule_grads(model, x, y)
    l1, l2, l3 = model[0], model[2], model[4]
    w1, b1, w2, b2, w3, b3 = (t.detach() for t in (l1.weight, l1.bias, l2.weight, l2.bias, l3.weight, l3.bias))
    z1 = x @ w1.T + b1
    h1 = z1.clamp_min(0)
    z2 = h1 @ w2.T + b2
    h2 = z2.clamp_min(0)
    out = h2 @ w3.T + b3
    t = nn.functional.one_hot(y, N_OUT).to(DT)
    e = (torch.softmax(out, 1) - t) / len(y)  # ∂L/∂out of mean cross-entropy
    d3 = e
    d2 = input_signal(l3, d3, e, t, h2.shape, output_signal == "backprop") * (z2 > 0)
    d1 = input_signal(l2, d2, e, t, h1.shape, False) * (z1 > 0)
    expected = [d1.T @ x, d1.sum(0), d2.T @ h1, d2.sum(0), d3.T @ h2, d3.sum(0)]
    assert_all_close(got, expected)


@pytest.mark.parametrize("rule", falign.available_rules())
def test_cnn_gradients_follow_the_rule_formula(rule):
    torch.manual_seed(0)
    model = falign.convert(cnn(), rule, seed=3)
    x, y = batch("cnn")
    got = rule_grads(model, x, y)
    c1, c2, lin = model[0], model[2], model[5]
    z1 = nn.functional.conv2d(x, c1.weight.detach(), c1.bias.detach(), padding=1)
    h1 = z1.clamp_min(0)
    z2 = nn.functional.conv2d(h1, c2.weight.detach(), c2.bias.detach(), padding=1)
    h2 = z2.clamp_min(0).flatten(1)
    out = h2 @ lin.weight.detach().T + lin.bias.detach()
    t = nn.functional.one_hot(y, N_OUT).to(DT)
    e = (torch.softmax(out, 1) - t) / len(y)
    d3 = e
    d2 = input_signal(lin, d3, e, t, h2.shape, False).reshape(z2.shape) * (z2 > 0)
    d1 = input_signal(c2, d2, e, t, h1.shape, False) * (z1 > 0)
    expected = [conv2d_weight(x, c1.weight.shape, d1, padding=1), d1.sum((0, 2, 3)),
                conv2d_weight(h1, c2.weight.shape, d2, padding=1), d2.sum((0, 2, 3)), d3.T @ h2, d3.sum(0)]
    assert_all_close(got, expected)


@pytest.mark.parametrize("rule", falign.available_rules())
def test_feedback_gradient_follows_the_rule(rule):
    """Rules whose feedback is trained by the optimiser: it receives the reference's gradient; others none."""
    torch.manual_seed(0)
    model = falign.convert(mlp(), rule, seed=3)
    x, y = batch("mlp")
    rule_grads(model, x, y)
    layer = model[4]
    h = torch.relu(model[2](torch.relu(model[0](x)))).detach()
    out = model[4](h).detach()
    e = (torch.softmax(out, 1) - nn.functional.one_hot(y, N_OUT).to(DT)) / len(y)
    expected = REFERENCE[rule].feedback_grad(layer, e, h, e)
    if expected is None:
        assert layer.feedback_weight is None or layer.feedback_weight.grad is None
    else:
        assert RULES[rule].feedback_is_parameter
        torch.testing.assert_close(layer.feedback_weight.grad, expected)


# ---- 3. the rule really runs ----------------------------------------------------------------------------
@pytest.mark.parametrize("rule", falign.available_rules())
def test_the_rule_really_runs(rule):
    net = mlp()
    model = falign.convert(net, rule, seed=3)
    x, y = batch("mlp")
    got, true = rule_grads(model, x, y), autograd_grads(net, x, y)
    torch.testing.assert_close(got[4], true[4])  # the output layer always gets its true local gradient
    if RULES[rule].feedback is Feedback.NONE:
        assert_all_close(got, true)
    else:
        assert falign.diagnostics.angle(got[0], true[0]) > 1.0  # hidden layers follow the rule, not backprop
