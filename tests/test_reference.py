"""The library's gradients against a naive reference with explicit per-layer deltas (no autograd)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.grad import conv2d_weight

import falign

DT = torch.float64


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, 4)).to(DT)


def naive_mlp_grads(layers, x, y, feedback_for):
    """Forward and backward of a 3-layer ReLU MLP written out by hand.

    ``feedback_for(l, e, delta_next)`` returns the signal sent to layer ``l``'s input.
    """
    (w1, b1), (w2, b2), (w3, b3) = [(l.weight.detach(), l.bias.detach()) for l in layers]
    z1 = x @ w1.T + b1
    h1 = z1.clamp_min(0)
    z2 = h1 @ w2.T + b2
    h2 = z2.clamp_min(0)
    out = h2 @ w3.T + b3
    p = torch.softmax(out, dim=1)
    e = (p - torch.nn.functional.one_hot(y, 4).to(DT)) / len(y)  # dL/d out for mean cross-entropy
    d3 = e
    d2 = feedback_for(2, e, d3) * (z2 > 0)
    d1 = feedback_for(1, e, d2) * (z1 > 0)
    return [d1.T @ x, d1.sum(0), d2.T @ h1, d2.sum(0), d3.T @ h2, d3.sum(0)]


def library_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return [p.grad for name, p in model.named_parameters() if "feedback" not in name]


@pytest.mark.parametrize("output_signal", ["rule", "backprop"])
@pytest.mark.parametrize("rule", ["fa", "dfa", "usf", "frsf", "brsf", "kp", "wm"])
def test_three_layer_mlp_matches_naive_reference(rule, output_signal):
    torch.manual_seed(0)
    model = falign.convert(mlp(), rule, seed=3, output_signal=output_signal)
    layers = [model[0], model[2], model[4]]
    x, y = torch.randn(8, 6, dtype=DT), torch.randint(0, 4, (8,))
    got = library_grads(model, x, y)  # brsf: feedback_weight now holds this step's magnitudes

    def feedback_for(l, e, delta_next):
        upper = layers[l]  # layer l+1 in 1-based numbering is layers[l]
        if output_signal == "backprop" and l == 2:
            return delta_next @ upper.weight.detach()
        fb = upper.feedback_weight.detach()
        if rule == "dfa":
            return e @ fb  # D of shape (n_out, in)
        if rule in ("usf", "frsf", "brsf"):
            fb = fb * torch.sign(upper.weight.detach())
        return delta_next @ fb

    expected = naive_mlp_grads(layers, x, y, feedback_for)
    for g, ref in zip(got, expected):
        torch.testing.assert_close(g, ref)
    # the rule really runs: hidden gradients differ from backprop's
    bp = library_grads(falign.convert(model, "bp"), x, y)
    assert not torch.allclose(got[0], bp[0])
    torch.testing.assert_close(got[4], bp[4])  # the output layer always gets its true gradient


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular"])
def test_dfa_conv_net_matches_naive_reference(padding_mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode=padding_mode)
    net = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4)).to(DT)
    model = falign.convert(net, "dfa", seed=1)
    assert model[0].feedback_weight.numel() == 0  # conv D is created at the first forward
    x, y = torch.randn(5, 2, 5, 5, dtype=DT), torch.randint(0, 4, (5,))
    got = library_grads(model, x, y)
    conv, lin = model[0], model[3]
    assert tuple(conv.feedback_weight.shape) == (4, 2 * 5 * 5)
    # naive: e, then the conv output's delta from the Linear layer's D, then the conv weight gradient
    mode = "constant" if padding_mode == "zeros" else padding_mode
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1), mode=mode)
    z = torch.nn.functional.conv2d(xp, conv.weight.detach(), conv.bias.detach())
    h = z.clamp_min(0).flatten(1)
    out = h @ lin.weight.detach().T + lin.bias.detach()
    e = (torch.softmax(out, 1) - torch.nn.functional.one_hot(y, 4).to(DT)) / len(y)
    delta = (e @ lin.feedback_weight.detach()).reshape(z.shape) * (z > 0)
    expected = [conv2d_weight(xp, conv.weight.shape, delta), delta.sum((0, 2, 3)), e.T @ h, e.sum(0)]
    for g, ref in zip(got, expected):
        torch.testing.assert_close(g, ref)


def test_dfa_input_signal_is_e_times_d_for_hidden_input():
    """With an input that needs a gradient, the first layer's input signal is exactly e D_1."""
    torch.manual_seed(0)
    model = falign.convert(mlp(), "dfa", seed=2)
    x = torch.randn(5, 6, dtype=DT, requires_grad=True)
    y = torch.randint(0, 4, (5,))
    out = model(x)
    loss = torch.nn.functional.cross_entropy(out, y)
    loss.backward()
    e = (torch.softmax(out.detach(), 1) - torch.nn.functional.one_hot(y, 4).to(DT)) / 5
    torch.testing.assert_close(x.grad, e @ model[0].feedback_weight)


def test_dfa_with_sequence_inputs():
    """Linear over (N, T, D): the per-position error is projected at every position."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).to(DT)
    model = falign.convert(net, "dfa")
    x = torch.randn(2, 4, 5, dtype=DT)
    out = model(x)
    g = torch.randn_like(out)
    out.backward(g)
    h_pre = x @ model[0].weight.detach().T + model[0].bias.detach()
    delta = (g @ model[2].feedback_weight) * (h_pre > 0)
    torch.testing.assert_close(model[0].weight.grad, delta.reshape(-1, 8).T @ x.reshape(-1, 5))
