"""Unbatched inputs, empty batches and sequence downsampling backpropagate under every rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import falign
from falign.models import MLP
from tests.conftest import with_target

RULES = falign.available_rules()



# ---- unbatched inputs, empty batches, sequence downsampling -----------------------------------------
@pytest.mark.parametrize("rule", RULES)
def test_unbatched_and_empty_batches_backpropagate(rule):
    conv = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(0), nn.Linear(3 * 4 * 4, 2))
    model = falign.convert(conv, rule)
    x = torch.randn(2, 6, 6, requires_grad=True)
    one = torch.tensor(0)  # the class of the one unbatched example (for rules that project the target)
    torch.testing.assert_close(with_target(model, x, one), conv(x))
    with_target(model, x, one).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    mlp = falign.convert(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), rule)
    v = torch.randn(4, requires_grad=True)
    with_target(mlp, v, one).sum().backward()
    assert v.grad.shape == (4,)
    for net, shape in ((MLP([4, 8, 3]), (0, 4)), (nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(),
                                                                 nn.Linear(3 * 4 * 4, 2)), (0, 2, 6, 6))):
        model = falign.convert(net, rule, example_input=torch.randn(1, *shape[1:]))
        empty = torch.randn(shape, requires_grad=True)
        with_target(model, empty).sum().backward()
        assert empty.grad.shape == shape


def test_dfa_with_sequence_downsampling_trains():
    class Downsample(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(6, 8)
            self.pool = nn.AvgPool1d(2)
            self.out = nn.Linear(8, 3)

        def forward(self, x):  # (N, 10, 6) -> (N, 5, 3)
            h = torch.relu(self.inp(x))
            return self.out(self.pool(h.transpose(1, 2)).transpose(1, 2))

    model = falign.convert(Downsample(), "dfa")
    x = torch.randn(4, 10, 6)
    model(x).pow(2).sum().backward()
    assert model.out.direct_mode == "per-position" and model.inp.direct_mode == "per-sample"
    assert tuple(model.inp.feedback_weight.shape) == (5 * 3, 6)
    assert torch.isfinite(model.inp.weight.grad).all()
