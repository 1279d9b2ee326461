"""Each converted layer's backward: B = W reproduces autograd; B ≠ W follows the rule's formula."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.nn.grad import conv1d_input, conv2d_input

import falign
from falign.nn import FAConv1d, FAConv2d, FALinear
from falign.rules import RULES
from tests.conftest import make_upstream
from tests.rule_reference import REFERENCE

DT = torch.float64
# every registered rule whose signal travels layer by layer through a B of W's shape (direct rules have
# their own tests: their D maps the output error, not this layer's g)
LAYER_RULES = [name for name in falign.available_rules() if not RULES[name]().direct]
FEEDBACK_RULES = [name for name in LAYER_RULES if RULES[name]().has_feedback]


def grads(module: nn.Module, x: torch.Tensor, g_seed: int = 7):
    """(output, upstream g, input grad, weight grad, bias grad) of one backward pass."""
    x = x.clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    y = module(x)
    g = make_upstream(y, g_seed)
    y.backward(g)
    b = None if module.bias is None else module.bias.grad.clone()
    return y.detach(), g, x.grad.clone(), module.weight.grad.clone(), b


def set_b_equal_w(layer) -> None:
    """Make the rule's backward matrix equal W, as the reference table says for this rule."""
    assert REFERENCE[layer.rule.name].exact(layer, False)


def rule_b(layer) -> torch.Tensor:
    """The rule's defining formula for B, from the reference table (independent of the library's code)."""
    return REFERENCE[layer.rule.name].matrix(layer)


LINEAR_CASES = [((5, 7), True), ((5, 7), False), ((3, 4, 7), True), ((2, 3, 4, 7), False)]


@pytest.mark.parametrize("rule", LAYER_RULES)
@pytest.mark.parametrize(("shape", "bias"), LINEAR_CASES)
def test_linear_b_equals_w_matches_autograd(rule, shape, bias):
    ref = nn.Linear(7, 6, bias=bias, dtype=DT)
    layer = FALinear.from_module(ref, rule=rule, seed=3)
    set_b_equal_w(layer)
    x = torch.randn(shape, dtype=DT)
    y0, _, gx0, gw0, gb0 = grads(ref, x)
    y1, _, gx1, gw1, gb1 = grads(layer, x)
    torch.testing.assert_close(gx1, gx0)
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(gw1, gw0)
    if bias:
        torch.testing.assert_close(gb1, gb0)


@pytest.mark.parametrize("rule", FEEDBACK_RULES)
@pytest.mark.parametrize(("shape", "bias"), LINEAR_CASES)
def test_linear_b_not_w_follows_formula(rule, shape, bias):
    ref = nn.Linear(7, 6, bias=bias, dtype=DT)
    layer = FALinear.from_module(ref, rule=rule, seed=11)
    x = torch.randn(shape, dtype=DT)
    _, g, gx, gw, gb = grads(layer, x)
    b = rule_b(layer)
    assert (b - layer.weight).abs().max() > 1e-3  # really B != W
    torch.testing.assert_close(gx, g @ b)
    # weight and bias gradients are backprop's local ones for the same g
    g2, x2 = g.reshape(-1, 6), x.reshape(-1, 7)
    torch.testing.assert_close(gw, g2.T @ x2)
    if bias:
        torch.testing.assert_close(gb, g2.sum(0))
    # and they equal what autograd gives the plain layer for the same upstream g
    _, _, gx_bp, gw_bp, _ = grads(ref, x)
    torch.testing.assert_close(gw, gw_bp)
    assert not torch.allclose(gx, gx_bp)


CONV2D_OPTIONS = [
    dict(stride=1, padding=0, dilation=1, groups=1, bias=True, padding_mode="zeros"),
    dict(stride=2, padding=1, dilation=1, groups=1, bias=False, padding_mode="zeros"),
    dict(stride=1, padding="same", dilation=2, groups=1, bias=True, padding_mode="zeros"),
    dict(stride=1, padding="valid", dilation=1, groups=2, bias=True, padding_mode="zeros"),
    dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2, bias=True, padding_mode="zeros"),
    *[dict(stride=1, padding=p, dilation=1, groups=1, bias=True, padding_mode=m)
      for p, m in itertools.product([1, "same"], ["reflect", "replicate", "circular"])],
]
EVEN_KERNEL_SAME = dict(stride=1, padding="same", dilation=1, groups=1, bias=True, padding_mode="zeros")


