"""falign.convert: any architecture, clear errors, reports, state_dict, seeds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import falign
from falign.models import MLP, LeNet5, resnet20
from falign.nn import FAConv2d, FALinear
from falign.rules import get_rule
from tests.conftest import with_target
from tests.rule_reference import REFERENCE


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(self.inner(x)) + x


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.blocks = nn.ModuleList([Residual(), Residual()])
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8, 3))
        self.pool = nn.AdaptiveAvgPool2d((1, 2))

    def forward(self, x):
        h = self.pool(self.stem(x)).flatten(1)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


@pytest.mark.parametrize("rule", falign.available_rules())
def test_convert_nested_residual(rule):
    net = Nested()
    model = falign.convert(net, rule, seed=1)
    report = falign.conversion_report(model)
    assert report.converted == ["stem.0", "blocks.0.inner.0", "blocks.0.proj", "blocks.1.inner.0",
                                "blocks.1.proj", "head.1"]
    assert report.left_on_backprop == ["stem.1"]  # BatchNorm keeps its exact gradient
    assert isinstance(model.stem[0], FAConv2d) and isinstance(model.blocks[1].proj, FALinear)
    assert not isinstance(net.stem[0], FAConv2d)  # the original is untouched (not inplace)
    torch.testing.assert_close(model.blocks[0].proj.weight, net.blocks[0].proj.weight)
    x = torch.randn(4, 1, 4, 4)
    torch.testing.assert_close(model(x), net(x))  # same function, only the backward changes
    loss = with_target(model, x).logsumexp(1).mean()
    loss.backward()
    unused = {f"{n}.feedback_weight" for n, m in model.named_modules()
              if isinstance(m, falign.nn.FeedbackLayer) and not m.feedback_used}  # the stem's input is data
    for name, p in model.named_parameters():
        if name not in unused:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_convert_shares_parameters_inplace():
    net = MLP([4, 5, 3])
    model = falign.convert(net, "fa", inplace=True)
    assert model is net and isinstance(net.fc1, FALinear)


class OwnAttention(nn.MultiheadAttention):
    """A subclass with its own forward: falign cannot know what it computes."""

    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


@pytest.mark.parametrize(
    ("layer", "name"),
    [(nn.LSTMCell(4, 4), "LSTMCell"), (OwnAttention(4, 2), "OwnAttention"), (nn.GRUCell(4, 4), "GRUCell")],
)
def test_unsupported_layer_error_names_it(layer, name):
    net = nn.Sequential(nn.Linear(4, 4), layer)
    with pytest.raises(falign.ConversionError, match=rf"'1' \({name}, parameters: "):
        falign.convert(net, "fa")
    model = falign.convert(net, "fa", unsupported="backprop")
    report = falign.conversion_report(model)
    assert report.unsupported == ["1"] and report.converted == ["0"]
    if name == "OwnAttention":  # its out_proj is read directly by F.multi_head_attention_forward
        assert type(model[1].out_proj) is not FALinear


def test_linear_subclass_is_not_silently_converted():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(falign.ConversionError, match="Scaled"):
        falign.convert(nn.Sequential(Scaled(3, 3), nn.Linear(3, 2)), "fa")


def test_no_convertible_layer_and_bad_options():
    with pytest.raises(falign.ConversionError, match="no layer"):
        falign.convert(nn.Sequential(nn.ReLU()), "fa")
    with pytest.raises(ValueError, match="unknown rule 'xx'"):
        falign.convert(MLP([3, 2]), "xx")
    with pytest.raises(ValueError, match="output_signal"):
        falign.convert(MLP([3, 2]), "fa", output_signal="maybe")
    with pytest.raises(ValueError, match="feedback_init"):
        falign.convert(MLP([3, 2]), "fa", feedback_init="orthogonal")
    with pytest.raises(ValueError, match="output_layer"):
        falign.convert(MLP([3, 2]), "fa", output_layer="nope")
    with pytest.raises(ValueError, match="output_features=3 was given"):
        falign.convert(MLP([4, 2]), "dfa", output_features=3, example_input=torch.randn(2, 4))
    with pytest.raises(TypeError, match="rule 'fa'"):
        falign.convert(MLP([3, 2]), "fa", lr=0.1)


def test_output_signal_backprop_makes_output_layer_bp():
    model = falign.convert(MLP([4, 6, 3]), "fa", output_signal="backprop")
    assert falign.conversion_report(model).output_layer is None  # found on the first forward pass
    model(torch.randn(2, 4))
    assert model.fc2.rule.name == "bp" and model.fc1.rule.name == "fa"
    assert "backprop" in falign.conversion_report(model).layers[-1].note


@pytest.mark.parametrize("rule", falign.available_rules())
def test_state_dict_round_trip_keeps_feedback(rule):
    torch.manual_seed(0)
    net = LeNet5(1, 4, 8)
    a = falign.convert(net, rule, seed=1)
    x = torch.randn(3, 1, 8, 8)
    with_target(a, x).sum().backward()  # direct rules' feedback exists after a forward
    falign.step_rules(a)  # per-step rules move their feedback once
    sd = a.state_dict()
    fb_keys = [k for k in sd if k.endswith("feedback_weight") or k.endswith("feedback_step")]
    n_feedback = len([k for k in fb_keys if k.endswith("feedback_weight")])
    assert n_feedback == (5 if falign.get_rule(rule).has_feedback else 0)
    b = falign.convert(net, rule, seed=99)  # different seed: different feedback until loaded
    b.load_state_dict(sd)  # dfa: feedback matrices not made yet are made from the state dict
    for k in fb_keys:
        assert torch.equal(b.state_dict()[k], sd[k]), k
    for la, lb in zip(falign.feedback_layers(a), falign.feedback_layers(b)):
        assert la.rule_state == lb.rule_state  # the rule's Python-side state follows the loaded buffers


@pytest.mark.parametrize("rule", [r for r in falign.available_rules() if falign.get_rule(r).has_feedback])
def test_same_seed_same_feedback_and_different_seed_differs(rule):
    a = falign.convert(MLP([6, 8, 8, 3]), rule, seed=5)
    b = falign.convert(MLP([6, 8, 8, 3]), rule, seed=5)
    c = falign.convert(MLP([6, 8, 8, 3]), rule, seed=6)
    for model in (a, b, c):
        model(torch.randn(2, 6))  # dfa sizes its feedback from the output of the first forward pass
    la, lb, lc = (falign.feedback_layers(m) for m in (a, b, c))
    for x, y in zip(la, lb):
        assert torch.equal(x.feedback_weight, y.feedback_weight)
    if REFERENCE[rule].seeded:
        assert not torch.equal(la[1].feedback_weight, lc[1].feedback_weight)
        assert not torch.equal(la[0].feedback_weight, la[1].feedback_weight[:, :6])


@pytest.mark.parametrize("rule", falign.available_rules())
def test_same_seed_identical_training(rule):
    from falign.app.train import TrainConfig, build_run
    from falign.app.train.trainer import make_optimizer

    def run():
        cfg = TrainConfig(rule=rule, hidden=(16,), epochs=1)
        ds, model = build_run(cfg, torch.device("cpu"))
        opt = make_optimizer(cfg, model)
        falign.attach(model, opt)
        for i in range(5):
            xb, yb = ds.x_train[i * 16 : (i + 1) * 16], ds.y_train[i * 16 : (i + 1) * 16]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(with_target(model, xb, yb), yb).backward()
            opt.step()
        return model.state_dict()

    a, b = run(), run()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_dfa_on_resnet_and_feedback_shapes():
    torch.manual_seed(0)
    model = falign.convert(resnet20(num_classes=5), "dfa")
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    layers = falign.feedback_layers(model)
    assert len(layers) == 20
    first, fc = model.conv, model.fc
    assert tuple(first.feedback_weight.shape) == (5, 3 * 32 * 32)
    assert tuple(fc.feedback_weight.shape) == (5, 64)
    assert not first.feedback_used and fc.feedback_used
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_dfa_wrong_output_features_is_clear():
    model = falign.convert(MLP([4, 6, 3]), "dfa", output_features=5)
    with pytest.raises(ValueError, match="output_features=5 was given"):
        model(torch.randn(2, 4))


def test_dfa_hand_built_layers_need_a_tap():
    net = nn.Sequential(FALinear(4, 6, rule="dfa", output_features=2), nn.ReLU(), FALinear(6, 2, rule="dfa",
                                                                                            output_features=2))
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="outside a forward pass of the converted model"):
        net(x).sum().backward()
    falign.install_error_tap(net, output_features=2)
    net.zero_grad()
    net(x).sum().backward()
    assert net[0].weight.grad is not None


def test_report_is_printable_and_requires_convert():
    model = falign.convert(Nested(), "fa")
    text = str(falign.conversion_report(model))
    assert "stem.0" in text and "BatchNorm2d" in text and "kept-backprop" in text
    with pytest.raises(ValueError, match=r"not produced by falign\.convert"):
        falign.conversion_report(nn.Linear(2, 2))


class _Branchy(nn.Module):
    """The output comes from ``head``; ``aux`` runs after it (the last layer run is not the output layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head, self.aux = nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(6, 2)
        self.aux_out: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.body(x))
        out = self.head(h)
        self.aux_out = self.aux(h)
        return out


