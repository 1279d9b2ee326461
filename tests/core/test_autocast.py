"""Every rule under torch.autocast (CPU bfloat16): the converted layers cast as PyTorch's own layers do (the same
output dtypes), backprop mode gives PyTorch's autocast gradients, the rule's B is used in the lower precision,
and parameters — also a learned B — keep float32 gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import falign
from falign.functional import backprop_mode
from tests.conftest import with_target
from tests.rule_reference import REFERENCE

RULES = falign.available_rules()
LAYER_RULES = [r for r in RULES if falign.get_rule(r).has_feedback and not falign.get_rule(r).direct]
BF16 = torch.bfloat16


class Net(nn.Module):
    """A conv, a transposed conv, self-attention, a GRU and a linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(5, 6, 3, padding=1)
        self.deconv = nn.ConvTranspose1d(6, 5, 3, padding=1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.rnn = nn.GRU(8, 8, batch_first=True)
        self.head = nn.Linear(8 * 5, 3)

    def forward(self, x):
        x = self.deconv(torch.relu(self.conv(x)))
        x = self.attn(x, x, x, need_weights=False)[0]
        return self.head(self.rnn(x)[0].flatten(1))


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 5, 8, generator=g), torch.randint(0, 3, (6,), generator=g)


@pytest.mark.parametrize("rule", RULES)
def test_every_rule_trains_under_cpu_bfloat16_autocast(rule):
    torch.manual_seed(0)
    model = falign.convert(Net(), rule, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    falign.attach(model, opt)
    x, y = _data()
    losses = []
    for _ in range(3):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=BF16):
            out = with_target(model, x, y)
            loss = F.cross_entropy(out, y)
        assert out.dtype == BF16  # as the plain head: a Linear under autocast
        loss.backward()
        assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("rule", ["fa", "usf", "dfa"])
def test_output_dtypes_match_pytorch_layers(rule):
    torch.manual_seed(0)
    plain = Net()
    model = falign.convert(plain, rule)
    x, y = _data()
    captured = {}

    def hook(name):
        def fn(module, args, out):
            captured.setdefault(name, []).append((out[0] if isinstance(out, tuple) else out).dtype)
        return fn

    for net in (plain, model):
        for name in ("conv", "deconv", "attn", "head"):
            getattr(net, name).register_forward_hook(hook(name))
        with torch.autocast("cpu", dtype=BF16):
            with_target(net, x, y) if net is model else net(x)
    for name, dtypes in captured.items():
        assert dtypes[0] == dtypes[-1] == BF16, (name, dtypes)


@pytest.mark.parametrize("kind", ["linear", "conv", "deconv", "attention"])
def test_backprop_mode_equals_pytorch_autocast(kind):
    torch.manual_seed(0)
    layer = {"linear": lambda: nn.Linear(8, 6), "conv": lambda: nn.Conv1d(5, 4, 3),
             "deconv": lambda: nn.ConvTranspose1d(5, 4, 3, stride=2),
             "attention": lambda: nn.MultiheadAttention(8, 2, batch_first=True)}[kind]()
    plain = nn.Sequential(layer)
    model = falign.convert(plain, "fa")
    x = torch.randn(3, 5, 8)

    def run(net, inp):
        out = net[0](inp, inp, inp, need_weights=False)[0] if kind == "attention" else net(inp)
        return (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()

    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=BF16), backprop_mode():
        loss1 = run(model, x1)
    with backprop_mode():
        g1 = torch.autograd.grad(loss1, [x1, *[p for n, p in model.named_parameters() if "feedback" not in n]])
    with torch.autocast("cpu", dtype=BF16):
        loss2 = run(plain, x2)
    g2 = torch.autograd.grad(loss2, [x2, *plain.parameters()])
    torch.testing.assert_close(loss1, loss2, atol=1e-2, rtol=1e-2)
    for a, b in zip(g1, g2):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("rule", LAYER_RULES)
def test_the_rules_matrix_is_used_in_bfloat16(rule):
    torch.manual_seed(0)
    model = falign.convert(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)), rule)
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=BF16):
        hidden = model[1](model[0](x))
        hidden.retain_grad()
        out = model[2](hidden)
    g = torch.randn(4, 3)
    out.backward(g.to(out.dtype))
    b = REFERENCE[rule].matrix(model[2]).to(BF16)
    expected = (g.to(BF16) @ b).float()
    torch.testing.assert_close(hidden.grad.float(), expected, atol=1e-2, rtol=1e-2)
    assert model[2].weight.grad.dtype == torch.float32
    if falign.get_rule(rule).feedback_is_parameter:
        assert model[2].feedback_weight.grad.dtype == torch.float32


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_layers_run_in_the_parameters_dtype_under_autocast(cell):
    torch.manual_seed(0)
    model = falign.convert(nn.Sequential(cell(5, 7, batch_first=True)), "fa")
    twin = copy.deepcopy(model)
    x = torch.randn(3, 4, 5)
    with torch.autocast("cpu", dtype=BF16):
        out = model[0](x.to(BF16))[0]
    assert out.dtype == torch.float32
    out.sum().backward()
    twin[0](x.to(BF16).float())[0].sum().backward()  # the same computation without autocast
    for a, b in zip(model.parameters(), twin.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad)