def conv2d_pair(kernel: int, opts: dict, rule: str):
    ref = nn.Conv2d(4, 6, kernel, dtype=DT, **opts)
    return ref, FAConv2d.from_module(ref, rule=rule, seed=5)


@pytest.mark.parametrize("rule", LAYER_RULES)
@pytest.mark.parametrize("opts", [*CONV2D_OPTIONS, EVEN_KERNEL_SAME], ids=str)
def test_conv2d_b_equals_w_matches_autograd(rule, opts):
    kernel = 4 if opts is EVEN_KERNEL_SAME else 3
    ref, layer = conv2d_pair(kernel, opts, rule)
    set_b_equal_w(layer)
    x = torch.randn(2, 4, 9, 10, dtype=DT)
    y0, _, gx0, gw0, gb0 = grads(ref, x)
    y1, _, gx1, gw1, gb1 = grads(layer, x)
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(gx1, gx0)
    torch.testing.assert_close(gw1, gw0)
    if opts["bias"]:
        torch.testing.assert_close(gb1, gb0)


@pytest.mark.parametrize("rule", FEEDBACK_RULES)
@pytest.mark.parametrize("opts", CONV2D_OPTIONS[:5], ids=str)
def test_conv2d_b_not_w_is_transposed_conv_with_b(rule, opts):
    ref, layer = conv2d_pair(3, opts, rule)
    x = torch.randn(2, 4, 9, 10, dtype=DT)
    _, g, gx, gw, gb = grads(layer, x)
    b = rule_b(layer)
    pad = layer._padding_plan()[2]
    expected = conv2d_input(x.shape, b, g, stride=layer.stride, padding=pad, dilation=layer.dilation,
                            groups=layer.groups)
    torch.testing.assert_close(gx, expected)
    _, _, gx_bp, gw_bp, gb_bp = grads(ref, x)
    torch.testing.assert_close(gw, gw_bp)
    if opts["bias"]:
        torch.testing.assert_close(gb, gb_bp)
    assert not torch.allclose(gx, gx_bp)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("rule", LAYER_RULES)
def test_conv1d_matches_autograd_and_formula(rule, padding_mode):
    ref = nn.Conv1d(3, 4, 3, stride=2, padding=1, padding_mode=padding_mode, dtype=DT)
    layer = FAConv1d.from_module(ref, rule=rule, seed=2)
    x = torch.randn(2, 3, 11, dtype=DT)
    if padding_mode == "zeros":
        _, g, gx, _, _ = grads(layer, x)
        expected = conv1d_input(x.shape, rule_b(layer), g, stride=2, padding=1)
        torch.testing.assert_close(gx, expected)
    set_b_equal_w(layer)
    y0, _, gx0, gw0, gb0 = grads(ref, x)
    y1, _, gx1, gw1, gb1 = grads(layer, x)
    for a, b in ((y0, y1), (gx0, gx1), (gw0, gw1), (gb0, gb1)):
        torch.testing.assert_close(b, a)


def test_conv1d_same_padding_groups_dilation():
    ref = nn.Conv1d(4, 4, 4, padding="same", dilation=1, groups=4, bias=False, dtype=DT)
    layer = FAConv1d.from_module(ref, rule="fa", seed=0)
    set_b_equal_w(layer)
    x = torch.randn(3, 4, 12, dtype=DT)
    for a, b in zip(grads(ref, x), grads(layer, x)):
        if a is not None:
            torch.testing.assert_close(b, a)


