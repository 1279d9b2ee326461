"""falign inside the rest of the PyTorch toolbox: loops it did not write (plain, PyTorch Lightning), torch.func,
unconvert and plain state dicts, numerically sound angles."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import falign
from falign.diagnostics import angle
from falign.models import MLP

DT = torch.float64
PER_STEP = [r for r in falign.available_rules() if falign.get_rule(r).per_step]


def task(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 10, generator=g)
    return x, (x @ torch.randn(10, 4, generator=g)).argmax(1)


def mean_angle(model) -> float:
    return sum(angle(l.weight, l.current_feedback()) for l in falign.feedback_layers(model)) / 3


def test_wm_learns_its_feedback_in_a_plain_loop_through_the_step_hook():
    torch.manual_seed(0)
    model = falign.convert(MLP([10, 32, 32, 4]), "wm", seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    falign.attach(model, opt)  # the only falign call in this loop
    x, y = task()
    before = mean_angle(model)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert before > 60 and mean_angle(model) < 15


@pytest.mark.parametrize("rule", PER_STEP)
def test_per_step_rule_without_the_hook_fails_loudly(rule):
    model = falign.convert(MLP([10, 16, 4]), rule)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = task()
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        break
    with pytest.raises(RuntimeError, match=r"falign\.attach\(model, optimizer\)"):
        model(x)
    falign.step_rules(model)  # running the work by hand is the other way
    model(x)


def test_wm_trains_under_pytorch_lightning():
    lightning = pytest.importorskip("lightning.pytorch", reason="the test extra installs lightning")

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = falign.convert(MLP([10, 32, 32, 4]), "wm", seed=0)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
            falign.attach(self.net, opt)
            return opt

    torch.manual_seed(0)
    x, y = task()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=256)
    module = Module()
    before = mean_angle(module.net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about workers and loggers
        trainer = lightning.Trainer(max_epochs=100, logger=False, enable_checkpointing=False,
                                    enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
        trainer.fit(module, loader)
    assert before > 60 and mean_angle(module.net) < 15


@pytest.mark.parametrize("rule", [r for r in falign.available_rules() if falign.get_rule(r).feedback_is_parameter])
def test_an_optimiser_built_right_after_convert_trains_the_feedback(rule):
    """Feedback parameters made at the first forward pass (direct rules) keep the object the optimiser holds."""
    model = falign.convert(MLP([6, 8, 3]), rule, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    falign.attach(model, opt)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    before = None
    for _ in range(2):
        opt.zero_grad()
        if falign.uses_target(model):
            falign.set_target(model, y)
        nn.functional.cross_entropy(model(x), y).backward()
        before = model.fc2.feedback_weight.detach().clone() if before is None else before
        opt.step()
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    assert id(model.fc2.feedback_weight) in held
    assert not torch.equal(model.fc2.feedback_weight.detach(), before)


@pytest.mark.parametrize("rule", falign.available_rules())
def test_torch_func_grad_and_per_example_gradients(rule):
    """``torch.func.grad`` gives the rule's gradients, and ``vmap`` of it per-example gradients whose mean is
    the batch gradient of the mean loss (the rule's, not backprop's)."""
    torch.manual_seed(0)
    model = falign.convert(MLP([6, 8, 8, 3]).to(DT), rule, seed=1, example_input=torch.randn(2, 6, dtype=DT))
    x, y = torch.randn(5, 6, dtype=DT), torch.randint(0, 3, (5,))
    params = {k: v.detach() for k, v in model.named_parameters() if "feedback" not in k}
    buffers = {k: v for k, v in model.named_buffers()}

    def loss(p, xb, yb):
        if falign.uses_target(model):
            falign.set_target(model, yb)
        out = torch.func.functional_call(model, {**p, **buffers}, (xb,))
        return nn.functional.cross_entropy(out, yb)

    grads = torch.func.grad(loss)(params, x, y)
    model.zero_grad()
    if falign.uses_target(model):
        falign.set_target(model, y)
    nn.functional.cross_entropy(model(x), y).backward()
    for k, g in grads.items():
        torch.testing.assert_close(g, dict(model.named_parameters())[k].grad, msg=k)
    per_example = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x.unsqueeze(1), y.unsqueeze(1))
    for k, g in per_example.items():
        assert g.shape == (5, *params[k].shape)
        torch.testing.assert_close(g.mean(0), grads[k], msg=k)


def test_unconvert_gives_the_plain_model_and_plain_state_dicts_load_into_converted_ones():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    model = falign.convert(net, "kp", seed=0)
    x = torch.randn(5, 4)
    model(x)
    plain = falign.unconvert(model)
    assert [type(m) for m in plain] == [nn.Linear, nn.ReLU, nn.Linear]
    assert list(plain.state_dict()) == list(net.state_dict())
    torch.testing.assert_close(plain(x), model(x))
    assert isinstance(model[0], falign.nn.FALinear)  # not in place: the converted model is untouched
    fresh = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    fresh.load_state_dict(plain.state_dict())  # exports load into the plain architecture
    torch.testing.assert_close(fresh(x), model(x))
    # a plain checkpoint into a converted model: the feedback keys are the only missing ones
    other = falign.convert(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), "kp", seed=0)
    result = other.load_state_dict(net.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["0.feedback_weight", "2.feedback_weight"]
    assert result.unexpected_keys == []
    torch.testing.assert_close(other(x), net(x))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(0, 10_000), st.floats(1e-6, 1e6), st.sampled_from([torch.float32, torch.float64]))
def test_angle_is_exact_at_0_and_180_degrees(seed, c, dtype):
    a = torch.randn(500, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    if dtype == torch.float32:  # c·a rounded to float32 is itself off the line of a by ~1e-6°
        c = 2.0 ** round(math.log2(c))
        assert angle(a, 3 * a) < 1e-5  # (0.014° with a float32 dot product)
    assert angle(a, c * a) == pytest.approx(0.0, abs=1e-6)
    assert angle(a, -c * a) == pytest.approx(180.0, abs=1e-6)
    b = torch.randn(500, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype)
    cos = float(a.double() @ b.double() / (a.double().norm() * b.double().norm()))
    assert angle(a, b) == pytest.approx(math.degrees(math.acos(cos)), abs=1e-6)
    assert math.isnan(angle(a, torch.zeros_like(a)))
