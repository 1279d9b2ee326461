"""Models by name, sized for a dataset's input shape and number of classes."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from torch import nn

from falign.errors import FalignError
from falign.models.cnn import LeNet5
from falign.models.mlp import MLP, TwoLayerLinear
from falign.models.resnet import resnet20, resnet56

MODELS = ("mlp", "lenet", "resnet20", "resnet56", "linear2")

BYTES_PER_PARAMETER = 4 * 4
"""What a float32 parameter costs in training, roughly: the weight, its feedback matrix, its gradient and the
optimiser's state (:func:`check_size`)."""


class ModelError(FalignError, ValueError):
    """A model cannot be built for this dataset or does not fit in memory."""


def physical_memory() -> int | None:
    """The machine's physical memory in bytes (``None`` where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_size(model: nn.Module, name: str, memory: int | None = None) -> None:
    """Refuse a model whose training would need more than the machine's memory (``memory`` bytes; default
    :func:`physical_memory`), before any of it is allocated (``model`` may live on the meta device)."""
    memory = physical_memory() if memory is None else memory
    count = sum(p.numel() for p in model.parameters())
    need = count * BYTES_PER_PARAMETER
    if memory is not None and need > memory:
        raise ModelError(f"model {name!r} has {count:,} parameters: training it needs about {need / 2**30:,.1f} GiB "
                         f"(weights, feedback, gradients, optimiser state) but this machine has "
                         f"{memory / 2**30:,.1f} GiB; choose smaller widths (--hidden)")


def build_model(name: str, input_shape: Sequence[int], num_classes: int, *, hidden: Sequence[int] = (256, 256),
                activation: str = "relu", bias: bool = True, init_scale: float = 1.0) -> nn.Module:
    """A plain-torch model.

    Args:
        name: one of :data:`MODELS`.
        input_shape: one sample's shape, e.g. ``(1, 28, 28)`` or ``(64,)``.
        num_classes: output size.
        hidden: hidden widths (``mlp``; ``linear2`` uses ``hidden[0]``).
        activation, bias, init_scale: ``mlp`` options (``init_scale`` also for ``linear2``).

    Raises:
        ModelError: the model needs image inputs the dataset does not have, or is too large for the machine's
            memory (counted on the meta device first, so nothing is allocated: :func:`check_size`).
    """
    with torch.device("meta"):
        check_size(_build(name, input_shape, num_classes, hidden, activation, bias, init_scale), name)
    return _build(name, input_shape, num_classes, hidden, activation, bias, init_scale)


def _build(name: str, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int], activation: str,
           bias: bool, init_scale: float) -> nn.Module:
    features = math.prod(input_shape)
    if name == "mlp":
        return MLP([features, *hidden, num_classes], activation=activation, bias=bias, init_scale=init_scale)
    if name == "linear2":
        return nn.Sequential(nn.Flatten(), TwoLayerLinear(features, hidden[0], num_classes, init_scale))
    if name in ("lenet", "resnet20", "resnet56"):
        if len(input_shape) != 3 or input_shape[1] != input_shape[2]:
            raise ModelError(f"model {name!r} needs square images (C, H, W); this dataset gives {tuple(input_shape)}: "
                             f"choose an image dataset (fashion-mnist, mnist, cifar10, cifar100) or --model mlp")
        if name == "lenet":
            return LeNet5(input_shape[0], num_classes, input_shape[1])
        return (resnet20 if name == "resnet20" else resnet56)(num_classes, input_shape[0])
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
