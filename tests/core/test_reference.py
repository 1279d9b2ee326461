"""DFA's own cases against naive references with explicit deltas: padding modes of a conv layer whose
``D`` covers the unpadded input, a hidden input signal, sequence inputs. (Every rule's MLP and CNN against
its formula: tests/core/test_rule_triad.py.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.grad import conv2d_weight

import falign

DT = torch.float64


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, 4)).to(DT)


def library_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return [p.grad for name, p in model.named_parameters() if "feedback" not in name]


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
