"""Models by name, sized for a dataset's input shape and number of classes."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from falign.models.cnn import LeNet5
from falign.models.mlp import MLP, TwoLayerLinear
from falign.models.resnet import resnet20, resnet56

MODELS = ("mlp", "lenet", "resnet20", "resnet56", "linear2")


def build_model(name: str, input_shape: Sequence[int], num_classes: int, *, hidden: Sequence[int] = (256, 256),
                activation: str = "relu", bias: bool = True, init_scale: float = 1.0) -> nn.Module:
    """A plain-torch model.

    Args:
        name: one of :data:`MODELS`.
        input_shape: one sample's shape, e.g. ``(1, 28, 28)`` or ``(64,)``.
        num_classes: output size.
        hidden: hidden widths (``mlp``; ``linear2`` uses ``hidden[0]``).
        activation, bias, init_scale: ``mlp`` options (``init_scale`` also for ``linear2``).
    """
    features = math.prod(input_shape)
    if name == "mlp":
        return MLP([features, *hidden, num_classes], activation=activation, bias=bias, init_scale=init_scale)
    if name == "linear2":
        return nn.Sequential(nn.Flatten(), TwoLayerLinear(features, hidden[0], num_classes, init_scale))
    if name in ("lenet", "resnet20", "resnet56"):
        if len(input_shape) != 3 or input_shape[1] != input_shape[2]:
            raise ValueError(f"model {name!r} needs square images (C, H, W); this dataset gives {tuple(input_shape)}")
        if name == "lenet":
            return LeNet5(input_shape[0], num_classes, input_shape[1])
        return (resnet20 if name == "resnet20" else resnet56)(num_classes, input_shape[0])
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