def test_feedback_weight_is_buffer_or_parameter():
    fa = FALinear(5, 4, rule="fa")
    assert "feedback_weight" in dict(fa.named_buffers())
    assert "feedback_weight" not in dict(fa.named_parameters())
    assert "feedback_weight" in fa.state_dict()
    kp = FALinear(5, 4, rule="kp")
    assert "feedback_weight" in dict(kp.named_parameters())
    assert FALinear(5, 4, rule="bp").feedback_weight is None
    moved = fa.to(torch.float64)
    assert moved.feedback_weight.dtype == torch.float64


def test_kp_feedback_receives_exactly_the_weight_gradient():
    layer = FALinear(6, 5, rule="kp", dtype=DT)
    x = torch.randn(4, 6, dtype=DT)  # no input grad needed: B still trained
    layer(x).pow(2).sum().backward()
    torch.testing.assert_close(layer.feedback_weight.grad, layer.weight.grad)
    assert layer.feedback_weight.grad.data_ptr() != layer.weight.grad.data_ptr()


def test_usf_uses_current_sign_each_step():
    layer = FALinear(6, 5, rule="usf", dtype=DT)
    x = torch.randn(3, 6, dtype=DT)
    _, _, gx, _, _ = grads(layer, x)
    with torch.no_grad():
        layer.weight.mul_(-1.0)
    _, g2, gx2, _, _ = grads(layer, x)
    s = layer.feedback_init.std((5, 6))
    torch.testing.assert_close(gx2, g2 @ (s * torch.sign(layer.weight.detach())))
    torch.testing.assert_close(gx2, -gx)  # the sign flip really reached the backward


def test_brsf_redraws_at_each_step_and_frsf_does_not():
    x = torch.randn(3, 6, dtype=DT)
    for rule, changes in (("brsf", True), ("frsf", False)):
        layer = FALinear(6, 5, rule=rule, dtype=DT, seed=4)
        seen = []
        for _ in range(3):
            _, g, gx, _, _ = grads(layer, x)
            _, _, gx_again, _, _ = grads(layer, x)  # a second backward without a step: same B
            torch.testing.assert_close(gx_again, gx)
            seen.append(layer.feedback_weight.clone())
            torch.testing.assert_close(gx, g @ (seen[-1] * torch.sign(layer.weight.detach())))
            falign.step_rules(layer)  # what the optimiser step hook of falign.attach runs
        differs = [not torch.equal(seen[i], seen[i + 1]) for i in range(2)]
        assert all(differs) if changes else not any(differs)


def test_brsf_draws_are_reproducible_and_uniform():
    a, b = FALinear(64, 64, rule="brsf", seed=9), FALinear(64, 64, rule="brsf", seed=9)
    x = torch.randn(2, 64, requires_grad=True)
    for _ in range(2):
        a(x).sum().backward()
        b(x).sum().backward()
        falign.step_rules(a)
        falign.step_rules(b)
    assert torch.equal(a.feedback_weight, b.feedback_weight)
    assert int(a.feedback_step) == 2
    m = a.feedback_weight / (a.feedback_init.std((64, 64)) * 3**0.5)  # U(0, 1) at 8-bit resolution
    assert 0 < m.min() and m.max() < 1
    k = m * 256 - 0.5  # on the grid (k + ½)/256, every one of the 256 levels drawn (4096 draws)
    torch.testing.assert_close(k, k.round(), atol=1e-3, rtol=0)
    assert torch.unique(k.round()).numel() == 256
    assert abs(m.mean().item() - 0.5) < 0.02 and abs(m.var().item() - 1 / 12) < 0.01
    from scipy import stats

    assert stats.kstest(m.flatten().double().numpy(), "uniform").pvalue > 1e-3


def test_no_input_signal_when_input_needs_no_grad():
    layer = FALinear(6, 5, rule="brsf")
    layer(torch.randn(3, 6)).sum().backward()
    assert int(layer.feedback_step) == 0 and not layer.feedback_used
    assert layer.weight.grad is not None


def test_feedback_shape_error():
    with pytest.raises(ValueError, match="feedback shape"):
        falign.functional.feedback_linear(torch.randn(2, 3), torch.randn(4, 3), None, torch.randn(3, 4))
