"""The step hook of ``falign.attach``: it walks the model again only after a module registration."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import falign
import falign.steps


def _step(model: nn.Module, opt: torch.optim.Optimizer, width: int = 8) -> None:
    opt.zero_grad()
    x = torch.randn(4, width, requires_grad=True)
    model(x).square().sum().backward()
    opt.step()


def _steps(model: nn.Module) -> list[int]:
    return [int(layer.feedback_step) for layer in falign.feedback_layers(model)]


def test_the_hook_does_not_walk_the_model_at_every_step(monkeypatch):
    model = falign.convert(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)), "brsf")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    falign.attach(model, opt)
    walks: list[nn.Module] = []
    walk = falign.steps._groups
    monkeypatch.setattr(falign.steps, "_groups", lambda m: walks.append(m) or walk(m))
    for _ in range(3):
        _step(model, opt)
    assert walks == []
    assert _steps(model) == [3, 3]


def test_a_layer_registered_after_attach_is_stepped(monkeypatch):
    model = falign.convert(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)), "brsf")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    falign.attach(model, opt)
    _step(model, opt)
    extra = falign.convert(nn.Sequential(nn.Linear(3, 3)), "brsf", seed=1)[0]
    model.append(extra)  # a registration: the hook walks the model once more
    opt.add_param_group({"params": list(extra.parameters())})
    walks: list[nn.Module] = []
    walk = falign.steps._groups
    monkeypatch.setattr(falign.steps, "_groups", lambda m: walks.append(m) or walk(m))
    for _ in range(3):
        _step(model, opt)
    assert len(walks) == 1
    assert _steps(model) == [4, 4, 3]


def test_a_layer_put_in_place_without_registration_fails_loudly():
    """``ModuleList.insert`` writes ``_modules`` itself (no registration hook runs): the hook does not see the layer,
    whose next forward pass after an unstepped change raises instead of training without its redraws."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(8, 8)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)
            return x

    model = falign.convert(Net(), "brsf")
    extra = falign.convert(nn.Sequential(nn.Linear(8, 8)), "brsf", seed=1)[0]  # built (registered) before the step
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    falign.attach(model, opt)
    _step(model, opt)
    model.layers.insert(0, extra)
    opt.add_param_group({"params": list(extra.parameters())})
    _step(model, opt)  # extra's first step: its weights change, no redraw
    with pytest.raises(falign.StepWorkSkipped):
        _step(model, opt)
