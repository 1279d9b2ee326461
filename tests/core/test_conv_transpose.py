"""nn.ConvTranspose1d/2d/3d under every rule, every option (stride, padding, output_padding, groups, dilation,
bias, output_size): B = W reproduces autograd, B ≠ W puts the rule's B where the input gradient transports W,
weight and bias gradients stay local, and weight mirror aligns B with W."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import falign
from falign.diagnostics import angle
from falign.functional import backprop_mode
from falign.rules.wm import mirror_layer
from tests.conftest import with_target

RULES = falign.available_rules()
FEEDBACK_RULES = [r for r in RULES if falign.get_rule(r).has_feedback and not falign.get_rule(r).direct]
CONFIGS = [  # (dims, in, out, kernel, stride, padding, output_padding, groups, dilation, bias, output_size)
    (1, 3, 4, 3, 2, 1, 1, 1, 1, True, None),
    (2, 4, 6, 3, 2, 1, 0, 2, 1, True, None),
    (2, 2, 3, (2, 3), (2, 1), (0, 1), (1, 0), 1, (2, 1), False, None),
    (2, 2, 2, 3, 2, 1, 0, 1, 1, True, [8, 8]),  # output_size chooses output_padding at call time
    (3, 2, 2, 2, 2, 0, 0, 1, 1, True, None),
]
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
LAYER = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def _layer(cfg):
    dims, cin, cout, k, s, p, op, g, d, bias, _ = cfg
    torch.manual_seed(0)
    return LAYER[dims](cin, cout, k, stride=s, padding=p, output_padding=op, groups=g, bias=bias, dilation=d)


def _input(cfg):
    dims, cin = cfg[0], cfg[1]
    return torch.randn(2, cin, *([4] * dims), generator=torch.Generator().manual_seed(1)).requires_grad_(True)


class Wrap(nn.Module):
    """The layer called as a model would call it (with ``output_size=`` when the configuration has one)."""

    def __init__(self, cfg):
        super().__init__()
        self.t = _layer(cfg)
        self.output_size = cfg[10]

    def forward(self, x):
        return self.t(x, output_size=self.output_size) if self.output_size is not None else self.t(x)


def _plain(layer, x, weight, cfg):
    op = layer._output_padding(x, cfg[10], list(layer.stride), list(layer.padding), list(layer.kernel_size),
                               cfg[0], list(layer.dilation))
    return CONV_T[cfg[0]](x, weight, layer.bias, layer.stride, layer.padding, op, layer.groups, layer.dilation)


def _backprop_mode_matches_autograd(cfg, rule, call=lambda model, x: model(x)):
    """Converted under ``rule`` and run in backprop mode, the layer's output and input/weight gradients equal
    plain autograd's; returns ``(model, plain, g)``."""
    plain = Wrap(cfg)
    model = falign.convert(Wrap(cfg), rule, seed=0)
    x1, x2 = _input(cfg), _input(cfg)
    with backprop_mode():
        out = call(model, x1)
        g = torch.randn_like(out)
        out.backward(g)
    ref = plain(x2)
    ref.backward(g)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(model.t.weight.grad, plain.t.weight.grad)
    return model, plain, g


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("rule", RULES)
def test_backprop_mode_equals_autograd(rule, cfg):
    model, plain, _ = _backprop_mode_matches_autograd(cfg, rule, with_target)
    if cfg[9]:
        torch.testing.assert_close(model.t.bias.grad, plain.t.bias.grad)


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("rule", FEEDBACK_RULES)
def test_rule_puts_b_in_the_input_gradient(rule, cfg):
    """x.grad is the autograd input gradient of the same transposed convolution with W replaced by B."""
    model = falign.convert(Wrap(cfg), rule, seed=0)
    layer = model.t
    x = _input(cfg)
    out = model(x)
    g = torch.randn_like(out)
    b = layer.current_feedback()
    assert b.shape == layer.weight.shape and not torch.equal(b, layer.weight.detach())
    out.backward(g)
    xr = _input(cfg)
    (expect_x,) = torch.autograd.grad(_plain(layer, xr, b, cfg), xr, g)
    torch.testing.assert_close(x.grad, expect_x)
    w = layer.weight.detach().clone().requires_grad_(True)
    (expect_w,) = torch.autograd.grad(_plain(layer, _input(cfg).detach(), w, cfg), w, g)
    torch.testing.assert_close(layer.weight.grad, expect_w)


@pytest.mark.parametrize("rule", RULES)
def test_converts_and_trains_in_a_decoder(rule):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(),
                        nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1), nn.Flatten(),
                        nn.Linear(2 * 8 * 8, 3))
    model = falign.convert(net, rule, seed=0)
    assert falign.conversion_report(model).converted == ["0", "2", "4"]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    falign.attach(model, opt)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.cross_entropy(with_target(model, x, y), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_weight_mirror_aligns_a_transposed_convolution():
    layer = falign.convert(nn.Sequential(nn.ConvTranspose2d(3, 4, 3, groups=1)), "wm", seed=0)[0]
    start = angle(layer.feedback_weight, layer.weight)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(50):
            mirror_layer(layer, lr=0.5, decay=0.2, generator=g)
    assert start > 70 and angle(layer.feedback_weight, layer.weight) < 10


def test_conservation_law_holds_through_transposed_convolutions():
    """Q per unit (incoming of a transposed conv's output channel, coupling through the next transposed conv's
    input channel) stays constant under small-step fa; a wrong indexing of either layout would drift."""
    from falign.diagnostics.law import conservation, drift, find_pairs

    torch.manual_seed(0)
    net = nn.Sequential(nn.ConvTranspose2d(2, 5, 3), nn.ReLU(), nn.ConvTranspose2d(5, 3, 3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).double()
    model = falign.convert(net, "fa", seed=0)
    x, y = torch.randn(16, 2, 4, 4, dtype=torch.float64), torch.randint(0, 4, (16,))
    pairs = find_pairs(model, x[:2])
    assert [p.key for p in pairs] == ["0->2", "2->5"]
    ref = conservation(pairs)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(50):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for key, q in conservation(pairs).items():
        d = drift(q, ref[key])
        assert d["relative"] < 1e-3, (key, d)
    moved = float((pairs[0].layer_in.weight - net[0].weight).detach().abs().max())
    assert moved > 1e-4  # it trained


@st.composite
def random_configs(draw):
    dims = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 2]))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 3))
    stride, dilation = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    padding = draw(st.integers(0, (dilation * (kernel - 1)) // 2))
    output_padding = draw(st.integers(0, max(stride, dilation) - 1))
    return (dims, cin, cout, kernel, stride, padding, output_padding, groups, dilation, draw(st.booleans()), None)


@settings(max_examples=40, deadline=None)
@given(random_configs(), st.sampled_from(FEEDBACK_RULES))
def test_random_configurations_follow_the_rule(cfg, rule):
    """Hypothesis: any option combination — B = W (backprop mode) reproduces autograd, B ≠ W puts B where the
    input gradient transports W, the weight gradient stays local."""
    model, plain, g = _backprop_mode_matches_autograd(cfg, rule)
    x3 = _input(cfg)
    model.zero_grad()
    model(x3).backward(g)
    b = model.t.current_feedback()
    xr = _input(cfg)
    (expect_x,) = torch.autograd.grad(_plain(model.t, xr, b, cfg), xr, g)
    torch.testing.assert_close(x3.grad, expect_x)
    torch.testing.assert_close(model.t.weight.grad, plain.t.weight.grad)
