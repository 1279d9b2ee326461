"""Property-based: random architectures with random layer options; bp and B = W give autograd's gradients."""

from __future__ import annotations

import copy
import itertools

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import falign
from tests.rule_reference import REFERENCE

# every registered rule whose signal travels layer by layer (B = W makes it backprop)
LAYER_RULES = [r for r in falign.available_rules() if not falign.get_rule(r).direct]

DT = torch.float64


@st.composite
def conv_stack(draw):
    """A random Conv2d stack (random stride, dilation, groups, padding and mode, bias) + Linear head."""
    channels = draw(st.sampled_from([2, 4]))
    size = draw(st.integers(7, 10))
    layers: list[nn.Module] = []
    for _ in range(draw(st.integers(1, 3))):
        out = draw(st.sampled_from([2, 4, 6]))
        groups = draw(st.sampled_from([g for g in (1, 2) if channels % g == 0 and out % g == 0]))
        kernel = draw(st.integers(1, 3))
        mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
        padding = draw(st.sampled_from(["same", 0, 1])) if mode == "zeros" else draw(st.sampled_from(["same", 1]))
        stride = 1 if padding == "same" else draw(st.integers(1, 2))
        dilation = draw(st.integers(1, 2))
        layers.append(nn.Conv2d(channels, out, kernel, stride=stride, padding=padding, dilation=dilation,
                                groups=groups, bias=draw(st.booleans()), padding_mode=mode))
        layers.append(draw(st.sampled_from([nn.ReLU(), nn.Tanh(), nn.Identity()])))
        channels = out
    net = nn.Sequential(*layers)
    try:
        with torch.no_grad():
            shape = net(torch.zeros(1, layers[0].in_channels, size, size)).shape
    except RuntimeError:  # the kernel no longer fits the shrunken map, or padding too large for the mode
        assume(False)
    net.append(nn.Flatten())
    net.append(nn.Linear(shape[1:].numel(), draw(st.integers(2, 5)), bias=draw(st.booleans())))
    return net.to(DT), (layers[0].in_channels, size, size)


@st.composite
def mlp_stack(draw):
    widths = draw(st.lists(st.integers(1, 9), min_size=2, max_size=5))
    seq = draw(st.integers(0, 3))  # extra leading dimensions
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b, bias=draw(st.booleans())), draw(st.sampled_from([nn.ReLU(), nn.GELU()]))]
    return nn.Sequential(*layers).to(DT), (*([2] * seq), widths[0])


def grads(model: nn.Module, x: torch.Tensor):
    x = x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=DT).reshape(out.shape))
    return [x.grad] + [p.grad for n, p in model.named_parameters() if "feedback" not in n]


def check(net: nn.Module, shape: tuple[int, ...], seed: int) -> None:
    x = torch.randn(3, *shape, dtype=DT, generator=torch.Generator().manual_seed(seed))
    expected = grads(copy.deepcopy(net), x)
    for rule in LAYER_RULES:
        model = falign.convert(net, rule, seed=seed)
        for layer in falign.feedback_layers(model):
            assert REFERENCE[rule].exact(layer, False)  # B = W as the reference table sets it
        for got, want in zip(grads(model, x), expected):
            torch.testing.assert_close(got, want)


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(conv_stack(), st.integers(0, 1000))
def test_random_conv_architectures(net_shape, seed):
    check(*net_shape, seed)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(mlp_stack(), st.integers(0, 1000))
def test_random_mlps_with_leading_dims(net_shape, seed):
    check(*net_shape, seed)