@pytest.mark.parametrize("rule", [r for r in falign.available_rules() if not get_rule(r).direct])
def test_first_call_finds_the_output_layer_and_runs_hooks_once(rule):
    """Rules that need nothing before their layers run read the output layer off the first call's own graph:
    the model (and a user's forward hooks) run once; the layer found is the one that produced the output,
    not the last one run; gradients equal those of a model whose output layer was found by the probe."""
    torch.manual_seed(0)
    net, calls = _Branchy(), []
    net.body.register_forward_hook(lambda m, i, o: calls.append(1))
    model = falign.convert(net, rule, seed=2)
    probed = falign.convert(net, rule, seed=2, example_input=torch.randn(1, 4))
    x = torch.randn(5, 4)
    model(x).sum().backward()
    assert len(calls) == 1 + 1  # one for the first call, one for probed's example_input probe
    assert falign.conversion_report(model).output_layer == "head"
    assert falign.conversion_report(probed).output_layer == "head"
    probed(x).sum().backward()
    for (name, a), b in zip(model.named_parameters(), probed.parameters()):
        if a.grad is not None or b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_first_call_that_raises_or_runs_without_gradients():
    """A first call that raises finds nothing (the next one does); a first call without gradients has no
    graph to read, so the probe (gradients on) runs instead and still finds the true output layer."""
    model = falign.convert(_Branchy(), "fa")
    with pytest.raises(RuntimeError):
        model(torch.randn(5, 7))
    assert falign.conversion_report(model).output_layer is None
    assert not any(m._forward_hooks for m in falign.feedback_layers(model))  # the watch's hooks are gone
    model(torch.randn(5, 4))
    assert falign.conversion_report(model).output_layer == "head"
    quiet = falign.convert(_Branchy(), "fa")
    with torch.no_grad():
        quiet(torch.randn(5, 4))
    assert falign.conversion_report(quiet).output_layer == "head"


def test_direct_rules_still_probe_before_the_first_call():
    """The direct rules size D from the output before their layers run: their first call is probed (a user's
    hook sees it twice, as documented); with example_input= the probe is at convert time instead."""
    net, calls = MLP([4, 6, 3]), []
    net.fc1.register_forward_hook(lambda m, i, o: calls.append(1))
    model = falign.convert(net, "dfa")
    with_target(model, torch.randn(2, 4))
    assert len(calls) == 2
    early = falign.convert(net, "dfa", example_input=torch.randn(1, 4))
    assert len(calls) == 3
    with_target(early, torch.randn(2, 4))
    assert len(calls) == 4
