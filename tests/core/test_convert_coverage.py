"""What convert keeps and finds: shared modules, a module's own parameters, hooks, the output layer, and
parametrized, pruned, subclassed and lazy layers."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn
from torch.nn.utils import parametrizations

import falign
from falign.nn import FALinear, FeedbackLayer
from falign.rules import Signal
from tests.helpers import cli
from tests.rule_reference import REFERENCE

RULES = falign.available_rules()



# ---- shared modules are converted at every use -------------------------------------------------------
def test_a_module_used_three_times_is_converted_everywhere_and_stays_shared():
    lin = nn.Linear(4, 4)
    net = nn.Sequential(nn.ModuleList([lin] * 3))

    class Repeat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = net[0]

        def forward(self, x):
            for block in self.blocks:
                x = torch.relu(block(x))
            return x

    model = falign.convert(Repeat(), "fa")
    assert [type(b).__name__ for b in model.blocks] == ["FALinear"] * 3
    assert model.blocks[0] is model.blocks[1] is model.blocks[2]
    report = falign.conversion_report(model)
    assert report.converted == ["blocks.0", "blocks.1", "blocks.2"]
    assert [r.note for r in report.layers][1:] == ["same module as 'blocks.0'"] * 2
    x = torch.randn(3, 4, requires_grad=True)
    model(x).sum().backward()
    b = model.blocks[0].feedback_weight
    assert not torch.allclose(b, model.blocks[0].weight)  # the input signal used B at every use


def test_one_module_under_two_names_is_one_converted_layer():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Linear(5, 5)
            self.alias = self.encoder
            self.head = nn.Linear(5, 2)

        def forward(self, x):
            return self.head(self.alias(self.encoder(x)))

    model = falign.convert(Twice(), "fa")
    assert model.encoder is model.alias and isinstance(model.alias, FALinear)
    assert falign.conversion_report(model).converted == ["encoder", "alias", "head"]
    assert len(falign.feedback_layers(model)) == 2


# ---- a module with its own parameters: children converted, everything listed -------------------------
class LayerScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 6)
        self.gamma = nn.Parameter(torch.full((6,), 0.5))

    def forward(self, x):
        return x + self.gamma * self.fc2(torch.relu(self.fc1(x)))


def test_own_parameters_stay_exact_and_children_are_converted():
    net = nn.Sequential(LayerScale(), nn.Linear(6, 3))
    model = falign.convert(net, "fa", unsupported="backprop")
    assert isinstance(model[0].fc1, FALinear) and isinstance(model[0].fc2, FALinear)
    report = falign.conversion_report(model)
    assert report.converted == ["0.fc1", "0.fc2", "1"]
    assert report.unsupported == ["0"] and "gamma" in report.layers[0].note


def test_conversion_error_lists_every_unsupported_module_at_once():
    net = nn.Sequential(LayerScale(), nn.GRUCell(6, 6), nn.LSTMCell(6, 6), nn.Linear(6, 2))
    with pytest.raises(falign.ConversionError) as err:
        falign.convert(net, "fa")
    text = str(err.value)
    assert "3 module(s)" in text and "'0' (LayerScale" in text and "'1' (GRUCell" in text and "'2' (LSTMCell" in text


def test_opaque_attention_is_listed_with_its_out_projection():
    class OwnAttention(nn.MultiheadAttention):  # a subclass with its own forward stays opaque
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    model = falign.convert(nn.Sequential(nn.Linear(4, 4), OwnAttention(4, 2)), "fa", unsupported="backprop")
    note = falign.conversion_report(model).layers[-1].note
    assert "out_proj.weight" in note and type(model[1].out_proj) is not FALinear


# ---- hooks on the original layer survive conversion ---------------------------------------------------
@pytest.mark.parametrize("inplace", [False, True])
def test_forward_hooks_and_pre_hooks_are_carried_over(inplace):
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    seen = []
    net[0].register_forward_pre_hook(lambda m, args: seen.append("pre"))
    handle = net[0].register_forward_hook(lambda m, args, out: seen.append("post"))
    model = falign.convert(net, "fa", inplace=inplace)
    model(torch.randn(2, 3))
    assert seen.count("pre") >= 1 and seen.count("post") >= 1
    if inplace:
        handle.remove()  # the user's handle still works: it is the same hook dictionary
        seen.clear()
        model(torch.randn(2, 3))
        assert seen == ["pre"]


# ---- an empty experiment selection is an error ------------------------------------------------------
def test_reproduce_only_empty_is_an_error(tmp_path, capsys):
    code, text = cli(["reproduce", "--only", "", "--out", str(tmp_path / "r")], capsys)
    assert code == 1 and "--only names no experiment" in text and not (tmp_path / "r").exists()


# ---- parametrized, pruned, subclassed and lazy layers ----------------------------------------------
def _mlp():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _pruned():
    net = _mlp()
    prune.l1_unstructured(net[2], "weight", 0.5)
    return net


def _spectral():
    net = _mlp()
    parametrizations.spectral_norm(net[2])
    return net


def _weight_norm():
    net = _mlp()
    parametrizations.weight_norm(net[2])
    return net


class PlainSubclass(nn.Linear):
    """A subclass that only adds an attribute."""

    tag = "mine"


def _subclass():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), PlainSubclass(8, 3))


def _lazy_after_call():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.LazyLinear(3))
    net(torch.randn(1, 4))
    return net


@pytest.mark.parametrize("build", [_pruned, _spectral, _weight_norm, _subclass, _lazy_after_call])
@pytest.mark.parametrize("rule", [r for r in RULES if falign.get_rule(r).has_feedback and falign.get_rule(r).signal
                                  is Signal.LAYER])
def test_special_linear_layers_convert_and_follow_the_rule(build, rule):
    torch.manual_seed(0)
    net = build()
    model = falign.convert(net, rule, seed=1)
    special = model[2]
    assert isinstance(special, FeedbackLayer) and isinstance(special, type(net[2]))
    x = torch.randn(5, 4)
    torch.testing.assert_close(model(x), net(x))
    # the input signal of the special layer follows the rule's formula g·B (B of its effective weight)
    h = torch.relu(model[0](x)).detach().requires_grad_()
    g = torch.randn(5, 3)
    special(h).backward(g)
    b = REFERENCE[rule].matrix(special)
    torch.testing.assert_close(h.grad, g @ b)
    assert not torch.allclose(b, special.weight)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    falign.attach(model, opt)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_pruned_mask_still_applies_after_conversion():
    net = _pruned()
    model = falign.convert(net, "fa")
    mask = model[2].weight_mask
    assert torch.equal(model[2].weight == 0, mask == 0) and int((mask == 0).sum()) == 12
    model(torch.randn(3, 4)).sum().backward()
    assert torch.equal(model[2].weight_orig.grad[mask == 0], torch.zeros(12))  # pruned weights get no update


def test_subclass_with_its_own_forward_and_an_uninitialised_lazy_layer_are_clear_errors():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(falign.ConversionError, match=r"Scaled.*overrides forward"):
        falign.convert(nn.Sequential(Scaled(3, 3), nn.Linear(3, 2)), "fa")
    with pytest.raises(falign.ConversionError, match="lazy layer not initialised yet: run one forward pass"):
        falign.convert(nn.Sequential(nn.LazyLinear(3), nn.Linear(3, 2)), "fa")


def test_jit_trace_records_the_forward_and_warns_that_its_backward_is_backprop():
    model = falign.convert(_mlp(), "fa", example_input=torch.randn(2, 4))
    x = torch.randn(2, 4)
    with pytest.warns(falign.nn.TracedBackpropWarning, match="backward is backprop"):
        with warnings.catch_warnings():
            for category in (DeprecationWarning, FutureWarning):  # torch 2.9+ deprecates jit.trace (2.14: Future)
                warnings.filterwarnings("ignore", category=category)
            traced = torch.jit.trace(model, x)
    torch.testing.assert_close(traced(x), model(x))
    guide = (Path(__file__).parents[2] / "docs" / "guides" / "python.md").read_text()
    assert "torch.jit.trace" in guide
