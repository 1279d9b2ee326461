"""falign.TrainStep: the one training step the experiments and benchmarks share (attach once, the target before
each forward pass, zero, backward, update) equals the loop written out by hand, and cannot forget what a rule
needs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import falign
from falign.functional import backprop_mode
from tests.core.test_rule_triad import rule_grads


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def _data(n: int = 24):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _by_hand(rule: str, backprop: bool = False, steps: int = 5) -> nn.Module:
    """The loop written out: the triad's own gradient helper (zero, target, loss, backward), then the update."""
    model = falign.convert(_net(), rule, seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    falign.attach(model, opt)
    x, y = _data()
    for _ in range(steps):
        rule_grads(model, x, y, backprop)
        opt.step()
    return model


def _with_train_step(rule: str, backprop: bool = False, steps: int = 5) -> nn.Module:
    model = falign.convert(_net(), rule, seed=3)
    step = falign.TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), backprop=backprop)
    x, y = _data()
    for _ in range(steps):
        loss = step(x, y)
        assert not loss.requires_grad
    return model


@pytest.mark.parametrize("rule", ["fa", "brsf", "wm", "kp", "drtp", "dfa"])
def test_train_step_equals_the_loop_written_out(rule):
    a, b = _by_hand(rule), _with_train_step(rule)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_backprop_mode_trains_as_backprop():
    a, b = _by_hand("fa", backprop=True), _with_train_step("fa", backprop=True)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    fa = _with_train_step("fa")  # the control: without backprop mode fa trains elsewhere
    assert not torch.equal(fa[0].weight, b[0].weight)


def test_the_per_step_work_and_the_target_are_not_forgotten():
    model = _with_train_step("brsf", steps=4)
    assert {int(layer.feedback_step) for layer in falign.feedback_layers(model)} == {4}
    # drtp projects the target: TrainStep sets it; the same step without set_target stops with an error
    model = falign.convert(_net(), "drtp", seed=3)
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(Exception, match="target"):
        nn.functional.cross_entropy(model(x), y).backward()
    falign.TrainStep(model, opt)(x, y)


def test_measure_sees_the_gradients_before_the_update():
    model = falign.convert(_net(), "fa", seed=3)
    step = falign.TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = _data()
    seen = {}

    def measure(loss: torch.Tensor) -> None:
        seen["grad"] = model[0].weight.grad.clone()
        seen["weight"] = model[0].weight.detach().clone()
        with backprop_mode():  # the graph is still there: a second backward, backprop's
            seen["bp"] = torch.autograd.grad(loss, model[0].weight)[0]

    step(x, y, measure=measure)
    assert torch.allclose(model[0].weight, seen["weight"] - 0.1 * seen["grad"])
    assert not torch.allclose(seen["grad"], seen["bp"])  # fa's update is not backprop's gradient


def test_train_step_under_autocast_equals_the_loop_written_out():
    """Called inside ``torch.autocast`` (CPU bfloat16), as a user's loop would: the same weights as the written-out
    loop under the same autocast, and not those of the float32 loop (autocast was in force)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = _by_hand("fa"), _with_train_step("fa")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert not torch.equal(_by_hand("fa")[0].weight, b[0].weight)
