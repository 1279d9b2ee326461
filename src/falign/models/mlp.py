"""Fully connected models."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "linear": nn.Identity,
}


class MLP(nn.Sequential):
    """``widths[0] → widths[1] → … → widths[-1]`` with an activation between Linear layers.

    Args:
        widths: layer sizes including input and output, e.g. ``(64, 128, 10)``.
        activation: ``relu`` (default), ``tanh``, ``sigmoid`` or ``linear``.
        bias: whether the Linear layers have biases.
        init_scale: multiplies every weight (and bias) after PyTorch's default initialisation.

    Shape: input ``(N, *)`` is flattened to ``(N, widths[0])``; output ``(N, widths[-1])``.
    Linear layers are named ``fc1, fc2, …``; activations ``act1, act2, …``.
    """

    def __init__(self, widths: Sequence[int], activation: str = "relu", bias: bool = True,
                 init_scale: float = 1.0) -> None:
        if len(widths) < 2 or any(int(w) < 1 for w in widths):
            raise ValueError(f"MLP widths must be at least two positive sizes, got {list(widths)}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
        for i, (a, b) in enumerate(itertools.pairwise(widths), start=1):
            layers.append((f"fc{i}", nn.Linear(int(a), int(b), bias=bias)))
            if i < len(widths) - 1:
                layers.append((f"act{i}", ACTIVATIONS[activation]()))
        super().__init__(OrderedDict(layers))
        self.widths = tuple(int(w) for w in widths)
        self.activation = activation
        if init_scale != 1.0:
            with torch.no_grad():
                for p in self.parameters():
                    p.mul_(init_scale)


class TwoLayerLinear(nn.Module):
    """Two-layer linear network ``f(x) = W₂ W₁ x`` (no biases, no activation).

    Args:
        d: input dimension; hidden: hidden width; k: output dimension.
        init_scale: ε; entries of ``W₁, W₂`` are drawn ``N(0, ε²/fan_in)``.

    Shape: ``(N, d) → (N, k)``. :meth:`end_to_end` returns ``W₂ W₁ ∈ R^{k×d}``.
    """

    def __init__(self, d: int, hidden: int, k: int, init_scale: float = 1.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, k, bias=False)
        with torch.no_grad():
            self.fc1.weight.normal_(0.0, init_scale / d**0.5)
            self.fc2.weight.normal_(0.0, init_scale / hidden**0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.fc1(x))

    def end_to_end(self) -> Tensor:
        return (self.fc2.weight @ self.fc1.weight).detach()
