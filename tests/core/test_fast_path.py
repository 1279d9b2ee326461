"""The eager fast path of ``feedback_linear`` / ``feedback_conv``: PyTorch's own op and backward, with ``B`` handed to
the backward where the op saved ``W`` (saved-tensor hooks). It must give the ``autograd.Function`` path's numbers,
be taken on the pinned torch (a silent fallback would only cost speed, so a test watches for it), keep autograd's
in-place checks, and refuse what it cannot do (a ``create_graph`` backward) loudly."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import falign
import falign.functional as FF

DT = torch.float64

LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), (4, 6)),
    "linear-3d": (lambda: nn.Linear(6, 5), (4, 3, 6)),
    "linear-unbatched": (lambda: nn.Linear(6, 5), (6,)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), (2, 3, 9)),
    "conv2d-groups-stride": (lambda: nn.Conv2d(4, 6, 3, stride=2, groups=2), (2, 4, 9, 9)),
    "conv2d-reflect": (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (2, 3, 7, 7)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2), (2, 2, 4, 4, 4)),
    "conv-transpose2d": (lambda: nn.ConvTranspose2d(3, 2, 3, stride=2, output_padding=1), (2, 3, 5, 5)),
}


def _layer(kind: str, rule: str) -> nn.Module:
    build, _ = LAYERS[kind]
    torch.manual_seed(0)
    layer = falign.convert(nn.Sequential(build()).to(DT), rule, seed=3)[0]
    return layer


def _grads(layer: nn.Module, x: torch.Tensor) -> tuple[str, list[torch.Tensor]]:
    x = x.detach().clone().requires_grad_()
    for p in layer.parameters():
        p.grad = None
    y = layer(x)
    y.pow(3).sum().backward()
    return type(y.grad_fn).__name__, [x.grad, layer.weight.grad, layer.bias.grad]


@pytest.mark.parametrize("rule", ["fa", "usf", "brsf", "wm"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_fast_path_is_taken_and_equals_the_function_path(kind, rule):
    layer = _layer(kind, rule)
    x = torch.randn(*LAYERS[kind][1], dtype=DT, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback would warn
        node, fast = _grads(layer, x)
    assert "Feedback" not in node, f"the fast path was not taken: {node}"  # PyTorch's own backward node
    with FF.double_backward():  # forces the autograd.Function path
        node_f, slow = _grads(layer, x)
    assert "Feedback" in node_f  # control: the other path is the Function's
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # and the rule is in force: backprop's input gradient differs
    with falign.functional.backprop_mode():
        _, true = _grads(layer, x)
    assert not torch.allclose(true[0], fast[0])
    torch.testing.assert_close(true[1], fast[1])  # the weight gradient is backprop's local one


def test_backprop_mode_through_the_fast_path_is_backprop():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Conv1d(1, 2, 3)).to(DT)
    model = falign.convert(plain, "fa", seed=1, unsupported="backprop")
    x = torch.randn(4, 1, 5, dtype=DT, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    with falign.functional.backprop_mode():
        model(x).pow(2).sum().backward()
    plain(xr).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)


def test_create_graph_through_the_fast_path_is_refused_and_the_context_allows_it():
    layer = _layer("linear", "fa")
    x = torch.randn(4, 6, dtype=DT, requires_grad=True)
    with pytest.raises(RuntimeError, match="double_backward"):
        torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    with FF.double_backward():
        y = layer(x)
    (g,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    g.pow(2).sum().backward()  # differentiable: the rule's formula is checked in test_rule_semantics
    assert layer.weight.grad is not None
    # a backward without create_graph is unaffected (control: the refusal is only for graph-building backwards)
    layer(x).pow(2).sum().backward()


@pytest.mark.parametrize("changed", ["input", "weight", "feedback"])
def test_in_place_changes_between_forward_and_backward_are_caught(changed):
    layer = _layer("linear", "fa")
    h = torch.randn(4, 6, dtype=DT, requires_grad=True)
    x = h * 1.0  # a non-leaf input, as in a network
    y = layer(x)
    with torch.no_grad():
        {"input": x, "weight": layer.weight, "feedback": layer.feedback_weight}[changed].add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    # control: without the change the same backward runs
    layer(h * 1.0).sum().backward()


def test_another_saved_tensor_hook_gets_every_tensor_and_the_function_path_runs():
    layer = _layer("conv1d", "fa")
    x = torch.randn(2, 3, 9, dtype=DT)
    _, expected = _grads(layer, x)
    seen = []

    def pack(t):
        seen.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        node, got = _grads(layer, x)
    assert "Feedback" in node and seen  # the user's hook saw the layer's tensors
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
    with torch.autograd.graph.save_on_cpu():
        _, got = _grads(layer, x)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_autocast_takes_the_function_path():
    layer = _layer("linear", "fa").float()
    x = torch.randn(4, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and "Feedback" in type(y.grad_fn).__name__


def test_an_unrecognised_saved_weight_falls_back_with_one_warning(monkeypatch):
    """Negative control for the check above: if the op saved W where the hooks do not look (another torch), the
    call warns and takes the Function path, whose numbers are the rule's."""
    layer = _layer("conv2d-reflect", "fa")
    x = torch.randn(2, 3, 7, 7, dtype=DT)
    _, expected = _grads(layer, x)
    monkeypatch.setattr(FF._SwapSaved, "pack", lambda self, t: (t, t._version, None, False))
    monkeypatch.setattr(FF, "_warned_no_swap", set())
    with pytest.warns(RuntimeWarning, match="fast path"):
        node, got = _grads(layer, x)
    assert "Feedback" in node
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
